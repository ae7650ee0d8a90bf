//! `kuvasz-streamer check`: everything the daemon needs of its servers, probed without
//! changing anything, as one report with what to change for each problem.
//!
//! The probes read catalogs; what they found is judged by pure functions (unit-tested)
//! that turn facts into report lines.

use postgres::Client;

use crate::pg::connect::Endpoint;

use crate::pg::describe;
use crate::pg::quote::{ident, literal};
use crate::source::setup::{table_report, TableStatus};
use crate::source::SourceSpec;

/// A name as an operator would type it in the SQL a line suggests: bare when it can be,
/// quoted otherwise.
fn sql_name(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    const RESERVED: &[&str] = &["user", "table", "select", "group", "order", "all"];
    if plain && !RESERVED.contains(&name) {
        name.to_string()
    } else {
        ident(name)
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    Ok(String),
    /// Works, but not as well as it could: what to change.
    Warning(String),
    /// Stops the daemon (or a table) from working: what to change.
    Problem(String),
}

/// The report: lines with their indentation; the exit status follows the problems.
#[derive(Default)]
pub struct Report {
    lines: Vec<(usize, Line)>,
    /// Every password of the configuration and map: masked wherever they might show.
    secrets: Vec<String>,
}

impl Report {
    pub fn new(secrets: Vec<String>) -> Report {
        Report {
            lines: Vec::new(),
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    pub fn push(&mut self, indent: usize, line: Line) {
        self.lines.push((indent, line));
    }

    pub fn extend(&mut self, indent: usize, lines: Vec<Line>) {
        self.lines.extend(lines.into_iter().map(|l| (indent, l)));
    }

    pub fn problems(&self) -> usize {
        self.lines
            .iter()
            .filter(|(_, l)| matches!(l, Line::Problem(_)))
            .count()
    }

    /// The report as printed: one line each, `ok`, `warning:` or `PROBLEM:`, passwords
    /// masked even inside a server's message.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (indent, line) in &self.lines {
            let text = match line {
                Line::Ok(t) => t.clone(),
                Line::Warning(t) => format!("warning: {t}"),
                Line::Problem(t) => format!("PROBLEM: {t}"),
            };
            out.push_str(&"  ".repeat(*indent));
            out.push_str(&self.mask(&text));
            out.push('\n');
        }
        let n = self.problems();
        out.push_str(&match n {
            0 => "all checks passed\n".to_string(),
            1 => "1 problem found\n".to_string(),
            n => format!("{n} problems found\n"),
        });
        out
    }

    /// URLs and `password=` values redacted by their structure, then each password
    /// where it stands as a word of its own (a server's message may quote one): not
    /// inside other words, which a short password would otherwise eat.
    fn mask(&self, text: &str) -> String {
        let mut t = crate::pg::conninfo::redact_url(text);
        for s in &self.secrets {
            t = mask_word(&t, s);
        }
        t
    }
}

/// `text` with every occurrence of `word` that no letter, digit or `_` touches on either
/// side replaced by the mask.
fn mask_word(text: &str, word: &str) -> String {
    let inner = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut before: Option<char> = None;
    while let Some(i) = rest.find(word) {
        let (head, tail) = rest.split_at(i);
        let prev = head
            .chars()
            .next_back()
            .or(if head.is_empty() { before } else { None });
        let next = tail[word.len()..].chars().next();
        out.push_str(head);
        if inner(prev) || inner(next) {
            out.push_str(word);
        } else {
            out.push_str("********");
        }
        before = word.chars().next_back();
        rest = &tail[word.len()..];
    }
    out.push_str(rest);
    out
}

/// What the probes read of a source server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceFacts {
    pub version: i32,
    pub wal_level: String,
    pub database: String,
    pub user: String,
    pub superuser: bool,
    pub replication: bool,
    pub max_slots: i64,
    pub used_slots: i64,
    pub max_senders: i64,
    pub used_senders: i64,
    /// Owner of the publication named like the slot, when it exists.
    pub publication_owner: Option<String>,
    /// Whether the role may create a publication in the database.
    pub may_create_publication: bool,
    pub slot: Option<SlotFacts>,
    /// Mapped tables the role does not own and that are not yet published: adding them
    /// to the publication would fail.
    pub not_owned: Vec<String>,
    /// `server_encoding` of the database.
    pub encoding: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotFacts {
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    /// `application_name` of the session holding it.
    pub holder: Option<String>,
    /// `wal_status` (13+), e.g. `lost` when invalidated.
    pub wal_status: Option<String>,
    /// `invalidation_reason` (17+).
    pub invalidation: Option<String>,
}

/// Judges a source's facts: one line per prerequisite.
pub fn judge_source(f: &SourceFacts, slot_name: &str, app_name: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let level_name = if f.version >= 190000 {
        "effective_wal_level"
    } else {
        "wal_level"
    };
    out.push(if f.wal_level == "logical" {
        Line::Ok(format!("{level_name}: logical"))
    } else {
        Line::Problem(format!(
            "{level_name} is '{}'; logical replication needs wal_level = logical: set it in \
             postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart the server",
            f.wal_level
        ))
    });
    out.push(if f.replication || f.superuser {
        Line::Ok(format!("role {}: may replicate", f.user))
    } else {
        Line::Problem(format!(
            "role {} may not open replication connections: ALTER ROLE {} REPLICATION",
            f.user,
            sql_name(&f.user)
        ))
    });
    out.push(encoding_line(&f.encoding));
    let slot_exists = f.slot.is_some();
    out.push(if slot_exists || f.used_slots < f.max_slots {
        Line::Ok(format!(
            "replication slots: {} of {} used",
            f.used_slots, f.max_slots
        ))
    } else {
        Line::Problem(format!(
            "no free replication slot ({} of {} used): raise max_replication_slots (and \
             restart the server) or drop a slot nobody reads",
            f.used_slots, f.max_slots
        ))
    });
    let our_sender = f.slot.as_ref().is_some_and(|s| s.active_pid.is_some());
    out.push(if our_sender || f.used_senders < f.max_senders {
        Line::Ok(format!(
            "WAL senders: {} of {} used",
            f.used_senders, f.max_senders
        ))
    } else {
        Line::Problem(format!(
            "no free WAL sender ({} of {} used): raise max_wal_senders (and restart the \
             server)",
            f.used_senders, f.max_senders
        ))
    });
    out.push(match &f.publication_owner {
        Some(owner) if owner == &f.user || f.superuser => {
            Line::Ok(format!("publication {slot_name}: owned by {owner}"))
        }
        Some(owner) => Line::Problem(format!(
            "publication {slot_name} is owned by {owner}, not {}: ALTER PUBLICATION {} OWNER \
             TO {}",
            f.user,
            sql_name(slot_name),
            sql_name(&f.user)
        )),
        None if f.may_create_publication => Line::Ok(format!(
            "publication {slot_name}: not there yet; the role may create it"
        )),
        None => Line::Problem(format!(
            "role {} may not create publication {slot_name}: GRANT CREATE ON DATABASE {} TO {}",
            f.user,
            sql_name(&f.database),
            sql_name(&f.user)
        )),
    });
    if !f.not_owned.is_empty() {
        let fix: Vec<String> = f
            .not_owned
            .iter()
            .map(|t| format!("ALTER TABLE {t} OWNER TO {}", sql_name(&f.user)))
            .collect();
        out.push(Line::Problem(format!(
            "role {} does not own {}, which must be added to the publication (PostgreSQL \
             publishes only its owner's tables): {}",
            f.user,
            f.not_owned.join(", "),
            fix.join("; ")
        )));
    }
    out.push(match &f.slot {
        None => Line::Ok(format!(
            "slot {slot_name}: not there yet (created at the first start)"
        )),
        Some(s) if s.plugin.as_deref() != Some("pgoutput") => Line::Problem(format!(
            "slot {slot_name} uses plugin {:?}, not pgoutput: drop it with SELECT \
             pg_drop_replication_slot({})",
            s.plugin.as_deref().unwrap_or("none"),
            literal(slot_name)
        )),
        Some(s) if s.wal_status.as_deref() == Some("lost") || s.invalidation.is_some() => {
            Line::Problem(format!(
                "slot {slot_name} is invalidated ({}): the WAL it needed is gone; drop it with \
                 SELECT pg_drop_replication_slot({}) and delete its rows from kvsz_sync_state \
                 on the destination, and the next start copies the tables again",
                s.invalidation.as_deref().unwrap_or("wal_status lost"),
                literal(slot_name)
            ))
        }
        Some(s) => match (s.active_pid, s.holder.as_deref()) {
            (None, _) => Line::Ok(format!("slot {slot_name}: ready")),
            (Some(pid), Some(h)) if h == app_name => Line::Ok(format!(
                "slot {slot_name}: in use by {h} (pid {pid}): this daemon runs"
            )),
            (Some(pid), h) => Line::Problem(format!(
                "slot {slot_name} is in use by another consumer (pid {pid}, application_name \
                 {:?}): stop it, or give this deployment other slot names",
                h.unwrap_or("")
            )),
        },
    });
    out
}

/// Every encoding but SQL_ASCII is converted to UTF-8 by the source; SQL_ASCII declares
/// none, so its bytes are taken as UTF-8, and a value that is not is a rejected row.
fn encoding_line(encoding: &str) -> Line {
    if encoding == "SQL_ASCII" {
        Line::Warning(
            "encoding SQL_ASCII: values are taken as UTF-8; a row holding bytes that are not \
             valid UTF-8 is a rejected row (app.on_error), reported with its column"
                .to_string(),
        )
    } else {
        Line::Ok(format!(
            "encoding {encoding}: converted to UTF-8 by the source"
        ))
    }
}

/// `server_version_num`, which decides the catalog columns to read.
fn server_version(client: &mut Client) -> Result<i32, postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])?
        .get(0))
}

/// Reads a source's facts (catalog queries only).
pub fn probe_source(
    src: &mut Client,
    slot_name: &str,
    tables: &[String],
) -> Result<SourceFacts, postgres::Error> {
    let version = server_version(src)?;
    let level_sql = if version >= 190000 {
        "SELECT current_setting('effective_wal_level')"
    } else {
        "SELECT current_setting('wal_level')"
    };
    let wal_level: String = src.query_one(level_sql, &[])?.get(0);
    let encoding: String = src
        .query_one("SELECT current_setting('server_encoding')", &[])?
        .get(0);
    let r = src.query_one(
        "SELECT current_user::text, rolsuper, rolreplication, current_database()::text, \
                current_setting('max_replication_slots')::bigint, \
                (SELECT count(*) FROM pg_replication_slots), \
                current_setting('max_wal_senders')::bigint, \
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'), \
                (SELECT pg_get_userbyid(pubowner)::text FROM pg_publication WHERE pubname = $1), \
                has_database_privilege(current_database(), 'CREATE') \
           FROM pg_roles WHERE rolname = current_user",
        &[&slot_name],
    )?;
    let slot_sql = format!(
        "SELECT s.plugin::text, s.active_pid, a.application_name::text, {}, {} \
           FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
          WHERE s.slot_name = $1",
        if version >= 130000 {
            "s.wal_status::text"
        } else {
            "NULL::text"
        },
        if version >= 170000 {
            "s.invalidation_reason::text"
        } else {
            "NULL::text"
        }
    );
    let slot = src
        .query(slot_sql.as_str(), &[&slot_name])?
        .first()
        .map(|s| SlotFacts {
            plugin: s.get(0),
            active_pid: s.get(1),
            holder: s.get(2),
            wal_status: s.get(3),
            invalidation: s.get(4),
        });
    let not_owned: Vec<String> = src
        .query(
            "SELECT n.nspname || '.' || c.relname \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname || '.' || c.relname = ANY($1) \
                AND NOT pg_has_role(c.relowner, 'USAGE') \
                AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p \
                                 WHERE p.pubname = $2 AND p.schemaname = n.nspname \
                                   AND p.tablename = c.relname) \
              ORDER BY 1",
            &[&tables, &slot_name],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(SourceFacts {
        version,
        wal_level,
        user: r.get(0),
        superuser: r.get(1),
        replication: r.get(2),
        database: r.get(3),
        max_slots: r.get(4),
        used_slots: r.get(5),
        max_senders: r.get(6),
        used_senders: r.get(7),
        publication_owner: r.get(8),
        may_create_publication: r.get(9),
        slot,
        not_owned,
        encoding,
    })
}

/// What the probes read of the destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationFacts {
    pub version: i32,
    pub user: String,
    pub superuser: bool,
    pub schema_exists: bool,
    pub may_create: bool,
    /// `has_parameter_privilege(…, 'session_replication_role', 'SET')` (15+).
    pub may_set_replica_role: bool,
    /// `has_database_privilege(current_database(), 'TEMP')`: the writers stage batches
    /// in temporary tables.
    pub may_create_temp: bool,
    pub database: String,
}

pub fn judge_destination(f: &DestinationFacts, schema: &str) -> Vec<Line> {
    let mut out = Vec::new();
    out.push(if !f.schema_exists {
        Line::Problem(format!(
            "schema {schema} (database.schema) does not exist: CREATE SCHEMA {} AUTHORIZATION {}",
            sql_name(schema),
            sql_name(&f.user)
        ))
    } else if f.may_create || f.superuser {
        Line::Ok(format!(
            "schema {schema}: role {} may create its bookkeeping tables",
            f.user
        ))
    } else {
        Line::Problem(format!(
            "role {} may not create tables in schema {schema} (kvsz_sync_state, \
             kvsz_progress, kvsz_deadletter): GRANT CREATE ON SCHEMA {} TO {}",
            f.user,
            sql_name(schema),
            sql_name(&f.user)
        ))
    });
    out.push(if f.superuser || f.may_create_temp {
        Line::Ok(format!(
            "database {}: role {} may create the temporary tables batches are staged in",
            f.database, f.user
        ))
    } else {
        Line::Problem(format!(
            "role {} may not create temporary tables in database {}, where the writers stage \
             their batches: GRANT TEMP ON DATABASE {} TO {}",
            f.user,
            f.database,
            sql_name(&f.database),
            sql_name(&f.user)
        ))
    });
    out.push(if f.superuser || f.may_set_replica_role {
        Line::Ok("session_replication_role: may be set to replica".to_string())
    } else {
        Line::Warning(format!(
            "role {} may not SET session_replication_role = replica, so triggers and foreign \
             keys of target tables fire on copied and streamed rows: {}",
            f.user,
            if f.version >= 150000 {
                format!(
                    "GRANT SET ON PARAMETER session_replication_role TO {}",
                    sql_name(&f.user)
                )
            } else {
                "run as a superuser (PostgreSQL 15+ can grant the parameter alone)".to_string()
            }
        ))
    });
    out
}

pub fn probe_destination(
    dest: &mut Client,
    schema: &str,
) -> Result<DestinationFacts, postgres::Error> {
    let version = server_version(dest)?;
    let param = if version >= 150000 {
        "has_parameter_privilege('session_replication_role', 'SET')"
    } else {
        "false"
    };
    let r = dest.query_one(
        format!(
            "SELECT current_user::text, rolsuper, to_regnamespace($1) IS NOT NULL, \
                    CASE WHEN to_regnamespace($1) IS NULL THEN false \
                         ELSE has_schema_privilege($1, 'CREATE') END, {param}, \
                    has_database_privilege(current_database(), 'TEMP'), current_database()::text \
               FROM pg_roles WHERE rolname = current_user"
        )
        .as_str(),
        &[&schema],
    )?;
    Ok(DestinationFacts {
        version,
        user: r.get(0),
        superuser: r.get(1),
        schema_exists: r.get(2),
        may_create: r.get(3),
        may_set_replica_role: r.get(4),
        may_create_temp: r.get(5),
        database: r.get(6),
    })
}

/// One instance of the deployment, as `kvsz_instances` and `pg_stat_activity` show it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceFact {
    pub instance: String,
    pub sources: i32,
    /// Seconds since its last heartbeat.
    pub silent: f64,
    /// Its coordination session is still on the destination.
    pub connected: bool,
}

/// Who holds one source of the map.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotOwner {
    pub slot: String,
    /// The instance whose coordination session holds the source's lock (an unknown
    /// session's pid otherwise).
    pub holder: Option<String>,
    /// The last owner `kvsz_owners` names, with its epoch.
    pub last: Option<(String, i64)>,
}

/// The deployment's instances and its sources' owners (empty: none ever ran).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OwnershipFacts {
    pub instances: Vec<InstanceFact>,
    /// Instances writing into the same schema for another map.
    pub others: usize,
    pub slots: Vec<SlotOwner>,
}

/// The lines about several instances: each instance, live or silent, and each source's
/// owner; a source no running instance holds while some run is an orphan.
pub fn judge_ownership(f: &OwnershipFacts) -> Vec<Line> {
    let live = |i: &InstanceFact| i.connected && i.silent < 5.0;
    let running = f.instances.iter().filter(|i| live(i)).count();
    let mut out = vec![Line::Ok(format!(
        "instances: {running} running{}",
        match f.others {
            0 => String::new(),
            n => format!(" ({n} more of another map write into this schema)"),
        }
    ))];
    for i in &f.instances {
        out.push(if live(i) {
            Line::Ok(format!(
                "instance {}: streams {} source(s), beat {:.1} s ago",
                i.instance, i.sources, i.silent
            ))
        } else if i.connected {
            Line::Warning(format!(
                "instance {}: silent for {:.0} s but still connected (paused?): the others end                  its session after 10 s, and what it still applies is fenced off",
                i.instance, i.silent
            ))
        } else {
            Line::Ok(format!(
                "instance {}: gone {:.0} s ago (its row is removed after an hour)",
                i.instance, i.silent
            ))
        });
    }
    if running == 0 {
        return out;
    }
    for s in &f.slots {
        let last = s.last.as_ref().map_or(String::new(), |(i, e)| {
            format!(" (epoch {e}, last taken by {i})")
        });
        out.push(match &s.holder {
            Some(h) => Line::Ok(format!("source of slot {}: owned by {h}{last}", s.slot)),
            None => Line::Warning(format!(
                "source of slot {}: orphan, no running instance owns it{last}: an instance \
                 below its fair share takes it within seconds; if none does, see the \
                 instances' logs",
                s.slot
            )),
        });
    }
    out
}

/// Reads the deployment's instances and its sources' owners from the destination
/// (None: no instance ever ran in this schema).
pub fn probe_ownership(
    dest: &mut Client,
    schema: &str,
    slots: &[String],
) -> Result<Option<OwnershipFacts>, postgres::Error> {
    let instances = crate::pg::quote::qualified(schema, crate::store::INSTANCES_TABLE);
    let owners = crate::pg::quote::qualified(schema, crate::store::OWNERS_TABLE);
    let exists: bool = dest
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[&instances, &owners],
        )?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let deployment = crate::ownership::fingerprint(slots);
    let mut facts = OwnershipFacts::default();
    let mut backends: Vec<(i32, String)> = Vec::new();
    for r in dest.query(
        format!(
            "SELECT instance, sources, extract(epoch FROM now() - heartbeat)::float8, \
                    EXISTS (SELECT FROM pg_stat_activity a WHERE a.pid = i.backend), \
                    coalesce(deployment = $1, false), coalesce(backend, 0) \
               FROM {instances} i ORDER BY started"
        )
        .as_str(),
        &[&deployment],
    )? {
        if !r.get::<_, bool>(4) {
            facts.others += 1;
            continue;
        }
        let instance: String = r.get(0);
        backends.push((r.get(5), instance.clone()));
        facts.instances.push(InstanceFact {
            instance,
            sources: r.get(1),
            silent: r.get(2),
            connected: r.get(3),
        });
    }
    let ns = crate::ownership::namespace(schema);
    for slot in slots {
        let holder: Option<i32> = dest
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND classid = hashtext($1)::oid AND objid = hashtext($2)::oid AND objsubid = 2",
                &[&ns, slot],
            )?
            .map(|r| r.get(0));
        let last = dest
            .query_opt(
                format!("SELECT instance, epoch FROM {owners} WHERE slot_name = $1").as_str(),
                &[slot],
            )?
            .map(|r| (r.get(0), r.get(1)));
        facts.slots.push(SlotOwner {
            slot: slot.clone(),
            holder: holder.map(|pid| {
                backends
                    .iter()
                    .find(|(b, _)| *b == pid)
                    .map_or(format!("the session of pid {pid}"), |(_, i)| i.clone())
            }),
            last,
        });
    }
    Ok(Some(facts))
}

/// One line of `check` about a table, with what to change when something is wrong.
fn table_line(table: &str, status: &TableStatus) -> Line {
    match status {
        TableStatus::Ok { target } => Line::Ok(format!("table {table}: ok → {target}")),
        TableStatus::InsertsOnly { target } => Line::Warning(format!(
            "table {table} → {target}: no primary key and no replica identity, so only INSERT \
             and TRUNCATE are carried (publication <slot>_ins). Add a primary key, or ALTER \
             TABLE … REPLICA IDENTITY FULL, to carry UPDATE and DELETE"
        )),
        TableStatus::Shared { target } => Line::Warning(format!(
            "table {table} → {target}: the target has no sid column and several URLs write \
             into it: their keys must not collide, and their TRUNCATEs are not applied. Add a \
             column sid text (and put it in the primary key) to keep them apart"
        )),
        TableStatus::UnsentValues { target, columns } => Line::Warning(format!(
            "table {table} → {target}: filtered, and its column(s) {} may be TOASTed: an UPDATE \
             that makes a row pass the filter while leaving such a value unchanged cannot be \
             completed (the source does not send the value): a rejected row in a clone or \
             history target, the value the row had when it left the filter in an append \
             target. ALTER TABLE {} REPLICA IDENTITY FULL on the source sends such values",
            columns
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", "),
            table.split_once('.').map_or_else(
                || sql_name(table),
                |(s, t)| format!("{}.{}", sql_name(s), sql_name(t))
            )
        )),
        TableStatus::Excluded { reason } => Line::Problem(format!(
            "table {table}: NOT replicated: {reason}; fix it and restart the daemon"
        )),
    }
}

/// What `check` needs from the configuration.
pub struct CheckInput<'a> {
    pub sources: &'a [SourceSpec],
    pub dest: &'a crate::pg::conninfo::ConnInfo,
    pub schema: &'a str,
    pub app_name: &'a str,
}

/// Runs every probe and builds the report.
pub fn run(input: &CheckInput<'_>) -> Report {
    // A password that is also a user name hides nothing (and masking it would hide the
    // name in every line).
    let conns: Vec<&crate::pg::conninfo::ConnInfo> = input
        .sources
        .iter()
        .map(|s| &s.conn)
        .chain([input.dest])
        .collect();
    let users: Vec<&str> = conns.iter().map(|c| c.user.as_str()).collect();
    let secrets: Vec<String> = conns
        .iter()
        .filter_map(|c| c.password.clone())
        .filter(|p| !users.contains(&p.as_str()))
        .collect();
    let mut report = Report::new(secrets);
    report.push(
        0,
        Line::Ok(format!(
            "configuration: ok ({} source URL(s))",
            input.sources.len()
        )),
    );
    let label = input.dest.redacted();
    let mut dest = match Endpoint::new(input.dest.clone(), input.app_name).sql() {
        Ok(mut c) => {
            report.push(0, Line::Ok(format!("destination {label}: ok")));
            match probe_destination(&mut c, input.schema) {
                Ok(f) => report.extend(1, judge_destination(&f, input.schema)),
                Err(e) => report.push(1, Line::Problem(format!("cannot read: {}", describe(&e)))),
            }
            let slots: Vec<String> = input.sources.iter().map(|s| s.slot.clone()).collect();
            match probe_ownership(&mut c, input.schema, &slots) {
                Ok(Some(f)) => report.extend(1, judge_ownership(&f)),
                Ok(None) => {}
                Err(e) => report.push(
                    1,
                    Line::Problem(format!("cannot read the instances: {}", describe(&e))),
                ),
            }
            Some(c)
        }
        Err(e) => {
            report.push(
                0,
                Line::Problem(format!("destination {label}: {}", describe(&e))),
            );
            None
        }
    };
    for s in input.sources {
        let head = format!("source {} ({})", s.label(), s.conn.redacted());
        let mut src = match s.endpoint(input.app_name).sql() {
            Ok(c) => {
                report.push(0, Line::Ok(format!("{head}: ok")));
                c
            }
            Err(e) => {
                report.push(0, Line::Problem(format!("{head}: {}", describe(&e))));
                continue;
            }
        };
        let tables = match dest.as_mut() {
            Some(d) => match table_report(s, input.schema, &mut src, d) {
                Ok(t) => Some(t),
                Err(e) => {
                    report.push(1, Line::Problem(format!("tables: {e}")));
                    None
                }
            },
            None => None,
        };
        let names: Vec<String> = tables
            .iter()
            .flatten()
            .filter(|(_, st)| !matches!(st, TableStatus::Excluded { .. }))
            .map(|(t, _)| t.clone())
            .collect();
        match probe_source(&mut src, &s.slot, &names) {
            Ok(f) => report.extend(1, judge_source(&f, &s.slot, input.app_name)),
            Err(e) => report.push(1, Line::Problem(format!("cannot read: {}", describe(&e)))),
        }
        for (table, status) in tables.iter().flatten() {
            report.push(1, table_line(table, status));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_table_with_unsent_values_says_how_to_send_them() {
        let line = table_line(
            "public.Docs",
            &TableStatus::UnsentValues {
                target: "public.docs".into(),
                columns: vec!["doc".into(), "body".into()],
            },
        );
        let Line::Warning(w) = line else {
            panic!("{line:?}")
        };
        assert!(w.starts_with(
            "table public.Docs → public.docs: filtered, and its column(s) \"doc\", \"body\" \
             may be TOASTed"
        ));
        assert!(w.ends_with(
            "ALTER TABLE public.\"Docs\" REPLICA IDENTITY FULL on the source sends such values"
        ));
    }

    fn healthy() -> SourceFacts {
        SourceFacts {
            version: 160000,
            wal_level: "logical".into(),
            user: "kv".into(),
            replication: true,
            max_slots: 10,
            used_slots: 2,
            max_senders: 10,
            used_senders: 1,
            publication_owner: Some("kv".into()),
            may_create_publication: true,
            encoding: "UTF8".into(),
            ..SourceFacts::default()
        }
    }

    fn problems(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| match l {
                Line::Problem(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ownership_names_instances_owners_and_orphans() {
        let i = |name: &str, silent: f64, connected: bool| InstanceFact {
            instance: name.into(),
            sources: 1,
            silent,
            connected,
        };
        let f = OwnershipFacts {
            instances: vec![
                i("h/1/1", 0.5, true),
                i("h/2/2", 30.0, true),
                i("h/3/3", 60.0, false),
            ],
            others: 1,
            slots: vec![
                SlotOwner {
                    slot: "k_a".into(),
                    holder: Some("h/1/1".into()),
                    last: Some(("h/1/1".into(), 3)),
                },
                SlotOwner {
                    slot: "k_b".into(),
                    holder: None,
                    last: Some(("h/3/3".into(), 2)),
                },
            ],
        };
        let lines = judge_ownership(&f);
        assert_eq!(
            lines[0],
            Line::Ok("instances: 1 running (1 more of another map write into this schema)".into())
        );
        assert!(matches!(&lines[1], Line::Ok(l) if l.contains("h/1/1: streams 1")));
        assert!(matches!(&lines[2], Line::Warning(l) if l.contains("h/2/2: silent for 30 s")));
        assert!(matches!(&lines[3], Line::Ok(l) if l.contains("h/3/3: gone 60 s ago")));
        assert!(
            matches!(&lines[4], Line::Ok(l) if l == "source of slot k_a: owned by h/1/1 (epoch 3, last taken by h/1/1)")
        );
        assert!(matches!(&lines[5], Line::Warning(l) if l.contains("k_b: orphan")));
        // Nothing runs: no source is an orphan, none is owned.
        let idle = OwnershipFacts {
            instances: vec![i("h/3/3", 60.0, false)],
            ..f
        };
        assert_eq!(judge_ownership(&idle).len(), 2);
    }

    #[test]
    fn a_healthy_source_has_no_problem() {
        assert_eq!(
            problems(&judge_source(&healthy(), "kvsz_a_1", "kv")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_missing_prerequisite_says_what_to_change() {
        let f = SourceFacts {
            wal_level: "replica".into(),
            replication: false,
            used_slots: 10,
            used_senders: 10,
            publication_owner: Some("postgres".into()),
            not_owned: vec!["public.t".into()],
            ..healthy()
        };
        let p = problems(&judge_source(&f, "kvsz_a_1", "kv"));
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(p[0].contains("ALTER SYSTEM SET wal_level = logical"));
        assert!(p[1].ends_with("ALTER ROLE kv REPLICATION"));
        assert!(p[2].starts_with("no free replication slot (10 of 10 used)"));
        assert!(p[3].starts_with("no free WAL sender (10 of 10 used)"));
        assert!(p[4].ends_with("ALTER PUBLICATION kvsz_a_1 OWNER TO kv"));
        assert!(p[5].contains("does not own public.t"));
        let f19 = SourceFacts {
            version: 190000,
            wal_level: "replica".into(),
            ..healthy()
        };
        assert!(problems(&judge_source(&f19, "s", "kv"))[0].starts_with("effective_wal_level is"));
    }

    #[test]
    fn a_sql_ascii_source_is_a_warning() {
        let lines = judge_source(
            &SourceFacts {
                encoding: "SQL_ASCII".into(),
                ..healthy()
            },
            "s",
            "kv",
        );
        assert!(problems(&lines).is_empty());
        assert!(lines.iter().any(
            |l| matches!(l, Line::Warning(w) if w.starts_with("encoding SQL_ASCII: values are taken as UTF-8"))
        ));
        assert!(judge_source(&healthy(), "s", "kv").contains(&Line::Ok(
            "encoding UTF8: converted to UTF-8 by the source".into()
        )));
    }

    #[test]
    fn slot_states() {
        let with = |slot: SlotFacts| SourceFacts {
            slot: Some(slot),
            ..healthy()
        };
        let ours = SlotFacts {
            plugin: Some("pgoutput".into()),
            active_pid: Some(7),
            holder: Some("kv".into()),
            ..SlotFacts::default()
        };
        assert!(problems(&judge_source(&with(ours.clone()), "s", "kv")).is_empty());
        let p = problems(&judge_source(&with(ours.clone()), "s", "other"));
        assert!(
            p[0].starts_with("slot s is in use by another consumer (pid 7"),
            "{p:?}"
        );
        let lost = SlotFacts {
            wal_status: Some("lost".into()),
            active_pid: None,
            ..ours.clone()
        };
        assert!(
            problems(&judge_source(&with(lost), "s", "kv"))[0].starts_with("slot s is invalidated")
        );
        let other = SlotFacts {
            plugin: Some("test_decoding".into()),
            ..ours
        };
        assert!(problems(&judge_source(&with(other), "s", "kv"))[0].contains("not pgoutput"));
    }

    #[test]
    fn destination_privileges() {
        let f = DestinationFacts {
            version: 150000,
            user: "kv".into(),
            schema_exists: true,
            database: "wh".into(),
            ..DestinationFacts::default()
        };
        let lines = judge_destination(&f, "dw");
        assert_eq!(
            lines,
            vec![
                Line::Problem(
                    "role kv may not create tables in schema dw (kvsz_sync_state, \
                     kvsz_progress, kvsz_deadletter): GRANT CREATE ON SCHEMA dw TO kv"
                        .into()
                ),
                Line::Problem(
                    "role kv may not create temporary tables in database wh, where the writers \
                     stage their batches: GRANT TEMP ON DATABASE wh TO kv"
                        .into()
                ),
                Line::Warning(
                    "role kv may not SET session_replication_role = replica, so triggers and \
                     foreign keys of target tables fire on copied and streamed rows: GRANT SET \
                     ON PARAMETER session_replication_role TO kv"
                        .into()
                ),
            ]
        );
    }

    #[test]
    fn a_short_password_is_masked_by_structure_not_inside_words() {
        let mut r = Report::new(vec!["p".into()]);
        r.push(0, Line::Ok("source postgres://u:p@h/db: ok".into()));
        r.push(0, Line::Problem("server said: bad password p".into()));
        assert_eq!(
            r.render(),
            "source postgres://u:********@h/db: ok\n\
             PROBLEM: server said: bad password ********\n1 problem found\n"
        );
    }

    #[test]
    fn passwords_are_masked_even_in_server_messages() {
        let mut r = Report::new(vec!["s3cret".into(), String::new()]);
        r.push(0, Line::Problem("server said: bad password s3cret".into()));
        assert_eq!(
            r.render(),
            "PROBLEM: server said: bad password ********\n1 problem found\n"
        );
    }
}
