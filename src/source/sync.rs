//! Initial sync: COPY a table from a source snapshot into its target, passing the COPY
//! text through untouched except for the `sid` appended to each row.

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::debug;
use postgres::Client;

use crate::apply::history::{FIRST_START, OPEN_END, OPEN_FROM};
use crate::change::Sid;
use crate::config::Mode;
use crate::expr::{Cell, Kind, TableExprs};
use crate::pg::describe;
use crate::pg::encoding::NotUtf8;
use crate::pg::quote::{ident, jsonb_object, literal, push_copy_field, qualified};
use crate::pg::Lsn;
use crate::status::TableCounters;

use super::careful::{self, Careful, RefusedRow, Sink};

/// What to copy: the shared columns of one source table into its target.
#[derive(Clone, Debug)]
pub struct CopyPlan {
    pub source_schema: String,
    pub source_table: String,
    pub target_schema: String,
    pub target_table: String,
    pub columns: Vec<String>,
    /// The source's key columns (replica identity) that the target has.
    pub key: Vec<String>,
    /// Set when the target has a `sid` column.
    pub sid: Option<Sid>,
    pub mode: Mode,
    /// Other URLs write into the same target without `sid`: their rows are not ours to
    /// clear.
    pub shared: bool,
    /// The entry's filter and set expressions: the copy then reads every source column
    /// and parses each row (without, the COPY text passes through).
    pub exprs: Option<Arc<TableExprs>>,
    /// Every source column with its kind, in table order (read when `exprs` is set).
    pub source_columns: Vec<(String, Kind)>,
    /// Target columns only `set` fills (not shared with the source), after `columns`.
    pub set_extra: Vec<String>,
}

/// What a copy needs besides its plans.
pub struct CopyOptions {
    /// See [`CopyPlan::history_merge_sql`].
    pub since: String,
    /// The snapshot's LSN, which a dead-lettered row of the copy is reported at.
    pub lsn: Lsn,
    /// Where a row whose expression fails goes: None stops the copy (`on_error = stop`).
    pub deadletter: Option<Deadletter>,
    /// Where each plan's rows and bytes are counted as they pass (by plan index).
    pub progress: Vec<Arc<TableCounters>>,
}

/// Where `kvsz_deadletter` is and who writes into it.
pub struct Deadletter {
    /// `database.schema`.
    pub schema: String,
    pub source: String,
    pub sid: String,
}

impl CopyPlan {
    /// `ONLY`: an inheritance parent's children are tables of their own.
    pub fn copy_out_sql(&self) -> String {
        let cols: Vec<String> = self.copy_out_columns().map(ident).collect();
        format!(
            "COPY (SELECT {} FROM ONLY {}) TO STDOUT",
            cols.join(", "),
            qualified(&self.source_schema, &self.source_table)
        )
    }

    /// The source columns the COPY reads, in its order: all of them when expressions
    /// read the row, else the shared ones.
    fn copy_out_columns(&self) -> impl Iterator<Item = &str> {
        let all = self.exprs.is_some();
        let source = self.source_columns.iter().map(|(c, _)| c.as_str());
        let shared = self.columns.iter().map(String::as_str);
        source
            .filter(move |_| all)
            .chain(shared.filter(move |_| !all))
    }

    /// The target's columns a copied row fills, `sid` last, then a history target's
    /// version columns.
    fn target_columns(&self) -> Vec<String> {
        let mut cols = self.row_columns();
        if self.mode.versions() {
            cols.extend(["kvsz_start", "kvsz_end", "kvsz_deleted"].map(String::from));
        }
        cols
    }

    /// The columns of the row itself: the shared ones, those only `set` fills, `sid`.
    fn row_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = self
            .columns
            .iter()
            .chain(&self.set_extra)
            .map(|c| ident(c))
            .collect();
        if self.sid.is_some() {
            cols.push(ident("sid"));
        }
        cols
    }

    /// What is appended to each copied row: the sid, and a history target's open
    /// version valid from 1900-01-01 (COPY text fields).
    fn suffix(&self) -> Option<Vec<u8>> {
        let mut out = self.sid.as_ref().map(|s| copy_escape(s.as_str()));
        if self.mode.versions() {
            let v = out.get_or_insert_with(Vec::new);
            if !v.is_empty() || self.sid.is_some() {
                v.push(b'\t');
            }
            v.extend_from_slice(format!("{FIRST_START}\t{OPEN_END}\tf").as_bytes());
        }
        out
    }

    pub fn copy_in_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN",
            qualified(&self.target_schema, &self.target_table),
            self.target_columns().join(", ")
        )
    }

    /// Whether the target may already hold rows this copy must merge with rather than
    /// replace: an append target keeps what its source deleted, and a shared target
    /// holds other URLs' rows, so a copy updates and adds rows by key and removes nothing.
    fn merges(&self) -> bool {
        !self.clears()
    }

    /// Whether a copy replaces the target's rows of this sid: a clone target's, unless
    /// other URLs' rows share it without `sid`.
    fn clears(&self) -> bool {
        self.mode.rules().copy_replaces && !self.shared
    }

    /// Whether the target holds rows of this sid (all rows without `sid`).
    fn any_rows_sql(&self) -> String {
        let t = qualified(&self.target_schema, &self.target_table);
        match &self.sid {
            Some(sid) => format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE {} = {})",
                ident("sid"),
                literal(sid.as_str())
            ),
            None => format!("SELECT EXISTS (SELECT 1 FROM {t})"),
        }
    }

    /// A staging table typed like the target's copied columns.
    fn stage_sql(&self) -> String {
        format!(
            "CREATE TEMP TABLE {STAGE} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA",
            self.target_columns().join(", "),
            qualified(&self.target_schema, &self.target_table)
        )
    }

    /// Merges the staged rows into the target by key (sid included), then drops the
    /// stage: rows with a key already there are updated, the others added. Without a
    /// key, rows already there are left and the others added (a re-copy adds nothing
    /// twice, at the price of identical rows the source added meanwhile).
    fn merge_sql(&self) -> String {
        let t = qualified(&self.target_schema, &self.target_table);
        let cols = self.target_columns();
        let (key, matches) = if self.key.is_empty() {
            // No key (inserts only): a row already there, compared by its text form (any
            // type, NULLs alike), is not added again.
            let same = cols
                .iter()
                .map(|k| format!("t.{k}::text IS NOT DISTINCT FROM s.{k}::text"))
                .collect::<Vec<_>>()
                .join(" AND ");
            (cols.clone(), same)
        } else {
            (self.key_with_sid(), self.key_on("t", "s"))
        };
        let sets: Vec<String> = cols
            .iter()
            .filter(|c| !key.contains(c))
            .map(|c| format!("{c} = s.{c}"))
            .collect();
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str(&format!(
                "UPDATE {t} t SET {} FROM {STAGE} s WHERE {matches}; ",
                sets.join(", ")
            ));
        }
        let list = cols.join(", ");
        let picked: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
        sql.push_str(&format!(
            "INSERT INTO {t} ({list}) SELECT {} FROM {STAGE} s \
             WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {matches}); DROP TABLE {STAGE}",
            picked.join(", ")
        ));
        sql
    }

    /// Merges the staged rows (every source table of the target, staged together) into a
    /// history target that holds versions already: the copy is what the source holds at
    /// `since`, so from then on the open versions that differ from it, or whose key it
    /// lacks (unless other URLs' rows share the target without `sid`), are closed, and a
    /// version is opened for every staged row without an open one (valid from
    /// 1900-01-01 when its key has no version at all). A re-copy of unchanged rows
    /// changes nothing.
    fn history_merge_sql(&self, since: &str) -> String {
        format!(
            "{}; {}; {}",
            self.history_close_sql(since),
            self.history_open_sql(since, None),
            self.drop_stage_sql()
        )
    }

    /// Closes the open versions the copy ends: see
    /// [`history_merge_sql`](Self::history_merge_sql).
    pub(super) fn history_close_sql(&self, since: &str) -> String {
        let t = qualified(&self.target_schema, &self.target_table);
        let same: String = self
            .row_columns()
            .iter()
            .map(|c| format!(" AND t.{c}::text IS NOT DISTINCT FROM s.{c}::text"))
            .collect();
        let since = literal(since);
        let open = literal(OPEN_FROM);
        let mine = match &self.sid {
            Some(sid) => format!(" AND t.{} = {}", ident("sid"), literal(sid.as_str())),
            None => String::new(),
        };
        let key_ts = self.key_on("t", "s");
        let only_changed = if self.shared {
            format!(" AND EXISTS (SELECT 1 FROM {STAGE} s WHERE {key_ts})")
        } else {
            String::new()
        };
        format!(
            "ANALYZE {STAGE}; \
             UPDATE {t} t SET kvsz_end = {since}, kvsz_deleted = NOT EXISTS \
             (SELECT 1 FROM {STAGE} s WHERE {key_ts}) WHERE t.kvsz_end >= {open} AND \
             t.kvsz_start < {since}{mine}{only_changed} AND NOT EXISTS (SELECT 1 FROM {STAGE} s \
             WHERE {key_ts}{same})"
        )
    }

    /// The target's key columns, quoted: the source's key, then `sid`.
    fn key_with_sid(&self) -> Vec<String> {
        let mut key: Vec<String> = self.key.iter().map(|c| ident(c)).collect();
        if self.sid.is_some() {
            key.push(ident("sid"));
        }
        key
    }

    /// Rows `a` and `b` have the same key (sid included).
    fn key_on(&self, a: &str, b: &str) -> String {
        self.key_with_sid()
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Opens a version for every staged row (of `lines`, a range of
    /// [`number_stage_sql`](Self::number_stage_sql)'s numbers, when given) whose key has
    /// no open one: see [`history_merge_sql`](Self::history_merge_sql).
    pub(super) fn history_open_sql(&self, since: &str, lines: Option<(i64, i64)>) -> String {
        let t = qualified(&self.target_schema, &self.target_table);
        let cols = self.row_columns();
        let picked: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
        let key_xs = self.key_on("x", "s");
        let within = lines.map_or_else(String::new, |(from, to)| {
            format!(" AND s.kvsz_line >= {from} AND s.kvsz_line < {to}")
        });
        format!(
            "INSERT INTO {t} ({list}, kvsz_start, kvsz_end, kvsz_deleted) SELECT {picked}, \
             CASE WHEN EXISTS (SELECT 1 FROM {t} x WHERE {key_xs}) THEN {since} ELSE \
             s.kvsz_start END, s.kvsz_end, s.kvsz_deleted FROM {STAGE} s WHERE NOT EXISTS \
             (SELECT 1 FROM {t} x WHERE {key_xs} AND x.kvsz_end >= {open}){within}",
            list = cols.join(", "),
            picked = picked.join(", "),
            since = literal(since),
            open = literal(OPEN_FROM),
        )
    }

    /// Numbers the staged rows from 0 (a column `kvsz_line`), so ranges of them can be
    /// merged apart; returns how many there are.
    pub(super) fn number_stage_sql(&self) -> String {
        format!(
            "ALTER TABLE {STAGE} ADD COLUMN kvsz_line bigint GENERATED ALWAYS AS IDENTITY \
             (MINVALUE 0 START WITH 0)"
        )
    }

    pub(super) fn count_stage_sql(&self) -> String {
        format!("SELECT count(*) FROM {STAGE}")
    }

    /// The row columns of the staged row numbered `$1`, as text.
    pub(super) fn staged_row_sql(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .chain(&self.set_extra)
            .map(|c| format!("{}::text", ident(c)))
            .collect();
        format!(
            "SELECT {} FROM {STAGE} WHERE kvsz_line = $1",
            cols.join(", ")
        )
    }

    pub(super) fn drop_stage_sql(&self) -> String {
        format!("DROP TABLE {STAGE}")
    }

    /// Clears what an earlier copy of this source left in the target, so a re-sync
    /// (after a crash mid-copy, or a repaired slot) starts from the snapshot alone.
    pub fn clear_sql(&self) -> String {
        let t = qualified(&self.target_schema, &self.target_table);
        match &self.sid {
            Some(sid) => format!(
                "DELETE FROM {t} WHERE {} = {}",
                ident("sid"),
                literal(sid.as_str())
            ),
            None => format!("DELETE FROM {t}"),
        }
    }
}

/// The staging table of a merging copy.
const STAGE: &str = "kvsz_copy_stage";

/// The sid as a COPY text field.
pub fn copy_escape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    push_copy_field(&mut out, s.as_bytes());
    out
}

/// Copies `chunk` to `out`, inserting `\t<field>` before every row-ending newline (in
/// COPY text format a raw newline always ends a row; chunks may split rows anywhere).
/// Returns the number of rows ended in this chunk.
pub fn append_field(chunk: &[u8], field: Option<&[u8]>, out: &mut Vec<u8>) -> u64 {
    let mut rows = 0;
    let mut start = 0;
    for (i, &b) in chunk.iter().enumerate() {
        if b == b'\n' {
            rows += 1;
            if let Some(f) = field {
                out.extend_from_slice(&chunk[start..i]);
                out.push(b'\t');
                out.extend_from_slice(f);
                start = i;
            }
        }
    }
    out.extend_from_slice(&chunk[start..]);
    rows
}

/// Token bucket over rows: `rate` rows per second with `burst` rows of credit.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u64) -> RateLimiter {
        RateLimiter {
            rate: rate.max(1e-9),
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` rows of credit, sleeping for as long as the debt needs.
    pub fn take(&mut self, n: u64) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            let wait = -self.tokens / self.rate;
            thread::sleep(Duration::from_secs_f64(wait.min(60.0)));
        }
    }
}

#[derive(Debug)]
pub enum CopyError {
    Source(postgres::Error),
    Destination(postgres::Error),
    Io(std::io::Error),
    /// The daemon is stopping: the copy was abandoned (and rolled back).
    Stopped,
    /// A row's filter or set expression failed and `on_error = stop`: the copy is rolled
    /// back and retried.
    Rejected(String),
    /// The destination refused a row and `on_error = stop`: the copy is rolled back and
    /// retried.
    Refused(Box<RefusedRow>),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Source(e) => write!(f, "source: {}", describe(e)),
            CopyError::Destination(e) => write!(f, "destination: {}", describe(e)),
            // A COPY the destination refused surfaces as an I/O error of the writer, whose
            // Display says only "db error": the server's message is inside.
            CopyError::Io(e) => match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<postgres::Error>())
            {
                Some(pg) => write!(f, "{}", describe(pg)),
                None => write!(f, "{e}"),
            },
            CopyError::Stopped => f.write_str("stopped before the copy finished"),
            CopyError::Rejected(m) => write!(f, "a row was rejected: {m}"),
            CopyError::Refused(r) => write!(f, "{r}"),
        }
    }
}

impl CopyError {
    /// What kind of failure this is (see [`crate::fault`]).
    pub fn class(&self) -> crate::fault::Class {
        use crate::fault::{classify_sql, Class, Side};
        match self {
            CopyError::Source(e) => classify_sql(e, Side::Source),
            CopyError::Destination(e) => classify_sql(e, Side::Destination),
            CopyError::Io(e) => match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<postgres::Error>())
            {
                Some(pg) => classify_sql(pg, Side::Destination),
                None => Class::Transient,
            },
            CopyError::Stopped => Class::Transient,
            CopyError::Rejected(_) | CopyError::Refused(_) => Class::RejectedRow,
        }
    }

    /// The destination's error, when the destination refused something.
    pub fn server_error(&self) -> Option<&postgres::Error> {
        match self {
            CopyError::Destination(e) => Some(e),
            CopyError::Io(e) => e
                .get_ref()
                .and_then(|i| i.downcast_ref::<postgres::Error>()),
            _ => None,
        }
    }
}

/// What a copy did: rows and bytes per plan, and the rows the destination refused that
/// went to `kvsz_deadletter`.
pub struct Copied {
    pub counts: Vec<(u64, u64)>,
    pub refused: Vec<RefusedRow>,
}

/// Copies the source tables of one target. The source must already be inside the
/// snapshot's transaction; the destination work (a clone target's rows of this sid
/// cleared once, every COPY, `done_sql`) commits as one transaction, so the tables are
/// either all copied and marked done, or not at all.
pub fn copy_group(
    src: &mut Client,
    dest: &mut Client,
    plans: &[&CopyPlan],
    done_sql: &str,
    opts: &CopyOptions,
    limiter: &mut RateLimiter,
    stop: &dyn Fn() -> bool,
) -> Result<Copied, CopyError> {
    let mut tx = dest.transaction().map_err(CopyError::Destination)?;
    // A deferred constraint is checked by the statement that breaks it, inside its
    // table's savepoint, so its rows can be found and the rest kept.
    tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
        .map_err(CopyError::Destination)?;
    if let Some(first) = plans.first().filter(|p| p.clears()) {
        tx.batch_execute(&first.clear_sql())
            .map_err(CopyError::Destination)?;
    }
    let mut copied = Copied {
        counts: Vec::with_capacity(plans.len()),
        refused: Vec::new(),
    };
    // Every other encoding is converted to UTF-8 by the source itself. A SQL_ASCII one
    // has nothing to convert from, and asked for UTF8 it fails the whole COPY at the
    // first value that is not: its bytes are taken as they are and checked here.
    let check_utf8 = src
        .query_one(
            "SELECT current_setting('server_encoding') = 'SQL_ASCII'",
            &[],
        )
        .map_err(CopyError::Source)?
        .get::<_, bool>(0);
    if check_utf8 {
        src.batch_execute("SET LOCAL client_encoding = 'SQL_ASCII'")
            .map_err(CopyError::Source)?;
    }
    let history = plans.first().filter(|p| p.mode.versions());
    // A history target is merged once, from the rows of all its source tables: a key
    // one of them lacks may be in another.
    let history_merge = match history {
        Some(p) => tx
            .query_one(p.any_rows_sql().as_str(), &[])
            .map_err(CopyError::Destination)?
            .get::<_, bool>(0),
        None => false,
    };
    if let (Some(p), true) = (history, history_merge) {
        tx.batch_execute(&p.stage_sql())
            .map_err(CopyError::Destination)?;
    }
    let pass = Pass {
        check_utf8,
        lsn: opts.lsn,
        deadletter: opts.deadletter.as_ref(),
    };
    for (i, plan) in plans.iter().enumerate() {
        let progress = opts.progress.get(i).map(Arc::as_ref);
        let merge = history_merge
            || (history.is_none()
                && plan.merges()
                && tx
                    .query_one(plan.any_rows_sql().as_str(), &[])
                    .map_err(CopyError::Destination)?
                    .get::<_, bool>(0));
        let mut rejected = Vec::new();
        let (counts, refused) = copy_plan(
            src,
            &mut tx,
            plan,
            (merge, history.is_some()),
            &pass,
            limiter,
            stop,
            &mut rejected,
            progress,
        )?;
        copied.counts.push(counts);
        copied.refused.extend(refused);
        if !rejected.is_empty() {
            let Some(dl) = &opts.deadletter else {
                return Err(CopyError::Rejected(rejected.swap_remove(0).1));
            };
            for (row, error) in rejected {
                tx.batch_execute(&deadletter_sql(dl, plan, opts.lsn, &row, &error))
                    .map_err(CopyError::Destination)?;
            }
        }
    }
    if history_merge {
        let refused = merge_history(&mut tx, plans, &opts.since, &pass)?;
        copied.refused.extend(refused);
    }
    tx.batch_execute(done_sql).map_err(CopyError::Destination)?;
    tx.commit().map_err(CopyError::Destination)?;
    Ok(copied)
}

/// Merges a history target's stage in one statement, or when the destination refused a
/// row of it, a range of rows at a time (see [`careful::history_merge`]).
fn merge_history(
    tx: &mut postgres::Transaction<'_>,
    plans: &[&CopyPlan],
    since: &str,
    pass: &Pass,
) -> Result<Vec<RefusedRow>, CopyError> {
    let Some(plan) = plans.first() else {
        return Ok(Vec::new());
    };
    let merge = plan.history_merge_sql(since);
    let refusal = careful::attempt(tx, |tx| {
        tx.batch_execute(&merge).map_err(CopyError::Destination)
    })?;
    match refusal {
        None => Ok(Vec::new()),
        Some(r) => {
            debug!(
                "history merge into {}.{} refused a row ({}): merging again a range at a time",
                plan.target_schema, plan.target_table, r.message
            );
            careful::history_merge(tx, plans, since, pass.lsn, pass.deadletter)
        }
    }
}

/// What every plan of a copy is read and refused with.
struct Pass<'a> {
    check_utf8: bool,
    lsn: Lsn,
    deadletter: Option<&'a Deadletter>,
}

/// Copies one plan under a savepoint: in one COPY (the fast pass), or when the
/// destination refused a row of it, again from the snapshot in the careful pass (see
/// [`careful`](super::careful)). `merge`: whether the rows are merged by key rather than
/// copied into an empty target, and whether a history target's shared stage takes
/// them. Returns rows and bytes, and the rows refused into `kvsz_deadletter`.
#[allow(clippy::too_many_arguments)]
fn copy_plan(
    src: &mut Client,
    tx: &mut postgres::Transaction<'_>,
    plan: &CopyPlan,
    (merge, history): (bool, bool),
    pass: &Pass,
    limiter: &mut RateLimiter,
    stop: &dyn Fn() -> bool,
    rejected: &mut Vec<(String, String)>,
    progress: Option<&TableCounters>,
) -> Result<((u64, u64), Vec<RefusedRow>), CopyError> {
    let stage_copy = format!(
        "COPY {STAGE} ({}) FROM STDIN",
        plan.target_columns().join(", ")
    );
    // A merge of this plan alone stages its rows in a table of its own, merged (and
    // dropped) after them; a history target's stage is shared and merged at the end.
    let own_stage = merge && !history;
    let into = if merge {
        stage_copy.clone()
    } else {
        plan.copy_in_sql()
    };
    // Both passes read the table the same way, from the same snapshot.
    let mut read = |rejected: &mut Vec<(String, String)>,
                    sink: &mut dyn FnMut(&[u8]) -> Result<(), CopyError>| {
        pipe(
            src,
            plan,
            pass.check_utf8,
            limiter,
            stop,
            rejected,
            progress,
            sink,
        )
    };
    let mut counts = (0, 0);
    let refusal = careful::attempt(tx, |tx| {
        if own_stage {
            tx.batch_execute(&plan.stage_sql())
                .map_err(CopyError::Destination)?;
        }
        let mut writer = tx.copy_in(into.as_str()).map_err(CopyError::Destination)?;
        counts = read(rejected, &mut |out| {
            writer.write_all(out).map_err(CopyError::Io)
        })?;
        writer.finish().map_err(CopyError::Destination)?;
        if own_stage {
            tx.batch_execute(&plan.merge_sql())
                .map_err(CopyError::Destination)?;
        }
        Ok(())
    })?;
    let Some(refusal) = refusal else {
        return Ok((counts, Vec::new()));
    };
    debug!(
        "copy of {}.{} refused a row ({}): copying it again, a chunk at a time",
        plan.source_schema, plan.source_table, refusal.message
    );
    rejected.clear();
    if let Some(p) = progress {
        p.copy_restarted();
    }
    let (stage, merge_sql) = (plan.stage_sql(), plan.merge_sql());
    let sink = if own_stage {
        Sink::Merge {
            stage: &stage,
            copy: &stage_copy,
            merge: &merge_sql,
        }
    } else {
        Sink::Copy(&into)
    };
    let mut careful = Careful::new(plan, sink, pass.lsn, pass.deadletter);
    let counts = read(rejected, &mut |out| careful.feed(tx, out))?;
    let refused = careful.finish(tx)?;
    Ok(((counts.0 - refused.len() as u64, counts.1), refused))
}

/// COPY out of the source, each chunk handed to `sink` with the sid appended to each
/// row; with expressions, rows parsed, filtered and computed, and those whose expression
/// failed left out and returned in `rejected` (their values as JSON, the error); with
/// `check_utf8` (a SQL_ASCII source), rows whose bytes are not UTF-8 too.
#[allow(clippy::too_many_arguments)]
fn pipe(
    src: &mut Client,
    plan: &CopyPlan,
    check_utf8: bool,
    limiter: &mut RateLimiter,
    stop: &dyn Fn() -> bool,
    rejected: &mut Vec<(String, String)>,
    progress: Option<&TableCounters>,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), CopyError>,
) -> Result<(u64, u64), CopyError> {
    let field = plan.suffix();
    let mut rows = 0u64;
    let mut bytes = 0u64;
    let mut reader = src
        .copy_out(plan.copy_out_sql().as_str())
        .map_err(CopyError::Source)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::with_capacity(320 * 1024);
    let mut rowwise = plan.exprs.as_ref().map(|e| RowWise::new(plan, e));
    let mut utf8 = check_utf8.then(|| Utf8Lines::new(plan));
    let mut valid = Vec::new();
    loop {
        if stop() {
            // Dropping the writer unfinished aborts the COPY; the transaction rolls back.
            return Err(CopyError::Stopped);
        }
        let n = reader.read(&mut buf).map_err(CopyError::Io)?;
        if n == 0 {
            break;
        }
        out.clear();
        let chunk = match utf8.as_mut() {
            Some(u) => {
                valid.clear();
                u.feed(&buf[..n], &mut valid, rejected);
                &valid[..]
            }
            None => &buf[..n],
        };
        let r = match rowwise.as_mut() {
            Some(rw) => rw.feed(chunk, field.as_deref(), &mut out, rejected),
            None => append_field(chunk, field.as_deref(), &mut out),
        };
        rows += r;
        bytes += n as u64;
        if let Some(p) = progress {
            p.copied(r, n as u64);
        }
        limiter.take(r);
        sink(&out)?;
    }
    Ok((rows, bytes))
}

/// The complete COPY lines of a stream of chunks whose bytes are UTF-8; a line that is
/// not is left out and returned as rejected, with the column that holds the bytes.
struct Utf8Lines {
    columns: Vec<String>,
    /// The end of the previous chunk, after its last complete line.
    partial: Vec<u8>,
}

impl Utf8Lines {
    fn new(plan: &CopyPlan) -> Utf8Lines {
        Utf8Lines {
            columns: plan.copy_out_columns().map(String::from).collect(),
            partial: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>, rejected: &mut Vec<(String, String)>) {
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(chunk);
        let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if std::str::from_utf8(&data[..end]).is_ok() {
            out.extend_from_slice(&data[..end]);
        } else {
            for line in data[..end].split_inclusive(|&b| b == b'\n') {
                match self.invalid(&line[..line.len() - 1]) {
                    None => out.extend_from_slice(line),
                    Some(r) => rejected.push(r),
                }
            }
        }
        data.drain(..end);
        self.partial = data;
    }

    /// A line whose bytes are not UTF-8: its values as JSON (U+FFFD for the bytes) and
    /// the error naming the column.
    fn invalid(&self, line: &[u8]) -> Option<(String, String)> {
        std::str::from_utf8(line).err()?;
        let fields: Vec<Option<Vec<u8>>> =
            line.split(|&b| b == b'\t').map(unescape_bytes).collect();
        let error = self
            .columns
            .iter()
            .zip(&fields)
            .find_map(|(c, f)| f.as_deref().and_then(|b| NotUtf8::check(c, b)))
            .map_or_else(|| "not valid UTF-8".to_string(), |e| e.to_string());
        let texts: Vec<Option<String>> = fields
            .iter()
            .map(|f| {
                f.as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
            .collect();
        let json = jsonb_object(
            self.columns
                .iter()
                .zip(&texts)
                .map(|(c, t)| (c.as_str(), t.as_deref())),
        );
        Some((json, error))
    }
}

/// A copy's rows one by one through the entry's expressions.
struct RowWise<'p> {
    plan: &'p CopyPlan,
    exprs: &'p TableExprs,
    /// For each target column of the row (`columns` then `set_extra`): the source
    /// column it copies, or the `set` value it takes.
    from: Vec<From>,
    /// The end of the previous chunk, up to its last row's end.
    partial: Vec<u8>,
}

#[derive(Clone, Copy)]
enum From {
    Source(usize),
    Set(usize),
}

impl<'p> RowWise<'p> {
    fn new(plan: &'p CopyPlan, exprs: &'p TableExprs) -> RowWise<'p> {
        let set: Vec<&str> = exprs.set_columns().collect();
        let from = plan
            .columns
            .iter()
            .chain(&plan.set_extra)
            .map(|c| match set.iter().position(|s| s == c) {
                Some(n) => From::Set(n),
                None => From::Source(
                    plan.source_columns
                        .iter()
                        .position(|(s, _)| s == c)
                        .unwrap_or(usize::MAX),
                ),
            })
            .collect();
        RowWise {
            plan,
            exprs,
            from,
            partial: Vec::new(),
        }
    }

    /// Takes a chunk of COPY text; writes the rows that pass to `out` with `suffix`
    /// appended; returns how many rows the chunk ended.
    fn feed(
        &mut self,
        chunk: &[u8],
        suffix: Option<&[u8]>,
        out: &mut Vec<u8>,
        rejected: &mut Vec<(String, String)>,
    ) -> u64 {
        let mut rows = 0;
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = data[start..].iter().position(|&b| b == b'\n') {
            self.row(&data[start..start + len], suffix, out, rejected);
            start += len + 1;
            rows += 1;
        }
        data.drain(..start);
        self.partial = data;
        rows
    }

    fn row(
        &self,
        line: &[u8],
        suffix: Option<&[u8]>,
        out: &mut Vec<u8>,
        rejected: &mut Vec<(String, String)>,
    ) {
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        let texts: Vec<Option<String>> = fields.iter().map(|f| unescape(f)).collect();
        let outcome = self.exprs.eval(|name| {
            let i = self
                .plan
                .source_columns
                .iter()
                .position(|(c, _)| c == name)?;
            let kind = self.plan.source_columns[i].1;
            Some(match texts.get(i)? {
                None => Cell::Null,
                Some(t) => Cell::Text(kind, t),
            })
        });
        let computed = match outcome {
            Ok(o) if !o.pass => return,
            Ok(o) => o.computed,
            Err(e) => {
                let json = row_json(&self.plan.source_columns, &texts);
                rejected.push((json, e.to_string()));
                return;
            }
        };
        for (n, from) in self.from.iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            match *from {
                From::Source(i) => out.extend_from_slice(fields.get(i).copied().unwrap_or(b"\\N")),
                From::Set(k) => match computed.get(k).and_then(|v| v.as_deref()) {
                    Some(v) => push_copy_field(out, v.as_bytes()),
                    None => out.extend_from_slice(b"\\N"),
                },
            }
        }
        if let Some(f) = suffix {
            out.push(b'\t');
            out.extend_from_slice(f);
        }
        out.push(b'\n');
    }
}

/// A COPY text field's value (None: `\N`, NULL).
pub(super) fn unescape(field: &[u8]) -> Option<String> {
    if field == b"\\N" {
        return None;
    }
    if !field.contains(&b'\\') {
        return Some(String::from_utf8_lossy(field).into_owned());
    }
    unescape_bytes(field).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A COPY text field's bytes (None: `\N`, NULL).
fn unescape_bytes(field: &[u8]) -> Option<Vec<u8>> {
    if field == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let e = field[i + 1];
        i += 2;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                let mut k = 0;
                while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    v = v * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    v = v * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// A copied row as a `jsonb` expression (column name → text value) for the dead letter.
fn row_json(columns: &[(String, Kind)], texts: &[Option<String>]) -> String {
    jsonb_object(
        columns
            .iter()
            .zip(texts)
            .map(|((c, _), t)| (c.as_str(), t.as_deref())),
    )
}

/// The dead letter of a copied row whose expression failed.
pub(super) fn deadletter_sql(
    dl: &Deadletter,
    plan: &CopyPlan,
    lsn: Lsn,
    row: &str,
    error: &str,
) -> String {
    crate::store::deadletter_sql(
        &dl.schema,
        &crate::store::DeadLetter {
            sid: &dl.sid,
            source: &dl.source,
            table: &format!("{}.{}", plan.source_schema, plan.source_table),
            lsn,
            op: "COPY",
            row_json: row,
            error,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_unescape() {
        assert_eq!(unescape(b"\\N"), None);
        assert_eq!(unescape(b"plain"), Some("plain".into()));
        assert_eq!(
            unescape(b"a\\tb\\\\c\\nd\\101\\x42"),
            Some("a\tb\\c\ndAB".into())
        );
    }

    #[test]
    fn rows_through_expressions_split_across_chunks() {
        use crate::config::TableMap;
        let map = TableMap {
            schema: "s".into(),
            table: "t".into(),
            target: "t".into(),
            mode: Mode::Clone,
            partitions_regex: None,
            filter: Some("amount > 0".into()),
            set: vec![
                ("label".into(), "name + '!'".into()),
                ("name".into(), "'<' + name + '>'".into()),
            ],
        };
        let exprs = TableExprs::compile(&map).unwrap().unwrap();
        let plan = CopyPlan {
            source_schema: "s".into(),
            source_table: "t".into(),
            target_schema: "public".into(),
            target_table: "t".into(),
            columns: vec!["id".into(), "name".into()],
            key: vec!["id".into()],
            sid: Some(Sid::new("a")),
            mode: Mode::Clone,
            shared: false,
            exprs: Some(exprs.clone()),
            source_columns: vec![
                ("id".into(), Kind::Int),
                ("amount".into(), Kind::Float),
                ("name".into(), Kind::Text),
            ],
            set_extra: vec!["label".into()],
        };
        assert_eq!(
            plan.copy_out_sql(),
            "COPY (SELECT \"id\", \"amount\", \"name\" FROM ONLY \"s\".\"t\") TO STDOUT"
        );
        assert_eq!(
            plan.copy_in_sql(),
            "COPY \"public\".\"t\" (\"id\", \"name\", \"label\", \"sid\") FROM STDIN"
        );
        let mut rw = RowWise::new(&plan, &exprs);
        let (mut out, mut rejected) = (Vec::new(), Vec::new());
        let suffix = copy_escape("a");
        let n = rw.feed(
            b"1\t2.5\tx\\ty\n2\t0\tskip\n3\t\\N",
            Some(&suffix),
            &mut out,
            &mut rejected,
        );
        assert_eq!(n, 2);
        let n = rw.feed(b"\tnull amount\n", Some(&suffix), &mut out, &mut rejected);
        assert_eq!(n, 1);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1\t<x\\ty>\tx\\ty!\ta\n",
            "the filter drops row 2; set computes name and label"
        );
        assert_eq!(rejected.len(), 1, "row 3's NULL amount fails the filter");
        assert!(rejected[0].0.contains("'null amount'"), "{:?}", rejected[0]);
        assert!(
            rejected[0].1.starts_with("filter \"amount > 0\" failed"),
            "{:?}",
            rejected[0]
        );
    }

    #[test]
    fn sid_is_appended_to_rows_split_across_chunks() {
        let field = copy_escape("t\\1\t");
        assert_eq!(field, b"t\\\\1\\t");
        let mut out = Vec::new();
        let a = append_field(b"1\tx\n2\ty", Some(&field), &mut out);
        let b = append_field(b"y\n", Some(&field), &mut out);
        assert_eq!((a, b), (1, 1));
        assert_eq!(out, b"1\tx\tt\\\\1\\t\n2\tyy\tt\\\\1\\t\n");
    }

    #[test]
    fn without_sid_the_chunk_passes_through() {
        let mut out = Vec::new();
        assert_eq!(append_field(b"a\\nb\nc\n", None, &mut out), 2);
        assert_eq!(out, b"a\\nb\nc\n");
    }

    #[test]
    fn statements_quote_names() {
        let p = CopyPlan {
            source_schema: "s".into(),
            source_table: "My T".into(),
            target_schema: "public".into(),
            target_table: "t\"2".into(),
            columns: vec!["id".into(), "Na me".into()],
            key: vec!["id".into()],
            sid: Some(Sid::new("o'k")),
            mode: Mode::Append,
            shared: false,
            exprs: None,
            source_columns: Vec::new(),
            set_extra: Vec::new(),
        };
        assert_eq!(
            p.copy_out_sql(),
            "COPY (SELECT \"id\", \"Na me\" FROM ONLY \"s\".\"My T\") TO STDOUT"
        );
        assert_eq!(
            p.copy_in_sql(),
            "COPY \"public\".\"t\"\"2\" (\"id\", \"Na me\", \"sid\") FROM STDIN"
        );
        assert_eq!(
            p.clear_sql(),
            "DELETE FROM \"public\".\"t\"\"2\" WHERE \"sid\" = 'o''k'"
        );
    }
}
