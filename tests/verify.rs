//! `kuvasz-streamer verify` (SPEC §6): equal targets exit 0 with an OK line per source
//! and table; differences made by hand on the destination are named key by key as
//! missing, extra or different, per sid and per table; and a source written to while
//! verify runs is no difference.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_confirmed, Cluster};

/// The table whose name and keys need quoting everywhere.
const ODD: &str = "Odd \"Tab\" é";
/// Its keys: quotes, a backslash, a comma, parentheses.
const ODD_KEYS: [&str; 5] = ["it's", "say \"hi\"", "back\\slash", "a,b", "(x)"];

fn ident(name: &str) -> String {
    support::ident(name)
}

fn lit(text: &str) -> String {
    support::literal(text)
}

/// `kuvasz-streamer verify <args>` on the files of daemon directory `dir`: exit code
/// and standard output (it writes nothing to standard error).
fn verify(dir: &Path, args: &[&str]) -> (i32, String) {
    let all: Vec<&str> = std::iter::once("verify")
        .chain(args.iter().copied())
        .collect();
    let (out, stderr) = Daemon::command(dir, &all);
    assert!(
        stderr.is_empty(),
        "verify {args:?} wrote to stderr: {stderr}"
    );
    out
}

fn source_ddl() -> String {
    format!(
        "CREATE TABLE items (id int PRIMARY KEY, v text, n numeric, at timestamptz); \
         CREATE TABLE events (id int PRIMARY KEY, v text); \
         CREATE TABLE hist (id int PRIMARY KEY, v text); \
         CREATE TABLE bag (v text, n int); ALTER TABLE bag REPLICA IDENTITY FULL; \
         CREATE TABLE {} (k text PRIMARY KEY, v int); \
         CREATE TABLE parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); \
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (100); \
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (100) TO (1000); \
         CREATE TABLE r7_a (id int PRIMARY KEY, v text); CREATE TABLE r7_b (id int PRIMARY KEY, v text); \
         CREATE TABLE filtered (id int PRIMARY KEY, v text)",
        ident(ODD)
    )
}

fn target_ddl() -> String {
    format!(
        "CREATE TABLE items (sid text, id int, v text, n numeric, at timestamptz, \
           PRIMARY KEY (sid, id)); \
         CREATE TABLE events (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE hist (sid text, id int, v text, kvsz_start timestamptz, \
           kvsz_end timestamptz, kvsz_deleted boolean); \
         CREATE TABLE bag (sid text, v text, n int); \
         CREATE TABLE {} (sid text, k text, v int, PRIMARY KEY (sid, k)); \
         CREATE TABLE parts (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE r7 (sid text, id int, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE filtered (sid text, id int, v text, PRIMARY KEY (sid, id))",
        ident(ODD)
    )
}

/// Rows of every table, then changes the daemon streams.
fn fill(src: &Cluster, db: &str) {
    let odd: Vec<String> = ODD_KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| format!("({}, {i})", lit(k)))
        .collect();
    src.execute(
        db,
        &format!(
            "INSERT INTO items SELECT g, 'v' || g, g / 3.0, '2024-01-01'::timestamptz + g * interval '1 hour' \
               FROM generate_series(1, 50) g; \
             INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 20) g; \
             INSERT INTO hist SELECT g, 'h' || g FROM generate_series(1, 10) g; \
             INSERT INTO bag VALUES ('x', 1), ('x', 1), ('y', NULL); \
             INSERT INTO parts VALUES (1, 'p1'), (150, 'p150'); \
             INSERT INTO r7_a VALUES (1, 'a1'); INSERT INTO r7_b VALUES (2, 'b2'); \
             INSERT INTO filtered VALUES (1, 'shown'), (2, 'hidden'); \
             INSERT INTO {} VALUES {}",
            ident(ODD),
            odd.join(", ")
        ),
    );
}

fn stream_changes(src: &Cluster, db: &str) {
    src.execute(
        db,
        &format!(
            "INSERT INTO items VALUES (51, 'new', 1.5, now()); UPDATE items SET v = 'upd' WHERE id = 4; \
             DELETE FROM items WHERE id = 5; DELETE FROM events WHERE id = 1; \
             UPDATE hist SET v = 'h2 again' WHERE id = 2; DELETE FROM hist WHERE id = 3; \
             INSERT INTO bag VALUES ('z', 3); UPDATE {} SET v = 42 WHERE k = 'a,b'; \
             INSERT INTO parts VALUES (2, 'p2'), (500, 'p500'); UPDATE r7_b SET v = 'B2'",
            ident(ODD)
        ),
    );
}

/// The lines of `out` about `table` of sid `sid`: its status line and its keys.
fn block(out: &str, sid: &str, table: &str) -> Vec<String> {
    let mut lines = out.lines();
    let head = format!("/{sid} public.{table} -> ");
    let Some(first) = lines.by_ref().find(|l| l.contains(&head)) else {
        return vec![];
    };
    let mut block = vec![first.to_string()];
    block.extend(
        lines
            .take_while(|l| l.starts_with("  "))
            .map(str::to_string),
    );
    block
}

fn verify_finds_differences(version: u32) {
    let src = source(version);
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("va"),
        unique_name("vb"),
        unique_name("vd"),
        unique_name("v"),
    );
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(db, &format!("SET ROLE kuvasz; {}", source_ddl()));
        fill(src, db);
    }
    dest.create_database(&ddb);
    dest.execute(&ddb, &format!("SET ROLE kuvasz; {}", target_ddl()));
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\n\
         urls = [ {{ url = \"{}\", sid = \"a\" }}, {{ url = \"{}\", sid = \"b\" }} ]\n\
         [source.tables]\nitems = {{}}\nevents = {{ type = \"append\" }}\n\
         hist = {{ type = \"history\" }}\nbag = {{}}\n\"Odd \\\"Tab\\\" é\" = {{}}\n\
         parts = {{}}\nr7 = {{ partitions_regex = \"r7_.*\" }}\n\
         filtered = {{ filter = \"v != 'hidden'\" }}\n",
        src.url(&a),
        src.url(&b)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    daemon.wait_streaming(2);
    for (db, sid) in [(&a, "a"), (&b, "b")] {
        stream_changes(src, db);
        wait_confirmed(src, db, &format!("kuvasz_{family}_{sid}"));
    }
    let (code, out) = verify(&daemon.dir, &[]);
    assert_eq!(code, 0, "verify of equal targets:\n{out}");
    for sid in ["a", "b"] {
        assert_eq!(
            block(&out, sid, "items"),
            [format!(
                "OK {family}/{sid} public.items -> public.items: 50 rows"
            )],
            "{out}"
        );
        let tables = [
            ("events", 19),
            ("hist", 9),
            ("bag", 4),
            (ODD, 5),
            ("parts", 4),
            ("r7", 2),
        ];
        for (t, n) in tables {
            assert!(
                block(&out, sid, t)
                    .first()
                    .is_some_and(|l| l.starts_with("OK ") && l.ends_with(&format!(": {n} rows"))),
                "{t} of {sid}:\n{out}"
            );
        }
    }
    assert!(
        !out.contains("kuvasz@") && !out.contains(":kuvasz"),
        "{out}"
    );
    let dir = daemon.stop_ok();

    // By hand, with nothing left to repair it.
    dest.execute(
        &ddb,
        &format!(
            "DELETE FROM items WHERE sid = 'a' AND id = 2; \
             UPDATE items SET v = 'changed' WHERE sid = 'a' AND id = 3; \
             INSERT INTO items VALUES ('a', 99, 'extra', 1, now()); \
             DELETE FROM events WHERE sid = 'a' AND id = 7; \
             INSERT INTO events VALUES ('a', 100, 'kept'); \
             UPDATE hist SET v = 'wrong' WHERE sid = 'a' AND id = 6 AND kvsz_end > '9000-01-01'; \
             INSERT INTO bag VALUES ('a', 'x', 1); \
             UPDATE {} SET v = -1 WHERE sid = 'a' AND k = {}",
            ident(ODD),
            lit("it's")
        ),
    );
    let (code, out) = verify(&dir, &[]);
    assert_eq!(code, 1, "verify of changed targets:\n{out}");
    let items = block(&out, "a", "items");
    assert!(
        items[0].starts_with(&format!(
            "DIFFERENT {family}/a public.items -> public.items: source 50 rows, target 50; \
             1 missing, 1 extra, 1 different"
        )),
        "{out}"
    );
    assert_eq!(
        items[1..],
        ["  missing 2", "  extra 99", "  different 3"],
        "{out}"
    );
    // Append: the extra row is no difference, the lost one is.
    assert_eq!(block(&out, "a", "events")[1..], ["  missing 7"], "{out}");
    assert_eq!(block(&out, "a", "hist")[1..], ["  different 6"], "{out}");
    assert_eq!(block(&out, "a", "bag")[1..], ["  extra (x,1)"], "{out}");
    assert_eq!(block(&out, "a", ODD)[1..], ["  different it's"], "{out}");
    for t in ["items", "events", "hist", "bag", ODD] {
        assert!(
            block(&out, "b", t)[0].starts_with("OK "),
            "{t} of b:\n{out}"
        );
    }

    let (code, out) = verify(&dir, &["--sid", "b"]);
    assert_eq!(code, 0, "verify --sid b:\n{out}");
    assert!(!out.contains("/a "), "{out}");

    let (code, out) = verify(&dir, &["--table", "public.events"]);
    assert_eq!(code, 1, "verify --table events:\n{out}");
    let heads: Vec<&str> = out.lines().filter(|l| !l.starts_with("  ")).collect();
    assert_eq!(heads.len(), 2, "{out}");
    assert!(
        heads.iter().all(|l| l.contains(" public.events -> ")),
        "{out}"
    );

    let (code, out) = verify(&dir, &["--table", ODD, "--sid", "a"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(block(&out, "a", ODD)[1..], ["  different it's"], "{out}");

    // A source change nobody streams: reported, but as unconfirmed.
    src.execute(&b, "INSERT INTO items VALUES (200, 'late', 0, now())");
    let (code, out) = verify(&dir, &["--table", "items", "--sid", "b"]);
    assert_eq!(code, 1, "{out}");
    let items = block(&out, "b", "items");
    assert!(
        items[0].contains(&format!(
            "(unconfirmed: slot kuvasz_{family}_b is not streaming"
        )),
        "{out}"
    );
    assert_eq!(items[1..], ["  missing 200"], "{out}");

    let (code, out) = verify(&dir, &["--table", "nosuch"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not in the map"), "{out}");
}

every_major! { verify_finds_differences:
    verify_finds_differences_pg12 => 12,
    verify_finds_differences_pg18 => 18,
}

/// Verify while a source is being written: small transactions inserting, updating and
/// deleting, and one long transaction open the whole time. Whatever the daemon has not
/// applied yet is no difference.
fn verify_on_a_live_source(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("vl"), unique_name("vld"), unique_name("vl"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE live (id int PRIMARY KEY, v int, t text); \
         INSERT INTO live SELECT g, g, 'start' FROM generate_series(1, 2000) g",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE live (sid text, id int, v int, t text, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nlive = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    daemon.wait_streaming(1);

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [false, true]
        .into_iter()
        .map(|long| {
            let mut client = src.client(&db);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut i = 0;
                if long {
                    client.batch_execute("BEGIN").expect("begin");
                }
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    // The long transaction touches only its own rows: no lock waits.
                    let sql = if long {
                        format!(
                            "INSERT INTO live VALUES ({}, {i}, 'long'); \
                             UPDATE live SET v = v + 1 WHERE id = {}",
                            100_000 + i,
                            100_000 + i / 2 + 1
                        )
                    } else {
                        format!(
                            "INSERT INTO live VALUES ({}, {i}, 'new'); \
                             UPDATE live SET v = v + 1, t = 'upd' WHERE id = {}; \
                             DELETE FROM live WHERE id = {}",
                            10_000 + i,
                            1 + (i * 7) % 2000,
                            1 + (i * 13 + 1000) % 2000
                        )
                    };
                    client.batch_execute(&sql).expect("write");
                    if !long {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                if long {
                    client.batch_execute("COMMIT").expect("commit");
                }
                i
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(4);
    let mut runs = 0;
    while Instant::now() < until || runs < 2 {
        let (code, out) = verify(&daemon.dir, &[]);
        assert_eq!(code, 0, "verify of a live source (run {runs}):\n{out}");
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let written: Vec<i32> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    assert!(written.iter().all(|&n| n > 10), "writers wrote {written:?}");
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));
    let (code, out) = verify(&daemon.dir, &[]);
    assert_eq!(code, 0, "verify after the writers stopped:\n{out}");
    assert!(out.starts_with("OK "), "{out}");
    daemon.stop_ok();
}

every_major! { verify_on_a_live_source:
    verify_on_a_live_source_pg12 => 12,
    verify_on_a_live_source_pg18 => 18,
}
