//! The Go implementation's `map.yaml`, read unchanged (SPEC §3): a small block-style
//! YAML subset (sequences, mappings, plain and quoted scalars, comments, empty values,
//! `{}`/`[]` and flat flow mappings), turned into the same tree the TOML map is checked
//! from, with byte offsets, so every error names the file, line and key as for TOML.
//! Written by hand: the subset is tiny and a YAML crate would be a dependency for it.

use std::path::Path;

use super::error::ConfigError;
use super::tree::{Key, Node, Value};

/// A parsed YAML value and the byte offset it starts at.
#[derive(Debug, Clone, PartialEq)]
enum Y {
    Null(usize),
    Scalar(String, usize),
    Seq(Vec<Y>, usize),
    Map(Vec<(String, usize, Y)>, usize),
}

impl Y {
    fn offset(&self) -> usize {
        match self {
            Y::Null(o) | Y::Scalar(_, o) | Y::Seq(_, o) | Y::Map(_, o) => *o,
        }
    }
}

/// One meaningful line: indentation, content without comment, offset of the content.
struct Line<'a> {
    indent: usize,
    text: &'a str,
    offset: usize,
    number: usize,
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    file: &'a Path,
}

/// The content of a line without its comment (a `#` at the start or after a space,
/// outside quotes), right-trimmed.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && (prev == ' ' || prev == '\t') => return line[..i].trim_end(),
            None => {}
        }
        prev = c;
    }
    line.trim_end()
}

/// Splits `key: value` at the first `:` followed by a space or the end, outside quotes.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let mut quote: Option<char> = None;
    for (i, c) in text.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if (c == '"' || c == '\'') && i == 0 => quote = Some(c),
            None if c == ':' => {
                let rest = &text[i + 1..];
                if rest.is_empty() || rest.starts_with(' ') {
                    return Some((text[..i].trim_end(), rest.trim_start()));
                }
            }
            None => {}
        }
    }
    None
}

impl<'a> Parser<'a> {
    fn new(text: &'a str, file: &'a Path) -> Parser<'a> {
        let mut lines = Vec::new();
        let mut offset = 0;
        for (n, raw) in text.split_inclusive('\n').enumerate() {
            let line = raw.trim_end_matches(['\n', '\r']);
            let content = strip_comment(line);
            let indent = content.len() - content.trim_start_matches(' ').len();
            let body = &content[indent..];
            if !body.is_empty() && body != "---" {
                lines.push(Line {
                    indent,
                    text: body,
                    offset: offset + indent,
                    number: n + 1,
                });
            }
            offset += raw.len();
        }
        Parser {
            lines,
            pos: 0,
            file,
        }
    }

    fn error(&self, number: usize, message: impl Into<String>) -> ConfigError {
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line: Some(number),
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// The block starting at the current line, whose lines are indented `indent`.
    fn block(&mut self, indent: usize) -> Result<Y, ConfigError> {
        let Some(first) = self.lines.get(self.pos) else {
            return Ok(Y::Null(0));
        };
        if first.text == "-" || first.text.starts_with("- ") {
            self.sequence(indent)
        } else {
            self.mapping(indent, None)
        }
    }

    fn sequence(&mut self, indent: usize) -> Result<Y, ConfigError> {
        let start = self.lines[self.pos].offset;
        let mut items = Vec::new();
        while let Some(line) = self.lines.get(self.pos) {
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                return Err(self.error(line.number, "unexpected indentation"));
            }
            let Some(rest) = line.text.strip_prefix('-') else {
                break;
            };
            let (number, offset) = (line.number, line.offset);
            let body = rest.trim_start();
            let body_indent = indent + (line.text.len() - body.len());
            self.pos += 1;
            if body.is_empty() {
                items.push(self.nested(indent, offset)?);
            } else if split_key(body).is_some() && !body.starts_with(['"', '\'', '{', '[']) {
                // `- key: value` opens a mapping whose keys line up with `key`.
                let first = (body, offset + (body_indent - indent), number);
                items.push(self.mapping(body_indent, Some(first))?);
            } else {
                items.push(self.scalar(body, offset + (body_indent - indent), number)?);
            }
        }
        Ok(Y::Seq(items, start))
    }

    /// The value of a key or item with nothing after it: a deeper block, a sequence at
    /// the same indentation (`key:` then `- item`), or null.
    fn nested(&mut self, indent: usize, offset: usize) -> Result<Y, ConfigError> {
        match self.lines.get(self.pos) {
            Some(next) if next.indent > indent => {
                let i = next.indent;
                self.block(i)
            }
            Some(next)
                if next.indent == indent && (next.text == "-" || next.text.starts_with("- ")) =>
            {
                self.sequence(indent)
            }
            _ => Ok(Y::Null(offset)),
        }
    }

    fn mapping(
        &mut self,
        indent: usize,
        first: Option<(&'a str, usize, usize)>,
    ) -> Result<Y, ConfigError> {
        let mut entries = Vec::new();
        let start = first.map_or_else(|| self.lines[self.pos].offset, |f| f.1);
        let mut pending = first;
        loop {
            let (text, offset, number) = match pending.take() {
                Some(f) => f,
                None => {
                    let Some(line) = self.lines.get(self.pos) else {
                        break;
                    };
                    if line.indent < indent {
                        break;
                    }
                    if line.indent > indent {
                        return Err(self.error(line.number, "unexpected indentation"));
                    }
                    if line.text.starts_with("- ") || line.text == "-" {
                        break;
                    }
                    let f = (line.text, line.offset, line.number);
                    self.pos += 1;
                    f
                }
            };
            let Some((key, value)) = split_key(text) else {
                return Err(self.error(number, format!("expected key: value, found {text:?}")));
            };
            let key = unquote(key).map_err(|m| self.error(number, m))?;
            if entries
                .iter()
                .any(|(k, _, _): &(String, usize, Y)| *k == key)
            {
                return Err(self.error(number, format!("key {key:?} appears twice")));
            }
            let value = if value.is_empty() {
                self.nested(indent, offset)?
            } else {
                let at = offset + (text.len() - value.len());
                self.scalar(value, at, number)?
            };
            entries.push((key, offset, value));
        }
        Ok(Y::Map(entries, start))
    }

    /// A scalar, `{}`, `[]` or a flat flow mapping `{ a: b, c: "d" }`.
    fn scalar(&self, text: &str, offset: usize, number: usize) -> Result<Y, ConfigError> {
        if text == "[]" {
            return Ok(Y::Seq(Vec::new(), offset));
        }
        if let Some(inner) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            let mut entries = Vec::new();
            for part in split_flow(inner) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let (k, v) = split_key(part).ok_or_else(|| {
                    self.error(number, format!("expected key: value in {text:?}"))
                })?;
                let k = unquote(k).map_err(|m| self.error(number, m))?;
                let v = unquote(v).map_err(|m| self.error(number, m))?;
                entries.push((k, offset, Y::Scalar(v, offset)));
            }
            return Ok(Y::Map(entries, offset));
        }
        if text == "~" || text == "null" {
            return Ok(Y::Null(offset));
        }
        let s = unquote(text).map_err(|m| self.error(number, m))?;
        Ok(Y::Scalar(s, offset))
    }
}

/// Splits a flow mapping's body at commas outside quotes.
fn split_flow(inner: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quote: Option<char> = None;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ',' => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            None => {}
        }
    }
    parts.push(&inner[start..]);
    parts
}

/// A plain, 'single' or "double" quoted scalar's text.
fn unquote(text: &str) -> Result<String, String> {
    let text = text.trim();
    if let Some(inner) = text.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or_else(|| format!("unterminated quoted string {text}"))?;
        return Ok(inner.replace("''", "'"));
    }
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("unterminated quoted string {text}"))?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some('/') => out.push('/'),
                other => {
                    return Err(format!(
                        "unsupported escape \\{} in {text}",
                        other.unwrap_or(' ')
                    ))
                }
            }
        }
        return Ok(out);
    }
    Ok(text.to_string())
}

fn node(offset: usize, value: Value) -> Node {
    Node {
        span: Some(offset..offset),
        value,
    }
}

/// Where a value sits, which decides what an empty one means.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Other,
    /// The value of a family's `tables:` key.
    Tables,
    /// One entry under `tables:`: empty means `{}`.
    TableEntry,
}

/// The tree the TOML map parser would make of the same map: an entry with no body is
/// `{}`; every scalar is a string (`sid: 12` is "12").
fn convert(y: Y, place: Place) -> Node {
    match y {
        Y::Null(o) if place == Place::TableEntry => node(o, Value::Table(Vec::new())),
        Y::Null(o) => node(o, Value::String(String::new())),
        Y::Scalar(s, o) => node(o, Value::String(s)),
        Y::Seq(items, o) => node(
            o,
            Value::Array(
                items
                    .into_iter()
                    .map(|i| convert(i, Place::Other))
                    .collect(),
            ),
        ),
        Y::Map(entries, o) => {
            let entries = entries
                .into_iter()
                .map(|(name, ko, v)| {
                    let child = match place {
                        Place::Tables => Place::TableEntry,
                        Place::Other if name == "tables" => Place::Tables,
                        _ => Place::Other,
                    };
                    let value = convert(v, child);
                    let key = Key {
                        span: Some(ko..ko),
                        name,
                    };
                    (key, value)
                })
                .collect();
            node(o, Value::Table(entries))
        }
    }
}

/// Parses a Go `map.yaml` into the map tree (`{ source = [ … ] }`).
pub fn parse(text: &str, file: &Path) -> Result<Node, ConfigError> {
    let mut p = Parser::new(text, file);
    let root = p.block(0)?;
    if let Some(line) = p.lines.get(p.pos) {
        return Err(p.error(line.number, format!("unexpected {:?}", line.text)));
    }
    let offset = root.offset();
    let families = match root {
        Y::Seq(..) => convert(root, Place::Other),
        Y::Null(_) => node(0, Value::Array(Vec::new())),
        _ => {
            return Err(ConfigError::Syntax {
                file: file.to_path_buf(),
                line: Some(1),
                column: None,
                key: None,
                message: "expected a list of databases (- database: …)".into(),
            })
        }
    };
    Ok(node(
        offset,
        Value::Table(vec![(
            Key {
                span: Some(offset..offset),
                name: "source".into(),
            },
            families,
        )]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &Node) -> &str {
        match &v.value {
            Value::String(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }

    fn get<'a>(n: &'a Node, key: &str) -> &'a Node {
        match &n.value {
            Value::Table(e) => &e.iter().find(|(k, _)| k.name == key).expect(key).1,
            other => panic!("expected a table, got {other:?}"),
        }
    }

    #[test]
    fn the_go_layout() {
        let text = "# the Go map\n- database: db1\n  urls:\n  - url: postgres://u:p@h/db1?replication=database # tenant\n    sid: 12\n  tables:\n    t0:\n    t2:\n      target: rt2\n    t7:\n      partitions_regex: \"t7_.*\"\n    t9: { filter: \"a > 1, b\", type: 'app''end' }\n\n- database: db2\n  urls:\n    - url: 'x'\n      sid: b\n  tables:\n    s1: {}\n";
        let root = parse(text, Path::new("m.yaml")).unwrap();
        let Value::Array(fams) = &get(&root, "source").value else {
            panic!()
        };
        assert_eq!(fams.len(), 2);
        assert_eq!(s(get(&fams[0], "database")), "db1");
        let Value::Array(urls) = &get(&fams[0], "urls").value else {
            panic!()
        };
        assert_eq!(
            s(get(&urls[0], "url")),
            "postgres://u:p@h/db1?replication=database"
        );
        assert_eq!(s(get(&urls[0], "sid")), "12");
        let tables = get(&fams[0], "tables");
        assert_eq!(get(tables, "t0").value, Value::Table(vec![]));
        assert_eq!(s(get(get(tables, "t2"), "target")), "rt2");
        assert_eq!(s(get(get(tables, "t7"), "partitions_regex")), "t7_.*");
        assert_eq!(s(get(get(tables, "t9"), "filter")), "a > 1, b");
        assert_eq!(s(get(get(tables, "t9"), "type")), "app'end");
        let Value::Array(urls2) = &get(&fams[1], "urls").value else {
            panic!()
        };
        assert_eq!(s(get(&urls2[0], "sid")), "b");
        assert_eq!(
            get(get(&fams[1], "tables"), "s1").value,
            Value::Table(vec![])
        );
        // Offsets point at the right line.
        let t2 = get(tables, "t2");
        let line = text[..t2.span.clone().unwrap().start].matches('\n').count() + 1;
        assert_eq!(line, 9);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("- database: a\n   bad: indent\n", Path::new("m.yaml")).unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");
        let e = parse("- database: a\n  database: b\n", Path::new("m.yaml")).unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");
        let e = parse("database: a\n", Path::new("m.yaml")).unwrap_err();
        assert_eq!(e.line(), Some(1), "{e}");
    }
}
