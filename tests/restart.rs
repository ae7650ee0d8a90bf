//! Crash safety and clean stops: SIGKILL the daemon while a workload runs, or stop it
//! with SIGTERM/SIGINT while it applies a backlog (a clean stop within 10 s, what was
//! applied confirmed), start it again, and the destination ends equal to the source for
//! every sid.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_for};

/// How the daemon is stopped between its runs.
#[derive(Clone, Copy)]
enum Stop {
    Kill,
    /// SIGTERM and SIGINT in turn, each while a 100,000-row transaction is being
    /// applied.
    Signals,
}

fn stopped_during_workload(version: u32, how: Stop) {
    let src = source(version);
    let dest = destination();
    let family = unique_name("crash");
    let dbs = [unique_name("ca"), unique_name("cb")];
    let db_dst = unique_name("cdst");
    for db in &dbs {
        src.create_database(db);
        src.execute(
            db,
            "SET ROLE kuvasz; CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL, note text)",
        );
        src.execute(
            db,
            "INSERT INTO acct SELECT g, 0, 'init' FROM generate_series(1, 2000) g",
        );
    }
    dest.create_database(&db_dst);
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE acct (sid text, id int, balance bigint NOT NULL, note text, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"x\" }}, {{ url = \"{}\", sid = \"y\" }} ]\n[source.tables]\nacct = {{}}\n",
        src.url(&dbs[0]),
        src.url(&dbs[1])
    );

    // The workload: transactions of inserts, updates and deletes, until told to stop.
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = dbs
        .iter()
        .map(|db| {
            let mut client = src.client(db);
            let done = done.clone();
            std::thread::spawn(move || {
                let mut i: i64 = 0;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    client
                        .batch_execute(&format!(
                            "BEGIN; \
                             UPDATE acct SET balance = balance + {i}, note = 'u{i}' WHERE id = {}; \
                             INSERT INTO acct VALUES ({}, {i}, 'i{i}'); \
                             DELETE FROM acct WHERE id = {}; \
                             COMMIT",
                            1 + i % 2000,
                            100_000 + i,
                            100_000 + i - 7
                        ))
                        .expect("workload");
                    std::thread::sleep(Duration::from_millis(2));
                }
                i
            })
        })
        .collect();

    let mut daemon = Daemon::start(&dest.url(&db_dst), &map, &[]);
    for (n, pause) in [2500u64, 1200, 3000, 700].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(pause));
        assert!(
            daemon.running(),
            "daemon died on its own:\n{}",
            daemon.log()
        );
        let dir = match how {
            Stop::Kill => daemon.kill(),
            Stop::Signals => {
                // A backlog being applied when the signal comes.
                src.execute(
                    &dbs[n % 2],
                    &format!(
                        "INSERT INTO acct SELECT g, g, 'bulk' FROM generate_series({0}, {0} + 99999) g",
                        1_000_000 * (n + 1)
                    ),
                );
                std::thread::sleep(Duration::from_millis(300));
                let sig = [libc::SIGTERM, libc::SIGINT][n % 2];
                let stops = daemon.log().matches("kuvasz-streamer: stopped").count();
                let dir = daemon.stop_by(sig, Duration::from_secs(10));
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                assert_eq!(
                    log.matches("kuvasz-streamer: stopped").count(),
                    stops + 1,
                    "signal {sig}: no clean stop logged:\n{log}"
                );
                dir
            }
        };
        daemon = Daemon::spawn(dir);
    }
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::Relaxed);
    let counts: Vec<i64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        counts.iter().all(|&n| n > 100),
        "workload too small: {counts:?}"
    );

    for (db, sid) in dbs.iter().zip(["x", "y"]) {
        let expected = src.query(
            db,
            &format!("SELECT '{sid}', id::text, balance::text, note FROM acct ORDER BY id"),
        );
        let got = wait_for(
            &format!("sid {sid} converges"),
            Duration::from_secs(90),
            || {
                let actual = dest.query(
                &db_dst,
                &format!("SELECT sid, id::text, balance::text, note FROM acct WHERE sid = '{sid}' ORDER BY id"),
            );
                (actual == expected).then_some(actual)
            },
        );
        assert_eq!(got.len(), expected.len());
    }
    daemon.stop_ok();
}

#[test]
fn sigkill_during_workload_pg12() {
    stopped_during_workload(12, Stop::Kill);
}

#[test]
fn sigkill_during_workload_pg18() {
    stopped_during_workload(18, Stop::Kill);
}

#[test]
fn sigterm_and_sigint_during_workload_pg15() {
    stopped_during_workload(15, Stop::Signals);
}
