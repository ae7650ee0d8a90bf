//! The map's row expressions (SPEC §3): a table's `filter` and its `set` columns, CEL
//! programs compiled once at load and evaluated over a source row's columns by name,
//! typed from the source column types. Pure logic: rows come in as texts with their
//! kinds, results go out as texts for COPY.

use std::fmt;
use std::sync::Arc;

use cel::{Context, Env, Program, Value};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};

use crate::config::TableMap;

/// How a source column's text becomes a CEL value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    /// Floating point and numeric (CEL has no decimal type).
    Float,
    Bool,
    Bytes,
    /// `timestamp` (taken as UTC) and `timestamptz`.
    Timestamp,
    /// A date, as the timestamp of its midnight UTC.
    Date,
    /// Text and every other type, as its text.
    Text,
}

impl Kind {
    /// From a type OID (as the replication protocol sends it).
    pub fn from_oid(oid: u32) -> Kind {
        match oid {
            20 | 21 | 23 | 26 => Kind::Int,
            700 | 701 | 1700 => Kind::Float,
            16 => Kind::Bool,
            17 => Kind::Bytes,
            1114 | 1184 => Kind::Timestamp,
            1082 => Kind::Date,
            _ => Kind::Text,
        }
    }

    /// From a type name as `format_type` prints it (the catalog, for the copy).
    pub fn from_type_name(name: &str) -> Kind {
        let base = name.split('(').next().unwrap_or(name).trim();
        match base {
            "smallint" | "integer" | "bigint" | "oid" => Kind::Int,
            "real" | "double precision" | "numeric" => Kind::Float,
            "boolean" => Kind::Bool,
            "bytea" => Kind::Bytes,
            "date" => Kind::Date,
            _ if base.starts_with("timestamp") => Kind::Timestamp,
            _ => Kind::Text,
        }
    }
}

/// A source column's value for an expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Text(Kind, &'a str),
    /// An unchanged TOASTed value the source did not send.
    Missing,
}

/// An expression that failed on a row (a rejected row, SPEC §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    /// `filter` or `set <column>`.
    pub what: String,
    pub expression: String,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} failed: {}",
            self.what, self.expression, self.message
        )
    }
}

/// What the expressions make of one row.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The filter passed (true without a filter).
    pub pass: bool,
    /// The `set` columns' values as text (None: NULL), in [`TableExprs::set_columns`]
    /// order; empty when the filter failed.
    pub computed: Vec<Option<String>>,
}

struct Compiled {
    what: String,
    source: String,
    program: Program,
}

/// The compiled expressions of one map entry.
pub struct TableExprs {
    env: Arc<Env>,
    filter: Option<Compiled>,
    /// (target column, program).
    set: Vec<(String, Compiled)>,
    /// The column names the programs refer to, sorted.
    variables: Vec<String>,
}

impl fmt::Debug for TableExprs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableExprs")
            .field("filter", &self.filter.as_ref().map(|c| &c.source))
            .field(
                "set",
                &self
                    .set
                    .iter()
                    .map(|(c, p)| (c, &p.source))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TableExprs {
    /// Compiles an entry's expressions; None when it has none. The error names the
    /// expression and says what is wrong with it.
    pub fn compile(t: &TableMap) -> Result<Option<Arc<TableExprs>>, String> {
        if t.filter.is_none() && t.set.is_empty() {
            return Ok(None);
        }
        let env = Arc::new(Env::stdlib());
        let compile = |what: String, source: &str| {
            env.compile(source)
                .map(|program| Compiled {
                    what: what.clone(),
                    source: source.to_string(),
                    program,
                })
                .map_err(|e| format!("{what} {source:?} does not compile: {e}"))
        };
        let filter = t
            .filter
            .as_deref()
            .map(|f| compile("filter".into(), f))
            .transpose()?;
        let mut set = Vec::new();
        for (column, source) in &t.set {
            set.push((column.clone(), compile(format!("set {column}"), source)?));
        }
        let mut variables: Vec<String> = filter
            .iter()
            .chain(set.iter().map(|(_, c)| c))
            .flat_map(|c| {
                c.program
                    .references()
                    .variables()
                    .into_iter()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        variables.sort_unstable();
        variables.dedup();
        Ok(Some(Arc::new(TableExprs {
            env,
            filter,
            set,
            variables,
        })))
    }

    /// The source columns the expressions read.
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// The target columns `set` computes, in order.
    pub fn set_columns(&self) -> impl Iterator<Item = &str> {
        self.set.iter().map(|(c, _)| c.as_str())
    }

    pub fn has_filter(&self) -> bool {
        self.filter.is_some()
    }

    /// Evaluates the filter, then (when it passes) the set expressions, over the row
    /// whose columns `cell` gives by name.
    pub fn eval<'a>(&self, cell: impl Fn(&str) -> Option<Cell<'a>>) -> Result<Outcome, ExprError> {
        let mut ctx = Context::with_env(self.env.clone());
        for name in &self.variables {
            let value = match cell(name) {
                // Not a column: CEL reports the undeclared reference.
                None => continue,
                Some(Cell::Null) => Value::Null,
                Some(Cell::Text(kind, text)) => to_value(kind, text),
                Some(Cell::Missing) => {
                    let c = self.filter.as_ref().or(self.set.first().map(|(_, c)| c));
                    return Err(ExprError {
                        what: c.map(|c| c.what.clone()).unwrap_or_default(),
                        expression: c.map(|c| c.source.clone()).unwrap_or_default(),
                        message: format!(
                            "column {name} is an unchanged TOASTed value the source did not \
                             send (REPLICA IDENTITY FULL on the source table sends it)"
                        ),
                    });
                }
            };
            ctx.add_variable_from_value(name.clone(), value);
        }
        let fail = |c: &Compiled, message: String| ExprError {
            what: c.what.clone(),
            expression: c.source.clone(),
            message,
        };
        if let Some(f) = &self.filter {
            match f.program.execute(&ctx) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    return Ok(Outcome {
                        pass: false,
                        computed: Vec::new(),
                    })
                }
                Ok(other) => {
                    return Err(fail(
                        f,
                        format!("a filter must be true or false, not {other:?}"),
                    ))
                }
                Err(e) => return Err(fail(f, format!("{e:?}"))),
            }
        }
        let mut computed = Vec::with_capacity(self.set.len());
        for (_, c) in &self.set {
            let v = c
                .program
                .execute(&ctx)
                .map_err(|e| fail(c, format!("{e:?}")))?;
            computed.push(to_text(&v).map_err(|m| fail(c, m))?);
        }
        Ok(Outcome {
            pass: true,
            computed,
        })
    }
}

/// A column's text as a CEL value; a text that does not parse as its kind stays text.
fn to_value(kind: Kind, text: &str) -> Value {
    let parsed = match kind {
        Kind::Int => text.parse::<i64>().ok().map(Value::Int),
        Kind::Float => text.parse::<f64>().ok().map(Value::Float),
        Kind::Bool => match text {
            "t" | "true" => Some(Value::Bool(true)),
            "f" | "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Kind::Bytes => text
            .strip_prefix("\\x")
            .and_then(unhex)
            .map(|b| Value::Bytes(Arc::new(b))),
        Kind::Timestamp => parse_timestamp(text).map(Value::Timestamp),
        Kind::Date => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|dt| Value::Timestamp(dt.and_utc().fixed_offset())),
        Kind::Text => None,
    };
    parsed.unwrap_or_else(|| Value::String(Arc::new(text.to_string())))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// PostgreSQL's ISO output: `2024-01-02 03:04:05[.ffffff][+01[:30]]` (no offset: UTC).
fn parse_timestamp(text: &str) -> Option<DateTime<FixedOffset>> {
    // An offset of hours only (`+01`) is what PostgreSQL prints; chrono wants minutes.
    let body_end = text
        .rfind(['+', '-'])
        .filter(|&i| i > 10)
        .unwrap_or(text.len());
    let (body, offset) = text.split_at(body_end);
    let naive = NaiveDateTime::parse_from_str(body, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    if offset.is_empty() {
        return Some(naive.and_utc().fixed_offset());
    }
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut parts = offset[1..].split(':').map(|p| p.parse::<i32>().ok());
    let h = parts.next()??;
    let m = parts.next().flatten().unwrap_or(0);
    let s = parts.next().flatten().unwrap_or(0);
    let tz = FixedOffset::east_opt(sign * (h * 3600 + m * 60 + s))?;
    naive.and_local_timezone(tz).single()
}

/// A result as the text a column reads (None: NULL).
fn to_text(v: &Value) -> Result<Option<String>, String> {
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) if f.is_nan() => "NaN".into(),
        Value::Float(f) if f.is_infinite() => {
            if *f > 0.0 { "Infinity" } else { "-Infinity" }.into()
        }
        Value::Float(f) => f.to_string(),
        Value::String(s) => s.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => b.iter().fold(String::from("\\x"), |mut s, byte| {
            s.push_str(&format!("{byte:02x}"));
            s
        }),
        Value::Timestamp(t) => t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string(),
        Value::Duration(d) => format!("{} microseconds", d.num_microseconds().unwrap_or(0)),
        other => return Err(format!("a column cannot hold {other:?}")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn table(filter: Option<&str>, set: &[(&str, &str)]) -> TableMap {
        TableMap {
            schema: "public".into(),
            table: "t".into(),
            target: "t".into(),
            mode: Mode::Clone,
            partitions_regex: None,
            filter: filter.map(String::from),
            set: set
                .iter()
                .map(|(c, e)| (c.to_string(), e.to_string()))
                .collect(),
        }
    }

    fn row<'a>(cells: &'a [(&'a str, Cell<'a>)]) -> impl Fn(&str) -> Option<Cell<'a>> + 'a {
        move |name| cells.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    #[test]
    fn a_filter_over_typed_columns() {
        let e = TableExprs::compile(&table(
            Some(
                "status != 'draft' && amount > 0 && paid && at > timestamp('2024-01-01T00:00:00Z')",
            ),
            &[],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(e.variables(), ["amount", "at", "paid", "status"]);
        let cells = |status, amount| {
            vec![
                ("status", Cell::Text(Kind::Text, status)),
                ("amount", Cell::Text(Kind::Float, amount)),
                ("paid", Cell::Text(Kind::Bool, "t")),
                (
                    "at",
                    Cell::Text(Kind::Timestamp, "2024-03-01 10:00:00.5+01"),
                ),
            ]
        };
        let pass = |status, amount| e.eval(row(&cells(status, amount))).map(|o| o.pass);
        assert_eq!(pass("paid", "12.50"), Ok(true));
        assert_eq!(pass("draft", "12.50"), Ok(false));
        assert_eq!(pass("paid", "0"), Ok(false));
        // NULL makes the comparison fail: a rejected row, not a silent skip.
        let nulls = [
            ("status", Cell::Text(Kind::Text, "x")),
            ("amount", Cell::Null),
            ("paid", Cell::Text(Kind::Bool, "t")),
            ("at", Cell::Null),
        ];
        let err = e.eval(row(&nulls)).unwrap_err();
        assert_eq!(err.what, "filter");
        assert!(
            err.to_string().starts_with("filter \"status != 'draft'"),
            "{err}"
        );
        let missing = [("status", Cell::Missing)];
        assert!(e
            .eval(row(&missing))
            .unwrap_err()
            .message
            .contains("unchanged TOASTed"));
    }

    #[test]
    fn set_computes_texts() {
        let e = TableExprs::compile(&table(
            None,
            &[
                ("full_name", "first_name + ' ' + last_name"),
                ("n2", "n * 2"),
                ("half", "double(n) / 4.0"),
                ("big", "n > 1"),
                ("blob", "b"),
                ("day", "d"),
                ("none", "null"),
            ],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            e.set_columns().collect::<Vec<_>>(),
            ["full_name", "n2", "half", "big", "blob", "day", "none"]
        );
        let cells = [
            ("first_name", Cell::Text(Kind::Text, "Ada")),
            ("last_name", Cell::Text(Kind::Text, "Lovelace")),
            ("n", Cell::Text(Kind::Int, "3")),
            ("b", Cell::Text(Kind::Bytes, "\\xdeadbeef")),
            ("d", Cell::Text(Kind::Date, "2024-02-29")),
        ];
        let o = e.eval(row(&cells)).unwrap();
        assert!(o.pass);
        assert_eq!(
            o.computed,
            [
                Some("Ada Lovelace".to_string()),
                Some("6".into()),
                Some("0.75".into()),
                Some("true".into()),
                Some("\\xdeadbeef".into()),
                Some("2024-02-29 00:00:00.000000+00:00".into()),
                None
            ]
        );
        let bad = TableExprs::compile(&table(None, &[("x", "[1, 2]")]))
            .unwrap()
            .unwrap();
        assert!(bad
            .eval(|_| None)
            .unwrap_err()
            .message
            .contains("cannot hold"));
    }

    #[test]
    fn a_bad_expression_is_named() {
        let err = TableExprs::compile(&table(Some("amount >"), &[])).unwrap_err();
        assert!(
            err.starts_with("filter \"amount >\" does not compile: "),
            "{err}"
        );
        let err = TableExprs::compile(&table(None, &[("c", "'unterminated")])).unwrap_err();
        assert!(
            err.starts_with("set c \"'unterminated\" does not compile"),
            "{err}"
        );
        assert!(TableExprs::compile(&table(None, &[])).unwrap().is_none());
    }

    #[test]
    fn kinds_from_types() {
        assert_eq!(Kind::from_oid(23), Kind::Int);
        assert_eq!(Kind::from_oid(1700), Kind::Float);
        assert_eq!(Kind::from_oid(3802), Kind::Text);
        assert_eq!(Kind::from_type_name("numeric(12,2)"), Kind::Float);
        assert_eq!(
            Kind::from_type_name("timestamp(3) with time zone"),
            Kind::Timestamp
        );
        assert_eq!(Kind::from_type_name("character varying(8)"), Kind::Text);
        assert_eq!(
            parse_timestamp("2024-01-02 03:04:05-05:30").map(|t| t.to_rfc3339()),
            Some("2024-01-02T03:04:05-05:30".into())
        );
        assert_eq!(
            parse_timestamp("2024-01-02 03:04:05.25").map(|t| t.to_rfc3339()),
            Some("2024-01-02T03:04:05.250+00:00".into())
        );
        assert_eq!(
            to_value(Kind::Timestamp, "infinity"),
            Value::String(Arc::new("infinity".into()))
        );
    }
}
