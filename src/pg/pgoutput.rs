//! Decoder of pgoutput messages (PostgreSQL "Logical Replication Message Formats").
//!
//! Pure: bytes in, [`PgOutput`] out, no I/O, so it can be unit-tested against captured
//! server output and fed garbage. Every read is bounds-checked; malformed input is a
//! [`DecodeError`], never a panic, because the bytes come from the network.
//!
//! The decoder is strict: a message with bytes left over, or a stream message out of
//! place, is an error. A misread field shifts everything after it, so stopping with a
//! clear error beats streaming silently corrupted rows into the destination.

use std::fmt;

use crate::pg::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput<'a> {
    /// Start of a transaction; `final_lsn` is the LSN of its commit record.
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm once the transaction is applied.
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// The transaction was replayed from another node (replication origin).
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    /// A non-built-in type used by a following Relation.
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel: u32,
        new: Tuple<'a>,
    },
    Update {
        rel: u32,
        /// Present when the key changed ('K') or the table is REPLICA IDENTITY FULL ('O').
        old: Option<OldTuple<'a>>,
        new: Tuple<'a>,
    },
    Delete {
        rel: u32,
        old: OldTuple<'a>,
    },
    /// `options` bit 1 = CASCADE, bit 2 = RESTART IDENTITY; see [`TRUNCATE_CASCADE`].
    Truncate {
        options: u8,
        rels: Vec<u32>,
    },
    /// `pg_logical_emit_message` output (only with the `messages` option).
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    /// Start of one chunk of a large in-progress transaction (protocol v2+, `streaming`).
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// `sub_xid == xid` aborts the whole transaction, otherwise only that subtransaction.
    StreamAbort {
        xid: u32,
        sub_xid: u32,
    },
}

/// Truncate option bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Schema of a published table as the server describes it; sent before a relation's
/// first change and again after each schema change.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `b'd'` default (primary key), `b'n'` nothing, `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelColumn {
    /// Part of the replica identity (for REPLICA IDENTITY FULL: every column).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// -1 when the type has no modifier.
    pub type_mod: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue<'a> {
    Null,
    /// 'u': an unchanged TOASTed value the server did not send; keep the target's value.
    Unchanged,
    /// 't': the type's text output.
    Text(&'a str),
    /// 'b': the type's binary send format (only with the `binary` option).
    Binary(&'a [u8]),
    /// 't' whose bytes are not UTF-8 (a SQL_ASCII source): kept, so that its row can be
    /// reported as rejected rather than the whole message failing.
    NotUtf8(&'a [u8]),
}

/// One value per column of the relation, in the Relation message's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple<'a>(pub Vec<TupleValue<'a>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica identity columns are set, the others are Null.
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OldTuple<'a> {
    pub kind: OldKind,
    pub tuple: Tuple<'a>,
}

/// What was wrong with a message. `tag` is the message's first byte ('I', 'U', ...);
/// `at` is a byte offset within the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended while a field of `needed` bytes was being read at `at`.
    Truncated {
        tag: u8,
        needed: usize,
        at: usize,
    },
    UnknownTag(u8),
    /// A name (relation, column, type) is not UTF-8: a SQL_ASCII database whose
    /// catalog holds other bytes. (A value that is not UTF-8 is kept: see
    /// [`TupleValue::NotUtf8`].)
    BadUtf8 {
        tag: u8,
    },
    /// A tuple column starts with a kind byte other than 'n', 'u', 't', 'b'.
    BadTupleKind(u8),
    /// An empty CopyData payload.
    Empty,
    /// A NUL-terminated string has no NUL before the end of the message.
    Unterminated {
        tag: u8,
        at: usize,
    },
    /// A length or count field is negative.
    BadLength {
        tag: u8,
        len: i64,
        at: usize,
    },
    /// Expected a 'K'/'O'/'N' tuple marker (which ones depends on the message).
    BadTupleMarker {
        tag: u8,
        found: u8,
        at: usize,
    },
    /// The message is longer than its fields.
    TrailingBytes {
        tag: u8,
        extra: usize,
    },
    /// A stream-control message where the stream state does not allow it (for example
    /// StreamStop outside a stream, or Begin inside one): the decoder would otherwise
    /// misread the xid prefixes of everything that follows.
    UnexpectedInStream {
        tag: u8,
        in_stream: bool,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Truncated { tag, needed, at } => write!(
                f,
                "pgoutput {} message truncated: {needed} more byte(s) needed at offset {at}",
                TagName(tag)
            ),
            DecodeError::UnknownTag(tag) => {
                write!(f, "unknown pgoutput message tag {}", TagName(tag))
            }
            DecodeError::BadUtf8 { tag } => write!(
                f,
                "pgoutput {} message holds text that is not valid UTF-8",
                TagName(tag)
            ),
            DecodeError::BadTupleKind(kind) => write!(
                f,
                "pgoutput tuple data has column kind {} (expected 'n', 'u', 't' or 'b')",
                Byte(kind)
            ),
            DecodeError::Empty => write!(f, "empty pgoutput message"),
            DecodeError::Unterminated { tag, at } => write!(
                f,
                "pgoutput {} message: string at offset {at} has no terminating NUL",
                TagName(tag)
            ),
            DecodeError::BadLength { tag, len, at } => write!(
                f,
                "pgoutput {} message: invalid length or count {len} at offset {at}",
                TagName(tag)
            ),
            DecodeError::BadTupleMarker { tag, found, at } => {
                let expected = match tag {
                    b'U' => "'K', 'O' or 'N'",
                    b'D' => "'K' or 'O'",
                    _ => "'N'",
                };
                write!(
                    f,
                    "pgoutput {} message: tuple marker {} at offset {at} (expected {expected})",
                    TagName(tag),
                    Byte(found)
                )
            }
            DecodeError::TrailingBytes { tag, extra } => write!(
                f,
                "pgoutput {} message has {extra} unexpected trailing byte(s)",
                TagName(tag)
            ),
            DecodeError::UnexpectedInStream { tag, in_stream } => write!(
                f,
                "pgoutput {} message not expected {} a streamed transaction block",
                TagName(tag),
                if in_stream { "inside" } else { "outside" }
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Formats a byte as a quoted character when printable, else as hex.
struct Byte(u8);

impl fmt::Display for Byte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02X}", self.0)
        }
    }
}

/// Formats a message tag with its name, e.g. `'U' (Update)`.
struct TagName(u8);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match tag_name(self.0) {
            Some(name) => write!(f, "{} ({name})", Byte(self.0)),
            None => write!(f, "{}", Byte(self.0)),
        }
    }
}

/// The protocol's name for a message tag, for error messages and logs.
pub fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

impl PgOutput<'_> {
    /// The message's tag byte on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            PgOutput::Begin { .. } => b'B',
            PgOutput::Commit { .. } => b'C',
            PgOutput::Origin { .. } => b'O',
            PgOutput::Relation(_) => b'R',
            PgOutput::Type { .. } => b'Y',
            PgOutput::Insert { .. } => b'I',
            PgOutput::Update { .. } => b'U',
            PgOutput::Delete { .. } => b'D',
            PgOutput::Truncate { .. } => b'T',
            PgOutput::Message { .. } => b'M',
            PgOutput::StreamStart { .. } => b'S',
            PgOutput::StreamStop => b'E',
            PgOutput::StreamCommit { .. } => b'c',
            PgOutput::StreamAbort { .. } => b'A',
        }
    }
}

/// Decodes a sequence of pgoutput messages from one replication stream.
///
/// Stateful only because of streaming (protocol v2+): between StreamStart and
/// StreamStop, data messages carry a leading xid that is absent elsewhere, so the same
/// bytes parse differently depending on what came before. Use one decoder per
/// connection and feed it every message in order.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    in_stream: bool,
    /// Top-level xid from the StreamStart of the current block.
    stream_xid: Option<u32>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one message (the payload of an XLogData frame).
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<PgOutput<'a>, DecodeError> {
        self.decode_with_xid(buf).map(|(msg, _)| msg)
    }

    /// Like [`decode`](Self::decode), also returning the xid prefix that data messages
    /// carry inside a streamed block. It may be a subtransaction's xid; the block's
    /// top-level xid is [`stream_xid`](Self::stream_xid). `None` outside streams.
    pub fn decode_with_xid<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<(PgOutput<'a>, Option<u32>), DecodeError> {
        let (&tag, _) = buf.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader { buf, pos: 1, tag };
        let mut xid = None;
        let msg = match tag {
            b'B' => {
                self.expect_outside(tag)?;
                PgOutput::Begin {
                    final_lsn: r.lsn()?,
                    commit_time: r.i64()?,
                    xid: r.u32()?,
                }
            }
            b'C' => {
                self.expect_outside(tag)?;
                PgOutput::Commit {
                    flags: r.u8()?,
                    commit_lsn: r.lsn()?,
                    end_lsn: r.lsn()?,
                    commit_time: r.i64()?,
                }
            }
            b'O' => PgOutput::Origin {
                commit_lsn: r.lsn()?,
                name: r.cstr()?,
            },
            b'R' => {
                xid = self.stream_prefix(&mut r)?;
                PgOutput::Relation(r.relation()?)
            }
            b'Y' => {
                xid = self.stream_prefix(&mut r)?;
                PgOutput::Type {
                    id: r.u32()?,
                    namespace: r.cstr()?,
                    name: r.cstr()?,
                }
            }
            b'I' => {
                xid = self.stream_prefix(&mut r)?;
                let rel = r.u32()?;
                let at = r.pos;
                match r.u8()? {
                    b'N' => PgOutput::Insert {
                        rel,
                        new: r.tuple()?,
                    },
                    found => return Err(DecodeError::BadTupleMarker { tag, found, at }),
                }
            }
            b'U' => {
                xid = self.stream_prefix(&mut r)?;
                let rel = r.u32()?;
                let at = r.pos;
                let old = match r.u8()? {
                    b'N' => None,
                    marker @ (b'K' | b'O') => {
                        let old = r.old_tuple(marker)?;
                        let at = r.pos;
                        match r.u8()? {
                            b'N' => Some(old),
                            found => return Err(DecodeError::BadTupleMarker { tag, found, at }),
                        }
                    }
                    found => return Err(DecodeError::BadTupleMarker { tag, found, at }),
                };
                PgOutput::Update {
                    rel,
                    old,
                    new: r.tuple()?,
                }
            }
            b'D' => {
                xid = self.stream_prefix(&mut r)?;
                let rel = r.u32()?;
                let at = r.pos;
                match r.u8()? {
                    marker @ (b'K' | b'O') => PgOutput::Delete {
                        rel,
                        old: r.old_tuple(marker)?,
                    },
                    found => return Err(DecodeError::BadTupleMarker { tag, found, at }),
                }
            }
            b'T' => {
                xid = self.stream_prefix(&mut r)?;
                let count = r.count_i32()?;
                let options = r.u8()?;
                let bytes = r.array_of(count, 4)?;
                let rels = bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                PgOutput::Truncate { options, rels }
            }
            b'M' => {
                xid = self.stream_prefix(&mut r)?;
                let flags = r.u8()?;
                let lsn = r.lsn()?;
                let prefix = r.cstr()?;
                let len = r.count_i32()?;
                PgOutput::Message {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.take(len)?.to_vec(),
                }
            }
            b'S' => {
                self.expect_outside(tag)?;
                let xid = r.u32()?;
                let first_segment = r.u8()? == 1;
                r.finish()?;
                self.in_stream = true;
                self.stream_xid = Some(xid);
                return Ok((PgOutput::StreamStart { xid, first_segment }, None));
            }
            b'E' => {
                if !self.in_stream {
                    return Err(DecodeError::UnexpectedInStream {
                        tag,
                        in_stream: false,
                    });
                }
                r.finish()?;
                self.in_stream = false;
                self.stream_xid = None;
                return Ok((PgOutput::StreamStop, None));
            }
            b'c' => {
                self.expect_outside(tag)?;
                PgOutput::StreamCommit {
                    xid: r.u32()?,
                    flags: r.u8()?,
                    commit_lsn: r.lsn()?,
                    end_lsn: r.lsn()?,
                    commit_time: r.i64()?,
                }
            }
            b'A' => {
                self.expect_outside(tag)?;
                let msg = PgOutput::StreamAbort {
                    xid: r.u32()?,
                    sub_xid: r.u32()?,
                };
                // Protocol v4 with streaming=parallel appends the abort LSN and
                // timestamp; nothing here needs them, so skip them when present.
                if r.remaining() == 16 {
                    r.take(16)?;
                }
                msg
            }
            _ => return Err(DecodeError::UnknownTag(tag)),
        };
        r.finish()?;
        Ok((msg, xid))
    }

    /// Whether the last message decoded left us between StreamStart and StreamStop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// The top-level xid of the current streamed block, if inside one.
    pub fn stream_xid(&self) -> Option<u32> {
        self.stream_xid
    }

    fn expect_outside(&self, tag: u8) -> Result<(), DecodeError> {
        if self.in_stream {
            Err(DecodeError::UnexpectedInStream {
                tag,
                in_stream: true,
            })
        } else {
            Ok(())
        }
    }

    fn stream_prefix(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32().map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Bounds-checked big-endian cursor over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let truncated = DecodeError::Truncated {
            tag: self.tag,
            needed: n,
            at: self.pos,
        };
        let end = self.pos.checked_add(n).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.array().map(u64::from_be_bytes).map(Lsn)
    }

    /// An Int32 length or count, which must not be negative.
    fn count_i32(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| DecodeError::BadLength {
            tag: self.tag,
            len: i64::from(n),
            at,
        })
    }

    /// `count` elements of `size` bytes, checked against the buffer before anything is
    /// allocated: a hostile count must not turn into a huge allocation.
    fn array_of(&mut self, count: usize, size: usize) -> Result<&'a [u8], DecodeError> {
        let n = count.checked_mul(size).ok_or(DecodeError::BadLength {
            tag: self.tag,
            len: i64::try_from(count).unwrap_or(i64::MAX),
            at: self.pos,
        })?;
        self.take(n)
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated {
                tag: self.tag,
                at: self.pos,
            })?;
        let s = self.utf8(&rest[..len])?;
        self.pos += len + 1;
        Ok(s)
    }

    fn utf8(&self, bytes: &[u8]) -> Result<String, DecodeError> {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { tag: self.tag })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                extra,
            }),
        }
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32()?;
        let namespace = self.cstr()?;
        let name = self.cstr()?;
        let replica_identity = self.u8()?;
        let ncols = usize::from(self.u16()?);
        // Each column takes at least 10 bytes; cap the reservation by what is there.
        let mut columns = Vec::with_capacity(ncols.min(self.remaining() / 10));
        for _ in 0..ncols {
            let flags = self.u8()?;
            columns.push(RelColumn {
                is_key: flags & 1 != 0,
                name: self.cstr()?,
                type_oid: self.u32()?,
                type_mod: self.i32()?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple<'a>, DecodeError> {
        let kind = if marker == b'K' {
            OldKind::Key
        } else {
            OldKind::Full
        };
        Ok(OldTuple {
            kind,
            tuple: self.tuple()?,
        })
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let ncols = usize::from(self.u16()?);
        // Each column takes at least one byte.
        let mut values = Vec::with_capacity(ncols.min(self.remaining()));
        for _ in 0..ncols {
            let value = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                b't' => {
                    let len = self.count_i32()?;
                    let bytes = self.take(len)?;
                    match std::str::from_utf8(bytes) {
                        Ok(s) => TupleValue::Text(s),
                        Err(_) => TupleValue::NotUtf8(bytes),
                    }
                }
                b'b' => {
                    let len = self.count_i32()?;
                    TupleValue::Binary(self.take(len)?)
                }
                kind => return Err(DecodeError::BadTupleKind(kind)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_SESSION: &str = include_str!("../../tests/fixtures/pgoutput/v1_session.txt");
    const V1_BINARY: &str = include_str!("../../tests/fixtures/pgoutput/v1_binary.txt");
    const V2_STREAM: &str = include_str!("../../tests/fixtures/pgoutput/v2_stream.txt");

    /// Decoded messages borrow their bytes; tests keep them for the whole run.
    fn leak(v: Vec<u8>) -> &'static [u8] {
        Box::leak(v.into_boxed_slice())
    }

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Lines of `lsn xid hex` as written by psql from pg_logical_slot_peek_binary_changes.
    fn fixture(text: &str) -> Vec<Vec<u8>> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| hex(l.split(' ').nth(2).unwrap()))
            .collect()
    }

    fn decode_all(text: &str) -> Vec<(PgOutput<'static>, Option<u32>)> {
        let mut d = Decoder::new();
        fixture(text)
            .into_iter()
            .map(|m| d.decode_with_xid(leak(m)).unwrap())
            .collect()
    }

    fn one(hexstr: &str) -> PgOutput<'static> {
        Decoder::new().decode(leak(hex(hexstr))).unwrap()
    }

    fn t(s: &str) -> TupleValue<'_> {
        TupleValue::Text(s)
    }

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn col(is_key: bool, name: &str, type_oid: u32) -> RelColumn {
        RelColumn {
            is_key,
            name: name.to_string(),
            type_oid,
            type_mod: -1,
        }
    }

    const T1: u32 = 16391;
    const T2: u32 = 16398;
    const MOOD: u32 = 16385;

    fn t1_relation() -> Relation {
        Relation {
            id: T1,
            namespace: "public".into(),
            name: "t1".into(),
            replica_identity: b'd',
            columns: vec![
                col(true, "id", 23),
                col(false, "name", 25),
                col(false, "note", 25),
                col(false, "feel", MOOD),
                col(false, "big", 25),
            ],
        }
    }

    fn t2_relation() -> Relation {
        Relation {
            id: T2,
            namespace: "public".into(),
            name: "t2".into(),
            replica_identity: b'f',
            columns: vec![col(true, "id", 23), col(true, "val", 25)],
        }
    }

    #[test]
    fn begin_and_commit_from_server() {
        assert_eq!(
            one("4200000000015324a800030418f0b8aacd000002da"),
            PgOutput::Begin {
                final_lsn: lsn("0/15324A8"),
                commit_time: 0x0003_0418_f0b8_aacd,
                xid: 730,
            }
        );
        assert_eq!(
            one("430000000000015324a800000000015324d800030418f0b8aacd"),
            PgOutput::Commit {
                flags: 0,
                commit_lsn: lsn("0/15324A8"),
                end_lsn: lsn("0/15324D8"),
                commit_time: 0x0003_0418_f0b8_aacd,
            }
        );
    }

    #[test]
    fn type_and_relations_from_server() {
        assert_eq!(
            one("59000040017075626c6963006d6f6f6400"),
            PgOutput::Type {
                id: MOOD,
                namespace: "public".into(),
                name: "mood".into(),
            }
        );
        assert_eq!(
            one(concat!(
                "52000040077075626c6963007431006400050169640000000017ffffffff006e616d65",
                "0000000019ffffffff006e6f74650000000019ffffffff006665656c0000004001ffff",
                "ffff006269670000000019ffffffff"
            )),
            PgOutput::Relation(t1_relation())
        );
        assert_eq!(
            one(concat!(
                "520000400e7075626c6963007432006600020169640000000017ffffffff0176616c00",
                "00000019ffffffff"
            )),
            PgOutput::Relation(t2_relation())
        );
    }

    #[test]
    fn insert_with_null_and_large_value_from_server() {
        let head =
            "49000040074e00057400000001317400000005616c6963656e740000000568617070797400000bb8";
        let msg = format!("{head}{}", "78".repeat(3000));
        // The same bytes as the server sent, as kept in the fixture file.
        assert!(V1_SESSION.contains(&msg));
        assert_eq!(
            one(&msg),
            PgOutput::Insert {
                rel: T1,
                new: Tuple(vec![
                    t("1"),
                    t("alice"),
                    TupleValue::Null,
                    t("happy"),
                    t(&"x".repeat(3000))
                ]),
            }
        );
    }

    #[test]
    fn update_keeps_unchanged_toast_from_server() {
        assert_eq!(
            one("55000040074e00057400000001317400000005616c696365740000000268697400000005686170707975"),
            PgOutput::Update {
                rel: T1,
                old: None,
                new: Tuple(vec![t("1"), t("alice"), t("hi"), t("happy"), TupleValue::Unchanged]),
            }
        );
    }

    #[test]
    fn update_of_key_carries_old_key_from_server() {
        assert_eq!(
            one(concat!(
                "55000040074b00057400000001316e6e6e6e4e00057400000001327400000005616c69",
                "6365740000000268697400000005686170707975"
            )),
            PgOutput::Update {
                rel: T1,
                old: Some(OldTuple {
                    kind: OldKind::Key,
                    tuple: Tuple(vec![
                        t("1"),
                        TupleValue::Null,
                        TupleValue::Null,
                        TupleValue::Null,
                        TupleValue::Null,
                    ]),
                }),
                new: Tuple(vec![
                    t("2"),
                    t("alice"),
                    t("hi"),
                    t("happy"),
                    TupleValue::Unchanged
                ]),
            }
        );
    }

    #[test]
    fn update_with_replica_identity_full_from_server() {
        assert_eq!(
            one("550000400e4f000274000000023130740000000374656e4e000274000000023130740000000354454e"),
            PgOutput::Update {
                rel: T2,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: Tuple(vec![t("10"), t("ten")]),
                }),
                new: Tuple(vec![t("10"), t("TEN")]),
            }
        );
    }

    #[test]
    fn deletes_from_server() {
        assert_eq!(
            one("440000400e4f000274000000023130740000000354454e"),
            PgOutput::Delete {
                rel: T2,
                old: OldTuple {
                    kind: OldKind::Full,
                    tuple: Tuple(vec![t("10"), t("TEN")]),
                },
            }
        );
        assert_eq!(
            one("44000040074b00057400000001326e6e6e6e"),
            PgOutput::Delete {
                rel: T1,
                old: OldTuple {
                    kind: OldKind::Key,
                    tuple: Tuple(vec![
                        t("2"),
                        TupleValue::Null,
                        TupleValue::Null,
                        TupleValue::Null,
                        TupleValue::Null,
                    ]),
                },
            }
        );
    }

    #[test]
    fn truncate_from_server() {
        let msg = one("540000000203000040070000400e");
        assert_eq!(
            msg,
            PgOutput::Truncate {
                options: TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
                rels: vec![T1, T2],
            }
        );
    }

    #[test]
    fn logical_messages_from_server() {
        assert_eq!(
            one("4d010000000001533f4070000000000568656c6c6f"),
            PgOutput::Message {
                transactional: true,
                lsn: lsn("0/1533F40"),
                prefix: "p".into(),
                content: b"hello".to_vec(),
            }
        );
        assert_eq!(
            one("4d000000000001533fa8710000000003627965"),
            PgOutput::Message {
                transactional: false,
                lsn: lsn("0/1533FA8"),
                prefix: "q".into(),
                content: b"bye".to_vec(),
            }
        );
    }

    #[test]
    fn origin_from_server() {
        assert_eq!(
            one("4f00000001000023456f72696700"),
            PgOutput::Origin {
                commit_lsn: lsn("1/2345"),
                name: "orig".into(),
            }
        );
    }

    #[test]
    fn binary_values_from_server() {
        let msgs = decode_all(V1_BINARY);
        assert_eq!(msgs.len(), 8);
        assert_eq!(
            msgs[3].0,
            PgOutput::Insert {
                rel: T2,
                new: Tuple(vec![
                    TupleValue::Binary(&[0, 0, 0, 10]),
                    TupleValue::Binary(b"ten"),
                ]),
            }
        );
        // Unchanged TOAST and nulls look the same in binary mode.
        match &msgs[1].0 {
            PgOutput::Update { old: None, new, .. } => {
                assert_eq!(new.0[4], TupleValue::Unchanged)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn whole_v1_session_from_server() {
        let tags: String = decode_all(V1_SESSION)
            .iter()
            .map(|(m, xid)| {
                assert_eq!(*xid, None);
                m.tag() as char
            })
            .collect();
        // Per transaction: insert (with type and relation), update, key update, t2
        // insert, full update, two deletes, truncate, message, plain message, origin.
        assert_eq!(tags, "BYRICBUCBUCBRICBUCBDCBDCBYRRTCBMCMBORIC");
    }

    #[test]
    fn streamed_transaction_from_server() {
        let msgs = decode_all(V2_STREAM);
        let tags: String = msgs.iter().map(|(m, _)| m.tag() as char).collect();
        assert_eq!(tags, "SRIIIESIIIMIYRTEcSRIEA");
        assert_eq!(
            msgs[0],
            (
                PgOutput::StreamStart {
                    xid: 741,
                    first_segment: true,
                },
                None
            )
        );
        assert_eq!(msgs[1], (PgOutput::Relation(t2_relation()), Some(741)));
        assert_eq!(
            msgs[2],
            (
                PgOutput::Insert {
                    rel: T2,
                    new: Tuple(vec![t("1"), t("row 1")]),
                },
                Some(741)
            )
        );
        assert_eq!(msgs[5], (PgOutput::StreamStop, None));
        assert_eq!(
            msgs[6].0,
            PgOutput::StreamStart {
                xid: 741,
                first_segment: false,
            }
        );
        assert_eq!(
            msgs[10],
            (
                PgOutput::Message {
                    transactional: true,
                    lsn: lsn("0/1557770"),
                    prefix: "p".into(),
                    content: b"in-stream".to_vec(),
                },
                Some(741)
            )
        );
        // A change made in a subtransaction carries the subtransaction's xid.
        assert_eq!(
            msgs[11],
            (
                PgOutput::Insert {
                    rel: T2,
                    new: Tuple(vec![t("5000"), t("sub")]),
                },
                Some(742)
            )
        );
        assert_eq!(msgs[13], (PgOutput::Relation(t1_relation()), Some(741)));
        assert_eq!(
            msgs[14],
            (
                PgOutput::Truncate {
                    options: 0,
                    rels: vec![T1],
                },
                Some(741)
            )
        );
        assert_eq!(
            msgs[16],
            (
                PgOutput::StreamCommit {
                    xid: 741,
                    flags: 0,
                    commit_lsn: lsn("0/1558330"),
                    end_lsn: lsn("0/15584A8"),
                    commit_time: 0x0003_0418_f186_e42d,
                },
                None
            )
        );
        assert_eq!(
            msgs[21],
            (
                PgOutput::StreamAbort {
                    xid: 743,
                    sub_xid: 743,
                },
                None
            )
        );
    }

    #[test]
    fn decoder_tracks_stream_state() {
        let mut d = Decoder::new();
        assert!(!d.in_stream());
        d.decode(&hex("53000002e501")).unwrap();
        assert!(d.in_stream());
        assert_eq!(d.stream_xid(), Some(741));
        // The xid prefix is only read inside a stream: the same insert bytes without
        // it fail there, and with it fail outside.
        let with_xid = hex("49000002e50000400e4e00027400000001317400000005726f772031");
        let without = hex("490000400e4e00027400000001317400000005726f772031");
        assert!(d.decode(&without).is_err());
        assert!(d.decode(&with_xid).is_ok());
        d.decode(&hex("45")).unwrap();
        assert!(!d.in_stream());
        assert_eq!(d.stream_xid(), None);
        assert!(d.decode(&with_xid).is_err());
        assert!(d.decode(&without).is_ok());
    }

    #[test]
    fn stream_messages_out_of_place_are_errors() {
        let mut d = Decoder::new();
        assert_eq!(
            d.decode(b"E"),
            Err(DecodeError::UnexpectedInStream {
                tag: b'E',
                in_stream: false,
            })
        );
        d.decode(&hex("53000002e501")).unwrap();
        for m in [
            "53000002e501",
            "4200000000015324a800030418f0b8aacd000002da",
            "41000002e7000002e7",
        ] {
            let err = d.decode(&hex(m)).unwrap_err();
            assert!(matches!(
                err,
                DecodeError::UnexpectedInStream {
                    in_stream: true,
                    ..
                }
            ));
        }
        // The errors did not change the state.
        assert!(d.in_stream());
        assert_eq!(d.stream_xid(), Some(741));
    }

    #[test]
    fn stream_abort_with_parallel_fields() {
        let msg = hex("41000002e7000002e80000000001578c3800030418f1f235df");
        assert_eq!(
            Decoder::new().decode(&msg),
            Ok(PgOutput::StreamAbort {
                xid: 743,
                sub_xid: 744,
            })
        );
        assert!(Decoder::new().decode(&msg[..20]).is_err());
    }

    #[test]
    fn error_cases() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(b""), Err(DecodeError::Empty));
        assert_eq!(d.decode(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
        assert_eq!(
            d.decode(&hex("4200000000015324a8")),
            Err(DecodeError::Truncated {
                tag: b'B',
                needed: 8,
                at: 9,
            })
        );
        // Text value 0xFF: kept, for its row to be rejected.
        assert_eq!(
            d.decode(&hex("490000400e4e00017400000001ff")),
            Ok(PgOutput::Insert {
                rel: 0x400e,
                new: Tuple(vec![TupleValue::NotUtf8(&[0xff])]),
            })
        );
        assert_eq!(
            d.decode(&hex("490000400e4e000178")),
            Err(DecodeError::BadTupleKind(b'x'))
        );
        assert_eq!(
            d.decode(&hex("490000400e4b00016e")),
            Err(DecodeError::BadTupleMarker {
                tag: b'I',
                found: b'K',
                at: 5,
            })
        );
        assert_eq!(
            d.decode(&hex("550000400e4b00016e4b00016e")),
            Err(DecodeError::BadTupleMarker {
                tag: b'U',
                found: b'K',
                at: 9,
            })
        );
        assert_eq!(
            d.decode(&hex("440000400e4e00016e")),
            Err(DecodeError::BadTupleMarker {
                tag: b'D',
                found: b'N',
                at: 5,
            })
        );
        assert_eq!(
            d.decode(&hex("490000400e4e000174ffffffff")),
            Err(DecodeError::BadLength {
                tag: b'I',
                len: -1,
                at: 9,
            })
        );
        assert_eq!(
            d.decode(&hex("4f00000001000023456f726967")),
            Err(DecodeError::Unterminated { tag: b'O', at: 9 })
        );
        assert_eq!(
            d.decode(&hex("4f00000001000023456f7269670000")),
            Err(DecodeError::TrailingBytes {
                tag: b'O',
                extra: 1
            })
        );
        // A huge relation count must fail cleanly, not allocate.
        assert_eq!(
            d.decode(&hex("547fffffff000000400e")),
            Err(DecodeError::Truncated {
                tag: b'T',
                needed: 0x7fff_ffff * 4,
                at: 6,
            })
        );
    }

    #[test]
    fn error_messages_name_the_message() {
        let cases = [
            (
                DecodeError::Truncated {
                    tag: b'B',
                    needed: 8,
                    at: 9,
                },
                "'B' (Begin)",
            ),
            (DecodeError::UnknownTag(0x01), "0x01"),
            (DecodeError::BadUtf8 { tag: b'I' }, "'I' (Insert)"),
            (DecodeError::BadTupleKind(b'x'), "'x'"),
            (
                DecodeError::BadTupleMarker {
                    tag: b'D',
                    found: b'N',
                    at: 5,
                },
                "'D' (Delete)",
            ),
            (
                DecodeError::UnexpectedInStream {
                    tag: b'E',
                    in_stream: false,
                },
                "'E' (Stream Stop)",
            ),
        ];
        for (err, needle) in cases {
            let text = err.to_string();
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
    }

    /// Tiny xorshift64 so the fuzz test is reproducible without crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    /// Decodes with a fresh decoder and one inside a stream: both paths must return,
    /// never panic.
    fn poke(buf: &[u8]) -> [bool; 2] {
        let mut outside = Decoder::new();
        let mut inside = Decoder::new();
        inside.decode(&hex("530000000101")).unwrap();
        [outside.decode(buf).is_ok(), inside.decode(buf).is_ok()]
    }

    #[test]
    fn fuzz_never_panics() {
        let samples: Vec<Vec<u8>> = [V1_SESSION, V1_BINARY, V2_STREAM]
            .iter()
            .flat_map(|f| fixture(f))
            .collect();
        // Every strict prefix of a valid message is an error (the streamed ones are
        // valid only inside a stream, so only assert on the decoder that accepts the
        // whole message).
        for s in &samples {
            let whole = poke(s);
            assert!(whole.iter().any(|ok| *ok));
            for n in 0..s.len() {
                let part = poke(&s[..n]);
                for i in 0..2 {
                    if whole[i] {
                        assert!(!part[i], "prefix {n} of {s:02x?} decoded");
                    }
                }
            }
        }
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let tags = b"BCORYIUDTMSEcAZ";
        for _ in 0..20_000 {
            // Random bytes behind a valid tag, so the parsers get past the first byte.
            let len = (rng.next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(b) = buf.first_mut() {
                *b = tags[(rng.next() % tags.len() as u64) as usize];
            }
            poke(&buf);
            // Valid samples with a few bytes flipped, which reach much deeper.
            let s = &samples[(rng.next() % samples.len() as u64) as usize];
            let mut m = s.clone();
            for _ in 0..1 + rng.next() % 3 {
                let i = (rng.next() % m.len() as u64) as usize;
                m[i] = rng.next() as u8;
            }
            poke(&m);
        }
    }
}
