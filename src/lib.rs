//! kuvasz-streamer: change data capture from many PostgreSQL sources into one destination.
//!
//! Data flow, one module each: [`config`] → [`source`] (replication, decoding, initial
//! sync) → [`apply`] (routing, batching, SQL, commit) → progress back to the source.
//! [`mode`] says what clone, append and history targets do with each operation.
//! [`daemon`] supervises the threads; [`ownership`] shares the sources among instances; [`sequences`] is the switchover's last step;
//! [`verify`] and [`resync`] let operators check a target and have it copied again.

pub mod apply;
pub mod change;
pub mod check;
pub mod config;
pub mod daemon;
pub mod expr;
pub mod fault;
pub mod http;
pub mod log_context;
pub mod memory;
pub mod mode;
pub mod ownership;
pub mod pg;
pub mod resync;
pub mod sequences;
pub mod source;
pub mod status;
pub mod store;
pub mod verify;
