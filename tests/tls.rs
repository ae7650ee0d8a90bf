//! TLS on both connection kinds (issue #12 point 5), against a server started with
//! certificates this test generates (openssl): every `sslmode`, root and client
//! certificates, SCRAM channel binding, and the daemon streaming with nothing but TLS.
//!
//! The server is Debian's PostgreSQL 15 (built with TLS) with a pg_hba.conf that rejects
//! role `kuvasz` without TLS and lets role `kv_cert` in by client certificate only.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kuvasz_streamer::pg::connect::Endpoint;
use kuvasz_streamer::pg::conninfo::ConnInfo;
use support::daemon::Daemon;
use support::{converge, literal, scratch_dir, wait_for, Cluster};

/// Certificates of one test run: a CA, a server certificate it signed for IP 127.0.0.1
/// only (so `localhost` does not match it), a client certificate for `kv_cert`, and an
/// unrelated CA.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn generate() -> Certs {
        let dir = scratch_dir("certs");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            openssl(
                &dir,
                &[
                    &["req", "-x509", "-new"][..],
                    &ec,
                    &[
                        "-keyout",
                        &format!("{ca}.key"),
                        "-out",
                        &format!("{ca}.crt"),
                    ],
                    &["-days", "30", "-subj", &format!("/CN=kuvasz test {ca}")],
                    &["-addext", "basicConstraints=critical,CA:TRUE"],
                    &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                ]
                .concat(),
            );
        }
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "kv_cert",
                "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                &dir,
                &[
                    &["req", "-new"][..],
                    &ec,
                    &["-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr")],
                    &["-subj", &format!("/CN={cn}")],
                ]
                .concat(),
            );
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    if name == "server" { "2" } else { "3" },
                    "-days",
                    "30",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.crt"),
                ],
            );
        }
        Certs { dir }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The TLS server of this test binary and its certificates.
fn server() -> &'static (Cluster, Certs) {
    static SERVER: OnceLock<(Cluster, Certs)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certs = Certs::generate();
        let cluster = support::private_destination();
        for (file, mode) in [
            ("server.crt", 0o644),
            ("server.key", 0o600),
            ("ca.crt", 0o644),
        ] {
            cluster.write_data_file(file, &fs::read(certs.dir.join(file)).unwrap(), mode);
        }
        cluster.write_data_file(
            "pg_hba.conf",
            b"\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
hostssl all kv_cert 127.0.0.1/32 cert
hostssl replication kv_cert 127.0.0.1/32 cert
hostssl all kuvasz 127.0.0.1/32 scram-sha-256
hostssl replication kuvasz 127.0.0.1/32 scram-sha-256
hostnossl all kuvasz 127.0.0.1/32 reject
hostnossl replication kuvasz 127.0.0.1/32 reject
",
            0o600,
        );
        // One statement each: ALTER SYSTEM refuses to run in a multi-statement string.
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "ALTER SYSTEM SET ssl_ca_file = 'ca.crt'",
            "ALTER SYSTEM SET ssl = on",
            "CREATE ROLE kv_cert LOGIN REPLICATION SUPERUSER",
            "SELECT pg_reload_conf()",
        ] {
            cluster.execute("postgres", sql);
        }
        wait_for("ssl = on", Duration::from_secs(10), || {
            let on = cluster.query("postgres", "SHOW ssl");
            (on[0][0].as_deref() == Some("on")).then_some(())
        });
        (cluster, certs)
    })
}

/// An endpoint of `url` whose sessions carry `app` as application_name.
fn endpoint(url: &str, app: &str) -> Endpoint {
    Endpoint::new(ConnInfo::parse(url).expect("a valid URL"), app)
}

/// Whether the session(s) named `app` on `cluster` use TLS (all of them), or `None`
/// when there is none.
fn session_ssl(cluster: &Cluster, app: &str) -> Option<bool> {
    let rows = cluster.query(
        "postgres",
        &format!(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = {}",
            literal(app)
        ),
    );
    rows[0][0].as_deref().map(|v| v == "t")
}

/// What connecting with `params` gives, for each connection kind: `Ok(uses TLS)` or the
/// error text.
fn outcome(cluster: &Cluster, user: &str, host: &str, params: &str) -> [Result<bool, String>; 2] {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let app = format!(
        "tls-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let password = match user {
        "kuvasz" => ":kuvasz",
        "kv_md5" => ":kv_md5",
        _ => "",
    };
    let url = format!(
        "postgres://{user}{password}@{host}:{}/postgres?connect_timeout=10&{params}",
        cluster.port
    );
    let e = endpoint(&url, &app);
    let sql = match e.sql() {
        Ok(mut c) => {
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .expect("pg_stat_ssl");
            Ok(row.get::<_, bool>(0))
        }
        Err(e) => Err(kuvasz_streamer::pg::describe(&e)),
    };
    let replication = match e.replication() {
        Ok(mut conn) => {
            conn.simple_query("IDENTIFY_SYSTEM")
                .expect("IDENTIFY_SYSTEM");
            Ok(session_ssl(cluster, &app).expect("the walsender session is listed"))
        }
        Err(e) => Err(e.to_string()),
    };
    [sql, replication]
}

/// Asserts both connection kinds connected, over TLS when `tls`.
#[track_caller]
fn connects(results: [Result<bool, String>; 2], tls: bool, case: &str) {
    for (kind, r) in ["sql", "replication"].iter().zip(results) {
        assert_eq!(r, Ok(tls), "{case}: {kind} session");
    }
}

/// Asserts both connection kinds failed, each with a message containing one of `words`.
#[track_caller]
fn refused(results: [Result<bool, String>; 2], words: &[&str], case: &str) {
    for (kind, r) in ["sql", "replication"].iter().zip(results) {
        match r {
            Ok(tls) => panic!("{case}: {kind} session connected (tls: {tls})"),
            Err(e) => assert!(
                words.iter().any(|w| e.contains(w)),
                "{case}: {kind} error {e:?} mentions none of {words:?}"
            ),
        }
    }
}

#[test]
fn ssl_modes_on_both_connection_kinds() {
    let (cluster, certs) = server();
    let ca = certs.path("ca.crt");
    let other = certs.path("other-ca.crt");

    // The server rejects kuvasz without TLS; every mode that tries TLS gets in.
    refused(
        outcome(cluster, "kuvasz", "127.0.0.1", "sslmode=disable"),
        &["pg_hba.conf rejects connection"],
        "disable",
    );
    for mode in ["allow", "prefer", "require"] {
        let case = format!("sslmode={mode}");
        connects(outcome(cluster, "kuvasz", "127.0.0.1", &case), true, &case);
    }
    // The default is prefer.
    connects(
        outcome(cluster, "kuvasz", "127.0.0.1", ""),
        true,
        "no sslmode",
    );

    // verify-ca: the chain must lead to the given root, whatever the name.
    let case = format!("sslmode=verify-ca&sslrootcert={ca}");
    connects(outcome(cluster, "kuvasz", "localhost", &case), true, &case);
    let case = format!("sslmode=verify-ca&sslrootcert={other}");
    refused(
        outcome(cluster, "kuvasz", "127.0.0.1", &case),
        &["UnknownIssuer"],
        &case,
    );
    // require with a root certificate checks the chain too (libpq does).
    let case = format!("sslmode=require&sslrootcert={other}");
    refused(
        outcome(cluster, "kuvasz", "127.0.0.1", &case),
        &["UnknownIssuer"],
        &case,
    );

    // verify-full: and the certificate must name the host (it names 127.0.0.1 only).
    let case = format!("sslmode=verify-full&sslrootcert={ca}");
    connects(outcome(cluster, "kuvasz", "127.0.0.1", &case), true, &case);
    refused(
        outcome(cluster, "kuvasz", "localhost", &case),
        &["certificate not valid for name \"localhost\""],
        &format!("{case} as localhost"),
    );
    // No root certificate, no verification: said before any connection is tried.
    refused(
        outcome(cluster, "kuvasz", "127.0.0.1", "sslmode=verify-full"),
        &["sslmode=verify-full needs a root certificate"],
        "verify-full without sslrootcert",
    );
    refused(
        outcome(
            cluster,
            "kuvasz",
            "127.0.0.1",
            "sslmode=verify-ca&sslrootcert=/nonexistent/root.crt",
        ),
        &["sslrootcert /nonexistent/root.crt: No such file or directory"],
        "missing root certificate file",
    );
}

#[test]
fn scram_channel_binding() {
    let (cluster, certs) = server();
    let ca = certs.path("ca.crt");
    // SCRAM-SHA-256-PLUS, bound to the server's certificate, on both kinds.
    for mode in ["require", "verify-full"] {
        let case = format!("sslmode={mode}&sslrootcert={ca}&channel_binding=require");
        connects(outcome(cluster, "kuvasz", "127.0.0.1", &case), true, &case);
    }
    connects(
        outcome(cluster, "kuvasz", "127.0.0.1", "channel_binding=disable"),
        true,
        "channel_binding=disable",
    );
    // Without TLS there is nothing to bind to: a server without TLS (the shared test
    // destination) is refused rather than authenticated unbound.
    let plain = support::destination();
    refused(
        outcome(
            plain,
            "kuvasz",
            "127.0.0.1",
            "sslmode=prefer&channel_binding=require",
        ),
        &["channel binding", "channel_binding"],
        "channel_binding=require without TLS",
    );
    // MD5 cannot be bound either.
    refused(
        outcome(plain, "kv_md5", "127.0.0.1", "channel_binding=require"),
        &["channel binding", "channel_binding"],
        "channel_binding=require with MD5",
    );
}

#[test]
fn client_certificates() {
    let (cluster, certs) = server();
    let ca = certs.path("ca.crt");
    let with_cert = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        certs.path("client.crt"),
        certs.path("client.key")
    );
    connects(
        outcome(cluster, "kv_cert", "127.0.0.1", &with_cert),
        true,
        "client certificate",
    );
    refused(
        outcome(
            cluster,
            "kv_cert",
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        &["certificate"],
        "no client certificate",
    );
    refused(
        outcome(
            cluster,
            "kv_cert",
            "127.0.0.1",
            &format!("{with_cert}&sslcertmode=disable"),
        ),
        &["certificate"],
        "sslcertmode=disable",
    );
}

#[test]
fn servers_without_tls() {
    let plain = support::destination();
    connects(
        outcome(plain, "kuvasz", "127.0.0.1", "sslmode=prefer"),
        false,
        "prefer falls back to plain text",
    );
    refused(
        outcome(plain, "kuvasz", "127.0.0.1", "sslmode=require"),
        &["does not support TLS", "does not accept TLS"],
        "require against a server without TLS",
    );
}

/// The daemon copies and streams with every session on TLS: the source as `kuvasz`
/// (verify-full, channel binding required), the destination as `kv_cert` by client
/// certificate; `check` passes over the same URLs. The stream carries a 13 MB
/// transaction, so messages span many TLS records.
#[test]
fn daemon_streams_over_tls_only() {
    let (cluster, certs) = server();
    let ca = certs.path("ca.crt");
    let (src_db, dst_db) = support::database_pair(
        cluster,
        cluster,
        "tlsrc",
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'copied ' || g FROM generate_series(1, 3) g;",
        "CREATE TABLE items (sid text, id int, v text, PRIMARY KEY (sid, id));",
    );
    let src_url = format!(
        "postgres://kuvasz:kuvasz@127.0.0.1:{}/{src_db}?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
        cluster.port
    );
    let dst_url = format!(
        "postgres://kv_cert@127.0.0.1:{}/{dst_db}?sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        cluster.port,
        certs.path("client.crt"),
        certs.path("client.key")
    );
    let map = format!(
        "[[source]]\ndatabase = \"tls\"\nurls = [{{ url = \"{src_url}\", sid = \"s1\" }}]\n\
         [source.tables]\nitems = {{}}\n"
    );
    let daemon = Daemon::start(&dst_url, &map, &["num_workers = 2"]);
    daemon.wait_streaming(1);
    cluster.execute(
        &src_db,
        "INSERT INTO items VALUES (4, 'streamed');
         UPDATE items SET v = 'updated' WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO items SELECT g, repeat(md5(g::text), 20) FROM generate_series(10, 20009) g;",
    );
    converge(
        "items over TLS",
        || cluster.query(&src_db, "SELECT 's1', id::text, v FROM items ORDER BY id"),
        || cluster.query(&dst_db, "SELECT sid, id::text, v FROM items ORDER BY id"),
    );
    let sessions = cluster.query(
        "postgres",
        "SELECT a.backend_type, a.usename, s.ssl::text FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'kuvasz-streamer' ORDER BY 1, 2, 3",
    );
    let walsenders: Vec<_> = sessions
        .iter()
        .filter(|r| r[0].as_deref() == Some("walsender"))
        .collect();
    assert_eq!(
        walsenders,
        vec![&vec![
            Some("walsender".to_string()),
            Some("kuvasz".to_string()),
            Some("true".to_string())
        ]],
        "one walsender, on TLS: {sessions:?}"
    );
    let writers = sessions
        .iter()
        .filter(|r| r[1].as_deref() == Some("kv_cert"))
        .count();
    assert!(writers >= 2, "two writers: {sessions:?}");
    assert!(
        sessions.iter().all(|r| r[2].as_deref() == Some("true")),
        "every session on TLS: {sessions:?}"
    );
    let dir = daemon.stop_ok();
    let (code, report) = Daemon::check(&dir);
    assert_eq!(code, 0, "check over TLS:\n{report}");
    assert!(report.lines().any(|l| l == "all checks passed"), "{report}");
}

/// A walsender session over TLS waits for a command as long as it takes: the
/// handshake's read timeouts (within `connect_timeout`) do not stay on the socket.
#[test]
fn tls_replication_session_waits_past_the_connect_timeout() {
    let (cluster, _) = server();
    let url = format!(
        "postgres://kuvasz:kuvasz@127.0.0.1:{}/postgres?sslmode=require&connect_timeout=2",
        cluster.port
    );
    let mut conn = endpoint(&url, "tls-slow")
        .replication()
        .expect("a TLS walsender session");
    let rows = conn
        .simple_query("SELECT pg_sleep(3), 'slept'")
        .expect("a 3 s command on a session with connect_timeout=2");
    assert_eq!(
        rows,
        vec![vec![Some(String::new()), Some("slept".to_string())]]
    );
}
