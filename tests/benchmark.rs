//! Benchmark (not part of the test run): apply a 1,000,000-row insert backlog with the
//! daemon, then the same backlog with PostgreSQL's own logical replication
//! (CREATE SUBSCRIPTION) on the same machine, and print both rates and their ratio.
//!
//! Run: `cargo test --release --test benchmark -- --ignored --nocapture`
//! Environment: KVSZ_BENCH_ROWS (default 1000000), KVSZ_BENCH_SOURCE (major, default 15),
//! KVSZ_BENCH_WORKERS (default 2), KVSZ_BENCH_ONLY (kuvasz or native).

mod support;

use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, source, unique_name, Cluster};

const SRC_TABLE: &str =
    "SET ROLE kuvasz; CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text, at timestamptz NOT NULL DEFAULT now())";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Inserts `rows` rows in transactions of 10,000 rows.
fn backlog(src: &Cluster, db: &str, rows: u64) {
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(10_000);
        src.execute(
            db,
            &format!(
                "INSERT INTO bench (id, account, amount, note) \
                 SELECT g, g % 1000, (g % 10000) / 100.0, 'note ' || g FROM generate_series({}, {}) g",
                done + 1,
                done + n
            ),
        );
        done += n;
    }
}

fn count(c: &Cluster, db: &str, table: &str) -> u64 {
    c.query(db, &format!("SELECT count(*) FROM {table}"))[0][0]
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls the destination until `rows` rows are there; returns the elapsed time. Polls
/// `max(id)` (one index probe) first and counts only at the end: counting a growing
/// million-row table every few milliseconds would steal the CPU being measured.
fn time_until(dest: &Cluster, db: &str, table: &str, rows: u64, started: Instant) -> Duration {
    let max_id = || -> u64 {
        dest.query(db, &format!("SELECT max(id) FROM {table}"))[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    loop {
        if max_id() >= rows && count(dest, db, table) >= rows {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "backlog not applied in 30 min"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kuvasz(src: &Cluster, dest: &Cluster, rows: u64, workers: usize) -> Duration {
    let (db, ddb, family) = (unique_name("bk"), unique_name("bkd"), unique_name("bench"));
    src.create_database(&db);
    src.execute(&db, SRC_TABLE);
    dest.create_database(&ddb);
    dest.execute(&ddb, SRC_TABLE);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n[source.tables]\nbench = {{}}\n",
        src.url(&db)
    );
    let workers_line = format!("num_workers = {workers}");
    // First run creates the slot and publication (empty table), then stops.
    let d = Daemon::start(&dest.url(&ddb), &map, &[workers_line.as_str()]);
    support::wait_for("slot created", Duration::from_secs(60), || {
        let r = src.query(&db, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'kuvasz_bench%' AND active");
        (r[0][0].as_deref() == Some("1")).then_some(())
    });
    let dir = d.stop_ok();
    backlog(src, &db, rows);
    src.execute(&db, "CHECKPOINT");
    dest.execute(&ddb, "CHECKPOINT");
    let started = Instant::now();
    let d = Daemon::spawn(dir);
    let t = time_until(dest, &ddb, "bench", rows, started);
    d.stop_ok();
    assert_eq!(count(dest, &ddb, "bench"), rows);
    t
}

fn native(src: &Cluster, dest: &Cluster, rows: u64) -> Duration {
    let (db, ddb) = (unique_name("nt"), unique_name("ntd"));
    let slot = unique_name("native_slot");
    src.create_database(&db);
    src.execute(&db, SRC_TABLE);
    src.execute(&db, "CREATE PUBLICATION native_pub FOR TABLE bench");
    src.execute(
        &db,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    );
    dest.create_database(&ddb);
    dest.execute(&ddb, SRC_TABLE);
    dest.execute(
        &ddb,
        &format!(
            "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' \
             PUBLICATION native_pub WITH (create_slot = false, slot_name = '{slot}', copy_data = false, enabled = false)",
            src.port
        ),
    );
    backlog(src, &db, rows);
    src.execute(&db, "CHECKPOINT");
    dest.execute(&ddb, "CHECKPOINT");
    let started = Instant::now();
    dest.execute(&ddb, "ALTER SUBSCRIPTION native_sub ENABLE");
    let t = time_until(dest, &ddb, "bench", rows, started);
    dest.execute(&ddb, "ALTER SUBSCRIPTION native_sub DISABLE");
    dest.execute(&ddb, "ALTER SUBSCRIPTION native_sub SET (slot_name = NONE)");
    dest.execute(&ddb, "DROP SUBSCRIPTION native_sub");
    src.execute(&db, &format!("SELECT pg_drop_replication_slot('{slot}')"));
    t
}

#[test]
#[ignore = "benchmark: run explicitly (see README)"]
fn insert_backlog_vs_native_logical_replication() {
    let rows: u64 = env_or("KVSZ_BENCH_ROWS", 1_000_000);
    let version: u32 = env_or("KVSZ_BENCH_SOURCE", 15);
    let workers: usize = env_or("KVSZ_BENCH_WORKERS", 2);
    let src = source(version);
    let dest = destination();
    // KVSZ_BENCH_ONLY=kuvasz|native runs one side (for profiling); both by default.
    let only = std::env::var("KVSZ_BENCH_ONLY").unwrap_or_default();
    let k = if only == "native" {
        Duration::ZERO
    } else {
        kuvasz(src, dest, rows, workers)
    };
    let n = if only == "kuvasz" {
        Duration::ZERO
    } else {
        native(src, dest, rows)
    };
    let kr = rows as f64 / k.as_secs_f64();
    let nr = rows as f64 / n.as_secs_f64();
    println!();
    println!(
        "backlog of {rows} inserted rows, source PostgreSQL {version}, destination PostgreSQL 15"
    );
    println!(
        "kuvasz-streamer ({workers} writers): {:>8.1} s  {:>10.0} rows/s",
        k.as_secs_f64(),
        kr
    );
    println!(
        "native logical replication:     {:>8.1} s  {:>10.0} rows/s",
        n.as_secs_f64(),
        nr
    );
    println!("ratio kuvasz/native: {:.2}", kr / nr);
}
