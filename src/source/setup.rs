//! Bringing a source to the point where it can stream: prerequisites, the publication
//! matching the map, the slot, and the initial copy of every table that needs one.

use std::collections::{BTreeSet, HashMap};

use log::{info, warn};
use postgres::{Client, NoTls};

use crate::pg::catalog::{self, TableInfo};
use crate::pg::quote::{ident, literal, qualified};
use crate::pg::replication::ReplicationConnection;
use crate::pg::session::open_destination;
use crate::pg::Lsn;

use super::sync::{copy_table, CopyPlan, RateLimiter};
use super::{SourceEnv, SourceError, SourceSpec, SYNC_STATE_TABLE};

/// Where streaming starts: the open replication connection and the LSN to ask for
/// (zero: the slot's confirmed position).
pub struct StartPoint {
    pub repl: ReplicationConnection,
    pub start: Lsn,
    pub server_version: u32,
}

/// A mapped table as both catalogs describe it.
struct Resolved {
    source: TableInfo,
    plan: CopyPlan,
}

fn sql_err(
    spec: &SourceSpec,
    context: impl Into<String>,
) -> impl FnOnce(postgres::Error) -> SourceError {
    let source = spec.label();
    let context = context.into();
    move |error| SourceError::Sql {
        source,
        context,
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
    let mut cfg = spec.conn.to_postgres_config();
    cfg.application_name(&env.app_name);
    cfg.connect(NoTls).map_err(sql_err(
        spec,
        format!("connect to {}", spec.conn.redacted()),
    ))
}

/// Opens a destination connection (the same session settings as the writers').
pub fn connect_dest(spec: &SourceSpec, env: &SourceEnv) -> Result<Client, SourceError> {
    open_destination(&env.dest).map_err(sql_err(spec, "connect to the destination"))
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

/// Looks up every mapped table on both sides and refuses what cannot work.
fn resolve_tables(
    spec: &SourceSpec,
    env: &SourceEnv,
    src: &mut Client,
    dest: &mut Client,
) -> Result<Vec<Resolved>, SourceError> {
    let mut out = Vec::new();
    for t in &spec.tables {
        let name = format!("{}.{}", t.schema, t.table);
        let Some(info) = catalog::table_info(src, &t.schema, &t.table)
            .map_err(sql_err(spec, format!("look up {name}")))?
        else {
            return Err(prerequisite(
                spec,
                format!("source table {name} does not exist"),
            ));
        };
        if !info.has_identity {
            return Err(prerequisite(
                spec,
                format!(
                    "table {name} has no primary key and no replica identity: once it is in a \
                     publication, UPDATE and DELETE on it fail on the source. Add a primary key, \
                     or ALTER TABLE {} REPLICA IDENTITY FULL",
                    qualified(&t.schema, &t.table)
                ),
            ));
        }
        let target_name = format!("{}.{}", env.dest_schema, t.target);
        let Some(target) = catalog::table_info(dest, &env.dest_schema, &t.target)
            .map_err(sql_err(spec, format!("look up target {target_name}")))?
        else {
            return Err(prerequisite(
                spec,
                format!(
                    "target table {target_name} (for {name}) does not exist on the destination"
                ),
            ));
        };
        let has_sid = target.columns.iter().any(|c| c.name == "sid");
        if !has_sid && spec.family_size > 1 {
            return Err(prerequisite(
                spec,
                format!(
                    "target table {target_name} has no sid column, but {} URLs of source {} \
                     write into it: their rows would overwrite and delete each other. Add a \
                     column sid text to it (and to its primary key)",
                    spec.family_size, spec.database
                ),
            ));
        }
        let columns: Vec<String> = info
            .columns
            .iter()
            .filter(|c| !(has_sid && c.name == "sid"))
            .filter(|c| target.columns.iter().any(|tc| tc.name == c.name))
            .map(|c| c.name.clone())
            .collect();
        if columns.is_empty() {
            return Err(prerequisite(
                spec,
                format!("{name} and its target {target_name} have no column name in common"),
            ));
        }
        let plan = CopyPlan {
            source_schema: t.schema.clone(),
            source_table: t.table.clone(),
            target_schema: env.dest_schema.clone(),
            target_table: t.target.clone(),
            columns,
            sid: has_sid.then(|| spec.sid.clone()),
        };
        out.push(Resolved { source: info, plan });
    }
    Ok(out)
}

fn table_list(tables: &[&(String, String)]) -> String {
    tables
        .iter()
        .map(|(s, t)| qualified(s, t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Makes the publication name exactly the mapped tables; returns the tables it added.
fn reconcile_publication(
    spec: &SourceSpec,
    src: &mut Client,
    wanted: &BTreeSet<(String, String)>,
) -> Result<BTreeSet<(String, String)>, SourceError> {
    let pubname = ident(&spec.slot);
    if !catalog::publication_exists(src, &spec.slot)
        .map_err(sql_err(spec, "look up publication"))?
    {
        let list: Vec<&(String, String)> = wanted.iter().collect();
        let sql = if list.is_empty() {
            format!("CREATE PUBLICATION {pubname}")
        } else {
            format!(
                "CREATE PUBLICATION {pubname} FOR TABLE {}",
                table_list(&list)
            )
        };
        src.batch_execute(&sql).map_err(sql_err(
            spec,
            format!(
                "create publication {} (the role must own the mapped tables, or be superuser)",
                spec.slot
            ),
        ))?;
        info!("source {}: created publication {}", spec.label(), spec.slot);
        return Ok(wanted.clone());
    }
    let current: BTreeSet<(String, String)> = catalog::publication_tables(src, &spec.slot)
        .map_err(sql_err(spec, "list publication tables"))?
        .into_iter()
        .collect();
    let add: Vec<&(String, String)> = wanted.difference(&current).collect();
    let drop: Vec<&(String, String)> = current.difference(wanted).collect();
    if !drop.is_empty() {
        src.batch_execute(&format!(
            "ALTER PUBLICATION {pubname} DROP TABLE {}",
            table_list(&drop)
        ))
        .map_err(sql_err(spec, "remove tables from the publication"))?;
        info!(
            "source {}: removed {} from publication",
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
            "source {}: added {} to publication",
            spec.label(),
            table_list(&add)
        );
    }
    Ok(add.into_iter().cloned().collect())
}

/// Sync states recorded on the destination for this slot: source table → state.
fn sync_states(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
) -> Result<HashMap<String, String>, SourceError> {
    let rows = dest
        .query(
            &format!(
                "SELECT source_table, state FROM {} WHERE slot_name = $1",
                qualified(&env.dest_schema, SYNC_STATE_TABLE)
            ),
            &[&spec.slot],
        )
        .map_err(sql_err(spec, "read sync state"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn state_sql(spec: &SourceSpec, env: &SourceEnv, table: &str, target: &str, state: &str) -> String {
    format!(
        "INSERT INTO {} (slot_name, source_table, target_table, state, updated_at) \
         VALUES ({}, {}, {}, {}, now()) ON CONFLICT (slot_name, source_table) \
         DO UPDATE SET target_table = EXCLUDED.target_table, state = EXCLUDED.state, updated_at = now()",
        qualified(&env.dest_schema, SYNC_STATE_TABLE),
        literal(&spec.slot),
        literal(table),
        literal(target),
        literal(state)
    )
}

/// Records `state` for `tables` in one destination transaction (after clearing the
/// slot's old rows when `clear` is set).
fn record_states(
    spec: &SourceSpec,
    env: &SourceEnv,
    dest: &mut Client,
    tables: &[&Resolved],
    state: &str,
    clear: bool,
) -> Result<(), SourceError> {
    let mut batch = String::from("BEGIN;");
    if clear {
        batch.push_str(&format!(
            "DELETE FROM {} WHERE slot_name = {};",
            qualified(&env.dest_schema, SYNC_STATE_TABLE),
            literal(&spec.slot)
        ));
    }
    for r in tables {
        batch.push_str(&state_sql(spec, env, &key(r), &r.plan.target_table, state));
        batch.push(';');
    }
    batch.push_str("COMMIT");
    dest.batch_execute(&batch)
        .map_err(sql_err(spec, "record sync state"))
}

fn key(r: &Resolved) -> String {
    format!("{}.{}", r.source.schema, r.source.name)
}

/// Prepares the source and returns where to start streaming.
pub fn prepare(spec: &SourceSpec, env: &SourceEnv) -> Result<StartPoint, SourceError> {
    let mut src = connect_source(spec, env)?;
    let mut dest = connect_dest(spec, env)?;
    check_prerequisites(spec, &mut src)?;
    let tables = resolve_tables(spec, env, &mut src, &mut dest)?;
    let wanted: BTreeSet<(String, String)> = tables
        .iter()
        .map(|r| (r.source.schema.clone(), r.source.name.clone()))
        .collect();

    let mut slot =
        catalog::slot_info(&mut src, &spec.slot).map_err(sql_err(spec, "look up slot"))?;
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

    let state_table = qualified(&env.dest_schema, SYNC_STATE_TABLE);
    let mut limiter = RateLimiter::new(env.sync_rate, env.sync_burst);
    let mut repl = ReplicationConnection::connect(&spec.conn, &env.app_name).map_err(repl_err(
        spec,
        format!("replication connection to {}", spec.conn.redacted()),
    ))?;
    let server_version = repl.server_version_num();

    match slot {
        None => {
            // New slot: every table is copied from the slot's exported snapshot, so the
            // copy and the stream meet exactly at the slot's consistent point.
            reconcile_publication(spec, &mut src, &wanted)?;
            let all: Vec<&Resolved> = tables.iter().collect();
            record_states(spec, env, &mut dest, &all, "pending", true)?;
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
            let snapshot = created.snapshot_name.clone();
            for r in &tables {
                copy_one(
                    spec,
                    env,
                    &mut src,
                    &mut dest,
                    r,
                    snapshot.as_deref(),
                    &mut limiter,
                )?;
                if env.stop.is_set() {
                    break;
                }
            }
            Ok(StartPoint {
                repl,
                start: created.consistent_point,
                server_version,
            })
        }
        Some(existing) => {
            let states = sync_states(spec, env, &mut dest)?;
            let current: BTreeSet<(String, String)> =
                catalog::publication_tables(&mut src, &spec.slot)
                    .map_err(sql_err(spec, "list publication tables"))?
                    .into_iter()
                    .collect();
            // A slot and publication with no sync state at all were made by the Go
            // implementation (or an earlier version): their tables are taken as copied.
            if states.is_empty() {
                let adopted: Vec<&Resolved> = tables
                    .iter()
                    .filter(|r| current.contains(&(r.source.schema.clone(), r.source.name.clone())))
                    .collect();
                record_states(spec, env, &mut dest, &adopted, "done", false)?;
                info!(
                    "source {}: adopted existing slot {}",
                    spec.label(),
                    spec.slot
                );
            }
            let states = sync_states(spec, env, &mut dest)?;
            let pending: Vec<&Resolved> = tables
                .iter()
                .filter(|r| states.get(&key(r)).map(String::as_str) != Some("done"))
                .collect();
            // Mark before publishing: a crash between the two still leaves them pending.
            if !pending.is_empty() {
                record_states(spec, env, &mut dest, &pending, "pending", false)?;
            }
            reconcile_publication(spec, &mut src, &wanted)?;
            let stale: Vec<String> = states
                .keys()
                .filter(|k| !tables.iter().any(|r| &key(r) == *k))
                .map(|k| literal(k))
                .collect();
            if !stale.is_empty() {
                dest.batch_execute(&format!(
                    "DELETE FROM {state_table} WHERE slot_name = {} AND source_table IN ({})",
                    literal(&spec.slot),
                    stale.join(", ")
                ))
                .map_err(sql_err(spec, "clear sync state"))?;
            }
            // Copied from a snapshot taken after the publication changed; the stream from
            // the slot's confirmed point overlaps it and idempotent apply absorbs that.
            for r in pending {
                copy_one(spec, env, &mut src, &mut dest, r, None, &mut limiter)?;
                if env.stop.is_set() {
                    break;
                }
            }
            Ok(StartPoint {
                repl,
                // The server starts at the slot's confirmed position whatever we ask;
                // asking for it makes our own bookkeeping start there too.
                start: existing.confirmed_flush.unwrap_or(Lsn::ZERO),
                server_version,
            })
        }
    }
}

/// Copies one table inside a REPEATABLE READ transaction on the source (the exported
/// snapshot when given) and marks it done on the destination in the same commit.
fn copy_one(
    spec: &SourceSpec,
    env: &SourceEnv,
    src: &mut Client,
    dest: &mut Client,
    r: &Resolved,
    snapshot: Option<&str>,
    limiter: &mut RateLimiter,
) -> Result<(), SourceError> {
    let name = key(r);
    // The text the source writes must mean the same to the destination: fix the styles.
    let mut begin = String::from(
        "SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; \
         BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    );
    if let Some(s) = snapshot {
        begin.push_str(&format!("; SET TRANSACTION SNAPSHOT {}", literal(s)));
    }
    src.batch_execute(&begin)
        .map_err(sql_err(spec, format!("open snapshot for {name}")))?;
    let started = std::time::Instant::now();
    let done = state_sql(spec, env, &name, &r.plan.target_table, "done");
    let stop = || env.stop.is_set();
    let result = copy_table(src, dest, &r.plan, &done, limiter, &stop);
    let _ = src.batch_execute("COMMIT");
    let (rows, bytes) = result.map_err(|error| SourceError::Sync {
        source: spec.label(),
        table: name.clone(),
        error,
    })?;
    info!(
        "source {}: copied {name} → {}.{}: {rows} rows, {bytes} bytes in {:.1}s",
        spec.label(),
        r.plan.target_schema,
        r.plan.target_table,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
