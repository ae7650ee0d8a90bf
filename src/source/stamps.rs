//! Version stamps of history targets.
//!
//! Every change of a transaction has the same commit timestamp `T`, but the versions two
//! changes of one key make must stay distinct and ordered: a key's n-th change in a
//! transaction is stamped `T + n µs`. A TRUNCATE is stamped after every change of its
//! table before it, and the changes after it after the TRUNCATE, so it closes exactly the
//! versions opened before it. The stamps a transaction used past its `T` are carried into
//! the next ones: a hot key changed 50 times by one transaction and once more by the next,
//! committed 10 µs later, gets its next version after the 50th, never before it, so its
//! versions stay ordered as the source committed them. (Replays are told by position, not
//! by stamp: see [`crate::store`].) Pure logic.

use std::collections::HashMap;

#[derive(Default)]
struct Table {
    /// Lowest stamp a change may take (one past the last TRUNCATE's).
    floor: i64,
    /// One past the highest stamp taken.
    next: i64,
}

/// Stamps taken, by (target, key fingerprint): one past each key's last. Only those
/// past the current transaction's `T` are kept.
#[derive(Default)]
pub struct Stamps {
    keys: HashMap<(u64, u64), i64>,
    tables: HashMap<u64, Table>,
}

impl Stamps {
    /// A transaction committed at `time` (µs) starts: only stamps that reach past it
    /// still matter.
    pub fn begin(&mut self, time: i64) {
        if !self.tables.is_empty() {
            self.keys.retain(|_, next| *next > time);
            self.tables.retain(|_, t| t.next > time || t.floor > time);
        }
    }

    fn table(&mut self, table: u64) -> &mut Table {
        self.tables.entry(table).or_default()
    }

    /// The stamp of a change of `key` in `table`, at commit time `time` (µs).
    pub fn change(&mut self, time: i64, table: u64, key: u64) -> i64 {
        let floor = self.table(table).floor;
        let last = self.keys.get(&(table, key)).copied().unwrap_or(i64::MIN);
        self.take(table, &[key], time.max(floor).max(last))
    }

    /// Takes `stamp` for `keys`: each key's next change comes after it.
    fn take(&mut self, table: u64, keys: &[u64], stamp: i64) -> i64 {
        for &k in keys {
            self.keys.insert((table, k), stamp + 1);
        }
        let t = self.table(table);
        t.next = t.next.max(stamp + 1);
        stamp
    }

    /// The stamp of a change that touches two keys of `table`: a row moved from `old` to
    /// `new` in place. It closes `old`'s version and opens `new`'s, so it must come after
    /// every earlier change of either key (a key moved A → B → A in one transaction
    /// opens A again after closing it).
    pub fn moved(&mut self, time: i64, table: u64, old: u64, new: u64) -> i64 {
        let floor = self.table(table).floor;
        let last = |k| self.keys.get(&(table, k)).copied().unwrap_or(i64::MIN);
        let stamp = time.max(floor).max(last(old)).max(last(new));
        self.take(table, &[old, new], stamp)
    }

    /// The stamp of the new half of a row that moved by a DELETE stamped `from` and then
    /// an INSERT of `key` (a cross-partition UPDATE): the new version opens where the
    /// old one closed, unless `key` already changed later.
    pub fn continued(&mut self, time: i64, table: u64, key: u64, from: i64) -> i64 {
        let floor = self.table(table).floor;
        let last = self.keys.get(&(table, key)).copied().unwrap_or(i64::MIN);
        self.take(table, &[key], time.max(floor).max(last).max(from))
    }

    /// The stamp of a TRUNCATE of `table`: after every version of it opened so far.
    pub fn truncate(&mut self, time: i64, table: u64) -> i64 {
        let t = self.table(table);
        let stamp = time.max(t.next).max(t.floor);
        t.floor = stamp + 1;
        t.next = stamp + 1;
        stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_counts_its_own_changes() {
        let mut s = Stamps::default();
        s.begin(0);
        assert_eq!(s.change(100, 1, 7), 100);
        assert_eq!(s.change(100, 1, 7), 101);
        assert_eq!(s.change(100, 1, 8), 100, "another key starts at T");
        assert_eq!(s.change(100, 2, 7), 100, "another table too");
        assert_eq!(s.change(100, 1, 7), 102);
        s.begin(200);
        assert_eq!(s.change(200, 1, 7), 200, "a new transaction starts over");
    }

    #[test]
    fn a_moved_row_comes_after_the_changes_of_both_keys() {
        let mut s = Stamps::default();
        s.begin(0);
        // A → B, then B → A, then A changed again.
        assert_eq!(s.moved(10, 1, 7, 8), 10);
        assert_eq!(
            s.moved(10, 1, 8, 7),
            11,
            "after the first move's version of 8"
        );
        assert_eq!(s.change(10, 1, 7), 12);
        assert_eq!(s.change(10, 1, 8), 12, "8's version was closed at 11");
    }

    #[test]
    fn a_row_moved_by_delete_and_insert_continues_at_the_delete() {
        let mut s = Stamps::default();
        s.begin(0);
        assert_eq!(s.change(10, 1, 7), 10);
        let deleted = s.change(10, 1, 7);
        assert_eq!(deleted, 11);
        assert_eq!(s.continued(10, 1, 8, deleted), 11, "opens where 7 closed");
        assert_eq!(s.change(10, 1, 8), 12);
        s.change(10, 1, 9);
        s.change(10, 1, 9);
        assert_eq!(s.continued(10, 1, 9, 10), 12, "after 9's own changes");
    }

    #[test]
    fn a_truncate_falls_between_what_precedes_and_follows_it() {
        let mut s = Stamps::default();
        s.begin(0);
        assert_eq!(s.change(10, 1, 7), 10);
        assert_eq!(s.change(10, 1, 7), 11);
        assert_eq!(
            s.truncate(10, 1),
            12,
            "after every version opened before it"
        );
        assert_eq!(s.change(10, 1, 8), 13, "after the truncate, even a new key");
        assert_eq!(s.change(10, 1, 7), 13);
        assert_eq!(s.change(10, 1, 7), 14);
        assert_eq!(s.change(10, 2, 7), 10, "other tables are not affected");
        assert_eq!(
            s.truncate(10, 3),
            10,
            "a truncate first in its transaction is at T"
        );
    }

    #[test]
    fn a_hot_key_keeps_its_order_across_transactions() {
        let mut s = Stamps::default();
        s.begin(100);
        for n in 0..50 {
            assert_eq!(s.change(100, 1, 7), 100 + n);
        }
        s.change(100, 1, 8);
        // The next transaction committed 10 µs later.
        s.begin(110);
        assert_eq!(s.change(110, 1, 7), 150, "after the 50th version");
        assert_eq!(s.change(110, 1, 8), 110, "a key changed once starts at T");
        assert_eq!(s.truncate(110, 1), 151, "after every version of the table");
        s.begin(500);
        assert_eq!(s.change(500, 1, 7), 500, "nothing carried once T passed it");
        assert!(s.keys.len() <= 1);
    }
}
