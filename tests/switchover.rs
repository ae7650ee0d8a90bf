//! The upgrade switchover's last step: `kuvasz-streamer sequences` carries the source
//! sequences of mapped tables to the destination, on every source major.

mod support;

use std::process::Command;

use support::daemon::work_dir;
use support::{destination, source, unique_name, Cluster};

/// Runs `kuvasz-streamer sequences` with `args` on a config for `dest_url` and `map`:
/// exit code and standard output.
fn sequences(dest_url: &str, map: &str, args: &[&str]) -> (i32, String) {
    let dir = work_dir();
    std::fs::write(dir.join("map.toml"), map).expect("write map");
    std::fs::write(
        dir.join("kuvasz-streamer.toml"),
        format!(
            "[database]\nurl = \"{dest_url}\"\n[app]\nmap_file = \"{}\"\n",
            dir.join("map.toml").display()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_kuvasz-streamer"))
        .arg("sequences")
        .args(args)
        .arg("--conf")
        .arg(dir.join("kuvasz-streamer.toml"))
        .output()
        .expect("run sequences");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn last_value(c: &Cluster, db: &str, seq: &str) -> Option<String> {
    c.query(db, &format!("SELECT last_value::text FROM {seq}"))[0][0].clone()
}

/// Serial and identity columns of two tenant databases into one destination: each
/// destination sequence gets the highest source value plus the margin, is never lowered,
/// and a second run changes nothing; a sequence missing on the destination is reported.
fn sequences_are_carried(version: u32) {
    let src = source(version);
    let dest = destination();
    let (a, b, ddb, family) = (
        unique_name("sqa"),
        unique_name("sqb"),
        unique_name("sqd"),
        unique_name("sq"),
    );
    let ddl = "SET ROLE kuvasz; CREATE TABLE orders (id serial PRIMARY KEY, v text); \
               CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text); \
               CREATE TABLE quiet (id serial PRIMARY KEY)";
    for db in [&a, &b] {
        src.create_database(db);
        src.execute(db, ddl);
    }
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE orders (sid text, id serial, v text, PRIMARY KEY (sid, id)); \
         CREATE TABLE events (sid text, id bigint GENERATED ALWAYS AS IDENTITY, v text, PRIMARY KEY (sid, id))",
    );
    src.execute(&a, "INSERT INTO orders (v) SELECT 'x' FROM generate_series(1, 30); INSERT INTO events (v) VALUES ('e')");
    src.execute(
        &b,
        "INSERT INTO orders (v) SELECT 'x' FROM generate_series(1, 70)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, {{ url = \"{}\", sid = \"b\" }} ]\n\
         [source.tables]\norders = {{}}\nevents = {{}}\nquiet = {{}}\n",
        src.url(&a),
        src.url(&b)
    );
    let (code, out) = sequences(&dest.url(&ddb), &map, &["--margin", "1000"]);
    // quiet_id_seq has no counterpart on the destination.
    assert_eq!(code, 1, "{out}");
    for line in [
        "sequence public.orders_id_seq: source 70, margin 1000: set to 1070 (was never used)",
        "sequence public.events_id_seq: source 1, margin 1000: set to 1001 (was never used)",
        "sequence public.quiet_id_seq: source never used, margin 1000: MISSING on the destination",
    ] {
        assert!(out.contains(line), "output lacks {line:?}:\n{out}");
    }
    assert_eq!(
        last_value(dest, &ddb, "orders_id_seq").as_deref(),
        Some("1070")
    );
    assert_eq!(
        last_value(dest, &ddb, "events_id_seq").as_deref(),
        Some("1001")
    );
    // Idempotent: a second run keeps the values.
    let (_, again) = sequences(&dest.url(&ddb), &map, &["--margin", "1000"]);
    assert!(
        again.contains("orders_id_seq: source 70, margin 1000: kept at 1070"),
        "{again}"
    );
    assert_eq!(
        last_value(dest, &ddb, "orders_id_seq").as_deref(),
        Some("1070")
    );
    // Never lowered: the destination already moved on.
    dest.execute(&ddb, "SELECT setval('orders_id_seq', 5000)");
    let (_, later) = sequences(&dest.url(&ddb), &map, &[]);
    assert!(
        later.contains("orders_id_seq: source 70, margin 0: kept at 5000"),
        "{later}"
    );
    assert_eq!(
        last_value(dest, &ddb, "orders_id_seq").as_deref(),
        Some("5000")
    );
}

every_major! { sequences_are_carried:
    sequences_are_carried_pg12 => 12,
    sequences_are_carried_pg13 => 13,
    sequences_are_carried_pg14 => 14,
    sequences_are_carried_pg15 => 15,
    sequences_are_carried_pg16 => 16,
    sequences_are_carried_pg17 => 17,
    sequences_are_carried_pg18 => 18,
}
