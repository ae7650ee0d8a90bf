//! Routing changes to writers: every change of one key goes to the same writer, so per-key
//! order holds while different keys are applied in parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError,
};

use crate::change::{Change, SourceId, FNV_SEED};
use crate::pg::Lsn;

use super::{Inflight, WriterMsg};

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
    // Tables whose key is the whole row route by table only (DESIGN: no stable key), and
    // so do targets where rows of different keys can conflict (`TargetTable::serial`)
    // and those whose keys the text cannot tell apart (`TargetTable::loose_key`: the
    // halves of a key change from 'Abc' to 'abc' in citext touch one row).
    let t = &c.table;
    if !t.serial && !t.loose_key && !t.key.is_empty() && t.key.len() < t.columns.len() {
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
    inflight: Arc<Inflight>,
}

/// The writer pool is gone (shutdown or a writer failed).
#[derive(Debug)]
pub struct PoolClosed;

/// Why a blocking call of the router gave up: the pool closed, or the caller's idle hook
/// failed.
#[derive(Debug)]
pub enum Wait<E> {
    Closed,
    Idle(E),
}

/// What [`Router::try_route`] did with a change.
pub enum Routed {
    Queued,
    /// The writer's queue is full: finish with [`Router::finish_route`].
    Full(Pending),
    Closed,
}

/// A change whose writer's queue was full: finish it with [`Router::finish_route`].
pub struct Pending {
    writer: usize,
    msg: WriterMsg,
    bytes: usize,
}

/// How often a blocked router call runs the caller's idle hook. A source blocked behind a
/// full queue or a barrier still owes its walsender a status message before
/// `wal_sender_timeout`, or the server drops the connection.
pub const IDLE_EVERY: Duration = Duration::from_secs(1);

/// Sends `msg`, running `idle` every [`IDLE_EVERY`] while the queue is full.
fn send<E>(
    tx: &Sender<WriterMsg>,
    mut msg: WriterMsg,
    idle: &mut dyn FnMut() -> Result<(), E>,
) -> Result<(), Wait<E>> {
    loop {
        match tx.send_timeout(msg, IDLE_EVERY) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Timeout(m)) => {
                msg = m;
                idle().map_err(Wait::Idle)?;
            }
            Err(SendTimeoutError::Disconnected(_)) => return Err(Wait::Closed),
        }
    }
}

/// Waits for `n` answers on `rx`, running `idle` every [`IDLE_EVERY`] meanwhile.
fn wait_answers<E>(
    rx: &Receiver<()>,
    n: usize,
    idle: &mut dyn FnMut() -> Result<(), E>,
) -> Result<(), Wait<E>> {
    let mut answered = 0;
    while answered < n {
        match rx.recv_timeout(IDLE_EVERY) {
            Ok(()) => answered += 1,
            Err(RecvTimeoutError::Timeout) => idle().map_err(Wait::Idle)?,
            Err(RecvTimeoutError::Disconnected) => return Err(Wait::Closed),
        }
    }
    Ok(())
}

impl Router {
    pub fn new(writers: Vec<Sender<WriterMsg>>, inflight: Arc<Inflight>) -> Router {
        Router { writers, inflight }
    }

    /// Queues a change for its writer without blocking (the hot path); a full queue
    /// hands the change back as [`Routed::Full`].
    pub fn try_route(&self, c: Change) -> Routed {
        let key = key_fingerprint(&c);
        let writer = writer_for(&c, key, self.writers.len());
        let bytes = c.byte_len();
        self.try_queue(writer, bytes, WriterMsg::Change { change: c, key })
    }

    /// Hands a change the source could not map (its expression failed) to the writer
    /// of its key, which reports it in order with that key's other changes, as the
    /// rejected row it is (SPEC §4).
    pub fn try_reject(&self, c: Change, message: String) -> Routed {
        let key = key_fingerprint(&c);
        let writer = writer_for(&c, key, self.writers.len());
        let bytes = c.byte_len();
        self.try_queue(writer, bytes, WriterMsg::Rejected { change: c, message })
    }

    fn try_queue(&self, writer: usize, bytes: usize, msg: WriterMsg) -> Routed {
        if !self.inflight.has_room(writer, bytes) {
            return Routed::Full(Pending { writer, msg, bytes });
        }
        self.inflight.queued(writer, bytes);
        match self.writers[writer].try_send(msg) {
            Ok(()) => Routed::Queued,
            Err(TrySendError::Full(msg)) => {
                self.inflight.taken(writer, bytes);
                Routed::Full(Pending { writer, msg, bytes })
            }
            Err(TrySendError::Disconnected(_)) => Routed::Closed,
        }
    }

    /// Queues a change that found its writer's queue full, waiting for room.
    pub fn finish_route<E>(
        &self,
        p: Pending,
        idle: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), Wait<E>> {
        // Room by bytes first: the writer frees it as it takes changes off the queue.
        let mut since_idle = Instant::now();
        while !self.inflight.has_room(p.writer, p.bytes) {
            if self.writers[p.writer].is_empty() {
                // Nothing queued any more (a writer that restarted lost its count).
                self.inflight.taken(p.writer, usize::MAX);
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            if since_idle.elapsed() >= IDLE_EVERY {
                idle().map_err(Wait::Idle)?;
                since_idle = Instant::now();
            }
        }
        self.inflight.queued(p.writer, p.bytes);
        send(&self.writers[p.writer], p.msg, idle)
    }

    /// Tells every writer that everything of `source` up to `lsn` has been routed.
    pub fn mark<E>(
        &self,
        source: SourceId,
        lsn: Lsn,
        idle: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), Wait<E>> {
        for w in &self.writers {
            send(w, WriterMsg::Marker { source, lsn }, idle)?;
        }
        Ok(())
    }

    /// Waits until every writer has committed everything routed so far. Used as a
    /// barrier before changes that touch many keys at once (TRUNCATE).
    pub fn flush_all<E>(&self, idle: &mut dyn FnMut() -> Result<(), E>) -> Result<(), Wait<E>> {
        let (tx, rx) = bounded(self.writers.len());
        for w in &self.writers {
            send(w, WriterMsg::Flush(tx.clone()), idle)?;
        }
        // Only the writers hold senders now: a writer that dies unblocks us with an error.
        drop(tx);
        wait_answers(&rx, self.writers.len(), idle)
    }

    /// Tells every writer that `source` starts, owned with `epoch`: a source held after
    /// a rejected row, or fenced off, is applied again from here.
    pub fn resume<E>(
        &self,
        source: SourceId,
        epoch: Option<i64>,
        idle: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), Wait<E>> {
        for w in &self.writers {
            send(w, WriterMsg::Resume { source, epoch }, idle)?;
        }
        Ok(())
    }

    /// Sends a change to writer 0 and waits for its commit (for barrier changes).
    pub fn apply_alone<E>(
        &self,
        c: Change,
        idle: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), Wait<E>> {
        let (tx, rx) = bounded(1);
        let w = &self.writers[0];
        let key = key_fingerprint(&c);
        self.inflight.queued(0, c.byte_len());
        send(w, WriterMsg::Change { change: c, key }, idle)?;
        send(w, WriterMsg::Flush(tx), idle)?;
        wait_answers(&rx, 1, idle)
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

    /// Targets whose rows of different keys can conflict (other unique constraints) or
    /// whose keys the text cannot tell apart (citext 'Abc' = 'abc').
    #[test]
    fn serial_and_loose_key_targets_keep_one_writer() {
        for loose in [false, true] {
            let mut one = (*table()).clone();
            one.serial = !loose;
            one.loose_key = loose;
            let t = std::sync::Arc::new(one);
            let first = insert(&t, "Abc", Value::Text("x"));
            let w0 = writer_for(&first, key_fingerprint(&first), 4);
            for i in 1..100 {
                let c = insert(&t, &i.to_string(), Value::Text("x"));
                assert_eq!(writer_for(&c, key_fingerprint(&c), 4), w0, "key {i}");
            }
        }
    }
}
