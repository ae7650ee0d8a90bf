//! A walsender connection (`replication=database`) spoken directly over a socket with
//! `postgres-protocol`, because neither `postgres` nor `tokio-postgres` can open one.
//!
//! `recv` is the daemon's hot path: bytes are read in large chunks straight into one
//! buffer, and each message is split off it without further copying.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::{backend, frontend};

use super::conninfo::{ConnInfo, TcpOptions};
use super::tls::{self, ChannelBindingMode, TlsSetup};
use super::Lsn;

/// Bytes asked of the kernel per read once the buffer runs low; big enough that a busy
/// stream costs one syscall per hundreds of messages.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much free space the buffer is refilled rather than read into piecemeal.
const MIN_READ: usize = 8 * 1024;
/// The server never sends more than 1 GB in one message; anything bigger is corruption.
const MAX_MESSAGE: usize = 1 << 30;
/// libpq has no default connect timeout; a daemon must not hang forever on a dead host.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A server that stops reading for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `finish` waits for the server to acknowledge the end of streaming, so that
/// the last standby status is processed before the socket closes.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// What the server says about itself (`IDENTIFY_SYSTEM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    /// `None` when the session is not connected to a database.
    pub dbname: Option<String>,
}

/// A new logical slot and the snapshot the initial copy must use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// Streaming from here follows the snapshot without gap or overlap.
    pub consistent_point: Lsn,
    /// Valid only until this connection runs its next command.
    pub snapshot_name: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A pgoutput message in `data`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        /// Microseconds since 2000-01-01.
        send_time: i64,
        data: Bytes,
    },
    /// The server's current WAL end; answer soon with a standby status when
    /// `reply_requested`, or the server drops the connection at `wal_sender_timeout`.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// A failed connection or command. Never contains the password.
#[derive(Debug)]
pub enum PgError {
    Io(std::io::Error),
    /// Authentication could not be carried out on our side (no password, unsupported
    /// method, bad server signature); the server's own refusals are `Server`.
    Auth(String),
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// The server sent something unexpected or the connection is out of step.
    Protocol(String),
    /// TLS could not be set up or negotiated as the connection's `ssl*` parameters ask.
    Tls(String),
    Timeout,
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    fn from_fields(mut fields: backend::ErrorFields<'_>) -> PgError {
        let mut severity = None;
        let mut localized_severity = None;
        let mut code = String::new();
        let mut message = String::new();
        let mut detail = None;
        let mut hint = None;
        loop {
            match fields.next() {
                Ok(Some(field)) => {
                    let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                    match field.type_() {
                        b'V' => severity = Some(value),
                        b'S' => localized_severity = Some(value),
                        b'C' => code = value,
                        b'M' => message = value,
                        b'D' => detail = Some(value),
                        b'H' => hint = Some(value),
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => return PgError::Protocol(format!("malformed error response: {e}")),
            }
        }
        PgError::Server {
            severity: severity.or(localized_severity).unwrap_or_default(),
            code,
            message,
            detail,
            hint,
        }
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::Io(e) => write!(f, "I/O error: {e}"),
            PgError::Auth(m) => write!(f, "authentication failed: {m}"),
            PgError::Server {
                code,
                message,
                detail,
                hint,
                ..
            } => {
                write!(f, "server error {code}: {message}")?;
                if let Some(d) = detail {
                    write!(f, " (detail: {d})")?;
                }
                if let Some(h) = hint {
                    write!(f, " (hint: {h})")?;
                }
                Ok(())
            }
            PgError::Protocol(m) => write!(f, "protocol error: {m}"),
            PgError::Tls(m) => write!(f, "TLS: {m}"),
            PgError::Timeout => write!(f, "timed out waiting for the server"),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgError::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_error(e: io::Error) -> PgError {
    if is_timeout(&e) {
        PgError::Timeout
    } else {
        PgError::Io(e)
    }
}

fn encode_error(e: io::Error) -> PgError {
    PgError::Protocol(format!("cannot encode message: {e}"))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// Sets the socket's receive low-water mark: a read (and the kernel's wake-up of a
    /// blocked reader) waits for that many bytes or the read timeout.
    fn set_rcvlowat(&self, bytes: i32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.sock.as_raw_fd(),
        };
        // SAFETY: a valid socket descriptor we own, and a pointer to an int of the size
        // given, as setsockopt(2) requires.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock.set_write_timeout(t),
        }
    }

    /// SCRAM's `tls-server-end-point` data of a TLS session with a certificate.
    fn server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            Stream::Tls(s) => tls::server_end_point(s.conn.peer_certificates()?.first()?),
            _ => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How the reader paces itself. A walsender sends one small message at a time, and a
/// reader that keeps up sleeps between them: every send then pays for waking it, and the
/// reader, just woken and with little CPU used, preempts the walsender on its CPU. The
/// walsender is what limits a backlog, and under live load it fell behind by up to
/// 100-200 ms (measured: a transaction's send time against its commit time; nothing
/// of that delay was ours), a p99 of 150-230 ms where native had 20 ms. So the socket's
/// low-water mark follows the rate of the last [`RATE_WINDOW`]:
/// - below [`BUSY_RATE`] (idle, a trickle) it is 1: every message at once;
/// - from there ([`Level::Busy`], live load of some 1,000 transactions a second and up)
///   [`BUSY_LOWAT`], so the kernel wakes the reader once per that many bytes or after
///   [`LOWAT_WAIT`] at most: p99 under live TPC-B went to 28 ms;
/// - above [`BACKLOG_RATE`] ([`Level::Backlog`]) [`BACKLOG_LOWAT`]: 256 KiB rather than
///   32 KiB took the walsender's CPU for a streamed 1M-row transaction from 4.7 s to
///   3.1 s; 16 KiB cost TPC-B a third.
///
/// A read that waits the whole [`LOWAT_WAIT`] for nothing drops back to 1.
struct Pace {
    window_start: Instant,
    bytes: usize,
    level: Level,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Idle,
    Busy,
    Backlog,
}

impl Level {
    fn of_rate(bytes_per_window: usize) -> Level {
        if bytes_per_window >= BACKLOG_RATE {
            Level::Backlog
        } else if bytes_per_window >= BUSY_RATE {
            Level::Busy
        } else {
            Level::Idle
        }
    }

    fn lowat(self) -> i32 {
        match self {
            Level::Idle => 1,
            Level::Busy => BUSY_LOWAT,
            Level::Backlog => BACKLOG_LOWAT,
        }
    }
}

const BUSY_LOWAT: i32 = 4 * 1024;
const BACKLOG_LOWAT: i32 = 256 * 1024;
const BUSY_RATE: usize = 8 * 1024;
const BACKLOG_RATE: usize = 256 * 1024;
const RATE_WINDOW: Duration = Duration::from_millis(20);
const LOWAT_WAIT: Duration = Duration::from_millis(1);

/// Where the next message stands in the input buffer.
enum Frame {
    /// A whole message of this many bytes is buffered.
    Complete(usize),
    /// At least this many bytes must be buffered before it is whole.
    Need(usize),
}

/// A backend message; CopyBothResponse is separate because `Message::parse` rejects it.
enum Backend {
    CopyBoth,
    Msg(backend::Message),
}

/// A walsender session in `replication=database` mode. Not thread-safe by design: one
/// connection belongs to one source thread.
pub struct ReplicationConnection {
    stream: Stream,
    /// `inbuf[..filled]` holds unparsed input; the rest is zeroed space for the next read,
    /// so reads go straight into the buffer without unsafe code.
    inbuf: BytesMut,
    filled: usize,
    out: BytesMut,
    /// The read timeout the socket currently has, to skip redundant setsockopt calls.
    read_timeout: Option<Duration>,
    pace: Pace,
    params: HashMap<String, String>,
    server_version_num: u32,
    in_copy: bool,
    /// Set once the byte stream may be out of step; every later call then fails.
    broken: bool,
    closed: bool,
}

impl ReplicationConnection {
    /// Opens a walsender session, over TLS as `tls` says.
    pub fn connect(
        info: &ConnInfo,
        application_name: &str,
        tls: &TlsSetup,
    ) -> Result<Self, PgError> {
        let timeout = info.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let stream = open_stream(info, deadline)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
        let stream = negotiate_tls(stream, info, tls, deadline)?;
        let mut conn = ReplicationConnection {
            stream,
            inbuf: BytesMut::new(),
            filled: 0,
            out: BytesMut::with_capacity(256),
            read_timeout: None,
            pace: Pace {
                window_start: Instant::now(),
                bytes: 0,
                level: Level::Idle,
            },
            params: HashMap::new(),
            server_version_num: 0,
            in_copy: false,
            broken: false,
            closed: false,
        };
        if let Err(e) = conn.startup(info, application_name, tls.channel_binding, deadline) {
            return Err(match e {
                PgError::Protocol(m) if conn.params.is_empty() => PgError::Protocol(format!(
                    "{m} (is {}:{} a PostgreSQL server?)",
                    info.host, info.port
                )),
                e => e,
            });
        }
        conn.stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(io_error)?;
        conn.set_read_timeout(None).map_err(io_error)?;
        // A SQL_ASCII database has no encoding to convert from: asked for UTF8, the
        // server only checks its bytes and fails the whole stream at the first value
        // that is not UTF-8. Sent as they are, such a value is one rejected row.
        if conn.parameter("server_encoding") == Some("SQL_ASCII") {
            conn.simple_query("SET client_encoding = 'SQL_ASCII'")?;
        }
        Ok(conn)
    }

    fn startup(
        &mut self,
        info: &ConnInfo,
        application_name: &str,
        channel_binding: ChannelBindingMode,
        deadline: Instant,
    ) -> Result<(), PgError> {
        let app = if application_name.is_empty() {
            info.application_name
                .as_deref()
                .unwrap_or("kuvasz-streamer")
        } else {
            application_name
        };
        // Fixed output formats, so text from pgoutput parses the same on any destination
        // whatever the source's settings: UTF-8, ISO dates, exact floats.
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &info.user),
            ("database", &info.dbname),
            ("replication", "database"),
            ("application_name", app),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        if let Some(options) = info.option("options") {
            params.push(("options", options));
        }
        frontend::startup_message(params, &mut self.out).map_err(encode_error)?;
        self.send()?;

        let mut scram: Option<ScramSha256> = None;
        // libpq's channel_binding=require: only SCRAM bound to this TLS session will do.
        let mut bound = false;
        let unbound = |how: &str| {
            PgError::Auth(format!(
                "channel_binding=require, but the server {how}; it binds SCRAM to TLS only \
                 (sslmode=require or stricter, password_encryption=scram-sha-256)"
            ))
        };
        loop {
            let msg = match self.next_backend(Some(deadline))? {
                Backend::Msg(m) => m,
                Backend::CopyBoth => return Err(self.desync("CopyBothResponse during startup")),
            };
            match msg {
                backend::Message::AuthenticationOk => {
                    if channel_binding == ChannelBindingMode::Require && !bound {
                        return Err(unbound("authenticated without channel binding"));
                    }
                    break;
                }
                backend::Message::AuthenticationCleartextPassword => {
                    if channel_binding == ChannelBindingMode::Require {
                        return Err(unbound("asks for a clear-text password"));
                    }
                    let pw = password(info)?;
                    frontend::password_message(pw, &mut self.out).map_err(encode_error)?;
                    self.send()?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    if channel_binding == ChannelBindingMode::Require {
                        return Err(unbound("asks for an MD5 password"));
                    }
                    let pw = password(info)?;
                    let hash = md5_hash(info.user.as_bytes(), pw, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.out)
                        .map_err(encode_error)?;
                    self.send()?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_string()))
                        .collect()
                        .map_err(|e| PgError::Protocol(format!("bad SASL mechanism list: {e}")))?;
                    if !mechanisms
                        .iter()
                        .any(|m| m == SCRAM_SHA_256 || m == SCRAM_SHA_256_PLUS)
                    {
                        return Err(PgError::Auth(format!(
                            "server offers SASL mechanisms {mechanisms:?}, none supported"
                        )));
                    }
                    let pw = password(info)?;
                    let end_point = match channel_binding {
                        ChannelBindingMode::Disable => None,
                        _ => self.stream.server_end_point(),
                    };
                    let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                    // As libpq: bind when both sides can; say "could, but you did not
                    // offer" when only we can, so a stripped offer is detected.
                    let (mechanism, binding) = match end_point {
                        Some(data) if plus => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(data),
                        ),
                        Some(_) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    bound = mechanism == SCRAM_SHA_256_PLUS;
                    if channel_binding == ChannelBindingMode::Require && !bound {
                        return Err(unbound(if plus {
                            "certificate gives no binding data"
                        } else {
                            "offers no SCRAM-SHA-256-PLUS"
                        }));
                    }
                    let s = ScramSha256::new(pw, binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)
                        .map_err(encode_error)?;
                    scram = Some(s);
                    self.send()?;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        PgError::Protocol("SASL continue without SASL start".to_string())
                    })?;
                    s.update(body.data())
                        .map_err(|e| PgError::Auth(format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.out).map_err(encode_error)?;
                    self.send()?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram.take().ok_or_else(|| {
                        PgError::Protocol("SASL final without SASL start".to_string())
                    })?;
                    s.finish(body.data()).map_err(|e| {
                        PgError::Auth(format!("server SCRAM signature rejected: {e}"))
                    })?;
                }
                backend::Message::ErrorResponse(body) => {
                    return Err(PgError::from_fields(body.fields()))
                }
                backend::Message::NoticeResponse(body) => log_notice(&body),
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationSspi
                | backend::Message::AuthenticationGssContinue(_) => return Err(PgError::Auth(
                    "server requires Kerberos/GSSAPI/SSPI authentication, which is not supported"
                        .to_string(),
                )),
                _ => return Err(self.desync("unexpected message during authentication")),
            }
        }

        loop {
            match self.next_backend(Some(deadline))? {
                Backend::Msg(backend::Message::ReadyForQuery(_)) => break,
                Backend::Msg(backend::Message::ParameterStatus(body)) => {
                    self.record_parameter(&body)?
                }
                Backend::Msg(backend::Message::BackendKeyData(_)) => {}
                Backend::Msg(backend::Message::NoticeResponse(body)) => log_notice(&body),
                Backend::Msg(backend::Message::ErrorResponse(body)) => {
                    return Err(PgError::from_fields(body.fields()))
                }
                _ => return Err(self.desync("unexpected message after authentication")),
            }
        }

        self.server_version_num = self
            .params
            .get("server_version_num")
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| {
                self.params
                    .get("server_version")
                    .and_then(|v| parse_server_version(v))
            })
            .ok_or_else(|| PgError::Protocol("server did not report its version".to_string()))?;
        Ok(())
    }

    /// The server's version as in `server_version_num`, e.g. 150018.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A run-time parameter the server reported (`server_version`, `TimeZone`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Runs a simple-protocol query (the only kind a walsender takes) and returns the rows
    /// of the last statement that produced a result set, as text.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        self.check_idle()?;
        frontend::query(sql, &mut self.out).map_err(encode_error)?;
        self.send()?;

        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = match self.next_backend(None)? {
                Backend::Msg(m) => m,
                Backend::CopyBoth => {
                    return Err(self.desync("simple_query cannot run a streaming command"))
                }
            };
            match msg {
                backend::Message::RowDescription(_) => rows = Vec::new(),
                backend::Message::DataRow(body) => match data_row(&body) {
                    Ok(row) => rows.push(row),
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                },
                backend::Message::ErrorResponse(body) => {
                    error.get_or_insert(PgError::from_fields(body.fields()));
                }
                backend::Message::NoticeResponse(body) => log_notice(&body),
                backend::Message::ParameterStatus(body) => self.record_parameter(&body)?,
                backend::Message::CopyInResponse(_) => {
                    frontend::copy_fail("COPY is not supported here", &mut self.out)
                        .map_err(encode_error)?;
                    self.send()?;
                }
                backend::Message::CopyOutResponse(_) => {
                    error.get_or_insert(PgError::Protocol(
                        "COPY is not supported by simple_query".to_string(),
                    ));
                }
                backend::Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the server's system id, timeline and current WAL position.
    pub fn identify_system(&mut self) -> Result<SystemIdentity, PgError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM")?;
        let bad = || PgError::Protocol("unexpected IDENTIFY_SYSTEM result".to_string());
        let row = rows.first().filter(|r| r.len() >= 4).ok_or_else(bad)?;
        Ok(SystemIdentity {
            system_id: row[0].clone().ok_or_else(bad)?,
            timeline: row[1]
                .as_deref()
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?,
            xlogpos: parse_lsn(row[2].as_deref()).ok_or_else(bad)?,
            dbname: row[3].clone(),
        })
    }

    /// Creates a logical pgoutput slot exporting a snapshot for the initial copy; the
    /// syntax changed in PostgreSQL 15.
    pub fn create_slot(&mut self, name: &str) -> Result<CreatedSlot, PgError> {
        self.create_slot_as(name, "")
    }

    /// A slot that lives only as long as this session: its exported snapshot sees
    /// exactly the transactions that committed before its consistent point, which makes
    /// it the copy snapshot of a table entering an existing slot's publication.
    pub fn create_temporary_slot(&mut self, name: &str) -> Result<CreatedSlot, PgError> {
        self.create_slot_as(name, " TEMPORARY")
    }

    fn create_slot_as(&mut self, name: &str, kind: &str) -> Result<CreatedSlot, PgError> {
        let sql = if self.server_version_num >= 150000 {
            format!(
                "CREATE_REPLICATION_SLOT {}{kind} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(name)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {}{kind} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(name)
            )
        };
        let rows = self.simple_query(&sql)?;
        let bad = || PgError::Protocol("unexpected CREATE_REPLICATION_SLOT result".to_string());
        let row = rows.first().filter(|r| r.len() >= 3).ok_or_else(bad)?;
        Ok(CreatedSlot {
            slot_name: row[0].clone().ok_or_else(bad)?,
            consistent_point: parse_lsn(row[1].as_deref()).ok_or_else(bad)?,
            snapshot_name: row[2].clone(),
        })
    }

    /// Starts streaming `publications` from `slot`. On success the connection is in
    /// copy-both mode: use `recv` and `send_standby_status`, then `finish`. With
    /// `streaming` (protocol 2+) the server sends big transactions while they are in
    /// progress, between Stream Start and Stream Stop, instead of spilling them to disk
    /// until they commit.
    pub fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publications: &[&str],
        proto_version: u32,
        messages: bool,
        streaming: bool,
    ) -> Result<(), PgError> {
        self.check_idle()?;
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '{}', publication_names {}{}{})",
            quote_ident(slot),
            start,
            proto_version,
            quote_literal(
                &publications
                    .iter()
                    .map(|p| quote_ident(p))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            if messages { ", messages 'true'" } else { "" },
            if streaming { ", streaming 'on'" } else { "" }
        );
        frontend::query(&sql, &mut self.out).map_err(encode_error)?;
        self.send()?;

        let mut error = None;
        loop {
            let msg = match self.next_backend(None)? {
                Backend::CopyBoth => {
                    if let Some(e) = error {
                        return Err(self.fail(e));
                    }
                    self.in_copy = true;
                    return Ok(());
                }
                Backend::Msg(m) => m,
            };
            match msg {
                backend::Message::ErrorResponse(body) => {
                    error.get_or_insert(PgError::from_fields(body.fields()));
                }
                backend::Message::NoticeResponse(body) => log_notice(&body),
                backend::Message::ParameterStatus(body) => self.record_parameter(&body)?,
                backend::Message::ReadyForQuery(_) => {
                    return Err(error.unwrap_or_else(|| {
                        PgError::Protocol("START_REPLICATION returned without streaming".into())
                    }))
                }
                _ => {}
            }
        }
    }

    /// The next replication message, or `None` if none was complete within `timeout`.
    /// A partly received message stays buffered for the next call.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<ReplicationMessage>, PgError> {
        if self.broken {
            return Err(broken_error());
        }
        if !self.in_copy {
            return Err(PgError::Protocol(
                "recv called before start_replication".to_string(),
            ));
        }
        let mut deadline = None;
        loop {
            let need = match self.frame()? {
                Frame::Complete(total) => {
                    let frame = self.take_frame(total);
                    match self.stream_message(frame)? {
                        Some(msg) => return Ok(Some(msg)),
                        None => continue,
                    }
                }
                Frame::Need(n) => n,
            };
            let wait = match deadline {
                None => {
                    deadline = Some(Instant::now() + timeout);
                    timeout
                }
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(rest) if !rest.is_zero() => rest,
                    _ => return Ok(None),
                },
            };
            // A zero socket timeout would mean "block forever" (and std refuses it).
            match self.fill(need, Some(wait.max(Duration::from_millis(1)))) {
                Ok(()) => {}
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(self.fail(PgError::Io(e))),
            }
        }
    }

    /// Decodes one message of the copy-both stream; `None` for ones handled here.
    fn stream_message(&mut self, frame: BytesMut) -> Result<Option<ReplicationMessage>, PgError> {
        match frame[0] {
            b'd' => {
                let frame = frame.freeze();
                let body = &frame[5..];
                match body.first() {
                    Some(b'w') if body.len() >= 25 => Ok(Some(ReplicationMessage::XLogData {
                        wal_start: Lsn(be_u64(&body[1..9])),
                        wal_end: Lsn(be_u64(&body[9..17])),
                        send_time: be_u64(&body[17..25]) as i64,
                        data: frame.slice(30..),
                    })),
                    Some(b'k') if body.len() >= 18 => Ok(Some(ReplicationMessage::Keepalive {
                        wal_end: Lsn(be_u64(&body[1..9])),
                        send_time: be_u64(&body[9..17]) as i64,
                        reply_requested: body[17] != 0,
                    })),
                    Some(&t) => Err(self.desync(&format!(
                        "unexpected replication message type {:?} ({} bytes)",
                        char::from(t),
                        body.len()
                    ))),
                    None => Err(self.desync("empty CopyData message")),
                }
            }
            b'c' => Err(self.fail(PgError::Protocol(
                "server ended the replication stream".to_string(),
            ))),
            _ => {
                let mut frame = frame;
                match backend::Message::parse(&mut frame) {
                    Ok(Some(backend::Message::NoticeResponse(body))) => {
                        log_notice(&body);
                        Ok(None)
                    }
                    Ok(Some(backend::Message::ParameterStatus(body))) => {
                        self.record_parameter(&body)?;
                        Ok(None)
                    }
                    Ok(Some(backend::Message::ErrorResponse(body))) => {
                        let e = PgError::from_fields(body.fields());
                        Err(self.fail(e))
                    }
                    _ => Err(self.desync("unexpected message during replication")),
                }
            }
        }
    }

    /// Reports progress: `flush` is what the server may release WAL up to.
    pub fn send_standby_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        if self.broken {
            return Err(broken_error());
        }
        if !self.in_copy {
            return Err(PgError::Protocol(
                "standby status outside of replication".to_string(),
            ));
        }
        self.out.reserve(39);
        self.out.put_u8(b'd');
        self.out.put_i32(38);
        self.out.put_u8(b'r');
        self.out.put_u64(write.0);
        self.out.put_u64(flush.0);
        self.out.put_u64(apply.0);
        self.out.put_i64(pg_now_micros());
        self.out.put_u8(u8::from(reply_requested));
        self.send()
    }

    /// Ends the session politely. While streaming, waits briefly for the server to
    /// acknowledge CopyDone so the last standby status is surely processed: closing a
    /// socket with unread input sends a reset that may discard it.
    pub fn finish(mut self) -> Result<(), PgError> {
        self.closed = true;
        let mut result = Ok(());
        if self.in_copy && !self.broken {
            frontend::copy_done(&mut self.out);
            // A server deep in a large transaction may not stop in time; the status was
            // sent before CopyDone, so that is no failure.
            result = match self.send().and_then(|()| self.await_copy_end()) {
                Err(PgError::Timeout) => {
                    log::debug!("server did not acknowledge the end of streaming in time");
                    Ok(())
                }
                other => other,
            };
        }
        frontend::terminate(&mut self.out);
        let terminated = self.write_out();
        result.and(terminated.map_err(io_error))
    }

    fn await_copy_end(&mut self) -> Result<(), PgError> {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        loop {
            let need = match self.frame()? {
                Frame::Complete(total) => {
                    let frame = self.take_frame(total);
                    match frame[0] {
                        b'Z' => return Ok(()),
                        b'E' => {
                            let mut frame = frame;
                            if let Ok(Some(backend::Message::ErrorResponse(body))) =
                                backend::Message::parse(&mut frame)
                            {
                                return Err(PgError::from_fields(body.fields()));
                            }
                            return Err(PgError::Protocol("malformed error response".into()));
                        }
                        _ => continue,
                    }
                }
                Frame::Need(n) => n,
            };
            let rest = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(PgError::Timeout)?;
            self.fill(need, Some(rest)).map_err(io_error)?;
        }
    }

    fn check_idle(&self) -> Result<(), PgError> {
        if self.broken {
            Err(broken_error())
        } else if self.in_copy {
            Err(PgError::Protocol(
                "the connection is streaming; no commands until it is finished".to_string(),
            ))
        } else {
            Ok(())
        }
    }

    /// Marks the connection unusable and passes the error through.
    fn fail(&mut self, e: PgError) -> PgError {
        self.broken = true;
        e
    }

    fn desync(&mut self, what: &str) -> PgError {
        self.fail(PgError::Protocol(what.to_string()))
    }

    fn record_parameter(&mut self, body: &backend::ParameterStatusBody) -> Result<(), PgError> {
        match (body.name(), body.value()) {
            (Ok(name), Ok(value)) => {
                self.params.insert(name.to_string(), value.to_string());
                Ok(())
            }
            _ => Err(self.desync("malformed ParameterStatus")),
        }
    }

    /// Whether a whole message is buffered, without touching the socket.
    #[inline]
    fn frame(&mut self) -> Result<Frame, PgError> {
        if self.filled < 5 {
            return Ok(Frame::Need(5));
        }
        let len = u32::from_be_bytes([self.inbuf[1], self.inbuf[2], self.inbuf[3], self.inbuf[4]])
            as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(self.desync(&format!("invalid message length {len}")));
        }
        let total = len + 1;
        Ok(if total <= self.filled {
            Frame::Complete(total)
        } else {
            Frame::Need(total)
        })
    }

    #[inline]
    fn take_frame(&mut self, total: usize) -> BytesMut {
        self.filled -= total;
        self.inbuf.split_to(total)
    }

    /// Reads once into the buffer, making room for at least `need` buffered bytes.
    fn fill(&mut self, need: usize, timeout: Option<Duration>) -> io::Result<()> {
        let min_len = need.max(self.filled + MIN_READ);
        if self.inbuf.len() < min_len {
            self.inbuf.truncate(self.filled);
            self.inbuf.reserve((min_len - self.filled).max(READ_CHUNK));
            let cap = self.inbuf.capacity();
            self.inbuf.resize(cap, 0);
        }
        let timeout = match timeout {
            Some(t) if self.pace.level != Level::Idle => Some(t.min(LOWAT_WAIT)),
            t => t,
        };
        self.set_read_timeout(timeout)?;
        loop {
            match self.stream.read(&mut self.inbuf[self.filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    ))
                }
                Ok(n) => {
                    self.filled += n;
                    self.paced(n)?;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if is_timeout(&e) && self.pace.level != Level::Idle {
                        // Nothing for a whole wait: the burst is over.
                        self.set_level(Level::Idle)?;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Counts `n` bytes read; at the end of each window, raises or lowers the low-water
    /// mark by the rate seen (see [`Pace`]).
    fn paced(&mut self, n: usize) -> io::Result<()> {
        self.pace.bytes += n;
        if self.pace.window_start.elapsed() >= RATE_WINDOW {
            let level = Level::of_rate(self.pace.bytes);
            self.pace.bytes = 0;
            self.pace.window_start = Instant::now();
            if level != self.pace.level {
                self.set_level(level)?;
            }
        }
        Ok(())
    }

    fn set_level(&mut self, level: Level) -> io::Result<()> {
        self.stream.set_rcvlowat(level.lowat())?;
        self.pace.level = level;
        Ok(())
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.read_timeout != timeout {
            self.stream.set_read_timeout(timeout)?;
            self.read_timeout = timeout;
        }
        Ok(())
    }

    /// The next message outside of streaming, waiting until `deadline` (or forever).
    fn next_backend(&mut self, deadline: Option<Instant>) -> Result<Backend, PgError> {
        loop {
            let need = match self.frame()? {
                Frame::Complete(total) => {
                    let mut frame = self.take_frame(total);
                    if frame[0] == b'W' {
                        return Ok(Backend::CopyBoth);
                    }
                    return match backend::Message::parse(&mut frame) {
                        Ok(Some(m)) => Ok(Backend::Msg(m)),
                        Ok(None) => Err(self.desync("truncated message")),
                        Err(e) => Err(self.desync(&format!("malformed message: {e}"))),
                    };
                }
                Frame::Need(n) => n,
            };
            let timeout = match deadline {
                None => None,
                Some(d) => Some(
                    d.checked_duration_since(Instant::now())
                        .filter(|r| !r.is_zero())
                        .ok_or_else(|| self.fail(PgError::Timeout))?,
                ),
            };
            if let Err(e) = self.fill(need, timeout) {
                let e = io_error(e);
                return Err(self.fail(e));
            }
        }
    }

    fn send(&mut self) -> Result<(), PgError> {
        if let Err(e) = self.write_out() {
            let e = io_error(e);
            return Err(self.fail(e));
        }
        Ok(())
    }

    fn write_out(&mut self) -> io::Result<()> {
        // flush: a TLS stream may keep records back until asked (a no-op on plain sockets).
        let result = self
            .stream
            .write_all(&self.out)
            .and_then(|()| self.stream.flush());
        self.out.clear();
        result
    }
}

impl Drop for ReplicationConnection {
    /// Without Terminate the server logs an "unexpected EOF" for every dropped session.
    fn drop(&mut self) {
        if !self.closed && !self.broken {
            self.out.clear();
            frontend::terminate(&mut self.out);
            let _ = self.write_out();
        }
    }
}

fn broken_error() -> PgError {
    PgError::Protocol("connection unusable after an earlier error".to_string())
}

fn password(info: &ConnInfo) -> Result<&[u8], PgError> {
    info.password.as_deref().map(str::as_bytes).ok_or_else(|| {
        PgError::Auth("the server asks for a password but none is configured".into())
    })
}

/// Time left until `deadline`, or a timeout error.
fn remaining(deadline: Instant) -> Result<Duration, PgError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(PgError::Timeout)
}

/// Turns a plain TCP stream into a TLS one as `tls` asks: SSLRequest first (unless
/// `sslnegotiation=direct`), plain text on refusal where the mode allows it, then the
/// handshake, certificate checks included, before `deadline`.
fn negotiate_tls(
    stream: Stream,
    info: &ConnInfo,
    tls: &TlsSetup,
    deadline: Instant,
) -> Result<Stream, PgError> {
    let Some(config) = tls.client_config() else {
        return Ok(stream);
    };
    // PostgreSQL speaks no TLS on Unix sockets.
    let mut tcp = match stream {
        Stream::Tcp(tcp) => tcp,
        other => return Ok(other),
    };
    let place = format!("{}:{}", info.host, info.port);
    if !tls.direct {
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_error)?;
        tcp.write_all(&request).map_err(io_error)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).map_err(io_error)?;
        match answer[0] {
            b'S' => {}
            b'N' if !tls.mode.requires_tls() => return Ok(Stream::Tcp(tcp)),
            b'N' => {
                return Err(PgError::Tls(format!(
                    "{place} does not accept TLS connections (sslmode={}): set ssl = on \
                     on the server, or lower sslmode",
                    tls.mode.as_str()
                )))
            }
            other => {
                return Err(PgError::Protocol(format!(
                    "unexpected answer {other:#04x} to SSLRequest (is {place} a PostgreSQL \
                     server?)"
                )))
            }
        }
    }
    let name = rustls::pki_types::ServerName::try_from(info.host.clone()).map_err(|e| {
        PgError::Tls(format!(
            "host {:?} cannot be checked against a certificate: {e}",
            info.host
        ))
    })?;
    let mut conn = rustls::ClientConnection::new(config.clone(), name)
        .map_err(|e| PgError::Tls(format!("{place}: {e}")))?;
    while conn.is_handshaking() {
        tcp.set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_error)?;
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Err(if is_timeout(&e) {
                PgError::Timeout
            } else {
                PgError::Tls(format!(
                    "handshake with {place} failed (sslmode={}): {e}",
                    tls.mode.as_str()
                ))
            });
        }
    }
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

/// Keepalives and the user timeout on the walsender's socket (std has no setter for
/// them; the SQL sessions get the same from `postgres::Config`).
fn set_tcp_options(s: &TcpStream, tcp: &TcpOptions) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket descriptor we own, and a pointer to an int of the size
        // given, as setsockopt(2) requires.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        libc::c_int::from(tcp.keepalives),
    )?;
    #[cfg(target_os = "linux")]
    set_linux_tcp_options(set, tcp)?;
    Ok(())
}

/// The keepalive timings and the user timeout, as Linux names them.
#[cfg(target_os = "linux")]
fn set_linux_tcp_options(
    set: impl Fn(libc::c_int, libc::c_int, libc::c_int) -> io::Result<()>,
    tcp: &TcpOptions,
) -> io::Result<()> {
    let secs = |d: Duration| libc::c_int::try_from(d.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    if tcp.keepalives {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(tcp.idle))?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(tcp.interval))?;
        let count = libc::c_int::try_from(tcp.count.max(1)).unwrap_or(libc::c_int::MAX);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    }
    let ms = libc::c_int::try_from(tcp.user_timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

fn open_stream(info: &ConnInfo, deadline: Instant) -> Result<Stream, PgError> {
    if info.is_unix_socket() {
        let path = format!("{}/.s.PGSQL.{}", info.host.trim_end_matches('/'), info.port);
        return UnixStream::connect(&path)
            .map(Stream::Unix)
            .map_err(|e| PgError::Io(io::Error::new(e.kind(), format!("{path}: {e}"))));
    }
    let place = format!("{}:{}", info.host, info.port);
    let with_place = |e: io::Error| {
        if is_timeout(&e) {
            PgError::Timeout
        } else {
            PgError::Io(io::Error::new(e.kind(), format!("{place}: {e}")))
        }
    };
    let addrs: Vec<SocketAddr> = match info.option("hostaddr") {
        Some(ip) => {
            let ip = ip
                .parse()
                .map_err(|_| PgError::Protocol(format!("invalid hostaddr {ip:?}")))?;
            vec![SocketAddr::new(ip, info.port)]
        }
        None => (info.host.as_str(), info.port)
            .to_socket_addrs()
            .map_err(with_place)?
            .collect(),
    };
    let mut last = PgError::Io(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{place}: no addresses"),
    ));
    for addr in addrs {
        let rest = remaining(deadline)?;
        match TcpStream::connect_timeout(&addr, rest) {
            Ok(s) => {
                s.set_nodelay(true).map_err(io_error)?;
                set_tcp_options(&s, &info.tcp()).map_err(io_error)?;
                return Ok(Stream::Tcp(s));
            }
            Err(e) => last = with_place(e),
        }
    }
    Err(last)
}

fn data_row(body: &backend::DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buf = body.buffer();
    body.ranges()
        .map(|range| {
            Ok(match range {
                None => None,
                Some(r) => Some(
                    std::str::from_utf8(&buf[r])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                        .to_string(),
                ),
            })
        })
        .collect()
        .map_err(|e| PgError::Protocol(format!("malformed data row: {e}")))
}

fn log_notice(body: &backend::NoticeResponseBody) {
    match PgError::from_fields(body.fields()) {
        PgError::Server {
            severity,
            code,
            message,
            ..
        } => log::info!("server {severity} {code}: {message}"),
        other => log::info!("server notice: {other}"),
    }
}

#[inline]
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn parse_lsn(s: Option<&str>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = unix.as_micros() as i64;
    micros - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

/// Quotes an identifier for replication commands and pgoutput's `publication_names`.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The replication grammar's string literal: quotes doubled, no backslash escapes.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `server_version` as `server_version_num` would have it: "15.18 (Debian ...)" is
/// 150018, "9.6.24" 90624, "18beta1" 180000.
fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: &str = v
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?;
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_levels_by_rate() {
        // Idle probes (50 small transactions a second: some 200 bytes per window), live
        // TPC-B at 2,000 a second (some 20 KiB), a backlog (megabytes).
        assert_eq!(Level::of_rate(200), Level::Idle);
        assert_eq!(Level::of_rate(BUSY_RATE - 1), Level::Idle);
        assert_eq!(Level::of_rate(20 * 1024), Level::Busy);
        assert_eq!(Level::of_rate(BACKLOG_RATE - 1), Level::Busy);
        assert_eq!(Level::of_rate(4 << 20), Level::Backlog);
        assert_eq!(Level::Idle.lowat(), 1);
        assert!(Level::Busy.lowat() < Level::Backlog.lowat());
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-1.pgdg120+1)"),
            Some(150018)
        );
        assert_eq!(parse_server_version("18.4"), Some(180004));
        assert_eq!(parse_server_version("12.22"), Some(120022));
        assert_eq!(parse_server_version("18beta1"), Some(180000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("x"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_literal(&quote_ident("it's \"x\"")),
            "'\"it''s \"\"x\"\"\"'"
        );
    }

    #[test]
    fn error_display() {
        let e = PgError::Server {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: None,
            hint: Some("create it".into()),
        };
        assert_eq!(e.code(), Some("42704"));
        assert_eq!(
            e.to_string(),
            "server error 42704: replication slot \"s\" does not exist (hint: create it)"
        );
        assert_eq!(PgError::Timeout.code(), None);
    }

    #[test]
    fn pg_epoch() {
        let now = pg_now_micros();
        // After 2024-01-01 in PostgreSQL's epoch.
        assert!(now > 757_382_400_000_000);
    }
}
