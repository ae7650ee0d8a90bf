//! Target modes (SPEC §4) end to end on every source major, with and without a `sid`
//! column: `append` keeps what the source deletes.

mod support;

use std::time::Duration;

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

/// append: a key change onto a key the target kept (the source deleted it): the moved
/// row takes the key, as the source's UPDATE did, whether it carries its whole row or
/// leaves a TOASTed value unchanged (moved in place).
fn append_key_change_onto_kept_key(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("ak"), unique_name("akd"), unique_name("ak"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v text, big text); \
         ALTER TABLE t ALTER big SET STORAGE EXTERNAL; \
         INSERT INTO t SELECT i, 'v' || i, (SELECT string_agg(md5(g::text || i), '') \
           FROM generate_series(1, 80) g) FROM generate_series(1, 4) i",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, big text, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nt = {{ type = \"append\" }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 4"]);
    daemon.wait_streaming(1);
    src.execute(&db, "DELETE FROM t WHERE id IN (2, 4)");
    src.execute(
        &db,
        "UPDATE t SET id = 2 WHERE id = 1; UPDATE t SET id = 4, v = 'new', big = big || 'x' WHERE id = 3",
    );
    let sql = "SELECT id || ':' || v || ':' || md5(big) FROM t $w ORDER BY id";
    converge(
        "moved rows took the kept keys",
        || src.query(&db, &sql.replace("$w", "")),
        || dest.query(&ddb, &sql.replace("$w", "WHERE sid = 's'")),
    );
    daemon.stop_ok();
}

every_major! { append_key_change_onto_kept_key:
    append_key_change_onto_kept_key_pg12 => 12,
    append_key_change_onto_kept_key_pg18 => 18,
}

/// The Go implementation's `map.yaml`, unchanged: URLs with `replication=database`,
/// tables with no body, a rename, append mode, `partitions_regex`, `filter` and `set`.
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
               CREATE TABLE t7_a (id int PRIMARY KEY, v text); CREATE TABLE t7_b (id int PRIMARY KEY, v text); \
               CREATE TABLE t9 (id int PRIMARY KEY, v text)";
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(db, ddl);
        src.execute(
            db,
            "INSERT INTO t0 VALUES (1, 'x'); INSERT INTO t2 VALUES (1, 'y'); INSERT INTO t3 VALUES (1, 'z'); \
             INSERT INTO t7_a VALUES (1, 'a'); INSERT INTO t7_b VALUES (2, 'b'); \
             INSERT INTO t9 VALUES (1, 'shown'), (2, 'hidden')",
        );
    }
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t0 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE rt2 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE t3 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE t7 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE t9 (sid text, id int, v text, label text, PRIMARY KEY (sid, id))",
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
         \x20   t7:\n      partitions_regex: \"t7_.*\"\n\
         \x20   t9:\n      filter: \"v != 'hidden'\"\n      set:\n        label: \"v + '!'\"\n",
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
             INSERT INTO t7_b VALUES (3, 'b3'); INSERT INTO t9 VALUES (3, 'new'), (4, 'hidden')",
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
    converge(
        "t9 (filter and set)",
        || rows(&["12:1:shown!", "12:3:new!", "13:1:shown!", "13:3:new!"]),
        || {
            dest.query(
                &ddb,
                "SELECT sid || ':' || id || ':' || label FROM t9 ORDER BY 1",
            )
        },
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

/// `kvsz_start` of a first version and `kvsz_end` of an open one, in µs since 1970.
const FIRST: i64 = -2_208_988_800_000_000;
const OPEN: i64 = 253_370_764_800_000_000;

/// One change a history test commits, on a table with `id int PRIMARY KEY, v text`.
#[derive(Clone, Copy)]
enum H {
    Insert(i32, &'static str),
    Update(i32, &'static str),
    /// `UPDATE … SET id = new WHERE id = old`.
    Rekey(i32, i32),
    Delete(i32),
    Truncate,
}

impl H {
    fn sql(self, t: &str) -> String {
        match self {
            H::Insert(id, v) => format!("INSERT INTO {t} VALUES ({id}, '{v}')"),
            H::Update(id, v) => format!("UPDATE {t} SET v = '{v}' WHERE id = {id}"),
            H::Rekey(old, new) => format!("UPDATE {t} SET id = {new} WHERE id = {old}"),
            H::Delete(id) => format!("DELETE FROM {t} WHERE id = {id}"),
            H::Truncate => format!("TRUNCATE {t}"),
        }
    }
}

/// The versions SPEC §4 says a history target holds, computed from what the test
/// committed and the commit timestamps the source recorded: per key, (value, start,
/// end, deleted) in order. Within one transaction the n-th change of a key is stamped
/// T + n µs, and a TRUNCATE after every change before it (man page, history mode).
#[derive(Default)]
struct Versions {
    keys: std::collections::BTreeMap<i32, Vec<(String, i64, i64, bool)>>,
}

impl Versions {
    fn close(&mut self, id: i32, at: i64, deleted: bool) {
        if let Some(v) = self.keys.get_mut(&id).and_then(|l| l.last_mut()) {
            if v.2 == OPEN {
                v.2 = at;
                v.3 = deleted;
            }
        }
    }

    fn open(&mut self, id: i32, v: &str, at: i64) {
        self.keys
            .entry(id)
            .or_default()
            .push((v.to_string(), at, OPEN, false));
    }

    fn value(&self, id: i32) -> String {
        self.keys
            .get(&id)
            .and_then(|l| l.last())
            .map(|v| v.0.clone())
            .unwrap_or_default()
    }

    /// Applies one committed transaction at commit time `t`.
    fn commit(&mut self, t: i64, ops: &[H]) {
        let mut next: std::collections::HashMap<i32, i64> = Default::default();
        // (floor, high): lowest offset after the last TRUNCATE, one past the highest taken.
        let mut clock = (0i64, 0i64);
        let stamp =
            |id: i32, next: &mut std::collections::HashMap<i32, i64>, c: &mut (i64, i64)| {
                let n = next.entry(id).or_insert(0);
                let off = (*n).max(c.0);
                *n = off + 1;
                c.1 = c.1.max(off + 1);
                t + off
            };
        for op in ops {
            match *op {
                H::Insert(id, v) => {
                    let at = stamp(id, &mut next, &mut clock);
                    let start = if self.keys.contains_key(&id) {
                        at
                    } else {
                        FIRST
                    };
                    self.open(id, v, start);
                }
                H::Update(id, v) => {
                    let at = stamp(id, &mut next, &mut clock);
                    self.close(id, at, false);
                    self.open(id, v, at);
                }
                H::Rekey(old, new) => {
                    // The new key opens where the old one closed (or after the new
                    // key's own changes in this transaction).
                    let v = self.value(old);
                    let a = stamp(old, &mut next, &mut clock);
                    let n = next.entry(new).or_insert(0);
                    let b = (*n + t).max(a);
                    *n = b - t + 1;
                    clock.1 = clock.1.max(b - t + 1);
                    self.close(old, a, true);
                    self.open(new, &v, b);
                }
                H::Delete(id) => {
                    let at = stamp(id, &mut next, &mut clock);
                    self.close(id, at, true);
                }
                H::Truncate => {
                    let at = t + clock.1;
                    clock = (clock.1 + 1, clock.1 + 1);
                    let ids: Vec<i32> = self.keys.keys().copied().collect();
                    for id in ids {
                        self.close(id, at, true);
                    }
                }
            }
        }
    }

    fn rows(&self) -> Rows {
        let mut out = Vec::new();
        for (id, versions) in &self.keys {
            for (v, start, end, deleted) in versions {
                out.push(vec![Some(format!("{id}:{v}:{start}:{end}:{deleted}"))]);
            }
        }
        out
    }
}

/// The versions of a history target as [`Versions::rows`] prints them.
const VERSIONS_SQL: &str = "SELECT id || ':' || v || ':' || \
     round(extract(epoch FROM kvsz_start) * 1000000)::bigint || ':' || \
     round(extract(epoch FROM kvsz_end) * 1000000)::bigint || ':' || kvsz_deleted FROM $t \
     ORDER BY id, kvsz_start";

/// history (SCD2): the copy opens a version per row; inserts, updates, key changes,
/// deletes and TRUNCATE make exactly the versions SPEC §4 describes, stamped with the
/// source's commit timestamps; several updates of one key in one transaction and across
/// batches keep every version in order; a daemon killed mid-stream adds no version twice
/// when the stream is replayed.
fn history_mode(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("hi"), unique_name("hid"), unique_name("hi"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE with_sid (id int PRIMARY KEY, v text); \
         CREATE TABLE no_sid (id int PRIMARY KEY, v text); CREATE TABLE marks (k int)",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE with_sid (sid text, id int, v text, kvsz_start timestamptz, \
         kvsz_end timestamptz, kvsz_deleted boolean, PRIMARY KEY (sid, id, kvsz_start)); \
         CREATE TABLE no_sid (id int, v text, kvsz_start timestamptz, kvsz_end timestamptz, \
         kvsz_deleted boolean, PRIMARY KEY (id, kvsz_start))",
    );
    let mut model = Versions::default();
    let mut k = 0;
    // Commits `ops` on both tables in one transaction; returns its commit timestamp.
    let mut commit = |model: &mut Versions, ops: &[H]| {
        k += 1;
        let mut sql = String::from("BEGIN");
        for op in ops {
            for t in ["with_sid", "no_sid"] {
                sql.push_str("; ");
                sql.push_str(&op.sql(t));
            }
        }
        sql.push_str(&format!("; INSERT INTO marks VALUES ({k}); COMMIT"));
        src.execute(&db, &sql);
        let t = src.query(
            &db,
            &format!(
                "SELECT round(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint \
                 FROM marks WHERE k = {k}"
            ),
        );
        let t: i64 = t[0][0].as_deref().unwrap_or("").parse().unwrap();
        model.commit(t, ops);
    };
    src.execute(
        &db,
        "INSERT INTO with_sid VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    );
    src.execute(
        &db,
        "INSERT INTO no_sid VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    );
    for id in 1..=3 {
        model.open(id, ["a", "b", "c"][id as usize - 1], FIRST);
    }
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nwith_sid = {{ type = \"history\" }}\nno_sid = {{ type = \"history\" }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let check = |what: &str, model: &Versions| {
        for (t, extra) in [("with_sid", " WHERE sid = 's'"), ("no_sid", "")] {
            let sql = VERSIONS_SQL.replace("$t", &format!("{t}{extra}"));
            converge(
                &format!("{what} ({t})"),
                || model.rows(),
                || dest.query(&ddb, &sql),
            );
        }
    };
    check("copy", &model);
    commit(
        &mut model,
        &[
            H::Insert(4, "d"),
            H::Update(2, "B"),
            H::Delete(1),
            H::Rekey(3, 30),
        ],
    );
    check("insert, update, delete, key change", &model);
    commit(
        &mut model,
        &[
            H::Update(4, "d1"),
            H::Update(4, "d2"),
            H::Update(4, "d3"),
            H::Rekey(4, 40),
            H::Update(40, "d4"),
        ],
    );
    check("several changes of one key in one transaction", &model);
    const VALUES: [&str; 8] = ["v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7"];
    for i in 0..40 {
        commit(&mut model, &[H::Update(2, VALUES[i % 8])]);
    }
    check(
        "one key updated by many transactions (across batches)",
        &model,
    );
    commit(
        &mut model,
        &[
            H::Update(2, "before"),
            H::Truncate,
            H::Insert(5, "e"),
            H::Insert(1, "again"),
            H::Update(1, "again2"),
        ],
    );
    check("truncate closes every open version", &model);
    commit(&mut model, &[H::Delete(5), H::Insert(5, "back")]);
    check("deleted and inserted again in one transaction", &model);
    // Killed with changes applied but not confirmed, which the restart replays: a row
    // lock stalls the writer that owns key 5 of no_sid, so the slot cannot pass the
    // burst, while the other writer commits its share of it.
    let mut blocker = dest.client(&ddb);
    let mut lock = blocker.transaction().unwrap();
    lock.batch_execute("SELECT 1 FROM no_sid WHERE id = 5 AND kvsz_end > now() FOR UPDATE")
        .unwrap();
    for i in 0..60 {
        commit(
            &mut model,
            &[H::Update(5, VALUES[i % 8]), H::Insert(100 + i as i32, "n")],
        );
    }
    support::wait_for("part of the burst applied", Duration::from_secs(30), || {
        let n = dest.query(&ddb, "SELECT count(*) FROM with_sid WHERE id >= 100");
        (n[0][0].as_deref().unwrap_or("0") != "0").then_some(())
    });
    let dir = daemon.kill();
    lock.rollback().unwrap();
    for i in 0..20 {
        commit(
            &mut model,
            &[H::Update(1, VALUES[i % 8]), H::Delete(100 + i as i32)],
        );
    }
    let daemon = Daemon::spawn(dir);
    check("after a kill and a replay", &model);
    // The replay skipped, by position, what the killed run had applied.
    assert!(
        daemon
            .log()
            .contains("received again were applied already: skipped"),
        "the restart replayed nothing: {}",
        daemon.log()
    );
    daemon.stop_ok();
}

every_major! { history_mode:
    history_mode_pg12 => 12,
    history_mode_pg13 => 13,
    history_mode_pg14 => 14,
    history_mode_pg15 => 15,
    history_mode_pg16 => 16,
    history_mode_pg17 => 17,
    history_mode_pg18 => 18,
}

/// history, the cases the version list of [`history_mode`] does not show: updates that
/// leave a TOASTed value unchanged (the source does not send it) carry it into the new
/// version, in one transaction and across a key change; and a re-copy into a target that
/// holds versions (the slot was lost) records exactly the differences, confined to the
/// URL's sid.
fn history_details(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("hd"), unique_name("hdd"), unique_name("hd"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE big (id int PRIMARY KEY, n int, doc text); \
         ALTER TABLE big ALTER doc SET STORAGE EXTERNAL; \
         CREATE TABLE small (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT 1, 0, string_agg(md5(i::text), '') FROM generate_series(1, 400) i; \
         INSERT INTO small VALUES (1, 'a'), (2, 'b'), (4, 'd')",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE big (id int, n int, doc text, kvsz_start timestamptz, \
         kvsz_end timestamptz, kvsz_deleted boolean, PRIMARY KEY (id, kvsz_start)); \
         CREATE TABLE small (sid text, id int, v text, kvsz_start timestamptz, \
         kvsz_end timestamptz, kvsz_deleted boolean); \
         INSERT INTO small VALUES ('other', 1, 'theirs', '1900-01-01', '9999-01-01', false)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nbig = {{ type = \"history\" }}\nsmall = {{ type = \"history\" }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let md5 = |id: i32| {
        src.query(&db, &format!("SELECT md5(doc) FROM big WHERE id = {id}"))[0][0]
            .clone()
            .unwrap()
    };
    let d1 = md5(1);
    let big = "SELECT id || ':' || n || ':' || md5(doc) || ':' || CASE WHEN kvsz_end > \
               '9000-01-01' THEN 'open' WHEN kvsz_deleted THEN 'deleted' ELSE 'closed' END \
               FROM big ORDER BY id, kvsz_start";
    converge(
        "copy of a TOASTed value",
        || rows(&[&format!("1:0:{d1}:open")]),
        || dest.query(&ddb, big),
    );
    src.execute(
        &db,
        "INSERT INTO big SELECT 2, 0, string_agg(md5((-i)::text), '') FROM generate_series(1, 400) i",
    );
    let d2 = md5(2);
    src.execute(
        &db,
        "BEGIN; UPDATE big SET n = 1 WHERE id = 1; UPDATE big SET n = 2 WHERE id = 1; COMMIT; \
         UPDATE big SET n = 1 WHERE id = 2; UPDATE big SET id = 20, n = 2 WHERE id = 2",
    );
    let open = |id: i32, n: i32, doc: &str, end: &str| format!("{id}:{n}:{doc}:{end}");
    let expected = [
        open(1, 0, &d1, "closed"),
        open(1, 1, &d1, "closed"),
        open(1, 2, &d1, "open"),
        open(2, 0, &d2, "closed"),
        open(2, 1, &d2, "deleted"),
        open(20, 2, &d2, "open"),
    ];
    converge(
        "unchanged TOAST values carried into new versions",
        || expected.iter().map(|r| vec![Some(r.clone())]).collect(),
        || dest.query(&ddb, big),
    );
    let small =
        "SELECT sid || ':' || id || ':' || v || ':' || (kvsz_start = '1900-01-01 00:00+00') \
                 || ':' || (kvsz_end > '9000-01-01') || ':' || kvsz_deleted FROM small \
                 ORDER BY sid, id, kvsz_start";
    converge(
        "copy",
        || {
            rows(&[
                "other:1:theirs:true:true:false",
                "s:1:a:true:true:false",
                "s:2:b:true:true:false",
                "s:4:d:true:true:false",
            ])
        },
        || dest.query(&ddb, small),
    );
    let dir = daemon.stop_ok();
    // The slot is lost while stopped: the changes meanwhile reach the target only
    // through the next copy.
    src.execute(
        &db,
        &format!(
            "SELECT pg_drop_replication_slot('kuvasz_{family}_s'); \
             UPDATE small SET v = 'A' WHERE id = 1; DELETE FROM small WHERE id = 2; \
             INSERT INTO small VALUES (3, 'c')"
        ),
    );
    let daemon = Daemon::spawn(dir);
    converge(
        "re-copy records the differences",
        || {
            rows(&[
                "other:1:theirs:true:true:false",
                "s:1:a:true:false:false",
                "s:1:A:false:true:false",
                "s:2:b:true:false:true",
                "s:3:c:true:true:false",
                "s:4:d:true:true:false",
            ])
        },
        || dest.query(&ddb, small),
    );
    // The closing and the opening are the same instant.
    let stamps = dest.query(
        &ddb,
        "SELECT count(DISTINCT t) FROM (SELECT kvsz_end AS t FROM small WHERE sid = 's' AND \
         kvsz_end < '9000-01-01' UNION ALL SELECT kvsz_start FROM small WHERE sid = 's' AND \
         kvsz_start > '1900-01-01') x",
    );
    assert_eq!(stamps, [[Some("1".to_string())]]);
    daemon.stop_ok();
}

every_major! { history_details:
    history_details_pg12 => 12,
    history_details_pg13 => 13,
    history_details_pg14 => 14,
    history_details_pg15 => 15,
    history_details_pg16 => 16,
    history_details_pg17 => 17,
    history_details_pg18 => 18,
}

/// history of a partitioned table: an UPDATE that moves a row to another partition
/// reaches the stream as a DELETE and an INSERT, and is recorded as the key change it is
/// (the new version continues from the commit, not from 1900); a DELETE and an INSERT
/// into the same partition stay a deleted row and a new one.
fn history_cross_partition(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("hp"), unique_name("hpd"), unique_name("hp"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); \
         CREATE TABLE t_a PARTITION OF t FOR VALUES FROM (0) TO (100); \
         CREATE TABLE t_b PARTITION OF t FOR VALUES FROM (100) TO (200); \
         CREATE TABLE marks (k int); INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, kvsz_start timestamptz, \
         kvsz_end timestamptz, kvsz_deleted boolean)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nt = {{ type = \"history\" }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 4"]);
    daemon.wait_streaming(1);
    // Commits `sql` and returns its commit timestamp (µs since 1970).
    let mut k = 0;
    let mut commit = |sql: &str| {
        k += 1;
        src.execute(
            &db,
            &format!("BEGIN; {sql}; INSERT INTO marks VALUES ({k}); COMMIT"),
        );
        let t = src.query(
            &db,
            &format!(
                "SELECT round(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint \
                 FROM marks WHERE k = {k}"
            ),
        );
        t[0][0].as_deref().unwrap_or("").parse::<i64>().unwrap()
    };
    let t1 = commit("UPDATE t SET id = 150 WHERE id = 1");
    let t2 =
        commit("UPDATE t SET v = 'b1' WHERE id = 2; UPDATE t SET id = 102, v = 'b2' WHERE id = 2");
    let t3 = commit("DELETE FROM t WHERE id = 150; INSERT INTO t VALUES (160, 'x')");
    let v = |id: i32, v: &str, start: i64, end: i64, deleted: bool| {
        vec![Some(format!("{id}:{v}:{start}:{end}:{deleted}"))]
    };
    let expected = vec![
        v(1, "a", FIRST, t1, true),
        v(2, "b", FIRST, t2, false),
        v(2, "b1", t2, t2 + 1, true),
        v(102, "b2", t2 + 1, OPEN, false),
        v(150, "a", t1, t3, true),
        v(160, "x", FIRST, OPEN, false),
    ];
    converge(
        "versions",
        || expected.clone(),
        || dest.query(&ddb, &VERSIONS_SQL.replace("$t", "t")),
    );
    daemon.stop_ok();
}

every_major! { history_cross_partition:
    history_cross_partition_pg12 => 12,
    history_cross_partition_pg18 => 18,
}

/// filter and set (CEL) in each mode, in the copy and the stream: the target holds
/// exactly the source rows that pass, with the computed column; an update whose new row
/// fails removes the key from a clone target, is ignored by an append target and closes
/// the version of a history target; a row whose expression fails (a NULL amount) is a
/// rejected row, here dead-lettered, whether copied or streamed.
fn filter_and_set(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("fs"), unique_name("fsd"), unique_name("fs"));
    src.create_database(&db);
    let orders = "(id int PRIMARY KEY, status text, amount numeric(10,2), first_name text, \
                  last_name text)";
    src.execute(
        &db,
        &format!(
            "SET ROLE kuvasz; CREATE TABLE c_orders {orders}; CREATE TABLE a_orders {orders}; \
             CREATE TABLE h_orders {orders}"
        ),
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE c_orders (sid text, id int, status text, amount numeric(10,2), \
         full_name text, PRIMARY KEY (sid, id)); \
         CREATE TABLE a_orders (id int PRIMARY KEY, status text, amount numeric(10,2), full_name text); \
         CREATE TABLE h_orders (id int, status text, amount numeric(10,2), full_name text, \
         kvsz_start timestamptz, kvsz_end timestamptz, kvsz_deleted boolean)",
    );
    let all = |sql: &str| {
        for t in ["c_orders", "a_orders", "h_orders"] {
            src.execute(&db, &sql.replace("$t", t));
        }
    };
    all("INSERT INTO $t VALUES (1, 'paid', 10, 'Ada', 'Lovelace'), (2, 'draft', 5, 'Grace', 'Hopper'), \
         (3, 'paid', 0, 'Edsger', 'Dijkstra'), (7, 'paid', NULL, 'No', 'Amount')");
    let entry = |t: &str, mode: &str| {
        format!(
            "{t} = {{ {mode}filter = \"status != 'draft' && amount > 0\", \
             set = {{ full_name = \"first_name + ' ' + last_name\" }} }}\n"
        )
    };
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\n{}{}{}",
        src.url(&db),
        entry("c_orders", ""),
        entry("a_orders", "type = \"append\", "),
        entry("h_orders", "type = \"history\", "),
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["on_error = \"deadletter\""]);
    let check = |what: &str, t: &str, sql: &str, expected: &[&str]| {
        converge(
            &format!("{what} ({t})"),
            || rows(expected),
            || dest.query(&ddb, sql),
        );
    };
    let current = |t: &str| {
        format!(
            "SELECT id || ':' || status || ':' || amount || ':' || full_name FROM {t} ORDER BY id"
        )
    };
    let versions = "SELECT id || ':' || status || ':' || full_name || ':' || \
                    CASE WHEN kvsz_end > '9000-01-01' THEN 'open' WHEN kvsz_deleted THEN 'deleted' \
                    ELSE 'closed' END FROM h_orders ORDER BY id, kvsz_start";
    for t in ["c_orders", "a_orders"] {
        check("copy", t, &current(t), &["1:paid:10.00:Ada Lovelace"]);
    }
    check("copy", "h_orders", versions, &["1:paid:Ada Lovelace:open"]);
    all(
        "INSERT INTO $t VALUES (4, 'paid', 7, 'Alan', 'Turing'), (5, 'draft', 9, 'Not', 'Shown'), \
         (6, 'paid', NULL, 'Null', 'Amount'); \
         UPDATE $t SET status = 'draft' WHERE id = 1; UPDATE $t SET status = 'paid' WHERE id = 2; \
         UPDATE $t SET last_name = 'T.' WHERE id = 4",
    );
    check(
        "stream",
        "c_orders",
        &current("c_orders"),
        &["2:paid:5.00:Grace Hopper", "4:paid:7.00:Alan T."],
    );
    check(
        "stream",
        "a_orders",
        &current("a_orders"),
        &[
            "1:paid:10.00:Ada Lovelace",
            "2:paid:5.00:Grace Hopper",
            "4:paid:7.00:Alan T.",
        ],
    );
    check(
        "stream",
        "h_orders",
        versions,
        &[
            "1:paid:Ada Lovelace:deleted",
            "2:paid:Grace Hopper:open",
            "4:paid:Alan Turing:closed",
            "4:paid:Alan T.:open",
        ],
    );
    check(
        "rejected rows",
        "kvsz_deadletter",
        "SELECT source_table || ':' || op || ':' || (row->>'id') || ':' || \
         (error LIKE 'filter \"status != ''draft'' && amount > 0\" failed%') FROM kvsz_deadletter \
         ORDER BY 1",
        &[
            "public.a_orders:COPY:7:true",
            "public.a_orders:INSERT:6:true",
            "public.c_orders:COPY:7:true",
            "public.c_orders:INSERT:6:true",
            "public.h_orders:COPY:7:true",
            "public.h_orders:INSERT:6:true",
        ],
    );
    daemon.stop_ok();
}

every_major! { filter_and_set:
    filter_and_set_pg12 => 12,
    filter_and_set_pg13 => 13,
    filter_and_set_pg14 => 14,
    filter_and_set_pg15 => 15,
    filter_and_set_pg16 => 16,
    filter_and_set_pg17 => 17,
    filter_and_set_pg18 => 18,
}

/// A filter and a value the source did not send (SPEC §4: never silently different): an
/// UPDATE that brings a row into the filter while leaving its TOASTed `doc` unchanged
/// cannot be completed from the target, which has no row to take `doc` from, and
/// neither can one that follows a delete of its key in the same transaction. Each is a
/// rejected row (here dead-lettered, naming the column), never a silent skip; a patch
/// of a row the target has is applied; under REPLICA IDENTITY FULL the old row carries
/// `doc` and nothing is refused; the next whole row brings the key.
fn filter_unchanged_toast(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("ft"), unique_name("ftd"), unique_name("ft"));
    src.create_database(&db);
    let tables = ["c_docs", "a_docs", "h_docs", "f_docs"];
    let mut ddl = String::from("SET ROLE kuvasz");
    for t in tables {
        ddl.push_str(&format!(
            "; CREATE TABLE {t} (id int PRIMARY KEY, status text, doc text); \
             ALTER TABLE {t} ALTER doc SET STORAGE EXTERNAL"
        ));
    }
    ddl.push_str("; ALTER TABLE f_docs REPLICA IDENTITY FULL");
    src.execute(&db, &ddl);
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE c_docs (id int PRIMARY KEY, status text, doc text); \
         CREATE TABLE a_docs (id int PRIMARY KEY, status text, doc text); \
         CREATE TABLE f_docs (id int PRIMARY KEY, status text, doc text); \
         CREATE TABLE h_docs (id int, status text, doc text, kvsz_start timestamptz, \
         kvsz_end timestamptz, kvsz_deleted boolean)",
    );
    let on = |list: &[&str], sql: &str| {
        for t in list {
            src.execute(&db, &sql.replace("$t", t));
        }
    };
    // 3,200 characters stored out of line: an UPDATE that leaves them does not send them.
    let doc = |seed: &str| format!("repeat(md5('{seed}'), 100)");
    on(
        &tables,
        &format!(
            "INSERT INTO $t VALUES (1, 'draft', {}), (2, 'paid', {}), (3, 'paid', {})",
            doc("a"),
            doc("b"),
            doc("c")
        ),
    );
    let mut map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\n",
        src.url(&db)
    );
    for (t, mode) in [
        ("c_docs", ""),
        ("a_docs", "type = \"append\", "),
        ("h_docs", "type = \"history\", "),
        ("f_docs", ""),
    ] {
        map.push_str(&format!(
            "{t} = {{ {mode}filter = \"status != 'draft'\" }}\n"
        ));
    }
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["on_error = \"deadletter\""]);
    // `check` names the filtered tables that can meet it, and what sends the values.
    let ((_, report), _) = Daemon::command(&daemon.dir, &["check"]);
    let warned: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("may be TOASTed"))
        .collect();
    assert_eq!(warned.len(), 3, "{report}");
    for t in ["c_docs", "a_docs", "h_docs"] {
        assert!(
            warned.iter().any(|l| l.contains(&format!(
                "table public.{t} → public.{t}: filtered, and its column(s) \"status\", \"doc\""
            )) && l.ends_with(&format!(
                "ALTER TABLE public.{t} REPLICA IDENTITY FULL on the source sends such values"
            ))),
            "{t}: {report}"
        );
    }
    let current = |t: &str| {
        format!("SELECT id || ':' || status || ':' || left(md5(doc), 6) FROM {t} ORDER BY id")
    };
    let versions = "SELECT id || ':' || status || ':' || left(md5(doc), 6) || ':' || \
                    CASE WHEN kvsz_end > '9000-01-01' THEN 'open' WHEN kvsz_deleted THEN 'deleted' \
                    ELSE 'closed' END FROM h_docs ORDER BY id, kvsz_start";
    let source_rows = |t: &str, skip: &[&str]| -> Rows {
        src.query(
            &db,
            &format!(
                "SELECT id || ':' || status || ':' || left(md5(doc), 6) FROM {t} \
                 WHERE status != 'draft' ORDER BY id"
            ),
        )
        .into_iter()
        .filter(|r| {
            let id = r[0]
                .as_deref()
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("");
            !skip.contains(&id)
        })
        .collect()
    };
    for t in ["c_docs", "a_docs", "f_docs"] {
        converge(
            &format!("copy ({t})"),
            || source_rows(t, &[]),
            || dest.query(&ddb, &current(t)),
        );
    }
    on(&tables, "UPDATE $t SET status = 'paid' WHERE id = 1");
    on(&tables, "UPDATE $t SET status = 'shipped' WHERE id = 2");
    on(
        &["c_docs", "h_docs", "f_docs"],
        &format!(
            "BEGIN; DELETE FROM $t WHERE id = 3; INSERT INTO $t VALUES (3, 'draft', {}); \
             UPDATE $t SET status = 'paid' WHERE id = 3; COMMIT",
            doc("d")
        ),
    );
    let dead = "SELECT source_table || ':' || op || ':' || (row->>'id') || ':' || \
                (error LIKE 'the target has no current row for this UPDATE, which left TOASTed \
                column(s) \"doc\" unchanged%') || ':' || (lsn IS NOT NULL) FROM kvsz_deadletter \
                ORDER BY 1";
    converge(
        "rejected rows",
        || {
            rows(&[
                "public.a_docs:UPDATE:1:true:true",
                "public.c_docs:UPDATE:1:true:true",
                "public.c_docs:UPDATE:3:true:true",
                "public.h_docs:UPDATE:1:true:true",
                "public.h_docs:UPDATE:3:true:true",
            ])
        },
        || dest.query(&ddb, dead),
    );
    // What was not refused was applied: the target equals the source but for the keys
    // reported (the dead letters above come after the changes before them).
    converge(
        "patched clone",
        || source_rows("c_docs", &["1", "3"]),
        || dest.query(&ddb, &current("c_docs")),
    );
    converge(
        "FULL identity",
        || source_rows("f_docs", &[]),
        || dest.query(&ddb, &current("f_docs")),
    );
    // The next whole row brings the key: from then on the target is the source's.
    on(
        &["c_docs", "a_docs", "h_docs"],
        &format!("UPDATE $t SET doc = {} WHERE id = 1", doc("e")),
    );
    converge(
        "completed clone",
        || source_rows("c_docs", &["3"]),
        || dest.query(&ddb, &current("c_docs")),
    );
    converge(
        "append",
        || source_rows("a_docs", &[]),
        || dest.query(&ddb, &current("a_docs")),
    );
    let md5 = |s: &str| -> String {
        src.query(&db, &format!("SELECT left(md5({}), 6)", doc(s)))[0][0]
            .clone()
            .unwrap_or_default()
    };
    let (b, c, e) = (md5("b"), md5("c"), md5("e"));
    converge(
        "history",
        || {
            rows(&[
                &format!("1:paid:{e}:open"),
                &format!("2:paid:{b}:closed"),
                &format!("2:shipped:{b}:open"),
                &format!("3:paid:{c}:deleted"),
            ])
        },
        || dest.query(&ddb, versions),
    );
    daemon.stop_ok();
}

every_major! { filter_unchanged_toast:
    filter_unchanged_toast_pg12 => 12,
    filter_unchanged_toast_pg13 => 13,
    filter_unchanged_toast_pg14 => 14,
    filter_unchanged_toast_pg15 => 15,
    filter_unchanged_toast_pg16 => 16,
    filter_unchanged_toast_pg17 => 17,
    filter_unchanged_toast_pg18 => 18,
}
