//! Network namespaces for fault tests: the daemon runs inside one, and reaches each
//! server through a veth pair of its own ("link") that a test can cut and heal.
//!
//! Each link is a /30 in 10.200.0.0/13: the host side holds `.1` (servers listen there,
//! see [`Cluster::listen_on`](super::Cluster::listen_on)), the namespace side `.2`
//! (the daemon's HTTP server can bind there, and its connections come from there).
//!
//! A cut drops every IPv4 packet of the link silently, in both directions, where it
//! arrives: an ingress `u32` filter on each end redirects it (`mirred`) to a sink
//! device that is kept down, which makes the kernel drop it. Nothing reaches either
//! endpoint: no RST, no FIN, no ICMP, and a sender's own stack sees no error, so
//! established TCP connections stay ESTABLISHED and keep retransmitting, exactly as
//! across a real partition. ARP still passes, so neighbours stay reachable and the
//! kernel does not answer a sender with "host unreachable" either. (The test machines'
//! kernel has neither `netem` nor `gact`, and `ip link set … down` is no clean
//! partition: the host's route to the namespace side falls back to the default route,
//! so packets leak out of the machine, and ARP for the host side fails inside.)
//! Healing removes the filters; TCP retransmissions then go through.
//!
//! A kernel notice "tc mirred to Houston: device … is down" (rate-limited) is logged
//! while packets are dropped.
//!
//! Requires root (`ip netns`, `tc`).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Once;

/// Prefix of namespace names: `kvsz<pid>-<n>`.
const NS_PREFIX: &str = "kvsz";
/// 10.200.0.0/13: 131,072 /30 subnets.
const NET_BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);
const SUBNETS: u32 = 1 << 17;
/// Name of the sink device inside the namespace (the host side has a unique name).
const NS_SINK: &str = "sink";
/// Preference of the cut's filter on an ingress qdisc.
const CUT_PREF: &str = "7";
/// Preference of [`Netns::cut_port`]'s filters, which healing leaves in place.
const PORT_PREF: &str = "6";

/// One veth pair between the host and the namespace.
struct Link {
    name: String,
    /// Interface in the host namespace, unique on the host: `kv<pid>_<n>`.
    host_if: String,
    /// Interface inside the namespace: `l<index>`.
    ns_if: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    cut: AtomicBool,
}

/// A network namespace with one veth link per name, removed on drop (with its links),
/// even when the test panics.
pub struct Netns {
    name: String,
    links: Vec<Link>,
    /// Down device on the host that host-side cut filters send packets to.
    host_sink: String,
}

impl Netns {
    /// A new namespace with `lo` up and one link per name in `links`, e.g.
    /// `Netns::new(&["source", "dest"])`.
    pub fn new(links: &[&str]) -> Netns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static CLEAN: Once = Once::new();
        CLEAN.call_once(remove_stale);
        let pid = std::process::id();
        let name = format!(
            "{NS_PREFIX}{pid}-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        // From here on, drop cleans up whatever was made if a step panics.
        let mut ns = Netns {
            name,
            links: Vec::new(),
            host_sink: host_if_name(),
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        // The sink: a veth pair kept down, one end on each side.
        ip(&[
            "link",
            "add",
            &ns.host_sink,
            "type",
            "veth",
            "peer",
            "name",
            NS_SINK,
            "netns",
            &ns.name,
        ]);
        for (i, link) in links.iter().enumerate() {
            assert!(
                !ns.links.iter().any(|l| l.name == *link),
                "link {link:?} given twice"
            );
            let host_if = host_if_name();
            let ns_if = format!("l{i}");
            let (host_addr, ns_addr) = free_subnet();
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name,
            ]);
            ns.links.push(Link {
                name: link.to_string(),
                host_if: host_if.clone(),
                ns_if: ns_if.clone(),
                host_addr,
                ns_addr,
                cut: AtomicBool::new(false),
            });
            ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
            ip(&["link", "set", &host_if, "up"]);
            ns.exec_ok(&["ip", "addr", "add", &format!("{ns_addr}/30"), "dev", &ns_if]);
            ns.exec_ok(&["ip", "link", "set", &ns_if, "up"]);
            // The ingress qdiscs the cut's filters hang on.
            tc(None, &["qdisc", "add", "dev", &host_if, "ingress"]);
            tc(Some(&ns.name), &["qdisc", "add", "dev", &ns_if, "ingress"]);
        }
        ns
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn link(&self, name: &str) -> &Link {
        self.links
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("namespace {} has no link {name:?}", self.name))
    }

    /// The host side of `link`: where a server the namespace reaches through this link
    /// listens.
    pub fn host_addr(&self, link: &str) -> Ipv4Addr {
        self.link(link).host_addr
    }

    /// The namespace side of `link`: where a server inside the namespace (the daemon's
    /// HTTP) is reached from the host.
    pub fn ns_addr(&self, link: &str) -> Ipv4Addr {
        self.link(link).ns_addr
    }

    /// Drops every IPv4 packet of `link` from now on, both ways, silently.
    pub fn cut(&self, link: &str) {
        let l = self.link(link);
        assert!(
            !l.cut.swap(true, Ordering::SeqCst),
            "link {link} already cut"
        );
        tc(None, &cut_filter(&l.host_if, &self.host_sink));
        tc(Some(&self.name), &cut_filter(&l.ns_if, NS_SINK));
    }

    /// Lets the packets of a cut `link` through again.
    pub fn heal(&self, link: &str) {
        let l = self.link(link);
        assert!(
            l.cut.swap(false, Ordering::SeqCst),
            "link {link} is not cut"
        );
        tc(None, &heal_filter(&l.host_if));
        tc(Some(&self.name), &heal_filter(&l.ns_if));
    }

    /// Drops, from now on and for good (healing does not undo it), the IPv4 TCP packets
    /// of `link` to and from port `ns_port` on the namespace side: one connection of a
    /// process inside, whose peer then never hears from it again (as when its host is
    /// gone), while new connections pass once the link is healed.
    pub fn cut_port(&self, link: &str, ns_port: u16) {
        let l = self.link(link);
        let port = ns_port.to_string();
        // Host side: packets from the port; namespace side: packets to it.
        tc(
            None,
            &port_filter(&l.host_if, "sport", &port, &self.host_sink),
        );
        tc(
            Some(&self.name),
            &port_filter(&l.ns_if, "dport", &port, NS_SINK),
        );
    }

    /// Whether `link` is cut.
    pub fn is_cut(&self, link: &str) -> bool {
        self.link(link).cut.load(Ordering::SeqCst)
    }

    /// A command running `program` inside the namespace (`ip netns exec`, which execs
    /// it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace; panics unless it succeeds. Standard output.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        String::from_utf8_lossy(&checked(cmd, &args.join(" ")).stdout).into_owned()
    }
}

impl Drop for Netns {
    /// Deletes the host ends of the veth pairs (which takes their peers along, even if a
    /// process still lives in the namespace), then the namespace. Never panics.
    fn drop(&mut self) {
        for dev in self
            .links
            .iter()
            .map(|l| l.host_if.as_str())
            .chain([self.host_sink.as_str()])
        {
            let _ = quiet(&["ip", "link", "del", dev]);
        }
        if let Err(e) = quiet(&["ip", "netns", "del", &self.name]) {
            eprintln!("netns {}: {e}", self.name);
        }
    }
}

/// `tc` arguments of the cut: every IPv4 packet arriving on `dev` goes to `sink`,
/// which is down, so the kernel drops it.
fn cut_filter<'a>(dev: &'a str, sink: &'a str) -> [&'a str; 21] {
    [
        "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "ip", "pref", CUT_PREF, "u32",
        "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", sink,
    ]
}

/// `tc` arguments dropping the TCP packets arriving on `dev` whose `field` ("sport" or
/// "dport") is `port`.
fn port_filter<'a>(dev: &'a str, field: &'a str, port: &'a str, sink: &'a str) -> [&'a str; 27] {
    [
        "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "ip", "pref", PORT_PREF, "u32",
        "match", "ip", "protocol", "6", "0xff", "match", "ip", field, port, "0xffff", "action",
        "mirred", "egress", "redirect", "dev", sink,
    ]
}

fn heal_filter(dev: &str) -> [&str; 8] {
    [
        "filter", "del", "dev", dev, "parent", "ffff:", "pref", CUT_PREF,
    ]
}

/// A host interface name unique on the host: `kv<pid>_<n>`, at most 15 bytes.
fn host_if_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "kv{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15, "interface name {name} too long");
    name
}

/// A /30 no host interface uses yet: (host side .1, namespace side .2). Starts at a
/// slot derived from the pid, so concurrent test processes rarely probe the same ones.
fn free_subnet() -> (Ipv4Addr, Ipv4Addr) {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(97) % SUBNETS,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let used =
        String::from_utf8_lossy(&checked(cmd(&["ip", "-o", "-4", "addr"]), "ip addr").stdout)
            .into_owned();
    for _ in 0..SUBNETS {
        let slot = NEXT.fetch_add(1, Ordering::SeqCst) % SUBNETS;
        let base = NET_BASE + slot * 4;
        let (host, ns) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        if !used.contains(&format!(" {host}/")) && !used.contains(&format!(" {ns}/")) {
            return (host, ns);
        }
    }
    panic!("no free /30 left in 10.200.0.0/13");
}

/// Removes the namespaces and host interfaces of test processes that are gone, and of
/// an earlier process with this one's pid (this runs before this process makes any).
/// (A process left inside such a namespace keeps it alive; deleting the host ends of
/// its veth pairs removes the links anyway.)
fn remove_stale() {
    let dead = |pid: &str| {
        let Ok(pid) = pid.parse::<i32>() else {
            return false;
        };
        if pid as u32 == std::process::id() {
            return true;
        }
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        !alive
    };
    if let Ok(links) = quiet(&["ip", "-o", "link"]) {
        // "12: kv123_4@if3: <…"
        for name in links.lines().filter_map(|l| l.split(": ").nth(1)) {
            let name = name.split('@').next().unwrap_or(name);
            let stale = name
                .strip_prefix("kv")
                .and_then(|rest| rest.split_once('_'))
                .is_some_and(|(pid, n)| n.parse::<u32>().is_ok() && dead(pid));
            if stale {
                let _ = quiet(&["ip", "link", "del", name]);
            }
        }
    }
    if let Ok(list) = quiet(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let stale = name
                .strip_prefix(NS_PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .is_some_and(|(pid, n)| n.parse::<u32>().is_ok() && dead(pid));
            if stale {
                let _ = quiet(&["ip", "netns", "del", name]);
            }
        }
    }
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// Runs `cmd`; panics with its output unless it succeeds.
fn checked(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `args`; its standard output, or why it failed.
fn quiet(args: &[&str]) -> Result<String, String> {
    let out = cmd(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip args…` on the host; panics unless it succeeds.
fn ip(args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    checked(c, &format!("ip {}", args.join(" ")));
}

/// `tc args…` on the host or inside namespace `ns`; panics unless it succeeds.
fn tc(ns: Option<&str>, args: &[&str]) {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => Command::new("tc"),
    };
    c.args(args);
    checked(c, &format!("tc {}", args.join(" ")));
}
