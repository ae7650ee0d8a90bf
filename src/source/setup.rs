//! Bringing a source to the point where it can stream: prerequisites, the publications
//! matching the map, the slot, and the initial copy of every table that needs one.
//!
//! Two publications share the slot: `<slot>` carries every change of the tables with a
//! replica identity, `<slot>_ins` only INSERT and TRUNCATE of those without one (so that
//! PostgreSQL keeps accepting their UPDATE and DELETE on the source). A table that cannot
//! be replicated at all is left out of both and reported; the rest of the source streams.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use log::{info, warn};
use postgres::Client;

use crate::apply::writer::RejectPolicy;
use crate::config::TableMap;
use crate::expr::{Kind, TableExprs};
use crate::fault::Side;
use crate::pg::catalog::{self, TableInfo};
use crate::pg::quote::{ident, literal, qualified};
use crate::pg::replication::ReplicationConnection;
use crate::pg::Lsn;
use crate::status::State;
use crate::store::{self, Phase, SyncState, INS_MARKER};

use super::careful::RefusedRow;
use super::mapping::HISTORY_COLUMNS;
use super::sync::{copy_group, CopyError, CopyOptions, CopyPlan, Deadletter, RateLimiter};
use super::{SourceEnv, SourceError, SourceSpec, SYNC_STATE_TABLE};

/// Source table name as `(schema, table)`.
pub type TableName = (String, String);

/// Where streaming starts and what the stream must know of the tables.
pub struct StartPoint {
    pub repl: ReplicationConnection,
    pub start: Lsn,
    pub server_version: u32,
    /// The publications to stream (the `_ins` one only once the slot is past its creation).
    pub publications: Vec<String>,
    /// Stream only up to here, then set up again: a publication changed after the slot's
    /// position. PostgreSQL before 18 fails on WAL older than a publication it is asked
    /// for, and 12 keeps a table unpublished in a walsender that decoded a transaction
    /// from before the table entered the publication.
    pub restart_at: Option<Lsn>,
    pub routes: HashMap<TableName, Route>,
    /// Mapped tables left out of the publications, with the reason (their changes still
    /// in the slot's WAL are skipped).
    pub excluded: HashMap<TableName, String>,
    /// Map entries that stand for a changing set of tables (a partitioned root, a
    /// `partitions_regex`), with the tables they stood for at set-up.
    pub dynamic: Vec<(TableMap, BTreeSet<TableName>)>,
}

/// How the changes of one published source table are carried.
#[derive(Clone, Debug)]
pub struct Route {
    pub map: TableMap,
    /// The copy holds every transaction that committed before this LSN: the stream skips
    /// the table's changes of those, so each arrives exactly once.
    pub copied_at: Lsn,
    /// Published for INSERT and TRUNCATE only (no replica identity).
    pub insert_only: bool,
    /// The target has no `sid` column and several URLs write into it: a TRUNCATE from one
    /// of them cannot be confined to its rows.
    pub shared: bool,
    /// How many source tables of this source (itself included) feed its target.
    pub siblings: usize,
}

/// A mapped table as both catalogs describe it.
struct Resolved {
    source: TableInfo,
    plan: CopyPlan,
    map: TableMap,
    insert_only: bool,
    shared: bool,
}

impl Resolved {
    fn name(&self) -> TableName {
        (self.source.schema.clone(), self.source.name.clone())
    }
    /// Its key in `kvsz_sync_state`.
    fn key(&self) -> String {
        format!("{}.{}", self.source.schema, self.source.name)
    }
    /// Its target (`schema.table`).
    fn target(&self) -> String {
        format!("{}.{}", self.plan.target_schema, self.plan.target_table)
    }
    /// Its target as recorded in `kvsz_sync_state`, with a digest of the entry's
    /// `filter` and `set` when it has them: a changed target, `database.schema`, filter
    /// or set is a table to copy again, so the target holds exactly the source rows that
    /// pass the current filter, with the current computed values (SPEC §3).
    fn recorded(&self) -> String {
        match self.map.expressions_digest() {
            Some(d) => format!("{} [filter/set {d:016x}]", self.target()),
            None => self.target(),
        }
    }
}

/// An error of a session to the source.
fn sql_err(
    spec: &SourceSpec,
    context: impl Into<String>,
) -> impl FnOnce(postgres::Error) -> SourceError {
    side_err(spec, context, Side::Source)
}

/// An error of a session to the destination.
fn dest_err(
    spec: &SourceSpec,
    context: impl Into<String>,
) -> impl FnOnce(postgres::Error) -> SourceError {
    side_err(spec, context, Side::Destination)
}

fn side_err(
    spec: &SourceSpec,
    context: impl Into<String>,
    side: Side,
) -> impl FnOnce(postgres::Error) -> SourceError {
    let source = spec.label();
    let context = context.into();
    move |error| SourceError::Sql {
        source,
        context,
        side,
        error,
    }
}

fn repl_err(
    spec: &SourceSpec,
    context: impl Into<String>,
) -> impl FnOnce(crate::pg::replication::PgError) -> SourceError {
    let source = spec.label();
    let context = context.into();
    move |error| SourceError::Replication {
        source,
        context,
        error: Box::new(error),
    }
}

fn prerequisite(spec: &SourceSpec, message: String) -> SourceError {
    SourceError::Prerequisite {
        source: spec.label(),
        message,
    }
}

/// Opens an ordinary SQL connection to the source.
pub fn connect_source(spec: &SourceSpec, env: &SourceEnv) -> Result<Client, SourceError> {
    spec.endpoint(&env.app_name).sql().map_err(sql_err(
        spec,
        format!("connect to {}", spec.conn.redacted()),
    ))
}

/// Opens a walsender connection to the source.
fn connect_replication(
    spec: &SourceSpec,
    env: &SourceEnv,
) -> Result<ReplicationConnection, SourceError> {
    spec.endpoint(&env.app_name).replication().map_err(repl_err(
        spec,
        format!("replication connection to {}", spec.conn.redacted()),
    ))
}

/// Opens a destination connection (the same session settings as the writers').
/// Runs `f` on one of the destination sessions streaming sources share for short
/// queries (see [`crate::pg::pool`]); `context` names the work in an error.
pub fn on_dest<T>(
    spec: &SourceSpec,
    env: &SourceEnv,
    context: &str,
    f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
) -> Result<T, SourceError> {
    env.sessions.catalog.with(
        dest_err(spec, format!("connect to the destination to {context}")),
        |c| f(c).map_err(dest_err(spec, context)),
    )
}

/// Checks what the server must offer before anything is created on it.
fn check_prerequisites(spec: &SourceSpec, src: &mut Client) -> Result<(), SourceError> {
    let level = catalog::wal_level(src).map_err(sql_err(spec, "read wal_level"))?;
    if level != "logical" {
        return Err(prerequisite(
            spec,
            format!(
                "wal_level is '{level}'; logical replication needs wal_level = logical: \
                 set it in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart the server"
            ),
        ));
    }
    if !catalog::can_replicate(src).map_err(sql_err(spec, "read role attributes"))? {
        return Err(prerequisite(
            spec,
            format!(
                "role {:?} may not open replication connections: ALTER ROLE {} REPLICATION",
                spec.conn.user,
                ident(&spec.conn.user)
            ),
        ));
    }
    Ok(())
}

/// Looks up every mapped table on both sides. What cannot be replicated is returned
/// apart, with the reason, to be left out and reported; nothing here stops the source.
fn resolve_tables(
    spec: &SourceSpec,
    dest_schema: &str,
    src: &mut Client,
    dest: &mut Client,
) -> Result<(Vec<Resolved>, HashMap<TableName, String>), SourceError> {
    let mut out: Vec<Resolved> = Vec::new();
    let mut excluded = HashMap::new();
    for t in &spec.tables {
        for ((schema, table), info) in source_tables(spec, src, t)? {
            let name = format!("{schema}.{table}");
            let mut exclude = |reason: String| {
                warn!(
                    "source {}: table {name} is not replicated: {reason}; the rest of the source \
                     streams, and the table is published and copied at the next start once fixed",
                    spec.label()
                );
                excluded.insert((schema.clone(), table.clone()), reason);
            };
            // A regex, a partitioned root and an explicit entry may name the same table:
            // one table has one target.
            if let Some(first) = out
                .iter()
                .find(|r| r.name() == (schema.clone(), table.clone()))
            {
                warn!(
                    "source {}: table {name} is named by two map entries ({}.{} and {}.{}): it \
                     follows the first only",
                    spec.label(),
                    first.map.schema,
                    first.map.table,
                    t.schema,
                    t.table
                );
                continue;
            }
            let Some(info) = info else {
                exclude("the source table does not exist".into());
                continue;
            };
            if let Some(r) = resolve_one(spec, dest_schema, dest, t, info, &mut exclude)? {
                out.push(r);
            }
        }
    }
    Ok((out, excluded))
}

/// What `check` says of one mapped source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableStatus {
    /// Replicated into this target (`schema.table`).
    Ok { target: String },
    /// No replica identity: only INSERT and TRUNCATE are carried.
    InsertsOnly { target: String },
    /// A target without `sid` that several URLs write into.
    Shared { target: String },
    /// A filtered table whose replicated `columns` may be stored out of line: an UPDATE
    /// that brings a row into the filter while leaving one of them unchanged cannot be
    /// completed (the source does not send it, the target has no row to take it from).
    UnsentValues {
        target: String,
        columns: Vec<String>,
    },
    /// Left out of the publications, for this reason.
    Excluded { reason: String },
}

/// Every source table the map names for `spec`, as the daemon would publish it.
pub fn table_report(
    spec: &SourceSpec,
    dest_schema: &str,
    src: &mut Client,
    dest: &mut Client,
) -> Result<Vec<(String, TableStatus)>, SourceError> {
    let (resolved, excluded) = resolve_tables(spec, dest_schema, src, dest)?;
    let mut out: Vec<(String, TableStatus)> = resolved
        .iter()
        .map(|r| {
            let target = r.target();
            let unsent: Vec<String> = r
                .source
                .columns
                .iter()
                .filter(|c| c.toastable && !c.is_key && r.plan.columns.contains(&c.name))
                .map(|c| c.name.clone())
                .collect();
            let status = if r.insert_only {
                TableStatus::InsertsOnly { target }
            } else if r.map.filter.is_some()
                && r.source.replica_identity != 'f'
                && !unsent.is_empty()
            {
                TableStatus::UnsentValues {
                    target,
                    columns: unsent,
                }
            } else if r.shared {
                TableStatus::Shared { target }
            } else {
                TableStatus::Ok { target }
            };
            (r.key(), status)
        })
        .collect();
    out.extend(excluded.into_iter().map(|((schema, table), reason)| {
        (
            format!("{schema}.{table}"),
            TableStatus::Excluded { reason },
        )
    }));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The map entries whose set of source tables can change while streaming (partitions
/// attached or detached, tables matching a regex created), with their current tables.
fn dynamic_entries(
    spec: &SourceSpec,
    src: &mut Client,
) -> Result<Vec<(TableMap, BTreeSet<TableName>)>, SourceError> {
    let mut out = Vec::new();
    for t in &spec.tables {
        let tables = source_tables(spec, src, t)?;
        let dynamic = t.partitions_regex.is_some()
            || tables.len() != 1
            || tables[0].0 != (t.schema.clone(), t.table.clone());
        if dynamic {
            out.push((t.clone(), tables.into_iter().map(|(n, _)| n).collect()));
        }
    }
    Ok(out)
}

/// Whether any dynamic entry now stands for other tables than at set-up.
pub fn tables_changed(
    spec: &SourceSpec,
    src: &mut Client,
    dynamic: &[(TableMap, BTreeSet<TableName>)],
) -> Result<bool, SourceError> {
    for (t, before) in dynamic {
        let now: BTreeSet<TableName> = source_tables(spec, src, t)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if &now != before {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The source tables a map entry stands for, each with its catalog facts (`None`: it
/// does not exist): the tables matching `partitions_regex`, the leaf partitions of a
/// partitioned table at any depth and in any schema (published one by one, which every
/// major supports), or the table.
fn source_tables(
    spec: &SourceSpec,
    src: &mut Client,
    t: &TableMap,
) -> Result<Vec<(TableName, Option<TableInfo>)>, SourceError> {
    let lookup = |src: &mut Client, schema: &str, name: &str| {
        catalog::table_info(src, schema, name)
            .map_err(sql_err(spec, format!("look up {schema}.{name}")))
    };
    let names: Vec<TableName> = match &t.partitions_regex {
        Some(regex) => {
            let names = catalog::tables_matching(src, &t.schema, regex).map_err(sql_err(
                spec,
                format!("list the tables of {} matching {regex:?}", t.schema),
            ))?;
            if names.is_empty() {
                warn!(
                    "source {}: no table of schema {} matches partitions_regex {regex:?} of {}",
                    spec.label(),
                    t.schema,
                    t.table
                );
            }
            names.into_iter().map(|n| (t.schema.clone(), n)).collect()
        }
        None => match lookup(src, &t.schema, &t.table)? {
            Some(info) if info.relkind == 'p' => catalog::leaf_partitions(src, &t.schema, &t.table)
                .map_err(sql_err(
                    spec,
                    format!("list the partitions of {}.{}", t.schema, t.table),
                ))?,
            info => return Ok(vec![((t.schema.clone(), t.table.clone()), info)]),
        },
    };
    let mut out = Vec::with_capacity(names.len());
    for (schema, name) in names {
        let info = lookup(src, &schema, &name)?;
        out.push(((schema, name), info));
    }
    Ok(out)
}

/// Checks one source table against its target; `None` when it is excluded (and
/// reported through `exclude`).
fn resolve_one(
    spec: &SourceSpec,
    dest_schema: &str,
    dest: &mut Client,
    t: &TableMap,
    info: TableInfo,
    exclude: &mut dyn FnMut(String),
) -> Result<Option<Resolved>, SourceError> {
    let name = format!("{}.{}", info.schema, info.name);
    let target_name = format!("{}.{}", dest_schema, t.target);
    let Some(target) = catalog::table_info(dest, dest_schema, &t.target)
        .map_err(dest_err(spec, format!("look up target {target_name}")))?
    else {
        exclude(format!(
            "its target table {target_name} does not exist on the destination"
        ));
        return Ok(None);
    };
    let has_sid = target.columns.iter().any(|c| c.name == "sid");
    let shared = !has_sid && spec.family_size > 1;
    let on_target = |c: &str| target.columns.iter().any(|tc| tc.name == c);
    let history = t.mode.versions();
    let ours = |c: &str| (has_sid && c == "sid") || (history && HISTORY_COLUMNS.contains(&c));
    let columns: Vec<String> = info
        .columns
        .iter()
        .filter(|c| !ours(&c.name))
        .filter(|c| on_target(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if columns.is_empty() {
        exclude(format!(
            "it and its target {target_name} have no column name in common"
        ));
        return Ok(None);
    }
    let insert_only = !info.has_identity;
    // Compiled at load already (a bad expression stops the program there).
    let exprs = TableExprs::compile(t).map_err(|message| SourceError::Prerequisite {
        source: spec.label(),
        message,
    })?;
    if let Some(e) = &exprs {
        let on_source = |c: &str| info.columns.iter().any(|sc| sc.name == c);
        if let Some(v) = e.variables().iter().find(|v| !on_source(v)) {
            exclude(format!(
                "its filter or set refers to {v}, which is not a column of the source table"
            ));
            return Ok(None);
        }
        for c in e.set_columns() {
            if !on_target(c) {
                exclude(format!(
                    "set column {c:?} does not exist on its target {target_name}"
                ));
                return Ok(None);
            }
            if info.columns.iter().any(|sc| sc.name == c && sc.is_key) {
                exclude(format!(
                    "set column {c:?} is part of the source's key, which finds the row: it \
                     cannot be computed"
                ));
                return Ok(None);
            }
        }
    }
    if history {
        if let Some(c) = HISTORY_COLUMNS.iter().find(|c| !on_target(c)) {
            exclude(format!(
                "type = \"history\" but its target {target_name} has no column {c} (it needs \
                 kvsz_start timestamptz, kvsz_end timestamptz, kvsz_deleted boolean)"
            ));
            return Ok(None);
        }
        if insert_only || info.replica_identity == 'f' {
            exclude(
                "type = \"history\" needs a primary key or REPLICA IDENTITY USING INDEX: a \
                 row's versions are found by its key"
                    .into(),
            );
            return Ok(None);
        }
    }
    if info.replica_identity != 'f' && !insert_only {
        if let Some(k) = info
            .columns
            .iter()
            .find(|c| c.is_key && !(has_sid && c.name == "sid") && !on_target(&c.name))
        {
            exclude(format!(
                "its key column {:?} does not exist on the target {target_name}",
                k.name
            ));
            return Ok(None);
        }
    }
    if insert_only {
        warn!(
                "source {}: table {name} has no primary key and no replica identity: only its \
                 INSERTs and TRUNCATEs are replicated (publication {}_ins); its UPDATEs and \
                 DELETEs are not carried. Add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
                spec.label(),
                spec.slot,
                qualified(&t.schema, &t.table)
            );
    }
    if shared {
        warn!(
            "source {}: target table {target_name} has no sid column and {} URLs of source {} \
                 write into it: their keys must never collide, and a TRUNCATE from one of them \
                 is not applied (it cannot be confined to its rows). Add a column sid text to \
                 it (and to its primary key) to keep them apart",
            spec.label(),
            spec.family_size,
            spec.database
        );
    }
    let set_extra: Vec<String> = exprs
        .iter()
        .flat_map(|e| e.set_columns())
        .filter(|c| !columns.iter().any(|s| s == c))
        .map(String::from)
        .collect();
    let plan = CopyPlan {
        source_schema: info.schema.clone(),
        source_table: info.name.clone(),
        target_schema: dest_schema.to_string(),
        target_table: t.target.clone(),
        columns,
        key: info
            .columns
            .iter()
            .filter(|c| c.is_key && on_target(&c.name))
            .map(|c| c.name.clone())
            .collect(),
        sid: has_sid.then(|| spec.sid.clone()),
        mode: t.mode,
        shared,
        source_columns: info
            .columns
            .iter()
            .map(|c| (c.name.clone(), Kind::from_type_name(&c.type_name)))
            .collect(),
        set_extra,
        exprs,
    };
    Ok(Some(Resolved {
        source: info,
        plan,
        map: t.clone(),
        insert_only,
        shared,
    }))
}

/// `ONLY`: an inheritance parent's children are not published with it.
fn table_list(tables: &[&TableName]) -> String {
    tables
        .iter()
        .map(|(s, t)| format!("ONLY {}", qualified(s, t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Makes publication `name` (created `WITH with` when missing, unless it would be empty
/// and `create_empty` is off) name exactly `wanted`. Returns the tables it added, and
/// whether the publication exists now.
fn reconcile_publication(
    spec: &SourceSpec,
    src: &mut Client,
    name: &str,
    with: &str,
    wanted: &BTreeSet<TableName>,
    create_empty: bool,
) -> Result<(BTreeSet<TableName>, bool), SourceError> {
    let pubname = ident(name);
    if !catalog::publication_exists(src, name).map_err(sql_err(spec, "look up publication"))? {
        if wanted.is_empty() && !create_empty {
            return Ok((BTreeSet::new(), false));
        }
        let list: Vec<&TableName> = wanted.iter().collect();
        let tables = if list.is_empty() {
            String::new()
        } else {
            format!(" FOR TABLE {}", table_list(&list))
        };
        src.batch_execute(&format!("CREATE PUBLICATION {pubname}{tables}{with}"))
            .map_err(sql_err(
                spec,
                format!(
                    "create publication {name} (the role must own the mapped tables, or be superuser)"
                ),
            ))?;
        info!("source {}: created publication {name}", spec.label());
        return Ok((wanted.clone(), true));
    }
    let current: BTreeSet<TableName> = catalog::publication_tables(src, name)
        .map_err(sql_err(spec, "list publication tables"))?
        .into_iter()
        .collect();
    let add: Vec<&TableName> = wanted.difference(&current).collect();
    let drop: Vec<&TableName> = current.difference(wanted).collect();
    if !drop.is_empty() {
        src.batch_execute(&format!(
            "ALTER PUBLICATION {pubname} DROP TABLE {}",
            table_list(&drop)
        ))
        .map_err(sql_err(spec, "remove tables from the publication"))?;
        info!(
            "source {}: removed {} from publication {name}",
            spec.label(),
            table_list(&drop)
        );
    }
    if !add.is_empty() {
        src.batch_execute(&format!(
            "ALTER PUBLICATION {pubname} ADD TABLE {}",
            table_list(&add)
        ))
        .map_err(sql_err(
            spec,
            "add tables to the publication (the role must own them, or be superuser)",
        ))?;
        info!(
            "source {}: added {} to publication {name}",
            spec.label(),
            table_list(&add)
        );
    }
    Ok((add.into_iter().cloned().collect(), true))
}

/// Sync states recorded on the destination for this slot, by source table.
fn sync_states(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
) -> Result<HashMap<String, SyncState>, SourceError> {
    store::load_sync_states(dest, &env.dest_schema, &spec.slot)
        .map_err(dest_err(spec, "read sync state"))
}

/// Records `phase` for `tables` in one destination transaction (after clearing the
/// slot's old rows when `clear` is set).
fn record_states(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
    tables: &[&Resolved],
    phase: Phase,
    clear: bool,
) -> Result<(), SourceError> {
    if tables.is_empty() && !clear {
        return Ok(());
    }
    let mut batch = String::from("BEGIN;");
    if clear {
        // A new slot: its copies, and the positions its writers recorded (another
        // server's LSNs, if it was replaced), start over.
        batch.push_str(&store::clear_slot_sql(&env.dest_schema, &spec.slot));
        batch.push(';');
    }
    for r in tables {
        batch.push_str(&store::sync_state_sql(
            &env.dest_schema,
            &spec.slot,
            &r.key(),
            &r.recorded(),
            phase,
            None,
        ));
        batch.push(';');
    }
    batch.push_str("COMMIT");
    dest.batch_execute(&batch)
        .map_err(dest_err(spec, "record sync state"))
}

/// Whether another schema of the destination records copies of this slot: then
/// `database.schema` changed, and its tables are copied again into the new schema's
/// targets rather than adopted as copied.
fn copied_elsewhere(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
) -> Result<bool, SourceError> {
    let schemas: Vec<String> = dest
        .query(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relname = $1 AND c.relkind = 'r' AND n.nspname <> $2",
            &[&SYNC_STATE_TABLE, &env.dest_schema],
        )
        .map_err(dest_err(spec, "look for other sync states"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for schema in schemas {
        let found = dest
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE slot_name = $1)",
                    qualified(&schema, SYNC_STATE_TABLE)
                ),
                &[&spec.slot],
            )
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
        if found {
            info!(
                "source {}: slot {} was copied into schema {schema} before; its tables are \
                 copied again into schema {}",
                spec.label(),
                spec.slot,
                env.dest_schema
            );
            return Ok(true);
        }
    }
    Ok(false)
}

/// Records that the `_ins` publication may be streamed from `lsn` on.
fn record_ins_marker(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
    lsn: Lsn,
) -> Result<(), SourceError> {
    dest.batch_execute(&store::sync_state_sql(
        &env.dest_schema,
        &spec.slot,
        INS_MARKER,
        &ins_publication(spec),
        Phase::Publication,
        Some(lsn),
    ))
    .map_err(dest_err(spec, "record sync state"))
}

/// Name of the publication of tables without a replica identity (SPEC §5).
pub fn ins_publication(spec: &SourceSpec) -> String {
    format!("{}_ins", spec.slot)
}

/// Both publications made to match the map: returns the tables added to either (they
/// are copied again: a table moving between them lost its updates meanwhile) and
/// whether the `_ins` publication exists.
fn reconcile_publications(
    spec: &SourceSpec,
    src: &mut Client,
    tables: &[Resolved],
) -> Result<(BTreeSet<TableName>, bool), SourceError> {
    let (ins, changes): (Vec<&Resolved>, Vec<&Resolved>) =
        tables.iter().partition(|r| r.insert_only);
    let names = |v: &[&Resolved]| v.iter().map(|r| r.name()).collect::<BTreeSet<_>>();
    let (mut added, _) = reconcile_publication(spec, src, &spec.slot, "", &names(&changes), true)?;
    let (added_ins, ins_exists) = reconcile_publication(
        spec,
        src,
        &ins_publication(spec),
        " WITH (publish = 'insert, truncate')",
        &names(&ins),
        false,
    )?;
    added.extend(added_ins);
    Ok((added, ins_exists))
}

/// How long the walsender of a slot this instance owns may go without a reply from its
/// client before it is taken for a previous owner's that cannot reply (paused, or cut
/// off) and ended: a live client replies at least every 10 s (the stream's status).
const HOLDER_SILENT: Duration = Duration::from_secs(20);

/// The slot of a source this instance owns is still streamed by walsender `pid`: a
/// previous owner's, as the deployment's lock says (it lost the source, and what it
/// still applies is fenced off). Ended once its client has been silent for
/// [`HOLDER_SILENT`] (waited for here, so the stream starts then rather than after the
/// source's `wal_sender_timeout`). A client that replies meanwhile is never ended: a
/// transient failure (another deployment streaming the same slot is reported).
fn end_silent_holder(
    spec: &SourceSpec,
    env: &SourceEnv,
    src: &mut Client,
    pid: i32,
) -> Result<(), SourceError> {
    let mut longest = 0.0f64;
    loop {
        let silent = src
            .query_opt(
                "SELECT extract(epoch FROM now() - coalesce(reply_time, backend_start))::float8 \
                 FROM pg_stat_replication WHERE pid = $1 AND application_name = $2",
                &[&pid, &env.app_name],
            )
            .map_err(sql_err(spec, "look up the slot's walsender"))?
            .and_then(|r| r.get::<_, Option<f64>>(0));
        let Some(silent) = silent else {
            // Gone, not a walsender this role can see, or not a kuvasz-streamer's (of this
            // application name): the usual path, which reports it.
            return Ok(());
        };
        if silent >= HOLDER_SILENT.as_secs_f64() {
            warn!(
                "source {}: replication slot {} is still streamed by pid {pid}, whose client \
                 has not replied for {silent:.0} s (a previous owner of the source, paused or \
                 cut off): ending it",
                spec.label(),
                spec.slot
            );
            src.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .map_err(sql_err(spec, "end the slot's silent walsender"))?;
            return wait_slot_released(spec, src, pid);
        }
        if silent < longest || env.stop.is_set() {
            // Its client replied: it is alive.
            return Err(SourceError::SlotBusy {
                source: spec.label(),
                slot: spec.slot.clone(),
                pid,
                silent: Duration::from_secs_f64(silent.max(0.0)),
            });
        }
        longest = silent;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits (5 s at most) until walsender `pid` no longer holds the slot.
fn wait_slot_released(spec: &SourceSpec, src: &mut Client, pid: i32) -> Result<(), SourceError> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let active = catalog::slot_info(src, &spec.slot)
            .map_err(sql_err(spec, "look up slot"))?
            .and_then(|s| s.active_pid);
        if active != Some(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Prepares the source and returns where to start streaming. Holds one of the set-up
/// sessions of the destination throughout, so that only so many sources set up (create
/// slots, copy) at once, whatever their number.
pub fn prepare(spec: &SourceSpec, env: &SourceEnv) -> Result<StartPoint, SourceError> {
    env.status.set_state(State::Starting);
    env.sessions
        .setup
        .with(dest_err(spec, "connect to the destination"), |dest| {
            prepare_with(spec, env, dest)
        })
}

fn prepare_with(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
) -> Result<StartPoint, SourceError> {
    let mut src = connect_source(spec, env)?;
    check_prerequisites(spec, &mut src)?;
    let (tables, excluded) = resolve_tables(spec, &env.dest_schema, &mut src, dest)?;

    let mut slot =
        catalog::slot_info(&mut src, &spec.slot).map_err(sql_err(spec, "look up slot"))?;
    if let (Some(pid), Some(_)) = (slot.as_ref().and_then(|s| s.active_pid), env.epoch) {
        end_silent_holder(spec, env, &mut src, pid)?;
        slot = catalog::slot_info(&mut src, &spec.slot).map_err(sql_err(spec, "look up slot"))?;
    }
    if let Some(s) = &slot {
        if let Some(pid) = s.active_pid {
            return Err(prerequisite(
                spec,
                format!(
                    "replication slot {} is in use by another process (pid {pid}); \
                     is another kuvasz-streamer running for this source?",
                    spec.slot
                ),
            ));
        }
        if s.plugin.as_deref() != Some("pgoutput") {
            return Err(prerequisite(
                spec,
                format!(
                    "replication slot {} exists but uses plugin {:?}, not pgoutput; drop it with \
                     SELECT pg_drop_replication_slot({})",
                    spec.slot,
                    s.plugin.as_deref().unwrap_or("none"),
                    literal(&spec.slot)
                ),
            ));
        }
    }
    if let Some(why) = slot.as_ref().and_then(|s| s.invalidated.clone()) {
        let drop = format!("SELECT pg_drop_replication_slot({})", literal(&spec.slot));
        if env.on_slot_lost != crate::config::OnSlotLost::Recopy {
            return Err(prerequisite(
                spec,
                format!(
                    "replication slot {} was invalidated by the source ({why}: it kept more WAL \
                     than max_slot_wal_keep_size allows, or was idle past \
                     idle_replication_slot_timeout); the changes since its confirmed position \
                     are gone. To copy this source's tables again, set app.on_slot_lost = \
                     \"recopy\" or drop the slot ({drop}); raise max_slot_wal_keep_size to \
                     keep it from happening again",
                    spec.slot
                ),
            ));
        }
        warn!(
            "source {}: replication slot {} was invalidated by the source ({why}): dropping it \
             and copying every table again (app.on_slot_lost = \"recopy\")",
            spec.label(),
            spec.slot
        );
        src.execute("SELECT pg_drop_replication_slot($1)", &[&spec.slot])
            .map_err(sql_err(spec, "drop the invalidated slot"))?;
        slot = None;
    }
    let pub_exists = catalog::publication_exists(&mut src, &spec.slot)
        .map_err(sql_err(spec, "look up publication"))?;
    if slot.is_some() && !pub_exists {
        warn!(
            "source {}: slot {} has no publication; dropping the slot to recreate both and copy every table again",
            spec.label(),
            spec.slot
        );
        src.execute("SELECT pg_drop_replication_slot($1)", &[&spec.slot])
            .map_err(sql_err(spec, "drop orphaned slot"))?;
        slot = None;
    }

    let mut limiter = RateLimiter::new(env.sync_rate, env.sync_burst);
    let mut repl = connect_replication(spec, env)?;
    let server_version = repl.server_version_num();
    let mut publications = vec![spec.slot.clone()];
    let mut restart_at = None;

    let (start, routes) = match slot {
        None => {
            // New slot: every table is copied from the slot's exported snapshot, so the
            // copy and the stream meet exactly at the slot's consistent point. Both
            // publications exist before the slot, so both may be streamed from its start.
            let (_, ins_exists) = reconcile_publications(spec, &mut src, &tables)?;
            let all: Vec<&Resolved> = tables.iter().collect();
            record_states(spec, env, dest, &all, Phase::Pending, true)?;
            let clock = source_clock(spec, &mut src)?;
            let created = repl.create_slot(&spec.slot).map_err(repl_err(
                spec,
                format!("create replication slot {}", spec.slot),
            ))?;
            info!(
                "source {}: created slot {} at {}",
                spec.label(),
                spec.slot,
                created.consistent_point
            );
            let at = created.consistent_point;
            // Recorded before the copy: a copy that fails half-way leaves tables copied
            // at this point, which the `_ins` publication must be streamed from.
            if ins_exists {
                record_ins_marker(spec, env, dest, at)?;
                publications.push(ins_publication(spec));
            }
            let snapshot = Snapshot {
                name: created.snapshot_name.as_deref(),
                at,
                clock,
            };
            copy_pending(spec, env, &mut src, dest, &all, &snapshot, &mut limiter)?;
            (at, routes(&tables, &HashMap::new(), at))
        }
        Some(existing) => {
            let confirmed = existing.confirmed_flush.unwrap_or(Lsn::ZERO);
            let mut states = sync_states(spec, env, dest)?;
            // A slot and publication with no sync state at all were made by the Go
            // implementation (or an earlier version): their tables are taken as copied.
            if states.is_empty() && !copied_elsewhere(spec, env, dest)? {
                let current: BTreeSet<TableName> =
                    catalog::publication_tables(&mut src, &spec.slot)
                        .map_err(sql_err(spec, "list publication tables"))?
                        .into_iter()
                        .collect();
                let adopted: Vec<&Resolved> = tables
                    .iter()
                    .filter(|r| current.contains(&r.name()))
                    .collect();
                record_states(spec, env, dest, &adopted, Phase::Done, false)?;
                info!(
                    "source {}: adopted existing slot {}",
                    spec.label(),
                    spec.slot
                );
                states = sync_states(spec, env, dest)?;
            }
            let done = |r: &Resolved| {
                states.get(&r.key()).is_some_and(|s| {
                    s.phase == Some(Phase::Done)
                        && (s.target == r.recorded()
                            // Recorded by an earlier version, without the schema.
                            || (s.target == r.plan.target_table && !s.target.contains('.')))
                })
            };
            // Mark before publishing: a crash between the two still leaves them pending.
            let mut pending = also_pending(&tables, &[], |r| !done(r));
            record_states(spec, env, dest, &pending, Phase::Pending, false)?;
            let (added, ins_exists) = reconcile_publications(spec, &mut src, &tables)?;
            // A table added to a publication (a table moving between the two lost its
            // updates meanwhile) is copied again.
            let more = also_pending(&tables, &pending, |r| added.contains(&r.name()));
            record_states(spec, env, dest, &more, Phase::Pending, false)?;
            pending.extend(more);
            let stale: Vec<&str> = states
                .keys()
                .filter(|k| k.as_str() != INS_MARKER && !tables.iter().any(|r| &r.key() == *k))
                .map(String::as_str)
                .collect();
            if !stale.is_empty() {
                dest.batch_execute(&store::forget_tables_sql(
                    &env.dest_schema,
                    &spec.slot,
                    &stale,
                ))
                .map_err(dest_err(spec, "clear sync state"))?;
            }
            let mut ins_from = states.get(INS_MARKER).and_then(|s| s.lsn);
            let mut copied_at = Lsn::ZERO;
            if !pending.is_empty() || (ins_exists && ins_from.is_none()) {
                // Copied from the snapshot of a temporary slot made after the publications
                // changed: it sees every transaction that committed before its consistent
                // point, including one that was in flight when the table was published
                // (which the stream decodes with the old catalog and so never sends).
                // Short: a name derived from a 63-byte slot name would be too long.
                let tmp_name = format!("kvsz_sync_{}_{}", std::process::id(), spec.id);
                let mut tmp = connect_replication(spec, env)?;
                let clock = source_clock(spec, &mut src)?;
                let created = tmp.create_temporary_slot(&tmp_name).map_err(repl_err(
                    spec,
                    format!("create temporary replication slot {tmp_name} for the copy"),
                ))?;
                copied_at = created.consistent_point;
                if ins_exists && ins_from.is_none() {
                    record_ins_marker(spec, env, dest, copied_at)?;
                    ins_from = Some(copied_at);
                }
                let snapshot = Snapshot {
                    name: created.snapshot_name.as_deref(),
                    at: copied_at,
                    clock,
                };
                copy_pending(spec, env, &mut src, dest, &pending, &snapshot, &mut limiter)?;
                // Closing the session drops the temporary slot.
                let _ = tmp.finish();
            }
            if ins_exists {
                match ins_from {
                    Some(at) if at <= confirmed => publications.push(ins_publication(spec)),
                    at => restart_at = at,
                }
            }
            let recorded: HashMap<String, Lsn> = states
                .iter()
                .filter_map(|(k, s)| s.lsn.map(|l| (k.clone(), l)))
                .collect();
            let mut routes = routes(&tables, &recorded, Lsn::ZERO);
            for r in &pending {
                if let Some(route) = routes.get_mut(&r.name()) {
                    route.copied_at = copied_at;
                }
            }
            // A transaction in flight when a table was published is decoded with the old
            // catalog, and PostgreSQL 12 keeps that verdict for the table in its walsender:
            // later changes would never be sent. So the stream stops at the first copy the
            // slot has not passed (this run's, or an earlier run's after a crash or a stop
            // that timed out), and a walsender started there decodes none of them.
            if let Some(first) = routes
                .values()
                .map(|r| r.copied_at)
                .filter(|&at| at > confirmed)
                .min()
            {
                restart_at = Some(restart_at.map_or(first, |a: Lsn| a.min(first)));
            }
            // The server starts at the slot's confirmed position whatever we ask;
            // asking for it makes our own bookkeeping start there too.
            (confirmed, routes)
        }
    };
    let dynamic = dynamic_entries(spec, &mut src)?;
    Ok(StartPoint {
        repl,
        start,
        server_version,
        publications,
        restart_at,
        routes,
        excluded,
        dynamic,
    })
}

/// The tables `want` picks that `pending` lacks, with every table sharing a target with
/// one of them: the source tables of a target are copied again together, from one
/// snapshot. A clone target is cleared of this sid's rows first, and a merged one would
/// otherwise take a row that moved between partitions from the snapshot and then an
/// older change of it from the stream.
fn also_pending<'a>(
    tables: &'a [Resolved],
    pending: &[&Resolved],
    want: impl Fn(&Resolved) -> bool,
) -> Vec<&'a Resolved> {
    let targets: BTreeSet<String> = tables
        .iter()
        .filter(|r| want(r))
        .map(|r| r.target())
        .collect();
    tables
        .iter()
        .filter(|r| targets.contains(&r.target()))
        .filter(|r| !pending.iter().any(|p| p.key() == r.key()))
        .collect()
}

/// The routes of the published tables; `copied_at` from the recorded sync states, or
/// `default`.
fn routes(
    tables: &[Resolved],
    recorded: &HashMap<String, Lsn>,
    default: Lsn,
) -> HashMap<TableName, Route> {
    tables
        .iter()
        .map(|r| {
            (
                r.name(),
                Route {
                    map: r.map.clone(),
                    copied_at: recorded.get(&r.key()).copied().unwrap_or(default),
                    insert_only: r.insert_only,
                    shared: r.shared,
                    siblings: tables.iter().filter(|o| o.target() == r.target()).count(),
                },
            )
        })
        .collect()
}

/// A copied row the destination refused, counted and shown in `/api/status` as a
/// streamed change's is.
fn report_refused(env: &SourceEnv, row: &RefusedRow) {
    env.status.rejected(crate::status::RejectedRow {
        at_ms: crate::status::now_ms(),
        table: row.table.clone(),
        op: "COPY".to_string(),
        key: row.key.clone(),
        lsn: row.lsn,
        message: row.message.clone(),
    });
}

/// The snapshot copies are taken from.
struct Snapshot<'a> {
    /// The exported snapshot's name (None: a fresh REPEATABLE READ transaction).
    name: Option<&'a str>,
    /// The slot's consistent point: the stream applies what commits from here on.
    at: Lsn,
    /// The source's clock read before the snapshot was made: a history target that
    /// already holds versions records the copy's differences from then on (any later
    /// commit is stamped later).
    clock: String,
}

/// The source's clock as a timestamp text any session reads alike (UTC, `+00`).
fn source_clock(spec: &SourceSpec, src: &mut Client) -> Result<String, SourceError> {
    let row = src
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
            &[],
        )
        .map_err(sql_err(spec, "read the source's clock"))?;
    row.try_get::<_, String>(0)
        .map_err(sql_err(spec, "read the source's clock"))
}

/// Copies `pending` from `snapshot`, target by target: the source tables of one target
/// are copied together, in one destination transaction, so a clone target's re-copy
/// replaces exactly what this source put there and no source table wipes another's rows.
fn copy_pending(
    spec: &SourceSpec,
    env: &SourceEnv,
    src: &mut Client,
    dest: &mut Client,
    pending: &[&Resolved],
    snapshot: &Snapshot,
    limiter: &mut RateLimiter,
) -> Result<(), SourceError> {
    let mut targets: Vec<String> = Vec::new();
    for r in pending {
        if !targets.contains(&r.target()) {
            targets.push(r.target());
        }
    }
    for target in targets {
        let group: Vec<&Resolved> = pending
            .iter()
            .copied()
            .filter(|r| r.target() == target)
            .collect();
        copy_one_target(spec, env, src, dest, &group, snapshot, limiter)?;
        if env.stop.is_set() {
            break;
        }
    }
    Ok(())
}

/// Copies the source tables of one target inside a REPEATABLE READ transaction on the
/// source (the exported snapshot when given) and marks them done on the destination in
/// the same commit.
fn copy_one_target(
    spec: &SourceSpec,
    env: &SourceEnv,
    src: &mut Client,
    dest: &mut Client,
    group: &[&Resolved],
    snapshot: &Snapshot,
    limiter: &mut RateLimiter,
) -> Result<(), SourceError> {
    let at = snapshot.at;
    let names: Vec<String> = group.iter().map(|r| r.key()).collect();
    let name = names.join(", ");
    // The text the source writes must mean the same to the destination: fix the styles.
    let mut begin = String::from(
        "SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; \
         BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    );
    if let Some(s) = snapshot.name {
        begin.push_str(&format!("; SET TRANSACTION SNAPSHOT {}", literal(s)));
    }
    src.batch_execute(&begin)
        .map_err(sql_err(spec, format!("open snapshot for {name}")))?;
    env.status.set_state(State::Copying);
    let mut tables = Vec::with_capacity(group.len());
    for r in group {
        // The planner's estimate, for the copy's ETA: cheap, and good enough after any
        // VACUUM or ANALYZE (-1 when never analyzed).
        let estimate = src
            .query_one(
                // to_regclass: never an error, which would abort the snapshot's transaction.
                "SELECT coalesce((SELECT reltuples::bigint FROM pg_catalog.pg_class \
                 WHERE oid = pg_catalog.to_regclass($1)), -1)",
                &[&qualified(&r.source.schema, &r.source.name)],
            )
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or_else(|e| {
                warn!(
                    "source {}: cannot estimate the rows of {}: {}",
                    spec.label(),
                    r.key(),
                    crate::pg::describe(&e)
                );
                -1
            });
        let t = env.status.table(&r.key());
        t.copy_started(&r.target(), estimate);
        tables.push(t);
    }
    let started = std::time::Instant::now();
    // The copy commits only while this instance still owns the source (see
    // crate::ownership): a copy finishing after a take-over is fenced off.
    let fence = env
        .epoch
        .and_then(|e| store::fence_sql(&env.dest_schema, &[(spec.slot.as_str(), e)]));
    let done: String = fence
        .into_iter()
        .chain(group.iter().map(|r| {
            store::sync_state_sql(
                &env.dest_schema,
                &spec.slot,
                &r.key(),
                &r.recorded(),
                Phase::Done,
                Some(at),
            )
        }))
        .collect::<Vec<_>>()
        .join("; ");
    let plans: Vec<&CopyPlan> = group.iter().map(|r| &r.plan).collect();
    let stop = || env.stop.is_set();
    let opts = CopyOptions {
        since: snapshot.clock.clone(),
        lsn: at,
        deadletter: (env.on_error == RejectPolicy::Deadletter).then(|| Deadletter {
            schema: env.dest_schema.clone(),
            source: spec.database.clone(),
            sid: spec.sid.to_string(),
        }),
        progress: tables.clone(),
    };
    let result = copy_group(src, dest, &plans, &done, &opts, limiter, &stop);
    let _ = src.batch_execute("COMMIT");
    let copied = match result {
        Ok(copied) => copied,
        Err(error) => {
            if let CopyError::Refused(row) = &error {
                report_refused(env, row);
            }
            return Err(SourceError::Sync {
                source: spec.label(),
                table: name.clone(),
                error,
            });
        }
    };
    for row in &copied.refused {
        report_refused(env, row);
        warn!("source {}: {row}; written to kvsz_deadletter", spec.label());
    }
    for t in &tables {
        t.copy_done();
    }
    for (r, (rows, bytes)) in group.iter().zip(copied.counts) {
        info!(
            "source {}: copied {} → {}: {rows} rows, {bytes} bytes in {:.1}s",
            spec.label(),
            r.key(),
            r.target(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
