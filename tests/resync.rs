//! A target copied again when it must be (SPEC §3, §6, issue #19): a changed `filter` or
//! `set` (reload or restart), `kuvasz-streamer resync TABLE [--sid S]`, and a table that
//! gains a primary key while streaming (its UPDATE and DELETE are carried from then on).

mod support;

use std::fs;

use support::daemon::Daemon;
use support::{converge, destination, source, unique_name, Cluster, Rows};

fn map(family: &str, urls: &[(String, &str)], tables: &str) -> String {
    let urls: Vec<String> = urls
        .iter()
        .map(|(u, sid)| format!("{{ url = \"{u}\", sid = \"{sid}\" }}"))
        .collect();
    format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {} ]\n[source.tables]\n{tables}",
        urls.join(", ")
    )
}

/// The source rows passing `filter` (SQL), with `label` (SQL) as the set column.
fn expected(src: &Cluster, db: &str, filter: &str, label: &str) -> Rows {
    src.query(
        db,
        &format!("SELECT id, n, {label} FROM t WHERE {filter} ORDER BY id"),
    )
}

fn actual(dest: &Cluster, db: &str) -> Rows {
    dest.query(db, "SELECT id, n, label FROM t WHERE sid = 's' ORDER BY id")
}

/// A changed filter or set copies the table again, on SIGHUP and at a restart: the
/// target then holds exactly the rows that pass the new filter, with the new values.
fn filter_change_copies_again(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("fc"), unique_name("fcd"), unique_name("fc"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL); \
         INSERT INTO t SELECT g, g FROM generate_series(1, 30) g",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, n int, label text, PRIMARY KEY (sid, id))",
    );
    let entry = |filter: &str, label: &str| {
        format!("t = {{ filter = \"{filter}\", set = {{ label = \"{label}\" }} }}\n")
    };
    let urls = [(src.url(&db), "s")];
    let d = Daemon::start(
        &dest.url(&ddb),
        &map(&family, &urls, &entry("n % 2 == 0", "'even'")),
        &[],
    );
    d.wait_streaming(1);
    converge(
        "first filter",
        || expected(src, &db, "n % 2 = 0", "'even'"),
        || actual(dest, &ddb),
    );
    // SIGHUP with another filter and another set expression.
    fs::write(
        d.dir.join("map.toml"),
        map(&family, &urls, &entry("n % 3 == 0", "'three'")),
    )
    .expect("write map");
    d.hup();
    src.execute(&db, "INSERT INTO t VALUES (31, 33), (32, 32)");
    converge(
        "filter changed by SIGHUP",
        || expected(src, &db, "n % 3 = 0", "'three'"),
        || actual(dest, &ddb),
    );
    // Stopped, changed, started: copied again too.
    let dir = d.stop_ok();
    fs::write(
        dir.join("map.toml"),
        map(&family, &urls, &entry("n > 25", "'big'")),
    )
    .expect("write map");
    let d = Daemon::spawn(dir);
    converge(
        "filter changed while stopped",
        || expected(src, &db, "n > 25", "'big'"),
        || actual(dest, &ddb),
    );
    d.stop_ok();
}

every_major! { filter_change_copies_again:
    filter_change_copies_again_pg12 => 12,
    filter_change_copies_again_pg18 => 18,
}

/// `resync` repairs a target changed behind the daemon's back, for one sid; it names
/// what it cannot do.
#[test]
fn resync_copies_a_table_again() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("rsa"),
        unique_name("rsb"),
        unique_name("rsd"),
        unique_name("rs"),
    );
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(
            db,
            "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, label text); \
             CREATE TABLE other (id int PRIMARY KEY); \
             INSERT INTO t SELECT g, g, 'x' FROM generate_series(1, 20) g",
        );
    }
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, n int, label text, PRIMARY KEY (sid, id)); \
         CREATE TABLE other (sid text, id int, PRIMARY KEY (sid, id))",
    );
    let urls = [(src.url(&a), "a"), (src.url(&b), "b")];
    let d = Daemon::start(&dest.url(&ddb), &map(&family, &urls, "t = {}\n"), &[]);
    d.wait_streaming(2);
    let rows_a = || {
        dest.query(
            &ddb,
            "SELECT id, n, label FROM t WHERE sid = 'a' ORDER BY id",
        )
    };
    let source_rows = |db: &str| src.query(db, "SELECT id, n, label FROM t ORDER BY id");
    converge("copied", || source_rows(&a), rows_a);
    // Damage both sids' rows behind the daemon's back.
    dest.execute(
        &ddb,
        "DELETE FROM t WHERE id < 5; UPDATE t SET n = -1 WHERE id = 10; \
         INSERT INTO t VALUES ('a', 99, 99, 'stray'), ('b', 99, 99, 'stray')",
    );
    let ((code, out), _) = Daemon::command(&d.dir, &["resync", "t", "--sid", "a"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!(
            "source {family}/a: public.t marked to be copied again; the running daemon sets \
             the source up again and copies it within 15 seconds (or at its next start)\n"
        )
    );
    converge("sid a copied again", || source_rows(&a), rows_a);
    src.execute(&a, "UPDATE t SET label = 'after' WHERE id = 20");
    converge("sid a streams on", || source_rows(&a), rows_a);
    // Sid b was not asked for: still damaged.
    assert_eq!(
        dest.query(
            &ddb,
            "SELECT count(*), count(*) FILTER (WHERE id = 99) FROM t WHERE sid = 'b'"
        ),
        vec![vec![Some("17".to_string()), Some("1".to_string())]]
    );
    let ((code, out), _) = Daemon::command(&d.dir, &["resync", "nosuch"]);
    assert_eq!(
        (code, out.as_str()),
        (1, "resync: table \"nosuch\" is not in the map\n")
    );
    let ((code, out), _) = Daemon::command(&d.dir, &["resync", "t", "--sid", "c"]);
    assert_eq!(
        (code, out.as_str()),
        (1, "resync: no source URL of the map has sid \"c\"\n")
    );
    d.stop_ok();
}

/// A key-less table carries only its inserts (through the `_ins` publication); once it
/// gets a primary key while the daemon streams, it is set up again: copied, and its
/// UPDATE and DELETE carried from then on.
#[test]
fn a_table_that_gains_a_key_carries_its_updates() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (db, ddb, family) = (unique_name("gk"), unique_name("gkd"), unique_name("gk"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int NOT NULL, v text); \
         INSERT INTO t SELECT g, 'a' FROM generate_series(1, 5) g",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    let d = Daemon::start(
        &dest.url(&ddb),
        &map(&family, &[(src.url(&db), "s")], "t = {}\n"),
        &[],
    );
    d.wait_streaming(1);
    let source_rows = || src.query(&db, "SELECT id, v FROM t ORDER BY id");
    let target_rows = || dest.query(&ddb, "SELECT id, v FROM t ORDER BY id");
    src.execute(&db, "INSERT INTO t VALUES (6, 'a')");
    converge("inserts carried", source_rows, target_rows);
    src.execute(&db, "ALTER TABLE t ADD PRIMARY KEY (id)");
    // Its updates and deletes now reach the target (after the new set-up's copy).
    src.execute(
        &db,
        "UPDATE t SET v = 'b' WHERE id <= 3; DELETE FROM t WHERE id = 6",
    );
    converge("updates and deletes carried", source_rows, target_rows);
    src.execute(
        &db,
        "UPDATE t SET v = 'c' WHERE id = 4; DELETE FROM t WHERE id = 5",
    );
    converge("and streamed", source_rows, target_rows);
    d.stop_ok();
}
