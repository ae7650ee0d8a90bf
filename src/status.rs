//! What the daemon is doing, shared between the threads that do it and the HTTP thread
//! that reports it: per source its state, positions, lag, counters and copy progress;
//! per writer its queue, commits and histograms. Plain atomics, written on the hot paths
//! with relaxed stores and read only by reports; the rendering (JSON, Prometheus text)
//! is pure and unit-tested.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::change::Op;
use crate::fault::Class;
use crate::pg::Lsn;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A pgoutput commit time (µs since 2000-01-01) as Unix milliseconds.
pub fn pg_time_ms(pg_micros: i64) -> i64 {
    pg_micros / 1000 + 946_684_800_000
}

/// Where a source is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connecting, checking prerequisites, reconciling publication and slot.
    Starting = 0,
    /// Copying tables (initial sync).
    Copying = 1,
    Streaming = 2,
    /// Failed; the supervisor starts it again after a backoff.
    Retrying = 3,
    Stopped = 4,
    /// Streamed by another instance of the deployment (see [`crate::ownership`]).
    Elsewhere = 5,
}

impl State {
    const ALL: [State; 6] = [
        State::Starting,
        State::Copying,
        State::Streaming,
        State::Retrying,
        State::Stopped,
        State::Elsewhere,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Copying => "copying",
            State::Streaming => "streaming",
            State::Retrying => "retrying",
            State::Stopped => "stopped",
            State::Elsewhere => "elsewhere",
        }
    }

    fn from_u8(v: u8) -> State {
        State::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(State::Stopped)
    }
}

/// Counters of one source table.
#[derive(Default)]
pub struct TableCounters {
    /// Changes routed to the writers, by [`op_index`].
    pub ops: [AtomicU64; 4],
    /// Changes a filter left out.
    pub filtered: AtomicU64,
    pub sync_rows: AtomicU64,
    pub sync_bytes: AtomicU64,
    copy: Mutex<Option<CopyProgress>>,
}

/// The last (or running) initial copy of a table.
#[derive(Clone, Debug)]
struct CopyProgress {
    target: String,
    /// `pg_class.reltuples` of the source table when the copy started (-1: unknown).
    estimate: i64,
    rows: u64,
    bytes: u64,
    started_ms: i64,
    finished_ms: Option<i64>,
}

const OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

pub fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    }
}

impl TableCounters {
    pub fn routed(&self, op: Op) {
        self.ops[op_index(op)].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of this table into `target` starts.
    pub fn copy_started(&self, target: &str, estimate: i64) {
        *self.copy.lock() = Some(CopyProgress {
            target: target.to_string(),
            estimate,
            rows: 0,
            bytes: 0,
            started_ms: now_ms(),
            finished_ms: None,
        });
    }

    /// Rows and bytes of the running copy, as they pass.
    pub fn copied(&self, rows: u64, bytes: u64) {
        self.sync_rows.fetch_add(rows, Ordering::Relaxed);
        self.sync_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(c) = self.copy.lock().as_mut() {
            c.rows += rows;
            c.bytes += bytes;
        }
    }

    /// The copy starts over (its careful pass): its progress counts from zero again.
    pub fn copy_restarted(&self) {
        if let Some(c) = self.copy.lock().as_mut() {
            c.rows = 0;
            c.bytes = 0;
        }
    }

    pub fn copy_done(&self) {
        if let Some(c) = self.copy.lock().as_mut() {
            c.finished_ms = Some(now_ms());
        }
    }
}

/// A row the destination or an expression refused, as reported.
#[derive(Clone, Debug)]
pub struct RejectedRow {
    pub at_ms: i64,
    pub table: String,
    pub op: String,
    pub key: String,
    pub lsn: Lsn,
    pub message: String,
}

/// Samples of (end LSN, commit time in Unix ms) of transactions received and not yet
/// confirmed: the oldest one is how far behind the destination is, in time.
const COMMITS_KEPT: usize = 4096;
/// Commits closer together than this (commit time) share one sample.
const COMMIT_SAMPLE_MS: i64 = 100;

/// One source URL.
pub struct SourceStatus {
    pub database: String,
    pub sid: String,
    pub slot: String,
    /// The URL without its password.
    pub url: String,
    state: AtomicU8,
    since_ms: AtomicI64,
    /// Removed from the map by a reload: no longer reported.
    retired: AtomicBool,
    /// Highest WAL position the server told of (data or keepalive).
    received: AtomicU64,
    confirmed: AtomicU64,
    /// Commit time of the oldest received, unconfirmed transaction (0: none).
    oldest_unconfirmed_ms: AtomicI64,
    /// Last standby status sent to the source's server.
    heartbeat_ms: AtomicI64,
    /// Last message heard from the source's server while streaming (0: not streaming),
    /// and how long a silence means a dead connection (`app.wal_receiver_timeout`).
    heard_ms: AtomicI64,
    silence_limit_ms: AtomicI64,
    /// WAL the slot keeps on the source, and how much more may come before the server
    /// invalidates the slot (`safe_wal_size`); -1: unknown or no limit.
    slot_retained: AtomicI64,
    slot_safe: AtomicI64,
    pub transactions: AtomicU64,
    pub changes: AtomicU64,
    rejected: AtomicU64,
    commits: Mutex<VecDeque<(Lsn, i64)>>,
    tables: Mutex<Vec<(String, Arc<TableCounters>)>>,
    last_error: Mutex<Option<(i64, Class, String)>>,
    /// Failures by class (index in [`Class::ALL`]).
    failures: [AtomicU64; Class::ALL.len()],
    last_rejected: Mutex<Option<RejectedRow>>,
    /// Where a writer held this source (the refused change's commit LSN) and why: started
    /// again, it replays up to that change and is not ready until it has confirmed it.
    held: Mutex<Option<(Lsn, Class, String)>>,
    /// The instance of the deployment that owns it, and the owner epoch (see
    /// [`crate::ownership`]).
    owner: Mutex<Option<(String, i64)>>,
    /// Lag samples for the page's sparkline: (Unix ms, lag seconds).
    lag_history: Mutex<VecDeque<(i64, f64)>>,
}

/// Points of the sparkline kept per source (one per report, at most every second).
const LAG_POINTS: usize = 120;

impl SourceStatus {
    pub fn new(database: &str, sid: &str, slot: &str, url: &str) -> SourceStatus {
        SourceStatus {
            database: database.to_string(),
            sid: sid.to_string(),
            slot: slot.to_string(),
            url: url.to_string(),
            state: AtomicU8::new(State::Starting as u8),
            since_ms: AtomicI64::new(now_ms()),
            retired: AtomicBool::new(false),
            received: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            oldest_unconfirmed_ms: AtomicI64::new(0),
            heartbeat_ms: AtomicI64::new(0),
            heard_ms: AtomicI64::new(0),
            silence_limit_ms: AtomicI64::new(0),
            slot_retained: AtomicI64::new(-1),
            slot_safe: AtomicI64::new(-1),
            transactions: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            commits: Mutex::new(VecDeque::new()),
            tables: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            failures: Default::default(),
            last_rejected: Mutex::new(None),
            held: Mutex::new(None),
            owner: Mutex::new(None),
            lag_history: Mutex::new(VecDeque::new()),
        }
    }

    pub fn label(&self) -> String {
        format!("{}/{}", self.database, self.sid)
    }

    /// Removed from the map: reported no more.
    pub fn retire(&self) {
        self.set_state(State::Stopped);
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Who owns the source now: (instance, epoch).
    pub fn set_owner(&self, owner: Option<(String, i64)>) {
        let mut o = self.owner.lock();
        if *o != owner {
            *o = owner;
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: State) {
        if self.state.swap(s as u8, Ordering::Relaxed) != s as u8 {
            self.since_ms.store(now_ms(), Ordering::Relaxed);
        }
        if s == State::Streaming {
            *self.last_error.lock() = None;
        } else {
            self.heard_ms.store(0, Ordering::Relaxed);
        }
    }

    /// What the source says of the slot's WAL (see [`crate::pg::catalog::slot_wal`]).
    pub fn slot_wal(&self, retained: i64, safe: Option<i64>) {
        self.slot_retained.store(retained, Ordering::Relaxed);
        self.slot_safe.store(safe.unwrap_or(-1), Ordering::Relaxed);
    }

    /// The stream heard from the server now; silence past `limit` means it is gone.
    pub fn heard_from_server(&self, limit: Duration) {
        self.heard_ms.store(now_ms(), Ordering::Relaxed);
        self.silence_limit_ms
            .store(limit.as_millis() as i64, Ordering::Relaxed);
    }

    /// How long a streaming source has heard nothing from its server, when that is past
    /// its limit: (silent for, limit), in milliseconds.
    fn silent(&self, now_ms: i64) -> Option<(i64, i64)> {
        let heard = self.heard_ms.load(Ordering::Relaxed);
        let limit = self.silence_limit_ms.load(Ordering::Relaxed);
        let quiet = now_ms - heard;
        (self.state() == State::Streaming && heard > 0 && limit > 0 && quiet > limit)
            .then_some((quiet, limit))
    }

    /// A writer held the source at the change committed at `lsn` (see [`Self::held`]).
    pub fn held_at(&self, lsn: Lsn, class: Class, report: &str) {
        *self.held.lock() = Some((lsn, class, report.to_string()));
    }

    /// The hold the source has not yet confirmed past (its change applied): (LSN, class,
    /// report).
    fn still_held(&self) -> Option<(Lsn, Class, String)> {
        let mut held = self.held.lock();
        if held
            .as_ref()
            .is_some_and(|(lsn, _, _)| self.confirmed_lsn() > *lsn)
        {
            *held = None;
        }
        held.clone()
    }

    /// The source failed with `message` and will be retried.
    pub fn failed(&self, class: Class, message: &str) {
        self.set_state(State::Retrying);
        self.record(class, message);
    }

    /// A writer's transaction for this source was fenced off (another instance took it
    /// over): counted and shown as its last error, its state left to its thread.
    pub fn fenced_off(&self, message: &str) {
        self.record(Class::Fenced, message);
    }

    /// Counts a failure of `class` and keeps `message` as the last error.
    fn record(&self, class: Class, message: &str) {
        // Reported under the source's name already: without the repeated prefix.
        let prefix = format!("source {}: ", self.label());
        let message = message.strip_prefix(&prefix).unwrap_or(message);
        *self.last_error.lock() = Some((now_ms(), class, message.to_string()));
        if let Some(n) = Class::ALL
            .iter()
            .position(|c| *c == class)
            .and_then(|i| self.failures.get(i))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters of source table `name` (`schema.table`), made at first use.
    pub fn table(&self, name: &str) -> Arc<TableCounters> {
        let mut tables = self.tables.lock();
        if let Some((_, t)) = tables.iter().find(|(n, _)| n == name) {
            return t.clone();
        }
        let t = Arc::new(TableCounters::default());
        tables.push((name.to_string(), t.clone()));
        t
    }

    /// The server's message arrived; its WAL end is `wal_end`.
    pub fn heard(&self, wal_end: Lsn) {
        self.received.fetch_max(wal_end.0, Ordering::Relaxed);
    }

    /// Called at each standby status: the clock of the heartbeat is read there, not per
    /// message.
    pub fn heartbeat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A transaction ending at `end_lsn` that committed at `commit_ms` was received.
    pub fn committed(&self, end_lsn: Lsn, commit_ms: i64) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        let mut q = self.commits.lock();
        let full = q.len() >= COMMITS_KEPT;
        match q.back_mut() {
            Some(last) if commit_ms - last.1 < COMMIT_SAMPLE_MS || full => {
                // Same sample: later end, first time (the oldest of what it stands for).
                last.0 = last.0.max(end_lsn);
            }
            _ => q.push_back((end_lsn, commit_ms)),
        }
        if let Some(&(_, t)) = q.front() {
            self.oldest_unconfirmed_ms.store(t, Ordering::Relaxed);
        }
    }

    /// Everything before `lsn` is committed on the destination and confirmed.
    pub fn confirmed(&self, lsn: Lsn) {
        self.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
        let mut q = self.commits.lock();
        while q.front().is_some_and(|&(end, _)| end <= lsn) {
            q.pop_front();
        }
        let oldest = q.front().map_or(0, |&(_, t)| t);
        self.oldest_unconfirmed_ms.store(oldest, Ordering::Relaxed);
    }

    pub fn received_lsn(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Relaxed))
    }

    pub fn confirmed_lsn(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Relaxed))
    }

    /// Bytes of WAL the server has that the destination has not confirmed.
    pub fn lag_bytes(&self) -> u64 {
        let (r, c) = (self.received_lsn(), self.confirmed_lsn());
        if c == Lsn::ZERO {
            return 0;
        }
        r.0.saturating_sub(c.0)
    }

    /// How long ago the oldest received, unconfirmed transaction committed on the source.
    pub fn lag_seconds(&self, now_ms: i64) -> f64 {
        match self.oldest_unconfirmed_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            t => ((now_ms - t).max(0)) as f64 / 1000.0,
        }
    }

    /// The destination or an expression refused a change (its table is the target).
    pub fn rejected(&self, row: RejectedRow) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        *self.last_rejected.lock() = Some(row);
    }

    fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn filtered_total(&self) -> u64 {
        self.tables
            .lock()
            .iter()
            .map(|(_, t)| t.filtered.load(Ordering::Relaxed))
            .sum()
    }

    /// Adds a sparkline point (at most one a second).
    fn sample_lag(&self, now_ms: i64) {
        let lag = self.lag_seconds(now_ms);
        let mut h = self.lag_history.lock();
        if h.back().is_some_and(|&(t, _)| now_ms - t < 1000) {
            return;
        }
        if h.len() >= LAG_POINTS {
            h.pop_front();
        }
        h.push_back((now_ms, lag));
    }
}

/// Seconds from a change's source commit (its commit timestamp) to each point it passes
/// on its way into the destination: where the time goes between commit and visibility.
/// The points are timed on transactions (routed) and on batches (taken, committed: the
/// change that opened the batch, which waited longest in it).
pub struct Latency {
    /// The source thread routed the transaction's last change to the writers' queues
    /// (WAL sending, decoding and a full queue's wait included).
    pub routed: Histogram,
    /// A writer took the change that opened a batch off its queue.
    pub taken: Histogram,
    /// That batch committed on the destination: the change is visible.
    pub committed: Histogram,
}

/// Seconds since a source commit.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
    0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 600.0,
];

impl Default for Latency {
    fn default() -> Self {
        Latency {
            routed: Histogram::new(LATENCY_BUCKETS),
            taken: Histogram::new(LATENCY_BUCKETS),
            committed: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Latency {
    fn render(&self, out: &mut String) {
        help(
            out,
            "kuvasz_latency_seconds",
            "histogram",
            "Seconds from the source commit to each point on the way: routed (the source \
             thread queued the transaction), taken (a writer took the change opening a batch), \
             committed (that batch is visible on the destination).",
        );
        for (point, h) in [
            ("routed", &self.routed),
            ("taken", &self.taken),
            ("committed", &self.committed),
        ] {
            h.render(out, "kuvasz_latency_seconds", &format!("point=\"{point}\""));
        }
    }
}

/// Seconds from source commit timestamp `pg_micros` (microseconds since 2000-01-01) to
/// now; 0 when the clocks disagree the other way.
pub fn since_commit(pg_micros: i64) -> f64 {
    const PG_EPOCH_MICROS: i128 = 946_684_800_000_000;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i128);
    (now - PG_EPOCH_MICROS - pg_micros as i128).max(0) as f64 / 1e6
}

/// Fixed-bucket histogram over atomics (Prometheus `_bucket`, `_sum`, `_count`).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in millionths, so it stays an integer.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// Changes per commit.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 1000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0,
];
/// Seconds per commit.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro
            .fetch_add((v * 1e6).max(0.0) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the exposition lines of `name` with `labels` (`k="v",…`, may be empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// One writer thread.
pub struct WriterStatus {
    /// Messages waiting in its queue, as of its last look.
    pub queued: AtomicU64,
    pub commits: AtomicU64,
    pub changes: AtomicU64,
    last_commit_ms: AtomicI64,
    last_commit_micros: AtomicU64,
    pub batch_size: Histogram,
    pub commit_seconds: Histogram,
    /// When the batch being applied started (0: none), to tell a writer stuck on the
    /// destination (a lock held by an orphaned session, say) from a slow one.
    applying_since_ms: AtomicI64,
    /// The writer session's backend pid on the destination (0: none yet).
    backend_pid: AtomicI32,
    /// What the destination says the stuck batch waits for (see [`crate::apply::watch`]),
    /// with the batch's start it was found for.
    waiting_for: Mutex<Option<(i64, String)>>,
}

/// A writer applying one batch for longer than this makes the daemon not ready, unless
/// `app.writer_wait_timeout` says otherwise.
pub const STUCK_AFTER_MS: i64 = 120_000;

impl Default for WriterStatus {
    fn default() -> Self {
        WriterStatus {
            queued: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            last_commit_ms: AtomicI64::new(0),
            last_commit_micros: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_BUCKETS),
            commit_seconds: Histogram::new(COMMIT_BUCKETS),
            applying_since_ms: AtomicI64::new(0),
            backend_pid: AtomicI32::new(0),
            waiting_for: Mutex::new(None),
        }
    }
}

impl WriterStatus {
    /// A batch of `changes` was committed in `took`.
    /// A batch starts being applied (`true`) or is done with (`false`).
    pub fn applying(&self, on: bool) {
        let at = if on { now_ms() } else { 0 };
        self.applying_since_ms.store(at, Ordering::Relaxed);
    }

    /// When the batch being applied started, in Unix ms (0: none).
    pub fn applying_since(&self) -> i64 {
        self.applying_since_ms.load(Ordering::Relaxed)
    }

    /// The writer opened a session whose backend is `pid`.
    pub fn session(&self, pid: i32) {
        self.backend_pid.store(pid, Ordering::Relaxed);
    }

    pub fn backend_pid(&self) -> i32 {
        self.backend_pid.load(Ordering::Relaxed)
    }

    /// What the batch that started at `since` waits for on the destination (None: it
    /// waits for no lock).
    pub fn waiting_for(&self, since: i64, what: Option<String>) {
        *self.waiting_for.lock() = what.map(|w| (since, w));
    }

    /// What the batch being applied waits for, when found for this batch.
    fn waits_for(&self) -> Option<String> {
        let since = self.applying_since();
        self.waiting_for
            .lock()
            .as_ref()
            .filter(|(s, _)| *s == since)
            .map(|(_, w)| w.clone())
    }

    pub fn committed(&self, changes: usize, took: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.changes.fetch_add(changes as u64, Ordering::Relaxed);
        self.last_commit_ms.store(now_ms(), Ordering::Relaxed);
        self.last_commit_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.batch_size.observe(changes as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }
}

/// What the destination found that the source's change did not expect (SPEC §4): the
/// change is applied all the same, and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Anomaly {
    /// An INSERT whose key was there already (updated instead).
    InsertFoundRow,
    /// An UPDATE whose key was missing (inserted instead, or nothing to change).
    UpdateMissedRow,
    /// A DELETE whose key was missing.
    DeleteMissedRow,
}

impl Anomaly {
    pub fn name(self) -> &'static str {
        match self {
            Anomaly::InsertFoundRow => "insert_found_row",
            Anomaly::UpdateMissedRow => "update_missed_row",
            Anomaly::DeleteMissedRow => "delete_missed_row",
        }
    }
}

/// A per-source gauge of the slot: name, help text, value (negative: not reported).
type SlotGauge = (&'static str, &'static str, fn(&SourceStatus) -> i64);

/// Everything the HTTP endpoints report.
pub struct Status {
    pub name: String,
    pub version: &'static str,
    pub started_ms: i64,
    pub destination: String,
    /// By source id; a reload appends (ids are never reused) and retires.
    sources: RwLock<Vec<Arc<SourceStatus>>>,
    pub writers: Vec<WriterStatus>,
    /// Anomalies by target table and kind (rare: a lock is fine).
    anomalies: Mutex<std::collections::BTreeMap<(String, Anomaly), u64>>,
    /// Why the writer pool cannot apply (a full disk, the destination down), until a
    /// writer commits again; `pool_faulted` lets the hot path skip the lock.
    pool_fault: Mutex<Option<(i64, Class, String)>>,
    pool_faulted: AtomicBool,
    /// `app.writer_wait_timeout` in ms (0: never reported).
    stuck_after_ms: AtomicI64,
    /// This instance's id among the deployment's, and how many are live (see
    /// [`crate::ownership`]).
    instance: Mutex<String>,
    live_instances: AtomicI64,
    /// Shared with the source threads (see [`Latency`]).
    pub latency: Arc<Latency>,
}

impl Status {
    pub fn new(
        name: &str,
        destination: &str,
        sources: Vec<Arc<SourceStatus>>,
        writers: usize,
    ) -> Status {
        Status {
            name: name.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            started_ms: now_ms(),
            destination: destination.to_string(),
            sources: RwLock::new(sources),
            writers: (0..writers.max(1))
                .map(|_| WriterStatus::default())
                .collect(),
            anomalies: Mutex::new(std::collections::BTreeMap::new()),
            pool_fault: Mutex::new(None),
            pool_faulted: AtomicBool::new(false),
            stuck_after_ms: AtomicI64::new(STUCK_AFTER_MS),
            instance: Mutex::new(String::new()),
            live_instances: AtomicI64::new(0),
            latency: Arc::new(Latency::default()),
        }
    }

    /// This instance's id, and the deployment's live instances.
    pub fn instances(&self, instance: &str, live: i64) {
        let mut i = self.instance.lock();
        if *i != instance {
            *i = instance.to_string();
        }
        self.live_instances.store(live, Ordering::Relaxed);
    }

    /// How long a writer may apply one batch before it is reported (zero: never).
    pub fn set_stuck_after(&self, d: Duration) {
        self.stuck_after_ms
            .store(d.as_millis() as i64, Ordering::Relaxed);
    }

    pub fn stuck_after(&self) -> Duration {
        Duration::from_millis(self.stuck_after_ms.load(Ordering::Relaxed).max(0) as u64)
    }

    /// The writer pool failed with `message`: every source waits for it.
    pub fn pool_failed(&self, class: Class, message: &str) {
        *self.pool_fault.lock() = Some((now_ms(), class, message.to_string()));
        self.pool_faulted.store(true, Ordering::Release);
    }

    /// Whether nothing waits to be applied: every live source streams and has
    /// confirmed all it received.
    pub fn caught_up(&self) -> bool {
        self.live().iter().all(|s| {
            s.state() == State::Streaming
                && s.confirmed.load(Ordering::Relaxed) >= s.received.load(Ordering::Relaxed)
        })
    }

    /// A writer applied something, or nothing waits to be applied: the pool's fault is
    /// over.
    pub fn pool_ok(&self) {
        if self.pool_faulted.swap(false, Ordering::AcqRel) {
            *self.pool_fault.lock() = None;
        }
    }

    /// The status of source `id`.
    pub fn source(&self, id: usize) -> Option<Arc<SourceStatus>> {
        self.sources.read().get(id).cloned()
    }

    /// A source added by a reload: its id.
    pub fn add_source(&self, s: Arc<SourceStatus>) -> usize {
        let mut v = self.sources.write();
        v.push(s);
        v.len() - 1
    }

    /// Sources not removed from the map, in id order.
    pub fn live(&self) -> Vec<Arc<SourceStatus>> {
        self.sources
            .read()
            .iter()
            .filter(|s| !s.retired.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }

    /// `n` changes to target `table` met `kind`.
    pub fn anomaly(&self, table: &str, kind: Anomaly, n: usize) {
        *self
            .anomalies
            .lock()
            .entry((table.to_string(), kind))
            .or_default() += n as u64;
    }

    /// Why the daemon is not ready (empty: every source streams and hears from its
    /// server, and the writers apply).
    pub fn not_ready(&self) -> Vec<String> {
        let now = now_ms();
        let mut reasons = Vec::new();
        if let Some((_, class, e)) = self.pool_fault.lock().as_ref() {
            reasons.push(format!("{}: {e}", class.policy().reason));
        }
        let stuck_after = self.stuck_after_ms.load(Ordering::Relaxed);
        for (i, w) in self.writers.iter().enumerate() {
            let since = w.applying_since();
            if since > 0 && stuck_after > 0 && now - since > stuck_after {
                let why = w.waits_for().unwrap_or_else(|| {
                    "the destination may be holding it (a lock; see pg_stat_activity)".into()
                });
                reasons.push(format!(
                    "writer {i} has been applying one batch for {} s: {why}",
                    (now - since) / 1000
                ));
            }
        }
        for s in self.live() {
            if let Some((quiet, limit)) = s.silent(now) {
                reasons.push(format!(
                    "source {} has heard nothing from its server for {} s \
                     (app.wal_receiver_timeout is {} s): the connection is presumed dead",
                    s.label(),
                    quiet / 1000,
                    limit / 1000
                ));
                continue;
            }
            if s.state() == State::Elsewhere {
                continue;
            }
            if s.state() == State::Streaming {
                // Streaming again after a hold, up to the change it was held at: still
                // the same problem until that change is applied.
                if let Some((lsn, class, e)) = s.still_held() {
                    reasons.push(format!(
                        "source {} is retrying ({}): {e} (replaying up to LSN {lsn})",
                        s.label(),
                        class.policy().reason
                    ));
                }
                continue;
            }
            let mut r = format!("source {} is {}", s.label(), s.state().name());
            if let Some((_, class, e)) = s.last_error.lock().as_ref() {
                r.push_str(&format!(" ({}): {e}", class.policy().reason));
            }
            reasons.push(r);
        }
        reasons
    }

    /// `/readyz`'s body: `{"ready":…,"reasons":[…]}`.
    pub fn readiness_json(&self) -> String {
        let reasons = self.not_ready();
        let list: Vec<String> = reasons.iter().map(|r| json_string(r)).collect();
        format!(
            "{{\"ready\":{},\"reasons\":[{}]}}\n",
            reasons.is_empty(),
            list.join(",")
        )
    }

    /// `/api/status` (SPEC §6).
    pub fn to_json(&self, now_ms: i64) -> String {
        let mut o = String::with_capacity(4096);
        let _ = write!(
            o,
            "{{\"name\":{},\"version\":{},\"started\":{},\"uptime_seconds\":{},\"destination\":{},\
             \"instance\":{},\"live_instances\":{},\
             \"ready\":{},\"destination_error\":{},\"sources\":[",
            json_string(&self.name),
            json_string(self.version),
            json_time(self.started_ms),
            (now_ms - self.started_ms).max(0) / 1000,
            json_string(&self.destination),
            json_string(&self.instance.lock()),
            self.live_instances.load(Ordering::Relaxed),
            self.not_ready().is_empty(),
            match self.pool_fault.lock().as_ref() {
                Some((at, class, e)) => format!(
                    "{{\"at\":{},\"class\":\"{}\",\"message\":{}}}",
                    json_time(*at),
                    class.name(),
                    json_string(e)
                ),
                None => "null".to_string(),
            }
        );
        for (i, s) in self.live().iter().enumerate() {
            s.sample_lag(now_ms);
            if i > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"database\":{},\"sid\":{},\"slot\":{},\"url\":{},\"state\":\"{}\",\"since\":{},\
                 \"received_lsn\":\"{}\",\"confirmed_lsn\":\"{}\",\"lag_bytes\":{},\"lag_seconds\":{:.3},\
                 \"heartbeat\":{},\"transactions\":{},\"changes\":{},\"rejected\":{},\"filtered\":{},",
                json_string(&s.database),
                json_string(&s.sid),
                json_string(&s.slot),
                json_string(&s.url),
                s.state().name(),
                json_time(s.since_ms.load(Ordering::Relaxed)),
                s.received_lsn(),
                s.confirmed_lsn(),
                s.lag_bytes(),
                s.lag_seconds(now_ms),
                json_time(s.heartbeat_ms.load(Ordering::Relaxed)),
                s.transactions.load(Ordering::Relaxed),
                s.changes.load(Ordering::Relaxed),
                s.rejected_total(),
                s.filtered_total(),
            );
            match s.owner.lock().as_ref() {
                Some((instance, epoch)) => {
                    let _ = write!(
                        o,
                        "\"owner\":{{\"instance\":{},\"epoch\":{epoch}}},",
                        json_string(instance)
                    );
                }
                None => o.push_str("\"owner\":null,"),
            }
            match s.last_error.lock().as_ref() {
                Some((at, class, e)) => {
                    let _ = write!(
                        o,
                        "\"last_error\":{{\"at\":{},\"class\":\"{}\",\"message\":{}}},",
                        json_time(*at),
                        class.name(),
                        json_string(e)
                    );
                }
                None => o.push_str("\"last_error\":null,"),
            }
            match s.last_rejected.lock().as_ref() {
                Some(r) => {
                    let _ = write!(
                        o,
                        "\"last_rejected\":{{\"at\":{},\"table\":{},\"op\":{},\"key\":{},\"lsn\":\"{}\",\"message\":{}}},",
                        json_time(r.at_ms),
                        json_string(&r.table),
                        json_string(&r.op),
                        json_string(&r.key),
                        r.lsn,
                        json_string(&r.message)
                    );
                }
                None => o.push_str("\"last_rejected\":null,"),
            }
            let lags: Vec<String> = s
                .lag_history
                .lock()
                .iter()
                .map(|(_, l)| format!("{l:.3}"))
                .collect();
            let _ = write!(o, "\"lag_history\":[{}],\"tables\":[", lags.join(","));
            for (j, (name, t)) in s.tables.lock().iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                table_json(&mut o, name, t, now_ms);
            }
            o.push_str("]}");
        }
        o.push_str("],\"writers\":[");
        for (i, w) in self.writers.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"id\":{i},\"queue\":{},\"commits\":{},\"changes\":{},\"last_commit\":{},\
                 \"last_commit_seconds\":{:.6}}}",
                w.queued.load(Ordering::Relaxed),
                w.commits.load(Ordering::Relaxed),
                w.changes.load(Ordering::Relaxed),
                json_time(w.last_commit_ms.load(Ordering::Relaxed)),
                w.last_commit_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
        }
        o.push_str("]}\n");
        o
    }

    /// `/metrics`: Prometheus text exposition, version 0.0.4.
    pub fn to_prometheus(&self, now_ms: i64) -> String {
        let mut o = String::with_capacity(8192);
        let src_labels = |s: &SourceStatus| {
            format!(
                "database=\"{}\",sid=\"{}\"",
                label_value(&s.database),
                label_value(&s.sid)
            )
        };
        let live = self.live();
        let tables: Vec<(String, String, Arc<TableCounters>)> = live
            .iter()
            .flat_map(|s| {
                let l = src_labels(s);
                s.tables
                    .lock()
                    .iter()
                    .map(|(n, t)| (l.clone(), label_value(n), t.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        help(
            &mut o,
            "streamer_operations_total",
            "counter",
            "Changes read from the sources, by source table, operation and result (ok: routed to the writers; filtered: left out by the entry's filter).",
        );
        for (l, table, t) in &tables {
            for (i, op) in OPS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "streamer_operations_total{{{l},table=\"{table}\",operation=\"{op}\",result=\"ok\"}} {}",
                    t.ops[i].load(Ordering::Relaxed)
                );
            }
            let _ = writeln!(
                o,
                "streamer_operations_total{{{l},table=\"{table}\",operation=\"any\",result=\"filtered\"}} {}",
                t.filtered.load(Ordering::Relaxed)
            );
        }
        type Counter = fn(&TableCounters) -> &AtomicU64;
        let sync: [(&str, &str, Counter); 2] = [
            (
                "streamer_sync_total_rows",
                "Rows copied by initial syncs.",
                |t| &t.sync_rows,
            ),
            (
                "streamer_sync_total_bytes",
                "Bytes of COPY data read by initial syncs.",
                |t| &t.sync_bytes,
            ),
        ];
        for (name, text, counter) in sync {
            help(&mut o, name, "counter", text);
            for (l, table, t) in &tables {
                let n = counter(t).load(Ordering::Relaxed);
                let _ = writeln!(o, "{name}{{{l},table=\"{table}\"}} {n}");
            }
        }
        help(
            &mut o,
            "streamer_jobs_total",
            "counter",
            "Changes each writer took from its queue and committed.",
        );
        for (i, w) in self.writers.iter().enumerate() {
            let _ = writeln!(
                o,
                "streamer_jobs_total{{channel=\"writer-{i}\"}} {}",
                w.changes.load(Ordering::Relaxed)
            );
        }
        help(
            &mut o,
            "url_heartbeat",
            "gauge",
            "Unix time of the last standby status exchanged with each source.",
        );
        for s in &live {
            let _ = writeln!(
                o,
                "url_heartbeat{{{}}} {}",
                src_labels(s),
                s.heartbeat_ms.load(Ordering::Relaxed) / 1000
            );
        }
        help(
            &mut o,
            "kuvasz_source_state",
            "gauge",
            "1 for each source's current state.",
        );
        for s in &live {
            for st in State::ALL {
                let _ = writeln!(
                    o,
                    "kuvasz_source_state{{{},state=\"{}\"}} {}",
                    src_labels(s),
                    st.name(),
                    u8::from(s.state() == st)
                );
            }
        }
        type Gauge = fn(&SourceStatus, i64) -> String;
        let gauges: [(&str, &str, &str, Gauge); 6] = [
            (
                "kuvasz_source_received_lsn",
                "gauge",
                "Highest WAL position the source's server reported, as a number.",
                |s, _| s.received_lsn().0.to_string(),
            ),
            (
                "kuvasz_source_confirmed_lsn",
                "gauge",
                "WAL position committed on the destination and confirmed to the slot.",
                |s, _| s.confirmed_lsn().0.to_string(),
            ),
            (
                "kuvasz_source_lag_bytes",
                "gauge",
                "WAL bytes between the source's position and the confirmed one.",
                |s, _| s.lag_bytes().to_string(),
            ),
            (
                "kuvasz_source_lag_seconds",
                "gauge",
                "Age of the oldest source commit not yet committed on the destination.",
                |s, now| format!("{:.3}", s.lag_seconds(now)),
            ),
            (
                "kuvasz_source_transactions_total",
                "counter",
                "Source transactions received.",
                |s, _| s.transactions.load(Ordering::Relaxed).to_string(),
            ),
            (
                "kuvasz_source_rejected_total",
                "counter",
                "Rows the destination or an expression rejected.",
                |s, _| s.rejected_total().to_string(),
            ),
        ];
        for (name, kind, text, f) in gauges {
            help(&mut o, name, kind, text);
            for s in &live {
                let _ = writeln!(o, "{name}{{{}}} {}", src_labels(s), f(s, now_ms));
            }
        }
        help(
            &mut o,
            "kuvasz_source_failures_total",
            "counter",
            "Times a source stopped and waited to be tried again, by the failure's class.",
        );
        for s in &live {
            for (class, n) in Class::ALL.iter().zip(&s.failures) {
                let _ = writeln!(
                    o,
                    "kuvasz_source_failures_total{{{},class=\"{}\"}} {}",
                    src_labels(s),
                    class.name(),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let slot_gauges: [SlotGauge; 2] = [
            (
                "kuvasz_slot_retained_wal_bytes",
                "WAL the source keeps for the slot (from its restart_lsn to the server's position).",
                |s: &SourceStatus| s.slot_retained.load(Ordering::Relaxed),
            ),
            (
                "kuvasz_slot_safe_wal_bytes",
                "WAL the source may still write before it invalidates the slot (safe_wal_size; absent: no limit).",
                |s: &SourceStatus| s.slot_safe.load(Ordering::Relaxed),
            ),
        ];
        for (name, text, pick) in slot_gauges {
            help(&mut o, name, "gauge", text);
            for s in &live {
                let v = pick(s);
                if v >= 0 {
                    let _ = writeln!(o, "{name}{{{}}} {v}", src_labels(s));
                }
            }
        }
        let owned = self
            .live()
            .iter()
            .filter(|s| s.state() != State::Elsewhere)
            .count();
        for (name, text, value) in [
            (
                "kuvasz_destination_available",
                "1 while the writers can apply, 0 while the destination stops them (down, disk full).",
                i64::from(!self.pool_faulted.load(Ordering::Acquire)),
            ),
            (
                "kuvasz_live_instances",
                "Instances of the deployment seen live through the destination (0: this one has \
                 no coordination session).",
                self.live_instances.load(Ordering::Relaxed),
            ),
            (
                "kuvasz_owned_sources",
                "Sources this instance streams or may stream (the others are another instance's).",
                owned as i64,
            ),
        ] {
            help(&mut o, name, "gauge", text);
            let _ = writeln!(o, "{name} {value}");
        }
        help(
            &mut o,
            "kuvasz_anomalies_total",
            "counter",
            "Changes the destination did not expect, applied anyway: by target table and kind.",
        );
        for ((table, kind), n) in self.anomalies.lock().iter() {
            let _ = writeln!(
                o,
                "kuvasz_anomalies_total{{table=\"{}\",kind=\"{}\"}} {n}",
                label_value(table),
                kind.name()
            );
        }
        help(
            &mut o,
            "kuvasz_writer_queue",
            "gauge",
            "Messages waiting in each writer's queue.",
        );
        for (i, w) in self.writers.iter().enumerate() {
            let _ = writeln!(
                o,
                "kuvasz_writer_queue{{writer=\"{i}\"}} {}",
                w.queued.load(Ordering::Relaxed)
            );
        }
        help(
            &mut o,
            "kuvasz_writer_batch_size",
            "histogram",
            "Changes per destination commit.",
        );
        for (i, w) in self.writers.iter().enumerate() {
            w.batch_size.render(
                &mut o,
                "kuvasz_writer_batch_size",
                &format!("writer=\"{i}\""),
            );
        }
        help(
            &mut o,
            "streamer_operations_seconds",
            "histogram",
            "Duration of each writer's destination commits (a batch of changes).",
        );
        for (i, w) in self.writers.iter().enumerate() {
            w.commit_seconds.render(
                &mut o,
                "streamer_operations_seconds",
                &format!("writer=\"{i}\""),
            );
        }
        self.latency.render(&mut o);
        o
    }
}

fn table_json(o: &mut String, name: &str, t: &TableCounters, now_ms: i64) {
    let ops: Vec<String> = OPS
        .iter()
        .zip(&t.ops)
        .map(|(n, c)| format!("\"{n}\":{}", c.load(Ordering::Relaxed)))
        .collect();
    let _ = write!(
        o,
        "{{\"table\":{},{},\"filtered\":{},\"copy\":",
        json_string(name),
        ops.join(","),
        t.filtered.load(Ordering::Relaxed)
    );
    match t.copy.lock().as_ref() {
        None => o.push_str("null}"),
        Some(c) => {
            let elapsed = ((c.finished_ms.unwrap_or(now_ms) - c.started_ms).max(0)) as f64 / 1000.0;
            // Rows left at the rate so far, while the estimate says there are some left.
            let eta = match c.finished_ms {
                Some(_) => "0".to_string(),
                None if c.estimate > 0 && c.rows > 0 && elapsed > 0.0 => {
                    let left = (c.estimate as f64 - c.rows as f64).max(0.0);
                    format!("{:.0}", left / (c.rows as f64 / elapsed))
                }
                None => "null".to_string(),
            };
            let _ = write!(
                o,
                "{{\"target\":{},\"state\":\"{}\",\"rows\":{},\"bytes\":{},\"estimated_rows\":{},\
                 \"seconds\":{:.1},\"eta_seconds\":{eta}}}}}",
                json_string(&c.target),
                if c.finished_ms.is_some() {
                    "done"
                } else {
                    "copying"
                },
                c.rows,
                c.bytes,
                if c.estimate >= 0 {
                    c.estimate.to_string()
                } else {
                    "null".to_string()
                },
                elapsed
            );
        }
    }
}

fn help(o: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(o, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An RFC 3339 time in quotes, or `null` for "never" (0).
fn json_time(ms: i64) -> String {
    if ms == 0 {
        return "null".into();
    }
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => format!(
            "\"{}\"",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        None => "null".into(),
    }
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_source() -> Status {
        let s = Arc::new(SourceStatus::new(
            "shop",
            "eu\"1",
            "kvsz_shop_eu1",
            "postgres://kv@h/shop",
        ));
        Status::new("kv", "postgres://kv@d/dw", vec![s], 2)
    }

    #[test]
    fn lag_is_the_oldest_unconfirmed_commit() {
        let s = SourceStatus::new("a", "1", "slot", "url");
        assert_eq!(s.lag_seconds(10_000), 0.0);
        s.committed(Lsn(100), 1_000);
        s.committed(Lsn(200), 1_050); // same sample as the first
        s.committed(Lsn(300), 2_000);
        assert_eq!(s.lag_seconds(10_000), 9.0);
        s.confirmed(Lsn(200));
        assert_eq!(s.lag_seconds(10_000), 8.0);
        s.confirmed(Lsn(300));
        assert_eq!(s.lag_seconds(10_000), 0.0);
        assert_eq!(s.transactions.load(Ordering::Relaxed), 3);
        s.heard(Lsn(1_000));
        assert_eq!(s.lag_bytes(), 700);
    }

    #[test]
    fn readiness_names_each_source_not_streaming() {
        let st = one_source();
        assert_eq!(
            st.readiness_json(),
            "{\"ready\":false,\"reasons\":[\"source shop/eu\\\"1 is starting\"]}\n"
        );
        st.source(0)
            .expect("source")
            .failed(Class::Transient, "source shop/eu\"1: connect: refused");
        assert_eq!(
            st.not_ready(),
            vec![
                "source shop/eu\"1 is retrying (retrying after a transient failure): connect: refused"
                    .to_string()
            ]
        );
        st.source(0).expect("source").set_state(State::Streaming);
        assert_eq!(st.readiness_json(), "{\"ready\":true,\"reasons\":[]}\n");
    }

    #[test]
    fn a_held_source_streaming_again_is_ready_once_past_its_change() {
        let st = one_source();
        let s = st.source(0).expect("source");
        s.held_at(
            Lsn(500),
            Class::RejectedRow,
            "writer 0: destination rejected INSERT",
        );
        s.failed(Class::RejectedRow, "writer 0: destination rejected INSERT");
        s.set_state(State::Streaming);
        s.confirmed(Lsn(400));
        assert_eq!(
            st.not_ready(),
            vec![
                "source shop/eu\"1 is retrying (held by a rejected row): writer 0: destination \
                 rejected INSERT (replaying up to LSN 0/1F4)"
                    .to_string()
            ]
        );
        s.confirmed(Lsn(600));
        assert_eq!(st.readiness_json(), "{\"ready\":true,\"reasons\":[]}\n");
    }

    #[test]
    fn readiness_names_a_pool_fault_until_a_writer_applies() {
        let st = one_source();
        st.source(0).expect("source").set_state(State::Streaming);
        st.pool_failed(
            Class::DestinationUnavailable,
            "writer 0: destination: could not extend file (SQLSTATE 53100)",
        );
        assert_eq!(
            st.not_ready(),
            vec![
                "waiting for the destination: writer 0: destination: could not extend file \
                 (SQLSTATE 53100)"
                    .to_string()
            ]
        );
        assert!(st
            .to_json(now_ms())
            .contains("\"destination_error\":{\"at\":"));
        st.pool_ok();
        assert!(st.not_ready().is_empty());
        assert!(st.to_json(now_ms()).contains("\"destination_error\":null"));
    }

    #[test]
    fn readiness_names_a_stuck_writer() {
        let st = one_source();
        st.source(0).expect("source").set_state(State::Streaming);
        st.writers[1].applying(true);
        assert!(st.not_ready().is_empty());
        st.writers[1]
            .applying_since_ms
            .store(now_ms() - STUCK_AFTER_MS - 5_000, Ordering::Relaxed);
        assert_eq!(
            st.not_ready(),
            vec![
                "writer 1 has been applying one batch for 125 s: the destination may be holding \
                 it (a lock; see pg_stat_activity)"
                    .to_string()
            ]
        );
        st.writers[1].applying(false);
        assert!(st.not_ready().is_empty());
    }

    #[test]
    fn readiness_names_a_silent_source() {
        let st = one_source();
        let s = st.source(0).expect("source");
        s.set_state(State::Streaming);
        s.heard_from_server(Duration::from_secs(5));
        assert!(st.not_ready().is_empty());
        s.heard_ms.store(now_ms() - 7_500, Ordering::Relaxed);
        assert_eq!(
            st.not_ready(),
            vec![
                "source shop/eu\"1 has heard nothing from its server for 7 s \
                 (app.wal_receiver_timeout is 5 s): the connection is presumed dead"
                    .to_string()
            ]
        );
        // A source that stopped streaming is reported by its state, not its silence.
        s.set_state(State::Retrying);
        assert_eq!(
            st.not_ready(),
            vec!["source shop/eu\"1 is retrying".to_string()]
        );
    }

    #[test]
    fn metrics_carry_the_go_names_and_escaped_labels() {
        let st = one_source();
        let t = st.source(0).expect("source").table("public.orders");
        t.routed(Op::Insert);
        t.routed(Op::Insert);
        t.copied(10, 100);
        st.writers[1].committed(5, Duration::from_millis(3));
        st.anomaly("public.orders", Anomaly::DeleteMissedRow, 2);
        st.anomaly("public.orders", Anomaly::DeleteMissedRow, 1);
        // Committed 3 ms after a commit 3 ms ago: bucket 0.005.
        let pg_now = (now_ms() - 946_684_800_000) * 1000;
        let since = since_commit(pg_now - 3_000);
        assert!((0.003..0.5).contains(&since), "{since}");
        assert_eq!(since_commit(pg_now + 60_000_000), 0.0);
        st.latency.committed.observe(since.min(0.004));
        let m = st.to_prometheus(now_ms());
        for line in [
            "streamer_operations_total{database=\"shop\",sid=\"eu\\\"1\",table=\"public.orders\",operation=\"insert\",result=\"ok\"} 2",
            "streamer_sync_total_rows{database=\"shop\",sid=\"eu\\\"1\",table=\"public.orders\"} 10",
            "streamer_sync_total_bytes{database=\"shop\",sid=\"eu\\\"1\",table=\"public.orders\"} 100",
            "streamer_jobs_total{channel=\"writer-1\"} 5",
            "kuvasz_source_state{database=\"shop\",sid=\"eu\\\"1\",state=\"starting\"} 1",
            "kuvasz_source_failures_total{database=\"shop\",sid=\"eu\\\"1\",class=\"table_definition\"} 0",
            "kuvasz_destination_available 1",
            "kuvasz_writer_batch_size_bucket{writer=\"1\",le=\"10\"} 1",
            "streamer_operations_seconds_bucket{writer=\"1\",le=\"0.005\"} 1",
            "streamer_operations_seconds_count{writer=\"1\"} 1",
            "# TYPE url_heartbeat gauge",
            "kuvasz_anomalies_total{table=\"public.orders\",kind=\"delete_missed_row\"} 3",
            "kuvasz_latency_seconds_bucket{point=\"committed\",le=\"0.002\"} 0",
            "kuvasz_latency_seconds_bucket{point=\"committed\",le=\"0.005\"} 1",
            "kuvasz_latency_seconds_count{point=\"routed\"} 0",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line} in\n{m}");
        }
    }

    #[test]
    fn status_json_has_copy_progress_and_eta() {
        let st = one_source();
        let t = st.source(0).expect("source").table("public.orders");
        t.copy_started("orders", 1000);
        t.copied(250, 4096);
        let j = st.to_json(now_ms() + 1000);
        assert!(j.contains("\"url\":\"postgres://kv@h/shop\""), "{j}");
        assert!(
            j.contains("\"copy\":{\"target\":\"orders\",\"state\":\"copying\",\"rows\":250,\"bytes\":4096,\"estimated_rows\":1000"),
            "{j}"
        );
        assert!(j.contains("\"eta_seconds\":3}"), "{j}");
        t.copy_done();
        assert!(st.to_json(now_ms()).contains("\"state\":\"done\""));
    }
}
