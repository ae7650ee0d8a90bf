//! Grouping a writer's queue into runs that one statement can apply (pure logic).
//!
//! A run holds consecutive changes of one target, one kind and one column shape, with
//! no key twice: then the changes commute and a single set-based statement applies them
//! all, while every key still sees its changes in source order.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::change::{Change, Op, TargetTable, Value};

/// Most changes one statement carries; keeps statements a few MB at most.
pub const MAX_RUN: usize = 1000;
/// Most new rows one COPY carries. Bigger than a statement's run: COPY streams its rows,
/// and on a PostgreSQL 15 destination each COPY pays for its row buffers a cost that grows
/// with the square of their number up to a thousand (resource-owner bookkeeping of one
/// tuple descriptor per buffered row), so fewer, longer COPYs are cheaper per row.
pub const MAX_COPY_RUN: usize = 5000;

/// How a run is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// INSERTs, applied as insert-or-update (anomaly: the key already existed).
    Insert,
    /// UPDATEs that carry the whole row, applied as update-or-insert (anomaly: missing).
    Update,
    /// DELETEs by key (anomaly: missing).
    Delete,
    /// An UPDATE with unchanged TOAST values: only the sent columns, by its old key.
    InPlace,
    /// All rows of the target for this source.
    Truncate,
}

impl Kind {
    /// Whether several changes of this kind can share one statement.
    fn batches(self) -> bool {
        matches!(self, Kind::Insert | Kind::Update | Kind::Delete)
    }
}

/// The kind of a change.
pub fn kind_of(c: &Change) -> Kind {
    match c.op {
        Op::Insert => Kind::Insert,
        Op::Update => {
            if c.old_key.is_none() && !c.values.iter().any(|v| matches!(v, Value::Unchanged)) {
                Kind::Update
            } else {
                Kind::InPlace
            }
        }
        Op::Delete => Kind::Delete,
        Op::Truncate => Kind::Truncate,
    }
}

/// The columns a change's statement writes: those it carries a value for.
pub fn columns_of(c: &Change) -> Vec<usize> {
    c.values
        .iter()
        .enumerate()
        .filter(|(_, v)| !matches!(v, Value::Unchanged))
        .map(|(i, _)| i)
        .collect()
}

/// Whether the change carries values for exactly `cols` (without allocating).
fn has_columns(c: &Change, cols: &[usize]) -> bool {
    // The common case: every column, none unchanged.
    if c.values.is_complete(cols.len()) {
        return true;
    }
    let mut expected = cols.iter();
    for (i, v) in c.values.iter().enumerate() {
        if !matches!(v, Value::Unchanged) && expected.next() != Some(&i) {
            return false;
        }
    }
    expected.next().is_none()
}

/// The kind of a change and the columns its statement writes.
pub fn classify(c: &Change) -> (Kind, Vec<usize>) {
    (kind_of(c), columns_of(c))
}

/// Hasher of the run's key set. Keys arrive as fingerprints (hashes already: see
/// `route::key_fingerprint`), which the set uses as they are; a collision only ends a run
/// early.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeySet = HashSet<u64, BuildHasherDefault<Fingerprint>>;

/// Changes that one statement will apply.
#[derive(Debug)]
pub struct Run {
    pub table: Arc<TargetTable>,
    pub kind: Kind,
    pub cols: Vec<usize>,
    pub changes: Vec<Change>,
    keys: KeySet,
}

impl Run {
    /// A run that starts with `c`, whose key fingerprint is `key`.
    pub fn start(c: Change, key: u64) -> Run {
        let (kind, cols) = classify(&c);
        Run::new(c, key, kind, cols)
    }

    pub fn new(c: Change, key: u64, kind: Kind, cols: Vec<usize>) -> Run {
        let mut keys = KeySet::default();
        keys.insert(key);
        Run {
            table: c.table.clone(),
            kind,
            cols,
            changes: vec![c],
            keys,
        }
    }

    /// Adds the change if it fits this run; false (and nothing added) otherwise.
    pub fn try_push(&mut self, c: &mut Option<Change>, key: u64) -> bool {
        let Some(change) = c.as_ref() else {
            return false;
        };
        if !self.kind.batches()
            || self.changes.len() >= self.max_len()
            || !Arc::ptr_eq(&change.table, &self.table)
            || kind_of(change) != self.kind
            || !has_columns(change, &self.cols)
            || !self.keys.insert(key)
        {
            return false;
        }
        if let Some(change) = c.take() {
            self.changes.push(change);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether the writer will apply this run with COPY (new rows into a target with a
    /// unique index on the key).
    pub fn copyable(&self) -> bool {
        self.kind == Kind::Insert && self.table.arbiter
    }

    fn max_len(&self) -> usize {
        if self.copyable() {
            MAX_COPY_RUN
        } else {
            MAX_RUN
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.changes.len() >= self.max_len() || !self.kind.batches()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::route::key_fingerprint;
    use crate::change::fixtures::{insert, table};
    use crate::change::Row;

    fn push(run: &mut Run, c: Change) -> bool {
        let key = key_fingerprint(&c);
        run.try_push(&mut Some(c), key)
    }

    fn start(c: Change) -> Run {
        let key = key_fingerprint(&c);
        Run::start(c, key)
    }

    #[test]
    fn same_shape_batches_until_a_key_repeats() {
        let t = table();
        let mut run = start(insert(&t, "1", Value::Null));
        assert!(push(&mut run, insert(&t, "2", Value::Text("x"))));
        assert!(!push(&mut run, insert(&t, "1", Value::Null)), "key 1 twice");
        assert_eq!(run.len(), 2);
    }

    #[test]
    fn other_kind_or_table_ends_the_run() {
        let t = table();
        let mut run = start(insert(&t, "1", Value::Null));
        let mut upd = insert(&t, "2", Value::Null);
        upd.op = Op::Update;
        assert!(!push(&mut run, upd));
        let other = Arc::new((*t).clone());
        assert!(!push(&mut run, insert(&other, "3", Value::Null)));
    }

    #[test]
    fn unchanged_toast_makes_an_in_place_update() {
        let t = table();
        let mut c = insert(&t, "1", Value::Unchanged);
        c.op = Op::Update;
        assert_eq!(classify(&c), (Kind::InPlace, vec![0]));
        c.values = Row::from_texts(&[Some("1"), None]);
        assert_eq!(classify(&c), (Kind::Update, vec![0, 1]));
        assert!(has_columns(&c, &[0, 1]) && !has_columns(&c, &[0]) && !has_columns(&c, &[0, 1, 2]));
    }
}
