//! The daemon's HTTP endpoints, as a probe or an operator reads them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::daemon::Daemon;
use super::wait_for;

/// The address the daemon logged it listens on (`server.address = 127.0.0.1:0`).
pub fn address(d: &Daemon) -> String {
    wait_for(
        "the HTTP address in the log",
        Duration::from_secs(30),
        || {
            // This process's: a daemon started again in the same directory appends.
            let log = d.own_log();
            let at = log.find("HTTP on http://")? + "HTTP on http://".len();
            let rest = &log[at..];
            Some(rest[..rest.find('/')?].to_string())
        },
    )
}

/// One request over a fresh connection: status code, headers (lower-cased names), body.
pub fn request(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the daemon's HTTP address");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, head.to_ascii_lowercase(), body.to_string())
}

/// `GET path` over a fresh connection: status code and body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (code, _, body) = request(addr, "GET", path);
    (code, body)
}
