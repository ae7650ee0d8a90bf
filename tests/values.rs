//! Exact values end to end: a column of (nearly) every built-in type, composite, enum and
//! domain types, a three-column key of char, numeric and text, and edge-case values,
//! through initial copy, streamed inserts, updates, key changes and deletes. Source and
//! destination are compared as text. Also REPLICA IDENTITY FULL with duplicate rows.

mod support;

use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::{destination, source, unique_name};

type Rows = Vec<Vec<Option<String>>>;

/// The newest source major under test.
fn newest() -> u32 {
    *support::versions().last().expect("a version")
}

/// Session settings that fix the text form of the compared values, the same on both sides.
const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; \
                       SET IntervalStyle = 'postgres'; SET extra_float_digits = 1;";

/// Waits until `actual` equals `expected` (re-read every time); panics with both if they
/// still differ after 60 s.
fn converge(what: &str, expected: impl Fn() -> Rows, actual: impl Fn() -> Rows) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let (e, a) = (expected(), actual());
        if e == a {
            return;
        }
        if Instant::now() > until {
            panic!(
                "{what}: destination never matched the source\nexpected ({} rows):\n{}\nactual ({} rows):\n{}",
                e.len(),
                show(&e),
                a.len(),
                show(&a)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One row a line, long values shortened.
fn show(rows: &Rows) -> String {
    let short = |v: &Option<String>| match v {
        Some(s) if s.chars().count() > 120 => {
            format!(
                "<{} chars: {:?}…>",
                s.len(),
                s.chars().take(40).collect::<String>()
            )
        }
        v => format!("{v:?}"),
    };
    rows.iter()
        .map(|r| format!("  [{}]", r.iter().map(short).collect::<Vec<_>>().join(", ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Non-key columns of `vals`: name and type.
const N: usize = 45;
const COLUMNS: [(&str, &str); N] = [
    ("c_int8", "bigint"),
    ("c_serial", "bigserial"),
    ("c_bit", "bit(5)"),
    ("c_varbit", "varbit"),
    ("c_bool", "boolean"),
    ("c_box", "box"),
    ("c_bytea", "bytea"),
    ("c_char", "char(3)"),
    ("c_varchar", "varchar(5)"),
    ("c_cidr", "cidr"),
    ("c_circle", "circle"),
    ("c_date", "date"),
    ("c_float8", "double precision"),
    ("c_inet", "inet"),
    ("c_int4", "integer"),
    ("c_interval", "interval"),
    ("c_json", "json"),
    ("c_jsonb", "jsonb"),
    ("c_line", "line"),
    ("c_lseg", "lseg"),
    ("c_macaddr", "macaddr"),
    ("c_macaddr8", "macaddr8"),
    ("c_money", "money"),
    ("c_numeric", "numeric(12,3)"),
    ("c_path", "path"),
    ("c_lsn", "pg_lsn"),
    ("c_point", "point"),
    ("c_polygon", "polygon"),
    ("c_real", "real"),
    ("c_int2", "smallint"),
    ("c_text", "text"),
    ("c_time", "time"),
    ("c_timetz", "timetz"),
    ("c_ts", "timestamp(3)"),
    ("c_tstz", "timestamptz"),
    ("c_tsquery", "tsquery"),
    ("c_tsvector", "tsvector"),
    ("c_uuid", "uuid"),
    ("c_xml", "xml"),
    ("c_int_arr", "integer[]"),
    ("c_text_arr", "text[]"),
    ("c_char_arr", "char(3)[]"),
    ("c_pair", "pair"),
    ("c_mood", "mood"),
    ("c_code", "code4"),
];

/// SQL literals for every column of [`COLUMNS`], in order.
type Values = [&'static str; N];

const NULLS: Values = ["NULL"; N];

const FULL: Values = [
    "9223372036854775807",
    "1",
    "B'10101'",
    "B'1101'",
    "true",
    "'((1,2),(3,4))'",
    r"'\x00ff5c27'",
    "'xyz'",
    "'hello'",
    "'10.1.0.0/16'",
    "'<(1,2),3>'",
    "'2024-02-29'",
    "3.141592653589793",
    "'192.168.0.1/24'",
    "-2147483648",
    "'1 year 2 mons 3 days 04:05:06.789'",
    r#"'{"k": "v",  "a": [1, 2.50, null], "k": "dup"}'"#,
    r#"'{"b": 1, "a": [1, 2.50, null], "u": "ü\u00e9"}'"#,
    "'{1,-1,0}'",
    "'[(0,0),(1,1)]'",
    "'08:00:2b:01:02:03'",
    "'08:00:2b:01:02:03:04:05'",
    "'1234.56'",
    "123456789.125",
    "'[(0,0),(1,1),(2,0)]'",
    "'16/B374D848'",
    "'(1.5,-2.25)'",
    "'((0,0),(0,1),(1,1),(1,0))'",
    "0.1",
    "-32768",
    "'plain text'",
    "'23:59:59.999999'",
    "'12:34:56.789+05:30'",
    "'2024-01-02 03:04:05.678'",
    "'2024-06-30 23:59:59.123456+02'",
    "'fat & (rat | !cat)'",
    "'a fat cat:1,3 sat:2B'",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
    r#"'<doc a="1">text &amp; more</doc>'"#,
    "'{1,NULL,3}'",
    r#"ARRAY['a', NULL, 'b c', 'q"uote', E'back\\slash', '']"#,
    "'{a,xyz,NULL}'",
    "ROW(1, 'a b')::pair",
    "'happy'",
    "'abcd'",
];

/// Zeros, empties and minimal values.
const EMPTY: Values = [
    "-1",
    "2",
    "B'00000'",
    "B''",
    "false",
    "'((-1,-1),(0,0))'",
    r"'\x'",
    "'a'",
    "''",
    "'::1/128'",
    "'<(0,0),0.5>'",
    "'0001-01-01'",
    "'-0'",
    "'::ffff:1.2.3.4'",
    "0",
    "'-1 days +00:00:01'",
    "'[]'",
    "'{}'",
    "'{0,1,0}'",
    "'[(1.5,2),(3,-4)]'",
    "'ff:ff:ff:ff:ff:ff'",
    "'00:00:00:ff:fe:00:00:01'",
    "'-0.01'",
    "0.000",
    "'((0,0),(1,0),(0,1))'",
    "'0/0'",
    "'(0,0)'",
    "'((0,0),(2,0),(1,1))'",
    "'-0'",
    "0",
    "''",
    "'00:00:00'",
    "'00:00:00-12'",
    "'1999-12-31 23:59:59.999'",
    "'2000-01-01 00:00:00+00'",
    "'x:*'",
    "''",
    "'00000000-0000-0000-0000-000000000000'",
    "''",
    "'{}'",
    "'{}'",
    r#"'{"  "}'"#,
    "ROW(NULL, NULL)::pair",
    "'sad'",
    "'a'",
];

/// Quotes, backslashes, control characters, unicode, extreme magnitudes.
const SPECIAL: Values = [
    "-9223372036854775808",
    "3",
    "B'00001'",
    "B'1010101010101010101010101'",
    "false",
    "'((1e-5,2),(-3,4.5))'",
    r"'\xdeadbeef00'",
    "'b'",
    "'ü€ab'",
    "'2001:db8::/32'",
    "'<(0,0),1e-10>'",
    "'0001-01-01 BC'",
    "1e-300",
    "'2001:db8::1/64'",
    "-1",
    "'-3 mons +14 days -00:00:00.000001'",
    r#"'[1, "two", {"three": 3.0}, true, null, "\n\u00e9\\"]'"#,
    r#"'{"": "", "tab": "\t", "q": "''"}'"#,
    "'{1,2,3}'",
    "'[(1.5,2),(3,-4)]'",
    "'08-00-2b-01-02-03'",
    "'08:00:2b:01:02:03'",
    "'-92233720368547758.08'",
    "-999999999.999",
    "'[(1e10,-1e10),(0.5,0.25)]'",
    "'0/1'",
    "'(1e-300,1e300)'",
    "'((0,0),(2,0),(1,1))'",
    "1e30",
    "-1",
    r#"E'line1\nline2\ttab \\ back ''q'' "dq" ünïcødé € 😀 \r end'"#,
    "'00:00:00.000001'",
    "'00:00:00-12'",
    "'0044-03-15 12:00:00.5 BC'",
    "'1969-12-31 23:59:59.999+00'",
    "'!(a <-> b) & c:AB'",
    "'''quoted word'':1A simple:2'",
    "'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF'",
    "'<r x=''q''>ü &lt; </r>'",
    "'[0:2]={7,NULL,9}'",
    r#"ARRAY[E'tab\there', E'nl\nthere', '{braces}', 'comma,', ' spaced ', 'NULL', '"', E'\\']"#,
    r#"'{"a b",c,NULL}'"#,
    r#"ROW(-5, E'q"uote, (paren) \\ back')::pair"#,
    "'sad'",
    "'über'",
];

/// Special floating point and date values, the streamed 'xyz' row.
const ODD: Values = [
    "0",
    "9223372036854775807",
    "B'11111'",
    "B'0'",
    "false",
    "'((0,0),(0,0))'",
    r"'\x5c0a09'",
    "'xyz'",
    r#"'x''y"z'"#,
    "'0.0.0.0/0'",
    "'<(-1.5,2.5),0>'",
    "'infinity'",
    "'NaN'",
    "'0.0.0.0'",
    "2147483647",
    "'0'",
    "'null'",
    r#"'{"nested": {"deep": [[], {}]}, "num": 1.0e-5}'"#,
    "'{-1,0,5}'",
    "'[(0,0),(0,0)]'",
    "'00:00:00:00:00:00'",
    "'08002b0102030405'",
    "'0'",
    "'NaN'",
    "'((1,1))'",
    "'FFFFFFFF/FFFFFFFF'",
    "'(-0,0)'",
    "'((1,1))'",
    "'-Infinity'",
    "32767",
    "'é combining, zero\u{200b}width, 😀'",
    "'24:00:00'",
    "'24:00:00+14'",
    "'-infinity'",
    "'infinity'",
    "'a <2> b'",
    "'''with space'':1 x:2,3'",
    "'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF'",
    "'<![CDATA[x<y]]>'",
    "'{{1,2},{3,NULL}}'",
    r#"'{"a\"b","c\\d",NULL,"NULL"}'"#,
    r#"'{xyz,"ab "}'"#,
    "ROW(NULL, '')::pair",
    "'ok'",
    "'abc '",
];

/// A key as SQL literals: char(3), numeric(10,2), text.
type Key = (&'static str, &'static str, &'static str);

fn non_key_names() -> String {
    COLUMNS.map(|(n, _)| n).join(", ")
}

fn insert(key: Key, values: &Values) -> String {
    format!(
        "INSERT INTO vals (k_char, k_num, k_text, {}) VALUES ({}, {}, {}, {});",
        non_key_names(),
        key.0,
        key.1,
        key.2,
        values.join(", ")
    )
}

fn key_is(key: Key) -> String {
    format!(
        "k_char = {} AND k_num = {} AND k_text = {}",
        key.0, key.1, key.2
    )
}

/// Sets every non-key column of the row of `key`.
fn update_all(key: Key, values: &Values) -> String {
    format!(
        "UPDATE vals SET ({}) = ({}) WHERE {};",
        non_key_names(),
        values.join(", "),
        key_is(key)
    )
}

/// `CREATE TABLE vals` and its types; the destination's has a leading `sid`.
fn vals_ddl(with_sid: bool) -> String {
    let columns: Vec<String> = COLUMNS.iter().map(|(n, t)| format!("{n} {t}")).collect();
    let (sid, sid_key) = if with_sid {
        ("sid text NOT NULL, ", "sid, ")
    } else {
        ("", "")
    };
    format!(
        "SET ROLE kuvasz;
         CREATE TYPE pair AS (a int, b text);
         CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN code4 AS varchar(4);
         CREATE TABLE vals ({sid}k_char char(3), k_num numeric(10,2), k_text text, {},
                            PRIMARY KEY ({sid_key}k_char, k_num, k_text));
         -- bigserial is NOT NULL by default; the NULL row needs it nullable.
         ALTER TABLE vals ALTER COLUMN c_serial DROP NOT NULL;",
        columns.join(", ")
    )
}

/// Every column as text, in key order; `filter` is a WHERE clause or empty.
fn vals_select(filter: &str) -> String {
    let columns: Vec<String> = COLUMNS.iter().map(|(n, _)| format!("{n}::text")).collect();
    format!(
        "{SESSION} SELECT k_char::text, k_num::text, k_text, {} FROM vals {filter} \
         ORDER BY k_char, k_num, k_text",
        columns.join(", ")
    )
}

const KEY_FULL: Key = ("'xyz'", "1.50", "'plain'");
const KEY_EMPTY: Key = ("'a'", "0", "''");
const KEY_SPECIAL: Key = ("'b'", "-12345678.99", r"E'k ''q'' \\ \t \n ü€'");
const KEY_NULLS: Key = ("'n'", "2", "'nulls'");
const KEY_TOAST: Key = ("'t'", "3", "'toast'");
const KEY_XYZ: Key = ("'xyz'", "42", "'streamed xyz'");
const KEY_NULLS2: Key = ("''", "-0.01", "'null2'");

fn exact_values(version: u32) {
    let src = source(version);
    let dest = destination();
    let (db, ddb, family) = (unique_name("ev"), unique_name("evd"), unique_name("ev"));
    src.create_database(&db);
    src.execute(&db, &vals_ddl(false));
    // Kept out of line uncompressed, so updates that leave it alone send it as unchanged.
    src.execute(
        &db,
        "SET ROLE kuvasz; ALTER TABLE vals ALTER COLUMN c_text SET STORAGE EXTERNAL",
    );
    dest.create_database(&ddb);
    dest.execute(&ddb, &vals_ddl(true));

    // Rows for the initial copy.
    src.execute(&db, &insert(KEY_FULL, &FULL));
    src.execute(&db, &insert(KEY_EMPTY, &EMPTY));
    src.execute(&db, &insert(KEY_SPECIAL, &SPECIAL));
    src.execute(&db, &insert(KEY_NULLS, &NULLS));
    src.execute(
        &db,
        "INSERT INTO vals (k_char, k_num, k_text, c_int4, c_text) \
         VALUES ('t', 3, 'toast', 1, repeat('toast-', 500))",
    );

    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"v\" }} ]\n[source.tables]\nvals = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let expected = || src.query(&db, &vals_select(""));
    let actual = || dest.query(&ddb, &vals_select("WHERE sid = 'v'"));
    daemon.wait_streaming(1);
    converge("initial copy", expected, actual);

    // Streamed inserts: single rows and a multi-row transaction.
    src.execute(&db, &insert(KEY_XYZ, &ODD));
    src.execute(&db, &insert(KEY_NULLS2, &NULLS));
    let mut generated = FULL.map(str::to_owned);
    generated[1] = "100 + g".into(); // c_serial
    generated[14] = "g".into(); // c_int4
    src.execute(
        &db,
        &format!(
            "BEGIN; INSERT INTO vals (k_char, k_num, k_text, {}) \
             SELECT 'g', g / 4.0, 'gen ' || g, {} FROM generate_series(1, 20) g; COMMIT",
            non_key_names(),
            generated.join(", ")
        ),
    );
    let xyz = support::wait_for("the streamed 'xyz' row", Duration::from_secs(60), || {
        let rows = dest.query(
            &ddb,
            "SELECT k_char::text, c_char::text, c_char_arr::text FROM vals \
                 WHERE sid = 'v' AND k_num = 42 AND k_text = 'streamed xyz'",
        );
        (!rows.is_empty()).then_some(rows)
    });
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        xyz,
        vec![vec![s("xyz"), s("xyz"), s(r#"{xyz,"ab "}"#)]],
        "streamed char(3) key, char(3) column and char(3)[] column"
    );
    converge("streamed inserts", expected, actual);

    // Every non-key column changes; the toasted text stays as it was.
    src.execute(
        &db,
        &[
            update_all(KEY_EMPTY, &SPECIAL),
            update_all(KEY_FULL, &NULLS),
            update_all(KEY_NULLS, &FULL),
            update_all(KEY_XYZ, &EMPTY),
            format!("UPDATE vals SET c_int4 = 2 WHERE {};", key_is(KEY_TOAST)),
            "UPDATE vals SET c_int4 = c_int4 + 1, c_text_arr = c_text_arr || 'more'::text \
             WHERE k_char = 'g' AND k_num < 2;"
                .to_string(),
        ]
        .concat(),
    );
    converge("updates", expected, actual);

    // Key changes: all three key columns, one of them, with and without other columns.
    src.execute(
        &db,
        &[
            format!(
                "UPDATE vals SET k_char = 'c', k_num = -12345678.98, k_text = k_text || ' moved' WHERE {};",
                key_is(KEY_SPECIAL)
            ),
            format!(
                "UPDATE vals SET k_char = 'tt', k_num = 3.01, k_text = 'toast2' WHERE {};",
                key_is(KEY_TOAST)
            ),
            "UPDATE vals SET k_num = k_num + 100 WHERE k_char = 'g' AND k_num >= 4;".to_string(),
            format!("UPDATE vals SET k_char = 'xyz' WHERE {};", key_is(KEY_EMPTY)),
            format!(
                "UPDATE vals SET k_text = 'no longer nulls' WHERE {};",
                key_is(KEY_NULLS)
            ),
            format!(
                "UPDATE vals SET k_char = 'e', k_num = 5, c_int4 = 7 WHERE {};",
                key_is(KEY_NULLS2)
            ),
        ]
        .concat(),
    );
    converge("key updates", expected, actual);

    src.execute(
        &db,
        "DELETE FROM vals WHERE k_char = 'c';
         DELETE FROM vals WHERE k_char = 'g' AND k_num BETWEEN 1 AND 3;
         DELETE FROM vals WHERE k_char = 'xyz' AND k_num = 1.50;",
    );
    src.execute(
        &db,
        &format!(
            "BEGIN; {} DELETE FROM vals WHERE k_char = 'z'; COMMIT",
            insert(("'z'", "9", "'short-lived'"), &SPECIAL)
        ),
    );
    converge("deletes", expected, actual);

    // A batch too large for literals: COPY into the staging tables, every type again.
    let bulk = |values: &Values, from: u32, to: u32| {
        let mut v = values.map(str::to_owned);
        v[1] = "1000 + g".into(); // c_serial
        format!(
            "INSERT INTO vals (k_char, k_num, k_text, {}) \
             SELECT 'b', g, 'bulk ' || g, {} FROM generate_series({from}, {to}) g;",
            non_key_names(),
            v.join(", ")
        )
    };
    src.execute(
        &db,
        &format!(
            "BEGIN; {} {} {} COMMIT",
            bulk(&FULL, 1, 200),
            bulk(&SPECIAL, 201, 400),
            bulk(&NULLS, 401, 600)
        ),
    );
    converge("bulk inserts", expected, actual);
    src.execute(
        &db,
        &format!(
            "BEGIN; UPDATE vals SET ({cols}) = ({}) WHERE k_char = 'b' AND k_num <= 200; \
             UPDATE vals SET ({cols}) = ({}) WHERE k_char = 'b' AND k_num > 400; \
             UPDATE vals SET k_num = k_num + 10000, k_char = 'bb' WHERE k_char = 'b' AND k_num % 7 = 0; \
             DELETE FROM vals WHERE k_char = 'b' AND k_num % 5 = 0; COMMIT",
            SPECIAL.join(", "),
            FULL.join(", "),
            cols = non_key_names()
        ),
    );
    converge("bulk updates, key updates and deletes", expected, actual);
    daemon.stop_ok();
}

macro_rules! exact_values_tests {
    ($($name:ident => $v:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                exact_values($v);
            }
        )*
    };
}

exact_values_tests! {
    exact_values_pg12 => 12,
    exact_values_pg13 => 13,
    exact_values_pg14 => 14,
    exact_values_pg15 => 15,
    exact_values_pg16 => 16,
    exact_values_pg17 => 17,
    exact_values_pg18 => 18,
}

/// REPLICA IDENTITY FULL without a key, with columns that have no equality operator
/// (json, point, xml) and identical rows: an update or delete of one copy touches exactly
/// one destination row. The source's extra column is ignored.
#[test]
fn replica_identity_full_keeps_duplicates() {
    let src = source(newest());
    let dest = destination();
    let (db, ddb, family) = (unique_name("du"), unique_name("dud"), unique_name("dup"));
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE dup (a int, j json, p point, x xml, extra text);
         ALTER TABLE dup REPLICA IDENTITY FULL;
         INSERT INTO dup VALUES (1, '{\"a\":1}', '(1,2)', '<x/>', 'e'),
                                (1, '{\"a\":1}', '(1,2)', '<x/>', 'e'),
                                (5, '{\"b\": [1, 2]}', '(3.5,-4)', '<y a=\"1\">t</y>', 'f');",
    );
    dest.create_database(&ddb);
    dest.execute(
        &ddb,
        "SET ROLE kuvasz; CREATE TABLE dup (a int, j json, p point, x xml)",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"d\" }} ]\n[source.tables]\ndup = {{}}\n",
        src.url(&db)
    );
    let daemon = Daemon::start(&dest.url(&ddb), &map, &[]);
    let rows = "SELECT a::text, j::text, p::text, x::text FROM dup ORDER BY 1, 2, 3, 4";
    let expected = || src.query(&db, rows);
    let actual = || dest.query(&ddb, rows);
    daemon.wait_streaming(1);
    converge("initial copy", expected, actual);

    src.execute(
        &db,
        "INSERT INTO dup VALUES (2, '{\"a\":1}', '(1,2)', '<x/>', 'e');
         INSERT INTO dup VALUES (2, '{\"a\":1}', '(1,2)', '<x/>', 'e');",
    );
    converge("streamed duplicates", expected, actual);

    src.execute(
        &db,
        "DELETE FROM dup WHERE ctid = (SELECT ctid FROM dup WHERE a = 2 LIMIT 1);
         UPDATE dup SET a = 3 WHERE ctid = (SELECT ctid FROM dup WHERE a = 1 LIMIT 1);",
    );
    converge("one copy deleted, one updated", expected, actual);
    let s = |v: &str| Some(v.to_string());
    let x = |a: &str| vec![s(a), s("{\"a\":1}"), s("(1,2)"), s("<x/>")];
    assert_eq!(
        actual(),
        vec![
            x("1"),
            x("2"),
            x("3"),
            vec![
                s("5"),
                s("{\"b\": [1, 2]}"),
                s("(3.5,-4)"),
                s("<y a=\"1\">t</y>")
            ],
        ]
    );
    daemon.stop_ok();
}
