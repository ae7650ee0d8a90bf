//! Source management (SPEC §5): prerequisites reported plainly, the publication and slot
//! named `kuvasz_<database>_<sid>` created, repaired and reconciled with the map, and
//! every table that enters the publication copied exactly once into the destination,
//! with its state in `kvsz_sync_state`.

mod support;

use std::path::Path;
use std::time::Duration;

use kuvasz_streamer::pg::connect::Endpoint;
use kuvasz_streamer::pg::conninfo::ConnInfo;
use kuvasz_streamer::pg::Lsn;
use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_for, Cluster};

type Rows = Vec<Vec<Option<String>>>;

/// The sid of every source in this file.
const SID: &str = "s1";
/// How long a daemon gets to log an expected error or to converge.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One source database, one destination database, and the names the daemon derives.
struct Fixture<'a> {
    src: &'a Cluster,
    dest: &'static Cluster,
    db: String,
    dst: String,
    family: String,
    /// Name of both the slot and the publication.
    slot: String,
}

impl<'a> Fixture<'a> {
    /// Creates both databases; `tables` are created on both sides, owned by `kuvasz`,
    /// as `(id int PRIMARY KEY, v text)`.
    fn new(src: &'a Cluster, tables: &[&str]) -> Fixture<'a> {
        let dest = destination();
        let family = unique_name("setup");
        let f = Fixture {
            src,
            dest,
            db: unique_name("src"),
            dst: unique_name("dst"),
            slot: format!("kuvasz_{family}_{SID}"),
            family,
        };
        src.create_database(&f.db);
        dest.create_database(&f.dst);
        for t in tables {
            f.src_exec(&format!(
                "SET ROLE kuvasz; CREATE TABLE {t} (id int PRIMARY KEY, v text)"
            ));
            f.dest_exec(&format!(
                "SET ROLE kuvasz; CREATE TABLE {t} (id int PRIMARY KEY, v text)"
            ));
        }
        f
    }

    /// What another consumer (or an earlier implementation) would have left: the
    /// publication of `table` and a pgoutput slot, both under the daemon's name.
    fn create_publication_and_slot(&self, table: &str) {
        self.src_exec(&format!(
            "SET ROLE kuvasz; CREATE PUBLICATION {} FOR TABLE {table}",
            self.slot
        ));
        self.src_exec(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            self.slot
        ));
    }

    fn src_exec(&self, sql: &str) {
        self.src.execute(&self.db, sql);
    }

    fn dest_exec(&self, sql: &str) {
        self.dest.execute(&self.dst, sql);
    }

    /// The map of one URL (role `kuvasz`) cloning `tables`.
    fn map(&self, tables: &[&str]) -> String {
        self.map_with_url(&self.src.url(&self.db), tables)
    }

    fn map_with_url(&self, url: &str, tables: &[&str]) -> String {
        let mut map = format!(
            "[[source]]\ndatabase = \"{}\"\nurls = [ {{ url = \"{url}\", sid = \"{SID}\" }} ]\n[source.tables]\n",
            self.family
        );
        for t in tables {
            map.push_str(&format!("{t} = {{}}\n"));
        }
        map
    }

    fn start(&self, tables: &[&str], extra: &[&str]) -> Daemon {
        Daemon::start(&self.dest.url(&self.dst), &self.map(tables), extra)
    }

    /// Rows of source table `t`.
    fn src_rows(&self, t: &str) -> Rows {
        self.src.query(
            &self.db,
            &format!("SELECT id::text, v FROM {t} ORDER BY id"),
        )
    }

    /// Rows of destination table `t`.
    fn dest_rows(&self, t: &str) -> Rows {
        self.dest.query(
            &self.dst,
            &format!("SELECT id::text, v FROM {t} ORDER BY id"),
        )
    }

    /// Waits until destination table `t` holds exactly the source rows.
    fn converge(&self, what: &str, t: &str) {
        let mut last = (Vec::new(), Vec::new());
        let ok = poll(TIMEOUT, || {
            let (expected, actual) = (self.src_rows(t), self.dest_rows(t));
            let same = expected == actual;
            last = (expected, actual);
            same
        });
        assert!(
            ok,
            "{what}: destination {t} never matched the source\nexpected ({} rows): {:?}\nactual ({} rows):   {:?}",
            last.0.len(),
            last.0,
            last.1.len(),
            last.1
        );
    }

    /// The tables the publication names, as `schema.table`.
    fn published(&self) -> Vec<String> {
        self.src
            .query(
                &self.db,
                &format!(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
                     WHERE pubname = '{}' ORDER BY 1",
                    self.slot
                ),
            )
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect()
    }

    /// Whether the publication exists.
    fn publication_exists(&self) -> bool {
        !self
            .src
            .query(
                &self.db,
                &format!(
                    "SELECT 1 FROM pg_publication WHERE pubname = '{}'",
                    self.slot
                ),
            )
            .is_empty()
    }

    /// `(plugin, database)` of the slot, if it exists.
    fn slot_row(&self) -> Rows {
        self.src.query(
            &self.db,
            &format!(
                "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = '{}'",
                self.slot
            ),
        )
    }

    /// `(source_table, target_table, state)` rows of `kvsz_sync_state` for this slot.
    fn sync_state(&self) -> Rows {
        self.dest.query(
            &self.dst,
            &format!(
                "SELECT source_table, target_table, state FROM kvsz_sync_state \
                 WHERE slot_name = '{}' ORDER BY 1",
                self.slot
            ),
        )
    }

    /// Waits until every listed table is marked copied, and nothing else is recorded.
    fn wait_sync_done(&self, tables: &[&str]) {
        let expected: Rows = tables
            .iter()
            .map(|t| row(&[&format!("public.{t}"), &format!("public.{t}"), "done"]))
            .collect();
        let mut last = Vec::new();
        let ok = poll(TIMEOUT, || {
            last = self.sync_state();
            last == expected
        });
        assert!(
            ok,
            "kvsz_sync_state of {}: expected {expected:?}, got {last:?}",
            self.slot
        );
    }

    /// The slot and publication as expected after a successful start: a pgoutput slot
    /// in the source database and a publication naming exactly `tables`.
    fn assert_slot_and_publication(&self, tables: &[&str]) {
        assert_eq!(
            self.slot_row(),
            vec![row(&["pgoutput", &self.db])],
            "slot {}",
            self.slot
        );
        let expected: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
        assert_eq!(self.published(), expected, "publication {}", self.slot);
    }
}

fn row(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the daemon's log contains every one of `needles`.
fn wait_log(daemon: &Daemon, needles: &[&str]) {
    let ok = poll(TIMEOUT, || {
        let log = daemon.log();
        needles.iter().all(|n| log.contains(n))
    });
    assert!(
        ok,
        "daemon log never contained all of {needles:?}; log:\n{}",
        daemon.log()
    );
}

/// How many times the daemon's log (over all its runs) reports copying `table`.
fn copies(daemon: &Daemon, table: &str) -> usize {
    daemon
        .log()
        .matches(&format!("copied public.{table} "))
        .count()
}

/// Writes a new map into a stopped daemon's directory.
fn rewrite_map(dir: &Path, map: &str) {
    std::fs::write(dir.join("map.toml"), map).expect("write map");
}

/// Nothing was created on the source: no publication, no slot, and nothing copied.
fn assert_nothing_created(f: &Fixture, table: &str) {
    assert!(
        !f.publication_exists(),
        "publication {} was created",
        f.slot
    );
    assert_eq!(
        f.src.query(
            &f.db,
            &format!("SELECT pubname::text FROM pg_publication_tables WHERE tablename = '{table}'")
        ),
        Rows::new(),
        "a publication contains {table}"
    );
    assert_eq!(f.slot_row(), Rows::new(), "slot {} was created", f.slot);
    assert_eq!(f.dest_rows(table), Rows::new());
    assert_eq!(f.sync_state(), Rows::new());
}

macro_rules! on_versions {
    ($($name:ident => $f:ident($v:expr)),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $f($v);
            }
        )*
    };
}

// 1. wal_level below logical.

fn wal_level_not_logical(version: u32) {
    let src = support::private_source(version);
    src.execute("postgres", "ALTER SYSTEM SET wal_level = replica");
    src.restart();
    assert_eq!(
        src.query("postgres", "SHOW wal_level"),
        vec![row(&["replica"])]
    );
    let f = Fixture::new(&src, &["items"]);
    f.src_exec("INSERT INTO items VALUES (1, 'a')");
    let daemon = f.start(&["items"], &[]);
    wait_log(&daemon, &["wal_level is 'replica'", "wal_level = logical"]);
    daemon.kill();
    assert_nothing_created(&f, "items");
}

on_versions! {
    wal_level_replica_is_reported_pg18 => wal_level_not_logical(18),
}

// 2. A role without REPLICATION.

fn role_without_replication(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["items"]);
    let role = unique_name("norepl");
    src.execute(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN NOREPLICATION"),
    );
    f.src_exec(&format!(
        "ALTER TABLE items OWNER TO {role}; INSERT INTO items VALUES (1, 'a')"
    ));
    let url = src.url_as(&role, "unused", &f.db);
    let map = f.map_with_url(&url, &["items"]);
    let daemon = Daemon::start(&f.dest.url(&f.dst), &map, &[]);
    wait_log(
        &daemon,
        &[
            "may not open replication connections",
            "ALTER ROLE",
            &format!("role \"{role}\""),
        ],
    );
    daemon.kill();
    assert_nothing_created(&f, "items");
}

on_versions! {
    role_without_replication_is_reported_pg12 => role_without_replication(12),
    role_without_replication_is_reported_pg18 => role_without_replication(18),
}

// 3. A table without primary key or replica identity: tests/shapes.rs, keyless_table.

// 4. The slot is streaming to someone else.

fn slot_in_use(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["items"]);
    f.src_exec("INSERT INTO items VALUES (1, 'a')");
    f.create_publication_and_slot("items");
    // Another consumer holds the slot active for the whole test.
    let info = ConnInfo::parse(&src.url(&f.db)).expect("parse url");
    let mut holder = Endpoint::new(info.clone(), "other_consumer")
        .replication()
        .expect("connect");
    holder
        .start_replication(&f.slot, Lsn::ZERO, &[f.slot.as_str()], 1, false, false)
        .expect("START_REPLICATION");
    let active_pid = |f: &Fixture| {
        f.src.query(
            &f.db,
            &format!(
                "SELECT active_pid::text FROM pg_replication_slots WHERE slot_name = '{}' AND active",
                f.slot
            ),
        )
    };
    let holder_pid = wait_for("the slot to become active", TIMEOUT, || {
        active_pid(&f).into_iter().next()
    });

    let daemon = f.start(&["items"], &[]);
    wait_log(
        &daemon,
        &[&format!(
            "replication slot {} is in use by another process",
            f.slot
        )],
    );
    daemon.kill();
    // Nothing taken over, nothing copied.
    assert_eq!(active_pid(&f), vec![holder_pid]);
    assert_eq!(f.published(), vec!["public.items".to_string()]);
    assert_eq!(f.dest_rows("items"), Rows::new());
    assert_eq!(f.sync_state(), Rows::new());
    drop(holder);
}

on_versions! {
    slot_in_use_is_reported_pg18 => slot_in_use(18),
}

// 5. A slot without its publication.

fn slot_without_publication(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["items"]);
    f.src_exec("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 300) g");
    f.src_exec(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        f.slot
    ));
    // Written after the orphaned slot's start: the copy must still hold them.
    f.src_exec("INSERT INTO items VALUES (1000, 'after slot'); DELETE FROM items WHERE id = 7");
    let daemon = f.start(&["items"], &[]);
    wait_log(&daemon, &[&format!("slot {} has no publication", f.slot)]);
    f.converge("initial sync", "items");
    f.wait_sync_done(&["items"]);
    f.assert_slot_and_publication(&["items"]);
    f.src_exec(
        "INSERT INTO items VALUES (1001, 'streamed'); UPDATE items SET v = 'u' WHERE id = 3",
    );
    f.converge("streaming", "items");
    assert_eq!(f.dest_rows("items").len(), 301);
    daemon.stop_ok();
}

on_versions! {
    slot_without_publication_is_repaired_pg12 => slot_without_publication(12),
    slot_without_publication_is_repaired_pg18 => slot_without_publication(18),
}

// 6. A publication without its slot, naming other tables than the map.

fn publication_without_slot(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["items", "other"]);
    f.src_exec("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 200) g");
    f.src_exec("INSERT INTO other VALUES (1, 'unmapped')");
    f.src_exec(&format!(
        "SET ROLE kuvasz; CREATE PUBLICATION {} FOR TABLE other",
        f.slot
    ));
    let daemon = f.start(&["items"], &[]);
    f.converge("initial sync", "items");
    f.wait_sync_done(&["items"]);
    f.assert_slot_and_publication(&["items"]);
    f.src_exec(
        "INSERT INTO items VALUES (500, 'streamed'); DELETE FROM items WHERE id = 1; \
         INSERT INTO other VALUES (2, 'unmapped')",
    );
    f.converge("streaming", "items");
    assert_eq!(f.dest_rows("items").len(), 200);
    assert_eq!(f.dest_rows("other"), Rows::new());
    daemon.stop_ok();
    assert_eq!(f.published(), vec!["public.items".to_string()]);
}

on_versions! {
    publication_without_slot_is_repaired_pg12 => publication_without_slot(12),
    publication_without_slot_is_repaired_pg18 => publication_without_slot(18),
}

// 7. The map changes between runs.

fn map_change_between_runs(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["a", "b"]);
    f.src_exec("INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 100) g");
    f.src_exec("INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 50) g");

    // Run 1: only a.
    let daemon = f.start(&["a"], &[]);
    f.converge("run 1: a copied", "a");
    f.wait_sync_done(&["a"]);
    f.assert_slot_and_publication(&["a"]);
    f.src_exec("INSERT INTO a VALUES (101, 'streamed in run 1')");
    f.converge("run 1: a streamed", "a");
    assert_eq!(f.dest_rows("b"), Rows::new());
    let dir = daemon.stop_ok();

    // While stopped: changes to a (to be streamed from the slot) and to b (to be
    // copied when b enters the map).
    f.src_exec(
        "INSERT INTO a SELECT g, 'while stopped' FROM generate_series(102, 120) g; \
         UPDATE a SET v = 'updated while stopped' WHERE id <= 5; DELETE FROM a WHERE id = 50",
    );
    f.src_exec("INSERT INTO b VALUES (51, 'while stopped'); DELETE FROM b WHERE id = 1");

    // Run 2: a and b.
    rewrite_map(&dir, &f.map(&["a", "b"]));
    let daemon = Daemon::spawn(dir);
    f.converge("run 2: b copied", "b");
    f.converge("run 2: a streamed", "a");
    f.wait_sync_done(&["a", "b"]);
    f.assert_slot_and_publication(&["a", "b"]);
    f.src_exec("INSERT INTO a VALUES (121, 'run 2'); INSERT INTO b VALUES (52, 'run 2')");
    f.converge("run 2: a streamed", "a");
    f.converge("run 2: b streamed", "b");
    assert_eq!(f.dest_rows("a").len(), 120);
    assert_eq!(f.dest_rows("b").len(), 51);
    // Only the table that entered the publication was copied again.
    assert_eq!((copies(&daemon, "a"), copies(&daemon, "b")), (1, 1));
    let dir = daemon.stop_ok();

    // Run 3: only b. a leaves the publication and the sync state; its target keeps
    // what it had and receives nothing more.
    let a_before = f.dest_rows("a");
    f.src_exec("INSERT INTO b VALUES (53, 'while stopped 2')");
    rewrite_map(&dir, &f.map(&["b"]));
    let daemon = Daemon::spawn(dir);
    f.converge("run 3: b streamed", "b");
    f.wait_sync_done(&["b"]);
    f.assert_slot_and_publication(&["b"]);
    // a's change comes first in the WAL: once b's later one arrived, a's was skipped.
    f.src_exec("INSERT INTO a VALUES (122, 'unmapped')");
    f.src_exec("INSERT INTO b VALUES (54, 'run 3')");
    f.converge("run 3: b streamed after a's change", "b");
    assert_eq!(f.dest_rows("a"), a_before);
    assert_eq!((copies(&daemon, "a"), copies(&daemon, "b")), (1, 1));
    daemon.stop_ok();
    assert_eq!(f.published(), vec!["public.b".to_string()]);
    assert_eq!(
        f.sync_state(),
        vec![row(&["public.b", "public.b", "done"])],
        "kvsz_sync_state keeps no row for a"
    );
}

on_versions! {
    map_change_between_runs_pg12 => map_change_between_runs(12),
    map_change_between_runs_pg13 => map_change_between_runs(13),
    map_change_between_runs_pg14 => map_change_between_runs(14),
    map_change_between_runs_pg15 => map_change_between_runs(15),
    map_change_between_runs_pg16 => map_change_between_runs(16),
    map_change_between_runs_pg17 => map_change_between_runs(17),
    map_change_between_runs_pg18 => map_change_between_runs(18),
}

// 8. A crash in the middle of the initial copy.

fn crash_mid_sync(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["big"]);
    f.src_exec("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g");
    // 200 000 rows at 50 000 rows/s: the copy takes about 4 s.
    let extra = ["sync_rate = 50000.0", "sync_burst = 1000"];
    let daemon = f.start(&["big"], &extra);
    wait_log(&daemon, &["created slot"]);
    // A change after the slot's start, during the copy.
    f.src_exec("UPDATE big SET v = 'during copy' WHERE id % 10000 = 0");
    std::thread::sleep(Duration::from_secs(1));
    let log = daemon.log();
    assert!(
        !log.contains("copied public.big"),
        "the copy finished before the kill; log:\n{log}"
    );
    let dir = daemon.kill();

    // The copy is one destination transaction: nothing of it is visible, and the table
    // is still pending.
    let count = || {
        f.dest
            .query(&f.dst, "SELECT count(*)::text FROM big")
            .remove(0)
            .remove(0)
            .unwrap()
    };
    assert_eq!(count(), "0");
    assert_eq!(
        f.sync_state(),
        vec![row(&["public.big", "public.big", "pending"])]
    );

    // While stopped.
    f.src_exec(
        "INSERT INTO big SELECT g, 'while stopped' FROM generate_series(200001, 200100) g; \
         UPDATE big SET v = 'updated while stopped' WHERE id % 7777 = 0; \
         DELETE FROM big WHERE id % 9999 = 0",
    );
    let daemon = Daemon::spawn(dir);
    f.converge("sync redone after the crash", "big");
    f.wait_sync_done(&["big"]);
    f.assert_slot_and_publication(&["big"]);
    let expected = f.src.query(&f.db, "SELECT count(*)::text FROM big")[0][0]
        .clone()
        .unwrap();
    assert_eq!(count(), expected);
    f.src_exec("INSERT INTO big VALUES (300000, 'streamed')");
    f.converge("streaming after the redone sync", "big");
    assert_eq!(copies(&daemon, "big"), 1);
    daemon.stop_ok();
}

on_versions! {
    crash_mid_sync_is_redone_pg18 => crash_mid_sync(18),
}

// 9. A slot and publication left by the Go implementation (no sync state of ours): the
// daemon adopts them and streams from where they stopped, without copying again.

fn adopt_existing_slot(version: u32) {
    let src = source(version);
    let f = Fixture::new(src, &["items"]);
    f.src_exec("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g");
    // What the earlier implementation left: its publication, its slot, the rows it copied.
    f.create_publication_and_slot("items");
    f.dest_exec("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g");
    // Changes after the slot's position while nothing ran: the slot still holds them.
    f.src_exec(
        "INSERT INTO items VALUES (500, 'after'); UPDATE items SET v = 'u' WHERE id = 5; \
         DELETE FROM items WHERE id = 9",
    );
    let daemon = f.start(&["items"], &[]);
    wait_log(&daemon, &[&format!("adopted existing slot {}", f.slot)]);
    f.converge("adopted slot", "items");
    f.wait_sync_done(&["items"]);
    assert_eq!(
        copies(&daemon, "items"),
        0,
        "an adopted table is not copied again"
    );
    assert_eq!(f.dest_rows("items").len(), 100);
    daemon.stop_ok();
}

on_versions! {
    go_deployment_is_adopted_pg12 => adopt_existing_slot(12),
    go_deployment_is_adopted_pg18 => adopt_existing_slot(18),
}

// 10. SIGTERM while CREATE_REPLICATION_SLOT waits for a transaction running on the
// source: the daemon still stops (exit 0) instead of waiting for that transaction, and
// the next start copies everything, the rows of that transaction included.

fn stop_while_creating_slot(version: u32) {
    // A private server: the open transaction would stall every slot creation of the
    // shared one.
    let src = support::private_source(version);
    let f = Fixture::new(&src, &["items"]);
    f.src_exec("INSERT INTO items VALUES (1, 'before')");
    let mut holder = src.client(&f.db);
    holder
        .batch_execute("BEGIN; INSERT INTO items VALUES (2, 'open transaction')")
        .expect("open a transaction");

    let daemon = f.start(&["items"], &[]);
    wait_for("CREATE_REPLICATION_SLOT to wait", TIMEOUT, || {
        let waiting = src.query(
            &f.db,
            "SELECT count(*)::text FROM pg_stat_activity \
             WHERE backend_type = 'walsender' AND query LIKE 'CREATE_REPLICATION_SLOT%'",
        );
        (waiting == vec![row(&["1"])]).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let dir = daemon.stop_ok();
    let stopped_in = started.elapsed();
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("did not stop within") && log.contains("CREATE_REPLICATION_SLOT"),
        "stopped in {stopped_in:?} without reporting the stuck source; log:\n{log}"
    );
    assert_eq!(f.dest_rows("items"), Rows::new());
    assert_eq!(
        f.sync_state(),
        vec![row(&["public.items", "public.items", "pending"])]
    );

    holder.batch_execute("COMMIT").expect("commit");
    f.src_exec("INSERT INTO items VALUES (3, 'after')");
    let daemon = Daemon::spawn(dir);
    f.converge("copy after the interrupted slot creation", "items");
    f.wait_sync_done(&["items"]);
    assert_eq!(
        f.dest_rows("items"),
        vec![
            row(&["1", "before"]),
            row(&["2", "open transaction"]),
            row(&["3", "after"]),
        ]
    );
    f.src_exec("UPDATE items SET v = 'streamed' WHERE id = 2");
    f.converge("streaming after the copy", "items");
    daemon.stop_ok();
}

on_versions! {
    stop_while_slot_creation_waits_pg12 => stop_while_creating_slot(12),
    stop_while_slot_creation_waits_pg18 => stop_while_creating_slot(18),
}
