//! Why a replay, a verify or a prune stopped. Every failure of a dependency carries what was
//! being done (the table, the partition, the file) and keeps the dependency's error as its
//! source, so the binary prints the whole chain on one line.

use crate::config::ConfigError;
use crate::db::{ConnectError, DbError};
use crate::sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The arguments are wrong; nothing was read or written (the binary exits 2).
    #[error("{0}")]
    BadArguments(String),
    /// The command cannot do what was asked: the message says why and what to do instead.
    #[error("{0}")]
    Refused(String),
    /// What the log or the lake holds cannot be read back (a malformed row, a missing schema).
    #[error("{0}")]
    Corrupt(String),
    /// A dependency failed while doing `what`.
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        cause: Cause,
    },
    /// A PostgreSQL error whose statement says enough by itself.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Migrate(#[from] DbError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

pub type ReplayResult<T> = Result<T, ReplayError>;

/// The dependency errors a replay wraps in [`ReplayError::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Adds what was being done to a dependency's error (anyhow's `Context`, typed).
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T, ReplayError>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ReplayError>;
}

impl<T, E: Into<Cause>> Context<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, ReplayError> {
        self.map_err(|e| ReplayError::Failed {
            what: what.into(),
            cause: e.into(),
        })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ReplayError> {
        self.map_err(|e| ReplayError::Failed {
            what: what().into(),
            cause: e.into(),
        })
    }
}

/// A value the log or the lake should hold and does not.
impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Into<String>) -> Result<T, ReplayError> {
        self.ok_or_else(|| ReplayError::Corrupt(what.into()))
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ReplayError> {
        self.ok_or_else(|| ReplayError::Corrupt(what().into()))
    }
}
