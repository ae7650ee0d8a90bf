//! PostgreSQL plumbing that knows nothing of the mapping: connection strings, the
//! replication protocol, the pgoutput decoder, catalog queries and LSNs.

pub mod catalog;
pub mod connect;
pub mod conninfo;
pub mod encoding;
pub mod lsn;
pub mod pgoutput;
pub mod pool;
pub mod quote;
pub mod replication;
pub mod session;
pub mod timestamp;
pub mod tls;

pub use lsn::Lsn;

/// A `postgres::Error` with the server's code, message, detail and hint: its Display
/// says only "db error", which tells an operator nothing.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                m.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        // Display says only "error connecting to server" and the like; the reason
        // (refused, timed out, a certificate check) is in the source chain.
        None => {
            let mut m = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                m.push_str(&format!(": {c}"));
                cause = c.source();
            }
            conninfo::redact_url(&m)
        }
    }
}
