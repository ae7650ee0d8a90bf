//! Network faults between the daemon and its servers: the daemon runs in a network
//! namespace and reaches a private source (PostgreSQL 18) and a private destination
//! through one veth link each, which a test cuts (every packet silently dropped, both
//! ways: a real partition, see `support::netns`) and heals. And a reset storm: the
//! daemon's sessions on both servers terminated every second under a workload. Every
//! test ends with the destination equal to the source, and prints how long detection
//! and recovery took. Needs root (`ip netns`, `tc`).
//!
//! The tests run one at a time (they measure timings, and each owns two servers).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::netns::Netns;
use support::{
    converge, database_pair, literal, private_destination, private_source, unique_name, wait_for,
    wait_for_opt, wait_slot_active, Cluster, Rows,
};

/// The source major of these tests.
const VERSION: u32 = 18;
/// The daemon's `server.name`, its sessions' `application_name` on both servers.
const APP: &str = "kuvasz-streamer";
/// `[app] wal_receiver_timeout` of the source partition test, in seconds.
const WAL_RECEIVER_TIMEOUT: f64 = 5.0;
/// libpq keepalive parameters of the destination URL: a dead peer shows in 2 + 3 × 1 s,
/// and data unacknowledged for 5 s ends the connection (the server mirrors both).
const KEEPALIVES: &str =
    "?keepalives_idle=2&keepalives_interval=1&keepalives_count=3&tcp_user_timeout=5000";

const SRC_T: &str = "CREATE TABLE t (id int PRIMARY KEY, v text)";
const DEST_T: &str = "CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))";

/// One fault test at a time: they measure timings on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A source database and a destination database with `t`, the daemon in between.
/// Fields drop in order: the daemon first (see `drop`), then the namespace, then the
/// servers.
struct Rig {
    daemon: Option<Daemon>,
    /// The daemon's HTTP address.
    http: String,
    ns: Option<Netns>,
    src: Cluster,
    dest: Cluster,
    db: String,
    db_dst: String,
    family: String,
    slot: String,
}

impl Rig {
    /// The daemon inside a new namespace with links "source" and "dest", reaching the
    /// servers through their host sides, its HTTP server on the namespace side of
    /// "dest". `dest_sql` creates the target (run as `kuvasz`); `dest_params` is
    /// appended to the destination URL; `extra_app` lines go to `[app]`. Returns once
    /// `/readyz` answers 200.
    fn in_netns(dest_sql: &str, dest_params: &str, extra_app: &[&str]) -> Rig {
        let ns = Netns::new(&["source", "dest"]);
        let (src, dest) = (private_source(VERSION), private_destination());
        src.listen_on(&[ns.host_addr("source")]);
        dest.listen_on(&[ns.host_addr("dest")]);
        let (db, db_dst) = database_pair(&src, &dest, "fault", SRC_T, dest_sql);
        let family = unique_name("fault");
        let map = map(&family, &src.url_via(ns.host_addr("source"), &db));
        let dest_url = format!(
            "{}{dest_params}",
            dest.url_via(ns.host_addr("dest"), &db_dst)
        );
        let dir = Daemon::write_config(
            &format!("{}:0", ns.ns_addr("dest")),
            &dest_url,
            &map,
            extra_app,
        );
        let mut daemon = Daemon::spawn_in_netns(dir, &ns);
        let http = http_address(&mut daemon);
        // `ip netns exec` has exec'd: the child is the daemon itself.
        let exe = std::fs::read_link(format!("/proc/{}/exe", daemon.pid())).expect("exe");
        assert_eq!(
            exe,
            Path::new(env!("CARGO_BIN_EXE_kuvasz-streamer"))
                .canonicalize()
                .unwrap()
        );
        let rig = Rig {
            daemon: Some(daemon),
            http,
            slot: slot_name(&family),
            ns: Some(ns),
            src,
            dest,
            db,
            db_dst,
            family,
        };
        rig.wait_ready(Duration::from_secs(60));
        // The daemon's sessions come from inside the namespace.
        let ns = rig.ns.as_ref().unwrap();
        for (server, db, link) in [
            (&rig.src, &rig.db, "source"),
            (&rig.dest, &rig.db_dst, "dest"),
        ] {
            let from = server.query(
                db,
                &format!(
                    "SELECT DISTINCT client_addr::text FROM pg_stat_activity \
                     WHERE application_name = {}",
                    literal(APP)
                ),
            );
            assert_eq!(from, vec![vec![Some(format!("{}/32", ns.ns_addr(link)))]]);
        }
        rig
    }

    /// The same without a namespace: servers and daemon on 127.0.0.1.
    fn local() -> Rig {
        let (src, dest) = (private_source(VERSION), private_destination());
        let (db, db_dst) = database_pair(&src, &dest, "storm", SRC_T, DEST_T);
        let family = unique_name("storm");
        let map = map(&family, &src.url(&db));
        let mut daemon = Daemon::start(&dest.url(&db_dst), &map, &[]);
        let http = http_address(&mut daemon);
        let rig = Rig {
            daemon: Some(daemon),
            http,
            slot: slot_name(&family),
            ns: None,
            src,
            dest,
            db,
            db_dst,
            family,
        };
        rig.wait_ready(Duration::from_secs(60));
        rig
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon")
    }

    fn ns(&self) -> &Netns {
        self.ns.as_ref().expect("a namespace")
    }

    /// The source's rows as the destination should hold them.
    fn expected(&self) -> Rows {
        self.src
            .query(&self.db, "SELECT 'a', id::text, v FROM t ORDER BY id")
    }

    fn actual(&self) -> Rows {
        self.dest.query(
            &self.db_dst,
            "SELECT sid, id::text, v FROM t ORDER BY sid, id",
        )
    }

    /// `/readyz`: status code and body, or None if the daemon does not answer.
    fn readyz(&self) -> Option<(u16, String)> {
        get(&self.http, "/readyz")
    }

    fn wait_ready(&self, timeout: Duration) {
        wait_for("/readyz to answer 200", timeout, || {
            (self.readyz()?.0 == 200).then_some(())
        });
    }

    /// Waits up to `timeout` until the destination equals the source and `/readyz`
    /// answers 200; how long that took. Panics with both tables, the daemon's sessions
    /// on the destination and its status if never.
    fn recover(&self, what: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut last = (Rows::new(), Rows::new());
        let ok = wait_for_opt(timeout, || {
            let (e, a) = (self.expected(), self.actual());
            if e != a {
                last = (e, a);
                return false;
            }
            self.readyz().is_some_and(|(code, _)| code == 200)
        });
        assert!(
            ok,
            "{what}: not recovered after {timeout:?}\nexpected: {:?}\nactual:   {:?}\n\
             daemon sessions on the destination: {:?}\n/readyz: {:?}\n/api/status: {:?}",
            last.0,
            last.1,
            self.dest_sessions(),
            self.readyz(),
            get(&self.http, "/api/status"),
        );
        start.elapsed()
    }

    /// The daemon's sessions on the destination: pid, state, wait event, query start.
    fn dest_sessions(&self) -> Rows {
        self.dest.query(
            "postgres",
            &format!(
                "SELECT pid::text, state, wait_event_type || ':' || wait_event, \
                 (now() - xact_start)::text, left(query, 80) FROM pg_stat_activity \
                 WHERE application_name = {} ORDER BY pid",
                literal(APP)
            ),
        )
    }
}

impl Drop for Rig {
    /// Kills the daemon, then ends the source's walsenders: a fast shutdown of the
    /// server waits for them, and one whose client vanished behind a cut would hold it
    /// for wal_sender_timeout. Never panics.
    fn drop(&mut self) {
        drop(self.daemon.take());
        if let Ok(mut c) =
            postgres::Client::connect(&self.src.superuser_url("postgres"), postgres::NoTls)
        {
            let _ = c.simple_query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE backend_type = 'walsender'",
            );
        }
    }
}

fn map(family: &str, url: &str) -> String {
    format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{url}\", sid = \"a\" }} ]\n\
         [source.tables]\nt = {{}}\n"
    )
}

fn slot_name(family: &str) -> String {
    format!("kuvasz_{family}_a")
}

/// The address the daemon logged it listens on; panics with the log if it exits first.
fn http_address(d: &mut Daemon) -> String {
    wait_for(
        "the HTTP address in the log",
        Duration::from_secs(30),
        || {
            let log = d.log();
            let Some(at) = log.find("HTTP on http://") else {
                assert!(d.running(), "the daemon exited; log:\n{log}");
                return None;
            };
            let rest = &log[at + "HTTP on http://".len()..];
            Some(rest[..rest.find('/')?].to_string())
        },
    )
}

/// One GET over a fresh connection: status code and body, or None if the daemon does
/// not answer within a few seconds.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let sock: SocketAddr = addr.parse().expect("an address");
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Transactions on the source on a thread of their own, until stopped (or dropped).
struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Workload {
    /// Runs `step(i)` (the SQL of transaction `i`, from 1) in `db` every `pause`.
    fn start(
        src: &Cluster,
        db: &str,
        pause: Duration,
        step: impl Fn(u64) -> String + Send + 'static,
    ) -> Workload {
        let mut client = src.client(db);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                i += 1;
                let sql = step(i);
                client
                    .batch_execute(&sql)
                    .unwrap_or_else(|e| panic!("workload: {e}\nin SQL: {sql}"));
                thread::sleep(pause);
            }
            i
        });
        Workload {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; the number of transactions committed.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("workload thread")
    }
}

impl Drop for Workload {
    /// A test that failed: stops the thread before the servers go.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The source's server becomes unreachable (the daemon's link to it cut: no packet,
/// no error, the TCP connection stays established) while the source keeps committing.
/// With `wal_receiver_timeout = 5`, the daemon declares the connection dead and stops
/// being ready within 15 s, naming the source; healed, it catches up exactly.
#[test]
fn source_partition_is_noticed_pg18() {
    let _serial = serial();
    let r = Rig::in_netns(
        &format!("SET ROLE kuvasz; {DEST_T}"),
        "",
        &[&format!("wal_receiver_timeout = {WAL_RECEIVER_TIMEOUT}")],
    );
    r.src.execute(
        &r.db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g",
    );
    converge("before the cut", || r.expected(), || r.actual());

    // From the host, the source stays reachable on 127.0.0.1.
    let writer = Workload::start(&r.src, &r.db, Duration::from_millis(100), |i| {
        format!(
            "INSERT INTO t VALUES ({}, 'cut{i}'); UPDATE t SET v = 'upd{i}' WHERE id = {}",
            1000 + i,
            1 + i % 100
        )
    });
    // The workload's first row has streamed through: the stream is live when cut.
    wait_for("the workload streaming", Duration::from_secs(30), || {
        let n = r
            .dest
            .query(&r.db_dst, "SELECT count(*) FROM t WHERE id >= 1000");
        (n[0][0].as_deref() != Some("0")).then_some(())
    });
    r.ns().cut("source");
    let cut_at = Instant::now();
    let limit = Duration::from_secs_f64(WAL_RECEIVER_TIMEOUT + 10.0);
    let mut last = None;
    let detected = wait_for_opt(limit, || {
        last = r.readyz();
        last.as_ref().is_some_and(|(code, _)| *code == 503)
    });
    let detection = cut_at.elapsed();
    assert!(
        detected,
        "/readyz stayed {last:?} for {detection:.1?} of the cut (limit {limit:?});\n\
         /api/status: {:?}",
        get(&r.http, "/api/status")
    );
    eprintln!("detected after {:.1} s", detection.as_secs_f64());
    let (_, body) = last.expect("an answer");
    let label = format!("source {}/a", r.family);
    assert!(body.contains(&label), "{label:?} in {body}");

    // Held a while: the daemon cannot get back in, so it stays not ready.
    thread::sleep(Duration::from_secs(5));
    let (code, body) = r.readyz().expect("/readyz answers during the cut");
    assert_eq!(code, 503, "during the cut: {body}");
    assert!(body.contains(&label), "{label:?} in {body}");

    r.ns().heal("source");
    let healed_at = Instant::now();
    let n = writer.stop();
    let recovery = r.recover("after the heal", Duration::from_secs(90));
    eprintln!(
        "recovered after {:.1} s ({n} transactions during the cut; cut for {:.1} s)",
        recovery.as_secs_f64(),
        (healed_at - cut_at).as_secs_f64()
    );
    wait_slot_active(&r.src, &r.db, &r.slot);
    assert_eq!(
        r.actual().len(),
        100 + n as usize,
        "every row inserted during the cut"
    );
}

/// The destination's server becomes unreachable while a writer's transaction holds a
/// row lock there: an AFTER UPDATE trigger sleeps 3 s when `v = 'slow'` (the link is cut
/// meanwhile), then sends 4 MB of notices, so the session, orphaned, blocks writing them
/// with its transaction open. The same row keeps changing on the source. Healed after
/// 15 s, the daemon's new session must not wait forever behind the orphan's lock: the
/// destination ends equal to the source.
#[test]
fn destination_partition_with_locks_pg18() {
    orphan_with_locks(false);
}

/// The same, except that the orphan's connection stays cut after the heal, as if the
/// daemon's old address were gone for good: nothing ever tells the orphan that its
/// client is dead (no RST), so only the server's own timeouts on the daemon's sessions
/// (set from the URL's keepalive parameters) end it and release the row.
#[test]
fn destination_orphan_stays_cut_pg18() {
    orphan_with_locks(true);
}

fn orphan_with_locks(keep_orphan_cut: bool) {
    let _serial = serial();
    let dest_sql = format!(
        "SET ROLE kuvasz; {DEST_T};
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.v = 'slow' THEN
                 PERFORM pg_sleep(3);
                 -- 4 MB the client will never read: the session blocks writing them,
                 -- inside the transaction, whatever round trips the writer makes.
                 FOR i IN 1..4000 LOOP
                     RAISE NOTICE '%', repeat('x', 1000);
                 END LOOP;
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER t_slow AFTER INSERT OR UPDATE ON t
             FOR EACH ROW EXECUTE FUNCTION slow();
         -- Also under session_replication_role = replica.
         ALTER TABLE t ENABLE ALWAYS TRIGGER t_slow;"
    );
    let r = Rig::in_netns(&dest_sql, KEEPALIVES, &[]);
    r.src.execute(
        &r.db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g",
    );
    converge("before the cut", || r.expected(), || r.actual());

    r.src.execute(&r.db, "UPDATE t SET v = 'slow' WHERE id = 1");
    let sleeper = |pid: Option<&str>| {
        let mut sql = format!(
            "SELECT pid::text, client_port::text FROM pg_stat_activity \
             WHERE application_name = {} AND state = 'active' AND wait_event = 'PgSleep'",
            literal(APP)
        );
        if let Some(pid) = pid {
            sql.push_str(&format!(" AND pid = {pid}"));
        }
        r.dest.query("postgres", &sql)
    };
    let (pid, port) = wait_for(
        "a daemon session sleeping in the trigger",
        Duration::from_secs(30),
        || {
            let row = sleeper(None).into_iter().next()?;
            Some((row[0].clone().expect("pid"), row[1].clone().expect("port")))
        },
    );
    r.ns().cut("dest");
    let cut_at = Instant::now();
    // The sleep ends, the notices fill the socket's buffers: the session waits to
    // write, its transaction open, the row locked.
    let orphan = |r: &Rig| {
        r.dest.query(
            "postgres",
            &format!(
                "SELECT state, wait_event_type || ':' || wait_event, \
                 (backend_xid IS NOT NULL)::text, left(query, 60) \
                 FROM pg_stat_activity WHERE pid = {pid}"
            ),
        )
    };
    let blocked = wait_for(
        "the orphan to block writing",
        Duration::from_secs(15),
        || {
            let o = orphan(&r);
            (o.first()?[1].as_deref() == Some("Client:ClientWrite")).then_some(o)
        },
    );
    let locks = r.dest.query(
        &r.db_dst,
        &format!(
            "SELECT locktype, coalesce(relation::regclass::text, ''), mode, granted::text \
             FROM pg_locks WHERE pid = {pid} AND locktype IN ('relation', 'transactionid') \
             ORDER BY 1, 2, 3"
        ),
    );
    eprintln!(
        "{:.1} s after the cut, orphan {pid}: {blocked:?}; its locks: {locks:?}",
        cut_at.elapsed().as_secs_f64()
    );
    assert_eq!(blocked[0][2].as_deref(), Some("true"), "{blocked:?}");
    assert!(
        locks
            .iter()
            .any(|l| l[0].as_deref() == Some("transactionid")),
        "{locks:?}"
    );

    // The same row changes on; the stream carries it to the daemon, whose writer
    // cannot reach the destination.
    for i in 1..=10 {
        r.src.execute(
            &r.db,
            &format!(
                "UPDATE t SET v = 'after{i}' WHERE id = 1; INSERT INTO t VALUES ({}, 'n{i}')",
                100 + i
            ),
        );
        thread::sleep(Duration::from_millis(500));
    }
    let hold = Duration::from_secs(15);
    thread::sleep(hold.saturating_sub(cut_at.elapsed()));
    eprintln!(
        "at the heal ({:.1} s after the cut), orphan {pid}: {:?}; daemon sessions: {:?}",
        cut_at.elapsed().as_secs_f64(),
        orphan(&r),
        r.dest_sessions()
    );
    if keep_orphan_cut {
        r.ns().cut_port("dest", port.parse().expect("a port"));
    }
    r.ns().heal("dest");
    let recovery = r.recover("after the heal", Duration::from_secs(120));
    eprintln!(
        "converged {:.1} s after the heal; orphan {pid} then: {:?}",
        recovery.as_secs_f64(),
        orphan(&r)
    );
    assert_eq!(
        r.actual()[0],
        vec![Some("a".into()), Some("1".into()), Some("after10".into())]
    );
}

/// Every second for 20 s, under a workload, the daemon's sessions on both servers are
/// terminated (its walsender too): it reconnects each time, and the destination ends
/// equal to the source.
#[test]
fn reset_storm_pg18() {
    let _serial = serial();
    let mut r = Rig::local();
    r.src.execute(
        &r.db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 200) g",
    );
    converge("before the storm", || r.expected(), || r.actual());
    wait_slot_active(&r.src, &r.db, &r.slot);

    let workload = Workload::start(&r.src, &r.db, Duration::from_millis(5), |i| {
        let mut sql = format!(
            "BEGIN; INSERT INTO t VALUES ({}, 'i{i}'); UPDATE t SET v = 'u{i}' WHERE id = {};",
            1000 + i,
            1 + i % 200
        );
        if i % 3 == 0 {
            sql.push_str(&format!(" DELETE FROM t WHERE id = {};", 1000 + i - 2));
        }
        sql.push_str(" COMMIT");
        sql
    });
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = {} AND pid <> pg_backend_pid()",
        literal(APP)
    );
    let terminate_walsender = format!(
        "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
         WHERE slot_name = {}",
        literal(&r.slot)
    );
    let count = |rows: Rows| -> u64 {
        rows[0][0]
            .as_deref()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    };
    let start = Instant::now();
    let (mut on_src, mut on_dest) = (0, 0);
    // Per round: S if sessions on the source were terminated, D on the destination.
    let mut rounds = String::new();
    for _ in 0..20 {
        let s = count(r.src.query("postgres", &terminate_walsender))
            + count(r.src.query("postgres", &terminate));
        let d = count(r.dest.query("postgres", &terminate));
        rounds.push_str(match (s > 0, d > 0) {
            (true, true) => "SD ",
            (true, false) => "S ",
            (false, true) => "D ",
            (false, false) => "- ",
        });
        (on_src, on_dest) = (on_src + s, on_dest + d);
        thread::sleep(Duration::from_secs(1));
    }
    let n = workload.stop();
    eprintln!(
        "storm of {:.1} s: {on_src} source and {on_dest} destination sessions terminated \
         (rounds: {}), {n} transactions",
        start.elapsed().as_secs_f64(),
        rounds.trim_end()
    );
    assert!(on_src > 0 && on_dest > 0, "the storm hit nothing");
    let recovery = r.recover("after the storm", Duration::from_secs(90));
    eprintln!("converged {:.1} s after the storm", recovery.as_secs_f64());
    wait_slot_active(&r.src, &r.db, &r.slot);
    let d = r.daemon();
    assert!(d.running(), "the daemon exited; log:\n{}", d.log());
}
