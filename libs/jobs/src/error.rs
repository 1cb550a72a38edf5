//! The training service's error type.

use std::path::PathBuf;

use tonic::Status;

/// Errors of job specs, job records and the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of a request that cannot be served as given.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as the API names it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A job or model that does not exist (or is not the caller's).
    #[error("{0}")]
    NotFound(String),
    /// Something another API key owns (a model name).
    #[error("{0}")]
    PermissionDenied(String),
    /// A request the job's state does not allow yet (deleting a job that runs).
    #[error("{0}")]
    Precondition(String),
    /// A limit of the caller's is reached (its jobs queued or running).
    #[error("{0}")]
    Exhausted(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] bd3lm_kvstore::Error),
    /// A file of the registry could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A stored record or checkpoint that does not decode.
    #[error("corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// A request's `field` that cannot be served as given, and why.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(what) => Status::not_found(what),
            Error::PermissionDenied(what) => Status::permission_denied(what),
            Error::Precondition(what) => Status::failed_precondition(what),
            Error::Exhausted(what) => Status::resource_exhausted(what),
            Error::Store(e) => bd3lm_proto::status::from_store(e),
            // Paths of the registry's storage stay in the server's log.
            Error::Io { .. } | Error::Corrupt(_) => {
                tracing::error!(error = %e, "the training service failed");
                Status::internal("the training service failed; see its log")
            }
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
