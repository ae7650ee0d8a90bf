//! History (SCD2) targets: a batch's changes become versions, applied set-based. Pure
//! logic and SQL building, unit-tested.
//!
//! A version is a target row with `kvsz_start`, `kvsz_end` and `kvsz_deleted`; the
//! current one is open (`kvsz_end` = 9999-01-01). Each change carries its stamp `S` (its
//! transaction's commit time, see [`crate::source::stamps`]). The changes of each key
//! in the batch are chained in memory: an UPDATE closes the version before it at `S` and
//! opens one from `S`; a DELETE closes it as deleted; an INSERT opens one (valid from
//! 1900-01-01 when the key has no version at all). What the chain cannot know — the
//! key's version on the destination — is settled by four statements over two staging
//! tables: rows (new versions) and keys (closings of versions the batch did not open).
//! Each change comes exactly once (a replay skips what was applied, by position: see
//! [`crate::store`]), so nothing here guesses from stamps whether it was applied.
//!
//! 1. `fill`: a version whose unchanged TOAST values the source did not send takes them
//!    from the key's open version.
//! 2. `mark`: a key's first INSERT of the batch starts at its stamp when the key has
//!    versions on the destination, and from 1900-01-01 when it has none.
//! 3. `close`: the key's open version ends at the batch's first closing of it; then an
//!    INSERT of a key whose version is still open closes it (`close_reinserted`: it
//!    updates the key, as in clone).
//! 4. `insert`: the versions are added.

use std::borrow::Cow;

use crate::change::{Change, Op, Row, TargetTable, Value};
use crate::pg::quote::{push_ident, push_literal};
use crate::pg::timestamp::timestamp_text;

use super::batch::{entry_key, same_key, Entry, FingerprintMap};
use super::sql::{all_cols, push_cols, push_key_match, push_sid, push_value, target, Stage};

/// `kvsz_end` of an open version, `kvsz_start` of a first one (SPEC §4), in UTC.
pub const OPEN_END: &str = "9999-01-01 00:00:00+00";
pub const FIRST_START: &str = "1900-01-01 00:00:00+00";
/// A version is open when it ends on or after this: versions another program wrote
/// with `'9999-01-01'` in its own session time zone count as open too.
pub const OPEN_FROM: &str = "9998-12-31 00:00:00+00";

/// A new version of a key.
#[derive(Debug)]
pub struct Version<'a> {
    pub change: &'a Change,
    /// Its values; Unchanged ones are taken from the key's open version (`fill`).
    pub values: Cow<'a, Row>,
    /// Its start (the stamp of the change that made it).
    pub at: i64,
    /// Closed by a later change of the batch: when, and whether by a DELETE.
    pub end: Option<(i64, bool)>,
    /// Made by an INSERT before any other version of its key in the batch: valid from
    /// 1900-01-01 when the key has no version at all on the destination.
    pub first: bool,
    /// A partial UPDATE of a key the batch closed before it: no version to take its
    /// unchanged values from, so the change is refused (a rejected row).
    pub incomplete: bool,
}

/// The closing of a key's open version on the destination.
#[derive(Debug)]
pub struct Close<'a> {
    /// Its key: the change's lookup key.
    pub change: &'a Change,
    pub at: i64,
    pub deleted: bool,
}

/// What a batch's changes to a history target stage.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    pub versions: Vec<Version<'a>>,
    pub closes: Vec<Close<'a>>,
    /// Some version takes its unchanged values from the open version of its key (a
    /// partial UPDATE), or of the closed key (`moved`: a key change with unchanged values,
    /// always alone in its batch).
    pub fills: bool,
    pub moved: bool,
}

/// One key's chain while planning.
struct Chain<'a> {
    key: &'a Change,
    /// Its version opened in this batch and not closed yet.
    open: Option<usize>,
    /// Some version of it was opened in this batch.
    opened: bool,
}

/// Chains `entries` (one per change, in source order) into versions and closings.
pub fn plan(entries: &[Entry]) -> Plan<'_> {
    let mut p = Plan::default();
    let mut chains: FingerprintMap<Vec<Chain>> = FingerprintMap::default();
    for e in entries {
        let c = &e.change;
        let at = c.commit_time;
        if c.op == Op::Update && c.old_key.is_some() {
            // A key change whose new row is not whole: the old key closes, the new key
            // opens with the old version's unchanged values.
            p.closes.push(Close {
                change: c,
                at,
                deleted: true,
            });
            p.versions.push(Version {
                change: c,
                values: Cow::Borrowed(&c.values),
                at,
                end: None,
                first: false,
                incomplete: false,
            });
            p.moved = true;
            continue;
        }
        // A loose key's spellings are one key on the destination: chained by the folded
        // text ('Key2' deleted and 'key2' inserted make one history).
        // Tenants share the group, never a chain: a loose chain is keyed with the sid.
        let (chain, loose) = if c.table.loose_key {
            (entry_key(c, c.stamp_key(false)), true)
        } else {
            (e.key, false)
        };
        let list = chains.entry(chain).or_default();
        let same = |ch: &Chain| {
            if loose {
                ch.key.table.sid == c.table.sid
            } else {
                same_key(ch.key, c)
            }
        };
        let (n, seen) = match list.iter().position(same) {
            Some(n) => (n, true),
            None => {
                list.push(Chain {
                    key: c,
                    open: None,
                    opened: false,
                });
                (list.len() - 1, false)
            }
        };
        let open = list[n].open.take();
        let closed_here = seen && open.is_none();
        let first = !list[n].opened;
        // Every UPDATE and DELETE may close the destination's open version of its key:
        // the key's first closing in the batch does (`close`). A first INSERT of a key
        // the destination has open closes it too (`close_reinserted`), found as it is
        // marked: staging a closing for every INSERT would double a backlog's work.
        if c.op != Op::Insert || open.is_some() {
            p.closes.push(Close {
                change: c,
                at,
                deleted: c.op == Op::Delete,
            });
        }
        match c.op {
            Op::Delete => {
                if let Some(v) = open {
                    p.versions[v].end = Some((at, true));
                }
            }
            // An INSERT of a key whose version the batch has open is an update of it.
            Op::Insert | Op::Update => {
                let values = match open {
                    Some(v) => {
                        let prev = &mut p.versions[v];
                        prev.end = Some((at, false));
                        if c.values.has_unchanged() {
                            Cow::Owned(Row::from_values((0..c.values.len()).map(|i| {
                                match c.values.at(i) {
                                    Value::Unchanged => prev.values.at(i),
                                    v => v,
                                }
                            })))
                        } else {
                            Cow::Borrowed(&c.values)
                        }
                    }
                    None => Cow::Borrowed(&c.values),
                };
                // Seen and not open: the batch closed the key's version (a DELETE, or
                // the row left the filter), so the destination's is no longer current.
                let incomplete = closed_here && values.has_unchanged();
                p.fills |= values.has_unchanged();
                list[n].open = Some(p.versions.len());
                list[n].opened = true;
                p.versions.push(Version {
                    change: c,
                    values,
                    at,
                    end: None,
                    first: first && c.op == Op::Insert,
                    incomplete,
                });
            }
            Op::Truncate => {}
        }
    }
    p
}

/// Creates the two stages of a history layout, typed from the target (its version
/// columns included), outside any batch transaction.
pub fn create_stage(table: &TargetTable, stage: &Stage) -> String {
    let t = target(table);
    let mut s = String::from("CREATE TEMP TABLE IF NOT EXISTS ");
    s.push_str(stage.rows.trim_start_matches("pg_temp."));
    s.push_str(
        " ON COMMIT DELETE ROWS AS SELECT NULL::text AS kvsz_mask, NULL::boolean AS kvsz_first, \
         t.kvsz_start AS kvsz_at, ",
    );
    push_cols(&mut s, table, &all_cols(table), "t.", true);
    s.push_str(", t.kvsz_start, t.kvsz_end, t.kvsz_deleted FROM ONLY ");
    s.push_str(&t);
    s.push_str(" AS t WITH NO DATA; CREATE TEMP TABLE IF NOT EXISTS ");
    s.push_str(stage.keys.trim_start_matches("pg_temp."));
    s.push_str(" ON COMMIT DELETE ROWS AS SELECT ");
    push_cols(&mut s, table, &table.key, "t.", true);
    s.push_str(", t.kvsz_start AS kvsz_at, t.kvsz_deleted FROM ONLY ");
    s.push_str(&t);
    s.push_str(" AS t WITH NO DATA");
    s
}

/// `COPY <rows> (kvsz_mask, kvsz_first, kvsz_at, cols…[, sid], kvsz_end, kvsz_deleted)`.
pub fn copy_rows_in(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!("COPY {} (kvsz_mask, kvsz_first, kvsz_at, ", stage.rows);
    push_cols(&mut s, table, &all_cols(table), "", true);
    s.push_str(", kvsz_end, kvsz_deleted) FROM STDIN");
    s
}

/// `COPY <keys> (keys…[, sid], kvsz_at, kvsz_deleted)`.
pub fn copy_keys_in(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!("COPY {} (", stage.keys);
    push_cols(&mut s, table, &table.key, "", true);
    s.push_str(", kvsz_at, kvsz_deleted) FROM STDIN");
    s
}

fn push_bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"t" } else { b"f" });
}

/// A version's line for [`copy_rows_in`].
pub fn version_line(v: &Version, out: &mut Vec<u8>) {
    if v.values.has_unchanged() {
        for x in v.values.iter() {
            out.push(if x == Value::Unchanged { b'0' } else { b'1' });
        }
    } else {
        out.extend_from_slice(b"\\N");
    }
    out.push(b'\t');
    push_bool(out, v.first);
    out.push(b'\t');
    out.extend_from_slice(timestamp_text(v.at).as_bytes());
    for x in v.values.iter() {
        out.push(b'\t');
        push_value(out, x);
    }
    push_sid(out, v.change);
    out.push(b'\t');
    match v.end {
        Some((end, _)) => out.extend_from_slice(timestamp_text(end).as_bytes()),
        None => out.extend_from_slice(OPEN_END.as_bytes()),
    }
    out.push(b'\t');
    push_bool(out, v.end.is_some_and(|(_, deleted)| deleted));
    out.push(b'\n');
}

/// A closing's line for [`copy_keys_in`].
pub fn close_line(c: &Close, out: &mut Vec<u8>) {
    let mut n = 0;
    while let Some(v) = c.change.key_value(n) {
        if n > 0 {
            out.push(b'\t');
        }
        push_value(out, v);
        n += 1;
    }
    push_sid(out, c.change);
    out.push(b'\t');
    out.extend_from_slice(timestamp_text(c.at).as_bytes());
    out.push(b'\t');
    push_bool(out, c.deleted);
    out.push(b'\n');
}

/// Takes the unchanged values of staged versions from the open version of their key,
/// or with `moved` of the staged closing's key (a key change: one row, one closing).
/// A filled version loses its mask; one that found no open version keeps it and is not
/// added.
pub fn fill(table: &TargetTable, stage: &Stage, moved: bool) -> String {
    let mut s = format!("UPDATE {} AS s SET kvsz_mask = NULL", stage.rows);
    for (n, c) in table.columns.iter().enumerate() {
        s.push_str(", ");
        push_ident(&mut s, &c.name);
        s.push_str(&format!(
            " = CASE WHEN substr(s.kvsz_mask, {}, 1) = '0' THEN o.",
            n + 1
        ));
        push_ident(&mut s, &c.name);
        s.push_str(" ELSE s.");
        push_ident(&mut s, &c.name);
        s.push_str(" END");
    }
    s.push_str(" FROM ");
    if moved {
        s.push_str(&stage.keys);
        s.push_str(" AS k, ");
    }
    s.push_str(&target(table));
    s.push_str(" AS o WHERE s.kvsz_mask IS NOT NULL AND ");
    push_key_match(&mut s, table, "o", if moved { "k" } else { "s" });
    s.push_str(" AND o.kvsz_end >= ");
    push_literal(&mut s, OPEN_FROM);
    s
}

/// Refuses (with the `refuse` call) a staged version of `mask` that `fill` left
/// unfilled: its key has no current version to take the unchanged values from.
pub fn refuse_unfilled(stage: &Stage, mask: &str, refuse: &str) -> String {
    let mut s = format!(
        "SELECT {refuse} FROM {} AS s WHERE s.kvsz_mask = ",
        stage.rows
    );
    push_literal(&mut s, mask);
    s.push_str(" LIMIT 1");
    s
}

/// Gives a key's first INSERT of the batch its own stamp as start when the key has
/// versions on the destination (`insert` starts the others at 1900-01-01).
pub fn mark_rows(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!(
        "UPDATE {} AS s SET kvsz_start = s.kvsz_at WHERE s.kvsz_first AND EXISTS (SELECT 1 FROM {} \
         AS t WHERE ",
        stage.rows,
        target(table)
    );
    push_key_match(&mut s, table, "t", "s");
    s.push(')');
    s
}

/// Closes, at their stamp, the open versions of keys a first INSERT of the batch finds
/// still open after `close` (an INSERT of a key the destination has: an update of it).
/// Only rows `mark_rows` marked (their key has versions) are looked at.
pub fn close_reinserted(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!(
        "UPDATE {} AS t SET kvsz_end = s.kvsz_at, kvsz_deleted = false FROM {} AS s WHERE \
         s.kvsz_first AND s.kvsz_start IS NOT NULL AND ",
        target(table),
        stage.rows
    );
    push_key_match(&mut s, table, "t", "s");
    s.push_str(" AND t.kvsz_end >= ");
    push_literal(&mut s, OPEN_FROM);
    s.push_str(" AND t.kvsz_start < s.kvsz_at");
    s
}

/// A moved key's closing (staged as a deletion) closes its version as updated when the
/// new key is the old one on the destination: a loose key respelt ('Abc' → 'abc' in
/// citext) is one row that changed, not one that ceased to exist (SPEC §4: key equality
/// is the destination's).
pub fn keep_respelt(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!(
        "UPDATE {} AS k SET kvsz_deleted = false WHERE EXISTS (SELECT 1 FROM {} AS s WHERE ",
        stage.keys, stage.rows
    );
    push_key_match(&mut s, table, "s", "k");
    s.push(')');
    s
}

/// Closes each staged key's open version at its first closing.
pub fn close(table: &TargetTable, stage: &Stage) -> String {
    let mut s = format!(
        "UPDATE {} AS t SET kvsz_end = c.kvsz_at, kvsz_deleted = c.kvsz_deleted FROM \
         (SELECT DISTINCT ON (",
        target(table)
    );
    push_cols(&mut s, table, &table.key, "", true);
    s.push_str(") ");
    push_cols(&mut s, table, &table.key, "", true);
    s.push_str(", kvsz_at, kvsz_deleted FROM ");
    s.push_str(&stage.keys);
    s.push_str(" ORDER BY ");
    push_cols(&mut s, table, &table.key, "", true);
    s.push_str(", kvsz_at) AS c WHERE ");
    push_key_match(&mut s, table, "t", "c");
    s.push_str(" AND t.kvsz_end >= ");
    push_literal(&mut s, OPEN_FROM);
    s.push_str(" AND t.kvsz_start < c.kvsz_at");
    s
}

/// Adds the staged versions (but those left without their unchanged values).
pub fn insert(table: &TargetTable, stage: &Stage) -> String {
    let cols = all_cols(table);
    let mut s = format!("INSERT INTO {} (", target(table));
    push_cols(&mut s, table, &cols, "", true);
    s.push_str(", kvsz_start, kvsz_end, kvsz_deleted) OVERRIDING SYSTEM VALUE SELECT ");
    push_cols(&mut s, table, &cols, "s.", true);
    // Unmarked: the key has no version, so a first INSERT's version is valid from 1900.
    s.push_str(", coalesce(s.kvsz_start, CASE WHEN s.kvsz_first THEN ");
    push_literal(&mut s, FIRST_START);
    s.push_str(" ELSE s.kvsz_at END), s.kvsz_end, s.kvsz_deleted FROM ");
    s.push_str(&stage.rows);
    s.push_str(" AS s WHERE s.kvsz_mask IS NULL");
    s
}

/// A TRUNCATE at stamp `at`: every open version (of the sid) closes as deleted.
pub fn truncate(e: &Entry) -> String {
    let table = &e.change.table;
    let t = target(table);
    let at = timestamp_text(e.change.commit_time);
    let sid = |s: &mut String, alias: &str| {
        if let Some(sid) = &table.sid {
            s.push_str(&format!(" AND {alias}.\"sid\" = "));
            push_literal(s, sid.as_str());
        }
    };
    let mut s = format!("UPDATE {t} AS t SET kvsz_end = ");
    push_literal(&mut s, &at);
    s.push_str(", kvsz_deleted = true WHERE t.kvsz_end >= ");
    push_literal(&mut s, OPEN_FROM);
    s.push_str(" AND t.kvsz_start < ");
    push_literal(&mut s, &at);
    sid(&mut s, "t");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::batch::Batch;
    use crate::apply::route::key_fingerprint;
    use crate::change::fixtures::{insert as ins, table};
    use crate::change::{Sid, TargetTable};
    use std::sync::Arc;

    fn history(sid: Option<&str>) -> Arc<TargetTable> {
        Arc::new(TargetTable {
            mode: crate::mode::Mode::History,
            loose_key: false,
            composite_key: false,
            sid: sid.map(Sid::new),
            ..(*table()).clone()
        })
    }

    fn at(mut c: Change, op: Op, t: i64) -> Change {
        c.op = op;
        c.commit_time = t;
        if op == Op::Delete {
            c.old_key = Some(Row::from_values([c.values.at(0)].into_iter()));
            c.values = Row::default();
        }
        c
    }

    fn batch(changes: Vec<Change>) -> Batch {
        let mut b = Batch::default();
        for c in changes {
            let k = key_fingerprint(&c);
            b.push(c, k);
        }
        b
    }

    /// (key, start, end, deleted, first, values) of the versions; (key, at, deleted) of
    /// the closings.
    type Summary = (
        Vec<(String, i64, Option<(i64, bool)>, bool, String)>,
        Vec<(String, i64, bool)>,
    );

    fn summary(p: &Plan) -> Summary {
        let key = |c: &Change| match c.key_value(0) {
            Some(Value::Text(s)) => s.to_string(),
            other => format!("{other:?}"),
        };
        (
            p.versions
                .iter()
                .map(|v| {
                    (
                        key(v.change),
                        v.at,
                        v.end,
                        v.first,
                        format!("{:?}", v.values.at(1)),
                    )
                })
                .collect(),
            p.closes
                .iter()
                .map(|c| (key(c.change), c.at, c.deleted))
                .collect(),
        )
    }

    #[test]
    fn every_change_of_a_key_makes_its_version_in_order() {
        let t = history(None);
        let b = batch(vec![
            at(ins(&t, "1", Value::Text("a")), Op::Insert, 10),
            at(ins(&t, "1", Value::Text("b")), Op::Update, 20),
            at(ins(&t, "2", Value::Text("x")), Op::Update, 20),
            at(ins(&t, "1", Value::Text("c")), Op::Update, 21),
            at(ins(&t, "2", Value::Null), Op::Delete, 30),
            at(ins(&t, "1", Value::Null), Op::Delete, 40),
            at(ins(&t, "1", Value::Text("d")), Op::Insert, 50),
        ]);
        let g = &b.groups[0];
        assert_eq!(g.entries.len(), 7, "a history group keeps every change");
        assert_eq!(g.segments().len(), 1);
        let p = plan(&g.entries);
        assert!(!p.fills && !p.moved);
        let (versions, closes) = summary(&p);
        assert_eq!(
            versions,
            [
                (
                    "1".into(),
                    10,
                    Some((20, false)),
                    true,
                    "Text(\"a\")".into()
                ),
                (
                    "1".into(),
                    20,
                    Some((21, false)),
                    false,
                    "Text(\"b\")".into()
                ),
                (
                    "2".into(),
                    20,
                    Some((30, true)),
                    false,
                    "Text(\"x\")".into()
                ),
                (
                    "1".into(),
                    21,
                    Some((40, true)),
                    false,
                    "Text(\"c\")".into()
                ),
                ("1".into(), 50, None, false, "Text(\"d\")".into()),
            ]
        );
        // Every update and delete may close the destination's open version (the key's
        // first one does).
        assert_eq!(
            closes,
            [
                ("1".into(), 20, false),
                ("2".into(), 20, false),
                ("1".into(), 21, false),
                ("2".into(), 30, true),
                ("1".into(), 40, true),
            ]
        );
    }

    #[test]
    fn partial_updates_take_unchanged_values_from_the_version_before() {
        let t = history(Some("s1"));
        let mut p1 = at(ins(&t, "1", Value::Unchanged), Op::Update, 10);
        p1.values = Row::from_values([Value::Text("1"), Value::Unchanged].into_iter());
        let p2 = p1.clone();
        let b = batch(vec![
            at(ins(&t, "2", Value::Text("big")), Op::Insert, 5),
            at(ins(&t, "2", Value::Unchanged), Op::Update, 6),
            p1,
            at(p2, Op::Update, 11),
        ]);
        let p = plan(&b.groups[0].entries);
        let (versions, closes) = summary(&p);
        assert_eq!(
            versions[1].4, "Text(\"big\")",
            "merged with the batch's version"
        );
        assert_eq!(versions[2].4, "Unchanged", "taken from the destination");
        assert_eq!(versions[3].4, "Unchanged");
        assert!(p.fills);
        assert_eq!(
            closes,
            [
                ("2".into(), 6, false),
                ("1".into(), 10, false),
                ("1".into(), 11, false)
            ]
        );
        let mut out = Vec::new();
        version_line(&p.versions[2], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10\tf\t2000-01-01 00:00:00.000010+00\t1\t\\N\ts1\t2000-01-01 00:00:00.000011+00\tf\n"
        );
        let mut out = Vec::new();
        close_line(&p.closes[1], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1\ts1\t2000-01-01 00:00:00.000010+00\tf\n"
        );
        let mut out = Vec::new();
        version_line(&p.versions[0], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\\N\tt\t2000-01-01 00:00:00.000005+00\t2\tbig\ts1\t2000-01-01 00:00:00.000006+00\tf\n"
        );
    }

    #[test]
    fn tenants_never_share_a_loose_chain() {
        let loose = |sid: &str| {
            let mut t = (*history(Some(sid))).clone();
            t.loose_key = true;
            t.columns[0].loose = true;
            Arc::new(t)
        };
        let (a, b) = (loose("a"), loose("b"));
        // Seed 500057: sid b's DELETE of 'key1' closed sid a's version of 'KEY1'.
        let batch = batch(vec![
            at(ins(&a, "KEY1", Value::Text("x")), Op::Insert, 5),
            at(ins(&b, "key1", Value::Null), Op::Delete, 6),
            at(ins(&a, "KEY1", Value::Text("y")), Op::Update, 7),
        ]);
        let p = plan(&batch.groups[0].entries);
        let ends: Vec<Option<(i64, bool)>> = p.versions.iter().map(|v| v.end).collect();
        assert_eq!(ends, [Some((7, false)), None]);
    }

    #[test]
    fn a_partial_update_after_the_batch_closed_its_key_is_incomplete() {
        let t = history(None);
        let mut del = at(ins(&t, "1", Value::Null), Op::Delete, 5);
        del.old_key = Some(Row::from_texts(&[Some("1")]));
        del.values = Row::default();
        let mut patch = at(ins(&t, "1", Value::Unchanged), Op::Update, 6);
        patch.values = Row::from_values([Value::Text("1"), Value::Unchanged].into_iter());
        // A patch of a key whose version the batch has open is filled in memory, and
        // one of a key the batch never touched is filled from the destination.
        let b = batch(vec![
            del,
            patch.clone(),
            at(ins(&t, "2", Value::Text("x")), Op::Insert, 7),
            at(ins(&t, "2", Value::Unchanged), Op::Update, 8),
            at(ins(&t, "3", Value::Unchanged), Op::Update, 9),
        ]);
        let p = plan(&b.groups[0].entries);
        let incomplete: Vec<bool> = p.versions.iter().map(|v| v.incomplete).collect();
        assert_eq!(incomplete, [true, false, false, false]);
        assert_eq!(
            refuse_unfilled(&Stage::new(1), "10", "r('m')"),
            "SELECT r('m') FROM pg_temp.kvsz_r1 AS s WHERE s.kvsz_mask = '10' LIMIT 1"
        );
    }

    #[test]
    fn a_key_change_closes_the_old_key_and_opens_the_new() {
        let t = history(None);
        let mut mv = at(ins(&t, "2", Value::Unchanged), Op::Update, 7);
        mv.old_key = Some(Row::from_texts(&[Some("1")]));
        let b = batch(vec![mv]);
        let p = plan(&b.groups[0].entries);
        assert!(p.moved);
        let (versions, closes) = summary(&p);
        assert_eq!(versions, [("1".into(), 7, None, false, "Unchanged".into())]);
        assert_eq!(closes, [("1".into(), 7, true)]);
        assert_eq!(p.versions[0].values.at(0), Value::Text("2"));
    }

    #[test]
    fn statements() {
        let t = Arc::new(TargetTable {
            name: "h\"t".into(),
            ..(*history(Some("a"))).clone()
        });
        let st = Stage::new(1);
        assert_eq!(
            create_stage(&t, &st),
            "CREATE TEMP TABLE IF NOT EXISTS kvsz_r1 ON COMMIT DELETE ROWS AS SELECT NULL::text AS \
             kvsz_mask, NULL::boolean AS kvsz_first, t.kvsz_start AS kvsz_at, t.\"id\", t.\"v\", t.\"sid\", t.kvsz_start, t.kvsz_end, t.kvsz_deleted FROM \
             ONLY \"public\".\"h\"\"t\" AS t WITH NO DATA; CREATE TEMP TABLE IF NOT EXISTS kvsz_k1 \
             ON COMMIT DELETE ROWS AS SELECT t.\"id\", t.\"sid\", t.kvsz_start AS kvsz_at, \
             t.kvsz_deleted FROM ONLY \"public\".\"h\"\"t\" AS t WITH NO DATA"
        );
        assert_eq!(
            copy_rows_in(&t, &st),
            "COPY pg_temp.kvsz_r1 (kvsz_mask, kvsz_first, kvsz_at, \"id\", \"v\", \"sid\", \
             kvsz_end, kvsz_deleted) FROM STDIN"
        );
        assert_eq!(
            copy_keys_in(&t, &st),
            "COPY pg_temp.kvsz_k1 (\"id\", \"sid\", kvsz_at, kvsz_deleted) FROM STDIN"
        );
        assert_eq!(
            mark_rows(&t, &st),
            "UPDATE pg_temp.kvsz_r1 AS s SET kvsz_start = s.kvsz_at WHERE s.kvsz_first AND EXISTS \
             (SELECT 1 FROM \"public\".\"h\"\"t\" AS t WHERE t.\"id\" = s.\"id\" AND t.\"sid\" = \
             s.\"sid\")"
        );
        assert_eq!(
            close_reinserted(&t, &st),
            "UPDATE \"public\".\"h\"\"t\" AS t SET kvsz_end = s.kvsz_at, kvsz_deleted = false FROM \
             pg_temp.kvsz_r1 AS s WHERE s.kvsz_first AND s.kvsz_start IS NOT NULL AND t.\"id\" = \
             s.\"id\" AND t.\"sid\" = s.\"sid\" AND t.kvsz_end >= '9998-12-31 00:00:00+00' AND \
             t.kvsz_start < s.kvsz_at"
        );
        assert_eq!(
            close(&t, &st),
            "UPDATE \"public\".\"h\"\"t\" AS t SET kvsz_end = c.kvsz_at, kvsz_deleted = \
             c.kvsz_deleted FROM (SELECT DISTINCT ON (\"id\", \"sid\") \"id\", \"sid\", kvsz_at, \
             kvsz_deleted FROM pg_temp.kvsz_k1 ORDER BY \"id\", \"sid\", kvsz_at) AS c WHERE t.\"id\" = c.\"id\" AND t.\"sid\" = c.\"sid\" AND t.kvsz_end >= \
             '9998-12-31 00:00:00+00' AND t.kvsz_start < c.kvsz_at"
        );
        assert_eq!(
            insert(&t, &st),
            "INSERT INTO \"public\".\"h\"\"t\" (\"id\", \"v\", \"sid\", kvsz_start, kvsz_end, \
             kvsz_deleted) OVERRIDING SYSTEM VALUE SELECT s.\"id\", s.\"v\", s.\"sid\", \
             coalesce(s.kvsz_start, CASE WHEN s.kvsz_first THEN '1900-01-01 00:00:00+00' ELSE \
             s.kvsz_at END), s.kvsz_end, s.kvsz_deleted FROM pg_temp.kvsz_r1 AS s WHERE \
             s.kvsz_mask IS NULL"
        );
        assert_eq!(
            fill(&t, &st, true),
            "UPDATE pg_temp.kvsz_r1 AS s SET kvsz_mask = NULL, \"id\" = CASE WHEN \
             substr(s.kvsz_mask, 1, 1) = '0' THEN o.\"id\" ELSE s.\"id\" END, \"v\" = CASE WHEN \
             substr(s.kvsz_mask, 2, 1) = '0' THEN o.\"v\" ELSE s.\"v\" END FROM pg_temp.kvsz_k1 \
             AS k, \"public\".\"h\"\"t\" AS o WHERE s.kvsz_mask IS NOT NULL AND o.\"id\" = k.\"id\" \
             AND o.\"sid\" = k.\"sid\" AND o.kvsz_end >= '9998-12-31 00:00:00+00'"
        );
        let mut tr = ins(&t, "1", Value::Null);
        tr.op = Op::Truncate;
        tr.commit_time = 1;
        let b = batch(vec![tr]);
        assert_eq!(
            truncate(&b.groups[0].entries[0]),
            "UPDATE \"public\".\"h\"\"t\" AS t SET kvsz_end = '2000-01-01 00:00:00.000001+00', \
             kvsz_deleted = true WHERE t.kvsz_end >= '9998-12-31 00:00:00+00' AND t.kvsz_start < \
             '2000-01-01 00:00:00.000001+00' AND t.\"sid\" = 'a'"
        );
    }
}
