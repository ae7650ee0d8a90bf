//! Target modes (SPEC §4) end to end on every source major, with and without a `sid`
//! column: `append` keeps what the source deletes.

mod support;

use support::daemon::Daemon;
use support::{converge, destination, source, unique_name, Rows};

fn rows(values: &[&str]) -> Rows {
    values.iter().map(|v| vec![Some(v.to_string())]).collect()
}

/// append: inserts, updates (a key change moves the row, as an UPDATE does) and the
/// initial copy are applied; DELETE and TRUNCATE are ignored, so the target keeps every
/// row the source removed.
fn append_mode(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("ap"), unique_name("apd"), unique_name("ap"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE with_sid (id int PRIMARY KEY, v text); \
         CREATE TABLE no_sid (id int PRIMARY KEY, v text)",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE with_sid (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE no_sid (id int PRIMARY KEY, v text)",
    );
    let both = |sql: &str| {
        src.execute(&db, &sql.replace("$t", "with_sid"));
        src.execute(&db, &sql.replace("$t", "no_sid"));
    };
    both("INSERT INTO $t VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nwith_sid = {{ type = \"append\" }}\nno_sid = {{ type = \"append\" }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let check = |what: &str, expected: &[&str]| {
        for (t, extra) in [("with_sid", " WHERE sid = 's'"), ("no_sid", "")] {
            converge(
                &format!("{what} ({t})"),
                || rows(expected),
                || {
                    dest.query(
                        &ddb,
                        &format!("SELECT id || ':' || v FROM {t}{extra} ORDER BY id"),
                    )
                },
            );
        }
    };
    check("copy", &["1:a", "2:b", "3:c"]);
    both(
        "INSERT INTO $t VALUES (4, 'd'); UPDATE $t SET v = 'B' WHERE id = 2; \
         DELETE FROM $t WHERE id = 1; UPDATE $t SET id = 30 WHERE id = 3",
    );
    check(
        "insert, update, key change; delete ignored",
        &["1:a", "2:B", "4:d", "30:c"],
    );
    both("TRUNCATE $t; INSERT INTO $t VALUES (5, 'e')");
    check("truncate ignored", &["1:a", "2:B", "4:d", "5:e", "30:c"]);
    // A row deleted and inserted again with the same key is updated in place.
    both("DELETE FROM $t WHERE id = 5; INSERT INTO $t VALUES (5, 'again')");
    check("re-inserted key", &["1:a", "2:B", "4:d", "5:again", "30:c"]);
    daemon.stop_ok();
}

every_major! { append_mode:
    append_mode_pg12 => 12,
    append_mode_pg13 => 13,
    append_mode_pg14 => 14,
    append_mode_pg15 => 15,
    append_mode_pg16 => 16,
    append_mode_pg17 => 17,
    append_mode_pg18 => 18,
}

/// The Go implementation's `map.yaml`, unchanged: URLs with `replication=database`,
/// tables with no body, a rename, append mode and `partitions_regex`.
fn go_yaml_map(version: u32) {
    let src = source(version);
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("ya"),
        unique_name("yb"),
        unique_name("yd"),
        unique_name("y"),
    );
    let ddl = "SET ROLE kuvasz; CREATE TABLE t0 (id int PRIMARY KEY, v text); \
               CREATE TABLE t2 (id int PRIMARY KEY, v text); CREATE TABLE t3 (id int PRIMARY KEY, v text); \
               CREATE TABLE t7_a (id int PRIMARY KEY, v text); CREATE TABLE t7_b (id int PRIMARY KEY, v text)";
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(db, ddl);
        src.execute(
            db,
            "INSERT INTO t0 VALUES (1, 'x'); INSERT INTO t2 VALUES (1, 'y'); INSERT INTO t3 VALUES (1, 'z'); \
             INSERT INTO t7_a VALUES (1, 'a'); INSERT INTO t7_b VALUES (2, 'b')",
        );
    }
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t0 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE rt2 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE t3 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE t7 (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    let go_url = |db: &str| {
        format!(
            "{}?replication=database&application_name=repl_{db}",
            src.url(db)
        )
    };
    let map = format!(
        "# written for the Go implementation\n\
         - database: {family}\n  urls:\n  - url: {}\n    sid: 12\n  - url: {}\n    sid: 13\n\
         \x20 tables:\n    t0:\n    t2:\n      target: rt2\n    t3:\n      type: append\n\
         \x20   t7:\n      partitions_regex: \"t7_.*\"\n",
        go_url(&a),
        go_url(&b)
    );
    let daemon = Daemon::start_yaml(&dest.url(&ddb), &map);
    // The changes below must be streamed, not seen by the copy.
    daemon.wait_streaming(2);
    for db in [&a, &b] {
        src.execute(
            db,
            "INSERT INTO t0 VALUES (2, 'x2'); UPDATE t2 SET v = 'Y'; DELETE FROM t3; \
             INSERT INTO t7_b VALUES (3, 'b3')",
        );
    }
    let all = |t: &str| {
        dest.query(
            &ddb,
            &format!("SELECT sid || ':' || id || ':' || v FROM {t} ORDER BY 1"),
        )
    };
    converge(
        "t0",
        || rows(&["12:1:x", "12:2:x2", "13:1:x", "13:2:x2"]),
        || all("t0"),
    );
    converge("rt2", || rows(&["12:1:Y", "13:1:Y"]), || all("rt2"));
    converge(
        "t3 (append keeps it)",
        || rows(&["12:1:z", "13:1:z"]),
        || all("t3"),
    );
    converge(
        "t7",
        || rows(&["12:1:a", "12:2:b", "12:3:b3", "13:1:a", "13:2:b", "13:3:b3"]),
        || all("t7"),
    );
    daemon.stop_ok();
}

every_major! { go_yaml_map:
    go_yaml_map_pg12 => 12,
    go_yaml_map_pg13 => 13,
    go_yaml_map_pg14 => 14,
    go_yaml_map_pg15 => 15,
    go_yaml_map_pg16 => 16,
    go_yaml_map_pg17 => 17,
    go_yaml_map_pg18 => 18,
}
