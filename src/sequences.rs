//! `kuvasz-streamer sequences`: the last step of a major-version switchover. Every
//! sequence owned by a column of a mapped source table (serial or identity) gives its
//! value, the highest over all URLs of a family, to the destination sequence of the same
//! name in `database.schema`, raised by a margin and never lowered, so running it twice
//! changes nothing.

use std::collections::BTreeMap;

use postgres::Client;

use crate::pg::connect::Endpoint;

use crate::pg::catalog;
use crate::pg::describe;
use crate::source::SourceSpec;

/// What happened to one destination sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Set to `to` (it was `from`; `None`: never used).
    Set { from: Option<i64>, to: i64 },
    /// Already at or beyond the source's value plus the margin.
    Kept { at: i64 },
    /// No sequence of that name in the destination schema.
    Missing,
    /// Never used on either side, and no margin: nothing to carry.
    Unused,
}

/// Result of one run: per destination sequence, the source value and the outcome; and
/// the problems met on the way (a source that could not be read).
#[derive(Debug, Default)]
pub struct Report {
    pub sequences: Vec<(String, Option<i64>, Outcome)>,
    pub problems: Vec<String>,
}

/// Sequences owned by columns of `schema.table` (serial and identity), with their last
/// value (`None` when never used).
fn owned_sequences(
    client: &mut Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, Option<i64>)>, postgres::Error> {
    let rows = client.query(
        "SELECT s.relname::text, pg_sequence_last_value(s.oid) \
           FROM pg_depend d \
           JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
           JOIN pg_class t ON t.oid = d.refobjid \
           JOIN pg_namespace tn ON tn.oid = t.relnamespace \
          WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
            AND d.deptype IN ('a', 'i') AND tn.nspname = $1 AND t.relname = $2 \
          ORDER BY 1",
        &[&schema, &table],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Reads every source, then sets the destination sequences.
pub fn copy_sequences(
    sources: &[SourceSpec],
    dest: &Endpoint,
    dest_schema: &str,
    margin: i64,
) -> Result<Report, String> {
    let mut report = Report::default();
    // Destination sequence name → highest source value (None: never used anywhere).
    let mut wanted: BTreeMap<String, Option<i64>> = BTreeMap::new();
    for spec in sources {
        let mut src = match spec.endpoint(&dest.application_name).sql() {
            Ok(c) => c,
            Err(e) => {
                report.problems.push(format!(
                    "source {} ({}): {}",
                    spec.label(),
                    spec.conn.redacted(),
                    describe(&e)
                ));
                continue;
            }
        };
        for t in &spec.tables {
            let tables = match &t.partitions_regex {
                Some(regex) => catalog::tables_matching(&mut src, &t.schema, regex),
                None => Ok(vec![t.table.clone()]),
            };
            let found = tables.and_then(|names| {
                let mut all = Vec::new();
                for name in names {
                    all.extend(owned_sequences(&mut src, &t.schema, &name)?);
                }
                Ok(all)
            });
            match found {
                Ok(seqs) => {
                    for (name, value) in seqs {
                        let entry = wanted.entry(name).or_insert(None);
                        *entry = (*entry).max(value);
                    }
                }
                Err(e) => report.problems.push(format!(
                    "source {}: sequences of {}.{}: {}",
                    spec.label(),
                    t.schema,
                    t.table,
                    describe(&e)
                )),
            }
        }
    }
    let mut client = dest
        .sql()
        .map_err(|e| format!("connect to the destination: {}", describe(&e)))?;
    for (name, value) in wanted {
        let qualified = format!("{dest_schema}.{name}");
        let outcome = set_one(&mut client, dest_schema, &name, value, margin)
            .map_err(|e| format!("sequence {qualified}: {}", describe(&e)))?;
        report.sequences.push((qualified, value, outcome));
    }
    Ok(report)
}

/// Raises one destination sequence to `value + margin` (nothing to do for a source
/// sequence never used and no margin), never lowering it, in one statement.
fn set_one(
    client: &mut Client,
    schema: &str,
    name: &str,
    value: Option<i64>,
    margin: i64,
) -> Result<Outcome, postgres::Error> {
    let row = client.query_one(
        "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
        &[&schema, &name],
    )?;
    if !row.get::<_, bool>(0) {
        return Ok(Outcome::Missing);
    }
    let current: Option<i64> = client
        .query_one(
            "SELECT pg_sequence_last_value(format('%I.%I', $1::text, $2::text)::regclass)",
            &[&schema, &name],
        )?
        .get(0);
    let target = match value {
        Some(v) => v.saturating_add(margin),
        None if margin > 0 => margin,
        None => {
            return Ok(match current {
                Some(at) => Outcome::Kept { at },
                None => Outcome::Unused,
            })
        }
    };
    if let Some(at) = current.filter(|&at| at >= target) {
        return Ok(Outcome::Kept { at });
    }
    client.execute(
        "SELECT setval(format('%I.%I', $1::text, $2::text)::regclass, $3, true)",
        &[&schema, &name, &target],
    )?;
    Ok(Outcome::Set {
        from: current,
        to: target,
    })
}
