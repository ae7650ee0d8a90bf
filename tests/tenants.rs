//! Many tenants on one daemon (SPEC §1's main case): the daemon's destination sessions
//! are its writers plus a small fixed number, whatever the number of sources, so 300
//! tenant databases (`KVSZ_TENANTS`: a thousand) stream into a destination left at the
//! default `max_connections`. Prints start-up time, threads, RSS and how fast a backlog
//! spread over every tenant is applied.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{private_destination, private_source, versions, wait_for};

/// Tenant databases: 300, or `KVSZ_TENANTS` (the figures for a thousand).
fn tenants() -> usize {
    std::env::var("KVSZ_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}
const WRITERS: usize = 2;
/// Writers, the sources' shared sessions (4 set-up, 2 catalog: `pg::pool`), and the
/// supervisor's own (bookkeeping, retiring removed URLs).
const MOST_SESSIONS: usize = WRITERS + 4 + 2 + 2;

/// A field of `/proc/<pid>/status` (kB, or a count).
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 300 tenant databases, one daemon, a destination at `max_connections = 100`: every
/// tenant is copied and then streams, and the daemon never holds more than
/// [`MOST_SESSIONS`] destination sessions (sampled all along in `pg_stat_activity`).
#[test]
fn three_hundred_tenants_at_default_max_connections() {
    let tenants = tenants();
    let version = *versions().last().expect("a source version");
    let src = private_source(version);
    // One statement each: ALTER SYSTEM cannot run in a multi-statement query.
    for (param, value) in [
        ("max_wal_senders", tenants + 20),
        ("max_replication_slots", tenants + 20),
        ("max_connections", 2 * tenants + 100),
    ] {
        src.execute("postgres", &format!("ALTER SYSTEM SET {param} = {value}"));
    }
    src.restart();
    let dest = private_destination();
    dest.execute("postgres", "ALTER SYSTEM SET max_connections = 100");
    dest.restart();
    assert_eq!(
        dest.query("postgres", "SHOW max_connections"),
        [[Some("100".to_string())]]
    );

    src.create_database("tpl");
    src.execute(
        "tpl",
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t VALUES (1, 'one'), (2, 'two')",
    );
    let made = Instant::now();
    let dbs: Vec<String> = (0..tenants).map(|i| format!("tenant{i}")).collect();
    for db in &dbs {
        src.execute(
            "postgres",
            &format!("CREATE DATABASE {db} TEMPLATE tpl OWNER kuvasz"),
        );
    }
    eprintln!("{tenants} tenant databases made in {:.1?}", made.elapsed());
    dest.create_database("warehouse");
    dest.execute(
        "warehouse",
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );

    let urls: Vec<String> = dbs
        .iter()
        .map(|db| format!("{{ url = \"{}\", sid = \"{db}\" }}", src.url(db)))
        .collect();
    let map = format!(
        "[[source]]\ndatabase = \"tenants\"\nurls = [\n{}\n]\n[source.tables]\nt = {{}}\n",
        urls.join(",\n")
    );
    let started = Instant::now();
    let daemon = Daemon::start(
        &dest.url("warehouse"),
        &map,
        &[&format!("num_workers = {WRITERS}")],
    );

    // Sample the daemon's destination sessions all along.
    let most = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = dest.client("postgres");
            while !done.load(Ordering::Relaxed) {
                if let Ok(r) = c.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'warehouse' \
                     AND application_name = 'kuvasz-streamer'",
                    &[],
                ) {
                    most.fetch_max(r.get::<_, i64>(0) as usize, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let count = |sql: &str| -> usize {
            dest.query("warehouse", sql)[0][0]
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        // Every tenant copied, then every tenant's slot streaming (active).
        wait_for("every tenant copied", Duration::from_secs(300), || {
            (count("SELECT count(*) FROM t") == 2 * tenants).then_some(())
        });
        wait_for("every slot active", Duration::from_secs(300), || {
            let active = src.query(
                "postgres",
                "SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name LIKE 'kuvasz_tenants_%'",
            )[0][0]
                .as_deref()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            (active == tenants).then_some(())
        });
        let streaming = started.elapsed();
        for db in &dbs {
            src.execute(db, "INSERT INTO t VALUES (3, 'three')");
        }
        wait_for("every tenant's new row", Duration::from_secs(120), || {
            (count("SELECT count(*) FROM t WHERE id = 3") == tenants).then_some(())
        });
        let pid = daemon.pid();
        eprintln!(
            "{tenants} tenants: all streaming {:.1?} after start; {} threads; RSS {} MB; \
             at most {} destination sessions",
            streaming,
            proc_status(pid, "Threads:"),
            proc_status(pid, "VmRSS:") / 1024,
            most.load(Ordering::Relaxed)
        );
        // A backlog over every tenant: 100 rows each, written while the daemon runs.
        let wrote = Instant::now();
        for db in &dbs {
            src.execute(
                db,
                "INSERT INTO t SELECT g, 'b' || g FROM generate_series(100, 199) g",
            );
        }
        let written = wrote.elapsed();
        wait_for("every tenant's backlog", Duration::from_secs(300), || {
            (count("SELECT count(*) FROM t WHERE id >= 100") == 100 * tenants).then_some(())
        });
        eprintln!(
            "{tenants} tenants: 100 rows in each written in {written:.1?}, all applied \
             {:.1?} after the first",
            wrote.elapsed()
        );
        done.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        dest.query(
            "warehouse",
            "SELECT count(DISTINCT sid)::text, count(*)::text FROM t"
        ),
        [[Some(tenants.to_string()), Some((103 * tenants).to_string())]]
    );
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= MOST_SESSIONS,
        "the daemon held {most} destination sessions, more than its {MOST_SESSIONS}"
    );
    daemon.stop_ok();
}
