//! The files installed with the program (etc/, man/, packaging/) match what it does:
//! the sample configuration and map load through the library with the values they
//! document, the man pages format without a single groff warning, and the systemd unit
//! runs the service as documented.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kuvasz_streamer::config::{self, Config, Map, Mode};

/// Every key of the service configuration (SPEC §2), by section.
const KEYS: &[(&str, &[&str])] = &[
    ("server", &["name", "address"]),
    ("logs", &["level", "format"]),
    ("database", &["url", "schema"]),
    (
        "app",
        &[
            "map_file",
            "num_workers",
            "commit_delay",
            "default_schema",
            "sync_rate",
            "sync_burst",
            "on_error",
            "wal_receiver_timeout",
            "writer_wait_timeout",
            "on_slot_lost",
        ],
    ),
];

const MAN_PAGES: &[&str] = &["man/kuvasz-streamer.8", "man/kuvasz-streamer.toml.5"];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    let p = repo_file(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(!text.trim().is_empty(), "{} is empty", p.display());
    text
}

/// The `section.key` names a TOML file sets, in file order (a plain scan: the sample
/// has only `[section]` headers and `key = value` lines).
fn keys_set(text: &str) -> Vec<String> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            keys.push(format!("{section}.{}", key.trim()));
        }
    }
    keys
}

#[test]
fn sample_config_sets_every_key_and_loads() {
    let rel = "etc/kuvasz-streamer.toml";
    let expected: Vec<String> = KEYS
        .iter()
        .flat_map(|(s, ps)| ps.iter().map(move |p| format!("{s}.{p}")))
        .collect();
    assert_eq!(
        keys_set(&read(rel)),
        expected,
        "{rel} must set every key once"
    );

    let path = repo_file(rel);
    let argv = [
        "--conf".to_string(),
        path.to_str().expect("UTF-8 path").to_string(),
    ];
    let cmd = config::parse_cli(argv).expect("command line");
    let config::Command::Run(args) = &cmd else {
        panic!("expected a run command, got {cmd:?}");
    };
    // An empty environment: the file alone must be a valid configuration.
    let c = Config::load(args, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.source_file.as_deref(), Some(path.as_path()));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // No built-in default: proves the file was read.
    assert_eq!(c.database.url, "postgres://kuvasz@localhost:5432/warehouse");
    assert_eq!(c.app.map_file, PathBuf::from("/etc/kuvasz/map.toml"));
    assert_eq!(c.app.num_workers, 2);
    // The sample documents the built-in defaults.
    let d = Config::default();
    assert_eq!(c.server, d.server);
    assert_eq!(c.logs, d.logs);
    assert_eq!(c.database.schema, d.database.schema);
    assert_eq!(c.app, d.app);
}

#[test]
fn sample_map_parses_with_only_supported_features() {
    let rel = "etc/map.toml";
    let text = read(rel);
    let map = Map::parse(&text, Path::new("/etc/kuvasz/map.toml"), "public")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.sources.len(), 1);
    let s = &map.sources[0];
    assert_eq!(s.database, "shop");
    let urls: Vec<(&str, &str)> = s
        .urls
        .iter()
        .map(|u| (u.url.as_str(), u.sid.as_str()))
        .collect();
    assert_eq!(
        urls,
        [
            ("postgres://kuvasz@tenant1.example.com:5432/shop", "tenant1"),
            ("postgres://kuvasz@tenant2.example.com:5432/shop", "tenant2"),
        ]
    );
    let slots: Vec<String> = s.urls.iter().map(|u| s.slot_name(u)).collect();
    assert_eq!(slots, ["kuvasz_shop_tenant1", "kuvasz_shop_tenant2"]);
    // The slot names the file's comments promise.
    for slot in &slots {
        assert!(text.contains(slot.as_str()), "{rel} should name {slot}");
    }

    let tables: Vec<(&str, &str, &str, Mode)> = s
        .tables
        .iter()
        .map(|t| {
            (
                t.schema.as_str(),
                t.table.as_str(),
                t.target.as_str(),
                t.mode,
            )
        })
        .collect();
    assert_eq!(
        tables,
        [
            ("public", "orders", "orders", Mode::Clone),
            ("public", "customers", "shop_customers", Mode::Clone),
            ("public", "audit_log", "audit_log", Mode::Append),
            ("billing", "invoices", "invoices", Mode::Clone),
        ]
    );
    // The daemon refuses these at start; the sample must run as shipped.
    for t in &s.tables {
        assert!(
            t.mode != Mode::History
                && t.filter.is_none()
                && t.set.is_empty()
                && t.partitions_regex.is_none(),
            "{rel}: {}.{} uses a feature this version refuses",
            t.schema,
            t.table
        );
    }
}

/// Runs `groff -man -ww -z` on `input` (a file, or stdin when `None`); returns stderr.
fn groff(file: Option<&Path>, stdin: &str) -> String {
    let mut cmd = Command::new("groff");
    cmd.args(["-man", "-ww", "-z"]);
    if let Some(f) = file {
        cmd.arg(f);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run groff ({e}): install it to check the man pages, e.g. \
                 apt-get install groff-base (.ci/run does)"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to groff");
    let out = child.wait_with_output().expect("groff");
    assert!(out.status.success(), "groff failed: {out:?}");
    assert!(out.stdout.is_empty(), "groff -z wrote output: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn man_pages_format_without_warnings() {
    // The check itself works: an undefined macro is reported.
    let bad = groff(None, ".TH X 1\n.SH NAME\nx \\- y\n.BOGUS\n");
    assert!(bad.contains("BOGUS"), "groff -ww did not warn: {bad:?}");

    for rel in MAN_PAGES {
        let text = read(rel);
        assert!(text.starts_with(".TH "), "{rel} has no .TH");
        let stderr = groff(Some(repo_file(rel).as_path()), "");
        assert!(stderr.is_empty(), "{rel}:\n{stderr}");
    }
}

#[test]
fn man_pages_describe_the_configuration() {
    let page8 = read("man/kuvasz-streamer.8");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "SIGNALS",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(
            page8.contains(&format!("\n.SH {section}\n"))
                || page8.contains(&format!("\n.SH \"{section}\"\n")),
            "kuvasz-streamer.8 lacks {section}"
        );
    }
    // FILES lists the configuration search path in the order the program uses.
    let mut from = page8.find("\n.SH FILES\n").expect("FILES");
    for p in config::SEARCH_PATH {
        let at = page8[from..]
            .find(p)
            .unwrap_or_else(|| panic!("kuvasz-streamer.8 FILES: {p} missing or out of order"));
        from += at + p.len();
    }

    let page5 = read("man/kuvasz-streamer.toml.5");
    for (section, params) in KEYS {
        assert!(
            page5.contains(&format!("\n.SS [{section}]\n")),
            "kuvasz-streamer.toml.5 lacks [{section}]"
        );
        for p in *params {
            assert!(
                page5.contains(&format!("\n.B {p}\n")),
                "kuvasz-streamer.toml.5 does not describe {section}.{p}"
            );
        }
    }
    for name in ["kvsz_sync_state", "kvsz_deadletter", "kuvasz_"] {
        assert!(page5.contains(name), "kuvasz-streamer.toml.5 lacks {name}");
    }
}

#[test]
fn systemd_unit_runs_the_service_as_documented() {
    let unit = read("packaging/kuvasz-streamer.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "[Service]",
        "Type=simple",
        "User=kuvasz",
        "Group=kuvasz",
        "ExecStart=/usr/bin/kuvasz-streamer --conf /etc/kuvasz/kuvasz-streamer.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "ReadOnlyPaths=/etc/kuvasz",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            lines.contains(&want),
            "packaging/kuvasz-streamer.service lacks the line {want:?}"
        );
    }
    // The unit's configuration file is the one the program would find by itself.
    assert!(config::SEARCH_PATH.contains(&"/etc/kuvasz/kuvasz-streamer.toml"));
}
