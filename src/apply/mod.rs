//! The writer pool: routing, batching, SQL per mode, commits, and progress back to the
//! sources. Each writer is an OS thread with its own destination connection.

pub mod batch;
pub mod progress;
pub mod route;
pub mod sql;
pub mod writer;

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
    /// Everything of `source` up to `lsn` has been queued before this marker.
    Marker { source: SourceId, lsn: Lsn },
    /// Commit now and answer: a barrier for the sender.
    Flush(Sender<()>),
    /// Commit what is applied and stop.
    Stop,
}

/// Queue length per writer: enough to keep a writer busy during a commit, small enough
/// that memory stays flat under any backlog.
pub const QUEUE_DEPTH: usize = 20_000;
