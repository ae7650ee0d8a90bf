//! `kuvasz-streamer`: command line, logging, and hand-over to the supervisor.

use std::io::Write;
use std::process::ExitCode;

use kuvasz_streamer::apply::writer::RejectPolicy;
use kuvasz_streamer::change::Sid;
use kuvasz_streamer::config::{self, Args, Command, Config, LogFormat, Map, Mode, OnError};
use kuvasz_streamer::daemon::{self, DaemonSettings, Signals};
use kuvasz_streamer::pg::conninfo::{redact_url, ConnInfo};
use kuvasz_streamer::source::SourceSpec;
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
    refuse_unsupported(&map, &config.app.map_file)?;
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

/// Map features this version does not implement yet stop the program at start: running
/// a history table as a clone, or ignoring a filter, would silently write wrong data.
fn refuse_unsupported(map: &Map, file: &std::path::Path) -> Result<(), String> {
    for family in &map.sources {
        for t in &family.tables {
            let what = if t.mode == Mode::History {
                Some("type = \"history\"")
            } else if t.filter.is_some() {
                Some("filter")
            } else if !t.set.is_empty() {
                Some("set")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(format!(
                    "{}: source {} table {}.{}: {what} is not supported by this version yet",
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
                writeln!(
                    f,
                    "{{\"ts\":\"{}\",\"level\":\"{}\",\"name\":{},\"target\":{},\"msg\":{}}}",
                    f.timestamp_millis(),
                    r.level(),
                    json_string(&name),
                    json_string(r.target()),
                    json_string(&r.args().to_string())
                )
            });
        }
    }
    let _ = b.try_init();
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn settings(l: &Loaded) -> DaemonSettings {
    let mut dest = l.dest.to_postgres_config();
    dest.application_name(&l.config.server.name);
    DaemonSettings {
        app_name: l.config.server.name.clone(),
        dest,
        dest_label: l.dest.redacted(),
        dest_schema: l.config.database.schema.clone(),
        num_workers: l.config.app.num_workers,
        commit_delay: l.config.app.commit_delay,
        on_error: match l.config.app.on_error {
            OnError::Stop => RejectPolicy::Stop,
            OnError::Deadletter => RejectPolicy::Deadletter,
        },
        sync_rate: l.config.app.sync_rate,
        sync_burst: l.config.app.sync_burst,
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
    let s = settings(&loaded);
    match daemon::run(&s, loaded.sources, &signals) {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Validates configuration and map and that every server answers.
fn check(args: &Args) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kuvasz-streamer: {e}");
            return ExitCode::from(2);
        }
    };
    let mut ok = true;
    println!("configuration: ok ({} source URL(s))", loaded.sources.len());
    match loaded.dest.to_postgres_config().connect(postgres::NoTls) {
        Ok(_) => println!("destination {}: ok", loaded.dest.redacted()),
        Err(e) => {
            ok = false;
            println!("destination {}: {e}", loaded.dest.redacted());
        }
    }
    for s in &loaded.sources {
        match s.conn.to_postgres_config().connect(postgres::NoTls) {
            Ok(_) => println!("source {} ({}): ok", s.label(), s.conn.redacted()),
            Err(e) => {
                ok = false;
                println!("source {} ({}): {e}", s.label(), s.conn.redacted());
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
