//! The walsender connection against real servers of every major version: authentication,
//! slot creation with an exported snapshot, streaming and decoding, standby status,
//! keepalives and server errors. Each test uses its own database and slots.

mod support;

use std::time::{Duration, Instant};

use kuvasz_streamer::pg::connect::Endpoint;
use kuvasz_streamer::pg::conninfo::ConnInfo;
use kuvasz_streamer::pg::pgoutput::{
    Decoder, OldKind, OldTuple, PgOutput, RelColumn, Relation, Tuple, TupleValue,
};
use kuvasz_streamer::pg::replication::{PgError, ReplicationConnection, ReplicationMessage};
use kuvasz_streamer::pg::Lsn;
use support::{literal, source, unique_name, wait_for, Cluster};

type Rows = Vec<Vec<Option<String>>>;

/// Generous bound for anything the server does asynchronously.
const PATIENCE: Duration = Duration::from_secs(30);
/// A password no role has; it must never appear in an error.
const WRONG_PASSWORD: &str = "Wr0ng-Secret-7f3a";
/// Type oids of `int4` and `text`.
const INT4_OID: u32 = 23;
const TEXT_OID: u32 = 25;

fn rows(values: &[&[Option<&str>]]) -> Rows {
    values
        .iter()
        .map(|r| r.iter().map(|v| v.map(str::to_owned)).collect())
        .collect()
}

fn connect(url: &str, application_name: &str) -> ReplicationConnection {
    let info = ConnInfo::parse(url).unwrap_or_else(|e| panic!("parse {url}: {e}"));
    Endpoint::new(info.clone(), application_name)
        .replication()
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// pgoutput's protocol version for a server major: streaming-capable 2 from 14 on.
fn proto_version(version: u32) -> u32 {
    if version >= 14 {
        2
    } else {
        1
    }
}

/// A fresh database with `t(id int primary key, v text)` owned by `kuvasz`, rows 1..=3 and
/// a publication of `t`; returns the publication's name.
fn prepare_database(c: &Cluster, db: &str) -> String {
    let publication = unique_name("pub");
    c.create_database(db);
    c.execute(
        db,
        &format!(
            "SET ROLE kuvasz;
             CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, 'three');
             CREATE PUBLICATION {publication} FOR TABLE t;"
        ),
    );
    publication
}

/// The slot's row in `pg_replication_slots`: plugin, slot_type, database, active.
fn slot_info(c: &Cluster, db: &str, slot: &str) -> Rows {
    c.query(
        db,
        &format!(
            "SELECT plugin, slot_type, database, active::text FROM pg_replication_slots
             WHERE slot_name = {}",
            literal(slot)
        ),
    )
}

fn confirmed_flush(c: &Cluster, db: &str, slot: &str) -> Lsn {
    let rows = c.query(
        db,
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = {}",
            literal(slot)
        ),
    );
    let text = rows
        .first()
        .and_then(|r| r[0].clone())
        .unwrap_or_else(|| panic!("slot {slot} has no confirmed_flush_lsn: {rows:?}"));
    text.parse()
        .unwrap_or_else(|e| panic!("slot {slot}: confirmed_flush_lsn: {e}"))
}

fn wait_inactive(c: &Cluster, db: &str, slot: &str) {
    let sql = format!(
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = {}",
        literal(slot)
    );
    wait_for(&format!("slot {slot} to become inactive"), PATIENCE, || {
        (c.query(db, &sql) == rows(&[&[Some("false")]])).then_some(())
    });
}

/// Drops an inactive slot and checks it is gone.
fn drop_slot(c: &Cluster, db: &str, slot: &str) {
    c.execute(
        db,
        &format!("SELECT pg_drop_replication_slot({})", literal(slot)),
    );
    assert_eq!(
        slot_info(c, db, slot),
        Rows::new(),
        "slot {slot} not dropped"
    );
}

/// Answers a keepalive that asks for a reply; a zero flush position confirms nothing.
fn answer(conn: &mut ReplicationConnection, reply_requested: bool) {
    if reply_requested {
        conn.send_standby_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, false)
            .unwrap_or_else(|e| panic!("standby status: {e}"));
    }
}

/// One decoded transaction of the stream.
#[derive(Debug)]
struct Txn {
    final_lsn: Lsn,
    xid: u32,
    /// Everything between Begin and Commit, Relation messages included.
    changes: Vec<PgOutput<'static>>,
    flags: u8,
    commit_lsn: Lsn,
    end_lsn: Lsn,
}

/// Reads the stream until `count` transactions with changes have arrived. Transactions
/// without any (servers before 15 send Begin/Commit for every transaction of the
/// database, autovacuum's included) are skipped.
fn read_transactions(
    conn: &mut ReplicationConnection,
    decoder: &mut Decoder,
    count: usize,
) -> Vec<Txn> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = Vec::new();
    let mut open: Option<Txn> = None;
    while done.len() < count {
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {count} transactions: {done:#?}, open: {open:#?}",
            done.len()
        );
        let msg = conn
            .recv(Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("recv: {e}"));
        let data = match msg {
            None => continue,
            Some(ReplicationMessage::Keepalive {
                reply_requested, ..
            }) => {
                answer(conn, reply_requested);
                continue;
            }
            Some(ReplicationMessage::XLogData { data, .. }) => data,
        };
        // Decoded messages borrow their bytes; the test keeps them to the end.
        let data: &'static [u8] = Box::leak(data.to_vec().into_boxed_slice());
        let decoded = decoder
            .decode(data)
            .unwrap_or_else(|e| panic!("decode {data:?}: {e}"));
        match decoded {
            PgOutput::Begin { final_lsn, xid, .. } => {
                assert!(open.is_none(), "Begin inside {open:?}");
                open = Some(Txn {
                    final_lsn,
                    xid,
                    changes: Vec::new(),
                    flags: 0,
                    commit_lsn: Lsn::ZERO,
                    end_lsn: Lsn::ZERO,
                });
            }
            PgOutput::Commit {
                flags,
                commit_lsn,
                end_lsn,
                ..
            } => {
                let mut txn = open.take().expect("Commit without Begin");
                txn.flags = flags;
                txn.commit_lsn = commit_lsn;
                txn.end_lsn = end_lsn;
                if !txn.changes.is_empty() {
                    done.push(txn);
                }
            }
            other => open
                .as_mut()
                .unwrap_or_else(|| panic!("{other:?} outside a transaction"))
                .changes
                .push(other),
        }
    }
    done
}

fn text(s: &str) -> TupleValue<'_> {
    TupleValue::Text(s)
}

// ---------------------------------------------------------------------------------------

/// SCRAM, MD5 and trust over TCP (and trust over the Unix socket) reach the database;
/// wrong or missing passwords fail without revealing the password.
fn authentication(version: u32) {
    let c = source(version);
    let db = unique_name("auth");
    c.create_database(&db);
    let system_id = c.query(
        &db,
        "SELECT system_identifier::text FROM pg_control_system()",
    )[0][0]
        .clone()
        .unwrap();

    let logins = [
        ("kuvasz", "SCRAM", c.url(&db)),
        ("kv_md5", "MD5", c.url_as("kv_md5", "kv_md5", &db)),
        (
            "kv_trust",
            "trust",
            format!("postgres://kv_trust@127.0.0.1:{}/{db}", c.port),
        ),
        (
            "kuvasz",
            "Unix socket",
            format!(
                "host={} port={} user=kuvasz dbname={db}",
                c.socket_dir.display(),
                c.port
            ),
        ),
    ];
    for (role, method, url) in logins {
        let app = unique_name("auth_app");
        let mut conn = connect(&url, &app);
        assert_eq!(
            conn.server_version_num() / 10000,
            version,
            "{method}: server_version_num {}",
            conn.server_version_num()
        );
        let id = conn
            .identify_system()
            .unwrap_or_else(|e| panic!("{method}: IDENTIFY_SYSTEM: {e}"));
        assert_eq!(id.dbname.as_deref(), Some(db.as_str()), "{method}: {id:?}");
        assert_ne!(id.xlogpos, Lsn::ZERO, "{method}: {id:?}");
        assert_eq!(id.system_id, system_id, "{method}: {id:?}");
        assert_eq!(id.timeline, 1, "{method}: {id:?}");
        // The session is a walsender of that role, named as asked.
        let session = c.query(
            &db,
            &format!(
                "SELECT usename::text, datname::text, backend_type FROM pg_stat_activity
                 WHERE application_name = {}",
                literal(&app)
            ),
        );
        assert_eq!(
            session,
            rows(&[&[Some(role), Some(db.as_str()), Some("walsender")]]),
            "{method}: session"
        );
        conn.finish()
            .unwrap_or_else(|e| panic!("{method}: finish: {e}"));
    }

    for (role, method) in [("kuvasz", "SCRAM"), ("kv_md5", "MD5")] {
        let info = ConnInfo::parse(&c.url_as(role, WRONG_PASSWORD, &db)).unwrap();
        let err = match Endpoint::new(info.clone(), "kvsz-test").replication() {
            Ok(_) => panic!("{method}: {role} connected with a wrong password"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Some("28P01"), "{method}: {err}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(
                !shown.contains(WRONG_PASSWORD),
                "{method}: the error reveals the password: {shown}"
            );
        }

        // No password at all (PGPASSWORD is ignored on purpose): refused on our side.
        let mut info =
            ConnInfo::parse(&format!("postgres://{role}@127.0.0.1:{}/{db}", c.port)).unwrap();
        info.password = None;
        match Endpoint::new(info.clone(), "kvsz-test").replication() {
            Err(PgError::Auth(_)) => {}
            Err(e) => panic!("{method} without password: expected an Auth error, got {e:?}"),
            Ok(_) => panic!("{method}: {role} connected without a password"),
        }
    }
    c.drop_database(&db);
}

/// The exported snapshot shows exactly the rows before the slot; the stream carries
/// exactly the changes after it; a standby status moves `confirmed_flush_lsn`.
fn slot_snapshot_and_streaming(version: u32) {
    let c = source(version);
    let db = unique_name("stream");
    let publication = prepare_database(c, &db);
    let slot = unique_name("slot");
    let mut conn = connect(&c.url(&db), "kvsz-test-stream");

    let created = conn
        .create_slot(&slot)
        .unwrap_or_else(|e| panic!("create slot: {e}"));
    assert_eq!(created.slot_name, slot);
    let snapshot = created
        .snapshot_name
        .clone()
        .expect("CREATE_REPLICATION_SLOT exported no snapshot");
    // The walsender releases the slot until START_REPLICATION.
    assert_eq!(
        slot_info(c, &db, &slot),
        rows(&[&[
            Some("pgoutput"),
            Some("logical"),
            Some(db.as_str()),
            Some("false")
        ]]),
        "slot {slot}"
    );
    assert_eq!(confirmed_flush(c, &db, &slot), created.consistent_point);

    // The snapshot stays valid until the walsender's next command.
    let mut reader = c.client(&db);
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
            literal(&snapshot)
        ))
        .unwrap_or_else(|e| panic!("import snapshot {snapshot}: {e}"));
    c.execute(&db, "INSERT INTO t VALUES (4, 'four')");
    let seen: Vec<(i32, Option<String>)> = reader
        .query("SELECT id, v FROM t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, Some("one".to_owned())),
            (2, Some("two".to_owned())),
            (3, Some("three".to_owned())),
        ],
        "rows in the exported snapshot"
    );
    reader.batch_execute("COMMIT").unwrap();
    assert_eq!(
        c.query(&db, "SELECT count(*)::text FROM t"),
        rows(&[&[Some("4")]])
    );

    conn.start_replication(
        &slot,
        created.consistent_point,
        &[publication.as_str()],
        proto_version(version),
        false,
        false,
    )
    .unwrap_or_else(|e| panic!("start replication: {e}"));
    assert_eq!(
        slot_info(c, &db, &slot)[0][3].as_deref(),
        Some("true"),
        "slot active while streaming"
    );

    let xid_rows = c.query(
        &db,
        "BEGIN;
         INSERT INTO t VALUES (5, 'it''s five'), (6, NULL);
         SELECT (txid_current() % 4294967296)::text;
         COMMIT",
    );
    let insert_xid: u32 = xid_rows[0][0].as_deref().unwrap().parse().unwrap();
    c.execute(&db, "UPDATE t SET v = 'uno' WHERE id = 1");
    c.execute(&db, "UPDATE t SET id = 30 WHERE id = 3");
    c.execute(&db, "DELETE FROM t WHERE id = 2");

    let rel: u32 = c.query(&db, "SELECT 't'::regclass::oid::text")[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    let relation = Relation {
        id: rel,
        namespace: "public".to_owned(),
        name: "t".to_owned(),
        replica_identity: b'd',
        columns: vec![
            RelColumn {
                is_key: true,
                name: "id".to_owned(),
                type_oid: INT4_OID,
                type_mod: -1,
            },
            RelColumn {
                is_key: false,
                name: "v".to_owned(),
                type_oid: TEXT_OID,
                type_mod: -1,
            },
        ],
    };
    let key = |id: &'static str| OldTuple {
        kind: OldKind::Key,
        tuple: Tuple(vec![text(id), TupleValue::Null]),
    };
    let expected = vec![
        vec![PgOutput::Insert {
            rel,
            new: Tuple(vec![text("4"), text("four")]),
        }],
        vec![
            PgOutput::Insert {
                rel,
                new: Tuple(vec![text("5"), text("it's five")]),
            },
            PgOutput::Insert {
                rel,
                new: Tuple(vec![text("6"), TupleValue::Null]),
            },
        ],
        vec![PgOutput::Update {
            rel,
            old: None,
            new: Tuple(vec![text("1"), text("uno")]),
        }],
        vec![PgOutput::Update {
            rel,
            old: Some(key("3")),
            new: Tuple(vec![text("30"), text("three")]),
        }],
        vec![PgOutput::Delete { rel, old: key("2") }],
    ];

    let mut decoder = Decoder::new();
    let txns = read_transactions(&mut conn, &mut decoder, expected.len());
    // The schema comes before the first change. The server may describe the table again
    // after a cache invalidation, so later identical Relation messages are allowed.
    assert_eq!(
        txns[0].changes.first(),
        Some(&PgOutput::Relation(relation.clone())),
        "first transaction: {:#?}",
        txns[0]
    );
    let changes: Vec<Vec<PgOutput>> = txns
        .iter()
        .map(|t| {
            t.changes
                .iter()
                .filter(|m| !matches!(m, PgOutput::Relation(r) if *r == relation))
                .cloned()
                .collect()
        })
        .collect();
    assert_eq!(changes, expected, "transactions: {txns:#?}");
    assert_eq!(txns[1].xid, insert_xid, "xid of the second transaction");

    let mut previous_end = created.consistent_point;
    for txn in &txns {
        assert_eq!(txn.final_lsn, txn.commit_lsn, "{txn:?}");
        assert_eq!(txn.flags, 0, "{txn:?}");
        assert!(txn.commit_lsn >= previous_end, "out of order: {txns:#?}");
        assert!(txn.end_lsn > txn.commit_lsn, "{txn:?}");
        previous_end = txn.end_lsn;
    }

    let last = txns.last().unwrap().end_lsn;
    conn.send_standby_status(last, last, last, false)
        .unwrap_or_else(|e| panic!("standby status: {e}"));
    wait_for(
        &format!("confirmed_flush_lsn of {slot} to reach {last}"),
        PATIENCE,
        || (confirmed_flush(c, &db, &slot) == last).then_some(()),
    );

    conn.finish().unwrap_or_else(|e| panic!("finish: {e}"));
    wait_inactive(c, &db, &slot);
    assert_eq!(confirmed_flush(c, &db, &slot), last);
    drop_slot(c, &db, &slot);
    c.drop_database(&db);
}

/// Receives until a Keepalive whose WAL end satisfies `wanted`, asking the server for one
/// (a standby status with reply requested) at least every second.
fn await_keepalive(
    conn: &mut ReplicationConnection,
    what: &str,
    wanted: impl Fn(Lsn) -> bool,
) -> Lsn {
    let deadline = Instant::now() + PATIENCE;
    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no keepalive {what} within {PATIENCE:?}; keepalive WAL ends seen: {seen:?}"
        );
        conn.send_standby_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, true)
            .unwrap_or_else(|e| panic!("standby status: {e}"));
        let round = Instant::now() + Duration::from_secs(1);
        while Instant::now() < round {
            match conn.recv(Duration::from_millis(200)) {
                Err(e) => panic!("recv: {e}"),
                Ok(None) => {}
                Ok(Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                })) => {
                    answer(conn, reply_requested);
                    if wanted(wal_end) {
                        return wal_end;
                    }
                    seen.push(wal_end);
                }
                // Only empty transactions (before 15) can come: nothing is changed.
                Ok(Some(ReplicationMessage::XLogData { data, .. })) => {
                    match decoder.decode(&data) {
                        Ok(PgOutput::Begin { .. } | PgOutput::Commit { .. }) => {}
                        other => panic!("unexpected stream message {other:?}"),
                    }
                }
            }
        }
    }
}

/// With no changes to send, the server answers a reply request with a keepalive, and
/// reports WAL written elsewhere as its position advances.
fn keepalive(version: u32) {
    let c = source(version);
    let db = unique_name("keepalive");
    let publication = prepare_database(c, &db);
    let slot = unique_name("slot");
    let mut conn = connect(&c.url(&db), "kvsz-test-keepalive");
    let created = conn
        .create_slot(&slot)
        .unwrap_or_else(|e| panic!("create slot: {e}"));
    conn.start_replication(
        &slot,
        created.consistent_point,
        &[publication.as_str()],
        proto_version(version),
        false,
        false,
    )
    .unwrap_or_else(|e| panic!("start replication: {e}"));

    let start = created.consistent_point;
    let first = await_keepalive(&mut conn, &format!("at or past {start}"), |end| {
        end >= start
    });

    // WAL from another database: nothing to decode, but the walsender reads past it.
    // The commit is flushed at once, so the server may send it.
    let rows = c.query(
        "postgres",
        "SET synchronous_commit = on;
         SELECT txid_current();
         SELECT pg_current_wal_insert_lsn()::text",
    );
    let target: Lsn = rows
        .last()
        .and_then(|r| r[0].as_deref())
        .unwrap()
        .parse()
        .unwrap();
    assert!(target >= first, "WAL went backwards: {target} < {first}");
    let advanced = await_keepalive(&mut conn, &format!("past {target}"), |end| end > target);
    assert!(advanced > first, "{advanced} after {first}");

    conn.finish().unwrap_or_else(|e| panic!("finish: {e}"));
    wait_inactive(c, &db, &slot);
    // Nothing was confirmed: a zero flush position is ignored.
    assert_eq!(confirmed_flush(c, &db, &slot), created.consistent_point);
    drop_slot(c, &db, &slot);
    c.drop_database(&db);
}

fn expect_code(result: Result<(), PgError>, code: &str, what: &str) {
    match result {
        Ok(()) => panic!("{what}: succeeded, expected SQLSTATE {code}"),
        Err(e) => assert_eq!(e.code(), Some(code), "{what}: {e}"),
    }
}

/// Server errors carry their SQLSTATE and leave the connection usable.
fn errors(version: u32) {
    let c = source(version);
    let db = unique_name("errors");
    let publication = prepare_database(c, &db);
    let slot = unique_name("slot");
    let mut conn = connect(&c.url(&db), "kvsz-test-errors");

    let missing = unique_name("missing");
    expect_code(
        conn.start_replication(
            &missing,
            Lsn::ZERO,
            &[publication.as_str()],
            proto_version(version),
            false,
            false,
        ),
        "42704",
        "START_REPLICATION of a missing slot",
    );
    conn.identify_system()
        .unwrap_or_else(|e| panic!("connection unusable after 42704: {e}"));

    let created = conn
        .create_slot(&slot)
        .unwrap_or_else(|e| panic!("create slot: {e}"));
    expect_code(
        conn.create_slot(&slot).map(|_| ()),
        "42710",
        "CREATE_REPLICATION_SLOT of a name in use",
    );
    conn.identify_system()
        .unwrap_or_else(|e| panic!("connection unusable after 42710: {e}"));

    // A slot streams to one connection at a time.
    conn.start_replication(
        &slot,
        created.consistent_point,
        &[publication.as_str()],
        proto_version(version),
        false,
        false,
    )
    .unwrap_or_else(|e| panic!("start replication: {e}"));
    let mut second = connect(&c.url(&db), "kvsz-test-errors-2");
    expect_code(
        second.start_replication(
            &slot,
            created.consistent_point,
            &[publication.as_str()],
            proto_version(version),
            false,
            false,
        ),
        "55006",
        "START_REPLICATION of an active slot",
    );
    second.finish().unwrap_or_else(|e| panic!("finish: {e}"));
    conn.finish().unwrap_or_else(|e| panic!("finish: {e}"));

    wait_inactive(c, &db, &slot);
    drop_slot(c, &db, &slot);
    c.drop_database(&db);
}

macro_rules! per_version {
    ($($module:ident => $v:expr),* $(,)?) => {
        $(
            mod $module {
                per_version!(@tests $v; authentication, slot_snapshot_and_streaming, keepalive, errors);
            }
        )*
    };
    (@tests $v:expr; $($test:ident),*) => {
        $(
            #[test]
            fn $test() {
                super::$test($v);
            }
        )*
    };
}

per_version! {
    pg12 => 12,
    pg13 => 13,
    pg14 => 14,
    pg15 => 15,
    pg16 => 16,
    pg17 => 17,
    pg18 => 18,
}
