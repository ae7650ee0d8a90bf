//! Routing changes to writers: every change of one key goes to the same writer, so per-key
//! order holds while different keys are applied in parallel.

use crossbeam_channel::{bounded, Sender};

use crate::change::{Change, SourceId, FNV_SEED};
use crate::pg::Lsn;

use super::WriterMsg;

/// The fingerprint of the key a change touches (FNV-1a over its text), computed once per
/// change: it picks the writer and, in the writer, tells whether a run holds the key.
pub fn key_fingerprint(c: &Change) -> u64 {
    c.key_hash(FNV_SEED)
}

/// The writer that owns a key: FNV-1a over the table's name, mixed with the key's
/// fingerprint. Stable across runs and Rust versions, so a replay after restart takes the
/// same paths.
pub fn writer_for(c: &Change, key: u64, writers: usize) -> usize {
    if writers <= 1 {
        return 0;
    }
    let mut h = FNV_SEED;
    for b in c
        .table
        .schema
        .bytes()
        .chain([b'.'])
        .chain(c.table.name.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Tables whose key is the whole row route by table only (DESIGN: no stable key).
    if !c.table.key.is_empty() && c.table.key.len() < c.table.columns.len() {
        h = (h ^ key).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    (h % writers as u64) as usize
}

/// A source's handle on the writer pool. Sends block when a writer's queue is full, so a
/// slow destination slows the reader and the slot keeps the WAL.
#[derive(Clone)]
pub struct Router {
    writers: Vec<Sender<WriterMsg>>,
}

/// The writer pool is gone (shutdown or a writer failed).
#[derive(Debug)]
pub struct PoolClosed;

impl Router {
    pub fn new(writers: Vec<Sender<WriterMsg>>) -> Router {
        Router { writers }
    }

    pub fn route(&self, c: Change) -> Result<(), PoolClosed> {
        let key = key_fingerprint(&c);
        let w = writer_for(&c, key, self.writers.len());
        self.writers[w]
            .send(WriterMsg::Change { change: c, key })
            .map_err(|_| PoolClosed)
    }

    /// Tells every writer that everything of `source` up to `lsn` has been routed.
    pub fn mark(&self, source: SourceId, lsn: Lsn) -> Result<(), PoolClosed> {
        for w in &self.writers {
            w.send(WriterMsg::Marker { source, lsn })
                .map_err(|_| PoolClosed)?;
        }
        Ok(())
    }

    /// Waits until every writer has committed everything routed so far. Used as a
    /// barrier before changes that touch many keys at once (TRUNCATE).
    pub fn flush_all(&self) -> Result<(), PoolClosed> {
        let (tx, rx) = bounded(self.writers.len());
        for w in &self.writers {
            w.send(WriterMsg::Flush(tx.clone()))
                .map_err(|_| PoolClosed)?;
        }
        // Only the writers hold senders now: a writer that dies unblocks us with an error.
        drop(tx);
        for _ in &self.writers {
            rx.recv().map_err(|_| PoolClosed)?;
        }
        Ok(())
    }

    /// Sends a change to writer 0 and waits for its commit (for barrier changes).
    pub fn apply_alone(&self, c: Change) -> Result<(), PoolClosed> {
        let (tx, rx) = bounded(1);
        let w = &self.writers[0];
        let key = key_fingerprint(&c);
        w.send(WriterMsg::Change { change: c, key })
            .map_err(|_| PoolClosed)?;
        w.send(WriterMsg::Flush(tx)).map_err(|_| PoolClosed)?;
        rx.recv().map_err(|_| PoolClosed)
    }

    pub fn len(&self) -> usize {
        self.writers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::fixtures::{insert, table};
    use crate::change::Value;

    #[test]
    fn same_key_same_writer_and_keys_spread() {
        let t = table();
        let mk = |id: u32, v: &str| insert(&t, &id.to_string(), Value::Text(v));
        let w = |c: &Change, n| writer_for(c, key_fingerprint(c), n);
        assert_eq!(w(&mk(5, "a"), 4), w(&mk(5, "b"), 4));
        for n in [2, 3, 4] {
            let mut seen = [0usize; 4];
            for i in 0..1000 {
                seen[w(&mk(i, "x"), n)] += 1;
            }
            assert!(
                seen[..n].iter().all(|&k| k > 600 / n),
                "{n} writers: {seen:?}"
            );
        }
        assert_eq!(w(&mk(1, "x"), 1), 0);
    }
}
