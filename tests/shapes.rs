//! Table shapes of real schemas, end to end on every source major: destinations built
//! from the source's own schema, tables without a key, partitions, names that need
//! quotes, generated columns, tables that cannot be replicated, schema changes.

mod support;

use std::time::Duration;

use support::daemon::Daemon;
use support::{converge, destination, source, unique_name, Cluster};

/// A destination role that may set `session_replication_role` (granted, not superuser)
/// and otherwise has `kuvasz`'s privileges.
fn replica_role_url(dest: &Cluster, db: &str) -> String {
    dest.execute(
        "postgres",
        "DO $$ BEGIN CREATE ROLE kv_srr LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         GRANT kuvasz TO kv_srr; GRANT SET ON PARAMETER session_replication_role TO kv_srr",
    );
    dest.url_as("kv_srr", "unused", db)
}

/// The upgrade case: parent and child with a foreign key and `last_update` triggers.
const SHOP_SCHEMA: &str = "SET ROLE kuvasz; \
    CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS \
      $$ BEGIN NEW.last_update := clock_timestamp(); RETURN NEW; END $$; \
    CREATE TABLE parent (id int PRIMARY KEY, name text, \
      last_update timestamptz NOT NULL DEFAULT clock_timestamp()); \
    CREATE TABLE child (id int PRIMARY KEY, \
      parent_id int NOT NULL REFERENCES parent ON DELETE CASCADE, v text, \
      last_update timestamptz NOT NULL DEFAULT clock_timestamp()); \
    CREATE TRIGGER parent_touch BEFORE INSERT OR UPDATE ON parent FOR EACH ROW EXECUTE PROCEDURE touch(); \
    CREATE TRIGGER child_touch BEFORE INSERT OR UPDATE ON child FOR EACH ROW EXECUTE PROCEDURE touch()";

fn shop_rows(c: &Cluster, db: &str) -> support::Rows {
    c.query(
        db,
        "SELECT 'p', id::text, name, last_update::text FROM parent \
         UNION ALL SELECT 'c' || parent_id, id::text, v, last_update::text FROM child ORDER BY 1, 2",
    )
}

/// A destination made from the source's schema receives the source's values, with four
/// writers committing in any order: copy and stream run as replicas, so neither the
/// foreign key (a child copied or committed before its parent) nor the trigger (which
/// would stamp its own `last_update`) fires.
fn replica_role(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("rr"), unique_name("rrd"), unique_name("rr"));
    src.create_database(&db);
    src.execute(&db, SHOP_SCHEMA);
    dest.create_database(&ddb);
    dest.execute(&ddb, SHOP_SCHEMA);
    src.execute(
        &db,
        "INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 200) g; \
         INSERT INTO child SELECT g, 1 + g % 200, 'c' || g FROM generate_series(1, 2000) g",
    );
    // The child comes first in the map, and so in the copy.
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nchild = {{}}\nparent = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&replica_role_url(dest, &ddb), &map, &["num_workers = 4"]);
    converge(
        "initial copy",
        || shop_rows(src, &db),
        || shop_rows(dest, &ddb),
    );
    // New parents with their children in one transaction, updates, cascading deletes.
    for round in 0..5 {
        let base = 1000 + round * 100;
        src.execute(
            &db,
            &format!(
                "BEGIN; \
                 INSERT INTO parent SELECT g, 'new' FROM generate_series({base}, {base} + 49) g; \
                 INSERT INTO child SELECT 10 * g + k, g, 'k' || k FROM generate_series({base}, {base} + 49) g, \
                   generate_series(0, 3) k; \
                 UPDATE parent SET name = name || '!' WHERE id % 7 = {round}; \
                 UPDATE child SET v = 'moved', parent_id = {base} WHERE id % 13 = {round} AND id < 2000; \
                 COMMIT; \
                 DELETE FROM parent WHERE id % 11 = {round} AND id < 1000"
            ),
        );
    }
    converge(
        "streaming",
        || shop_rows(src, &db),
        || shop_rows(dest, &ddb),
    );
    assert!(
        !daemon.log().contains("session_replication_role"),
        "no warning when the role may set it:\n{}",
        daemon.log()
    );
    daemon.stop_ok();
}

every_major! { replica_role:
    replica_role_pg12 => 12,
    replica_role_pg13 => 13,
    replica_role_pg14 => 14,
    replica_role_pg15 => 15,
    replica_role_pg16 => 16,
    replica_role_pg17 => 17,
    replica_role_pg18 => 18,
}

/// One source database and one destination database for `sid`, with `ddl` run on the
/// source and `dest_ddl` on the destination (both as `kuvasz`).
struct Setup<'a> {
    src: &'a Cluster,
    dest: &'static Cluster,
    db: String,
    ddb: String,
    family: String,
}

impl<'a> Setup<'a> {
    fn new(src: &'a Cluster, prefix: &str, ddl: &str, dest_ddl: &str) -> Setup<'a> {
        let dest = destination();
        let s = Setup {
            src,
            dest,
            db: unique_name(prefix),
            ddb: unique_name(&format!("{prefix}d")),
            family: unique_name(prefix),
        };
        src.create_database(&s.db);
        src.execute(&s.db, &format!("SET ROLE kuvasz; {ddl}"));
        dest.create_database(&s.ddb);
        dest.execute(&s.ddb, &format!("SET ROLE kuvasz; {dest_ddl}"));
        s
    }

    /// A map of this one URL (sid `s`) with `tables` lines.
    fn map(&self, tables: &str) -> String {
        format!(
            "[[source]]\ndatabase = \"{}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
             [source.tables]\n{tables}\n",
            self.family,
            self.src.url(&self.db)
        )
    }

    fn start(&self, tables: &str) -> Daemon {
        Daemon::start(&self.dest.url(&self.ddb), &self.map(tables), &[])
    }

    fn src_exec(&self, sql: &str) {
        self.src.execute(&self.db, sql);
    }

    /// Waits until `dest_sql` on the destination returns what `src_sql` does on the source.
    fn converge(&self, what: &str, src_sql: &str, dest_sql: &str) {
        converge(
            what,
            || self.src.query(&self.db, src_sql),
            || self.dest.query(&self.ddb, dest_sql),
        );
    }

    /// Waits until `dest_sql` returns `expected` (one text column per row).
    fn converge_to(&self, what: &str, dest_sql: &str, expected: &[&str]) {
        let expected: support::Rows = expected.iter().map(|v| vec![Some(v.to_string())]).collect();
        converge(
            what,
            || expected.clone(),
            || self.dest.query(&self.ddb, dest_sql),
        );
    }

    /// The tables publication `name` names, as `schema.table`, sorted.
    fn published(&self, name: &str) -> Vec<String> {
        self.src
            .query(
                &self.db,
                &format!(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
                     WHERE pubname = '{name}' ORDER BY 1"
                ),
            )
            .into_iter()
            .filter_map(|r| r[0].clone())
            .collect()
    }

    fn slot(&self) -> String {
        format!("kuvasz_{}_s", self.family)
    }
}

/// Writes a new map into a stopped daemon's directory and starts it again.
fn restart_with(dir: std::path::PathBuf, map: &str) -> Daemon {
    std::fs::write(dir.join("map.toml"), map).expect("write map");
    Daemon::spawn(dir)
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text)";
const ITEMS_SID: &str = "CREATE TABLE items (sid text, id int, v text, PRIMARY KEY (sid, id))";
const ITEMS_ROWS: &str = "SELECT id::text || ':' || coalesce(v, '') FROM items ORDER BY id";

/// A table with neither key nor replica identity goes into `<slot>_ins`, which publishes
/// only INSERT and TRUNCATE: its inserts (duplicates included) replicate, the source
/// keeps accepting its UPDATE and DELETE, and the daemon says what is not carried. The
/// second run adds such a table to an existing slot, whose WAL predates the new
/// publication.
fn keyless_table(version: u32) {
    let s = Setup::new(
        source(version),
        "nk",
        &format!("{ITEMS}; CREATE TABLE events (at int, msg text)"),
        &format!(
            "{ITEMS_SID}; CREATE TABLE events (sid text, at int, msg text, seen text DEFAULT 'd')"
        ),
    );
    s.src_exec("INSERT INTO events VALUES (1, 'a'), (1, 'a'), (2, NULL); INSERT INTO items VALUES (1, 'x')");
    let events = "SELECT at::text || ':' || coalesce(msg, '-') FROM events ORDER BY 1";
    let daemon = s.start("items = {}\nevents = {}");
    s.converge_to("copy", events, &["1:a", "1:a", "2:-"]);
    s.src_exec(
        "INSERT INTO events VALUES (3, 'b'), (3, 'b'); \
         UPDATE events SET msg = 'changed' WHERE at = 1; DELETE FROM events WHERE at = 2; \
         INSERT INTO items VALUES (2, 'y'); UPDATE items SET v = 'z' WHERE id = 1",
    );
    s.converge_to(
        "inserts streamed, updates and deletes not carried",
        events,
        &["1:a", "1:a", "2:-", "3:b", "3:b"],
    );
    s.converge("the rest streams", ITEMS_ROWS, ITEMS_ROWS);
    assert_eq!(s.published(&s.slot()), vec!["public.items".to_string()]);
    assert_eq!(
        s.published(&format!("{}_ins", s.slot())),
        vec!["public.events".to_string()]
    );
    let log = daemon.log();
    assert!(
        log.contains("public.events has no primary key and no replica identity")
            && log.contains("its UPDATEs and DELETEs are not carried"),
        "{log}"
    );
    let (code, report) = Daemon::check(&daemon.dir);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("warning: table public.events → public.events: no primary key")
            && report.contains("only INSERT and"),
        "{report}"
    );
    // TRUNCATE is published: the sid's rows go.
    s.src_exec("TRUNCATE events; INSERT INTO events VALUES (4, 'after')");
    s.converge_to("truncate", events, &["4:after"]);
    daemon.stop_ok();
}

/// A keyless table entering the map of a slot that has no `<slot>_ins` publication yet:
/// the slot's WAL predates the new publication, which PostgreSQL before 18 refuses to
/// decode, so the daemon streams the other publication up to the copy's snapshot first.
/// Inserts made while stopped are in the copy, those after in the stream, none twice.
fn keyless_table_joins_a_slot(version: u32) {
    let s = Setup::new(
        source(version),
        "nj",
        &format!("{ITEMS}; CREATE TABLE later (n int)"),
        &format!("{ITEMS_SID}; CREATE TABLE later (n int)"),
    );
    let daemon = s.start("items = {}");
    s.src_exec("INSERT INTO items VALUES (1, 'x')");
    s.converge("run 1", ITEMS_ROWS, ITEMS_ROWS);
    let dir = daemon.stop_ok();
    s.src_exec("INSERT INTO later VALUES (1), (1); INSERT INTO items VALUES (3, 'w')");
    let daemon = restart_with(dir, &s.map("items = {}\nlater = {}"));
    let later = "SELECT n::text FROM later ORDER BY 1";
    s.converge_to("copy", later, &["1", "1"]);
    s.src_exec("INSERT INTO later VALUES (2), (2); INSERT INTO items VALUES (4, 'v')");
    s.converge_to("stream", later, &["1", "1", "2", "2"]);
    s.converge("items", ITEMS_ROWS, ITEMS_ROWS);
    assert_eq!(
        s.published(&format!("{}_ins", s.slot())),
        vec!["public.later".to_string()]
    );
    // The new publication was streamed only once the slot had passed the copy's snapshot.
    assert!(
        daemon.log().contains("then again from there")
            && daemon
                .log()
                .contains(&format!("{}, {}_ins)", s.slot(), s.slot())),
        "{}",
        daemon.log()
    );
    daemon.stop_ok();
}

every_major! { keyless_table_joins_a_slot:
    keyless_table_joins_a_slot_pg12 => 12,
    keyless_table_joins_a_slot_pg13 => 13,
    keyless_table_joins_a_slot_pg14 => 14,
    keyless_table_joins_a_slot_pg15 => 15,
    keyless_table_joins_a_slot_pg16 => 16,
    keyless_table_joins_a_slot_pg17 => 17,
    keyless_table_joins_a_slot_pg18 => 18,
}

every_major! { keyless_table:
    keyless_table_pg12 => 12,
    keyless_table_pg13 => 13,
    keyless_table_pg14 => 14,
    keyless_table_pg15 => 15,
    keyless_table_pg16 => 16,
    keyless_table_pg17 => 17,
    keyless_table_pg18 => 18,
}

/// Tables that cannot be replicated (no target, a key column missing on the target, no
/// shared column, no source table) are left out of the publication and reported while
/// the rest of the source streams; once fixed, the next start publishes and copies them.
fn unreplicable_tables(version: u32) {
    let s = Setup::new(
        source(version),
        "ur",
        &format!(
            "{ITEMS}; CREATE TABLE no_target (id int PRIMARY KEY, v text); \
             CREATE TABLE no_key_col (id int PRIMARY KEY, v text); \
             CREATE TABLE nothing_shared (id int PRIMARY KEY, v text)"
        ),
        &format!(
            "{ITEMS_SID}; CREATE TABLE no_key_col (v text); CREATE TABLE nothing_shared (other int)"
        ),
    );
    s.src_exec(
        "INSERT INTO no_target VALUES (1, 'a'); INSERT INTO no_key_col VALUES (1, 'b'); \
         INSERT INTO items VALUES (1, 'x')",
    );
    let tables = "items = {}\nno_target = {}\nno_key_col = {}\nnothing_shared = {}\nmissing = {}";
    let daemon = s.start(tables);
    s.converge("the rest is copied", ITEMS_ROWS, ITEMS_ROWS);
    s.src_exec("INSERT INTO items VALUES (2, 'y'); INSERT INTO no_target VALUES (2, 'c')");
    s.converge("the rest streams", ITEMS_ROWS, ITEMS_ROWS);
    let log = daemon.log();
    for reason in [
        "table public.no_target is not replicated: its target table public.no_target does not exist",
        "table public.no_key_col is not replicated: its key column \"id\" does not exist on the target",
        "table public.nothing_shared is not replicated: it and its target public.nothing_shared have no column name in common",
        "table public.missing is not replicated: the source table does not exist",
    ] {
        assert!(log.contains(reason), "log lacks {reason:?}:\n{log}");
    }
    assert_eq!(s.published(&s.slot()), vec!["public.items".to_string()]);
    let dir = daemon.stop_ok();
    let (code, report) = Daemon::check(&dir);
    assert_eq!(code, 1, "{report}");
    for line in [
        "table public.items: ok → public.items",
        "table public.no_target: NOT replicated: its target table public.no_target does not exist",
        "table public.missing: NOT replicated: the source table does not exist",
    ] {
        assert!(report.contains(line), "check lacks {line:?}:\n{report}");
    }

    // Fixed: the next start publishes and copies them, with nothing lost.
    s.dest.execute(
        &s.ddb,
        "SET ROLE kuvasz; CREATE TABLE no_target (id int PRIMARY KEY, v text); \
         ALTER TABLE no_key_col ADD COLUMN id int",
    );
    s.src_exec("INSERT INTO no_target VALUES (3, 'while stopped')");
    let daemon = restart_with(dir, &s.map(tables));
    let rows = "SELECT id::text || ':' || v FROM no_target ORDER BY id";
    s.converge("fixed table copied", rows, rows);
    s.src_exec("INSERT INTO no_target VALUES (4, 'streamed'); UPDATE no_key_col SET v = 'u'");
    s.converge("fixed table streams", rows, rows);
    let pairs = "SELECT id::text || ':' || v FROM no_key_col ORDER BY id";
    s.converge("fixed key column", pairs, pairs);
    assert_eq!(
        s.published(&s.slot()),
        ["items", "no_key_col", "no_target"]
            .map(|t| format!("public.{t}"))
            .to_vec()
    );
    daemon.stop_ok();
}

every_major! { unreplicable_tables:
    unreplicable_tables_pg12 => 12,
    unreplicable_tables_pg13 => 13,
    unreplicable_tables_pg14 => 14,
    unreplicable_tables_pg15 => 15,
    unreplicable_tables_pg16 => 16,
    unreplicable_tables_pg17 => 17,
    unreplicable_tables_pg18 => 18,
}

/// Shards with globally unique keys into one target without `sid`: allowed with a
/// warning; a TRUNCATE from one shard cannot be confined to its rows, so it is reported
/// and not applied, while the other shard's changes keep arriving.
fn shared_target_without_sid(version: u32) {
    let src = source(version);
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("sha"),
        unique_name("shb"),
        unique_name("shd"),
        unique_name("sh"),
    );
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(db, &format!("SET ROLE kuvasz; {ITEMS}"));
    }
    dest.create_database(&ddb);
    dest.execute(&ddb, &format!("SET ROLE kuvasz; {ITEMS}"));
    src.execute(&a, "INSERT INTO items VALUES (1, 'a1'), (3, 'a3')");
    src.execute(&b, "INSERT INTO items VALUES (2, 'b2')");
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, \
         {{ url = \"{}\", sid = \"b\" }} ]\n[source.tables]\nitems = {{}}\n",
        src.url(&a),
        src.url(&b)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let union = || {
        let mut rows = src.query(&a, ITEMS_ROWS);
        rows.extend(src.query(&b, ITEMS_ROWS));
        rows.sort();
        rows
    };
    converge("copy", union, || dest.query(&ddb, ITEMS_ROWS));
    src.execute(&a, "TRUNCATE items; INSERT INTO items VALUES (5, 'a5')");
    src.execute(
        &b,
        "INSERT INTO items VALUES (4, 'b4'); UPDATE items SET v = 'B2' WHERE id = 2",
    );
    converge(
        "the truncate is not applied",
        || {
            ["1:a1", "2:B2", "3:a3", "4:b4", "5:a5"]
                .map(|v| vec![Some(v.to_string())])
                .to_vec()
        },
        || dest.query(&ddb, ITEMS_ROWS),
    );
    let log = daemon.log();
    assert!(
        log.contains("has no sid column and 2 URLs")
            && log.contains("TRUNCATE public.items")
            && log.contains("not applied"),
        "{log}"
    );
    daemon.stop_ok();
}

every_major! { shared_target_without_sid:
    shared_target_without_sid_pg12 => 12,
    shared_target_without_sid_pg13 => 13,
    shared_target_without_sid_pg14 => 14,
    shared_target_without_sid_pg15 => 15,
    shared_target_without_sid_pg16 => 16,
    shared_target_without_sid_pg17 => 17,
    shared_target_without_sid_pg18 => 18,
}

/// A table entering the map while a transaction writing it is open on the source: the
/// stream decodes that transaction with the catalog from before the table was
/// published, so only a copy snapshot that waits for it (a temporary slot's) holds it.
/// Every row arrives exactly once (the keyless table would show a second copy).
fn table_added_during_a_transaction(version: u32) {
    // A private server: the open transaction would stall other tests' slot creations.
    let src = support::private_source(version);
    let s = Setup::new(
        &src,
        "ta",
        &format!(
            "{ITEMS}; CREATE TABLE keyed (id int PRIMARY KEY, v text); CREATE TABLE bare (n int); \
             CREATE TABLE spare (n int)"
        ),
        &format!(
            "{ITEMS_SID}; CREATE TABLE keyed (id int PRIMARY KEY, v text); CREATE TABLE bare (n int); \
             CREATE TABLE spare (n int)"
        ),
    );
    // Run 1 creates the slot and the _ins publication (with spare; bare's home later).
    let daemon = s.start("items = {}\nspare = {}");
    s.src_exec("INSERT INTO items VALUES (1, 'x'); INSERT INTO keyed VALUES (1, 'before')");
    s.converge("run 1", ITEMS_ROWS, ITEMS_ROWS);
    let dir = daemon.stop_ok();

    let mut open = src.client(&s.db);
    open.batch_execute(
        "BEGIN; INSERT INTO keyed VALUES (2, 'in flight'); INSERT INTO bare VALUES (1), (1)",
    )
    .expect("open a transaction");
    let daemon = restart_with(dir, &s.map("items = {}\nspare = {}\nkeyed = {}\nbare = {}"));
    support::wait_for("both tables published", Duration::from_secs(60), || {
        (s.published(&s.slot()).contains(&"public.keyed".to_string())
            && s.published(&format!("{}_ins", s.slot()))
                .contains(&"public.bare".to_string()))
        .then_some(())
    });
    open.batch_execute(
        "INSERT INTO keyed VALUES (3, 'later in flight'); INSERT INTO bare VALUES (2); COMMIT",
    )
    .expect("commit");
    s.src_exec("INSERT INTO keyed VALUES (4, 'after'); INSERT INTO bare VALUES (3)");
    let keyed = "SELECT id::text || ':' || v FROM keyed ORDER BY id";
    s.converge("keyed", keyed, keyed);
    s.converge_to(
        "bare, each row once",
        "SELECT n::text FROM bare ORDER BY n",
        &["1", "1", "2", "3"],
    );
    daemon.stop_ok();
}

every_major! { table_added_during_a_transaction:
    table_added_during_a_transaction_pg12 => 12,
    table_added_during_a_transaction_pg13 => 13,
    table_added_during_a_transaction_pg14 => 14,
    table_added_during_a_transaction_pg15 => 15,
    table_added_during_a_transaction_pg16 => 16,
    table_added_during_a_transaction_pg17 => 17,
    table_added_during_a_transaction_pg18 => 18,
}

/// A re-copy (here: the slot was lost and is made again) replaces exactly what this
/// source put in a clone target: two source tables into one target keep each other's
/// rows, and an append target keeps the rows its source deleted. A changed `target` is
/// copied into the new target.
fn recopy(version: u32) {
    let s = Setup::new(
        source(version),
        "rc",
        "CREATE TABLE north (id int PRIMARY KEY, v text); CREATE TABLE south (id int PRIMARY KEY, v text); \
         CREATE TABLE ledger (id int PRIMARY KEY, v text); CREATE TABLE moved (id int PRIMARY KEY, v text); \
         CREATE TABLE journal (n int)",
        "CREATE TABLE regions (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE ledger (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE moved_a (id int PRIMARY KEY, v text); CREATE TABLE moved_b (id int PRIMARY KEY, v text); \
         CREATE TABLE journal (sid text, n int)",
    );
    s.src_exec(
        "INSERT INTO north VALUES (1, 'n1'), (2, 'n2'); INSERT INTO south VALUES (11, 's11'); \
         INSERT INTO ledger VALUES (1, 'l1'), (2, 'l2'); INSERT INTO moved VALUES (1, 'm'); \
         INSERT INTO journal VALUES (1), (1)",
    );
    let tables = |moved_to: &str| {
        format!(
            "north = {{ target = \"regions\" }}\nsouth = {{ target = \"regions\" }}\n\
             ledger = {{ type = \"append\" }}\nmoved = {{ target = \"{moved_to}\" }}\n\
             journal = {{ type = \"append\" }}"
        )
    };
    let regions_src = "SELECT id::text || ':' || v FROM north UNION ALL SELECT id::text || ':' || v FROM south ORDER BY 1";
    let regions = "SELECT id::text || ':' || v FROM regions ORDER BY 1";
    let ledger = "SELECT id::text || ':' || v FROM ledger ORDER BY 1";
    let daemon = s.start(&tables("moved_a"));
    s.converge("copy", regions_src, regions);
    s.converge_to("append copy", ledger, &["1:l1", "2:l2"]);
    let journal = "SELECT n::text FROM journal ORDER BY 1";
    s.converge_to("keyless append copy", journal, &["1", "1"]);
    s.src_exec("DELETE FROM ledger WHERE id = 1; INSERT INTO south VALUES (12, 's12')");
    s.converge("stream", regions_src, regions);
    let dir = daemon.stop_ok();

    // The slot is lost while stopped; changes meanwhile are only in the next copy.
    s.src_exec(&format!(
        "SELECT pg_drop_replication_slot('{}'); \
         UPDATE ledger SET v = 'L2' WHERE id = 2; INSERT INTO ledger VALUES (3, 'l3'); \
         DELETE FROM north WHERE id = 1; UPDATE south SET v = 'S11' WHERE id = 11; \
         INSERT INTO journal VALUES (2)",
        s.slot()
    ));
    let daemon = restart_with(dir, &s.map(&tables("moved_b")));
    s.converge("re-copy: both source tables", regions_src, regions);
    s.converge_to(
        "re-copy: the append target keeps the deleted row",
        ledger,
        &["1:l1", "2:L2", "3:l3"],
    );
    s.converge_to(
        "re-copy: a keyless append target gets no row twice",
        journal,
        &["1", "1", "2"],
    );
    s.converge_to(
        "retarget",
        "SELECT id::text || ':' || v FROM moved_b",
        &["1:m"],
    );
    s.src_exec("INSERT INTO north VALUES (3, 'n3'); INSERT INTO moved VALUES (2, 'm2')");
    s.converge("stream after the re-copy", regions_src, regions);
    let dir = daemon.stop_ok();

    // database.schema changes: every table is copied into the new schema's targets.
    s.dest.execute(
        &s.ddb,
        "SET ROLE kuvasz; CREATE SCHEMA other; \
         CREATE TABLE other.regions (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE other.ledger (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE other.moved_b (id int PRIMARY KEY, v text); \
         CREATE TABLE other.journal (sid text, n int)",
    );
    let conf = std::fs::read_to_string(dir.join("kuvasz-streamer.toml")).expect("config");
    let conf = conf.replacen("[database]\n", "[database]\nschema = \"other\"\n", 1);
    std::fs::write(dir.join("kuvasz-streamer.toml"), conf).expect("write config");
    let daemon = Daemon::spawn(dir);
    s.converge(
        "new schema",
        regions_src,
        "SELECT id::text || ':' || v FROM other.regions ORDER BY 1",
    );
    s.converge_to(
        "new schema: append target",
        "SELECT id::text || ':' || v FROM other.ledger ORDER BY 1",
        &["2:L2", "3:l3"],
    );
    daemon.stop_ok();
}

every_major! { recopy:
    recopy_pg12 => 12,
    recopy_pg13 => 13,
    recopy_pg14 => 14,
    recopy_pg15 => 15,
    recopy_pg16 => 16,
    recopy_pg17 => 17,
    recopy_pg18 => 18,
}

/// Names that need quotes on both sides (mixed case, spaces, quotes) in schemas, tables
/// and columns; the same table name in two schemas into two targets; a destination
/// schema other than `public`.
fn quoted_names(version: u32) {
    let s = Setup::new(
        source(version),
        "qn",
        r#"CREATE SCHEMA "Sales Dept"; CREATE SCHEMA s2;
           CREATE TABLE "Sales Dept"."Order ""Items""" ("Id" int PRIMARY KEY, "unit price" numeric(8,2), "quo""te" text);
           CREATE TABLE "Sales Dept".dup (id int PRIMARY KEY, v text);
           CREATE TABLE s2.dup (id int PRIMARY KEY, v text)"#,
        r#"CREATE SCHEMA "Target ""Schema""";
           CREATE TABLE "Target ""Schema"""."Order Items Copy" (sid text, "Id" int, "unit price" numeric(8,2), "quo""te" text, PRIMARY KEY (sid, "Id"));
           CREATE TABLE "Target ""Schema""".dup_a (id int PRIMARY KEY, v text);
           CREATE TABLE "Target ""Schema""".dup_b (id int PRIMARY KEY, v text)"#,
    );
    s.src_exec(
        r#"INSERT INTO "Sales Dept"."Order ""Items""" VALUES (1, 1.50, 'it''s'), (2, NULL, 'a"b');
           INSERT INTO "Sales Dept".dup VALUES (1, 'sales'); INSERT INTO s2.dup VALUES (1, 's2')"#,
    );
    let map = format!(
        "[[source]]\ndatabase = \"{}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n[source.tables]\n\
         'Sales Dept.Order \"Items\"' = {{ target = \"Order Items Copy\" }}\n\
         \"Sales Dept.dup\" = {{ target = \"dup_a\" }}\n\
         \"s2.dup\" = {{ target = \"dup_b\" }}\n",
        s.family,
        s.src.url(&s.db)
    );
    let daemon = Daemon::start_in(
        &s.dest.url(&s.ddb),
        "schema = 'Target \"Schema\"'",
        &map,
        &[],
    );
    let src_items = r#"SELECT "Id"::text, "unit price"::text, "quo""te" FROM "Sales Dept"."Order ""Items""" ORDER BY 1"#;
    let dest_items = r#"SELECT "Id"::text, "unit price"::text, "quo""te" FROM "Target ""Schema"""."Order Items Copy" ORDER BY 1"#;
    let dups = |schema: &str, table: &str| {
        format!("SELECT id::text || v FROM {schema}.{table} ORDER BY 1")
    };
    let check = |what: &str| {
        s.converge(what, src_items, dest_items);
        s.converge(
            what,
            &dups("\"Sales Dept\"", "dup"),
            &dups("\"Target \"\"Schema\"\"\"", "dup_a"),
        );
        s.converge(
            what,
            &dups("s2", "dup"),
            &dups("\"Target \"\"Schema\"\"\"", "dup_b"),
        );
    };
    check("copy");
    s.src_exec(
        r#"INSERT INTO "Sales Dept"."Order ""Items""" VALUES (3, 9.99, 'new');
           UPDATE "Sales Dept"."Order ""Items""" SET "unit price" = 2, "Id" = 20 WHERE "Id" = 2;
           DELETE FROM "Sales Dept"."Order ""Items""" WHERE "Id" = 1;
           INSERT INTO "Sales Dept".dup VALUES (2, 'sales2'); UPDATE s2.dup SET v = 's2!'"#,
    );
    check("stream");
    s.src_exec(r#"TRUNCATE "Sales Dept"."Order ""Items"""; INSERT INTO "Sales Dept"."Order ""Items""" VALUES (5, 5, 'after')"#);
    check("truncate");
    daemon.stop_ok();
}

every_major! { quoted_names:
    quoted_names_pg12 => 12,
    quoted_names_pg13 => 13,
    quoted_names_pg14 => 14,
    quoted_names_pg15 => 15,
    quoted_names_pg16 => 16,
    quoted_names_pg17 => 17,
    quoted_names_pg18 => 18,
}

/// Generated columns: a target's own generated column is computed there (never
/// written), and a source's is not replicated (PostgreSQL 18's
/// `publish_generated_columns` stays off), in the copy and the stream alike.
fn generated_columns(version: u32) {
    let s = Setup::new(
        source(version),
        "gc",
        "CREATE TABLE g (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED)",
        "CREATE TABLE g (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED, \
           plain_twice int); \
         CREATE TABLE g_plain (id int PRIMARY KEY, a int, twice int)",
    );
    s.src_exec("INSERT INTO g (id, a) VALUES (1, 10), (2, NULL)");
    // A second family (a slot of its own) maps the same table to g_plain.
    let map = format!(
        "{}\n[[source]]\ndatabase = \"{}x\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\ng = {{ target = \"g_plain\" }}\n",
        s.map("g = {}"),
        s.family,
        s.src.url(&s.db)
    );
    let daemon = Daemon::start(&s.dest.url(&s.ddb), &map, &[]);
    let computed = "SELECT id || ':' || coalesce(twice::text, '-') FROM g ORDER BY id";
    let plain = "SELECT id || ':' || coalesce(a::text, '-') || ':' || coalesce(twice::text, '-') FROM g_plain ORDER BY id";
    s.converge_to("copy computes", computed, &["1:20", "2:-"]);
    s.converge_to("copy leaves it out", plain, &["1:10:-", "2:-:-"]);
    s.src_exec("INSERT INTO g (id, a) VALUES (3, 7); UPDATE g SET a = 1 WHERE id = 1");
    s.converge_to("stream computes", computed, &["1:2", "2:-", "3:14"]);
    s.converge_to("stream leaves it out", plain, &["1:1:-", "2:-:-", "3:7:-"]);
    daemon.stop_ok();
}

every_major! { generated_columns:
    generated_columns_pg12 => 12,
    generated_columns_pg13 => 13,
    generated_columns_pg14 => 14,
    generated_columns_pg15 => 15,
    generated_columns_pg16 => 16,
    generated_columns_pg17 => 17,
    generated_columns_pg18 => 18,
}

/// While only unpublished tables change, the slot's confirmed position keeps up: 100 MB
/// written to an unmapped table leave the slot retaining little WAL.
fn quiet_publication(version: u32) {
    let s = Setup::new(
        source(version),
        "qp",
        &format!("{ITEMS}; CREATE TABLE junk (id int, pad text)"),
        ITEMS_SID,
    );
    let daemon = s.start("items = {}");
    daemon.wait_streaming(1);
    s.src_exec("INSERT INTO junk SELECT g, repeat('x', 1000) FROM generate_series(1, 100000) g");
    let retained = format!(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) < 16 * 1024 * 1024 \
         FROM pg_replication_slots WHERE slot_name = '{}'",
        s.slot()
    );
    support::wait_for(
        "the slot to confirm past the unpublished writes",
        Duration::from_secs(60),
        || (s.src.query(&s.db, &retained) == vec![vec![Some("t".to_string())]]).then_some(()),
    );
    daemon.stop_ok();
}

every_major! { quiet_publication:
    quiet_publication_pg12 => 12,
    quiet_publication_pg13 => 13,
    quiet_publication_pg14 => 14,
    quiet_publication_pg15 => 15,
    quiet_publication_pg16 => 16,
    quiet_publication_pg17 => 17,
    quiet_publication_pg18 => 18,
}

/// Partitions: a partitioned table mapped by its root (its leaf partitions are
/// published, on every major), tables matching `partitions_regex` into one target, a
/// cross-partition UPDATE, a TRUNCATE of one partition (not applied: its rows cannot be
/// told apart in the target) and of the root (applied), a partition attached while
/// stopped; an inheritance parent copies and streams its own rows only.
fn partitions(version: u32) {
    let s = Setup::new(
        source(version),
        "pt",
        "CREATE TABLE meas (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region); \
         CREATE TABLE meas_n PARTITION OF meas FOR VALUES IN ('n'); \
         CREATE TABLE meas_s PARTITION OF meas FOR VALUES IN ('s') PARTITION BY RANGE (id); \
         CREATE TABLE meas_s_low PARTITION OF meas_s FOR VALUES FROM (MINVALUE) TO (100); \
         CREATE TABLE meas_s_high PARTITION OF meas_s FOR VALUES FROM (100) TO (MAXVALUE); \
         CREATE TABLE log_2023 (id int PRIMARY KEY, v text); CREATE TABLE log_2024 (id int PRIMARY KEY, v text); \
         CREATE TABLE log_notes (id int PRIMARY KEY, v text); \
         CREATE TABLE base (id int PRIMARY KEY, v text); CREATE TABLE derived (extra int) INHERITS (base)",
        "CREATE TABLE meas (sid text, id int, region text, v text, PRIMARY KEY (sid, id, region)); \
         CREATE TABLE logs (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE base (id int PRIMARY KEY, v text)",
    );
    s.src_exec(
        "INSERT INTO meas VALUES (1, 'n', 'a'), (2, 's', 'b'), (150, 's', 'c'); \
         INSERT INTO log_2023 VALUES (1, 'x'); INSERT INTO log_2024 VALUES (2, 'y'); \
         INSERT INTO log_notes VALUES (3, 'not matched'); \
         INSERT INTO base VALUES (1, 'base'); INSERT INTO derived VALUES (2, 'derived', 0)",
    );
    let tables = "meas = {}\nlogs = { partitions_regex = \"log_[0-9]+\" }\nbase = {}";
    let meas = "SELECT id || region || ':' || v FROM meas ORDER BY 1";
    let logs_src = "SELECT id || ':' || v FROM log_2023 UNION ALL SELECT id || ':' || v FROM log_2024 ORDER BY 1";
    let logs = "SELECT id || ':' || v FROM logs ORDER BY 1";
    let base_src = "SELECT id || ':' || v FROM ONLY base ORDER BY 1";
    let base = "SELECT id || ':' || v FROM base ORDER BY 1";
    let check = |what: &str| {
        s.converge(what, meas, meas);
        s.converge(what, logs_src, logs);
        s.converge(what, base_src, base);
    };
    let daemon = s.start(tables);
    check("copy");
    s.src_exec(
        "INSERT INTO meas VALUES (3, 'n', 'd'), (250, 's', 'e'); UPDATE meas SET v = 'B' WHERE id = 2; \
         UPDATE meas SET region = 's' WHERE id = 1; UPDATE meas SET id = 120 WHERE id = 2; \
         DELETE FROM meas WHERE id = 150; \
         INSERT INTO log_2024 VALUES (4, 'z'); UPDATE log_2023 SET v = 'X'; \
         INSERT INTO base VALUES (3, 'b3'); INSERT INTO derived VALUES (4, 'd4', 0)",
    );
    check("stream");
    assert_eq!(
        s.published(&s.slot()),
        [
            "base",
            "log_2023",
            "log_2024",
            "meas_n",
            "meas_s_high",
            "meas_s_low"
        ]
        .map(|t| format!("public.{t}"))
        .to_vec()
    );
    // One partition truncated alone: reported, not applied.
    s.src_exec("TRUNCATE meas_n; INSERT INTO meas VALUES (7, 'n', 'after')");
    s.converge_to(
        "truncate of one partition",
        meas,
        &["120s:B", "1s:a", "250s:e", "3n:d", "7n:after"],
    );
    assert!(
        daemon.log().contains("TRUNCATE public.meas_n"),
        "{}",
        daemon.log()
    );
    // The root truncated: every partition in one message, applied.
    s.src_exec("TRUNCATE meas; INSERT INTO meas VALUES (8, 's', 'fresh')");
    s.converge("truncate of the root", meas, meas);
    let dir = daemon.stop_ok();

    // A partition attached (with rows) while stopped is published and copied.
    s.src_exec(
        "CREATE TABLE meas_w (id int, region text, v text, PRIMARY KEY (id, region)); \
         ALTER TABLE meas_w OWNER TO kuvasz; INSERT INTO meas_w VALUES (9, 'w', 'west'); \
         ALTER TABLE meas ATTACH PARTITION meas_w FOR VALUES IN ('w'); \
         INSERT INTO meas VALUES (10, 'n', 'while stopped')",
    );
    let daemon = restart_with(dir, &s.map(tables));
    s.converge("attached partition", meas, meas);
    s.src_exec(
        "INSERT INTO meas VALUES (11, 'w', 'streamed'); UPDATE meas SET region = 'w' WHERE id = 8",
    );
    check("attached partition streams");
    // Attached while running, and a table matching the regex created: picked up live.
    s.src_exec(
        "SET ROLE kuvasz; CREATE TABLE meas_e (id int, region text, v text, PRIMARY KEY (id, region)); \
         INSERT INTO meas_e VALUES (12, 'e', 'east'); \
         ALTER TABLE meas ATTACH PARTITION meas_e FOR VALUES IN ('e'); \
         CREATE TABLE log_2025 (id int PRIMARY KEY, v text); INSERT INTO log_2025 VALUES (5, 'new year')",
    );
    s.src_exec("INSERT INTO meas VALUES (13, 'e', 'streamed east')");
    let logs_src = format!(
        "SELECT * FROM ({logs_src}) l UNION ALL SELECT id || ':' || v FROM log_2025 ORDER BY 1"
    );
    s.converge("partition attached while running", meas, meas);
    s.converge("regex table created while running", &logs_src, logs);
    s.src_exec(
        "INSERT INTO meas VALUES (14, 'e', 'later'); INSERT INTO log_2025 VALUES (6, 'later')",
    );
    s.converge("it streams", meas, meas);
    s.converge("it streams", &logs_src, logs);
    daemon.stop_ok();
}

every_major! { partitions:
    partitions_pg12 => 12,
    partitions_pg13 => 13,
    partitions_pg14 => 14,
    partitions_pg15 => 15,
    partitions_pg16 => 16,
    partitions_pg17 => 17,
    partitions_pg18 => 18,
}

/// Schema changes while streaming: a column added on the source is ignored until the
/// target has it, then used without a restart; a dropped source column leaves the
/// target's to its default; a type change the target accepts keeps streaming, and a
/// value it refuses is a rejected row (dead-lettered here), never skipped.
fn schema_changes(version: u32) {
    let s = Setup::new(
        source(version),
        "sc",
        "CREATE TABLE t (id int PRIMARY KEY, v text, qty int)",
        "CREATE TABLE t (sid text, id int, v text DEFAULT 'dflt', qty int, PRIMARY KEY (sid, id))",
    );
    s.src_exec("INSERT INTO t VALUES (1, 'a', 1)");
    let daemon = Daemon::start(
        &s.dest.url(&s.ddb),
        &s.map("t = {}"),
        &["on_error = \"deadletter\""],
    );
    let rows = "SELECT id || ':' || coalesce(v, '-') || ':' || coalesce(qty::text, '-') FROM t ORDER BY id";
    s.converge("copy", rows, rows);
    // Added on the source only: ignored, the rest streams.
    s.src_exec("ALTER TABLE t ADD COLUMN note text; INSERT INTO t VALUES (2, 'b', 2, 'n2')");
    s.converge("a source-only column is ignored", rows, rows);
    // Added on the target too: used from then on.
    s.dest.execute(&s.ddb, "ALTER TABLE t ADD COLUMN note text");
    let notes = "SELECT id || ':' || coalesce(note, '-') FROM t ORDER BY id";
    support::wait_for(
        "the target's new column to be used",
        Duration::from_secs(60),
        || {
            s.src_exec("UPDATE t SET note = 'n' || id WHERE id = 1");
            let got = s.dest.query(&s.ddb, notes);
            (got.first() == Some(&vec![Some("1:n1".to_string())])).then_some(())
        },
    );
    s.src_exec("INSERT INTO t VALUES (3, 'c', 3, 'n3')");
    s.converge_to("the new column streams", notes, &["1:n1", "2:-", "3:n3"]);
    // Dropped on the source: new rows get the target's default.
    s.src_exec("ALTER TABLE t DROP COLUMN v; INSERT INTO t (id, qty, note) VALUES (4, 4, 'n4')");
    s.converge_to(
        "a dropped column takes the default",
        rows,
        &["1:a:1", "2:b:2", "3:c:3", "4:dflt:4"],
    );
    // A wider type: values that fit stream on, one that does not is rejected.
    s.src_exec(
        "ALTER TABLE t ALTER COLUMN qty TYPE bigint; INSERT INTO t (id, qty) VALUES (5, 5); \
         INSERT INTO t (id, qty) VALUES (6, 10000000000); INSERT INTO t (id, qty) VALUES (7, 7)",
    );
    s.converge_to(
        "the type change streams",
        rows,
        &[
            "1:a:1", "2:b:2", "3:c:3", "4:dflt:4", "5:dflt:5", "7:dflt:7",
        ],
    );
    s.converge_to(
        "the refused value is dead-lettered",
        "SELECT row->>'id' FROM kvsz_deadletter",
        &["6"],
    );
    daemon.stop_ok();
}

every_major! { schema_changes:
    schema_changes_pg12 => 12,
    schema_changes_pg13 => 13,
    schema_changes_pg14 => 14,
    schema_changes_pg15 => 15,
    schema_changes_pg16 => 16,
    schema_changes_pg17 => 17,
    schema_changes_pg18 => 18,
}

/// A URL removed from the map between runs has its slot and publications dropped, with a
/// log line, while the family's other URL streams on; a map that fails to load drops
/// nothing.
fn removed_url(version: u32) {
    let src = source(version);
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("rma"),
        unique_name("rmb"),
        unique_name("rmd"),
        unique_name("rm"),
    );
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(
            db,
            &format!("SET ROLE kuvasz; {ITEMS}; CREATE TABLE bare (n int)"),
        );
    }
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        &format!("SET ROLE kuvasz; {ITEMS_SID}; CREATE TABLE bare (sid text, n int)"),
    );
    let map = |urls: &[(&str, &str)]| {
        let urls: Vec<String> = urls
            .iter()
            .map(|(db, sid)| format!("{{ url = \"{}\", sid = \"{sid}\" }}", src.url(db)))
            .collect();
        format!(
            "[[source]]\ndatabase = \"{family}\"\nurls = [ {} ]\n[source.tables]\nitems = {{}}\nbare = {{}}\n",
            urls.join(", ")
        )
    };
    let daemon = Daemon::start(&dest.url(&ddb), &map(&[(&a, "a"), (&b, "b")]), &[]);
    daemon.wait_streaming(2);
    let dir = daemon.stop_ok();
    let slots = |db: &str| {
        src.query(
            db,
            &format!(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'kuvasz_{family}_%' ORDER BY 1"
            ),
        )
    };
    let (slot_a, slot_b) = (format!("kuvasz_{family}_a"), format!("kuvasz_{family}_b"));
    assert_eq!(
        slots(&a),
        vec![vec![Some(slot_a.clone())], vec![Some(slot_b.clone())]]
    );

    let daemon = restart_with(dir, &map(&[(&a, "a")]));
    support::wait_for(
        "the removed URL's slot to be dropped",
        Duration::from_secs(60),
        || (slots(&a) == vec![vec![Some(slot_a.clone())]]).then_some(()),
    );
    assert_eq!(
        src.query(&b, "SELECT pubname::text FROM pg_publication"),
        Vec::<Vec<Option<String>>>::new(),
        "the removed URL's publications are dropped"
    );
    assert!(
        daemon.log().contains(&format!("dropped slot {slot_b}")),
        "{}",
        daemon.log()
    );
    src.execute(&a, "INSERT INTO items VALUES (1, 'still streaming')");
    s_converge_items(src, &a, dest, &ddb);
    let dir = daemon.stop_ok();

    // A map that does not load: the daemon exits, and the slot stays.
    let mut daemon = restart_with(dir, "[[source]\nbroken");
    support::wait_for(
        "the daemon to refuse the map",
        Duration::from_secs(30),
        || (!daemon.running()).then_some(()),
    );
    assert_eq!(slots(&a), vec![vec![Some(slot_a)]]);
}

fn s_converge_items(src: &Cluster, db: &str, dest: &Cluster, ddb: &str) {
    converge(
        "the remaining URL streams",
        || src.query(db, "SELECT 'a', id::text, v FROM items ORDER BY id"),
        || dest.query(ddb, "SELECT sid, id::text, v FROM items ORDER BY id"),
    );
}

every_major! { removed_url:
    removed_url_pg12 => 12,
    removed_url_pg13 => 13,
    removed_url_pg14 => 14,
    removed_url_pg15 => 15,
    removed_url_pg16 => 16,
    removed_url_pg17 => 17,
    removed_url_pg18 => 18,
}
