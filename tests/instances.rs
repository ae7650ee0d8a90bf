//! Several instances of one deployment (the same configuration and map into the same
//! destination schema) share its sources through the destination (see
//! `src/ownership.rs`): each source is streamed by one instance, the sources spread
//! evenly, and those of an instance that dies are streamed by the others, from the
//! positions recorded in the destination, with nothing lost or doubled.

mod support;

use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, http, source, unique_name, wait_for};

/// How many sources each daemon streams, by its `/api/status`.
fn streaming(addrs: &[String]) -> Vec<usize> {
    addrs
        .iter()
        .map(|a| {
            let (_, body) = http::get(a, "/api/status");
            body.matches("\"state\":\"streaming\"").count()
        })
        .collect()
}

/// `n` source databases with `table` (made as kuvasz), mapped as one family whose URLs
/// have the sids `{sid}0`, `{sid}1`…: their names and the map.
fn family(
    src: &support::Cluster,
    sid: &str,
    n: usize,
    table: &str,
    entry: &str,
) -> (Vec<String>, String) {
    let dbs: Vec<String> = (0..n).map(|i| unique_name(&format!("{sid}{i}"))).collect();
    let urls: Vec<String> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| {
            src.create_database(db);
            src.execute(db, &format!("SET ROLE kuvasz; {table}"));
            format!("{{ url = \"{}\", sid = \"{sid}{i}\" }}", src.url(db))
        })
        .collect();
    let map = format!(
        "[[source]]\ndatabase = \"{}\"\nurls = [ {} ]\n[source.tables]\nt = {entry}\n",
        unique_name(sid),
        urls.join(", ")
    );
    (dbs, map)
}

/// Rows of `t` on the destination.
fn count(dest: &support::Cluster, ddb: &str) -> i64 {
    dest.query(ddb, "SELECT count(*)::text FROM t")[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

#[test]
fn instances_share_sources_and_take_over_a_dead_one() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map) = family(
        src,
        "s",
        6,
        "CREATE TABLE t (id int PRIMARY KEY, v int); \
         INSERT INTO t SELECT g, g FROM generate_series(1, 10) g",
        "{}",
    );
    let ddb = unique_name("ind");
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v int, PRIMARY KEY (sid, id))",
    );
    let expected = || {
        let mut rows = Vec::new();
        for (i, db) in dbs.iter().enumerate() {
            for r in src.query(db, "SELECT id::text, v::text FROM t ORDER BY id") {
                rows.push(vec![Some(format!("s{i}")), r[0].clone(), r[1].clone()]);
            }
        }
        rows.sort();
        rows
    };
    let actual = || {
        dest.query(
            &ddb,
            "SELECT sid, id::text, v::text FROM t ORDER BY sid COLLATE \"C\", id::text COLLATE \"C\"",
        )
    };

    // Three instances, one after the other: the sources spread 2/2/2.
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for _ in 0..3 {
        let d = Daemon::start(&dest.url(&ddb), &map, &[]);
        addrs.push(http::address(&d));
        daemons.push(d);
    }
    let spread = wait_for("the sources spread 2/2/2", Duration::from_secs(60), || {
        let s = streaming(&addrs);
        (s == [2, 2, 2]).then_some(s)
    });
    eprintln!("spread: {spread:?}");
    support::converge("the first rows", expected, actual);
    for (i, db) in dbs.iter().enumerate() {
        src.execute(db, &format!("INSERT INTO t VALUES (100, {i})"));
    }
    support::converge("rows streamed by three instances", expected, actual);
    for a in &addrs {
        assert_eq!(http::get(a, "/readyz").0, 200, "{a}");
    }

    // One is killed under load: the other two stream all six within 15 s.
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            for n in 0..200 {
                for db in &dbs {
                    src.execute(db, &format!("INSERT INTO t VALUES ({}, {n})", 1000 + n));
                }
            }
        });
        // Killed while the load's rows arrive.
        let before = count(dest, &ddb);
        wait_for("the load's rows arriving", Duration::from_secs(30), || {
            (count(dest, &ddb) > before).then_some(())
        });
        let killed = daemons.remove(0);
        addrs.remove(0);
        killed.kill();
        let at = Instant::now();
        wait_for(
            "the others streaming every source",
            Duration::from_secs(15),
            || (streaming(&addrs).iter().sum::<usize>() == 6).then_some(()),
        );
        eprintln!("taken over {:.1?} after the kill", at.elapsed());
        load.join().expect("load");
    });
    assert_eq!(streaming(&addrs), vec![3, 3]);
    support::converge("every row once after the takeover", expected, actual);

    // A graceful stop hands its sources over.
    let stopped = daemons.remove(0);
    addrs.remove(0);
    let at = Instant::now();
    stopped.stop_ok();
    wait_for(
        "the last one streaming every source",
        Duration::from_secs(15),
        || (streaming(&addrs) == [6]).then_some(()),
    );
    eprintln!("handed over {:.1?} after the stop", at.elapsed());
    for db in &dbs {
        src.execute(db, "UPDATE t SET v = v + 1");
    }
    support::converge("every row after the hand-over", expected, actual);
    for d in daemons {
        d.stop_ok();
    }
}

/// An instance whose coordination session is terminated on the destination stops its
/// sources at once, then takes them again with a new session; a key-less append target
/// ends with every source row exactly once.
#[test]
fn a_lost_coordination_session_stops_its_sources() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map) = family(
        src,
        "s",
        4,
        "CREATE TABLE t (n int)",
        "{ type = \"append\" }",
    );
    let ddb = unique_name("ild");
    dest.create_database(&ddb);
    dest.execute(&ddb, "SET ROLE kuvasz; CREATE TABLE t (sid text, n int)");
    let daemons: Vec<Daemon> = (0..2)
        .map(|_| Daemon::start(&dest.url(&ddb), &map, &[]))
        .collect();
    let addrs: Vec<String> = daemons.iter().map(http::address).collect();
    wait_for("the sources spread 2/2", Duration::from_secs(60), || {
        (streaming(&addrs) == [2, 2]).then_some(())
    });
    let (_, status) = http::get(&addrs[0], "/api/status");
    let instance = status
        .split("\"instance\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("instance id")
        .to_string();
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            for n in 0..300 {
                for db in &dbs {
                    src.execute(db, &format!("INSERT INTO t VALUES ({n})"));
                }
            }
        });
        // Terminated while the load's rows arrive.
        wait_for("the load's rows arriving", Duration::from_secs(30), || {
            (count(dest, &ddb) > 0).then_some(())
        });
        let killed = dest.query(
            &ddb,
            &format!(
                "SELECT pg_terminate_backend(backend)::text FROM kvsz_instances \
                 WHERE instance = '{instance}'"
            ),
        );
        assert_eq!(killed, vec![vec![Some("true".to_string())]]);
        wait_for("its sources stopped", Duration::from_secs(10), || {
            (streaming(&addrs)[0] < 2).then_some(())
        });
        load.join().expect("load");
    });
    wait_for(
        "the sources streaming again",
        Duration::from_secs(30),
        || (streaming(&addrs).iter().sum::<usize>() == 4).then_some(()),
    );
    let expected = || {
        let mut rows = Vec::new();
        for (i, db) in dbs.iter().enumerate() {
            for r in src.query(db, "SELECT n::text FROM t ORDER BY n") {
                rows.push(vec![Some(format!("s{i}")), r[0].clone()]);
            }
        }
        rows.sort();
        rows
    };
    let actual = || {
        dest.query(
            &ddb,
            "SELECT sid, n::text FROM t ORDER BY sid COLLATE \"C\", n::text COLLATE \"C\"",
        )
    };
    support::converge("every row exactly once", expected, actual);
    for d in daemons {
        d.stop_ok();
    }
}

/// Two deployments (two maps) writing into one destination schema do not share: each
/// instance streams every source of its own map.
#[test]
fn another_map_into_the_same_schema_is_another_deployment() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let ddb = unique_name("idd");
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v int, PRIMARY KEY (sid, id))",
    );
    let daemons: Vec<Daemon> = ["ia", "ib"]
        .iter()
        .map(|sid| {
            let (_, map) = family(
                src,
                sid,
                2,
                "CREATE TABLE t (id int PRIMARY KEY, v int)",
                "{}",
            );
            Daemon::start(&dest.url(&ddb), &map, &[])
        })
        .collect();
    let addrs: Vec<String> = daemons.iter().map(http::address).collect();
    wait_for(
        "each map's two sources streaming",
        Duration::from_secs(60),
        || (streaming(&addrs) == [2, 2]).then_some(()),
    );
    for d in daemons {
        d.stop_ok();
    }
}
