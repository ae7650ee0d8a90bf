//! The mapping file (SPEC §3): which source tables go to which target tables, per
//! family of same-schema source databases.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

pub use crate::mode::Mode;

use super::error::{ConfigError, Origin};
use super::tree::{self, Key, Node, Value};

/// The whole map, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Map {
    pub sources: Vec<SourceMap>,
}

/// One `[[source]]`: a family of databases with the same schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMap {
    /// Logical name; part of the slot and publication names.
    pub database: String,
    pub urls: Vec<SourceUrl>,
    pub tables: Vec<TableMap>,
}

/// One source database. `Debug` is written by hand: the URL may hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceUrl {
    pub url: String,
    /// Tenant id: written to a target `sid` column, part of the slot name.
    pub sid: String,
}

/// One mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMap {
    /// Source schema (`app.default_schema` when the key has none).
    pub schema: String,
    /// Source table.
    pub table: String,
    /// Target table in `database.schema` of the destination.
    pub target: String,
    pub mode: Mode,
    /// Partitions whose names match are published and land in `target`.
    pub partitions_regex: Option<String>,
    /// CEL expression rows must satisfy.
    pub filter: Option<String>,
    /// Target column → CEL expression, in file order.
    pub set: Vec<(String, String)>,
}

impl TableMap {
    /// A digest of the entry's `filter` and `set` (FNV-1a: stable across runs and
    /// versions), None without either: what the sync state records so that a changed
    /// expression copies the table again.
    pub fn expressions_digest(&self) -> Option<u64> {
        if self.filter.is_none() && self.set.is_empty() {
            return None;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |text: &str| {
            for b in text.bytes().chain([0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(self.filter.as_deref().unwrap_or(""));
        let mut set: Vec<&(String, String)> = self.set.iter().collect();
        set.sort();
        for (column, expr) in set {
            eat(column);
            eat(expr);
        }
        Some(h)
    }
}

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceUrl")
            .field("url", &"<hidden>")
            .field("sid", &self.sid)
            .finish()
    }
}

impl SourceMap {
    /// The slot and publication name of one URL: `kuvasz_<database>_<sid>` with `-`
    /// replaced by `_`, exactly as the Go implementation names them, so its slots are
    /// picked up where they stopped (SPEC §5).
    pub fn slot_name(&self, url: &SourceUrl) -> String {
        slot_name(&self.database, &url.sid)
    }
}

fn slot_name(database: &str, sid: &str) -> String {
    format!("kuvasz_{database}_{sid}").replace('-', "_")
}

/// PostgreSQL's rule for slot names: lower-case letters, digits and `_`, at most
/// NAMEDATALEN - 1 bytes.
fn slot_name_problem(name: &str) -> Option<String> {
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Some(format!(
            "slot name {name:?} is not valid: PostgreSQL allows lower-case letters, digits \
             and '_' ('-' in database and sid becomes '_')"
        ))
    } else if name.len() > 59 {
        Some(format!(
            "slot name {name:?} is longer than 59 bytes (PostgreSQL allows 63, and the \
             publication of tables without a key is named <slot>_ins)"
        ))
    } else {
        None
    }
}

/// Fields of a table entry.
const TABLE_FIELDS: &[&str] = &["type", "target", "partitions_regex", "filter", "set"];

impl Map {
    /// Reads and validates a map file.
    pub fn load(path: &Path, default_schema: &str) -> Result<Map, ConfigError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: path.to_path_buf(),
            error,
        })?;
        if matches!(ext.as_deref(), Some("yaml" | "yml")) {
            return Map::parse_yaml(&text, path, default_schema);
        }
        Map::parse(&text, path, default_schema)
    }

    /// Parses and validates the Go implementation's `map.yaml`: the same checks as a
    /// TOML map, errors naming the YAML file's line.
    pub fn parse_yaml(text: &str, file: &Path, default_schema: &str) -> Result<Map, ConfigError> {
        let root = super::yaml::parse(text, file)?;
        let p = Parser {
            file,
            text,
            default_schema,
        };
        p.map(root)
    }

    /// Parses and validates map text; `file` only names it in errors.
    pub fn parse(text: &str, file: &Path, default_schema: &str) -> Result<Map, ConfigError> {
        let root = tree::parse(text).map_err(|e| ConfigError::syntax(file, text, &e))?;
        let p = Parser {
            file,
            text,
            default_schema,
        };
        p.map(root)
    }
}

/// Walks the tree; holds what every error needs.
struct Parser<'a> {
    file: &'a Path,
    text: &'a str,
    default_schema: &'a str,
}

/// A path in the map with a byte offset to point at.
struct Here {
    key: String,
    offset: usize,
}

impl Parser<'_> {
    fn err(&self, at: &Here, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(
            Origin::at(self.file, self.text, at.offset),
            at.key.clone(),
            message,
        )
    }

    fn here(&self, parent: &str, key: &Key, value: &Node, fallback: usize) -> Here {
        Here {
            key: tree::join(parent, &key.name),
            offset: key.offset(value, fallback),
        }
    }

    fn map(&self, root: Node) -> Result<Map, ConfigError> {
        let root_at = Here {
            key: "source".into(),
            offset: root.offset(0),
        };
        let Value::Table(entries) = root.value else {
            return Err(self.err(&root_at, "expected a table"));
        };
        let mut sources = Vec::new();
        let mut slots: BTreeMap<String, String> = BTreeMap::new();
        for (key, node) in entries {
            let at = self.here("", &key, &node, 0);
            if key.name != "source" {
                return Err(self.err(&at, "unknown key (a map holds [[source]] entries only)"));
            }
            let Value::Array(items) = node.value else {
                return Err(self.err(
                    &at,
                    format!(
                        "expected an array of tables ([[source]]), found {}",
                        node.value.describe(false)
                    ),
                ));
            };
            for (i, item) in items.into_iter().enumerate() {
                let item_at = Here {
                    key: format!("source[{i}]"),
                    offset: item.offset(at.offset),
                };
                sources.push(self.source(item, &item_at, &mut slots)?);
            }
        }
        if sources.is_empty() {
            return Err(self.err(&root_at, "the map defines no [[source]]"));
        }
        Ok(Map { sources })
    }

    fn source(
        &self,
        node: Node,
        at: &Here,
        slots: &mut BTreeMap<String, String>,
    ) -> Result<SourceMap, ConfigError> {
        let Value::Table(entries) = node.value else {
            return Err(self.err(
                at,
                format!("expected a table, found {}", node.value.describe(false)),
            ));
        };
        let mut database: Option<(String, Here)> = None;
        let mut urls: Option<(Vec<Node>, Here)> = None;
        let mut tables = Vec::new();
        for (key, value) in entries {
            let here = self.here(&at.key, &key, &value, at.offset);
            match key.name.as_str() {
                "database" => {
                    let name = self.string(value, &here)?;
                    database = Some((name, here));
                }
                "urls" => match value.value {
                    Value::Array(items) if !items.is_empty() => urls = Some((items, here)),
                    Value::Array(_) => {
                        return Err(self.err(&here, "needs at least one { url, sid }"))
                    }
                    other => {
                        return Err(self.err(
                            &here,
                            format!("expected an array, found {}", other.describe(true)),
                        ))
                    }
                },
                "tables" => tables = self.tables(value, &here)?,
                _ => return Err(self.err(&here, "unknown key (known: database, urls, tables)")),
            }
        }
        let Some((database, _)) = database else {
            return Err(self.err(&missing(at, "database"), "required"));
        };
        let Some((url_nodes, urls_at)) = urls else {
            return Err(self.err(&missing(at, "urls"), "required"));
        };
        let mut source = SourceMap {
            database,
            urls: Vec::new(),
            tables,
        };
        for (i, node) in url_nodes.into_iter().enumerate() {
            let url_at = Here {
                key: format!("{}[{i}]", urls_at.key),
                offset: node.offset(urls_at.offset),
            };
            let (url, sid_at) = self.url(node, &url_at)?;
            let slot = source.slot_name(&url);
            if let Some(problem) = slot_name_problem(&slot) {
                return Err(self.err(&sid_at, problem));
            }
            if let Some(first) = slots.get(&slot) {
                return Err(self.err(
                    &sid_at,
                    format!("slot name {slot:?} is already used by {first}; each database and sid pair needs its own"),
                ));
            }
            slots.insert(slot, url_at.key.clone());
            source.urls.push(url);
        }
        Ok(source)
    }

    /// One `{ url, sid }`; returns where the sid is, for slot-name errors.
    fn url(&self, node: Node, at: &Here) -> Result<(SourceUrl, Here), ConfigError> {
        let Value::Table(entries) = node.value else {
            return Err(self.err(
                at,
                format!(
                    "expected {{ url = …, sid = … }}, found {}",
                    node.value.describe(true)
                ),
            ));
        };
        let mut url = None;
        let mut sid = None;
        for (key, value) in entries {
            let here = self.here(&at.key, &key, &value, at.offset);
            match key.name.as_str() {
                "url" => {
                    let Value::String(s) = value.value else {
                        return Err(self.err(
                            &here,
                            format!("expected a string, found {}", value.value.describe(true)),
                        ));
                    };
                    if s.trim().is_empty() {
                        return Err(self.err(&here, "must not be empty"));
                    }
                    url = Some(s);
                }
                // The Go implementation's YAML maps have numeric sids (`sid: 12`).
                "sid" => {
                    let s = match value.value {
                        Value::String(s) => s,
                        Value::Integer(i) => i.to_string(),
                        other => {
                            return Err(self.err(
                                &here,
                                format!("expected a string, found {}", other.describe(false)),
                            ))
                        }
                    };
                    if s.is_empty() {
                        return Err(self.err(&here, "must not be empty"));
                    }
                    sid = Some((s, here));
                }
                _ => return Err(self.err(&here, "unknown key (known: url, sid)")),
            }
        }
        let Some(url) = url else {
            return Err(self.err(&missing(at, "url"), "required"));
        };
        let Some((sid, sid_at)) = sid else {
            return Err(self.err(&missing(at, "sid"), "required"));
        };
        Ok((SourceUrl { url, sid }, sid_at))
    }

    /// `[source.tables]`: `t = {…}` or `"schema.t" = {…}`; an unquoted `schema.t = {…}`
    /// arrives as a nested table and is accepted too.
    fn tables(&self, node: Node, at: &Here) -> Result<Vec<TableMap>, ConfigError> {
        let Value::Table(entries) = node.value else {
            return Err(self.err(
                at,
                format!("expected a table, found {}", node.value.describe(false)),
            ));
        };
        let mut tables = Vec::new();
        let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut add = |t: TableMap, here: &Here| -> Result<(), ConfigError> {
            let id = (t.schema.clone(), t.table.clone());
            if let Some(first) = seen.get(&id) {
                return Err(self.err(
                    here,
                    format!("{}.{} is already mapped by {first}", t.schema, t.table),
                ));
            }
            seen.insert(id, here.key.clone());
            tables.push(t);
            Ok(())
        };
        for (key, value) in entries {
            let here = self.here(&at.key, &key, &value, at.offset);
            if is_schema_group(&value) {
                let Value::Table(inner) = value.value else {
                    continue;
                };
                for (table_key, body) in inner {
                    let inner_here = self.here(&here.key, &table_key, &body, here.offset);
                    let t = self.table(&key.name, &table_key.name, body, &inner_here)?;
                    add(t, &inner_here)?;
                }
            } else {
                let (schema, table) = match key.name.split_once('.') {
                    Some((s, t)) => (s, t),
                    None => (self.default_schema, key.name.as_str()),
                };
                let t = self.table(schema, table, value, &here)?;
                add(t, &here)?;
            }
        }
        Ok(tables)
    }

    fn table(
        &self,
        schema: &str,
        table: &str,
        body: Node,
        at: &Here,
    ) -> Result<TableMap, ConfigError> {
        if schema.is_empty() || table.is_empty() {
            return Err(self.err(at, "expected table or schema.table"));
        }
        let Value::Table(fields) = body.value else {
            return Err(self.err(
                at,
                format!(
                    "expected a table such as {{}} or {{ target = \"…\" }}, found {}",
                    body.value.describe(false)
                ),
            ));
        };
        let mut t = TableMap {
            schema: schema.to_string(),
            table: table.to_string(),
            target: table.to_string(),
            mode: Mode::Clone,
            partitions_regex: None,
            filter: None,
            set: Vec::new(),
        };
        for (key, value) in fields {
            let here = self.here(&at.key, &key, &value, at.offset);
            match key.name.as_str() {
                "type" => {
                    let s = self.string(value, &here)?;
                    t.mode = match Mode::parse(&s) {
                        Some(m) => m,
                        None => {
                            return Err(
                                self.err(&here, format!("expected {}, found {s:?}", Mode::names()))
                            )
                        }
                    };
                }
                "target" => t.target = self.string(value, &here)?,
                "partitions_regex" => t.partitions_regex = Some(self.string(value, &here)?),
                "filter" => t.filter = Some(self.string(value, &here)?),
                "set" => t.set = self.set(value, &here)?,
                _ => {
                    return Err(self.err(
                        &here,
                        format!("unknown key (known: {})", TABLE_FIELDS.join(", ")),
                    ))
                }
            }
        }
        Ok(t)
    }

    /// `set = { column = "expression", … }`.
    fn set(&self, node: Node, at: &Here) -> Result<Vec<(String, String)>, ConfigError> {
        let Value::Table(entries) = node.value else {
            return Err(self.err(
                at,
                format!(
                    "expected a table of column = \"expression\", found {}",
                    node.value.describe(false)
                ),
            ));
        };
        let mut set = Vec::new();
        for (key, value) in entries {
            let here = self.here(&at.key, &key, &value, at.offset);
            let expression = self.string(value, &here)?;
            set.push((key.name, expression));
        }
        Ok(set)
    }

    /// A non-empty string.
    fn string(&self, node: Node, at: &Here) -> Result<String, ConfigError> {
        match node.value {
            Value::String(s) if s.trim().is_empty() => Err(self.err(at, "must not be empty")),
            Value::String(s) => Ok(s),
            other => Err(self.err(
                at,
                format!("expected a string, found {}", other.describe(false)),
            )),
        }
    }
}

/// `schema.t = {…}` unquoted parses as `schema = { t = {…} }`: a table whose entries are
/// all tables under names that are not table fields. (A real table entry has only
/// fields, and only `set` holds a table.)
fn is_schema_group(node: &Node) -> bool {
    let Value::Table(entries) = &node.value else {
        return false;
    };
    !entries.is_empty()
        && entries.iter().all(|(k, v)| {
            !TABLE_FIELDS.contains(&k.name.as_str()) && matches!(v.value, Value::Table(_))
        })
}

/// Where to point for a required key that is absent: its parent.
fn missing(at: &Here, key: &str) -> Here {
    Here {
        key: tree::join(&at.key, key),
        offset: at.offset,
    }
}

impl Map {
    /// Every slot (and publication) name of the map, with its source and URL.
    pub fn slots(&self) -> impl Iterator<Item = (String, &SourceMap, &SourceUrl)> {
        self.sources
            .iter()
            .flat_map(|s| s.urls.iter().map(move |u| (s.slot_name(u), s, u)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"[[source]]
database = "db1"                       # logical name of a family of same-schema databases
urls = [
  { url = "postgres://kuvasz:secret@10.0.0.1:5432/db1", sid = "tenant1" },
  { url = "postgres://kuvasz:secret@10.0.0.2:5432/db1", sid = "tenant2" },
]
[source.tables]
t1 = {}                                 # clone into public.t1
t2 = { target = "rt2" }                 # rename
t3 = { type = "append" }                # ignore DELETE and TRUNCATE
t4 = { type = "history" }               # SCD type 2
t7 = { partitions_regex = "t7_.*" }     # partitions of t7 land in one target
"private.t8" = { target = "pt8" }       # any source schema
t9 = { filter = "status != 'draft' && amount > 0" }                    # row filter
t10 = { set = { full_name = "first_name + ' ' + last_name" } }         # computed column
"#;

    fn parse(text: &str) -> Result<Map, ConfigError> {
        Map::parse(text, Path::new("/etc/kuvasz/map.toml"), "public")
    }

    fn table(schema: &str, name: &str, target: &str, mode: Mode) -> TableMap {
        TableMap {
            schema: schema.into(),
            table: name.into(),
            target: target.into(),
            mode,
            partitions_regex: None,
            filter: None,
            set: vec![],
        }
    }

    /// Asserts an error's line and key, and that it never shows a password.
    fn fails(text: &str, line: usize, key: &str) -> String {
        let e = parse(text).unwrap_err();
        let s = e.to_string();
        assert_eq!((e.line(), e.key()), (Some(line), Some(key)), "{s}");
        assert!(
            s.starts_with(&format!("/etc/kuvasz/map.toml:{line}: {key}: ")),
            "{s}"
        );
        assert!(!s.contains("secret"), "{s}");
        s
    }

    #[test]
    fn spec_example() {
        let m = parse(EXAMPLE).unwrap();
        assert_eq!(m.sources.len(), 1);
        let s = &m.sources[0];
        assert_eq!(s.database, "db1");
        assert_eq!(
            s.urls,
            [
                SourceUrl {
                    url: "postgres://kuvasz:secret@10.0.0.1:5432/db1".into(),
                    sid: "tenant1".into()
                },
                SourceUrl {
                    url: "postgres://kuvasz:secret@10.0.0.2:5432/db1".into(),
                    sid: "tenant2".into()
                },
            ]
        );
        let t7 = TableMap {
            partitions_regex: Some("t7_.*".into()),
            ..table("public", "t7", "t7", Mode::Clone)
        };
        let t9 = TableMap {
            filter: Some("status != 'draft' && amount > 0".into()),
            ..table("public", "t9", "t9", Mode::Clone)
        };
        let t10 = TableMap {
            set: vec![("full_name".into(), "first_name + ' ' + last_name".into())],
            ..table("public", "t10", "t10", Mode::Clone)
        };
        assert_eq!(
            s.tables,
            [
                table("public", "t1", "t1", Mode::Clone),
                table("public", "t2", "rt2", Mode::Clone),
                table("public", "t3", "t3", Mode::Append),
                table("public", "t4", "t4", Mode::History),
                t7,
                table("private", "t8", "pt8", Mode::Clone),
                t9,
                t10,
            ]
        );
        assert_eq!(s.slot_name(&s.urls[0]), "kuvasz_db1_tenant1");
        let slots: Vec<String> = m.slots().map(|(n, _, _)| n).collect();
        assert_eq!(slots, ["kuvasz_db1_tenant1", "kuvasz_db1_tenant2"]);
        assert!(!format!("{m:?}").contains("secret"));
    }

    #[test]
    fn default_schema_and_unquoted_schema_keys() {
        let text = "[[source]]\ndatabase = \"d\"\nurls = [{ url = \"u\", sid = \"s\" }]\n\
                    [source.tables]\nt1 = {}\nsales.t2 = { type = \"append\" }\nsales.t3 = {}\n";
        let m = Map::parse(text, Path::new("m.toml"), "app").unwrap();
        assert_eq!(
            m.sources[0].tables,
            [
                table("app", "t1", "t1", Mode::Clone),
                table("sales", "t2", "t2", Mode::Append),
                table("sales", "t3", "t3", Mode::Clone),
            ]
        );
    }

    #[test]
    fn slot_names_replace_dashes_only() {
        let s = SourceMap {
            database: "my-db".into(),
            urls: vec![],
            tables: vec![],
        };
        let u = SourceUrl {
            url: "postgres://h/d".into(),
            sid: "t-1".into(),
        };
        assert_eq!(s.slot_name(&u), "kuvasz_my_db_t_1");
    }

    #[test]
    fn several_sources_and_numeric_sid() {
        let text = "[[source]]\ndatabase = \"a\"\nurls = [{ url = \"u1\", sid = 12 }]\n\
                    [source.tables]\nt = {}\n\
                    [[source]]\ndatabase = \"b\"\nurls = [{ url = \"u2\", sid = \"x\" }]\n";
        let m = parse(text).unwrap();
        assert_eq!(m.sources.len(), 2);
        assert_eq!(m.sources[0].urls[0].sid, "12");
        assert!(m.sources[1].tables.is_empty());
    }

    #[test]
    fn duplicate_slot_names_are_errors() {
        // Same database and sid in two sources.
        let text = "[[source]]\ndatabase = \"db1\"\nurls = [{ url = \"postgres://u:secret@a/db1\", sid = \"t1\" }]\n\
                    [[source]]\ndatabase = \"db1\"\nurls = [\n  { url = \"postgres://u:secret@b/db1\", sid = \"t1\" },\n]\n";
        let s = fails(text, 7, "source[1].urls[0].sid");
        assert!(
            s.contains("kuvasz_db1_t1") && s.contains("source[0].urls[0]"),
            "{s}"
        );
        // Different spellings, same slot: '-' and '_'.
        let text = "[[source]]\ndatabase = \"db\"\nurls = [\n{ url = \"u\", sid = \"a-b\" },\n{ url = \"v\", sid = \"a_b\" },\n]\n";
        fails(text, 5, "source[0].urls[1].sid");
    }

    #[test]
    fn invalid_slot_names() {
        let text = "[[source]]\ndatabase = \"DB\"\nurls = [{ url = \"u\", sid = \"s\" }]\n";
        let s = fails(text, 3, "source[0].urls[0].sid");
        assert!(s.contains("kuvasz_DB_s"), "{s}");
        let long = "x".repeat(60);
        let text =
            format!("[[source]]\ndatabase = \"{long}\"\nurls = [{{ url = \"u\", sid = \"s\" }}]\n");
        fails(&text, 3, "source[0].urls[0].sid");
    }

    #[test]
    fn structural_errors_name_line_and_key() {
        let head = "[[source]]\ndatabase = \"db\"\nurls = [{ url = \"postgres://u:secret@h/d\", sid = \"s\" }]\n[source.tables]\n";
        // Unknown table field, on line 6.
        let s = fails(
            &format!("{head}t1 = {{}}\nt2 = {{ targt = \"x\" }}\n"),
            6,
            "source[0].tables.t2.targt",
        );
        assert!(s.contains("unknown key"), "{s}");
        fails(
            &format!("{head}t1 = {{ type = \"mirror\" }}\n"),
            5,
            "source[0].tables.t1.type",
        );
        fails(
            &format!("{head}t1 = {{ target = 3 }}\n"),
            5,
            "source[0].tables.t1.target",
        );
        fails(
            &format!("{head}t1 = {{ set = {{ c = 1 }} }}\n"),
            5,
            "source[0].tables.t1.set.c",
        );
        fails(
            &format!("{head}t1 = {{ set = \"c\" }}\n"),
            5,
            "source[0].tables.t1.set",
        );
        fails(&format!("{head}t1 = 1\n"), 5, "source[0].tables.t1");
        fails(
            &format!("{head}\".t1\" = {{}}\n"),
            5,
            "source[0].tables.\".t1\"",
        );
        fails(
            &format!("{head}t1 = {{}}\n\"public.t1\" = {{}}\n"),
            6,
            "source[0].tables.\"public.t1\"",
        );
        fails(
            &format!("{head}t1 = {{ filter = \"\" }}\n"),
            5,
            "source[0].tables.t1.filter",
        );
        // Unknown key in a source and at the top.
        fails(
            "[[source]]\ndatabase = \"db\"\nurl = \"postgres://u:secret@h/d\"\n",
            3,
            "source[0].url",
        );
        fails("sources = []\n", 1, "sources");
        fails("[source]\ndatabase = \"db\"\n", 1, "source");
        fails("# nothing\n", 1, "source");
    }

    #[test]
    fn url_errors() {
        fails(
            "[[source]]\nurls = [{ url = \"u\", sid = \"s\" }]\n",
            1,
            "source[0].database",
        );
        fails("[[source]]\ndatabase = \"db\"\n", 1, "source[0].urls");
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = []\n",
            3,
            "source[0].urls",
        );
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = \"postgres://u:secret@h/d\"\n",
            3,
            "source[0].urls",
        );
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = [\"postgres://u:secret@h/d\"]\n",
            3,
            "source[0].urls[0]",
        );
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = [{ url = \"postgres://u:secret@h/d\" }]\n",
            3,
            "source[0].urls[0].sid",
        );
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = [{ sid = \"s\" }]\n",
            3,
            "source[0].urls[0].url",
        );
        fails(
            "[[source]]\ndatabase = \"db\"\nurls = [{ url = \"\", sid = \"s\" }]\n",
            3,
            "source[0].urls[0].url",
        );
        fails("[[source]]\ndatabase = \"db\"\nurls = [{ url = \"u\", sid = \"s\", pwd = \"secret\" }]\n", 3, "source[0].urls[0].pwd");
    }

    #[test]
    fn syntax_error_line() {
        let e = parse("[[source]]\ndatabase = \"db\"\nurls = [ { url = \"postgres://u:secret@h/d\", sid = } ]\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(3));
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn load_reads_files() {
        let dir = std::env::temp_dir().join(format!("kvsz-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("map.toml");
        std::fs::write(&f, EXAMPLE).unwrap();
        assert_eq!(Map::load(&f, "public").unwrap(), parse(EXAMPLE).unwrap());
        let e = Map::load(&dir.join("absent.toml"), "public").unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        let e = Map::load(&dir.join("absent.yaml"), "public").unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    }

    /// One source table has one target: naming it twice in a family is refused, with
    /// both entries named.
    #[test]
    fn a_table_mapped_twice_is_refused() {
        let e = parse(
            "[[source]]\ndatabase = \"d\"\nurls = [ { url = \"postgres://h/d\", sid = \"s\" } ]\n\
             [source.tables]\nt1 = {}\n\"public.t1\" = { target = \"other\" }\n",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("public.t1 is already mapped by") && e.line() == Some(6),
            "{text}"
        );
    }

    /// The Go layout, every feature: the same map as its TOML form.
    #[test]
    fn yaml_map_equals_its_toml_form() {
        let yaml = "\
- database: db1
  urls:
  - url: postgres://kuvasz:secret@10.0.0.1:5432/db1?replication=database&application_name=repl_db1
    sid: tenant1
  - url: postgres://kuvasz:secret@10.0.0.2:5432/db1
    sid: 2
  tables:
    t1:
    t2:
      target: rt2
    t3:
      type: append
    t4:
      type: history
    t7:
      partitions_regex: \"t7_.*\"
    private.t8:
      target: pt8
    t9:
      filter: \"status != 'draft' && amount > 0\"
    t10:
      set:
        full_name: \"first_name + ' ' + last_name\"
";
        let toml = r#"
[[source]]
database = "db1"
urls = [
  { url = "postgres://kuvasz:secret@10.0.0.1:5432/db1?replication=database&application_name=repl_db1", sid = "tenant1" },
  { url = "postgres://kuvasz:secret@10.0.0.2:5432/db1", sid = "2" },
]
[source.tables]
t1 = {}
t2 = { target = "rt2" }
t3 = { type = "append" }
t4 = { type = "history" }
t7 = { partitions_regex = "t7_.*" }
"private.t8" = { target = "pt8" }
t9 = { filter = "status != 'draft' && amount > 0" }
t10 = { set = { full_name = "first_name + ' ' + last_name" } }
"#;
        let from_yaml = Map::parse_yaml(yaml, Path::new("map.yaml"), "public").unwrap();
        assert_eq!(from_yaml, parse(toml).unwrap());
        // Errors name the YAML line and key, as for TOML.
        let e = Map::parse_yaml(
            "- database: db1\n  urls:\n  - url: x\n    sid: a\n  tables:\n    t1:\n      type: clown\n",
            Path::new("map.yaml"),
            "public",
        )
        .unwrap_err();
        assert_eq!(e.line(), Some(7), "{e}");
        assert!(e.to_string().contains("clown"), "{e}");
    }
}
