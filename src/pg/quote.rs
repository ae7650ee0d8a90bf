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
    }
}
