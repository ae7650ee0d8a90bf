//! One thread per source URL: prerequisites, publication and slot lifecycle, initial
//! sync, and the streaming loop that turns decoded rows into routed Changes.

pub mod careful;
pub mod mapping;
pub mod retire;
pub mod setup;
pub mod spool;
pub mod stamps;
pub mod stream;
pub mod sync;

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::apply::{Progress, Router};
use crate::change::{Sid, SourceId};
use crate::config::TableMap;
use crate::pg::conninfo::ConnInfo;
use crate::pg::pgoutput::DecodeError;
use crate::pg::replication::PgError;
use crate::pg::{describe, Lsn};

use crate::fault::{self, Class, Side};
use mapping::MappingError;
use sync::CopyError;

/// Destination table that records, per slot and source table, whether the initial copy
/// is done: written in the same transaction as the copy, so a crash mid-copy is redone.
pub use crate::store::SYNC_STATE_TABLE;

/// One source URL as the map describes it.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub id: SourceId,
    /// The map's `database`: the logical name of a family of same-schema databases.
    pub database: String,
    pub sid: Sid,
    /// Name of both the slot and the publication.
    pub slot: String,
    pub conn: ConnInfo,
    pub tables: Vec<TableMap>,
    /// How many URLs the family has: several URLs into one target need a `sid` column.
    pub family_size: usize,
}

impl SourceSpec {
    /// Where its sessions go, named `app_name`.
    pub fn endpoint(&self, app_name: &str) -> crate::pg::connect::Endpoint {
        crate::pg::connect::Endpoint::new(self.conn.clone(), app_name)
    }

    /// `database/sid`, the name used in every message about this source.
    pub fn label(&self) -> String {
        format!("{}/{}", self.database, self.sid)
    }
}

/// How the supervisor asks a source thread to stop.
#[derive(Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    const RUN: u8 = 0;
    const GRACEFUL: u8 = 1;
    const ABORT: u8 = 2;

    /// Stop reading, wait for the writers to commit what was routed, confirm it, exit.
    pub fn graceful(&self) {
        let _ = self.0.compare_exchange(
            Self::RUN,
            Self::GRACEFUL,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
    /// Exit at once (the writer pool is gone); what was confirmed stays confirmed.
    pub fn abort(&self) {
        self.0.store(Self::ABORT, Ordering::Release);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire) != Self::RUN
    }
    pub fn is_abort(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::ABORT
    }
}

/// What a source thread shares with the rest of the daemon.
#[derive(Clone)]
pub struct SourceEnv {
    /// The destination sessions all sources share (set-ups and short queries).
    pub sessions: Arc<crate::pg::pool::DestSessions>,
    pub dest_schema: String,
    pub app_name: String,
    pub router: Router,
    pub progress: Arc<Progress>,
    pub stop: Arc<StopFlag>,
    pub sync_rate: f64,
    pub sync_burst: u64,
    /// See [`crate::config::AppConfig::wal_receiver_timeout`].
    pub wal_receiver_timeout: Duration,
    /// See [`crate::config::AppConfig::on_slot_lost`].
    pub on_slot_lost: crate::config::OnSlotLost,
    /// What a rejected row of an initial copy does (a failing expression).
    pub on_error: crate::apply::writer::RejectPolicy,
    /// What this source reports over HTTP.
    pub status: Arc<crate::status::SourceStatus>,
    /// Where the time from commit to visibility goes (shared by every source).
    pub latency: Arc<crate::status::Latency>,
    /// The owner epoch this instance took the source with (see [`crate::ownership`]):
    /// every destination transaction applying its changes checks it is still current.
    pub epoch: Option<i64>,
}

#[derive(Debug)]
pub enum SourceError {
    /// Connecting or talking to the source or destination over SQL.
    Sql {
        source: String,
        context: String,
        side: Side,
        error: postgres::Error,
    },
    Replication {
        source: String,
        context: String,
        error: Box<PgError>,
    },
    /// The server lacks something the daemon needs; the message says what to change.
    Prerequisite { source: String, message: String },
    /// The slot of a source this instance owns is still streamed by a previous owner's
    /// walsender, whose client replied `silent` ago: ended once silent long enough.
    SlotBusy {
        source: String,
        slot: String,
        pid: i32,
        silent: Duration,
    },
    Sync {
        source: String,
        table: String,
        error: CopyError,
    },
    Decode {
        source: String,
        lsn: Lsn,
        error: DecodeError,
    },
    Mapping {
        source: String,
        table: String,
        error: MappingError,
    },
    /// A streamed transaction could not be kept until its commit.
    Spool {
        source: String,
        xid: u32,
        error: spool::SpoolError,
    },
    /// The writer pool went away under us.
    PoolClosed { source: String },
    /// Nothing came from the source's server for `after` (`app.wal_receiver_timeout`),
    /// not even an answer to a keepalive asking for one: the connection is taken for
    /// dead (a partition drops packets without a FIN or RST).
    Silent { source: String, after: Duration },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Sql {
                source,
                context,
                error,
                ..
            } => write!(f, "source {source}: {context}: {}", describe(error)),
            SourceError::Replication {
                source,
                context,
                error,
            } => write!(f, "source {source}: {context}: {error}"),
            SourceError::Prerequisite { source, message } => {
                write!(f, "source {source}: {message}")
            }
            SourceError::Sync {
                source,
                table,
                error,
            } => write!(f, "source {source}: initial sync of {table}: {error}"),
            SourceError::Decode { source, lsn, error } => {
                write!(
                    f,
                    "source {source}: cannot decode change at LSN {lsn}: {error}"
                )
            }
            SourceError::Mapping {
                source,
                table,
                error,
            } => write!(f, "source {source}: table {table}: {error}"),
            SourceError::Spool { source, xid, error } => {
                write!(f, "source {source}: streamed transaction {xid}: {error}")
            }
            SourceError::PoolClosed { source } => {
                write!(f, "source {source}: writer pool stopped")
            }
            SourceError::SlotBusy {
                source,
                slot,
                pid,
                silent,
            } => write!(
                f,
                "source {source}: replication slot {slot} is still streamed by pid {pid}, a \
                 previous owner's (its client last replied {:.0?} ago); it is ended once silent \
                 for 20 s, or by the source's wal_sender_timeout",
                silent
            ),
            SourceError::Silent { source, after } => write!(
                f,
                "source {source}: no message from the server for {:.0?} (app.wal_receiver_timeout), \
                 not even an answer to a keepalive: the connection is taken for dead; reconnecting",
                after
            ),
        }
    }
}

impl std::error::Error for SourceError {}

impl SourceError {
    /// What kind of failure this is (see [`crate::fault`]).
    pub fn class(&self) -> Class {
        match self {
            SourceError::Sql { side, error, .. } => fault::classify_sql(error, *side),
            SourceError::Replication { error, .. } => replication_class(error),
            SourceError::Prerequisite { .. } => Class::Prerequisite,
            SourceError::Mapping { .. } => Class::Configuration,
            SourceError::Sync { error, .. } => error.class(),
            // The walsender's bytes arrived intact (TCP, TLS): a message that cannot be
            // decoded is ours to fix, and retrying at once will not help.
            SourceError::Decode { .. } => Class::Bug,
            SourceError::Spool { .. }
            | SourceError::PoolClosed { .. }
            | SourceError::Silent { .. }
            | SourceError::SlotBusy { .. } => Class::Transient,
        }
    }
}

/// The class of a walsender connection's failure.
fn replication_class(e: &PgError) -> Class {
    match e {
        PgError::Server { code, .. } => fault::classify_code(code, Side::Source),
        PgError::Auth(_) | PgError::Tls(_) => Class::Configuration,
        PgError::Io(_) | PgError::Protocol(_) | PgError::Timeout => Class::Transient,
    }
}

/// Runs one source until stopped or failed: set-up (with initial sync), then streaming.
pub fn run(spec: &SourceSpec, env: &SourceEnv) -> Result<(), SourceError> {
    // Before anything this run routes: what an earlier run left queued after a rejected
    // row is dropped by its writer up to here, and applied from here.
    env.router
        .resume(spec.id, env.epoch, &mut || {
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|_| SourceError::PoolClosed {
            source: spec.label(),
        })?;
    loop {
        // Changes an earlier run (or stream) of this source left queued are committed
        // before a re-copy could race them. No replication connection to keep alive yet:
        // nothing to do while waiting.
        env.router
            .flush_all(&mut || Ok::<(), std::convert::Infallible>(()))
            .map_err(|_| SourceError::PoolClosed {
                source: spec.label(),
            })?;
        // Whatever held this source is behind us: its replay retries the held change.
        env.progress.resume(spec.id);
        let start = setup::prepare(spec, env)?;
        if env.stop.is_set() {
            return Ok(());
        }
        if stream::stream(spec, env, start)? == stream::Ended::Stopped {
            return Ok(());
        }
    }
}
