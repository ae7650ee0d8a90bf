//! Destination sessions: every connection that writes target tables (writers and
//! initial copies) gets the same settings here, so copied and streamed values mean the
//! same and neither fires the destination's triggers or foreign-key checks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use log::warn;
use postgres::Client;

use super::conninfo::TcpOptions;
use super::describe;
use super::quote::literal;

/// How long a destination session may sit idle inside a transaction: none of the
/// daemon's does for long (an initial copy's waits for its source included), so one
/// that does has lost its client.
const IDLE_IN_TRANSACTION: &str = "1h";

/// The settings that make a destination backend whose client vanished (a partition: no
/// FIN, no RST) die and release its row locks, instead of blocking the writers that
/// reconnect after it: the server's keepalives and user timeout mirror the client's,
/// `client_connection_check_interval` (14+) checks the client while a query runs, and an
/// idle transaction ends. Settings the server lacks are skipped.
pub fn orphan_settings(tcp: &TcpOptions) -> String {
    let mut values: Vec<(&str, String)> = tcp.server_settings();
    values.push(("client_connection_check_interval", "10000".to_string()));
    values.push((
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION.to_string(),
    ));
    let rows: Vec<String> = values
        .iter()
        .map(|(k, v)| format!("({}, {})", literal(k), literal(v)))
        .collect();
    format!(
        "SELECT set_config(s.name, v.value, false) FROM (VALUES {}) AS v(name, value) \
         JOIN pg_settings s ON s.name = v.name",
        rows.join(", ")
    )
}

/// Set once the missing `session_replication_role` privilege has been reported: it is a
/// property of the role, the same for every session, so one warning says it all.
static REPLICA_ROLE_WARNED: AtomicBool = AtomicBool::new(false);

/// The instance every destination session of this process is marked with (see
/// [`mark_instance`]).
static INSTANCE: OnceLock<String> = OnceLock::new();

/// The first key of the shared advisory lock that marks a destination session as one of
/// an instance's (the second is the instance's hash); distinct from the sources' locks,
/// whose first key is the deployment's namespace.
pub const INSTANCE_LOCK: &str = "kuvasz-streamer instance";

/// Marks every destination session this process opens from now on as instance
/// `instance`'s, with a shared advisory lock: when the instance falls silent (paused,
/// cut off), the others end all its sessions through it, not only its coordination
/// session, so a writer or a copy frozen inside its transaction cannot hold the
/// target's locks against the new owner for as long as the server keeps it. Once per
/// process; later calls are ignored.
pub fn mark_instance(instance: &str) {
    let _ = INSTANCE.set(instance.to_string());
}

/// Text styles the daemon's values are written in; the source side uses the same.
pub const STYLES: &str = "SET DateStyle = ISO; SET IntervalStyle = postgres";

/// Sets a destination session up with the daemon's styles and, when the role may,
/// `session_replication_role = replica`, as PostgreSQL's own apply worker runs: a
/// destination built from the source's schema (foreign keys, `last_update` triggers)
/// then receives the source's values whatever order tables and writers commit in.
pub fn prepare_destination(client: &mut Client, tcp: &TcpOptions) -> Result<(), postgres::Error> {
    client.batch_execute(STYLES)?;
    if let Some(instance) = INSTANCE.get() {
        client.execute(
            "SELECT pg_advisory_lock_shared(hashtext($1), hashtext($2))",
            &[&INSTANCE_LOCK, instance],
        )?;
    }
    // Rows come back (set_config's values): simple_query, not batch_execute.
    client.simple_query(&orphan_settings(tcp))?;
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

/// Whether a session still answers in step after a failed COPY. One refused before the
/// server read the client's first Sync (a privilege, a column, a statement trigger) is
/// answered twice, and the client library may take the second answer for the next
/// statement's. So the probe counts as in step only with its own answer: its row, or,
/// inside the failed transaction, the refusal of a statement there (25P02). Anything
/// else (no row, the COPY's own error arriving late, a closed connection) is out of
/// step, and the session must be replaced before any other statement.
pub fn in_step(client: &mut impl postgres::GenericClient) -> bool {
    const PROBE: &str = "kvsz in step";
    match client.simple_query(&format!("SELECT '{PROBE}'")) {
        Ok(msgs) => msgs
            .iter()
            .any(|m| matches!(m, postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(PROBE))),
        Err(e) => e.code() == Some(&postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
    }
}
