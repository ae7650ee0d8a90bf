//! SQL that applies a batch set-based. Pure string building, unit-tested.
//!
//! Values never pass through a literal or a cast: an explicit cast to `varchar(3)`
//! truncates, and one to `character` (what `format_type` gives without the modifier) is
//! `char(1)`. Rows are written with COPY in text format, whose input functions take the
//! column's type modifier, into the target itself (new rows) or into a temporary staging
//! table made from the target's own columns (`CREATE TEMP TABLE … AS SELECT … WITH NO
//! DATA` keeps every type, modifier and domain), and one statement per kind then moves
//! them from the stage to the target without any conversion.
//!
//! Each target layout has two stages: `kvsz_r<n>` holds whole rows (upserts, and patches
//! whose present columns `kvsz_mask` tells), `kvsz_k<n>` holds keys (deletes, and the old
//! key of a move). Both are `ON COMMIT DELETE ROWS`: empty again at every commit.

use crate::change::{Change, Row, TargetTable, Value};
use crate::pg::quote::{push_copy_field, push_ident, push_literal, qualified};

use super::batch::{Entry, Net};

/// The column of the row stage that tells a patch's present columns (NULL: a whole row).
const MASK: &str = "kvsz_mask";

/// The staging tables of one target layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub rows: String,
    pub keys: String,
}

impl Stage {
    pub fn new(id: usize) -> Stage {
        Stage {
            rows: format!("pg_temp.kvsz_r{id}"),
            keys: format!("pg_temp.kvsz_k{id}"),
        }
    }
}

pub(super) fn target(table: &TargetTable) -> String {
    qualified(&table.schema, &table.name)
}

/// `p."c1", p."c2"[, p."sid"]` for the column indexes `cols`.
pub(super) fn push_cols(
    s: &mut String,
    table: &TargetTable,
    cols: &[usize],
    prefix: &str,
    sid: bool,
) {
    for (n, &c) in cols.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        s.push_str(prefix);
        push_ident(s, &table.columns[c].name);
    }
    if sid && table.sid.is_some() {
        s.push_str(", ");
        s.push_str(prefix);
        push_ident(s, "sid");
    }
}

pub(super) fn all_cols(table: &TargetTable) -> Vec<usize> {
    (0..table.columns.len()).collect()
}

/// Creates both stages of `table`'s layout (outside any batch transaction, so a rolled
/// back batch does not take them along).
pub fn create_stage(table: &TargetTable, stage: &Stage) -> String {
    let mut s = String::from("CREATE TEMP TABLE IF NOT EXISTS ");
    s.push_str(stage.rows.trim_start_matches("pg_temp."));
    s.push_str(" ON COMMIT DELETE ROWS AS SELECT NULL::text AS ");
    s.push_str(MASK);
    s.push_str(", ");
    push_cols(&mut s, table, &all_cols(table), "t.", true);
    s.push_str(" FROM ONLY ");
    s.push_str(&target(table));
    s.push_str(" AS t WITH NO DATA; CREATE TEMP TABLE IF NOT EXISTS ");
    s.push_str(stage.keys.trim_start_matches("pg_temp."));
    s.push_str(" ON COMMIT DELETE ROWS AS SELECT ");
    push_cols(&mut s, table, &table.key, "t.", true);
    s.push_str(" FROM ONLY ");
    s.push_str(&target(table));
    s.push_str(" AS t WITH NO DATA");
    s
}

/// Empties both stages (within a transaction that applies more than one set of entries).
pub fn clear_stage(stage: &Stage) -> String {
    format!("DELETE FROM {}; DELETE FROM {}", stage.rows, stage.keys)
}

/// `COPY <stage rows> (kvsz_mask, cols…[, sid]) FROM STDIN`.
pub fn copy_rows_in(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!("COPY {} ({MASK}, ", stage.rows);
    push_cols(&mut s, table, &all_cols(table), "", true);
    s.push_str(") FROM STDIN");
    s
}

/// `COPY <stage keys> (keys…[, sid]) FROM STDIN`.
pub fn copy_keys_in(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!("COPY {} (", stage.keys);
    push_cols(&mut s, table, &table.key, "", true);
    s.push_str(") FROM STDIN");
    s
}

/// `COPY target (cols…[, sid]) FROM STDIN`: new rows straight into the target.
pub fn copy_target_in(table: &TargetTable) -> String {
    let mut s = format!("COPY {} (", target(table));
    push_cols(&mut s, table, &all_cols(table), "", true);
    s.push_str(") FROM STDIN");
    s
}

pub(super) fn push_value(out: &mut Vec<u8>, v: Value) {
    match v {
        Value::Text(t) => push_copy_field(out, t.as_bytes()),
        Value::Null | Value::Unchanged => out.extend_from_slice(b"\\N"),
    }
}

pub(super) fn push_sid(out: &mut Vec<u8>, c: &Change) {
    if let Some(sid) = &c.table.sid {
        out.push(b'\t');
        push_copy_field(out, sid.as_str().as_bytes());
    }
}

/// Which columns a row carries (`1`) or leaves unchanged (`0`); None for a whole row.
pub fn mask_of(c: &Change) -> Option<String> {
    row_mask(&c.values)
}

/// [`mask_of`] a row.
pub fn row_mask(row: &Row) -> Option<String> {
    row.has_unchanged().then(|| {
        row.iter()
            .map(|v| if v == Value::Unchanged { '0' } else { '1' })
            .collect()
    })
}

/// An entry's row for [`copy_target_in`].
pub fn target_line(c: &Change, out: &mut Vec<u8>) {
    for (n, v) in c.values.iter().enumerate() {
        if n > 0 {
            out.push(b'\t');
        }
        push_value(out, v);
    }
    push_sid(out, c);
    out.push(b'\n');
}

/// An entry's row for [`copy_rows_in`].
pub fn row_line(c: &Change, out: &mut Vec<u8>) {
    match mask_of(c) {
        Some(m) => out.extend_from_slice(m.as_bytes()),
        None => out.extend_from_slice(b"\\N"),
    }
    for v in c.values.iter() {
        out.push(b'\t');
        push_value(out, v);
    }
    push_sid(out, c);
    out.push(b'\n');
}

/// An entry's key for [`copy_keys_in`]: the old key of a delete or move.
pub fn key_line(c: &Change, out: &mut Vec<u8>) {
    let mut n = 0;
    while let Some(v) = c.key_value(n) {
        if n > 0 {
            out.push(b'\t');
        }
        push_value(out, v);
        n += 1;
    }
    push_sid(out, c);
    out.push(b'\n');
}

/// `a."k1" = b."k1" AND …[ AND a."sid" = b."sid"]`: finds a row by its key, through the
/// target's own equality (the stage has the target's types), so its index serves.
pub(super) fn push_key_match(s: &mut String, table: &TargetTable, a: &str, b: &str) {
    let mut first = true;
    let names = table
        .key
        .iter()
        .map(|&k| table.columns[k].name.as_str())
        .chain(table.sid.is_some().then_some("sid"));
    for name in names {
        if !first {
            s.push_str(" AND ");
        }
        first = false;
        for (side, p) in [(a, true), (b, false)] {
            s.push_str(side);
            s.push('.');
            push_ident(s, name);
            if p {
                s.push_str(" = ");
            }
        }
    }
}

/// For a whole-row identity: the same value, compared by the text the destination makes
/// of both sides (NULL matching NULL). Types without `=` (json, point, xml) compare, and
/// so do those whose `=` is not identity (box and circle compare areas).
fn push_text_match(s: &mut String, table: &TargetTable, a: &str, b: &str) {
    for (n, &k) in table.key.iter().enumerate() {
        if n > 0 {
            s.push_str(" AND ");
        }
        let name = &table.columns[k].name;
        s.push_str(&format!("{a}."));
        push_ident(s, name);
        s.push_str("::text IS NOT DISTINCT FROM ");
        s.push_str(&format!("{b}."));
        push_ident(s, name);
        s.push_str("::text");
    }
    if table.sid.is_some() {
        s.push_str(&format!(" AND {a}.\"sid\" = {b}.\"sid\""));
    }
}

/// `(t.tableoid, t.ctid) IN (…)`: one row per staged key of a whole-row identity, a
/// different one for each (the stage holds no key twice).
fn push_one_row_per_key(s: &mut String, table: &TargetTable, stage: &Stage) {
    s.push_str("(t.tableoid, t.ctid) IN (SELECT p.tableoid, p.ctid FROM ");
    s.push_str(&stage.keys);
    s.push_str(" AS k CROSS JOIN LATERAL (SELECT x.tableoid, x.ctid FROM ");
    s.push_str(&target(table));
    s.push_str(" AS x WHERE ");
    push_text_match(s, table, "x", "k");
    s.push_str(" LIMIT 1) AS p)");
}

/// Deletes the staged keys. Its row count tells how many existed.
pub fn delete_staged(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!("DELETE FROM {} AS t", target(table));
    push_staged_key_rows(&mut s, table, stage, " USING ");
    s
}

/// What finds the target rows `t` of the staged keys: the key stage joined (after
/// `join`: `USING` or a `FROM` list's comma) and matched by key, or for a whole-row
/// identity one row per staged key.
fn push_staged_key_rows(s: &mut String, table: &TargetTable, stage: &Stage, join: &str) {
    if table.full_identity {
        s.push_str(" WHERE ");
        push_one_row_per_key(s, table, stage);
    } else {
        s.push_str(join);
        s.push_str(&stage.keys);
        s.push_str(" AS k WHERE ");
        push_key_match(s, table, "t", "k");
    }
}

/// `INSERT INTO target (cols…) OVERRIDING SYSTEM VALUE SELECT s.cols… FROM <rows> AS s
/// WHERE s.kvsz_mask IS NULL` (identity columns receive the source's values too).
fn push_insert_select(s: &mut String, table: &TargetTable, stage: &Stage, alias: bool) {
    let cols = all_cols(table);
    s.push_str("INSERT INTO ");
    s.push_str(&target(table));
    if alias {
        s.push_str(" AS t");
    }
    s.push_str(" (");
    push_cols(s, table, &cols, "", true);
    s.push_str(") OVERRIDING SYSTEM VALUE SELECT ");
    push_cols(s, table, &cols, "s.", true);
    s.push_str(" FROM ");
    s.push_str(&stage.rows);
    s.push_str(" AS s WHERE s.");
    s.push_str(MASK);
    s.push_str(" IS NULL");
}

/// Whether an upsert that finds the row by its key writes column `c`: every column but
/// the key's, and a loose key's too, whose equal value may be spelt otherwise (an append
/// target kept 'key9', the source inserts 'KEY9': the row takes the new spelling).
fn updated_on_match(table: &TargetTable, c: usize) -> bool {
    table.loose_key || !table.key.contains(&c)
}

/// Insert-or-update of the staged whole rows. With a unique index on the key, one
/// statement that returns one row, one column: how many were inserted (the others
/// existed and were updated), for the anomaly counts. Without, two statements (run as one
/// simple query) whose last command tag is that count.
pub fn upsert_staged(table: &TargetTable, stage: &Stage) -> String {
    let non_key: Vec<usize> = (0..table.columns.len())
        .filter(|&c| updated_on_match(table, c))
        .collect();
    let mut s = String::with_capacity(512);
    if table.arbiter {
        // One index probe a row.
        s.push_str("WITH i AS (");
        push_insert_select(&mut s, table, stage, true);
        push_on_conflict(&mut s, table);
        return s;
    }
    // Without a unique index on the key: update the rows whose key exists, then insert
    // the others, in two statements (the second sees the first's rows). Its command tag
    // counts the inserted rows. A table of key columns only sets its key to itself.
    let set = if non_key.is_empty() {
        table.key.clone()
    } else {
        non_key
    };
    s.push_str("UPDATE ");
    s.push_str(&target(table));
    s.push_str(" AS t SET ");
    push_set_from(&mut s, table, &set);
    s.push_str(" FROM ");
    s.push_str(&stage.rows);
    s.push_str(" AS s WHERE s.");
    s.push_str(MASK);
    s.push_str(" IS NULL AND ");
    push_key_match(&mut s, table, "t", "s");
    s.push_str("; ");
    push_insert_select(&mut s, table, stage, false);
    s.push_str(" AND NOT EXISTS (SELECT 1 FROM ");
    s.push_str(&target(table));
    s.push_str(" AS t WHERE ");
    push_key_match(&mut s, table, "t", "s");
    s.push(')');
    s
}

/// ` ON CONFLICT (key…) DO UPDATE SET …` of an upsert into a target with a unique key
/// index, then what returns the inserted count (`xmax` is 0 on a freshly inserted row
/// version, set on one that conflicted).
fn push_on_conflict(s: &mut String, table: &TargetTable) {
    s.push_str(" ON CONFLICT (");
    push_cols(s, table, &table.key, "", true);
    s.push(')');
    let mut non_key = (0..table.columns.len()).filter(|&c| updated_on_match(table, c));
    match non_key.next() {
        None => s.push_str(" DO NOTHING"),
        Some(first) => {
            s.push_str(" DO UPDATE SET ");
            for (n, c) in std::iter::once(first).chain(non_key).enumerate() {
                if n > 0 {
                    s.push_str(", ");
                }
                push_ident(s, &table.columns[c].name);
                s.push_str(" = EXCLUDED.");
                push_ident(s, &table.columns[c].name);
            }
        }
    }
    s.push_str(" RETURNING t.xmax = 0 AS ins) SELECT count(*) FILTER (WHERE ins) FROM i");
}

/// The staged whole rows of a whole-row identity as new rows. With `only_missing`
/// (an UPDATE that changed nothing) a row is inserted only when no copy exists;
/// `skip_conflicts` lets a replayed row that a unique index refuses be.
pub fn insert_staged(
    table: &TargetTable,
    stage: &Stage,
    only_missing: bool,
    skip_conflicts: bool,
) -> String {
    let mut s = String::with_capacity(256);
    push_insert_select(&mut s, table, stage, false);
    if only_missing {
        s.push_str(" AND NOT EXISTS (SELECT 1 FROM ");
        s.push_str(&target(table));
        s.push_str(" AS x WHERE ");
        push_text_match(&mut s, table, "x", "s");
        s.push(')');
    }
    if skip_conflicts {
        s.push_str(" ON CONFLICT DO NOTHING");
    }
    s
}

/// Updates the columns present in the staged patches of one `mask`, found by key; None
/// when the mask leaves every non-key column unchanged (nothing to write). A loose key
/// takes the patch's spelling too, as an upsert's does: an append target may keep a row
/// whose respelling the filter left out ('KEY7' kept, the source's row now 'Key7').
pub fn patch_staged(table: &TargetTable, stage: &Stage, mask: &str) -> Option<String> {
    let present: Vec<usize> = mask
        .bytes()
        .enumerate()
        .filter(|&(i, b)| b == b'1' && (table.loose_key || !table.key.contains(&i)))
        .map(|(i, _)| i)
        .collect();
    if present.is_empty() {
        return None;
    }
    let mut s = format!("UPDATE {} AS t SET ", target(table));
    push_set_from(&mut s, table, &present);
    s.push_str(" FROM ");
    s.push_str(&stage.rows);
    s.push_str(" AS s WHERE s.");
    s.push_str(MASK);
    s.push_str(" = ");
    push_literal(&mut s, mask);
    s.push_str(" AND ");
    push_key_match(&mut s, table, "t", "s");
    Some(s)
}

/// `"c1" = s."c1", …`.
fn push_set_from(s: &mut String, table: &TargetTable, cols: &[usize]) {
    for (n, &c) in cols.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        push_ident(s, &table.columns[c].name);
        s.push_str(" = s.");
        push_ident(s, &table.columns[c].name);
    }
}

/// Moves the row of the staged old key to the staged row's key and present values, in
/// place (its unchanged TOAST values stay). One staged row and key.
pub fn move_staged(table: &TargetTable, stage: &Stage, mask: &str) -> String {
    let present: Vec<usize> = mask
        .bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'1')
        .map(|(i, _)| i)
        .collect();
    let mut s = format!("UPDATE {} AS t SET ", target(table));
    push_set_from(&mut s, table, &present);
    s.push_str(" FROM ");
    s.push_str(&stage.rows);
    s.push_str(" AS s");
    push_staged_key_rows(&mut s, table, stage, ", ");
    s
}

/// Deletes the row that already holds the key a staged move goes to (an append target
/// keeps rows the source deleted; a clone target may hold a stray one), unless it is the
/// moved row itself (a loose key spelt anew): the move then takes the key, as the source's
/// UPDATE did, instead of failing on the key's unique index.
pub fn clear_move_target(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!(
        "DELETE FROM {} AS t USING {} AS s WHERE ",
        target(table),
        stage.rows
    );
    push_key_match(&mut s, table, "t", "s");
    s.push_str(" AND NOT EXISTS (SELECT 1 FROM ");
    s.push_str(&stage.keys);
    s.push_str(" AS k WHERE ");
    push_key_match(&mut s, table, "t", "k");
    s.push(')');
    s
}

/// A value as an untyped literal. Only where the target column's type resolves it: an
/// INSERT's VALUES, a SET, or a comparison with the column. The literal then goes through
/// the column type's input function with its modifier, exactly as COPY does; never as a
/// cast, which would truncate.
fn push_value_literal(s: &mut String, v: Value) {
    match v {
        Value::Text(t) => push_literal(s, t),
        Value::Null | Value::Unchanged => s.push_str("NULL"),
    }
}

/// Whether a small batch's group can be applied with literals in one simple query (a
/// single round trip for the whole transaction): a net group of a target with a unique
/// key index whose columns an untyped literal can be compared with, holding whole rows,
/// deletes and patches only.
pub fn literal_ok(table: &TargetTable, entries: &[Entry]) -> bool {
    table.arbiter
        && !table.serial
        && !table.loose_key
        && !table.composite_key
        && !table.full_identity
        && entries
            .iter()
            .all(|e| matches!(e.net, Net::Upsert | Net::Delete | Net::Patch))
}

/// The upsert of whole rows as literals; returns the inserted count like
/// [`upsert_staged`].
pub fn upsert_literal(table: &TargetTable, entries: &[&Entry]) -> String {
    let cols = all_cols(table);
    let mut s = String::with_capacity(256 + entries.len() * 64);
    s.push_str("WITH i AS (INSERT INTO ");
    s.push_str(&target(table));
    s.push_str(" AS t (");
    push_cols(&mut s, table, &cols, "", true);
    s.push_str(") OVERRIDING SYSTEM VALUE VALUES ");
    for (n, e) in entries.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for (i, v) in e.change.values.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            push_value_literal(&mut s, v);
        }
        if let Some(sid) = &e.change.table.sid {
            s.push_str(", ");
            push_literal(&mut s, sid.as_str());
        }
        s.push(')');
    }
    push_on_conflict(&mut s, table);
    s
}

/// The key of an entry as `(lit, …[, sid])`.
fn push_key_literals(s: &mut String, e: &Entry) {
    let mut n = 0;
    s.push('(');
    while let Some(v) = e.change.key_value(n) {
        if n > 0 {
            s.push_str(", ");
        }
        push_value_literal(s, v);
        n += 1;
    }
    if let Some(sid) = &e.change.table.sid {
        s.push_str(", ");
        push_literal(s, sid.as_str());
    }
    s.push(')');
}

/// `(t."k1", …[, t."sid"])`.
fn push_key_columns(s: &mut String, table: &TargetTable) {
    s.push('(');
    push_cols(s, table, &table.key, "t.", true);
    s.push(')');
}

/// Deletes the entries' keys given as literals (each compared with its column, so the
/// key index serves).
pub fn delete_literal(table: &TargetTable, entries: &[&Entry]) -> String {
    let mut s = format!("DELETE FROM {} AS t WHERE ", target(table));
    push_key_columns(&mut s, table);
    s.push_str(" IN (");
    for (n, e) in entries.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        push_key_literals(&mut s, e);
    }
    s.push(')');
    s
}

/// One patch as literals: the present non-key columns of the row with that key, refused
/// with `refuse` (see [`crate::store::REFUSE_FUNCTION`]) when the target has no such row.
pub fn patch_literal(table: &TargetTable, e: &Entry, refuse: &str) -> String {
    let present: Vec<usize> = (0..table.columns.len())
        .filter(|&i| !table.key.contains(&i) && e.change.values.at(i) != Value::Unchanged)
        .collect();
    let mut s = String::new();
    if present.is_empty() {
        s.push_str("SELECT ");
        s.push_str(refuse);
        s.push_str(" WHERE NOT EXISTS (SELECT 1 FROM ");
        s.push_str(&target(table));
        s.push_str(" AS t WHERE ");
        push_key_columns(&mut s, table);
        s.push_str(" = ");
        push_key_literals(&mut s, e);
        s.push(')');
        return s;
    }
    s.push_str("WITH u AS (UPDATE ");
    s.push_str(&target(table));
    s.push_str(" AS t SET ");
    for (n, &c) in present.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        push_ident(&mut s, &table.columns[c].name);
        s.push_str(" = ");
        push_value_literal(&mut s, e.change.values.at(c));
    }
    s.push_str(" WHERE ");
    push_key_columns(&mut s, table);
    s.push_str(" = ");
    push_key_literals(&mut s, e);
    s.push_str(" RETURNING 1) SELECT ");
    s.push_str(refuse);
    s.push_str(" WHERE NOT EXISTS (SELECT 1 FROM u)");
    s
}

/// Why a change whose unchanged TOAST values (the `0`s of `mask`) the source did not
/// send cannot be applied: the target has no row (or current version) to take them
/// from. One text for every path that finds it, so a report reads the same.
pub fn incomplete_message(table: &TargetTable, mask: &str) -> String {
    let cols: Vec<String> = mask
        .bytes()
        .zip(&table.columns)
        .filter(|(b, _)| *b == b'0')
        .map(|(_, c)| format!("\"{}\"", c.name))
        .collect();
    format!(
        "the target has no current row for this UPDATE, which left TOASTed column(s) {} \
         unchanged: the source did not send their values, so the row cannot be made \
         (REPLICA IDENTITY FULL on the source table sends them; `kuvasz-streamer resync` \
         copies the table again)",
        cols.join(", ")
    )
}

/// Refuses (with the `refuse` call) the staged patches of one `mask` whose key the
/// target does not have: a partial row cannot be inserted. Run before the patch.
pub fn refuse_missing_patch(
    table: &TargetTable,
    stage: &Stage,
    mask: &str,
    refuse: &str,
) -> String {
    let mut s = format!("SELECT {refuse} FROM {} AS s WHERE s.{MASK} = ", stage.rows);
    push_literal(&mut s, mask);
    s.push_str(" AND NOT EXISTS (SELECT 1 FROM ");
    s.push_str(&target(table));
    s.push_str(" AS t WHERE ");
    push_key_match(&mut s, table, "t", "s");
    s.push_str(") LIMIT 1");
    s
}

/// Refuses a staged move whose old key the target does not have (the moved row's
/// unchanged values would come from it). Run before the move.
pub fn refuse_missing_move(table: &TargetTable, stage: &Stage, refuse: &str) -> String {
    let mut s = format!(
        "SELECT {refuse} FROM {} AS k WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE ",
        stage.keys,
        target(table)
    );
    push_key_match(&mut s, table, "t", "k");
    s.push_str(") LIMIT 1");
    s
}

/// Removes every row of this target that belongs to the entry's source (its sid, or all
/// rows when the target has no sid column).
pub fn truncate(e: &Entry) -> String {
    let table = &e.change.table;
    let mut s = format!("DELETE FROM {} AS t", target(table));
    if let Some(sid) = &table.sid {
        s.push_str(" WHERE t.\"sid\" = ");
        push_literal(&mut s, sid.as_str());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::batch::Batch;
    use crate::change::{Op, Position, Row, Sid, TargetColumn};
    use std::sync::Arc;

    fn table(sid: Option<&str>) -> Arc<TargetTable> {
        Arc::new(TargetTable {
            schema: "public".into(),
            name: "T x".into(),
            columns: vec![
                TargetColumn {
                    name: "id".into(),
                    type_name: "integer".into(),
                    loose: false,
                },
                TargetColumn {
                    name: "na\"me".into(),
                    type_name: "character(3)".into(),
                    loose: false,
                },
            ],
            key: vec![0],
            sid: sid.map(Sid::new),
            arbiter: false,
            serial: false,
            full_identity: false,
            mode: crate::mode::Mode::Clone,
            loose_key: false,
            composite_key: false,
        })
    }

    fn change(t: &Arc<TargetTable>, op: Op, vals: &[Option<&str>]) -> Change {
        let v = Row::from_texts(vals);
        let (values, old_key) = if op == Op::Delete {
            (Row::default(), Some(v))
        } else {
            (v, None)
        };
        Change {
            source: 0,
            table: t.clone(),
            op,
            values,
            old_key,
            pos: Position::default(),
            commit_time: 0,
        }
    }

    const S: fn() -> Stage = || Stage::new(3);

    #[test]
    fn stages_are_made_from_the_target_columns() {
        assert_eq!(
            create_stage(&table(Some("a")), &S()),
            "CREATE TEMP TABLE IF NOT EXISTS kvsz_r3 ON COMMIT DELETE ROWS AS SELECT NULL::text AS kvsz_mask, \
             t.\"id\", t.\"na\"\"me\", t.\"sid\" FROM ONLY \"public\".\"T x\" AS t WITH NO DATA; \
             CREATE TEMP TABLE IF NOT EXISTS kvsz_k3 ON COMMIT DELETE ROWS AS SELECT t.\"id\", t.\"sid\" \
             FROM ONLY \"public\".\"T x\" AS t WITH NO DATA"
        );
        assert_eq!(
            copy_rows_in(&table(None), &S()),
            "COPY pg_temp.kvsz_r3 (kvsz_mask, \"id\", \"na\"\"me\") FROM STDIN"
        );
        assert_eq!(
            copy_keys_in(&table(Some("a")), &S()),
            "COPY pg_temp.kvsz_k3 (\"id\", \"sid\") FROM STDIN"
        );
        assert_eq!(
            copy_target_in(&table(Some("a"))),
            "COPY \"public\".\"T x\" (\"id\", \"na\"\"me\", \"sid\") FROM STDIN"
        );
    }

    #[test]
    fn staged_lines_escape_and_carry_the_sid() {
        let t = table(Some("s\t1"));
        let a = change(&t, Op::Insert, &[Some("1"), Some("a\\b")]);
        let mut out = Vec::new();
        row_line(&a, &mut out);
        target_line(&a, &mut out);
        assert_eq!(out, b"\\N\t1\ta\\\\b\ts\\t1\n1\ta\\\\b\ts\\t1\n");
        let mut p = change(&t, Op::Update, &[Some("2")]);
        p.values = Row::from_values([Value::Text("2"), Value::Unchanged].into_iter());
        out.clear();
        row_line(&p, &mut out);
        assert_eq!(out, b"10\t2\t\\N\ts\\t1\n");
        let d = change(&t, Op::Delete, &[Some("7")]);
        out.clear();
        key_line(&d, &mut out);
        assert_eq!(out, b"7\ts\\t1\n");
    }

    #[test]
    fn upsert_with_a_key_index_uses_on_conflict() {
        let t = Arc::new(TargetTable {
            arbiter: true,
            ..(*table(Some("s1"))).clone()
        });
        assert_eq!(
            upsert_staged(&t, &S()),
            "WITH i AS (INSERT INTO \"public\".\"T x\" AS t (\"id\", \"na\"\"me\", \"sid\") \
             OVERRIDING SYSTEM VALUE SELECT s.\"id\", s.\"na\"\"me\", s.\"sid\" FROM pg_temp.kvsz_r3 AS s \
             WHERE s.kvsz_mask IS NULL ON CONFLICT (\"id\", \"sid\") DO UPDATE SET \"na\"\"me\" = EXCLUDED.\"na\"\"me\" \
             RETURNING t.xmax = 0 AS ins) SELECT count(*) FILTER (WHERE ins) FROM i"
        );
        let key_only = Arc::new(TargetTable {
            columns: vec![t.columns[0].clone()],
            ..(*t).clone()
        });
        assert!(upsert_staged(&key_only, &S()).contains("ON CONFLICT (\"id\", \"sid\") DO NOTHING"));
        // A loose key takes the new row's spelling ('KEY9' for a kept 'key9').
        let loose = Arc::new(TargetTable {
            loose_key: true,
            ..(*t).clone()
        });
        assert!(upsert_staged(&loose, &S()).contains(
            "DO UPDATE SET \"id\" = EXCLUDED.\"id\", \"na\"\"me\" = EXCLUDED.\"na\"\"me\" "
        ));
    }

    #[test]
    fn upsert_without_a_key_index_updates_then_inserts() {
        let t = table(None);
        assert_eq!(
            upsert_staged(&t, &S()),
            "UPDATE \"public\".\"T x\" AS t SET \"na\"\"me\" = s.\"na\"\"me\" FROM pg_temp.kvsz_r3 AS s \
             WHERE s.kvsz_mask IS NULL AND t.\"id\" = s.\"id\"; \
             INSERT INTO \"public\".\"T x\" (\"id\", \"na\"\"me\") OVERRIDING SYSTEM VALUE \
             SELECT s.\"id\", s.\"na\"\"me\" FROM pg_temp.kvsz_r3 AS s WHERE s.kvsz_mask IS NULL \
             AND NOT EXISTS (SELECT 1 FROM \"public\".\"T x\" AS t WHERE t.\"id\" = s.\"id\")"
        );
        let key_only = Arc::new(TargetTable {
            columns: vec![t.columns[0].clone()],
            ..(*t).clone()
        });
        assert!(upsert_staged(&key_only, &S()).contains("SET \"id\" = s.\"id\" FROM"));
    }

    #[test]
    fn delete_by_staged_key() {
        assert_eq!(
            delete_staged(&table(Some("s1")), &S()),
            "DELETE FROM \"public\".\"T x\" AS t USING pg_temp.kvsz_k3 AS k \
             WHERE t.\"id\" = k.\"id\" AND t.\"sid\" = k.\"sid\""
        );
    }

    #[test]
    fn whole_row_identity_deletes_one_copy_per_key_by_text() {
        let t = Arc::new(TargetTable {
            full_identity: true,
            key: vec![0, 1],
            ..(*table(None)).clone()
        });
        assert_eq!(
            delete_staged(&t, &S()),
            "DELETE FROM \"public\".\"T x\" AS t WHERE (t.tableoid, t.ctid) IN \
             (SELECT p.tableoid, p.ctid FROM pg_temp.kvsz_k3 AS k CROSS JOIN LATERAL \
             (SELECT x.tableoid, x.ctid FROM \"public\".\"T x\" AS x WHERE \
             x.\"id\"::text IS NOT DISTINCT FROM k.\"id\"::text AND \
             x.\"na\"\"me\"::text IS NOT DISTINCT FROM k.\"na\"\"me\"::text LIMIT 1) AS p)"
        );
        let ins = insert_staged(&t, &S(), true, true);
        assert!(ins.ends_with(
            "AND NOT EXISTS (SELECT 1 FROM \"public\".\"T x\" AS x WHERE \
             x.\"id\"::text IS NOT DISTINCT FROM s.\"id\"::text AND \
             x.\"na\"\"me\"::text IS NOT DISTINCT FROM s.\"na\"\"me\"::text) ON CONFLICT DO NOTHING"
        ), "{ins}");
    }

    #[test]
    fn patches_write_only_present_columns() {
        let t = table(Some("a"));
        assert_eq!(
            patch_staged(&t, &S(), "11").unwrap(),
            "UPDATE \"public\".\"T x\" AS t SET \"na\"\"me\" = s.\"na\"\"me\" FROM pg_temp.kvsz_r3 AS s \
             WHERE s.kvsz_mask = '11' AND t.\"id\" = s.\"id\" AND t.\"sid\" = s.\"sid\""
        );
        assert_eq!(patch_staged(&t, &S(), "10"), None);
        let loose = TargetTable {
            loose_key: true,
            ..(*t).clone()
        };
        assert_eq!(
            patch_staged(&loose, &S(), "10").unwrap(),
            "UPDATE \"public\".\"T x\" AS t SET \"id\" = s.\"id\" FROM pg_temp.kvsz_r3 AS s \
             WHERE s.kvsz_mask = '10' AND t.\"id\" = s.\"id\" AND t.\"sid\" = s.\"sid\""
        );
        assert_eq!(
            refuse_missing_patch(&t, &S(), "10", "r('m')"),
            "SELECT r('m') FROM pg_temp.kvsz_r3 AS s WHERE s.kvsz_mask = '10' AND NOT EXISTS \
             (SELECT 1 FROM \"public\".\"T x\" AS t WHERE t.\"id\" = s.\"id\" AND t.\"sid\" = s.\"sid\") \
             LIMIT 1"
        );
        assert_eq!(
            refuse_missing_move(&t, &S(), "r('m')"),
            "SELECT r('m') FROM pg_temp.kvsz_k3 AS k WHERE NOT EXISTS (SELECT 1 FROM \"public\".\"T x\" \
             AS t WHERE t.\"id\" = k.\"id\" AND t.\"sid\" = k.\"sid\") LIMIT 1"
        );
        assert_eq!(
            move_staged(&t, &S(), "10"),
            "UPDATE \"public\".\"T x\" AS t SET \"id\" = s.\"id\" FROM pg_temp.kvsz_r3 AS s, \
             pg_temp.kvsz_k3 AS k WHERE t.\"id\" = k.\"id\" AND t.\"sid\" = k.\"sid\""
        );
    }

    #[test]
    fn small_batches_as_literals_resolved_by_the_columns() {
        let t = Arc::new(TargetTable {
            arbiter: true,
            ..(*table(Some("s'1"))).clone()
        });
        let mut b = Batch::default();
        b.push(change(&t, Op::Insert, &[Some("1"), Some("it's")]), 1);
        b.push(change(&t, Op::Insert, &[Some("2"), None]), 2);
        b.push(change(&t, Op::Delete, &[Some("3")]), 3);
        let mut p = change(&t, Op::Update, &[Some("4")]);
        p.values = Row::from_values([Value::Text("4"), Value::Unchanged].into_iter());
        b.push(p, 4);
        let g = &b.groups[0];
        assert!(literal_ok(&g.table, &g.entries));
        let e: Vec<&Entry> = g.entries.iter().collect();
        assert_eq!(
            upsert_literal(&t, &e[..2]),
            "WITH i AS (INSERT INTO \"public\".\"T x\" AS t (\"id\", \"na\"\"me\", \"sid\") \
             OVERRIDING SYSTEM VALUE VALUES ('1', 'it''s', 's''1'), ('2', NULL, 's''1') \
             ON CONFLICT (\"id\", \"sid\") DO UPDATE SET \"na\"\"me\" = EXCLUDED.\"na\"\"me\" \
             RETURNING t.xmax = 0 AS ins) SELECT count(*) FILTER (WHERE ins) FROM i"
        );
        assert_eq!(
            delete_literal(&t, &e[2..3]),
            "DELETE FROM \"public\".\"T x\" AS t WHERE (t.\"id\", t.\"sid\") IN (('3', 's''1'))"
        );
        // Only the key is present: nothing to update, but a missing row is refused.
        assert_eq!(
            patch_literal(&t, e[3], "r('m')"),
            "SELECT r('m') WHERE NOT EXISTS (SELECT 1 FROM \"public\".\"T x\" AS t WHERE \
             (t.\"id\", t.\"sid\") = ('4', 's''1'))"
        );
        let mut p = change(&t, Op::Update, &[Some("5")]);
        p.values = Row::from_values([Value::Text("5"), Value::Text("x")].into_iter());
        let mut b = Batch::default();
        b.push(p, 5);
        assert_eq!(
            patch_literal(&t, &b.groups[0].entries[0], "r('m')"),
            "WITH u AS (UPDATE \"public\".\"T x\" AS t SET \"na\"\"me\" = 'x' WHERE \
             (t.\"id\", t.\"sid\") = ('5', 's''1') RETURNING 1) SELECT r('m') WHERE NOT EXISTS \
             (SELECT 1 FROM u)"
        );
        assert_eq!(
            incomplete_message(&t, "10"),
            "the target has no current row for this UPDATE, which left TOASTed column(s) \
             \"na\"me\" unchanged: the source did not send their values, so the row cannot be \
             made (REPLICA IDENTITY FULL on the source table sends them; `kuvasz-streamer \
             resync` copies the table again)"
        );
        let full = Arc::new(TargetTable {
            full_identity: true,
            ..(*t).clone()
        });
        assert!(!literal_ok(&full, &g.entries));
        // A composite key compared with an untyped literal is an error, and keys equal
        // on the destination may differ as text: both go through the typed stages.
        for t in [
            TargetTable {
                composite_key: true,
                ..(*t).clone()
            },
            TargetTable {
                loose_key: true,
                ..(*t).clone()
            },
        ] {
            assert!(!literal_ok(&t, &g.entries));
        }
    }

    #[test]
    fn truncate_by_sid() {
        let mut b = Batch::default();
        let mut c = change(&table(Some("o'k")), Op::Truncate, &[]);
        c.values = Row::default();
        b.push(c, 0);
        assert_eq!(
            truncate(&b.groups[0].entries[0]),
            "DELETE FROM \"public\".\"T x\" AS t WHERE t.\"sid\" = 'o''k'"
        );
        let mut b = Batch::default();
        b.push(change(&table(None), Op::Truncate, &[]), 0);
        assert_eq!(
            truncate(&b.groups[0].entries[0]),
            "DELETE FROM \"public\".\"T x\" AS t"
        );
    }
}
