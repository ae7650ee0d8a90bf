//! Quoting for generated SQL: table and column names come from users' schemas, values
//! from their rows. Sessions run with `standard_conforming_strings = on`, so a literal
//! needs only its single quotes doubled.

/// `"name"` with embedded double quotes doubled.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    push_ident(&mut out, name);
    out
}

/// Appends `"name"` to `out`.
pub fn push_ident(out: &mut String, name: &str) {
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    let mut out = ident(schema);
    out.push('.');
    push_ident(&mut out, name);
    out
}

/// `'text'` with embedded single quotes doubled.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    push_literal(&mut out, value);
    out
}

/// `json_object(ARRAY[names], ARRAY[values])::jsonb` of name → text value (None: null):
/// a row as the dead letter keeps it.
pub fn jsonb_object<'a>(pairs: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let (names, vals): (Vec<String>, Vec<String>) = pairs
        .map(|(n, v)| (literal(n), v.map_or("NULL".to_string(), literal)))
        .unzip();
    format!(
        "json_object(ARRAY[{}]::text[], ARRAY[{}]::text[])::jsonb",
        names.join(","),
        vals.join(",")
    )
}

/// Appends `'text'` to `out`.
pub fn push_literal(out: &mut String, value: &str) {
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
}

/// Appends a field in COPY text format: backslash, tab, newline and carriage return
/// escaped (NULL is written by the caller as `\N`).
pub fn push_copy_field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Most values need no escaping: copy them whole.
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents_and_literals() {
        assert_eq!(ident("t"), "\"t\"");
        assert_eq!(ident("My \"odd\" Table"), "\"My \"\"odd\"\" Table\"");
        assert_eq!(qualified("s p", "T"), "\"s p\".\"T\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("back\\slash"), "'back\\slash'");
        let mut out = Vec::new();
        push_copy_field(&mut out, b"a\tb\\c\nd\re");
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re");
    }
}
