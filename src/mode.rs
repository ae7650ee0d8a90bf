//! What each target mode does with each source operation (SPEC §3), in one table. The
//! stream, the copy, the writers and `verify` ask these rules instead of testing for a
//! mode by name, so a new mode is a new row here (plus its SQL, if its target rows are
//! neither plain rows nor versions).

use std::fmt;

/// How a target follows its source (SPEC §4, the map's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// The target holds the source's rows.
    #[default]
    Clone,
    /// Inserts and updates only: the target keeps what the source deletes.
    Append,
    /// SCD type 2: every change adds or closes a version of its row.
    History,
}

/// What a source operation does to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Carried to the target (on versions: closes them).
    Apply,
    /// Ignored: the target keeps its rows as they were.
    Ignore,
}

/// What one target row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// A source row as it is now (or was when the source removed it, for a mode that
    /// keeps removed rows).
    Current,
    /// One version of a source row, valid from `kvsz_start` to `kvsz_end`, closed by a
    /// change and flagged `kvsz_deleted` when a DELETE closed it.
    Versions,
}

/// One mode's row of the table.
#[derive(Debug, PartialEq, Eq)]
pub struct Rules {
    pub name: &'static str,
    pub rows: Rows,
    /// A source DELETE.
    pub delete: Effect,
    /// A source TRUNCATE.
    pub truncate: Effect,
    /// An UPDATE whose new row fails the entry's `filter`: the row leaves the target (as
    /// a DELETE would), or the target ignores the update and keeps what it had.
    pub leaves_filter: Effect,
    /// The initial copy replaces the target's rows of its sid; otherwise it merges by
    /// key and removes nothing (rows the source no longer has stay).
    pub copy_replaces: bool,
}

impl Rules {
    /// The target may hold rows the source no longer has: `verify` does not report them.
    pub fn keeps_removed(&self) -> bool {
        self.delete == Effect::Ignore
    }
}

const CLONE: Rules = Rules {
    name: "clone",
    rows: Rows::Current,
    delete: Effect::Apply,
    truncate: Effect::Apply,
    leaves_filter: Effect::Apply,
    copy_replaces: true,
};

const APPEND: Rules = Rules {
    name: "append",
    rows: Rows::Current,
    delete: Effect::Ignore,
    truncate: Effect::Ignore,
    leaves_filter: Effect::Ignore,
    copy_replaces: false,
};

const HISTORY: Rules = Rules {
    name: "history",
    rows: Rows::Versions,
    delete: Effect::Apply,
    truncate: Effect::Apply,
    leaves_filter: Effect::Apply,
    copy_replaces: false,
};

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Clone, Mode::Append, Mode::History];

    pub const fn rules(self) -> &'static Rules {
        match self {
            Mode::Clone => &CLONE,
            Mode::Append => &APPEND,
            Mode::History => &HISTORY,
        }
    }

    /// Whether target rows are versions (the `kvsz_*` columns, stamps, version SQL).
    pub fn versions(self) -> bool {
        self.rules().rows == Rows::Versions
    }

    /// The mode a map's `type` names (any case).
    pub fn parse(name: &str) -> Option<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.rules().name.eq_ignore_ascii_case(name))
    }

    /// "clone, append or history", for messages.
    pub fn names() -> String {
        let names: Vec<&str> = Mode::ALL.iter().map(|m| m.rules().name).collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rules().name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(&m.to_string().to_uppercase()), Some(m));
        }
        assert_eq!(Mode::parse("scd2"), None);
        assert_eq!(Mode::names(), "clone, append or history");
    }

    /// SPEC §3, as a table: what each mode does with each operation.
    #[test]
    fn the_table() {
        use Effect::{Apply, Ignore};
        let row = |m: Mode| {
            let r = m.rules();
            (
                r.delete,
                r.truncate,
                r.leaves_filter,
                r.copy_replaces,
                m.versions(),
            )
        };
        assert_eq!(row(Mode::Clone), (Apply, Apply, Apply, true, false));
        assert_eq!(row(Mode::Append), (Ignore, Ignore, Ignore, false, false));
        assert_eq!(row(Mode::History), (Apply, Apply, Apply, false, true));
        assert!(Mode::Append.rules().keeps_removed());
        assert!(!Mode::History.rules().keeps_removed());
    }
}
