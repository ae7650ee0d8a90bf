//! The careful pass of a copy the destination refused a row of. The fast pass streams a
//! whole table through one COPY, which the destination refuses as a whole; the careful
//! pass reads the table again (same snapshot) and applies its rows in chunks, each under
//! a savepoint. A chunk the destination refuses is split, at the line the server names
//! or else in halves, until each refused row stands alone: it then goes by `on_error`
//! like a streamed change (kept in `kvsz_deadletter`, or the copy stops naming the row's
//! key), and every other row lands.

use std::fmt;
use std::io::Write;
use std::ops::Range;

use postgres::Transaction;

use super::sync::{unescape, CopyError, CopyPlan, Deadletter};
use crate::fault::Class;
use crate::pg::quote::jsonb_object;
use crate::pg::{describe as describe_error, Lsn};

/// Bytes of rows applied under one savepoint: a refused row costs a few re-sends of at
/// most this much, and a chunk is held in memory once.
const CHUNK_BYTES: usize = 1 << 20;

/// Where a chunk of copied rows goes.
pub enum Sink<'a> {
    /// One `COPY … FROM STDIN`: straight into the target, or into a stage merged later.
    Copy(&'a str),
    /// A stage of its own: made, filled by `copy`, then merged by key (which drops it).
    Merge {
        stage: &'a str,
        copy: &'a str,
        merge: &'a str,
    },
}

/// A copied row the destination refused, with what an operator needs to find it.
#[derive(Debug)]
pub struct RefusedRow {
    /// The source table, `schema.table`.
    pub table: String,
    /// `(id)=(17)`, as a streamed change's key is reported.
    pub key: String,
    /// The row's values as a jsonb expression.
    pub row_json: String,
    /// The snapshot's LSN: the copy's rows are as of it.
    pub lsn: Lsn,
    /// The server's message.
    pub message: String,
}

impl fmt::Display for RefusedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "destination rejected COPY of {} key {} at LSN {}: {}",
            self.table, self.key, self.lsn, self.message
        )
    }
}

/// A chunk the destination refused: its message and the COPY line it names, if any.
pub struct Refusal {
    pub message: String,
    line: Option<usize>,
}

/// The rows of one plan's careful pass, gathered into chunks.
pub struct Careful<'a> {
    plan: &'a CopyPlan,
    sink: Sink<'a>,
    lsn: Lsn,
    /// Where refused rows go; None (`on_error = stop`): the first one ends the copy.
    deadletter: Option<&'a Deadletter>,
    /// Output not yet applied (the end of the last chunk may be part of a line).
    pending: Vec<u8>,
    refused: Vec<RefusedRow>,
}

impl<'a> Careful<'a> {
    pub fn new(
        plan: &'a CopyPlan,
        sink: Sink<'a>,
        lsn: Lsn,
        deadletter: Option<&'a Deadletter>,
    ) -> Careful<'a> {
        Careful {
            plan,
            sink,
            lsn,
            deadletter,
            pending: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// Takes COPY text rows as the fast pass would send them; applies each full chunk.
    pub fn feed(&mut self, tx: &mut Transaction<'_>, out: &[u8]) -> Result<(), CopyError> {
        self.pending.extend_from_slice(out);
        if self.pending.len() < CHUNK_BYTES {
            return Ok(());
        }
        let end = self
            .pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let chunk: Vec<u8> = self.pending.drain(..end).collect();
        self.apply(tx, &chunk)
    }

    /// Applies what is left; returns the rows refused (and dead-lettered) on the way.
    pub fn finish(mut self, tx: &mut Transaction<'_>) -> Result<Vec<RefusedRow>, CopyError> {
        let chunk = std::mem::take(&mut self.pending);
        self.apply(tx, &chunk)?;
        Ok(self.refused)
    }

    fn apply(&mut self, tx: &mut Transaction<'_>, chunk: &[u8]) -> Result<(), CopyError> {
        let lines: Vec<&[u8]> = chunk.split_inclusive(|&b| b == b'\n').collect();
        let sink = &self.sink;
        let mut refused = Vec::new();
        isolate(
            tx,
            lines.len(),
            &mut |tx, r| attempt(tx, |tx| sink.apply(tx, &lines[r])),
            &mut |_, i, message| {
                refused.push((i, message));
                Ok(())
            },
            self.deadletter.is_none(),
        )?;
        for (i, message) in refused {
            let row = describe(
                self.plan,
                &[self.plan],
                line_values(lines[i]),
                self.lsn,
                message,
            );
            self.refuse(tx, row)?;
        }
        Ok(())
    }

    /// A row refused alone: dead-lettered, or the end of the copy.
    fn refuse(&mut self, tx: &mut Transaction<'_>, row: RefusedRow) -> Result<(), CopyError> {
        let Some(dl) = self.deadletter else {
            return Err(CopyError::Refused(Box::new(row)));
        };
        keep(tx, dl, &row)?;
        self.refused.push(row);
        Ok(())
    }
}

impl Sink<'_> {
    fn apply(&self, tx: &mut Transaction<'_>, lines: &[&[u8]]) -> Result<(), CopyError> {
        match self {
            Sink::Copy(copy) => copy_lines(tx, copy, lines),
            Sink::Merge { stage, copy, merge } => {
                tx.batch_execute(stage).map_err(CopyError::Destination)?;
                copy_lines(tx, copy, lines)?;
                tx.batch_execute(merge).map_err(CopyError::Destination)
            }
        }
    }
}

/// Applies a range of items under a savepoint: see [`attempt`].
type Attempt<'a, C> = dyn FnMut(&mut C, Range<usize>) -> Result<Option<Refusal>, CopyError> + 'a;

/// Finds the items of `0..len` the destination refuses, applying the others in order:
/// `attempt` applies a range (None when it went in), `refused` takes an item refused
/// alone. A cursor moves through the items with a window: the whole at first, then
/// after a refusal only the lines before the one the server named (or half, without a
/// name), doubling after each success. So a refused row costs a few statements over
/// about the rows since the last one, never a re-send of the whole chunk per row. With
/// `first_only` the search ends at the first refused item.
fn isolate<C>(
    cx: &mut C,
    len: usize,
    attempt: &mut Attempt<'_, C>,
    refused: &mut dyn FnMut(&mut C, usize, String) -> Result<(), CopyError>,
    first_only: bool,
) -> Result<(), CopyError> {
    let (mut at, mut window) = (0, len.max(1));
    while at < len {
        let r = at..len.min(at + window);
        let Some(refusal) = attempt(cx, r.clone())? else {
            at = r.end;
            window = window.saturating_mul(2);
            continue;
        };
        if r.len() == 1 {
            refused(cx, at, refusal.message)?;
            if first_only {
                return Ok(());
            }
            at += 1;
            continue;
        }
        window = match refusal.line.filter(|&n| n >= 1 && n <= r.len()) {
            // The lines before the named one went in: again, then the named one alone.
            Some(n) if n > 1 => n - 1,
            Some(_) => 1,
            None => r.len() / 2,
        };
    }
    Ok(())
}

/// Writes a refused row into `kvsz_deadletter`.
fn keep(tx: &mut Transaction<'_>, dl: &Deadletter, row: &RefusedRow) -> Result<(), CopyError> {
    let sql = crate::store::deadletter_sql(
        &dl.schema,
        &crate::store::DeadLetter {
            sid: &dl.sid,
            source: &dl.source,
            table: &row.table,
            lsn: row.lsn,
            op: "COPY",
            row_json: &row.row_json,
            error: &row.message,
        },
    );
    tx.batch_execute(&sql).map_err(CopyError::Destination)
}

/// The values of a COPY text line (the sid and version columns after them included).
fn line_values(line: &[u8]) -> Vec<Option<String>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.split(|&b| b == b'\t').map(unescape).collect()
}

/// A refused row of `plan`'s target from its values (the plan's row columns first; the
/// sid and a history target's version columns after them are not the source's and are
/// left out). The source table is the plan's when `plans` (those whose rows the
/// statement took) is that one alone, else the target.
fn describe(
    plan: &CopyPlan,
    plans: &[&CopyPlan],
    values: Vec<Option<String>>,
    lsn: Lsn,
    message: String,
) -> RefusedRow {
    let names: Vec<&str> = plan
        .columns
        .iter()
        .chain(&plan.set_extra)
        .map(String::as_str)
        .collect();
    let value = |name: &str| -> Option<&Option<String>> {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
    };
    let key_values: Vec<&str> = plan
        .key
        .iter()
        .map(|k| match value(k) {
            Some(Some(v)) => v.as_str(),
            Some(None) => "NULL",
            None => "?",
        })
        .collect();
    let table = match plans {
        [one] => format!("{}.{}", one.source_schema, one.source_table),
        _ => format!("{}.{}", plan.target_schema, plan.target_table),
    };
    RefusedRow {
        table,
        key: format!("({})=({})", plan.key.join(", "), key_values.join(", ")),
        row_json: jsonb_object(names.iter().zip(&values).map(|(n, v)| (*n, v.as_deref()))),
        lsn,
        message,
    }
}

/// The history merge of a target whose stage (every source table's rows) the
/// destination refused a row of: the versions the copy ends are closed in one
/// statement, the new ones opened a range of staged rows at a time, each refused row
/// alone going by `on_error`. Returns the rows dead-lettered.
pub fn history_merge(
    tx: &mut Transaction<'_>,
    plans: &[&CopyPlan],
    since: &str,
    lsn: Lsn,
    deadletter: Option<&Deadletter>,
) -> Result<Vec<RefusedRow>, CopyError> {
    let Some(plan) = plans.first() else {
        return Ok(Vec::new());
    };
    tx.batch_execute(&plan.history_close_sql(since))
        .map_err(CopyError::Destination)?;
    tx.batch_execute(&plan.number_stage_sql())
        .map_err(CopyError::Destination)?;
    let len = tx
        .query_one(plan.count_stage_sql().as_str(), &[])
        .map_err(CopyError::Destination)?
        .get::<_, i64>(0);
    let mut refused = Vec::new();
    isolate(
        tx,
        usize::try_from(len).unwrap_or(0),
        &mut |tx, r| {
            let sql = plan.history_open_sql(since, Some((r.start as i64, r.end as i64)));
            attempt(tx, |tx| {
                tx.batch_execute(&sql).map_err(CopyError::Destination)
            })
        },
        &mut |tx, i, message| {
            let row = tx
                .query_one(plan.staged_row_sql().as_str(), &[&(i as i64)])
                .map_err(CopyError::Destination)?;
            let values = (0..row.len())
                .map(|c| row.get::<_, Option<String>>(c))
                .collect();
            let row = describe(plan, plans, values, lsn, message);
            let Some(dl) = deadletter else {
                return Err(CopyError::Refused(Box::new(row)));
            };
            keep(tx, dl, &row)?;
            refused.push(row);
            Ok(())
        },
        deadletter.is_none(),
    )?;
    tx.batch_execute(&plan.drop_stage_sql())
        .map_err(CopyError::Destination)?;
    Ok(refused)
}

/// Runs `apply` under a savepoint: None when it went through, the refusal when the
/// destination refused a row of what it wrote (and nothing of it stays).
pub fn attempt(
    tx: &mut Transaction<'_>,
    apply: impl FnOnce(&mut Transaction<'_>) -> Result<(), CopyError>,
) -> Result<Option<Refusal>, CopyError> {
    tx.batch_execute("SAVEPOINT kvsz_rows")
        .map_err(CopyError::Destination)?;
    match apply(tx) {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT kvsz_rows")
                .map_err(CopyError::Destination)?;
            Ok(None)
        }
        Err(e) if e.class() == Class::RejectedRow && crate::pg::session::in_step(tx) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT kvsz_rows; RELEASE SAVEPOINT kvsz_rows")
                .map_err(CopyError::Destination)?;
            let server = e.server_error();
            Ok(Some(Refusal {
                message: server.map_or_else(|| e.to_string(), describe_error),
                line: server
                    .and_then(|pg| pg.as_db_error())
                    .and_then(|db| db.where_())
                    .and_then(copy_line),
            }))
        }
        Err(e) => Err(e),
    }
}

fn copy_lines(tx: &mut Transaction<'_>, copy: &str, lines: &[&[u8]]) -> Result<(), CopyError> {
    let mut w = tx.copy_in(copy).map_err(CopyError::Destination)?;
    for l in lines {
        w.write_all(l).map_err(CopyError::Io)?;
    }
    w.finish().map_err(CopyError::Destination)?;
    Ok(())
}

/// The line a COPY's error context names: `COPY t, line 17, column v: "-1"` → 17.
fn copy_line(context: &str) -> Option<usize> {
    context.lines().find_map(|c| {
        let rest = c.strip_prefix("COPY ")?;
        let at = rest.find(", line ")? + ", line ".len();
        let digits: String = rest[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_comes_from_the_copy_context() {
        assert_eq!(copy_line("COPY t, line 17, column v: \"-1\""), Some(17));
        assert_eq!(copy_line("COPY kvsz_copy_stage, line 3"), Some(3));
        assert_eq!(
            copy_line("SQL statement \"x\"\nCOPY t, line 250: \"1\t2\""),
            Some(250)
        );
        assert_eq!(copy_line("PL/pgSQL function f() line 3 at RAISE"), None);
    }

    /// Runs [`isolate`] over `len` items of which `bad` are refused (the server naming
    /// the first bad line of a range when `named`): what went in, in order, what was
    /// refused, and how many statements it took.
    fn run(len: usize, bad: &[usize], named: bool) -> (Vec<usize>, Vec<usize>, usize) {
        let mut applied = Vec::new();
        let mut statements = 0;
        let mut refused = Vec::new();
        isolate(
            &mut (),
            len,
            &mut |_, r: Range<usize>| {
                statements += 1;
                Ok(match r.clone().find(|i| bad.contains(i)) {
                    None => {
                        applied.extend(r);
                        None
                    }
                    Some(i) => Some(Refusal {
                        message: format!("row {i}"),
                        line: named.then_some(i - r.start + 1),
                    }),
                })
            },
            &mut |_, i, m| {
                assert_eq!(m, format!("row {i}"));
                refused.push(i);
                Ok(())
            },
            false,
        )
        .expect("isolate");
        (applied, refused, statements)
    }

    #[test]
    fn refused_rows_stand_alone_and_every_other_goes_in_once_in_order() {
        for named in [true, false] {
            for bad in [
                vec![],
                vec![0],
                vec![9_999],
                vec![17, 18, 4_000],
                vec![5, 6, 7],
            ] {
                let (applied, refused, _) = run(10_000, &bad, named);
                let good: Vec<usize> = (0..10_000).filter(|i| !bad.contains(i)).collect();
                assert_eq!(applied, good, "bad {bad:?}, named {named}");
                assert_eq!(refused, bad, "named {named}");
            }
        }
        assert_eq!(run(10_000, &[], true).2, 1);
    }

    #[test]
    fn many_refused_rows_cost_statements_not_resends() {
        // Every tenth row of 10,000: a window, not the whole chunk, per refusal.
        let bad: Vec<usize> = (0..10_000).filter(|i| i % 10 == 3).collect();
        let (applied, refused, statements) = run(10_000, &bad, true);
        eprintln!("1,000 of 10,000 refused, lines named: {statements} statements");
        assert_eq!(applied.len() + refused.len(), 10_000);
        assert!(statements < 10 * bad.len(), "{statements} statements");
        let (_, _, statements) = run(10_000, &bad, false);
        eprintln!("1,000 of 10,000 refused, no line named: {statements} statements");
        assert!(statements < 20 * bad.len(), "{statements} statements");
    }
}
