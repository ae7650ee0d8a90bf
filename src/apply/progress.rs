//! What each writer has committed, per source, so a source confirms to its slot only
//! what every writer made durable.
//!
//! A source thread broadcasts a marker carrying the last commit LSN it routed; a writer
//! acknowledges it once everything queued before it is committed (at once when idle).
//! The confirmable LSN of a source is the smallest acknowledgement over all writers.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::change::SourceId;
use crate::pg::Lsn;

pub struct Progress {
    /// acked[source][writer]; grows when a reload adds a source (ids are never reused).
    acked: RwLock<Vec<Vec<AtomicU64>>>,
    writers: usize,
}

impl Progress {
    pub fn new(sources: usize, writers: usize) -> Progress {
        let p = Progress {
            acked: RwLock::new(Vec::new()),
            writers,
        };
        p.ensure(sources);
        p
    }

    /// Makes room for sources `0..n`.
    pub fn ensure(&self, n: usize) {
        let mut acked = self.acked.write();
        while acked.len() < n {
            acked.push((0..self.writers).map(|_| AtomicU64::new(0)).collect());
        }
    }

    /// A writer has committed everything of `source` up to `lsn`.
    pub fn ack(&self, source: SourceId, writer: usize, lsn: Lsn) {
        if let Some(slot) = self.acked.read().get(source).and_then(|w| w.get(writer)) {
            slot.fetch_max(lsn.0, Ordering::AcqRel);
        }
    }

    /// The LSN up to which every writer committed `source`'s changes.
    pub fn confirmable(&self, source: SourceId) -> Lsn {
        self.acked
            .read()
            .get(source)
            .and_then(|w| w.iter().map(|a| a.load(Ordering::Acquire)).min())
            .map(Lsn)
            .unwrap_or(Lsn::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmable_is_the_slowest_writer() {
        let p = Progress::new(2, 3);
        p.ack(0, 0, Lsn(10));
        p.ack(0, 1, Lsn(10));
        assert_eq!(p.confirmable(0), Lsn(0));
        p.ack(0, 2, Lsn(7));
        assert_eq!(p.confirmable(0), Lsn(7));
        p.ack(0, 2, Lsn(5)); // acks never go back
        assert_eq!(p.confirmable(0), Lsn(7));
        assert_eq!(p.confirmable(1), Lsn(0));
        assert_eq!(p.confirmable(9), Lsn(0));
        p.ensure(3);
        p.ack(2, 0, Lsn(4));
        assert_eq!(p.confirmable(2), Lsn(0));
        assert_eq!(p.confirmable(0), Lsn(7));
    }
}
