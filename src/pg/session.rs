//! Destination sessions: every connection that writes target tables (writers and
//! initial copies) gets the same settings here, so copied and streamed values mean the
//! same and neither fires the destination's triggers or foreign-key checks.

use std::sync::atomic::{AtomicBool, Ordering};

use log::warn;
use postgres::Client;

use super::describe;

/// Set once the missing `session_replication_role` privilege has been reported: it is a
/// property of the role, the same for every session, so one warning says it all.
static REPLICA_ROLE_WARNED: AtomicBool = AtomicBool::new(false);

/// Text styles the daemon's values are written in; the source side uses the same.
pub const STYLES: &str = "SET DateStyle = ISO; SET IntervalStyle = postgres";

/// Sets a destination session up with the daemon's styles and, when the role may,
/// `session_replication_role = replica`, as PostgreSQL's own apply worker runs: a
/// destination built from the source's schema (foreign keys, `last_update` triggers)
/// then receives the source's values whatever order tables and writers commit in.
pub fn prepare_destination(client: &mut Client) -> Result<(), postgres::Error> {
    client.batch_execute(STYLES)?;
    if let Err(e) = client.batch_execute("SET session_replication_role = replica") {
        if !REPLICA_ROLE_WARNED.swap(true, Ordering::AcqRel) {
            warn!(
                "destination: cannot SET session_replication_role = replica ({}); triggers and \
                 foreign keys of target tables will fire on copied and streamed rows. Grant it \
                 with GRANT SET ON PARAMETER session_replication_role TO <role> (PostgreSQL \
                 15+) or run as superuser",
                describe(&e)
            );
        }
    }
    Ok(())
}
