//! Store errors as gRPC statuses, for every service that reads or writes sessions.
//!
//! Details that may name internal hosts stay in the server's log; the client is told
//! what kind of failure it was and, for a missing session, which one.

use crate::Error;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::NoSession(id) => Self::not_found(format!("session_id: no session {id}")),
            Error::Deleted(id) => Self::not_found(format!("session_id: session {id} was deleted")),
            Error::SessionExists(id) => {
                Self::already_exists(format!("session_id: session {id} already exists"))
            }
            Error::Unavailable(detail) => {
                tracing::warn!(error = %detail, "session store unavailable");
                Self::unavailable("the session store is unavailable")
            }
            Error::Corrupt(detail) => {
                tracing::error!(error = %detail, "corrupt data in the session store");
                Self::internal("a stored session record is corrupt")
            }
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
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), code);
            assert!(status.message().contains(says), "{}", status.message());
            assert!(!status.message().contains("10.0.0.7"));
        }
    }
}
