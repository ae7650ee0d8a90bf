//! The Go implementation's `map.yaml`, read unchanged (SPEC §3), in any valid YAML
//! (block and flow collections, quoted and block scalars, anchors and aliases): parsed
//! by saphyr-parser's events, which carry positions, into the same tree the TOML map is
//! checked from, so every error names the file, line and key as for TOML.

use std::collections::HashMap;
use std::path::Path;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};

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

/// Builds [`Y`] values from the parser's events.
struct Builder<'a> {
    events: Parser<'a, saphyr_parser::StrInput<'a>>,
    file: &'a Path,
    /// Byte offset of each character (the parser counts characters), and the end.
    bytes: Vec<usize>,
    /// Anchored values by anchor id, for the aliases after them.
    anchors: HashMap<usize, Y>,
}

impl<'a> Builder<'a> {
    fn error(&self, line: usize, message: impl Into<String>) -> ConfigError {
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: None,
            key: None,
            message: message.into(),
        }
    }

    fn scan_error(&self, e: &ScanError) -> ConfigError {
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line: Some(e.marker().line()),
            column: Some(e.marker().col() + 1),
            key: None,
            message: e.info().to_string(),
        }
    }

    fn next(&mut self) -> Result<(Event<'a>, Span), ConfigError> {
        match self.events.next() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(self.scan_error(&e)),
            None => Err(self.error(1, "unexpected end of the document")),
        }
    }

    fn offset(&self, span: &Span) -> usize {
        let i = span.start.index();
        self.bytes.get(i).copied().unwrap_or(i)
    }

    /// The value whose first event is `ev`.
    fn value(&mut self, ev: Event<'a>, span: Span) -> Result<Y, ConfigError> {
        let at = self.offset(&span);
        let (y, anchor) = match ev {
            Event::Scalar(text, style, anchor, _) => {
                // A plain empty, `~` or `null` value is YAML's null: an entry with no
                // body, as in `t0:`.
                let null = style == ScalarStyle::Plain
                    && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL");
                let y = if null {
                    Y::Null(at)
                } else {
                    Y::Scalar(text.into_owned(), at)
                };
                (y, anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.value(ev, span)?);
                }
                (Y::Seq(items, at), anchor)
            }
            Event::MappingStart(anchor, _) => (self.mapping(at)?, anchor),
            Event::Alias(id) => {
                let y = self.anchors.get(&id).cloned().ok_or_else(|| {
                    self.error(
                        span.start.line(),
                        "an alias of an anchor not defined before it",
                    )
                })?;
                return Ok(y);
            }
            other => {
                return Err(self.error(span.start.line(), format!("unexpected {other:?}")));
            }
        };
        if anchor > 0 {
            self.anchors.insert(anchor, y.clone());
        }
        Ok(y)
    }

    /// A mapping's entries up to its end; keys are strings, each once.
    fn mapping(&mut self, at: usize) -> Result<Y, ConfigError> {
        let mut entries: Vec<(String, usize, Y)> = Vec::new();
        loop {
            let (ev, span) = self.next()?;
            if ev == Event::MappingEnd {
                break;
            }
            let line = span.start.line();
            let key = match self.value(ev, span)? {
                Y::Scalar(k, o) => (k, o),
                Y::Null(o) => (String::new(), o),
                _ => return Err(self.error(line, "a key must be a plain string")),
            };
            if entries.iter().any(|(k, _, _)| *k == key.0) {
                return Err(self.error(line, format!("duplicate key {:?}", key.0)));
            }
            let (ev, span) = self.next()?;
            let v = self.value(ev, span)?;
            entries.push((key.0, key.1, v));
        }
        Ok(Y::Map(entries, at))
    }

    /// The document's root (null for an empty file); one document only.
    fn document(&mut self) -> Result<Y, ConfigError> {
        let mut root = None;
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(root.unwrap_or(Y::Null(0))),
                Event::DocumentStart(_) if root.is_some() => {
                    return Err(self.error(span.start.line(), "one YAML document only"));
                }
                Event::DocumentStart(_) => {
                    let (ev, span) = self.next()?;
                    root = Some(self.value(ev, span)?);
                }
                other => return Err(self.error(span.start.line(), format!("unexpected {other:?}"))),
            }
        }
    }
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
    let mut b = Builder {
        events: Parser::new_from_str(text),
        file,
        bytes: text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect(),
        anchors: HashMap::new(),
    };
    let root = b.document()?;
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
    fn any_valid_yaml() {
        // Flow collections, a folded block scalar, an anchor and its alias.
        let text = "- database: db1\n  urls: [{url: \"postgres://h/a\", sid: a}, {url: 'postgres://h/b', sid: 7}]\n  tables:\n    t1: &common\n      filter: >-\n        a > 1\n        && b < 2\n    t2: *common\n    t3: {target: x}\n";
        let root = parse(text, Path::new("m.yaml")).unwrap();
        let Value::Array(fams) = &get(&root, "source").value else {
            panic!()
        };
        let Value::Array(urls) = &get(&fams[0], "urls").value else {
            panic!()
        };
        assert_eq!(s(get(&urls[0], "url")), "postgres://h/a");
        assert_eq!(s(get(&urls[1], "sid")), "7");
        let tables = get(&fams[0], "tables");
        assert_eq!(s(get(get(tables, "t1"), "filter")), "a > 1 && b < 2");
        assert_eq!(s(get(get(tables, "t2"), "filter")), "a > 1 && b < 2");
        assert_eq!(s(get(get(tables, "t3"), "target")), "x");
        // Byte offsets, whatever characters come before.
        let root = parse(
            "# é\n- database: ü\n  tables:\n    t: {}\n",
            Path::new("m.yaml"),
        )
        .unwrap();
        let Value::Array(fams) = &get(&root, "source").value else {
            panic!()
        };
        let t = get(get(&fams[0], "tables"), "t");
        let at = t.span.clone().unwrap().start;
        assert_eq!(
            &"# é\n- database: ü\n  tables:\n    t: {}\n"[at..at + 2],
            "{}"
        );
    }

    #[test]
    fn an_empty_map_has_no_sources() {
        let root = parse("# nothing yet\n", Path::new("m.yaml")).unwrap();
        assert_eq!(get(&root, "source").value, Value::Array(vec![]));
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
