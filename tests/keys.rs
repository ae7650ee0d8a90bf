//! Keys of any type (SPEC §4): composite, array, enum, range, domain, citext and numeric
//! keys, and their key changes, on four writers, end equal to the source, in clone and
//! history targets. Keys that are equal on the destination but differ as text (citext
//! 'Abc' and 'abc', numeric 1.0 and 1.00) are one key: a key change between them must
//! not lose the row or its versions, however the writers commit.

mod support;

use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_confirmed, Cluster, Rows};

/// Types and extensions both sides need.
const TYPES: &str = "CREATE TYPE pair AS (a int, b text); \
     CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); \
     CREATE DOMAIN posint AS int CHECK (VALUE > 0);";

/// The key type of each table.
const TABLES: [(&str, &str); 8] = [
    ("k_comp", "pair"),
    ("k_arr", "int[]"),
    ("k_enum", "mood"),
    ("k_range", "int4range"),
    ("k_dom", "posint"),
    ("k_ci", "citext"),
    ("k_num", "numeric"),
    ("k_multi", "citext"),
];

fn source_ddl() -> String {
    let mut s = format!("SET ROLE kuvasz; {TYPES}");
    for (t, ty) in TABLES {
        if t == "k_multi" {
            // A two-column key: one loose (citext), one exact.
            s.push_str(&format!(
                "CREATE TABLE {t} (k {ty}, n int, v text, big text, PRIMARY KEY (k, n)); "
            ));
        } else {
            s.push_str(&format!(
                "CREATE TABLE {t} (k {ty} PRIMARY KEY, v text, big text); "
            ));
        }
        s.push_str(&format!("ALTER TABLE {t} ALTER big SET STORAGE EXTERNAL; "));
    }
    s
}

fn target_ddl() -> String {
    let mut s = format!("SET ROLE kuvasz; {TYPES}");
    // The history targets of the second family: every version, no key.
    for (t, ty) in TABLES {
        let n = if t == "k_multi" { "n int, " } else { "" };
        s.push_str(&format!(
            "CREATE TABLE h{} (sid text, k {ty}, {n}v text, big text, kvsz_start timestamptz, \
             kvsz_end timestamptz, kvsz_deleted boolean); ",
            &t[1..]
        ));
    }
    for (t, ty) in TABLES {
        if t == "k_multi" {
            s.push_str(&format!(
                "CREATE TABLE {t} (sid text, k {ty}, n int, v text, big text, PRIMARY KEY (sid, k, n)); "
            ));
        } else {
            s.push_str(&format!(
                "CREATE TABLE {t} (sid text, k {ty}, v text, big text, PRIMARY KEY (sid, k)); "
            ));
        }
    }
    s
}

/// `(key literal before, key literal after)` of each table's rows: the first rows change
/// key to an equal-on-the-destination value where the type has one.
fn keys(table: &str, i: usize) -> (String, String) {
    match table {
        "k_comp" => (
            format!("'({i},x)'::pair"),
            format!("'({},y)'::pair", i + 1000),
        ),
        "k_arr" => (format!("'{{{i},1}}'"), format!("'{{{i},2,3}}'")),
        "k_enum" => {
            let m = ["sad", "ok", "happy"];
            (format!("'{}'", m[i % 3]), format!("'{}'", m[(i + 1) % 3]))
        }
        "k_range" => (
            format!("'[{i},{})'", i + 1),
            format!("'[{},{})'", i + 1000, i + 1002),
        ),
        "k_dom" => (format!("{}", i + 1), format!("{}", i + 1001)),
        "k_ci" | "k_multi" if i.is_multiple_of(2) => (format!("'Key{i}'"), format!("'KEY{i}'")),
        "k_ci" | "k_multi" => (format!("'Key{i}'"), format!("'other{i}'")),
        "k_num" if i.is_multiple_of(2) => (format!("{i}.0"), format!("{i}.00")),
        _ => (format!("{i}"), format!("{}", i + 1000)),
    }
}

/// How many rows each table gets (an enum has three values).
fn rows_of(table: &str) -> usize {
    if table == "k_enum" {
        1
    } else {
        60
    }
}

fn insert_sql(table: &str, key: &str, i: usize) -> String {
    let cols = if table == "k_multi" {
        format!("{key}, 7")
    } else {
        key.to_string()
    };
    // `big` is over 2 kB of incompressible text: stored out of line, so an UPDATE that
    // does not touch it sends it as "unchanged".
    format!(
        "INSERT INTO {table} VALUES ({cols}, 'v{i}', (SELECT string_agg(md5(g::text || '{i}'), '') \
         FROM generate_series(1, 80) g))"
    )
}

fn contents(c: &Cluster, db: &str, table: &str, filter: &str) -> Rows {
    c.query(
        db,
        &format!("SELECT k::text, v, md5(big) FROM {table}{filter} ORDER BY k::text COLLATE \"C\""),
    )
}

/// Every key type changes keys while four writers apply: as plain updates of whole
/// rows (a DELETE and an INSERT), as key changes leaving the TOASTed column unchanged
/// (a move in place), and between keys the destination takes for equal.
fn keys_of_any_type(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("ky"), unique_name("kyd"), unique_name("ky"));
    for (c, d) in [(src, &db), (dest, &ddb)] {
        c.create_database(d);
        c.execute(d, "CREATE EXTENSION citext");
    }
    src.execute(&db, &source_ddl());
    dest.execute(&ddb, &target_ddl());
    // Rows copied at start, half of them.
    let mut sql = String::new();
    for (t, _) in TABLES {
        for i in 0..rows_of(t) / 2 {
            sql.push_str(&insert_sql(t, &keys(t, i).0, i));
            sql.push_str("; ");
        }
    }
    src.execute(&db, &sql);
    let mut tables = String::new();
    for (t, _) in TABLES {
        tables.push_str(&format!("{t} = {{}}\n"));
    }
    let mut history = String::new();
    for (t, _) in TABLES {
        history.push_str(&format!(
            "{t} = {{ type = \"history\", target = \"h{}\" }}\n",
            &t[1..]
        ));
    }
    // The same tables into history targets, through a second family (slot).
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\n{tables}\
         [[source]]\ndatabase = \"{family}h\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\n{history}",
        src.url(&db),
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 4"]);
    daemon.wait_streaming(2);
    // The other half streamed, then every key changes in one transaction: a third as a
    // whole-row update, a third leaving `big` unchanged, a third back and forth.
    let mut sql = String::from("BEGIN; ");
    for (t, _) in TABLES {
        for i in rows_of(t) / 2..rows_of(t) {
            sql.push_str(&insert_sql(t, &keys(t, i).0, i));
            sql.push_str("; ");
        }
    }
    sql.push_str("COMMIT");
    src.execute(&db, &sql);
    let mut sql = String::from("BEGIN; ");
    for (t, _) in TABLES {
        for i in 0..rows_of(t) {
            let (old, new) = keys(t, i);
            let set = match i % 3 {
                0 => format!("k = {new}, v = 'moved{i}', big = big || 'x'"),
                _ => format!("k = {new}"),
            };
            sql.push_str(&format!("UPDATE {t} SET {set} WHERE k = {old}; "));
            if i % 3 == 2 {
                sql.push_str(&format!("UPDATE {t} SET k = {old} WHERE k = {new}; "));
            }
        }
    }
    sql.push_str("COMMIT");
    src.execute(&db, &sql);
    // And a quarter of the rows deleted.
    let mut sql = String::from("BEGIN; ");
    for (t, _) in TABLES {
        for i in (0..rows_of(t)).step_by(4) {
            let (old, new) = keys(t, i);
            let k = if i % 3 == 2 { old } else { new };
            sql.push_str(&format!("DELETE FROM {t} WHERE k = {k}; "));
        }
    }
    sql.push_str("COMMIT");
    src.execute(&db, &sql);
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));
    wait_confirmed(src, &db, &format!("kuvasz_{family}h_s"));
    let mut wrong = Vec::new();
    for (t, _) in TABLES {
        let expected = contents(src, &db, t, "");
        assert_eq!(expected.len(), rows_of(t) - rows_of(t).div_ceil(4), "{t}");
        let actual = contents(dest, &ddb, t, " WHERE sid = 's'");
        if actual != expected {
            wrong.push(format!(
                "{t}:\n  source: {expected:?}\n  target: {actual:?}"
            ));
        }
        let h = format!("h{}", &t[1..]);
        let current = contents(
            dest,
            &ddb,
            &h,
            " WHERE sid = 's' AND kvsz_end > '9000-01-01' AND NOT kvsz_deleted",
        );
        if current != expected {
            wrong.push(format!(
                "{h} (current versions):\n  source: {expected:?}\n  target: {current:?}"
            ));
        }
        // Every key changed once or twice (and a quarter were deleted): no version is
        // open twice, none was lost.
        let versions = dest.query(
            &ddb,
            &format!("SELECT count(*) FILTER (WHERE kvsz_end > '9000-01-01'), count(*) FROM {h}"),
        );
        let n = rows_of(t);
        let changes = n + (0..n).filter(|i| i % 3 == 2).count();
        let counts = vec![vec![
            Some((n - n.div_ceil(4)).to_string()),
            Some((n + changes).to_string()),
        ]];
        if versions != counts {
            wrong.push(format!(
                "{h}: (open, all) versions {versions:?}, expected {counts:?}"
            ));
        }
        if matches!(t, "k_ci" | "k_multi") {
            // A key respelt ('Key4' → 'KEY4') is one row on the destination: its version
            // closes as updated, never as deleted.
            let n_join = if t == "k_multi" { " AND a.n = b.n" } else { "" };
            let respelt = dest.query(
                &ddb,
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE a.kvsz_deleted) FROM {h} a \
                     JOIN {h} b ON a.sid = b.sid AND a.k = b.k{n_join} \
                     AND a.kvsz_end = b.kvsz_start AND a.k::text <> b.k::text"
                ),
            );
            let spelt: usize = (0..n)
                .filter(|i| i % 2 == 0)
                .map(|i| if i % 3 == 2 { 2 } else { 1 })
                .sum();
            let want = vec![vec![Some(spelt.to_string()), Some("0".to_string())]];
            if respelt != want {
                wrong.push(format!(
                    "{h}: (respelt, closed as deleted) {respelt:?}, expected {want:?}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    daemon.stop_ok();
}

every_major! { keys_of_any_type:
    keys_of_any_type_pg12 => 12,
    keys_of_any_type_pg18 => 18,
}

/// REPLICA IDENTITY FULL, whose key is the whole row: an UPDATE that leaves a TOASTed
/// value unchanged is an ordinary update (the server sends the whole old row), and a
/// `set` column computed from a column the target lacks follows every UPDATE, of
/// duplicate rows too.
fn full_identity_follows_toast_and_set(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("fi"), unique_name("fid"), unique_name("fi"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE f (a int, b text, hidden int, big text); \
         ALTER TABLE f REPLICA IDENTITY FULL; ALTER TABLE f ALTER big SET STORAGE EXTERNAL; \
         INSERT INTO f SELECT a, 'x', 10, (SELECT string_agg(md5(g::text || a), '') \
           FROM generate_series(1, 80) g) FROM (VALUES (1), (1), (2)) v(a)",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE f (a int, b text, big text, label text)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nf = {{ set = {{ label = \"'h' + string(hidden)\" }} }}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 4"]);
    daemon.wait_streaming(1);
    src.execute(
        &db,
        "UPDATE f SET hidden = 11 WHERE a = 2; \
         UPDATE f SET hidden = 12 WHERE ctid = (SELECT ctid FROM f WHERE a = 1 LIMIT 1); \
         UPDATE f SET b = 'y' WHERE a = 2; \
         INSERT INTO f SELECT 3, b, 13, big FROM f WHERE a = 2; \
         UPDATE f SET hidden = 14, b = 'z' WHERE a = 3",
    );
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));
    let rows = |c: &Cluster, d: &str, label: &str| {
        c.query(
            d,
            &format!(
                "SELECT a::text, b, md5(big), {label} FROM f ORDER BY a, b COLLATE \"C\", 3, 4"
            ),
        )
    };
    let expected = rows(src, &db, "'h' || hidden");
    assert_eq!(expected.len(), 4);
    assert_eq!(rows(dest, &ddb, "label"), expected);
    daemon.stop_ok();
}

every_major! { full_identity_follows_toast_and_set:
    full_identity_follows_toast_and_set_pg12 => 12,
    full_identity_follows_toast_and_set_pg18 => 18,
}
