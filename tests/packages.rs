//! The packages: the .deb built with cargo-deb is installed with dpkg on this machine
//! (CI runs as root), its binary runs `--version` and `check` against a throwaway pair
//! of servers, its files, conffiles and system user are as documented, and it is purged
//! again; the .rpm built with cargo-generate-rpm has the same files.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{destination, source};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd args…`; asserts success; returns standard output.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The file `dir` holds with extension `ext` (one package of this version).
fn package(dir: &str, ext: &str) -> PathBuf {
    let version = env!("CARGO_PKG_VERSION");
    let found: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == ext)
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(version))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one .{ext} of version {version} in {dir}: {found:?}"
    );
    found.into_iter().next().expect("a package")
}

/// Builds both packages from the release binary the tests run, once per test process
/// (both tests read them).
fn build() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        run("bash", &["packaging/build-packages.sh", "--no-build"]);
    });
}

/// Purges the installed package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "kuvasz-streamer"])
            .output();
    }
}

/// Whether a line of `listing` has `mode` (and owner) and ends with `path`.
fn has(listing: &str, mode: &str, path: &str) -> bool {
    listing
        .lines()
        .any(|l| l.starts_with(mode) && l.ends_with(path))
}

#[test]
fn deb_installs_runs_and_purges() {
    // SAFETY: geteuid(2) has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "installing the .deb needs root (CI runs as root)");
    build();
    let deb = package("target/debian", "deb");
    let deb = deb.to_str().expect("a path");
    let listing = run("dpkg", &["-c", deb]);
    eprintln!("dpkg -c {deb}:\n{listing}");
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/kuvasz-streamer"),
        ("-rw-r--r-- root/root", "./etc/kuvasz/kuvasz-streamer.toml"),
        ("-rw-r--r-- root/root", "./etc/kuvasz/map.toml"),
        (
            "-rw-r--r-- root/root",
            "./usr/lib/systemd/system/kuvasz-streamer.service",
        ),
        (
            "-rw-r--r-- root/root",
            "./usr/share/man/man8/kuvasz-streamer.8.gz",
        ),
        (
            "-rw-r--r-- root/root",
            "./usr/share/man/man5/kuvasz-streamer.toml.5.gz",
        ),
    ] {
        let mode = mode.replace("root/root", "0/0");
        assert!(
            has(&listing, &mode, path),
            "{path} ({mode}) not in\n{listing}"
        );
    }
    assert_eq!(
        run("dpkg-deb", &["-f", deb, "Depends"]).trim(),
        "adduser, libc6 (>= 2.34)"
    );

    let _ = Command::new("dpkg")
        .args(["--purge", "kuvasz-streamer"])
        .output();
    let installed = Installed;
    run("dpkg", &["-i", deb]);
    assert_eq!(
        run("/usr/bin/kuvasz-streamer", &["--version"]),
        format!("kuvasz-streamer {}\n", env!("CARGO_PKG_VERSION"))
    );
    let user = run("getent", &["passwd", "kuvasz"]);
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields[2].parse().expect("a uid");
    assert!(uid < 1000, "kuvasz is a system user: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{user}");
    assert_eq!(
        run(
            "stat",
            &[
                "-c",
                "%U:%G %a",
                "/etc/kuvasz/kuvasz-streamer.toml",
                "/etc/kuvasz/map.toml"
            ]
        ),
        "root:kuvasz 640\nroot:kuvasz 640\n"
    );
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "kuvasz-streamer"]);
    for f in ["/etc/kuvasz/kuvasz-streamer.toml", "/etc/kuvasz/map.toml"] {
        assert!(
            conffiles.contains(&format!(" {f} ")),
            "{f} not a conffile: {conffiles}"
        );
    }
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/kuvasz-streamer.service")
        .expect("the unit");
    for line in [
        "User=kuvasz",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} not in the unit:\n{unit}"
        );
    }
    let man = run("man", &["-w", "kuvasz-streamer.toml"]);
    assert_eq!(man, "/usr/share/man/man5/kuvasz-streamer.toml.5.gz\n");

    // The installed binary checks a throwaway pair of servers.
    let src = source(*support::versions().last().expect("a version"));
    let dest = destination();
    let t = "CREATE TABLE t (id int PRIMARY KEY)";
    let (db, db_dst) = support::database_pair(src, dest, "pkg", t, t);
    let dir = support::scratch_dir("pkg");
    std::fs::write(
        dir.join("map.toml"),
        format!(
            "[[source]]\ndatabase = \"{db}\"\nurls = [ {{ url = \"{}\", sid = \"1\" }} ]\n[source.tables]\nt = {{}}\n",
            src.url(&db)
        ),
    )
    .expect("map");
    let conf = dir.join("kuvasz-streamer.toml");
    std::fs::write(
        &conf,
        format!(
            "[database]\nurl = \"{}\"\n[app]\nmap_file = \"{}\"\n",
            dest.url(&db_dst),
            dir.join("map.toml").display()
        ),
    )
    .expect("config");
    let report = run(
        "/usr/bin/kuvasz-streamer",
        &["check", "--conf", conf.to_str().expect("a path")],
    );
    assert!(report.ends_with("all checks passed\n"), "{report}");

    // A conffile the operator changed is kept when the package is installed again.
    std::fs::write("/etc/kuvasz/map.toml", "# mine\n").expect("edit the map");
    run("dpkg", &["-i", "--force-confold", deb]);
    assert_eq!(
        std::fs::read_to_string("/etc/kuvasz/map.toml").expect("map"),
        "# mine\n"
    );
    drop(installed);
    assert!(!Path::new("/usr/bin/kuvasz-streamer").exists());
    assert!(
        !Path::new("/etc/kuvasz").exists(),
        "purge removes the conffiles"
    );
}

#[test]
fn rpm_has_the_same_files() {
    build();
    let rpm = package("target/generate-rpm", "rpm");
    let rpm = rpm.to_str().expect("a path");
    let files = run("rpm", &["-qlpv", rpm]);
    eprintln!("rpm -qlpv {rpm}:\n{files}");
    for (mode, owner, path) in [
        ("-rwxr-xr-x", "root     root", "/usr/bin/kuvasz-streamer"),
        (
            "-rw-r-----",
            "root     kuvasz",
            "/etc/kuvasz/kuvasz-streamer.toml",
        ),
        ("-rw-r-----", "root     kuvasz", "/etc/kuvasz/map.toml"),
        (
            "-rw-r--r--",
            "root     root",
            "/usr/lib/systemd/system/kuvasz-streamer.service",
        ),
        (
            "-rw-r--r--",
            "root     root",
            "/usr/share/man/man8/kuvasz-streamer.8.gz",
        ),
        (
            "-rw-r--r--",
            "root     root",
            "/usr/share/man/man5/kuvasz-streamer.toml.5.gz",
        ),
    ] {
        assert!(
            files
                .lines()
                .any(|l| l.starts_with(mode) && l.contains(owner) && l.ends_with(path)),
            "{path} ({mode} {owner}) not in\n{files}"
        );
    }
    assert_eq!(
        run("rpm", &["-qcp", rpm]),
        "/etc/kuvasz/kuvasz-streamer.toml\n/etc/kuvasz/map.toml\n"
    );
    let scripts = run("rpm", &["-qp", "--scripts", rpm]);
    assert!(
        scripts.contains("useradd -r -g kuvasz -d /nonexistent -s /sbin/nologin"),
        "{scripts}"
    );
}

/// The .deb passes lintian (installed by .ci/run) without an error or a warning: a
/// maintainer address, a Debian changelog and a copyright notice, as Debian wants.
#[test]
fn deb_passes_lintian() {
    build();
    let deb = package("target/debian", "deb");
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .expect("run lintian (installed by .ci/run)");
    let text = String::from_utf8_lossy(&out.stdout);
    let tags: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(tags.is_empty(), "lintian {}:\n{text}", deb.display());
    assert!(
        out.status.success(),
        "lintian failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
