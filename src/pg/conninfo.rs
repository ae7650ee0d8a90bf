//! Connection strings, parsed in one place for both connection kinds: `postgres::Config`
//! rejects the `replication=` parameter the Go implementation's URLs carry, and the
//! replication connection needs the pieces (host, port, user, password) itself.
//!
//! Passwords must never reach a log: [`ConnInfo`]'s `Display` and `Debug` redact them, and
//! [`redact_url`] cleans arbitrary text that may echo a connection string.

use std::fmt;
use std::time::Duration;

/// Replaces passwords in every display of a connection.
const MASK: &str = "********";

/// A parsed connection string with libpq's defaults applied.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Hostname, IP address, or a Unix-socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// Other libpq parameters (e.g. `sslmode`), kept for `postgres::Config` and TLS.
    pub options: Vec<(String, String)>,
}

/// Why a connection string was refused. Never carries the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnInfoError {
    /// The text is not a valid URL or key=value list; the message never echoes input.
    Syntax(String),
    /// A `%XX` escape is malformed or does not decode to UTF-8 in the named part.
    PercentEncoding(&'static str),
    /// A parameter libpq would not know either (a typo must not silently drop `sslmode`).
    UnknownParameter(String),
    /// A parameter value that cannot be used; never reported for the password.
    InvalidValue { key: String, value: String },
    /// Several hosts (`host=a,b`) are not supported.
    MultipleHosts,
    /// No user given, and neither `PGUSER` nor `USER`/`LOGNAME` is set.
    NoUser,
}

impl fmt::Display for ConnInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnInfoError::Syntax(m) => write!(f, "invalid connection string: {m}"),
            ConnInfoError::PercentEncoding(part) => {
                write!(
                    f,
                    "invalid connection string: bad percent-encoding in {part}"
                )
            }
            ConnInfoError::UnknownParameter(k) => {
                write!(f, "invalid connection string: unknown parameter {k:?}")
            }
            ConnInfoError::InvalidValue { key, value } => {
                write!(
                    f,
                    "invalid connection string: invalid value {value:?} for {key}"
                )
            }
            ConnInfoError::MultipleHosts => {
                write!(
                    f,
                    "invalid connection string: multiple hosts are not supported"
                )
            }
            ConnInfoError::NoUser => write!(
                f,
                "connection string names no user and PGUSER/USER are not set"
            ),
        }
    }
}

impl std::error::Error for ConnInfoError {}

/// Parameters libpq (or `postgres::Config`) knows beyond the ones [`ConnInfo`] has fields
/// for; kept in `options` rather than refused.
const KNOWN_OPTIONS: &[&str] = &[
    "options",
    "hostaddr",
    "passfile",
    "require_auth",
    "channel_binding",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
    "gssencmode",
    "gsslib",
    "gssdelegation",
    "krbsrvname",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requirepeer",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

impl ConnInfo {
    /// Parses a `postgres://` / `postgresql://` URL or a libpq `key=value` string,
    /// filling the gaps from the environment the way libpq does.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        Self::parse_with_env(s, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The environment is a parameter so tests need not mutate the process's.
    fn parse_with_env(
        s: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnInfo, ConnInfoError> {
        let trimmed = s.trim();
        let params = if let Some(rest) = strip_scheme(trimmed) {
            parse_url(rest)?
        } else {
            parse_key_values(trimmed)?
        };

        let mut host = None;
        let mut port = None;
        let mut user = None;
        let mut password = None;
        let mut dbname = None;
        let mut application_name = None;
        let mut fallback_application_name = None;
        let mut connect_timeout = None;
        let mut options: Vec<(String, String)> = Vec::new();

        for (key, value) in params {
            match key.as_str() {
                "host" => host = Some(value),
                "port" => port = Some(value),
                "user" => user = Some(value),
                "password" => password = Some(value),
                "dbname" => dbname = Some(value),
                "application_name" => application_name = Some(value),
                "fallback_application_name" => fallback_application_name = Some(value),
                "connect_timeout" => connect_timeout = Some(value),
                // The Go implementation's URLs ask for a walsender this way; the replication
                // connection adds it itself and ordinary connections must not have it.
                "replication" => {}
                // libpq's URL shorthand for requiring TLS.
                "ssl" if value == "true" => set_option(&mut options, "sslmode", "require"),
                k if KNOWN_OPTIONS.contains(&k) => {
                    validate_option(k, &value)?;
                    set_option(&mut options, k, &value);
                }
                _ => return Err(ConnInfoError::UnknownParameter(key)),
            }
        }

        let host = non_empty(host)
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| "localhost".to_string());
        if host.contains(',') {
            return Err(ConnInfoError::MultipleHosts);
        }
        let port = match non_empty(port).or_else(|| env("PGPORT")) {
            None => 5432,
            Some(p) => {
                if p.contains(',') {
                    return Err(ConnInfoError::MultipleHosts);
                }
                match p.trim().parse::<u16>() {
                    Ok(n) if n != 0 => n,
                    _ => {
                        return Err(ConnInfoError::InvalidValue {
                            key: "port".to_string(),
                            value: p,
                        })
                    }
                }
            }
        };
        let user = non_empty(user)
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .ok_or(ConnInfoError::NoUser)?;
        let dbname = non_empty(dbname)
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let password = password.or_else(|| env("PGPASSWORD"));
        let application_name = application_name
            .or_else(|| env("PGAPPNAME"))
            .or(fallback_application_name);
        let connect_timeout = match connect_timeout.or_else(|| env("PGCONNECT_TIMEOUT")) {
            None => None,
            Some(t) => match t.trim().parse::<i64>() {
                // libpq: zero or negative means wait forever.
                Ok(n) if n <= 0 => None,
                Ok(n) => Some(Duration::from_secs(n.unsigned_abs())),
                Err(_) => {
                    return Err(ConnInfoError::InvalidValue {
                        key: "connect_timeout".to_string(),
                        value: t,
                    })
                }
            },
        };
        if !options.iter().any(|(k, _)| k == "sslmode") {
            if let Some(mode) = env("PGSSLMODE") {
                validate_option("sslmode", &mode)?;
                options.push(("sslmode".to_string(), mode));
            }
        }

        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            application_name,
            connect_timeout,
            options,
        })
    }

    /// How its TCP connections notice a dead peer: libpq's parameters from the URL, or
    /// the daemon's defaults (see [`TcpOptions`]).
    pub fn tcp(&self) -> TcpOptions {
        let d = TcpOptions::default();
        // Zero or less means the system's default in libpq; the daemon's is kept then.
        let secs = |k: &str, or: Duration| match self.option(k).map(parse_secs) {
            Some(Ok(Some(v))) => v,
            _ => or,
        };
        TcpOptions {
            keepalives: self
                .option("keepalives")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_none_or(|n| n != 0),
            idle: secs("keepalives_idle", d.idle),
            interval: secs("keepalives_interval", d.interval),
            count: self
                .option("keepalives_count")
                .or_else(|| self.option("keepalives_retries"))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(d.count),
            user_timeout: match self.option("tcp_user_timeout").map(parse_millis) {
                Some(Ok(v)) => v,
                _ => d.user_timeout,
            },
        }
    }

    /// The value of an entry of `options`.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `host` names a Unix-socket directory rather than a network host.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// A URL for logs and error messages, with the password masked.
    pub fn redacted(&self) -> String {
        let mut out = String::from("postgres://");
        push_encoded(&mut out, &self.user, false);
        if self.password.is_some() {
            out.push(':');
            out.push_str(MASK);
        }
        out.push('@');
        if !self.is_unix_socket() {
            if self.host.contains(':') {
                out.push('[');
                out.push_str(&self.host);
                out.push(']');
            } else {
                push_encoded(&mut out, &self.host, false);
            }
        }
        out.push(':');
        out.push_str(&self.port.to_string());
        out.push('/');
        push_encoded(&mut out, &self.dbname, false);

        let mut sep = '?';
        let mut param = |out: &mut String, k: &str, v: &str| {
            out.push(sep);
            sep = '&';
            push_encoded(out, k, false);
            out.push('=');
            push_encoded(out, v, true);
        };
        if self.is_unix_socket() {
            param(&mut out, "host", &self.host);
        }
        if let Some(app) = &self.application_name {
            param(&mut out, "application_name", app);
        }
        if let Some(t) = self.connect_timeout {
            param(&mut out, "connect_timeout", &t.as_secs().to_string());
        }
        for (k, v) in &self.options {
            if k == "sslpassword" {
                param(&mut out, k, MASK);
            } else {
                param(&mut out, k, v);
            }
        }
        out
    }

    /// A config for ordinary (non-replication) connections with every parameter
    /// `postgres::Config` understands; libpq-only ones (e.g. `sslrootcert`) are left out.
    pub fn to_postgres_config(&self) -> postgres::Config {
        let mut cfg = postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname);
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        if let Some(app) = &self.application_name {
            cfg.application_name(app);
        }
        if let Some(t) = self.connect_timeout {
            cfg.connect_timeout(t);
        }
        let tcp = self.tcp();
        cfg.keepalives(tcp.keepalives)
            .keepalives_idle(tcp.idle)
            .keepalives_interval(tcp.interval)
            .keepalives_retries(tcp.count)
            .tcp_user_timeout(tcp.user_timeout);
        for (k, v) in &self.options {
            // Values were validated by `parse`; a hand-built ConnInfo with a bad value
            // just loses that option.
            if apply_option(&mut cfg, k, v).is_err() {
                log::warn!("ignoring invalid connection option {k}");
            }
        }
        cfg
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Redacted too, so `{:?}` of a struct holding a ConnInfo cannot leak the password.
impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

fn set_option(options: &mut Vec<(String, String)>, key: &str, value: &str) {
    match options.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_string(),
        None => options.push((key.to_string(), value.to_string())),
    }
}

/// Rejects at parse time what `postgres::Config` would reject later, so
/// `to_postgres_config` can be infallible.
fn validate_option(key: &str, value: &str) -> Result<(), ConnInfoError> {
    let mut scratch = postgres::Config::new();
    scratch.host("localhost");
    apply_option(&mut scratch, key, value).map_err(|()| ConnInfoError::InvalidValue {
        key: key.to_string(),
        value: if key == "sslpassword" {
            MASK.to_string()
        } else {
            value.to_string()
        },
    })
}

/// TCP keepalives and user timeout of a connection. A partition drops packets without a
/// FIN or RST: without these, a connection to a vanished peer waits for the kernel's
/// retransmission timeout (about 15 minutes) while sending, and forever while idle. The
/// defaults notice a dead peer within about a minute either way; a URL's libpq
/// parameters (`keepalives`, `keepalives_idle`, `keepalives_interval`,
/// `keepalives_count`, `tcp_user_timeout` in milliseconds) override them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    pub keepalives: bool,
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    /// Longest that sent data may stay unacknowledged (zero: the kernel's default).
    pub user_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> TcpOptions {
        TcpOptions {
            keepalives: true,
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
            user_timeout: Duration::from_secs(60),
        }
    }
}

impl TcpOptions {
    /// The server-side counterparts, for a session to set: a backend whose client
    /// vanished in a partition then dies and releases its locks (see
    /// [`super::session::prepare_destination`]). Values as the server takes them.
    pub fn server_settings(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if self.keepalives {
            v.push(("tcp_keepalives_idle", self.idle.as_secs().to_string()));
            v.push((
                "tcp_keepalives_interval",
                self.interval.as_secs().to_string(),
            ));
            v.push(("tcp_keepalives_count", self.count.to_string()));
        }
        v.push((
            "tcp_user_timeout",
            self.user_timeout.as_millis().to_string(),
        ));
        v
    }
}

/// The largest keepalive time and interval, and probe count, Linux accepts.
const MAX_KEEPALIVE_SECS: u64 = 32767;
const MAX_KEEPALIVE_PROBES: u32 = 127;

/// libpq's `tcp_user_timeout`: milliseconds, zero for the system default.
fn parse_millis(value: &str) -> Result<Duration, ()> {
    let n = value.trim().parse::<u64>().map_err(|_| ())?;
    Ok(Duration::from_millis(n))
}

fn parse_secs(value: &str) -> Result<Option<Duration>, ()> {
    let n = value.trim().parse::<i64>().map_err(|_| ())?;
    Ok((n > 0).then(|| Duration::from_secs(n.unsigned_abs())))
}

/// Applies one option to a `postgres::Config`; options it has no notion of are accepted
/// and ignored. libpq's stricter TLS modes map to `Require`, the strictest it has.
fn apply_option(cfg: &mut postgres::Config, key: &str, value: &str) -> Result<(), ()> {
    use postgres::config::{ChannelBinding, LoadBalanceHosts, SslMode, TargetSessionAttrs};
    match key {
        "options" => {
            cfg.options(value);
        }
        "sslmode" => {
            let mode = match value {
                "disable" => SslMode::Disable,
                "allow" | "prefer" => SslMode::Prefer,
                "require" | "verify-ca" | "verify-full" => SslMode::Require,
                _ => return Err(()),
            };
            cfg.ssl_mode(mode);
        }
        "sslnegotiation" => {
            let mode = match value {
                "postgres" => postgres::config::SslNegotiation::Postgres,
                "direct" => postgres::config::SslNegotiation::Direct,
                _ => return Err(()),
            };
            cfg.ssl_negotiation(mode);
        }
        "hostaddr" => {
            let addr = value.parse::<std::net::IpAddr>().map_err(|_| ())?;
            cfg.hostaddr(addr);
        }
        "tcp_user_timeout" => {
            let d = parse_millis(value)?;
            if d.as_millis() > i32::MAX as u128 {
                return Err(());
            }
            cfg.tcp_user_timeout(d);
        }
        "keepalives" => {
            let n = value.trim().parse::<u64>().map_err(|_| ())?;
            cfg.keepalives(n != 0);
        }
        // Linux takes at most 32767 s and 127 probes; a larger value would fail every
        // connection, so it is refused with the URL.
        "keepalives_idle" | "keepalives_interval" => {
            if let Some(d) = parse_secs(value)? {
                if d.as_secs() > MAX_KEEPALIVE_SECS {
                    return Err(());
                }
                if key == "keepalives_idle" {
                    cfg.keepalives_idle(d);
                } else {
                    cfg.keepalives_interval(d);
                }
            }
        }
        "keepalives_count" | "keepalives_retries" => {
            let n = value.trim().parse::<u32>().map_err(|_| ())?;
            if n > MAX_KEEPALIVE_PROBES {
                return Err(());
            }
            cfg.keepalives_retries(n);
        }
        "target_session_attrs" => {
            let attrs = match value {
                "any" => TargetSessionAttrs::Any,
                "read-write" => TargetSessionAttrs::ReadWrite,
                "read-only" => TargetSessionAttrs::ReadOnly,
                _ => return Err(()),
            };
            cfg.target_session_attrs(attrs);
        }
        "channel_binding" => {
            let cb = match value {
                "disable" => ChannelBinding::Disable,
                "prefer" => ChannelBinding::Prefer,
                "require" => ChannelBinding::Require,
                _ => return Err(()),
            };
            cfg.channel_binding(cb);
        }
        "load_balance_hosts" => {
            let lb = match value {
                "disable" => LoadBalanceHosts::Disable,
                "random" => LoadBalanceHosts::Random,
                _ => return Err(()),
            };
            cfg.load_balance_hosts(lb);
        }
        _ => {}
    }
    Ok(())
}

fn strip_scheme(s: &str) -> Option<&str> {
    ["postgresql://", "postgres://"].iter().find_map(|scheme| {
        let head = s.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &s[scheme.len()..])
    })
}

fn syntax(msg: &str) -> ConnInfoError {
    ConnInfoError::Syntax(msg.to_string())
}

/// Splits a URL (after the scheme) into parameters, `host`/`port`/... first so that
/// query parameters override them as in libpq.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut params = Vec::new();

    // The last '@' before the query ends the user info, so that unescaped '@' and '/' in
    // a password (base64 has '/') still work instead of leaking into host or port.
    let after_userinfo = match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.push(("user".to_string(), percent_decode(user, "user")?));
            }
            if let Some(p) = password {
                params.push(("password".to_string(), percent_decode(p, "password")?));
            }
            &before_query[at + 1..]
        }
        None => before_query,
    };
    let (hostport, path) = match after_userinfo.find('/') {
        Some(i) => (&after_userinfo[..i], Some(&after_userinfo[i + 1..])),
        None => (after_userinfo, None),
    };

    if hostport.contains(',') {
        return Err(ConnInfoError::MultipleHosts);
    }
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let end = inner
            .find(']')
            .ok_or_else(|| syntax("unterminated IPv6 address in URL"))?;
        let after = &inner[end + 1..];
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| syntax("unexpected text after IPv6 address in URL"))?,
            ),
        };
        (&inner[..end], port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() {
        params.push(("host".to_string(), percent_decode(host, "host")?));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        params.push(("port".to_string(), percent_decode(p, "port")?));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.push(("dbname".to_string(), percent_decode(db, "database name")?));
    }

    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| syntax("URL query parameter without '='"))?;
        let key = percent_decode(k, "parameter name")?;
        let part = if key == "password" {
            "password"
        } else {
            "parameter value"
        };
        params.push((key, percent_decode(v, part)?));
    }
    Ok(params)
}

fn percent_decode(s: &str, part: &'static str) -> Result<String, ConnInfoError> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(ConnInfoError::PercentEncoding(part))?;
            if hex == 0 {
                return Err(ConnInfoError::PercentEncoding(part));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::PercentEncoding(part))
}

/// Percent-encodes everything but unreserved characters (and `/`, `:` in query values,
/// where they are unambiguous and keep socket paths readable).
fn push_encoded(out: &mut String, s: &str, query_value: bool) {
    for b in s.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (query_value && matches!(b, b'/' | b':' | b'*'));
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// libpq's `key = value` syntax: values may be single-quoted; a backslash escapes the
/// next character both inside and outside quotes.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut params = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The "key" may be the tail of an unquoted password with a space: not echoed.
            return Err(syntax("missing \"=\" after a parameter name"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(syntax("unterminated quoted string")),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(syntax("unterminated quoted string")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        params.push((key, value));
    }
    Ok(params)
}

/// Masks passwords in arbitrary text: the password part of `scheme://user:password@`
/// and the value of any `password=` (URL query or key=value, quoted or not). Errs on the
/// side of masking too much.
pub fn redact_url(s: &str) -> String {
    redact_keyword_values(&redact_userinfo(s))
}

fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

fn redact_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let token_end = tail.find(ends_token).unwrap_or(tail.len());
        let token = &tail[..token_end];
        match (token.find(':'), token.find('@'), token.rfind('@')) {
            (Some(colon), Some(first_at), Some(last_at)) if colon < first_at => {
                out.push_str(&token[..=colon]);
                out.push_str(MASK);
                out.push_str(&token[last_at..]);
            }
            _ => out.push_str(token),
        }
        rest = &tail[token_end..];
    }
    out.push_str(rest);
    out
}

fn redact_keyword_values(s: &str) -> String {
    const KEY: &str = "password";
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(found) = lower[pos..].find(KEY) {
        let key_end = pos + found + KEY.len();
        let after = &s[key_end..];
        let trimmed = after.trim_start();
        let Some(value_part) = trimmed.strip_prefix('=') else {
            out.push_str(&s[pos..key_end]);
            pos = key_end;
            continue;
        };
        let value_part = value_part.trim_start();
        let value_start = s.len() - value_part.len();
        out.push_str(&s[pos..value_start]);
        let value_len = if let Some(quoted) = value_part.strip_prefix('\'') {
            let mut escaped = false;
            let mut end = value_part.len();
            for (i, c) in quoted.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '\'' {
                    end = i + 2;
                    break;
                }
            }
            end
        } else {
            value_part
                .find(|c: char| ends_token(c) || c == '&' || c == '#')
                .unwrap_or(value_part.len())
        };
        out.push_str(MASK);
        pos = value_start + value_len;
    }
    out.push_str(&s[pos..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_none(_: &str) -> Option<String> {
        None
    }

    fn env_user(k: &str) -> Option<String> {
        (k == "USER").then(|| "osuser".to_string())
    }

    fn parse(s: &str) -> ConnInfo {
        ConnInfo::parse_with_env(s, &env_user).unwrap()
    }

    #[test]
    fn full_url() {
        let c = parse("postgres://alice:s3cret@db.example.com:6543/sales?application_name=kv&sslmode=disable&replication=database");
        assert_eq!(c.host, "db.example.com");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        assert_eq!(c.dbname, "sales");
        assert_eq!(c.application_name.as_deref(), Some("kv"));
        assert_eq!(
            c.options,
            vec![("sslmode".to_string(), "disable".to_string())]
        );
    }

    #[test]
    fn dead_peers_are_noticed_by_default_and_as_the_url_says() {
        let d = parse("postgres://h/db").tcp();
        assert_eq!(d, TcpOptions::default());
        assert!(d.keepalives && d.user_timeout == Duration::from_secs(60));
        let c = parse(
            "postgres://h/db?keepalives_idle=2&keepalives_interval=1&keepalives_count=4&tcp_user_timeout=5000",
        )
        .tcp();
        assert_eq!(
            c,
            TcpOptions {
                keepalives: true,
                idle: Duration::from_secs(2),
                interval: Duration::from_secs(1),
                count: 4,
                // libpq's tcp_user_timeout is in milliseconds.
                user_timeout: Duration::from_millis(5000),
            }
        );
        assert!(!parse("postgres://h/db?keepalives=0").tcp().keepalives);
        // What the kernel would refuse is refused with the URL, naming the key.
        for bad in [
            "keepalives_idle=40000",
            "keepalives_interval=99999",
            "keepalives_count=500",
            "tcp_user_timeout=9999999999",
        ] {
            let e = ConnInfo::parse_with_env(&format!("postgres://h/db?{bad}"), &env_user)
                .unwrap_err()
                .to_string();
            let key = bad.split('=').next().unwrap_or_default();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let cfg = parse("postgres://h/db?tcp_user_timeout=5000").to_postgres_config();
        assert_eq!(
            cfg.get_tcp_user_timeout(),
            Some(&Duration::from_millis(5000))
        );
        assert_eq!(
            c.server_settings(),
            vec![
                ("tcp_keepalives_idle", "2".to_string()),
                ("tcp_keepalives_interval", "1".to_string()),
                ("tcp_keepalives_count", "4".to_string()),
                ("tcp_user_timeout", "5000".to_string()),
            ]
        );
    }

    #[test]
    fn url_defaults() {
        let c = parse("postgresql://");
        assert_eq!(c.host, "localhost");
        assert_eq!(c.port, 5432);
        assert_eq!(c.user, "osuser");
        assert_eq!(c.dbname, "osuser");
        assert_eq!(c.password, None);
        assert_eq!(c.connect_timeout, None);

        let c = parse("postgres://h/");
        assert_eq!(c.host, "h");
        assert_eq!(c.dbname, "osuser");

        let c = parse("POSTGRES://bob@h");
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("bob", "bob"));
    }

    #[test]
    fn url_percent_decoding() {
        let c = parse("postgres://us%40er:p%3Aa%2Fss%20w@host/my%20db");
        assert_eq!(c.user, "us@er");
        assert_eq!(c.password.as_deref(), Some("p:a/ss w"));
        assert_eq!(c.dbname, "my db");
        let c = parse("postgres://%2Fvar%2Frun%2Fpostgresql:5433/db");
        assert_eq!(c.host, "/var/run/postgresql");
        assert_eq!(c.port, 5433);
        assert!(c.is_unix_socket());
        let c = parse("postgres://u:p@ss@host/db");
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.host, "host");
        let c = parse("postgres://u:ab/c+d=@host:1/db");
        assert_eq!(c.password.as_deref(), Some("ab/c+d="));
        assert_eq!(
            (c.host.as_str(), c.port, c.dbname.as_str()),
            ("host", 1, "db")
        );
    }

    #[test]
    fn url_ipv6_and_query_host() {
        let c = parse("postgres://u@[::1]:5433/db");
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5433);
        let c = parse("postgres://u@[fe80::1]/db");
        assert_eq!(c.host, "fe80::1");
        assert_eq!(c.port, 5432);
        let c = parse("postgres:///db?host=/tmp&port=5999&user=x&password=y");
        assert_eq!(c.host, "/tmp");
        assert_eq!(c.port, 5999);
        assert_eq!(c.user, "x");
        assert_eq!(c.password.as_deref(), Some("y"));
        assert_eq!(c.dbname, "db");
        let c = parse("postgres://u@h/db?connect_timeout=7&ssl=true");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(c.option("sslmode"), Some("require"));
    }

    #[test]
    fn key_values() {
        let c = parse(
            "host=/var/run/postgresql port = 5433 user=bob password='pw' dbname=x connect_timeout=0",
        );
        assert_eq!(c.host, "/var/run/postgresql");
        assert_eq!(c.port, 5433);
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.connect_timeout, None);
        assert!(ConnInfo::parse_with_env("user=u password='it''s'", &env_user).is_err());
    }

    #[test]
    fn quoted_escapes() {
        let c = parse(r"user=bob password='it\'s a \\ test' dbname='my db' application_name=a\ b");
        assert_eq!(c.password.as_deref(), Some(r"it's a \ test"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.application_name.as_deref(), Some("a b"));
        let c = parse("password='' user=u");
        assert_eq!(c.password.as_deref(), Some(""));
        assert_eq!(c.user, "u");
        let c = parse("");
        assert_eq!(c.user, "osuser");
    }

    #[test]
    fn environment_defaults() {
        let env = |k: &str| match k {
            "PGHOST" => Some("pghost".to_string()),
            "PGPORT" => Some("6000".to_string()),
            "PGUSER" => Some("pguser".to_string()),
            "PGPASSWORD" => Some("envpw".to_string()),
            "USER" => Some("osuser".to_string()),
            _ => None,
        };
        let c = ConnInfo::parse_with_env("dbname=d", &env).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str()),
            ("pghost", 6000, "pguser")
        );
        assert_eq!(c.password.as_deref(), Some("envpw"));
        let c = ConnInfo::parse_with_env("postgres://a:given@h:1/d", &env).unwrap();
        assert_eq!(c.password.as_deref(), Some("given"));
        assert_eq!(c.port, 1);
        assert_eq!(
            ConnInfo::parse_with_env("host=h", &env_none),
            Err(ConnInfoError::NoUser)
        );
    }

    #[test]
    fn errors_never_show_password() {
        let bad = [
            "postgres://u:hunter2@h:notaport/db",
            "postgres://u:hunter2@h/db?x=1",
            "postgres://u:hun%zzter2@h/db",
            "postgres://u:hunter2@h/db?novalue",
            "postgres://u:hunter2@a,b/db",
            "user=u password='hunter2",
            "user=u password=hunter2 sslmode=bogus",
            "user=u password=hunter2 port=99999",
            "user=u password=hunter2 typo",
            "user=u password=hun ter2",
            "postgres://u:hun/ter2@h:x/db",
        ];
        for s in bad {
            let err = ConnInfo::parse_with_env(s, &env_user).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter2"), "{s}: {shown}");
        }
        assert_eq!(
            ConnInfo::parse_with_env("user=u sslmod=require", &env_user),
            Err(ConnInfoError::UnknownParameter("sslmod".to_string()))
        );
    }

    #[test]
    fn redaction() {
        let c =
            parse("postgres://alice:hunter2@db:5433/sales?application_name=app&sslmode=require");
        let r = c.redacted();
        assert_eq!(
            r,
            "postgres://alice:********@db:5433/sales?application_name=app&sslmode=require"
        );
        assert_eq!(format!("{c}"), r);
        assert_eq!(format!("{c:?}"), r);
        assert!(!format!("{:?}", Some(vec![c.clone()])).contains("hunter2"));
        assert!(!format!("{c:#?}").contains("hunter2"));

        let c = parse("host=/tmp user='a b' dbname=x port=5");
        assert_eq!(c.redacted(), "postgres://a%20b@:5/x?host=/tmp");
        let c = parse("postgres://u@[::1]/d");
        assert_eq!(c.redacted(), "postgres://u@[::1]:5432/d");
    }

    #[test]
    fn redacted_round_trips() {
        let c = parse("postgres://u%3Ax:pw@h:7/d%2Fb?application_name=a%26b&options=-c%20x%3Dy");
        let mut back = ConnInfo::parse_with_env(&c.redacted(), &env_user).unwrap();
        back.password = c.password.clone();
        assert_eq!(back, c);
    }

    #[test]
    fn redact_url_text() {
        assert_eq!(
            redact_url("failed: postgres://u:hunter2@h/db?x=1 refused"),
            "failed: postgres://u:********@h/db?x=1 refused"
        );
        assert_eq!(
            redact_url("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(
            redact_url("url \"postgres://u:p@ss/w@h/db\""),
            "url \"postgres://u:********@h/db\""
        );
        assert_eq!(
            redact_url("host=h password=hunter2 user=u"),
            "host=h password=******** user=u"
        );
        assert_eq!(
            redact_url(r"host=h PASSWORD = 'a \' b' user=u"),
            "host=h PASSWORD = ******** user=u"
        );
        assert_eq!(
            redact_url("postgres:///db?password=hunter2&user=u"),
            "postgres:///db?password=********&user=u"
        );
        assert_eq!(
            redact_url("password authentication failed for user \"u\""),
            "password authentication failed for user \"u\""
        );
        assert!(!redact_url("x postgres://u:a%40b@h").contains("a%40b"));
    }

    #[test]
    fn postgres_config() {
        let c = parse("postgres://alice:pw@db:5433/sales?application_name=app&sslmode=verify-full&connect_timeout=3&keepalives_idle=30&sslrootcert=/x");
        let cfg = c.to_postgres_config();
        assert_eq!(cfg.get_user(), Some("alice"));
        assert_eq!(cfg.get_password(), Some(&b"pw"[..]));
        assert_eq!(cfg.get_dbname(), Some("sales"));
        assert_eq!(cfg.get_ports(), &[5433]);
        assert_eq!(cfg.get_application_name(), Some("app"));
        assert_eq!(cfg.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(cfg.get_ssl_mode(), postgres::config::SslMode::Require);
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(30));
        assert!(matches!(
            cfg.get_hosts(),
            [postgres::config::Host::Tcp(h)] if h == "db"
        ));
        let cfg = parse("host=/run/pg user=u").to_postgres_config();
        assert!(matches!(cfg.get_hosts(), [postgres::config::Host::Unix(_)]));
    }
}
