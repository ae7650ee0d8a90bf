//! End to end: real source clusters of every major version, the system PostgreSQL 15 as
//! destination, the daemon binary in between. Every test asserts exact table contents.

mod support;

use std::time::Duration;

use support::daemon::Daemon;
use support::{destination, source, unique_name, Cluster};

type Rows = Vec<Vec<Option<String>>>;

const ITEMS_SRC: &str =
    "SET ROLE kuvasz; CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text)";
const ITEMS_DST: &str =
    "SET ROLE kuvasz; CREATE TABLE items (sid text NOT NULL, id int NOT NULL, name text, qty int, extra text DEFAULT 'x', PRIMARY KEY (sid, id))";
const PLAIN_SRC: &str = "SET ROLE kuvasz; CREATE TABLE plain (id bigint PRIMARY KEY, v text)";
const PLAIN_DST: &str = "SET ROLE kuvasz; CREATE TABLE plain_copy (id bigint PRIMARY KEY, v text)";

/// Source rows of `items` as the destination should hold them for `sid`.
fn items_expected(c: &Cluster, db: &str, sid: &str) -> Rows {
    c.query(
        db,
        &format!("SELECT '{sid}', id::text, name, qty::text, 'x' FROM items ORDER BY id"),
    )
}

fn items_actual(dest: &Cluster, db: &str, sid: &str) -> Rows {
    dest.query(
        db,
        &format!("SELECT sid, id::text, name, qty::text, extra FROM items WHERE sid = '{sid}' ORDER BY id"),
    )
}

/// Waits until the destination rows equal the expected ones; panics with both if never.
fn converge(what: &str, expected: impl Fn() -> Rows, actual: impl Fn() -> Rows) {
    let mut last = (Vec::new(), Vec::new());
    let ok = wait_for_opt(Duration::from_secs(60), || {
        let (e, a) = (expected(), actual());
        if e == a {
            return true;
        }
        last = (e, a);
        false
    });
    assert!(
        ok,
        "{what}: destination never matched the source\nexpected: {:?}\nactual:   {:?}",
        last.0, last.1
    );
}

fn wait_for_opt(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The full core scenario against one source major version.
fn clone_end_to_end(version: u32) {
    let src = source(version);
    let dest = destination();
    let family = unique_name("shop");
    let misc = unique_name("misc");
    let (db_a, db_b, db_dst) = (unique_name("a"), unique_name("b"), unique_name("dst"));
    for db in [&db_a, &db_b] {
        src.create_database(db);
        src.execute(db, ITEMS_SRC);
        src.execute(db, PLAIN_SRC);
    }
    dest.create_database(&db_dst);
    dest.execute(&db_dst, ITEMS_DST);
    dest.execute(&db_dst, PLAIN_DST);
    // Pre-existing rows: the initial sync must copy them.
    src.execute(
        &db_a,
        "INSERT INTO items SELECT g, 'a' || g, g, 'n' FROM generate_series(1, 500) g",
    );
    src.execute(
        &db_b,
        "INSERT INTO items SELECT g, 'b' || g, g * 10, NULL FROM generate_series(1, 300) g",
    );
    src.execute(
        &db_a,
        "INSERT INTO plain SELECT g, 'p' || g FROM generate_series(1, 50) g",
    );

    let map = format!(
        r#"
[[source]]
database = "{family}"
urls = [
  {{ url = "{}", sid = "tenant-a" }},
  {{ url = "{}", sid = "tenant-b" }},
]
[source.tables]
items = {{}}

[[source]]
database = "{misc}"
urls = [ {{ url = "{}", sid = "m" }} ]
[source.tables]
"public.plain" = {{ target = "plain_copy" }}
"#,
        src.url(&db_a),
        src.url(&db_b),
        src.url(&db_a)
    );
    let daemon = Daemon::start(&dest.url(&db_dst), &map, &[]);
    let check = |what: &str| {
        converge(
            what,
            || items_expected(src, &db_a, "tenant-a"),
            || items_actual(dest, &db_dst, "tenant-a"),
        );
        converge(
            what,
            || items_expected(src, &db_b, "tenant-b"),
            || items_actual(dest, &db_dst, "tenant-b"),
        );
        converge(
            what,
            || src.query(&db_a, "SELECT id::text, v FROM plain ORDER BY id"),
            || dest.query(&db_dst, "SELECT id::text, v FROM plain_copy ORDER BY id"),
        );
    };
    check("initial sync");
    assert_eq!(
        dest.query(&db_dst, "SELECT count(*) FROM items")[0][0].as_deref(),
        Some("800")
    );

    // Streaming: insert, non-key update, key update, delete, in both tenants.
    for db in [&db_a, &db_b] {
        src.execute(
            db,
            "INSERT INTO items SELECT g, 'new' || g, g, 'z' FROM generate_series(1001, 1200) g",
        );
        src.execute(
            db,
            "UPDATE items SET name = 'upd', qty = qty + 1 WHERE id % 7 = 0",
        );
        src.execute(
            db,
            "UPDATE items SET id = id + 5000 WHERE id BETWEEN 10 AND 19",
        );
        src.execute(db, "DELETE FROM items WHERE id % 11 = 0");
        src.execute(db, "BEGIN; INSERT INTO items VALUES (9999, 'q''uote', NULL, NULL); UPDATE items SET name = NULL WHERE id = 9999; COMMIT");
    }
    src.execute(
        &db_a,
        "UPDATE plain SET v = 'changed' WHERE id < 10; DELETE FROM plain WHERE id > 40",
    );
    check("streaming");

    // A clean stop confirms everything applied: the slots reach the source's position.
    let lsn = src.query(&db_a, "SELECT pg_current_wal_lsn()::text")[0][0]
        .clone()
        .unwrap();
    // Let keepalives carry the server's position to the daemon and its writers.
    std::thread::sleep(Duration::from_millis(1500));
    daemon.stop_ok();
    for sid in ["tenant_a", "tenant_b"] {
        let slot = format!("kuvasz_{}_{sid}", family);
        let behind = src.query(
            &db_a,
            &format!(
                "SELECT confirmed_flush_lsn < '{lsn}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        );
        assert_eq!(
            behind,
            vec![vec![Some("f".to_string())]],
            "slot {slot} confirmed past {lsn}"
        );
    }

    // Changes made while stopped arrive after a restart, nothing twice.
    src.execute(&db_a, "INSERT INTO items VALUES (20000, 'while stopped', 1, NULL); DELETE FROM items WHERE id = 1");
    src.execute(&db_b, "UPDATE items SET qty = -1 WHERE id = 2");
    let daemon = Daemon::start(&dest.url(&db_dst), &map, &[]);
    check("after restart");
    daemon.stop_ok();
}

macro_rules! per_version {
    ($($name:ident => $v:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if support::versions().contains(&$v) {
                    clone_end_to_end($v);
                }
            }
        )*
    };
}

per_version! {
    clone_pg12 => 12,
    clone_pg13 => 13,
    clone_pg14 => 14,
    clone_pg15 => 15,
    clone_pg16 => 16,
    clone_pg17 => 17,
    clone_pg18 => 18,
}
