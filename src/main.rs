//! `kuvasz-streamer`: command line, logging, and hand-over to the supervisor.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use kuvasz_streamer::apply::writer::RejectPolicy;
use kuvasz_streamer::change::Sid;
use kuvasz_streamer::config::{self, Args, Command, Config, LogFormat, Map, OnError};
use kuvasz_streamer::daemon::{self, DaemonSettings, Signals};
use kuvasz_streamer::expr::TableExprs;
use kuvasz_streamer::http::Http;
use kuvasz_streamer::log_context;
use kuvasz_streamer::pg::connect::Endpoint;
use kuvasz_streamer::pg::conninfo::{redact_url, ConnInfo};
use kuvasz_streamer::sequences::Outcome;
use kuvasz_streamer::source::SourceSpec;
use kuvasz_streamer::status::{json_string, SourceStatus, Status};
use kuvasz_streamer::verify::Options;
use log::{error, info, warn};

fn main() -> ExitCode {
    kuvasz_streamer::memory::limit_arenas();
    let cmd = match config::parse_cli(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kuvasz-streamer: {e}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        Command::Version => {
            println!("kuvasz-streamer {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Help => {
            print!("{}", config::usage());
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(&args),
        Command::Check(args) => check(&args),
        Command::Sequences { args, margin } => sequences(&args, margin),
        Command::Verify { args, table, sid } => verify(&args, Options { table, sid }),
        Command::Resync { args, table, sid } => resync(&args, &table, sid.as_deref()),
    }
}

/// Loads files for a command: exit status 2 (printed) when they are wrong.
fn load_or_exit(args: &Args) -> Result<Loaded, ExitCode> {
    load(args).map_err(|e| {
        eprintln!("kuvasz-streamer: {e}");
        ExitCode::from(2)
    })
}

/// `verify`: exit 0 when every compared target equals its source, 1 when not (or when
/// something could not be compared).
fn verify(args: &Args, options: Options) -> ExitCode {
    let loaded = match load_or_exit(args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let dest = Endpoint::new(loaded.dest.clone(), &loaded.config.server.name);
    match kuvasz_streamer::verify::verify(
        &loaded.sources,
        &dest,
        &loaded.config.database.schema,
        &loaded.config.app.default_schema,
        &options,
    ) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            if report.equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("verify: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `resync`: marks the table; exit 1 when a slot had never copied it.
fn resync(args: &Args, table: &str, sid: Option<&str>) -> ExitCode {
    let loaded = match load_or_exit(args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let dest = Endpoint::new(loaded.dest.clone(), &loaded.config.server.name);
    let marked = match kuvasz_streamer::resync::resync(
        &loaded.sources,
        &dest,
        &loaded.config.database.schema,
        &loaded.config.app.default_schema,
        table,
        sid,
    ) {
        Ok(m) => m,
        Err(e) => {
            println!("resync: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for m in &marked {
        if m.rows == 0 {
            ok = false;
            println!(
                "source {}: {} was never copied for this slot: nothing to resync \
                 (the daemon copies it when it first sets the source up)",
                m.source, m.target
            );
        } else {
            println!(
                "source {}: {} marked to be copied again; the running daemon sets the \
                 source up again and copies it within 15 seconds (or at its next start)",
                m.source, m.target
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Everything that comes from files: the service configuration, the map, and the
/// source list they describe. Errors here exit with status 2.
struct Loaded {
    config: Config,
    sources: Vec<SourceSpec>,
    dest: ConnInfo,
}

fn load(args: &Args) -> Result<Loaded, String> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let config = Config::load(args, &env).map_err(|e| e.to_string())?;
    let dest = ConnInfo::parse(&config.database.url)
        .map_err(|e| format!("database.url: {}", redact_url(&e.to_string())))?;
    let map =
        Map::load(&config.app.map_file, &config.app.default_schema).map_err(|e| e.to_string())?;
    check_expressions(&map, &config.app.map_file)?;
    let mut sources = Vec::new();
    for family in &map.sources {
        for url in &family.urls {
            let conn = ConnInfo::parse(&url.url).map_err(|e| {
                format!(
                    "{}: source {} sid {}: {}",
                    config.app.map_file.display(),
                    family.database,
                    url.sid,
                    redact_url(&e.to_string())
                )
            })?;
            sources.push(SourceSpec {
                id: sources.len(),
                database: family.database.clone(),
                sid: Sid::new(&url.sid),
                slot: family.slot_name(url),
                conn,
                tables: family.tables.clone(),
                family_size: family.urls.len(),
            });
        }
    }
    Ok(Loaded {
        config,
        sources,
        dest,
    })
}

/// Every filter and set expression compiles, or the program stops at start naming the
/// table and the expression (SPEC §3).
fn check_expressions(map: &Map, file: &std::path::Path) -> Result<(), String> {
    for family in &map.sources {
        for t in &family.tables {
            if let Err(e) = TableExprs::compile(t) {
                return Err(format!(
                    "{}: source {} table {}.{}: {e}",
                    file.display(),
                    family.database,
                    t.schema,
                    t.table
                ));
            }
        }
    }
    Ok(())
}

/// Logging to stderr in text or one JSON object per line.
fn init_logging(config: &Config) {
    let mut b = env_logger::Builder::new();
    b.parse_filters(&config.logs.level);
    b.target(env_logger::Target::Stderr);
    let name = config.server.name.clone();
    match config.logs.format {
        LogFormat::Text => {
            b.format(move |f, r| {
                writeln!(
                    f,
                    "{} {:<5} {}: {}",
                    f.timestamp_millis(),
                    r.level(),
                    name,
                    r.args()
                )
            });
        }
        LogFormat::Json => {
            b.format(move |f, r| {
                let (source, sid) = match log_context::source() {
                    Some((d, s)) => (json_string(&d), json_string(&s)),
                    None => ("null".to_string(), "null".to_string()),
                };
                writeln!(
                    f,
                    "{{\"time\":\"{}\",\"level\":\"{}\",\"name\":{},\"source\":{source},\"sid\":{sid},\"message\":{}}}",
                    f.timestamp_millis(),
                    r.level(),
                    json_string(&name),
                    json_string(&r.args().to_string())
                )
            });
        }
    }
    let _ = b.try_init();
}

/// What `/api/status` and `/metrics` report, one entry per source URL and writer.
fn status(l: &Loaded) -> Arc<Status> {
    let sources = l
        .sources
        .iter()
        .map(|s| {
            Arc::new(SourceStatus::new(
                &s.database,
                s.sid.as_str(),
                &s.slot,
                &s.conn.redacted(),
            ))
        })
        .collect();
    let status = Status::new(
        &l.config.server.name,
        &l.dest.redacted(),
        sources,
        l.config.app.num_workers,
    );
    status.set_stuck_after(l.config.app.writer_wait_timeout);
    Arc::new(status)
}

/// SIGHUP: configuration and map read again; the sources they name, for the supervisor
/// to reconcile. Keys other than the map's that changed take effect at the next
/// restart, and are named.
fn reloader(args: &Args, running: &Config) -> daemon::Reload {
    let (args, running) = (args.clone(), running.clone());
    Arc::new(move || {
        let l = load(&args)?;
        for w in &l.config.warnings {
            warn!("{w}");
        }
        let (a, b) = (&running, &l.config);
        let mut changed = Vec::new();
        if a.server != b.server {
            changed.push("[server]");
        }
        if a.logs != b.logs {
            changed.push("[logs]");
        }
        if a.database != b.database {
            changed.push("[database]");
        }
        let mut app = b.app.clone();
        app.map_file = a.app.map_file.clone();
        app.default_schema = a.app.default_schema.clone();
        if a.app != app {
            changed.push("[app] (other than map_file and default_schema)");
        }
        if !changed.is_empty() {
            warn!(
                "SIGHUP: changes to {} take effect at the next restart of the service",
                changed.join(", ")
            );
        }
        Ok(l.sources)
    })
}

fn settings(l: &Loaded, status: Arc<Status>, reload: daemon::Reload) -> DaemonSettings {
    let ownership = Arc::new(kuvasz_streamer::ownership::Ownership::new());
    kuvasz_streamer::pg::session::mark_instance(&ownership.instance);
    DaemonSettings {
        app_name: l.config.server.name.clone(),
        dest: Endpoint::new(l.dest.clone(), &l.config.server.name),
        dest_schema: l.config.database.schema.clone(),
        num_workers: l.config.app.num_workers,
        commit_delay: l.config.app.commit_delay,
        on_error: match l.config.app.on_error {
            OnError::Stop => RejectPolicy::Stop,
            OnError::Deadletter => RejectPolicy::Deadletter,
        },
        sync_rate: l.config.app.sync_rate,
        sync_burst: l.config.app.sync_burst,
        wal_receiver_timeout: l.config.app.wal_receiver_timeout,
        on_slot_lost: l.config.app.on_slot_lost,
        status,
        reload: Some(reload),
        ownership,
    }
}

fn run(args: &Args) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kuvasz-streamer: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&loaded.config);
    for w in &loaded.config.warnings {
        warn!("{w}");
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(
        "kuvasz-streamer {} starting: {} source URL(s) → {} (schema {}), {} writer(s)",
        env!("CARGO_PKG_VERSION"),
        loaded.sources.len(),
        loaded.dest.redacted(),
        loaded.config.database.schema,
        loaded.config.app.num_workers
    );
    let status = status(&loaded);
    let http = match Http::start(&loaded.config.server.address, status.clone()) {
        Ok(h) => h,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let s = settings(&loaded, status, reloader(args, &loaded.config));
    let code = match daemon::run(&s, loaded.sources, &signals) {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    };
    http.stop();
    code
}

/// `sequences`: one line per destination sequence; exit 1 when a source could not be
/// read or a sequence is missing on the destination.
fn sequences(args: &Args, margin: i64) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kuvasz-streamer: {e}");
            return ExitCode::from(2);
        }
    };
    let dest = Endpoint::new(loaded.dest.clone(), &loaded.config.server.name);
    let report = match kuvasz_streamer::sequences::copy_sequences(
        &loaded.sources,
        &dest,
        &loaded.config.database.schema,
        margin,
    ) {
        Ok(r) => r,
        Err(e) => {
            println!("destination {}: {e}", loaded.dest.redacted());
            return ExitCode::FAILURE;
        }
    };
    let mut ok = report.problems.is_empty();
    for p in &report.problems {
        println!("{p}");
    }
    for (name, value, outcome) in &report.sequences {
        let source = value.map_or("never used".to_string(), |v| v.to_string());
        let line = match outcome {
            Outcome::Set { from, to } => format!(
                "set to {to} (was {})",
                from.map_or("never used".to_string(), |v| v.to_string())
            ),
            Outcome::Kept { at } => format!("kept at {at} (not lowered)"),
            Outcome::Unused => "unused on both sides: nothing to do".to_string(),
            Outcome::Missing => {
                ok = false;
                "MISSING on the destination: create it (or rename it) and run again".to_string()
            }
        };
        println!("sequence {name}: source {source}, margin {margin}: {line}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Validates configuration and map, and probes every server for what the daemon needs
/// of it: a report with what to change for each problem; exit 1 when there is one.
fn check(args: &Args) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kuvasz-streamer: {e}");
            return ExitCode::from(2);
        }
    };
    let report = kuvasz_streamer::check::run(&kuvasz_streamer::check::CheckInput {
        sources: &loaded.sources,
        dest: &loaded.dest,
        schema: &loaded.config.database.schema,
        app_name: &loaded.config.server.name,
    });
    print!("{}", report.render());
    if report.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
