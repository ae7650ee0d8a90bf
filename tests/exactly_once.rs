//! Each change is applied exactly once (SPEC §4), whatever crash comes: the position up
//! to which every writer applied a source's changes is committed with them
//! (`kvsz_progress`), and a replay after a crash skips what is there. Key-less tables
//! and REPLICA IDENTITY FULL tables, which nothing else protects from a second apply,
//! and history targets, end exactly equal to their source after SIGKILLs under load.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::daemon::Daemon;
use support::{crash_load, destination, source, unique_name, wait_confirmed, wait_for, Rows};

const SOURCE: &str = "SET ROLE kuvasz; \
    CREATE TABLE events (n int, batch int, v text); \
    CREATE TABLE fullrows (n int, v text); ALTER TABLE fullrows REPLICA IDENTITY FULL; \
    CREATE TABLE hist (id int PRIMARY KEY, v int); \
    INSERT INTO hist SELECT g, 0 FROM generate_series(1, 20) g; \
    CREATE TABLE moves (id int PRIMARY KEY, doc text); \
    ALTER TABLE moves ALTER doc SET STORAGE EXTERNAL; \
    INSERT INTO moves SELECT g, repeat(md5(g::text), 100) FROM generate_series(1, 20) g";

const TARGET: &str = "SET ROLE kuvasz; \
    CREATE TABLE events (n int, batch int, v text); \
    CREATE TABLE fullrows (n int, v text); \
    CREATE TABLE hist (id int, v int, kvsz_start timestamptz, kvsz_end timestamptz, \
                       kvsz_deleted boolean); \
    CREATE TABLE moves (id int PRIMARY KEY, doc text)";

/// Rows of `sql` on both sides, once the slot has confirmed everything.
fn same(src: &support::Cluster, db: &str, dest: &support::Cluster, ddb: &str, sql: &str) {
    let (expected, actual): (Rows, Rows) = (src.query(db, sql), dest.query(ddb, sql));
    assert!(
        expected == actual,
        "{sql}\nsource ({} rows): {:?}\ntarget ({} rows): {:?}",
        expected.len(),
        &expected[..expected.len().min(20)],
        actual.len(),
        &actual[..actual.len().min(20)]
    );
}

/// Four SIGKILLs and two graceful stops (SIGTERM), each once the target has grown since
/// the last start, while a session commits 50-row inserts into a key-less and a FULL
/// table, updates history rows, and moves a row whose TOASTed value stays unchanged to
/// a new key while a new row takes its old one (a move replayed would take that row).
fn kills_under_load(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("eo"), unique_name("eod"), unique_name("eo"));
    src.create_database(&db);
    src.execute(&db, SOURCE);
    dest.create_database(&ddb);
    dest.execute(&ddb, TARGET);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nevents = {{}}\nfullrows = {{}}\nhist = {{ type = \"history\" }}\n\
         moves = {{}}\n",
        src.url(&db)
    );
    let mut daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 2"]);
    daemon.wait_streaming(1);

    let done = Arc::new(AtomicBool::new(false));
    let workload = {
        let mut client = src.client(&db);
        let done = done.clone();
        std::thread::spawn(move || {
            let mut i: i64 = 0;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                client
                    .batch_execute(&format!(
                        "BEGIN; \
                         INSERT INTO events SELECT g, {i}, 'e' FROM generate_series(1, 50) g; \
                         INSERT INTO fullrows SELECT g % 10, 'f{}' FROM generate_series(1, 50) g; \
                         UPDATE hist SET v = v + 1 WHERE id = {k}; \
                         UPDATE moves SET id = -{i} WHERE id = {k}; \
                         INSERT INTO moves VALUES ({k}, repeat(md5('{i}'), 100)); \
                         COMMIT",
                        i % 7,
                        k = 1 + i % 20
                    ))
                    .expect("workload");
            }
            i
        })
    };
    let count = || -> i64 {
        dest.query(&ddb, "SELECT count(*) FROM events")[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0)
    };
    for n in 0..6 {
        // Killed while changes stream in: the target grew since this run started.
        let at_start = count();
        wait_for("rows arriving", Duration::from_secs(60), || {
            (count() >= at_start + 2000).then_some(())
        });
        assert!(
            daemon.running(),
            "daemon died on its own:\n{}",
            daemon.log()
        );
        let dir = if n % 3 == 2 {
            daemon.stop_by(libc::SIGTERM, Duration::from_secs(15))
        } else {
            daemon.kill()
        };
        daemon = Daemon::spawn(dir);
    }
    let at_start = count();
    wait_for("rows arriving", Duration::from_secs(60), || {
        (count() >= at_start + 2000).then_some(())
    });
    done.store(true, Ordering::Relaxed);
    let txns = workload.join().expect("workload thread");
    assert!(txns > 100, "workload too small: {txns}");
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));

    // Every transaction's 50 rows once, no more.
    same(
        src,
        &db,
        dest,
        &ddb,
        "SELECT batch, count(*) FROM events GROUP BY batch HAVING count(*) <> 50 ORDER BY 1",
    );
    same(src, &db, dest, &ddb, "SELECT count(*) FROM events");
    same(
        src,
        &db,
        dest,
        &ddb,
        "SELECT n, v, count(*) FROM fullrows GROUP BY n, v ORDER BY n, v",
    );
    // Each move once: every row at its key with its own value.
    same(
        src,
        &db,
        dest,
        &ddb,
        "SELECT id, md5(doc) FROM moves ORDER BY id",
    );
    // One version per update of each key, the current one with the source's value.
    let versions = dest.query(
        &ddb,
        "SELECT id, count(*)::int - 1, max(v) FILTER (WHERE kvsz_end > '9000-01-01') \
         FROM hist GROUP BY id ORDER BY id",
    );
    let expected = src.query(&db, "SELECT id, v, v FROM hist ORDER BY id");
    assert_eq!(versions, expected, "history: (id, versions - 1, current v)");
    daemon.stop_ok();
}

every_major! { kills_under_load:
    kills_under_load_pg12 => 12,
    kills_under_load_pg18 => 18,
}

/// `on_error = stop` holds a source at the refused change, and nothing of that source
/// from there on lands before it: the rest of its transaction waits for the retry,
/// which applies everything once, in source order, after the operator's fix (here a
/// later version of the same history key, which must not close the held one's place).
fn held_row_keeps_its_order(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("eh"), unique_name("ehd"), unique_name("eh"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE hist (id int PRIMARY KEY, v int); \
         INSERT INTO hist VALUES (1, 0), (2, 0)",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE hist (id int, v int CHECK (v >= 0), \
         kvsz_start timestamptz, kvsz_end timestamptz, kvsz_deleted boolean)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nhist = {{ type = \"history\" }}\n",
        src.url(&db)
    );
    // One writer: the refused change and the rest of its transaction share a batch.
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 1"]);
    daemon.wait_streaming(1);
    src.execute(
        &db,
        "BEGIN; UPDATE hist SET v = 7 WHERE id = 2; UPDATE hist SET v = -1 WHERE id = 1; \
         UPDATE hist SET v = 5 WHERE id = 1; COMMIT",
    );
    let versions = |id: i32| {
        dest.query(
            &ddb,
            &format!(
                "SELECT v::text, (kvsz_end > '9000-01-01')::text FROM hist WHERE id = {id} \
                 ORDER BY kvsz_start, kvsz_end"
            ),
        )
    };
    let s = |v: &str| Some(v.to_string());
    // The batch committed what came before the refused change, nothing after it.
    wait_for(
        "the change before the refused one",
        Duration::from_secs(30),
        || (versions(2).len() == 2).then_some(()),
    );
    assert_eq!(versions(1), vec![vec![s("0"), s("true")]]);
    dest.execute(&ddb, "ALTER TABLE hist DROP CONSTRAINT hist_v_check");
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));
    assert_eq!(
        versions(1),
        vec![
            vec![s("0"), s("false")],
            vec![s("-1"), s("false")],
            vec![s("5"), s("true")],
        ]
    );
    assert_eq!(
        versions(2),
        vec![vec![s("0"), s("false")], vec![s("7"), s("true")]]
    );
    daemon.stop_ok();
}

every_major! { held_row_keeps_its_order:
    held_row_keeps_its_order_pg12 => 12,
    held_row_keeps_its_order_pg18 => 18,
}

/// A change applied alone (here a TRUNCATE, which every writer must have committed up
/// to) never overtakes a change held by `on_error = stop`: a refused INSERT, then a
/// TRUNCATE and another INSERT; while held, the target keeps its copied rows; after the
/// fix, it ends as the source, the refused row gone with the TRUNCATE.
fn held_row_before_a_truncate(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("et"), unique_name("etd"), unique_name("et"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v int); \
         INSERT INTO t SELECT g, g FROM generate_series(100, 120) g",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v int CHECK (v >= 0))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 3"]);
    let slot = format!("kuvasz_{family}_s");
    support::wait_slot_active(src, &db, &slot);
    let walsender = || {
        src.query(
            &db,
            &format!(
                "SELECT active_pid::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        )[0][0]
            .clone()
    };
    let first = walsender();
    src.execute(&db, "INSERT INTO t VALUES (1, -1)");
    src.execute(&db, "TRUNCATE t");
    src.execute(&db, "INSERT INTO t VALUES (2, 5)");
    // Held: the stream was stopped (and started again, to be refused again).
    wait_for(
        "the source held and restarted",
        Duration::from_secs(30),
        || {
            let now = walsender();
            (now.is_some() && now != first).then_some(())
        },
    );
    let count = || dest.query(&ddb, "SELECT count(*)::text FROM t")[0][0].clone();
    assert_eq!(
        count(),
        Some("21".to_string()),
        "the TRUNCATE overtook the held row"
    );
    dest.execute(&ddb, "ALTER TABLE t DROP CONSTRAINT t_v_check");
    wait_confirmed(src, &db, &slot);
    same(src, &db, dest, &ddb, "SELECT id, v FROM t ORDER BY id");
    daemon.stop_ok();
}

every_major! { held_row_before_a_truncate:
    held_row_before_a_truncate_pg12 => 12,
    held_row_before_a_truncate_pg18 => 18,
}

/// SPEC §4's crash loop: 20 SIGKILLs under a two-source workload on clone, append,
/// key-less, FULL and history tables, the source server restarted after the 7th and
/// the destination after the 14th, the pool 2, 3 or 4 writers from one life to the
/// next; every target ends exactly equal to its source.
#[test]
fn crash_loop() {
    let version = *support::versions().last().expect("a version");
    let src = support::private_source(version);
    let dest = support::private_destination();
    let family = unique_name("cl");
    let dbs = [unique_name("cla"), unique_name("clb")];
    let ddb = unique_name("cld");
    for db in &dbs {
        src.create_database(db);
        src.execute(db, crash_load::SOURCE);
    }
    dest.create_database(&ddb);
    dest.execute(&ddb, crash_load::TARGET);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, \
         {{ url = \"{}\", sid = \"b\" }} ]\n[source.tables]\nacct = {{}}\n\
         ledger = {{ type = \"append\" }}\nevents = {{}}\nfullrows = {{}}\n\
         hist = {{ type = \"history\" }}\n",
        src.url(&dbs[0]),
        src.url(&dbs[1])
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 3"]);
    daemon.wait_streaming(2);
    let mut daemon = Some(daemon);
    let done = AtomicBool::new(false);
    let count = || -> i64 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dest.query(&ddb, "SELECT count(*) FROM events")
        }));
        r.ok()
            .and_then(|r| r[0][0].as_deref().and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    let txns: Vec<i64> = std::thread::scope(|s| {
        let sessions: Vec<_> = dbs
            .iter()
            .map(|db| s.spawn(|| crash_load::workload(&src, db, &done)))
            .collect();
        for n in 1..=20 {
            // Killed while changes stream in: the target grew since this run started.
            let at_start = count();
            wait_for("rows arriving", Duration::from_secs(90), || {
                (count() >= at_start + 400).then_some(())
            });
            let mut d = daemon.take().expect("a daemon");
            assert!(d.running(), "daemon died on its own:\n{}", d.log());
            let dir = d.kill();
            match n {
                7 => src.restart(),
                14 => dest.restart(),
                _ => {}
            }
            // The pool size changes between crashes: routing, and so the positions
            // each writer records, depend on it.
            let conf = dir.join("kuvasz-streamer.toml");
            let text = std::fs::read_to_string(&conf).expect("read config");
            let workers = [3, 2, 4][n % 3];
            let text: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("num_workers") {
                        format!("num_workers = {workers}")
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            std::fs::write(&conf, text.join("\n") + "\n").expect("write config");
            daemon = Some(Daemon::spawn(dir));
        }
        let at_start = count();
        wait_for("rows arriving", Duration::from_secs(90), || {
            (count() >= at_start + 400).then_some(())
        });
        done.store(true, Ordering::Relaxed);
        sessions
            .into_iter()
            .map(|h| h.join().expect("workload thread"))
            .collect()
    });
    assert!(
        txns.iter().all(|&n| n > 100),
        "workload too small: {txns:?}"
    );
    let mut compared = 0;
    for (db, sid) in dbs.iter().zip(["a", "b"]) {
        wait_confirmed(&src, db, &format!("kuvasz_{family}_{sid}"));
        compared += crash_load::compare(&src, db, &dest, &ddb, sid);
    }
    eprintln!(
        "crash loop: 20 SIGKILLs, a source and a destination restart, {} transactions \
         committed (per sid {txns:?}), {compared} grouped rows compared: 0 lost, 0 doubled",
        txns.iter().sum::<i64>()
    );
    daemon.expect("a daemon").stop_ok();
}

/// A deployment of the release before keyed `kvsz_progress` by (slot, writer), so a pool
/// of another size overwrote positions a replay still needed: the first start re-keys
/// it by (slot, pool size, writer), keeping its rows, and positions of two pool sizes
/// then live side by side.
#[test]
fn progress_of_the_release_before_is_rekeyed() {
    let version = *support::versions().last().expect("a version");
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("rk"), unique_name("rkd"), unique_name("rk"));
    src.create_database(&db);
    src.execute(&db, SOURCE);
    dest.create_database(&ddb);
    dest.execute(&ddb, TARGET);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE kvsz_progress (slot_name text NOT NULL, writer int NOT NULL, \
         writers int NOT NULL, commit_lsn pg_lsn NOT NULL, seq bigint NOT NULL, \
         updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (slot_name, writer)); \
         INSERT INTO kvsz_progress VALUES ('kuvasz_gone_x', 0, 7, '0/10', 0)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }} ]\n\
         [source.tables]\nevents = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 2"]);
    support::wait_slot_active(src, &db, &format!("kuvasz_{family}_a"));
    src.execute(&db, "INSERT INTO events VALUES (1, 1, 'x')");
    wait_confirmed(src, &db, &format!("kuvasz_{family}_a"));
    let key = "SELECT string_agg(a.attname, ', ' ORDER BY k.n) FROM pg_constraint c \
               CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(att, n) \
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att \
               WHERE c.conrelid = 'kvsz_progress'::regclass AND c.contype = 'p'";
    assert_eq!(
        dest.query(&ddb, key),
        [[Some("slot_name, writers, writer".to_string())]]
    );
    // The old row kept; this slot's positions recorded with the pool size 2.
    assert_eq!(
        dest.query(
            &ddb,
            &format!(
                "SELECT count(*) FILTER (WHERE slot_name = 'kuvasz_gone_x' AND writers = 7)::text, \
                 bool_and(writers = 2) FILTER (WHERE slot_name = 'kuvasz_{family}_a')::text \
                 FROM kvsz_progress"
            )
        ),
        [[Some("1".to_string()), Some("true".to_string())]]
    );
    daemon.stop_ok();
}
