//! Several instances of one deployment (the same configuration and map into the same
//! destination schema) share its sources through the destination (see
//! `src/ownership.rs`): each source is streamed by one instance, the sources spread
//! evenly, and those of an instance that dies are streamed by the others, from the
//! positions recorded in the destination, with nothing lost or doubled.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{crash_load, destination, http, source, unique_name, wait_confirmed, wait_for};

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

/// Each source of a daemon's `/api/status`: (slot, state, owner instance).
fn owners(addr: &str) -> Vec<(String, String, String)> {
    let (_, body) = http::get(addr, "/api/status");
    let field = |chunk: &str, name: &str| -> String {
        chunk
            .split(&format!("\"{name}\":"))
            .nth(1)
            .and_then(|r| r.strip_prefix('"'))
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    body.split("{\"database\":")
        .skip(1)
        .map(|c| {
            let owner = c.split("\"owner\":").nth(1).unwrap_or("");
            (
                field(c, "slot"),
                field(c, "state"),
                field(owner, "instance"),
            )
        })
        .collect()
}

/// Lines of `check` naming a source's owner.
fn owned_lines(check: &str) -> usize {
    check
        .lines()
        .filter(|l| l.contains("source of slot") && l.contains(": owned by "))
        .count()
}

/// A daemon's instance id, from its `/api/status`.
fn instance(addr: &str) -> String {
    let (_, status) = http::get(addr, "/api/status");
    status
        .split("\"instance\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("instance id")
        .to_string()
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

/// [`family`] of `n` sources with a key-less table `t (n int)` mapped as append, and a
/// destination database (named after `prefix`) with its target `t (sid, n)`.
fn append_family(
    src: &support::Cluster,
    dest: &support::Cluster,
    sid: &str,
    n: usize,
    prefix: &str,
) -> (Vec<String>, String, String) {
    let (dbs, map) = family(
        src,
        sid,
        n,
        "CREATE TABLE t (n int)",
        "{ type = \"append\" }",
    );
    let ddb = unique_name(prefix);
    dest.create_database(&ddb);
    dest.execute(&ddb, "SET ROLE kuvasz; CREATE TABLE t (sid text, n int)");
    (dbs, map, ddb)
}

/// Rows of `t` on the destination.
fn count(dest: &support::Cluster, ddb: &str) -> i64 {
    dest.query(ddb, "SELECT count(*)::text FROM t")[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

/// Three instances share twelve sources 4/4/4; a fourth one added takes its share
/// (3/3/3/3); one killed under load has its sources streamed by the others within 15 s;
/// one stopped hands its sources over at once. A key-less append target ends with every
/// source row exactly once: nothing lost, nothing applied twice across the take-overs.
fn share_and_take_over(version: u32) {
    let src = source(version);
    let dest = destination();
    let (dbs, map, ddb) = append_family(src, dest, "s", 12, "ind");
    let insert = |n: usize| {
        for db in &dbs {
            src.execute(db, &format!("INSERT INTO t VALUES ({n})"));
        }
    };
    let expected = || {
        let mut rows = Vec::new();
        for (i, db) in dbs.iter().enumerate() {
            for r in src.query(db, "SELECT n::text FROM t") {
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
    let spread = |addrs: &[String], want: &[usize], within: u64| {
        let at = Instant::now();
        wait_for(
            &format!("the sources spread {want:?}"),
            Duration::from_secs(within),
            || {
                let mut s = streaming(addrs);
                s.sort_unstable();
                (s == want).then_some(())
            },
        );
        at.elapsed()
    };

    // Three instances, started together: the sources spread 4/4/4.
    let mut daemons: Vec<Daemon> = (0..3)
        .map(|_| Daemon::start(&dest.url(&ddb), &map, &[]))
        .collect();
    let mut addrs: Vec<String> = daemons.iter().map(http::address).collect();
    spread(&addrs, &[4, 4, 4], 60);
    insert(1);
    support::converge("rows streamed by three instances", expected, actual);
    for a in &addrs {
        assert_eq!(http::get(a, "/readyz").0, 200, "{a}");
        let (_, body) = http::get(a, "/api/status");
        assert!(body.contains("\"live_instances\":3"), "{body}");
    }
    // Every instance names the same owner for each source: the one streaming it.
    let ids: Vec<String> = addrs.iter().map(|a| instance(a)).collect();
    wait_for(
        "one owner per source, seen alike",
        Duration::from_secs(10),
        || {
            let views: Vec<Vec<(String, String, String)>> =
                addrs.iter().map(|a| owners(a)).collect();
            let consistent = views.iter().all(|v| {
                v.len() == 12
                    && v.iter()
                        .zip(&views[0])
                        .all(|(a, b)| a.0 == b.0 && a.2 == b.2)
            });
            let owned_where_streamed = views.iter().zip(&ids).all(|(v, id)| {
                v.iter()
                    .all(|(_, state, owner)| (state == "streaming") == (owner == id))
            });
            (consistent && owned_where_streamed).then_some(())
        },
    );
    // `check` lists the instances and each source's owner (the counts as of their
    // coordination pass).
    let out = wait_for("check naming every owner", Duration::from_secs(10), || {
        let (code, out) = Daemon::check(&daemons[0].dir);
        let counted = ids
            .iter()
            .all(|id| out.contains(&format!("instance {id}: streams 4 source(s)")));
        (code == 0 && counted).then_some(out)
    });
    assert!(out.contains("instances: 3 running"), "{out}");
    assert_eq!(owned_lines(&out), 12, "{out}");

    // A fourth instance takes its share.
    daemons.push(Daemon::start(&dest.url(&ddb), &map, &[]));
    addrs.push(http::address(&daemons[3]));
    let moved = spread(&addrs, &[3, 3, 3, 3], 60);
    eprintln!("pg{version}: 3/3/3/3 {moved:.1?} after the fourth instance started");
    insert(2);
    support::converge("rows streamed by four instances", expected, actual);

    // One is killed under load: the other three stream all twelve within 15 s.
    std::thread::scope(|scope| {
        let load = scope.spawn(|| (100..160).for_each(insert));
        let before = actual().len();
        wait_for("the load's rows arriving", Duration::from_secs(30), || {
            (actual().len() > before).then_some(())
        });
        let killed = instance(&addrs.remove(0));
        daemons.remove(0).kill();
        let took = spread(&addrs, &[4, 4, 4], 15);
        let (_, out) = Daemon::check(&daemons[0].dir);
        assert!(out.contains(&format!("instance {killed}: gone")), "{out}");
        assert_eq!(owned_lines(&out), 12, "{out}");
        eprintln!("pg{version}: taken over {took:.1?} after the kill");
        load.join().expect("load");
    });
    support::converge("every row once after the kill", expected, actual);

    // A graceful stop hands its sources over.
    addrs.remove(0);
    let stopped = daemons.remove(0);
    let at = Instant::now();
    stopped.stop_ok();
    let handed = at.elapsed() + spread(&addrs, &[6, 6], 15);
    eprintln!("pg{version}: handed over {handed:.1?} after the stop began");
    insert(3);
    support::converge("every row once after the hand-over", expected, actual);
    for d in daemons {
        d.stop_ok();
    }
}

every_major! { share_and_take_over:
    share_and_take_over_pg12 => 12,
    share_and_take_over_pg13 => 13,
    share_and_take_over_pg14 => 14,
    share_and_take_over_pg15 => 15,
    share_and_take_over_pg16 => 16,
    share_and_take_over_pg17 => 17,
    share_and_take_over_pg18 => 18,
}

/// An instance whose coordination session is terminated on the destination stops its
/// sources at once, then takes them again with a new session; a key-less append target
/// ends with every source row exactly once.
#[test]
fn a_lost_coordination_session_stops_its_sources() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map, ddb) = append_family(src, dest, "s", 4, "ild");
    let daemons: Vec<Daemon> = (0..2)
        .map(|_| Daemon::start(&dest.url(&ddb), &map, &[]))
        .collect();
    let addrs: Vec<String> = daemons.iter().map(http::address).collect();
    wait_for("the sources spread 2/2", Duration::from_secs(60), || {
        (streaming(&addrs) == [2, 2]).then_some(())
    });
    let instance = instance(&addrs[0]);
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

/// Destination sessions of database `ddb` waiting for a lock on its table `t`.
fn waiting_on_t(dest: &support::Cluster, ddb: &str) -> usize {
    dest.query(
        ddb,
        "SELECT count(*)::text FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 't' AND NOT l.granted",
    )[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

/// Locks the destination's `t` in a transaction of the test's, then runs `write` (on
/// the source) and waits for a writer to be held inside its transaction by that lock:
/// the session holding it, to COMMIT when the test lets the writer go on.
fn hold_writer(dest: &support::Cluster, ddb: &str, write: impl FnOnce()) -> postgres::Client {
    let mut holder = dest.client(ddb);
    holder
        .batch_execute("BEGIN; LOCK TABLE t IN EXCLUSIVE MODE")
        .expect("lock t");
    write();
    wait_for(
        "a writer waiting for the lock",
        Duration::from_secs(30),
        || (waiting_on_t(dest, ddb) == 1).then_some(()),
    );
    holder
}

/// Instances whose sessions are marked on the destination (see
/// `pg::session::mark_instance`): one per live instance.
fn marked_instances(dest: &support::Cluster, ddb: &str) -> usize {
    dest.query(
        ddb,
        "SELECT count(DISTINCT objid)::text FROM pg_locks WHERE locktype = 'advisory' \
         AND objsubid = 2 AND classid = hashtext('kuvasz-streamer instance')::oid AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

/// The fenced transactions a daemon's `/metrics` counts, over its sources.
fn fenced(addr: &str) -> u64 {
    let (_, body) = http::get(addr, "/metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("kuvasz_source_failures_total{") && l.contains("class=\"fenced\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `(sid, n)` of every row of the sources' `t`, sorted, and of the target's.
fn append_rows(
    src: &support::Cluster,
    dbs: &[String],
    sid: &str,
    dest: &support::Cluster,
    ddb: &str,
) -> (support::Rows, support::Rows) {
    let mut expected: support::Rows = dbs
        .iter()
        .enumerate()
        .flat_map(|(i, db)| {
            src.query(db, "SELECT n::text FROM t")
                .into_iter()
                .map(move |r| vec![Some(format!("{sid}{i}")), r[0].clone()])
        })
        .collect();
    expected.sort();
    let actual = dest.query(
        ddb,
        "SELECT sid, n::text FROM t ORDER BY sid COLLATE \"C\", n::text COLLATE \"C\"",
    );
    (expected, actual)
}

/// An instance paused (SIGSTOP) with a transaction in flight on the destination loses
/// its source to another, and every destination session it had is ended (they are
/// marked as its own), not only its coordination session: nothing it holds keeps the new
/// owner waiting, and a key-less append target ends with every row once.
#[test]
fn a_paused_instance_has_its_sessions_ended() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map, ddb) = append_family(src, dest, "p", 1, "ipf");
    let a = Daemon::start(&dest.url(&ddb), &map, &[]);
    let addr_a = http::address(&a);
    wait_for("the source streaming", Duration::from_secs(60), || {
        (streaming(std::slice::from_ref(&addr_a)) == [1]).then_some(())
    });
    let expected = || append_rows(src, &dbs, "p", dest, &ddb).0;
    let actual = || append_rows(src, &dbs, "p", dest, &ddb).1;
    src.execute(
        &dbs[0],
        "INSERT INTO t SELECT g FROM generate_series(1, 10) g",
    );
    support::converge("the first rows", expected, actual);
    assert_eq!(marked_instances(dest, &ddb), 1);

    // A's writer is held inside its transaction by a lock, then A is frozen.
    let mut holder = hold_writer(dest, &ddb, || {
        src.execute(
            &dbs[0],
            "INSERT INTO t SELECT g FROM generate_series(11, 110) g",
        )
    });
    a.pause();
    let at = Instant::now();

    // B takes the source over: A's silent sessions are ended, then its silent walsender.
    let b = Daemon::start(&dest.url(&ddb), &map, &[]);
    let addr_b = http::address(&b);
    wait_for("B streaming the source", Duration::from_secs(90), || {
        (streaming(std::slice::from_ref(&addr_b)) == [1]).then_some(())
    });
    eprintln!("taken over {:.1?} after the pause", at.elapsed());
    // A's writer no longer waits: only B's sessions are left, B's writer waiting.
    wait_for(
        "only B's writer waiting for the lock",
        Duration::from_secs(30),
        || (marked_instances(dest, &ddb) == 1 && waiting_on_t(dest, &ddb) == 1).then_some(()),
    );
    holder.batch_execute("COMMIT").expect("unlock t");
    support::converge("every row once while A is frozen", expected, actual);

    a.unpause();
    wait_for(
        "A seeing the source elsewhere",
        Duration::from_secs(30),
        || {
            let (_, body) = http::get(&addr_a, "/api/status");
            body.contains("\"state\":\"elsewhere\"").then_some(())
        },
    );
    src.execute(&dbs[0], "INSERT INTO t VALUES (111)");
    support::converge("every row once after A is back", expected, actual);
    assert_eq!(streaming(&[addr_a.clone(), addr_b.clone()]), vec![0, 1]);
    assert_eq!(http::get(&addr_b, "/readyz").0, 200);
    assert_eq!(marked_instances(dest, &ddb), 2, "A's sessions are back");
    a.stop_ok();
    b.stop_ok();
}

/// An instance paused in the middle of a source's initial copy (its COPY open on the
/// destination, the rows so far written but not committed) holds a keyed target's
/// index entries, which another copy of the same rows would wait for as long as the
/// server keeps that session (the server neither times out a COPY in progress nor sees
/// a paused client). Its sessions are ended: the other instance copies the table again
/// and streams, and the target ends exactly equal to the source.
#[test]
fn a_paused_copy_holds_nothing_back() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map) = family(
        src,
        "c",
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
        "{}",
    );
    let ddb = unique_name("ipc");
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    // 1,000 rows at once, then 1,000 a second: the copy takes 4 s.
    let slow = ["sync_rate = 1000"];
    let a = Daemon::start(&dest.url(&ddb), &map, &slow);
    let addr_a = http::address(&a);
    // Past 2,000 rows: the server has written them (it buffers up to 1,000 per table).
    wait_for("A's copy half done", Duration::from_secs(60), || {
        let copied = dest.query(
            &ddb,
            "SELECT tuples_processed::text FROM pg_stat_progress_copy \
             WHERE datname = current_database()",
        );
        copied
            .first()
            .and_then(|r| r[0].as_deref()?.parse::<u64>().ok())
            .filter(|n| *n > 2_000)
    });
    a.pause();
    let at = Instant::now();
    let b = Daemon::start(&dest.url(&ddb), &map, &slow);
    let addr_b = http::address(&b);
    wait_for("B streaming the source", Duration::from_secs(120), || {
        (streaming(std::slice::from_ref(&addr_b)) == [1]).then_some(())
    });
    eprintln!("copied and streaming {:.1?} after the pause", at.elapsed());
    src.execute(
        &dbs[0],
        "INSERT INTO t SELECT g, 'late' FROM generate_series(5001, 5010) g; \
         UPDATE t SET v = 'changed' WHERE id <= 10",
    );
    let rows = "SELECT id::text, v FROM t ORDER BY id";
    support::converge(
        "the target equal to the source",
        || src.query(&dbs[0], rows),
        || dest.query(&ddb, rows),
    );
    a.unpause();
    wait_for(
        "A seeing the source elsewhere",
        Duration::from_secs(30),
        || {
            let (_, body) = http::get(&addr_a, "/api/status");
            body.contains("\"state\":\"elsewhere\"").then_some(())
        },
    );
    src.execute(&dbs[0], "DELETE FROM t WHERE id > 5000");
    support::converge(
        "the target equal to the source after A is back",
        || src.query(&dbs[0], rows),
        || dest.query(&ddb, rows),
    );
    a.stop_ok();
    b.stop_ok();
}

/// A writer's transaction checks, before it commits, that its instance still owns the
/// source with the epoch the source started with: here the owner epoch moves on (as a
/// take-over would move it) while the writer waits inside its transaction for a lock.
/// The transaction is fenced off (counted under `class="fenced"`), the instance, which
/// still holds the source's lock, takes it again with a fresh epoch, and the source
/// replays what was refused: every row once.
#[test]
fn a_stale_epoch_is_fenced_off() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (dbs, map, ddb) = append_family(src, dest, "f", 1, "iff");
    let a = Daemon::start(&dest.url(&ddb), &map, &[]);
    let addr = http::address(&a);
    let expected = || append_rows(src, &dbs, "f", dest, &ddb).0;
    let actual = || append_rows(src, &dbs, "f", dest, &ddb).1;
    src.execute(&dbs[0], "INSERT INTO t VALUES (1)");
    support::converge("the first row", expected, actual);
    let epoch = || {
        dest.query(&ddb, "SELECT epoch::text FROM kvsz_owners")[0][0]
            .clone()
            .unwrap_or_default()
    };
    assert_eq!(epoch(), "1");
    assert_eq!(fenced(&addr), 0);

    let mut holder = hold_writer(dest, &ddb, || {
        src.execute(
            &dbs[0],
            "INSERT INTO t SELECT g FROM generate_series(2, 101) g",
        )
    });
    dest.execute(&ddb, "UPDATE kvsz_owners SET epoch = epoch + 1");
    holder.batch_execute("COMMIT").expect("unlock t");
    wait_for(
        "the transaction fenced off",
        Duration::from_secs(30),
        || (fenced(&addr) == 1).then_some(()),
    );
    support::converge("every row once", expected, actual);
    wait_for("the source taken again", Duration::from_secs(30), || {
        let (_, body) = http::get(&addr, "/api/status");
        (epoch() == "3"
            && body.contains("\"epoch\":3")
            && streaming(std::slice::from_ref(&addr)) == [1])
        .then_some(())
    });
    src.execute(&dbs[0], "INSERT INTO t VALUES (102)");
    support::converge("every row once after", expected, actual);
    assert_eq!(fenced(&addr), 1);
    a.stop_ok();
}

/// SPEC §4's crash loop with three instances: four sources under the crash loop's
/// workload, and nine times the instance streaming the most sources is SIGKILLed, its
/// sources taken over by the other two, and it is started again. Every target (clone,
/// append, key-less, FULL, history) ends exactly equal to its source.
#[test]
fn crash_loop_with_three_instances() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("ic");
    let sids = ["a", "b", "c", "d"];
    let dbs: Vec<String> = sids
        .iter()
        .map(|sid| unique_name(&format!("ic{sid}")))
        .collect();
    for db in &dbs {
        src.create_database(db);
        src.execute(db, crash_load::SOURCE);
    }
    let ddb = unique_name("icd");
    dest.create_database(&ddb);
    dest.execute(&ddb, crash_load::TARGET);
    let urls: Vec<String> = dbs
        .iter()
        .zip(sids)
        .map(|(db, sid)| format!("{{ url = \"{}\", sid = \"{sid}\" }}", src.url(db)))
        .collect();
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {} ]\n[source.tables]\nacct = {{}}\n\
         ledger = {{ type = \"append\" }}\nevents = {{}}\nfullrows = {{}}\n\
         hist = {{ type = \"history\" }}\n",
        urls.join(", ")
    );
    let mut daemons: Vec<Daemon> = (0..3)
        .map(|_| Daemon::start(&dest.url(&ddb), &map, &["num_workers = 2"]))
        .collect();
    let mut addrs: Vec<String> = daemons.iter().map(http::address).collect();
    let all_streaming = |addrs: &[String]| streaming(addrs).iter().sum::<usize>() == 4;
    wait_for("every source streaming", Duration::from_secs(60), || {
        all_streaming(&addrs).then_some(())
    });
    let events = || -> i64 {
        dest.query(&ddb, "SELECT count(*)::text FROM events")[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let done = AtomicBool::new(false);
    let mut takeovers: Vec<Duration> = Vec::new();
    let txns: Vec<i64> = std::thread::scope(|s| {
        let sessions: Vec<_> = dbs
            .iter()
            .map(|db| s.spawn(|| crash_load::workload(src, db, &done)))
            .collect();
        for _ in 0..9 {
            let at_start = events();
            wait_for("rows arriving", Duration::from_secs(90), || {
                (events() >= at_start + 400).then_some(())
            });
            let counts = streaming(&addrs);
            let k = (0..3).max_by_key(|&i| counts[i]).expect("an instance");
            let mut d = daemons.remove(k);
            assert!(d.running(), "instance died on its own:\n{}", d.log());
            let dir = d.kill();
            let at = Instant::now();
            let others: Vec<String> = (0..3)
                .filter(|&i| i != k)
                .map(|i| addrs[i].clone())
                .collect();
            wait_for(
                "the others streaming every source",
                Duration::from_secs(15),
                || all_streaming(&others).then_some(()),
            );
            takeovers.push(at.elapsed());
            let again = Daemon::spawn(dir);
            addrs[k] = http::address(&again);
            daemons.insert(k, again);
        }
        let at_start = events();
        wait_for("rows arriving", Duration::from_secs(90), || {
            (events() >= at_start + 400).then_some(())
        });
        done.store(true, Ordering::Relaxed);
        sessions
            .into_iter()
            .map(|h| h.join().expect("workload thread"))
            .collect()
    });
    assert!(txns.iter().all(|&n| n > 50), "workload too small: {txns:?}");
    let mut compared = 0;
    for (db, sid) in dbs.iter().zip(sids) {
        wait_confirmed(src, db, &format!("kuvasz_{family}_{sid}"));
        compared += crash_load::compare(src, db, dest, &ddb, sid);
    }
    takeovers.sort();
    eprintln!(
        "crash loop, three instances: 9 SIGKILLs, take-over min {:.1?} median {:.1?} max {:.1?}; \
         {} transactions committed (per sid {txns:?}), {compared} grouped rows compared: \
         0 lost, 0 doubled",
        takeovers[0],
        takeovers[4],
        takeovers[8],
        txns.iter().sum::<i64>()
    );
    for d in daemons {
        d.stop_ok();
    }
}
