//! Catalog queries on ordinary (non-replication) connections: tables, columns, keys,
//! publications and slots. Knows nothing of the mapping.

use postgres::Client;

use super::Lsn;

/// A column as the catalog describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The column's type with its modifier, as `format_type` prints it. Never used as a
    /// cast target: an explicit cast to `varchar(3)` truncates and one to `character`
    /// means `char(1)`; values reach the target through COPY, whose input keeps them exact.
    pub type_name: String,
    /// Part of the replica identity (source) or of the primary key (target).
    pub is_key: bool,
    /// Values this server takes for equal always have the same text: true for integers,
    /// text of a deterministic collation, uuid, timestamps, enums… and arrays, ranges,
    /// composites and domains of those; false for citext, numeric (1.0 = 1.00), floats
    /// (0 = -0), intervals, jsonb and nondeterministic collations. Keys of such columns
    /// cannot be told apart by their text alone.
    pub text_equality: bool,
    /// The type is composite, or a domain over one: its `=` is `record`'s, which an
    /// untyped literal cannot be compared with ("input of anonymous composite types is
    /// not implemented").
    pub composite: bool,
    /// Its values may be stored out of line (storage other than `plain`): an UPDATE that
    /// leaves such a value unchanged does not send it (unless REPLICA IDENTITY FULL).
    pub toastable: bool,
}

/// Whether `a` (a `pg_attribute` row) has [`Column::text_equality`]: its type is walked
/// through domains, arrays, composites and ranges down to base types, each of which
/// must be one whose equality is its text, under a deterministic collation. `char(n)`
/// pads to its length and so qualifies; unbounded `bpchar` ignores trailing blanks and
/// does not.
const TEXT_EQUALITY: &str = "(WITH RECURSIVE parts(typ, coll, typmod, depth) AS ( \
       SELECT a.atttypid, a.attcollation, a.atttypmod, 0 \
     UNION ALL \
       SELECT x.typ, x.coll, x.typmod, p.depth + 1 \
         FROM parts p JOIN pg_type t ON t.oid = p.typ \
         CROSS JOIN LATERAL ( \
            SELECT t.typbasetype, p.coll, t.typtypmod WHERE t.typtype = 'd' \
            UNION ALL SELECT t.typelem, p.coll, p.typmod \
                       WHERE t.typtype = 'b' AND t.typelem <> 0 AND t.typlen = -1 \
            UNION ALL SELECT ca.atttypid, ca.attcollation, ca.atttypmod FROM pg_attribute ca \
                       WHERE t.typtype = 'c' AND ca.attrelid = t.typrelid AND ca.attnum > 0 \
                         AND NOT ca.attisdropped \
            UNION ALL SELECT r.rngsubtype, r.rngcollation, -1 FROM pg_range r \
                       WHERE t.typtype = 'r' AND r.rngtypid = t.oid \
         ) AS x(typ, coll, typmod) \
        WHERE p.depth < 8) \
     SELECT coalesce(bool_and( \
              CASE WHEN t.typtype IN ('d', 'c', 'r') \
                     OR (t.typtype = 'b' AND t.typelem <> 0 AND t.typlen = -1) THEN p.depth < 8 \
                   WHEN t.typtype = 'e' THEN true \
                   WHEN p.typ = 1042 THEN p.typmod > 0 \
                   ELSE p.typ IN (16, 17, 18, 19, 20, 21, 23, 25, 26, 650, 774, 829, 869, 1043, \
                                  1082, 1083, 1114, 1184, 1560, 1562, 2950) END \
              AND NOT EXISTS (SELECT 1 FROM pg_collation c \
                               WHERE c.oid = p.coll AND NOT c.collisdeterministic)), false) \
       FROM parts p JOIN pg_type t ON t.oid = p.typ)";

/// A table and what replication needs to know of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    /// `r` table, `p` partitioned table.
    pub relkind: char,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Whether UPDATE/DELETE can be published: a primary key for `d`, an index for `i`,
    /// always for `f`.
    pub has_identity: bool,
    /// Columns in attribute order, without dropped and generated ones (which neither
    /// COPY nor pgoutput carry and which can never be written).
    pub columns: Vec<Column>,
}

/// Whether table `c` (a `pg_class` row) can publish UPDATE and DELETE: see
/// [`TableInfo::has_identity`].
const HAS_IDENTITY: &str = "CASE c.relreplident \
      WHEN 'f' THEN true \
      WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
      ELSE false END";

/// A table's (schema, name).
pub type QualifiedName = (String, String);

/// [`TableInfo::has_identity`] of each of `tables` that exists, in one query.
pub fn identities(
    client: &mut Client,
    tables: &[QualifiedName],
) -> Result<Vec<(QualifiedName, bool)>, postgres::Error> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.1.as_str()).collect();
    let rows = client.query(
        &format!(
            "SELECT n.nspname::text, c.relname::text, {HAS_IDENTITY} \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN unnest($1::text[], $2::text[]) AS w(s, t) \
                 ON n.nspname = w.s AND c.relname = w.t \
              WHERE c.relkind IN ('r', 'p')"
        ),
        &[&schemas, &names],
    )?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Looks a table up; `Ok(None)` when it does not exist.
pub fn table_info(
    client: &mut Client,
    schema: &str,
    name: &str,
) -> Result<Option<TableInfo>, postgres::Error> {
    let rows = client.query(
        &format!(
            "SELECT c.oid, c.relkind::text, c.relreplident::text, {HAS_IDENTITY} \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')"
        ),
        &[&schema, &name],
    )?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let relkind: String = row.get(1);
    let ident: String = row.get(2);
    let has_identity: bool = row.get(3);
    let ident_char = ident.chars().next().unwrap_or('d');
    // Key columns: the primary key (default identity), the replica identity index, or
    // none for FULL (every column is then part of the identity).
    let cols = client.query(
        &format!(
            "SELECT a.attname::text, \
                    format_type(a.atttypid, a.atttypmod), \
                    EXISTS (SELECT 1 FROM pg_index i \
                        WHERE i.indrelid = a.attrelid AND a.attnum = ANY (i.indkey::int2[]) \
                          AND CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END), \
                    {TEXT_EQUALITY}, \
                    EXISTS (WITH RECURSIVE d(typ) AS ( \
                              SELECT a.atttypid \
                              UNION ALL SELECT t.typbasetype FROM d JOIN pg_type t ON t.oid = d.typ \
                               WHERE t.typtype = 'd') \
                            SELECT 1 FROM d JOIN pg_type t ON t.oid = d.typ WHERE t.typtype = 'c'), \
                    a.attstorage <> 'p' \
               FROM pg_attribute a \
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
                AND a.attgenerated = '' \
              ORDER BY a.attnum"
        ),
        &[&oid, &ident],
    )?;
    let columns = cols
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
            is_key: r.get(2),
            text_equality: r.get(3),
            composite: r.get(4),
            toastable: r.get(5),
        })
        .collect();
    Ok(Some(TableInfo {
        schema: schema.to_string(),
        name: name.to_string(),
        relkind: relkind.chars().next().unwrap_or('r'),
        replica_identity: ident_char,
        has_identity,
        columns,
    }))
}

/// The leaf partitions of partitioned table `schema.name` that are tables (not foreign
/// tables), at any depth and in any schema, as `(schema, table)`, sorted.
pub fn leaf_partitions(
    client: &mut Client,
    schema: &str,
    name: &str,
) -> Result<Vec<(String, String)>, postgres::Error> {
    let rows = client.query(
        "SELECT n.nspname::text, c.relname::text \
           FROM pg_partition_tree(format('%I.%I', $1::text, $2::text)::regclass) p \
           JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE p.isleaf AND c.relkind = 'r' ORDER BY 1, 2",
        &[&schema, &name],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The tables (not partitioned parents, views or foreign tables) of `schema` whose whole
/// name matches the POSIX regular expression `regex`, sorted.
pub fn tables_matching(
    client: &mut Client,
    schema: &str,
    regex: &str,
) -> Result<Vec<String>, postgres::Error> {
    let rows = client.query(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname ~ ('^(' || $2 || ')$') ORDER BY 1",
        &[&schema, &regex],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A unique index or exclusion constraint of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniqueIndex {
    /// Its key columns (sorted; none for an index on expressions only).
    pub columns: Vec<String>,
    /// Usable as an `ON CONFLICT` arbiter: a valid, immediate, non-partial unique index on
    /// plain columns.
    pub arbiter: bool,
}

impl UniqueIndex {
    /// An arbiter-capable index on `columns` (for tests and callers that build maps).
    pub fn on(columns: &[&str]) -> UniqueIndex {
        let mut columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        columns.sort_unstable();
        UniqueIndex {
            columns,
            arbiter: true,
        }
    }
}

/// Every unique index (primary key too) and exclusion constraint of a table.
pub fn unique_indexes(
    client: &mut Client,
    schema: &str,
    name: &str,
) -> Result<Vec<UniqueIndex>, postgres::Error> {
    let rows = client.query(
        "SELECT ARRAY(SELECT a.attname::text FROM pg_attribute a \
                       WHERE a.attrelid = i.indrelid \
                         AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1]) \
                      ), \
                i.indisunique AND i.indisvalid AND i.indimmediate \
                  AND i.indpred IS NULL AND i.indexprs IS NULL \
           FROM pg_index i \
           JOIN pg_class c ON c.oid = i.indrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = $1 AND c.relname = $2 AND (i.indisunique OR i.indisexclusion)",
        &[&schema, &name],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            // Sorted here, not by the server's collation: compared with sorted names.
            let mut columns: Vec<String> = r.get(0);
            columns.sort_unstable();
            UniqueIndex {
                columns,
                arbiter: r.get(1),
            }
        })
        .collect())
}

/// `wal_level` of the server.
pub fn wal_level(client: &mut Client) -> Result<String, postgres::Error> {
    let row = client.query_one("SELECT current_setting('wal_level')", &[])?;
    Ok(row.get(0))
}

/// Whether the session's role may open replication connections.
pub fn can_replicate(client: &mut Client) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
        &[],
    )?;
    Ok(row.get(0))
}

/// Whether the publication exists.
pub fn publication_exists(client: &mut Client, name: &str) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
        &[&name],
    )?;
    Ok(row.get(0))
}

/// The tables a publication names (not its partitions' expansion): `(schema, table)`.
pub fn publication_tables(
    client: &mut Client,
    name: &str,
) -> Result<Vec<(String, String)>, postgres::Error> {
    let rows = client.query(
        "SELECT n.nspname::text, c.relname::text \
           FROM pg_publication p \
           JOIN pg_publication_rel pr ON pr.prpubid = p.oid \
           JOIN pg_class c ON c.oid = pr.prrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE p.pubname = $1 ORDER BY 1, 2",
        &[&name],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A logical slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    /// Why the server invalidated it (its WAL removed, idle too long…), if it did.
    pub invalidated: Option<String>,
}

pub fn slot_info(client: &mut Client, name: &str) -> Result<Option<SlotInfo>, postgres::Error> {
    // wal_status (13+) and invalidation_reason (17+) through to_jsonb: one query for
    // every major.
    let rows = client.query(
        "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
                CASE WHEN j->>'wal_status' = 'lost' \
                     THEN coalesce(j->>'invalidation_reason', 'wal_removed') \
                     ELSE j->>'invalidation_reason' END \
           FROM pg_replication_slots s, to_jsonb(s) j WHERE slot_name = $1",
        &[&name],
    )?;
    Ok(rows.first().map(|r| {
        let lsn: Option<String> = r.get(3);
        SlotInfo {
            plugin: r.get(0),
            database: r.get(1),
            active_pid: r.get(2),
            confirmed_flush: lsn.and_then(|l| l.parse().ok()),
            invalidated: r.get(4),
        }
    }))
}

/// How much WAL the slot keeps on the source, and how much more may be written before
/// the server invalidates it (`safe_wal_size`, 13+; None: no limit or unknown).
pub fn slot_wal(
    client: &mut Client,
    name: &str,
) -> Result<Option<(i64, Option<i64>)>, postgres::Error> {
    let rows = client.query(
        "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                     ELSE pg_current_wal_lsn() END, restart_lsn)::bigint, \
                (j->>'safe_wal_size')::bigint \
           FROM pg_replication_slots s, to_jsonb(s) j WHERE slot_name = $1",
        &[&name],
    )?;
    Ok(rows
        .first()
        .and_then(|r| Some((r.get::<_, Option<i64>>(0)?, r.get(1)))))
}
