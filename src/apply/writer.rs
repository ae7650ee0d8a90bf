//! One writer thread: applies its queue in destination transactions (group commit) and
//! acknowledges markers once what preceded them is committed.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, error, info, warn};
use postgres::Statement;

use crate::change::{Change, Position, SourceId, TargetTable, Value};
use crate::fault::{self, Class, Side};
use crate::pg::quote::jsonb_object;
use crate::pg::{describe, Lsn};
use crate::store::{progress_sql, WriterProgress};

use super::batch::{Batch, Entry, Group, Net, MAX_COPY_BYTES, MAX_COPY_ROWS};
use super::history;
use super::progress::Progress;
use super::sql::{self, Stage};
use super::{Inflight, WriterMsg};
use crate::status::{Anomaly, Status};

/// How long a writer whose queue ran dry waits for more before it commits a backlog's
/// batch, in steps: the source refills the queue within this time, so batches grow
/// instead of being cut at every momentary gap, and a writer that sleeps is not woken by
/// every change. Only while the writer is busy (more than [`BACKLOG_CHANGES`] changes or
/// [`BUSY_COMMITS`] commits per [`RATE_WINDOW`]) and for a batch younger than
/// [`BACKLOG_BATCH_AGE`]: live traffic is committed as soon as the queue is dry, since
/// waiting after every gap would hold its batch until `app.commit_delay`. (Whether the
/// writer was idle says nothing: a writer faster than its source is idle between changes
/// during a backlog too.)
const LINGER: Duration = Duration::from_millis(2);
const LINGER_STEP: Duration = Duration::from_micros(500);
const RATE_WINDOW: Duration = Duration::from_millis(100);
const BACKLOG_CHANGES: usize = 5000;
const BACKLOG_BATCH_AGE: Duration = Duration::from_millis(50);
/// Commits per [`RATE_WINDOW`] that also count as a backlog: a writer committing one
/// change at a time as fast as it can (a burst that the source hands over a change at a
/// time, because tiny commits take the CPU it would decode with) falls behind by
/// hundreds of milliseconds; batching the burst catches up.
const BUSY_COMMITS: usize = 20;

/// Batches of at most this many entries and bytes go in one round trip, their values as
/// literals ([`Writer::apply_literal`]); larger ones by COPY, where a round trip more is
/// nothing and parsing a long statement would be.
const LITERAL_ENTRIES: usize = 256;
const LITERAL_BYTES: usize = 256 << 10;
/// Checks what deferred constraints still have pending, as a statement: run before each
/// COMMIT, a row the destination refuses at commit (a DEFERRABLE INITIALLY DEFERRED
/// foreign key) fails here, inside the transaction, and is isolated like any other; a
/// refused COMMIT would only say that the whole batch was. The careful redo runs it
/// first, so that every statement checks them and bisection finds the row.
const CHECK_DEFERRED: &str = "SET CONSTRAINTS ALL IMMEDIATE";
/// [`CHECK_DEFERRED`] and COMMIT in one round trip: if the check refuses, COMMIT does
/// not run and the transaction is still there to roll back.
const CHECKED_COMMIT: &str = "SET CONSTRAINTS ALL IMMEDIATE; COMMIT";

/// A batch this big makes the writer hand freed memory back once it is idle.
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// What a rejected row does to its source (SPEC §4 `app.on_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectPolicy {
    Stop,
    Deadletter,
}

/// A source's names, for reports.
#[derive(Clone, Debug)]
struct SourceLabel {
    pub name: String,
    pub sid: String,
}

/// Everything a writer needs besides its queue.
#[derive(Clone)]
pub struct WriterSettings {
    pub dest: crate::pg::connect::Endpoint,
    pub schema: String,
    pub commit_delay: Duration,
    pub on_error: RejectPolicy,
    pub progress: Arc<Progress>,
    pub inflight: Arc<Inflight>,
    /// How many writers the pool has: routing, and so the positions each records,
    /// depend on it.
    pub pool_size: usize,
    /// Where commits and rejected rows are reported (see [`crate::status`]).
    pub status: Arc<Status>,
    /// Sources held by a rejected row (`on_error = stop`) or by their target table's
    /// definition, with the class and the report, for the supervisor to restart them.
    pub rejections: Sender<(SourceId, Class, String)>,
}

#[derive(Debug)]
pub enum WriterError {
    /// The destination could not be reached or dropped the connection.
    Connection {
        writer: usize,
        error: postgres::Error,
    },
    /// The destination refused a change and the policy is `stop`.
    Rejected(Box<Rejection>),
    /// A table of the batch has no staging table (a bug, reported rather than a panic).
    NoStage { writer: usize, table: String },
    /// The session went out of step inside a transaction that cannot be given up
    /// alone (see [`Writer::reconnect`]).
    OutOfStep { writer: usize },
    /// The role lacks what every batch needs (its staging tables), with what to grant.
    Prerequisite { writer: usize, message: String },
}

/// A change the destination refused, with everything an operator needs to find it.
#[derive(Debug)]
pub struct Rejection {
    pub writer: usize,
    pub source: String,
    pub sid: String,
    pub table: String,
    pub key: String,
    pub op: String,
    pub lsn: Lsn,
    pub message: String,
}

impl fmt::Display for WriterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriterError::Connection { writer, error } => {
                write!(f, "writer {writer}: destination: {}", describe(error))
            }
            WriterError::NoStage { writer, table } => {
                write!(f, "writer {writer}: no staging table for {table}")
            }
            WriterError::OutOfStep { writer } => {
                write!(
                    f,
                    "writer {writer}: session out of step after a refused COPY"
                )
            }
            WriterError::Prerequisite { writer, message } => {
                write!(f, "writer {writer}: {message}")
            }
            WriterError::Rejected(r) => write!(
                f,
                "writer {writer}: destination rejected {op} from source {source} (sid {sid}) \
                 on {table} key {key} at LSN {lsn}: {message}",
                writer = r.writer,
                op = r.op,
                source = r.source,
                sid = r.sid,
                table = r.table,
                key = r.key,
                lsn = r.lsn,
                message = r.message
            ),
        }
    }
}

impl std::error::Error for WriterError {}

impl WriterError {
    /// What kind of failure stopped the writer (see [`crate::fault`]).
    pub fn class(&self) -> Class {
        match self {
            WriterError::Connection { error, .. } => fault::classify_sql(error, Side::Destination),
            WriterError::Rejected(_) => Class::RejectedRow,
            WriterError::NoStage { .. } => Class::Bug,
            WriterError::OutOfStep { .. } => Class::Transient,
            WriterError::Prerequisite { .. } => Class::Prerequisite,
        }
    }
}

/// How long a restarted writer waits before it may clear the pool's fault (a full
/// disk, say) without applying anything: only when every source has caught up.
const POOL_SETTLED: Duration = Duration::from_secs(5);

pub struct Writer {
    id: usize,
    client: postgres::Client,
    settings: WriterSettings,
    rx: Receiver<WriterMsg>,
    batch: Batch,
    batch_started: Instant,
    /// The source commit time of the change that opened the batch (see
    /// [`crate::status::Latency`]).
    batch_commit_time: i64,
    /// The batch may wait for more ([`LINGER`]): it started during a backlog.
    lingers: bool,
    /// Changes taken in the current rate window, and whether the last window's rate was
    /// a backlog's ([`BACKLOG_CHANGES`]).
    window_changes: usize,
    window_commits: usize,
    window_start: Instant,
    backlog: bool,
    markers: Vec<(SourceId, Lsn)>,
    flushes: Vec<Sender<()>>,
    /// Staging tables made so far, by target layout (index = stage number).
    stages: Vec<(Arc<TargetTable>, Stage)>,
    /// Stages written in the open transaction (to be emptied before they are reused).
    dirty: Vec<bool>,
    /// A COPY failed before its data: the session is out of step (see
    /// [`Writer::reconnect`]).
    out_of_step: bool,
    /// When this writer connected (see [`POOL_SETTLED`]).
    born: Instant,
    /// Targets of the batch whose stages could not be made, with the reason.
    unstaged: Vec<(Arc<TargetTable>, String)>,
    /// Prepared statements by their text: the merge statements of each layout are
    /// planned once per connection, not once per batch.
    prepared: HashMap<String, Statement>,
    /// Reused buffer for COPY data.
    copy_buf: Vec<u8>,
    /// A big batch was committed since memory was last handed back (see
    /// [`crate::memory`]); done once the queue is idle.
    trim_due: bool,
    /// Sources held after a rejected row, by source id (see [`Writer::stopped_source`]).
    held: Vec<bool>,
    /// Sources held by a rejected row in the transaction being applied, and where: their
    /// progress stops at that change.
    held_at: Vec<(SourceId, Position)>,
    /// Slot names by source id, for `kvsz_progress` (looked up once).
    slots: Vec<Option<String>>,
    /// The owner epoch each source started with ([`WriterMsg::Resume`]), checked by
    /// every transaction that applies its changes.
    epochs: Vec<Option<i64>>,
    /// Sources another instance took over since they started: what is queued of them
    /// is dropped, unconfirmed, until they start again (their new owner replays it).
    fenced: Vec<bool>,
}

/// Writes one entry's line of COPY data.
type LineFn = fn(&Change, &mut Vec<u8>);
/// Which entries of a segment one COPY carries.
type Pick<'a> = dyn Fn(&&Entry) -> bool + 'a;

/// Why applying some entries failed.
enum Failure {
    /// The destination refused the data, or the data cannot be applied as the source
    /// made it: bisect, or apply again under savepoints.
    Rejected(Refusal),
    /// Anything else: the writer stops and the pool restarts.
    Fatal(WriterError),
}

/// What refused a set of entries.
enum Refusal {
    /// A statement's error about its rows or its target (see [`fault::statement_fault`]).
    Server(postgres::Error),
    /// An entry the batch itself knows cannot be applied (a partial update of a key it
    /// deleted before), with the reason.
    Incomplete(String),
    /// The target's staging tables cannot be made from its definition, with the reason.
    Unstaged(String),
}

impl Refusal {
    fn describe(&self) -> String {
        match self {
            Refusal::Server(e) => describe(e),
            Refusal::Incomplete(m) | Refusal::Unstaged(m) => m.clone(),
        }
    }

    /// Whether the rows are at fault (the `on_error` policy applies), or their target
    /// (the sources writing it are held, whatever the policy: nothing is parked that a
    /// fixed table would take).
    fn class(&self) -> Class {
        match self {
            Refusal::Server(e) => fault::statement_fault(e).unwrap_or(Class::RejectedRow),
            Refusal::Incomplete(_) => Class::RejectedRow,
            Refusal::Unstaged(_) => Class::TableDefinition,
        }
    }
}

impl Writer {
    /// Connects to the destination and prepares the session.
    pub fn connect(
        id: usize,
        settings: WriterSettings,
        rx: Receiver<WriterMsg>,
    ) -> Result<Writer, WriterError> {
        let client = Self::session(id, &settings)?;
        Ok(Writer {
            id,
            client,
            settings,
            rx,
            batch: Batch::default(),
            batch_started: Instant::now(),
            batch_commit_time: 0,
            lingers: false,
            window_changes: 0,
            window_commits: 0,
            window_start: Instant::now(),
            backlog: false,
            markers: Vec::new(),
            flushes: Vec::new(),
            stages: Vec::new(),
            dirty: Vec::new(),
            unstaged: Vec::new(),
            out_of_step: false,
            born: Instant::now(),
            prepared: HashMap::new(),
            copy_buf: Vec::new(),
            trim_due: false,
            held: Vec::new(),
            held_at: Vec::new(),
            slots: Vec::new(),
            epochs: Vec::new(),
            fenced: Vec::new(),
        })
    }

    /// A destination session with the writers' settings.
    fn session(id: usize, settings: &WriterSettings) -> Result<postgres::Client, WriterError> {
        let conn = |error| WriterError::Connection { writer: id, error };
        let mut client = settings.dest.destination().map_err(conn)?;
        // Every statement joins a batch of keys to a possibly huge target: nested loops over
        // the key index, never a hash join that scans the whole target per batch when the
        // planner's statistics lag behind a fast-growing table.
        client
            .batch_execute(
                "SET standard_conforming_strings = on; SET synchronous_commit = on; \
                 SET enable_hashjoin = off; SET enable_mergejoin = off",
            )
            .map_err(conn)?;
        // Its backend, for the watcher to look up when a batch takes too long.
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .map_err(conn)?
            .get(0);
        if let Some(w) = settings.status.writers.get(id) {
            w.session(pid);
        }
        Ok(client)
    }

    /// Replaces a session the client library left out of step: after a COPY the server
    /// refused before any data (a privilege, a column missing), it still awaits an
    /// answer the server already gave. What the session held (its open transaction,
    /// prepared statements, staging tables) goes with it.
    fn reconnect(&mut self) -> Result<(), WriterError> {
        debug!("writer {}: opening a new session", self.id);
        self.client = Self::session(self.id, &self.settings)?;
        self.out_of_step = false;
        self.prepared.clear();
        self.stages.clear();
        self.dirty.clear();
        Ok(())
    }

    fn conn_err(&self) -> impl Fn(postgres::Error) -> WriterError {
        let writer = self.id;
        move |error| WriterError::Connection { writer, error }
    }

    /// Applies the queue until told to stop or until the queue is closed.
    pub fn run(mut self) -> Result<(), WriterError> {
        let linger_steps =
            (LINGER.min(self.settings.commit_delay).as_micros() / LINGER_STEP.as_micros()) as u32;
        let mut lingered = 0;
        loop {
            let busy = !self.batch.is_empty() || !self.markers.is_empty();
            let msg = if busy {
                match self.rx.try_recv() {
                    Ok(m) => {
                        lingered = 0;
                        m
                    }
                    Err(TryRecvError::Empty)
                        if self.lingers
                            && lingered < linger_steps
                            && self.batch_started.elapsed() < BACKLOG_BATCH_AGE =>
                    {
                        lingered += 1;
                        std::thread::sleep(LINGER_STEP);
                        continue;
                    }
                    // The queue ran dry: commit now (group commit).
                    Err(TryRecvError::Empty) => {
                        lingered = 0;
                        self.commit()?;
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return self.commit(),
                }
            } else {
                match self.rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(w) = self.settings.status.writers.get(self.id) {
                            w.queued.store(0, Ordering::Relaxed);
                        }
                        // Idle a while after (re)starting, and nothing waits to be
                        // applied: whatever stopped the pool is not stopping anything.
                        if self.born.elapsed() >= POOL_SETTLED && self.settings.status.caught_up() {
                            self.settings.status.pool_ok();
                        }
                        if self.trim_due {
                            self.trim_due = false;
                            self.copy_buf = Vec::new();
                            crate::memory::release_free_memory();
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            if self.stopped_source(&msg) {
                continue;
            }
            match msg {
                WriterMsg::Change { change, key } => {
                    self.settings.inflight.taken(self.id, change.byte_len());
                    if Batch::is_barrier(&change) {
                        // Alone in its own transaction, after everything before it.
                        self.commit()?;
                        self.push(change, key);
                        self.commit()?;
                    } else {
                        self.push(change, key);
                    }
                }
                WriterMsg::Rejected { change, message } => {
                    self.settings.inflight.taken(self.id, change.byte_len());
                    self.commit()?;
                    self.reject_alone(&change, message)?;
                }
                WriterMsg::Marker { source, lsn } => {
                    if self.batch.is_empty() {
                        self.settings.progress.ack(source, self.id, lsn);
                    } else {
                        self.markers.push((source, lsn));
                    }
                }
                WriterMsg::Flush(tx) => {
                    self.flushes.push(tx);
                    self.commit()?;
                }
                WriterMsg::Resume { source, epoch } => self.resume(source, epoch)?,
                WriterMsg::Stop => return self.commit(),
            }
            if self.batch.is_full()
                || (!self.batch.is_empty()
                    && self.batch_started.elapsed() >= self.settings.commit_delay)
            {
                self.commit()?;
            }
        }
    }

    /// `source` starts again, owned with `epoch`: its hold or fence ends. What is
    /// batched of an earlier start is committed first, under the epoch it came with.
    fn resume(&mut self, source: SourceId, epoch: Option<i64>) -> Result<(), WriterError> {
        if self.epochs.get(source).copied().flatten() != epoch {
            self.commit()?;
        }
        if self.epochs.len() <= source {
            self.epochs.resize(source + 1, None);
            self.fenced.resize(source + 1, false);
        }
        self.epochs[source] = epoch;
        self.fenced[source] = false;
        if let Some(p) = self.held.get_mut(source) {
            *p = false;
        }
        Ok(())
    }

    fn is_fenced(&self, source: SourceId) -> bool {
        self.fenced.get(source).copied().unwrap_or(false)
    }

    /// Whether `msg` belongs to a source held since one of its rows was rejected (under
    /// `on_error = stop`), or fenced off: dropped, as the source replays it from its
    /// confirmed position once it starts again (its [`WriterMsg::Resume`] ends the hold).
    fn stopped_source(&mut self, msg: &WriterMsg) -> bool {
        let source = match msg {
            WriterMsg::Change { change, .. } | WriterMsg::Rejected { change, .. } => change.source,
            WriterMsg::Marker { source, .. } => *source,
            WriterMsg::Flush(_) | WriterMsg::Resume { .. } | WriterMsg::Stop => return false,
        };
        if !self.held.get(source).copied().unwrap_or(false) && !self.is_fenced(source) {
            return false;
        }
        if let WriterMsg::Change { change, .. } | WriterMsg::Rejected { change, .. } = msg {
            self.settings.inflight.taken(self.id, change.byte_len());
        }
        true
    }

    fn push(&mut self, c: Change, key: u64) {
        // The clock is read at a batch's start, at each commit and every 64 changes, not
        // for each change.
        if self.batch.is_empty() {
            self.roll_window();
            self.batch_started = Instant::now();
            self.batch_commit_time = c.commit_time;
            self.settings
                .status
                .latency
                .taken
                .observe(crate::status::since_commit(c.commit_time));
            self.lingers = self.backlog;
        } else if self.window_changes.is_multiple_of(64) {
            self.roll_window();
        }
        self.window_changes += 1;
        self.batch.push(c, key);
    }

    /// Ends the rate window once it is [`RATE_WINDOW`] old: whether the writer is busy.
    fn roll_window(&mut self) {
        if self.window_start.elapsed() >= RATE_WINDOW {
            self.backlog =
                self.window_changes >= BACKLOG_CHANGES || self.window_commits >= BUSY_COMMITS;
            self.window_changes = 0;
            self.window_commits = 0;
            self.window_start = Instant::now();
        }
    }

    /// Applies the batch in one transaction and commits it, then acknowledges markers
    /// and barriers.
    fn commit(&mut self) -> Result<(), WriterError> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let started = Instant::now();
            self.applying(true);
            let mut applied = match self.apply_literal(&batch) {
                Ok(true) => Ok(()),
                Ok(false) => self.apply_batch(&batch),
                Err(e) => Err(e),
            };
            // Sources taken over meanwhile are left out, the rest applied again.
            while let Err(WriterError::Connection { error, .. }) = &applied {
                let sources: Vec<SourceId> = batch.next.iter().map(|&(s, _)| s).collect();
                if !fault::is_fenced(error) || !self.fence_off(&sources)? {
                    break;
                }
                let cuts = self.fenced_cuts(&batch);
                applied = self.apply_carefully(&batch, cuts);
            }
            self.applying(false);
            applied?;
            self.held_at.clear();
            self.end_txn();
            self.settings.status.pool_ok();
            self.settings
                .status
                .latency
                .committed
                .observe(crate::status::since_commit(self.batch_commit_time));
            if let Some(w) = self.settings.status.writers.get(self.id) {
                w.committed(batch.changes, started.elapsed());
                w.queued.store(self.rx.len() as u64, Ordering::Relaxed);
            }
            self.trim_due |= batch.bytes >= TRIM_AFTER_BYTES;
            self.window_commits += 1;
            self.roll_window();
            debug!(
                "writer {}: committed {} change(s) as {} entries",
                self.id,
                batch.changes,
                batch.groups.iter().map(|g| g.entries.len()).sum::<usize>()
            );
        }
        for (source, lsn) in std::mem::take(&mut self.markers) {
            if !self.held.get(source).copied().unwrap_or(false) && !self.is_fenced(source) {
                self.settings.progress.ack(source, self.id, lsn);
            }
        }
        for tx in self.flushes.drain(..) {
            let _ = tx.send(());
        }
        Ok(())
    }

    /// After a transaction was fenced off: rolls it back and marks those of `sources`
    /// whose owner epoch moved on since they started. False when none did (then the
    /// failure is not a take-over's, and is reported as it is).
    fn fence_off(&mut self, sources: &[SourceId]) -> Result<bool, WriterError> {
        self.client
            .batch_execute("ROLLBACK")
            .map_err(self.conn_err())?;
        self.end_txn();
        let mine: Vec<(SourceId, String, i64)> = sources
            .iter()
            .filter(|source| !self.is_fenced(**source))
            .filter_map(|&source| {
                let slot = self.slots.get(source)?.clone()?;
                Some((source, slot, self.epochs.get(source).copied().flatten()?))
            })
            .collect();
        let names: Vec<&str> = mine.iter().map(|(_, slot, _)| slot.as_str()).collect();
        let rows = self
            .client
            .query(
                crate::store::owners_sql(&self.settings.schema).as_str(),
                &[&names],
            )
            .map_err(self.conn_err())?;
        let mut any = false;
        for (source, slot, epoch) in &mine {
            let now = rows
                .iter()
                .find(|r| r.get::<_, &str>(0) == slot.as_str())
                .map(|r| (r.get::<_, i64>(1), r.get::<_, String>(2)));
            if now.as_ref().is_some_and(|(e, _)| e == epoch) {
                continue;
            }
            let by = now.map_or("nobody".to_string(), |(e, i)| format!("{i} (epoch {e})"));
            let message = format!(
                "writer {}: the source of slot {slot} was taken over by {by} since it started \
                 here (epoch {epoch}): what is queued of it here is left to its new owner",
                self.id
            );
            warn!("{message}");
            if let Some(s) = self.settings.status.source(*source) {
                s.fenced_off(&message);
            }
            self.fenced[*source] = true;
            any = true;
        }
        Ok(any)
    }

    /// Where the fenced sources of `batch` are cut: before all their changes.
    fn fenced_cuts(&self, batch: &Batch) -> Vec<(SourceId, Position)> {
        batch
            .next
            .iter()
            .filter(|(source, _)| self.is_fenced(*source))
            .map(|&(source, _)| (source, Position::default()))
            .collect()
    }

    /// Tells the status a batch is being applied (see [`crate::apply::watch`]).
    fn applying(&self, on: bool) {
        if let Some(w) = self.settings.status.writers.get(self.id) {
            w.applying(on);
        }
    }

    /// A change the source refused, reported in a transaction of its own that also
    /// records it as done (a dead letter is applied, as far as replays go).
    fn reject_alone(&mut self, c: &Change, message: String) -> Result<(), WriterError> {
        self.begin()?;
        self.reject(c, Class::RejectedRow, message)?;
        let held = self.held.get(c.source).copied().unwrap_or(false);
        let commit = match (held, self.progress_rows_sql(&[(c.source, c.pos.next())])) {
            (false, Some(p)) => format!("{p}; COMMIT"),
            _ => "COMMIT".to_string(),
        };
        self.held_at.clear();
        match self.client.batch_execute(&commit) {
            // Taken over: the report is its new owner's to make.
            Err(e) if fault::is_fenced(&e) && self.fence_off(&[c.source])? => Ok(()),
            r => r.map_err(self.conn_err()),
        }
    }

    /// The statement recording, in the batch's transaction, how far this writer got in
    /// each source of `batch` (see [`crate::store`]): past its last change, or up to the
    /// change that held the source (`on_error = stop`).
    fn progress_sql(&mut self, batch: &Batch) -> Option<String> {
        let rows: Vec<(SourceId, Position)> = batch
            .next
            .iter()
            .filter(|&&(source, _)| !self.is_fenced(source))
            .filter_map(
                |&(source, next)| match self.held_at.iter().find(|(s, _)| *s == source) {
                    Some(&(_, at)) => Some((source, at.min(next))),
                    None if self.held.get(source).copied().unwrap_or(false) => None,
                    None => Some((source, next)),
                },
            )
            .collect();
        self.progress_rows_sql(&rows)
    }

    fn progress_rows_sql(&mut self, rows: &[(SourceId, Position)]) -> Option<String> {
        for &(source, _) in rows {
            if self.slots.len() <= source {
                self.slots.resize(source + 1, None);
            }
            if self.slots[source].is_none() {
                self.slots[source] = self.settings.status.source(source).map(|s| s.slot.clone());
            }
        }
        let rows: Vec<WriterProgress> = rows
            .iter()
            .filter_map(|&(source, next)| {
                Some(WriterProgress {
                    slot: self.slots.get(source)?.as_deref()?,
                    writer: self.id,
                    writers: self.settings.pool_size,
                    next,
                    epoch: self.epochs.get(source).copied().flatten(),
                })
            })
            .collect();
        (!rows.is_empty()).then(|| progress_sql(&self.settings.schema, &rows))
    }

    fn begin(&mut self) -> Result<(), WriterError> {
        self.client
            .batch_execute("BEGIN")
            .map_err(self.conn_err())?;
        Ok(())
    }

    fn end_txn(&mut self) {
        self.dirty.iter_mut().for_each(|d| *d = false);
    }

    /// A small batch in one round trip: BEGIN, its statements with the values as
    /// literals, COMMIT, as one simple query. Under live traffic a batch is a few
    /// transactions, and round trips (a COPY takes two) are its latency. False when the
    /// batch does not qualify, or when the destination refused something: then nothing of
    /// it was applied, and the staged way applies it and isolates what was refused.
    fn apply_literal(&mut self, batch: &Batch) -> Result<bool, WriterError> {
        let entries: usize = batch.groups.iter().map(|g| g.entries.len()).sum();
        // A backlog's batch goes by COPY, however small: throughput counts there, and the
        // server parses COPY rows for less than literals.
        if self.lingers
            || entries > LITERAL_ENTRIES
            || batch.bytes > LITERAL_BYTES
            || !batch
                .groups
                .iter()
                .all(|g| !g.ordered && sql::literal_ok(&g.table, &g.entries))
        {
            return Ok(false);
        }
        let mut q = String::from("BEGIN");
        let mut plan = vec![Literal::Begin];
        let mut add = |stmt: String, step: Literal| {
            q.push_str("; ");
            q.push_str(&stmt);
            plan.push(step);
        };
        for g in &batch.groups {
            let table = g.table.display();
            let pick = |net| g.entries.iter().filter(move |e: &&Entry| e.net == net);
            let deletes: Vec<&Entry> = pick(Net::Delete).collect();
            if !deletes.is_empty() {
                let n = expected_deletes(deletes.iter().copied());
                let table = table.clone();
                add(
                    sql::delete_literal(&g.table, &deletes),
                    Literal::Delete { table, n },
                );
            }
            let upserts: Vec<&Entry> = pick(Net::Upsert).collect();
            if !upserts.is_empty() {
                let fresh = upserts.iter().filter(|e| e.fresh).count();
                let table = table.clone();
                add(
                    sql::upsert_literal(&g.table, &upserts),
                    Literal::Upsert { table, fresh },
                );
            }
            for e in pick(Net::Patch) {
                let mask = sql::mask_of(&e.change).unwrap_or_default();
                let refuse = self.refuse_call(&g.table, &mask);
                add(sql::patch_literal(&g.table, e, &refuse), Literal::Patch);
            }
        }
        if let Some(p) = self.progress_sql(batch) {
            add(p, Literal::Progress);
        }
        add(CHECK_DEFERRED.into(), Literal::Constraints);
        add("COMMIT".into(), Literal::Commit);
        match self.client.simple_query(&q) {
            Ok(msgs) => {
                let mut steps = plan.iter();
                let mut row = None;
                for m in &msgs {
                    match m {
                        postgres::SimpleQueryMessage::Row(r) => {
                            row = r.get(0).and_then(|v| v.parse::<usize>().ok());
                        }
                        postgres::SimpleQueryMessage::CommandComplete(n) => match steps.next() {
                            Some(Literal::Delete { table, n: want }) => {
                                log_deleted(&self.settings.status, table, *want, *n as usize)
                            }
                            Some(Literal::Upsert { table, fresh }) => log_upserted(
                                &self.settings.status,
                                table,
                                *fresh,
                                row.take().unwrap_or(*fresh),
                            ),
                            _ => {}
                        },
                        _ => {}
                    }
                }
                Ok(true)
            }
            Err(e) if fault::statement_fault(&e).is_some() => {
                debug!(
                    "writer {}: small batch refused ({}); applying it the staged way",
                    self.id,
                    describe(&e)
                );
                self.client
                    .batch_execute("ROLLBACK")
                    .map_err(self.conn_err())?;
                Ok(false)
            }
            Err(error) => Err(WriterError::Connection {
                writer: self.id,
                error,
            }),
        }
    }

    /// Applies a batch and commits it: first all at once, which is what nearly always
    /// happens; when the destination refuses something, again from the start with a
    /// savepoint around each table's statements, bisecting a refused set down to the
    /// entry at fault.
    fn apply_batch(&mut self, batch: &Batch) -> Result<(), WriterError> {
        self.make_stages(batch)?;
        self.begin()?;
        let fast = batch
            .groups
            .iter()
            .try_for_each(|g| {
                g.segments()
                    .into_iter()
                    .try_for_each(|s| self.apply(g, s, false))
            })
            .and_then(|()| {
                let commit = match self.progress_sql(batch) {
                    Some(p) => format!("{p}; {CHECKED_COMMIT}"),
                    None => CHECKED_COMMIT.to_string(),
                };
                self.client.batch_execute(&commit).map_err(self.fail())
            });
        match fast {
            Ok(()) => Ok(()),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Rejected(e)) => {
                debug!(
                    "writer {}: batch refused ({}); applying it again entry by entry",
                    self.id,
                    e.describe()
                );
                // A new session, whatever the probe said: after a COPY the destination
                // refused, the client library may still take a late answer for the next
                // statement's (a ROLLBACK here then found the connection closed, now and
                // then). The transaction ends with the session; a refused batch is rare.
                self.reconnect()?;
                self.make_stages(batch)?;
                self.end_txn();
                self.apply_carefully(batch, Vec::new())
            }
        }
    }

    /// Applies a refused batch entry by entry, isolating what the destination refuses.
    /// A source held by a refused row (`on_error = stop`) keeps nothing of its changes
    /// from that row on: they are its replay's, in source order once the cause is fixed
    /// (a later version of the same key must not land before the held one). So when a
    /// pass holds a source, it is rolled back and done again without them. Sources cut
    /// at `cuts` (fenced off) keep nothing from there either.
    fn apply_carefully(
        &mut self,
        batch: &Batch,
        mut cuts: Vec<(SourceId, Position)>,
    ) -> Result<(), WriterError> {
        loop {
            self.client
                .batch_execute(&format!("BEGIN; {CHECK_DEFERRED}"))
                .map_err(self.conn_err())?;
            self.held_at.clone_from(&cuts);
            for g in &batch.groups {
                for s in g.segments() {
                    if cuts.is_empty() {
                        self.careful(g, s)?;
                        continue;
                    }
                    let kept: Vec<Entry> = s
                        .iter()
                        .filter(|e| {
                            !cuts
                                .iter()
                                .any(|&(src, cut)| e.change.source == src && e.last >= cut)
                        })
                        .cloned()
                        .collect();
                    self.careful(g, &kept)?;
                }
            }
            let next = batch.cuts(&self.held_at);
            if next == cuts {
                break;
            }
            self.client
                .batch_execute("ROLLBACK")
                .map_err(self.conn_err())?;
            self.end_txn();
            cuts = next;
        }
        let commit = match self.progress_sql(batch) {
            Some(p) => format!("{p}; COMMIT"),
            None => "COMMIT".to_string(),
        };
        self.client.batch_execute(&commit).map_err(self.conn_err())
    }

    /// Applies `entries` under a savepoint; on a rejection, halves the set until the
    /// offending entry is alone, applies the rest, and hands that entry to the policy.
    fn careful(&mut self, g: &Group, entries: &[Entry]) -> Result<(), WriterError> {
        // A source held in this pass keeps none of its changes from its hold on: they
        // are not tried (a table's problem would refuse each of them in turn).
        let unheld: Vec<Entry>;
        let entries = if self.held_at.is_empty() {
            entries
        } else {
            unheld = entries
                .iter()
                .filter(|e| {
                    !self
                        .held_at
                        .iter()
                        .any(|&(src, at)| e.change.source == src && e.last >= at)
                })
                .cloned()
                .collect();
            &unheld
        };
        if entries.is_empty() {
            return Ok(());
        }
        self.client
            .batch_execute("SAVEPOINT kvsz")
            .map_err(self.conn_err())?;
        match self.apply(g, entries, true) {
            Ok(()) => self
                .client
                .batch_execute("RELEASE SAVEPOINT kvsz")
                .map_err(self.conn_err()),
            Err(Failure::Fatal(e)) => Err(e),
            // Careful passes copy into staging tables only, which take any row: should
            // one still leave the session out of step, the pool starts again.
            Err(Failure::Rejected(_)) if self.out_of_step => {
                Err(WriterError::OutOfStep { writer: self.id })
            }
            Err(Failure::Rejected(e)) => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT kvsz; RELEASE SAVEPOINT kvsz")
                    .map_err(self.conn_err())?;
                if entries.len() == 1 {
                    return self.reject(&entries[0].change, e.class(), e.describe());
                }
                let (a, b) = entries.split_at(entries.len() / 2);
                self.careful(g, a)?;
                self.careful(g, b)
            }
        }
    }

    fn fail(&self) -> impl Fn(postgres::Error) -> Failure {
        let writer = self.id;
        move |e| {
            if fault::statement_fault(&e).is_some() {
                Failure::Rejected(Refusal::Server(e))
            } else {
                Failure::Fatal(WriterError::Connection { writer, error: e })
            }
        }
    }

    /// The stage of a layout, made when first needed (outside the batch's transaction:
    /// a rolled back batch must not take it along). A target whose definition refuses it
    /// (a missing column, a privilege) is noted in `unstaged`: its changes are refused
    /// and their sources held, the rest of the batch goes on.
    fn make_stages(&mut self, batch: &Batch) -> Result<(), WriterError> {
        self.unstaged.clear();
        for g in &batch.groups {
            if self.stage_of(&g.table).is_none() {
                let stage = Stage::new(self.stages.len());
                let ddl = if g.table.versions() {
                    history::create_stage(&g.table, &stage)
                } else {
                    sql::create_stage(&g.table, &stage)
                };
                match self.client.batch_execute(&ddl) {
                    Ok(()) => {
                        self.stages.push((g.table.clone(), stage));
                        self.dirty.push(false);
                    }
                    Err(e) if !self.may_create_temp() => {
                        return Err(WriterError::Prerequisite {
                            writer: self.id,
                            message: format!(
                                "cannot stage changes for {} ({}): the role may not create \
                                 temporary tables in the destination database: GRANT TEMP ON \
                                 DATABASE <database> TO <role>",
                                g.table.display(),
                                describe(&e)
                            ),
                        });
                    }
                    Err(e) if fault::statement_fault(&e).is_some() => {
                        let why = format!(
                            "cannot stage changes for {}: {}",
                            g.table.display(),
                            describe(&e)
                        );
                        self.unstaged.push((g.table.clone(), why));
                    }
                    Err(e) => return Err(self.conn_err()(e)),
                }
            }
        }
        Ok(())
    }

    /// Whether the role may create temporary tables here (asked after a stage could not
    /// be made: a missing TEMP privilege is every target's problem, not one table's).
    fn may_create_temp(&mut self) -> bool {
        self.client
            .query_one(
                "SELECT has_database_privilege(current_database(), 'TEMP')",
                &[],
            )
            .map_or(true, |r| r.get::<_, bool>(0))
    }

    /// The call that refuses a change of `mask` whose row the target does not have.
    fn refuse_call(&self, table: &TargetTable, mask: &str) -> String {
        crate::store::refuse_call(&self.settings.schema, &sql::incomplete_message(table, mask))
    }

    fn stage_of(&self, table: &TargetTable) -> Option<usize> {
        self.stages.iter().position(|(t, _)| t.same_layout(table))
    }

    fn statement(&mut self, sql: String) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(&sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// Writes `entries` with COPY `sql`, one line each, in COPYs of bounded size; returns
    /// how many (none: no COPY at all).
    fn copy<'e>(
        &mut self,
        sql: String,
        entries: impl Iterator<Item = &'e Entry>,
        line: LineFn,
    ) -> Result<usize, postgres::Error> {
        self.copy_items(sql, entries, |e, out| line(&e.change, out))
    }

    /// Writes `items` with COPY `sql`, one line each, in COPYs of bounded size; returns
    /// how many (none: no COPY at all).
    fn copy_items<T>(
        &mut self,
        sql: String,
        items: impl Iterator<Item = T>,
        line: impl Fn(T, &mut Vec<u8>),
    ) -> Result<usize, postgres::Error> {
        let mut items = items.peekable();
        if items.peek().is_none() {
            return Ok(0);
        }
        let stmt = self.statement(sql)?;
        let mut buf = std::mem::take(&mut self.copy_buf);
        let mut total = 0;
        let mut result = Ok(());
        while items.peek().is_some() && result.is_ok() {
            buf.clear();
            let mut rows = 0;
            for item in items.by_ref() {
                line(item, &mut buf);
                rows += 1;
                if rows >= MAX_COPY_ROWS || buf.len() >= MAX_COPY_BYTES {
                    break;
                }
            }
            total += rows;
            result = (|| {
                let mut w = self.client.copy_in(&stmt)?;
                // A write error surfaces again, with the server's reason, from finish().
                let _ = w.write_all(&buf);
                w.finish().map(|_| ())
            })();
        }
        self.copy_buf = buf;
        if result.is_err() && !crate::pg::session::in_step(&mut self.client) {
            self.out_of_step = true;
        }
        result.map(|()| total)
    }

    /// Applies one segment of a history group: its versions and closings staged, then
    /// the statements of [`history`] (its module doc says why each).
    fn apply_history(
        &mut self,
        table: &TargetTable,
        stage: &Stage,
        entries: &[Entry],
    ) -> Result<(), Failure> {
        let fail = self.fail();
        let plan = history::plan(entries);
        if let Some(v) = plan.versions.iter().find(|v| v.incomplete) {
            let mask = sql::mask_of(v.change).unwrap_or_default();
            return Err(Failure::Rejected(Refusal::Incomplete(
                sql::incomplete_message(table, &mask),
            )));
        }
        let rows = self
            .copy_items(
                history::copy_rows_in(table, stage),
                plan.versions.iter(),
                history::version_line,
            )
            .map_err(&fail)?;
        let keys = self
            .copy_items(
                history::copy_keys_in(table, stage),
                plan.closes.iter(),
                history::close_line,
            )
            .map_err(&fail)?;
        let run = |w: &mut Writer, sql: String| -> Result<u64, Failure> {
            let stmt = w.statement(sql).map_err(&fail)?;
            w.client.execute(&stmt, &[]).map_err(&fail)
        };
        if plan.fills || plan.moved {
            run(self, history::fill(table, stage, plan.moved))?;
            // A version fill left without its values has no current version of its
            // key to take them from: refused, so that bisection reports its change.
            let mut masks: Vec<String> = plan
                .versions
                .iter()
                .filter_map(|v| sql::row_mask(&v.values))
                .collect();
            masks.sort_unstable();
            masks.dedup();
            for mask in masks {
                let refuse = self.refuse_call(table, &mask);
                self.client
                    .execute(
                        history::refuse_unfilled(stage, &mask, &refuse).as_str(),
                        &[],
                    )
                    .map_err(&fail)?;
            }
        }
        let marked = if plan.versions.iter().any(|v| v.first) {
            run(self, history::mark_rows(table, stage))?
        } else {
            0
        };
        let mut closed = 0;
        if keys > 0 {
            if plan.moved && table.loose_key {
                run(self, history::keep_respelt(table, stage))?;
            }
            closed = run(self, history::close(table, stage))?;
        }
        if marked > 0 {
            closed += run(self, history::close_reinserted(table, stage))?;
        }
        let added = if rows > 0 {
            run(self, history::insert(table, stage))? as usize
        } else {
            0
        };
        let name = table.display();
        debug!(
            "writer {}: {name}: {added} version(s) added, {closed} closed",
            self.id
        );
        Ok(())
    }

    /// Applies one segment of a group: its rows staged with COPY (new rows of a keyed
    /// target straight into it), then one statement per kind. `careful`: nothing goes
    /// straight into the target (a replayed row would refuse the whole COPY).
    fn apply(&mut self, g: &Group, entries: &[Entry], careful: bool) -> Result<(), Failure> {
        let table = &g.table;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let fail = self.fail();
        if first.net == Net::Truncate {
            for e in entries {
                let stmt = if table.versions() {
                    history::truncate(e)
                } else {
                    sql::truncate(e)
                };
                let n = self.client.execute(stmt.as_str(), &[]).map_err(&fail)?;
                if table.versions() {
                    info!("{}: TRUNCATE closed {n} version(s)", table.display());
                }
            }
            return Ok(());
        }
        if let Some(e) = entries.iter().find(|e| e.net == Net::Incomplete) {
            let mask = sql::mask_of(&e.change).unwrap_or_default();
            return Err(Failure::Rejected(Refusal::Incomplete(
                sql::incomplete_message(table, &mask),
            )));
        }
        let Some(id) = self.stage_of(table) else {
            if let Some((_, why)) = self.unstaged.iter().find(|(t, _)| t.same_layout(table)) {
                return Err(Failure::Rejected(Refusal::Unstaged(why.clone())));
            }
            return Err(Failure::Fatal(WriterError::NoStage {
                writer: self.id,
                table: table.display(),
            }));
        };
        let stage = self.stages[id].1.clone();
        if self.dirty[id] {
            self.client
                .batch_execute(&sql::clear_stage(&stage))
                .map_err(&fail)?;
        }
        self.dirty[id] = true;
        if table.versions() {
            return self.apply_history(table, &stage, entries);
        }
        let direct_ok = !careful && (table.arbiter || table.full_identity);
        let direct = |e: &&Entry| direct_ok && e.net == Net::Upsert && e.fresh;
        let staged_row =
            |e: &&Entry| matches!(e.net, Net::Upsert | Net::Patch | Net::Move) && !direct(e);
        let staged_key = |e: &&Entry| matches!(e.net, Net::Delete | Net::Move);
        let copies: [(String, &Pick, LineFn); 3] = [
            (sql::copy_target_in(table), &direct, sql::target_line),
            (sql::copy_rows_in(table, &stage), &staged_row, sql::row_line),
            (sql::copy_keys_in(table, &stage), &staged_key, sql::key_line),
        ];
        let mut n_direct = 0;
        for (n, (stmt, pick, line)) in copies.into_iter().enumerate() {
            let copied = self
                .copy(stmt, entries.iter().filter(pick), line)
                .map_err(&fail)?;
            if n == 0 {
                n_direct = copied;
            }
        }
        let name = table.display();
        let deletes = entries.iter().filter(|e| e.net == Net::Delete).count();
        if deletes > 0 {
            let expected = expected_deletes(entries.iter().filter(|e| e.net == Net::Delete));
            let stmt = self
                .statement(sql::delete_staged(table, &stage))
                .map_err(&fail)?;
            let deleted = self.client.execute(&stmt, &[]).map_err(&fail)? as usize;
            log_deleted(&self.settings.status, &name, expected, deleted);
        }
        let upserts: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.net == Net::Upsert && !direct(e))
            .collect();
        if !upserts.is_empty() {
            let fresh = upserts.iter().filter(|e| e.fresh).count();
            if table.full_identity {
                // A segment is all fresh or all not (see Group::segments).
                let stmt = sql::insert_staged(
                    table,
                    &stage,
                    fresh == 0,
                    careful && (table.serial || table.arbiter),
                );
                let stmt = self.statement(stmt).map_err(&fail)?;
                self.client.execute(&stmt, &[]).map_err(&fail)?;
            } else {
                let stmt = sql::upsert_staged(table, &stage);
                let inserted = if table.arbiter {
                    let stmt = self.statement(stmt).map_err(&fail)?;
                    let row = self.client.query_one(&stmt, &[]).map_err(&fail)?;
                    row.try_get::<_, i64>(0).unwrap_or(0).max(0) as usize
                } else {
                    // UPDATE, then INSERT of the rest: the INSERT's tag is the count.
                    let msgs = self.client.simple_query(&stmt).map_err(&fail)?;
                    msgs.iter()
                        .filter_map(|m| match m {
                            postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                            _ => None,
                        })
                        .last()
                        .unwrap_or(0) as usize
                };
                log_upserted(&self.settings.status, &name, fresh, inserted);
            }
        }
        let mut masks: Vec<String> = entries
            .iter()
            .filter(|e| matches!(e.net, Net::Patch | Net::Move))
            .filter_map(|e| sql::mask_of(&e.change).map(|m| (e.net, m)))
            .map(|(net, m)| format!("{}{m}", if net == Net::Move { 'm' } else { 'p' }))
            .collect();
        masks.sort_unstable();
        masks.dedup();
        for m in masks {
            let (kind, mask) = m.split_at(1);
            let refuse = self.refuse_call(table, mask);
            // A row the target does not have cannot be made from part of it: refused
            // first, so that bisection finds the change and reports it.
            let stmt = if kind == "m" {
                if !table.full_identity {
                    let check = sql::refuse_missing_move(table, &stage, &refuse);
                    self.client.execute(check.as_str(), &[]).map_err(&fail)?;
                    let clear = sql::clear_move_target(table, &stage);
                    self.client.execute(clear.as_str(), &[]).map_err(&fail)?;
                }
                Some(sql::move_staged(table, &stage, mask))
            } else {
                let check = self
                    .statement(sql::refuse_missing_patch(table, &stage, mask, &refuse))
                    .map_err(&fail)?;
                self.client.execute(&check, &[]).map_err(&fail)?;
                sql::patch_staged(table, &stage, mask)
            };
            if let Some(stmt) = stmt {
                self.client.execute(stmt.as_str(), &[]).map_err(&fail)?;
            }
        }
        if n_direct > 0 {
            debug!(
                "writer {}: copied {n_direct} new row(s) into {name}",
                self.id
            );
        }
        Ok(())
    }

    /// Hands a refused change to the policy: a row at fault goes by `on_error`; a change
    /// its target cannot take (`class` is not [`Class::RejectedRow`]) holds its source.
    fn reject(&mut self, c: &Change, class: Class, message: String) -> Result<(), WriterError> {
        let status = self.settings.status.source(c.source);
        let label = SourceLabel {
            name: status
                .as_ref()
                .map_or_else(|| format!("#{}", c.source), |s| s.database.clone()),
            sid: status.as_ref().map_or_else(String::new, |s| s.sid.clone()),
        };
        let table = c.table.display();
        if let Some(s) = status {
            s.rejected(crate::status::RejectedRow {
                at_ms: crate::status::now_ms(),
                table: table.clone(),
                op: c.op.to_string(),
                key: c.describe_key(),
                lsn: c.pos.commit_lsn,
                message: message.clone(),
            });
        }
        let policy = match class {
            Class::RejectedRow => self.settings.on_error,
            _ => RejectPolicy::Stop,
        };
        match policy {
            RejectPolicy::Stop => {
                // This source stops here, alone: nothing of it past this change is
                // confirmed by this writer, its queued changes are dropped until it starts
                // again from its confirmed position, and the supervisor restarts it with
                // backoff. The rest of the batch, other sources' changes included, commits.
                let r = Rejection {
                    writer: self.id,
                    source: label.name.clone(),
                    sid: label.sid.clone(),
                    table,
                    key: c.describe_key(),
                    op: c.op.to_string(),
                    lsn: c.pos.commit_lsn,
                    message,
                };
                let mut report = WriterError::Rejected(Box::new(r)).to_string();
                if class != Class::RejectedRow {
                    report.push_str(&format!(
                        " (a problem of the target table, class {}: the source is held until \
                         the table is fixed, whatever app.on_error says)",
                        class.name()
                    ));
                }
                crate::log_context::with_source(&label.name, &label.sid, || error!("{report}"));
                if self.held.len() <= c.source {
                    self.held.resize(c.source + 1, false);
                }
                self.held[c.source] = true;
                self.settings.progress.hold(c.source);
                self.held_at.push((c.source, c.pos));
                self.markers.retain(|(s, _)| *s != c.source);
                if let Some(s) = self.settings.status.source(c.source) {
                    s.held_at(c.pos.commit_lsn, class, &report);
                }
                let _ = self.settings.rejections.send((c.source, class, report));
                Ok(())
            }
            RejectPolicy::Deadletter => {
                crate::log_context::with_source(&label.name, &label.sid, || {
                    warn!(
                        "destination rejected {} from source {} (sid {}) on {table} key {} at \
                         LSN {}: {message}; written to kvsz_deadletter",
                        c.op,
                        label.name,
                        label.sid,
                        c.describe_key(),
                        c.pos.commit_lsn
                    )
                });
                let row = row_json(c);
                let stmt = crate::store::deadletter_sql(
                    &self.settings.schema,
                    &crate::store::DeadLetter {
                        sid: &label.sid,
                        source: &label.name,
                        table: &table,
                        lsn: c.pos.commit_lsn,
                        op: &c.op.to_string(),
                        row_json: &row,
                        error: &message,
                    },
                );
                self.client.batch_execute(&stmt).map_err(self.conn_err())
            }
        }
    }
}

/// Logs the anomalies SPEC §4 asks to count among upserts: an INSERT that found its key
/// (fewer inserted than were new), an UPDATE that did not (more).
fn log_upserted(status: &Status, table: &str, fresh: usize, inserted: usize) {
    if inserted < fresh {
        let n = fresh - inserted;
        info!("{table}: {n} inserted row(s) already existed; updated them");
        status.anomaly(table, Anomaly::InsertFoundRow, n);
    } else if inserted > fresh {
        let n = inserted - fresh;
        info!("{table}: {n} updated row(s) were missing; inserted them");
        status.anomaly(table, Anomaly::UpdateMissedRow, n);
    }
}

/// How many of these delete entries must find a row: not those of keys inserted
/// earlier in the batch (fresh), which existed only inside it. A fresh delete that does
/// find a row (its INSERT met an existing key) may hide one missed row of the others.
fn expected_deletes<'a>(deletes: impl Iterator<Item = &'a Entry>) -> usize {
    deletes.filter(|e| !e.fresh).count()
}

/// Logs deletes of keys that were missing: `deletes` rows had to be found.
fn log_deleted(status: &Status, table: &str, deletes: usize, deleted: usize) {
    if deleted < deletes {
        let n = deletes - deleted;
        info!("{table}: {n} deleted row(s) were already missing");
        status.anomaly(table, Anomaly::DeleteMissedRow, n);
    }
}

/// What one statement of a literal batch does, to read its result.
enum Literal {
    Begin,
    Delete { table: String, n: usize },
    Upsert { table: String, fresh: usize },
    Patch,
    Progress,
    Constraints,
    Commit,
}

/// The change's row as a `jsonb` expression (column name → text value).
fn row_json(c: &Change) -> String {
    let (cols, values): (Vec<usize>, Vec<Value>) = match &c.old_key {
        Some(k) if c.values.is_empty() => (c.table.key.clone(), k.iter().collect()),
        _ => ((0..c.values.len()).collect(), c.values.iter().collect()),
    };
    jsonb_object(cols.iter().zip(values).filter_map(|(i, v)| {
        let col = c.table.columns.get(*i)?;
        // A value the source did not send is left out, not written as a NULL it is not.
        let text = match v {
            Value::Text(s) => Some(s),
            Value::Null => None,
            Value::Unchanged => return None,
        };
        Some((col.name.as_str(), text))
    }))
}
