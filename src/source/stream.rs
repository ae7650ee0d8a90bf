//! The streaming loop: decode pgoutput, map rows onto targets, route them to writers,
//! and confirm to the slot what every writer has committed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use postgres::Client;

use crate::apply::route::{key_fingerprint, writer_for, PoolClosed, Routed, Router, Wait};
use crate::change::{Change, Op, Position};
use crate::config::{Mode, TableMap};
use crate::expr::TableExprs;
use crate::mode::Effect;
use crate::pg::catalog::{self, Column};
use crate::pg::pgoutput::{Decoder, PgOutput, Relation};
use crate::pg::replication::{ReplicationConnection, ReplicationMessage};
use crate::pg::Lsn;
use crate::status::TableCounters;
use crate::store::{Applied, PROGRESS_TABLE};

use super::mapping::{map_relation, RelationMap, RowExprs};
use super::setup::{connect_source, on_dest, tables_changed, Route, StartPoint, TableName};
use super::spool::{SpoolError, Spools};
use super::stamps::Stamps;
use super::{SourceEnv, SourceError, SourceSpec};

/// How often routed progress is announced to the writers.
const MARK_EVERY: Duration = Duration::from_millis(100);
/// Standby status at least this often, so the server never times us out.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// Messages of one transaction between two looks at the clock.
const CHECK_EVERY: u32 = 64;
/// How long a graceful stop waits for the writers to commit what was routed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// A relation of the stream and where it lands (None: not mapped, its rows are skipped).
struct Mapped {
    map: RelationMap,
    mode: Mode,
    source_name: String,
    /// Changes of transactions that committed before this are in the copy already.
    copied_at: Lsn,
    /// The target, as [`Stamps`] tells tables apart: set for a history target.
    history: Option<u64>,
    /// The entry's filter and set expressions, bound to this relation's columns.
    exprs: Option<Arc<RowExprs>>,
    /// A TRUNCATE cannot be confined to this source's rows (see [`Route::shared`]).
    shared: bool,
    /// See [`Route::siblings`].
    siblings: usize,
    /// The Relation message, kept while some of its columns are missing on the target: the
    /// mapping is rebuilt once the target has them (see [`TARGET_RECHECK`]).
    incomplete: Option<Relation>,
    /// What `/metrics` counts for this source table.
    counters: Arc<TableCounters>,
}

/// A target's name as a number, for [`Stamps`] (FNV-1a: stable, cheap).
fn target_id(schema: &str, name: &str) -> u64 {
    let mut h = crate::change::FNV_SEED;
    for b in schema.bytes().chain([0]).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// See [`Stream::last_delete`].
struct LastDelete {
    /// Its target ([`target_id`]) and source relation.
    target: u64,
    rel: u32,
    /// Its stamp: the moved row's new version opens there.
    stamp: i64,
}

/// How often targets lacking some source columns are looked at again, so a column the
/// operator adds to the target is used without a restart.
const TARGET_RECHECK: Duration = Duration::from_secs(5);

/// How often a stream looks for tables whose replica identity changed and for
/// `resync` requests: two queries that hold the stream for a moment, so less often than
/// [`TARGET_RECHECK`] (what they find is not urgent; the latency of every change is).
const SHAPE_RECHECK: Duration = Duration::from_secs(15);

/// How a stream ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on request.
    Stopped,
    /// Reached [`StartPoint::restart_at`]: set up again and stream on.
    Restart,
}

struct Streamer<'a> {
    spec: &'a SourceSpec,
    env: &'a SourceEnv,
    repl: ReplicationConnection,
    /// What the writers had applied when this stream started: what it skips (see
    /// [`crate::store`]).
    applied: Applied,
    /// Held by a refused change (see [`Streamer::apply_alone`]): routes nothing more.
    held: bool,
    /// Changes skipped as applied already, reported once the replay is over.
    skipped: u64,
    decoder: Decoder,
    /// Transactions streamed before their commit (PostgreSQL 14+).
    spools: Spools,
    relations: HashMap<u32, Option<Mapped>>,
    routes: HashMap<TableName, Route>,
    excluded: HashMap<TableName, String>,
    /// See [`StartPoint::restart_at`].
    restart_at: Option<Lsn>,
    /// Everything before `restart_at` is routed, or the tables of a map entry changed:
    /// stop reading and set up again.
    restart_now: bool,
    /// See [`StartPoint::dynamic`]; looked at every [`TARGET_RECHECK`].
    dynamic: Vec<(TableMap, BTreeSet<TableName>)>,
    /// A SQL connection to the source, opened for the first such look.
    src: Option<Client>,
    in_txn: bool,
    /// Messages since the last progress check (see CHECK_EVERY).
    unchecked: u32,
    txn_lsn: Lsn,
    txn_time: i64,
    seq: u32,
    /// Version stamps of history targets in the current transaction.
    stamps: Stamps,
    /// The last change was a DELETE from a history target fed by several source
    /// relations (partitions): an INSERT into another of them right after it is taken
    /// for the second half of a cross-partition UPDATE (PostgreSQL writes one as a DELETE
    /// and an INSERT), whose new version continues the history from the DELETE's stamp.
    /// A row deleted and an unrelated one inserted into another partition right after
    /// it, in one transaction, look the same: that row's version then starts at T, not
    /// at 1900-01-01.
    last_delete: Option<LastDelete>,
    /// Highest WAL position received.
    received: Lsn,
    /// Everything before this position has been routed.
    routed: Lsn,
    /// Last position announced to the writers.
    marked: Lsn,
    /// Last position confirmed to the slot.
    confirmed: Lsn,
    last_mark: Instant,
    last_status: Instant,
    /// Whether a message came since the last check, and when one last came.
    heard: bool,
    last_heard: Instant,
    /// When a status asking the server for a reply was sent into the silence.
    pinged: Option<Instant>,
    last_recheck: Instant,
    /// See [`SHAPE_RECHECK`].
    last_shape_check: Instant,
}

pub fn stream(spec: &SourceSpec, env: &SourceEnv, start: StartPoint) -> Result<Ended, SourceError> {
    let StartPoint {
        mut repl,
        start,
        server_version,
        publications,
        restart_at,
        routes,
        excluded,
        dynamic,
    } = start;
    let proto = if server_version >= 140000 { 2 } else { 1 };
    // Protocol 2 streams big transactions as they are decoded (see spool.rs).
    let streaming = proto >= 2;
    let names: Vec<&str> = publications.iter().map(String::as_str).collect();
    repl.start_replication(&spec.slot, start, &names, proto, false, streaming)
        .map_err(|error| SourceError::Replication {
            source: spec.label(),
            context: format!("start replication from slot {}", spec.slot),
            error: Box::new(error),
        })?;
    info!(
        "source {}: streaming from slot {} at {start} (publications {})",
        spec.label(),
        spec.slot,
        publications.join(", ")
    );
    if let Some(at) = restart_at {
        info!(
            "source {}: the publications changed after the slot's position: streaming up to \
             {at} (the copy's snapshot), then again from there",
            spec.label()
        );
    }
    let applied = on_dest(
        spec,
        env,
        &format!("read {}.{PROGRESS_TABLE}", env.dest_schema),
        |dest| {
            dest.execute(
                crate::store::prune_progress_sql(&env.dest_schema).as_str(),
                &[&spec.slot, &start.to_string()],
            )?;
            Applied::load(dest, &env.dest_schema, &spec.slot)
        },
    )?;
    env.status.set_state(crate::status::State::Streaming);
    env.status.heard(start);
    env.status.confirmed(start);
    let s = Streamer {
        spec,
        env,
        repl,
        applied,
        held: false,
        skipped: 0,
        decoder: Decoder::new(),
        spools: Spools::new(&std::env::temp_dir()),
        relations: HashMap::new(),
        routes,
        excluded,
        restart_at,
        restart_now: false,
        dynamic,
        src: None,
        in_txn: false,
        unchecked: 0,
        txn_lsn: Lsn::ZERO,
        txn_time: 0,
        seq: 0,
        stamps: Stamps::default(),
        last_delete: None,
        received: start,
        routed: start,
        marked: start,
        confirmed: start,
        last_mark: Instant::now(),
        last_status: Instant::now(),
        heard: true,
        last_heard: Instant::now(),
        pinged: None,
        last_recheck: Instant::now(),
        last_shape_check: Instant::now(),
    };
    s.run()
}

impl Streamer<'_> {
    fn label(&self) -> String {
        self.spec.label()
    }

    /// Error constructors run only on failure: the label is formatted then, not on every
    /// message of the hot loop.
    fn repl_err(
        &self,
        context: &'static str,
    ) -> impl FnOnce(crate::pg::replication::PgError) -> SourceError + '_ {
        move |error| SourceError::Replication {
            source: self.label(),
            context: context.to_string(),
            error: Box::new(error),
        }
    }

    fn closed(&self) -> impl FnOnce(PoolClosed) -> SourceError + '_ {
        move |_| SourceError::PoolClosed {
            source: self.label(),
        }
    }

    fn run(mut self) -> Result<Ended, SourceError> {
        loop {
            if self.env.stop.is_abort() {
                return Ok(Ended::Stopped);
            }
            if self.env.stop.is_set() {
                return self.drain().map(|()| Ended::Stopped);
            }
            if self.restart_now {
                return self.drain().map(|()| Ended::Restart);
            }
            let received = self
                .repl
                .recv(Duration::from_millis(100))
                .map_err(self.repl_err("receive"))?;
            self.heard |= received.is_some();
            // Whether this was one of a transaction's changes (ordinary or streamed).
            let mid_changes = match received {
                Some(ReplicationMessage::XLogData { wal_end, data, .. }) => {
                    self.received = self.received.max(wal_end);
                    // Inside a streamed block, data and schema messages are kept as they
                    // are (decoded at replay); the decoder's state does not change.
                    if let (Some(xid), Some(b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M')) =
                        (self.decoder.stream_xid(), data.first())
                    {
                        self.spools
                            .push(xid, &data)
                            .map_err(|e| self.spool_err(xid, e))?;
                        true
                    } else {
                        let msg =
                            self.decoder
                                .decode(&data)
                                .map_err(|error| SourceError::Decode {
                                    source: self.label(),
                                    lsn: wal_end,
                                    error,
                                })?;
                        self.handle(msg)?;
                        self.in_txn
                    }
                }
                Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => {
                    self.received = self.received.max(wal_end);
                    // Between transactions everything up to the server's position has been
                    // received, so a quiet publication does not pin WAL.
                    if !self.in_txn {
                        self.routed = self.routed.max(self.capped(wal_end));
                    }
                    if reply_requested {
                        self.send_status(true)?;
                    }
                    false
                }
                None => false,
            };
            // Inside a transaction's changes nothing new becomes confirmable: the clock is
            // read every CHECK_EVERY changes (for the 10 s status), not for each one.
            self.unchecked += 1;
            if !mid_changes || self.unchecked >= CHECK_EVERY {
                self.unchecked = 0;
                self.check_silence()?;
                self.mark()?;
                self.send_status(false)?;
            }
            if !self.in_txn && self.last_recheck.elapsed() >= TARGET_RECHECK {
                self.last_recheck = Instant::now();
                self.recheck_targets()?;
                self.recheck_tables()?;
            }
            if !self.in_txn && self.last_shape_check.elapsed() >= SHAPE_RECHECK {
                self.last_shape_check = Instant::now();
                self.recheck_identities()?;
                self.recheck_resync()?;
            }
        }
    }

    /// `lsn`, or `restart_at` when that comes first: once the stream reaches it, it stops
    /// there (see [`StartPoint::restart_at`]).
    fn capped(&mut self, lsn: Lsn) -> Lsn {
        match self.restart_at {
            Some(at) if lsn >= at => {
                self.restart_now = true;
                at
            }
            _ => lsn,
        }
    }

    /// Whether a transaction committing at `commit_lsn` is past `restart_at`: then every
    /// transaction before it has been routed, and it is left for the next stream.
    fn past_restart(&mut self, commit_lsn: Lsn) -> bool {
        if self.restart_at.is_some_and(|at| commit_lsn >= at) {
            self.routed = self.routed.max(self.capped(commit_lsn));
            return true;
        }
        false
    }

    /// Takes the connection for dead when the server has sent nothing for
    /// `wal_receiver_timeout`: a partition drops packets without a FIN or RST, and the
    /// kernel would notice only after its retransmission timeout, or never on an idle
    /// stream. Halfway through the silence a status asks the server for a reply (the
    /// walsender answers one at once), so an idle but healthy stream is never silent.
    fn check_silence(&mut self) -> Result<(), SourceError> {
        let limit = self.env.wal_receiver_timeout;
        if std::mem::take(&mut self.heard) {
            self.last_heard = Instant::now();
            self.pinged = None;
            self.env.status.heard_from_server(limit);
            return Ok(());
        }
        if limit.is_zero() {
            return Ok(());
        }
        let quiet = self.last_heard.elapsed();
        match self.pinged {
            None if quiet >= limit / 2 => {
                debug!(
                    "source {}: nothing from the server for {quiet:.0?}; asking for a reply",
                    self.label()
                );
                self.repl
                    .send_standby_status(self.received, self.confirmed, self.confirmed, true)
                    .map_err(self.repl_err("send standby status"))?;
                self.pinged = Some(Instant::now());
            }
            // The reply had half the limit to come, whatever else the stream waited on.
            Some(at) if quiet >= limit && at.elapsed() >= limit / 2 => {
                return Err(SourceError::Silent {
                    source: self.label(),
                    after: quiet,
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// Announces routed progress to the writers (at most every MARK_EVERY).
    fn mark(&mut self) -> Result<(), SourceError> {
        if self.routed > self.marked && self.last_mark.elapsed() >= MARK_EVERY {
            let (id, lsn) = (self.spec.id, self.routed);
            self.blocking(|r, idle| r.mark(id, lsn, idle))?;
            self.marked = self.routed;
            self.last_mark = Instant::now();
        }
        Ok(())
    }

    /// Confirms to the slot what every writer has committed.
    fn send_status(&mut self, force: bool) -> Result<(), SourceError> {
        let ok = self.env.progress.confirmable(self.spec.id).min(self.routed);
        let advanced = ok > self.confirmed;
        let status = &self.env.status;
        status.heard(self.received);
        if advanced {
            self.confirmed = ok;
            status.confirmed(ok);
        }
        if force || advanced || self.last_status.elapsed() >= STATUS_EVERY {
            status.heartbeat();
            debug!(
                "source {}: standby status write {} flush {}",
                self.label(),
                self.received,
                self.confirmed
            );
            self.repl
                .send_standby_status(self.received, self.confirmed, self.confirmed, false)
                .map_err(self.repl_err("send standby status"))?;
            self.last_status = Instant::now();
        }
        Ok(())
    }

    /// Graceful stop: wait until the writers committed what was routed, confirm it.
    fn drain(mut self) -> Result<(), SourceError> {
        // Always a fresh marker: the acknowledgements of this run may not have reached
        // even the start position yet.
        let (id, lsn) = (self.spec.id, self.routed);
        self.blocking(|r, idle| r.mark(id, lsn, idle))?;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.env.progress.confirmable(self.spec.id) < self.routed
            && Instant::now() < deadline
            && !self.env.stop.is_abort()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.send_status(true)?;
        info!(
            "source {}: stopped; confirmed {} to slot {}",
            self.label(),
            self.confirmed,
            self.spec.slot
        );
        let _ = self.repl.finish();
        Ok(())
    }

    fn handle(&mut self, msg: PgOutput) -> Result<(), SourceError> {
        match msg {
            PgOutput::Begin {
                final_lsn,
                commit_time,
                ..
            } => {
                if self.past_restart(final_lsn) {
                    return Ok(());
                }
                self.begin_txn(final_lsn, commit_time)
            }
            PgOutput::Commit { end_lsn, .. } => self.end_txn(end_lsn),
            PgOutput::Relation(rel) => self.relation(rel)?,
            PgOutput::Insert { rel, new } => {
                let pos = self.pos();
                let after_delete = self.last_delete.take();
                if let Some(m) = self.mapped(rel)? {
                    let history = m.history;
                    let undecodable = m.map.undecodable(&[Some(&new)]);
                    let outcome = m.exprs.as_ref().map(|x| x.eval(&new, None));
                    let mut c = m
                        .map
                        .insert(self.spec.id, new, pos, self.txn_time)
                        .map_err(|e| self.mapping_error(rel, e))?;
                    if let Some(e) = undecodable {
                        return self.reject(c, e.to_string());
                    }
                    match outcome {
                        None => {}
                        Some(Err(e)) => return self.reject(c, e.to_string()),
                        // Not for this target: never inserted.
                        Some(Ok(o)) if !o.pass => {
                            m.counters.filtered.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        Some(Ok(o)) => c.values = m.map.with_computed(&c.values, &o.computed),
                    }
                    m.counters.routed(Op::Insert);
                    let target = target_id(&m.map.table.schema, &m.map.table.name);
                    let moved = after_delete.filter(|d| d.target == target && d.rel != rel);
                    let c = match moved {
                        Some(d) if history.is_some() => {
                            // A row that moved partitions: its new version continues its
                            // history where the DELETE closed it, as a key change's does,
                            // instead of being valid since 1900 like a new row's.
                            c.op = Op::Update;
                            c.commit_time = d.stamp;
                            self.continued(c, history)
                        }
                        _ => self.stamped(c, history),
                    };
                    self.route(c)?;
                }
            }
            PgOutput::Update { rel, old, new } => {
                // Two positions, whether or not the change is split into a DELETE and an
                // INSERT (which depends on the map): a replay numbers the transaction's
                // later changes alike whatever the map became meanwhile.
                let pos = self.pos();
                let half = self.pos();
                self.last_delete = None;
                if let Some(m) = self.mapped(rel)? {
                    let history = m.history;
                    let leaves_filter = m.mode.rules().leaves_filter;
                    let undecodable = m
                        .map
                        .undecodable(&[Some(&new), old.as_ref().map(|o| &o.tuple)]);
                    let outcome = m
                        .exprs
                        .as_ref()
                        .map(|x| x.eval(&new, old.as_ref().map(|o| &o.tuple)));
                    let (mut first, mut second) = m
                        .map
                        .update(self.spec.id, old, new, pos, self.txn_time)
                        .map_err(|e| self.mapping_error(rel, e))?;
                    if let Some(e) = undecodable {
                        // Reported as one change: the half with the new row, if split.
                        return self.reject(second.unwrap_or(first), e.to_string());
                    }
                    match outcome {
                        None => {}
                        Some(Err(e)) => return self.reject(first, e.to_string()),
                        // The new row fails the filter: it leaves the target, or the
                        // target ignores the update (see [`crate::mode`]).
                        Some(Ok(o)) if !o.pass => {
                            m.counters.filtered.fetch_add(1, Ordering::Relaxed);
                            if leaves_filter == Effect::Ignore {
                                return Ok(());
                            }
                            first = first.into_delete();
                            second = None;
                        }
                        Some(Ok(o)) => {
                            if first.op != Op::Delete {
                                first.values = m.map.with_computed(&first.values, &o.computed);
                            }
                            if let Some(c) = second.as_mut() {
                                c.values = m.map.with_computed(&c.values, &o.computed);
                            }
                        }
                    }
                    m.counters.routed(Op::Update);
                    let first = self.stamped(first, history);
                    if let (Some(c), Some(_)) = (second.as_mut(), history) {
                        // The new key of a history row continues its history from T: an
                        // update of a key without versions, not an INSERT (whose first
                        // version is valid from 1900), opening where the old key closed.
                        c.op = Op::Update;
                        c.commit_time = first.commit_time;
                    }
                    if first.op == Op::Update && second.is_none() && first.old_key.is_some() {
                        // A row moved to a new key that cannot be rebuilt from the change
                        // (unchanged TOAST), or a history key change between keys the
                        // destination may take for one: updated in place, so it must not
                        // overtake or be overtaken by the changes of either key on another
                        // writer.
                        self.flush_all()?;
                        self.apply_alone(first)?;
                        return Ok(());
                    }
                    self.route(first)?;
                    if let Some(mut c) = second {
                        // The insert half of a key move has a position of its own.
                        c.pos = half;
                        let c = self.continued(c, history);
                        self.route(c)?;
                    }
                }
            }
            PgOutput::Delete { rel, old } => {
                let pos = self.pos();
                self.last_delete = None;
                if let Some(m) = self.mapped(rel)? {
                    // A target that keeps what the source deletes keeps even the old
                    // key of a row that moved partitions: PostgreSQL sends that UPDATE as
                    // a DELETE and an INSERT, which cannot be told from a row deleted and
                    // another inserted, and keeping a row loses nothing.
                    if m.mode.rules().delete == Effect::Ignore {
                        return Ok(());
                    }
                    // Only a history DELETE that may be half of a move is remembered.
                    let target = (m.history.is_some() && m.siblings > 1)
                        .then(|| target_id(&m.map.table.schema, &m.map.table.name));
                    let history = m.history;
                    let undecodable = m.map.undecodable(&[Some(&old.tuple)]);
                    let c = m
                        .map
                        .delete(self.spec.id, old, pos, self.txn_time)
                        .map_err(|e| self.mapping_error(rel, e))?;
                    if let Some(e) = undecodable {
                        return self.reject(c, e.to_string());
                    }
                    m.counters.routed(Op::Delete);
                    let c = self.stamped(c, history);
                    let stamp = c.commit_time;
                    self.route(c)?;
                    self.last_delete = target.map(|target| LastDelete { target, rel, stamp });
                }
            }
            PgOutput::Truncate { rels, .. } => {
                self.last_delete = None;
                // Targets fed by several source tables (partitions) are emptied only when
                // this TRUNCATE covers all of them: their rows cannot be told apart.
                let mut covered: HashMap<(String, String), usize> = HashMap::new();
                for rel in &rels {
                    if let Some(m) = self.mapped(*rel)? {
                        let t = &m.map.table;
                        *covered
                            .entry((t.schema.clone(), t.name.clone()))
                            .or_default() += 1;
                    }
                }
                let mut done: Vec<(String, String)> = Vec::new();
                for rel in rels {
                    let pos = self.pos();
                    let Some(m) = self.mapped(rel)? else { continue };
                    if m.mode.rules().truncate == Effect::Ignore {
                        debug!("{}: TRUNCATE ignored ({} mode)", m.source_name, m.mode);
                        continue;
                    }
                    let target = (m.map.table.schema.clone(), m.map.table.name.clone());
                    let why = if m.shared {
                        Some("has no sid column and receives rows from other URLs too")
                    } else if covered.get(&target).copied().unwrap_or(0) < m.siblings {
                        Some("also receives the rows of other source tables not truncated with it")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        warn!(
                            "source {}: TRUNCATE {} at {} not applied: its target {}.{} {why}, \
                             so it cannot be confined to this table's rows",
                            self.label(),
                            m.source_name,
                            self.txn_lsn,
                            target.0,
                            target.1
                        );
                        continue;
                    }
                    if done.contains(&target) {
                        continue;
                    }
                    let history = m.history;
                    m.counters.routed(Op::Truncate);
                    let mut c = m.map.truncate(self.spec.id, pos, self.txn_time);
                    info!(
                        "source {}: TRUNCATE {} at {}",
                        self.label(),
                        m.source_name,
                        self.txn_lsn
                    );
                    if let Some(table) = history {
                        c.commit_time = self.stamps.truncate(self.txn_time, table);
                    }
                    done.push(target);
                    // Touches every key: everything routed before must be committed first.
                    self.flush_all()?;
                    self.apply_alone(c)?;
                }
            }
            PgOutput::StreamStart { xid, first_segment } => self
                .spools
                .start(xid, first_segment)
                .map_err(|e| self.spool_err(xid, e))?,
            PgOutput::StreamAbort { xid, sub_xid } => self.spools.abort(xid, sub_xid),
            PgOutput::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                if self.past_restart(commit_lsn) {
                    return Ok(());
                }
                self.replay(xid, commit_lsn, end_lsn, commit_time)?
            }
            PgOutput::Origin { .. }
            | PgOutput::Type { .. }
            | PgOutput::Message { .. }
            | PgOutput::StreamStop => {}
        }
        Ok(())
    }

    fn spool_err(&self, xid: u32, error: SpoolError) -> SourceError {
        SourceError::Spool {
            source: self.label(),
            xid,
            error,
        }
    }

    /// A Stream Commit: the transaction's kept messages, in order, as one ordinary
    /// transaction at its commit position (like Begin … Commit).
    fn replay(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    ) -> Result<(), SourceError> {
        let replay = self
            .spools
            .commit(xid)
            .map_err(|e| self.spool_err(xid, e))?;
        if let Some(mut replay) = replay {
            debug!(
                "source {}: streamed transaction {xid} committed at {commit_lsn}: {} message(s)",
                self.label(),
                replay.messages()
            );
            self.begin_txn(commit_lsn, commit_time);
            let mut decoder = Decoder::new();
            let mut buf = Vec::new();
            let mut n = 0u32;
            while replay
                .next_into(&mut buf)
                .map_err(|e| self.spool_err(xid, e))?
            {
                let msg = decoder.decode(&buf).map_err(|error| SourceError::Decode {
                    source: self.label(),
                    lsn: commit_lsn,
                    error,
                })?;
                self.handle(msg)?;
                n += 1;
                // The walsender waits meanwhile; it must still hear from us.
                if n.is_multiple_of(CHECK_EVERY) {
                    self.send_status(false)?;
                }
            }
        }
        self.end_txn(end_lsn);
        Ok(())
    }

    /// A transaction's changes start: they take positions at its commit LSN.
    fn begin_txn(&mut self, commit_lsn: Lsn, commit_time: i64) {
        self.in_txn = true;
        self.txn_lsn = commit_lsn;
        self.txn_time = commit_time;
        self.seq = 0;
        self.stamps.begin(commit_time);
        self.last_delete = None;
    }

    /// A history target's change takes its version stamp (see [`Stamps`]).
    fn stamped(&mut self, mut c: Change, history: Option<u64>) -> Change {
        if let Some(table) = history {
            let old = c.stamp_key(false);
            c.commit_time = if c.op == Op::Update && c.old_key.is_some() {
                let new = c.stamp_key(true);
                self.stamps.moved(self.txn_time, table, old, new)
            } else {
                self.stamps.change(self.txn_time, table, old)
            };
        }
        c
    }

    /// The stamp of the new half of a key change whose old half was stamped
    /// `c.commit_time`: where the old version closed, or after the new key's own changes.
    fn continued(&mut self, mut c: Change, history: Option<u64>) -> Change {
        if let Some(table) = history {
            let key = c.stamp_key(false);
            c.commit_time = self
                .stamps
                .continued(self.txn_time, table, key, c.commit_time);
        }
        c
    }

    /// A transaction's changes are all routed: everything before `end_lsn` is.
    fn end_txn(&mut self, end_lsn: Lsn) {
        self.in_txn = false;
        self.env
            .latency
            .routed
            .observe(crate::status::since_commit(self.txn_time));
        self.routed = self.routed.max(end_lsn);
        self.env
            .status
            .committed(end_lsn, crate::status::pg_time_ms(self.txn_time));
    }

    fn pos(&mut self) -> Position {
        let p = Position {
            commit_lsn: self.txn_lsn,
            seq: self.seq,
        };
        self.seq += 1;
        p
    }

    /// Hands a change that cannot be written (its expression failed, its bytes are not
    /// UTF-8) to its key's writer as a rejected row.
    fn reject(&mut self, c: Change, why: String) -> Result<(), SourceError> {
        if self.replayed(&c, false) {
            return Ok(());
        }
        match self.env.router.try_reject(c, why) {
            Routed::Queued => Ok(()),
            Routed::Full(pending) => self.blocking(move |r, idle| r.finish_route(pending, idle)),
            Routed::Closed => Err(self.closed()(PoolClosed)),
        }
    }

    /// Whether `c`, which goes to its key's writer (or with `alone` to the first), was
    /// applied before this stream started: a replay after a crash, skipped so that each
    /// change is applied exactly once.
    fn replayed(&mut self, c: &Change, alone: bool) -> bool {
        if !self.applied.pending(c.pos) {
            if self.skipped > 0 {
                info!(
                    "source {}: {} change(s) received again were applied already: skipped",
                    self.label(),
                    self.skipped
                );
                self.skipped = 0;
            }
            return false;
        }
        let key = key_fingerprint(c);
        let applied = self.applied.covers(c.pos, |writers| {
            if alone {
                0
            } else {
                writer_for(c, key, writers)
            }
        });
        self.skipped += u64::from(applied);
        applied
    }

    /// Queues a change for its writer. A full queue (a slow destination) blocks the
    /// stream, as it should, while the walsender keeps hearing from us.
    fn route(&mut self, c: Change) -> Result<(), SourceError> {
        if self.held || self.replayed(&c, false) {
            return Ok(());
        }
        self.env.status.changes.fetch_add(1, Ordering::Relaxed);
        match self.env.router.try_route(c) {
            Routed::Queued => Ok(()),
            Routed::Full(pending) => self.blocking(move |r, idle| r.finish_route(pending, idle)),
            Routed::Closed => Err(self.closed()(PoolClosed)),
        }
    }

    /// Runs a router call that may block (full queue, barrier), sending standby status
    /// every [`IDLE_EVERY`](crate::apply::route::IDLE_EVERY) meanwhile: without it a barrier longer than `wal_sender_timeout` (a TRUNCATE
    /// behind a slow destination) makes the server drop the stream and replay it.
    fn blocking<T>(
        &mut self,
        f: impl FnOnce(
            &Router,
            &mut dyn FnMut() -> Result<(), SourceError>,
        ) -> Result<T, Wait<SourceError>>,
    ) -> Result<T, SourceError> {
        let router = self.env.router.clone();
        let (status, limit) = (self.env.status.clone(), self.env.wal_receiver_timeout);
        // Called every IDLE_EVERY while blocked: one status message each time, well
        // within any sensible wal_sender_timeout. The stream waits for the writers, not
        // for its server: that is no silence of the server's.
        let result = f(&router, &mut || {
            status.heard_from_server(limit);
            self.send_status(true)
        });
        result.map_err(|w| match w {
            Wait::Closed => self.closed()(PoolClosed),
            Wait::Idle(e) => e,
        })
    }

    fn flush_all(&mut self) -> Result<(), SourceError> {
        self.blocking(|r, idle| r.flush_all(idle))
    }

    fn apply_alone(&mut self, c: Change) -> Result<(), SourceError> {
        // A change the writers refused holds this source (`on_error = stop`; the
        // barrier before this change waited for its commit): nothing more is routed
        // until the source starts again and its replay retries that change, or this
        // one would land before it. The supervisor stops the stream shortly.
        if self.held || self.env.progress.is_held(self.spec.id) {
            self.held = true;
            return Ok(());
        }
        if self.replayed(&c, true) {
            return Ok(());
        }
        self.blocking(move |r, idle| r.apply_alone(c, idle))
    }

    fn mapping_error(&self, rel: u32, error: super::mapping::MappingError) -> SourceError {
        let table = match self.relations.get(&rel) {
            Some(Some(m)) => m.source_name.clone(),
            _ => format!("relation {rel}"),
        };
        SourceError::Mapping {
            source: self.label(),
            table,
            error,
        }
    }

    /// The mapping of a changed relation; `None` when its changes are skipped (not
    /// mapped, or already in the table's copy).
    fn mapped(&self, rel: u32) -> Result<Option<&Mapped>, SourceError> {
        match self.relations.get(&rel) {
            Some(m) => Ok(m.as_ref().filter(|m| self.txn_lsn >= m.copied_at)),
            None => Err(SourceError::Replication {
                source: self.label(),
                context: "stream".into(),
                error: Box::new(crate::pg::replication::PgError::Protocol(format!(
                    "change for relation {rel} before its Relation message"
                ))),
            }),
        }
    }

    /// A partition attached or detached, or a table created that a `partitions_regex`
    /// matches: set up again, which publishes and copies it (the stream pauses meanwhile).
    fn recheck_tables(&mut self) -> Result<(), SourceError> {
        if self.dynamic.is_empty() {
            return Ok(());
        }
        if self.src.is_none() {
            self.src = Some(connect_source(self.spec, self.env)?);
        }
        let Some(src) = self.src.as_mut() else {
            return Ok(());
        };
        if tables_changed(self.spec, src, &self.dynamic)? {
            info!(
                "source {}: the partitions or tables a map entry stands for changed: setting up again",
                self.label()
            );
            self.restart_now = true;
        }
        Ok(())
    }

    /// A table that gained a replica identity (a primary key added) is still published
    /// for INSERT and TRUNCATE only, and one that lost it would make the source refuse
    /// its UPDATEs: set up again, which moves it to the right publication and copies it.
    fn recheck_identities(&mut self) -> Result<(), SourceError> {
        if self.src.is_none() {
            self.src = Some(connect_source(self.spec, self.env)?);
        }
        let Some(src) = self.src.as_mut() else {
            return Ok(());
        };
        // Reported for operators to alert on before the source invalidates the slot.
        if let Ok(Some((retained, safe))) = catalog::slot_wal(src, &self.spec.slot) {
            self.env.status.slot_wal(retained, safe);
        }
        let names: Vec<TableName> = self.routes.keys().cloned().collect();
        let now = catalog::identities(src, &names).map_err(|error| SourceError::Sql {
            source: self.spec.label(),
            context: "look up replica identities".to_string(),
            side: crate::fault::Side::Source,
            error,
        })?;
        for ((schema, table), has_identity) in now {
            let Some(route) = self.routes.get(&(schema.clone(), table.clone())) else {
                continue;
            };
            if has_identity == route.insert_only {
                info!(
                    "source {}: {schema}.{table} {} a replica identity: setting up again",
                    self.label(),
                    if has_identity { "gained" } else { "lost" }
                );
                self.restart_now = true;
                return Ok(());
            }
        }
        Ok(())
    }

    /// `kuvasz-streamer resync` asked for a table of this slot to be copied again (its
    /// sync state says so): set up again, which copies it.
    fn recheck_resync(&mut self) -> Result<(), SourceError> {
        let sql = crate::store::resync_requests_sql(&self.env.dest_schema);
        let slot = &self.spec.slot;
        let rows = on_dest(self.spec, self.env, "read resync requests", |dest| {
            dest.query(&sql, &[slot])
        })?;
        if let Some(row) = rows.first() {
            let table: String = row.get(0);
            info!(
                "source {}: {table} is to be copied again (kuvasz-streamer resync): setting up again",
                self.label()
            );
            self.restart_now = true;
        }
        Ok(())
    }

    /// Rebuilds the mappings of relations whose target has gained one of their columns.
    fn recheck_targets(&mut self) -> Result<(), SourceError> {
        let waiting: Vec<Relation> = self
            .relations
            .values()
            .filter_map(|m| m.as_ref().and_then(|m| m.incomplete.clone()))
            .collect();
        for rel in waiting {
            let schema = self.env.dest_schema.clone();
            let Some(Some(m)) = self.relations.get(&rel.id) else {
                continue;
            };
            let target = m.map.table.name.clone();
            let mapped = m.map.table.columns.len();
            let columns = on_dest(
                self.spec,
                self.env,
                &format!("look up target {schema}.{target}"),
                |dest| catalog::table_info(dest, &schema, &target),
            )?
            .map(|t| t.columns)
            .unwrap_or_default();
            let has_sid = m.map.table.sid.is_some();
            let now = rel
                .columns
                .iter()
                .filter(|c| !(has_sid && c.name == "sid"))
                .filter(|c| columns.iter().any(|t| t.name == c.name))
                .count();
            if now > mapped {
                info!(
                    "source {}: target {schema}.{target} now has more of {}.{}'s columns: using them",
                    self.label(),
                    rel.namespace,
                    rel.name
                );
                self.relation(rel)?;
            }
        }
        Ok(())
    }

    /// A Relation message: (re)builds its mapping from the target's current columns, so
    /// a schema change on either side is picked up.
    fn relation(&mut self, rel: Relation) -> Result<(), SourceError> {
        let source_name = format!("{}.{}", rel.namespace, rel.name);
        // A changed relation may route its keys differently (a new replica identity): what
        // was routed the old way is committed first.
        if matches!(self.relations.get(&rel.id), Some(Some(_))) {
            self.flush_all()?;
        }
        let name = (rel.namespace.clone(), rel.name.clone());
        let Some(route) = self.routes.get(&name).cloned() else {
            match self.excluded.get(&name) {
                Some(reason) => warn!(
                    "source {}: {source_name} is not replicated ({reason}); its changes are skipped",
                    self.label()
                ),
                None => warn!(
                    "source {}: {source_name} is published but not mapped; its changes are skipped",
                    self.label()
                ),
            }
            self.relations.insert(rel.id, None);
            return Ok(());
        };
        let t = &route.map;
        let schema = self.env.dest_schema.clone();
        let target = on_dest(
            self.spec,
            self.env,
            &format!("look up target {schema}.{}", t.target),
            |dest| catalog::table_info(dest, &schema, &t.target),
        )?
        .ok_or_else(|| SourceError::Prerequisite {
            source: self.label(),
            message: format!(
                "target table {schema}.{} does not exist on the destination",
                t.target
            ),
        })?;
        // A table without a replica identity sends only inserts: every row is distinct,
        // as with REPLICA IDENTITY FULL.
        let whole_row = rel.replica_identity == b'f' || route.insert_only;
        let source_cols: Vec<Column> = rel
            .columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                type_name: String::new(),
                is_key: c.is_key || route.insert_only,
                // The source's side of a key is never compared by text.
                text_equality: true,
                composite: false,
                toastable: false,
            })
            .collect();
        let unique = on_dest(
            self.spec,
            self.env,
            &format!("look up unique indexes of {schema}.{}", t.target),
            |dest| catalog::unique_indexes(dest, &schema, &t.target),
        )?;
        let map = map_relation(
            &source_cols,
            &schema,
            &t.target,
            &target.columns,
            &unique,
            whole_row,
            t.mode,
            &t.set.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            &self.spec.sid,
        )
        .map_err(|error| SourceError::Mapping {
            source: self.label(),
            table: source_name.clone(),
            error,
        })?;
        debug!(
            "source {}: relation {source_name} → {schema}.{}",
            self.label(),
            t.target
        );
        let missing: Vec<&str> = rel
            .columns
            .iter()
            .filter(|c| !(c.name == "sid" && map.table.sid.is_some()))
            .filter(|c| !map.table.columns.iter().any(|t| t.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            info!(
                "source {}: {source_name} columns {} are not on the target {schema}.{}: ignored \
                 until it has them",
                self.label(),
                missing.join(", "),
                t.target
            );
        }
        let incomplete = (!missing.is_empty()).then(|| rel.clone());
        // Compiled at load already (a bad expression stops the program there).
        let exprs = TableExprs::compile(t)
            .map_err(|message| SourceError::Prerequisite {
                source: self.label(),
                message,
            })?
            .map(|e| Arc::new(RowExprs::new(e, &rel.columns)));
        let counters = self.env.status.table(&source_name);
        self.relations.insert(
            rel.id,
            Some(Mapped {
                map,
                mode: t.mode,
                history: t.mode.versions().then(|| target_id(&schema, &t.target)),
                exprs,
                source_name,
                copied_at: route.copied_at,
                shared: route.shared,
                siblings: route.siblings,
                incomplete,
                counters,
            }),
        );
        Ok(())
    }
}
