//! Source databases in an encoding other than UTF-8 (SPEC §4). LATIN1 and EUC_JP text is
//! converted to UTF-8 by the source server (the daemon asks for UTF8 on every session),
//! in the copy and in the stream alike. A SQL_ASCII database declares no encoding at all:
//! its bytes are taken as UTF-8, and a value that is not valid UTF-8 is a rejected row
//! (`on_error`), reported with its table, key and column — never a wedged source, and the
//! rest of its transaction still lands.

mod support;

use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_confirmed, Cluster, Rows};

/// Creates database `name` in `encoding` (C locale, so any encoding is allowed), owned
/// by kuvasz like the other test databases.
fn create_encoded(c: &Cluster, name: &str, encoding: &str) {
    c.drop_database(name);
    c.execute(
        "postgres",
        &format!(
            "CREATE DATABASE \"{name}\" OWNER kuvasz ENCODING '{encoding}' \
             LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ),
    );
    c.execute(name, "ALTER SCHEMA public OWNER TO kuvasz");
}

const TABLE: &str = "SET ROLE kuvasz; CREATE TABLE words (k text PRIMARY KEY, v text, n int)";

/// Text only the source's encoding and UTF-8 both have, per encoding: keys and values.
fn words(encoding: &str) -> [&'static str; 4] {
    match encoding {
        "LATIN1" => ["café", "naïve", "Ångström", "ÿ£§"],
        _ => ["日本語", "カタカナ", "ひらがな", "漢字"],
    }
}

fn rows(c: &Cluster, db: &str, table: &str, filter: &str) -> Rows {
    c.query(
        db,
        &format!("SELECT k, v, n::text FROM {table}{filter} ORDER BY k COLLATE \"C\""),
    )
}

/// LATIN1 and EUC_JP sources into one UTF-8 target: copied rows, then streamed
/// inserts, updates, key changes and deletes of non-ASCII keys and values, end equal.
fn converted(version: u32) {
    let src = source(version);
    let dest = destination();
    let family = unique_name("enc");
    let ddb = unique_name("encd");
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE words (sid text, k text, v text, n int, PRIMARY KEY (sid, k))",
    );
    let encodings = ["LATIN1", "EUC_JP"];
    let dbs: Vec<String> = encodings.iter().map(|_| unique_name("enc")).collect();
    for (db, enc) in dbs.iter().zip(encodings) {
        create_encoded(src, db, enc);
        src.execute(db, TABLE);
        let w = words(enc);
        src.execute(
            db,
            &format!(
                "INSERT INTO words VALUES ('{}', '{} {}', 1), ('{}', '{}', 2)",
                w[0], w[1], w[2], w[1], w[3]
            ),
        );
    }
    let urls: Vec<String> = dbs
        .iter()
        .zip(encodings)
        .map(|(db, enc)| {
            format!(
                "{{ url = \"{}\", sid = \"{}\" }}",
                src.url(db),
                enc.to_lowercase()
            )
        })
        .collect();
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {} ]\n[source.tables]\nwords = {{}}\n",
        urls.join(", ")
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &["num_workers = 2"]);
    daemon.wait_streaming(2);
    for (db, enc) in dbs.iter().zip(encodings) {
        let w = words(enc);
        src.execute(
            db,
            &format!(
                "BEGIN; INSERT INTO words VALUES ('{k}', '{v}', 3); \
                 UPDATE words SET v = v || '{v}' WHERE k = '{a}'; \
                 UPDATE words SET k = '{k}{k}' WHERE k = '{b}'; COMMIT; \
                 INSERT INTO words VALUES ('x{v}', 'gone', 4); DELETE FROM words WHERE k = 'x{v}'",
                k = w[2],
                v = w[3],
                a = w[0],
                b = w[1],
            ),
        );
    }
    for (db, enc) in dbs.iter().zip(encodings) {
        wait_confirmed(src, db, &format!("kuvasz_{family}_{}", enc.to_lowercase()));
        let expected = rows(src, db, "words", "");
        assert_eq!(expected.len(), 3, "{enc}: {expected:?}");
        let actual = rows(
            dest,
            &ddb,
            "words",
            &format!(" WHERE sid = '{}'", enc.to_lowercase()),
        );
        assert_eq!(actual, expected, "{enc}");
    }
    let dir = daemon.stop_ok();
    let (code, report) = Daemon::check(&dir);
    assert_eq!(code, 0, "{report}");
    for enc in encodings {
        assert!(
            report.contains(&format!(
                "  encoding {enc}: converted to UTF-8 by the source"
            )),
            "{report}"
        );
    }
}

every_major! { converted:
    converted_pg12 => 12,
    converted_pg18 => 18,
}

/// A SQL_ASCII value made of `hex` bytes (the source keeps them as they are).
fn raw(hex: &str) -> String {
    format!("convert_from('\\x{hex}'::bytea, 'SQL_ASCII')")
}

/// Latin-1 'é' alone: not UTF-8.
const BAD: &str = "e9";
/// 'café' in UTF-8: fine.
const CAFE_UTF8: &str = "636166c3a9";

/// A SQL_ASCII source with Latin-1 bytes in some rows, `on_error = deadletter`: the copy
/// and the stream set those rows aside with the column that held the bytes, and
/// everything else — valid UTF-8 bytes included — lands.
fn sql_ascii_rejects(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("asc"), unique_name("ascd"), unique_name("asc"));
    create_encoded(src, &db, "SQL_ASCII");
    src.execute(&db, TABLE);
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE words (sid text, k text, v text, n int, PRIMARY KEY (sid, k))",
    );
    // Copied: two good rows (one of them UTF-8 'café'), one bad value.
    src.execute(
        &db,
        &format!(
            "INSERT INTO words VALUES ('a', {}, 1), ('b', 'plain', 2), ('c', {}, 3)",
            raw(CAFE_UTF8),
            raw(BAD)
        ),
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"s\" }} ]\n\
         [source.tables]\nwords = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(
        &dest.url(&ddb),
        &map,
        &["num_workers = 2", "on_error = \"deadletter\""],
    );
    daemon.wait_streaming(1);
    // Streamed: one transaction with a good insert, a bad insert (bad key), a good update
    // and a bad update; then a later good insert.
    src.execute(
        &db,
        &format!(
            "BEGIN; INSERT INTO words VALUES ('d', {cafe}, 4); \
             INSERT INTO words VALUES ({bad}, 'bad key', 5); \
             UPDATE words SET n = 20 WHERE k = 'b'; \
             UPDATE words SET v = {bad} WHERE k = 'a'; COMMIT; \
             INSERT INTO words VALUES ('e', 'later', 6)",
            cafe = raw(CAFE_UTF8),
            bad = raw(BAD)
        ),
    );
    wait_confirmed(src, &db, &format!("kuvasz_{family}_s"));
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows(dest, &ddb, "words", ""),
        vec![
            vec![s("a"), s("café"), s("1")],
            vec![s("b"), s("plain"), s("20")],
            vec![s("d"), s("café"), s("4")],
            vec![s("e"), s("later"), s("6")],
        ]
    );
    // Each set-aside row names its column and its bytes.
    let dead = dest.query(
        &ddb,
        "SELECT op, row->>'n', error FROM kvsz_deadletter ORDER BY lsn, op",
    );
    let summary: Vec<(Option<String>, Option<String>)> =
        dead.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(
        summary,
        vec![
            (s("COPY"), s("3")),
            (s("INSERT"), s("5")),
            (s("UPDATE"), s("1")),
        ],
        "{dead:?}"
    );
    for r in &dead {
        let error = r[2].as_deref().unwrap_or("");
        assert!(
            error.contains("not valid UTF-8") && error.contains("0xe9"),
            "{error}"
        );
    }
    let dir = daemon.stop_ok();
    let (code, report) = Daemon::check(&dir);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("warning: encoding SQL_ASCII: values are taken as UTF-8"),
        "{report}"
    );
}

every_major! { sql_ascii_rejects:
    sql_ascii_rejects_pg12 => 12,
    sql_ascii_rejects_pg18 => 18,
}
