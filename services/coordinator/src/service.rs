//! The public `Generation` service: the gRPC surface over validation, planning, dispatch
//! and streaming.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bd3lm_kvstore::SessionStore;
use bd3lm_proto::auth::Caller;
use bd3lm_proto::v1::generation_server::Generation;
use bd3lm_proto::v1::{
    DeleteSessionRequest, DeleteSessionResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, GetSessionRequest, ListServedModelsRequest, ListServedModelsResponse,
    ServedModel, SessionInfo, StopReason as ProtoStop,
};
use bd3lm_text::Text;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::admission::{Admissions, Expiry, Queueing};
use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::metrics;
use crate::plan::{self, ModelInfo, Plan};
use crate::pool::Pool;
use crate::settings::CoordinatorSettings;
use crate::stream::{self, Active};
use crate::validation;

/// Longest wait of DeleteSession for the session's generations to stop.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The coordinator's state, shared by its requests.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    store: SessionStore,
    settings: CoordinatorSettings,
    dispatch: Dispatcher,
    admissions: Arc<Admissions>,
    active: Arc<Active>,
    /// Each model served, with its tokenizer, once asked of a worker serving it.
    models: Mutex<HashMap<String, Arc<ModelInfo>>>,
}

impl Coordinator {
    /// A coordinator over `pool` and `store`; each model's admission follows the
    /// capacity of the healthy workers serving it, as the pool publishes it, from a task
    /// that ends with the coordinator.
    pub fn new(pool: Arc<Pool>, store: SessionStore, settings: CoordinatorSettings) -> Self {
        let admissions = Arc::new(Admissions::new(
            settings.max_queue,
            settings.max_streams_per_key,
        ));
        let policy = settings.retry_policy();
        let dispatch = Dispatcher::new(pool.clone(), admissions.clone(), policy);
        let inner = Arc::new(Inner {
            pool,
            store,
            settings,
            dispatch,
            admissions,
            active: Arc::default(),
            models: Mutex::default(),
        });
        let (watched, mut serving) = (Arc::downgrade(&inner), inner.pool.watch());
        tokio::spawn(async move {
            loop {
                let by_model = serving.borrow_and_update().by_model.clone();
                let Some(inner) = watched.upgrade() else {
                    break;
                };
                inner.admissions.set_capacities(&by_model);
                drop(inner);
                if serving.changed().await.is_err() {
                    break;
                }
            }
        });
        Self { inner }
    }

    /// Blocks waiting for a worker slot now.
    pub fn queued_blocks(&self) -> usize {
        self.inner.admissions.waiting()
    }

    /// The tokenizer file of model `id`, if it has one.
    pub(crate) fn tokenizer_of(&self, id: &str) -> Option<std::path::PathBuf> {
        self.inner.settings.tokenizer_of(id).map(Into::into)
    }

    /// The models the workers serve, with their versions and ready workers.
    pub fn served_models(&self) -> Vec<ServedModel> {
        self.inner.pool.served()
    }

    /// The model a request naming `named` generates with: that one when a worker serves
    /// it, else (named none) `--default-model` or the one model served. NOT_FOUND for a
    /// model nobody serves; INVALID_ARGUMENT naming `model` when several are served and
    /// no default is set.
    pub(crate) fn resolve_model(&self, named: &str) -> Result<String, Error> {
        let served = self.served_models();
        let wanted = match (named, &self.inner.settings.default_model) {
            ("", Some(default)) => default.clone(),
            ("", None) => match served.as_slice() {
                [] => return Err(Error::NoWorker),
                [only] => only.id.clone(),
                several => {
                    let ids: Vec<&str> = several.iter().map(|m| m.id.as_str()).collect();
                    return Err(Error::ModelRequired(ids.join(", ")));
                }
            },
            (named, _) => named.to_string(),
        };
        match served.iter().find(|m| m.id == wanted) {
            Some(_) => Ok(wanted),
            // Before any worker answered, every model is unknown: say so as no worker.
            None if served.is_empty() => Err(Error::NoWorker),
            None => Err(Error::UnknownModel(wanted)),
        }
    }

    /// Model `id` with its tokenizer, asked of a healthy worker serving it once.
    pub(crate) async fn model(&self, id: &str) -> Result<Arc<ModelInfo>, Error> {
        let cached = {
            let models = self.inner.models.lock().unwrap_or_else(|e| e.into_inner());
            models.get(id).cloned()
        };
        if let Some(m) = cached {
            return Ok(m);
        }
        let info = self
            .inner
            .pool
            .model_info(id)
            .await
            .ok_or(Error::NoWorker)?;
        let tokenizer = self.inner.settings.tokenizer_of(id);
        let text = Text::load(tokenizer, info.vocab_size as usize).map_err(|e| {
            tracing::error!(error = %e, model = id, "loading the tokenizer failed");
            Error::Tokenizer
        })?;
        let model = Arc::new(ModelInfo { info, text });
        let mut models = self.inner.models.lock().unwrap_or_else(|e| e.into_inner());
        Ok(models.entry(id.to_string()).or_insert(model).clone())
    }

    /// Admits, validates and plans `req` of the key `owner`, a call that must be answered
    /// by `deadline`: its session is stored and ready to be driven.
    async fn prepare(
        &self,
        req: GenerateRequest,
        (owner, across): (Option<String>, bool),
        deadline: Option<Instant>,
    ) -> Result<Plan, Error> {
        let id = self.resolve_model(&req.model)?;
        let ticket = self.inner.admissions.of(&id).admit(owner.as_deref())?;
        let mut queueing = self.queueing(&owner, (req.priority, across), deadline);
        queueing.model = id.clone();
        let model = self.model(&id).await?;
        let settings = &self.inner.settings;
        // Tokenizing a long prompt is compute: off the async threads.
        let (limits, text) = (settings.limits.clone(), model.clone());
        let valid = tokio::task::spawn_blocking(move || {
            validation::validate(req, &limits, &text.vocabulary())
        })
        .await
        .map_err(|_| Error::Internal("validating the request failed"))??;
        let admitted = (ticket, queueing);
        let plan = plan::plan(valid, model, &self.inner.store, settings, owner, admitted).await?;
        Ok(plan::Plan { deadline, ..plan })
    }

    /// Where a generation of `owner` waits: its key's queue at `priority` (or the band
    /// before every key's turn, `across` keys), its first block until the call's
    /// `deadline` or `--max-queue-wait-secs`, whichever is first.
    fn queueing(
        &self,
        owner: &Option<String>,
        (priority, across): (i32, bool),
        call: Option<Instant>,
    ) -> Queueing {
        let wait = self
            .inner
            .settings
            .max_queue_wait
            .map(|w| Instant::now() + w);
        let deadline = match (call, wait) {
            (Some(c), Some(w)) if w < c => Some((w, Expiry::QueueWait)),
            (Some(c), _) => Some((c, Expiry::Call)),
            (None, Some(w)) => Some((w, Expiry::QueueWait)),
            (None, None) => None,
        };
        Queueing {
            model: String::new(),
            key: owner.clone().unwrap_or_default(),
            priority,
            across,
            deadline,
        }
    }

    /// Starts driving `plan` on its own task; dropping the receiver stops the work at the
    /// next block.
    fn spawn_drive(&self, plan: Plan) -> mpsc::Receiver<Result<GenerateStreamResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let running = self.inner.active.enter(&plan.record.id);
        let this = self.clone();
        let drive = async move {
            let inner = &this.inner;
            stream::drive(&inner.store, &inner.dispatch, plan, tx, running).await
        };
        // The generation's span is the call's child: it carries the request id.
        tokio::spawn(drive.in_current_span());
        rx
    }

    /// Session `session` of the key `owner`, of whichever model served it (sessions are
    /// stored by model: each served model's are looked in).
    async fn record(
        &self,
        session: &str,
        owner: Option<&str>,
    ) -> Result<bd3lm_kvstore::SessionRecord, Error> {
        validation::check_session_id(session)?;
        let served = self.served_models();
        if served.is_empty() {
            return Err(Error::NoWorker);
        }
        let mut result = Err(Error::NoSession(session.to_string()));
        for model in &served {
            result = plan::load(&self.inner.store, &model.id, session, owner).await;
            if !matches!(result, Err(Error::NoSession(_))) {
                break;
            }
        }
        result
    }
}

/// The id of the caller's API key (`None` on an open API), as the key check left it.
pub(crate) fn caller<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<Caller>()
        .and_then(|c| c.key_id.clone())
}

/// The caller's key id, and whether its priority counts across keys.
fn generating_caller<T>(request: &Request<T>) -> (Option<String>, bool) {
    let across = request
        .extensions()
        .get::<Caller>()
        .is_some_and(|c| c.priority);
    (caller(request), across)
}

/// When the call must be answered: its `grpc-timeout` (set by a client's deadline) from
/// now; `None` without one, or with one that does not parse.
pub(crate) fn call_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let timeout = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    Some(Instant::now() + parse_grpc_timeout(timeout)?)
}

/// A `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The calls' bodies, each run in its call's span.
impl Coordinator {
    async fn generate_call(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (who, deadline) = (generating_caller(&request), call_deadline(&request));
        let plan = self.prepare(request.into_inner(), who, deadline).await?;
        let mut rx = self.spawn_drive(plan);
        let mut out = GenerateResponse::default();
        while let Some(message) = rx.recv().await {
            let m = message?;
            out.session_id = m.session_id;
            out.seed = m.seed;
            out.token_ids.extend_from_slice(&m.token_ids);
            out.text.push_str(&m.text);
            out.blocks.extend(m.block);
            if m.stop_reason != ProtoStop::Unspecified as i32 {
                out.stop_reason = m.stop_reason;
                out.forward_passes = m.forward_passes;
                out.prompt_tokens = m.prompt_tokens;
            }
        }
        Ok(Response::new(out))
    }

    async fn generate_stream_call(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Stream>, Status> {
        let (who, deadline) = (generating_caller(&request), call_deadline(&request));
        let plan = self.prepare(request.into_inner(), who, deadline).await?;
        Ok(Response::new(ReceiverStream::new(self.spawn_drive(plan))))
    }

    async fn get_session_call(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<SessionInfo>, Status> {
        let owner = caller(&request);
        let record = self
            .record(&request.get_ref().session_id, owner.as_deref())
            .await?;
        let model = self.model(&record.model_id).await?;
        let text = if model.text.has_tokenizer() {
            model.text.decode(&record.tokens)
        } else {
            String::new()
        };
        Ok(Response::new(SessionInfo {
            sampling: Some((&record.sampling).into()),
            session_id: record.id,
            model_id: record.model_id,
            text,
            token_ids: record.tokens,
            prompt_tokens: record.prompt_len as u32,
            committed_blocks: record.committed_blocks as u32,
            seed: record.seed,
            model_version: record.model_version,
        }))
    }

    async fn delete_session_call(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let owner = caller(&request);
        let id = &request.get_ref().session_id;
        let record = match self.record(id, owner.as_deref()).await {
            Ok(r) => r,
            Err(e) if e.is_missing() => {
                return Ok(Response::new(DeleteSessionResponse { deleted: false }));
            }
            Err(e) => return Err(e.into()),
        };
        // Its generations in progress stop first, so none writes the session back.
        self.inner.active.stop(id, STOP_WAIT).await;
        let record = self.record(id, None).await.unwrap_or(record);
        let store = &self.inner.store;
        let deleted = store
            .delete_session(&record.model_id, id)
            .await
            .map_err(Error::from)?;
        if let Some(key) = &record.owner {
            let released = store.release_slot(&record.model_id, key, id).await;
            released.map_err(Error::from)?;
        }
        self.inner.pool.forget(id);
        Ok(Response::new(DeleteSessionResponse { deleted }))
    }
}

/// The stream of a `GenerateStream` call.
type Stream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

#[tonic::async_trait]
impl Generation for Coordinator {
    type GenerateStreamStream = Stream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let id = RequestId::new("Generate");
        id.answer(
            self.generate_call(request)
                .instrument(id.span("generate"))
                .await,
        )
    }

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Stream>, Status> {
        let id = RequestId::new("GenerateStream");
        let call = self.generate_stream_call(request);
        id.answer(call.instrument(id.span("generate_stream")).await)
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<SessionInfo>, Status> {
        let id = RequestId::new("GetSession");
        id.answer(
            self.get_session_call(request)
                .instrument(id.span("get_session"))
                .await,
        )
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let id = RequestId::new("DeleteSession");
        let call = self.delete_session_call(request);
        id.answer(call.instrument(id.span("delete_session")).await)
    }

    async fn list_served_models(
        &self,
        _request: Request<ListServedModelsRequest>,
    ) -> Result<Response<ListServedModelsResponse>, Status> {
        let id = RequestId::new("ListServedModels");
        let models = self.served_models();
        id.answer(Ok(Response::new(ListServedModelsResponse { models })))
    }
}

/// The id of one call: in its span (so in every log line and trace of it) and in the
/// `x-request-id` metadata of its answer, an error's included, so that what a client
/// reports finds the server's log lines. Details of server-side failures stay in the log.
/// The answer is counted in the request metrics of its method.
pub(crate) struct RequestId {
    id: String,
    method: &'static str,
    started: Instant,
}

impl RequestId {
    pub(crate) fn new(method: &'static str) -> Self {
        Self {
            id: format!("{:016x}", rand::random::<u64>()),
            method,
            started: Instant::now(),
        }
    }

    pub(crate) fn span(&self, call: &'static str) -> tracing::Span {
        tracing::info_span!("call", call, request_id = %self.id)
    }

    pub(crate) fn answer<T>(
        &self,
        result: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let value: AsciiMetadataValue = self.id.parse().expect("hex is valid metadata");
        match result {
            Ok(mut response) => {
                metrics::request(self.method, self.started, Code::Ok);
                response.metadata_mut().insert("x-request-id", value);
                Ok(response)
            }
            Err(mut status) => {
                metrics::request(self.method, self.started, status.code());
                tracing::info!(request_id = %self.id, code = ?status.code(), "call refused");
                status.metadata_mut().insert("x-request-id", value);
                Err(status)
            }
        }
    }
}
