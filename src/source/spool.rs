//! Transactions the server streams before they commit (pgoutput protocol 2, PostgreSQL
//! 14+, `streaming 'on'`).
//!
//! Without streaming, a transaction bigger than `logical_decoding_work_mem` is spilled to
//! disk by the walsender, read back at commit and only then sent: one pass over it
//! during which nothing reaches us, then a second one. The walsender is what limits a
//! backlog, so that first pass is the largest part of a big transaction's time. With
//! streaming it sends the changes as it decodes them, and we keep them here, per
//! top-level xid, until Stream Commit replays them in order as one ordinary transaction
//! (or Stream Abort drops them).
//!
//! A spool is memory up to [`MEM_LIMIT`], then an unlinked temporary file (nothing is
//! left behind by a crash; the slot resends the transaction anyway, since it is not
//! confirmed). Messages are kept without their xid prefix, with the subtransaction
//! they belong to, so that a rolled-back subtransaction's rows are skipped at replay.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of one transaction kept in memory before it goes to a file.
pub const MEM_LIMIT: usize = 4 << 20;
/// Bytes of all open transactions kept in memory: beyond it, the one growing goes to a
/// file (many big transactions at once must not add up to gigabytes).
pub const TOTAL_MEM_LIMIT: usize = 16 << 20;

/// Tags of the messages that carry data (skipped when their subtransaction rolled back);
/// Relation and Type messages describe the schema and are always replayed.
const DATA_TAGS: &[u8] = b"IUDTM";

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

/// The streamed, not yet committed transactions of one replication connection.
pub struct Spools {
    dir: PathBuf,
    mem_limit: usize,
    total_limit: usize,
    /// Bytes in the memory part of all spools.
    in_memory: usize,
    txns: HashMap<u32, Spool>,
}

struct Spool {
    /// Records `[len u32][subxid u32][message]`, newer than anything in `file`.
    mem: Vec<u8>,
    file: Option<File>,
    /// Subtransactions rolled back (Stream Abort with a subxid).
    aborted: HashSet<u32>,
    messages: u64,
}

/// Why a streamed message cannot be kept.
#[derive(Debug)]
pub enum SpoolError {
    /// A data message too short to hold its xid prefix.
    Malformed,
    /// A stream continues a transaction whose first segment never came.
    Unknown(u32),
    Io(io::Error),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Malformed => f.write_str("streamed message without its xid"),
            SpoolError::Unknown(xid) => write!(
                f,
                "the server continues streamed transaction {xid}, whose start was never received"
            ),
            // The daemon's own disk: nothing is lost (the source replays the
            // transaction once there is room), but the operator must make room.
            SpoolError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => write!(
                f,
                "spool file: {e}: the directory of large transactions ({}, TMPDIR) is \
                 full; the source waits and replays the transaction once there is room",
                std::env::temp_dir().display()
            ),
            SpoolError::Io(e) => write!(f, "spool file: {e}"),
        }
    }
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(e)
    }
}

impl Spools {
    /// Spools whose files go into `dir` (the system's temporary directory by default).
    pub fn new(dir: &Path) -> Spools {
        Spools::with_limits(dir, MEM_LIMIT, TOTAL_MEM_LIMIT)
    }

    pub fn with_limits(dir: &Path, mem_limit: usize, total_limit: usize) -> Spools {
        Spools {
            dir: dir.to_path_buf(),
            mem_limit,
            total_limit,
            in_memory: 0,
            txns: HashMap::new(),
        }
    }

    /// A Stream Start: `first` opens the transaction (dropping whatever an earlier,
    /// interrupted attempt left under the same xid).
    pub fn start(&mut self, xid: u32, first: bool) -> Result<(), SpoolError> {
        if first {
            self.drop_txn(xid);
            self.txns.insert(
                xid,
                Spool {
                    mem: Vec::new(),
                    file: None,
                    aborted: HashSet::new(),
                    messages: 0,
                },
            );
            Ok(())
        } else if self.txns.contains_key(&xid) {
            Ok(())
        } else {
            Err(SpoolError::Unknown(xid))
        }
    }

    /// Keeps one message of a streamed block of top-level transaction `xid`; `msg` is
    /// the whole message as received (tag, the xid prefix, the rest).
    pub fn push(&mut self, xid: u32, msg: &[u8]) -> Result<(), SpoolError> {
        if msg.len() < 5 {
            return Err(SpoolError::Malformed);
        }
        let sub = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let spool = self.txns.get_mut(&xid).ok_or(SpoolError::Unknown(xid))?;
        let before = spool.mem.len();
        let len = (msg.len() - 4) as u32;
        spool.mem.extend_from_slice(&len.to_be_bytes());
        spool.mem.extend_from_slice(&sub.to_be_bytes());
        spool.mem.push(msg[0]);
        spool.mem.extend_from_slice(&msg[5..]);
        spool.messages += 1;
        self.in_memory += spool.mem.len() - before;
        if spool.mem.len() >= self.mem_limit || self.in_memory >= self.total_limit {
            self.in_memory -= spool.mem.len();
            spool.spill(&self.dir)?;
        }
        Ok(())
    }

    /// A Stream Abort: the whole transaction (`sub == xid`) or one subtransaction.
    pub fn abort(&mut self, xid: u32, sub: u32) {
        if sub == xid {
            self.drop_txn(xid);
        } else if let Some(s) = self.txns.get_mut(&xid) {
            s.aborted.insert(sub);
        }
    }

    /// A Stream Commit: the transaction's messages, in the order they were streamed,
    /// without those of rolled-back subtransactions (None: nothing was streamed).
    pub fn commit(&mut self, xid: u32) -> Result<Option<Replay>, SpoolError> {
        let Some(mut spool) = self.txns.remove(&xid) else {
            return Ok(None);
        };
        self.in_memory -= spool.mem.len();
        let source: Box<dyn Read> = match spool.file.take() {
            Some(mut f) => {
                f.write_all(&spool.mem)?;
                f.seek(SeekFrom::Start(0))?;
                Box::new(BufReader::with_capacity(256 << 10, f))
            }
            None => Box::new(io::Cursor::new(std::mem::take(&mut spool.mem))),
        };
        Ok(Some(Replay {
            source,
            aborted: spool.aborted,
            messages: spool.messages,
        }))
    }

    /// Transactions open (streamed, neither committed nor aborted).
    pub fn open(&self) -> usize {
        self.txns.len()
    }

    /// Bytes held in memory by all open transactions.
    pub fn in_memory(&self) -> usize {
        self.in_memory
    }

    fn drop_txn(&mut self, xid: u32) {
        if let Some(s) = self.txns.remove(&xid) {
            self.in_memory -= s.mem.len();
        }
    }
}

impl Spool {
    fn spill(&mut self, dir: &Path) -> io::Result<()> {
        if self.file.is_none() {
            let path = dir.join(format!(
                "kuvasz-spool-{}-{}",
                std::process::id(),
                FILE_SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            // Unlinked at once: the open file is ours alone and vanishes with us.
            std::fs::remove_file(&path)?;
            self.file = Some(f);
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(&self.mem)?;
        }
        self.mem.clear();
        Ok(())
    }
}

/// The messages of one committed streamed transaction, read back one at a time.
pub struct Replay {
    source: Box<dyn Read>,
    aborted: HashSet<u32>,
    messages: u64,
}

impl Replay {
    /// How many messages were streamed (rolled-back ones included).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Reads the next message to replay into `buf` (as an ordinary, unprefixed pgoutput
    /// message); false at the end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, SpoolError> {
        loop {
            let mut head = [0u8; 8];
            match self.source.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let sub = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            buf.clear();
            buf.resize(len, 0);
            self.source.read_exact(buf)?;
            let data = buf.first().is_some_and(|t| DATA_TAGS.contains(t));
            if !(data && self.aborted.contains(&sub)) {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spool_says_so() {
        let e = SpoolError::Io(io::Error::from_raw_os_error(libc::ENOSPC)).to_string();
        assert!(e.contains("TMPDIR) is full; the source waits"), "{e}");
    }

    fn msg(tag: u8, sub: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&sub.to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn replay_all(r: &mut Replay) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_into(&mut buf).unwrap() {
            out.push(buf.clone());
        }
        out
    }

    fn spools(limit: usize) -> Spools {
        Spools::with_limits(&std::env::temp_dir(), limit, 1 << 30)
    }

    #[test]
    fn replays_in_order_without_prefix_in_memory_and_from_a_file() {
        for limit in [1 << 20, 16] {
            let mut s = spools(limit);
            s.start(7, true).unwrap();
            s.push(7, &msg(b'R', 7, b"rel")).unwrap();
            for i in 0..100u8 {
                s.push(7, &msg(b'I', 7, &[i, i])).unwrap();
            }
            s.start(7, false).unwrap();
            s.push(7, &msg(b'D', 7, b"x")).unwrap();
            let mut r = s.commit(7).unwrap().unwrap();
            assert_eq!(r.messages(), 102);
            let got = replay_all(&mut r);
            assert_eq!(got.len(), 102, "limit {limit}");
            assert_eq!(got[0], b"Rrel".to_vec());
            assert_eq!(got[1], vec![b'I', 0, 0]);
            assert_eq!(got[100], vec![b'I', 99, 99]);
            assert_eq!(got[101], b"Dx".to_vec());
            assert_eq!(s.open(), 0);
        }
    }

    #[test]
    fn a_rolled_back_subtransaction_loses_its_rows_not_its_schema() {
        let mut s = spools(32);
        s.start(10, true).unwrap();
        s.push(10, &msg(b'I', 10, b"a")).unwrap();
        s.push(10, &msg(b'R', 11, b"rel")).unwrap();
        s.push(10, &msg(b'I', 11, b"b")).unwrap();
        s.push(10, &msg(b'U', 12, b"c")).unwrap();
        s.abort(10, 11);
        s.push(10, &msg(b'I', 10, b"d")).unwrap();
        let got = replay_all(&mut s.commit(10).unwrap().unwrap());
        assert_eq!(
            got,
            vec![
                b"Ia".to_vec(),
                b"Rrel".to_vec(),
                b"Uc".to_vec(),
                b"Id".to_vec()
            ]
        );
    }

    #[test]
    fn abort_drops_the_transaction_and_others_are_untouched() {
        let mut s = spools(1 << 20);
        s.start(1, true).unwrap();
        s.push(1, &msg(b'I', 1, b"one")).unwrap();
        s.start(2, true).unwrap();
        s.push(2, &msg(b'I', 2, b"two")).unwrap();
        s.abort(1, 1);
        assert!(s.commit(1).unwrap().is_none());
        let got = replay_all(&mut s.commit(2).unwrap().unwrap());
        assert_eq!(got, vec![b"Itwo".to_vec()]);
    }

    #[test]
    fn memory_is_bounded_over_all_transactions() {
        let mut s = Spools::with_limits(&std::env::temp_dir(), 1000, 2500);
        for xid in 1..=4 {
            s.start(xid, true).unwrap();
        }
        for round in 0..100u8 {
            for xid in 1..=4 {
                s.push(xid, &msg(b'I', xid, &[round; 20])).unwrap();
                assert!(s.in_memory() < 2500 + 40, "{}", s.in_memory());
            }
        }
        s.abort(1, 1);
        for xid in 2..=4 {
            let got = replay_all(&mut s.commit(xid).unwrap().unwrap());
            assert_eq!(got.len(), 100);
            assert_eq!(got[99], [&[b'I'][..], &[99u8; 20]].concat());
        }
        assert_eq!((s.open(), s.in_memory()), (0, 0));
    }

    #[test]
    fn a_stream_without_its_start_is_an_error() {
        let mut s = spools(1 << 20);
        assert!(matches!(s.start(5, false), Err(SpoolError::Unknown(5))));
        assert!(matches!(
            s.push(5, &msg(b'I', 5, b"x")),
            Err(SpoolError::Unknown(5))
        ));
        s.start(5, true).unwrap();
        assert!(matches!(s.push(5, b"I\0"), Err(SpoolError::Malformed)));
    }
}
