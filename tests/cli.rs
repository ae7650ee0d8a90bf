//! The command line and configuration errors, through the real binary.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsz-cli-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str], cwd: &PathBuf, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kuvasz-streamer"));
    c.args(args).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run binary")
}

/// Runs with `--conf FILE` holding `text`; returns (exit code, stderr, file path).
fn with_config(name: &str, text: &str) -> (i32, String, String) {
    let d = dir(name);
    let f = d.join("kuvasz-streamer.toml");
    fs::write(&f, text).unwrap();
    let out = run(&["--conf", f.to_str().unwrap()], &d, &[]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        f.display().to_string(),
    )
}

#[test]
fn syntax_error_names_file_and_line() {
    let (code, err, file) = with_config(
        "syntax",
        "[database]\nurl = \"postgres://u@localhost/db\"\n[app]\nnum_workers = = 3\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{file}:4")), "{err}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let (code, err, file) = with_config(
        "unknown",
        "[database]\nurl = \"postgres://u@localhost/db\"\n\n[app]\nnum_workers = 2\nbogus_key = 1\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{file}:6")), "{err}");
    assert!(err.contains("app.bogus_key"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let (code, err, file) = with_config(
        "type",
        "[database]\nurl = \"postgres://u@localhost/db\"\n[app]\nnum_workers = \"four\"\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{file}:4")), "{err}");
    assert!(err.contains("app.num_workers"), "{err}");
}

#[test]
fn missing_database_url_is_named() {
    let (code, err, file) = with_config("nourl", "[app]\nnum_workers = 2\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("database.url"), "{err}");
    assert!(err.contains(&file), "{err}");
}

#[test]
fn bad_command_line_value_is_named() {
    let d = dir("cli");
    let f = d.join("kuvasz-streamer.toml");
    fs::write(&f, "[database]\nurl = \"postgres://u@localhost/db\"\n").unwrap();
    let out = run(
        &["--conf", f.to_str().unwrap(), "--app.num_workers=abc"],
        &d,
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("app.num_workers"), "{err}");
}

#[test]
fn password_in_a_bad_map_url_is_not_printed() {
    let d = dir("secret");
    let map = d.join("map.toml");
    fs::write(
        &map,
        "[[source]]\ndatabase = \"db\"\nurls = [ { url = \"postgres://u:s3cr3t@host:notaport/db\", sid = \"a\" } ]\n[source.tables]\nt = {}\n",
    )
    .unwrap();
    let f = d.join("kuvasz-streamer.toml");
    fs::write(
        &f,
        format!(
            "[database]\nurl = \"postgres://u:hunter2@localhost:1/db\"\n[app]\nmap_file = \"{}\"\n",
            map.display()
        ),
    )
    .unwrap();
    let out = run(&["--conf", f.to_str().unwrap()], &d, &[]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(!all.contains("s3cr3t") && !all.contains("hunter2"), "{all}");
}

#[test]
fn version_and_help() {
    let d = dir("version");
    let out = run(&["--version"], &d, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("kuvasz-streamer {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"], &d, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--conf"));
}

#[test]
fn a_bad_expression_stops_the_start() {
    let d = dir("filter");
    let map = d.join("map.toml");
    fs::write(
        &map,
        "[[source]]\ndatabase = \"db\"\nurls = [ { url = \"postgres://u@localhost/db\", sid = \"a\" } ]\n[source.tables]\nt = { type = \"history\", filter = \"id >\" }\n",
    )
    .unwrap();
    let f = d.join("kuvasz-streamer.toml");
    fs::write(
        &f,
        format!(
            "[database]\nurl = \"postgres://u@localhost:1/db\"\n[app]\nmap_file = \"{}\"\n",
            map.display()
        ),
    )
    .unwrap();
    let out = run(&["--conf", f.to_str().unwrap()], &d, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("map.toml: source db table public.t: filter \"id >\" does not compile: "),
        "{err}"
    );
}
