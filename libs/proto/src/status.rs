//! Store errors as gRPC statuses, for every service that reads or writes the stores: the
//! store crate knows nothing of gRPC, and each service's own error maps its store faults
//! through here.
//!
//! Details that may name internal hosts stay in the server's log; the client is told
//! what kind of failure it was and, for a missing session, which one.

use bd3lm_kvstore::Error;
use tonic::Status;

/// The status a client is shown for the store's error `e`.
pub fn from_store(e: Error) -> Status {
    match e {
        Error::NoSession(id) => Status::not_found(format!("session_id: no session {id}")),
        Error::Deleted(id) => Status::not_found(format!("session_id: session {id} was deleted")),
        Error::SessionExists(id) => {
            Status::already_exists(format!("session_id: session {id} already exists"))
        }
        Error::Unavailable(detail) => {
            tracing::warn!(error = %detail, "session store unavailable");
            Status::unavailable("the session store is unavailable")
        }
        Error::Corrupt(detail) => {
            tracing::error!(error = %detail, "corrupt data in the session store");
            Status::internal("a stored session record is corrupt")
        }
        Error::Misconfigured(detail) => {
            tracing::error!(error = %detail, "the session store is misconfigured");
            Status::internal("the session store is misconfigured")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn statuses_name_the_kind_and_hide_the_detail() {
        let cases = [
            (Error::NoSession("s1".into()), Code::NotFound, "s1"),
            (
                Error::Unavailable("connect to 10.0.0.7:6379 refused".into()),
                Code::Unavailable,
                "unavailable",
            ),
            (
                Error::Corrupt("record: bad json".into()),
                Code::Internal,
                "corrupt",
            ),
        ];
        for (e, code, says) in cases {
            let status = from_store(e);
            assert_eq!(status.code(), code);
            assert!(status.message().contains(says), "{}", status.message());
            assert!(!status.message().contains("10.0.0.7"));
        }
    }
}
