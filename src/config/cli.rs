//! The command line (SPEC §6). Parsed by hand: the grammar is tiny and the
//! `--section.param` options are open-ended, which argument crates handle poorly.

use std::path::PathBuf;

use super::error::ConfigError;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run(Args),
    /// Validate everything, print a report, exit.
    Check(Args),
    /// Copy the mapped tables' sequence values to the destination (upgrade switchover),
    /// each raised by `margin`.
    Sequences {
        args: Args,
        margin: i64,
    },
    /// Compare sources and targets (counts, then keyed hashes down to the differing
    /// keys), optionally of one table or one sid.
    Verify {
        args: Args,
        table: Option<String>,
        sid: Option<String>,
    },
    /// Have the running daemon copy `table` again (of every sid, or of `sid`).
    Resync {
        args: Args,
        table: String,
        sid: Option<String>,
    },
    Version,
    Help,
}

/// The options of `Run` and `Check`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args {
    /// `--conf FILE`; `None` means search the default locations.
    pub conf: Option<PathBuf>,
    /// `--section.param=value` in command-line order (a later one wins), e.g.
    /// `("app.num_workers", "4")`. Keys are checked by [`super::Config::load`].
    pub overrides: Vec<(String, String)>,
}

/// Parses argv without the program name:
/// `[check | sequences [--margin N] | verify [--table T] [--sid S] | resync TABLE [--sid S]]
/// [--conf FILE] [--section.param=value | --section.param value]...`,
/// or `--version`/`-V`, `--help`/`-h`.
pub fn parse_cli(args: impl IntoIterator<Item = String>) -> Result<Command, ConfigError> {
    let mut it = args.into_iter();
    let mut command: Option<&str> = None;
    let mut margin: Option<i64> = None;
    let mut table: Option<String> = None;
    let mut sid: Option<String> = None;
    let mut parsed = Args::default();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            "check" if command.is_none() => command = Some("check"),
            "sequences" if command.is_none() => command = Some("sequences"),
            "verify" if command.is_none() => command = Some("verify"),
            "resync" if command.is_none() => command = Some("resync"),
            _ if command == Some("resync") && table.is_none() && !arg.starts_with("--") => {
                table = Some(arg);
            }
            _ if matches!(command, Some("verify" | "resync"))
                && (option_is(&arg, "sid")
                    || (command == Some("verify") && option_is(&arg, "table"))) =>
            {
                let name = if option_is(&arg, "sid") {
                    "sid"
                } else {
                    "table"
                };
                let value = match arg.split_once('=') {
                    Some((_, v)) => v.to_string(),
                    None => next_value(&mut it, name)?,
                };
                if value.is_empty() {
                    return Err(usage_error(format!("--{name} needs a value")));
                }
                let slot = if name == "sid" { &mut sid } else { &mut table };
                if slot.replace(value).is_some() {
                    return Err(usage_error(format!("--{name} given twice")));
                }
            }
            _ if command == Some("sequences")
                && (arg == "--margin" || arg.starts_with("--margin=")) =>
            {
                let value = match arg.strip_prefix("--margin=") {
                    Some(v) => v.to_string(),
                    None => next_value(&mut it, "margin")?,
                };
                let n = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        usage_error(format!(
                            "--margin needs a whole number of at least 0, not {value:?}"
                        ))
                    })?;
                margin = Some(n);
            }
            _ => {
                let Some(body) = arg.strip_prefix("--") else {
                    return Err(usage_error(format!("unexpected argument {arg:?}")));
                };
                let (name, inline) = match body.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_string())),
                    None => (body, None),
                };
                if name != "conf" && !is_key(name) {
                    return Err(usage_error(format!("unknown option --{name}")));
                }
                let value = match inline {
                    Some(v) => v,
                    None => next_value(&mut it, name)?,
                };
                if name == "conf" {
                    if parsed.conf.is_some() {
                        return Err(usage_error("--conf given twice".into()));
                    }
                    if value.is_empty() {
                        return Err(usage_error("--conf needs a file name".into()));
                    }
                    parsed.conf = Some(PathBuf::from(value));
                } else {
                    parsed.overrides.push((name.to_string(), value));
                }
            }
        }
    }
    Ok(match command {
        Some("check") => Command::Check(parsed),
        Some("verify") => Command::Verify {
            args: parsed,
            table,
            sid,
        },
        Some("resync") => Command::Resync {
            args: parsed,
            table: table.ok_or_else(|| {
                usage_error("resync needs the table to copy again: resync TABLE [--sid S]".into())
            })?,
            sid,
        },
        Some(_) => Command::Sequences {
            args: parsed,
            margin: margin.unwrap_or(0),
        },
        None => Command::Run(parsed),
    })
}

/// Whether `arg` is `--name` or `--name=…`.
fn option_is(arg: &str, name: &str) -> bool {
    arg.strip_prefix("--")
        .and_then(|a| a.strip_prefix(name))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
}

/// `section.param`: two non-empty words of letters, digits and `_`.
fn is_key(name: &str) -> bool {
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    matches!(name.split_once('.'), Some((s, p)) if word(s) && word(p))
}

/// The value of `--name value`: the next argument, unless it is another option.
/// (`-1` is a value, so a negative number reaches validation and gets a real message.)
fn next_value(it: &mut impl Iterator<Item = String>, name: &str) -> Result<String, ConfigError> {
    match it.next() {
        Some(v) if !v.starts_with("--") => Ok(v),
        _ => Err(usage_error(format!("--{name} needs a value"))),
    }
}

fn usage_error(message: String) -> ConfigError {
    ConfigError::Usage(message)
}

/// The `--help` text.
pub fn usage() -> &'static str {
    USAGE
}

const USAGE: &str = "\
kuvasz-streamer: change data capture from many PostgreSQL sources into one destination

Usage:
  kuvasz-streamer [--conf FILE] [--SECTION.PARAM=VALUE ...]
  kuvasz-streamer check [--conf FILE] [--SECTION.PARAM=VALUE ...]
  kuvasz-streamer sequences [--margin N] [--conf FILE] [--SECTION.PARAM=VALUE ...]
  kuvasz-streamer verify [--table T] [--sid S] [--conf FILE] [--SECTION.PARAM=VALUE ...]
  kuvasz-streamer resync TABLE [--sid S] [--conf FILE] [--SECTION.PARAM=VALUE ...]
  kuvasz-streamer --version | --help

  Without a command the daemon runs in the foreground and logs to stderr.
  check validates the configuration and the map, connects to the destination
  and to every source, checks each source's prerequisites (wal_level,
  replication privilege, slots and senders), reports how each mapped table would
  be replicated, and exits non-zero on any problem.
  sequences sets each destination sequence of the same name as a sequence owned
  by a mapped table's column to the highest value of all source URLs, plus N
  (default 0), never lowering it: the last step of a switchover, after writes
  stopped and the lag reached 0.
  verify compares every mapped source table (or --table T, a map key) with its
  target, per sid (or --sid S): row counts, then hashes of rows grouped by key,
  narrowed down to the keys that differ, which it lists (missing, extra,
  different). A key that differs is looked at again once the slot has confirmed
  what the source had written, so only differences that persist are reported.
  resync has the running daemon copy table T (a map key) again, for every sid
  or --sid S: it marks the table in kvsz_sync_state, and the daemon's source
  sets up again within 15 seconds and copies it.

Options:
  --conf FILE             configuration file; default: the first that exists of
                          ./kuvasz-streamer.toml, ./conf/kuvasz-streamer.toml,
                          /etc/kuvasz/kuvasz-streamer.toml
  --SECTION.PARAM=VALUE   set one key (also --SECTION.PARAM VALUE); overrides the
                          environment variable KUVASZ_SECTION_PARAM, which
                          overrides the file
  -h, --help              print this help
  -V, --version           print the version

Keys (default):
  server.name         name in logs and the destination's application_name (kuvasz-streamer)
  server.address      HTTP address of /healthz /readyz /metrics /api/status and / (127.0.0.1:8000)
  logs.level          error, warn, info, debug or trace (info)
  logs.format         text or json (text)
  database.url        destination connection string, postgres://... or key=value (required)
  database.schema     destination schema of the target tables (public)
  app.map_file        the mapping file (/etc/kuvasz/map.toml)
  app.num_workers     writer threads, one destination connection each (2)
  app.commit_delay    seconds a change may wait before its destination commit (1.0)
  app.default_schema  source schema of map tables given without one (public)
  app.sync_rate       initial-sync rows per second, all sources together (1e9)
  app.sync_burst      rows the initial sync may burst above that rate (1000)
  app.on_error        a row the destination rejects: stop or deadletter (stop)
  app.wal_receiver_timeout
                      seconds of silence from a source's server after which its
                      connection is taken for dead and reconnected; 0: never (60)
  app.writer_wait_timeout
                      seconds a writer may apply one batch before /readyz names it
                      and the sessions holding the lock it waits for; 0: never (120)
  app.on_slot_lost    a slot the source invalidated: hold or recopy (hold)

Exit status: 0 on success, 2 on a configuration or command-line error, 1 when
check finds a problem or verify a difference.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, ConfigError> {
        parse_cli(args.iter().map(|s| s.to_string()))
    }

    fn run(conf: Option<&str>, overrides: &[(&str, &str)]) -> Command {
        Command::Run(Args {
            conf: conf.map(PathBuf::from),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn no_arguments_runs_with_defaults() {
        assert_eq!(parse(&[]).unwrap(), run(None, &[]));
    }

    #[test]
    fn conf_and_overrides_in_both_forms() {
        let c = parse(&[
            "--conf",
            "/etc/k.toml",
            "--app.num_workers=4",
            "--server.name",
            "kv",
            "--app.commit_delay",
            "-1",
            "--database.url=postgres://h/d?a=b",
        ])
        .unwrap();
        assert_eq!(
            c,
            run(
                Some("/etc/k.toml"),
                &[
                    ("app.num_workers", "4"),
                    ("server.name", "kv"),
                    ("app.commit_delay", "-1"),
                    ("database.url", "postgres://h/d?a=b"),
                ]
            )
        );
        assert_eq!(parse(&["--conf=x.toml"]).unwrap(), run(Some("x.toml"), &[]));
    }

    #[test]
    fn check_command() {
        let c = parse(&["check", "--conf", "a.toml"]).unwrap();
        assert_eq!(
            c,
            Command::Check(Args {
                conf: Some("a.toml".into()),
                overrides: vec![]
            })
        );
        assert!(matches!(
            parse(&["--conf", "a", "check"]),
            Ok(Command::Check(_))
        ));
        assert!(parse(&["check", "check"]).is_err());
    }

    #[test]
    fn verify_and_resync_take_a_table_and_a_sid() {
        assert_eq!(
            parse(&["verify", "--table", "public.t", "--sid=a", "--conf", "c.toml"]).unwrap(),
            Command::Verify {
                args: Args {
                    conf: Some("c.toml".into()),
                    overrides: vec![]
                },
                table: Some("public.t".into()),
                sid: Some("a".into()),
            }
        );
        assert!(matches!(
            parse(&["verify"]),
            Ok(Command::Verify {
                table: None,
                sid: None,
                ..
            })
        ));
        assert_eq!(
            parse(&["resync", "t1", "--sid", "b"]).unwrap(),
            Command::Resync {
                args: Args::default(),
                table: "t1".into(),
                sid: Some("b".into()),
            }
        );
        assert!(parse(&["resync"]).is_err(), "the table is required");
        assert!(parse(&["resync", "t1", "t2"]).is_err());
        assert!(parse(&["resync", "t1", "--table", "t2"]).is_err());
        assert!(parse(&["verify", "--sid"]).is_err());
        assert!(parse(&["verify", "--sid", "a", "--sid", "b"]).is_err());
        assert!(
            parse(&["--sid", "a"]).is_err(),
            "only for verify and resync"
        );
    }

    #[test]
    fn sequences_command_and_margin() {
        assert_eq!(
            parse(&["sequences", "--margin", "1000", "--conf", "a.toml"]).unwrap(),
            Command::Sequences {
                args: Args {
                    conf: Some("a.toml".into()),
                    overrides: vec![]
                },
                margin: 1000
            }
        );
        assert!(matches!(
            parse(&["sequences", "--margin=5"]),
            Ok(Command::Sequences { margin: 5, .. })
        ));
        assert!(matches!(
            parse(&["sequences"]),
            Ok(Command::Sequences { margin: 0, .. })
        ));
        assert!(parse(&["sequences", "--margin", "-1"]).is_err());
        assert!(parse(&["sequences", "--margin", "x"]).is_err());
        assert!(parse(&["--margin", "5"]).is_err(), "only for sequences");
        assert!(parse(&["check", "sequences"]).is_err());
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&["--help"]).unwrap(), Command::Help);
        assert_eq!(parse(&["-h"]).unwrap(), Command::Help);
        assert_eq!(parse(&["--version"]).unwrap(), Command::Version);
        assert_eq!(parse(&["check", "-V"]).unwrap(), Command::Version);
        assert!(usage().contains("--conf"));
    }

    #[test]
    fn errors() {
        for bad in [
            &["run"][..],
            &["--conf"],
            &["--conf", "--app.x=1"],
            &["--conf", "a", "--conf", "b"],
            &["--bogus"],
            &["--app.num_workers"],
            &["--app."],
            &["--.x=1"],
            &["-x"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, ConfigError::Usage(_)), "{bad:?}");
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("--help"), "{e}");
        }
    }
}
