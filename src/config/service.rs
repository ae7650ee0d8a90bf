//! The service configuration (SPEC §2): built-in defaults, then the TOML file, then
//! `KUVASZ_<SECTION>_<PARAM>` variables, then `--section.param` options. Each layer is
//! converted to the key's type as it is read, so an error names the layer it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, Origin};
use super::tree::{self, Node, Value};
use super::Args;

/// Where the configuration file is looked for when `--conf` is not given, in order.
pub const SEARCH_PATH: &[&str] = &[
    "./kuvasz-streamer.toml",
    "./conf/kuvasz-streamer.toml",
    "/etc/kuvasz/kuvasz-streamer.toml",
];

/// The prefix of environment variables that set keys.
const ENV_PREFIX: &str = "KUVASZ_";

/// The whole service configuration, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub logs: LogsConfig,
    pub database: DatabaseConfig,
    pub app: AppConfig,
    /// The configuration file that was read, if any.
    pub source_file: Option<PathBuf>,
    /// Things worth telling the operator (e.g. ignored keys of the Go implementation);
    /// returned rather than logged because logging is not set up yet at load time.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Name in logs and the destination's `application_name`.
    pub name: String,
    /// HTTP bind address, `host:port`.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfig {
    /// One of `error`, `warn`, `info`, `debug`, `trace` (normalised to lower case).
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    Text,
    /// One JSON object per line.
    Json,
}

/// `Debug` is written by hand: the URL may hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// Destination connection string (`postgres://…` or key=value). Never log it as is.
    pub url: String,
    /// Destination schema of all target tables.
    pub schema: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub map_file: PathBuf,
    /// Writer threads, one destination connection each; at least 1.
    pub num_workers: usize,
    /// Longest a change may wait before its destination commit.
    pub commit_delay: Duration,
    /// Source schema of map table keys without one.
    pub default_schema: String,
    /// Initial-sync rows per second, all sources together; > 0.
    pub sync_rate: f64,
    /// Rows the sync may run ahead of `sync_rate`; at least 1.
    pub sync_burst: u64,
    pub on_error: OnError,
    /// A source whose server sent nothing for this long (not even an answer to a
    /// keepalive asking for one) is taken for dead and reconnected, as PostgreSQL's own
    /// walreceiver does; zero turns the check off.
    pub wal_receiver_timeout: Duration,
    /// How long a writer may apply one batch before `/readyz` names it, with the
    /// sessions holding the lock it waits for; zero: never.
    pub writer_wait_timeout: Duration,
    /// A slot the source invalidated (its WAL removed): hold the source, or drop the slot
    /// and copy its tables again.
    pub on_slot_lost: OnSlotLost,
}

/// What to do when a source invalidated the daemon's slot (`max_slot_wal_keep_size`,
/// `idle_replication_slot_timeout`): the changes since its confirmed position are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSlotLost {
    /// Report it and wait for an operator.
    Hold,
    /// Drop the slot and copy every table of the source again.
    Recopy,
}

/// What to do with a row the destination rejects (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnError {
    /// Stop confirming at the change and retry it until fixed.
    Stop,
    /// Write it to `kvsz_deadletter` and go on.
    Deadletter,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "kuvasz-streamer".into(),
            address: "127.0.0.1:8000".into(),
        }
    }
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The URL has no default: it is required.
impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            schema: "public".into(),
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &"<hidden>")
            .field("schema", &self.schema)
            .finish()
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            map_file: PathBuf::from("/etc/kuvasz/map.toml"),
            num_workers: 2,
            commit_delay: Duration::from_secs(1),
            default_schema: "public".into(),
            sync_rate: 1e9,
            sync_burst: 1000,
            on_error: OnError::Stop,
            wal_receiver_timeout: Duration::from_secs(60),
            writer_wait_timeout: Duration::from_secs(120),
            on_slot_lost: OnSlotLost::Hold,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnError::Stop => "stop",
            OnError::Deadletter => "deadletter",
        })
    }
}

/// A number of seconds that must not be negative.
fn seconds(f: f64) -> Result<Duration, String> {
    if f < 0.0 {
        return Err(format!("must not be negative, found {f}"));
    }
    Duration::try_from_secs_f64(f).map_err(|_| format!("not a usable number of seconds: {f}"))
}

/// The type of a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    /// Integers are taken too: `commit_delay = 1` means one second.
    Float,
}

/// Every key this implementation understands, with its type.
const KEYS: &[(&str, Kind)] = &[
    ("server.name", Kind::Str),
    ("server.address", Kind::Str),
    ("logs.level", Kind::Str),
    ("logs.format", Kind::Str),
    ("database.url", Kind::Str),
    ("database.schema", Kind::Str),
    ("app.map_file", Kind::Str),
    ("app.num_workers", Kind::Int),
    ("app.commit_delay", Kind::Float),
    ("app.default_schema", Kind::Str),
    ("app.sync_rate", Kind::Float),
    ("app.sync_burst", Kind::Int),
    ("app.on_error", Kind::Str),
    ("app.wal_receiver_timeout", Kind::Float),
    ("app.writer_wait_timeout", Kind::Float),
    ("app.on_slot_lost", Kind::Str),
];

const SECTIONS: &[&str] = &["server", "logs", "database", "app"];

/// Whole sections of the Go implementation with no meaning here.
const GO_SECTIONS: &[&str] = &["cors", "auth", "maintenance"];

/// Keys of the Go implementation that this one ignores (SPEC §2: server timeouts, cors,
/// auth, maintenance, plus its other tuning knobs), so an existing file keeps working.
fn is_go_key(section: &str, param: &str) -> bool {
    let prefixed = |prefixes: &[&str]| prefixes.iter().any(|p| param.starts_with(p));
    match section {
        "server" => {
            param.contains("timeout")
                || prefixed(&["cors", "auth", "jwt", "maintenance"])
                || matches!(
                    param,
                    "max_goroutines" | "max_header_bytes" | "pprof" | "start_delay"
                )
        }
        // Its logs went to the console or a file; here they go to stderr (the journal
        // under systemd).
        "logs" => matches!(param, "source" | "output" | "file"),
        "database" => param == "origin",
        "app" => param == "map_database" || prefixed(&["maintenance", "jwt", "auth", "cors"]),
        _ => false,
    }
}

fn secret(key: &str) -> bool {
    key == "database.url"
}

/// A value converted to its key's type, before range checks.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Str(String),
    Int(i64),
    Float(f64),
}

/// What the layers set so far: key → value and where it came from. Later layers
/// replace earlier entries.
type Settings = BTreeMap<&'static str, (Typed, Origin)>;

impl Config {
    /// Reads the configuration: `args.conf`, else the first of [`SEARCH_PATH`] that
    /// exists (none is fine), then `env` (pass `std::env::vars()`), then
    /// `args.overrides`.
    pub fn load(args: &Args, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let search: Vec<PathBuf> = SEARCH_PATH.iter().map(PathBuf::from).collect();
        Self::load_from(args, env, &search)
    }

    /// [`Config::load`] with the search path given, for tests.
    pub(crate) fn load_from(
        args: &Args,
        env: &[(String, String)],
        search: &[PathBuf],
    ) -> Result<Config, ConfigError> {
        let mut settings = Settings::new();
        let mut warnings = Vec::new();

        let file = match &args.conf {
            Some(path) => Some(path.clone()),
            None => search.iter().find(|p| p.is_file()).cloned(),
        };
        if let Some(path) = &file {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                file: path.clone(),
                error,
            })?;
            read_file(path, &text, &mut settings, &mut warnings)?;
        }
        read_env(env, &mut settings, &mut warnings)?;
        for (key, value) in &args.overrides {
            let origin = Origin::Cli {
                option: format!("--{key}"),
            };
            set_text(key, value, origin, &mut settings, &mut warnings)?;
        }

        let mut config = Config {
            source_file: file.clone(),
            warnings,
            ..Config::default()
        };
        for (key, (value, origin)) in settings {
            config
                .apply(key, value)
                .map_err(|message| ConfigError::invalid(origin, key, message))?;
        }
        if config.database.url.is_empty() {
            return Err(ConfigError::Missing {
                key: "database.url".into(),
                searched: if file.is_none() {
                    search.to_vec()
                } else {
                    Vec::new()
                },
                file,
            });
        }
        Ok(config)
    }

    /// Checks one typed value and stores it.
    fn apply(&mut self, key: &str, value: Typed) -> Result<(), String> {
        match (key, value) {
            ("server.name", Typed::Str(s)) => self.server.name = non_empty(s)?,
            ("server.address", Typed::Str(s)) => self.server.address = address(&s)?,
            ("logs.level", Typed::Str(s)) => self.logs.level = level(&s)?,
            ("logs.format", Typed::Str(s)) => {
                self.logs.format = match s.to_ascii_lowercase().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(format!("expected \"text\" or \"json\", found {s:?}")),
                }
            }
            ("database.url", Typed::Str(s)) => {
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                self.database.url = s;
            }
            ("database.schema", Typed::Str(s)) => self.database.schema = non_empty(s)?,
            ("app.map_file", Typed::Str(s)) => self.app.map_file = PathBuf::from(non_empty(s)?),
            ("app.num_workers", Typed::Int(i)) => {
                self.app.num_workers = usize::try_from(i)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("must be at least 1, found {i}"))?;
            }
            ("app.commit_delay", Typed::Float(f)) => self.app.commit_delay = seconds(f)?,
            ("app.wal_receiver_timeout", Typed::Float(f)) => {
                self.app.wal_receiver_timeout = seconds(f)?;
            }
            ("app.writer_wait_timeout", Typed::Float(f)) => {
                self.app.writer_wait_timeout = seconds(f)?;
            }
            ("app.default_schema", Typed::Str(s)) => self.app.default_schema = non_empty(s)?,
            ("app.sync_rate", Typed::Float(f)) => {
                if f <= 0.0 {
                    return Err(format!("must be greater than 0, found {f}"));
                }
                self.app.sync_rate = f;
            }
            ("app.sync_burst", Typed::Int(i)) => {
                self.app.sync_burst = u64::try_from(i)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("must be at least 1, found {i}"))?;
            }
            ("app.on_slot_lost", Typed::Str(s)) => {
                self.app.on_slot_lost = match s.to_ascii_lowercase().as_str() {
                    "hold" => OnSlotLost::Hold,
                    "recopy" => OnSlotLost::Recopy,
                    _ => return Err(format!("expected \"hold\" or \"recopy\", found {s:?}")),
                };
            }
            ("app.on_error", Typed::Str(s)) => {
                self.app.on_error = match s.to_ascii_lowercase().as_str() {
                    "stop" => OnError::Stop,
                    "deadletter" => OnError::Deadletter,
                    _ => return Err(format!("expected \"stop\" or \"deadletter\", found {s:?}")),
                }
            }
            (key, _) => return Err(format!("internal error: {key} has the wrong type")),
        }
        Ok(())
    }
}

fn non_empty(s: String) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s)
    }
}

/// The Go implementation's levels included `err` and `warning`, case-insensitively.
fn level(s: &str) -> Result<String, String> {
    let l = s.to_ascii_lowercase();
    let canonical = match l.as_str() {
        "err" => "error",
        "warning" => "warn",
        other => other,
    };
    if ["error", "warn", "info", "debug", "trace"].contains(&canonical) {
        Ok(canonical.to_string())
    } else {
        Err(format!(
            "expected one of error, warn, info, debug, trace; found {s:?}"
        ))
    }
}

/// `host:port` (IPv6 in brackets). Go's `:8000` (all interfaces) becomes `0.0.0.0:8000`
/// so an old file binds as it did.
fn address(s: &str) -> Result<String, String> {
    let bad = || format!("expected host:port, found {s:?}");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() {
        return Ok(format!("0.0.0.0:{port}"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "expected host:port (an IPv6 address in brackets), found {s:?}"
        ));
    }
    Ok(s.to_string())
}

/// Walks the file's sections into `settings`.
fn read_file(
    file: &Path,
    text: &str,
    settings: &mut Settings,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let root = tree::parse(text).map_err(|e| ConfigError::syntax(file, text, &e))?;
    let Value::Table(sections) = root.value else {
        return Ok(());
    };
    for (section_key, section) in sections {
        let section_name = section_key.name.as_str();
        let at = |offset| Origin::at(file, text, offset);
        let section_at = section_key.offset(&section, 0);
        if GO_SECTIONS.contains(&section_name) {
            warnings.push(format!(
                "{}: [{section_name}]: section of the Go implementation, ignored",
                at(section_at)
            ));
            continue;
        }
        if !SECTIONS.contains(&section_name) {
            let what = if matches!(section.value, Value::Table(_)) {
                "unknown section"
            } else {
                "unknown key; settings belong in a section"
            };
            return Err(ConfigError::invalid(
                at(section_at),
                tree::join("", section_name),
                format!("{what} (sections: {})", SECTIONS.join(", ")),
            ));
        }
        let Value::Table(entries) = section.value else {
            return Err(ConfigError::invalid(
                at(section_at),
                section_name,
                format!(
                    "expected a table ([{section_name}]), found {}",
                    section.value.describe(false)
                ),
            ));
        };
        for (key, node) in entries {
            let full = tree::join(section_name, &key.name);
            let origin = at(key.offset(&node, section_at));
            set_node(
                section_name,
                &key.name,
                &full,
                node,
                origin,
                settings,
                warnings,
            )?;
        }
    }
    Ok(())
}

/// Stores one file value after checking its key and type.
fn set_node(
    section: &str,
    param: &str,
    full: &str,
    node: Node,
    origin: Origin,
    settings: &mut Settings,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let Some((key, kind)) = KEYS.iter().find(|(k, _)| *k == full) else {
        return unknown(section, param, full, origin, warnings);
    };
    let typed = match (kind, node.value) {
        (Kind::Str, Value::String(s)) => Typed::Str(s),
        (Kind::Int, Value::Integer(i)) => Typed::Int(i),
        (Kind::Float, Value::Integer(i)) => Typed::Float(i as f64),
        (Kind::Float, Value::Float(f)) if f.is_finite() => Typed::Float(f),
        (kind, other) => {
            return Err(ConfigError::invalid(
                origin,
                full,
                format!(
                    "expected {}, found {}",
                    expected(*kind),
                    other.describe(secret(full))
                ),
            ))
        }
    };
    settings.insert(key, (typed, origin));
    Ok(())
}

/// Stores one value given as text (environment or command line).
fn set_text(
    full: &str,
    text: &str,
    origin: Origin,
    settings: &mut Settings,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let (section, param) = full.split_once('.').unwrap_or((full, ""));
    if GO_SECTIONS.contains(&section) {
        warnings.push(format!(
            "{origin}: {full}: setting of the Go implementation, ignored"
        ));
        return Ok(());
    }
    let Some((key, kind)) = KEYS.iter().find(|(k, _)| *k == full) else {
        return unknown(section, param, full, origin, warnings);
    };
    let found = || {
        if secret(full) || tree::looks_secret(text) {
            "a value (not shown)".to_string()
        } else {
            format!("{text:?}")
        }
    };
    let typed = match kind {
        Kind::Int => text
            .trim()
            .parse::<i64>()
            .map(Typed::Int)
            .map_err(|_| format!("expected an integer, found {}", found()))
            .map_err(|m| ConfigError::invalid(origin.clone(), full, m))?,
        Kind::Float => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Typed::Float)
            .ok_or_else(|| format!("expected a number, found {}", found()))
            .map_err(|m| ConfigError::invalid(origin.clone(), full, m))?,
        Kind::Str => Typed::Str(text.to_string()),
    };
    settings.insert(key, (typed, origin));
    Ok(())
}

/// An unknown key: a warning for the Go implementation's, an error otherwise.
fn unknown(
    section: &str,
    param: &str,
    full: &str,
    origin: Origin,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if is_go_key(section, param) {
        warnings.push(format!(
            "{origin}: {full}: setting of the Go implementation, ignored"
        ));
        return Ok(());
    }
    let known: Vec<&str> = KEYS
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(section)?.strip_prefix('.'))
        .collect();
    let message = if known.is_empty() {
        format!("unknown key (sections: {})", SECTIONS.join(", "))
    } else {
        format!("unknown key (known in [{section}]: {})", known.join(", "))
    };
    Err(ConfigError::invalid(origin, full, message))
}

fn expected(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Int => "an integer",
        Kind::Float => "a number",
    }
}

/// `KUVASZ_<SECTION>_<PARAM>`: the first word is the section, the rest (lower-cased,
/// underscores kept) the parameter, so `KUVASZ_APP_NUM_WORKERS` is `app.num_workers`.
fn read_env(
    env: &[(String, String)],
    settings: &mut Settings,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let origin = Origin::Env { var: var.clone() };
        let Some((section, param)) = rest
            .split_once('_')
            .filter(|(s, p)| !s.is_empty() && !p.is_empty())
        else {
            return Err(ConfigError::invalid(
                origin,
                if rest.is_empty() {
                    "(none)".to_string()
                } else {
                    rest.to_ascii_lowercase()
                },
                "not of the form KUVASZ_<SECTION>_<PARAM>",
            ));
        };
        let full = format!(
            "{}.{}",
            section.to_ascii_lowercase(),
            param.to_ascii_lowercase()
        );
        set_text(&full, value, origin, settings, warnings)?;
    }
    Ok(())
}

/// Every key this implementation understands, for checks against `--help`.
#[cfg(test)]
fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(k, _)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A file in a fresh temporary directory.
    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvsz-config-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kuvasz-streamer.toml");
        fs::write(&f, text).unwrap();
        f
    }

    fn args(conf: &Path, overrides: &[(&str, &str)]) -> Args {
        Args {
            conf: Some(conf.to_path_buf()),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: &str = "[database]\nurl = \"postgres://u:hunter2@localhost/db\"\n";

    fn load(name: &str, text: &str) -> Result<Config, ConfigError> {
        let f = temp_file(name, text);
        Config::load(&args(&f, &[]), &[])
    }

    #[test]
    fn defaults_with_only_the_url() {
        let c = load("defaults", URL).unwrap();
        assert_eq!(c.server.name, "kuvasz-streamer");
        assert_eq!(c.server.address, "127.0.0.1:8000");
        assert_eq!(c.logs.level, "info");
        assert_eq!(c.logs.format, LogFormat::Text);
        assert_eq!(c.database.url, "postgres://u:hunter2@localhost/db");
        assert_eq!(c.database.schema, "public");
        assert_eq!(c.app.map_file, PathBuf::from("/etc/kuvasz/map.toml"));
        assert_eq!(c.app.num_workers, 2);
        assert_eq!(c.app.commit_delay, Duration::from_secs(1));
        assert_eq!(c.app.default_schema, "public");
        assert_eq!(c.app.sync_rate, 1e9);
        assert_eq!(c.app.sync_burst, 1000);
        assert_eq!(c.app.on_error, OnError::Stop);
        assert!(c.warnings.is_empty());
        assert!(c.source_file.is_some());
    }

    #[test]
    fn every_key_from_the_file() {
        let c = load(
            "full",
            "[server]\nname = \"kv1\"\naddress = \"0.0.0.0:9000\"\n\
             [logs]\nlevel = \"DEBUG\"\nformat = \"json\"\n\
             [database]\nurl = \"host=h dbname=d\"\nschema = \"dw\"\n\
             [app]\nmap_file = \"/tmp/m.toml\"\nnum_workers = 8\ncommit_delay = 0.25\n\
             default_schema = \"src\"\nsync_rate = 5000\nsync_burst = 10\non_error = \"deadletter\"\n",
        )
        .unwrap();
        assert_eq!(c.server.name, "kv1");
        assert_eq!(c.server.address, "0.0.0.0:9000");
        assert_eq!(c.logs.level, "debug");
        assert_eq!(c.logs.format, LogFormat::Json);
        assert_eq!(c.database.schema, "dw");
        assert_eq!(c.app.map_file, PathBuf::from("/tmp/m.toml"));
        assert_eq!(c.app.num_workers, 8);
        assert_eq!(c.app.commit_delay, Duration::from_millis(250));
        assert_eq!(c.app.default_schema, "src");
        assert_eq!(c.app.sync_rate, 5000.0);
        assert_eq!(c.app.sync_burst, 10);
        assert_eq!(c.app.on_error, OnError::Deadletter);
    }

    #[test]
    fn syntax_error_names_file_line_and_key() {
        let text = format!("{URL}[app]\nnum_workers = = 3\n");
        let f = temp_file("syntax", &text);
        let e = Config::load(&args(&f, &[]), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(4));
        assert_eq!(e.key(), Some("app.num_workers"));
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}:4:", f.display())), "{s}");
        assert!(!s.contains('\n'), "{s}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = format!("{URL}\n[app]\nnum_workers = 2\nbogus_key = 1\n");
        let f = temp_file("unknown", &text);
        let e = Config::load(&args(&f, &[]), &[]).unwrap_err();
        assert_eq!(e.line(), Some(6));
        assert_eq!(e.key(), Some("app.bogus_key"));
        let s = e.to_string();
        assert!(
            s.starts_with(&format!("{}:6: app.bogus_key: unknown key", f.display())),
            "{s}"
        );
        assert!(s.contains("num_workers"), "{s}");
    }

    #[test]
    fn unknown_section_and_dotted_unknown_key() {
        let e = load("unknown-section", &format!("{URL}[bogus]\nx = 1\n")).unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(3), Some("bogus")));
        let e = load("unknown-dotted", &format!("{URL}[app]\nsub.x = 1\n")).unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(4), Some("app.sub")));
        let e = load("root-key", &format!("x = 1\n{URL}")).unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(1), Some("x")));
        let e = load("section-not-table", &format!("app = 3\n{URL}")).unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(1), Some("app")));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let f = temp_file("type", &format!("{URL}[app]\nnum_workers = \"four\"\n"));
        let e = Config::load(&args(&f, &[]), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:4: app.num_workers: expected an integer, found string \"four\"",
                f.display()
            )
        );
        let e = load(
            "type-float",
            &format!("{URL}[app]\ncommit_delay = \"1s\"\n"),
        )
        .unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(4), Some("app.commit_delay")));
        let e = load("type-str", &format!("{URL}[logs]\nlevel = 3\n")).unwrap_err();
        assert!(
            e.to_string().contains("expected a string, found integer 3"),
            "{e}"
        );
        let e = load(
            "type-url",
            "[database]\nurl = [\"postgres://u:hunter2@h/d\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("database.url"));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn values_out_of_range() {
        for (name, text, key) in [
            ("workers0", "[app]\nnum_workers = 0\n", "app.num_workers"),
            (
                "delay-neg",
                "[app]\ncommit_delay = -1\n",
                "app.commit_delay",
            ),
            ("rate0", "[app]\nsync_rate = 0.0\n", "app.sync_rate"),
            ("burst-neg", "[app]\nsync_burst = -5\n", "app.sync_burst"),
            ("level", "[logs]\nlevel = \"loud\"\n", "logs.level"),
            ("format", "[logs]\nformat = \"xml\"\n", "logs.format"),
            ("on-error", "[app]\non_error = \"skip\"\n", "app.on_error"),
            (
                "address",
                "[server]\naddress = \"8000\"\n",
                "server.address",
            ),
            (
                "schema",
                "[app]\ndefault_schema = \" \"\n",
                "app.default_schema",
            ),
        ] {
            let e = load(name, &format!("{URL}{text}")).unwrap_err();
            assert_eq!((e.line(), e.key()), (Some(4), Some(key)), "{name}: {e}");
        }
        let e = load("url-empty", "[database]\nurl = \"\"\n").unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(2), Some("database.url")), "{e}");
    }

    #[test]
    fn go_compatible_values() {
        let c = load(
            "go-values",
            &format!("{URL}[server]\naddress = \":8000\"\n[logs]\nlevel = \"warning\"\n[app]\ncommit_delay = 2\n"),
        )
        .unwrap();
        assert_eq!(c.server.address, "0.0.0.0:8000");
        assert_eq!(c.logs.level, "warn");
        assert_eq!(c.app.commit_delay, Duration::from_secs(2));
        let c = load("v6", &format!("{URL}[server]\naddress = \"[::1]:0\"\n")).unwrap();
        assert_eq!(c.server.address, "[::1]:0");
    }

    #[test]
    fn missing_url_names_the_key_and_file() {
        let f = temp_file("nourl", "[app]\nnum_workers = 2\n");
        let e = Config::load(&args(&f, &[]), &[]).unwrap_err();
        assert_eq!(e.key(), Some("database.url"));
        let s = e.to_string();
        assert!(s.contains(&f.display().to_string()), "{s}");
        assert!(s.contains("KUVASZ_DATABASE_URL"), "{s}");
    }

    #[test]
    fn missing_file_given_explicitly_is_an_error() {
        let a = args(Path::new("/nonexistent/kvsz.toml"), &[]);
        let e = Config::load(&a, &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/kvsz.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn search_path_and_no_file() {
        let f = temp_file("search", &format!("{URL}[app]\nnum_workers = 3\n"));
        let missing = f.with_file_name("absent.toml");
        let a = Args::default();
        let c = Config::load_from(&a, &[], &[missing.clone(), f.clone()]).unwrap();
        assert_eq!(c.source_file.as_deref(), Some(f.as_path()));
        assert_eq!(c.app.num_workers, 3);

        // No file at all: defaults + environment are enough.
        let e = env(&[("KUVASZ_DATABASE_URL", "postgres://u:hunter2@h/d")]);
        let c = Config::load_from(&a, &e, std::slice::from_ref(&missing)).unwrap();
        assert_eq!(c.source_file, None);
        assert_eq!(c.database.url, "postgres://u:hunter2@h/d");

        let err = Config::load_from(&a, &[], std::slice::from_ref(&missing)).unwrap_err();
        let s = err.to_string();
        assert!(
            s.contains("database.url") && s.contains("absent.toml"),
            "{s}"
        );
    }

    #[test]
    fn environment_overrides_file_and_cli_overrides_both() {
        let f = temp_file(
            "precedence",
            &format!("{URL}[app]\nnum_workers = 3\nsync_burst = 7\ncommit_delay = 0.5\n"),
        );
        let e = env(&[
            ("KUVASZ_APP_NUM_WORKERS", "4"),
            ("KUVASZ_APP_SYNC_BURST", "9"),
            ("KUVASZ_LOGS_LEVEL", "debug"),
            ("PATH", "/usr/bin"),
        ]);
        let c = Config::load(&args(&f, &[]), &e).unwrap();
        assert_eq!(c.app.num_workers, 4);
        assert_eq!(c.app.sync_burst, 9);
        assert_eq!(c.app.commit_delay, Duration::from_millis(500));
        assert_eq!(c.logs.level, "debug");

        let a = args(&f, &[("app.num_workers", "5"), ("app.commit_delay", "0")]);
        let c = Config::load(&a, &e).unwrap();
        assert_eq!(c.app.num_workers, 5);
        assert_eq!(c.app.sync_burst, 9);
        assert_eq!(c.app.commit_delay, Duration::ZERO);
    }

    #[test]
    fn later_invalid_layer_is_reported_even_if_file_is_fine() {
        let f = temp_file("env-bad", URL);
        let e = env(&[("KUVASZ_APP_NUM_WORKERS", "four")]);
        let err = Config::load(&args(&f, &[]), &e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable KUVASZ_APP_NUM_WORKERS: app.num_workers: expected an integer, found \"four\""
        );
        let err = Config::load(&args(&f, &[("app.num_workers", "0")]), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "option --app.num_workers: must be at least 1, found 0"
        );
        let err = Config::load(&args(&f, &[("app.sync_rate", "fast")]), &[]).unwrap_err();
        assert_eq!(err.key(), Some("app.sync_rate"));
        // An invalid file value replaced by a later layer is not an error.
        let f = temp_file("env-fix", &format!("{URL}[app]\nnum_workers = 0\n"));
        let c = Config::load(&args(&f, &[("app.num_workers", "1")]), &[]).unwrap();
        assert_eq!(c.app.num_workers, 1);
    }

    #[test]
    fn unknown_environment_variables_are_errors() {
        let f = temp_file("env-unknown", URL);
        for var in [
            "KUVASZ_APP_BOGUS",
            "KUVASZ_BOGUS_X",
            "KUVASZ_APP",
            "KUVASZ_",
        ] {
            let e = env(&[(var, "1")]);
            let err = Config::load(&args(&f, &[]), &e).unwrap_err();
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
        let err = Config::load(&args(&f, &[("app.bogus", "1")]), &[]).unwrap_err();
        assert_eq!(
            err.to_string().split(':').next(),
            Some("option --app.bogus")
        );
    }

    #[test]
    fn go_keys_are_accepted_with_a_warning() {
        let text = format!(
            "[server]\nname = \"x\"\naddress = \":8000\"\nread_timeout = 30\nwrite_timeout = 30\n\
             idle_timeout = 30\nread_header_timeout = 30\nmax_goroutines = 100\npprof = \"127.0.0.1:6060\"\n\
             [logs]\nlevel = \"debug\"\nsource = false\n\
             {URL}\
             [app]\nmap_file = \"/etc/kuvasz/map.yaml\"\nmap_database = \"\"\n\
             [cors]\nallowed_origins = [\"*\"]\nmax_age = 86400\n\
             [auth]\nadmin_password = \"x\"\njwt_key = \"k\"\n\
             [maintenance]\npprof = \"x\"\n"
        );
        let f = temp_file("go-keys", &text);
        let e = env(&[
            ("KUVASZ_SERVER_SHUTDOWN_TIMEOUT", "10"),
            ("KUVASZ_AUTH_TTL", "300"),
        ]);
        let c = Config::load(&args(&f, &[]), &e).unwrap();
        assert_eq!(c.warnings.len(), 13, "{:#?}", c.warnings);
        assert!(c.warnings[0].starts_with(&format!("{}:4: server.read_timeout:", f.display())));
        assert!(c.warnings.iter().any(|w| w.contains("[cors]")));
        assert!(c.warnings.iter().any(|w| w.contains("KUVASZ_AUTH_TTL")));
        assert!(c.warnings.iter().all(|w| !w.contains("hunter2")));
    }

    /// The keys of the Go implementation's own test configuration, as it writes them.
    #[test]
    fn the_go_test_configuration_starts() {
        let text = "[server]\nname = \"kuvasz-streamer\"\naddress = \":8001\"\n\
            max_goroutines = 100\nread_timeout = 30\nread_header_timeout = 30\n\
            write_timeout = 30\nidle_timeout = 30\nmax_header_bytes = 1000\n\n\
            [maintenance]\npprof = \"127.0.0.1:6060\"\nstart_delay = 5\n\n\
            [logs]\noutput=\"console\"\nlevel=\"debug\"\nformat=\"text\"\nsource=false\n\n\
            [database]\nurl = \"postgres://kuvasz:kuvasz@127.0.0.1:6012/dest?application_name=x\"\n\n\
            [app]\nmap_file = \"./conf/map.yaml\"\nnum_workers = 2\ncommit_delay = 1.0";
        let f = temp_file("go-test-conf", text);
        let c = Config::load(&args(&f, &[]), &env(&[])).unwrap();
        assert_eq!(c.logs.level, "debug");
        assert_eq!(c.app.num_workers, 2);
        assert!(
            c.warnings.iter().any(|w| w.contains("logs.output")),
            "{:#?}",
            c.warnings
        );
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let c = load("debug", URL).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let f = temp_file("secret-cli", URL);
        let err = Config::load(&args(&f, &[("database.url", "")]), &[]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn every_key_is_in_the_help() {
        for key in known_keys() {
            assert!(super::super::usage().contains(key), "{key}");
        }
    }
}
