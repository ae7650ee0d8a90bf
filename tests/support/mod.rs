//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Each test binary shares one source cluster per major version (12..=18, binaries from
//! the npm packages installed by `.ci/install-postgres.sh`) and one destination cluster
//! (Debian's PostgreSQL 15). They start lazily, on free ports, under /dev/shm (or
//! `KVSZ_TEST_DIR`), and are stopped and removed when the test process exits (see
//! `process`). Tests share clusters, so each test creates its own databases and slots,
//! named by [`unique_name`].
//!
//! Roles on every cluster: `postgres` (superuser, trust), `kuvasz` (SCRAM password
//! `kuvasz`), `kv_md5` (MD5 password `kv_md5`), `kv_trust` (no password, trust); the
//! last three have LOGIN REPLICATION.

// Every test binary includes this module with `mod support;` and uses a different part.
#![allow(dead_code)]

pub mod crash_load;
pub mod daemon;
pub mod differential;
pub mod http;
pub mod netns;
mod process;

use std::fmt::Write as _;
use std::fs;
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::panic;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, SimpleQueryMessage};

/// Source versions the tests cover.
pub const ALL_VERSIONS: RangeInclusive<u32> = 12..=18;
/// Major version of the destination (the system PostgreSQL).
pub const DESTINATION_VERSION: u32 = 15;
const DESTINATION_BIN: &str = "/usr/lib/postgresql/15/bin";
const DEFAULT_PG_DIR: &str = "/opt/kuvasz-pg";

/// How long a server may take to accept connections before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running PostgreSQL cluster.
pub struct Cluster {
    /// Major version.
    pub version: u32,
    pub port: u16,
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Directory of the Unix socket and the server log (the data dir's parent).
    pub socket_dir: PathBuf,
    /// Such as "pg14-3", for messages.
    name: String,
    server: Mutex<Option<Child>>,
}

static SOURCES: [OnceLock<Cluster>; 7] = [const { OnceLock::new() }; 7];

fn source_cell(version: u32) -> &'static OnceLock<Cluster> {
    assert!(
        ALL_VERSIONS.contains(&version),
        "no source PostgreSQL {version}: tests cover {ALL_VERSIONS:?}"
    );
    &SOURCES[(version - ALL_VERSIONS.start()) as usize]
}

/// The shared source cluster of major `version`, started on first use. The first call
/// also starts the destination and every source of [`versions`] in the background,
/// because matrix tests will want them all.
pub fn source(version: u32) -> &'static Cluster {
    let cell = source_cell(version);
    prestart();
    // A failed background start leaves the cell empty; this call then retries and
    // panics with the reason in the test's own thread.
    cell.get_or_init(|| Cluster::start_source(version))
}

/// Starts the destination, then the sources in version order, on as many threads as
/// there are cores: initdb is CPU-bound, so more threads would only delay the first
/// clusters without finishing the last one sooner.
fn prestart() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Popped from the end: None is the destination.
        let mut jobs: Vec<Option<u32>> = versions().into_iter().rev().map(Some).collect();
        jobs.push(None);
        let jobs = Arc::new(Mutex::new(jobs));
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        for i in 0..cores {
            let jobs = Arc::clone(&jobs);
            let work = move || loop {
                let Some(job) = jobs.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                    return;
                };
                // A failure is reported again by the test that asks for the cluster.
                let _ = panic::catch_unwind(|| match job {
                    Some(v) => {
                        source_cell(v).get_or_init(|| Cluster::start_source(v));
                    }
                    None => {
                        destination();
                    }
                });
            };
            thread::Builder::new()
                .name(format!("pg-prestart-{i}"))
                .spawn(work)
                .unwrap();
        }
    });
}

/// The shared destination cluster (system PostgreSQL 15), started on first use.
pub fn destination() -> &'static Cluster {
    static DESTINATION: OnceLock<Cluster> = OnceLock::new();
    DESTINATION.get_or_init(Cluster::start_destination)
}

/// A source cluster owned by the caller, for tests that stop or restart the server.
/// Stopped and removed on drop.
pub fn private_source(version: u32) -> Cluster {
    Cluster::start_source(version)
}

/// A destination cluster owned by the caller, for tests that stop or restart it.
pub fn private_destination() -> Cluster {
    Cluster::start_destination()
}

/// Source versions started ahead of need, and the newest and oldest that version-free
/// tests use: all of 12..=18, or the comma-separated list in `KVSZ_TEST_PG_VERSIONS`
/// (e.g. "14,18"). The per-version tests are narrowed by name (`cargo test pg14`), never
/// by this list: a test that returned early would pass without having run.
pub fn versions() -> Vec<u32> {
    let list = std::env::var("KVSZ_TEST_PG_VERSIONS").unwrap_or_default();
    if list.trim().is_empty() {
        return ALL_VERSIONS.collect();
    }
    list.split(',')
        .map(|v| match v.trim().parse() {
            Ok(v) if ALL_VERSIONS.contains(&v) => v,
            _ => panic!("KVSZ_TEST_PG_VERSIONS={list:?}: {v:?} is not one of {ALL_VERSIONS:?}"),
        })
        .collect()
}

/// A name unique within this test run, usable unquoted as a database, slot,
/// publication or table name: `prefix` lowercased, other characters replaced by `_`,
/// then the process id and a counter. At most 63 bytes.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut clean: String = prefix
        .chars()
        .take(40)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    if !clean.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        clean.insert(0, 't');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{clean}_{}_{n}", std::process::id())
}

/// A new empty directory for a test's own files (configs, logs), removed with the
/// clusters when the test process exits.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = process::root().join(unique_name(prefix));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Hands `path` to the user the servers run as (a tablespace's directory).
pub fn give_to_server(path: &Path) {
    process::give_to_server_user(path);
}

/// Calls `f` every 100 ms until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// URL of role `kuvasz` (SCRAM-SHA-256, password `kuvasz`) for database `db`.
    pub fn url(&self, db: &str) -> String {
        self.url_as("kuvasz", "kuvasz", db)
    }

    /// URL of `user` with `password` (both used verbatim) for database `db`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// URL of role `kuvasz` for database `db` through address `addr` (a namespace
    /// link's host side, see [`Cluster::listen_on`]).
    pub fn url_via(&self, addr: std::net::Ipv4Addr, db: &str) -> String {
        format!("postgres://kuvasz:kuvasz@{addr}:{}/{db}", self.port)
    }

    /// Makes the server also listen on `addrs` (besides 127.0.0.1, same port) and lets
    /// role `kuvasz` in from 10.0.0.0/8 with its password, for SQL and replication;
    /// restarts it. The addresses must exist (a [`netns::Netns`] link's host side).
    /// Only for clusters the test owns.
    pub fn listen_on(&self, addrs: &[std::net::Ipv4Addr]) {
        let list: Vec<String> = std::iter::once("127.0.0.1".to_string())
            .chain(addrs.iter().map(|a| a.to_string()))
            .collect();
        self.execute(
            "postgres",
            &format!(
                "ALTER SYSTEM SET listen_addresses = {}",
                literal(&list.join(","))
            ),
        );
        append(
            &self.data_dir.join("pg_hba.conf"),
            "host all kuvasz 10.0.0.0/8 scram-sha-256\n\
             host replication kuvasz 10.0.0.0/8 scram-sha-256\n",
        );
        self.restart();
        let listening = self.query("postgres", "SHOW listen_addresses");
        assert_eq!(listening, vec![vec![Some(list.join(","))]], "{}", self.name);
    }

    /// URL of the `postgres` superuser (trust authentication) for database `db`.
    pub fn superuser_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new superuser connection to `db`.
    pub fn client(&self, db: &str) -> Client {
        Client::connect(&self.superuser_url(db), NoTls)
            .unwrap_or_else(|e| panic!("{}: connect to {db}: {}", self.name, describe(&e)))
    }

    /// Runs `sql` (any number of statements) as superuser in `db`.
    pub fn execute(&self, db: &str, sql: &str) {
        self.run(&mut self.client(db), db, sql);
    }

    /// Runs `sql` as superuser in `db` and returns the rows of every statement, each
    /// value in PostgreSQL's text form.
    pub fn query(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        self.run(&mut self.client(db), db, sql)
    }

    /// Creates database `name` owned by `kuvasz` (who also owns its `public` schema,
    /// which PostgreSQL 15+ no longer opens to everyone), dropping an old one first.
    pub fn create_database(&self, name: &str) {
        self.drop_database(name);
        self.execute(
            "postgres",
            &format!("CREATE DATABASE {} OWNER kuvasz", ident(name)),
        );
        self.execute(name, "ALTER SCHEMA public OWNER TO kuvasz");
    }

    /// Drops database `name` if it exists, with its replication slots and sessions.
    pub fn drop_database(&self, name: &str) {
        let mut client = self.client("postgres");
        let mut run = |sql: &str| self.run(&mut client, "postgres", sql);
        let db = literal(name);
        if run(&format!("SELECT 1 FROM pg_database WHERE datname = {db}")).is_empty() {
            return;
        }
        // Logical slots keep a database from being dropped, even WITH (FORCE).
        run(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE database = {db} AND active_pid IS NOT NULL"
        ));
        wait_for(
            &format!("{}: slots of {name} to become inactive", self.name),
            Duration::from_secs(10),
            || {
                let active = run(&format!(
                    "SELECT 1 FROM pg_replication_slots WHERE database = {db} AND active"
                ));
                active.is_empty().then_some(())
            },
        );
        run(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = {db}"
        ));
        if self.version >= 13 {
            run(&format!("DROP DATABASE {} WITH (FORCE)", ident(name)));
        } else {
            // DROP DATABASE waits up to 5 s for terminated sessions to go away.
            run(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = {db} AND pid <> pg_backend_pid()"
            ));
            run(&format!("DROP DATABASE {}", ident(name)));
        }
    }

    /// Runs `sql` on `client` (connected to `db`), panicking with the SQL and the full
    /// error on failure.
    fn run(&self, client: &mut Client, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let messages = client
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("{} ({db}): {}\nin SQL:\n{sql}", self.name, describe(&e)));
        messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// Writes `name` into the data directory as the server's own file with `mode` (a
    /// certificate, a key, pg_hba.conf). Only for clusters the test owns.
    pub fn write_data_file(&self, name: &str, contents: &[u8], mode: u32) {
        let path = self.data_dir.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        process::give_to_server_user(&path);
    }

    /// Stops the server (fast shutdown). Only for clusters the test owns.
    pub fn stop(&self) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = server.take() {
            process::shut_down(&mut child);
        }
    }

    /// Starts a stopped server again on the same port.
    pub fn start(&self) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if server.is_none() {
            *server = Some(self.launch().unwrap_or_else(|e| panic!("{e}")));
        }
    }

    /// Stops and starts the server. Only for clusters the test owns.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    fn start_source(version: u32) -> Cluster {
        let pg_dir = std::env::var("KVSZ_PG_DIR").unwrap_or_else(|_| DEFAULT_PG_DIR.into());
        let bin_dir = Path::new(&pg_dir).join(format!("node_modules/pg{version}/native/bin"));
        Cluster::start_new(&format!("pg{version}"), version, bin_dir)
    }

    fn start_destination() -> Cluster {
        Cluster::start_new("dest", DESTINATION_VERSION, DESTINATION_BIN.into())
    }

    /// initdb, configure, start on a free port, create the test roles.
    fn start_new(kind: &str, version: u32, bin_dir: PathBuf) -> Cluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        assert!(
            bin_dir.join("postgres").exists(),
            "{}/postgres is missing: run .ci/install-postgres.sh",
            bin_dir.display()
        );
        let name = format!("{kind}-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let socket_dir = process::root().join(&name);
        fs::create_dir(&socket_dir).unwrap();
        fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o700)).unwrap();
        process::give_to_server_user(&socket_dir);
        let mut cluster = Cluster {
            version,
            port: 0,
            data_dir: socket_dir.join("data"),
            socket_dir,
            bin_dir,
            name,
            server: Mutex::new(None),
        };
        cluster.initdb();
        cluster.configure();

        // Another process may take the port between our probe and the server's bind.
        let mut attempts = 0;
        let child = loop {
            cluster.port = free_port();
            match cluster.launch() {
                Ok(child) => break child,
                Err(e) if attempts < 10 && is_port_conflict(&e) => attempts += 1,
                Err(e) => panic!("{e}"),
            }
        };
        *cluster.server.get_mut().unwrap() = Some(child);
        cluster.execute(
            "postgres",
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE kuvasz LOGIN REPLICATION PASSWORD 'kuvasz';
             SET password_encryption = 'md5';
             CREATE ROLE kv_md5 LOGIN REPLICATION PASSWORD 'kv_md5';
             CREATE ROLE kv_trust LOGIN REPLICATION;",
        );
        cluster
    }

    fn initdb(&self) {
        let mut cmd = process::server_command(&self.bin_dir.join("initdb"), &self.socket_dir);
        cmd.args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C", "-D"])
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = process::spawn(cmd)
            .and_then(|child| child.wait_with_output())
            .unwrap_or_else(|e| panic!("{}: run initdb: {e}", self.name));
        assert!(
            output.status.success(),
            "{}: initdb failed ({}):\n{}{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn configure(&self) {
        let settings = format!(
            "
# kuvasz-streamer tests
listen_addresses = '127.0.0.1'
unix_socket_directories = '{}'
wal_level = logical
max_replication_slots = 50
max_wal_senders = 50
max_connections = 200
# History tests compare versions with the commit timestamps they wrote.
track_commit_timestamp = on
# Durability is pointless for throwaway clusters and costs time.
fsync = off
synchronous_commit = off
full_page_writes = off
# Keep dynamic shared memory in the data directory, so a killed server leaves
# nothing behind in /dev/shm.
dynamic_shared_memory_type = mmap
log_line_prefix = '%m [%p] %q%u@%d %a: '
",
            self.socket_dir.display()
        );
        append(&self.data_dir.join("postgresql.conf"), &settings);
        // Written over the file initdb made, so it keeps its owner and mode.
        fs::write(
            self.data_dir.join("pg_hba.conf"),
            "\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all kuvasz 127.0.0.1/32 scram-sha-256
host replication kuvasz 127.0.0.1/32 scram-sha-256
host all kv_md5 127.0.0.1/32 md5
host replication kv_md5 127.0.0.1/32 md5
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
",
        )
        .unwrap();
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    /// Errors carry the server log.
    fn launch(&self) -> Result<Child, String> {
        let log_path = self.socket_dir.join("server.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut cmd = process::server_command(&self.bin_dir.join("postgres"), &self.socket_dir);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child =
            process::spawn(cmd).map_err(|e| format!("{}: start postgres: {e}", self.name))?;
        process::register(&child);

        let failure = |why: String| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            format!("{}: {why}; server log:\n{log}", self.name)
        };
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                process::unregister(&child);
                return Err(failure(format!("postgres exited with {status}")));
            }
            if let Ok(mut client) = config.connect(NoTls) {
                // If ours failed to bind, another server may answer on this port.
                let dir = client.query_one("SELECT current_setting('data_directory')", &[]);
                if dir.is_ok_and(|row| Path::new(row.get::<_, &str>(0)) == self.data_dir) {
                    return Ok(child);
                }
            }
            if Instant::now() > deadline {
                process::shut_down(&mut child);
                return Err(failure(format!("not ready after {READY_TIMEOUT:?}")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    /// Shared clusters live in statics and are never dropped (the exit hook stops
    /// them); private ones stop here and take their directory with them.
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.socket_dir);
    }
}

/// A port the kernel considers free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

fn is_port_conflict(error: &str) -> bool {
    error.contains("could not bind") || error.contains("could not create any TCP/IP sockets")
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A database error with its SQLSTATE, detail and hint, which `Display` leaves out.
fn describe(e: &postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        let _ = write!(text, "\nDETAIL: {detail}");
    }
    if let Some(hint) = db.hint() {
        let _ = write!(text, "\nHINT: {hint}");
    }
    text
}

/// `name` as a quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Waits until `slot` on `src` has confirmed everything the source wrote so far: the
/// destination then holds every change routed before. (The insert position: with
/// `synchronous_commit = off` the write position may still be before the last commit.)
pub fn wait_confirmed(src: &Cluster, db: &str, slot: &str) {
    let lsn = src.query(db, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        .clone()
        .expect("lsn");
    wait_for(
        &format!("slot {slot} to confirm {lsn}"),
        Duration::from_secs(120),
        || {
            let r = src.query(
                db,
                &format!(
                    "SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots \
                     WHERE slot_name = {}",
                    literal(slot)
                ),
            );
            (r.first().and_then(|r| r[0].as_deref()) == Some("t")).then_some(())
        },
    );
}

/// Waits until slot `slot` is being streamed (a walsender holds it): the initial copy
/// is over, and what commits from now on reaches the daemon through the stream.
pub fn wait_slot_active(src: &Cluster, db: &str, slot: &str) {
    wait_for(
        &format!("slot {slot} streamed"),
        Duration::from_secs(60),
        || {
            let r = src.query(
                db,
                &format!(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
                    literal(slot)
                ),
            );
            (r.first().and_then(|r| r[0].as_deref()) == Some("t")).then_some(())
        },
    );
}

/// Rows of a query, every value in PostgreSQL's text form.
pub type Rows = Vec<Vec<Option<String>>>;

/// Waits until the destination rows equal the expected ones; panics with both if never.
pub fn converge(what: &str, expected: impl Fn() -> Rows, actual: impl Fn() -> Rows) {
    let mut last = (Vec::new(), Vec::new());
    let ok = wait_for_opt(Duration::from_secs(60), || {
        let (e, a) = (expected(), actual());
        if e == a {
            return true;
        }
        last = (e, a);
        false
    });
    assert!(
        ok,
        "{what}: destination never matched the source\nexpected: {:?}\nactual:   {:?}",
        last.0, last.1
    );
}

pub fn wait_for_opt(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// `$scenario(version)` as one test per source major, named `<scenario>_pg<N>`.
#[macro_export]
macro_rules! every_major {
    ($scenario:ident: $($name:ident => $v:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $scenario($v);
            }
        )*
    };
}

/// A fresh source database (named after `prefix`) with `src_sql` run in it as role
/// kuvasz, and a fresh destination database with `dest_sql`: their names.
pub fn database_pair(
    src: &Cluster,
    dest: &Cluster,
    prefix: &str,
    src_sql: &str,
    dest_sql: &str,
) -> (String, String) {
    let db = unique_name(prefix);
    let db_dst = unique_name(&format!("{prefix}dst"));
    src.create_database(&db);
    src.execute(&db, &format!("SET ROLE kuvasz; {src_sql}"));
    dest.create_database(&db_dst);
    dest.execute(&db_dst, &format!("SET ROLE kuvasz; {dest_sql}"));
    (db, db_dst)
}
