//! The crash loops' workload (SPEC §4): clone, append, key-less, FULL and history
//! tables written by one session per source, and the exact comparison of a target with
//! its source afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Cluster;

pub const SOURCE: &str = "SET ROLE kuvasz; \
    CREATE TABLE acct (id int PRIMARY KEY, v int NOT NULL); \
    CREATE TABLE ledger (id int PRIMARY KEY, v int NOT NULL); \
    CREATE TABLE events (n int, batch int); \
    CREATE TABLE fullrows (n int, v text); ALTER TABLE fullrows REPLICA IDENTITY FULL; \
    CREATE TABLE hist (id int PRIMARY KEY, v int NOT NULL); \
    INSERT INTO acct SELECT g, 0 FROM generate_series(1, 50) g; \
    INSERT INTO hist SELECT g, 0 FROM generate_series(1, 30) g";

pub const TARGET: &str = "SET ROLE kuvasz; \
    CREATE TABLE acct (sid text, id int, v int NOT NULL, PRIMARY KEY (sid, id)); \
    CREATE TABLE ledger (sid text, id int, v int NOT NULL, PRIMARY KEY (sid, id)); \
    CREATE TABLE events (sid text, n int, batch int); \
    CREATE TABLE fullrows (sid text, n int, v text); \
    CREATE TABLE hist (sid text, id int, v int, kvsz_start timestamptz, kvsz_end timestamptz, \
                       kvsz_deleted boolean)";

/// One session's workload on `db` until `done`: each transaction updates a clone row,
/// inserts and updates append rows, inserts 20 key-less and 10 FULL rows, and bumps a
/// history row (its `v` counts its updates). A failed transaction (the server
/// restarting) is retried on a new connection.
pub fn workload(src: &Cluster, db: &str, done: &AtomicBool) -> i64 {
    let mut client = src.client(db);
    let mut i: i64 = 0;
    while !done.load(Ordering::Relaxed) {
        let sql = format!(
            "BEGIN; UPDATE acct SET v = v + 1 WHERE id = {a}; \
             INSERT INTO ledger VALUES ({l}, 0); UPDATE ledger SET v = v + 1 WHERE id = {m}; \
             INSERT INTO events SELECT g, {i} FROM generate_series(1, 20) g; \
             INSERT INTO fullrows SELECT g % 4, 'f{f}' FROM generate_series(1, 10) g; \
             UPDATE hist SET v = v + 1 WHERE id = {h}; COMMIT",
            a = 1 + i % 50,
            l = i + 1,
            m = 1 + i / 2,
            f = i % 3,
            h = 1 + i % 30,
        );
        match client.batch_execute(&sql) {
            Ok(()) => i += 1,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                let reconnect = std::panic::AssertUnwindSafe(|| src.client(db));
                if let Ok(c) = std::panic::catch_unwind(reconnect) {
                    client = c;
                }
            }
        }
    }
    i
}

/// Compares every target of sid `sid` in `ddb` with source database `db` (the source
/// confirmed first): asserts they are equal and returns how many grouped rows were.
pub fn compare(src: &Cluster, db: &str, dest: &Cluster, ddb: &str, sid: &str) -> usize {
    let mut compared = 0;
    let both = |table: &str, sql: &str| {
        let on_src = sql.replace("FROM t", &format!("FROM {table}"));
        let on_dest = sql.replace("FROM t", &format!("FROM {table} WHERE sid = '{sid}'"));
        (src.query(db, &on_src), dest.query(ddb, &on_dest))
    };
    for (table, sql) in [
        ("acct", "SELECT id, v FROM t ORDER BY id"),
        ("ledger", "SELECT id, v FROM t ORDER BY id"),
        (
            "events",
            "SELECT batch, count(*) FROM t GROUP BY batch ORDER BY batch",
        ),
        (
            "fullrows",
            "SELECT n, v, count(*) FROM t GROUP BY n, v ORDER BY n, v",
        ),
    ] {
        let (expected, actual) = both(table, sql);
        compared += expected.len();
        assert!(
            expected == actual,
            "sid {sid} {table}: source {} rows, target {} rows; first difference: {:?}",
            expected.len(),
            actual.len(),
            expected.iter().zip(&actual).find(|(e, a)| e != a)
        );
    }
    // One version per update of each key, the current one with the source's value.
    let versions = dest.query(
        ddb,
        &format!(
            "SELECT id, count(*)::int - 1, max(v) FILTER (WHERE kvsz_end > '9000-01-01') \
             FROM hist WHERE sid = '{sid}' GROUP BY id ORDER BY id"
        ),
    );
    let expected = src.query(db, "SELECT id, v, v FROM hist ORDER BY id");
    assert_eq!(
        versions, expected,
        "sid {sid} history: (id, versions - 1, current v)"
    );
    compared + expected.len()
}
