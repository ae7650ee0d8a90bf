//! The unit of work that flows from a source thread to the writers, and the description
//! of the table it lands in. Everything here is plain data: no I/O.

use std::fmt;
use std::sync::Arc;

use crate::mode::Mode;
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
    /// The destination column's type with its modifier, as `format_type` prints it (the
    /// writers stage values in tables typed like the target, so no value is ever cast;
    /// this tells when a target's layout changed).
    pub type_name: String,
    /// Equal values may differ as text on the destination (citext, numeric, a
    /// nondeterministic collation): see [`TargetTable::loose_key`].
    pub loose: bool,
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
    /// What the target does with each change (see [`crate::mode`]): with versions, every
    /// change adds or closes one (`kvsz_start`, `kvsz_end`, `kvsz_deleted`) instead of
    /// changing the row.
    pub mode: Mode,
    /// Some key column's equality on the destination is looser than its text (citext,
    /// numeric, a nondeterministic collation…): changes whose key texts differ may touch
    /// one row, so no fingerprint of the text can keep them apart. Such a target gets all
    /// its changes on one writer, applied in source order, like a `serial` one.
    pub loose_key: bool,
    /// Some key column is of a composite type: it cannot be compared with an untyped
    /// literal, so its changes always go through the typed stages.
    pub composite_key: bool,
}

impl TargetTable {
    /// `schema.table` for messages (not quoted; not for SQL).
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Whether its rows are versions of the source's rows (history).
    pub fn versions(&self) -> bool {
        self.mode.versions()
    }

    /// Whether both describe the same table with the same columns and key, whatever
    /// their sid: then one set-based statement can carry the rows of both.
    pub fn same_layout(&self, other: &TargetTable) -> bool {
        self.schema == other.schema
            && self.name == other.name
            && self.columns == other.columns
            && self.key == other.key
            && self.arbiter == other.arbiter
            && self.serial == other.serial
            && self.full_identity == other.full_identity
            && self.mode == other.mode
            && self.loose_key == other.loose_key
            && self.composite_key == other.composite_key
            && self.sid.is_some() == other.sid.is_some()
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

/// Bytes one cell takes in a row's header: two `u32` in five 7-bit groups each.
const CELL_BYTES: usize = 10;
/// `start` values that mark the cells without text.
const NULL_MARK: u32 = u32::MAX;
const UNCHANGED_MARK: u32 = u32::MAX - 1;

impl Cell {
    /// The cell as ASCII: the header stays valid UTF-8, so the row is one `String`.
    fn encode(self) -> [u8; CELL_BYTES] {
        let (start, end) = match self {
            Cell::Null => (NULL_MARK, 0),
            Cell::Unchanged => (UNCHANGED_MARK, 0),
            Cell::Text { start, end } => (start, end),
        };
        let mut out = [0u8; CELL_BYTES];
        for (i, v) in [start, end].into_iter().enumerate() {
            for g in 0..5 {
                out[i * 5 + g] = ((v >> (7 * g)) & 0x7f) as u8;
            }
        }
        out
    }

    fn decode(b: [u8; CELL_BYTES]) -> Cell {
        let word = |o: usize| {
            u32::from(b[o])
                | u32::from(b[o + 1]) << 7
                | u32::from(b[o + 2]) << 14
                | u32::from(b[o + 3]) << 21
                | u32::from(b[o + 4]) << 28
        };
        match (word(0), word(5)) {
            (NULL_MARK, _) => Cell::Null,
            (UNCHANGED_MARK, _) => Cell::Unchanged,
            (start, end) => Cell::Text { start, end },
        }
    }
}

/// The values of a row in one allocation: a header of one fixed-size cell a value, then
/// the texts. Rows are built by a source thread and freed by a writer thread by the hundred
/// thousand a second, and an allocation freed by another thread always takes the
/// allocator's slow path on both sides: one allocation a row instead of one per column
/// (or two) keeps the allocator off the profile.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Row {
    buf: String,
    /// Cells in the header.
    len: u32,
}

impl Row {
    /// A row of `values`, built in one pass over them and one allocation (the source
    /// thread's hot path).
    pub fn from_values<'a>(values: impl Iterator<Item = Value<'a>> + Clone) -> Row {
        let (n, bytes) = values.clone().fold((0, 0), |(n, b), v| match v {
            Value::Text(s) => (n + 1, b + s.len()),
            Value::Null | Value::Unchanged => (n + 1, b),
        });
        let mut buf = String::with_capacity(n * CELL_BYTES + bytes);
        let mut offset = 0u32;
        for v in values.clone() {
            let cell = match v {
                Value::Null => Cell::Null,
                Value::Unchanged => Cell::Unchanged,
                Value::Text(s) => {
                    let start = offset;
                    offset += s.len() as u32;
                    Cell::Text { start, end: offset }
                }
            };
            buf.extend(cell.encode().into_iter().map(char::from));
        }
        for v in values {
            if let Value::Text(s) = v {
                buf.push_str(s);
            }
        }
        Row { buf, len: n as u32 }
    }

    fn header_len(&self) -> usize {
        self.len as usize * CELL_BYTES
    }

    fn cell(&self, i: usize) -> Option<Cell> {
        if i >= self.len as usize {
            return None;
        }
        let at = i * CELL_BYTES;
        self.buf
            .as_bytes()
            .get(at..at + CELL_BYTES)
            .and_then(|b| <[u8; CELL_BYTES]>::try_from(b).ok())
            .map(Cell::decode)
    }

    /// The text of a Text cell.
    fn text(&self, start: u32, end: u32) -> &str {
        let h = self.header_len();
        self.buf
            .get(h + start as usize..h + end as usize)
            .unwrap_or("")
    }

    /// The `i`-th value's bytes when it is a text (the COPY writer's hot path).
    pub fn text_bytes(&self, i: usize) -> Option<&[u8]> {
        match self.cell(i) {
            Some(Cell::Text { start, end }) => Some(self.text(start, end).as_bytes()),
            _ => None,
        }
    }

    /// Whether the row carries a value (not Unchanged) for exactly the first `n` columns.
    pub fn is_complete(&self, n: usize) -> bool {
        self.len() == n && !self.has_unchanged()
    }

    /// A row from optional texts (None is NULL), for tests and small callers.
    pub fn from_texts(values: &[Option<&str>]) -> Row {
        Row::from_values(values.iter().map(|v| match v {
            Some(s) => Value::Text(s),
            None => Value::Null,
        }))
    }

    /// The `i`-th value; None past the end.
    pub fn get(&self, i: usize) -> Option<Value<'_>> {
        self.cell(i).map(|c| match c {
            Cell::Null => Value::Null,
            Cell::Unchanged => Value::Unchanged,
            Cell::Text { start, end } => Value::Text(self.text(start, end)),
        })
    }

    /// The `i`-th value, NULL past the end.
    pub fn at(&self, i: usize) -> Value<'_> {
        self.get(i).unwrap_or(Value::Null)
    }

    pub fn iter(&self) -> impl Iterator<Item = Value<'_>> + '_ {
        (0..self.len()).map(move |i| self.at(i))
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Bytes the row occupies (what batches and queues are bounded by).
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn has_unchanged(&self) -> bool {
        (0..self.len()).any(|i| self.cell(i) == Some(Cell::Unchanged))
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
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
///
/// A replay numbers a transaction's changes as its first decoding did, whatever changed
/// meanwhile: the walsender decodes each transaction with the catalog of its time (a
/// table published later is not sent for it, one unpublished later still is), the
/// `_ins` publication is asked for only from the position it was recorded safe at, every
/// change message is counted whether or not it is mapped, and every UPDATE takes two
/// indexes, split or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl Position {
    /// The position right after this one in its transaction.
    pub fn next(self) -> Position {
        Position {
            commit_lsn: self.commit_lsn,
            seq: self.seq.saturating_add(1),
        }
    }
}

/// A key's text as destination equality may see it: lower case, and a number without
/// the trailing zeros of its fraction (`1.50` and `1.5`).
fn fold_key_text(s: &str) -> String {
    let lower = s.to_lowercase();
    let numeric = !lower.is_empty()
        && lower.contains('.')
        && lower
            .trim_start_matches(['-', '+'])
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.');
    if numeric {
        lower
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        lower
    }
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
    /// Source commit timestamp, microseconds since 2000-01-01. For a history target, the
    /// version stamp: `T` plus one microsecond for each earlier change of the same key (or
    /// TRUNCATE of the table) in the transaction, so versions stay distinct and ordered.
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
        self.hash_key_values(seed, |n| self.key_value(n))
    }

    /// [`Change::key_hash`] of the key in `values` (the new key of a moved row).
    pub fn new_key_hash(&self, seed: u64) -> u64 {
        self.hash_key_values(seed, |n| {
            self.table.key.get(n).and_then(|&i| self.values.get(i))
        })
    }

    /// The key a history stamp is counted by ([`crate::source::stamps`]) and a history
    /// batch chains versions by ([`crate::apply::history`]), of the new key in `values`
    /// with `new`. Keys equal on the destination must share it: the text of a loose key
    /// column (citext, numeric…) is folded (lower case, numbers without trailing zeros).
    pub fn stamp_key(&self, new: bool) -> u64 {
        match (self.table.loose_key, new) {
            (false, false) => self.key_hash(FNV_SEED),
            (false, true) => self.new_key_hash(FNV_SEED),
            (true, false) => self.hash_folded(|n| self.key_value(n)),
            (true, true) => {
                self.hash_folded(|n| self.table.key.get(n).and_then(|&i| self.values.get(i)))
            }
        }
    }

    fn hash_folded<'a>(&'a self, key_value: impl Fn(usize) -> Option<Value<'a>>) -> u64 {
        let loose = |n: usize| {
            self.table
                .key
                .get(n)
                .and_then(|&i| self.table.columns.get(i))
                .is_some_and(|c| c.loose)
        };
        let folded: Vec<Option<String>> = (0..)
            .map_while(key_value)
            .enumerate()
            .map(|(n, v)| match v {
                Value::Text(s) if loose(n) => Some(fold_key_text(s)),
                Value::Text(s) => Some(s.to_string()),
                Value::Null | Value::Unchanged => None,
            })
            .collect();
        self.hash_key_values(FNV_SEED, |n| {
            folded.get(n).map(|v| match v {
                Some(s) => Value::Text(s.as_str()),
                None => Value::Null,
            })
        })
    }

    fn hash_key_values<'a>(
        &self,
        seed: u64,
        key_value: impl Fn(usize) -> Option<Value<'a>>,
    ) -> u64 {
        let mut h = seed;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        let mut n = 0;
        while let Some(v) = key_value(n) {
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

    /// Bytes of row data the change holds (what queues and batches are bounded by).
    pub fn byte_len(&self) -> usize {
        self.values.byte_len() + self.old_key.as_ref().map_or(0, Row::byte_len)
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

    /// The DELETE of the row this change touches first (its old key, or the key in its
    /// values): what a row that stops passing its table's filter becomes.
    pub fn into_delete(self) -> Change {
        if self.op == Op::Delete {
            return self;
        }
        let key = self
            .old_key
            .clone()
            .unwrap_or_else(|| Row::from_values(self.table.key.iter().map(|&i| self.values.at(i))));
        Change {
            op: Op::Delete,
            old_key: Some(key),
            values: Row::default(),
            ..self
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
                    loose: false,
                },
                TargetColumn {
                    name: "v".into(),
                    type_name: "text".into(),
                    loose: false,
                },
            ],
            key: vec![0],
            sid: None,
            arbiter: false,
            serial: false,
            full_identity: false,
            mode: Mode::Clone,
            loose_key: false,
            composite_key: false,
        })
    }

    /// An INSERT of `(id, v)` into `t`.
    pub fn insert(t: &Arc<TargetTable>, id: &str, v: Value) -> Change {
        let values = Row::from_values([Value::Text(id), v].into_iter());
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
        let r = Row::from_values(
            [
                Value::Text("a"),
                Value::Null,
                Value::Text(""),
                Value::Unchanged,
                Value::Text("ünï"),
            ]
            .into_iter(),
        );
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
        assert_eq!(r.text_bytes(4), Some("ünï".as_bytes()));
        assert_eq!(r.text_bytes(1), None);
    }

    #[test]
    fn rows_compare_by_values() {
        let r = Row::from_values([Value::Text("x"), Value::Null].into_iter());
        assert_eq!(r, Row::from_texts(&[Some("x"), None]));
        assert_ne!(r, Row::from_texts(&[Some("x")]));
        assert_ne!(r, Row::from_texts(&[Some("x"), Some("")]));
        assert_eq!(format!("{r:?}"), r#"[Text("x"), Null]"#);
    }

    #[test]
    fn cells_round_trip_through_their_ascii_form() {
        for cell in [
            Cell::Null,
            Cell::Unchanged,
            Cell::Text { start: 0, end: 0 },
            Cell::Text {
                start: 127,
                end: 128,
            },
            Cell::Text {
                start: 1 << 30,
                end: u32::MAX - 2,
            },
        ] {
            let bytes = cell.encode();
            assert!(bytes.is_ascii(), "{cell:?}");
            assert_eq!(Cell::decode(bytes), cell);
        }
    }

    #[test]
    fn a_change_becomes_the_delete_of_its_key() {
        let t = fixtures::table();
        let c = fixtures::insert(&t, "7", Value::Text("x"));
        let d = c.clone().into_delete();
        assert_eq!((d.op, d.values.len()), (Op::Delete, 0));
        assert_eq!(d.old_key, Some(Row::from_texts(&[Some("7")])));
        let mut moved = c;
        moved.op = Op::Update;
        moved.old_key = Some(Row::from_texts(&[Some("1")]));
        assert_eq!(
            moved.into_delete().old_key,
            Some(Row::from_texts(&[Some("1")])),
            "a key change deletes the old key"
        );
    }

    #[test]
    fn a_wide_row_keeps_every_value() {
        let texts: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
        let mut expected: Vec<Value> = texts.iter().map(|t| Value::Text(t)).collect();
        expected.push(Value::Null);
        let r = Row::from_values(expected.iter().copied());
        assert_eq!(r.len(), 41);
        let back: Vec<Value> = r.iter().collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn loose_keys_are_stamped_by_their_folded_text() {
        assert_eq!(fold_key_text("Key7"), "key7");
        assert_eq!(fold_key_text("1.500"), "1.5");
        assert_eq!(fold_key_text("-2.0"), "-2");
        assert_eq!(fold_key_text("10"), "10");
        assert_eq!(fold_key_text("v1.0"), "v1.0");
    }
}
