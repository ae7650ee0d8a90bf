//! Turning a source relation into its target table, and decoded tuples into Changes.
//! Pure logic: the catalog facts come in as arguments.

use std::fmt;
use std::sync::Arc;

use crate::change::{Change, Op, Position, Row, Sid, SourceId, TargetColumn, TargetTable, Value};
use crate::expr::{Cell, ExprError, Kind, Outcome, TableExprs};
use crate::mode::Mode;
use crate::pg::catalog::{Column, UniqueIndex};
use crate::pg::encoding::NotUtf8;
use crate::pg::pgoutput::{OldKind, OldTuple, RelColumn, Tuple, TupleValue};

/// Why a source relation cannot be written to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingError {
    /// A replica identity column has no counterpart on the target.
    KeyColumnMissing { column: String },
    /// The source has no replica identity, so updates and deletes cannot be applied.
    NoKey,
    /// Source and target share no column at all.
    NoSharedColumns,
    /// A tuple did not have as many columns as its relation.
    TupleShape { expected: usize, found: usize },
    /// A `set` column is not on the target.
    SetColumnMissing { column: String },
    /// A `set` expression would compute a key column (the key finds the row).
    SetKeyColumn { column: String },
    /// A history target lacks one of its version columns.
    HistoryColumnMissing { column: &'static str },
    /// History mode needs a key to find a row's versions by.
    HistoryNeedsKey,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MappingError::KeyColumnMissing { column } => write!(
                f,
                "replica identity column {column:?} does not exist on the target table"
            ),
            MappingError::NoKey => f.write_str(
                "the source table has no replica identity (primary key, REPLICA IDENTITY \
                 USING INDEX or FULL)",
            ),
            MappingError::NoSharedColumns => {
                f.write_str("source and target tables have no column name in common")
            }
            MappingError::TupleShape { expected, found } => {
                write!(f, "tuple has {found} columns, relation has {expected}")
            }
            MappingError::SetColumnMissing { column } => {
                write!(
                    f,
                    "set column {column:?} does not exist on the target table"
                )
            }
            MappingError::SetKeyColumn { column } => write!(
                f,
                "set column {column:?} is part of the replica identity, which finds the row; \
                 it cannot be computed"
            ),
            MappingError::HistoryColumnMissing { column } => write!(
                f,
                "history target has no column {column:?} (it needs kvsz_start timestamptz, \
                 kvsz_end timestamptz, kvsz_deleted boolean)"
            ),
            MappingError::HistoryNeedsKey => f.write_str(
                "type = \"history\" needs a primary key or REPLICA IDENTITY USING INDEX on the \
                 source table: versions are found by key",
            ),
        }
    }
}

/// How the columns of one source relation land in one target table.
#[derive(Debug, Clone)]
pub struct RelationMap {
    pub table: Arc<TargetTable>,
    /// For each target column of `table.columns`, its index in the source relation.
    pub source_index: Vec<usize>,
    /// Number of columns of the source relation (tuples must have that many).
    pub source_width: usize,
    /// The index in `table.columns` of each `set` column, in the map's order; their
    /// `source_index` is [`COMPUTED`].
    pub computed: Vec<usize>,
}

/// `source_index` of a column a `set` expression computes.
pub const COMPUTED: usize = usize::MAX;

/// The version columns of a history target, ours like `sid`.
pub const HISTORY_COLUMNS: [&str; 3] = ["kvsz_start", "kvsz_end", "kvsz_deleted"];

/// Builds the mapping from the source relation's columns (`is_key` = part of the
/// replica identity) and the target's columns. The shared columns keep the source's
/// order; a target `sid` column is ours and never copied from the source, and so are
/// a history target's version columns.
#[allow(clippy::too_many_arguments)]
pub fn map_relation(
    source: &[Column],
    target_schema: &str,
    target_name: &str,
    target: &[Column],
    unique_indexes: &[UniqueIndex],
    full_identity: bool,
    mode: Mode,
    set: &[&str],
    sid: &Sid,
) -> Result<RelationMap, MappingError> {
    let has_sid = target.iter().any(|c| c.name == "sid");
    if mode.versions() {
        if full_identity {
            return Err(MappingError::HistoryNeedsKey);
        }
        if let Some(column) = HISTORY_COLUMNS
            .into_iter()
            .find(|h| !target.iter().any(|c| c.name == *h))
        {
            return Err(MappingError::HistoryColumnMissing { column });
        }
    }
    let mut columns = Vec::new();
    let mut source_index = Vec::new();
    let mut key = Vec::new();
    let mut loose_key = false;
    let mut composite_key = false;
    for (i, sc) in source.iter().enumerate() {
        if (has_sid && sc.name == "sid")
            || (mode.versions() && HISTORY_COLUMNS.contains(&sc.name.as_str()))
        {
            continue;
        }
        match target.iter().find(|t| t.name == sc.name) {
            Some(tc) => {
                if sc.is_key {
                    key.push(columns.len());
                    loose_key |= !tc.text_equality;
                    composite_key |= tc.composite;
                }
                columns.push(TargetColumn {
                    name: tc.name.clone(),
                    type_name: tc.type_name.clone(),
                    loose: sc.is_key && !tc.text_equality,
                });
                source_index.push(i);
            }
            // A whole-row identity is the shared columns: the others are ignored like
            // everywhere else.
            None if sc.is_key && !full_identity => {
                return Err(MappingError::KeyColumnMissing {
                    column: sc.name.clone(),
                })
            }
            None => {}
        }
    }
    if columns.is_empty() {
        return Err(MappingError::NoSharedColumns);
    }
    if key.is_empty() {
        return Err(MappingError::NoKey);
    }
    let mut computed = Vec::with_capacity(set.len());
    for &name in set {
        let at = match columns.iter().position(|c| c.name == name) {
            Some(at) if key.contains(&at) => {
                return Err(MappingError::SetKeyColumn {
                    column: name.to_string(),
                })
            }
            Some(at) => at,
            None => {
                let tc = target.iter().find(|t| t.name == name).ok_or_else(|| {
                    MappingError::SetColumnMissing {
                        column: name.to_string(),
                    }
                })?;
                columns.push(TargetColumn {
                    name: tc.name.clone(),
                    type_name: tc.type_name.clone(),
                    loose: false,
                });
                source_index.push(COMPUTED);
                columns.len() - 1
            }
        };
        source_index[at] = COMPUTED;
        computed.push(at);
    }
    let mut key_names: Vec<&str> = key.iter().map(|&k| columns[k].name.as_str()).collect();
    if has_sid {
        key_names.push("sid");
    }
    key_names.sort_unstable();
    let is_key = |idx: &UniqueIndex| {
        idx.columns
            .iter()
            .map(String::as_str)
            .eq(key_names.iter().copied())
    };
    let arbiter = unique_indexes.iter().any(|idx| idx.arbiter && is_key(idx));
    // A unique constraint without every key column can make rows of different keys
    // conflict: a row that frees a value and one that takes it must arrive in source
    // order. One that holds the key (a history target's `(id, kvsz_start)`) cannot.
    let holds_key =
        |idx: &UniqueIndex| key_names.iter().all(|k| idx.columns.iter().any(|c| c == k));
    let serial = unique_indexes.iter().any(|idx| !holds_key(idx));
    Ok(RelationMap {
        table: Arc::new(TargetTable {
            schema: target_schema.to_string(),
            name: target_name.to_string(),
            columns,
            key,
            sid: has_sid.then(|| sid.clone()),
            arbiter,
            serial,
            full_identity,
            mode,
            loose_key,
            composite_key,
        }),
        source_index,
        source_width: source.len(),
        computed,
    })
}

impl RelationMap {
    fn check(&self, t: &Tuple) -> Result<(), MappingError> {
        if t.0.len() != self.source_width {
            return Err(MappingError::TupleShape {
                expected: self.source_width,
                found: t.0.len(),
            });
        }
        Ok(())
    }

    /// The target's columns of a decoded tuple, in one buffer. The tuple's own strings
    /// are freed here, in the thread that allocated them (cheap), not in a writer.
    fn row(&self, t: &Tuple) -> Row {
        self.pick(t, self.source_index.iter().copied())
    }

    fn key_of(&self, t: &Tuple) -> Row {
        self.pick(t, self.table.key.iter().map(|&k| self.source_index[k]))
    }

    /// The values of tuple columns `columns`, in that order, as a row.
    fn pick(&self, t: &Tuple, columns: impl Iterator<Item = usize> + Clone) -> Row {
        // Values that are not text as sent get an owned text: binary ones (we never ask
        // for them; if some came anyway, hex is bytea's text form) and bytes that are not
        // UTF-8, whose row is then rejected (see [`RelationMap::undecodable`]) and shown
        // with U+FFFD in their place.
        let owned =
            t.0.iter()
                .any(|v| matches!(v, TupleValue::Binary(_) | TupleValue::NotUtf8(_)));
        let texts: Vec<Option<String>> = if !owned {
            Vec::new()
        } else {
            t.0.iter()
                .map(|v| match v {
                    TupleValue::Binary(b) => {
                        Some(b.iter().fold(String::from("\\x"), |mut s, byte| {
                            s.push_str(&format!("{byte:02x}"));
                            s
                        }))
                    }
                    TupleValue::NotUtf8(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                })
                .collect()
        };
        Row::from_values(columns.map(|i| {
            // A computed column (COMPUTED) has no source value: filled in by
            // [`RelationMap::with_computed`].
            match t.0.get(i) {
                None | Some(TupleValue::Null) => Value::Null,
                Some(TupleValue::Unchanged) => Value::Unchanged,
                Some(TupleValue::Text(s)) => Value::Text(s),
                Some(TupleValue::Binary(_) | TupleValue::NotUtf8(_)) => texts
                    .get(i)
                    .and_then(|h| h.as_deref())
                    .map_or(Value::Null, Value::Text),
            }
        }))
    }

    /// The first value among the target's columns of `tuples` whose bytes are not
    /// UTF-8: the change cannot be written and is a rejected row. (A column the target
    /// does not take may hold any bytes.)
    pub fn undecodable(&self, tuples: &[Option<&Tuple>]) -> Option<NotUtf8> {
        tuples.iter().flatten().find_map(|t| {
            self.source_index
                .iter()
                .enumerate()
                .find_map(|(n, &i)| match t.0.get(i) {
                    Some(TupleValue::NotUtf8(b)) => {
                        let column = self.table.columns.get(n).map_or("?", |c| c.name.as_str());
                        NotUtf8::check(column, b)
                    }
                    _ => None,
                })
        })
    }

    /// `row` with the `set` columns' values (in [`RelationMap::computed`] order).
    pub fn with_computed(&self, row: &Row, values: &[Option<String>]) -> Row {
        Row::from_values((0..row.len()).map(|i| {
            match self.computed.iter().position(|&c| c == i) {
                Some(n) => values
                    .get(n)
                    .and_then(|v| v.as_deref())
                    .map_or(Value::Null, Value::Text),
                None => row.at(i),
            }
        }))
    }

    fn change(&self, source: SourceId, op: Op, pos: Position, commit_time: i64) -> Change {
        Change {
            source,
            table: self.table.clone(),
            op,
            values: Row::default(),
            old_key: None,
            pos,
            commit_time,
        }
    }

    pub fn insert(
        &self,
        source: SourceId,
        new: Tuple,
        pos: Position,
        commit_time: i64,
    ) -> Result<Change, MappingError> {
        self.check(&new)?;
        let mut c = self.change(source, Op::Insert, pos, commit_time);
        c.values = self.row(&new);
        Ok(c)
    }

    /// An UPDATE. When it moves the row to a new key and carries the whole row, it
    /// becomes a DELETE of the old key and an INSERT of the new row: two independent keys,
    /// each routed to its own writer, so per-key order holds on both (a target whose keys
    /// the text cannot tell apart has one writer for all its keys). Otherwise it stays
    /// one move, applied alone.
    pub fn update(
        &self,
        source: SourceId,
        old: Option<OldTuple>,
        new: Tuple,
        pos: Position,
        commit_time: i64,
    ) -> Result<(Change, Option<Change>), MappingError> {
        self.check(&new)?;
        let new = complete_from_old(new, old.as_ref());
        let values = self.row(&new);
        let old_key = match old {
            Some(o) => {
                self.check(&o.tuple)?;
                let k = self.key_of(&o.tuple);
                let same = self
                    .table
                    .key
                    .iter()
                    .enumerate()
                    .all(|(n, &i)| values.at(i) == k.at(n));
                // A whole-row identity with computed columns: the row's key may stay
                // while a column the target lacks, and so a computed value, changed.
                // Only replacing that copy of the row (delete one, insert the new)
                // carries it.
                let recomputed = self.table.full_identity && !self.computed.is_empty();
                (!same || recomputed).then_some(k)
            }
            None => None,
        };
        // A history target whose keys the text cannot tell apart keeps a key change
        // whole: its two halves may be one row ('Abc' → 'abc' in citext), whose version
        // must be closed and reopened at one stamp, in one batch.
        let whole_move = self.table.loose_key && self.table.versions();
        let split = !values.has_unchanged() && !whole_move;
        match old_key {
            Some(k) if split => {
                let mut del = self.change(source, Op::Delete, pos, commit_time);
                del.old_key = Some(k);
                let mut ins = self.change(source, Op::Insert, pos, commit_time);
                ins.values = values;
                Ok((del, Some(ins)))
            }
            old_key => {
                let mut c = self.change(source, Op::Update, pos, commit_time);
                c.values = values;
                c.old_key = old_key;
                Ok((c, None))
            }
        }
    }

    pub fn delete(
        &self,
        source: SourceId,
        old: OldTuple,
        pos: Position,
        commit_time: i64,
    ) -> Result<Change, MappingError> {
        self.check(&old.tuple)?;
        let mut c = self.change(source, Op::Delete, pos, commit_time);
        c.old_key = Some(self.key_of(&old.tuple));
        Ok(c)
    }

    pub fn truncate(&self, source: SourceId, pos: Position, commit_time: i64) -> Change {
        self.change(source, Op::Truncate, pos, commit_time)
    }
}

/// `new` with the values it left unsent (unchanged TOAST) taken from the whole old row
/// when the source sent one (REPLICA IDENTITY FULL, whose old row the server detoasts):
/// the change then carries a whole row, like any other.
fn complete_from_old<'a>(mut new: Tuple<'a>, old: Option<&OldTuple<'a>>) -> Tuple<'a> {
    let Some(old) = old.filter(|o| o.kind == OldKind::Full) else {
        return new;
    };
    for (v, o) in new.0.iter_mut().zip(&old.tuple.0) {
        if *v == TupleValue::Unchanged && *o != TupleValue::Unchanged {
            *v = o.clone();
        }
    }
    new
}

/// A map entry's expressions bound to one source relation's columns.
#[derive(Debug)]
pub struct RowExprs {
    pub exprs: Arc<TableExprs>,
    /// (name, index in the tuple, kind) of each column the expressions read.
    columns: Vec<(String, usize, Kind)>,
}

impl RowExprs {
    pub fn new(exprs: Arc<TableExprs>, relation: &[RelColumn]) -> RowExprs {
        let columns = exprs
            .variables()
            .iter()
            .filter_map(|v| {
                relation
                    .iter()
                    .position(|c| &c.name == v)
                    .map(|i| (v.clone(), i, Kind::from_oid(relation[i].type_oid)))
            })
            .collect();
        RowExprs { exprs, columns }
    }

    /// Evaluates over a new tuple; a value the source did not send (unchanged TOAST) is
    /// taken from the old tuple when there is one (REPLICA IDENTITY FULL).
    pub fn eval<'a>(&self, new: &Tuple<'a>, old: Option<&Tuple<'a>>) -> Result<Outcome, ExprError> {
        fn cell<'a>(v: Option<&TupleValue<'a>>, kind: Kind) -> Option<Cell<'a>> {
            match v {
                Some(TupleValue::Null) => Some(Cell::Null),
                Some(&TupleValue::Text(s)) => Some(Cell::Text(kind, s)),
                _ => None,
            }
        }
        self.exprs.eval(|name| {
            let &(_, i, kind) = self.columns.iter().find(|(n, _, _)| n == name)?;
            Some(
                cell(new.0.get(i), kind)
                    .or_else(|| cell(old.and_then(|o| o.0.get(i)), kind))
                    .unwrap_or(Cell::Missing),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, key: bool) -> Column {
        Column {
            name: name.into(),
            type_name: "text".into(),
            is_key: key,
            text_equality: true,
            composite: false,
            toastable: false,
        }
    }

    fn t<'a>(vals: &[Option<&'a str>]) -> Tuple<'a> {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    Some(s) => TupleValue::Text(s),
                    None => TupleValue::Null,
                })
                .collect(),
        )
    }

    #[test]
    fn shared_columns_in_source_order_and_sid() {
        let src = [
            col("id", true),
            col("extra", false),
            col("name", false),
            col("sid", false),
        ];
        let dst = [
            col("name", false),
            col("id", true),
            col("sid", false),
            col("added", false),
        ];
        let m = map_relation(
            &src,
            "public",
            "t",
            &dst,
            &[UniqueIndex::on(&["sid", "id"])],
            false,
            Mode::Clone,
            &[],
            &Sid::new("s1"),
        )
        .unwrap();
        let names: Vec<&str> = m.table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "name"]);
        assert_eq!(m.source_index, [0, 2]);
        assert_eq!(m.table.key, [0]);
        assert_eq!(m.table.sid, Some(Sid::new("s1")));
        assert!(m.table.arbiter, "unique (sid, id) is the key");
        assert!(!m.table.serial, "no constraint beyond the key");
        let c = m
            .insert(
                3,
                t(&[Some("1"), Some("x"), Some("n"), Some("zz")]),
                Position::default(),
                0,
            )
            .unwrap();
        assert_eq!(c.values, Row::from_texts(&[Some("1"), Some("n")]));
        assert_eq!(c.source, 3);
    }

    #[test]
    fn key_missing_on_target_is_an_error() {
        let src = [col("id", true), col("v", false)];
        let dst = [col("v", false)];
        assert_eq!(
            map_relation(
                &src,
                "s",
                "t",
                &dst,
                &[],
                false,
                Mode::Clone,
                &[],
                &Sid::new("a")
            )
            .unwrap_err(),
            MappingError::KeyColumnMissing {
                column: "id".into()
            }
        );
        let nokey = [col("id", false), col("v", false)];
        assert_eq!(
            map_relation(
                &nokey,
                "s",
                "t",
                &src,
                &[],
                false,
                Mode::Clone,
                &[],
                &Sid::new("a")
            )
            .unwrap_err(),
            MappingError::NoKey
        );
    }

    /// `(id key, v)` onto itself, with a unique index on `v` only (no arbiter).
    fn id_v_map(src: &[Column]) -> RelationMap {
        map_relation(
            src,
            "s",
            "t",
            src,
            &[UniqueIndex::on(&["v"])],
            false,
            Mode::Clone,
            &[],
            &Sid::new("a"),
        )
        .unwrap()
    }

    #[test]
    fn a_binary_value_becomes_hex_text() {
        let src = [col("id", true), col("v", false)];
        let m = id_v_map(&src);
        let new = Tuple(vec![
            TupleValue::Text("1"),
            TupleValue::Binary(&[0xde, 0xad]),
        ]);
        let c = m.insert(0, new, Position::default(), 0).unwrap();
        assert_eq!(c.values, Row::from_texts(&[Some("1"), Some("\\xdead")]));
    }

    #[test]
    fn key_change_splits_into_delete_and_insert() {
        let src = [col("id", true), col("v", false)];
        let m = id_v_map(&src);
        assert!(
            !m.table.arbiter,
            "a unique index on another column is no arbiter"
        );
        assert!(m.table.serial, "rows of different keys can conflict on v");
        let old = OldTuple {
            kind: OldKind::Key,
            tuple: t(&[Some("1"), None]),
        };
        let out = m
            .update(
                0,
                Some(old),
                t(&[Some("2"), Some("v")]),
                Position::default(),
                0,
            )
            .unwrap();
        let (del, ins) = out;
        let ins = ins.expect("an insert of the new key");
        assert_eq!(del.op, Op::Delete);
        assert_eq!(del.old_key, Some(Row::from_texts(&[Some("1")])));
        assert_eq!(ins.op, Op::Insert);
        assert_eq!(ins.values, Row::from_texts(&[Some("2"), Some("v")]));
        // Same key in the old tuple (REPLICA IDENTITY FULL sends it always): plain update.
        let same = OldTuple {
            kind: OldKind::Full,
            tuple: t(&[Some("2"), Some("old")]),
        };
        let out = m
            .update(
                0,
                Some(same),
                t(&[Some("2"), Some("v")]),
                Position::default(),
                0,
            )
            .unwrap();
        assert!(out.1.is_none());
        assert_eq!(out.0.op, Op::Update);
        assert_eq!(out.0.old_key, None);
    }

    #[test]
    fn a_whole_old_row_completes_the_unsent_values() {
        let src = [col("id", true), col("v", false), col("big", false)];
        let m = id_v_map(&src);
        let old = OldTuple {
            kind: OldKind::Full,
            tuple: t(&[Some("1"), Some("a"), Some("toasted")]),
        };
        let mut new = t(&[Some("1"), Some("b"), None]);
        new.0[2] = TupleValue::Unchanged;
        let (c, second) = m
            .update(0, Some(old), new.clone(), Position::default(), 0)
            .unwrap();
        assert!(second.is_none());
        assert_eq!(c.op, Op::Update);
        assert_eq!(
            c.values,
            Row::from_texts(&[Some("1"), Some("b"), Some("toasted")]),
            "a whole row: no move in place, no barrier"
        );
        // A key-only old row has nothing to give.
        let old = OldTuple {
            kind: OldKind::Key,
            tuple: t(&[Some("1"), None, None]),
        };
        let (c, _) = m.update(0, Some(old), new, Position::default(), 0).unwrap();
        assert!(c.values.has_unchanged());
    }

    #[test]
    fn wrong_tuple_width_is_an_error() {
        let src = [col("id", true), col("v", false)];
        let m = id_v_map(&src);
        assert!(m
            .insert(0, t(&[Some("1")]), Position::default(), 0)
            .is_err());
    }
}
