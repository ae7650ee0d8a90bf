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
