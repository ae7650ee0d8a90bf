//! The unit of work that flows from a source thread to the writers, and the description
//! of the table it lands in. Everything here is plain data: no I/O.

use std::fmt;
use std::sync::Arc;

use crate::pg::Lsn;

/// Index of a source URL among all URLs of the running map. Cheap to copy into every
/// change; the supervisor keeps the table from index to name.
pub type SourceId = usize;

/// The tenant id a URL's rows are tagged with in a target `sid` column.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sid(pub Arc<str>);

impl Sid {
    pub fn new(s: &str) -> Sid {
        Sid(Arc::from(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One replicated column of a target: shared by source and target by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// The destination column's type as `format_type` prints it; literals are cast to it
    /// so that set-based statements resolve to the target's own types.
    pub type_name: String,
}

/// A destination table as one source relation writes into it. Shared by `Arc` between
/// all changes of that relation so the writers can batch by pointer identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetTable {
    pub schema: String,
    pub name: String,
    /// The shared columns, in the order `Change::values` carries them.
    pub columns: Vec<TargetColumn>,
    /// Indexes into `columns` of the replica identity (empty: whole row identity).
    pub key: Vec<usize>,
    /// Set when the target has a `sid` column: written on insert, and every update and
    /// delete is confined to it.
    pub sid: Option<Sid>,
    /// The target has a unique index on exactly the key columns (and `sid`): upserts
    /// then use `INSERT … ON CONFLICT`, one index probe per row.
    pub arbiter: bool,
    /// The target has unique or exclusion constraints beyond its key, so rows of
    /// different keys can conflict (a value one row frees and another takes): all its
    /// changes go to one writer, in source order.
    pub serial: bool,
    /// The source has REPLICA IDENTITY FULL: the "key" is the whole old row, whose values
    /// may be NULL, so rows are matched with IS NOT DISTINCT FROM.
    pub full_identity: bool,
}

impl TargetTable {
    /// `schema.table` for messages (not quoted; not for SQL).
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A column value as the source sent it, in PostgreSQL text format (borrowed from its
/// [`Row`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Value<'a> {
    Null,
    Text(&'a str),
    /// An unchanged TOASTed value the source did not send: the target keeps its own.
    Unchanged,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Null,
    Unchanged,
    Text { start: u32, end: u32 },
}

/// The values of a row in one text buffer. Rows are built by a source thread and freed
/// by a writer thread by the hundred thousand a second: two allocations a row instead of
/// one per column keeps the allocator off the profile.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Row {
    text: String,
    cells: Vec<Cell>,
}

impl Row {
    pub fn with_capacity(columns: usize, bytes: usize) -> Row {
        Row {
            text: String::with_capacity(bytes),
            cells: Vec::with_capacity(columns),
        }
    }

    /// The `i`-th value's bytes when it is a text (no UTF-8 boundary checks: the COPY
    /// writer's hot path).
    pub fn text_bytes(&self, i: usize) -> Option<&[u8]> {
        match self.cells.get(i) {
            Some(&Cell::Text { start, end }) => {
                self.text.as_bytes().get(start as usize..end as usize)
            }
            _ => None,
        }
    }

    /// Whether the row carries a value (not Unchanged) for exactly the first `n` columns.
    pub fn is_complete(&self, n: usize) -> bool {
        self.cells.len() == n && !self.has_unchanged()
    }

    /// A row from optional texts (None is NULL), for tests and small callers.
    pub fn from_texts(values: &[Option<&str>]) -> Row {
        let mut r = Row::default();
        for v in values {
            r.push(match v {
                Some(s) => Value::Text(s),
                None => Value::Null,
            });
        }
        r
    }

    pub fn push(&mut self, v: Value<'_>) {
        self.cells.push(match v {
            Value::Null => Cell::Null,
            Value::Unchanged => Cell::Unchanged,
            Value::Text(s) => {
                let start = self.text.len() as u32;
                self.text.push_str(s);
                Cell::Text {
                    start,
                    end: self.text.len() as u32,
                }
            }
        });
    }

    /// The `i`-th value; None past the end.
    pub fn get(&self, i: usize) -> Option<Value<'_>> {
        self.cells.get(i).map(|c| match *c {
            Cell::Null => Value::Null,
            Cell::Unchanged => Value::Unchanged,
            Cell::Text { start, end } => {
                Value::Text(self.text.get(start as usize..end as usize).unwrap_or(""))
            }
        })
    }

    /// The `i`-th value, NULL past the end.
    pub fn at(&self, i: usize) -> Value<'_> {
        self.get(i).unwrap_or(Value::Null)
    }

    pub fn iter(&self) -> impl Iterator<Item = Value<'_>> + '_ {
        (0..self.cells.len()).map(move |i| self.at(i))
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    pub fn has_unchanged(&self) -> bool {
        self.cells.iter().any(|c| matches!(c, Cell::Unchanged))
    }
}

/// What a change does to its key on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Insert the row, or update it when the key exists (at-least-once replay, anomalies).
    Insert,
    /// Update the row found by `old_key` (or by its own key), inserting it when missing.
    Update,
    /// Delete the row with `old_key`.
    Delete,
    /// Delete every row of this target (of this sid, when the target has one).
    Truncate,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        })
    }
}

/// Where a change stands in the source's history: commit LSN of its transaction and its
/// index inside it. Unique per source, so a writer can later record what it applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

/// FNV-1a offset basis: the seed of [`Change::key_hash`].
pub const FNV_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One row change, mapped onto its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub source: SourceId,
    pub table: Arc<TargetTable>,
    pub op: Op,
    /// New row values aligned with `table.columns` (empty for Delete and Truncate).
    pub values: Row,
    /// The key that finds the existing row, aligned with `table.key`: set for Delete and
    /// for an Update that changes its key; None means "the key inside `values`".
    pub old_key: Option<Row>,
    pub pos: Position,
    /// Source commit timestamp, microseconds since 2000-01-01 (history mode's `T`).
    pub commit_time: i64,
}

impl Change {
    /// The `n`-th key value of the row this change touches first (no allocation: this is
    /// on the routing and batching hot path).
    pub fn key_value(&self, n: usize) -> Option<Value<'_>> {
        match &self.old_key {
            Some(k) => k.get(n),
            None => self.table.key.get(n).and_then(|&i| self.values.get(i)),
        }
    }

    /// FNV-1a over the key values, continuing from `seed`: stable across runs and Rust
    /// versions (routing must be deterministic), cheap on the hot path.
    pub fn key_hash(&self, seed: u64) -> u64 {
        let mut h = seed;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        let mut n = 0;
        while let Some(v) = self.key_value(n) {
            n += 1;
            match v {
                Value::Text(s) => {
                    eat(&[1]);
                    eat(s.as_bytes());
                }
                Value::Null | Value::Unchanged => eat(&[0]),
            }
        }
        h
    }

    /// The key values that identify the row this change touches first.
    pub fn lookup_key(&self) -> Vec<Value<'_>> {
        match &self.old_key {
            Some(k) => k.iter().collect(),
            None => self
                .table
                .key
                .iter()
                .filter_map(|&i| self.values.get(i))
                .collect(),
        }
    }

    /// The key as text for error reports: `(id)=(42)`.
    pub fn describe_key(&self) -> String {
        let names: Vec<&str> = self
            .table
            .key
            .iter()
            .filter_map(|&i| self.table.columns.get(i).map(|c| c.name.as_str()))
            .collect();
        let vals: Vec<String> = self
            .lookup_key()
            .iter()
            .map(|v| match *v {
                Value::Null => "NULL".to_string(),
                Value::Text(s) => s.to_string(),
                Value::Unchanged => "(unchanged)".to_string(),
            })
            .collect();
        format!("({})=({})", names.join(", "), vals.join(", "))
    }
}

/// Shared by the unit tests of the modules that handle Changes.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// `public.t (id integer PRIMARY KEY, v text)`, no sid.
    pub fn table() -> Arc<TargetTable> {
        Arc::new(TargetTable {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![
                TargetColumn {
                    name: "id".into(),
                    type_name: "integer".into(),
                },
                TargetColumn {
                    name: "v".into(),
                    type_name: "text".into(),
                },
            ],
            key: vec![0],
            sid: None,
            arbiter: false,
            serial: false,
            full_identity: false,
        })
    }

    /// An INSERT of `(id, v)` into `t`.
    pub fn insert(t: &Arc<TargetTable>, id: &str, v: Value) -> Change {
        let mut values = Row::from_texts(&[Some(id)]);
        values.push(v);
        Change {
            source: 0,
            table: t.clone(),
            op: Op::Insert,
            values,
            old_key: None,
            pos: Position::default(),
            commit_time: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keeps_values_in_one_buffer() {
        let mut r = Row::from_texts(&[Some("a"), None, Some("")]);
        r.push(Value::Unchanged);
        r.push(Value::Text("ünï"));
        let all: Vec<Value> = r.iter().collect();
        assert_eq!(
            all,
            [
                Value::Text("a"),
                Value::Null,
                Value::Text(""),
                Value::Unchanged,
                Value::Text("ünï")
            ]
        );
        assert_eq!(r.len(), 5);
        assert!(r.has_unchanged());
        assert_eq!(r.get(5), None);
        assert_eq!(r.at(9), Value::Null);
    }
}
