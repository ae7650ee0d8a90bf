//! Benchmark (not part of the test run): the daemon against PostgreSQL's own logical
//! replication (CREATE SUBSCRIPTION on the destination) on the same machine, phase by
//! phase, with the source's decode-only rate for the same backlog as the ceiling.
//!
//! Run: `cargo test --release --test benchmark -- --ignored --nocapture`
//!
//! Phases (KVSZ_BENCH_PHASES, a comma list; default all):
//! - `insert`: ROWS rows in one transaction; `update`: every one of them (one
//!   transaction, a non-key column); `delete`: all of them (one transaction). `update` and
//!   `delete` need the rows, so either also runs `insert`.
//! - `history`: the same three backlogs on `hist`, a history table for the daemon (a
//!   version per change) and a plain table for native.
//! - `small`: ROWS rows in transactions of 10 (pgbench, 4 clients, a custom script).
//! - `tpcb`: `pgbench -i -s SCALE` copied by both contenders' initial sync (not timed),
//!   then TXNS plain TPC-B transactions (4 clients) as the backlog, in transactions/s.
//! - `latency`: commit-to-visibility p50/p99 of a probe row inserted 50 times a second,
//!   idle and under live TPC-B (`pgbench -c 4 -T LATENCY_SECS`), and the latency of the
//!   probe sent as the load ended (how far behind the consumer was then).
//! - `tenants`: 1, 4 and 16 tenant databases on the source server (ROWS/N rows each).
//!
//! Every timed phase writes its backlog while all consumers are stopped (the daemon) or
//! disabled (the subscription, and a third logical slot nobody reads), then times each
//! contender catching up in turn, then times `pg_logical_slot_get_binary_changes` on the
//! third slot: what it costs the source just to decode that backlog. Peak RSS is the
//! daemon's VmHWM (a fresh process per phase), or VmRSS sampled during `latency`.
//!
//! Environment: KVSZ_BENCH_ROWS (default 1000000), KVSZ_BENCH_SOURCE (major, default 15),
//! KVSZ_BENCH_WORKERS (default 2), KVSZ_BENCH_ROUNDS (default 1), KVSZ_BENCH_ONLY
//! (kuvasz or native), KVSZ_BENCH_PHASES, KVSZ_BENCH_PGBENCH_SCALE (default 10),
//! KVSZ_BENCH_PGBENCH_TXNS (default 40000), KVSZ_BENCH_LATENCY_SECS (default 20).
//!
//! On a small shared VM one run varies by ±15 %, so with several rounds the contenders
//! alternate which goes first and the medians are compared. Autovacuum is off on the
//! benchmark tables of both sides: a vacuum landing inside one measurement and not the
//! other is noise.

mod support;

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, SimpleQueryMessage};

use support::daemon::Daemon;
use support::{destination, scratch_dir, source, unique_name, Cluster};

const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";
const PHASES: [&str; 8] = [
    "insert", "update", "delete", "history", "small", "tpcb", "latency", "tenants",
];
const TENANT_COUNTS: [usize; 3] = [1, 4, 16];
/// pgbench clients for the `small`, `tpcb` and `latency` workloads.
const CLIENTS: u64 = 4;
const PROBE_EVERY: Duration = Duration::from_millis(20);
const POLL: Duration = Duration::from_millis(20);
/// How often the latency phase looks for probes on the destination.
const WATCH_EVERY: Duration = Duration::from_millis(2);
const TIMEOUT: Duration = Duration::from_secs(1800);

/// The main round's tables, the same on the source and both destinations. `mark` gets
/// one row after each backlog: a cheap signal that a consumer is near the end.
const MAIN_DDL: &str = "SET ROLE kuvasz;
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text,
    at timestamptz NOT NULL DEFAULT now()) WITH (autovacuum_enabled = off);
CREATE TABLE small (id bigserial PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text,
    at timestamptz NOT NULL DEFAULT now()) WITH (autovacuum_enabled = off);
CREATE TABLE mark (id bigint PRIMARY KEY);
CREATE TABLE probe (id bigint PRIMARY KEY, sent timestamptz NOT NULL);
CREATE TABLE hist (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text,
    at timestamptz NOT NULL DEFAULT now()) WITH (autovacuum_enabled = off);
CREATE VIEW hist_now AS SELECT * FROM hist;";

/// The daemon's `hist` target is a history table; `hist_now` is its current rows.
const HISTORY_TARGET_DDL: &str = "SET ROLE kuvasz; DROP VIEW hist_now; DROP TABLE hist;
CREATE TABLE hist (id bigint NOT NULL, account int NOT NULL, amount numeric(12,2), note text,
    at timestamptz NOT NULL, kvsz_start timestamptz NOT NULL, kvsz_end timestamptz NOT NULL,
    kvsz_deleted boolean NOT NULL, PRIMARY KEY (id, kvsz_start)) WITH (autovacuum_enabled = off);
CREATE VIEW hist_now AS SELECT * FROM hist WHERE kvsz_end > '9000-01-01';";

/// A tenant's table, and native's copy of it.
const TENANT_DDL: &str = "SET ROLE kuvasz;
CREATE TABLE bench (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text,
    at timestamptz NOT NULL DEFAULT now()) WITH (autovacuum_enabled = off)";
/// The daemon's one target table for all tenants.
const TENANT_TARGET_DDL: &str = "SET ROLE kuvasz;
CREATE TABLE bench (sid text NOT NULL, id bigint NOT NULL, account int NOT NULL, amount numeric(12,2),
    note text, at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (sid, id)) WITH (autovacuum_enabled = off)";

const PGBENCH_TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// What must match between source and destination for a phase to be caught up.
const BENCH_FP: &str = "SELECT count(*), sum(amount) FROM bench";
const SMALL_FP: &str = "SELECT count(*), sum(amount) FROM small";
const HISTORY_FP: &str = "SELECT count(*), sum(amount) FROM hist_now";
const TPCB_FP: &str =
    "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(delta) FROM pgbench_history), \
     (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
     (SELECT sum(bbalance) FROM pgbench_branches)";
const LATENCY_FP: &str =
    "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(delta) FROM pgbench_history), \
     (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
     (SELECT sum(bbalance) FROM pgbench_branches), (SELECT max(id) FROM probe)";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Ours,
    Native,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Who::Ours => "kuvasz",
            Who::Native => "native",
        })
    }
}

struct Ctx {
    src: &'static Cluster,
    dest: &'static Cluster,
    rows: u64,
    workers: usize,
    scale: u32,
    txns: u64,
    latency_secs: u64,
    ours: bool,
    native: bool,
    phases: Vec<String>,
}

impl Ctx {
    fn wants(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    /// pgoutput protocol for the decode-only slot: what the daemon asks for.
    fn proto(&self) -> &'static str {
        if self.src.version >= 14 {
            "2"
        } else {
            "1"
        }
    }

    fn workers_line(&self) -> String {
        format!("num_workers = {}", self.workers)
    }

    /// The contenders of `round`, in the order they run: alternating which goes first.
    fn order(&self, round: usize) -> Vec<Who> {
        let both = if round % 2 == 1 {
            [Who::Ours, Who::Native]
        } else {
            [Who::Native, Who::Ours]
        };
        both.into_iter()
            .filter(|w| match w {
                Who::Ours => self.ours,
                Who::Native => self.native,
            })
            .collect()
    }
}

/// Our daemon's `kuvasz_latency_seconds` buckets by point: (upper bound, cumulative
/// count), from its `/metrics` (empty for native).
fn latency_points(running: &Running) -> HashMap<String, Vec<(f64, u64)>> {
    let Running::Ours(d) = running else {
        return HashMap::new();
    };
    let (_, body) = support::http::get(&support::http::address(d), "/metrics");
    let mut points: HashMap<String, Vec<(f64, u64)>> = HashMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("kuvasz_latency_seconds_bucket{point=\"") else {
            continue;
        };
        let Some((point, rest)) = rest.split_once("\",le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        points
            .entry(point.to_string())
            .or_default()
            .push((le, count.parse().unwrap_or(0)));
    }
    points
}

/// "routed p50 ≤ x ms p99 ≤ y ms, …" over what each point counted between two reads
/// (a quantile is the upper bound of its bucket).
fn points_quantiles(
    before: &HashMap<String, Vec<(f64, u64)>>,
    after: &HashMap<String, Vec<(f64, u64)>>,
) -> String {
    let mut out = Vec::new();
    for point in ["routed", "taken", "committed"] {
        let Some(buckets) = after.get(point) else {
            continue;
        };
        let old = before.get(point);
        let delta: Vec<(f64, u64)> = buckets
            .iter()
            .enumerate()
            .map(|(i, (le, n))| {
                let was = old.and_then(|o| o.get(i)).map_or(0, |b| b.1);
                (*le, n.saturating_sub(was))
            })
            .collect();
        let total = delta.last().map_or(0, |b| b.1);
        if total == 0 {
            continue;
        }
        let q = |f: f64| {
            let want = (total as f64 * f).ceil() as u64;
            delta
                .iter()
                .find(|b| b.1 >= want)
                .map_or(f64::INFINITY, |b| b.0 * 1000.0)
        };
        out.push(format!(
            "{point} p50 <= {} ms p99 <= {} ms ({total})",
            q(0.5),
            q(0.99)
        ));
    }
    out.join(", ")
}

// ---------------------------------------------------------------------------------
// Small helpers

/// The first row of `sql`'s result, values joined by `|` (NULL as `NULL`).
fn one(c: &mut Client, sql: &str) -> String {
    let messages = c
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

fn int(c: &mut Client, sql: &str) -> i64 {
    one(c, sql).parse().unwrap_or(0)
}

fn src_one(cluster: &Cluster, db: &str, sql: &str) -> String {
    one(&mut cluster.client(db), sql)
}

fn pgbench(c: &Cluster, db: &str, args: &[&str]) -> String {
    let out = Command::new(PGBENCH)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg(db)
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// pgbench's "tps = N" figure.
fn tps(output: &str) -> f64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The pgbench tables: generated with `scale` on a source, empty (tables and keys only)
/// on a destination. pgbench_history gets a primary key so both contenders can apply
/// its rows; all are handed to `kuvasz`, who must own what the daemon publishes.
/// A pgbench run of CLIENTS clients without vacuum, `args` saying how long and what.
fn pgbench_clients(c: &Cluster, db: &str, args: &[&str]) -> String {
    let clients = CLIENTS.to_string();
    let mut all = vec!["-n", "-c", clients.as_str()];
    all.extend_from_slice(args);
    pgbench(c, db, &all)
}

fn pgbench_tables(c: &Cluster, db: &str, scale: Option<u32>) {
    let hid = match scale {
        Some(s) => {
            pgbench(c, db, &["-i", "-q", "-s", &s.to_string()]);
            "bigserial"
        }
        None => {
            pgbench(c, db, &["-i", "-q", "-I", "dtp"]);
            "bigint"
        }
    };
    c.execute(
        db,
        &format!("ALTER TABLE pgbench_history ADD COLUMN hid {hid} PRIMARY KEY"),
    );
    for t in PGBENCH_TABLES {
        c.execute(db, &format!("ALTER TABLE {t} OWNER TO kuvasz"));
        c.execute(
            db,
            &format!("ALTER TABLE {t} SET (autovacuum_enabled = off)"),
        );
    }
}

/// The decode-only read, with the options the daemon asks for (protocol 2 streams big
/// transactions instead of spilling them).
fn decode_sql(slot: &str, proto: &str, publication: &str) -> String {
    let streaming = if proto == "1" {
        ""
    } else {
        ", 'streaming', 'on'"
    };
    format!(
        "SELECT count(*) FROM pg_logical_slot_get_binary_changes('{slot}', NULL, NULL, \
         'proto_version', '{proto}', 'publication_names', '{publication}'{streaming})"
    )
}

fn create_slot(c: &Cluster, db: &str, slot: &str) {
    c.execute(
        db,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    );
}

fn wait_slot_released(src: &Cluster, slot: &str) {
    support::wait_for(
        &format!("slot {slot} released"),
        Duration::from_secs(60),
        || {
            let r = src.query(
                "postgres",
                &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            );
            (r[0][0].as_deref() == Some("f")).then_some(())
        },
    );
}

fn drop_subscription(dest: &Cluster, db: &str, sub: &str) {
    dest.execute(db, &format!("ALTER SUBSCRIPTION {sub} DISABLE"));
    dest.execute(
        db,
        &format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"),
    );
    dest.execute(db, &format!("DROP SUBSCRIPTION {sub}"));
}

/// A field of `/proc/<pid>/status`, in kB.
fn proc_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// For [`wait_until`]: fails fast once the daemon has exited.
fn daemon_alive(d: &mut Daemon) -> Result<(), String> {
    if d.running() {
        Ok(())
    } else {
        Err("kuvasz-streamer exited (its log follows)".into())
    }
}

/// CPU seconds (user, system) process `pid` has used so far, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start with field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) as f64 / hz, ticks(12) as f64 / hz)
}

/// Where a contender's catch-up spent CPU: the source's walsenders, the consumer
/// process (the daemon; native has none besides its apply worker) and the destination
/// backends that wrote (the daemon's writers, or native's apply worker). All of them
/// start with the catch-up, so their totals are its cost.
struct Cpu {
    walsender: f64,
    /// Of which in the kernel (sending, waking the reader).
    walsender_sys: f64,
    daemon: Option<f64>,
    /// The daemon's VmRSS once caught up (MB): its steady size, where the peak is not.
    rss_after: Option<f64>,
    dest: f64,
    /// The busiest single process: on 2 cores, the one that limits.
    busiest: (String, f64),
}

impl Cpu {
    /// Samples the processes of a running contender; `poller` is one of the benchmark's
    /// own connections to the destination (they, without application_name, are left out:
    /// their comparisons are not the contender's cost).
    fn sample(
        src: &Cluster,
        src_dbs: &[&str],
        dest_dbs: &[&str],
        poller: &mut Client,
        daemon: Option<u32>,
    ) -> Cpu {
        let list = |dbs: &[&str]| {
            dbs.iter()
                .map(|d| format!("'{d}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let pids = |c: &mut Client, sql: &str| -> Vec<u32> {
            c.simple_query(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                    _ => None,
                })
                .collect()
        };
        let senders = pids(
            &mut src.client("postgres"),
            &format!(
                "SELECT active_pid FROM pg_replication_slots WHERE active AND database IN ({})",
                list(src_dbs)
            ),
        );
        let writers = pids(
            poller,
            &format!(
                "SELECT pid FROM pg_stat_activity WHERE datname IN ({}) AND pid <> pg_backend_pid() \
                 AND (backend_type <> 'client backend' OR application_name <> '')",
                list(dest_dbs)
            ),
        );
        let mut busiest = (String::new(), 0.0);
        let mut sum = |pids: &[u32], what: &str| {
            let (mut total, mut sys) = (0.0, 0.0);
            for &pid in pids {
                let (u, k) = cpu_secs(pid);
                if u + k > busiest.1 {
                    busiest = (what.to_string(), u + k);
                }
                total += u + k;
                sys += k;
            }
            (total, sys)
        };
        let (walsender, walsender_sys) = sum(&senders, "walsender");
        let dest = sum(&writers, "destination backend").0;
        // Steady: a second after catching up (writers idle for 500 ms hand memory back).
        let rss_after = daemon.and_then(|pid| {
            thread::sleep(Duration::from_secs(1));
            proc_kb(pid, "VmRSS")
        });
        let rss_after = rss_after.map(|kb| kb as f64 / 1024.0);
        let daemon = daemon.map(|pid| sum(&[pid], "daemon").0);
        Cpu {
            rss_after,
            walsender,
            walsender_sys,
            daemon,
            dest,
            busiest,
        }
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cpu s: walsender {:.1} (kernel {:.1})",
            self.walsender, self.walsender_sys
        )?;
        if let Some(d) = self.daemon {
            write!(f, ", daemon {d:.1}, writers {:.1}", self.dest)?;
        } else {
            write!(f, ", apply {:.1}", self.dest)?;
        }
        write!(f, "; busiest {} {:.1}", self.busiest.0, self.busiest.1)?;
        if let Some(mb) = self.rss_after {
            write!(f, "; RSS caught up {mb:.0} MB")?;
        }
        Ok(())
    }
}

/// Samples a process's VmRSS every 50 ms, for a window inside a longer-lived process.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                max = max.max(proc_kb(pid, "VmRSS").unwrap_or(0));
                thread::sleep(Duration::from_millis(50));
            }
            max
        });
        RssSampler { stop, handle }
    }

    /// Peak in MB.
    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap() as f64 / 1024.0
    }
}

/// Outcome of one poll of a consumer's destination.
enum Poll {
    /// The cheap signal says not yet.
    Behind,
    /// The cheap signal is there, the full comparison not yet: the destination's state.
    Differs(String),
    Done,
}

/// Calls `check` until `Done`: every POLL while `Behind`, then (full comparisons scan
/// whole tables, and the CPU they take is the CPU being measured) after twice as long as
/// the last comparison took. Returns the time from `started` to the start of the
/// successful poll: its snapshot was taken then. `alive` fails fast if a consumer died.
fn wait_until(
    what: &str,
    started: Instant,
    alive: &mut dyn FnMut() -> Result<(), String>,
    check: &mut dyn FnMut() -> Poll,
) -> Duration {
    let mut last = String::from("(cheap signal never seen)");
    loop {
        if let Err(e) = alive() {
            panic!("{what}: {e}");
        }
        let t = Instant::now();
        match check() {
            Poll::Done => return t.duration_since(started),
            Poll::Behind => thread::sleep(POLL),
            Poll::Differs(state) => {
                last = state;
                thread::sleep((t.elapsed() * 2).max(POLL));
            }
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "{what}: not caught up after {TIMEOUT:?}; last destination state: {last}"
        );
    }
}

fn compare(c: &mut Client, fp: &str, expected: &str) -> Poll {
    let state = one(c, fp);
    if state == expected {
        Poll::Done
    } else {
        Poll::Differs(state)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------------
// Results

#[derive(Default)]
struct Row {
    name: String,
    unit: &'static str,
    ours: Vec<f64>,
    native: Vec<f64>,
    ceiling: Vec<f64>,
    rss: Vec<f64>,
}

#[derive(Default)]
struct Results {
    rows: Vec<Row>,
}

impl Results {
    fn row(&mut self, name: &str, unit: &'static str) -> &mut Row {
        let i = match self.rows.iter().position(|r| r.name == name) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    name: name.to_string(),
                    unit,
                    ..Row::default()
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    fn add(&mut self, name: &str, unit: &'static str, who: Who, value: f64, rss: Option<f64>) {
        let row = self.row(name, unit);
        match who {
            Who::Ours => row.ours.push(value),
            Who::Native => row.native.push(value),
        }
        row.rss.extend(rss);
    }

    fn ceiling(&mut self, name: &str, unit: &'static str, value: f64) {
        self.row(name, unit).ceiling.push(value);
    }

    fn print(&self) {
        let fmt = |unit: &str, v: f64| -> String {
            if v.is_nan() {
                "-".into()
            } else if unit == "ms" || unit == "s" {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        };
        println!();
        println!(
            "{:<20} {:<7} {:>10} {:>10} {:>6} {:>12} {:>8}",
            "phase", "unit", "kuvasz", "native", "ratio", "ceiling", "peak RSS"
        );
        println!(
            "{:<20} {:<7} {:>10} {:>10} {:>6} {:>12} {:>8}",
            "", "", "", "", "k/n", "decode-only", "MB"
        );
        for r in &self.rows {
            let (o, n) = (median(r.ours.clone()), median(r.native.clone()));
            let ratio = o / n;
            let rss = r.rss.iter().copied().fold(f64::NAN, f64::max);
            println!(
                "{:<20} {:<7} {:>10} {:>10} {:>6} {:>12} {:>8}",
                r.name,
                r.unit,
                fmt(r.unit, o),
                fmt(r.unit, n),
                if ratio.is_finite() {
                    format!("{ratio:.2}")
                } else {
                    "-".into()
                },
                fmt(r.unit, median(r.ceiling.clone())),
                if rss.is_nan() {
                    "-".into()
                } else {
                    format!("{rss:.0}")
                },
            );
        }
        println!();
        println!(
            "Rates are medians over rounds (higher is better). Latency rows: ms from the \
             source insert to the first poll (every 2 ms) that saw the row on the destination; \
             lag: that of the probe sent as the load ended (lower is better). Peak RSS is the daemon's, the highest of all rounds."
        );
    }
}

// ---------------------------------------------------------------------------------
// A consumer while it runs

enum Running {
    Ours(Daemon),
    Native,
}

impl Running {
    fn alive(&mut self) -> Result<(), String> {
        match self {
            Running::Ours(d) => daemon_alive(d),
            Running::Native => Ok(()),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Running::Ours(d) => Some(d.pid()),
            Running::Native => None,
        }
    }
}

// ---------------------------------------------------------------------------------
// Phases 1-6: one source database, shared by three consumers (the daemon's slot,
// native's slot and the decode-only slot); each contender has its own destination
// database.

struct Round<'a> {
    ctx: &'a Ctx,
    round: usize,
    order: Vec<Who>,
    db: String,
    ours_db: String,
    native_db: String,
    daemon_dir: Option<PathBuf>,
    sub: String,
    slot: String,
    decode_slot: String,
    pgbench: bool,
    marker: i64,
    next_probe: Cell<i64>,
}

impl<'a> Round<'a> {
    /// Creates the databases and tables, runs both contenders' initial sync (the pgbench
    /// tables are copied here, untimed), and creates the decode-only slot last, so it
    /// sees only the backlogs.
    fn new(ctx: &'a Ctx, round: usize) -> Round<'a> {
        let (src, dest) = (ctx.src, ctx.dest);
        let mut r = Round {
            ctx,
            round,
            order: ctx.order(round),
            db: unique_name("bsrc"),
            ours_db: unique_name("bours"),
            native_db: unique_name("bnative"),
            daemon_dir: None,
            sub: unique_name("bsub"),
            slot: unique_name("bnative_slot"),
            decode_slot: unique_name("bdecode_slot"),
            pgbench: ctx.wants("tpcb") || ctx.wants("latency"),
            marker: 0,
            next_probe: Cell::new(1),
        };
        src.create_database(&r.db);
        src.execute(&r.db, MAIN_DDL);
        let mut tables = vec!["bench", "small", "mark", "probe", "hist"];
        if r.pgbench {
            pgbench_tables(src, &r.db, Some(ctx.scale));
            tables.extend(PGBENCH_TABLES);
        }
        src.execute(
            &r.db,
            &format!(
                "CREATE PUBLICATION bench_pub FOR TABLE {}",
                tables.join(", ")
            ),
        );
        let pgbench = r.pgbench;
        let make_dest = |db: &str| {
            dest.create_database(db);
            dest.execute(db, MAIN_DDL);
            if pgbench {
                pgbench_tables(dest, db, None);
            }
        };
        if ctx.ours {
            make_dest(&r.ours_db);
            dest.execute(&r.ours_db, HISTORY_TARGET_DDL);
            r.sync_ours(&tables);
        }
        if ctx.native {
            make_dest(&r.native_db);
            r.sync_native();
        }
        create_slot(src, &r.db, &r.decode_slot);
        r
    }

    fn setup_fp(&self) -> &'static str {
        if self.pgbench {
            TPCB_FP
        } else {
            BENCH_FP
        }
    }

    fn sync_ours(&mut self, tables: &[&str]) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        let mut map = format!(
            "[[source]]\ndatabase = \"{}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n[source.tables]\n",
            unique_name("bench"),
            src.url(&self.db)
        );
        for t in tables {
            let mode = if *t == "hist" {
                "type = \"history\""
            } else {
                ""
            };
            let _ = writeln!(map, "{t} = {{{mode}}}");
        }
        let started = Instant::now();
        let mut d = Daemon::start(&dest.url(&self.ours_db), &map, &[&self.ctx.workers_line()]);
        d.wait_streaming(1);
        let expected = src_one(src, &self.db, self.setup_fp());
        let mut c = dest.client(&self.ours_db);
        let fp = self.setup_fp();
        let t = wait_until(
            "kuvasz initial sync",
            started,
            &mut || daemon_alive(&mut d),
            &mut || compare(&mut c, fp, &expected),
        );
        if self.pgbench {
            println!(
                "round {}: kuvasz initial sync of the pgbench tables (scale {}): {:.1} s",
                self.round,
                self.ctx.scale,
                secs(t)
            );
        }
        self.daemon_dir = Some(d.stop_ok());
    }

    fn sync_native(&mut self) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        create_slot(src, &self.db, &self.slot);
        let started = Instant::now();
        dest.execute(
            &self.native_db,
            &format!(
                "CREATE SUBSCRIPTION {} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={}' \
                 PUBLICATION bench_pub WITH (create_slot = false, slot_name = '{}', copy_data = true)",
                self.sub, src.port, self.db, self.slot
            ),
        );
        let expected = src_one(src, &self.db, self.setup_fp());
        let mut c = dest.client(&self.native_db);
        let fp = self.setup_fp();
        let not_ready = format!(
            "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
             WHERE s.subname = '{}' AND r.srsubstate <> 'r'",
            self.sub
        );
        let t = wait_until("native initial sync", started, &mut || Ok(()), &mut || {
            if int(&mut c, &not_ready) > 0 {
                Poll::Behind
            } else {
                compare(&mut c, fp, &expected)
            }
        });
        if self.pgbench {
            println!(
                "round {}: native initial sync of the pgbench tables (scale {}): {:.1} s",
                self.round,
                self.ctx.scale,
                secs(t)
            );
        }
        self.stop(Running::Native);
    }

    fn dest_db(&self, who: Who) -> &str {
        match who {
            Who::Ours => &self.ours_db,
            Who::Native => &self.native_db,
        }
    }

    fn start(&self, who: Who) -> Running {
        match who {
            Who::Ours => Running::Ours(Daemon::spawn(
                self.daemon_dir.clone().expect("daemon set up"),
            )),
            Who::Native => {
                self.ctx.dest.execute(
                    &self.native_db,
                    &format!("ALTER SUBSCRIPTION {} ENABLE", self.sub),
                );
                Running::Native
            }
        }
    }

    fn stop(&mut self, running: Running) {
        match running {
            Running::Ours(d) => self.daemon_dir = Some(d.stop_ok()),
            Running::Native => {
                self.ctx.dest.execute(
                    &self.native_db,
                    &format!("ALTER SUBSCRIPTION {} DISABLE", self.sub),
                );
                wait_slot_released(self.ctx.src, &self.slot);
            }
        }
    }

    /// Waits until the destination of `running` matches `expected` under `fp` and has
    /// the current marker.
    fn wait(
        &self,
        what: &str,
        running: &mut Running,
        c: &mut Client,
        fp: &str,
        expected: &str,
        started: Instant,
    ) -> Duration {
        let marker = self.marker;
        wait_until(what, started, &mut || running.alive(), &mut || {
            if int(c, "SELECT coalesce(max(id), 0) FROM mark") < marker {
                Poll::Behind
            } else {
                compare(c, fp, expected)
            }
        })
    }

    /// Times `who` catching up from stopped; returns the time and the daemon's peak RSS
    /// (MB). Asserts the destination still matches after the consumer stopped.
    fn catch_up(
        &mut self,
        phase: &str,
        who: Who,
        fp: &str,
        expected: &str,
    ) -> (Duration, Option<f64>, Cpu) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        let db = self.dest_db(who).to_string();
        src.execute(&self.db, "CHECKPOINT");
        dest.execute(&db, "CHECKPOINT");
        let mut c = dest.client(&db);
        let started = Instant::now();
        let mut running = self.start(who);
        let t = self.wait(
            &format!("{phase}: {who}"),
            &mut running,
            &mut c,
            fp,
            expected,
            started,
        );
        let rss = running
            .pid()
            .and_then(|pid| proc_kb(pid, "VmHWM"))
            .map(|kb| kb as f64 / 1024.0);
        let cpu = Cpu::sample(src, &[&self.db], &[&db], &mut c, running.pid());
        self.stop(running);
        assert_eq!(
            one(&mut c, fp),
            expected,
            "{phase}: after {who} stopped the destination differs from the source ({fp})"
        );
        (t, rss, cpu)
    }

    fn decode(&self) -> Duration {
        let mut c = self.ctx.src.client(&self.db);
        let sql = decode_sql(&self.decode_slot, self.ctx.proto(), "bench_pub");
        let started = Instant::now();
        one(&mut c, &sql);
        started.elapsed()
    }

    /// The backlog is written: marks it, times each contender and the decode-only read,
    /// records `units` per second.
    fn measure(
        &mut self,
        phase: &str,
        units: u64,
        unit: &'static str,
        fp: &str,
        res: &mut Results,
    ) {
        self.marker += 1;
        self.ctx.src.execute(
            &self.db,
            &format!("INSERT INTO mark VALUES ({})", self.marker),
        );
        let expected = src_one(self.ctx.src, &self.db, fp);
        let mut line = format!(
            "round {} {phase} ({units} {}):",
            self.round,
            &unit[..unit.len() - 2]
        );
        for who in self.order.clone() {
            let (t, rss, cpu) = self.catch_up(phase, who, fp, &expected);
            let rate = units as f64 / secs(t);
            res.add(phase, unit, who, rate, rss);
            let _ = write!(line, " {who} {:.2} s = {rate:.0} {unit}", secs(t));
            if let Some(mb) = rss {
                let _ = write!(line, " (peak RSS {mb:.0} MB)");
            }
            let _ = write!(line, " [{cpu}]");
            line.push_str(" |");
        }
        let t = self.decode();
        let rate = units as f64 / secs(t);
        res.ceiling(phase, unit, rate);
        let _ = write!(line, " decode-only {:.2} s = {rate:.0} {unit}", secs(t));
        println!("{line}");
    }

    fn insert(&mut self, res: &mut Results) {
        let rows = self.ctx.rows;
        self.ctx.src.execute(
            &self.db,
            &format!(
                "INSERT INTO bench (id, account, amount, note) \
                 SELECT g, g % 1000, (g % 10000) / 100.0, 'note ' || g FROM generate_series(1, {rows}) g"
            ),
        );
        self.measure("insert", rows, "rows/s", BENCH_FP, res);
    }

    fn update(&mut self, res: &mut Results) {
        self.ctx
            .src
            .execute(&self.db, "UPDATE bench SET amount = amount + 1");
        self.measure("update", self.ctx.rows, "rows/s", BENCH_FP, res);
    }

    fn delete(&mut self, res: &mut Results) {
        self.ctx.src.execute(&self.db, "DELETE FROM bench");
        self.measure("delete", self.ctx.rows, "rows/s", BENCH_FP, res);
    }

    /// The insert, update and delete backlogs of `bench` on `hist`, which the daemon
    /// writes as a history table (a version per change) and native as a plain one: the
    /// figures stand next to the clone table's.
    fn history(&mut self, res: &mut Results) {
        let rows = self.ctx.rows;
        let src = self.ctx.src;
        src.execute(
            &self.db,
            &format!(
                "INSERT INTO hist (id, account, amount, note) \
                 SELECT g, g % 1000, (g % 10000) / 100.0, 'note ' || g FROM generate_series(1, {rows}) g"
            ),
        );
        self.measure("history insert", rows, "rows/s", HISTORY_FP, res);
        src.execute(&self.db, "UPDATE hist SET amount = amount + 1");
        self.measure("history update", rows, "rows/s", HISTORY_FP, res);
        src.execute(&self.db, "DELETE FROM hist");
        self.measure("history delete", rows, "rows/s", HISTORY_FP, res);
    }

    fn small(&mut self, res: &mut Results) {
        let script = scratch_dir("small").join("small.sql");
        std::fs::write(
            &script,
            "INSERT INTO small (account, amount, note) \
             SELECT g, g / 100.0, 'small ' || g FROM generate_series(1, 10) g;\n",
        )
        .unwrap();
        let per_client = (self.ctx.rows / 10).div_ceil(CLIENTS).max(1);
        let started = Instant::now();
        pgbench_clients(
            self.ctx.src,
            &self.db,
            &[
                "-t",
                &per_client.to_string(),
                "-f",
                script.to_str().unwrap(),
            ],
        );
        println!(
            "round {}: small backlog: {} transactions of 10 rows written in {:.1} s",
            self.round,
            per_client * CLIENTS,
            secs(started.elapsed())
        );
        self.measure("small", per_client * CLIENTS * 10, "rows/s", SMALL_FP, res);
    }

    fn tpcb(&mut self, res: &mut Results) {
        let per_client = self.ctx.txns.div_ceil(CLIENTS).max(1);
        let out = pgbench_clients(self.ctx.src, &self.db, &["-t", &per_client.to_string()]);
        println!(
            "round {}: tpcb backlog: {} TPC-B transactions at {:.0} tps on the source",
            self.round,
            per_client * CLIENTS,
            tps(&out)
        );
        // The fingerprint includes sum(abalance): catch_up asserts it matches exactly.
        self.measure("tpcb", per_client * CLIENTS, "txn/s", TPCB_FP, res);
    }

    /// Inserts probe rows (id, clock_timestamp()) every PROBE_EVERY from `first`, until
    /// `count` rows or `stop`; returns the last id. The test clusters run with
    /// synchronous_commit = off, where WAL reaches the disk (and a logical walsender,
    /// which sends only flushed WAL) up to wal_writer_delay (200 ms) after the commit:
    /// the probe commits synchronously, as on a production source, so that wait is not
    /// what the latency phase measures.
    fn probe(src: &Cluster, db: &str, first: i64, count: u64, stop: &AtomicBool) -> i64 {
        let mut c = src.client(db);
        one(&mut c, "SET synchronous_commit = on");
        let mut next = Instant::now();
        let mut id = first;
        while ((id - first) as u64) < count && !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            one(
                &mut c,
                &format!("INSERT INTO probe VALUES ({id}, clock_timestamp())"),
            );
            id += 1;
            next = (next + PROBE_EVERY).max(Instant::now());
        }
        id - 1
    }

    /// Polls the destination every WATCH_EVERY for probes from `first` on and records,
    /// for each, the time from its source insert to the poll that first saw it (same
    /// machine, same clock). Visibility is what counts, so neither a DEFAULT
    /// clock_timestamp() column (the time of the insert, before a consumer's group
    /// commit) nor commit timestamps (a subscription's transactions carry the origin's)
    /// would do. Stops once `last` (set when the prober is done) and all before it are
    /// seen; returns the latencies in ms, sorted, and the last probe's.
    fn watch(dest: &Cluster, db: &str, first: i64, last: &AtomicI64) -> (Vec<f64>, f64) {
        let mut c = dest.client(db);
        let mut seen: HashMap<i64, f64> = HashMap::new();
        // Every id below `low` has been seen: rows can become visible out of order.
        let mut low = first;
        let started = Instant::now();
        loop {
            let rows = c
                .simple_query(&format!(
                    "SELECT id, extract(epoch FROM clock_timestamp() - sent) * 1000 \
                     FROM probe WHERE id >= {low}"
                ))
                .expect("poll probes");
            for m in &rows {
                if let SimpleQueryMessage::Row(r) = m {
                    let id: i64 = r.get(0).unwrap().parse().unwrap();
                    let ms: f64 = r.get(1).unwrap().parse().unwrap();
                    seen.entry(id).or_insert(ms);
                }
            }
            while seen.contains_key(&low) {
                low += 1;
            }
            let last = last.load(Ordering::Acquire);
            if low > last {
                let mut v: Vec<f64> = (first..=last).map(|id| seen[&id]).collect();
                let end = v.last().copied().unwrap_or(f64::NAN);
                v.sort_by(f64::total_cmp);
                return (v, end);
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "probes {low}..={last} never arrived"
            );
            thread::sleep(WATCH_EVERY);
        }
    }

    fn latency(&mut self, res: &mut Results) {
        for who in self.order.clone() {
            self.latency_of(who, res);
        }
    }

    /// One stage: probes for `count` probes, or while pgbench runs `load` seconds of
    /// TPC-B; then waits for the destination to match the source. Returns the probe
    /// latencies (sorted), the last probe's (sent as the load ended: how far behind the
    /// consumer was then), and pgbench's output.
    fn stage(
        &self,
        who: Who,
        running: &mut Running,
        c: &mut Client,
        count: u64,
        load: Option<u64>,
    ) -> (Vec<f64>, f64, String) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        let (db, dest_db) = (self.db.as_str(), self.dest_db(who));
        let first = self.next_probe.get();
        let (stop, last) = (AtomicBool::new(false), AtomicI64::new(i64::MAX));
        thread::scope(|s| {
            let watcher = s.spawn(|| Self::watch(dest, dest_db, first, &last));
            let prober = s.spawn(|| Self::probe(src, db, first, count, &stop));
            let mut out = String::new();
            if let Some(secs) = load {
                let secs = secs.to_string();
                out = pgbench_clients(src, db, &["-T", &secs]);
                stop.store(true, Ordering::Relaxed);
            }
            let probed = prober.join().unwrap();
            last.store(probed, Ordering::Release);
            self.next_probe.set(probed + 1);
            let expected = src_one(src, db, LATENCY_FP);
            let what = format!(
                "latency: {who} after the {}",
                if load.is_some() {
                    "load"
                } else {
                    "idle probes"
                }
            );
            self.wait(&what, running, c, LATENCY_FP, &expected, Instant::now());
            let (latencies, end) = watcher.join().unwrap();
            (latencies, end, out)
        })
    }

    fn latency_of(&mut self, who: Who, res: &mut Results) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        let db = self.dest_db(who).to_string();
        let mut c = dest.client(&db);
        let mut running = self.start(who);
        // Catch up on whatever the other contender's run wrote (not timed).
        let expected = src_one(src, &self.db, LATENCY_FP);
        self.wait(
            &format!("latency: {who} catching up"),
            &mut running,
            &mut c,
            LATENCY_FP,
            &expected,
            Instant::now(),
        );
        let sampler = running.pid().map(RssSampler::start);
        let idle_probes = (self.ctx.latency_secs / 2).max(1) * 50;
        let (idle, _, _) = self.stage(who, &mut running, &mut c, idle_probes, None);
        let points_before = latency_points(&running);
        let (load, lag, out) = self.stage(
            who,
            &mut running,
            &mut c,
            u64::MAX,
            Some(self.ctx.latency_secs),
        );
        let rss = sampler.map(RssSampler::finish);
        let points = points_quantiles(&points_before, &latency_points(&running));
        self.stop(running);
        if !points.is_empty() {
            println!(
                "round {} latency {who} under load, from the source commit: {points}",
                self.round
            );
        }

        let (ip50, ip99) = (percentile(&idle, 0.5), percentile(&idle, 0.99));
        let (lp50, lp99) = (percentile(&load, 0.5), percentile(&load, 0.99));
        res.add("latency idle p50", "ms", who, ip50, rss);
        res.add("latency idle p99", "ms", who, ip99, rss);
        res.add("latency load p50", "ms", who, lp50, rss);
        res.add("latency load p99", "ms", who, lp99, rss);
        res.add("lag at end of load", "ms", who, lag, rss);
        println!(
            "round {} latency {who}: idle p50 {ip50:.1} ms p99 {ip99:.1} ms ({} probes) | \
             under TPC-B at {:.0} tps: p50 {lp50:.1} ms p99 {lp99:.1} ms ({} probes) | {}{}",
            self.round,
            idle.len(),
            tps(&out),
            load.len(),
            if lag < 1000.0 {
                format!("kept up: {lag:.1} ms behind as the load ended")
            } else {
                format!(
                    "fell behind: {:.1} s behind as the load ended",
                    lag / 1000.0
                )
            },
            rss.map(|mb| format!(" (peak RSS {mb:.0} MB)"))
                .unwrap_or_default(),
        );
    }

    fn finish(self) {
        let (src, dest) = (self.ctx.src, self.ctx.dest);
        if self.ctx.native {
            drop_subscription(dest, &self.native_db, &self.sub);
            dest.drop_database(&self.native_db);
        }
        if self.ctx.ours {
            dest.drop_database(&self.ours_db);
        }
        // Drops the three slots too.
        src.drop_database(&self.db);
    }
}

// ---------------------------------------------------------------------------------
// Phase 7: N tenant databases on the source server, ROWS/N rows each, one insert
// transaction per tenant. The daemon applies them all into one table with a `sid`
// column. A subscription cannot add a sid column and applies into the table of the same
// name, so native gets N destination databases, one subscription each.

fn tenants(ctx: &Ctx, n: usize, round: usize, res: &mut Results) {
    let (src, dest) = (ctx.src, ctx.dest);
    let per = ctx.rows / n as u64;
    let total = per * n as u64;
    let dbs: Vec<String> = (0..n).map(|i| unique_name(&format!("tn{n}_{i}"))).collect();
    let decode_slots: Vec<String> = (0..n)
        .map(|i| unique_name(&format!("tn_decode_{i}")))
        .collect();
    for db in &dbs {
        src.create_database(db);
        src.execute(db, TENANT_DDL);
        src.execute(db, "CREATE PUBLICATION tpub FOR TABLE bench");
    }
    let sids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();

    let ours_db = unique_name("tn_ours");
    let mut daemon_dir = None;
    if ctx.ours {
        dest.create_database(&ours_db);
        dest.execute(&ours_db, TENANT_TARGET_DDL);
        let urls: Vec<String> = dbs
            .iter()
            .zip(&sids)
            .map(|(db, sid)| format!("{{ url = \"{}\", sid = \"{sid}\" }}", src.url(db)))
            .collect();
        let map = format!(
            "[[source]]\ndatabase = \"{}\"\nurls = [ {} ]\n[source.tables]\nbench = {{}}\n",
            unique_name("tn"),
            urls.join(", ")
        );
        let d = Daemon::start(&dest.url(&ours_db), &map, &[&ctx.workers_line()]);
        d.wait_streaming(n);
        daemon_dir = Some(d.stop_ok());
    }

    let native_dbs: Vec<String> = (0..n)
        .map(|i| unique_name(&format!("tn_native_{i}")))
        .collect();
    let subs: Vec<String> = (0..n)
        .map(|i| unique_name(&format!("tn_sub_{i}")))
        .collect();
    let slots: Vec<String> = (0..n)
        .map(|i| unique_name(&format!("tn_slot_{i}")))
        .collect();
    if ctx.native {
        for (((ndb, db), sub), slot) in native_dbs.iter().zip(&dbs).zip(&subs).zip(&slots) {
            dest.create_database(ndb);
            dest.execute(ndb, TENANT_DDL);
            create_slot(src, db, slot);
            dest.execute(
                ndb,
                &format!(
                    "CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={db}' \
                     PUBLICATION tpub WITH (create_slot = false, slot_name = '{slot}', copy_data = false, enabled = false)",
                    src.port
                ),
            );
        }
    }
    for (db, slot) in dbs.iter().zip(&decode_slots) {
        create_slot(src, db, slot);
    }

    for db in &dbs {
        src.execute(
            db,
            &format!(
                "INSERT INTO bench (id, account, amount, note) \
                 SELECT g, g % 1000, (g % 10000) / 100.0, 'note ' || g FROM generate_series(1, {per}) g"
            ),
        );
        src.execute(db, "CHECKPOINT");
    }
    dest.execute("postgres", "CHECKPOINT");

    let phase = format!("tenants {n}");
    let mut line = format!("round {round} {phase} ({n} x {per} rows):");
    for who in ctx.order(round) {
        let (t, rss, cpu) = match who {
            Who::Ours => {
                let mut c = dest.client(&ours_db);
                let values: Vec<String> = sids.iter().map(|s| format!("('{s}')")).collect();
                let cheap = format!(
                    "SELECT min((SELECT coalesce(max(id), 0) FROM bench b WHERE b.sid = v.s)) \
                     FROM (VALUES {}) v(s)",
                    values.join(", ")
                );
                let started = Instant::now();
                let mut d = Daemon::spawn(daemon_dir.clone().expect("daemon set up"));
                let t = wait_until(
                    &format!("{phase}: kuvasz"),
                    started,
                    &mut || daemon_alive(&mut d),
                    &mut || {
                        if int(&mut c, &cheap) < per as i64 {
                            Poll::Behind
                        } else {
                            compare(&mut c, "SELECT count(*) FROM bench", &total.to_string())
                        }
                    },
                );
                let rss = proc_kb(d.pid(), "VmHWM").map(|kb| kb as f64 / 1024.0);
                let src_dbs: Vec<&str> = dbs.iter().map(String::as_str).collect();
                let cpu = Cpu::sample(src, &src_dbs, &[&ours_db], &mut c, Some(d.pid()));
                d.stop_ok();
                assert_eq!(int(&mut c, "SELECT count(*) FROM bench"), total as i64);
                (t, rss, cpu)
            }
            Who::Native => {
                let mut clients: Vec<Client> =
                    native_dbs.iter().map(|db| dest.client(db)).collect();
                let started = Instant::now();
                for (db, sub) in native_dbs.iter().zip(&subs) {
                    dest.execute(db, &format!("ALTER SUBSCRIPTION {sub} ENABLE"));
                }
                let t = wait_until(
                    &format!("{phase}: native"),
                    started,
                    &mut || Ok(()),
                    &mut || {
                        if clients
                            .iter_mut()
                            .any(|c| int(c, "SELECT coalesce(max(id), 0) FROM bench") < per as i64)
                        {
                            return Poll::Behind;
                        }
                        let counts: Vec<String> = clients
                            .iter_mut()
                            .map(|c| one(c, "SELECT count(*) FROM bench"))
                            .collect();
                        if counts.iter().all(|c| *c == per.to_string()) {
                            Poll::Done
                        } else {
                            Poll::Differs(counts.join(","))
                        }
                    },
                );
                let src_dbs: Vec<&str> = dbs.iter().map(String::as_str).collect();
                let dest_dbs: Vec<&str> = native_dbs.iter().map(String::as_str).collect();
                let cpu = Cpu::sample(src, &src_dbs, &dest_dbs, &mut clients[0], None);
                for (db, sub) in native_dbs.iter().zip(&subs) {
                    dest.execute(db, &format!("ALTER SUBSCRIPTION {sub} DISABLE"));
                }
                for slot in &slots {
                    wait_slot_released(src, slot);
                }
                for c in &mut clients {
                    assert_eq!(int(c, "SELECT count(*) FROM bench"), per as i64);
                }
                (t, None, cpu)
            }
        };
        let rate = total as f64 / secs(t);
        res.add(&phase, "rows/s", who, rate, rss);
        let _ = write!(line, " {who} {:.2} s = {rate:.0} rows/s", secs(t));
        if let Some(mb) = rss {
            let _ = write!(line, " (peak RSS {mb:.0} MB)");
        }
        let _ = write!(line, " [{cpu}]");
        line.push_str(" |");
    }

    // Decode-only: the N slots read side by side, one connection each.
    let sql: Vec<String> = decode_slots
        .iter()
        .map(|s| decode_sql(s, ctx.proto(), "tpub"))
        .collect();
    let barrier = Barrier::new(n + 1);
    let t = thread::scope(|s| {
        let readers: Vec<_> = dbs
            .iter()
            .zip(&sql)
            .map(|(db, sql)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut c = src.client(db);
                    barrier.wait();
                    one(&mut c, sql);
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        for r in readers {
            r.join().unwrap();
        }
        started.elapsed()
    });
    let rate = total as f64 / secs(t);
    res.ceiling(&phase, "rows/s", rate);
    let _ = write!(
        line,
        " decode-only ({n} slot(s) side by side) {:.2} s = {rate:.0} rows/s",
        secs(t)
    );
    println!("{line}");

    if ctx.native {
        for (db, sub) in native_dbs.iter().zip(&subs) {
            drop_subscription(dest, db, sub);
            dest.drop_database(db);
        }
    }
    if ctx.ours {
        dest.drop_database(&ours_db);
    }
    for db in &dbs {
        src.drop_database(db);
    }
}

// ---------------------------------------------------------------------------------

/// Installs the PostgreSQL binaries if any is missing, as the test command does.
fn install_postgres(version: u32) {
    let pg_dir = std::env::var("KVSZ_PG_DIR").unwrap_or_else(|_| "/opt/kuvasz-pg".into());
    let needed = [
        format!("{pg_dir}/node_modules/pg{version}/native/bin/postgres"),
        "/usr/lib/postgresql/15/bin/postgres".to_string(),
        PGBENCH.to_string(),
    ];
    if needed.iter().all(|p| Path::new(p).exists()) {
        return;
    }
    println!("PostgreSQL binaries missing: running .ci/install-postgres.sh");
    let status = Command::new("bash")
        .arg(".ci/install-postgres.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run bash .ci/install-postgres.sh");
    assert!(status.success(), ".ci/install-postgres.sh failed: {status}");
}

/// 16 subscriptions need 16 apply workers (server-start settings). The launcher starts
/// no apply worker within wal_retrieve_retry_interval (5 s) of its last start, which
/// the disable/enable of each phase would otherwise add to native's time.
fn configure_destination(dest: &Cluster) {
    for setting in [
        "wal_retrieve_retry_interval = '50ms'",
        "max_logical_replication_workers = 20",
        "max_worker_processes = 32",
    ] {
        dest.execute("postgres", &format!("ALTER SYSTEM SET {setting}"));
    }
    dest.restart();
}

#[test]
#[ignore = "benchmark: run explicitly (see README)"]
fn phases_vs_native_logical_replication() {
    run();
}

/// README's quick check of the benchmark itself, with the settings README gives: every
/// phase on small backlogs, both contenders caught up and compared. It keeps the
/// benchmark (and README's command) working; its figures mean nothing.
#[test]
fn quick_check_as_readme_shows() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("KVSZ_BENCH_ROWS="))
        .expect("README's quick check");
    assert_eq!(
        lines[at + 1].trim(),
        "cargo test --release --test benchmark -- --ignored --nocapture"
    );
    for setting in lines[at].trim_end_matches('\\').split_whitespace() {
        let (name, value) = setting.split_once('=').expect("NAME=value");
        // Only this test runs in this process (the full benchmark is ignored).
        std::env::set_var(name, value);
    }
    run();
}

fn run() {
    let version: u32 = env_or("KVSZ_BENCH_SOURCE", 15);
    install_postgres(version);
    // Start only the source being measured: the others would take CPU while it runs.
    std::env::set_var("KVSZ_TEST_PG_VERSIONS", version.to_string());

    let phases_env = std::env::var("KVSZ_BENCH_PHASES").unwrap_or_default();
    let phases: Vec<String> = if phases_env.trim().is_empty() {
        PHASES.iter().map(|p| p.to_string()).collect()
    } else {
        phases_env
            .split(',')
            .map(|p| p.trim().to_lowercase())
            .inspect(|p| {
                assert!(
                    PHASES.contains(&p.as_str()),
                    "KVSZ_BENCH_PHASES: {p:?} is not one of {PHASES:?}"
                )
            })
            .collect()
    };
    // KVSZ_BENCH_ONLY=kuvasz|native runs one side (for profiling); both by default.
    let only = std::env::var("KVSZ_BENCH_ONLY").unwrap_or_default();
    assert!(
        ["", "kuvasz", "native"].contains(&only.as_str()),
        "KVSZ_BENCH_ONLY={only:?}: kuvasz or native"
    );
    let rounds: usize = env_or("KVSZ_BENCH_ROUNDS", 1).max(1);

    let dest = destination();
    configure_destination(dest);
    let src = source(version);
    let ctx = Ctx {
        src,
        dest,
        rows: env_or("KVSZ_BENCH_ROWS", 1_000_000u64).max(1),
        workers: env_or("KVSZ_BENCH_WORKERS", 2),
        scale: env_or("KVSZ_BENCH_PGBENCH_SCALE", 10u32).max(1),
        txns: env_or("KVSZ_BENCH_PGBENCH_TXNS", 40_000u64).max(1),
        latency_secs: env_or("KVSZ_BENCH_LATENCY_SECS", 20u64).max(1),
        ours: only != "native",
        native: only != "kuvasz",
        phases,
    };
    println!(
        "source PostgreSQL {version}, destination PostgreSQL 15, {} rows, {} writer(s), \
         pgbench scale {} / {} transactions, latency load {} s, {rounds} round(s), phases: {}",
        ctx.rows,
        ctx.workers,
        ctx.scale,
        ctx.txns,
        ctx.latency_secs,
        ctx.phases.join(",")
    );

    let started = Instant::now();
    let mut res = Results::default();
    let main_phases = [
        "insert", "update", "delete", "history", "small", "tpcb", "latency",
    ];
    for round in 1..=rounds {
        if main_phases.iter().any(|p| ctx.wants(p)) {
            let mut r = Round::new(&ctx, round);
            if ctx.wants("insert") || ctx.wants("update") || ctx.wants("delete") {
                r.insert(&mut res);
            }
            if ctx.wants("update") {
                r.update(&mut res);
            }
            if ctx.wants("delete") {
                r.delete(&mut res);
            }
            if ctx.wants("history") {
                r.history(&mut res);
            }
            if ctx.wants("small") {
                r.small(&mut res);
            }
            if ctx.wants("tpcb") {
                r.tpcb(&mut res);
            }
            if ctx.wants("latency") {
                r.latency(&mut res);
            }
            r.finish();
        }
        if ctx.wants("tenants") {
            for n in TENANT_COUNTS {
                if ctx.rows >= n as u64 {
                    tenants(&ctx, n, round, &mut res);
                }
            }
        }
    }
    res.print();
    println!("total {:.0} s", secs(started.elapsed()));
}
