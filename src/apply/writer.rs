//! One writer thread: applies its queue in destination transactions (group commit) and
//! acknowledges markers once what preceded them is committed.

use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, info, warn};

use crate::change::{Change, SourceId, Value};
use crate::pg::quote::{literal, qualified};
use crate::pg::{describe, Lsn};

use super::batch::{Kind, Run};
use super::progress::Progress;
use super::sql;
use super::WriterMsg;

/// Most changes in one destination transaction; bounds the redo of a failed batch.
const MAX_TXN: usize = 50_000;

/// How long a writer whose queue ran dry waits for more before it commits, in steps.
/// Under load the source refills the queue within this time, so runs (one COPY or one
/// statement each) and transactions grow instead of being cut at every momentary gap,
/// and a writer that sleeps is not woken by every change the source sends: about a fifth
/// more throughput in the benchmark. Under light load it is the latency added to a
/// commit (never more than `app.commit_delay`).
const LINGER: Duration = Duration::from_millis(2);
const LINGER_STEP: Duration = Duration::from_micros(500);

/// What a rejected row does to its source (SPEC §4 `app.on_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectPolicy {
    Stop,
    Deadletter,
}

/// Names of the sources, indexed by `SourceId`, for reports.
#[derive(Clone, Debug)]
pub struct SourceLabel {
    pub name: String,
    pub sid: String,
}

/// Everything a writer needs besides its queue.
#[derive(Clone)]
pub struct WriterSettings {
    pub dest: postgres::Config,
    pub schema: String,
    pub commit_delay: Duration,
    pub on_error: RejectPolicy,
    pub sources: Arc<Vec<SourceLabel>>,
    pub progress: Arc<Progress>,
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

/// A statement error that is about the data (not the connection or the server's state).
fn is_rejection(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        None => false,
        Some(db) => {
            // Only errors about the row's data: 22 data exception, 23 integrity constraint,
            // 21 cardinality, P0 raised by a trigger. Everything else (a dropped column, a
            // revoked privilege, a lost connection) is about the destination, not the row:
            // the pool restarts and retries rather than dead-lettering every row.
            let code = db.code().code();
            ["22", "23", "21", "P0"].iter().any(|c| code.starts_with(c))
        }
    }
}

pub struct Writer {
    id: usize,
    client: postgres::Client,
    settings: WriterSettings,
    rx: Receiver<WriterMsg>,
    run: Option<Run>,
    txn_open: bool,
    txn_started: Instant,
    txn_changes: usize,
    markers: Vec<(SourceId, Lsn)>,
    flushes: Vec<Sender<()>>,
    /// Reused buffer for COPY data.
    copy_buf: Vec<u8>,
}

impl Writer {
    /// Connects to the destination and prepares the session.
    pub fn connect(
        id: usize,
        settings: WriterSettings,
        rx: Receiver<WriterMsg>,
    ) -> Result<Writer, WriterError> {
        let conn = |error| WriterError::Connection { writer: id, error };
        let mut client = settings.dest.connect(postgres::NoTls).map_err(conn)?;
        // Every statement joins a batch of keys to a possibly huge target: nested loops over
        // the key index, never a hash join that scans the whole target per batch when the
        // planner's statistics lag behind a fast-growing table.
        client
            .batch_execute(
                "SET standard_conforming_strings = on; SET synchronous_commit = on; \
                 SET DateStyle = ISO; SET IntervalStyle = postgres; \
                 SET enable_hashjoin = off; SET enable_mergejoin = off",
            )
            .map_err(conn)?;
        // Like PostgreSQL's own apply worker: no triggers, no FK checks on our writes.
        if let Err(e) = client.batch_execute("SET session_replication_role = replica") {
            if id == 0 {
                warn!(
                    "destination: cannot SET session_replication_role = replica ({}); \
                     triggers and foreign keys of target tables will fire. Grant it with \
                     GRANT SET ON PARAMETER session_replication_role TO <role> (PostgreSQL 15+) \
                     or run as superuser",
                    describe(&e)
                );
            }
        }
        Ok(Writer {
            id,
            client,
            settings,
            rx,
            run: None,
            txn_open: false,
            txn_started: Instant::now(),
            txn_changes: 0,
            markers: Vec::new(),
            flushes: Vec::new(),
            copy_buf: Vec::new(),
        })
    }

    /// Applies the queue until told to stop or until the queue is closed.
    pub fn run(mut self) -> Result<(), WriterError> {
        let linger_steps =
            (LINGER.min(self.settings.commit_delay).as_micros() / LINGER_STEP.as_micros()) as u32;
        let mut lingered = 0;
        loop {
            let busy = self.txn_open || self.run.is_some();
            let msg = if busy {
                match self.rx.try_recv() {
                    Ok(m) => {
                        lingered = 0;
                        m
                    }
                    Err(TryRecvError::Empty) if lingered < linger_steps => {
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
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            match msg {
                WriterMsg::Change { change, key } => self.push(change, key)?,
                WriterMsg::Marker { source, lsn } => {
                    if self.txn_open || self.run.is_some() {
                        self.markers.push((source, lsn));
                    } else {
                        self.settings.progress.ack(source, self.id, lsn);
                    }
                }
                WriterMsg::Flush(tx) => {
                    self.flushes.push(tx);
                    self.commit()?;
                }
                WriterMsg::Stop => return self.commit(),
            }
            if self.txn_changes >= MAX_TXN
                || (self.txn_open && self.txn_started.elapsed() >= self.settings.commit_delay)
            {
                self.commit()?;
            }
        }
    }

    fn push(&mut self, c: Change, key: u64) -> Result<(), WriterError> {
        let c = match self.run.as_mut() {
            Some(run) => {
                let mut c = Some(c);
                run.try_push(&mut c, key);
                c
            }
            None => Some(c),
        };
        if let Some(c) = c {
            self.flush_run()?;
            self.run = Some(Run::start(c, key));
        }
        if self.run.as_ref().is_some_and(|r| r.is_full()) {
            self.flush_run()?;
        }
        Ok(())
    }

    fn begin(&mut self) -> Result<(), WriterError> {
        if !self.txn_open {
            self.client
                .batch_execute("BEGIN")
                .map_err(|error| WriterError::Connection {
                    writer: self.id,
                    error,
                })?;
            self.txn_open = true;
            self.txn_started = Instant::now();
            self.txn_changes = 0;
        }
        Ok(())
    }

    /// Applies the pending run inside the open transaction.
    fn flush_run(&mut self) -> Result<(), WriterError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        self.begin()?;
        self.txn_changes += run.len();
        let refs: Vec<&Change> = run.changes.iter().collect();
        self.apply(&run, &refs)
    }

    /// Applies `changes` (a subset of `run`) under a savepoint; on a rejection, halves the
    /// set until the offending change is alone, applies the rest, and hands that change
    /// to the policy.
    fn apply(&mut self, run: &Run, changes: &[&Change]) -> Result<(), WriterError> {
        if changes.is_empty() {
            return Ok(());
        }
        let table = &run.table;
        // New rows into a target with a unique key index: COPY, the cheapest way in. A row
        // that exists already (a replay) fails it, and the run goes the upsert way.
        if run.copyable() && changes.len() > 1 && self.copy(run, changes)? {
            return Ok(());
        }
        let statement = match run.kind {
            Kind::Insert | Kind::Update => sql::upsert(table, &run.cols, changes),
            Kind::Delete => sql::delete(table, changes),
            Kind::InPlace => sql::update_in_place(table, &run.cols, changes[0]),
            Kind::Truncate => sql::truncate(table),
        };
        let guarded = format!("SAVEPOINT kvsz; {statement}; RELEASE SAVEPOINT kvsz");
        match self.client.simple_query(&guarded) {
            Ok(msgs) => {
                self.count_anomalies(run, changes.len(), &msgs);
                Ok(())
            }
            Err(e) if is_rejection(&e) => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT kvsz; RELEASE SAVEPOINT kvsz")
                    .map_err(|error| WriterError::Connection {
                        writer: self.id,
                        error,
                    })?;
                if changes.len() == 1 {
                    return self.reject(changes[0], &e);
                }
                let (a, b) = changes.split_at(changes.len() / 2);
                self.apply(run, a)?;
                self.apply(run, b)
            }
            Err(error) => Err(WriterError::Connection {
                writer: self.id,
                error,
            }),
        }
    }

    /// Tries a run of inserts as one COPY under a savepoint; false when the destination
    /// refused it (then nothing of it was applied).
    fn copy(&mut self, run: &Run, changes: &[&Change]) -> Result<bool, WriterError> {
        let conn = |writer| move |error| WriterError::Connection { writer, error };
        self.copy_buf.clear();
        sql::copy_rows(&run.table, &run.cols, changes, &mut self.copy_buf);
        self.client
            .batch_execute("SAVEPOINT kvsz")
            .map_err(conn(self.id))?;
        let result = (|| {
            let mut w = self
                .client
                .copy_in(sql::copy_in(&run.table, &run.cols).as_str())?;
            // A write error surfaces again, with the server's reason, from finish().
            let _ = w.write_all(&self.copy_buf);
            w.finish()
        })();
        match result {
            Ok(_) => {
                self.client
                    .batch_execute("RELEASE SAVEPOINT kvsz")
                    .map_err(conn(self.id))?;
                debug!(
                    "writer {}: copied {} row(s) into {}",
                    self.id,
                    changes.len(),
                    run.table.display()
                );
                Ok(true)
            }
            Err(e) if is_rejection(&e) => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT kvsz; RELEASE SAVEPOINT kvsz")
                    .map_err(conn(self.id))?;
                Ok(false)
            }
            Err(error) => Err(WriterError::Connection {
                writer: self.id,
                error,
            }),
        }
    }

    /// Logs the anomalies SPEC §4 asks to count: an insert that found its key, an update
    /// that did not, a delete of a missing key.
    fn count_anomalies(&self, run: &Run, n: usize, msgs: &[postgres::SimpleQueryMessage]) {
        use postgres::SimpleQueryMessage as M;
        let table = run.table.display();
        match run.kind {
            Kind::Insert | Kind::Update => {
                let inserted = msgs.iter().find_map(|m| match m {
                    M::Row(r) => r.get(0).and_then(|v| v.parse::<usize>().ok()),
                    _ => None,
                });
                if let Some(inserted) = inserted {
                    let updated = n.saturating_sub(inserted);
                    if run.kind == Kind::Insert && updated > 0 {
                        info!("{table}: {updated} inserted row(s) already existed; updated them");
                    }
                    if run.kind == Kind::Update && inserted > 0 {
                        info!("{table}: {inserted} updated row(s) were missing; inserted them");
                    }
                }
            }
            Kind::Delete => {
                // CommandComplete of the DELETE is the second of SAVEPOINT; stmt; RELEASE.
                let counts: Vec<u64> = msgs
                    .iter()
                    .filter_map(|m| match m {
                        M::CommandComplete(k) => Some(*k),
                        _ => None,
                    })
                    .collect();
                if let Some(&deleted) = counts.get(1) {
                    if (deleted as usize) < n {
                        info!(
                            "{table}: {} deleted row(s) were already missing",
                            n - deleted as usize
                        );
                    }
                }
            }
            Kind::InPlace | Kind::Truncate => {}
        }
        debug!("writer {}: applied {n} change(s) to {table}", self.id);
    }

    fn reject(&mut self, c: &Change, e: &postgres::Error) -> Result<(), WriterError> {
        let label = self
            .settings
            .sources
            .get(c.source)
            .cloned()
            .unwrap_or(SourceLabel {
                name: format!("#{}", c.source),
                sid: String::new(),
            });
        let message = describe(e);
        let table = c.table.display();
        match self.settings.on_error {
            RejectPolicy::Stop => Err(WriterError::Rejected(Box::new(Rejection {
                writer: self.id,
                source: label.name,
                sid: label.sid,
                table,
                key: c.describe_key(),
                op: c.op.to_string(),
                lsn: c.pos.commit_lsn,
                message,
            }))),
            RejectPolicy::Deadletter => {
                warn!(
                    "destination rejected {} from source {} (sid {}) on {table} key {} at LSN {}: \
                     {message}; written to kvsz_deadletter",
                    c.op,
                    label.name,
                    label.sid,
                    c.describe_key(),
                    c.pos.commit_lsn
                );
                let row = row_json(c);
                let stmt = format!(
                    "INSERT INTO {} (sid, source, source_table, lsn, op, row, error, at) \
                     VALUES ({}, {}, {}, {}::pg_lsn, {}, {}, {}, now())",
                    qualified(&self.settings.schema, "kvsz_deadletter"),
                    literal(&label.sid),
                    literal(&label.name),
                    literal(&table),
                    literal(&c.pos.commit_lsn.to_string()),
                    literal(&c.op.to_string()),
                    row,
                    literal(&message),
                );
                self.client
                    .batch_execute(&stmt)
                    .map_err(|error| WriterError::Connection {
                        writer: self.id,
                        error,
                    })
            }
        }
    }

    /// Commits the open transaction, then acknowledges markers and barriers.
    fn commit(&mut self) -> Result<(), WriterError> {
        self.flush_run()?;
        if self.txn_open {
            self.client
                .batch_execute("COMMIT")
                .map_err(|error| WriterError::Connection {
                    writer: self.id,
                    error,
                })?;
            self.txn_open = false;
            self.txn_changes = 0;
        }
        for (source, lsn) in self.markers.drain(..) {
            self.settings.progress.ack(source, self.id, lsn);
        }
        for tx in self.flushes.drain(..) {
            let _ = tx.send(());
        }
        Ok(())
    }
}

/// The change's row as a `jsonb` expression (column name → text value).
fn row_json(c: &Change) -> String {
    let mut names = Vec::new();
    let mut vals = Vec::new();
    let (cols, values): (Vec<usize>, Vec<Value>) = match &c.old_key {
        Some(k) if c.values.is_empty() => (c.table.key.clone(), k.iter().collect()),
        _ => ((0..c.values.len()).collect(), c.values.iter().collect()),
    };
    for (i, v) in cols.iter().zip(values) {
        if let Some(col) = c.table.columns.get(*i) {
            names.push(literal(&col.name));
            vals.push(match v {
                Value::Text(s) => literal(s),
                Value::Null | Value::Unchanged => "NULL".to_string(),
            });
        }
    }
    format!(
        "json_object(ARRAY[{}]::text[], ARRAY[{}]::text[])::jsonb",
        names.join(","),
        vals.join(",")
    )
}
