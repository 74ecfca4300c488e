//! PostgreSQL connections and the numbered migrations in `sql/`.

use tokio_postgres::{Client, NoTls};

use crate::config::PostgresConfig;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}: {source}")]
pub struct ConnectError {
    pub target: String,
    #[source]
    pub source: tokio_postgres::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("migration {version} ({name}) failed: {}", pg_detail(source))]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "migration {version} ({name}) was changed after it was applied; migrations are immutable"
    )]
    MigrationChanged { version: i32, name: &'static str },
    #[error("{}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// One numbered migration, embedded at build time.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_bookkeeping",
        sql: include_str!("../sql/0001_bookkeeping.sql"),
    },
    Migration {
        version: 2,
        name: "0002_raw_log",
        sql: include_str!("../sql/0002_raw_log.sql"),
    },
    Migration {
        version: 3,
        name: "0003_processed",
        sql: include_str!("../sql/0003_processed.sql"),
    },
    Migration {
        version: 4,
        name: "0004_replay",
        sql: include_str!("../sql/0004_replay.sql"),
    },
    Migration {
        version: 5,
        name: "0005_status_views",
        sql: include_str!("../sql/0005_status_views.sql"),
    },
    Migration {
        version: 6,
        name: "0006_truncations",
        sql: include_str!("../sql/0006_truncations.sql"),
    },
    Migration {
        version: 7,
        name: "0007_sync_summary_per_target",
        sql: include_str!("../sql/0007_sync_summary_per_target.sql"),
    },
    Migration {
        version: 8,
        name: "0008_mirror_sources",
        sql: include_str!("../sql/0008_mirror_sources.sql"),
    },
    Migration {
        version: 9,
        name: "0009_avro_records",
        sql: include_str!("../sql/0009_avro_records.sql"),
    },
    Migration {
        version: 10,
        name: "0010_routes",
        sql: include_str!("../sql/0010_routes.sql"),
    },
    Migration {
        version: 11,
        name: "0011_route_attempts",
        sql: include_str!("../sql/0011_route_attempts.sql"),
    },
    Migration {
        version: 12,
        name: "0012_log_resets",
        sql: include_str!("../sql/0012_log_resets.sql"),
    },
];

/// `host:port/db` of a URL, for error messages: never the credentials.
pub fn describe_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.rsplit_once('@').map_or(rest, |(_, hp)| hp).to_string()
}

/// Opens a connection and drives it on a background task.
pub async fn connect(cfg: &PostgresConfig, application: &str) -> Result<Client, ConnectError> {
    let target = describe_url(&cfg.url);
    let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(|source| ConnectError {
        target: target.clone(),
        source,
    })?;
    if let Some(pw) = &cfg.password {
        pg.password(pw.expose());
    }
    pg.application_name(application);
    pg.connect_timeout(std::time::Duration::from_secs(10));
    let (client, conn) = pg.connect(NoTls).await.map_err(|source| ConnectError {
        target: target.clone(),
        source,
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(target = %target, error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Applies pending migrations, each in its own transaction, under an advisory lock so that
/// pods starting together do not race. Returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, DbError> {
    // Arbitrary constant: "cdc-lake migrate".
    const LOCK_KEY: i64 = 0x6364_635f_6c61_6b65;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_pending(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, DbError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS cdc_lake;
             CREATE TABLE IF NOT EXISTS cdc_lake.schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let checksum = checksum(m.sql);
        let row = client
            .query_opt(
                "SELECT checksum FROM cdc_lake.schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await?;
        match row {
            Some(r) if r.get::<_, String>(0) == checksum => continue,
            Some(_) => {
                return Err(DbError::MigrationChanged {
                    version: m.version,
                    name: m.name,
                })
            }
            None => {}
        }
        let wrap = |source| DbError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await.map_err(wrap)?;
        tx.execute(
            "INSERT INTO cdc_lake.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &checksum],
        )
        .await
        .map_err(wrap)?;
        tx.commit().await.map_err(wrap)?;
        applied.push(m.version);
    }
    Ok(applied)
}

/// FNV-1a: a stable fingerprint of a migration's text (std's hasher is not stable across
/// releases).
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// tokio-postgres displays server errors as just "db error"; show the server's message and
/// SQLSTATE instead, without row values: for data exceptions (class 22) PostgreSQL's message
/// quotes the offending value (`invalid input syntax for type bigint: "..."`), so only the
/// condition, the column and the type are kept. This text reaches logs and reject reasons.
pub fn pg_detail(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let code = db.code().code();
    let mut out = if code.starts_with("22") {
        format!("{} (SQLSTATE {code})", data_exception_name(code))
    } else {
        format!("{} (SQLSTATE {code})", db.message())
    };
    if let Some(column) = db.column() {
        out.push_str(&format!(", column {column}"));
    }
    if let Some(ty) = db.datatype() {
        out.push_str(&format!(", type {ty}"));
    }
    out
}

/// PostgreSQL's condition names of class 22, for messages that must not quote the value.
fn data_exception_name(code: &str) -> &'static str {
    match code {
        "22001" => "value too long for the column type",
        "22003" => "numeric value out of range",
        "22007" => "invalid date/time format",
        "22008" => "date/time value out of range",
        "22012" => "division by zero",
        "22021" => "character not in repertoire (a NUL byte in text)",
        "22023" => "invalid parameter value",
        "22P02" => "invalid text representation for the column type",
        "22P05" => "untranslatable character (\\u0000 cannot be stored in jsonb or text)",
        "2200N" => "invalid XML content",
        "22030" | "22031" | "22032" | "22033" | "22034" | "22035" | "22036" | "22037" | "22038"
        | "22039" | "2203A" | "2203B" | "2203C" | "2203D" | "2203E" | "2203F" | "2203G" => {
            "invalid JSON value"
        }
        _ => "data exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn urls_are_described_without_credentials() {
        assert_eq!(describe_url("postgres://u:pw@h:5432/db"), "h:5432/db");
        assert_eq!(describe_url("postgres://h/db"), "h/db");
    }
}

/// Epoch milliseconds as a `timestamptz` PostgreSQL can hold (4713 BC to 294276 AD), or None
/// outside that range: a derived timestamp column reads NULL instead of failing the batch
/// (the value itself stays verbatim in the envelope's JSON).
pub fn pg_timestamp(ms: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    // Julian day 0 (PostgreSQL's lower bound) and the end of year 294276, in epoch ms, with a
    // day's margin on each side.
    const MIN_MS: i64 = -210_866_716_800_000;
    const MAX_MS: i64 = 9_224_317_929_600_000;
    ms.filter(|ms| (MIN_MS..=MAX_MS).contains(ms))
        .and_then(chrono::DateTime::from_timestamp_millis)
}

/// Text for a `text` column (a reject reason naming a table): PostgreSQL text cannot hold NUL.
pub fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\\u0000"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;

    #[test]
    fn timestamps_outside_postgres_range_are_none() {
        assert!(pg_timestamp(Some(0)).is_some());
        assert!(
            pg_timestamp(Some(-210_000_000_000_000)).is_some(),
            "4685 BC"
        );
        assert!(
            pg_timestamp(Some(-250_000_000_000_000)).is_none(),
            "5953 BC"
        );
        assert!(
            pg_timestamp(Some(8_000_000_000_000_000)).is_some(),
            "year 255 000"
        );
        assert!(pg_timestamp(Some(i64::MAX)).is_none());
        assert!(pg_timestamp(None).is_none());
        assert_eq!(pg_text("a\0b"), "a\\u0000b");
    }
}
