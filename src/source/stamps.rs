//! Version stamps of history targets within one source transaction.
//!
//! Every change of a transaction has the same commit timestamp `T`, but the versions two
//! changes of one key make must stay distinct and ordered: the n-th change of a key in a
//! transaction is stamped `T + n µs`. A TRUNCATE is stamped after every change of its
//! table before it, and the changes after it after the TRUNCATE, so it closes exactly the
//! versions opened before it. Pure logic.

use std::collections::HashMap;

#[derive(Default)]
struct Table {
    /// Lowest offset a change may take (one past the last TRUNCATE's).
    floor: u32,
    /// One past the highest offset taken.
    next: u32,
}

/// Offsets taken in the current transaction, by (target, key fingerprint).
#[derive(Default)]
pub struct Stamps {
    keys: HashMap<(u64, u64), u32>,
    tables: HashMap<u64, Table>,
}

impl Stamps {
    /// A new transaction: every key starts at `T` again.
    pub fn begin(&mut self) {
        if !self.tables.is_empty() {
            self.keys.clear();
            self.tables.clear();
        }
    }

    /// The stamp of a change of `key` in `table`, at commit time `time` (µs).
    pub fn change(&mut self, time: i64, table: u64, key: u64) -> i64 {
        let t = self.tables.entry(table).or_default();
        let k = self.keys.entry((table, key)).or_insert(0);
        let offset = (*k).max(t.floor);
        *k = offset + 1;
        t.next = t.next.max(offset + 1);
        time + i64::from(offset)
    }

    /// The stamp of a change that touches two keys of `table`: a row moved from `old` to
    /// `new` in place. It closes `old`'s version and opens `new`'s, so it must come after
    /// every earlier change of either key (a key moved A → B → A in one transaction
    /// opens A again after closing it).
    pub fn moved(&mut self, time: i64, table: u64, old: u64, new: u64) -> i64 {
        let t = self.tables.entry(table).or_default();
        let from_old = self.keys.get(&(table, old)).copied().unwrap_or(0);
        let from_new = self.keys.get(&(table, new)).copied().unwrap_or(0);
        let offset = from_old.max(from_new).max(t.floor);
        t.next = t.next.max(offset + 1);
        self.keys.insert((table, old), offset + 1);
        self.keys.insert((table, new), offset + 1);
        time + i64::from(offset)
    }

    /// The stamp of the new half of a row that moved by a DELETE stamped `from` and then
    /// an INSERT of `key` (a cross-partition UPDATE): the new version opens where the
    /// old one closed, unless `key` already changed later in the transaction.
    pub fn continued(&mut self, time: i64, table: u64, key: u64, from: i64) -> i64 {
        let t = self.tables.entry(table).or_default();
        let k = self.keys.entry((table, key)).or_insert(0);
        let from = u32::try_from(from - time).unwrap_or(0);
        let offset = (*k).max(t.floor).max(from);
        *k = offset + 1;
        t.next = t.next.max(offset + 1);
        time + i64::from(offset)
    }

    /// The stamp of a TRUNCATE of `table`.
    pub fn truncate(&mut self, time: i64, table: u64) -> i64 {
        let t = self.tables.entry(table).or_default();
        let offset = t.next;
        t.floor = offset + 1;
        t.next = offset + 1;
        time + i64::from(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_counts_its_own_changes() {
        let mut s = Stamps::default();
        s.begin();
        assert_eq!(s.change(100, 1, 7), 100);
        assert_eq!(s.change(100, 1, 7), 101);
        assert_eq!(s.change(100, 1, 8), 100, "another key starts at T");
        assert_eq!(s.change(100, 2, 7), 100, "another table too");
        assert_eq!(s.change(100, 1, 7), 102);
        s.begin();
        assert_eq!(s.change(200, 1, 7), 200, "a new transaction starts over");
    }

    #[test]
    fn a_moved_row_comes_after_the_changes_of_both_keys() {
        let mut s = Stamps::default();
        s.begin();
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
        s.begin();
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
        s.begin();
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
}
