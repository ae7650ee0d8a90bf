//! Slots of URLs removed from the map: a slot nobody reads keeps its WAL until the
//! source's disk fills, so the daemon drops it (with its publications) at start. Only
//! slots the destination's `kvsz_sync_state` records, of a family still in the map, and
//! found inactive on one of that family's servers: another deployment's slots, or a
//! whole family removed, are only reported. Runs only after the map loaded.

use std::collections::BTreeSet;

use log::{info, warn};
use postgres::Client;

use crate::pg::connect::Endpoint;

use crate::pg::describe;
use crate::pg::quote::{ident, qualified};

use super::{SourceSpec, SYNC_STATE_TABLE};

/// Drops the slots (and publications) of removed URLs; every failure is logged, never
/// fatal: the sources of the map come first.
pub fn retire_removed(
    dest: &mut Client,
    dest_schema: &str,
    sources: &[SourceSpec],
    app_name: &str,
) {
    let recorded: Vec<String> = match dest.query(
        &format!(
            "SELECT DISTINCT slot_name FROM {} ORDER BY 1",
            qualified(dest_schema, SYNC_STATE_TABLE)
        ),
        &[],
    ) {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            warn!(
                "cannot read the sync state for removed sources: {}",
                describe(&e)
            );
            return;
        }
    };
    let current: BTreeSet<&str> = sources.iter().map(|s| s.slot.as_str()).collect();
    for slot in recorded.iter().filter(|s| !current.contains(s.as_str())) {
        let family: Vec<&SourceSpec> = sources
            .iter()
            .filter(|s| slot.starts_with(&format!("kuvasz_{}_", s.database.replace('-', "_"))))
            .collect();
        if family.is_empty() {
            warn!(
                "slot {slot} is recorded on the destination but its family is not in the map; \
                 if no deployment reads it, drop it on its source with \
                 SELECT pg_drop_replication_slot('{slot}') (and DROP PUBLICATION {})",
                ident(slot)
            );
            continue;
        }
        // The state row stays until the slot is gone, so a slot left elsewhere is
        // reported at every start.
        match retire(slot, &family, app_name) {
            Ok(true) => {}
            Ok(false) => {
                warn!(
                    "slot {slot} of a URL removed from the map was not found on the servers of \
                     source {}; if it exists elsewhere, drop it there with \
                     SELECT pg_drop_replication_slot('{slot}'), then delete its rows from {}",
                    family[0].database, SYNC_STATE_TABLE
                );
                continue;
            }
            Err(e) => {
                warn!("cannot drop slot {slot} of a URL removed from the map: {e}");
                continue;
            }
        }
        if let Err(e) = dest.execute(&crate::store::forget_slot_sql(dest_schema), &[slot]) {
            warn!(
                "cannot clear the sync state of slot {slot}: {}",
                describe(&e)
            );
        }
    }
}

/// Looks for `slot` on each server of `family`; drops it there. `Ok(false)`: not found.
fn retire(slot: &str, family: &[&SourceSpec], app_name: &str) -> Result<bool, String> {
    let mut seen = BTreeSet::new();
    for spec in family {
        if !seen.insert((spec.conn.host.clone(), spec.conn.port)) {
            continue;
        }
        let endpoint = spec.endpoint(app_name);
        let mut src = endpoint
            .sql()
            .map_err(|e| format!("connect to {}: {}", spec.conn.redacted(), describe(&e)))?;
        let rows = src
            .query(
                "SELECT database::text, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .map_err(|e| describe(&e))?;
        let Some(row) = rows.first() else { continue };
        let database: Option<String> = row.get(0);
        if row.get::<_, bool>(1) {
            return Err(format!(
                "it is active on the server of {} (another consumer reads it)",
                spec.conn.redacted()
            ));
        }
        if let Some(db) = database {
            let mut there = endpoint
                .with_dbname(&db)
                .sql()
                .map_err(|e| format!("connect to database {db}: {}", describe(&e)))?;
            there
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}; DROP PUBLICATION IF EXISTS {}",
                    ident(slot),
                    ident(&format!("{slot}_ins"))
                ))
                .map_err(|e| format!("drop its publications: {}", describe(&e)))?;
        }
        src.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .map_err(|e| format!("drop it: {}", describe(&e)))?;
        info!(
            "dropped slot {slot} and its publications (database {}): its URL is no longer in \
             the map of source {}",
            row.get::<_, Option<String>>(0).unwrap_or_default(),
            spec.database
        );
        return Ok(true);
    }
    Ok(false)
}

/// Drops the slot and publications of `spec`, a source a reload removed, and its sync
/// state on the destination. Its stream has just ended; the server may hold the slot
/// for a moment longer, so a failure is tried again for a few seconds before it is
/// logged with what to run by hand.
pub fn retire_one(dest: &Endpoint, dest_schema: &str, spec: &SourceSpec) {
    let slot = spec.slot.as_str();
    let mut attempt = 0;
    let found = loop {
        attempt += 1;
        match retire(slot, &[spec], &dest.application_name) {
            Ok(found) => break found,
            Err(_) if attempt < 10 => std::thread::sleep(std::time::Duration::from_millis(500)),
            Err(e) => {
                warn!(
                    "source {}: cannot drop slot {slot}: {e}; drop it by hand with \
                     SELECT pg_drop_replication_slot('{slot}') (and DROP PUBLICATION {})",
                    spec.label(),
                    ident(slot)
                );
                return;
            }
        }
    };
    if !found {
        info!(
            "source {}: slot {slot} was not on its server any more",
            spec.label()
        );
    }
    let cleared = dest
        .sql()
        .and_then(|mut c| c.execute(&crate::store::forget_slot_sql(dest_schema), &[&slot]));
    if let Err(e) = cleared {
        warn!(
            "source {}: cannot clear the sync state of slot {slot}: {}",
            spec.label(),
            describe(&e)
        );
    }
}
