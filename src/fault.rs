//! The one place failures are classified, and the supervisor's policy for each class.
//!
//! Every failure that reaches the supervisor carries a [`Class`], decided here from the
//! server's SQLSTATE (typed, [`SqlState`]) or from the kind of I/O failure, for the
//! walsender connection and the SQL sessions alike. What the supervisor then does is
//! [`Class::policy`]: one row per class, so that a wrong password is not retried like a
//! dropped packet, and one table's problem holds the sources that write it, never the
//! writer pool that every source shares.

use std::time::Duration;

use postgres::error::SqlState;

/// What kind of failure this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A source server unreachable, a connection lost or reset, a query cancelled, a
    /// deadlock: it passes by itself.
    Transient,
    /// The destination cannot take changes now: down, unreachable, out of disk space or
    /// connections. Nothing is the rows' fault; everything waits for it.
    DestinationUnavailable,
    /// The destination (or an expression) refused one row, and `on_error = stop`.
    RejectedRow,
    /// A target table cannot take what the daemon writes into it: a column or privilege
    /// missing, a type its statements cannot handle. The sources writing it are held.
    TableDefinition,
    /// A server lacks a setting, privilege or object the daemon needs, or something
    /// else holds what the daemon needs (a slot active for another process).
    Prerequisite,
    /// The configuration or map is wrong for the servers: authentication refused, a
    /// database or target that does not exist.
    Configuration,
    /// The daemon did something it should not (a statement the server cannot parse, a
    /// change it cannot decode): retried slowly, and worth a bug report.
    Bug,
    /// Another instance of the deployment took the source over: this one's transaction
    /// was fenced off (see [`crate::ownership`]). Nothing to repair; the source is
    /// streamed by its new owner.
    Fenced,
}

/// Where a failure happened: the same SQLSTATE means different things on each side
/// (a lost connection to the destination stops every source; to a source, one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// What a failure stops until it is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The writer pool, and with it every source.
    Pool,
    /// One source (its slot is not read meanwhile; the others stream on).
    Source,
}

/// What the supervisor does about one class of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The first wait before trying again, and the most it grows to (doubling).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How `/readyz` and the status page introduce the failure.
    pub reason: &'static str,
}

impl Class {
    /// The name in `/api/status` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Transient => "transient",
            Class::DestinationUnavailable => "destination_unavailable",
            Class::RejectedRow => "rejected_row",
            Class::TableDefinition => "table_definition",
            Class::Prerequisite => "prerequisite",
            Class::Configuration => "configuration",
            Class::Bug => "bug",
            Class::Fenced => "fenced",
        }
    }

    pub const ALL: [Class; 8] = [
        Class::Transient,
        Class::DestinationUnavailable,
        Class::RejectedRow,
        Class::TableDefinition,
        Class::Prerequisite,
        Class::Configuration,
        Class::Bug,
        Class::Fenced,
    ];

    /// The policy table. Every class is retried (an operator's fix is picked up without
    /// a restart); what differs is how fast, and what the reports say. A failure that
    /// will not pass by itself backs off further, so its log stays readable.
    pub fn policy(self) -> Policy {
        let s = Duration::from_secs;
        let (min, max, reason) = match self {
            Class::Transient => (s(1), s(60), "retrying after a transient failure"),
            Class::DestinationUnavailable => (s(1), s(30), "waiting for the destination"),
            Class::RejectedRow => (s(1), s(60), "held by a rejected row"),
            Class::TableDefinition => (s(1), s(120), "held by a target table's definition"),
            Class::Prerequisite => (s(1), s(120), "waiting for a prerequisite"),
            Class::Configuration => (s(5), s(300), "stopped by the configuration"),
            Class::Bug => (s(5), s(300), "stopped by an internal error"),
            Class::Fenced => (s(1), s(5), "taken over by another instance"),
        };
        Policy {
            backoff_min: min,
            backoff_max: max,
            reason,
        }
    }
}

/// The class of a SQL session's error on `side`.
pub fn classify_sql(e: &postgres::Error, side: Side) -> Class {
    match e.as_db_error() {
        Some(db) => classify_state(db.code(), side),
        // No server error: the connection failed, closed or timed out.
        None => unreachable_on(side),
    }
}

/// The class of a server error with SQLSTATE `code` on `side` (the walsender's errors
/// arrive as text).
pub fn classify_code(code: &str, side: Side) -> Class {
    classify_state(&SqlState::from_code(code), side)
}

/// Whether a destination transaction was fenced off: its instance no longer owns a
/// source it applied (see [`crate::store::fence_sql`]).
pub fn is_fenced(e: &postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == crate::store::FENCED_SQLSTATE)
}

/// Whether a destination statement's error concerns what the statement touched, a row
/// or its target table, rather than the session or the server: its class when it does.
/// The writer isolates such a failure to the changes at fault; any other stops the pool.
pub fn statement_fault(e: &postgres::Error) -> Option<Class> {
    let db = e.as_db_error()?;
    match classify_state(db.code(), Side::Destination) {
        c @ (Class::RejectedRow | Class::TableDefinition) => Some(c),
        // A statement the server cannot parse or type is built from one table's
        // definition: that table's problem (and ours), not every source's.
        Class::Bug if db.code().code().starts_with("42") => Some(Class::Bug),
        _ => None,
    }
}

fn unreachable_on(side: Side) -> Class {
    match side {
        Side::Source => Class::Transient,
        Side::Destination => Class::DestinationUnavailable,
    }
}

/// The table of SQLSTATEs. Exact codes first, then classes (the first two characters).
fn classify_state(state: &SqlState, side: Side) -> Class {
    // Exact codes whose meaning differs from their class's.
    if state.code() == crate::store::FENCED_SQLSTATE {
        return Class::Fenced;
    }
    if *state == SqlState::OBJECT_IN_USE {
        // "replication slot … is active for PID …": someone else streams it.
        return Class::Prerequisite;
    }
    if *state == SqlState::INSUFFICIENT_PRIVILEGE {
        return match side {
            Side::Source => Class::Prerequisite,
            Side::Destination => Class::TableDefinition,
        };
    }
    if [
        SqlState::SYNTAX_ERROR,
        SqlState::INDETERMINATE_DATATYPE,
        SqlState::AMBIGUOUS_COLUMN,
        SqlState::AMBIGUOUS_PARAMETER,
    ]
    .contains(state)
    {
        return Class::Bug;
    }
    if *state == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE {
        // A target without a replica identity on a destination that publishes its
        // updates; on a source, wal_level or an invalidated slot.
        return match side {
            Side::Source => Class::Prerequisite,
            Side::Destination => Class::TableDefinition,
        };
    }
    if *state == SqlState::READ_ONLY_SQL_TRANSACTION {
        // A standby, or a primary not yet promoted after a failover: it passes.
        return unreachable_on(side);
    }
    if [
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
    ]
    .contains(state)
    {
        return Class::Configuration;
    }
    match &state.code()[..2.min(state.code().len())] {
        // Data exceptions, integrity constraints, cardinality, a trigger's RAISE, limits
        // one row exceeds (an index entry too big), a CASE without ELSE, a triggered
        // action, a view's check option: the row's own fault.
        "22" | "23" | "21" | "P0" | "54" | "20" | "27" | "44" | "09" => Class::RejectedRow,
        // A target's trigger or function that cannot run (no RETURN, an external
        // routine's error): the table's.
        "2F" | "38" | "39" => match side {
            Side::Source => Class::Prerequisite,
            Side::Destination => Class::TableDefinition,
        },
        // Connection exceptions; operator intervention (shutdown, cannot connect now);
        // transaction rollback (serialization, deadlock); lock not available.
        "08" | "57" | "40" | "55" => match side {
            Side::Source => Class::Transient,
            Side::Destination if state.code().starts_with("57") => Class::DestinationUnavailable,
            Side::Destination if state.code().starts_with("08") => Class::DestinationUnavailable,
            Side::Destination => Class::Transient,
        },
        // Insufficient resources (disk full, out of memory, too many connections) and
        // system errors (I/O): the server's state, never a row's.
        "53" | "58" => unreachable_on(side),
        // Syntax or access rule violations: an object, column, function or operator the
        // statement needs is missing. On a target, its definition; on a source, what the
        // daemon needs of it.
        "42" | "0A" => match side {
            Side::Source => Class::Prerequisite,
            Side::Destination => Class::TableDefinition,
        },
        "28" => Class::Configuration,
        "3D" | "3F" => Class::Configuration,
        // Invalid transaction state, internal errors: ours or the server's bug.
        "25" | "XX" | "26" | "34" => Class::Bug,
        // Any other error a server answered a statement with: on a source, retried; on
        // the destination, about what the statement touched, so its sources are held,
        // never the pool, and nothing is parked.
        _ => match side {
            Side::Source => Class::Transient,
            Side::Destination => Class::TableDefinition,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(code: &str, side: Side) -> Class {
        classify_code(code, side)
    }

    #[test]
    fn row_errors_are_the_rows() {
        for code in [
            "22P02", "23505", "23502", "21000", "P0001", "P0002", "54000",
        ] {
            assert_eq!(c(code, Side::Destination), Class::RejectedRow, "{code}");
        }
    }

    #[test]
    fn a_full_disk_is_never_a_row() {
        for code in ["53100", "53200", "53300", "58030"] {
            assert_eq!(
                c(code, Side::Destination),
                Class::DestinationUnavailable,
                "{code}"
            );
            assert_eq!(c(code, Side::Source), Class::Transient, "{code}");
        }
    }

    #[test]
    fn a_targets_definition_is_the_tables() {
        // undefined column, undefined table, undefined function (no equality operator
        // for a type), datatype mismatch, privilege, feature not supported.
        for code in ["42703", "42P01", "42883", "42804", "42501", "0A000"] {
            assert_eq!(c(code, Side::Destination), Class::TableDefinition, "{code}");
        }
        assert_eq!(c("42501", Side::Source), Class::Prerequisite);
    }

    #[test]
    fn what_does_not_pass_by_itself_is_not_transient() {
        assert_eq!(c("28P01", Side::Source), Class::Configuration);
        assert_eq!(c("28000", Side::Destination), Class::Configuration);
        assert_eq!(c("3D000", Side::Source), Class::Configuration);
        assert_eq!(c("55006", Side::Source), Class::Prerequisite);
        assert_eq!(c("42601", Side::Destination), Class::Bug);
        assert_eq!(c("XX000", Side::Destination), Class::Bug);
        assert_eq!(c("55000", Side::Source), Class::Prerequisite);
        assert_eq!(c("55000", Side::Destination), Class::TableDefinition);
    }

    #[test]
    fn a_triggers_or_a_views_refusal_is_never_the_pools() {
        for code in ["44000", "20000", "27000", "09000"] {
            assert_eq!(c(code, Side::Destination), Class::RejectedRow, "{code}");
        }
        for code in ["2F005", "38000", "39P01", "HV000", "72000"] {
            assert_eq!(c(code, Side::Destination), Class::TableDefinition, "{code}");
        }
        assert_eq!(c("25006", Side::Destination), Class::DestinationUnavailable);
        assert_eq!(c("08P01", Side::Destination), Class::DestinationUnavailable);
    }

    #[test]
    fn lost_connections_pass() {
        assert_eq!(c("57P01", Side::Source), Class::Transient);
        assert_eq!(c("57P01", Side::Destination), Class::DestinationUnavailable);
        assert_eq!(c("08006", Side::Destination), Class::DestinationUnavailable);
        assert_eq!(c("40P01", Side::Destination), Class::Transient);
        assert_eq!(c("57014", Side::Source), Class::Transient);
    }

    #[test]
    fn the_policy_backs_off_further_for_what_needs_a_person() {
        for class in Class::ALL {
            let p = class.policy();
            assert!(p.backoff_min <= p.backoff_max, "{}", class.name());
        }
        assert!(Class::Configuration.policy().backoff_max > Class::Transient.policy().backoff_max);
    }
}
