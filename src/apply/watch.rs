//! Watches writers that have been applying one batch for longer than
//! `app.writer_wait_timeout`, and asks the destination what their sessions wait for: a
//! writer behind a lock (a user's open transaction, a migration's `ALTER TABLE`, a
//! backend left by a lost connection) is reported with the sessions that hold it, so
//! `/readyz` and the log name the pid to look at instead of only "slow". Nothing is
//! cancelled: a new session would queue behind the same lock, and a backend orphaned by
//! a lost connection is ended by the server-side timeouts the writers set
//! ([`crate::pg::session`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, warn};
use postgres::Client;

use crate::pg::pool::DestSessions;
use crate::pg::{describe, quote::literal};
use crate::status::{now_ms, Status};

/// How often the writers are looked at, and how often a stuck one is asked about again.
const TICK: Duration = Duration::from_secs(1);
const ASK_EVERY_MS: i64 = 5_000;

/// Runs until `stop`: every second, each writer applying one batch for longer than the
/// status's bound has its session looked up on the destination.
pub fn run(status: Arc<Status>, sessions: Arc<DestSessions>, stop: Arc<AtomicBool>) {
    let mut asked = vec![0i64; status.writers.len()];
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(TICK);
        let limit = status.stuck_after().as_millis() as i64;
        if limit == 0 {
            continue;
        }
        let now = now_ms();
        for (i, w) in status.writers.iter().enumerate() {
            let since = w.applying_since();
            let pid = w.backend_pid();
            if since == 0 || now - since <= limit || pid == 0 || now - asked[i] < ASK_EVERY_MS {
                continue;
            }
            asked[i] = now;
            match sessions.catalog.with(|e| e, |c| waits_for(c, pid)) {
                Ok(what) => {
                    if let Some(text) = &what {
                        warn!(
                            "writer {i} has been applying one batch for {} s: {text}",
                            (now - since) / 1000
                        );
                    }
                    w.waiting_for(since, what);
                }
                Err(e) => debug!("writer {i}: cannot ask what it waits for: {}", describe(&e)),
            }
        }
    }
}

/// What the backend `pid` waits for, when it waits for a lock: the sessions holding it.
fn waits_for(c: &mut Client, pid: i32) -> Result<Option<String>, postgres::Error> {
    let rows = c.query(
        "SELECT b.pid, coalesce(b.usename::text, ''), coalesce(b.application_name, ''), \
         coalesce(b.state, ''), \
         extract(epoch FROM now() - b.xact_start)::bigint, \
         coalesce(left(b.query, 100), ''), w.wait_event \
         FROM pg_catalog.pg_stat_activity w \
         CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(w.pid)) AS p(pid) \
         JOIN pg_catalog.pg_stat_activity b ON b.pid = p.pid \
         WHERE w.pid = $1 AND w.wait_event_type = 'Lock' ORDER BY b.pid",
        &[&pid],
    )?;
    if rows.is_empty() {
        return Ok(None);
    }
    let holders: Vec<String> = rows
        .iter()
        .map(|r| holder(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let kind: Option<String> = rows[0].get(6);
    Ok(Some(format!(
        "its session (pid {pid}) waits for a {} lock held by {}",
        kind.unwrap_or_else(|| "row".into()),
        holders.join("; ")
    )))
}

/// One session holding a lock, as an operator looks for it in `pg_stat_activity`.
/// (What another role's session shows depends on the daemon's role: without
/// `pg_read_all_stats`, no state or transaction start, and "<insufficient privilege>".)
fn holder(pid: i32, user: &str, app: &str, state: &str, age: Option<i64>, query: &str) -> String {
    let mut s = format!("pid {pid} (user {}", literal(user));
    if !app.is_empty() {
        s.push_str(&format!(", application {}", literal(app)));
    }
    if !state.is_empty() {
        s.push_str(&format!(", {state}"));
    }
    if let Some(age) = age {
        s.push_str(&format!(", in its transaction for {age} s"));
    }
    if !query.is_empty() {
        s.push_str(&format!(", last statement {}", literal(query)));
    }
    s.push(')');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_named_as_pg_stat_activity_shows_it() {
        assert_eq!(
            holder(
                42,
                "ops",
                "psql",
                "idle in transaction",
                Some(75),
                "LOCK TABLE t"
            ),
            "pid 42 (user 'ops', application 'psql', idle in transaction, in its transaction \
             for 75 s, last statement 'LOCK TABLE t')"
        );
        assert_eq!(
            holder(7, "kuvasz", "", "", None, "<insufficient privilege>"),
            "pid 7 (user 'kuvasz', last statement '<insufficient privilege>')"
        );
    }
}
