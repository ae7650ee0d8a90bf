//! Table shapes of real schemas, end to end on every source major: destinations built
//! from the source's own schema, tables without a key, partitions, names that need
//! quotes, generated columns, tables that cannot be replicated, schema changes.

mod support;

use support::daemon::Daemon;
use support::{converge, destination, source, unique_name, Cluster};

/// `$scenario(version)` as one test per source major, named `<scenario>_pg<N>`.
macro_rules! every_major {
    ($scenario:ident: $($name:ident => $v:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $scenario($v);
            }
        )*
    };
}

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
    assert!(daemon.log().contains("then both"), "{}", daemon.log());
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
