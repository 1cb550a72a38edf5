//! The store library's error type.

/// Errors of the store and of the formats it holds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backing store cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Bytes that do not decode: a corrupt or foreign blob or record.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A session that must exist does not.
    #[error("no session {0}")]
    NoSession(String),
    /// A session that must not exist already does.
    #[error("session {0} already exists")]
    SessionExists(String),
    /// The session was deleted: it is never written or restored again.
    #[error("session {0} was deleted")]
    Deleted(String),
    /// The store's server is set up to lose state this system must keep.
    #[error("{0}")]
    Misconfigured(String),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Unavailable(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
