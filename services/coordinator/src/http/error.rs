//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status of the gRPC code, so an OpenAI client raises the exception it would raise
//! against OpenAI (400 `BadRequestError`, 401, 404, 429 with `Retry-After`, 503).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

/// An error of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// The request field at fault, as the HTTP API names it.
    param: Option<String>,
}

/// gRPC field names whose HTTP names differ.
const FIELD_NAMES: [(&str, &str); 6] = [
    ("max_new_tokens", "max_tokens"),
    ("sampling.temperature", "temperature"),
    ("sampling.top_p", "top_p"),
    ("sampling.steps", "steps"),
    ("sampling.threshold", "threshold"),
    ("sampling.top_k", "top_k"),
];

impl ApiError {
    /// 400 naming `param`: a field that cannot be served as given.
    pub fn invalid(param: &str, reason: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {reason}"),
            param: Some(param.to_string()),
        }
    }

    /// 400 naming `param`: an OpenAI field this server does not support.
    pub fn unsupported(param: &str) -> Self {
        Self::invalid(param, "not supported by this server")
    }

    /// 404 naming `param`.
    pub fn not_found(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The HTTP error of a gRPC status from the Generation service; a message that names
    /// its field (`field: reason`) names it as the HTTP API does.
    pub fn from_status(status: &Status) -> Self {
        let (code, kind) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            Code::Aborted => (StatusCode::CONFLICT, "conflict_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        let given = status.message();
        let (mut message, mut param) = (given.to_string(), None);
        if let Some((field, reason)) = given.split_once(": ")
            && !field.is_empty()
            && field
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
        {
            let name = FIELD_NAMES
                .iter()
                .find(|(grpc, _)| *grpc == field)
                .map_or(field, |(_, http)| *http);
            message = format!("{name}: {reason}");
            param = Some(name.to_string());
        }
        Self {
            status: code,
            kind,
            message,
            param,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error's JSON body, also sent as an event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16().to_string(),
            }
        })
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self::from_status(&status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        // A refusal for load: the client may retry shortly.
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            let retry = HeaderValue::from_static("1");
            response.headers_mut().insert(header::RETRY_AFTER, retry);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC codes map to OpenAI's statuses and types; a field named in the message is
    /// named by its HTTP name.
    #[test]
    fn statuses_map_to_openai_errors() {
        let e = ApiError::from_status(&Status::invalid_argument(
            "sampling.temperature: must be > 0",
        ));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["message"], "temperature: must be > 0");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let busy = ApiError::from_status(&Status::resource_exhausted("the server is at capacity"));
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(busy.body()["error"]["param"].is_null());
        let response = busy.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let missing = ApiError::from_status(&Status::not_found("session_id: no session x"));
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.body()["error"]["param"], "session_id");
        let plain = ApiError::from_status(&Status::unavailable("no denoise worker is ready"));
        assert_eq!(plain.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
