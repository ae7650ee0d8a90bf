//! Which instance streams which source, when several run one deployment (the same map
//! into the same destination schema). PostgreSQL is the coordinator: each instance keeps
//! one session on the destination, and a source is streamed by the instance whose
//! session holds that source's advisory lock, which dies with the session. Instances
//! register in `kvsz_instances`, heart-beaten by the same session; each takes unowned
//! sources up to its fair share (`ceil(sources / live instances)`, counting only the
//! instances that stream the same sources: another map writing into the same schema is
//! another deployment) and gives up those beyond it, each stopped (its position
//! confirmed) before its lock goes, so a source is never streamed by two instances at
//! once. An instance alone takes every source: a single instance runs as before.
//!
//! **Fencing.** A lock says who may start a source, not who is still writing: an
//! instance that was paused, or cut off from its coordination session, may still have
//! transactions to commit. So taking a source also bumps its owner epoch
//! (`kvsz_owners`), and every destination transaction that applies a source's changes
//! checks, in itself, that the epoch its source started with is still current
//! ([`crate::store::fence_sql`]): the bump waits for such a transaction in flight, and
//! any later one is refused. What the old owner committed is in the positions its
//! successor starts from; nothing else of it lands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};
use parking_lot::Mutex;
use postgres::Client;

use crate::pg::connect::Endpoint;
use crate::pg::describe;
use crate::store;

/// How often an instance beats and looks at the sources.
const TICK: Duration = Duration::from_secs(1);
/// How soon a failed connection of the coordination session is tried again.
const RETRY: Duration = Duration::from_millis(100);
/// The first connection attempts' limit: see [`connect_timeout`].
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The limit without `connect_timeout` in the URL: a TCP handshake (which is all it
/// bounds) that takes longer has lost its SYN twice.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An instance silent for longer is taken for dead (its sources' locks went with its
/// session already; this is when the others stop leaving room for it).
const LIVE_WITHIN_SECS: f64 = 5.0;
/// An instance silent for longer has its coordination session ended by the others, so
/// its sources' locks go: it was paused, or the destination kept its session after a
/// partition. If it comes back, what it still applies is fenced off.
const SILENT_SECS: f64 = 10.0;

/// What this instance owns, shared by the coordination thread and the supervisor.
pub struct Ownership {
    /// `host/pid/start`: unique among the instances of a deployment.
    pub instance: String,
    host: String,
    state: Mutex<Owned>,
}

#[derive(Default)]
struct Owned {
    /// The slots of the sources this instance should stream, if it may.
    wanted: Vec<String>,
    /// Slots whose advisory lock the coordination session holds, with the owner epoch
    /// taken with it.
    held: BTreeMap<String, i64>,
    /// Held slots being given up: the supervisor stops their sources, then
    /// [`Ownership::stopped`] lets the lock go.
    giving_up: BTreeSet<String>,
    stopped: BTreeSet<String>,
    /// The coordination session has made at least one pass since it connected: until
    /// then a source not held is not yet known to be someone else's.
    settled: bool,
    live_instances: i64,
    /// Who owns each wanted source, as `kvsz_owners` says: (instance, epoch).
    owners: BTreeMap<String, (String, i64)>,
}

impl Ownership {
    pub fn new() -> Ownership {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let started = crate::status::now_ms();
        Ownership {
            instance: format!("{host}/{}/{started}", std::process::id()),
            host,
            state: Mutex::new(Owned::default()),
        }
    }

    /// The slots of the sources to stream (the live ones of the map).
    pub fn want(&self, slots: Vec<String>) {
        let mut s = self.state.lock();
        if s.wanted != slots {
            s.wanted = slots;
        }
    }

    /// Whether this instance may stream the source of `slot`.
    pub fn owns(&self, slot: &str) -> bool {
        self.epoch(slot).is_some()
    }

    /// The owner epoch this instance holds the source of `slot` with, if it may stream
    /// it.
    pub fn epoch(&self, slot: &str) -> Option<i64> {
        let s = self.state.lock();
        if s.giving_up.contains(slot) {
            return None;
        }
        s.held.get(slot).copied()
    }

    /// Whether the source of `slot` is known to be another instance's (not merely not
    /// yet taken at start).
    pub fn elsewhere(&self, slot: &str) -> bool {
        let s = self.state.lock();
        s.settled && !s.held.contains_key(slot)
    }

    /// The source of a slot given up, or removed from the map, has stopped: its lock
    /// may go.
    pub fn stopped(&self, slot: &str) {
        let mut s = self.state.lock();
        let wanted = s.wanted.iter().any(|w| w == slot);
        if s.held.contains_key(slot) && (s.giving_up.contains(slot) || !wanted) {
            s.stopped.insert(slot.to_string());
        }
    }

    /// Waits until the first pass of the coordination session is done, at most `limit`.
    pub fn wait_settled(&self, limit: Duration) {
        let until = std::time::Instant::now() + limit;
        while !self.state.lock().settled && std::time::Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The instance that owns the source of `slot` and its epoch, as of the last pass.
    pub fn owner(&self, slot: &str) -> Option<(String, i64)> {
        self.state.lock().owners.get(slot).cloned()
    }

    /// Live instances, as of the last pass (0: not connected).
    pub fn live_instances(&self) -> i64 {
        self.state.lock().live_instances
    }

    /// Runs the coordination session until `stop`, then removes this instance's row.
    pub fn run(self: Arc<Self>, dest: Endpoint, schema: String, stop: Arc<AtomicBool>) {
        let mut session: Option<Client> = None;
        let mut failures: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            if session.is_none() {
                let mut attempt = dest.clone();
                attempt.info.connect_timeout =
                    Some(connect_timeout(dest.info.connect_timeout, failures));
                // The destination's own timeouts too: a session orphaned by a partition
                // must end, and free its locks, like a writer's.
                match attempt.destination() {
                    Ok(mut c) => {
                        failures = 0;
                        self.end_previous(&mut c, &schema);
                        session = Some(c);
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        warn!(
                            "instance {}: cannot open its coordination session: {}",
                            self.instance,
                            describe(&e)
                        );
                        thread::sleep(RETRY);
                        continue;
                    }
                }
            }
            if let Some(c) = session.as_mut() {
                if let Err(e) = self.pass(c, &schema) {
                    warn!(
                        "instance {}: coordination session lost ({}): its sources stop",
                        self.instance,
                        describe(&e)
                    );
                    session = None;
                    self.lost();
                }
            }
            thread::sleep(TICK);
        }
        if let Some(mut c) = session {
            let _ = c.execute(
                store::forget_instance_sql(&schema).as_str(),
                &[&self.instance],
            );
        }
    }

    /// Ends this instance's previous coordination session if the server kept it: its
    /// locks would hold this instance's own sources back until the server's keepalives
    /// end it.
    fn end_previous(&self, c: &mut Client, schema: &str) {
        match c.query(
            store::end_previous_session_sql(schema).as_str(),
            &[&self.instance],
        ) {
            Ok(rows) if !rows.is_empty() => info!(
                "instance {}: ended its previous coordination session, which the destination \
                 still had",
                self.instance
            ),
            Ok(_) => {}
            Err(e) => warn!(
                "instance {}: cannot end its previous coordination session: {}",
                self.instance,
                describe(&e)
            ),
        }
    }

    /// The session and its locks are gone: nothing is owned.
    fn lost(&self) {
        let mut s = self.state.lock();
        s.held.clear();
        s.giving_up.clear();
        s.stopped.clear();
        s.settled = false;
        s.live_instances = 0;
        s.owners.clear();
    }

    /// One beat: the heartbeat, the locks of sources given up and stopped released,
    /// then sources taken or given up toward the fair share.
    fn pass(&self, c: &mut Client, schema: &str) -> Result<(), postgres::Error> {
        let (wanted, held, release) = {
            let mut s = self.state.lock();
            let release: Vec<String> = std::mem::take(&mut s.stopped).into_iter().collect();
            (s.wanted.clone(), s.held.len(), release)
        };
        let sources = i32::try_from(held).unwrap_or(i32::MAX);
        let deployment = fingerprint(&wanted);
        c.execute(
            store::heartbeat_sql(schema).as_str(),
            &[
                &self.instance,
                &self.host,
                &(std::process::id() as i32),
                &sources,
                &deployment,
            ],
        )?;
        let ended = c.query(
            store::end_silent_instances_sql(schema).as_str(),
            &[&deployment, &SILENT_SECS],
        )?;
        let mut silent: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &ended {
            *silent.entry(r.get(0)).or_default() += 1;
        }
        for (other, sessions) in silent {
            warn!(
                "instance {}: instance {other} has not beaten for {SILENT_SECS} s: ended its \
                 {sessions} destination session(s), so its sources go to the live instances \
                 and nothing it holds locked keeps them waiting",
                self.instance
            );
        }
        let live: i64 = c
            .query_one(
                store::live_instances_sql(schema).as_str(),
                &[&LIVE_WITHIN_SECS, &deployment],
            )?
            .get(0);
        let ns = namespace(schema);
        for slot in &release {
            c.execute(
                "SELECT pg_advisory_unlock(hashtext($1), hashtext($2))",
                &[&ns, slot],
            )?;
        }
        let share = fair_share(wanted.len(), live);
        let mut s = self.state.lock();
        for slot in &release {
            s.held.remove(slot);
            s.giving_up.remove(slot);
        }
        s.live_instances = live;
        // Held sources the map no longer names, or beyond the share: given up.
        let unwanted: Vec<String> = s
            .held
            .keys()
            .filter(|h| !wanted.contains(h))
            .cloned()
            .collect();
        s.giving_up.extend(unwanted);
        let keeping = s.held.len() - s.giving_up.len();
        if keeping > share {
            let extra: Vec<String> = s
                .held
                .keys()
                .rev()
                .filter(|h| !s.giving_up.contains(*h))
                .take(keeping - share)
                .cloned()
                .collect();
            info!(
                "instance {}: {live} instance(s) live, share {share}: giving up {}",
                self.instance,
                extra.join(", ")
            );
            s.giving_up.extend(extra);
        }
        let missing = share.saturating_sub(s.held.len());
        let free: Vec<String> = wanted
            .iter()
            .filter(|w| !s.held.contains_key(*w))
            .cloned()
            .collect();
        drop(s);
        let taken = if missing > 0 && !free.is_empty() {
            take(c, schema, &self.instance, &free, missing)?
        } else {
            Vec::new()
        };
        let mut owners = owners_of(c, schema, &wanted)?;
        self.retake_stale(c, schema, &mut owners, &taken)?;
        let mut s = self.state.lock();
        s.owners = owners;
        if !taken.is_empty() {
            info!(
                "instance {}: {live} instance(s) live, share {share}: took {}",
                self.instance,
                taken
                    .iter()
                    .map(|(slot, epoch)| format!("{slot} (epoch {epoch})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s.held.extend(taken);
        s.settled = true;
        let now_held = s.held.len();
        drop(s);
        if now_held != held {
            // What `check` and the others read is this pass's, not the last one's.
            let sources = i32::try_from(now_held).unwrap_or(i32::MAX);
            c.execute(
                store::instance_sources_sql(schema).as_str(),
                &[&self.instance, &sources],
            )?;
        }
        Ok(())
    }

    /// Takes again, with a new epoch, the held sources whose owner of record is not this
    /// instance with the epoch it holds them with (see [`Ownership::stale`]); `owners`
    /// then says what the record says now.
    fn retake_stale(
        &self,
        c: &mut Client,
        schema: &str,
        owners: &mut BTreeMap<String, (String, i64)>,
        taken: &[(String, i64)],
    ) -> Result<(), postgres::Error> {
        let stale = self.stale(owners, taken);
        if stale.is_empty() {
            return Ok(());
        }
        warn!(
            "instance {}: holds the source of {} but kvsz_owners names another owner: \
             taking it again (its source restarts; what it applied under the old epoch is \
             fenced off)",
            self.instance,
            stale.join(", ")
        );
        let retaken = c.query(
            store::take_owners_sql(schema).as_str(),
            &[&self.instance, &stale],
        )?;
        let mut s = self.state.lock();
        for r in &retaken {
            let (slot, epoch): (String, i64) = (r.get(0), r.get(1));
            owners.insert(slot.clone(), (self.instance.clone(), epoch));
            s.held.insert(slot, epoch);
        }
        Ok(())
    }

    /// Held slots (and those just `taken`) whose owner of record is not this instance
    /// with the epoch it holds them with: the record was changed under the lock (by
    /// hand, or a take-over this instance did not see), so the writers' fence refuses
    /// everything; taking them again gives the source a fresh epoch to restart with.
    fn stale(
        &self,
        owners: &BTreeMap<String, (String, i64)>,
        taken: &[(String, i64)],
    ) -> Vec<String> {
        let s = self.state.lock();
        s.held
            .iter()
            .map(|(slot, epoch)| (slot, *epoch))
            .chain(taken.iter().map(|(slot, epoch)| (slot, *epoch)))
            .filter(|(slot, _)| !s.giving_up.contains(*slot))
            .filter(|(slot, epoch)| {
                !matches!(owners.get(*slot), Some((i, e)) if *i == self.instance && e == epoch)
            })
            .map(|(slot, _)| slot.clone())
            .collect()
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership::new()
    }
}

/// The advisory locks of one deployment: its destination schema's (a deployment is a
/// map written into one schema; its slots' names are unique within it).
pub(crate) fn namespace(schema: &str) -> String {
    format!("kuvasz-streamer {schema}")
}

/// What tells instances of one deployment from those of another writing into the same
/// schema (another map): the sources they stream. Only the instances of one deployment
/// share its sources (FNV-1a of the sorted slot names).
pub(crate) fn fingerprint(slots: &[String]) -> String {
    let mut sorted: Vec<&str> = slots.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sorted.join("\n").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Takes up to `n` of `free` whose lock no session holds, and bumps their owner
/// epochs: the slots taken, with the epoch each is owned with.
fn take(
    c: &mut Client,
    schema: &str,
    instance: &str,
    free: &[String],
    n: usize,
) -> Result<Vec<(String, i64)>, postgres::Error> {
    let rows = c.query(
        "SELECT s FROM (SELECT s FROM unnest($2::text[]) AS u(s) \
         WHERE pg_try_advisory_lock(hashtext($1), hashtext(s)) LIMIT $3) t",
        &[&namespace(schema), &free, &(n as i64)],
    )?;
    let locked: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if locked.is_empty() {
        return Ok(Vec::new());
    }
    let rows = c.query(
        store::take_owners_sql(schema).as_str(),
        &[&instance, &locked],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// How long the coordination session's connection attempt after `failures` failed ones
/// may wait for the server: 1 s at first, so that once a cut link heals the sources
/// restart within about a second (the kernel resends an unanswered SYN only after 1, 3,
/// 7 s…), doubling up to the URL's `connect_timeout` (2 s without it) for a slow link.
fn connect_timeout(configured: Option<Duration>, failures: u32) -> Duration {
    let limit = configured.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    FIRST_CONNECT_TIMEOUT
        .saturating_mul(1 << failures.min(8))
        .min(limit)
}

/// Who owns each of `slots`, as `kvsz_owners` says: (instance, epoch).
fn owners_of(
    c: &mut Client,
    schema: &str,
    slots: &[String],
) -> Result<BTreeMap<String, (String, i64)>, postgres::Error> {
    Ok(c.query(store::owners_sql(schema).as_str(), &[&slots])?
        .iter()
        .map(|r| (r.get(0), (r.get(2), r.get(1))))
        .collect())
}

/// `ceil(sources / live)`: every source has an owner when every instance takes its
/// share; at least one instance (this one) is live.
fn fair_share(sources: usize, live: i64) -> usize {
    let live = usize::try_from(live.max(1)).unwrap_or(1);
    sources.div_ceil(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_is_its_sources_in_any_order() {
        let a = fingerprint(&["k_a_1".into(), "k_a_2".into()]);
        assert_eq!(a, fingerprint(&["k_a_2".into(), "k_a_1".into()]));
        assert_ne!(a, fingerprint(&["k_a_1".into()]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn connection_attempts_wait_longer_after_each_failure() {
        let s = Duration::from_secs;
        let waits: Vec<Duration> = (0..6).map(|f| connect_timeout(None, f)).collect();
        assert_eq!(waits, [s(1), s(2), s(2), s(2), s(2), s(2)]);
        let waits: Vec<Duration> = (0..6).map(|f| connect_timeout(Some(s(10)), f)).collect();
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(10), s(10)]);
        assert_eq!(connect_timeout(Some(s(3)), 5), s(3));
        assert_eq!(connect_timeout(Some(s(3)), u32::MAX), s(3));
    }

    #[test]
    fn shares_cover_every_source() {
        assert_eq!(fair_share(12, 3), 4);
        assert_eq!(fair_share(12, 5), 3);
        assert_eq!(fair_share(1, 3), 1);
        assert_eq!(fair_share(7, 0), 7);
        assert_eq!(fair_share(0, 2), 0);
    }
}
