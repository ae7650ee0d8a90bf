//! `kuvasz-streamer check` against real servers set up wrong, one way each: the exact
//! report line for every problem, exit status 1, and 0 with "all checks passed" once
//! everything is fixed. Passwords never appear.

mod support;

use std::path::Path;
use std::process::Command;

use support::daemon::Daemon;
use support::{destination, private_source, source, unique_name};

/// Writes `kuvasz-streamer.toml` (with `database_extra` in `[database]`) and `map.toml`
/// into a fresh directory.
fn files(dest_url: &str, database_extra: &str, map: &str) -> std::path::PathBuf {
    let dir = support::scratch_dir("check");
    std::fs::write(dir.join("map.toml"), map).expect("write map");
    std::fs::write(
        dir.join("kuvasz-streamer.toml"),
        format!(
            "[database]\nurl = \"{dest_url}\"\n{database_extra}\n[app]\nmap_file = \"{}\"\n",
            dir.join("map.toml").display()
        ),
    )
    .expect("write config");
    dir
}

/// `check --conf DIR/kuvasz-streamer.toml EXTRA…`: exit code and standard output.
fn check(dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kuvasz-streamer"))
        .arg("check")
        .arg("--conf")
        .arg(dir.join("kuvasz-streamer.toml"))
        .args(extra)
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "check wrote to stderr: {stderr}");
    (out.status.code().unwrap_or(-1), stdout)
}

fn assert_lines(report: &str, lines: &[String]) {
    for l in lines {
        assert!(
            report.lines().any(|r| r.trim_start() == l),
            "report lacks the line\n  {l}\n{report}"
        );
    }
}

#[test]
fn check_names_each_missing_source_prerequisite() {
    let v = *support::versions().last().expect("a version");
    let src = private_source(v);
    let dest = destination();
    for set in [
        "wal_level = replica",
        "max_replication_slots = 1",
        "max_wal_senders = 0",
    ] {
        src.execute("postgres", &format!("ALTER SYSTEM SET {set}"));
    }
    src.restart();
    src.execute(
        "postgres",
        "SELECT pg_create_physical_replication_slot('filler'); \
         CREATE ROLE norepl LOGIN PASSWORD 'pw-norepl-s3cret'",
    );
    let family = unique_name("chk");
    let db = unique_name("chksrc");
    let db_dst = unique_name("chkdst");
    let slot = format!("kuvasz_{family}_1");
    src.create_database(&db);
    // Owned by postgres, not the daemon's role; and a publication of that name owned by
    // postgres too.
    src.execute(
        &db,
        &format!("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION {slot}"),
    );
    dest.create_database(&db_dst);
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }}, {{ url = \"{}\", sid = \"2\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db),
        src.url_as("norepl", "pw-norepl-s3cret", &db)
    );
    let dir = files(&dest.url(&db_dst), "", &map);
    let (code, report) = check(&dir, &[]);
    assert_eq!(code, 1, "{report}");
    assert!(
        !report.contains("s3cret"),
        "a password in the report:\n{report}"
    );
    assert!(
        !report.contains("kuvasz:kuvasz@"),
        "a password in the report:\n{report}"
    );
    assert_lines(
        &report,
        &[
            "PROBLEM: wal_level is 'replica'; logical replication needs wal_level = logical: \
             set it in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart the server"
                .to_string(),
            "PROBLEM: no free replication slot (1 of 1 used): raise max_replication_slots (and \
             restart the server) or drop a slot nobody reads"
                .to_string(),
            "PROBLEM: no free WAL sender (0 of 0 used): raise max_wal_senders (and restart the server)"
                .to_string(),
            format!(
                "PROBLEM: publication {slot} is owned by postgres, not kuvasz: ALTER PUBLICATION \
                 {slot} OWNER TO kuvasz"
            ),
            "PROBLEM: role kuvasz does not own public.t, which must be added to the \
             publication (PostgreSQL publishes only its owner's tables): ALTER TABLE public.t \
             OWNER TO kuvasz"
                .to_string(),
            "PROBLEM: role norepl may not open replication connections: ALTER ROLE norepl REPLICATION"
                .to_string(),
            format!("slot {slot}: not there yet (created at the first start)"),
            "table public.t: ok → public.t".to_string(),
        ],
    );
    // The count at the end is the number of PROBLEM lines.
    let problems = report.lines().filter(|l| l.contains("PROBLEM:")).count();
    assert!(
        report.ends_with(&format!("{problems} problems found\n")),
        "{report}"
    );

    // Each fixed: the same check passes.
    for reset in ["wal_level", "max_replication_slots", "max_wal_senders"] {
        src.execute("postgres", &format!("ALTER SYSTEM RESET {reset}"));
    }
    src.execute("postgres", "SELECT pg_drop_replication_slot('filler')");
    src.restart();
    src.execute(
        &db,
        &format!("ALTER TABLE t OWNER TO kuvasz; ALTER PUBLICATION {slot} OWNER TO kuvasz"),
    );
    // norepl may replicate now, but owns nothing: its URL leaves the map.
    let map1 = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let dir = files(&dest.url(&db_dst), "", &map1);
    let (code, report) = check(&dir, &[]);
    assert_eq!(code, 0, "{report}");
    assert!(report.ends_with("all checks passed\n"), "{report}");
    assert_lines(
        &report,
        &[
            "wal_level: logical".to_string(),
            "role kuvasz: may replicate".to_string(),
            format!("publication {slot}: owned by kuvasz"),
        ],
    );
}

#[test]
fn check_names_destination_problems_and_wrong_passwords() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("chkd");
    let (db, db_dst) = support::database_pair(
        src,
        dest,
        "chkd",
        "CREATE TABLE t (id int PRIMARY KEY)",
        "CREATE TABLE t (sid text, id int, PRIMARY KEY (sid, id))",
    );
    let role = unique_name("kv_nocreate");
    dest.execute(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN PASSWORD 'pw-dest-s3cret'"),
    );
    dest.execute(&db_dst, &format!("GRANT USAGE ON SCHEMA public TO {role}"));
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }}, {{ url = \"{}\", sid = \"2\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db),
        src.url_as("kuvasz", "wrong-s3cret", &db)
    );
    let dir = files(&dest.url_as(&role, "pw-dest-s3cret", &db_dst), "", &map);
    let (code, report) = check(&dir, &[]);
    assert_eq!(code, 1, "{report}");
    assert!(
        !report.contains("s3cret"),
        "a password in the report:\n{report}"
    );
    let wrong = src.url_as("kuvasz", "********", &db);
    assert_lines(
        &report,
        &[
            format!(
                "PROBLEM: role {role} may not create tables in schema public (kvsz_sync_state, \
                 kvsz_progress, kvsz_deadletter): GRANT CREATE ON SCHEMA public TO {role}"
            ),
            format!(
                "warning: role {role} may not SET session_replication_role = replica, so \
                 triggers and foreign keys of target tables fire on copied and streamed rows: \
                 GRANT SET ON PARAMETER session_replication_role TO {role}"
            ),
            format!(
                "PROBLEM: source {family}/2 ({wrong}): password authentication failed for user \
                 \"kuvasz\" (SQLSTATE 28P01)"
            ),
        ],
    );

    // A schema that is not there.
    let dir = files(&dest.url(&db_dst), "schema = \"nosuch\"", &map);
    let (code, report) = check(&dir, &[]);
    assert_eq!(code, 1, "{report}");
    assert_lines(
        &report,
        &[
            "PROBLEM: schema nosuch (database.schema) does not exist: CREATE SCHEMA nosuch \
           AUTHORIZATION kuvasz"
                .to_string(),
        ],
    );
}

#[test]
fn check_tells_this_daemon_from_another_consumer_of_the_slot() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("chka");
    let t = "CREATE TABLE t (id int PRIMARY KEY)";
    let (db, db_dst) = support::database_pair(src, dest, "chka", t, t);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let d = Daemon::start(&dest.url(&db_dst), &map, &[]);
    d.wait_streaming(1);
    let slot = format!("kuvasz_{family}_1");
    let (code, report) = Daemon::check(&d.dir);
    assert_eq!(code, 0, "{report}");
    assert!(report.ends_with("all checks passed\n"), "{report}");
    assert!(
        report.lines().any(|l| l
            .trim_start()
            .starts_with(&format!("slot {slot}: in use by kuvasz-streamer (pid "))
            && l.ends_with("): this daemon runs")),
        "{report}"
    );
    // Seen from a deployment of another name, the slot is someone else's.
    let (code, report) = check(&d.dir, &["--server.name=elsewhere"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.lines().any(|l| l.trim_start().starts_with(&format!(
            "PROBLEM: slot {slot} is in use by another consumer (pid "
        )) && l.contains("application_name \"kuvasz-streamer\")")),
        "{report}"
    );
    d.stop_ok();
}
