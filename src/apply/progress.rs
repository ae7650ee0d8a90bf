//! What each writer has committed, per source, so a source confirms to its slot only
//! what every writer made durable.
//!
//! A source thread broadcasts a marker carrying the last commit LSN it routed; a writer
//! acknowledges it once everything queued before it is committed (at once when idle).
//! The confirmable LSN of a source is the smallest acknowledgement over all writers.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::change::SourceId;
use crate::pg::Lsn;

pub struct Progress {
    /// acked[source][writer]
    acked: Vec<Vec<AtomicU64>>,
}

impl Progress {
    pub fn new(sources: usize, writers: usize) -> Progress {
        Progress {
            acked: (0..sources)
                .map(|_| (0..writers).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    /// A writer has committed everything of `source` up to `lsn`.
    pub fn ack(&self, source: SourceId, writer: usize, lsn: Lsn) {
        if let Some(slot) = self.acked.get(source).and_then(|w| w.get(writer)) {
            slot.fetch_max(lsn.0, Ordering::AcqRel);
        }
    }

    /// The LSN up to which every writer committed `source`'s changes.
    pub fn confirmable(&self, source: SourceId) -> Lsn {
        self.acked
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
    }
}
