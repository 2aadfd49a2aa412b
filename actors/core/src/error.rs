//! The one error type of `tickmesh-core`.

use std::path::PathBuf;

/// Result alias used across the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared layer. Each variant names the
/// thing at fault (a key, a file, a topic, an object) so that a log line is
/// enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or invalid.
    #[error("config {file}: key `{key}`: {message}")]
    Config {
        file: String,
        key: String,
        message: String,
    },
    /// A message failed validation against its contract.
    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },
    /// An object store operation failed.
    #[error("object store {op} {bucket}/{key}: {message}")]
    Store {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    /// A database operation failed. The source is the driver's error
    /// (sqlx's, in `tickmesh-io`), boxed so this crate needs no driver.
    #[error("database: {context}: {source}")]
    Db {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A message bus (Kafka or the file spool) operation failed.
    #[error("bus {topic}: {message}")]
    Bus { topic: String, message: String },
    /// Encoding or decoding Parquet failed.
    #[error("parquet {context}: {message}")]
    Parquet { context: String, message: String },
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something was asked for that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The state changed under the caller (a fenced-off write, say).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Some items of a batch failed (the others were done); the message
    /// names each failure.
    #[error("{0}")]
    Partial(String),
}

impl Error {
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn db<E>(context: impl Into<String>) -> impl FnOnce(E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let context = context.into();
        move |source| Error::Db {
            context,
            source: Box::new(source),
        }
    }

    pub fn bus(topic: impl Into<String>, message: impl ToString) -> Self {
        Error::Bus {
            topic: topic.into(),
            message: message.to_string(),
        }
    }

    pub fn parquet(context: impl Into<String>, message: impl ToString) -> Self {
        Error::Parquet {
            context: context.into(),
            message: message.to_string(),
        }
    }
}
