//! What each writer has committed, per source, so a source confirms to its slot only
//! what every writer made durable.
//!
//! A source thread broadcasts a marker carrying the last commit LSN it routed; a writer
//! acknowledges it once everything queued before it is committed (at once when idle).
//! The confirmable LSN of a source is the smallest acknowledgement over all writers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::change::SourceId;
use crate::pg::Lsn;

pub struct Progress {
    /// acked[source][writer]; grows when a reload adds a source (ids are never reused).
    acked: RwLock<Vec<Vec<AtomicU64>>>,
    /// held[source]: a writer refused one of its changes (`on_error = stop`), until the
    /// source starts again. Its stream then routes nothing more: above all no change
    /// applied alone (a TRUNCATE, a move), which would land before the held one.
    held: RwLock<Vec<AtomicBool>>,
    writers: usize,
}

impl Progress {
    pub fn new(sources: usize, writers: usize) -> Progress {
        let p = Progress {
            acked: RwLock::new(Vec::new()),
            held: RwLock::new(Vec::new()),
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
        let mut held = self.held.write();
        while held.len() < n {
            held.push(AtomicBool::new(false));
        }
    }

    /// A writer refused a change of `source` and holds it.
    pub fn hold(&self, source: SourceId) {
        if let Some(h) = self.held.read().get(source) {
            h.store(true, Ordering::Release);
        }
    }

    /// `source` starts again (its replay retries the held change).
    pub fn resume(&self, source: SourceId) {
        if let Some(h) = self.held.read().get(source) {
            h.store(false, Ordering::Release);
        }
    }

    pub fn is_held(&self, source: SourceId) -> bool {
        self.held
            .read()
            .get(source)
            .is_some_and(|h| h.load(Ordering::Acquire))
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
        p.hold(2);
        assert!(p.is_held(2) && !p.is_held(0) && !p.is_held(9));
        p.resume(2);
        assert!(!p.is_held(2));
    }
}
