//! Configuration errors: each names where the bad setting came from (file and line,
//! environment variable, or command-line option) and the dotted key, so an operator can
//! go straight to it. Messages never echo a connection string.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file; `line` and `column` are 1-based.
    File {
        file: PathBuf,
        line: usize,
        column: Option<usize>,
    },
    /// An environment variable, e.g. `KUVASZ_APP_NUM_WORKERS`.
    Env { var: String },
    /// A command-line option, e.g. `--app.num_workers` (without the value).
    Cli { option: String },
}

impl Origin {
    /// The file position of byte `offset` of `text`.
    pub(crate) fn at(file: &Path, text: &str, offset: usize) -> Origin {
        let (line, column) = line_column(text, offset);
        Origin::File {
            file: file.to_path_buf(),
            line,
            column: Some(column),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, line, .. } => write!(f, "{}:{line}", file.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Cli { option } => write!(f, "option {option}"),
        }
    }
}

/// Why the configuration or the map cannot be used. Every variant exits with status 2.
#[derive(Debug)]
pub enum ConfigError {
    /// A file could not be read.
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    /// The file is not valid TOML. `key` is a best guess from the text of that line.
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// A key that is unknown, of the wrong type, or with a value that cannot be used.
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
    /// A required key set nowhere. `file` is the configuration file read, if any;
    /// `searched` lists where one was looked for when none was given or found.
    Missing {
        key: String,
        file: Option<PathBuf>,
        searched: Vec<PathBuf>,
    },
    /// The command line itself is malformed.
    Usage(String),
}

impl ConfigError {
    /// The process exit status for any configuration problem (SPEC §2).
    pub fn exit_code(&self) -> i32 {
        2
    }

    /// The dotted key at fault, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Missing { key, .. } => Some(key),
            ConfigError::Syntax { key, .. } => key.as_deref(),
            ConfigError::Read { .. } | ConfigError::Usage(_) => None,
        }
    }

    /// The 1-based line in a file, when the error has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. } => *line,
            ConfigError::Invalid {
                origin: Origin::File { line, .. },
                ..
            } => Some(*line),
            _ => None,
        }
    }

    /// The file at fault, when the error is in one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { file, .. } | ConfigError::Syntax { file, .. } => Some(file),
            ConfigError::Invalid {
                origin: Origin::File { file, .. },
                ..
            } => Some(file),
            ConfigError::Missing { file, .. } => file.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn invalid(
        origin: Origin,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            origin,
            key: key.into(),
            message: message.into(),
        }
    }

    /// A TOML parse error, positioned by its span.
    pub(crate) fn syntax(file: &Path, text: &str, error: &toml::de::Error) -> Self {
        let position = error.span().map(|s| line_column(text, s.start));
        let key = position.and_then(|(line, _)| key_on_line(text, line));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            key,
            message: one_line(error.message()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { file, error } => {
                write!(f, "{}: cannot read: {error}", file.display())
            }
            ConfigError::Syntax {
                file,
                line,
                column,
                key,
                message,
            } => {
                write!(f, "{}", file.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                    if let Some(column) = column {
                        write!(f, ":{column}")?;
                    }
                }
                if let Some(key) = key {
                    write!(f, ": {key}")?;
                }
                write!(f, ": TOML syntax error: {message}")
            }
            ConfigError::Invalid {
                origin: origin @ Origin::Cli { .. },
                key: _,
                message,
            } => write!(f, "{origin}: {message}"),
            ConfigError::Invalid {
                origin,
                key,
                message,
            } => write!(f, "{origin}: {key}: {message}"),
            ConfigError::Missing {
                key,
                file,
                searched,
            } => {
                let var = format!("KUVASZ_{}", key.replace('.', "_").to_uppercase());
                match file {
                    Some(file) => write!(f, "{}: {key}: required but not set", file.display())?,
                    None => write!(f, "{key}: required but not set")?,
                }
                write!(
                    f,
                    " (set it in the configuration file, with {var} or with --{key}=…)"
                )?;
                if file.is_none() && !searched.is_empty() {
                    let list: Vec<String> =
                        searched.iter().map(|p| p.display().to_string()).collect();
                    write!(f, "; no configuration file found at {}", list.join(", "))?;
                }
                Ok(())
            }
            ConfigError::Usage(message) => {
                write!(f, "{message} (see kuvasz-streamer --help)")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count())
        + 1;
    (line, column)
}

/// toml's messages may span lines; ours are one line each.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Guesses the dotted key a syntax error is about: the `[table]` header above `line`
/// and the bare key before `=` on it. `None` when the line does not look like one.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line.checked_sub(1)?)?.trim();
    let (name, _) = this.split_once('=')?;
    let name = name.trim();
    let bare = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !bare(name) {
        return None;
    }
    let header = lines[..line - 1].iter().rev().find_map(|l| {
        let l = l.trim();
        let inner = l.strip_prefix('[')?.trim_start_matches('[');
        let inner = inner.split(']').next()?.trim();
        bare(inner).then_some(inner)
    });
    Some(match header {
        Some(h) => format!("{h}.{name}"),
        None => name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_column(t, 0), (1, 1));
        assert_eq!(line_column(t, 3), (2, 1));
        assert_eq!(line_column(t, 8), (3, 1));
        assert_eq!(line_column(t, 7), (2, 4));
        assert_eq!(line_column(t, 100), (3, 2));
    }

    #[test]
    fn key_guess_uses_the_header_above() {
        let t = "[app]\nx = 1\n\ny = = 2\n";
        assert_eq!(key_on_line(t, 4).as_deref(), Some("app.y"));
        assert_eq!(key_on_line("a = [\n", 1).as_deref(), Some("a"));
        assert_eq!(key_on_line("[app\n", 1), None);
    }

    #[test]
    fn display_formats() {
        let e = ConfigError::invalid(
            Origin::File {
                file: "/etc/kuvasz/kuvasz-streamer.toml".into(),
                line: 7,
                column: Some(15),
            },
            "app.num_workers",
            "expected an integer, found string \"four\"",
        );
        assert_eq!(
            e.to_string(),
            "/etc/kuvasz/kuvasz-streamer.toml:7: app.num_workers: expected an integer, found string \"four\""
        );
        assert_eq!(e.exit_code(), 2);
        let e = ConfigError::invalid(
            Origin::Env {
                var: "KUVASZ_APP_NUM_WORKERS".into(),
            },
            "app.num_workers",
            "expected an integer, found \"four\"",
        );
        assert_eq!(
            e.to_string(),
            "environment variable KUVASZ_APP_NUM_WORKERS: app.num_workers: expected an integer, found \"four\""
        );
        let e = ConfigError::invalid(
            Origin::Cli {
                option: "--app.num_workers".into(),
            },
            "app.num_workers",
            "expected an integer, found \"four\"",
        );
        assert_eq!(
            e.to_string(),
            "option --app.num_workers: expected an integer, found \"four\""
        );
    }
}
