//! Text that is not UTF-8. Every session asks the server for UTF8, so a source in
//! LATIN1, EUC_JP… converts its text itself; only a SQL_ASCII database, which declares
//! no encoding, sends its bytes as they were stored. A value whose bytes are not UTF-8
//! cannot be written to a UTF-8 destination: it makes its row a rejected row, and this
//! says which column and which bytes.

use std::fmt;

/// A value of `column` whose bytes are not valid UTF-8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotUtf8 {
    pub column: String,
    /// Offset of the first invalid byte.
    pub at: usize,
    /// Up to four bytes from `at`.
    pub bytes: Vec<u8>,
}

impl NotUtf8 {
    /// None when `bytes` is valid UTF-8.
    pub fn check(column: &str, bytes: &[u8]) -> Option<NotUtf8> {
        let e = std::str::from_utf8(bytes).err()?;
        let at = e.valid_up_to();
        let len = e.error_len().unwrap_or(bytes.len() - at).clamp(1, 4);
        Some(NotUtf8 {
            column: column.to_string(),
            at,
            bytes: bytes[at..(at + len).min(bytes.len())].to_vec(),
        })
    }
}

impl fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: String = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "column \"{}\" is not valid UTF-8: byte sequence 0x{hex} at byte {} (a SQL_ASCII \
             source database sends its bytes unconverted; the destination takes only UTF-8)",
            self.column, self.at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_column_and_the_bytes() {
        assert_eq!(NotUtf8::check("v", "café".as_bytes()), None);
        let e = NotUtf8::check("v", b"caf\xe9!").unwrap();
        assert_eq!((e.at, e.bytes.clone()), (3, vec![0xe9]));
        assert_eq!(
            e.to_string(),
            "column \"v\" is not valid UTF-8: byte sequence 0xe9 at byte 3 (a SQL_ASCII \
             source database sends its bytes unconverted; the destination takes only UTF-8)"
        );
        // Cut off in the middle of a character.
        let e = NotUtf8::check("v", b"ab\xe6\x97").unwrap();
        assert_eq!((e.at, e.bytes), (2, vec![0xe6, 0x97]));
    }
}
