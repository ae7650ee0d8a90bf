//! Benchmark (not part of the test run): apply a 1,000,000-row insert backlog with the
//! daemon, then the same backlog with PostgreSQL's own logical replication
//! (CREATE SUBSCRIPTION) on the same machine, and print both rates and their ratio.
//!
//! Run: `cargo test --release --test benchmark -- --ignored --nocapture`
//! Environment: KVSZ_BENCH_ROWS (default 1000000), KVSZ_BENCH_SOURCE (major, default 15),
//! KVSZ_BENCH_WORKERS (default 2), KVSZ_BENCH_ROUNDS (default 3), KVSZ_BENCH_ONLY (kuvasz
//! or native).
//!
//! On a small shared VM one run varies by ±15 %, so the two contenders alternate for
//! several rounds and the medians are compared. Autovacuum is off on the benchmark tables
//! of both sides: a vacuum landing inside one measurement and not the other is noise.

mod support;

use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, source, unique_name, Cluster};

const SRC_TABLE: &str =
    "SET ROLE kuvasz; CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text, at timestamptz NOT NULL DEFAULT now()) \
     WITH (autovacuum_enabled = off)";

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
    // A slot nobody reads keeps WAL: the next rounds should not pay for it.
    src.execute(
        &db,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = current_database()",
    );
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rates(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
#[ignore = "benchmark: run explicitly (see README)"]
fn insert_backlog_vs_native_logical_replication() {
    let rows: u64 = env_or("KVSZ_BENCH_ROWS", 1_000_000);
    let version: u32 = env_or("KVSZ_BENCH_SOURCE", 15);
    let workers: usize = env_or("KVSZ_BENCH_WORKERS", 2);
    let rounds: usize = env_or("KVSZ_BENCH_ROUNDS", 3).max(1);
    let src = source(version);
    let dest = destination();
    // KVSZ_BENCH_ONLY=kuvasz|native runs one side (for profiling); both by default.
    let only = std::env::var("KVSZ_BENCH_ONLY").unwrap_or_default();
    let (mut k, mut n) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        if only != "native" {
            let t = kuvasz(src, dest, rows, workers);
            k.push(rows as f64 / t.as_secs_f64());
            println!("round {round}: kuvasz-streamer {:>8.1} s", t.as_secs_f64());
        }
        if only != "kuvasz" {
            let t = native(src, dest, rows);
            n.push(rows as f64 / t.as_secs_f64());
            println!("round {round}: native          {:>8.1} s", t.as_secs_f64());
        }
    }
    let (kr, nr) = (median(k.clone()), median(n.clone()));
    println!();
    println!(
        "backlog of {rows} inserted rows, source PostgreSQL {version}, destination PostgreSQL 15, \
         {rounds} round(s), median rows/s (each round's figure in brackets)"
    );
    println!(
        "kuvasz-streamer ({workers} writers): {kr:>10.0} rows/s  [{}]",
        rates(&k)
    );
    println!(
        "native logical replication:     {nr:>10.0} rows/s  [{}]",
        rates(&n)
    );
    println!("ratio kuvasz/native: {:.2}", kr / nr);
}
