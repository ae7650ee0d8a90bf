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
