//! The OpenAI-compatible HTTP API (`--http-addr`): `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models` and `GET /v1/models/{id}` (and an
//! unauthenticated `GET /health` for load balancers), beside gRPC on the same
//! coordinator. A request is read into a `GenerateRequest`
//! ([`openai`], [`chat`]) and served by the Generation service itself (its admission,
//! metrics and spans), under the same API keys (`Authorization: Bearer`); a stream is
//! Server-Sent Events, one chunk per committed block, and a client that goes away drops
//! the stream, which stops the generation as a gRPC cancel does. Errors are OpenAI's
//! shape ([`error`]).

mod chat;
mod error;
mod listener;
mod openai;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bd3lm_proto::auth::{Caller, Tokens};
use bd3lm_proto::v1::generation_server::Generation;
use bd3lm_proto::v1::{GenerateRequest, GenerateStreamResponse, ServedModel, StopReason};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tonic::Status;
use tracing::Instrument;

pub use chat::ChatTemplate;
pub use error::ApiError;
pub use listener::{Connection, Listener};
use openai::{Fields, Shape};

use crate::Coordinator;

/// What the HTTP handlers share.
#[derive(Clone)]
struct Http {
    coordinator: Coordinator,
    keys: Arc<Tokens>,
    /// Each model's chat template (or its lack), read once beside its tokenizer.
    chat: Arc<Mutex<HashMap<String, Option<Arc<ChatTemplate>>>>>,
}

/// Which OpenAI object a generation is answered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Serves the HTTP API on `listener` until `shutdown` resolves; requests in flight finish.
pub async fn serve(
    listener: Listener,
    coordinator: Coordinator,
    keys: Arc<Tokens>,
    max_request_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let http = Http {
        coordinator,
        keys,
        chat: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .with_state(http);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Response {
    let call = async {
        let caller = http.authorize(&headers)?;
        let (request, shape) = openai::completion(Fields::parse(&body)?)?;
        http.generate(caller, request, shape, Kind::Completion)
            .await
    };
    answer("completions", &headers, call).await
}

async fn chat_completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Response {
    let call = async {
        let caller = http.authorize(&headers)?;
        let fields = Fields::parse(&body)?;
        let template = |model: &str| http.chat_template(model);
        let (request, shape) = chat::completion(fields, template)?;
        http.generate(caller, request, shape, Kind::Chat).await
    };
    answer("chat_completions", &headers, call).await
}

async fn models(State(http): State<Http>, headers: HeaderMap) -> Response {
    let call = async {
        http.authorize(&headers)?;
        let served = http.coordinator.served_models();
        let data: Vec<Value> = served.iter().map(model_object).collect();
        Ok(Json(json!({"object": "list", "data": data})).into_response())
    };
    answer("models", &headers, call).await
}

/// For load balancers and Ingress controllers, without a key: 200 while a worker serves
/// a model, 503 before.
async fn health(State(http): State<Http>, headers: HeaderMap) -> Response {
    let call = async {
        let served = http.coordinator.served_models();
        let ready: Vec<&str> = served
            .iter()
            .filter(|m| m.ready_workers > 0)
            .map(|m| m.id.as_str())
            .collect();
        if ready.is_empty() {
            return Err(ApiError::from_status(&Status::unavailable(
                "no denoise worker is ready",
            )));
        }
        Ok(Json(json!({"status": "ok", "models": ready})).into_response())
    };
    answer("health", &headers, call).await
}

async fn model(State(http): State<Http>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let call = async {
        http.authorize(&headers)?;
        let served = http.coordinator.served_models();
        let model = served
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| unknown_model(&id))?;
        Ok(Json(model_object(model)).into_response())
    };
    answer("model", &headers, call).await
}

/// 404 naming `model`.
fn unknown_model(id: &str) -> ApiError {
    ApiError::not_found(
        "model",
        format!("model: no model {id} is served here (GET /v1/models lists them)"),
    )
}

/// Runs `call` (the handler of `route`) in its span, a child of the `traceparent`
/// header's trace, and answers it, counted by route and status.
async fn answer(
    route: &'static str,
    headers: &HeaderMap,
    call: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Response {
    let started = std::time::Instant::now();
    let span = tracing::info_span!("http", route);
    let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
    bd3lm_telemetry::adopt(&span, &metadata);
    let response = call
        .instrument(span)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    crate::metrics::http_request(route, started, response.status().as_u16());
    response
}

/// A model as OpenAI lists it, with what the workers report of it.
fn model_object(model: &ServedModel) -> Value {
    json!({
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": "bd3lm",
        "versions": model.versions,
        "latest_version": model.latest_version,
        "ready_workers": model.ready_workers,
        "block_size": model.block_size,
        "max_model_len": model.model_length,
    })
}

impl Http {
    /// The caller of a request with `headers`, or 401 (counted as the gRPC refusals are).
    fn authorize(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        self.keys.check(&metadata).map_err(|status| {
            metrics::counter!("bd3lm_unauthenticated_total").increment(1);
            ApiError::from_status(&status)
        })
    }

    /// Model `id`'s chat template: `chat_template` of the `tokenizer_config.json` beside
    /// its tokenizer, read at the first chat request of the model.
    fn chat_template(&self, id: &str) -> Option<Arc<ChatTemplate>> {
        let mut templates = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let tokenizer = || self.coordinator.tokenizer_of(id);
        let load = || ChatTemplate::load(tokenizer().as_deref()).map(Arc::new);
        templates.entry(id.to_string()).or_insert_with(load).clone()
    }

    /// Serves `request` through the Generation service (which resolves its model: an
    /// unknown one is its NOT_FOUND naming `model`), answered as `kind` in `shape`.
    async fn generate(
        &self,
        caller: Caller,
        request: GenerateRequest,
        shape: Shape,
        kind: Kind,
    ) -> Result<Response, ApiError> {
        let mut call = tonic::Request::new(request);
        call.extensions_mut().insert(caller);
        let response = Generation::generate_stream(&self.coordinator, call).await?;
        let request_id = response.metadata().get("x-request-id").cloned();
        let messages = response.into_inner();
        let chunks = Chunks::new(shape, kind);
        let mut reply = if chunks.shape.stream {
            let events = events(messages, chunks);
            Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response()
        } else {
            Json(chunks.collect(messages).await?).into_response()
        };
        if let Some(id) = request_id.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
            reply.headers_mut().insert("x-request-id", id);
        }
        Ok(reply)
    }
}

/// Seconds since the Unix epoch.
fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Turns the stream's messages into OpenAI objects of one generation.
struct Chunks {
    shape: Shape,
    kind: Kind,
    created: u64,
    /// Tokens returned so far.
    completion: u32,
    /// The chat stream's first chunk carries the assistant's role.
    first: bool,
}

impl Chunks {
    fn new(shape: Shape, kind: Kind) -> Self {
        Self {
            shape,
            kind,
            created: unix_secs(),
            completion: 0,
            first: true,
        }
    }

    /// The object's head: id, type, time, model, and the session to continue.
    fn head(&self, session: &str, chunk: bool) -> Value {
        let (prefix, object) = match (self.kind, chunk) {
            (Kind::Completion, _) => ("cmpl", "text_completion"),
            (Kind::Chat, false) => ("chatcmpl", "chat.completion"),
            (Kind::Chat, true) => ("chatcmpl", "chat.completion.chunk"),
        };
        json!({
            "id": format!("{prefix}-{session}"),
            "object": object,
            "created": self.created,
            "model": self.shape.model,
            "session_id": session,
        })
    }

    /// A choice of `text` ending for `finish` (a stream's delta, or the whole message).
    fn choice(&mut self, text: String, finish: Option<&str>, chunk: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let mut delta = json!({"content": text});
                if std::mem::take(&mut self.first) {
                    delta["role"] = "assistant".into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        }
    }

    /// The whole answer of a call without `stream`.
    async fn collect(
        mut self,
        mut messages: impl Stream<Item = Result<GenerateStreamResponse, Status>> + Unpin,
    ) -> Result<Value, ApiError> {
        let (mut text, mut last) = (String::new(), GenerateStreamResponse::default());
        while let Some(message) = messages.next().await {
            let message = message?;
            self.completion += message.token_ids.len() as u32;
            text.push_str(&message.text);
            last = message;
        }
        let finish = openai::finish_reason(last.stop_reason);
        let mut object = self.head(&last.session_id, false);
        object["choices"] = json!([self.choice(text, finish, false)]);
        object["usage"] = openai::usage(last.prompt_tokens, self.completion);
        Ok(object)
    }

    /// The events of one stream message: a chunk of its text; after the final one, the
    /// usage chunk when asked for.
    fn on(&mut self, message: Result<GenerateStreamResponse, Status>) -> Vec<Event> {
        let message = match message {
            Ok(m) => m,
            // Mid-stream: the status line went out already; the error is an event.
            Err(status) => return vec![json_event(&ApiError::from_status(&status).body())],
        };
        self.completion += message.token_ids.len() as u32;
        let done = message.stop_reason != StopReason::Unspecified as i32;
        let finish = openai::finish_reason(message.stop_reason);
        let mut chunk = self.head(&message.session_id, true);
        chunk["choices"] = json!([self.choice(message.text, finish, true)]);
        let mut events = vec![json_event(&chunk)];
        if done && self.shape.include_usage {
            let mut usage = self.head(&message.session_id, true);
            usage["choices"] = json!([]);
            usage["usage"] = openai::usage(message.prompt_tokens, self.completion);
            events.push(json_event(&usage));
        }
        events
    }
}

fn json_event(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

/// The Server-Sent Events of a stream: its chunks, then `[DONE]`. Dropped when the client
/// goes away, and with it the generation's stream.
fn events(
    messages: impl Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static,
    mut chunks: Chunks,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    messages
        .map(move |m| futures::stream::iter(chunks.on(m)))
        .flatten()
        .chain(futures::stream::once(async {
            Event::default().data("[DONE]")
        }))
        .map(Ok)
}
