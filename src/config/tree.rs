//! A TOML document as a tree that keeps byte spans, so every error can name a line:
//! `toml::Table` forgets positions, and typed serde structs cannot report the dotted key
//! nor accept the Go implementation's keys with a warning.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::ops::Range;

// `toml::Spanned` cannot be used directly: it fails on values the parser has no span
// for (dotted keys, implicit tables). These are the names serde_spanned's protocol
// uses (serde_spanned::__unstable); the toml deserializer answers a struct request
// with them by a map of start, end and value.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
/// How the toml deserializer presents a datetime (toml_datetime::__unstable::FIELD).
const DATETIME_FIELD: &str = "$__toml_private_datetime";

/// A value with the byte range it came from, when the parser knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Option<Range<usize>>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<(Key, Node)>),
}

/// A table key with its span (absent for the parts of a dotted key).
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub span: Option<Range<usize>>,
    pub name: String,
}

impl Value {
    /// What a type error says was found instead. `secret` hides a string's content
    /// (a connection string may carry a password).
    pub fn describe(&self, secret: bool) -> String {
        match self {
            Value::String(s) if secret || looks_secret(s) => "a string".to_string(),
            Value::String(s) => format!("string {s:?}"),
            Value::Integer(i) => format!("integer {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Boolean(b) => format!("boolean {b}"),
            Value::Datetime(d) => format!("datetime {d}"),
            Value::Array(_) => "an array".to_string(),
            Value::Table(_) => "a table".to_string(),
        }
    }
}

/// Parses a whole document; the error is toml's own, with its span.
pub fn parse(text: &str) -> Result<Node, toml::de::Error> {
    let de = toml::Deserializer::new(text);
    let mut root = SpannedSeed.deserialize(de)?;
    if root.span.is_none() {
        root.span = Some(0..0);
    }
    Ok(root)
}

/// Asks for a value with its span; takes a bare value when no span is known.
struct SpannedSeed;

impl<'de> DeserializeSeed<'de> for SpannedSeed {
    type Value = Node;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, SpannedVisitor)
    }
}

struct SpannedVisitor;

impl<'de> Visitor<'de> for SpannedVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(bare(Value::Boolean(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(bare(Value::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        RawVisitor.visit_u64(v).map(bare)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(bare(Value::Float(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(bare(Value::String(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(bare(Value::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Node, A::Error> {
        RawVisitor.visit_seq(a).map(bare)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let Some(first) = a.next_key_seed(KeySeed)? else {
            return Ok(bare(Value::Table(Vec::new())));
        };
        if first.name == SPANNED_START {
            let start: usize = a.next_value()?;
            let _end_key = a.next_key_seed(KeySeed)?;
            let end: usize = a.next_value()?;
            let _value_key = a.next_key_seed(KeySeed)?;
            let value = a.next_value_seed(RawSeed)?;
            return Ok(Node {
                span: Some(start..end),
                value,
            });
        }
        table_after(first, a).map(bare)
    }
}

fn bare(value: Value) -> Node {
    Node { span: None, value }
}

/// Reads a table (or a datetime, which arrives as a one-entry map) whose first key is
/// already taken.
fn table_after<'de, A: MapAccess<'de>>(first: Key, mut a: A) -> Result<Value, A::Error> {
    if first.name == DATETIME_FIELD {
        let s: String = a.next_value()?;
        return Ok(Value::Datetime(s));
    }
    let mut entries = vec![(first, a.next_value_seed(SpannedSeed)?)];
    while let Some(k) = a.next_key_seed(KeySeed)? {
        let v = a.next_value_seed(SpannedSeed)?;
        entries.push((k, v));
    }
    Ok(Value::Table(entries))
}

/// The value inside a span wrapper: asked for with `deserialize_any`, as asking for a
/// span again would loop.
struct RawSeed;

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Integer)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = a.next_element_seed(SpannedSeed)? {
            items.push(n);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        match a.next_key_seed(KeySeed)? {
            None => Ok(Value::Table(Vec::new())),
            Some(first) => table_after(first, a),
        }
    }
}

/// A key with its span when the parser has one.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            span: None,
            name: v.to_string(),
        })
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Key, E> {
        Ok(Key {
            span: None,
            name: v,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Key, A::Error> {
        let _start_key: Option<String> = a.next_key()?;
        let start: usize = a.next_value()?;
        let _end_key: Option<String> = a.next_key()?;
        let end: usize = a.next_value()?;
        let _value_key: Option<String> = a.next_key()?;
        let name: String = a.next_value()?;
        Ok(Key {
            span: Some(start..end),
            name,
        })
    }
}

/// Text that might be a connection string or a password is never echoed.
pub fn looks_secret(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    s.contains("://") || s.contains('@') || lower.contains("password")
}

impl Node {
    /// The position of this value, or of `fallback` when the parser had none.
    pub fn offset(&self, fallback: usize) -> usize {
        self.span.as_ref().map_or(fallback, |s| s.start)
    }
}

impl Key {
    /// Where to point for this entry: the key, else its value, else `fallback`.
    pub fn offset(&self, value: &Node, fallback: usize) -> usize {
        self.span
            .as_ref()
            .map_or_else(|| value.offset(fallback), |s| s.start)
    }
}

/// `parent.key`, quoting the key when it is not a bare TOML key.
pub fn join(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, offset: usize) -> usize {
        text[..offset].matches('\n').count() + 1
    }

    fn table(n: &Node) -> &[(Key, Node)] {
        match &n.value {
            Value::Table(t) => t,
            other => panic!("not a table: {other:?}"),
        }
    }

    #[test]
    fn spans_of_keys_values_and_dotted_keys() {
        let text = "# c\n[app]\nx = 1\nsub.dotted = \"s\"\n[[source]]\nurls = [\n  { url = \"u\" },\n]\nwhen = 1979-05-27T07:32:00Z\n";
        let root = parse(text).unwrap();
        let top = table(&root);
        assert_eq!(top[0].0.name, "app");
        assert_eq!(line(text, top[0].0.offset(&top[0].1, 0)), 2);
        let app = table(&top[0].1);
        assert_eq!(app[0].1.value, Value::Integer(1));
        assert_eq!(line(text, app[0].1.offset(0)), 3);
        assert_eq!(app[1].0.name, "sub");
        let sub = table(&app[1].1);
        assert_eq!(sub[0].0.name, "dotted");
        assert_eq!(line(text, sub[0].0.offset(&sub[0].1, 0)), 4);
        let Value::Array(sources) = &top[1].1.value else {
            panic!("source is not an array")
        };
        let src = table(&sources[0]);
        let Value::Array(urls) = &src[0].1.value else {
            panic!("urls is not an array")
        };
        assert_eq!(line(text, urls[0].offset(0)), 7);
        let url = table(&urls[0]);
        assert_eq!(url[0].1.value, Value::String("u".into()));
        assert_eq!(src[1].0.name, "when");
        assert!(matches!(src[1].1.value, Value::Datetime(_)));
        assert_eq!(line(text, src[1].0.offset(&src[1].1, 0)), 9);
    }

    #[test]
    fn order_is_kept() {
        let root = parse("b = 1\na = 2\nc = 3\n").unwrap();
        let names: Vec<&str> = table(&root).iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "c"]);
    }

    #[test]
    fn syntax_errors_have_spans() {
        let e = parse("[app]\nx = 1\ny = = 2\n").unwrap_err();
        let span = e.span().unwrap();
        assert_eq!(line("[app]\nx = 1\ny = = 2\n", span.start), 3);
        assert!(parse("[app]\nx = 1\nx = 2\n")
            .unwrap_err()
            .message()
            .contains("duplicate"));
    }

    #[test]
    fn secrets_are_not_described() {
        assert_eq!(
            Value::String("postgres://u:p@h/d".into()).describe(false),
            "a string"
        );
        assert_eq!(Value::String("x".into()).describe(true), "a string");
        assert_eq!(
            Value::String("four".into()).describe(false),
            "string \"four\""
        );
    }

    #[test]
    fn join_quotes_dotted_keys() {
        assert_eq!(join("", "app"), "app");
        assert_eq!(
            join("source[0].tables", "private.t8"),
            "source[0].tables.\"private.t8\""
        );
    }
}
