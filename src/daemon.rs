//! The supervisor: starts the writer pool and one thread per source, restarts what
//! fails with backoff, and stops everything cleanly on SIGTERM/SIGINT.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::pg::connect::Endpoint;
use crossbeam_channel::{bounded, unbounded, RecvTimeoutError, Sender};
use log::{error, info, warn};

use crate::apply::writer::RejectPolicy;
use crate::apply::{Inflight, Progress, Router, Writer, WriterMsg, WriterSettings, QUEUE_DEPTH};
use crate::fault::{self, Class, Side};
use crate::ownership::Ownership;
use crate::pg::describe;
use crate::pg::pool::DestSessions;
use crate::source::{self, SourceEnv, SourceSpec, StopFlag};
use crate::status::{State, Status};

/// Settings the supervisor needs, taken from the service configuration.
#[derive(Clone)]
pub struct DaemonSettings {
    pub app_name: String,
    pub dest: Endpoint,
    pub dest_schema: String,
    pub num_workers: usize,
    pub commit_delay: Duration,
    pub on_error: RejectPolicy,
    pub sync_rate: f64,
    pub sync_burst: u64,
    /// See [`crate::config::AppConfig::wal_receiver_timeout`].
    pub wal_receiver_timeout: Duration,
    /// See [`crate::config::AppConfig::on_slot_lost`].
    pub on_slot_lost: crate::config::OnSlotLost,
    /// What the HTTP endpoints report (one entry per source, in source id order).
    pub status: Arc<Status>,
    /// Reads configuration and map again (SIGHUP): the sources they now name.
    pub reload: Option<Reload>,
    /// The sources this instance may stream, decided with the deployment's other
    /// instances through the destination.
    pub ownership: Arc<Ownership>,
}

/// See [`DaemonSettings::reload`].
pub type Reload = Arc<dyn Fn() -> Result<Vec<SourceSpec>, String> + Send + Sync>;

/// Signals, shared with the handlers.
#[derive(Clone, Default)]
pub struct Signals {
    pub term: Arc<AtomicBool>,
    pub hup: Arc<AtomicBool>,
}

impl Signals {
    /// Installs SIGTERM/SIGINT (stop) and SIGHUP (reload) handlers.
    pub fn install() -> std::io::Result<Signals> {
        let s = Signals::default();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, s.term.clone())?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, s.hup.clone())?;
        Ok(s)
    }
}

enum Event {
    Source(usize, Result<(), (Class, String)>),
    /// The slot and publications of a source removed by a reload are dropped (or the
    /// attempt was given up and logged).
    Retired(usize, Option<usize>),
    Writer(usize, Result<(), (Class, String)>),
}

/// Why the writer pool stopped: everything starts again after the class's backoff.
type PoolFailure = (Class, String);

/// Capped exponential backoff with a little jitter, so many sources failing together do
/// not reconnect in lockstep.
/// How long a stop waits for the source threads. A source can be where no stop flag
/// reaches it: CREATE_REPLICATION_SLOT waits until every transaction running on the source
/// has ended, however long that takes. Such a source has routed nothing and its tables are
/// recorded as pending, so leaving it behind loses nothing (a slot the server completes
/// later is picked up, its tables copied, at the next start). Longer than a streaming
/// source's drain.
const STOP_GRACE: Duration = Duration::from_secs(9);

/// The wait before a failed thing is tried again, by the policy of its failure's class
/// ([`Class::policy`]): doubling from the class's minimum to its maximum.
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: None }
    }

    fn step(&mut self, class: Class) -> Duration {
        let p = class.policy();
        let d = self
            .next
            .unwrap_or(p.backoff_min)
            .clamp(p.backoff_min, p.backoff_max);
        self.next = Some((d * 2).min(p.backoff_max));
        let jitter = Duration::from_millis(u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.subsec_millis() % 250)
                .unwrap_or(0),
        ));
        d + jitter
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Sleeps up to `d`, returning early when a stop is requested.
fn sleep_unless(term: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until && !term.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
}

/// Creates the daemon's own destination tables when missing.
fn prepare_destination(s: &DaemonSettings) -> Result<(), PoolFailure> {
    let class = |e: &postgres::Error| fault::classify_sql(e, Side::Destination);
    let mut client = s.dest.sql().map_err(|e| {
        let m = format!(
            "connect to destination {}: {}",
            s.dest.redacted(),
            describe(&e)
        );
        (class(&e), m)
    })?;
    let sql = crate::store::create_sql(&s.dest_schema, s.on_error == RejectPolicy::Deadletter);
    client.batch_execute(&sql).map_err(|e| {
        let m = format!(
            "create the daemon's tables on the destination: {}",
            describe(&e)
        );
        (class(&e), m)
    })
}

struct SourceSlot {
    spec: Arc<SourceSpec>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<StopFlag>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Backoff,
    /// Why the supervisor stopped it (a rejected row, its target's definition), reported
    /// when its thread ends.
    failure: Option<(Class, String)>,
    /// What a reload asked of it, done once its thread has ended.
    plan: Plan,
    /// Stopped because this instance gave it up or lost it (see [`Ownership`]): not a
    /// failure, and started again when owned again.
    released: bool,
    /// The owner epoch its running thread was started with.
    epoch: Option<i64>,
}

impl SourceSlot {
    fn new(spec: Arc<SourceSpec>) -> SourceSlot {
        SourceSlot {
            spec,
            handle: None,
            stop: Arc::new(StopFlag::default()),
            started: Instant::now(),
            restart_at: None,
            backoff: Backoff::new(),
            failure: None,
            plan: Plan::Run,
            released: false,
            epoch: None,
        }
    }
}

/// What a reload asked of a running source.
enum Plan {
    Run,
    /// Start again with this spec (same slot and server; its tables or settings changed).
    Restart(Arc<SourceSpec>),
    /// Drop its slot and publications, then start source `then` (its URL moved to
    /// another server or database under the same slot name), if any.
    Retire {
        then: Option<usize>,
    },
}

/// Every source the daemon has run, by id: ids index progress and status and are
/// never reused, so a source a reload removed stays here, no longer live.
struct Fleet {
    specs: Vec<Arc<SourceSpec>>,
    live: Vec<bool>,
}

impl Fleet {
    /// The slots of the sources the map names now.
    fn live_slots(&self) -> Vec<String> {
        self.specs
            .iter()
            .zip(&self.live)
            .filter(|(_, live)| **live)
            .map(|(s, _)| s.slot.clone())
            .collect()
    }
}

/// Runs until SIGTERM/SIGINT. Returns Ok after a clean stop.
pub fn run(
    settings: &DaemonSettings,
    sources: Vec<SourceSpec>,
    signals: &Signals,
) -> Result<(), String> {
    let mut retired = false;
    let specs = sources.clone();
    let mut fleet = Fleet {
        live: vec![true; sources.len()],
        specs: sources.into_iter().map(Arc::new).collect(),
    };
    let mut pool_backoff = Backoff::new();
    let mut coordination: Option<Coordination> = None;
    let result = loop {
        if signals.term.load(Ordering::Relaxed) {
            break Ok(());
        }
        if let Err((class, e)) = prepare_destination(settings) {
            destination_down(settings, class, &e);
            let d = pool_backoff.step(class);
            error!("{e}; retrying in {:.0?}", d);
            sleep_unless(&signals.term, d);
            continue;
        }
        if coordination.is_none() {
            settings.ownership.want(fleet.live_slots());
            coordination = Some(Coordination::start(settings)?);
            // Alone, an instance owns every source after its first pass: wait for it,
            // so a single instance starts its sources at once, as before.
            settings.ownership.wait_settled(Duration::from_secs(5));
        }
        if !retired {
            retired = true;
            match settings.dest.sql() {
                Ok(mut c) => source::retire::retire_removed(
                    &mut c,
                    &settings.dest_schema,
                    &specs,
                    &settings.app_name,
                ),
                Err(e) => warn!("cannot look for slots of removed URLs: {}", describe(&e)),
            }
        }
        let started = Instant::now();
        match generation(settings, &mut fleet, signals) {
            Ok(()) => break Ok(()),
            Err((class, e)) => {
                // A pool that ran for a while failed afresh: start the backoff over.
                if started.elapsed() > Duration::from_secs(120) {
                    pool_backoff.reset();
                }
                destination_down(settings, class, &e);
                let d = pool_backoff.step(class);
                error!("{e}; restarting all sources and writers in {:.0?}", d);
                sleep_unless(&signals.term, d);
            }
        }
    };
    if let Some(c) = coordination {
        c.stop();
    }
    result
}

/// The thread that keeps this instance's coordination session (see [`Ownership`]).
struct Coordination {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Coordination {
    fn start(settings: &DaemonSettings) -> Result<Coordination, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ownership, dest, schema, flag) = (
            settings.ownership.clone(),
            settings.dest.clone(),
            settings.dest_schema.clone(),
            stop.clone(),
        );
        let handle = thread::Builder::new()
            .name("ownership".into())
            .spawn(move || ownership.run(dest, schema, flag))
            .map_err(|e| format!("cannot start the coordination thread: {e}"))?;
        Ok(Coordination { stop, handle })
    }

    /// Ends the session once every source has stopped: its row goes, its locks with it.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

/// The writer pool failed: every source waits for it (and says so) until a writer
/// applies again.
fn destination_down(settings: &DaemonSettings, class: Class, e: &str) {
    settings.status.pool_failed(class, e);
    for s in settings.status.live() {
        s.failed(class, &format!("waiting for the writer pool: {e}"));
    }
}

fn spawn_source(slot: &mut SourceSpecSlotArgs, events: &Sender<Event>) {
    let spec = slot.spec.clone();
    let env = slot.env.clone();
    let tx = events.clone();
    let id = spec.id;
    let handle = thread::Builder::new()
        .name(format!("source-{id}"))
        .spawn(move || {
            crate::log_context::set_source(&spec.database, spec.sid.as_str());
            let r = catch_unwind(AssertUnwindSafe(|| source::run(&spec, &env)));
            let r = match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err((e.class(), e.to_string())),
                Err(_) => Err((
                    Class::Bug,
                    format!("source {}: thread panicked", spec.label()),
                )),
            };
            let _ = tx.send(Event::Source(id, r));
        });
    match handle {
        Ok(h) => slot.handle = Some(h),
        Err(e) => {
            let _ = events.send(Event::Source(
                id,
                Err((Class::Transient, format!("cannot start thread: {e}"))),
            ));
        }
    }
}

/// What spawning one source needs.
struct SourceSpecSlotArgs {
    spec: Arc<SourceSpec>,
    env: SourceEnv,
    handle: Option<JoinHandle<()>>,
}

/// One life of the writer pool and its sources. Ok: stopped on request; Err: the pool
/// failed and everything must start again from the slots' confirmed positions.
fn generation(
    settings: &DaemonSettings,
    fleet: &mut Fleet,
    signals: &Signals,
) -> Result<(), PoolFailure> {
    let n = settings.num_workers.max(1);
    let progress = Arc::new(Progress::new(fleet.specs.len(), n));
    let sessions = Arc::new(DestSessions::new(&settings.dest));
    let inflight = Arc::new(Inflight::new(n));
    let (events_tx, events) = unbounded::<Event>();
    let (rejections_tx, rejections) = unbounded::<(usize, Class, String)>();
    let mut writer_txs = Vec::new();
    let mut writers = Vec::new();
    for i in 0..n {
        let (tx, rx) = bounded::<WriterMsg>(QUEUE_DEPTH);
        writer_txs.push(tx);
        let ws = WriterSettings {
            dest: settings.dest.clone(),
            schema: settings.dest_schema.clone(),
            commit_delay: settings.commit_delay,
            on_error: settings.on_error,
            progress: progress.clone(),
            inflight: inflight.clone(),
            pool_size: n,
            status: settings.status.clone(),
            rejections: rejections_tx.clone(),
        };
        let etx = events_tx.clone();
        let h = thread::Builder::new()
            .name(format!("writer-{i}"))
            .spawn(move || {
                // Kept to drain the queue after a failure: a queued Flush holds its
                // barrier's reply channel open, and the source waiting on it would hang.
                let leftover = rx.clone();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    Writer::connect(i, ws, rx).and_then(|w| w.run())
                }));
                let r = match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err((e.class(), e.to_string())),
                    Err(_) => Err((Class::Bug, format!("writer {i}: thread panicked"))),
                };
                let failed = r.is_err();
                let _ = etx.send(Event::Writer(i, r));
                if failed {
                    for _ in leftover.iter() {}
                }
            })
            .map_err(|e| (Class::Transient, format!("cannot start writer thread: {e}")))?;
        writers.push(Some(h));
    }
    // Not joined: it ends at its next tick, and a query it waits on must not hold a stop.
    let watching = Arc::new(AtomicBool::new(false));
    {
        let (status, sessions, stop) =
            (settings.status.clone(), sessions.clone(), watching.clone());
        thread::Builder::new()
            .name("watch".into())
            .spawn(move || crate::apply::watch::run(status, sessions, stop))
            .map_err(|e| {
                (
                    Class::Transient,
                    format!("cannot start the watch thread: {e}"),
                )
            })?;
    }
    let router = Router::new(writer_txs.clone(), inflight.clone());
    let mut slots: Vec<SourceSlot> = fleet
        .specs
        .iter()
        .map(|spec| SourceSlot::new(spec.clone()))
        .collect();
    // Live sources start at once (below); removed ones never again.
    for (slot, live) in slots.iter_mut().zip(&fleet.live) {
        if *live {
            slot.restart_at = Some(Instant::now());
        }
    }
    let live = fleet.live.iter().filter(|l| **l).count();
    info!("starting {live} source(s) and {n} writer(s)");
    start_due(
        &ctx_of(settings, &progress, &sessions, &events_tx),
        &mut slots,
        &router,
    );

    let mut stopping = false;
    let mut stop_deadline = Instant::now();
    let result = loop {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Source(id, r)) => {
                let slot = &mut slots[id];
                if let Some(h) = slot.handle.take() {
                    let _ = h.join();
                }
                if !stopping && !matches!(slot.plan, Plan::Run) {
                    slot.released = false;
                    settings.ownership.stopped(&slot.spec.slot);
                    follow_plan(settings, slot, &events_tx);
                    continue;
                }
                if slot.released && !stopping {
                    // Given up or lost: not a failure; started again once owned.
                    released(settings, slot);
                    continue;
                }
                let status = settings.status.source(id);
                let spec = slot.spec.clone();
                crate::log_context::with_source(&spec.database, spec.sid.as_str(), || {
                    if !stopping {
                        let why = match (r, slot.failure.take()) {
                            // Logged by the writer that refused the row.
                            (_, Some(held)) => held,
                            (Err((class, e)), None) => {
                                error!("{e}");
                                (class, e)
                            }
                            (Ok(()), None) => {
                                let e =
                                    format!("source {}: stopped unexpectedly", slot.spec.label());
                                warn!("{e}");
                                (Class::Transient, e)
                            }
                        };
                        if let Some(s) = status {
                            s.failed(why.0, &why.1);
                        }
                        if slot.started.elapsed() > Duration::from_secs(120) {
                            slot.backoff.reset();
                        }
                        let d = slot.backoff.step(why.0);
                        info!(
                            "source {}: restarting in {:.0?} ({})",
                            slot.spec.label(),
                            d,
                            why.0.policy().reason
                        );
                        slot.restart_at = Some(Instant::now() + d);
                    } else {
                        if let Err((_, e)) = r {
                            warn!("{e}");
                        }
                        if let Some(s) = status {
                            s.set_state(State::Stopped);
                        }
                    }
                });
            }
            Ok(Event::Writer(i, r)) => {
                // Not joined here: a failed writer drains its queue until every sender is
                // gone, which happens below, after the sources have stopped.
                if !stopping || r.is_err() {
                    break Err(match r {
                        Err(e) => e,
                        Ok(()) => (Class::Bug, format!("writer {i} stopped unexpectedly")),
                    });
                }
            }
            Ok(Event::Retired(id, then)) => {
                if let Some(s) = settings.status.source(id) {
                    s.retire();
                }
                if let Some(slot) = then.and_then(|j| slots.get_mut(j)) {
                    slot.restart_at = Some(Instant::now());
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break Err((Class::Bug, "event channel closed".into()))
            }
        }
        // A source whose row the destination refused (on_error = stop) stops alone and
        // is started again after its backoff; the others stream on.
        while let Ok((id, class, report)) = rejections.try_recv() {
            if let Some(slot) = slots.get_mut(id) {
                if let Some(s) = settings.status.source(id) {
                    s.failed(class, &report);
                }
                if slot.handle.is_some() && slot.failure.is_none() {
                    slot.failure = Some((class, report));
                    slot.stop.abort();
                }
            }
        }
        if signals.hup.swap(false, Ordering::Relaxed) && !stopping {
            match settings.reload.as_ref().map(|r| r()) {
                None => warn!("SIGHUP: nothing to reload"),
                Some(Err(e)) => error!("SIGHUP: {e}; the running configuration and map are kept"),
                Some(Ok(specs)) => {
                    info!("SIGHUP: configuration and map read again");
                    reconcile(
                        &ctx_of(settings, &progress, &sessions, &events_tx),
                        fleet,
                        &mut slots,
                        specs,
                    );
                }
            }
        }
        if !stopping && signals.term.load(Ordering::Relaxed) {
            info!("stopping: committing what was applied and confirming it to the sources");
            stopping = true;
            stop_deadline = Instant::now() + STOP_GRACE;
            for s in &slots {
                s.stop.graceful();
            }
        }
        if stopping {
            if slots.iter().all(|s| s.handle.is_none()) || Instant::now() >= stop_deadline {
                break Ok(());
            }
            continue;
        }
        follow_ownership(settings, fleet, &mut slots);
        start_due(
            &ctx_of(settings, &progress, &sessions, &events_tx),
            &mut slots,
            &router,
        );
    };

    // Sources first (graceful ones have confirmed already), then the writers commit.
    if result.is_err() {
        for s in &slots {
            s.stop.abort();
        }
        stop_deadline = Instant::now() + STOP_GRACE;
    }
    drop(router);
    for s in slots.iter_mut() {
        if let Some(h) = s.handle.take() {
            while !h.is_finished() && Instant::now() < stop_deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                // Left behind: it exits at its next check of the stop flag, or with the
                // process. It has routed nothing past what was confirmed.
                warn!(
                    "source {}: did not stop within {:?} (a source command such as \
                     CREATE_REPLICATION_SLOT, which waits for the source's running \
                     transactions, is still in progress); leaving it",
                    s.spec.label(),
                    STOP_GRACE
                );
            }
        }
    }
    for tx in &writer_txs {
        let _ = tx.try_send(WriterMsg::Stop);
    }
    drop(writer_txs);
    for h in writers.iter_mut().filter_map(Option::take) {
        let _ = h.join();
    }
    watching.store(true, Ordering::Relaxed);
    result
}

fn source_env(
    ctx: &Ctx<'_>,
    id: usize,
    router: &Router,
    stop: &Arc<StopFlag>,
    epoch: Option<i64>,
) -> SourceEnv {
    let (settings, progress) = (ctx.settings, ctx.progress);
    SourceEnv {
        sessions: ctx.sessions.clone(),
        dest_schema: settings.dest_schema.clone(),
        app_name: settings.app_name.clone(),
        router: router.clone(),
        progress: progress.clone(),
        stop: stop.clone(),
        sync_rate: settings.sync_rate,
        sync_burst: settings.sync_burst,
        wal_receiver_timeout: settings.wal_receiver_timeout,
        on_slot_lost: settings.on_slot_lost,
        on_error: settings.on_error,
        epoch,
        latency: settings.status.latency.clone(),
        status: settings
            .status
            .source(id)
            .unwrap_or_else(|| Arc::new(crate::status::SourceStatus::new("?", "?", "?", "?"))),
    }
}

/// What a reload needs of the running generation.
struct Ctx<'a> {
    settings: &'a DaemonSettings,
    progress: &'a Arc<Progress>,
    sessions: &'a Arc<DestSessions>,
    events: &'a Sender<Event>,
}

/// Whether two specs of one slot read the same server and database: then the slot's
/// positions carry over (a changed user, password or parameter only restarts it).
fn same_server(a: &SourceSpec, b: &SourceSpec) -> bool {
    (&a.conn.host, a.conn.port, &a.conn.dbname) == (&b.conn.host, b.conn.port, &b.conn.dbname)
}

/// Whether a running source needs no restart for `new`.
fn unchanged(old: &SourceSpec, new: &SourceSpec) -> bool {
    old.conn == new.conn && old.tables == new.tables && old.family_size == new.family_size
}

/// Applies a reloaded map to the running sources: new slots start, removed ones stop
/// and are retired (slot and publications dropped), changed ones restart; a source the
/// reload did not touch is left running.
fn reconcile(
    ctx: &Ctx<'_>,
    fleet: &mut Fleet,
    slots: &mut Vec<SourceSlot>,
    specs: Vec<SourceSpec>,
) {
    let mut kept = std::collections::BTreeSet::new();
    for mut spec in specs {
        let running =
            (0..fleet.specs.len()).find(|&i| fleet.live[i] && fleet.specs[i].slot == spec.slot);
        match running {
            Some(id) if unchanged(&fleet.specs[id], &spec) => {
                kept.insert(id);
            }
            Some(id) if same_server(&fleet.specs[id], &spec) => {
                kept.insert(id);
                spec.id = id;
                let spec = Arc::new(spec);
                let old = &fleet.specs[id];
                let why = if old.tables != spec.tables {
                    "its tables in the map changed"
                } else if old.conn != spec.conn {
                    "its URL's user, password or parameters changed"
                } else {
                    "the number of URLs of its family changed"
                };
                info!("source {}: {why}: restarting it", spec.label());
                fleet.specs[id] = spec.clone();
                plan(ctx, &mut slots[id], Plan::Restart(spec));
            }
            Some(id) => {
                // Same slot name on another server or database: the old slot is dropped
                // first (its sync state rows share the name), then the new one starts.
                let new = add(ctx, fleet, slots, spec, false);
                info!(
                    "source {}: its URL now names another server or database: retiring slot {} \
                     on the old one, then starting anew",
                    fleet.specs[id].label(),
                    fleet.specs[id].slot
                );
                fleet.live[id] = false;
                plan(ctx, &mut slots[id], Plan::Retire { then: Some(new) });
                kept.insert(new);
            }
            None => {
                let id = add(ctx, fleet, slots, spec, true);
                kept.insert(id);
                info!(
                    "source {}: added by the reload: starting it",
                    fleet.specs[id].label()
                );
            }
        }
    }
    for (id, (spec, live)) in fleet.specs.iter().zip(fleet.live.iter_mut()).enumerate() {
        if *live && !kept.contains(&id) {
            info!(
                "source {}: removed from the map: stopping it, then dropping slot {} and its \
                 publications",
                spec.label(),
                spec.slot
            );
            *live = false;
            plan(ctx, &mut slots[id], Plan::Retire { then: None });
        }
    }
}

/// A new source: the next id everywhere (fleet, progress, status, slots). Started at
/// once when `start`, else when released.
fn add(
    ctx: &Ctx<'_>,
    fleet: &mut Fleet,
    slots: &mut Vec<SourceSlot>,
    mut spec: SourceSpec,
    start: bool,
) -> usize {
    let id = fleet.specs.len();
    spec.id = id;
    let status = Arc::new(crate::status::SourceStatus::new(
        &spec.database,
        spec.sid.as_str(),
        &spec.slot,
        &spec.conn.redacted(),
    ));
    let sid = ctx.settings.status.add_source(status);
    if sid != id {
        error!(
            "source {}: status id {sid} is not its id {id}",
            spec.label()
        );
    }
    ctx.progress.ensure(id + 1);
    let spec = Arc::new(spec);
    fleet.specs.push(spec.clone());
    fleet.live.push(true);
    let mut slot = SourceSlot::new(spec);
    if start {
        slot.restart_at = Some(Instant::now());
    }
    slots.push(slot);
    id
}

/// Asks a source to stop for `p`; carried out when its thread has ended (at once when
/// none runs).
fn plan(ctx: &Ctx<'_>, slot: &mut SourceSlot, p: Plan) {
    slot.plan = p;
    slot.failure = None;
    if slot.handle.is_some() {
        slot.stop.graceful();
    } else {
        follow_plan(ctx.settings, slot, ctx.events);
    }
}

/// Carries out a reload's plan for a source whose thread has ended.
fn follow_plan(settings: &DaemonSettings, slot: &mut SourceSlot, events: &Sender<Event>) {
    match std::mem::replace(&mut slot.plan, Plan::Run) {
        Plan::Run => {}
        Plan::Restart(spec) => {
            slot.spec = spec;
            slot.backoff.reset();
            slot.restart_at = Some(Instant::now());
        }
        Plan::Retire { then } => {
            slot.restart_at = None;
            let spec = slot.spec.clone();
            let (dest, schema, tx) = (
                settings.dest.clone(),
                settings.dest_schema.clone(),
                events.clone(),
            );
            let id = spec.id;
            let spawned = thread::Builder::new()
                .name(format!("retire-{id}"))
                .spawn(move || {
                    crate::log_context::set_source(&spec.database, spec.sid.as_str());
                    source::retire::retire_one(&dest, &schema, &spec);
                    let _ = tx.send(Event::Retired(id, then));
                });
            if let Err(e) = spawned {
                error!(
                    "source {}: cannot start a thread to retire it: {e}",
                    slot.spec.label()
                );
                let _ = events.send(Event::Retired(id, then));
            }
        }
    }
}

fn ctx_of<'a>(
    settings: &'a DaemonSettings,
    progress: &'a Arc<Progress>,
    sessions: &'a Arc<DestSessions>,
    events: &'a Sender<Event>,
) -> Ctx<'a> {
    Ctx {
        settings,
        progress,
        sessions,
        events,
    }
}

/// Tells the ownership which sources to stream, and stops those this instance no
/// longer owns: gracefully when given up (their positions confirmed before the lock
/// goes), at once when the coordination session was lost (another instance may be
/// taking them already).
fn follow_ownership(settings: &DaemonSettings, fleet: &Fleet, slots: &mut [SourceSlot]) {
    let own = &settings.ownership;
    settings
        .status
        .instances(&own.instance, own.live_instances());
    own.want(fleet.live_slots());
    for slot in slots.iter() {
        if let Some(s) = settings.status.source(slot.spec.id) {
            s.set_owner(own.owner(&slot.spec.slot));
        }
    }
    for slot in slots.iter_mut() {
        if !matches!(slot.plan, Plan::Run) {
            continue;
        }
        let epoch = own.epoch(&slot.spec.slot);
        if slot.handle.is_none() || slot.released || (epoch.is_some() && epoch == slot.epoch) {
            if slot.handle.is_none() && own.elsewhere(&slot.spec.slot) {
                if let Some(s) = settings.status.source(slot.spec.id) {
                    if s.state() != State::Elsewhere && slot.restart_at.is_some() {
                        s.set_state(State::Elsewhere);
                    }
                }
            }
            continue;
        }
        slot.released = true;
        if own.live_instances() == 0 || epoch.is_some() {
            // Lost, or lost and taken again: another instance may have streamed it in
            // between, so what this thread still does is fenced off anyway.
            warn!(
                "source {}: stopping at once: this instance lost its coordination session",
                slot.spec.label()
            );
            slot.stop.abort();
        } else {
            info!(
                "source {}: given up to another instance: stopping it",
                slot.spec.label()
            );
            slot.stop.graceful();
        }
    }
}

/// A source stopped because this instance gave it up or lost it.
fn released(settings: &DaemonSettings, slot: &mut SourceSlot) {
    slot.released = false;
    slot.failure = None;
    settings.ownership.stopped(&slot.spec.slot);
    slot.restart_at = Some(Instant::now());
    if let Some(s) = settings.status.source(slot.spec.id) {
        s.set_state(State::Elsewhere);
    }
}

/// Starts every source whose (re)start time has come and that this instance owns.
fn start_due(ctx: &Ctx<'_>, slots: &mut [SourceSlot], router: &Router) {
    for slot in slots.iter_mut() {
        let epoch = ctx.settings.ownership.epoch(&slot.spec.slot);
        if slot.handle.is_none()
            && slot.restart_at.is_some_and(|t| Instant::now() >= t)
            && epoch.is_some()
        {
            slot.restart_at = None;
            slot.stop = Arc::new(StopFlag::default());
            slot.epoch = epoch;
            let mut args = SourceSpecSlotArgs {
                spec: slot.spec.clone(),
                env: source_env(ctx, slot.spec.id, router, &slot.stop, epoch),
                handle: None,
            };
            spawn_source(&mut args, ctx.events);
            slot.handle = args.handle;
            slot.started = Instant::now();
        }
    }
}
