//! A fault's class decides its scope (see `src/fault.rs`): a target table the
//! destination will not let the daemon write holds only the sources that write it, never
//! the writer pool, whatever `on_error` says; a full disk under a target holds the pool,
//! parks no row, is named by `/readyz`, and passes once there is room.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, http, source, unique_name, wait_for};

/// Rows of `sql` on `db` of `c`, as text.
fn rows(c: &support::Cluster, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    c.query(db, sql)
}

fn walsender(src: &support::Cluster, db: &str, slot: &str) -> Option<String> {
    rows(
        src,
        db,
        &format!("SELECT active_pid::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
    .first()
    .and_then(|r| r[0].clone())
}

fn table_error_holds_only_its_sources(version: u32) {
    let src = source(version);
    let dest = destination();
    let (fa, fb) = (unique_name("sca"), unique_name("scb"));
    let dbs = [unique_name("sa"), unique_name("sb"), unique_name("sc")];
    for db in &dbs {
        src.create_database(db);
        src.execute(
            db,
            "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v int)",
        );
    }
    src.execute(
        &dbs[0],
        "SET ROLE kuvasz; CREATE TABLE bad (id int PRIMARY KEY, v int)",
    );
    let ddb = unique_name("scd");
    dest.create_database(&ddb);
    // bad belongs to the superuser: the daemon writes it by a grant an operator revokes.
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v int, PRIMARY KEY (sid, id)); \
         RESET ROLE; CREATE TABLE bad (sid text, id int, v int, PRIMARY KEY (sid, id)); \
         GRANT ALL ON bad TO kuvasz",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{fa}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }} ]\n\
         [source.tables]\nt = {{}}\nbad = {{}}\n\
         [[source]]\ndatabase = \"{fb}\"\nurls = [ {{ url = \"{}\", sid = \"b\" }}, \
         {{ url = \"{}\", sid = \"c\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&dbs[0]),
        src.url(&dbs[1]),
        src.url(&dbs[2])
    );
    let daemon = Daemon::start(
        &dest.url(&ddb),
        &map,
        &["on_error = \"deadletter\"", "num_workers = 2"],
    );
    let addr = http::address(&daemon);
    let slots = [
        format!("kuvasz_{fa}_a"),
        format!("kuvasz_{fb}_b"),
        format!("kuvasz_{fb}_c"),
    ];
    for (db, slot) in dbs.iter().zip(&slots) {
        support::wait_slot_active(src, db, slot);
    }
    let pids: Vec<Option<String>> = dbs
        .iter()
        .zip(&slots)
        .map(|(db, slot)| walsender(src, db, slot))
        .collect();
    let target = |sql: &str| {
        rows(dest, &ddb, sql)
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
    };
    for db in &dbs {
        src.execute(db, "INSERT INTO t VALUES (1, 1)");
    }
    src.execute(&dbs[0], "INSERT INTO bad VALUES (1, 1)");
    wait_for("the first rows", Duration::from_secs(60), || {
        (target("SELECT sid, id FROM t ORDER BY sid, id") == ["a 1", "b 1", "c 1"]
            && target("SELECT sid, id FROM bad") == ["a 1"])
        .then_some(())
    });

    dest.execute(&ddb, "REVOKE INSERT, UPDATE, DELETE ON bad FROM kuvasz");
    src.execute(
        &dbs[0],
        "BEGIN; INSERT INTO bad VALUES (2, 2); INSERT INTO t VALUES (2, 2); COMMIT",
    );
    src.execute(&dbs[0], "INSERT INTO t VALUES (3, 3)");
    let refused = Instant::now();
    // a is held at its refused change; b and c stream on, untouched.
    let status = wait_for("a held by its table", Duration::from_secs(60), || {
        let (_, status) = http::get(&addr, "/api/status");
        status
            .contains("\"class\":\"table_definition\"")
            .then_some(status)
    });
    assert!(
        status.contains("permission denied for table bad (SQLSTATE 42501)"),
        "{status}"
    );
    eprintln!("held after {:.1?}", refused.elapsed());
    for i in 10..15 {
        src.execute(&dbs[1], &format!("INSERT INTO t VALUES ({i}, {i})"));
        src.execute(&dbs[2], &format!("INSERT INTO t VALUES ({i}, {i})"));
        let want = format!("{i}");
        wait_for("b and c streaming on", Duration::from_secs(20), || {
            let got = target(&format!("SELECT sid FROM t WHERE id = {want} ORDER BY sid"));
            (got == ["b", "c"]).then_some(())
        });
    }
    // Held: the refused change is not applied (nor parked, below).
    assert_eq!(target("SELECT id FROM bad ORDER BY id"), ["1"]);
    // A table's problem parks nothing, whatever on_error says.
    assert_eq!(
        target("SELECT count(*) FROM kvsz_deadletter"),
        ["0"],
        "a row was parked for its table's fault"
    );
    assert_eq!(
        walsender(src, &dbs[1], &slots[1]),
        pids[1],
        "b was restarted"
    );
    assert_eq!(
        walsender(src, &dbs[2], &slots[2]),
        pids[2],
        "c was restarted"
    );
    let (code, ready) = http::get(&addr, "/readyz");
    assert_eq!(code, 503, "{ready}");
    // Between two attempts the held source waits (retrying), starts again (starting),
    // or replays up to its held change (retrying … replaying): named with its hold in
    // every one.
    assert!(
        ["retrying", "starting"]
            .iter()
            .any(|state| ready.contains(&format!(
                "source {fa}/a is {state} (held by a target table's definition): writer "
            ))),
        "{ready}"
    );

    dest.execute(&ddb, "GRANT ALL ON bad TO kuvasz");
    support::wait_confirmed(src, &dbs[0], &slots[0]);
    wait_for("a applied after the fix", Duration::from_secs(60), || {
        (target("SELECT sid, id FROM t WHERE sid = 'a' ORDER BY id") == ["a 1", "a 2", "a 3"]
            && target("SELECT sid, id, v FROM bad ORDER BY id") == ["a 1 1", "a 2 2"])
        .then_some(())
    });
    assert_eq!(target("SELECT count(*) FROM kvsz_deadletter"), ["0"]);
    assert_eq!(
        walsender(src, &dbs[1], &slots[1]),
        pids[1],
        "b was restarted"
    );
    assert!(
        !daemon.log().contains("restarting all sources"),
        "the pool restarted:\n{}",
        daemon.log()
    );
    daemon.stop_ok();
}

every_major! { table_error_holds_only_its_sources:
    table_error_holds_only_its_sources_pg12 => 12,
    table_error_holds_only_its_sources_pg18 => 18,
}

/// A tmpfs mounted for the test, unmounted when dropped (after the server using it).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = support::scratch_dir("tmpfs");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs on {}", dir.display());
        support::give_to_server(&dir);
        Tmpfs(dir)
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(ok.success(), "resize the tmpfs on {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_parks_nothing() {
    let src = source(*support::versions().last().expect("a version"));
    let disk = Tmpfs::mount("3m");
    let dest = support::private_destination();
    let (db, ddb) = (unique_name("fd"), unique_name("fdd"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v text)",
    );
    dest.create_database(&ddb);
    dest.execute(
        "postgres",
        &format!("CREATE TABLESPACE small LOCATION '{}'", disk.0.display()),
    );
    dest.execute("postgres", "GRANT CREATE ON TABLESPACE small TO kuvasz");
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (id int, v text, \
         PRIMARY KEY (id) USING INDEX TABLESPACE small) TABLESPACE small",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n\
         [source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["on_error = \"deadletter\""]);
    let addr = http::address(&daemon);
    let slot = format!("kuvasz_{db}_1");
    support::wait_slot_active(src, &db, &slot);
    wait_for("ready", Duration::from_secs(60), || {
        (http::get(&addr, "/readyz").0 == 200).then_some(())
    });
    // About 6 MB of rows for a 3 MB disk, in transactions of 500.
    for b in 0..12 {
        src.execute(
            &db,
            &format!(
                "INSERT INTO t SELECT g, repeat(md5(g::text), 30) \
                 FROM generate_series({}, {}) g",
                b * 500 + 1,
                b * 500 + 500
            ),
        );
    }
    let full = Instant::now();
    let ready = wait_for("the full disk named", Duration::from_secs(90), || {
        let (code, body) = http::get(&addr, "/readyz");
        (code == 503 && body.contains("SQLSTATE 53100")).then_some(body)
    });
    eprintln!("full disk reported after {:.1?}", full.elapsed());
    assert!(
        ready.starts_with("{\"ready\":false,\"reasons\":[\"waiting for the destination: writer "),
        "{ready}"
    );
    let deadletters =
        || dest.query(&ddb, "SELECT count(*)::text FROM kvsz_deadletter")[0][0].clone();
    assert_eq!(
        deadletters(),
        Some("0".to_string()),
        "a row was parked for a full disk"
    );
    let (_, status) = http::get(&addr, "/api/status");
    assert!(
        status.contains("\"destination_error\":{\"at\":")
            && status.contains("\"class\":\"destination_unavailable\""),
        "{status}"
    );

    disk.resize("64m");
    let room = Instant::now();
    let count = || dest.query(&ddb, "SELECT count(*)::text FROM t")[0][0].clone();
    wait_for(
        "every row after room was made",
        Duration::from_secs(120),
        || (count() == Some("6000".to_string())).then_some(()),
    );
    eprintln!("converged {:.1?} after room was made", room.elapsed());
    let body = wait_for("ready again", Duration::from_secs(60), || {
        let (code, body) = http::get(&addr, "/readyz");
        (code == 200).then_some(body)
    });
    assert_eq!(body, "{\"ready\":true,\"reasons\":[]}\n");
    assert_eq!(deadletters(), Some("0".to_string()));
    daemon.stop_ok();
    drop(dest);
}

/// A slot the source invalidated (it kept more WAL than `max_slot_wal_keep_size`) holds
/// its source, named with what to do; `app.on_slot_lost = "recopy"` drops it and copies
/// the source's tables again.
#[test]
fn invalidated_slot_is_held_or_recopied_pg18() {
    let src = support::private_source(18);
    src.execute(
        "postgres",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
    );
    src.execute("postgres", "SELECT pg_reload_conf()");
    let dest = destination();
    let (db, ddb) = (unique_name("sl"), unique_name("sld"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v int); \
         CREATE TABLE junk (n int); INSERT INTO t SELECT g, g FROM generate_series(1, 10) g",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v int)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n\
         [source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let slot = format!("kuvasz_{db}_1");
    support::wait_slot_active(&src, &db, &slot);
    let count = || dest.query(&ddb, "SELECT count(*)::text FROM t")[0][0].clone();
    wait_for("the first copy", Duration::from_secs(60), || {
        (count() == Some("10".to_string())).then_some(())
    });
    let dir = daemon.stop_ok();

    // Changes the slot will never give, then WAL past its limit.
    src.execute(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(11, 20) g",
    );
    wait_for("the slot invalidated", Duration::from_secs(60), || {
        src.execute(
            &db,
            "INSERT INTO junk SELECT generate_series(1, 1000); SELECT pg_switch_wal(); CHECKPOINT",
        );
        let status = src.query(
            &db,
            &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        );
        (status == vec![vec![Some("lost".to_string())]]).then_some(())
    });

    let daemon = Daemon::spawn(dir);
    let addr = http::address(&daemon);
    let ready = wait_for("the lost slot named", Duration::from_secs(60), || {
        let (code, body) = http::get(&addr, "/readyz");
        (code == 503 && body.contains("was invalidated by the source")).then_some(body)
    });
    assert!(
        ready.contains("(waiting for a prerequisite)") && ready.contains("on_slot_lost"),
        "{ready}"
    );
    assert_eq!(count(), Some("10".to_string()));
    let dir = daemon.stop_ok();

    let conf = dir.join("kuvasz-streamer.toml");
    let mut text = std::fs::read_to_string(&conf).expect("config");
    text.push_str("on_slot_lost = \"recopy\"\n");
    std::fs::write(&conf, text).expect("config");
    let daemon = Daemon::spawn(dir);
    let addr = http::address(&daemon);
    wait_for("copied again", Duration::from_secs(60), || {
        (count() == Some("20".to_string())).then_some(())
    });
    src.execute(&db, "INSERT INTO t VALUES (21, 21)");
    wait_for("streaming again", Duration::from_secs(60), || {
        (count() == Some("21".to_string())).then_some(())
    });
    assert_eq!(http::get(&addr, "/readyz").0, 200);
    daemon.stop_ok();
}

/// A role that may not create temporary tables cannot stage any batch: a prerequisite
/// of the pool, named once with what to grant, not a hold of every table.
#[test]
fn no_temp_privilege_is_the_pools_prerequisite() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let table = "CREATE TABLE t (id int PRIMARY KEY, v int)";
    let (db, ddb) = support::database_pair(src, dest, "tp", table, table);
    dest.execute(
        "postgres",
        &format!("REVOKE TEMP ON DATABASE {ddb} FROM PUBLIC, kuvasz"),
    );
    let map = format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n\
         [source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let addr = http::address(&daemon);
    support::wait_slot_active(src, &db, &format!("kuvasz_{db}_1"));
    // A batch too big for literal statements: it is staged.
    src.execute(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(1, 5000) g",
    );
    let ready = wait_for(
        "the missing privilege named",
        Duration::from_secs(60),
        || {
            let (code, body) = http::get(&addr, "/readyz");
            (code == 503 && body.contains("GRANT TEMP ON DATABASE")).then_some(body)
        },
    );
    assert!(
        ready.starts_with("{\"ready\":false,\"reasons\":[\"waiting for a prerequisite: writer "),
        "{ready}"
    );
    dest.execute(
        "postgres",
        &format!("GRANT TEMP ON DATABASE {ddb} TO kuvasz"),
    );
    let count = || dest.query(&ddb, "SELECT count(*)::text FROM t")[0][0].clone();
    wait_for(
        "every row once TEMP is granted",
        Duration::from_secs(120),
        || (count() == Some("5000".to_string())).then_some(()),
    );
    daemon.stop_ok();
}

/// The source side of the copy tests: `t` with 3,000 rows (three the destination
/// refuses: two break its CHECK, one is too long for its varchar); `u`, whose
/// append target already holds a row of this sid, so its copy is merged (two rows
/// refused there); `h`, whose history target holds a version of this sid, so its copy is
/// merged into the versions (two rows refused there).
const COPY_SRC: &str = "CREATE TABLE t (id int PRIMARY KEY, v int, name text); \
     INSERT INTO t SELECT g, CASE WHEN g IN (17, 2999) THEN -1 ELSE g END, \
     CASE WHEN g = 1500 THEN 'toolong' ELSE 'n' || (g % 100) END FROM generate_series(1, 3000) g; \
     CREATE TABLE u (id int PRIMARY KEY, v int); \
     INSERT INTO u SELECT g, CASE WHEN g IN (5, 900) THEN -1 ELSE g END FROM generate_series(1, 1000) g; \
     CREATE TABLE h (id int PRIMARY KEY, v int); \
     INSERT INTO h SELECT g, CASE WHEN g IN (7, 300) THEN -1 ELSE g END FROM generate_series(1, 500) g";
const COPY_DEST: &str =
    "CREATE TABLE t (sid text, id int, v int CONSTRAINT v_ok CHECK (v >= 0), name varchar(5), \
     PRIMARY KEY (sid, id)); \
     CREATE TABLE u (sid text, id int, v int CONSTRAINT u_ok CHECK (v >= 0), PRIMARY KEY (sid, id)); \
     INSERT INTO u VALUES ('1', 0, 0); \
     CREATE TABLE h (sid text, id int, v int CONSTRAINT h_ok CHECK (v >= 0), kvsz_start timestamptz, \
     kvsz_end timestamptz, kvsz_deleted boolean, PRIMARY KEY (sid, id, kvsz_start)); \
     INSERT INTO h VALUES ('1', 0, 0, '1900-01-01 00:00:00+00', '9999-01-01 00:00:00+00', false)";

fn copy_map(src: &support::Cluster, db: &str) -> String {
    format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n\
         [source.tables]\nt = {{}}\nu = {{ type = \"append\" }}\nh = {{ type = \"history\" }}\n",
        src.url(db)
    )
}

/// Rows the destination refuses in the initial copy go by `on_error` like streamed
/// ones: with `deadletter` each is kept in `kvsz_deadletter` (op COPY, its values, the
/// server's message) and every other row lands, in a direct copy and a merged one alike.
fn copy_refusals_are_deadlettered(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb) = support::database_pair(src, dest, "cr", COPY_SRC, COPY_DEST);
    let daemon = Daemon::start(
        &dest.url(&ddb),
        &copy_map(src, &db),
        &["on_error = \"deadletter\""],
    );
    let addr = http::address(&daemon);
    support::wait_slot_active(src, &db, &format!("kuvasz_{db}_1"));
    src.execute(
        &db,
        "INSERT INTO t VALUES (3001, 1, 'x'); INSERT INTO u VALUES (1001, 1)",
    );
    let count =
        |t: &str| dest.query(&ddb, &format!("SELECT count(*)::text FROM {t}"))[0][0].clone();
    wait_for(
        "the good rows and a streamed one",
        Duration::from_secs(60),
        || {
            (count("t") == Some("2998".into())
                && count("u") == Some("1000".into())
                && count("h") == Some("499".into()))
            .then_some(())
        },
    );
    let expected = src.query(
        &db,
        "SELECT id::text, v::text, name FROM t WHERE v >= 0 AND length(name) <= 5 ORDER BY id",
    );
    assert_eq!(
        dest.query(
            &ddb,
            "SELECT id::text, v::text, name::text FROM t ORDER BY id"
        ),
        expected
    );
    let dead = dest.query(
        &ddb,
        "SELECT source_table, op, row->>'id', row->>'v', row->>'name', sid, \
         CASE WHEN error LIKE '%v_ok%' OR error LIKE '%u_ok%' OR error LIKE '%h_ok%' THEN 'check' \
         WHEN error LIKE '%value too long%' THEN 'long' ELSE error END \
         FROM kvsz_deadletter ORDER BY source_table, (row->>'id')::int",
    );
    let s = |v: &str| Some(v.to_string());
    let row = |t: &str, id: &str, v: &str, name: Option<&str>, why: &str| {
        vec![
            s(t),
            s("COPY"),
            s(id),
            s(v),
            name.map(String::from),
            s("1"),
            s(why),
        ]
    };
    assert_eq!(
        dead,
        vec![
            row("public.h", "7", "-1", None, "check"),
            row("public.h", "300", "-1", None, "check"),
            row("public.t", "17", "-1", Some("n17"), "check"),
            row("public.t", "1500", "1500", Some("toolong"), "long"),
            row("public.t", "2999", "-1", Some("n99"), "check"),
            row("public.u", "5", "-1", None, "check"),
            row("public.u", "900", "-1", None, "check"),
        ]
    );
    let (_, status) = http::get(&addr, "/api/status");
    assert!(status.contains("\"rejected\":7,"), "{status}");
    // The version of a key the source no longer has is closed; the others are open.
    assert_eq!(
        dest.query(
            &ddb,
            "SELECT count(*) FILTER (WHERE kvsz_deleted AND id = 0)::text, \
             count(*) FILTER (WHERE kvsz_end = '9999-01-01 00:00:00+00')::text FROM h"
        ),
        vec![vec![s("1"), s("498")]]
    );
    assert_eq!(http::get(&addr, "/readyz").0, 200);
    daemon.stop_ok();
}

#[test]
fn copy_refusals_are_deadlettered_pg12() {
    copy_refusals_are_deadlettered(12);
}

#[test]
fn copy_refusals_are_deadlettered_pg18() {
    copy_refusals_are_deadlettered(18);
}

/// With `on_error = stop` a row the copy cannot write holds its source, named with its
/// table, key and the server's message; nothing of the copy lands until the operator
/// fixes the cause, then everything does.
#[test]
fn copy_refusal_stops_with_its_key() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (db, ddb) = support::database_pair(src, dest, "cs", COPY_SRC, COPY_DEST);
    let daemon = Daemon::start(&dest.url(&ddb), &copy_map(src, &db), &[]);
    let addr = http::address(&daemon);
    let ready = wait_for("the refused row named", Duration::from_secs(60), || {
        let (code, body) = http::get(&addr, "/readyz");
        (code == 503 && body.contains("key (id)=(")).then_some(body)
    });
    assert!(
        ready.contains("destination rejected COPY of public.t key (id)=(17) at LSN ")
            && ready.contains("v_ok"),
        "{ready}"
    );
    let (_, status) = http::get(&addr, "/api/status");
    assert!(
        status.contains("\"last_rejected\":{") && status.contains("\"key\":\"(id)=(17)\""),
        "{status}"
    );
    let count =
        |t: &str| dest.query(&ddb, &format!("SELECT count(*)::text FROM {t}"))[0][0].clone();
    assert_eq!(
        (count("t"), count("u")),
        (Some("0".into()), Some("1".into()))
    );
    dest.execute(
        &ddb,
        "ALTER TABLE t DROP CONSTRAINT v_ok; ALTER TABLE t ALTER name TYPE text; \
         ALTER TABLE u DROP CONSTRAINT u_ok; ALTER TABLE h DROP CONSTRAINT h_ok",
    );
    wait_for("every row once fixed", Duration::from_secs(120), || {
        (count("t") == Some("3000".into())
            && count("u") == Some("1001".into())
            && count("h") == Some("501".into()))
        .then_some(())
    });
    wait_for("ready again", Duration::from_secs(30), || {
        (http::get(&addr, "/readyz").0 == 200).then_some(())
    });
    // Nothing parked: with `stop` the dead-letter table is never even made.
    assert_eq!(
        dest.query(
            &ddb,
            "SELECT (to_regclass('kvsz_deadletter') IS NULL)::text"
        ),
        vec![vec![Some("true".to_string())]]
    );
    daemon.stop_ok();
}

/// A writer behind a lock on the destination (a session left in a transaction) is named
/// by `/readyz` once past `app.writer_wait_timeout`, with the session holding the lock as
/// `pg_stat_activity` shows it; the batch goes on, and the daemon is ready again, once
/// the lock is released.
#[test]
fn a_writer_behind_a_lock_names_its_holder() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let table = "CREATE TABLE t (id int PRIMARY KEY, v int)";
    let (db, ddb) = support::database_pair(src, dest, "lk", table, table);
    let map = format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n\
         [source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["writer_wait_timeout = 2"]);
    let addr = http::address(&daemon);
    support::wait_slot_active(src, &db, &format!("kuvasz_{db}_1"));
    src.execute(&db, "INSERT INTO t VALUES (1, 1)");
    let v = || dest.query(&ddb, "SELECT v::text FROM t WHERE id = 1");
    wait_for("the row", Duration::from_secs(60), || {
        (v() == vec![vec![Some("1".to_string())]]).then_some(())
    });
    // The daemon's own role: its sessions show their state and statements to it.
    let mut holder = postgres::Client::connect(&dest.url(&ddb), postgres::NoTls).expect("connect");
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pid")
        .get(0);
    for sql in [
        "SET application_name = 'holder'",
        "BEGIN",
        "SELECT * FROM t FOR UPDATE",
    ] {
        holder.batch_execute(sql).expect("lock the row");
    }
    src.execute(&db, "UPDATE t SET v = 2 WHERE id = 1");
    let ready = wait_for("the holder named", Duration::from_secs(60), || {
        let (code, body) = http::get(&addr, "/readyz");
        (code == 503 && body.contains("held by pid")).then_some(body)
    });
    assert!(
        ready.contains("has been applying one batch for ")
            && ready.contains(&format!(
                "lock held by pid {pid} (user 'kuvasz', application 'holder', \
                 idle in transaction, in its transaction for "
            ))
            && ready.contains("last statement 'SELECT * FROM t FOR UPDATE')"),
        "{ready}"
    );
    assert_eq!(v(), vec![vec![Some("1".to_string())]]);
    holder.batch_execute("ROLLBACK").expect("release");
    wait_for("the change applied", Duration::from_secs(60), || {
        (v() == vec![vec![Some("2".to_string())]]).then_some(())
    });
    wait_for("ready again", Duration::from_secs(30), || {
        (http::get(&addr, "/readyz").0 == 200).then_some(())
    });
    daemon.stop_ok();
}
