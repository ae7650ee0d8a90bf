//! `kuvasz-streamer verify [--table T] [--sid S]`: compares each mapped source table with
//! its target, per sid, without shipping the tables. Both servers hash every row and sum
//! the hashes per bucket of the key (one scan each); only the buckets that differ are
//! fetched as (key, row hash) and diffed. A live system is always a little behind its
//! sources, so a key that differs is looked at again once the slot has confirmed the
//! source snapshot, bracketed by two source snapshots: only keys whose source value stayed
//! put while the destination still disagreed are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient, IsolationLevel};

use crate::config::TableMap;
use crate::pg::catalog::{self, TableInfo};
use crate::pg::connect::Endpoint;
use crate::pg::describe;
use crate::pg::quote::{ident, literal, qualified};
use crate::resync::names;
use crate::source::SourceSpec;

/// What `verify` compares.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One map entry (`schema.table` or `table` in `app.default_schema`); all without.
    pub table: Option<String>,
    /// One sid; all without.
    pub sid: Option<String>,
}

/// What `verify` found: the lines to print, and whether everything compared equal.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub equal: bool,
}

/// Hash buckets per table: few enough to ship their sums at once, many enough that one
/// differing row costs a fetch of about a thousandth of the table.
const BUCKETS: i32 = 1024;
/// Looks at differing keys at most this often before calling them differences.
const ROUNDS: usize = 3;
/// How long one round waits for the slot to confirm the source snapshot.
const CATCH_UP: Duration = Duration::from_secs(30);
/// Keys printed per table.
const SHOWN: usize = 20;
/// Both sides print values the same way, whatever the servers' defaults, so that row
/// texts (and their hashes) compare.
const SESSION: &str = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
     SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'";
/// Target columns that are the daemon's, not the source's.
const OWN_COLUMNS: [&str; 4] = ["sid", "kvsz_start", "kvsz_end", "kvsz_deleted"];

// ---------------------------------------------------------------------------------------
// Pure logic: buckets, keys, report lines.

/// Per bucket: rows and the sum of their row hashes (numeric text: sums of 60-bit
/// hashes overflow bigint).
pub type Buckets = BTreeMap<i32, (i64, String)>;

/// How rows are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// By key: a key holds one row, known by its hash.
    Keyed,
    /// No key: the key is the whole row's text, and what it holds is how many copies.
    Multiset,
}

/// What one side holds under each key: the row hash (Keyed; [`DUPLICATE`] for a key
/// seen twice) or the number of copies (Multiset).
pub type Keys = BTreeMap<String, i64>;

/// A key found on more than one row of a keyed side: never equal to a row hash, which
/// is non-negative.
pub const DUPLICATE: i64 = -1;

/// Keys on which the destination disagrees with the source.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// In the source, not in the target (or fewer copies).
    pub missing: Vec<String>,
    /// In the target, not in the source (or more copies).
    pub extra: Vec<String>,
    /// In both, with other values.
    pub different: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }

    /// Every key named.
    pub fn keys(&self) -> Vec<String> {
        let all: BTreeSet<&String> = self
            .missing
            .iter()
            .chain(&self.extra)
            .chain(&self.different)
            .collect();
        all.into_iter().cloned().collect()
    }
}

/// Buckets whose count or hash sum differ, present on either side.
pub fn differing_buckets(src: &Buckets, dst: &Buckets) -> Vec<i32> {
    let all: BTreeSet<i32> = src.keys().chain(dst.keys()).copied().collect();
    all.into_iter()
        .filter(|b| src.get(b) != dst.get(b))
        .collect()
}

/// Classifies the keys where `dst` differs from `src`. `extras_allowed`: the target may
/// hold what the source no longer has (append mode, a target shared without sid).
pub fn diff_keys(src: &Keys, dst: &Keys, shape: Shape, extras_allowed: bool) -> Diff {
    let mut diff = Diff::default();
    let all: BTreeSet<&String> = src.keys().chain(dst.keys()).collect();
    for key in all {
        let (s, d) = (src.get(key), dst.get(key));
        match (s, d, shape) {
            (Some(s), Some(d), _) if s == d => {}
            (Some(_), None, _) => diff.missing.push(key.clone()),
            (None, Some(_), _) if !extras_allowed => diff.extra.push(key.clone()),
            (None, Some(_), _) => {}
            (Some(_), Some(_), Shape::Keyed) => diff.different.push(key.clone()),
            (Some(s), Some(d), Shape::Multiset) if s > d => diff.missing.push(key.clone()),
            (Some(_), Some(_), Shape::Multiset) if !extras_allowed => diff.extra.push(key.clone()),
            _ => {}
        }
    }
    diff
}

/// The differences of one round that stand: the destination, read after the slot had
/// confirmed snapshot `before` and before snapshot `after` was taken, disagrees with a
/// value the source held in both. A key that changed between them proves nothing.
pub fn settle(before: &Keys, after: &Keys, dst: &Keys, shape: Shape, extras_allowed: bool) -> Diff {
    let diff = diff_keys(before, dst, shape, extras_allowed);
    let stood = |k: &String| before.get(k) == after.get(k);
    Diff {
        missing: diff.missing.into_iter().filter(stood).collect(),
        extra: diff.extra.into_iter().filter(stood).collect(),
        different: diff.different.into_iter().filter(stood).collect(),
    }
}

/// How one (source URL, table) pair compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Equal {
        rows: i64,
    },
    Different {
        source_rows: i64,
        target_rows: i64,
        diff: Diff,
        /// Why the differences could not be confirmed (the slot lags).
        unconfirmed: Option<String>,
    },
    /// Deliberately not compared, and why.
    Skipped(String),
    /// Could not be compared, and why.
    Failed(String),
}

impl Outcome {
    /// Whether it lets `verify` exit 0.
    pub fn acceptable(&self) -> bool {
        matches!(self, Outcome::Equal { .. } | Outcome::Skipped(_))
    }
}

/// The report lines of one pair: a status line, then up to [`SHOWN`] keys.
pub fn outcome_lines(pair: &str, outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Equal { rows } => vec![format!("OK {pair}: {rows} rows")],
        Outcome::Skipped(why) => vec![format!("SKIPPED {pair}: not compared: {why}")],
        Outcome::Failed(why) => vec![format!("FAILED {pair}: {why}")],
        Outcome::Different {
            source_rows,
            target_rows,
            diff,
            unconfirmed,
        } => {
            let mut head = format!(
                "DIFFERENT {pair}: source {source_rows} rows, target {target_rows}; \
                 {} missing, {} extra, {} different",
                diff.missing.len(),
                diff.extra.len(),
                diff.different.len()
            );
            if let Some(why) = unconfirmed {
                head.push_str(&format!(" (unconfirmed: {why})"));
            }
            let mut lines = vec![head];
            let keys = [
                ("missing", &diff.missing),
                ("extra", &diff.extra),
                ("different", &diff.different),
            ];
            let all: Vec<String> = keys
                .iter()
                .flat_map(|(what, ks)| ks.iter().map(move |k| format!("  {what} {k}")))
                .collect();
            let total = all.len();
            lines.extend(all.into_iter().take(SHOWN));
            if total > SHOWN {
                lines.push(format!("  … and {} more", total - SHOWN));
            }
            lines
        }
    }
}

// ---------------------------------------------------------------------------------------
// SQL: what each side computes.

/// What is compared for one map entry, and where each side's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Compared columns, in source order.
    pub columns: Vec<String>,
    /// Key columns (a subset of `columns`); empty: rows are a multiset.
    pub key: Vec<String>,
    /// A query yielding the source rows' compared columns.
    pub source: String,
    /// A query yielding the target rows' compared columns (this sid, current versions).
    pub target: String,
    pub extras_allowed: bool,
}

impl Plan {
    pub fn shape(&self) -> Shape {
        if self.key.is_empty() {
            Shape::Multiset
        } else {
            Shape::Keyed
        }
    }

    /// The text rows are told apart by: the key's (a single column as it prints), or
    /// the whole row's.
    fn key_text(&self) -> String {
        match self.key.as_slice() {
            [one] => format!("r.{}::text", ident(one)),
            [] => row_text(&self.columns),
            key => row_text(key),
        }
    }

    /// 60 bits of the md5 of the row's text: md5 is the same on every major (hashtext
    /// is not guaranteed to be), and 60 bits fit a bigint without its sign.
    fn row_hash(&self) -> String {
        format!(
            "('x' || substr(md5({}), 1, 15))::bit(60)::bigint",
            row_text(&self.columns)
        )
    }

    fn bucket(&self) -> String {
        format!(
            "(('x' || substr(md5({}), 1, 8))::bit(32)::int & {})",
            self.key_text(),
            BUCKETS - 1
        )
    }

    /// Per bucket: rows and hash sum, of the rows of `rows` (a query).
    pub fn buckets_sql(&self, rows: &str) -> String {
        format!(
            "SELECT b, count(*), sum(h)::text FROM (SELECT {} AS b, {} AS h FROM ({rows}) r) s \
             GROUP BY b",
            self.bucket(),
            self.row_hash()
        )
    }

    /// (key text, row hash or copies) of the rows of `rows` in buckets `$1`, and, when
    /// `$2` is not null, with a key in `$2`.
    pub fn keys_sql(&self, rows: &str) -> String {
        let filter = format!(
            "{} = ANY($1::int[]) AND ($2::text[] IS NULL OR {} = ANY($2::text[]))",
            self.bucket(),
            self.key_text()
        );
        match self.shape() {
            Shape::Keyed => format!(
                "SELECT {}, {} FROM ({rows}) r WHERE {filter}",
                self.key_text(),
                self.row_hash()
            ),
            Shape::Multiset => format!(
                "SELECT {} AS k, count(*) FROM ({rows}) r WHERE {filter} GROUP BY 1",
                self.key_text()
            ),
        }
    }
}

/// `ROW(r."a", r."b")::text`.
fn row_text(columns: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| format!("r.{}", ident(c))).collect();
    format!("ROW({})::text", cols.join(", "))
}

/// `SELECT "a", "b" FROM <from>[ WHERE <cond>]`.
fn select(columns: &[String], from: &str, cond: &str) -> String {
    let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
    let mut sql = format!("SELECT {} FROM {from}", cols.join(", "));
    if !cond.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(cond);
    }
    sql
}

/// A source table: schema, name, and whether it is partitioned (read with its
/// partitions).
pub type SourceTable = (String, String, bool);

/// The rows of the source tables of an entry: a partitioned root covers its partitions;
/// tables of a regex are read each without its inheritance children, as published.
pub fn source_rows(columns: &[String], tables: &[SourceTable]) -> String {
    if tables.is_empty() {
        let nulls: Vec<String> = columns
            .iter()
            .map(|c| format!("NULL::text AS {}", ident(c)))
            .collect();
        return format!("SELECT {} WHERE false", nulls.join(", "));
    }
    let parts: Vec<String> = tables
        .iter()
        .map(|(schema, name, partitioned)| {
            let only = if *partitioned { "" } else { "ONLY " };
            select(columns, &format!("{only}{}", qualified(schema, name)), "")
        })
        .collect();
    parts.join(" UNION ALL ")
}

/// The target rows that stand for the source of `sid`: its rows when the target has a
/// `sid` column, and of a history target only the current versions.
pub fn target_rows(
    columns: &[String],
    schema: &str,
    target: &str,
    sid: Option<&str>,
    history: bool,
) -> String {
    let mut conds = Vec::new();
    if let Some(sid) = sid {
        conds.push(format!("sid = {}", literal(sid)));
    }
    if history {
        conds.push("kvsz_end > '9000-01-01' AND kvsz_deleted IS NOT TRUE".to_string());
    }
    select(columns, &qualified(schema, target), &conds.join(" AND "))
}

// ---------------------------------------------------------------------------------------
// I/O: planning an entry, then comparing it.

/// Compares every chosen (source URL, table) pair.
pub fn verify(
    sources: &[SourceSpec],
    dest: &Endpoint,
    dest_schema: &str,
    default_schema: &str,
    options: &Options,
) -> Result<Report, String> {
    let chosen = choose(sources, default_schema, options)?;
    let mut dst = dest
        .sql()
        .map_err(|e| format!("connect to the destination: {}", describe(&e)))?;
    dst.batch_execute(SESSION)
        .map_err(|e| format!("destination: {}", describe(&e)))?;
    let mut report = Report {
        lines: Vec::new(),
        equal: true,
    };
    for (spec, entries) in chosen {
        let mut src = match spec
            .endpoint(&dest.application_name)
            .sql()
            .and_then(|mut c| c.batch_execute(SESSION).map(|()| c))
        {
            Ok(c) => c,
            Err(e) => {
                report.equal = false;
                report.lines.push(format!(
                    "FAILED {} ({}): cannot connect: {}",
                    spec.label(),
                    spec.conn.redacted(),
                    describe(&e)
                ));
                continue;
            }
        };
        for entry in entries {
            let pair = format!(
                "{} {}.{} -> {dest_schema}.{}",
                spec.label(),
                entry.schema,
                entry.table,
                entry.target
            );
            let outcome = verify_entry(&mut src, &mut dst, spec, entry, dest_schema);
            report.equal &= outcome.acceptable();
            report.lines.extend(outcome_lines(&pair, &outcome));
        }
    }
    Ok(report)
}

/// The sources and entries the options name; an error when they name nothing.
fn choose<'a>(
    sources: &'a [SourceSpec],
    default_schema: &str,
    options: &Options,
) -> Result<Vec<(&'a SourceSpec, Vec<&'a TableMap>)>, String> {
    let sid = options.sid.as_deref();
    let specs: Vec<&SourceSpec> = sources
        .iter()
        .filter(|s| sid.is_none_or(|sid| s.sid.as_str() == sid))
        .collect();
    if let (Some(sid), true) = (sid, specs.is_empty()) {
        return Err(format!("no source URL of the map has sid {sid:?}"));
    }
    let chosen: Vec<(&SourceSpec, Vec<&TableMap>)> = specs
        .into_iter()
        .map(|s| {
            let entries = s
                .tables
                .iter()
                .filter(|t| {
                    options
                        .table
                        .as_deref()
                        .is_none_or(|name| names(t, name, default_schema))
                })
                .collect();
            (s, entries)
        })
        .collect();
    if let Some(table) = &options.table {
        if chosen.iter().all(|(_, e)| e.is_empty()) {
            return Err(format!(
                "table {table:?} is not in the map{}",
                sid.map_or(String::new(), |s| format!(" for sid {s:?}"))
            ));
        }
    }
    Ok(chosen)
}

/// Plans and compares one pair; every failure becomes its outcome.
fn verify_entry(
    src: &mut Client,
    dst: &mut Client,
    spec: &SourceSpec,
    entry: &TableMap,
    dest_schema: &str,
) -> Outcome {
    if let Some(filter) = &entry.filter {
        return Outcome::Skipped(format!(
            "the target holds only the rows its filter {filter:?} passes, which SQL cannot \
             evaluate as CEL does"
        ));
    }
    let plan = match plan(src, dst, spec, entry, dest_schema) {
        Ok(Ok(plan)) => plan,
        Ok(Err(outcome)) => return outcome,
        Err(e) => return Outcome::Failed(describe(&e)),
    };
    match compare(src, dst, &spec.slot, &plan) {
        Ok(outcome) => outcome,
        Err(e) => {
            // Leave neither session in an aborted transaction for the next entry.
            let _ = src.batch_execute("ROLLBACK");
            let _ = dst.batch_execute("ROLLBACK");
            Outcome::Failed(describe(&e))
        }
    }
}

/// The source tables of an entry with the catalog facts of the one whose columns and
/// key stand for all: `(schema, name, partitioned)`, and that table (`None`: missing).
fn source_tables(
    src: &mut Client,
    entry: &TableMap,
) -> Result<(Vec<SourceTable>, Vec<TableInfo>), postgres::Error> {
    let names = match &entry.partitions_regex {
        Some(regex) => catalog::tables_matching(src, &entry.schema, regex)?,
        None => vec![entry.table.clone()],
    };
    let mut tables = Vec::new();
    let mut infos = Vec::new();
    for name in names {
        if let Some(info) = catalog::table_info(src, &entry.schema, &name)? {
            tables.push((entry.schema.clone(), name, info.relkind == 'p'));
            infos.push(info);
        }
    }
    Ok((tables, infos))
}

/// What to compare for one entry, or why it cannot be compared.
fn plan(
    src: &mut Client,
    dst: &mut Client,
    spec: &SourceSpec,
    entry: &TableMap,
    dest_schema: &str,
) -> Result<Result<Plan, Outcome>, postgres::Error> {
    let (tables, infos) = source_tables(src, entry)?;
    let Some(first) = infos.first() else {
        return Ok(Err(match &entry.partitions_regex {
            None => Outcome::Failed("the source table does not exist".into()),
            Some(regex) => Outcome::Skipped(format!("no source table matches {regex:?}")),
        }));
    };
    // Columns every source table has, in the first one's order.
    let columns: Vec<String> = first
        .columns
        .iter()
        .filter(|c| {
            infos
                .iter()
                .all(|i| i.columns.iter().any(|o| o.name == c.name))
        })
        .map(|c| c.name.clone())
        .collect();
    let key: Vec<String> = first
        .columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.clone())
        .collect();
    let loose = matches!(first.replica_identity, 'f' | 'n');
    Ok(
        plan_columns(dst, spec, entry, dest_schema, &columns, &key, loose)?
            .map(|plan| Plan {
                source: source_rows(&plan.columns, &tables),
                ..plan
            })
            .map_err(Outcome::Failed),
    )
}

/// The plan over source `columns` and `key` as the target restricts them, or why the
/// target cannot be compared. `loose`: without a replica identity key the rows may be
/// compared as a multiset when the target lacks a key column. Columns an entry's `set`
/// computes are not compared: the target holds the expression's value, not the source's.
fn plan_columns(
    dst: &mut Client,
    spec: &SourceSpec,
    entry: &TableMap,
    dest_schema: &str,
    columns: &[String],
    key: &[String],
    loose: bool,
) -> Result<Result<Plan, String>, postgres::Error> {
    let Some(target) = catalog::table_info(dst, dest_schema, &entry.target)? else {
        return Ok(Err(format!(
            "target {dest_schema}.{} does not exist",
            entry.target
        )));
    };
    let on_target = |c: &str| target.columns.iter().any(|t| t.name == c);
    let history = entry.mode.versions();
    if history && !(on_target("kvsz_end") && on_target("kvsz_deleted")) {
        return Ok(Err("history target lacks kvsz_end or kvsz_deleted".into()));
    }
    let compared: Vec<String> = columns
        .iter()
        .filter(|c| on_target(c))
        .filter(|c| !OWN_COLUMNS.contains(&c.as_str()))
        .filter(|c| !entry.set.iter().any(|(s, _)| s == *c))
        .cloned()
        .collect();
    if compared.is_empty() {
        return Ok(Err("source and target share no column".into()));
    }
    let mut key = key.to_vec();
    if !key.iter().all(|k| compared.contains(k)) {
        if !loose {
            return Ok(Err(
                "the source's key columns are not all on the target".into()
            ));
        }
        key.clear();
    }
    let has_sid = on_target("sid");
    let sid = has_sid.then(|| spec.sid.as_str());
    Ok(Ok(Plan {
        target: target_rows(&compared, dest_schema, &entry.target, sid, history),
        columns: compared,
        key,
        source: String::new(),
        extras_allowed: entry.mode.rules().keeps_removed() || (!has_sid && spec.family_size > 1),
    }))
}

/// A repeatable-read, read-only transaction: every query of it sees one snapshot.
fn snapshot(client: &mut Client) -> Result<postgres::Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
}

/// The source's WAL insert position: run first in a snapshot, it is at or past the
/// commit of every transaction the snapshot sees.
fn insert_lsn(tx: &mut impl GenericClient) -> Result<String, postgres::Error> {
    Ok(tx
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])?
        .get(0))
}

fn buckets(client: &mut impl GenericClient, sql: &str) -> Result<Buckets, postgres::Error> {
    Ok(client
        .query(sql, &[])?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

fn rows(buckets: &Buckets) -> i64 {
    buckets.values().map(|(n, _)| n).sum()
}

/// What `rows` holds under each key of `buckets` (and of `wanted`, when given).
fn keys(
    client: &mut impl GenericClient,
    plan: &Plan,
    rows: &str,
    buckets: &[i32],
    wanted: Option<&[String]>,
) -> Result<Keys, postgres::Error> {
    let buckets = buckets.to_vec();
    let wanted = wanted.map(<[String]>::to_vec);
    let mut out = Keys::new();
    for row in client.query(&plan.keys_sql(rows), &[&buckets, &wanted])? {
        let key = row
            .get::<_, Option<String>>(0)
            .unwrap_or_else(|| "NULL".into());
        let value: i64 = row.get(1);
        match plan.shape() {
            Shape::Multiset => {
                out.insert(key, value);
            }
            Shape::Keyed => {
                out.entry(key)
                    .and_modify(|v| *v = DUPLICATE)
                    .or_insert(value);
            }
        }
    }
    Ok(out)
}

/// Polls until slot `slot` has confirmed `lsn`: the destination then holds every change
/// the snapshot taken at `lsn` sees. `Some(why)` when it does not within [`CATCH_UP`]
/// (a slot nobody streams from gets a few seconds only).
fn catch_up(
    client: &mut impl GenericClient,
    slot: &str,
    lsn: &str,
) -> Result<Option<String>, postgres::Error> {
    let start = Instant::now();
    loop {
        let rows = client.query(
            "SELECT active_pid IS NOT NULL, confirmed_flush_lsn >= $2::text::pg_lsn, \
                    pg_wal_lsn_diff($2::text::pg_lsn, confirmed_flush_lsn)::bigint \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )?;
        let Some(row) = rows.first() else {
            return Ok(Some(format!("slot {slot} does not exist")));
        };
        let (active, done, behind): (bool, Option<bool>, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        if done == Some(true) {
            return Ok(None);
        }
        let waited = start.elapsed();
        let behind = behind.map_or("an unknown number of".into(), |b| b.to_string());
        if !active && waited >= Duration::from_secs(2) {
            return Ok(Some(format!(
                "slot {slot} is not streaming; it is {behind} bytes behind the source snapshot"
            )));
        }
        if waited >= CATCH_UP {
            return Ok(Some(format!(
                "slot {slot} is still {behind} bytes behind the source snapshot after {}s",
                CATCH_UP.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `keys` without those not in `wanted`.
fn restrict(keys: Keys, wanted: &[String]) -> Keys {
    keys.into_iter()
        .filter(|(k, _)| wanted.binary_search(k).is_ok())
        .collect()
}

/// Compares one planned pair: buckets, then the keys of the differing buckets, then
/// those keys again until they stand for [`ROUNDS`] rounds, stop differing, or the slot
/// lags. Later rounds catch a key that changed and changed back between two snapshots
/// while the destination was read in between.
fn compare(
    src: &mut Client,
    dst: &mut Client,
    slot: &str,
    plan: &Plan,
) -> Result<Outcome, postgres::Error> {
    let (shape, extras) = (plan.shape(), plan.extras_allowed);
    let mut a = snapshot(src)?;
    let mut lsn = insert_lsn(&mut a)?;
    let src_buckets = buckets(&mut a, &plan.buckets_sql(&plan.source))?;
    let dst_buckets = buckets(dst, &plan.buckets_sql(&plan.target))?;
    let (source_rows, target_rows) = (rows(&src_buckets), rows(&dst_buckets));
    let differing = differing_buckets(&src_buckets, &dst_buckets);
    let equal = Outcome::Equal { rows: source_rows };
    if differing.is_empty() {
        return Ok(equal);
    }
    let mut lag = catch_up(&mut a, slot, &lsn)?;
    let mut d = snapshot(dst)?;
    let mut dst_keys = keys(&mut d, plan, &plan.target, &differing, None)?;
    d.commit()?;
    let mut before = keys(&mut a, plan, &plan.source, &differing, None)?;
    a.commit()?;
    let mut wanted = diff_keys(&before, &dst_keys, shape, extras).keys();
    let mut diff = Diff::default();
    for round in 0..ROUNDS {
        if wanted.is_empty() || (round > 0 && lag.is_some()) {
            break;
        }
        if round > 0 {
            lag = catch_up(src, slot, &lsn)?;
            let mut d = snapshot(dst)?;
            dst_keys = keys(&mut d, plan, &plan.target, &differing, Some(&wanted))?;
            d.commit()?;
        }
        let mut b = snapshot(src)?;
        lsn = insert_lsn(&mut b)?;
        let after = keys(&mut b, plan, &plan.source, &differing, Some(&wanted))?;
        b.commit()?;
        let before_w = restrict(std::mem::take(&mut before), &wanted);
        let dst_w = restrict(std::mem::take(&mut dst_keys), &wanted);
        diff = settle(&before_w, &after, &dst_w, shape, extras);
        wanted = diff.keys();
        before = after;
    }
    if diff.is_empty() {
        return Ok(equal);
    }
    Ok(Outcome::Different {
        source_rows,
        target_rows,
        diff,
        unconfirmed: lag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, i64)]) -> Keys {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn buckets_differ_by_count_sum_or_presence() {
        let src: Buckets = [
            (1, (2, "10".into())),
            (2, (1, "5".into())),
            (3, (1, "7".into())),
        ]
        .into_iter()
        .collect();
        let dst: Buckets = [
            (1, (2, "10".into())),
            (2, (1, "6".into())),
            (4, (1, "1".into())),
        ]
        .into_iter()
        .collect();
        assert_eq!(differing_buckets(&src, &dst), vec![2, 3, 4]);
        assert!(differing_buckets(&src, &src).is_empty());
    }

    #[test]
    fn keyed_differences_are_missing_extra_or_different() {
        let src = keys(&[("1", 10), ("2", 20), ("3", 30)]);
        let dst = keys(&[("1", 10), ("2", 21), ("4", 40)]);
        let diff = diff_keys(&src, &dst, Shape::Keyed, false);
        assert_eq!(diff.missing, strings(&["3"]));
        assert_eq!(diff.extra, strings(&["4"]));
        assert_eq!(diff.different, strings(&["2"]));
        assert_eq!(diff.keys(), strings(&["2", "3", "4"]));
        // Append: what the source deleted may stay.
        let diff = diff_keys(&src, &dst, Shape::Keyed, true);
        assert!(diff.extra.is_empty());
        assert_eq!(diff.missing.len() + diff.different.len(), 2);
        // A key the target holds twice is never equal.
        let dup = keys(&[("1", DUPLICATE), ("2", 20), ("3", 30)]);
        assert_eq!(
            diff_keys(&src, &dup, Shape::Keyed, false).different,
            strings(&["1"])
        );
    }

    #[test]
    fn multiset_copies_missing_or_extra() {
        let src = keys(&[("(1,a)", 2), ("(2,b)", 1)]);
        let dst = keys(&[("(1,a)", 1), ("(2,b)", 3), ("(3,c)", 1)]);
        let diff = diff_keys(&src, &dst, Shape::Multiset, false);
        assert_eq!(diff.missing, strings(&["(1,a)"]));
        assert_eq!(diff.extra, strings(&["(2,b)", "(3,c)"]));
        assert!(diff.different.is_empty());
        let diff = diff_keys(&src, &dst, Shape::Multiset, true);
        assert_eq!(diff.missing, strings(&["(1,a)"]));
        assert!(diff.extra.is_empty());
    }

    #[test]
    fn only_keys_the_source_kept_still_count() {
        // Key 1 changed on the source between the snapshots: the destination may have
        // seen either value. Key 2 stood still and the destination disagrees: it counts.
        let before = keys(&[("1", 10), ("2", 20), ("3", 30)]);
        let after = keys(&[("1", 11), ("2", 20), ("3", 30)]);
        let dst = keys(&[("1", 11), ("2", 99), ("3", 30), ("5", 50)]);
        let diff = settle(&before, &after, &dst, Shape::Keyed, false);
        assert_eq!(diff.different, strings(&["2"]));
        assert_eq!(diff.extra, strings(&["5"]));
        assert!(diff.missing.is_empty());
        // A row inserted after the first snapshot and already applied is no extra.
        let after = keys(&[("1", 10), ("2", 20), ("3", 30), ("5", 50)]);
        assert!(settle(&before, &after, &dst, Shape::Keyed, false)
            .extra
            .is_empty());
    }

    #[test]
    fn report_lines_name_the_pair_and_at_most_twenty_keys() {
        let pair = "db/a public.t -> public.t";
        assert_eq!(
            outcome_lines(pair, &Outcome::Equal { rows: 3 }),
            vec!["OK db/a public.t -> public.t: 3 rows"]
        );
        let diff = Diff {
            missing: strings(&["5"]),
            extra: strings(&["7"]),
            different: strings(&["3"]),
        };
        let out = Outcome::Different {
            source_rows: 10,
            target_rows: 9,
            diff,
            unconfirmed: None,
        };
        assert!(!out.acceptable());
        assert_eq!(
            outcome_lines(pair, &out),
            vec![
                "DIFFERENT db/a public.t -> public.t: source 10 rows, target 9; 1 missing, \
                 1 extra, 1 different",
                "  missing 5",
                "  extra 7",
                "  different 3",
            ]
        );
        let many = Outcome::Different {
            source_rows: 30,
            target_rows: 0,
            diff: Diff {
                missing: (0..30).map(|i| i.to_string()).collect(),
                ..Diff::default()
            },
            unconfirmed: Some("slot s lags".into()),
        };
        let lines = outcome_lines(pair, &many);
        assert_eq!(lines.len(), 1 + SHOWN + 1);
        assert!(lines[0].ends_with("(unconfirmed: slot s lags)"));
        assert_eq!(lines[SHOWN + 1], "  … and 10 more");
        assert!(Outcome::Skipped("filter".into()).acceptable());
        assert!(!Outcome::Failed("gone".into()).acceptable());
    }

    #[test]
    fn sql_quotes_names_and_sids() {
        let columns = strings(&["Id \"x\"", "v.w"]);
        let source = source_rows(
            &columns,
            &[
                ("S".into(), "t'1".into(), false),
                ("S".into(), "root".into(), true),
            ],
        );
        assert_eq!(
            source,
            "SELECT \"Id \"\"x\"\"\", \"v.w\" FROM ONLY \"S\".\"t'1\" UNION ALL \
             SELECT \"Id \"\"x\"\"\", \"v.w\" FROM \"S\".\"root\""
        );
        assert!(source_rows(&columns, &[]).ends_with("WHERE false"));
        let target = target_rows(&columns, "dst", "Tgt", Some("o'k"), true);
        assert_eq!(
            target,
            "SELECT \"Id \"\"x\"\"\", \"v.w\" FROM \"dst\".\"Tgt\" WHERE sid = 'o''k' AND \
             kvsz_end > '9000-01-01' AND kvsz_deleted IS NOT TRUE"
        );
        let plan = Plan {
            columns: columns.clone(),
            key: strings(&["Id \"x\""]),
            source,
            target,
            extras_allowed: false,
        };
        let keys = plan.keys_sql("SELECT 1");
        assert!(keys.starts_with("SELECT r.\"Id \"\"x\"\"\"::text, ('x' || substr(md5(ROW("));
        assert!(plan.buckets_sql("SELECT 1").contains("& 1023"));
        let multiset = Plan {
            key: vec![],
            ..plan
        };
        assert_eq!(multiset.shape(), Shape::Multiset);
        assert!(multiset
            .keys_sql("SELECT 1")
            .starts_with("SELECT ROW(r.\"Id \"\"x\"\"\", r.\"v.w\")::text AS k, count(*)"));
    }
}
