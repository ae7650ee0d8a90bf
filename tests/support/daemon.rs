//! The daemon binary as a child process with its own config and map in a temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// A running `kuvasz-streamer`. Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    /// Length of `daemon.log` when this process started (earlier runs in `dir` wrote
    /// before it).
    log_start: usize,
}

/// A fresh directory for one daemon's files, removed when the test process exits.
pub fn work_dir() -> PathBuf {
    super::scratch_dir("daemon")
}

impl Daemon {
    /// Writes `kuvasz-streamer.toml` (destination URL, map path, a fast commit delay and
    /// `extra` lines appended to `[app]`) and `map.toml`, and starts the binary.
    pub fn start(dest_url: &str, map: &str, extra_app: &[&str]) -> Daemon {
        Self::start_in(dest_url, "", map, extra_app)
    }

    /// Like [`Daemon::start`], with `database_extra` lines in `[database]` (a schema).
    pub fn start_in(dest_url: &str, database_extra: &str, map: &str, extra_app: &[&str]) -> Daemon {
        Self::start_files(dest_url, database_extra, "map.toml", map, extra_app, "")
    }

    /// Like [`Daemon::start`], with `logs_extra` lines in `[logs]` (a format).
    pub fn start_logs(dest_url: &str, map: &str, logs_extra: &str) -> Daemon {
        Self::start_files(dest_url, "", "map.toml", map, &[], logs_extra)
    }

    /// Like [`Daemon::start`], with the map in the Go implementation's YAML format.
    pub fn start_yaml(dest_url: &str, map: &str) -> Daemon {
        Self::start_files(dest_url, "", "map.yaml", map, &[], "")
    }

    fn start_files(
        dest_url: &str,
        database_extra: &str,
        map_name: &str,
        map: &str,
        extra_app: &[&str],
        logs_extra: &str,
    ) -> Daemon {
        let dir = work_dir();
        write_files(
            &dir,
            "127.0.0.1:0",
            dest_url,
            database_extra,
            map_name,
            map,
            extra_app,
            logs_extra,
        );
        Self::spawn(dir)
    }

    /// Writes the files [`Daemon::start`] writes, with the HTTP server on
    /// `server_address` (e.g. a namespace's address, port 0), into a new directory,
    /// without starting anything: its path, for [`Daemon::spawn_in_netns`].
    pub fn write_config(
        server_address: &str,
        dest_url: &str,
        map: &str,
        extra_app: &[&str],
    ) -> PathBuf {
        let dir = work_dir();
        write_files(
            &dir,
            server_address,
            dest_url,
            "",
            "map.toml",
            map,
            extra_app,
            "",
        );
        dir
    }

    /// Starts the binary on the files of `dir` inside network namespace `ns`, logging to
    /// the same `daemon.log`. `ip netns exec` execs the binary, so the child's pid is
    /// the daemon's own: kill on drop, signals and [`Daemon::pid`] reach it.
    pub fn spawn_in_netns(dir: PathBuf, ns: &Netns) -> Daemon {
        let cmd = ns.command(env!("CARGO_BIN_EXE_kuvasz-streamer"));
        Self::spawn_command(cmd, dir)
    }

    /// Starts the binary again on the files of an earlier daemon.
    pub fn spawn(dir: PathBuf) -> Daemon {
        Self::spawn_command(Command::new(env!("CARGO_BIN_EXE_kuvasz-streamer")), dir)
    }

    /// Runs `cmd` (the binary, or a wrapper that execs it) with `--conf` of `dir`.
    fn spawn_command(mut cmd: Command, dir: PathBuf) -> Daemon {
        let log_start = fs::metadata(dir.join("daemon.log")).map_or(0, |m| m.len() as usize);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("open log");
        let child = cmd
            .arg("--conf")
            .arg(dir.join("kuvasz-streamer.toml"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kuvasz-streamer");
        Daemon {
            child: Some(child),
            dir,
            log_start,
        }
    }

    /// `kuvasz-streamer check` on the files of daemon directory `dir`: exit code and
    /// standard output.
    pub fn check(dir: &std::path::Path) -> (i32, String) {
        Self::command(dir, &["check"]).0
    }

    /// `kuvasz-streamer <args…> --conf <dir>/kuvasz-streamer.toml`: (exit code, standard
    /// output) and standard error.
    pub fn command(dir: &std::path::Path, args: &[&str]) -> ((i32, String), String) {
        let out = Command::new(env!("CARGO_BIN_EXE_kuvasz-streamer"))
            .args(args)
            .arg("--conf")
            .arg(dir.join("kuvasz-streamer.toml"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run kuvasz-streamer");
        (
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Process id of the running binary (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// What this process wrote to the log (not earlier runs in the same directory).
    pub fn own_log(&self) -> String {
        let log = self.log();
        log.get(self.log_start..).unwrap_or_default().to_string()
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGSTOP: the process is frozen, its connections stay open (an instance paused by
    /// a debugger, a VM freeze, a container runtime's pause).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Daemon::pause`].
    pub fn unpause(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGHUP: read configuration and map again.
    pub fn hup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// SIGTERM, then waits for exit; asserts a clean stop (status 0) within 30 s.
    /// Returns the directory so the same files can start it again.
    pub fn stop_ok(self) -> PathBuf {
        self.stop_by(libc::SIGTERM, Duration::from_secs(30))
    }

    /// Sends `sig` (SIGTERM or SIGINT) and asserts a clean stop (status 0) within
    /// `within`. Returns the directory so the same files can start it again.
    pub fn stop_by(mut self, sig: i32, within: Duration) -> PathBuf {
        self.signal(sig);
        let mut child = self.child.take().expect("running");
        let until = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "daemon exited with {status}; log:\n{}",
                    self.log()
                );
                return self.dir.clone();
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!(
                    "daemon did not stop within {within:?} of signal {sig}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to commit or confirm anything.
    pub fn kill(mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.dir.clone()
    }

    /// Waits until `n` sources report streaming (their initial sync is over).
    pub fn wait_streaming(&self, n: usize) {
        super::wait_for("sources streaming", Duration::from_secs(60), || {
            (self.log().matches("streaming from slot").count() >= n).then_some(())
        });
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// `kuvasz-streamer.toml` (HTTP on `server_address`, destination URL, map path, a fast
/// commit delay and `extra_app` lines appended to `[app]`) and the map, in `dir`.
#[allow(clippy::too_many_arguments)]
fn write_files(
    dir: &Path,
    server_address: &str,
    dest_url: &str,
    database_extra: &str,
    map_name: &str,
    map: &str,
    extra_app: &[&str],
    logs_extra: &str,
) {
    fs::write(dir.join(map_name), map).expect("write map");
    // KVSZ_TEST_LOG_LEVEL=debug shows what a failing test's daemon did.
    let level = std::env::var("KVSZ_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let mut conf = format!(
        "[server]\naddress = \"{server_address}\"\n[logs]\nlevel = \"{level}\"\n{logs_extra}\n[database]\nurl = \"{dest_url}\"\n\
         {database_extra}\n[app]\nmap_file = \"{}\"\ncommit_delay = 0.2\n",
        dir.join(map_name).display()
    );
    for line in extra_app {
        conf.push_str(line);
        conf.push('\n');
    }
    fs::write(dir.join("kuvasz-streamer.toml"), conf).expect("write config");
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("daemon log ({}):\n{}", self.dir.display(), self.log());
            }
        }
    }
}
