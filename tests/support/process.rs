//! Server processes for test clusters: run them as the `postgres` user and make sure
//! none outlives the test process.
//!
//! Statics are never dropped, so a shared cluster cannot stop itself. Three layers
//! cover the ways a test process ends:
//! - normal exit (tests passed or failed): an `atexit` hook shuts every server down
//!   and removes this process's directory;
//! - abort or SIGKILL: every server gets `PR_SET_PDEATHSIG = SIGKILL`. The kernel
//!   sends it when the *thread* that forked the server exits, so all spawning happens
//!   on one manager thread that lives as long as the process;
//! - whatever those leave behind (a data directory, a SysV shared memory segment) is
//!   removed by the next test process to start a cluster.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of per-process directories in the base dir; the suffix is the owner's pid.
const ROOT_PREFIX: &str = "kvsz-test-";

/// The user servers run as. PostgreSQL refuses to run as root, so as root we switch to
/// `postgres`; otherwise servers simply run as the current user.
struct ServerUser {
    uid: libc::uid_t,
    gid: libc::gid_t,
    switch: bool,
}

fn server_user() -> &'static ServerUser {
    static USER: OnceLock<ServerUser> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: plain libc calls; getpwnam's static buffer is read before any other
        // call can reuse it (the OnceLock serializes this block).
        unsafe {
            if libc::geteuid() != 0 {
                return ServerUser {
                    uid: libc::geteuid(),
                    gid: libc::getegid(),
                    switch: false,
                };
            }
            let name = CString::new("postgres").unwrap();
            let pw = libc::getpwnam(name.as_ptr());
            assert!(
                !pw.is_null(),
                "tests run as root but there is no `postgres` user to run servers as \
                 (run .ci/install-postgres.sh)"
            );
            ServerUser {
                uid: (*pw).pw_uid,
                gid: (*pw).pw_gid,
                switch: true,
            }
        }
    })
}

/// Hands `path` to the server user (a no-op when not running as root).
pub fn give_to_server_user(path: &Path) {
    let user = server_user();
    if user.switch {
        chown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A command that runs `program` as the server user and dies with the test process.
pub fn server_command(program: &Path, cwd: &Path) -> Command {
    let user = server_user();
    let (uid, gid, switch) = (user.uid, user.gid, user.switch);
    // SAFETY: getpid is async-signal-safe and called here, before the fork.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env_remove("PGDATA");
    // SAFETY: between fork and exec the closure only makes async-signal-safe syscalls
    // and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if switch
                && (libc::setgroups(1, &gid) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            // After setuid: changing credentials clears the death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` on the manager thread, so that its death signal is tied to a thread
/// that never exits. The caller gets the `Child` and waits on it wherever it likes.
pub fn spawn(cmd: Command) -> io::Result<Child> {
    static MANAGER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let manager = MANAGER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-cluster-manager".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the cluster manager thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    manager
        .send((cmd, reply_tx))
        .expect("cluster manager thread is gone");
    reply_rx.recv().expect("cluster manager thread is gone")
}

/// Pids of running servers, for the exit hook.
static RUNNING: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

pub fn register(child: &Child) {
    lock_running().push(child.id() as libc::pid_t);
}

/// Forgets a server that has exited and been reaped: its pid may be reused.
pub fn unregister(child: &Child) {
    forget(child.id() as libc::pid_t);
}

fn forget(pid: libc::pid_t) {
    lock_running().retain(|&p| p != pid);
}

fn lock_running() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fast shutdown (SIGINT), as an administrator would; SIGKILL after a minute.
pub fn shut_down(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // Until reaped, the pid stays ours, so signalling it is safe.
    if matches!(child.try_wait(), Ok(Some(_))) {
        forget(pid);
        return;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    forget(pid);
}

static ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Where cluster directories go: `KVSZ_TEST_DIR`, else `/dev/shm`, else the temp dir.
/// On a tmpfs, file creation is cheap: CREATE DATABASE (about 300 files) takes 30 ms
/// instead of 300 ms on the ext4 disk of a small VM.
fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVSZ_TEST_DIR") {
        return dir.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.into();
    }
    std::env::temp_dir()
}

/// This process's directory for clusters, created on first use. Creating it also
/// installs the exit hook and removes what dead test processes left behind.
pub fn root() -> &'static Path {
    ROOT.get_or_init(|| {
        let base = base_dir();
        remove_stale_roots(&base);
        let root = base.join(format!("{ROOT_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        // Absolute, as the servers report their data directories.
        let root = root.canonicalize().unwrap();
        // Readable by the server user, which owns the cluster directories inside.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(stop_all_at_exit) };
        root
    })
}

/// Exit hook: immediate shutdown of every server (it still releases shared memory),
/// then removal of this process's directory.
extern "C" fn stop_all_at_exit() {
    // A test thread might still hold the lock if the process exits abnormally; the
    // death signal covers that case.
    let pids = match RUNNING.try_lock() {
        Ok(pids) => pids.clone(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().clone(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for &pid in &pids {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
    }
    for &pid in &pids {
        reap(pid, Duration::from_secs(10));
    }
    if let Some(root) = ROOT.get() {
        let _ = fs::remove_dir_all(root);
    }
}

/// Waits for child `pid` to exit, killing it after `timeout`.
fn reap(pid: libc::pid_t, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 {
            return; // reaped, or not our child (already reaped)
        }
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Removes `kvsz-test-<pid>` directories whose process is gone, with any server or
/// shared memory segment still recorded in their `postmaster.pid` files.
fn remove_stale_roots(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(ROOT_PREFIX))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if process_exists(pid) {
            continue;
        }
        if let Ok(clusters) = fs::read_dir(entry.path()) {
            for cluster in clusters.flatten() {
                clean_up_after_server(&cluster.path().join("data"));
            }
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Kills a leftover postmaster of `data_dir` and removes its SysV segment, checking
/// both still belong to that data directory (pids and segment ids get reused).
fn clean_up_after_server(data_dir: &Path) {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    if let Some(pid) = lines
        .first()
        .and_then(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // A postmaster's working directory is its data directory.
        let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
        if cwd.is_ok_and(|cwd| cwd == data_dir) {
            // SAFETY: verified above that this is the leftover server.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            thread::sleep(Duration::from_millis(100));
        }
    }
    // Line 7: "<shm key> <shm id>".
    let mut shm = lines.get(6).unwrap_or(&"").split_whitespace();
    let (Some(Ok(key)), Some(Ok(id))) = (
        shm.next().map(str::parse::<libc::key_t>),
        shm.next().map(str::parse::<libc::c_int>),
    ) else {
        return;
    };
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0
            && ds.shm_perm.__key == key
            && ds.shm_nattch == 0
        {
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}
