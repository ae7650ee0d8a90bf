//! End to end: real source clusters of every major version, the system PostgreSQL 15 as
//! destination, the daemon binary in between. Every test asserts exact table contents.

mod support;

use std::time::Duration;

use support::daemon::Daemon;
use support::{converge, destination, source, unique_name, wait_for_opt, Cluster, Rows};

const ITEMS_SRC: &str =
    "SET ROLE kuvasz; CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text)";
const ITEMS_DST: &str =
    "SET ROLE kuvasz; CREATE TABLE items (sid text NOT NULL, id int NOT NULL, name text, qty int, extra text DEFAULT 'x', PRIMARY KEY (sid, id))";
const PLAIN_SRC: &str = "SET ROLE kuvasz; CREATE TABLE plain (id bigint PRIMARY KEY, v text)";
const PLAIN_DST: &str = "SET ROLE kuvasz; CREATE TABLE plain_copy (id bigint PRIMARY KEY, v text)";

/// The newest and oldest source majors under test.
fn newest() -> u32 {
    *support::versions().last().expect("a version")
}

fn oldest() -> u32 {
    *support::versions().first().expect("a version")
}

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

/// Waits until the destination's `items` of `sid` equal the source's.
fn converge_items(what: &str, src: (&Cluster, &str), dest: (&Cluster, &str), sid: &str) {
    converge(
        what,
        || items_expected(src.0, src.1, sid),
        || items_actual(dest.0, dest.1, sid),
    );
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
        converge_items(what, (src, &db_a), (dest, &db_dst), "tenant-a");
        converge_items(what, (src, &db_b), (dest, &db_dst), "tenant-b");
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

    // TRUNCATE empties only that sid's rows (all rows of a target without sid), in order
    // with the changes around it.
    src.execute(&db_b, "BEGIN; INSERT INTO items VALUES (30000, 'before', 1, NULL); TRUNCATE items; INSERT INTO items VALUES (30001, 'after', 2, NULL); COMMIT");
    src.execute(
        &db_a,
        "TRUNCATE plain; INSERT INTO plain VALUES (7, 'again')",
    );
    check("truncate");
    assert_eq!(
        items_actual(dest, &db_dst, "tenant-b"),
        vec![vec![
            Some("tenant-b".into()),
            Some("30001".into()),
            Some("after".into()),
            Some("2".into()),
            Some("x".into())
        ]]
    );

    // A clean stop confirms everything applied: the slots reach the source's position.
    let lsn = src.query(&db_a, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
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

/// One source database and one destination database, both with `items`, and a map of
/// one URL (with `sid`) mapping `items` plus `more_tables` lines: most single-source
/// tests start here.
struct Pair<'a> {
    src: &'a Cluster,
    dest: &'static Cluster,
    db: String,
    ddb: String,
    family: String,
    map: String,
}

fn items_pair(version: u32, prefix: &str, sid: &str, more_tables: &str) -> Pair<'static> {
    items_pair_on(source(version), prefix, sid, more_tables)
}

/// Like [`items_pair`], on a source server of the caller's.
fn items_pair_on<'a>(src: &'a Cluster, prefix: &str, sid: &str, more_tables: &str) -> Pair<'a> {
    let dest = destination();
    let (db, ddb, family) = (
        unique_name(prefix),
        unique_name(&format!("{prefix}d")),
        unique_name(prefix),
    );
    src.create_database(&db);
    src.execute(&db, ITEMS_SRC);
    dest.create_database(&ddb);
    dest.execute(&ddb, ITEMS_DST);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"{sid}\" }} ]\n[source.tables]\nitems = {{}}\n{more_tables}",
        src.url(&db)
    );
    Pair {
        src,
        dest,
        db,
        ddb,
        family,
        map,
    }
}

/// Rows the destination refuses are never skipped: with `on_error = stop` the source
/// stops confirming at the change, retries it, and applies it once the cause is fixed;
/// the report names source, sid, table, key and LSN.
#[test]
fn rejected_row_stops_and_resumes() {
    let v = newest();
    let Pair {
        src,
        dest,
        db,
        ddb,
        family,
        map,
    } = items_pair(v, "rj", "t1", "");
    // The destination refuses negative quantities; the source does not.
    dest.execute(
        &ddb,
        "ALTER TABLE items ADD CONSTRAINT qty_ok CHECK (qty >= 0)",
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    src.execute(
        &db,
        "INSERT INTO items SELECT g, 'ok', g, NULL FROM generate_series(1, 100) g",
    );
    converge_items("good rows", (src, &db), (dest, &ddb), "t1");
    // One bad row amid good ones, in one transaction.
    src.execute(&db, "BEGIN; INSERT INTO items SELECT g, 'ok', g, NULL FROM generate_series(101, 150) g; INSERT INTO items VALUES (151, 'bad', -5, NULL); INSERT INTO items VALUES (152, 'ok', 1, NULL); COMMIT");
    let lsn = src.query(&db, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        .clone()
        .unwrap();
    let log = support::wait_for("rejection report", Duration::from_secs(60), || {
        let log = daemon.log();
        log.contains("destination rejected INSERT").then_some(log)
    });
    let line = log
        .lines()
        .find(|l| l.contains("destination rejected INSERT"))
        .unwrap();
    assert!(
        line.contains(&format!("source {family} (sid t1)")),
        "{line}"
    );
    assert!(line.contains("public.items key (id)=(151)"), "{line}");
    assert!(line.contains("qty_ok"), "{line}");
    assert!(line.contains(" at LSN "), "{line}");
    // Never confirmed past the refused change, so the slot keeps it.
    std::thread::sleep(Duration::from_secs(2));
    let slot = format!("kuvasz_{family}_t1");
    let past = src.query(&db, &format!("SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"));
    assert_eq!(
        past[0][0].as_deref(),
        Some("f"),
        "slot {slot} confirmed {:?} past the rejected change (WAL at {lsn})",
        past[0][1]
    );
    assert_eq!(
        dest.query(&ddb, "SELECT count(*) FROM items WHERE id = 151"),
        vec![vec![Some("0".to_string())]]
    );
    // The operator fixes the cause: the retry applies everything, nothing lost.
    dest.execute(&ddb, "ALTER TABLE items DROP CONSTRAINT qty_ok");
    converge_items("after the fix", (src, &db), (dest, &ddb), "t1");
    daemon.stop_ok();
}

/// With `on_error = deadletter` the refused change is kept in kvsz_deadletter and the
/// rest streams on.
#[test]
fn rejected_row_goes_to_deadletter() {
    let (dead, family) = refused_row_deadlettered(
        oldest(),
        "dl",
        "t2",
        "ALTER TABLE items ADD CONSTRAINT qty_ok CHECK (qty >= 0)",
        "SELECT sid, source, source_table, op, row->>'id', row->>'qty', (error LIKE '%qty_ok%')::text FROM kvsz_deadletter",
    );
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        dead,
        vec![vec![
            s("t2"),
            s(&family),
            s("public.items"),
            s("INSERT"),
            s("51"),
            s("-1"),
            s("true")
        ]]
    );
}

/// With `on_error = deadletter`, streams 50 good rows and one with qty -1 in one
/// transaction, then one more, into a destination that `dest_ddl` makes refuse qty -1;
/// waits until the good rows match the source, then returns the rows of `dead_sql` over
/// `kvsz_deadletter`, and the family name.
fn refused_row_deadlettered(
    version: u32,
    prefix: &str,
    sid: &str,
    dest_ddl: &str,
    dead_sql: &str,
) -> (Rows, String) {
    let Pair {
        src,
        dest,
        db,
        ddb,
        family,
        map,
    } = items_pair(version, prefix, sid, "");
    dest.execute(&ddb, dest_ddl);
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["on_error = \"deadletter\""]);
    // Streaming, not the initial copy, is what this is about.
    daemon.wait_streaming(1);
    src.execute(&db, "BEGIN; INSERT INTO items SELECT g, 'ok', g, NULL FROM generate_series(1, 50) g; INSERT INTO items VALUES (51, 'bad', -1, 'n'); COMMIT; INSERT INTO items VALUES (52, 'later', 3, NULL)");
    let good = || {
        src.query(
            &db,
            &format!("SELECT '{sid}', id::text, name, qty::text, 'x' FROM items WHERE qty >= 0 ORDER BY id"),
        )
    };
    converge("good rows", good, || items_actual(dest, &ddb, sid));
    let dead = support::wait_for("deadletter row", Duration::from_secs(30), || {
        let rows = dest.query(&ddb, dead_sql);
        (!rows.is_empty()).then_some(rows)
    });
    // The role may not set session_replication_role: said once (copy and two writers).
    assert_eq!(
        daemon
            .log()
            .matches("cannot SET session_replication_role")
            .count(),
        1,
        "{}",
        daemon.log()
    );
    daemon.stop_ok();
    (dead, family)
}

/// Several servers of different major versions into one target table.
/// A destination constraint checked only at COMMIT (DEFERRABLE INITIALLY DEFERRED) is
/// still pinned on the one row that breaks it: the careful redo checks constraints at
/// each statement, so the row goes to the dead letters and the rest lands.
#[test]
fn deferred_constraint_rejection_is_isolated() {
    let (dead, _) = refused_row_deadlettered(
        newest(),
        "dfr",
        "t3",
        "SET ROLE kuvasz; CREATE TABLE allowed (q int PRIMARY KEY); \
         INSERT INTO allowed SELECT generate_series(0, 1000); \
         ALTER TABLE items ADD CONSTRAINT qty_allowed FOREIGN KEY (qty) REFERENCES allowed (q) \
         DEFERRABLE INITIALLY DEFERRED",
        "SELECT row->>'id', (error LIKE '%qty_allowed%')::text FROM kvsz_deadletter",
    );
    assert_eq!(
        dead,
        vec![vec![Some("51".to_string()), Some("true".to_string())]]
    );
}

#[test]
fn two_servers_into_one_table() {
    let vs = support::versions();
    let (v1, v2) = (vs[0], *vs.last().expect("a version"));
    let (s1, s2) = (source(v1), source(v2));
    let dest = destination();
    let (db1, db2, ddb, family) = (
        unique_name("sa"),
        unique_name("sb"),
        unique_name("sd"),
        unique_name("two"),
    );
    for (c, db) in [(s1, &db1), (s2, &db2)] {
        c.create_database(db);
        c.execute(db, ITEMS_SRC);
        c.execute(
            db,
            "INSERT INTO items SELECT g, 'pre', g, NULL FROM generate_series(1, 20) g",
        );
    }
    dest.create_database(&ddb);
    dest.execute(&ddb, ITEMS_DST);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"pg{v1}\" }}, {{ url = \"{}\", sid = \"pg{v2}x\" }} ]\n[source.tables]\nitems = {{}}\n",
        s1.url(&db1),
        s2.url(&db2)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    s1.execute(
        &db1,
        "UPDATE items SET name = 'one' WHERE id < 5; INSERT INTO items VALUES (100, 'x', 1, NULL)",
    );
    s2.execute(
        &db2,
        "DELETE FROM items WHERE id < 5; INSERT INTO items VALUES (200, 'y', 2, NULL)",
    );
    let (sid1, sid2) = (format!("pg{v1}"), format!("pg{v2}x"));
    converge_items("first server", (s1, &db1), (dest, &ddb), &sid1);
    converge_items("second server", (s2, &db2), (dest, &ddb), &sid2);
    assert_eq!(
        dest.query(&ddb, "SELECT count(*) FROM items"),
        vec![vec![Some("38".to_string())]]
    );
    daemon.stop_ok();
}

macro_rules! per_version {
    ($($name:ident => $v:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                clone_end_to_end($v);
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

/// An `items` pair whose source database decodes with 64 kB of memory (so that 14+
/// streams any sizeable transaction, older servers spill it), and the daemon streaming.
fn small_decoding_memory(version: u32, prefix: &str, sid: &str) -> (Pair<'static>, Daemon) {
    let pair = items_pair(version, prefix, sid, "");
    pair.src.execute(
        &pair.db,
        &format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            pair.db
        ),
    );
    let daemon = Daemon::start(&pair.dest.url(&pair.ddb), &pair.map, &[]);
    daemon.wait_streaming(1);
    (pair, daemon)
}

/// Whether `stat` of the slot of `db` (pg_stat_replication_slots, 14+) becomes
/// positive within 20 s (the statistics are reported with some delay).
fn slot_statistic_grows(src: &Cluster, db: &str, stat: &str) -> bool {
    let sql = format!(
        "SELECT s.{stat} > 0 FROM pg_stat_replication_slots s \
         JOIN pg_replication_slots r USING (slot_name) WHERE r.database = '{db}'"
    );
    wait_for_opt(Duration::from_secs(20), || {
        src.query(db, &sql) == vec![vec![Some("t".to_string())]]
    })
}

/// Transactions far larger than `logical_decoding_work_mem` arrive whole and in order.
/// On 14+ the server streams them while they run (the daemon keeps them until Stream
/// Commit; the slot's `stream_txns` proves they were streamed), on older servers it
/// spills them and sends them at commit. An aborted one leaves nothing, a rolled-back
/// savepoint loses exactly its rows, and a small transaction committed in the middle
/// lands as well.
fn large_transaction(version: u32) {
    let (pair, daemon) = small_decoding_memory(version, "big", "b");
    let (src, dest, db, ddb) = (pair.src, pair.dest, pair.db, pair.ddb);
    src.execute(
        &db,
        "BEGIN; \
         INSERT INTO items SELECT g, 'gone', g, 'aborted' FROM generate_series(500001, 520000) g; \
         ROLLBACK",
    );
    let mut big = src.client(&db);
    big.batch_execute(
        "BEGIN; \
         INSERT INTO items SELECT g, repeat('n', 50), g, 'big' FROM generate_series(1, 100000) g; \
         UPDATE items SET qty = -qty WHERE id % 3 = 0; \
         SAVEPOINT a; \
         INSERT INTO items SELECT g, 'rolled back', g, 'a' FROM generate_series(200001, 220000) g; \
         UPDATE items SET name = 'rolled back' WHERE id % 2 = 0; \
         ROLLBACK TO a; \
         SAVEPOINT b; \
         INSERT INTO items SELECT g, 'released', g, 'b' FROM generate_series(300001, 310000) g; \
         RELEASE b; \
         DELETE FROM items WHERE id % 5 = 0;",
    )
    .expect("first half of the big transaction");
    // Committed while the big one is open: it lands before it, as on the source.
    src.execute(
        &db,
        "INSERT INTO items VALUES (900001, 'small', 1, 'small')",
    );
    big.batch_execute(
        "UPDATE items SET id = id + 1000000 WHERE id % 7 = 0; \
         COMMIT",
    )
    .expect("second half of the big transaction");
    converge_items("large transaction", (src, &db), (dest, &ddb), "b");
    assert_eq!(
        dest.query(&ddb, "SELECT count(*), count(*) FILTER (WHERE name = 'rolled back' OR id > 500000 AND id <= 520000) FROM items"),
        vec![vec![Some("88001".to_string()), Some("0".to_string())]],
        "100,000 rows less a fifth, the 10,000 released ones less a fifth, the small one"
    );
    if version >= 14 {
        assert!(
            slot_statistic_grows(src, &db, "stream_txns"),
            "the server did not stream the big transactions"
        );
    }
    daemon.stop_ok();
}

#[test]
fn large_transaction_pg13() {
    large_transaction(13);
}

#[test]
fn large_transaction_pg14() {
    large_transaction(14);
}

#[test]
fn large_transaction_pg18() {
    large_transaction(18);
}

/// SIGKILL while a big transaction is being streamed (14+): what the daemon kept of it
/// is lost with it, the slot sends the whole transaction again after the restart, and
/// it lands once, exactly.
fn killed_while_a_transaction_streams(version: u32) {
    let (pair, daemon) = small_decoding_memory(version, "bigkill", "k");
    let (src, dest, db, ddb) = (pair.src, pair.dest, pair.db, pair.ddb);
    let mut big = src.client(&db);
    big.batch_execute(
        "BEGIN; \
         INSERT INTO items SELECT g, 'first', g, 'k' FROM generate_series(1, 50000) g;",
    )
    .expect("first half");
    assert!(
        slot_statistic_grows(src, &db, "stream_bytes"),
        "the server did not start streaming the open transaction"
    );
    let dir = daemon.kill();
    big.batch_execute(
        "SAVEPOINT s; \
         DELETE FROM items WHERE id % 2 = 0; \
         ROLLBACK TO s; \
         UPDATE items SET qty = -qty WHERE id % 3 = 0; \
         INSERT INTO items SELECT g, 'second', g, 'k' FROM generate_series(50001, 60000) g; \
         COMMIT",
    )
    .expect("second half");
    let daemon = Daemon::spawn(dir);
    converge_items("after the restart", (src, &db), (dest, &ddb), "k");
    assert_eq!(
        dest.query(
            &ddb,
            "SELECT count(*), count(*) FILTER (WHERE qty < 0) FROM items"
        ),
        vec![vec![Some("60000".to_string()), Some("16666".to_string())]]
    );
    daemon.stop_ok();
}

#[test]
fn killed_while_a_transaction_streams_pg14() {
    killed_while_a_transaction_streams(14);
}

#[test]
fn killed_while_a_transaction_streams_pg18() {
    killed_while_a_transaction_streams(18);
}

/// REPLICA IDENTITY FULL on a table without a key: rows are found by their whole old
/// value, NULLs included.
#[test]
fn replica_identity_full_with_nulls() {
    let v = newest();
    let src = source(v);
    let dest = destination();
    let (db, ddb, family) = (unique_name("fu"), unique_name("fud"), unique_name("full"));
    src.create_database(&db);
    src.execute(&db, "SET ROLE kuvasz; CREATE TABLE notes (a int, b text, c date); ALTER TABLE notes REPLICA IDENTITY FULL");
    src.execute(&db, "INSERT INTO notes VALUES (1, NULL, '2024-01-01'), (2, 'two', NULL), (3, 'three', '2024-03-03')");
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE notes (a int, b text, c date)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"f\" }} ]\n[source.tables]\nnotes = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    daemon.wait_streaming(1);
    src.execute(&db, "UPDATE notes SET b = 'one' WHERE a = 1; UPDATE notes SET c = '2025-02-02' WHERE a = 2; DELETE FROM notes WHERE a = 3; INSERT INTO notes VALUES (4, NULL, NULL)");
    src.execute(&db, "DELETE FROM notes WHERE a = 4");
    let rows = "SELECT a::text, b, c::text FROM notes ORDER BY a";
    converge(
        "full identity",
        || src.query(&db, rows),
        || dest.query(&ddb, rows),
    );
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        dest.query(&ddb, rows),
        vec![
            vec![s("1"), s("one"), s("2024-01-01")],
            vec![s("2"), s("two"), s("2025-02-02")]
        ]
    );
    daemon.stop_ok();
}

/// A refused row in a transaction that also holds a TRUNCATE barrier: the pool restarts
/// (whether the writer failed before or after the barrier was queued behind it), and once
/// the cause is fixed everything arrives, TRUNCATE in its place.
#[test]
fn rejection_before_a_truncate_barrier_recovers() {
    let v = newest();
    let Pair {
        src,
        dest,
        db,
        ddb,
        map,
        ..
    } = items_pair(v, "tb", "t", "plain = {}\n");
    src.execute(&db, PLAIN_SRC);
    src.execute(&db, "INSERT INTO plain VALUES (1, 'old')");
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE plain (id bigint PRIMARY KEY, v text)",
    );
    dest.execute(
        &ddb,
        "ALTER TABLE items ADD CONSTRAINT qty_ok CHECK (qty >= 0)",
    );
    // One writer: the refused row and the barrier's Flush share a queue.
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 1"]);
    daemon.wait_streaming(1);
    src.execute(&db, "BEGIN; INSERT INTO items VALUES (1, 'bad', -1, NULL); INSERT INTO plain VALUES (2, 'x'); TRUNCATE plain; INSERT INTO plain VALUES (3, 'new'); COMMIT");
    support::wait_for("rejection report", Duration::from_secs(60), || {
        daemon
            .log()
            .contains("destination rejected INSERT")
            .then_some(())
    });
    dest.execute(&ddb, "ALTER TABLE items DROP CONSTRAINT qty_ok");
    converge_items("items", (src, &db), (dest, &ddb), "t");
    let rows = "SELECT id::text, v FROM plain ORDER BY id";
    converge("plain", || src.query(&db, rows), || dest.query(&ddb, rows));
    daemon.stop_ok();
}

/// A barrier that waits longer than the source's `wal_sender_timeout` (a TRUNCATE queued
/// behind a write that waits for a lock someone holds on the target) does not cost the
/// stream: the source keeps sending standby status while it waits, so the server keeps
/// the connection, and everything arrives once the lock is gone.
#[test]
fn long_barrier_keeps_the_stream() {
    let v = newest();
    // A private server: the short timeout is set for the whole cluster.
    let src = support::private_source(v);
    src.execute("postgres", "ALTER SYSTEM SET wal_sender_timeout = '3s'");
    src.execute("postgres", "SELECT pg_reload_conf()");
    let Pair {
        dest, db, ddb, map, ..
    } = items_pair_on(&src, "lb", "t", "");
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 1"]);
    daemon.wait_streaming(1);
    src.execute(&db, "INSERT INTO items VALUES (1, 'before', 1, NULL)");
    let (expected, actual) = (
        || items_expected(&src, &db, "t"),
        || items_actual(dest, &ddb, "t"),
    );
    converge("before the lock", expected, actual);

    let mut locker = dest.client(&ddb);
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .expect("lock the target");
    src.execute(&db, "INSERT INTO items VALUES (2, 'waits', 2, NULL)");
    src.execute(&db, "TRUNCATE items");
    src.execute(&db, "INSERT INTO items VALUES (3, 'after', 3, NULL)");
    // More than two timeouts' worth of waiting behind the lock.
    std::thread::sleep(Duration::from_secs(8));
    locker.batch_execute("COMMIT").expect("unlock");
    converge("after the lock", expected, actual);
    let row: Vec<Option<String>> = ["t", "3", "after", "3", "x"]
        .iter()
        .map(|v| Some(v.to_string()))
        .collect();
    assert_eq!(actual(), vec![row]);
    let log = daemon.log();
    assert!(
        log.matches("streaming from slot").count() == 1 && !log.contains("restarting in"),
        "the stream was dropped while the barrier waited; log:\n{log}"
    );
    daemon.stop_ok();
}

/// A target with a unique constraint beyond its key (the upgrade case: the source's own
/// schema): rows that trade values of that column arrive in source order, however many
/// writers, even when one of them is held up. Routed by key, a row taking a value could
/// overtake the row giving it up and be refused.
#[test]
fn secondary_unique_constraint_keeps_source_order() {
    let p = items_pair(newest(), "su", "t", "");
    let (src, dest, db, ddb) = (p.src, p.dest, &p.db, &p.ddb);
    dest.execute(
        ddb,
        "ALTER TABLE items ADD CONSTRAINT name_once UNIQUE (sid, name)",
    );
    src.execute(
        db,
        "INSERT INTO items SELECT g, 'n' || g, g, NULL FROM generate_series(1, 20) g",
    );
    let daemon = Daemon::start(&dest.url(ddb), &p.map, &["num_workers = 4"]);
    let (expected, actual) = (
        || items_expected(src, db, "t"),
        || items_actual(dest, ddb, "t"),
    );
    converge("initial copy", expected, actual);
    daemon.wait_streaming(1);

    // Whichever writer gets row 1 waits for this lock; the others go on.
    let mut locker = dest.client(ddb);
    locker
        .batch_execute("BEGIN; SELECT * FROM items WHERE id = 1 FOR UPDATE")
        .expect("lock row 1");
    // Every row takes its neighbour's name (through a temporary one, as the source's
    // own unique constraint would require).
    src.execute(
        db,
        "BEGIN; UPDATE items SET name = 'tmp' || id; \
         UPDATE items SET name = 'n' || (id % 20 + 1); COMMIT",
    );
    std::thread::sleep(Duration::from_secs(3));
    locker.batch_execute("COMMIT").expect("unlock");
    converge("names traded", expected, actual);
    let log = daemon.log();
    assert!(
        !log.contains("destination rejected"),
        "a change overtook another of the same unique value; log:\n{log}"
    );
    daemon.stop_ok();
}

/// A target with no unique index on the key (nothing for ON CONFLICT to arbitrate on):
/// rows are updated where their key exists and inserted where not, hot keys and all, and
/// a restart's replay adds no second copy.
#[test]
fn target_without_a_key_index() {
    let p = items_pair(newest(), "nk", "t", "");
    let (src, dest, db, ddb) = (p.src, p.dest, &p.db, &p.ddb);
    dest.execute(ddb, "ALTER TABLE items DROP CONSTRAINT items_pkey");
    src.execute(
        db,
        "INSERT INTO items SELECT g, 'pre', g, NULL FROM generate_series(1, 100) g",
    );
    let daemon = Daemon::start(&dest.url(ddb), &p.map, &[]);
    let (expected, actual) = (
        || items_expected(src, db, "t"),
        || items_actual(dest, ddb, "t"),
    );
    converge("initial copy", expected, actual);
    daemon.wait_streaming(1);
    src.execute(
        db,
        "BEGIN; INSERT INTO items SELECT g, 'new', g, NULL FROM generate_series(101, 3000) g; \
         UPDATE items SET qty = qty + 1 WHERE id % 2 = 0; UPDATE items SET qty = qty + 1 WHERE id % 2 = 0; \
         DELETE FROM items WHERE id % 3 = 0; UPDATE items SET id = id + 10000 WHERE id % 5 = 0; COMMIT",
    );
    for i in 0..50 {
        src.execute(
            db,
            &format!("UPDATE items SET name = 'hot{i}' WHERE id = 1"),
        );
    }
    converge("streamed", expected, actual);
    let dir = daemon.kill();
    src.execute(db, "UPDATE items SET name = 'after' WHERE id = 2");
    let daemon = Daemon::spawn(dir);
    converge("after a replay", expected, actual);
    assert_eq!(
        dest.query(ddb, "SELECT count(*) = count(DISTINCT id) FROM items"),
        vec![vec![Some("t".to_string())]],
        "a key arrived twice"
    );
    daemon.stop_ok();
}
