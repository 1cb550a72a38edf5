//! The error type of the plain descriptions.

use std::path::PathBuf;

/// A configuration, checkpoint layout or shard index that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration field holds a value the network cannot be built with.
    #[error("config field `{field}`: {reason}")]
    Config {
        /// The `config.json` field at fault.
        field: &'static str,
        /// What was expected and what was found.
        reason: String,
    },
    /// `config.json` is not valid JSON or lacks a required field.
    #[error("config.json: {0}")]
    ConfigJson(#[source] serde_json::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory whose files do not form a checkpoint.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A data shard or its index is damaged or inconsistent.
    #[error("{}: {reason}", path.display())]
    Shard {
        /// The shard or index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
