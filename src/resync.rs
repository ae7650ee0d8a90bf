//! `kuvasz-streamer resync TABLE [--sid S]`: has the running daemon copy a table again,
//! for when `verify` found a difference. It only marks the table's rows of each slot in
//! `kvsz_sync_state` (state `resync`): the daemon's source thread notices within 15 seconds
//! and sets up again, which copies every source table feeding that target, for that sid,
//! from a fresh snapshot (a clone target's rows of the sid are replaced, an append target
//! is merged, a history target records the differences). A daemon that is not running
//! copies it at its next start.

use crate::config::TableMap;
use crate::pg::connect::Endpoint;
use crate::pg::describe;
use crate::source::{SourceSpec, SYNC_STATE_TABLE};
use crate::store::Phase;

/// What one source URL's slot did with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    /// `database/sid`.
    pub source: String,
    /// `schema.target` on the destination.
    pub target: String,
    /// Sync state rows marked: 0 when the table was never copied for that slot.
    pub rows: u64,
}

/// Whether map entry `entry` is the one `name` names: `schema.table`, or `table` in
/// `default_schema`.
pub fn names(entry: &TableMap, name: &str, default_schema: &str) -> bool {
    let (schema, table) = name.split_once('.').unwrap_or((default_schema, name));
    entry.schema == schema && entry.table == table
}

/// Marks `table` (a map key) to be copied again on every URL mapping it, or on the one of
/// `sid`. Errors name what the map lacks or why the destination refused.
pub fn resync(
    sources: &[SourceSpec],
    dest: &Endpoint,
    dest_schema: &str,
    default_schema: &str,
    table: &str,
    sid: Option<&str>,
) -> Result<Vec<Marked>, String> {
    let chosen: Vec<(&SourceSpec, &TableMap)> = sources
        .iter()
        .filter(|s| sid.is_none_or(|sid| s.sid.as_str() == sid))
        .filter_map(|s| {
            s.tables
                .iter()
                .find(|t| names(t, table, default_schema))
                .map(|t| (s, t))
        })
        .collect();
    if chosen.is_empty() {
        return Err(match sid {
            Some(sid) if !sources.iter().any(|s| s.sid.as_str() == sid) => {
                format!("no source URL of the map has sid {sid:?}")
            }
            _ => format!(
                "table {table:?} is not in the map{}",
                sid.map_or(String::new(), |s| format!(" for sid {s:?}"))
            ),
        });
    }
    let mut client = dest
        .sql()
        .map_err(|e| format!("connect to the destination: {}", describe(&e)))?;
    let sql = crate::store::request_resync_sql(dest_schema);
    let mut out = Vec::new();
    for (spec, entry) in chosen {
        let target = format!("{dest_schema}.{}", entry.target);
        let rows = client
            .execute(&sql, &[&Phase::Resync.as_str(), &spec.slot, &target])
            .map_err(|e| {
                format!(
                    "source {}: mark {target} in {dest_schema}.{SYNC_STATE_TABLE}: {}",
                    spec.label(),
                    describe(&e)
                )
            })?;
        out.push(Marked {
            source: spec.label(),
            target,
            rows,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_named_with_or_without_its_schema() {
        let entry = TableMap {
            schema: "public".into(),
            table: "t1".into(),
            target: "t1".into(),
            mode: Default::default(),
            partitions_regex: None,
            filter: None,
            set: vec![],
        };
        assert!(names(&entry, "t1", "public"));
        assert!(names(&entry, "public.t1", "other"));
        assert!(!names(&entry, "t1", "other"));
        assert!(!names(&entry, "private.t1", "public"));
        assert!(!names(&entry, "t2", "public"));
    }
}
