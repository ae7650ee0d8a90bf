//! The small HTTP server: `/healthz`, `/readyz`, `/metrics`, `/api/status` and `/`.
//!
//! One accept thread; each connection is read by a short-lived thread of its own with a
//! deadline, so a slow or malformed client never delays `/healthz` for others. One
//! request per connection (`Connection: close`): monitoring polls need nothing more.
//! Answers are built by [`route`], pure over a [`Status`], so the endpoints are
//! unit-tested without a socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::status::{now_ms, Status};

/// An answer: status code, content type, extra headers, body.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: String,
}

impl Answer {
    fn new(code: u16, content_type: &'static str, body: String) -> Answer {
        Answer {
            code,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to `method path` (query string ignored).
pub fn route(method: &str, url: &str, status: &Status) -> Answer {
    let path = url.split('?').next().unwrap_or(url);
    let known = matches!(
        path,
        "/" | "/index.html" | "/healthz" | "/readyz" | "/metrics" | "/api/status"
    );
    if !known {
        return Answer::new(404, TEXT, format!("no such endpoint: {path}\n"));
    }
    if method != "GET" && method != "HEAD" {
        let mut a = Answer::new(405, TEXT, format!("{method} is not allowed here\n"));
        a.headers.push(("Allow", "GET, HEAD"));
        return a;
    }
    let now = now_ms();
    match path {
        "/healthz" => Answer::new(200, TEXT, "ok\n".into()),
        "/readyz" => {
            let code = if status.not_ready().is_empty() {
                200
            } else {
                503
            };
            Answer::new(code, JSON, status.readiness_json())
        }
        "/metrics" => Answer::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            status.to_prometheus(now),
        ),
        "/api/status" => Answer::new(200, JSON, status.to_json(now)),
        _ => {
            // The page reads /api/status itself; rendering once here keeps the samples of
            // the sparkline moving even when nobody polls the API.
            let _ = status.to_json(now);
            Answer::new(200, "text/html; charset=utf-8", PAGE.to_string())
        }
    }
}

/// The running HTTP listener.
pub struct Http {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// The address it listens on (the port is the real one when 0 was asked for).
    pub address: String,
}

/// Connections served at once; more are answered 503 at once and closed.
const MAX_CONNECTIONS: usize = 64;
/// The longest a client may take to send its request head, and to read each part of
/// the answer: a stalled client holds one connection thread for this long at most.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads longer than this are refused (431).
const MAX_HEAD: usize = 8 * 1024;

impl Http {
    /// Binds `address` and serves `status` from a thread of its own.
    ///
    /// Not tiny_http: its connection pool queues a burst of connections behind four
    /// threads and sets no socket timeouts, so four clients that send half a request
    /// stop it answering anyone (`/healthz` included). Here each connection has a
    /// thread of its own, bounded in number and in time.
    pub fn start(address: &str, status: Arc<Status>) -> Result<Http, String> {
        let listener = TcpListener::bind(address)
            .map_err(|e| format!("server.address {address}: cannot listen: {e}"))?;
        let bound = listener
            .local_addr()
            .map_or_else(|_| address.to_string(), |a| a.to_string());
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("server.address {address}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || accept_loop(&listener, &flag, &status))
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        info!("HTTP on http://{bound}/ (/healthz /readyz /metrics /api/status)");
        Ok(Http {
            stop,
            handle: Some(handle),
            address: bound,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, status: &Arc<Status>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener, 200);
                continue;
            }
            Err(e) => {
                warn!("HTTP: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            let mut stream = stream;
            let _ = write_answer(
                &mut stream,
                &Answer::new(503, TEXT, "too many connections\n".into()),
                false,
            );
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (status, count) = (status.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("http-client".into())
            .spawn(move || {
                serve_one(stream, &status);
                count.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::Relaxed);
            warn!("HTTP: cannot start a connection thread: {e}");
        }
    }
}

/// Waits until the listener has a connection to accept, or `ms` passed.
fn wait_readable(listener: &TcpListener, ms: i32) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd we own.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

/// Reads one request head (bounded in size and time), answers it, closes.
fn serve_one(mut stream: TcpStream, status: &Status) {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            let a = Answer::new(431, TEXT, "request head too large\n".into());
            let _ = write_answer(&mut stream, &a, false);
            return;
        }
    };
    if !complete {
        // Slow, stalled or gone: nothing is owed to it.
        return;
    }
    let line = head
        .split(|b| *b == b'\r')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, url, version) = (parts.next(), parts.next(), parts.next());
    let answer = match (method, url, version) {
        (Some(m), Some(u), Some(v)) if v.starts_with("HTTP/1.") && u.starts_with('/') => {
            (route(m, u, status), m == "HEAD")
        }
        _ => (
            Answer::new(400, TEXT, "malformed request line\n".into()),
            false,
        ),
    };
    let _ = write_answer(&mut stream, &answer.0, answer.1);
}

fn write_answer(stream: &mut TcpStream, a: &Answer, head_only: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n",
        a.code,
        reason(a.code),
        a.content_type,
        a.body.len()
    );
    for (k, v) in &a.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&a.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The status page: one file, no external assets; it polls `/api/status` every 2 s.
const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kuvasz-streamer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em}
#meta{color:#666}table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.st{font-weight:600;padding:.1em .5em;border-radius:.8em}
.streaming{background:#d8f5d8;color:#135e13}.copying,.starting{background:#fff0c2;color:#7a5600}
.retrying,.stopped{background:#ffd9d9;color:#8a1212}.elsewhere{background:#e6eefc;color:#1d4487}.err{color:#8a1212;font-size:.9em}
#ready{font-weight:600}svg{vertical-align:middle}
</style></head><body>
<h1>kuvasz-streamer <span id="name"></span></h1>
<div id="meta">loading…</div>
<div id="ready"></div>
<h2>Sources</h2>
<table><thead><tr><th>Source</th><th>State</th><th>Lag</th><th>Lag (last minutes)</th>
<th>Received / confirmed LSN</th><th>Transactions</th><th>Changes</th><th>Rejected</th><th>Tables</th></tr></thead>
<tbody id="sources"></tbody></table>
<h2>Writers</h2>
<table><thead><tr><th>Writer</th><th>Queue</th><th>Commits</th><th>Changes</th><th>Last commit</th><th>Took</th></tr></thead>
<tbody id="writers"></tbody></table>
<script>
function esc(s){return String(s).replace(/[&<>"']/g,function(c){return {"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c];});}
function bytes(n){var u=["B","kB","MB","GB","TB"],i=0;while(n>=1024&&i<4){n/=1024;i++;}return (i?n.toFixed(1):n)+" "+u[i];}
function spark(v){if(!v.length)return "";if(v.length<2)v=[v[0],v[0]];var w=120,h=24,m=Math.max.apply(null,v.concat([1]));
var p=v.map(function(x,i){return (v.length<2?0:i*w/(v.length-1)).toFixed(1)+","+(h-1-x/m*(h-2)).toFixed(1);}).join(" ");
return '<svg width="'+w+'" height="'+h+'" role="img" aria-label="lag"><polyline fill="none" stroke="#3366cc" stroke-width="1.5" points="'+p+'"/></svg>';}
function tables(t){return t.map(function(x){var c=x.copy,s=esc(x.table);
if(c){s+=" — "+esc(c.state)+" "+c.rows+(c.estimated_rows!=null?" / ~"+c.estimated_rows:"")+" rows, "+bytes(c.bytes)+(c.state=="copying"&&c.eta_seconds!=null?", ETA "+c.eta_seconds+" s":"");}
return s;}).join("<br>");}
function show(d){
document.getElementById("name").textContent="— "+d.name;
document.getElementById("meta").textContent="version "+d.version+" · destination "+d.destination+" · up "+d.uptime_seconds+" s"+(d.live_instances>1?" · instance "+d.instance+" of "+d.live_instances+" live":"")+" · updated "+new Date().toLocaleTimeString();
document.getElementById("ready").textContent=d.ready?"Ready: every source is streaming":"Not ready";
document.getElementById("sources").innerHTML=d.sources.map(function(s){
return "<tr><td>"+esc(s.database+"/"+s.sid)+"<br><small>slot "+esc(s.slot)+(s.owner&&d.live_instances>1?"<br>owner "+esc(s.owner.instance)+(s.owner.instance==d.instance?" (this instance)":""):"")+"</small></td><td><span class='st "+s.state+"'>"+s.state+"</span>"+
(s.last_error?"<div class='err'>"+esc(s.last_error.message)+"</div>":"")+
(s.last_rejected?"<div class='err'>rejected on "+esc(s.last_rejected.table)+" at "+esc(s.last_rejected.lsn)+": "+esc(s.last_rejected.message)+"</div>":"")+
"</td><td class='n'>"+s.lag_seconds.toFixed(1)+" s<br>"+bytes(s.lag_bytes)+"</td><td>"+spark(s.lag_history)+"</td><td>"+s.received_lsn+"<br>"+s.confirmed_lsn+
"</td><td class='n'>"+s.transactions+"</td><td class='n'>"+s.changes+"</td><td class='n'>"+s.rejected+"</td><td>"+tables(s.tables)+"</td></tr>";}).join("");
document.getElementById("writers").innerHTML=d.writers.map(function(w){
return "<tr><td>writer "+w.id+"</td><td class='n'>"+w.queue+"</td><td class='n'>"+w.commits+"</td><td class='n'>"+w.changes+"</td><td>"+(w.last_commit?new Date(w.last_commit).toLocaleTimeString():"never")+"</td><td class='n'>"+(w.last_commit_seconds*1000).toFixed(1)+" ms</td></tr>";}).join("");}
function tick(){fetch("api/status",{cache:"no-store"}).then(function(r){return r.json();}).then(show).catch(function(e){document.getElementById("meta").textContent="cannot reach the daemon: "+e;});}
tick();setInterval(tick,2000);
</script></body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{SourceStatus, State};

    #[test]
    fn endpoints_answer_by_path_and_method() {
        let s = Arc::new(SourceStatus::new("shop", "1", "slot", "postgres://h/shop"));
        let st = Status::new("kv", "postgres://d/dw", vec![s.clone()], 1);
        assert_eq!(route("GET", "/healthz", &st).code, 200);
        let r = route("GET", "/readyz", &st);
        assert_eq!((r.code, r.content_type), (503, JSON));
        s.set_state(State::Streaming);
        assert_eq!(route("GET", "/readyz?x=1", &st).code, 200);
        assert_eq!(route("GET", "/nope", &st).code, 404);
        let r = route("POST", "/metrics", &st);
        assert_eq!(
            (r.code, r.headers.clone()),
            (405, vec![("Allow", "GET, HEAD")])
        );
        assert!(route("GET", "/", &st).body.contains("api/status"));
        assert!(route("HEAD", "/api/status", &st)
            .body
            .starts_with("{\"name\":\"kv\""));
    }
}
