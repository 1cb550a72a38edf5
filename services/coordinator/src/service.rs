//! The public `Generation` service: validates, tokenizes, creates or continues the
//! session, and drives it block by block over the workers, streaming each block.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bd3lm_kvstore::{SessionRecord, Store};
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_server::Generation;
use bd3lm_proto::v1::{
    BlockTiming, DeleteSessionRequest, DeleteSessionResponse, DenoiseBlockRequest,
    DenoiseBlockResponse, GenerateRequest, GenerateResponse, GenerateStreamResponse,
    GetSessionRequest, InfoResponse, Sampler, SamplingParameters, SessionInfo,
    StopReason as ProtoStop,
};
use bd3lm_text::{Decoder, StopReason, StopRules, Text};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::pool::Pool;
use crate::validate::{self, Limits};

/// The model served by the workers, learned from their Info, and its text handling.
pub struct ModelInfo {
    /// What the workers report.
    pub info: InfoResponse,
    /// Tokenizer and special ids.
    pub text: Text,
}

/// Settings of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Request limits.
    pub limits: Limits,
    /// Longest wait for one block from one worker before trying another.
    pub block_timeout: Duration,
    /// Attempts per block, all workers together.
    pub max_attempts: usize,
    /// tokenizer.json for text prompts; without it prompts must be token ids.
    pub tokenizer: Option<std::path::PathBuf>,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            block_timeout: Duration::from_secs(120),
            max_attempts: 6,
            tokenizer: None,
        }
    }
}

/// The coordinator's state, shared by its requests.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    store: Store,
    settings: CoordinatorSettings,
    model: OnceLock<Arc<ModelInfo>>,
}

/// A validated request, its session stored and ready to be driven.
struct Plan {
    record: SessionRecord,
    rules: StopRules,
    /// Index in the session's tokens where this request's output starts.
    start: usize,
    model: Arc<ModelInfo>,
}

type Sender = mpsc::Sender<Result<GenerateStreamResponse, Status>>;

impl Coordinator {
    /// A coordinator over `pool` and `store`.
    pub fn new(pool: Arc<Pool>, store: Store, settings: CoordinatorSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                store,
                settings,
                model: OnceLock::new(),
            }),
        }
    }

    /// The model served, asked of a healthy worker once.
    async fn model(&self) -> Result<Arc<ModelInfo>, Status> {
        if let Some(m) = self.inner.model.get() {
            return Ok(m.clone());
        }
        let info = self
            .inner
            .pool
            .model_info()
            .await
            .ok_or_else(|| Status::unavailable("no healthy denoise worker"))?;
        let text = Text::load(
            self.inner.settings.tokenizer.as_deref(),
            info.vocab_size as usize,
        )
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let model = Arc::new(ModelInfo { info, text });
        Ok(self.inner.model.get_or_init(|| model).clone())
    }

    /// Validates `req`, creates or updates its session in the store, and returns the plan.
    async fn prepare(&self, req: GenerateRequest) -> Result<Plan, Status> {
        let limits = &self.inner.settings.limits;
        validate::check_request(&req, limits)?;
        let model = self.model().await?;
        let info = &model.info;
        let prompt = match &req.prompt {
            Some(Prompt::Text(t)) if req.session_id.is_empty() => model
                .text
                .encode_prompt(t)
                .map_err(|e| Status::invalid_argument(format!("prompt.text: {e}")))?,
            Some(Prompt::Text(t)) => model
                .text
                .encode(t)
                .map_err(|e| Status::invalid_argument(format!("prompt.text: {e}")))?,
            Some(Prompt::TokenIds(ids)) => ids.ids.clone(),
            None => Vec::new(),
        };
        validate::check_ids("prompt.token_ids", &prompt, info.vocab_size, info.mask_id)?;
        if prompt.len() > limits.max_prompt_tokens {
            return Err(Status::invalid_argument(format!(
                "prompt: {} tokens exceed the limit of {}",
                prompt.len(),
                limits.max_prompt_tokens
            )));
        }
        for seq in &req.stop_token_ids {
            validate::check_ids("stop_token_ids", &seq.ids, info.vocab_size, info.mask_id)?;
        }
        let record = if req.session_id.is_empty() {
            if prompt.is_empty() {
                return Err(Status::invalid_argument(
                    "prompt: required to start a session (text or token_ids, not empty)",
                ));
            }
            let sampling = validate::sampling(
                req.sampling.as_ref(),
                None,
                info.block_size as usize,
                limits,
            )?;
            SessionRecord {
                id: format!("{:032x}", rand::random::<u128>()),
                model_id: info.model_id.clone(),
                prompt_len: prompt.len(),
                returned: prompt.len(),
                tokens: prompt,
                committed_blocks: 0,
                seed: req.seed.unwrap_or_else(rand::random),
                sampling,
            }
        } else {
            let mut record = self.get_record(&req.session_id).await?;
            record.sampling = validate::sampling(
                req.sampling.as_ref(),
                Some(&record.sampling),
                info.block_size as usize,
                limits,
            )?;
            if !prompt.is_empty() {
                // Appended after everything committed: tokens held back from the last
                // response are dropped from view.
                record.tokens.extend_from_slice(&prompt);
                record.returned = record.tokens.len();
            }
            record
        };
        // Everything is checked before the store is written: a refused request leaves no
        // session behind.
        let total = record.returned + req.max_new_tokens as usize;
        if total > limits.max_total_tokens {
            return Err(Status::invalid_argument(format!(
                "max_new_tokens: the session would hold {total} tokens, over the limit of {}",
                limits.max_total_tokens
            )));
        }
        if !req.stop.is_empty() && !model.text.has_tokenizer() {
            return Err(Status::invalid_argument(
                "stop: text stop sequences need the server's tokenizer; use stop_token_ids",
            ));
        }
        let store = &self.inner.store;
        if req.session_id.is_empty() {
            store.create_session(&record).await.map_err(store_status)?;
        } else {
            store.put_session(&record).await.map_err(store_status)?;
        }
        let rules = StopRules {
            max_new_tokens: req.max_new_tokens as usize,
            eos: req.stop_on_eos.then_some(model.text.eos),
            stop_sequences: req.stop_token_ids.iter().map(|s| s.ids.clone()).collect(),
            hook: model.text.stop_hook(req.stop.clone()),
        };
        let start = record.returned;
        Ok(Plan {
            record,
            rules,
            start,
            model,
        })
    }

    async fn get_record(&self, session: &str) -> Result<SessionRecord, Status> {
        if session.is_empty() || session.len() > 128 {
            return Err(Status::invalid_argument(
                "session_id: must be 1 to 128 characters",
            ));
        }
        let model = self.model().await?;
        self.inner
            .store
            .get_session(&model.info.model_id, session)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("session_id: no session {session}")))
    }

    /// Drives `plan` block by block, sending each block and a final message to `tx`. Stops
    /// as soon as the receiver is gone (the client cancelled or disconnected).
    #[tracing::instrument(skip_all, fields(session = %plan.record.id))]
    async fn drive(&self, mut plan: Plan, tx: Sender) {
        let bs = plan.model.info.block_size as usize;
        let mut tokens = plan.record.tokens.clone();
        let mut committed = plan.record.committed_blocks;
        let (mut shown, mut passes) = (0usize, 0u32);
        let mut decoder = Decoder::new(&plan.model.text);
        let session = plan.record.id.clone();
        let stop = loop {
            if tx.is_closed() {
                tracing::info!(session = %session, "client went away; generation stopped");
                break StopReason::Cancelled;
            }
            let started = Instant::now();
            let mut answer = self.denoise_block(&session, committed).await;
            if matches!(&answer, Err(s) if s.code() == Code::NotFound) {
                // The store lost the session (flushed, evicted): this request holds every
                // committed token, so it puts the record back and goes on; the workers
                // rebuild the KV state from the tokens.
                let mut record = plan.record.clone();
                record.tokens.clone_from(&tokens);
                record.committed_blocks = committed;
                tracing::warn!(session = %session, committed, "session missing from the store; restoring it");
                answer = match self.inner.store.put_session(&record).await {
                    Ok(()) => self.denoise_block(&session, committed).await,
                    Err(e) => Err(store_status(e)),
                };
            }
            let (answer, worker) = match answer {
                Ok(a) => a,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let first = answer.block_index as usize * bs;
            let end = first + answer.token_ids.len();
            if tokens.len() < end {
                tokens.resize(end, 0);
            }
            tokens[first..end].copy_from_slice(&answer.token_ids);
            committed = answer.committed_blocks as usize;
            passes += answer.forward_passes;
            let done = (committed * bs).min(tokens.len());
            let generated = &tokens[plan.start.min(done)..done];
            let (visible, stop) = plan.rules.check(generated, &tokens[..done]);
            let new = &generated[shown.min(visible)..visible];
            let text = decoder.push(new);
            shown = shown.max(visible);
            let block = BlockTiming {
                index: answer.block_index,
                forward_passes: answer.forward_passes,
                steps: answer.steps,
                cache_ms: answer.cache_ms,
                denoise_ms: answer.denoise_ms,
                commit_ms: answer.commit_ms,
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                worker,
                cache_source: answer.cache_source.clone(),
            };
            let message = GenerateStreamResponse {
                session_id: session.clone(),
                token_ids: new.to_vec(),
                text,
                block: Some(block),
                seed: plan.record.seed,
                ..Default::default()
            };
            if tx.send(Ok(message)).await.is_err() {
                tracing::info!(session = %session, "client went away; generation stopped");
                break StopReason::Cancelled;
            }
            if let Some(stop) = stop {
                break stop;
            }
        };
        let returned = plan.start + shown;
        self.record_returned(&plan.record, returned).await;
        let last = GenerateStreamResponse {
            session_id: session,
            stop_reason: proto_stop(stop) as i32,
            forward_passes: passes,
            seed: plan.record.seed,
            ..Default::default()
        };
        let _ = tx.send(Ok(last)).await;
    }

    /// Stores how far the client has seen the session.
    async fn record_returned(&self, record: &SessionRecord, returned: usize) {
        match self
            .inner
            .store
            .get_session(&record.model_id, &record.id)
            .await
        {
            Ok(Some(mut current)) => {
                current.returned = returned;
                if let Err(e) = self.inner.store.put_session(&current).await {
                    tracing::warn!(error = %e, "recording the returned tokens failed");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "recording the returned tokens failed"),
        }
    }

    /// Asks workers for block `block` of `session` until one answers: the one holding the
    /// session first, another on an error, a timeout or a disconnect. The same seed gives
    /// the same tokens wherever the block runs.
    #[tracing::instrument(skip(self))]
    async fn denoise_block(
        &self,
        session: &str,
        block: usize,
    ) -> Result<(DenoiseBlockResponse, String), Status> {
        let settings = &self.inner.settings;
        let mut tried: Vec<String> = Vec::new();
        let mut last = Status::unavailable("no healthy denoise worker");
        for attempt in 0..settings.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
            }
            let worker = match self.inner.pool.pick(session, &tried) {
                Some(w) => w,
                None if tried.is_empty() => continue,
                None => {
                    // Every worker failed once: give them all another chance.
                    tried.clear();
                    continue;
                }
            };
            let mut request = Request::new(DenoiseBlockRequest {
                session_id: session.to_string(),
                block_index: block as u32,
            });
            bd3lm_telemetry::inject(request.metadata_mut());
            let _guard = worker.enter();
            let answer = tokio::time::timeout(
                settings.block_timeout,
                worker.client().denoise_block(request),
            )
            .await;
            match answer {
                Ok(Ok(response)) => {
                    self.inner.pool.remember(session, &worker.addr);
                    return Ok((response.into_inner(), worker.addr.clone()));
                }
                Ok(Err(status)) if !retryable(status.code()) => return Err(status),
                Ok(Err(status)) => {
                    tracing::warn!(worker = %worker.addr, code = ?status.code(), message = status.message(), "block failed; retrying elsewhere");
                    if matches!(status.code(), Code::Unknown | Code::Cancelled)
                        || status.message().contains("transport")
                    {
                        worker.mark_down();
                    }
                    last = status;
                }
                Err(_) => {
                    tracing::warn!(worker = %worker.addr, "block timed out; retrying elsewhere");
                    last = Status::deadline_exceeded(format!(
                        "worker {} did not answer within {:?}",
                        worker.addr, settings.block_timeout
                    ));
                }
            }
            tried.push(worker.addr.clone());
        }
        Err(last)
    }
}

/// Worker errors worth retrying on another worker.
fn retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange
    )
}

fn store_status(e: bd3lm_kvstore::Error) -> Status {
    match e {
        bd3lm_kvstore::Error::Unavailable(m) => {
            Status::unavailable(format!("store unavailable: {m}"))
        }
        bd3lm_kvstore::Error::NoSession(id) => {
            Status::not_found(format!("session_id: no session {id}"))
        }
        other => Status::internal(other.to_string()),
    }
}

fn proto_stop(stop: StopReason) -> ProtoStop {
    match stop {
        StopReason::MaxTokens => ProtoStop::MaxTokens,
        StopReason::Eos => ProtoStop::Eos,
        StopReason::LowEntropy => ProtoStop::LowEntropy,
        StopReason::StopSequence => ProtoStop::StopSequence,
        StopReason::Cancelled => ProtoStop::Cancelled,
    }
}

fn proto_sampling(s: &bd3lm_kvstore::SamplingRecord) -> SamplingParameters {
    let sampler = match s.sampler.as_str() {
        "ddpm" => Sampler::Ddpm,
        "confidence" => Sampler::Confidence,
        _ => Sampler::FirstHitting,
    };
    SamplingParameters {
        sampler: sampler as i32,
        steps: Some(s.steps as u32),
        threshold: Some(s.threshold),
        temperature: Some(s.temperature),
        top_p: Some(s.top_p),
        top_k: s.top_k.map(|k| k as u32),
        greedy: s.greedy,
    }
}

#[tonic::async_trait]
impl Generation for Coordinator {
    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    #[tracing::instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let plan = self.prepare(request.into_inner()).await?;
        let (tx, mut rx) = mpsc::channel(16);
        let this = self.clone();
        // Dropping `rx` (the client went away and this future was dropped) stops the work.
        tokio::spawn(async move { this.drive(plan, tx).await });
        let mut out = GenerateResponse::default();
        while let Some(message) = rx.recv().await {
            let m = message?;
            out.session_id = m.session_id;
            out.seed = m.seed;
            out.token_ids.extend_from_slice(&m.token_ids);
            out.text.push_str(&m.text);
            if let Some(block) = m.block {
                out.blocks.push(block);
            }
            if m.stop_reason != ProtoStop::Unspecified as i32 {
                out.stop_reason = m.stop_reason;
                out.forward_passes = m.forward_passes;
            }
        }
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all)]
    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let plan = self.prepare(request.into_inner()).await?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move { this.drive(plan, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<SessionInfo>, Status> {
        let record = self.get_record(&request.get_ref().session_id).await?;
        let model = self.model().await?;
        Ok(Response::new(SessionInfo {
            session_id: record.id.clone(),
            model_id: record.model_id.clone(),
            text: if model.text.has_tokenizer() {
                model.text.decode(&record.tokens)
            } else {
                String::new()
            },
            token_ids: record.tokens.clone(),
            prompt_tokens: record.prompt_len as u32,
            committed_blocks: record.committed_blocks as u32,
            seed: record.seed,
            sampling: Some(proto_sampling(&record.sampling)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let id = &request.get_ref().session_id;
        let record = match self.get_record(id).await {
            Ok(r) => r,
            Err(s) if s.code() == Code::NotFound => {
                return Ok(Response::new(DeleteSessionResponse { deleted: false }));
            }
            Err(s) => return Err(s),
        };
        let deleted = self
            .inner
            .store
            .delete_session(&record.model_id, id, record.committed_blocks)
            .await
            .map_err(store_status)?;
        self.inner.pool.forget(id);
        Ok(Response::new(DeleteSessionResponse { deleted }))
    }
}
