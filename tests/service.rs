//! The daemon as a service, against running servers: the HTTP endpoints' exact status
//! codes and fields while a source is down and after it returns, `/healthz` answering
//! while clients stall, the status page rendered in headless Chromium, JSON logs.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use support::daemon::Daemon;
use support::{destination, source, unique_name, wait_for};

use support::http::{address as http_address, get, request};

/// The metric line that starts with `prefix` (name and labels), its value.
fn metric(body: &str, prefix: &str) -> Option<String> {
    body.lines()
        .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_string()))
}

#[test]
fn endpoints_while_a_source_is_down_and_after_it_returns() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("web");
    let up = unique_name("webup");
    let down = unique_name("webdown");
    let db_dst = unique_name("webdst");
    src.drop_database(&down);
    src.create_database(&up);
    let table = "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY, v text); \
                 INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3) g";
    src.execute(&up, table);
    dest.create_database(&db_dst);
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, {{ url = \"{}\", sid = \"b\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&up),
        src.url(&down)
    );
    let d = Daemon::start(&dest.url(&db_dst), &map, &[]);
    let addr = http_address(&d);

    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    // Source a streams, source b cannot connect: not ready, and b is named with its error.
    let body = wait_for("a streaming, b retrying", Duration::from_secs(60), || {
        let (code, body) = get(&addr, "/readyz");
        let a_ready = !body.contains(&format!("source {family}/a is"));
        (code == 503 && a_ready && body.contains("is retrying")).then_some(body)
    });
    assert_eq!(
        body,
        format!(
            "{{\"ready\":false,\"reasons\":[\"source {family}/b is retrying (stopped by the configuration): connect to {}: database \\\"{down}\\\" does not exist (SQLSTATE 3D000)\"]}}\n",
            src.url(&down).replace("kuvasz:kuvasz@", "kuvasz:********@")
        ),
    );
    // b cycles through starting and retrying: a snapshot while it waits.
    let status = wait_for("b retrying in the status", Duration::from_secs(30), || {
        let (code, status) = get(&addr, "/api/status");
        (code == 200 && section(&status, "\"sid\":\"b\"").contains("\"state\":\"retrying\""))
            .then_some(status)
    });
    assert!(!status.contains("kuvasz:kuvasz@"), "password in {status}");
    assert!(
        status.starts_with("{\"name\":\"kuvasz-streamer\",\"version\":\""),
        "{status}"
    );
    assert!(status.contains("\"ready\":false,"), "{status}");
    let a = section(&status, "\"sid\":\"a\"");
    let b = section(&status, "\"sid\":\"b\"");
    assert!(a.contains("\"state\":\"streaming\""), "{a}");
    assert!(a.contains("\"last_error\":null"), "{a}");
    assert!(
        a.contains("\"copy\":{\"target\":\"public.t\",\"state\":\"done\",\"rows\":3,"),
        "{a}"
    );
    assert!(b.contains("\"state\":\"retrying\""), "{b}");
    assert!(
        b.contains("does not exist (SQLSTATE 3D000)\"},\"last_rejected\":null"),
        "{b}"
    );
    assert!(status.contains("\"writers\":[{\"id\":0,"), "{status}");

    // Rows streamed from a are counted by table, operation and result.
    src.execute(
        &up,
        "INSERT INTO t VALUES (4, 'x'), (5, 'y'); DELETE FROM t WHERE id = 1",
    );
    let labels = format!("database=\"{family}\",sid=\"a\"");
    let metrics = wait_for("the inserts counted", Duration::from_secs(30), || {
        let (_, m) = get(&addr, "/metrics");
        (metric(
            &m,
            &format!("streamer_operations_total{{{labels},table=\"public.t\",operation=\"delete\",result=\"ok\"}}"),
        )
        .as_deref()
            == Some("1"))
        .then_some(m)
    });
    for (line, value) in [
        (
            format!("streamer_operations_total{{{labels},table=\"public.t\",operation=\"insert\",result=\"ok\"}}"),
            "2",
        ),
        (
            format!("streamer_sync_total_rows{{{labels},table=\"public.t\"}}"),
            "3",
        ),
        (
            format!("kuvasz_source_state{{{labels},state=\"streaming\"}}"),
            "1",
        ),
        (
            format!("kuvasz_source_state{{database=\"{family}\",sid=\"b\",state=\"retrying\"}}"),
            "1",
        ),
        (
            format!("kuvasz_source_transactions_total{{{labels}}}"),
            "1",
        ),
        (
            format!("kuvasz_source_rejected_total{{{labels}}}"),
            "0",
        ),
    ] {
        assert_eq!(metric(&metrics, &line).as_deref(), Some(value), "{line} in\n{metrics}");
    }
    for name in [
        "# TYPE streamer_jobs_total counter",
        "# TYPE url_heartbeat gauge",
        "# TYPE kuvasz_source_lag_seconds gauge",
        "# TYPE kuvasz_source_lag_bytes gauge",
        "# TYPE kuvasz_writer_queue gauge",
        "# TYPE kuvasz_writer_batch_size histogram",
        "# TYPE streamer_operations_seconds histogram",
    ] {
        assert!(metrics.lines().any(|l| l == name), "{name} in\n{metrics}");
    }
    assert!(!metrics.contains("kuvasz:kuvasz@"));
    // README's example alert rules select series this daemon exports: the lag of every
    // source, and the retrying state b is in now.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let selectors: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: ")?.split_whitespace().next())
        .collect();
    assert_eq!(
        selectors,
        [
            "kuvasz_source_lag_seconds",
            "kuvasz_source_state{state=\"retrying\"}"
        ]
    );
    for selector in selectors {
        let (name, matcher) = selector.split_once('{').unwrap_or((selector, "}"));
        let matcher = matcher.trim_end_matches('}');
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!("{name}{{"))
                && (matcher.is_empty() || l.contains(matcher) && l.ends_with(" 1"))),
            "README's alert selector {selector} matches nothing in\n{metrics}"
        );
    }
    // README's monitoring commands, on this daemon's address.
    let sh = |cmd: String| {
        let out = std::process::Command::new("bash")
            .args(["-c", &cmd])
            .output()
            .expect("run bash");
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        sh(format!("curl -s {addr}/readyz")),
        get(&addr, "/readyz").1
    );
    let lag = sh(format!(
        "curl -s {addr}/metrics | grep kuvasz_source_lag_seconds"
    ));
    assert!(
        lag.lines()
            .any(|l| l.starts_with(&format!("kuvasz_source_lag_seconds{{{labels}}} "))),
        "{lag}"
    );

    // Wrong paths and methods.
    assert_eq!(get(&addr, "/nope").0, 404);
    let (code, head, _) = request(&addr, "POST", "/metrics");
    assert_eq!(code, 405);
    assert!(head.contains("\r\nallow: get, head"), "{head}");
    let (code, head, page) = request(&addr, "GET", "/");
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.contains("fetch(\"api/status\""), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "external asset in the page"
    );

    // The missing database appears: b is retried on its own, copies and streams.
    src.create_database(&down);
    src.execute(&down, table);
    let body = wait_for("ready", Duration::from_secs(90), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 200).then_some(body)
    });
    assert_eq!(body, "{\"ready\":true,\"reasons\":[]}\n");
    let rows = wait_for("b's rows", Duration::from_secs(30), || {
        let r = dest.query(&db_dst, "SELECT count(*) FROM t WHERE sid = 'b'");
        (r[0][0].as_deref() == Some("3")).then_some(r)
    });
    assert_eq!(rows[0][0].as_deref(), Some("3"));
    let (_, status) = get(&addr, "/api/status");
    let b = section(&status, "\"sid\":\"b\"");
    assert!(b.contains("\"state\":\"streaming\""), "{b}");
    assert!(b.contains("\"last_error\":null"), "{b}");
    d.stop_ok();
}

/// The JSON object of the source whose fields include `marker`, up to the next source.
fn section<'a>(status: &'a str, marker: &str) -> &'a str {
    let at = status
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in {status}"));
    let start = status[..at].rfind("{\"database\"").expect("source object");
    let end = status[at..]
        .find("{\"database\"")
        .map_or(status.len(), |e| at + e);
    &status[start..end]
}

/// A daemon streaming table `t (id int PRIMARY KEY)` of a new source database into a new
/// destination database: the daemon, its HTTP address, both database names.
fn one_table_daemon(
    src: &support::Cluster,
    dest: &support::Cluster,
    prefix: &str,
) -> (Daemon, String, String, String) {
    let table = "CREATE TABLE t (id int PRIMARY KEY)";
    let (db, db_dst) = support::database_pair(src, dest, prefix, table, table);
    let map = format!(
        "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db)
    );
    let d = Daemon::start(&dest.url(&db_dst), &map, &[]);
    let addr = http_address(&d);
    (d, addr, db, db_dst)
}

#[test]
fn healthz_answers_while_clients_stall() {
    let src = source(*support::versions().last().expect("a version"));
    let (d, addr, _, _) = one_table_daemon(src, destination(), "stall");
    // 40 clients that send half a request and then nothing.
    let stalled: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("half a request");
            s
        })
        .collect();
    // And one that asks for the metrics and never reads them.
    let mut unread = TcpStream::connect(&addr).expect("connect");
    unread
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    for _ in 0..5 {
        assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    }
    assert_eq!(get(&addr, "/api/status").0, 200);
    drop(stalled);
    drop(unread);
    d.stop_ok();
}

/// Where CI keeps files for people to look at after a run (under `target/`).
fn artifact_dir() -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-artifacts");
    std::fs::create_dir_all(&d).expect("create target/ci-artifacts");
    d
}

/// Headless Chromium on `url`: its DOM after the page's scripts ran, and a screenshot
/// at `png`.
fn chromium(url: &str, png: &std::path::Path) -> String {
    let profile = support::scratch_dir("chromium");
    let common = |cmd: &mut std::process::Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1400,700",
            // Long enough for the page's first fetch of /api/status to be shown.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    };
    let mut shot = std::process::Command::new("chromium");
    common(&mut shot);
    let out = shot
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("run chromium (installed by .ci/install-postgres.sh)");
    assert!(
        out.status.success() && png.exists(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dom = std::process::Command::new("chromium");
    common(&mut dom);
    let out = dom
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `html` without its `<tag …>…</tag>` elements.
fn without(html: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut out = String::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        out.push_str(&rest[..at]);
        rest = rest[at..]
            .find(&close)
            .map_or("", |e| &rest[at + e + close.len()..]);
    }
    out.push_str(rest);
    out
}

/// The text a reader sees: the DOM without script, style and tags, spaces collapsed.
fn visible_text(dom: &str) -> String {
    let html = without(&without(dom, "script"), "style");
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn status_page_renders_in_chromium() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("page");
    let db = unique_name("pagesrc");
    let db_dst = unique_name("pagedst");
    src.create_database(&db);
    src.execute(
        &db,
        "SET ROLE kuvasz; CREATE TABLE orders (id int PRIMARY KEY, v text); \
         INSERT INTO orders SELECT g, 'v' FROM generate_series(1, 500) g; ANALYZE orders",
    );
    dest.create_database(&db_dst);
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE orders (sid text, id int, v text, PRIMARY KEY (sid, id))",
    );
    let missing = unique_name("pagegone");
    src.drop_database(&missing);
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"eu1\" }}, {{ url = \"{}\", sid = \"us1\" }} ]\n[source.tables]\norders = {{}}\n",
        src.url(&db),
        src.url(&missing)
    );
    let d = Daemon::start(&dest.url(&db_dst), &map, &[]);
    let addr = http_address(&d);
    d.wait_streaming(1);
    src.execute(&db, "UPDATE orders SET v = 'w' WHERE id <= 10");
    wait_for("the update committed", Duration::from_secs(30), || {
        let r = dest.query(&db_dst, "SELECT count(*) FROM orders WHERE v = 'w'");
        (r[0][0].as_deref() == Some("10")).then_some(())
    });
    let png = artifact_dir().join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let text = visible_text(&chromium(&format!("http://{addr}/"), &png));
    eprintln!("screenshot: {}\nvisible text: {text}", png.display());
    for expected in [
        "kuvasz-streamer — kuvasz-streamer".to_string(),
        "Not ready".to_string(),
        format!("{family}/eu1 slot kuvasz_{family}_eu1 streaming"),
        format!("{family}/us1 slot kuvasz_{family}_us1 retrying"),
        format!("database \"{missing}\" does not exist"),
        "public.orders — done 500 / ~500 rows".to_string(),
        "Writers".to_string(),
        "writer 0".to_string(),
        "writer 1".to_string(),
    ] {
        assert!(
            text.contains(&expected),
            "{expected:?} not in the page's text: {text}"
        );
    }
    assert!(
        !text.contains("kuvasz:kuvasz@"),
        "password on the page: {text}"
    );
    assert!(!text.contains("cannot reach the daemon"), "{text}");
    let size = std::fs::metadata(&png).expect("screenshot").len();
    assert!(size > 10_000, "a blank screenshot ({size} bytes)");
    d.stop_ok();
}

/// A flat JSON object of string (or null) values, as the daemon's JSON log lines are;
/// None when `line` is anything else.
fn flat_json(line: &str) -> Option<Vec<(String, Option<String>)>> {
    fn string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
        if chars.next()? != '"' {
            return None;
        }
        let mut s = String::new();
        loop {
            match chars.next()? {
                '"' => return Some(s),
                '\\' => match chars.next()? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'u' => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        s.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    }
    let mut chars = line.chars().peekable();
    if chars.next()? != '{' {
        return None;
    }
    let mut fields = Vec::new();
    loop {
        let key = string(&mut chars)?;
        if chars.next()? != ':' {
            return None;
        }
        let value = if chars.peek() == Some(&'n') {
            let word: String = (0..4).filter_map(|_| chars.next()).collect();
            (word == "null").then_some(())?;
            None
        } else {
            Some(string(&mut chars)?)
        };
        fields.push((key, value));
        match chars.next()? {
            ',' => continue,
            '}' => return chars.next().is_none().then_some(fields),
            _ => return None,
        }
    }
}

#[test]
fn json_logs_name_the_source_of_every_line_about_one() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("jlog");
    let db = unique_name("jlogsrc");
    let missing = unique_name("jloggone");
    let db_dst = unique_name("jlogdst");
    src.create_database(&db);
    src.drop_database(&missing);
    src.execute(&db, "SET ROLE kuvasz; CREATE TABLE t (id int PRIMARY KEY)");
    dest.create_database(&db_dst);
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE t (sid text, id int, PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, {{ url = \"{}\", sid = \"b\" }} ]\n[source.tables]\nt = {{}}\n",
        src.url(&db),
        src.url(&missing)
    );
    let d = Daemon::start_logs(&dest.url(&db_dst), &map, "format = \"json\"");
    d.wait_streaming(1);
    wait_for("b retried twice", Duration::from_secs(30), || {
        (d.log().matches("does not exist").count() >= 2).then_some(())
    });
    let log = d.stop_ok();
    let log = std::fs::read_to_string(log.join("daemon.log")).expect("log");
    assert!(
        !log.contains("kuvasz:kuvasz@"),
        "a password in the log:\n{log}"
    );
    let mut about = [0, 0];
    for line in log.lines() {
        let fields = flat_json(line).unwrap_or_else(|| panic!("not a JSON object: {line}"));
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["time", "level", "name", "source", "sid", "message"],
            "{line}"
        );
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| v.clone())
        };
        let message = get("message").expect("a message");
        for (i, sid) in ["a", "b"].iter().enumerate() {
            if message.contains(&format!("source {family}/{sid}")) {
                about[i] += 1;
                assert_eq!(
                    (get("source"), get("sid")),
                    (Some(family.clone()), Some(sid.to_string())),
                    "{line}"
                );
            }
        }
        assert!(
            ["ERROR", "WARN", "INFO"].contains(&get("level").as_deref().unwrap_or("")),
            "{line}"
        );
        assert_eq!(get("name").as_deref(), Some("kuvasz-streamer"), "{line}");
    }
    assert!(
        about[0] >= 3 && about[1] >= 2,
        "lines about a and b: {about:?}\n{log}"
    );
}

/// Lines of the log that say a source started streaming from `slot`.
fn streams_started(d: &Daemon, slot: &str) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains(&format!("streaming from slot {slot} ")))
        .count()
}

#[test]
fn rejected_row_stops_only_its_source() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let family = unique_name("blast");
    let dbs = [unique_name("blasta"), unique_name("blastb")];
    let db_dst = unique_name("blastdst");
    for db in &dbs {
        src.create_database(db);
        src.execute(
            db,
            "SET ROLE kuvasz; CREATE TABLE items (id int PRIMARY KEY, qty int)",
        );
    }
    dest.create_database(&db_dst);
    // The destination refuses negative quantities; the sources do not.
    dest.execute(
        &db_dst,
        "SET ROLE kuvasz; CREATE TABLE items (sid text, id int, qty int CHECK (qty >= 0), \
         PRIMARY KEY (sid, id))",
    );
    let map = format!(
        "[[source]]\ndatabase = \"{family}\"\nurls = [ {{ url = \"{}\", sid = \"a\" }}, {{ url = \"{}\", sid = \"b\" }} ]\n[source.tables]\nitems = {{}}\n",
        src.url(&dbs[0]),
        src.url(&dbs[1])
    );
    let d = Daemon::start(&dest.url(&db_dst), &map, &[]);
    let addr = http_address(&d);
    d.wait_streaming(2);
    let slot_b = format!("kuvasz_{family}_b");
    assert_eq!(streams_started(&d, &slot_b), 1);

    src.execute(
        &dbs[0],
        "INSERT INTO items VALUES (1, 1); INSERT INTO items VALUES (2, -1); \
         INSERT INTO items VALUES (3, 3)",
    );
    let count = |sid: &str| {
        dest.query(
            &db_dst,
            &format!("SELECT count(*) FROM items WHERE sid = '{sid}'"),
        )[0][0]
            .clone()
            .unwrap_or_default()
    };
    // While a is held at its refused row, b streams on, untouched.
    let body = wait_for("a held at its row", Duration::from_secs(60), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 503 && body.contains("is retrying (held by a rejected row): writer"))
            .then_some(body)
    });
    assert!(
        body.starts_with(&format!(
            "{{\"ready\":false,\"reasons\":[\"source {family}/a is retrying (held by a rejected row): writer "
        )),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "destination rejected INSERT from source {family} (sid a) on public.items key (id)=(2) at LSN "
        )),
        "{body}"
    );
    for i in 0..5 {
        src.execute(&dbs[1], &format!("INSERT INTO items VALUES ({i}, {i})"));
        let want = (i + 1).to_string();
        wait_for("b's row", Duration::from_secs(30), || {
            (count("b") == want).then_some(())
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    // a cycles through starting and retrying as it is tried again: a snapshot while it waits.
    let status = wait_for("a retrying in the status", Duration::from_secs(30), || {
        let (_, status) = get(&addr, "/api/status");
        section(&status, "\"sid\":\"a\"")
            .contains("\"state\":\"retrying\"")
            .then_some(status)
    });
    let a = section(&status, "\"sid\":\"a\"");
    assert!(a.contains("\"last_error\":{\"at\":\""), "{a}");
    assert!(a.contains("\"class\":\"rejected_row\""), "{a}");
    assert!(
        a.contains("\"last_rejected\":{\"at\":\"") && a.contains("\"key\":\"(id)=(2)\""),
        "{a}"
    );
    let b = section(&status, "\"sid\":\"b\"");
    assert!(b.contains("\"state\":\"streaming\""), "{b}");
    // The refused row is neither applied nor skipped: nothing of a after it is confirmed.
    assert_eq!(
        dest.query(
            &db_dst,
            "SELECT count(*) FROM items WHERE sid = 'a' AND id = 2"
        )[0][0]
            .as_deref(),
        Some("0")
    );
    // The operator fixes the cause: a applies everything; b was never restarted.
    dest.execute(&db_dst, "ALTER TABLE items DROP CONSTRAINT items_qty_check");
    wait_for("a's rows", Duration::from_secs(90), || {
        (count("a") == "3").then_some(())
    });
    let body = wait_for("ready", Duration::from_secs(30), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 200).then_some(body)
    });
    assert_eq!(body, "{\"ready\":true,\"reasons\":[]}\n");
    assert_eq!(
        dest.query(&db_dst, "SELECT sid, id, qty FROM items ORDER BY sid, id")
            .into_iter()
            .map(|r| r
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect::<Vec<_>>()
                .join(" "))
            .collect::<Vec<_>>(),
        ["a 1 1", "a 2 -1", "a 3 3", "b 0 0", "b 1 1", "b 2 2", "b 3 3", "b 4 4"]
    );
    assert_eq!(
        streams_started(&d, &slot_b),
        1,
        "b was restarted:\n{}",
        d.log()
    );
    assert!(
        !d.log().contains("restarting all sources"),
        "the pool restarted:\n{}",
        d.log()
    );
    d.stop_ok();
}

#[test]
fn destination_outage_pauses_every_source_and_resumes() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = support::private_destination();
    let (d, addr, db, db_dst) = one_table_daemon(src, &dest, "outage");
    d.wait_streaming(1);
    let count = || {
        dest.query(&db_dst, "SELECT count(*) FROM t")[0][0]
            .clone()
            .unwrap_or_default()
    };
    src.execute(&db, "INSERT INTO t SELECT generate_series(1, 10)");
    wait_for("10 rows", Duration::from_secs(30), || {
        (count() == "10").then_some(())
    });

    dest.stop();
    src.execute(&db, "INSERT INTO t SELECT generate_series(11, 20)");
    let body = wait_for("not ready", Duration::from_secs(60), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 503 && body.contains("waiting for the destination")).then_some(body)
    });
    // The pool's reason first, then each source waiting for it.
    assert!(
        body.starts_with("{\"ready\":false,\"reasons\":[\"waiting for the destination: "),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "\"source {db}/1 is retrying (waiting for the destination): "
        )),
        "{body}"
    );
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        get(&addr, "/healthz").0,
        200,
        "the daemon exited:\n{}",
        d.log()
    );

    dest.start();
    wait_for("20 rows", Duration::from_secs(90), || {
        (count() == "20").then_some(())
    });
    let body = wait_for("ready", Duration::from_secs(60), || {
        let (code, body) = get(&addr, "/readyz");
        (code == 200).then_some(body)
    });
    assert_eq!(body, "{\"ready\":true,\"reasons\":[]}\n");
    d.stop_ok();
}

/// One `[[source]]` entry: database, its (url, sid) pairs, its tables.
type Entry<'a> = (&'a str, Vec<(String, &'a str)>, &'a [&'a str]);

/// A map of `[[source]]` entries.
fn map_of(entries: &[Entry<'_>]) -> String {
    let mut m = String::new();
    for (database, urls, tables) in entries {
        let urls: Vec<String> = urls
            .iter()
            .map(|(u, sid)| format!("{{ url = \"{u}\", sid = \"{sid}\" }}"))
            .collect();
        m.push_str(&format!(
            "[[source]]\ndatabase = \"{database}\"\nurls = [ {} ]\n[source.tables]\n",
            urls.join(", ")
        ));
        for t in *tables {
            m.push_str(&format!("{t} = {{}}\n"));
        }
    }
    m
}

#[test]
fn sighup_reconciles_tables_and_sources_live() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let [fa, fb, fc, fd] = ["hupa", "hupb", "hupc", "hupd"].map(unique_name);
    let [a, b, c, dd] = ["hupadb", "hupbdb", "hupcdb", "hupddb"].map(unique_name);
    let db_dst = unique_name("hupdst");
    let table = |name: &str| format!("CREATE TABLE {name} (id int PRIMARY KEY, v text)");
    for (db, tables) in [
        (&a, &["t1", "t2", "t3"][..]),
        (&b, &["u"]),
        (&c, &["w"]),
        (&dd, &["x"]),
    ] {
        src.create_database(db);
        let ddl: Vec<String> = tables.iter().map(|t| table(t)).collect();
        src.execute(db, &format!("SET ROLE kuvasz; {}", ddl.join("; ")));
        for t in tables {
            src.execute(
                db,
                &format!("INSERT INTO {t} SELECT g, 'old' FROM generate_series(1, 5) g"),
            );
        }
    }
    dest.create_database(&db_dst);
    let ddl: Vec<String> = ["t1", "t2", "t3", "u", "w", "x"]
        .iter()
        .map(|t| table(t))
        .collect();
    dest.execute(&db_dst, &format!("SET ROLE kuvasz; {}", ddl.join("; ")));
    let before = map_of(&[
        (&fa, vec![(src.url(&a), "1")], &["t1", "t2"]),
        (&fb, vec![(src.url(&b), "1")], &["u"]),
        (&fd, vec![(src.url(&dd), "1")], &["x"]),
    ]);
    let d = Daemon::start(&dest.url(&db_dst), &before, &[]);
    d.wait_streaming(3);
    let count = |t: &str| {
        dest.query(&db_dst, &format!("SELECT count(*) FROM {t}"))[0][0]
            .clone()
            .unwrap_or_default()
    };
    for t in ["t1", "t2", "u", "x"] {
        wait_for("copies", Duration::from_secs(30), || {
            (count(t) == "5").then_some(())
        });
    }
    assert_eq!(count("t3"), "0");
    let slot = |f: &str| format!("kuvasz_{f}_1");
    assert_eq!(streams_started(&d, &slot(&fb)), 1);

    // A map that does not load is reported, and the running one kept.
    std::fs::write(d.dir.join("map.toml"), "[[source]]\ndatabase = 3\n").expect("write map");
    d.hup();
    wait_for("the bad map reported", Duration::from_secs(30), || {
        d.log()
            .contains("the running configuration and map are kept")
            .then_some(())
    });
    src.execute(&a, "INSERT INTO t1 VALUES (6, 'during')");
    wait_for("t1 streams on", Duration::from_secs(30), || {
        (count("t1") == "6").then_some(())
    });

    // t2 leaves the map, t3 joins it; source c is added, source d removed; b is untouched.
    let after = map_of(&[
        (&fa, vec![(src.url(&a), "1")], &["t1", "t3"]),
        (&fb, vec![(src.url(&b), "1")], &["u"]),
        (&fc, vec![(src.url(&c), "1")], &["w"]),
    ]);
    std::fs::write(d.dir.join("map.toml"), after).expect("write map");
    d.hup();
    wait_for("t3 copied", Duration::from_secs(60), || {
        (count("t3") == "5").then_some(())
    });
    wait_for("w copied", Duration::from_secs(60), || {
        (count("w") == "5").then_some(())
    });
    wait_for("d's slot dropped", Duration::from_secs(60), || {
        let r = src.query(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                slot(&fd)
            ),
        );
        (r[0][0].as_deref() == Some("0")).then_some(())
    });
    assert_eq!(
        src.query(&dd, "SELECT count(*) FROM pg_publication")[0][0].as_deref(),
        Some("0"),
        "d's publications are dropped"
    );
    assert_eq!(
        src.query(&a, &format!(
            "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = '{}'",
            slot(&fa)
        ))[0][0].as_deref(),
        Some("t1,t3")
    );
    for (db, t) in [
        (&a, "t1"),
        (&a, "t2"),
        (&a, "t3"),
        (&b, "u"),
        (&c, "w"),
        (&dd, "x"),
    ] {
        src.execute(db, &format!("INSERT INTO {t} VALUES (100, 'new')"));
    }
    for (t, n) in [("t1", "7"), ("t3", "6"), ("u", "6"), ("w", "6")] {
        wait_for("new rows", Duration::from_secs(30), || {
            (count(t) == n).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        (count("t2"), count("x")),
        ("5".to_string(), "5".to_string()),
        "removed tables and sources no longer stream"
    );
    assert_eq!(
        streams_started(&d, &slot(&fb)),
        1,
        "b was restarted:\n{}",
        d.log()
    );
    let addr = http_address(&d);
    let (_, status) = get(&addr, "/api/status");
    assert!(
        !status.contains(&slot(&fd)),
        "a removed source is still reported: {status}"
    );
    assert!(status.contains(&slot(&fc)), "{status}");
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(
        (code, body.as_str()),
        (200, "{\"ready\":true,\"reasons\":[]}\n")
    );
    d.stop_ok();
}

/// `kuvasz_anomalies_total` counts what applying the changes one by one would find:
/// keys inserted and deleted within one batch are no anomaly (they were counted as
/// deletes of missing rows when the batch reduced each key to its net effect), a delete
/// of a row the destination lost is one, and so is an insert of a key it already has.
#[test]
fn anomalies_count_what_one_by_one_apply_would_find() {
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let (d, addr, db, db_dst) = one_table_daemon(src, dest, "anomaly");
    d.wait_streaming(1);
    // Everything the source wrote so far is committed on the destination and confirmed:
    // then the metrics are final.
    let settled = || {
        let lsn = src.query(&db, "SELECT (pg_current_wal_insert_lsn() - '0/0')::text")[0][0]
            .clone()
            .expect("an LSN");
        let lsn: u64 = lsn.parse().expect("a number");
        wait_for(
            "the destination to confirm",
            Duration::from_secs(30),
            || {
                let (_, metrics) = get(&addr, "/metrics");
                let confirmed: u64 = metric(
                    &metrics,
                    &format!("kuvasz_source_confirmed_lsn{{database=\"{db}\",sid=\"1\"}}"),
                )?
                .parse()
                .ok()?;
                (confirmed >= lsn).then_some(())
            },
        );
        let (_, metrics) = get(&addr, "/metrics");
        metrics
            .lines()
            .filter(|l| l.starts_with("kuvasz_anomalies_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    src.execute(&db, "INSERT INTO t SELECT generate_series(1, 10)");
    // Rows born and gone in one transaction, and in two (one batch: commit_delay 0.2 s).
    src.execute(
        &db,
        "BEGIN; INSERT INTO t SELECT generate_series(100, 149);
         DELETE FROM t WHERE id BETWEEN 100 AND 149; COMMIT;
         INSERT INTO t SELECT generate_series(200, 229);
         DELETE FROM t WHERE id BETWEEN 200 AND 229;",
    );
    assert_eq!(settled(), Vec::<String>::new(), "no anomaly yet");
    // The destination loses rows 1 and 2 and gains row 300; the source then deletes
    // 1 and 2 and inserts 300.
    dest.execute(
        &db_dst,
        "DELETE FROM t WHERE id IN (1, 2); INSERT INTO t VALUES (300)",
    );
    src.execute(
        &db,
        "DELETE FROM t WHERE id IN (1, 2); INSERT INTO t VALUES (300)",
    );
    assert_eq!(
        settled(),
        [
            "kuvasz_anomalies_total{table=\"public.t\",kind=\"insert_found_row\"} 1",
            "kuvasz_anomalies_total{table=\"public.t\",kind=\"delete_missed_row\"} 2",
        ]
    );
    d.stop_ok();
}
