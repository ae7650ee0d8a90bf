//! The daemon's bookkeeping on the destination: the `kvsz_*` tables in `database.schema`,
//! their DDL and migrations, and the progress each writer commits with its data.
//!
//! **Progress** (`kvsz_progress`, one row per slot and writer): every destination
//! transaction that applies changes of a source also records, in that transaction, the
//! position of the first change of that source it has not applied (`next`: commit LSN
//! and index in the transaction). Routing is a pure function of the change and the
//! number of writers ([`crate::apply::route::writer_for`]), so after any crash the source
//! can tell, for each change it receives again, whether the writer it went to committed
//! it, and skip it: each change is applied exactly once, in every mode and shape (SPEC
//! §4). A table of our own rather than replication origins: it needs no grant beyond
//! CREATE on the schema, and it holds one position per writer, where an origin holds one
//! per session.

use postgres::Client;

use crate::change::Position;
use crate::pg::quote::{literal, qualified};
use crate::pg::Lsn;

pub const SYNC_STATE_TABLE: &str = "kvsz_sync_state";
pub const DEADLETTER_TABLE: &str = "kvsz_deadletter";
pub const PROGRESS_TABLE: &str = "kvsz_progress";
/// The instances of a deployment, one row each, heart-beaten by its coordination
/// session (see [`crate::ownership`]).
pub const INSTANCES_TABLE: &str = "kvsz_instances";
/// Each source's owner and owner epoch (`slot_name`, `epoch`, `instance`, `taken`): the
/// epoch grows each time an instance takes the source, and every destination
/// transaction that applies its changes checks, in that transaction, that the epoch is
/// still the one its instance took (see [`fence_sql`]).
pub const OWNERS_TABLE: &str = "kvsz_owners";
/// A function that raises its message as an error of SQLSTATE [`FENCED_SQLSTATE`].
pub const FENCE_FUNCTION: &str = "kvsz_fenced";
/// The SQLSTATE of a transaction fenced off: its instance no longer owns a source it
/// applies (a class of our own, so it is never taken for a row's or a table's fault).
pub const FENCED_SQLSTATE: &str = "KZ001";
/// A function that raises its message as an error (SQLSTATE P0002, no data found): a
/// statement that finds it cannot apply a change as the source made it (a partial
/// UPDATE of a row the target does not have) refuses it through this, inside the
/// destination's own transaction, so the change is isolated and handled like any row the
/// destination rejects (SPEC §4) instead of being skipped.
pub const REFUSE_FUNCTION: &str = "kvsz_refuse";

/// Creates (or brings up to date) the bookkeeping tables; the dead letters only when
/// they are used.
pub fn create_sql(schema: &str, deadletter: bool) -> String {
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {0} (slot_name text NOT NULL, source_table text NOT NULL, \
         target_table text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
         lsn pg_lsn, PRIMARY KEY (slot_name, source_table)); \
         ALTER TABLE {0} ADD COLUMN IF NOT EXISTS lsn pg_lsn; \
         CREATE TABLE IF NOT EXISTS {1} (slot_name text NOT NULL, writer int NOT NULL, \
         writers int NOT NULL, commit_lsn pg_lsn NOT NULL, seq bigint NOT NULL, \
         updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (slot_name, writers, writer))",
        qualified(schema, SYNC_STATE_TABLE),
        qualified(schema, PROGRESS_TABLE)
    );
    // Tables of the release before keyed positions by writer alone, so a pool of
    // another size overwrote them: keyed by pool size too from now on.
    let progress = qualified(schema, PROGRESS_TABLE);
    sql.push_str(&format!(
        "; DO $kvsz$BEGIN IF (SELECT array_length(conkey, 1) FROM pg_constraint \
         WHERE conrelid = {lit}::regclass AND contype = 'p') = 2 THEN \
         ALTER TABLE {progress} DROP CONSTRAINT {pkey}, ADD PRIMARY KEY (slot_name, writers, writer); \
         END IF; END$kvsz$",
        lit = literal(&progress),
        pkey = crate::pg::quote::ident(&format!("{PROGRESS_TABLE}_pkey")),
    ));
    sql.push_str(&raise_function_sql(schema, REFUSE_FUNCTION, "P0002"));
    sql.push_str(&format!(
        "; CREATE TABLE IF NOT EXISTS {0} (instance text PRIMARY KEY, host text NOT NULL, \
         pid int NOT NULL, started timestamptz NOT NULL, heartbeat timestamptz NOT NULL, \
         sources int NOT NULL DEFAULT 0, backend int, deployment text)",
        qualified(schema, INSTANCES_TABLE)
    ));
    sql.push_str(&format!(
        "; CREATE TABLE IF NOT EXISTS {0} (slot_name text PRIMARY KEY, epoch bigint NOT NULL, \
         instance text NOT NULL, taken timestamptz NOT NULL)",
        qualified(schema, OWNERS_TABLE)
    ));
    sql.push_str(&raise_function_sql(schema, FENCE_FUNCTION, FENCED_SQLSTATE));
    if deadletter {
        sql.push_str(&format!(
            "; CREATE TABLE IF NOT EXISTS {} (sid text, source text, source_table text, lsn pg_lsn, \
             op text, row jsonb, error text, at timestamptz NOT NULL DEFAULT now())",
            qualified(schema, DEADLETTER_TABLE)
        ));
    }
    sql
}

/// `; ` and the statement that creates function `name(message text)`, which raises its
/// message with SQLSTATE `code`. Created only when missing: CREATE OR REPLACE by
/// instances starting together would fail with "tuple concurrently updated".
fn raise_function_sql(schema: &str, name: &str, code: &str) -> String {
    let f = qualified(schema, name);
    format!(
        "; DO $kvsz$BEGIN IF to_regprocedure({}) IS NULL THEN CREATE FUNCTION {f}(message text) \
         RETURNS void LANGUAGE plpgsql AS $f$BEGIN RAISE EXCEPTION USING ERRCODE = {}, \
         MESSAGE = message; END$f$; END IF; END$kvsz$",
        literal(&format!("{f}(text)")),
        literal(code)
    )
}

/// Where one source table of a slot stands in `kvsz_sync_state.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// To be copied (a new slot, a table added, a changed target, filter or set).
    Pending,
    /// Copied at the row's `lsn`: streamed from there.
    Done,
    /// `kuvasz-streamer resync` asked for it to be copied again: not done, so the next
    /// set-up of its source copies it (a running source notices it and sets up again).
    Resync,
    /// The [`INS_MARKER`] row: the `_ins` publication may be streamed from its `lsn`.
    Publication,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Done => "done",
            Phase::Resync => "resync",
            Phase::Publication => "publication",
        }
    }

    /// A state another version wrote that this one does not know is taken as not done:
    /// the table is copied again, which loses nothing.
    pub fn parse(text: &str) -> Option<Phase> {
        [
            Phase::Pending,
            Phase::Done,
            Phase::Resync,
            Phase::Publication,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// `kvsz_sync_state.source_table` of the row recording where the `_ins` publication
/// became safe to stream (`lsn`): no source table is named without a schema.
pub const INS_MARKER: &str = "";

/// One `kvsz_sync_state` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncState {
    /// The target as recorded (with a digest of the entry's filter and set).
    pub target: String,
    /// None: a state this version does not know.
    pub phase: Option<Phase>,
    pub lsn: Option<Lsn>,
}

/// The sync state of slot `slot`, by source table.
pub fn load_sync_states(
    client: &mut Client,
    schema: &str,
    slot: &str,
) -> Result<std::collections::HashMap<String, SyncState>, postgres::Error> {
    let rows = client.query(
        format!(
            "SELECT source_table, target_table, state, lsn::text FROM {} WHERE slot_name = $1",
            qualified(schema, SYNC_STATE_TABLE)
        )
        .as_str(),
        &[&slot],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let state: String = r.get(2);
            let lsn: Option<String> = r.get(3);
            (
                r.get(0),
                SyncState {
                    target: r.get(1),
                    phase: Phase::parse(&state),
                    lsn: lsn.and_then(|l| l.parse().ok()),
                },
            )
        })
        .collect())
}

/// Records `phase` (and `lsn`) for one source table of `slot`.
pub fn sync_state_sql(
    schema: &str,
    slot: &str,
    table: &str,
    target: &str,
    phase: Phase,
    lsn: Option<Lsn>,
) -> String {
    let lsn = lsn.map_or("NULL".to_string(), |l| format!("'{l}'"));
    format!(
        "INSERT INTO {} (slot_name, source_table, target_table, state, lsn, updated_at) \
         VALUES ({}, {}, {}, {}, {lsn}, now()) ON CONFLICT (slot_name, source_table) \
         DO UPDATE SET target_table = EXCLUDED.target_table, state = EXCLUDED.state, \
         lsn = EXCLUDED.lsn, updated_at = now()",
        qualified(schema, SYNC_STATE_TABLE),
        literal(slot),
        literal(table),
        literal(target),
        literal(phase.as_str())
    )
}

/// Deletes slot `slot`'s sync state and writers' positions (a new slot starts over).
pub fn clear_slot_sql(schema: &str, slot: &str) -> String {
    [SYNC_STATE_TABLE, PROGRESS_TABLE]
        .iter()
        .map(|t| {
            format!(
                "DELETE FROM {} WHERE slot_name = {}",
                qualified(schema, t),
                literal(slot)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Forgets the sync state of `slot`'s source tables other than `keep`.
pub fn forget_tables_sql(schema: &str, slot: &str, tables: &[&str]) -> String {
    format!(
        "DELETE FROM {} WHERE slot_name = {} AND source_table IN ({})",
        qualified(schema, SYNC_STATE_TABLE),
        literal(slot),
        tables
            .iter()
            .map(|t| literal(t))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Marks slot `$2`'s tables of target `$3` for copying again (`kuvasz-streamer resync`):
/// parameters `(phase, slot, target)`.
pub fn request_resync_sql(schema: &str) -> String {
    format!(
        "UPDATE {} SET state = $1, updated_at = now() \
          WHERE slot_name = $2 AND (target_table = $3 OR starts_with(target_table, $3 || ' ['))",
        qualified(schema, SYNC_STATE_TABLE)
    )
}

/// The source tables of slot `$1` that a resync asked to copy again.
pub fn resync_requests_sql(schema: &str) -> String {
    format!(
        "SELECT source_table FROM {} WHERE slot_name = $1 AND state = {}",
        qualified(schema, SYNC_STATE_TABLE),
        literal(Phase::Resync.as_str())
    )
}

/// A change the destination refused, or a copied row whose expression failed, as
/// `kvsz_deadletter` keeps it.
pub struct DeadLetter<'a> {
    pub sid: &'a str,
    /// The source's database name.
    pub source: &'a str,
    /// `schema.table`: the source table of a copied row, the target of a change.
    pub table: &'a str,
    pub lsn: Lsn,
    /// INSERT, UPDATE, DELETE, TRUNCATE or COPY.
    pub op: &'a str,
    /// The row as a jsonb expression.
    pub row_json: &'a str,
    pub error: &'a str,
}

/// The statement that keeps `d`.
pub fn deadletter_sql(schema: &str, d: &DeadLetter) -> String {
    format!(
        "INSERT INTO {} (sid, source, source_table, lsn, op, row, error, at) \
         VALUES ({}, {}, {}, {}::pg_lsn, {}, {}, {}, now())",
        qualified(schema, DEADLETTER_TABLE),
        literal(d.sid),
        literal(d.source),
        literal(d.table),
        literal(&d.lsn.to_string()),
        literal(d.op),
        d.row_json,
        literal(d.error)
    )
}

/// The call that refuses a change with `message` (see [`REFUSE_FUNCTION`]).
pub fn refuse_call(schema: &str, message: &str) -> String {
    format!(
        "{}({})",
        qualified(schema, REFUSE_FUNCTION),
        literal(message)
    )
}

/// Forgets slot `$1`: its copies and its writers' positions (a URL removed from the
/// map, its slot dropped). One statement, so it runs with the slot name as a parameter.
pub fn forget_slot_sql(schema: &str) -> String {
    format!(
        "WITH progress AS (DELETE FROM {} WHERE slot_name = $1) DELETE FROM {} WHERE slot_name = $1",
        qualified(schema, PROGRESS_TABLE),
        qualified(schema, SYNC_STATE_TABLE)
    )
}

/// What one writer of a pool of `writers` has applied of one slot: every change routed
/// to it before `next`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterProgress<'a> {
    pub slot: &'a str,
    pub writer: usize,
    pub writers: usize,
    pub next: Position,
    /// The owner epoch the source was started with (see [`OWNERS_TABLE`]): checked in
    /// the same transaction. None: not checked.
    pub epoch: Option<i64>,
}

/// The statements that record `rows` (one per slot) in the writer's transaction, after
/// the check that this instance still owns their sources ([`fence_sql`]).
pub fn progress_sql(schema: &str, rows: &[WriterProgress]) -> String {
    let owned: Vec<(&str, i64)> = rows
        .iter()
        .filter_map(|r| Some((r.slot, r.epoch?)))
        .collect();
    let mut sql = fence_sql(schema, &owned)
        .map(|f| f + "; ")
        .unwrap_or_default();
    sql.push_str(&format!(
        "INSERT INTO {} AS p (slot_name, writer, writers, commit_lsn, seq) VALUES ",
        qualified(schema, PROGRESS_TABLE)
    ));
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "({}, {}, {}, '{}', {})",
            literal(r.slot),
            r.writer,
            r.writers,
            r.next.commit_lsn,
            r.next.seq
        ));
    }
    sql.push_str(
        " ON CONFLICT (slot_name, writers, writer) DO UPDATE SET \
         commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, updated_at = now()",
    );
    sql
}

/// What a slot's writers had applied when its source started: the changes a replay
/// must skip. Positions are kept per pool size, since routing depends on it: after a
/// crash, a change of `num_workers` and another crash, a change was applied if the
/// writer of any recorded pool size that it was routed to had passed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// (pool size, `next` by writer index).
    pools: Vec<(usize, Vec<Option<Position>>)>,
    /// The highest `next`: nothing from here on was applied.
    until: Position,
}

impl Applied {
    /// From the slot's rows `(writer, writers, next)`.
    pub fn from_rows(rows: &[(usize, usize, Position)]) -> Applied {
        let mut pools: Vec<(usize, Vec<Option<Position>>)> = Vec::new();
        for &(w, n, pos) in rows {
            if w >= n {
                continue;
            }
            let at = match pools.iter().position(|(size, _)| *size == n) {
                Some(i) => i,
                None => {
                    pools.push((n, vec![None; n]));
                    pools.len() - 1
                }
            };
            pools[at].1[w] = Some(pos);
        }
        pools.sort_by_key(|(n, _)| *n);
        let until = pools
            .iter()
            .flat_map(|(_, next)| next.iter().flatten())
            .max()
            .copied()
            .unwrap_or_default();
        Applied { pools, until }
    }

    /// Reads the slot's rows.
    pub fn load(client: &mut Client, schema: &str, slot: &str) -> Result<Applied, postgres::Error> {
        let rows = client.query(
            format!(
                "SELECT writer, writers, commit_lsn::text, seq FROM {} WHERE slot_name = $1",
                qualified(schema, PROGRESS_TABLE)
            )
            .as_str(),
            &[&slot],
        )?;
        let rows: Vec<(usize, usize, Position)> = rows
            .iter()
            .filter_map(|r| {
                let lsn: String = r.get(2);
                Some((
                    usize::try_from(r.get::<_, i32>(0)).ok()?,
                    usize::try_from(r.get::<_, i32>(1)).ok()?,
                    Position {
                        commit_lsn: lsn.parse::<Lsn>().ok()?,
                        seq: u32::try_from(r.get::<_, i64>(3)).ok()?,
                    },
                ))
            })
            .collect();
        Ok(Applied::from_rows(&rows))
    }

    /// Whether anything is left to skip at `pos` or after it.
    pub fn pending(&self, pos: Position) -> bool {
        pos < self.until
    }

    /// Whether the change at `pos` was applied, given the writer each recorded pool
    /// size routed it to (`writer_for(pool size)`).
    pub fn covers(&self, pos: Position, writer_for: impl Fn(usize) -> usize) -> bool {
        self.pools.iter().any(|(size, next)| {
            next.get(writer_for(*size))
                .copied()
                .flatten()
                .is_some_and(|next| pos < next)
        })
    }
}

/// Deletes slot `$1`'s positions that lie before `$2` (the slot's confirmed position,
/// where its stream starts): the server never sends those changes again. This is how
/// the rows of a pool size no longer in use go.
pub fn prune_progress_sql(schema: &str) -> String {
    format!(
        "DELETE FROM {} WHERE slot_name = $1 AND commit_lsn < $2::text::pg_lsn",
        qualified(schema, PROGRESS_TABLE)
    )
}

/// An instance's heartbeat: its row, made or refreshed (`$1` instance, `$2` host, `$3`
/// pid, `$4` sources it streams, `$5` its deployment's fingerprint, and the coordination
/// session's backend pid); rows silent for an hour are removed.
pub fn heartbeat_sql(schema: &str) -> String {
    let t = qualified(schema, INSTANCES_TABLE);
    format!(
        "WITH gone AS (DELETE FROM {t} WHERE heartbeat < now() - interval '1 hour') \
         INSERT INTO {t} (instance, host, pid, started, heartbeat, sources, backend, deployment) \
         VALUES ($1, $2, $3, now(), now(), $4, pg_backend_pid(), $5) \
         ON CONFLICT (instance) DO UPDATE SET heartbeat = now(), sources = $4, \
         backend = pg_backend_pid(), deployment = $5"
    )
}

/// Instance `$1` now streams `$2` sources (taken or given up since its heartbeat).
pub fn instance_sources_sql(schema: &str) -> String {
    format!(
        "UPDATE {} SET sources = $2 WHERE instance = $1",
        qualified(schema, INSTANCES_TABLE)
    )
}

/// How many instances of deployment `$2` have beaten within `$1` seconds and still have
/// their coordination session (this one included): one killed is not waited for.
pub fn live_instances_sql(schema: &str) -> String {
    format!(
        "SELECT count(*) FROM {} i WHERE heartbeat > now() - make_interval(secs => $1) \
         AND deployment = $2 AND EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = i.backend)",
        qualified(schema, INSTANCES_TABLE)
    )
}

/// Ends instance `$1`'s previous coordination session, when the server still has it (a
/// partition left it behind, holding the sources' locks until the server's keepalives
/// notice): only a backend of this role and application, so a pid the server reused is
/// never touched.
pub fn end_previous_session_sql(schema: &str) -> String {
    format!(
        "SELECT pg_terminate_backend(i.backend) FROM {} i \
         JOIN pg_stat_activity a ON a.pid = i.backend \
         WHERE i.instance = $1 AND i.backend <> pg_backend_pid() \
         AND a.usename = current_user AND a.application_name = current_setting('application_name')",
        qualified(schema, INSTANCES_TABLE)
    )
}

/// Instance `$1` takes the sources of slots `$2` (their advisory locks just taken): each
/// source's epoch grows by one, and the new epochs come back (`slot_name`, `epoch`).
/// The update waits for any transaction of a previous owner that checked its epoch
/// ([`fence_sql`]) to end: what it committed is in the positions the new owner reads
/// next, and what it had not is fenced off.
pub fn take_owners_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {} AS o (slot_name, epoch, instance, taken) \
         SELECT s, 1, $1, now() FROM unnest($2::text[]) AS u(s) \
         ON CONFLICT (slot_name) DO UPDATE SET epoch = o.epoch + 1, instance = EXCLUDED.instance, \
         taken = now() RETURNING slot_name, epoch",
        qualified(schema, OWNERS_TABLE)
    )
}

/// The current epochs of slots `$1` (`slot_name`, `epoch`, `instance`).
pub fn owners_sql(schema: &str) -> String {
    format!(
        "SELECT slot_name, epoch, instance FROM {} WHERE slot_name = ANY($1::text[])",
        qualified(schema, OWNERS_TABLE)
    )
}

/// The statement that fences a transaction off unless each `(slot, epoch)` is still
/// current: it share-locks the owners' rows, so a take-over waits for this transaction
/// to end, and raises [`FENCED_SQLSTATE`] naming the slots taken over since (nothing of
/// the transaction commits). None when there is nothing to check.
pub fn fence_sql(schema: &str, owned: &[(&str, i64)]) -> Option<String> {
    if owned.is_empty() {
        return None;
    }
    let pairs: Vec<String> = owned
        .iter()
        .map(|(slot, epoch)| format!("({}, {epoch}::bigint)", literal(slot)))
        .collect();
    let slots: Vec<String> = owned
        .iter()
        .map(|(slot, _)| format!("({})", literal(slot)))
        .collect();
    Some(format!(
        "WITH owned AS (SELECT slot_name FROM {owners} WHERE (slot_name, epoch) IN (VALUES {pairs}) \
         FOR SHARE) SELECT {fenced}('this instance no longer owns the source of slot(s) ' \
         || string_agg(v.s, ', ') || ': another instance took it over') \
         FROM (VALUES {slots}) AS v(s) WHERE v.s NOT IN (SELECT slot_name FROM owned) \
         HAVING count(*) > 0",
        owners = qualified(schema, OWNERS_TABLE),
        fenced = qualified(schema, FENCE_FUNCTION),
        pairs = pairs.join(", "),
        slots = slots.join(", "),
    ))
}

/// Ends every destination session of the instances of deployment `$1` silent for more
/// than `$2` seconds (paused, or cut off while the destination kept their sessions):
/// their coordination session, whose locks would keep their sources from everyone, and
/// each session marked as theirs (see [`crate::pg::session::mark_instance`]): a writer
/// or copy frozen inside its transaction would hold the targets' locks against the new
/// owners (unless another instance's id has the same hash). Only backends of this role
/// and application; returns the instance of each session ended.
pub fn end_silent_instances_sql(schema: &str) -> String {
    format!(
        "WITH silent AS (SELECT instance, backend FROM {0} WHERE deployment = $1 \
         AND heartbeat < now() - make_interval(secs => $2)), \
         theirs AS (SELECT s.instance, s.backend AS pid FROM silent s \
         UNION SELECT s.instance, l.pid FROM silent s JOIN pg_locks l \
         ON l.locktype = 'advisory' AND l.objsubid = 2 AND l.classid = hashtext({1})::oid \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.objid = hashtext(s.instance)::oid AND l.granted \
         WHERE NOT EXISTS (SELECT FROM {0} o WHERE o.instance <> s.instance \
         AND hashtext(o.instance) = hashtext(s.instance))) \
         SELECT t.instance, pg_terminate_backend(t.pid) FROM theirs t \
         JOIN pg_stat_activity a ON a.pid = t.pid \
         WHERE t.pid <> pg_backend_pid() AND a.usename = current_user \
         AND a.application_name = current_setting('application_name')",
        qualified(schema, INSTANCES_TABLE),
        literal(crate::pg::session::INSTANCE_LOCK),
    )
}

/// Removes instance `$1`'s row: it stops, and its sources are for the others at once.
pub fn forget_instance_sql(schema: &str) -> String {
    format!(
        "DELETE FROM {} WHERE instance = $1",
        qualified(schema, INSTANCES_TABLE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(lsn: u64, seq: u32) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            seq,
        }
    }

    #[test]
    fn a_change_is_applied_when_its_writer_passed_it() {
        let a = Applied::from_rows(&[(0, 2, pos(100, 3)), (1, 2, pos(80, 0))]);
        assert!(a.pending(pos(99, 9)));
        assert!(!a.pending(pos(100, 3)));
        assert!(a.covers(pos(100, 2), |_| 0));
        assert!(!a.covers(pos(100, 3), |_| 0));
        assert!(a.covers(pos(79, 7), |_| 1));
        assert!(!a.covers(pos(80, 0), |_| 1));
        assert!(!a.covers(pos(1, 0), |_| 2));
    }

    #[test]
    fn every_recorded_pool_size_counts() {
        // 4 writers applied up to 500, then the pool became 2 and applied up to 300.
        let a = Applied::from_rows(&[
            (0, 4, pos(500, 0)),
            (3, 4, pos(500, 0)),
            (0, 2, pos(300, 0)),
            (5, 2, pos(900, 0)),
        ]);
        assert!(a.pending(pos(499, 0)));
        assert!(!a.pending(pos(500, 0)));
        // Routed to writer 0 of 2 and writer 3 of 4: the 4-pool applied it.
        let route = |n: usize| if n == 2 { 0 } else { 3 };
        assert!(a.covers(pos(400, 0), route));
        // Routed to writer 1 of 2 and writer 1 of 4: neither recorded it.
        assert!(!a.covers(pos(200, 0), |_| 1));
        assert!(a.covers(pos(200, 0), |_| 0));
        assert_eq!(Applied::from_rows(&[]), Applied::default());
        assert!(!Applied::default().pending(pos(0, 0)));
    }

    #[test]
    fn progress_checks_the_owner_epochs_first() {
        assert_eq!(fence_sql("dw", &[]), None);
        let fence = fence_sql("dw", &[("k_a'b", 3), ("k_c", 1)]).expect("a fence");
        assert_eq!(
            fence,
            "WITH owned AS (SELECT slot_name FROM \"dw\".\"kvsz_owners\" WHERE (slot_name, epoch) \
             IN (VALUES ('k_a''b', 3::bigint), ('k_c', 1::bigint)) FOR SHARE) SELECT \
             \"dw\".\"kvsz_fenced\"('this instance no longer owns the source of slot(s) ' || \
             string_agg(v.s, ', ') || ': another instance took it over') FROM (VALUES ('k_a''b'), \
             ('k_c')) AS v(s) WHERE v.s NOT IN (SELECT slot_name FROM owned) HAVING count(*) > 0"
        );
        let row = |epoch| WriterProgress {
            slot: "k_c",
            writer: 0,
            writers: 1,
            next: pos(1, 0),
            epoch,
        };
        let checked = progress_sql("dw", &[row(Some(1))]);
        assert!(checked.starts_with(&(fence_sql("dw", &[("k_c", 1)]).expect("fence") + "; INSERT")));
        assert!(progress_sql("dw", &[row(None)]).starts_with("INSERT"));
    }

    #[test]
    fn progress_is_one_upsert() {
        let sql = progress_sql(
            "dw",
            &[WriterProgress {
                slot: "kuvasz_a'b",
                writer: 1,
                writers: 4,
                next: pos(0x1_0000_0010, 7),
                epoch: None,
            }],
        );
        assert_eq!(
            sql,
            "INSERT INTO \"dw\".\"kvsz_progress\" AS p (slot_name, writer, writers, commit_lsn, seq) \
             VALUES ('kuvasz_a''b', 1, 4, '1/10', 7) ON CONFLICT (slot_name, writers, writer) DO \
             UPDATE SET commit_lsn = EXCLUDED.commit_lsn, seq = EXCLUDED.seq, updated_at = now()"
        );
    }
}
