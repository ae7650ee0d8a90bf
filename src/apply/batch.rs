//! A writer's batch: the changes of one destination transaction, grouped by target table
//! and reduced to each key's net effect (pure logic, no I/O).
//!
//! Within one destination transaction only each key's final state is visible at commit,
//! and changes to different keys commute. So a batch keeps, per target table, one entry
//! per key: the final row (an upsert), a delete, or a partial update that leaves the
//! unchanged TOAST values alone. Each table is then applied with a few set-based
//! statements, however the source interleaved its tables and however often it touched a
//! hot key. Targets where that reduction would be wrong keep every change in source order
//! instead ([`Group::ordered`]): those with unique constraints beyond their key (a row may
//! take a value another row frees) and those whose identity is the whole row (identical
//! rows are distinct rows).
//!
//! Every tenant (sid) writing into one target shares its group: one statement carries
//! them all, the sid being a column of the staged rows.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::change::{Change, Op, Position, Row, SourceId, TargetTable, Value, FNV_SEED};

/// Most changes one batch takes before it is applied and committed: bounds the redo of a
/// batch the destination refused and the memory it holds.
pub const MAX_CHANGES: usize = 50_000;
/// Most bytes of row data one batch holds, whatever the row sizes (rows of megabytes
/// must not build a transaction of gigabytes).
pub const MAX_BYTES: usize = 32 << 20;
/// Most rows one COPY carries. On a PostgreSQL 15 destination each COPY pays for its row
/// buffers a cost that grows with the square of their number up to a thousand
/// (resource-owner bookkeeping of one tuple descriptor per buffered row), so runs stay
/// long but bounded.
pub const MAX_COPY_ROWS: usize = 5000;
/// Most bytes one COPY carries.
pub const MAX_COPY_BYTES: usize = 8 << 20;

/// What an entry does to its key when the batch is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Net {
    /// Insert the row, or update it where the key exists: `values` is the whole row.
    Upsert,
    /// Delete the key.
    Delete,
    /// Update the columns present in `values` (others are unchanged TOAST) of the row
    /// found by its key.
    Patch,
    /// Update in place the row found by `old_key`, moving it to the key in `values`,
    /// whose unchanged TOAST values stay (a barrier: always alone in its batch).
    Move,
    /// Delete every row of the target for this sid (a barrier: always alone).
    Truncate,
    /// A partial update of a key the batch deleted before it: the row does not exist
    /// there, so its unchanged TOAST values have nowhere to come from and the change is
    /// refused (a rejected row), never applied in part nor skipped.
    Incomplete,
}

/// One key's net change.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The last change of the key, its values merged with the earlier ones: it names the
    /// source, position and operation when the destination refuses the entry.
    pub change: Change,
    pub net: Net,
    /// The key's first change in this batch was an INSERT: as far as the source knows,
    /// the row does not exist before the batch, so an upsert may be copied straight
    /// into the target, and a delete that finds nothing is what applying the changes
    /// one by one would have found too (no anomaly).
    pub fresh: bool,
    /// Fingerprint of (sid, key).
    pub key: u64,
    /// Positions of the first and the last change merged into it.
    pub first: Position,
    pub last: Position,
    /// Next entry with the same fingerprint (a collision), for exact lookups.
    next: Option<u32>,
}

impl Entry {
    /// Bytes of row data the entry holds.
    fn bytes(&self) -> usize {
        self.change.byte_len()
    }
}

/// Hasher of fingerprints, which are hashes already: used as they are.
#[derive(Default)]
pub struct Fingerprint(u64);

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

pub type FingerprintMap<V> = HashMap<u64, V, BuildHasherDefault<Fingerprint>>;
pub type FingerprintSet = HashSet<u64, BuildHasherDefault<Fingerprint>>;

/// The fingerprint of a change's (sid, key): the router's key fingerprint mixed with the
/// sid, since tenants share a group.
pub fn entry_key(c: &Change, key: u64) -> u64 {
    let mut h = FNV_SEED ^ key;
    if let Some(sid) = &c.table.sid {
        for b in sid.as_str().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^ (h >> 31)
}

/// Whether two changes touch the same row key (same sid, same key values).
pub(crate) fn same_key(a: &Change, b: &Change) -> bool {
    if a.table.sid != b.table.sid {
        return false;
    }
    let mut n = 0;
    loop {
        match (a.key_value(n), b.key_value(n)) {
            (None, None) => return true,
            (x, y) if x == y => n += 1,
            _ => return false,
        }
    }
}

/// The changes of one target table (of every sid) in a batch.
#[derive(Debug)]
pub struct Group {
    /// The table as the group's first change saw it (its sid is not the group's).
    pub table: Arc<TargetTable>,
    /// Entries in source order, one per change, instead of one per key.
    pub ordered: bool,
    pub entries: Vec<Entry>,
    /// Fingerprint → first entry with it (net groups only).
    index: FingerprintMap<u32>,
}

impl Group {
    fn new(table: Arc<TargetTable>) -> Group {
        // A history target keeps every change: each one is a version.
        // A loose key cannot be reduced by its text: 'Abc' and 'abc' may be one row.
        let ordered = table.serial || table.full_identity || table.versions() || table.loose_key;
        Group {
            table,
            ordered,
            entries: Vec::new(),
            index: FingerprintMap::default(),
        }
    }

    /// Adds a change; returns how many bytes of row data the group grew by (negative
    /// when a merge shrank it).
    fn push(&mut self, c: Change, key: u64) -> isize {
        let key = entry_key(&c, key);
        let (net, fresh) = first_net(&c);
        if self.ordered || matches!(net, Net::Move | Net::Truncate) {
            return self.append(c, net, fresh, key);
        }
        // Find the key's entry, following collisions.
        let mut at = self.index.get(&key).copied();
        let mut last = None;
        while let Some(i) = at {
            let e = &self.entries[i as usize];
            if same_key(&e.change, &c) {
                break;
            }
            last = Some(i);
            at = e.next;
        }
        if let Some(i) = at {
            if self.entries[i as usize].net == Net::Delete && net == Net::Patch {
                // Kept apart, so that the key's later changes still merge into its delete.
                return self.append(c, Net::Incomplete, false, key);
            }
            let e = &mut self.entries[i as usize];
            let before = e.bytes() as isize;
            merge(e, c);
            return e.bytes() as isize - before;
        }
        let i = self.entries.len() as u32;
        match last {
            Some(l) => self.entries[l as usize].next = Some(i),
            None => {
                self.index.insert(key, i);
            }
        }
        self.append(c, net, fresh, key)
    }

    /// A new entry at the end; returns its bytes.
    fn append(&mut self, change: Change, net: Net, fresh: bool, key: u64) -> isize {
        let e = Entry {
            first: change.pos,
            last: change.pos,
            change,
            net,
            fresh,
            key,
            next: None,
        };
        let bytes = e.bytes() as isize;
        self.entries.push(e);
        bytes
    }

    /// The entries cut into segments that one set of statements can apply: for a net
    /// group, everything at once; for an ordered group, runs of one kind of entry with no
    /// key twice, in source order (identical rows inserted twice are two rows, so a run
    /// of inserts into a whole-row-identity table may repeat its "key").
    pub fn segments(&self) -> Vec<&[Entry]> {
        // A history group is chained by key in memory (see history.rs): one segment.
        if !self.ordered || self.table.versions() {
            return vec![&self.entries[..]];
        }
        let mut out = Vec::new();
        let mut start = 0;
        let mut keys = FingerprintSet::default();
        for (i, e) in self.entries.iter().enumerate() {
            let first = &self.entries[start];
            let repeats_ok = self.table.full_identity && e.net == Net::Upsert && e.fresh;
            let fits = i > start
                && e.net == first.net
                && e.fresh == first.fresh
                && !matches!(e.net, Net::Move | Net::Truncate)
                && (keys.insert(e.key) || repeats_ok);
            if i > start && !fits {
                out.push(&self.entries[start..i]);
                start = i;
                keys.clear();
            }
            if i == start {
                keys.insert(e.key);
            }
        }
        if start < self.entries.len() {
            out.push(&self.entries[start..]);
        }
        out
    }
}

/// The net effect of a change on its own, and whether it is fresh.
fn first_net(c: &Change) -> (Net, bool) {
    match c.op {
        Op::Insert => (Net::Upsert, true),
        Op::Update if c.old_key.is_some() && c.values.has_unchanged() => (Net::Move, false),
        Op::Update if c.values.has_unchanged() => (Net::Patch, false),
        Op::Update => (Net::Upsert, false),
        Op::Delete => (Net::Delete, false),
        Op::Truncate => (Net::Truncate, false),
    }
}

/// Folds a later change of the same key into its entry.
fn merge(e: &mut Entry, c: Change) {
    e.last = e.last.max(c.pos);
    let (net, _) = first_net(&c);
    match (e.net, net) {
        // A partial update on top of a known row or patch: the present values win, the
        // unchanged ones keep what the entry had.
        (Net::Upsert | Net::Patch, Net::Patch) => {
            let merged = Row::from_values((0..c.values.len()).map(|i| match c.values.at(i) {
                Value::Unchanged => e.change.values.at(i),
                v => v,
            }));
            e.change = Change {
                values: merged,
                ..c
            };
        }
        // Never merged: [`Group::push`] keeps it apart as [`Net::Incomplete`].
        (Net::Delete, Net::Patch) => {}
        // A whole row or a delete replaces whatever came before; a row that was inserted
        // in this batch stays fresh through its updates and its delete.
        (prev, next) => {
            e.fresh = e.fresh
                && prev == Net::Upsert
                && match next {
                    Net::Upsert => c.op != Op::Insert,
                    Net::Delete => true,
                    _ => false,
                };
            e.net = next;
            e.change = c;
        }
    }
}

/// The changes of one destination transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub groups: Vec<Group>,
    /// Table (by pointer, kept alive here) → its group.
    by_table: HashMap<usize, (Arc<TargetTable>, usize)>,
    /// Changes taken (before reduction).
    pub changes: usize,
    /// Bytes of row data held.
    pub bytes: usize,
    /// Per source, the position after its last change taken (see [`crate::store`]).
    pub next: Vec<(SourceId, Position)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Whether the batch must be applied before it takes more.
    pub fn is_full(&self) -> bool {
        self.changes >= MAX_CHANGES || self.bytes >= MAX_BYTES
    }

    /// Whether this change must be applied alone, in a batch of its own: it touches many
    /// keys (TRUNCATE) or two keys whose writers may differ (a key move that keeps
    /// unchanged TOAST values).
    pub fn is_barrier(c: &Change) -> bool {
        matches!(first_net(c).0, Net::Move | Net::Truncate)
    }

    /// Takes a change whose router key fingerprint is `key`.
    pub fn push(&mut self, c: Change, key: u64) {
        let ptr = Arc::as_ptr(&c.table) as usize;
        let g = match self.by_table.get(&ptr) {
            Some((_, g)) => *g,
            None => {
                let g = match self
                    .groups
                    .iter()
                    .position(|g| g.table.same_layout(&c.table))
                {
                    Some(g) => g,
                    None => {
                        self.groups.push(Group::new(c.table.clone()));
                        self.groups.len() - 1
                    }
                };
                self.by_table.insert(ptr, (c.table.clone(), g));
                g
            }
        };
        let next = c.pos.next();
        match self.next.iter_mut().find(|(s, _)| *s == c.source) {
            Some((_, p)) => *p = (*p).max(next),
            None => self.next.push((c.source, next)),
        }
        let grown = self.groups[g].push(c, key);
        self.bytes = self.bytes.saturating_add_signed(grown);
        self.changes += 1;
    }

    /// Where each held source's changes must be left for its replay, given the change
    /// at which each was held: at that change, or earlier when an entry merges changes
    /// from both sides of it (an entry is applied whole or not at all).
    pub fn cuts(&self, held: &[(SourceId, Position)]) -> Vec<(SourceId, Position)> {
        let mut cuts: Vec<(SourceId, Position)> = Vec::new();
        for &(source, at) in held {
            match cuts.iter_mut().find(|(s, _)| *s == source) {
                Some((_, c)) => *c = (*c).min(at),
                None => cuts.push((source, at)),
            }
        }
        for (source, cut) in &mut cuts {
            loop {
                let lower = self
                    .groups
                    .iter()
                    .flat_map(|g| &g.entries)
                    .filter(|e| e.change.source == *source && e.last >= *cut)
                    .map(|e| e.first)
                    .min()
                    .unwrap_or(*cut);
                if lower >= *cut {
                    break;
                }
                *cut = lower;
            }
        }
        cuts
    }

    pub fn clear(&mut self) {
        self.groups.clear();
        self.by_table.clear();
        self.changes = 0;
        self.bytes = 0;
        self.next.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::route::key_fingerprint;
    use crate::change::fixtures::{insert, table};
    use crate::change::Sid;

    fn push(b: &mut Batch, c: Change) {
        let key = key_fingerprint(&c);
        b.push(c, key);
    }

    fn update(t: &Arc<TargetTable>, id: &str, v: Value) -> Change {
        let mut c = insert(t, id, v);
        c.op = Op::Update;
        c
    }

    fn delete(t: &Arc<TargetTable>, id: &str) -> Change {
        let mut c = insert(t, id, Value::Null);
        c.op = Op::Delete;
        c.old_key = Some(Row::from_texts(&[Some(id)]));
        c.values = Row::default();
        c
    }

    fn summary(g: &Group) -> Vec<(String, Net, bool, Vec<Value<'_>>)> {
        g.entries
            .iter()
            .map(|e| {
                let key = match e.change.key_value(0) {
                    Some(Value::Text(s)) => s.to_string(),
                    other => format!("{other:?}"),
                };
                (key, e.net, e.fresh, e.change.values.iter().collect())
            })
            .collect()
    }

    #[test]
    fn each_key_keeps_its_final_state() {
        let t = table();
        let mut b = Batch::default();
        push(&mut b, insert(&t, "1", Value::Text("a")));
        push(&mut b, update(&t, "1", Value::Text("b")));
        push(&mut b, insert(&t, "2", Value::Text("c")));
        push(&mut b, delete(&t, "2"));
        push(&mut b, update(&t, "3", Value::Text("d")));
        push(&mut b, delete(&t, "4"));
        push(&mut b, insert(&t, "4", Value::Text("e")));
        assert_eq!(b.changes, 7);
        assert_eq!(b.groups.len(), 1);
        assert_eq!(
            summary(&b.groups[0]),
            [
                (
                    "1".into(),
                    Net::Upsert,
                    true,
                    vec![Value::Text("1"), Value::Text("b")]
                ),
                ("2".into(), Net::Delete, true, vec![]),
                (
                    "3".into(),
                    Net::Upsert,
                    false,
                    vec![Value::Text("3"), Value::Text("d")]
                ),
                (
                    "4".into(),
                    Net::Upsert,
                    false,
                    vec![Value::Text("4"), Value::Text("e")]
                ),
            ]
        );
        assert_eq!(b.groups[0].segments().len(), 1);
    }

    #[test]
    fn partial_updates_keep_unchanged_values() {
        let t = table();
        let mut b = Batch::default();
        // Known row, then a patch: the whole row with the patch's present values.
        push(&mut b, insert(&t, "1", Value::Text("big")));
        let mut p = update(&t, "1", Value::Unchanged);
        p.values = Row::from_values([Value::Text("1"), Value::Unchanged].into_iter());
        push(&mut b, p);
        // Two patches of an unknown row stay a patch.
        push(&mut b, update(&t, "2", Value::Unchanged));
        push(&mut b, update(&t, "2", Value::Unchanged));
        let s = summary(&b.groups[0]);
        assert_eq!(
            s[0],
            (
                "1".into(),
                Net::Upsert,
                true,
                vec![Value::Text("1"), Value::Text("big")]
            )
        );
        assert_eq!(
            s[1],
            (
                "2".into(),
                Net::Patch,
                false,
                vec![Value::Text("2"), Value::Unchanged]
            )
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_partial_update_of_a_deleted_key_is_kept_apart_as_incomplete() {
        let t = table();
        let mut b = Batch::default();
        push(&mut b, delete(&t, "3"));
        push(&mut b, update(&t, "3", Value::Unchanged));
        // The key's later whole row still replaces its delete, in place.
        push(&mut b, update(&t, "3", Value::Text("new")));
        let s = summary(&b.groups[0]);
        assert_eq!(
            s.iter().map(|e| e.1).collect::<Vec<_>>(),
            [Net::Upsert, Net::Incomplete]
        );
        assert_eq!(s[1].3, vec![Value::Text("3"), Value::Unchanged]);
    }

    #[test]
    fn tenants_share_a_group_but_not_keys() {
        let base = table();
        let with_sid = |s: &str| {
            Arc::new(TargetTable {
                sid: Some(Sid::new(s)),
                ..(*base).clone()
            })
        };
        let (a, b2) = (with_sid("a"), with_sid("b"));
        let mut b = Batch::default();
        push(&mut b, insert(&a, "1", Value::Text("x")));
        push(&mut b, insert(&b2, "1", Value::Text("y")));
        push(&mut b, update(&a, "1", Value::Text("z")));
        assert_eq!(b.groups.len(), 1);
        let s: Vec<_> = b.groups[0]
            .entries
            .iter()
            .map(|e| (e.change.table.sid.clone(), e.change.values.at(1)))
            .collect();
        assert_eq!(
            s,
            [
                (Some(Sid::new("a")), Value::Text("z")),
                (Some(Sid::new("b")), Value::Text("y"))
            ]
        );
        // Another layout of the same name is another group.
        let other = Arc::new(TargetTable {
            columns: vec![base.columns[0].clone()],
            ..(*base).clone()
        });
        push(&mut b, insert(&other, "1", Value::Text("q")));
        assert_eq!(b.groups.len(), 2);
    }

    #[test]
    fn ordered_groups_cut_segments_where_order_matters() {
        let t = Arc::new(TargetTable {
            serial: true,
            ..(*table()).clone()
        });
        let mut b = Batch::default();
        push(&mut b, insert(&t, "1", Value::Text("a")));
        push(&mut b, insert(&t, "2", Value::Text("b")));
        push(&mut b, update(&t, "1", Value::Text("c"))); // key 1 again, other kind
        push(&mut b, update(&t, "2", Value::Text("d")));
        push(&mut b, update(&t, "2", Value::Text("e"))); // key 2 twice
        push(&mut b, delete(&t, "1"));
        let g = &b.groups[0];
        assert!(g.ordered);
        let lens: Vec<usize> = g.segments().iter().map(|s| s.len()).collect();
        assert_eq!(lens, [2, 2, 1, 1]);
    }

    #[test]
    fn identical_rows_of_a_whole_row_identity_stay_distinct() {
        let t = Arc::new(TargetTable {
            full_identity: true,
            key: vec![0, 1],
            ..(*table()).clone()
        });
        let mut b = Batch::default();
        for _ in 0..3 {
            push(&mut b, insert(&t, "1", Value::Text("same")));
        }
        let mut d = delete(&t, "1");
        d.old_key = Some(Row::from_texts(&[Some("1"), Some("same")]));
        push(&mut b, d);
        let mut d = delete(&t, "1");
        d.old_key = Some(Row::from_texts(&[Some("1"), Some("same")]));
        push(&mut b, d);
        let g = &b.groups[0];
        assert_eq!(g.entries.len(), 5);
        let lens: Vec<usize> = g.segments().iter().map(|s| s.len()).collect();
        // Three inserts in one run; each delete of one copy alone.
        assert_eq!(lens, [3, 1, 1]);
    }

    #[test]
    fn barriers_and_bounds() {
        let t = table();
        let mut tr = insert(&t, "1", Value::Null);
        tr.op = Op::Truncate;
        assert!(Batch::is_barrier(&tr));
        let mut mv = update(&t, "2", Value::Unchanged);
        mv.old_key = Some(Row::from_texts(&[Some("1")]));
        assert!(Batch::is_barrier(&mv));
        assert!(!Batch::is_barrier(&update(&t, "2", Value::Unchanged)));
        let mut b = Batch::default();
        let big = "x".repeat(MAX_BYTES / 2 + 1);
        push(&mut b, insert(&t, "1", Value::Text(&big)));
        assert!(!b.is_full());
        push(&mut b, insert(&t, "2", Value::Text(&big)));
        assert!(b.is_full(), "bounded by bytes");
        // Replacing a key's row does not count its bytes twice.
        let before = b.bytes;
        push(&mut b, update(&t, "2", Value::Text("small")));
        assert!(b.bytes < before);
        b.clear();
        assert!(b.is_empty() && b.bytes == 0);
    }
}
