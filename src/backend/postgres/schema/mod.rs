//! Versioned schema migrations, shipped in the crate. Each version is one `.sql` file applied
//! in one transaction, under a transaction-level advisory lock (so concurrent `migrate` calls
//! queue up instead of racing), and recorded in the schema's `omniq_schema` table. A schema
//! already at a newer version than this build knows is refused ([`Error::SchemaTooNew`]).

use postgres::Client;

use super::{pg_error, quote_ident, Target};
use crate::error::{Error, Result};

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: u32 = 2;

/// Every migration, oldest first: `(version, SQL)`. Version `n` takes a schema at `n - 1`.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("0001_init.sql")),
    (2, include_str!("0002_rules.sql")),
];

/// What [`migrate`](crate::postgres::migrate) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateReport {
    /// The version found before (0: the schema held no omniq tables).
    pub from: u32,
    /// The version now.
    pub to: u32,
}

/// Brings `target`'s schema to [`SCHEMA_VERSION`] on `client` (creating the schema if needed).
pub(crate) fn migrate(client: &mut Client, target: &Target) -> Result<MigrateReport> {
    let q = quote_ident(&target.schema);
    let mut tx = client
        .transaction()
        .map_err(pg_error(target, "begin the migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('omniq.migrate'), hashtext($1))",
        &[&target.schema],
    )
    .map_err(pg_error(target, "take the migration lock"))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q}; SET LOCAL search_path TO {q}; \
         CREATE TABLE IF NOT EXISTS omniq_schema (\
             version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .map_err(pg_error(target, "create the schema"))?;
    let from = read_version(&mut tx, target)?;
    if from > SCHEMA_VERSION {
        return Err(too_new(target, from));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        tx.batch_execute(sql)
            .map_err(pg_error(target, &format!("apply schema version {version}")))?;
        tx.execute(
            "INSERT INTO omniq_schema (version) VALUES ($1)",
            &[&i32::try_from(*version).unwrap_or(i32::MAX)],
        )
        .map_err(pg_error(target, "record the schema version"))?;
    }
    tx.commit()
        .map_err(pg_error(target, "commit the migration"))?;
    Ok(MigrateReport {
        from,
        to: SCHEMA_VERSION,
    })
}

/// The schema's version (0 when it has no omniq tables); the connection's `search_path` must
/// already name the schema.
pub(crate) fn version(client: &mut impl postgres::GenericClient, target: &Target) -> Result<u32> {
    let exists = client
        .query_one("SELECT to_regclass('omniq_schema') IS NOT NULL", &[])
        .map_err(pg_error(target, "look for the omniq_schema table"))?;
    let exists: bool = exists
        .try_get(0)
        .map_err(pg_error(target, "look for the omniq_schema table"))?;
    if !exists {
        return Ok(0);
    }
    read_version(client, target)
}

fn read_version(client: &mut impl postgres::GenericClient, target: &Target) -> Result<u32> {
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM omniq_schema", &[])
        .map_err(pg_error(target, "read the schema version"))?;
    let v: i32 = row
        .try_get(0)
        .map_err(pg_error(target, "read the schema version"))?;
    u32::try_from(v).map_err(|_| Error::Corrupt {
        what: "schema version",
        key: format!("{}.omniq_schema", target.label()),
        reason: format!("negative version {v}"),
    })
}

/// Refuses a schema newer than this build.
pub(crate) fn too_new(target: &Target, found: u32) -> Error {
    Error::SchemaTooNew {
        schema: target.label(),
        found,
        supported: SCHEMA_VERSION,
    }
}

/// Refuses a schema older than this build where it may not be migrated.
pub(crate) fn too_old(target: &Target, found: u32) -> Error {
    Error::SchemaTooOld {
        schema: target.label(),
        schema_name: target.schema.clone(),
        found,
        needed: SCHEMA_VERSION,
    }
}
