//! SQL for applying runs of changes set-based. Pure string building, unit-tested.
//!
//! A run is a list of changes of one target, one kind and one column shape with no key
//! twice, so that one statement can apply all of them and their order does not matter.
//! Literals carry their text form; the first VALUES row casts each one to the target
//! column's type and PostgreSQL resolves the remaining rows to the same types.

use crate::change::{Change, TargetTable, Value};
use crate::pg::quote::{push_copy_field, push_ident, push_literal, qualified};

/// Appends a `VALUES (..), (..)` list: for each row, the values of `cols`.
fn push_values<'a>(
    out: &mut String,
    table: &TargetTable,
    cols: &[usize],
    rows: impl Iterator<Item = Vec<Value<'a>>>,
) {
    out.push_str("VALUES ");
    for (r, row) in rows.enumerate() {
        if r > 0 {
            out.push(',');
        }
        out.push('(');
        for (i, (v, &col)) in row.iter().zip(cols).enumerate() {
            if i > 0 {
                out.push(',');
            }
            match *v {
                Value::Text(s) => push_literal(out, s),
                // Unchanged never reaches a column list: runs only hold present columns.
                Value::Null | Value::Unchanged => out.push_str("NULL"),
            }
            if r == 0 {
                out.push_str("::");
                out.push_str(&table.columns[col].type_name);
            }
        }
        out.push(')');
    }
}

/// `d(c0,c1,…)` column alias list for `n` columns.
fn push_alias(out: &mut String, n: usize) {
    out.push_str("d(");
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("c{i}"));
    }
    out.push(')');
}

/// ` AND t."sid" = 'x'` when the target is confined to a sid.
fn push_sid_filter(out: &mut String, table: &TargetTable) {
    if let Some(sid) = &table.sid {
        out.push_str(" AND t.");
        push_ident(out, "sid");
        out.push_str(" = ");
        push_literal(out, sid.as_str());
    }
}

/// The comparison that finds a row by its key: `=` for real keys (indexable), NULL-safe
/// for a whole-row identity, whose columns may be NULL.
fn key_eq(table: &TargetTable) -> &'static str {
    if table.full_identity {
        " IS NOT DISTINCT FROM "
    } else {
        " = "
    }
}

/// `t."k1" = d.c3 AND …` matching the key columns (positions in `cols`).
fn push_key_match(out: &mut String, table: &TargetTable, cols: &[usize], left: &str) {
    for (n, k) in table.key.iter().enumerate() {
        if n > 0 {
            out.push_str(" AND ");
        }
        let pos = cols.iter().position(|c| c == k).unwrap_or(0);
        out.push_str(left);
        out.push('.');
        push_ident(out, &table.columns[*k].name);
        out.push_str(key_eq(table));
        out.push_str(&format!("d.c{pos}"));
    }
}

/// Insert-or-update of rows that carry the columns `cols` (which include the key).
///
/// Returns one row with one column: how many rows were inserted (the others found their
/// key and were updated), so the writer can count anomalies — an INSERT that found its
/// key, an UPDATE that did not.
pub fn upsert(table: &TargetTable, cols: &[usize], rows: &[&Change]) -> String {
    if table.arbiter {
        upsert_on_conflict(table, cols, rows)
    } else {
        upsert_without_index(table, cols, rows)
    }
}

/// `(c1, c2[, sid])` insert column list.
fn push_insert_columns(s: &mut String, table: &TargetTable, cols: &[usize]) {
    s.push('(');
    for (n, &c) in cols.iter().enumerate() {
        if n > 0 {
            s.push(',');
        }
        push_ident(s, &table.columns[c].name);
    }
    if table.sid.is_some() {
        s.push(',');
        push_ident(s, "sid");
    }
    s.push(')');
}

/// ` SELECT d.*[, 'sid'] FROM (VALUES …) AS d(c0,…)`.
fn push_select_values(s: &mut String, table: &TargetTable, cols: &[usize], rows: &[&Change]) {
    s.push_str(" SELECT d.*");
    if let Some(sid) = &table.sid {
        s.push_str(", ");
        push_literal(s, sid.as_str());
    }
    s.push_str(" FROM (");
    push_values(
        s,
        table,
        cols,
        rows.iter()
            .map(|c| cols.iter().map(|&i| c.values.at(i)).collect()),
    );
    s.push_str(") AS ");
    push_alias(s, cols.len());
}

/// With a unique index on the key: one `INSERT … ON CONFLICT`, one index probe a row.
fn upsert_on_conflict(table: &TargetTable, cols: &[usize], rows: &[&Change]) -> String {
    let mut s = String::with_capacity(256 + rows.len() * 16 * cols.len());
    s.push_str("WITH i AS (INSERT INTO ");
    s.push_str(&qualified(&table.schema, &table.name));
    s.push_str(" AS t ");
    push_insert_columns(&mut s, table, cols);
    push_select_values(&mut s, table, cols, rows);
    s.push_str(" ON CONFLICT (");
    for (n, &k) in table.key.iter().enumerate() {
        if n > 0 {
            s.push(',');
        }
        push_ident(&mut s, &table.columns[k].name);
    }
    if table.sid.is_some() {
        s.push(',');
        push_ident(&mut s, "sid");
    }
    s.push(')');
    let non_key: Vec<usize> = cols
        .iter()
        .copied()
        .filter(|c| !table.key.contains(c))
        .collect();
    if non_key.is_empty() {
        s.push_str(" DO NOTHING");
    } else {
        s.push_str(" DO UPDATE SET ");
        for (n, &c) in non_key.iter().enumerate() {
            if n > 0 {
                s.push_str(", ");
            }
            push_ident(&mut s, &table.columns[c].name);
            s.push_str(" = EXCLUDED.");
            push_ident(&mut s, &table.columns[c].name);
        }
    }
    // xmax is 0 on a freshly inserted row version, set on one that conflicted.
    s.push_str(" RETURNING t.xmax = 0 AS ins) SELECT count(*) FILTER (WHERE ins) FROM i");
    s
}

/// Without such an index: update the rows whose key exists, insert the others, in one
/// statement. Works on any target, at the price of two probes a row.
fn upsert_without_index(table: &TargetTable, cols: &[usize], rows: &[&Change]) -> String {
    let target = qualified(&table.schema, &table.name);
    let mut s = String::with_capacity(256 + rows.len() * 16 * cols.len());
    s.push_str("WITH ");
    push_alias(&mut s, cols.len());
    s.push_str(" AS (");
    push_values(
        &mut s,
        table,
        cols,
        rows.iter()
            .map(|c| cols.iter().map(|&i| c.values.at(i)).collect()),
    );
    s.push_str("), u AS (UPDATE ");
    s.push_str(&target);
    s.push_str(" AS t SET ");
    let non_key: Vec<(usize, usize)> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| !table.key.contains(c))
        .map(|(p, &c)| (p, c))
        .collect();
    // A table made only of key columns still needs a SET list: set the key to itself.
    let set_cols: Vec<(usize, usize)> = if non_key.is_empty() {
        cols.iter().enumerate().map(|(p, &c)| (p, c)).collect()
    } else {
        non_key
    };
    for (n, (p, c)) in set_cols.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        push_ident(&mut s, &table.columns[*c].name);
        s.push_str(&format!(" = d.c{p}"));
    }
    s.push_str(" FROM d WHERE ");
    push_key_match(&mut s, table, cols, "t");
    push_sid_filter(&mut s, table);
    s.push_str(" RETURNING d.*), i AS (INSERT INTO ");
    s.push_str(&target);
    s.push(' ');
    push_insert_columns(&mut s, table, cols);
    s.push_str(" SELECT d.*");
    if let Some(sid) = &table.sid {
        s.push_str(", ");
        push_literal(&mut s, sid.as_str());
    }
    s.push_str(" FROM d WHERE NOT EXISTS (SELECT 1 FROM u WHERE ");
    // Match inserted rows against updated ones on the key, through the `u` columns.
    for (n, k) in table.key.iter().enumerate() {
        if n > 0 {
            s.push_str(" AND ");
        }
        let pos = cols.iter().position(|c| c == k).unwrap_or(0);
        s.push_str(&format!("u.c{pos}{}d.c{pos}", key_eq(table)));
    }
    s.push_str(") RETURNING 1) SELECT count(*) FROM i");
    s
}

/// `COPY target (cols[, sid]) FROM STDIN`: the fast path for a run of INSERTs into a
/// target whose unique key index would refuse a row that already exists.
pub fn copy_in(table: &TargetTable, cols: &[usize]) -> String {
    let mut s = String::from("COPY ");
    s.push_str(&qualified(&table.schema, &table.name));
    s.push(' ');
    push_insert_columns(&mut s, table, cols);
    s.push_str(" FROM STDIN");
    s
}

/// The rows of a run in COPY text format, the sid appended when the target has one.
pub fn copy_rows(table: &TargetTable, cols: &[usize], rows: &[&Change], out: &mut Vec<u8>) {
    for c in rows {
        for (n, &i) in cols.iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            match c.values.text_bytes(i) {
                Some(v) => push_copy_field(out, v),
                None => out.extend_from_slice(b"\\N"),
            }
        }
        if let Some(sid) = &table.sid {
            out.push(b'\t');
            push_copy_field(out, sid.as_str().as_bytes());
        }
        out.push(b'\n');
    }
}

/// Delete rows by key; the command tag's row count tells how many existed.
pub fn delete(table: &TargetTable, rows: &[&Change]) -> String {
    let key_cols: Vec<usize> = table.key.clone();
    let mut s = String::with_capacity(128 + rows.len() * 16 * key_cols.len());
    s.push_str("WITH ");
    push_alias(&mut s, key_cols.len());
    s.push_str(" AS (");
    push_values(
        &mut s,
        table,
        &key_cols,
        rows.iter().map(|c| c.lookup_key()),
    );
    s.push_str(") DELETE FROM ");
    s.push_str(&qualified(&table.schema, &table.name));
    s.push_str(" AS t USING d WHERE ");
    push_key_match(&mut s, table, &key_cols, "t");
    push_sid_filter(&mut s, table);
    s
}

/// An update that moves a row to a new key while some values stayed unchanged in TOAST
/// (so the row cannot be rebuilt from the change alone): one row, in place.
pub fn update_in_place(table: &TargetTable, cols: &[usize], change: &Change) -> String {
    let mut s = String::from("UPDATE ");
    s.push_str(&qualified(&table.schema, &table.name));
    s.push_str(" AS t SET ");
    for (n, &c) in cols.iter().enumerate() {
        if n > 0 {
            s.push_str(", ");
        }
        push_ident(&mut s, &table.columns[c].name);
        s.push_str(" = ");
        match change.values.at(c) {
            Value::Text(v) => push_literal(&mut s, v),
            Value::Null | Value::Unchanged => s.push_str("NULL"),
        }
        s.push_str("::");
        s.push_str(&table.columns[c].type_name);
    }
    s.push_str(" WHERE ");
    for (n, (k, v)) in table.key.iter().zip(change.lookup_key()).enumerate() {
        if n > 0 {
            s.push_str(" AND ");
        }
        s.push_str("t.");
        push_ident(&mut s, &table.columns[*k].name);
        s.push_str(key_eq(table));
        match v {
            Value::Text(v) => push_literal(&mut s, v),
            Value::Null | Value::Unchanged => s.push_str("NULL"),
        }
        s.push_str("::");
        s.push_str(&table.columns[*k].type_name);
    }
    push_sid_filter(&mut s, table);
    s
}

/// Remove every row of this target that belongs to the source (its sid, or all rows when
/// the target has no sid column).
pub fn truncate(table: &TargetTable) -> String {
    let mut s = String::from("DELETE FROM ");
    s.push_str(&qualified(&table.schema, &table.name));
    s.push_str(" AS t");
    if table.sid.is_some() {
        s.push_str(" WHERE true");
        push_sid_filter(&mut s, table);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
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
                },
                TargetColumn {
                    name: "na\"me".into(),
                    type_name: "text".into(),
                },
            ],
            key: vec![0],
            sid: sid.map(Sid::new),
            arbiter: false,
            serial: false,
            full_identity: false,
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

    #[test]
    fn upsert_without_sid() {
        let t = table(None);
        let a = change(&t, Op::Insert, &[Some("1"), Some("it's")]);
        let b = change(&t, Op::Insert, &[Some("2"), None]);
        assert_eq!(
            upsert(&t, &[0, 1], &[&a, &b]),
            "WITH d(c0,c1) AS (VALUES ('1'::integer,'it''s'::text),('2',NULL)), \
             u AS (UPDATE \"public\".\"T x\" AS t SET \"na\"\"me\" = d.c1 FROM d WHERE t.\"id\" = d.c0 RETURNING d.*), \
             i AS (INSERT INTO \"public\".\"T x\" (\"id\",\"na\"\"me\") SELECT d.* FROM d \
             WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.c0 = d.c0) RETURNING 1) \
             SELECT count(*) FROM i"
        );
    }

    #[test]
    fn upsert_with_sid_confines_and_tags() {
        let t = table(Some("ten'ant"));
        let a = change(&t, Op::Update, &[Some("1"), Some("x")]);
        let sql = upsert(&t, &[0, 1], &[&a]);
        assert!(sql.contains("WHERE t.\"id\" = d.c0 AND t.\"sid\" = 'ten''ant' RETURNING"));
        assert!(sql.contains("(\"id\",\"na\"\"me\",\"sid\") SELECT d.*, 'ten''ant' FROM d"));
    }

    #[test]
    fn upsert_with_unique_key_index_uses_on_conflict() {
        let t = Arc::new(TargetTable {
            arbiter: true,
            serial: false,
            ..(*table(Some("s1"))).clone()
        });
        let a = change(&t, Op::Insert, &[Some("1"), Some("x")]);
        let b = change(&t, Op::Insert, &[Some("2"), None]);
        assert_eq!(
            upsert(&t, &[0, 1], &[&a, &b]),
            "WITH i AS (INSERT INTO \"public\".\"T x\" AS t (\"id\",\"na\"\"me\",\"sid\") \
             SELECT d.*, 's1' FROM (VALUES ('1'::integer,'x'::text),('2',NULL)) AS d(c0,c1) \
             ON CONFLICT (\"id\",\"sid\") DO UPDATE SET \"na\"\"me\" = EXCLUDED.\"na\"\"me\" \
             RETURNING t.xmax = 0 AS ins) SELECT count(*) FILTER (WHERE ins) FROM i"
        );
        let key_only = Arc::new(TargetTable {
            columns: vec![t.columns[0].clone()],
            ..(*t).clone()
        });
        let c = change(&key_only, Op::Insert, &[Some("3")]);
        assert!(upsert(&key_only, &[0], &[&c])
            .contains("ON CONFLICT (\"id\",\"sid\") DO NOTHING RETURNING"));
    }

    #[test]
    fn key_only_table_sets_key_to_itself() {
        let t = Arc::new(TargetTable {
            columns: vec![TargetColumn {
                name: "id".into(),
                type_name: "bigint".into(),
            }],
            ..(*table(None)).clone()
        });
        let a = change(&t, Op::Insert, &[Some("7")]);
        assert!(upsert(&t, &[0], &[&a]).contains("SET \"id\" = d.c0 FROM d"));
    }

    #[test]
    fn copy_of_an_insert_run() {
        let t = table(Some("s\t1"));
        let a = change(&t, Op::Insert, &[Some("1"), Some("a\\b")]);
        let b = change(&t, Op::Insert, &[Some("2"), None]);
        assert_eq!(
            copy_in(&t, &[0, 1]),
            "COPY \"public\".\"T x\" (\"id\",\"na\"\"me\",\"sid\") FROM STDIN"
        );
        let mut out = Vec::new();
        copy_rows(&t, &[0, 1], &[&a, &b], &mut out);
        assert_eq!(out, b"1\ta\\\\b\ts\\t1\n2\t\\N\ts\\t1\n");
    }

    #[test]
    fn delete_by_key() {
        let t = table(Some("s1"));
        let a = change(&t, Op::Delete, &[Some("1")]);
        let b = change(&t, Op::Delete, &[Some("2")]);
        assert_eq!(
            delete(&t, &[&a, &b]),
            "WITH d(c0) AS (VALUES ('1'::integer),('2')) DELETE FROM \"public\".\"T x\" AS t \
             USING d WHERE t.\"id\" = d.c0 AND t.\"sid\" = 's1'"
        );
    }

    #[test]
    fn whole_row_identity_matches_nulls() {
        let t = Arc::new(TargetTable {
            full_identity: true,
            key: vec![0, 1],
            ..(*table(None)).clone()
        });
        let d = change(&t, Op::Delete, &[Some("1"), None]);
        assert!(delete(&t, &[&d]).contains(
            "WHERE t.\"id\" IS NOT DISTINCT FROM d.c0 AND t.\"na\"\"me\" IS NOT DISTINCT FROM d.c1"
        ));
    }

    #[test]
    fn truncate_by_sid() {
        assert_eq!(
            truncate(&table(Some("a"))),
            "DELETE FROM \"public\".\"T x\" AS t WHERE true AND t.\"sid\" = 'a'"
        );
        assert_eq!(
            truncate(&table(None)),
            "DELETE FROM \"public\".\"T x\" AS t"
        );
    }

    #[test]
    fn in_place_update_uses_old_key() {
        let t = table(None);
        let mut c = change(&t, Op::Update, &[Some("2"), Some("n")]);
        c.old_key = Some(Row::from_texts(&[Some("1")]));
        assert_eq!(
            update_in_place(&t, &[0, 1], &c),
            "UPDATE \"public\".\"T x\" AS t SET \"id\" = '2'::integer, \"na\"\"me\" = 'n'::text \
             WHERE t.\"id\" = '1'::integer"
        );
    }
}
