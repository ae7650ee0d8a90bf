//! The writer pool: routing, batching, SQL per mode, commits, and progress back to the
//! sources. Each writer is an OS thread with its own destination connection.

pub mod batch;
pub mod history;
pub mod progress;
pub mod route;
pub mod sql;
pub mod watch;
pub mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::Sender;

use crate::change::{Change, SourceId};
use crate::pg::Lsn;

pub use progress::Progress;
pub use route::Router;
pub use writer::{Writer, WriterError, WriterSettings};

/// What a writer's queue carries.
pub enum WriterMsg {
    /// A change and its key fingerprint ([`Change::key_hash`]), computed once when routed.
    Change { change: Change, key: u64 },
    /// A change the source refused (a failing filter or set expression): applied as a
    /// rejected row, after everything queued before it.
    Rejected { change: Change, message: String },
    /// Everything of `source` up to `lsn` has been queued before this marker.
    Marker { source: SourceId, lsn: Lsn },
    /// Commit now and answer: a barrier for the sender.
    Flush(Sender<()>),
    /// `source` starts (again): what it sends from now on is applied, even after one of
    /// its rows was rejected, and checked against owner epoch `epoch` (see
    /// [`crate::store::fence_sql`]; None: not checked).
    Resume {
        source: SourceId,
        epoch: Option<i64>,
    },
    /// Commit what is applied and stop.
    Stop,
}

/// Queue length per writer: enough to keep a writer busy during a commit, small enough
/// that memory stays flat under any backlog.
pub const QUEUE_DEPTH: usize = 20_000;
/// Bytes of row data queued per writer at most (a queue of rows of megabytes is bounded
/// by this, not by its length).
pub const QUEUE_BYTES: usize = 16 << 20;

/// Bytes of row data queued for each writer: the routers add, the writers take away.
pub struct Inflight {
    bytes: Vec<AtomicUsize>,
}

impl Inflight {
    pub fn new(writers: usize) -> Inflight {
        Inflight {
            bytes: (0..writers).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Whether `n` more bytes fit in `writer`'s queue (an empty queue takes any row).
    pub fn has_room(&self, writer: usize, n: usize) -> bool {
        self.bytes.get(writer).is_none_or(|b| {
            let queued = b.load(Ordering::Relaxed);
            queued == 0 || queued + n <= QUEUE_BYTES
        })
    }

    pub fn queued(&self, writer: usize, n: usize) {
        if let Some(b) = self.bytes.get(writer) {
            b.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The writer took `n` bytes off its queue.
    pub fn taken(&self, writer: usize, n: usize) {
        if let Some(b) = self.bytes.get(writer) {
            let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        }
    }
}
