//! The coordinator's error: what its stages decide on (restore a lost session, stop a
//! generation, retry a block elsewhere), typed, and mapped to a gRPC status once, at the
//! service edge ([`Error::into_status`]). Messages a client sees start with the field at
//! fault where there is one; details that may name internal hosts stay in the log.

use tonic::Status;

use crate::validation::ValidationError;

/// Why a request or a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be served as given: INVALID_ARGUMENT naming the field.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No such session (or another API key's, whose sessions are not said to exist).
    #[error("session_id: no session {0}")]
    NoSession(String),
    /// The session was deleted: it is never written or restored again.
    #[error("session_id: session {0} was deleted")]
    Deleted(String),
    /// A session id that is taken (a new session's random id met an existing one).
    #[error("session_id: session {0} already exists")]
    SessionExists(String),
    /// Another generation holds the session's lease past the wait.
    #[error("session_id: the session is generating in another request; retry when it ends")]
    LeaseHeld,
    /// This generation's lease went to another (it expired unrenewed).
    #[error("session_id: another request took the session over")]
    LeaseLost,
    /// This generation could not renew its lease in time (the store unreachable): it
    /// stopped before another could take the session over.
    #[error("session_id: the session's lease could not be renewed; retry")]
    LeaseUnrenewed,
    /// The session kept changing under a read-modify-write.
    #[error("session_id: the session kept changing; retry")]
    Contended,
    /// A limit refused the request; the message says which and what to do.
    #[error("{0}")]
    Refused(String),
    /// The call's deadline passed while its first block waited for a worker slot.
    #[error("the request's deadline passed while it waited for a worker")]
    DeadlineExceeded,
    /// The call's deadline passed while it generated: what was streamed stands.
    #[error("the call's deadline passed before the generation ended")]
    CallDeadline,
    /// The first block waited for a worker slot past `--max-queue-wait-secs`.
    #[error("the server is busy: the request waited its limit for a worker; retry later")]
    QueueWait,
    /// No denoise worker is healthy.
    #[error("no healthy denoise worker")]
    NoWorker,
    /// The request names a model no worker serves.
    #[error("model: no model {0} is served here (ListServedModels, or GET /v1/models, lists them)")]
    UnknownModel(String),
    /// The request names no model, and the workers serve several without a default.
    #[error("model: this deployment serves several models ({0}); name one")]
    ModelRequired(String),
    /// The workers' model does not fit this coordinator's tokenizer.
    #[error("the server's tokenizer does not fit its model")]
    Tokenizer,
    /// A block failed on the workers: their status as a client may see it (transport
    /// failures and refused credentials already rewritten by the dispatcher).
    #[error("{}", .0.message())]
    Worker(Status),
    /// The store failed (unavailable, or holding corrupt data).
    #[error(transparent)]
    Store(bd3lm_kvstore::Error),
    /// A task of the request stopped before it answered.
    #[error("{0}")]
    Internal(&'static str),
}

impl From<bd3lm_kvstore::Error> for Error {
    /// What the coordinator decides on is lifted out of the store's error; the rest stays
    /// a store fault.
    fn from(e: bd3lm_kvstore::Error) -> Self {
        match e {
            bd3lm_kvstore::Error::NoSession(id) => Error::NoSession(id),
            bd3lm_kvstore::Error::Deleted(id) => Error::Deleted(id),
            bd3lm_kvstore::Error::SessionExists(id) => Error::SessionExists(id),
            other => Error::Store(other),
        }
    }
}

impl Error {
    /// Whether the session is gone from the store (never there, lost, or deleted).
    pub fn is_missing(&self) -> bool {
        matches!(self, Error::NoSession(_) | Error::Deleted(_))
    }

    /// Whether a worker found the stored session behind the block asked for (it holds
    /// fewer committed blocks than the generation has seen committed): the store lost
    /// acknowledged writes, and the generation holds what it lost.
    pub fn is_ahead_of_store(&self) -> bool {
        matches!(self, Error::Worker(status) if status.code() == tonic::Code::FailedPrecondition)
    }

    /// The status a client is shown.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Error::Invalid(_) => {
                crate::metrics::invalid(&message);
                Status::invalid_argument(message)
            }
            Error::NoSession(_) | Error::Deleted(_) | Error::UnknownModel(_) => {
                Status::not_found(message)
            }
            Error::ModelRequired(_) => Status::invalid_argument(message),
            Error::SessionExists(_) => Status::already_exists(message),
            Error::LeaseHeld | Error::LeaseLost | Error::LeaseUnrenewed | Error::Contended => {
                Status::aborted(message)
            }
            Error::Refused(_) | Error::QueueWait => Status::resource_exhausted(message),
            Error::DeadlineExceeded | Error::CallDeadline => Status::deadline_exceeded(message),
            Error::NoWorker => Status::unavailable(message),
            Error::Tokenizer => Status::failed_precondition(message),
            Error::Worker(status) => status,
            Error::Store(e) => bd3lm_proto::status::from_store(e),
            Error::Internal(_) => Status::internal(message),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        e.into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// Each decision keeps the code and message clients had, and a store fault shows
    /// neither its detail nor an internal address.
    #[test]
    fn every_error_has_its_status() {
        let cases = [
            (
                Error::NoSession("s1".into()),
                Code::NotFound,
                "session_id: no session s1",
            ),
            (Error::Deleted("s1".into()), Code::NotFound, "was deleted"),
            (Error::LeaseHeld, Code::Aborted, "session_id:"),
            (Error::LeaseLost, Code::Aborted, "took the session over"),
            (Error::LeaseUnrenewed, Code::Aborted, "could not be renewed"),
            (Error::Contended, Code::Aborted, "kept changing"),
            (
                Error::Refused("queue full".into()),
                Code::ResourceExhausted,
                "queue full",
            ),
            (
                Error::NoWorker,
                Code::Unavailable,
                "no healthy denoise worker",
            ),
            (Error::Tokenizer, Code::FailedPrecondition, "tokenizer"),
            (
                Error::UnknownModel("x".into()),
                Code::NotFound,
                "model: no model x",
            ),
            (
                Error::ModelRequired("a, b".into()),
                Code::InvalidArgument,
                "model:",
            ),
            (
                Error::from(ValidationError::NoNewTokens),
                Code::InvalidArgument,
                "max_new_tokens:",
            ),
            (
                Error::from(bd3lm_kvstore::Error::Unavailable(
                    "10.0.0.7:6379 refused".into(),
                )),
                Code::Unavailable,
                "unavailable",
            ),
        ];
        for (e, code, says) in cases {
            let status = e.into_status();
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(says), "{}", status.message());
            assert!(!status.message().contains("10.0.0.7"));
        }
        let missing = Error::from(bd3lm_kvstore::Error::NoSession("s2".into()));
        assert!(
            missing.is_missing(),
            "a store's missing session is the coordinator's"
        );
    }
}
