//! PostgreSQL plumbing that knows nothing of the mapping: connection strings, the
//! replication protocol, the pgoutput decoder, catalog queries and LSNs.

pub mod catalog;
pub mod conninfo;
pub mod lsn;
pub mod pgoutput;
pub mod quote;
pub mod replication;

pub use lsn::Lsn;
