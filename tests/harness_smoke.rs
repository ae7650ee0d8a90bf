//! Proves the test harness: clusters of every version start, store data, and accept
//! the test roles with the authentication method each is meant to exercise.

mod support;

use std::time::Duration;

use postgres::{Client, NoTls};
use support::{destination, private_source, source, unique_name, versions, wait_for, Cluster};

fn text(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_owned)).collect()
}

/// Every shared cluster this run covers: the sources, then the destination.
fn clusters() -> Vec<&'static Cluster> {
    let mut all: Vec<_> = versions().into_iter().map(source).collect();
    all.push(destination());
    all
}

#[test]
fn clusters_store_and_return_rows() {
    for pg in clusters() {
        let db = unique_name("smoke");
        pg.create_database(&db);
        pg.execute(
            &db,
            "CREATE TABLE t (id int PRIMARY KEY, name text);
             INSERT INTO t VALUES (2, NULL), (1, 'one');",
        );
        assert_eq!(
            pg.query(&db, "SELECT id, name FROM t ORDER BY id"),
            vec![text(&[Some("1"), Some("one")]), text(&[Some("2"), None])],
            "pg{}",
            pg.version
        );

        // Re-creating drops the old database, even with a slot and a session on it.
        pg.execute(
            &db,
            &format!(
                "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                unique_name("slot")
            ),
        );
        let _session = pg.client(&db);
        pg.create_database(&db);
        assert_eq!(
            pg.query(&db, "SELECT count(*) FROM pg_class WHERE relname = 't'"),
            vec![text(&[Some("0")])]
        );
    }
}

#[test]
fn clusters_have_the_requested_version_and_settings() {
    for pg in clusters() {
        let rows = pg.query(
            "postgres",
            "SELECT current_setting('server_version_num')::int / 10000,
                    current_setting('wal_level'),
                    current_setting('fsync'),
                    current_setting('max_replication_slots')",
        );
        let version = pg.version.to_string();
        assert_eq!(
            rows,
            vec![text(&[
                Some(&version),
                Some("logical"),
                Some("off"),
                Some("50")
            ])]
        );
    }
    assert!(destination().bin_dir.starts_with("/usr/lib/postgresql/15"));
}

#[test]
fn roles_log_in_with_their_authentication_methods() {
    for pg in clusters() {
        let db = unique_name("auth");
        pg.create_database(&db);
        let stored = pg.query(
            "postgres",
            "SELECT rolname, CASE WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram'
                                  WHEN rolpassword ~ '^md5[0-9a-f]{32}$' THEN 'md5'
                                  ELSE rolpassword END
             FROM pg_authid WHERE rolname LIKE 'k%' ORDER BY rolname",
        );
        assert_eq!(
            stored,
            vec![
                text(&[Some("kuvasz"), Some("scram")]),
                text(&[Some("kv_md5"), Some("md5")]),
                text(&[Some("kv_trust"), None]),
            ],
            "pg{}",
            pg.version
        );

        for (user, password) in [("kuvasz", "kuvasz"), ("kv_md5", "kv_md5")] {
            let mut client = Client::connect(&pg.url_as(user, password, &db), NoTls)
                .unwrap_or_else(|e| panic!("pg{}: {user} cannot log in: {e}", pg.version));
            let who = client.query_one("SELECT current_user", &[]).unwrap();
            assert_eq!(who.get::<_, String>(0), user);
            // A wrong password is refused, so the method really checks passwords.
            assert!(Client::connect(&pg.url_as(user, "wrong", &db), NoTls).is_err());
        }
        let trust = format!("postgres://kv_trust@127.0.0.1:{}/{db}", pg.port);
        Client::connect(&trust, NoTls).unwrap();

        // kuvasz owns the database and its public schema (PostgreSQL 15+ closed it).
        let mut kuvasz = Client::connect(&pg.url(&db), NoTls).unwrap();
        kuvasz
            .batch_execute("CREATE TABLE mine (id int); CREATE PUBLICATION p FOR TABLE mine;")
            .unwrap_or_else(|e| panic!("pg{}: {e}", pg.version));
    }
}

#[test]
fn private_cluster_restarts_and_cleans_up() {
    let version = *versions().last().unwrap();
    let pg = private_source(version);
    let dir = pg.socket_dir.clone();
    pg.execute(
        "postgres",
        "CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)",
    );
    pg.restart();
    assert_eq!(
        pg.query("postgres", "SELECT id FROM kept"),
        vec![text(&[Some("7")])]
    );
    drop(pg);
    assert!(!dir.exists(), "{} survived the drop", dir.display());
}

#[test]
fn unique_names_are_identifier_safe() {
    let a = unique_name("Slot-Name ü");
    let b = unique_name("Slot-Name ü");
    assert_ne!(a, b);
    assert!(a.starts_with("slot_name___"), "{a}");
    assert!(a
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    assert!(unique_name("1x").starts_with("t1x_"));
    assert!(unique_name(&"x".repeat(100)).len() <= 63);
}

#[test]
fn wait_for_polls_until_some() {
    let mut calls = 0;
    let value = wait_for("the third call", Duration::from_secs(5), || {
        calls += 1;
        (calls == 3).then_some(calls)
    });
    assert_eq!(value, 3);
    let timed_out = std::panic::catch_unwind(|| {
        wait_for("never", Duration::from_millis(150), || None::<()>);
    });
    assert!(timed_out.is_err());
}

#[test]
fn scratch_dirs_are_fresh_and_distinct() {
    let (a, b) = (support::scratch_dir("cfg"), support::scratch_dir("cfg"));
    assert_ne!(a, b);
    assert!(a.is_dir() && std::fs::read_dir(&a).unwrap().next().is_none());
}
