//! The public `Generation` service: the gRPC surface over validation, planning, dispatch
//! and streaming.

use std::sync::{Arc, OnceLock};

use bd3lm_kvstore::Store;
use bd3lm_proto::v1::generation_server::Generation;
use bd3lm_proto::v1::{
    DeleteSessionRequest, DeleteSessionResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, GetSessionRequest, SessionInfo, StopReason as ProtoStop,
};
use bd3lm_text::Text;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::admission::Admission;
use crate::dispatch::Dispatcher;
use crate::plan::{self, ModelInfo, Plan};
use crate::pool::Pool;
use crate::settings::CoordinatorSettings;
use crate::stream::{self, Active};
use crate::validation;

/// Longest wait of DeleteSession for the session's generations to stop.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the admission's slots are matched to the workers' capacity.
const CAPACITY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The coordinator's state, shared by its requests.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    store: Store,
    settings: CoordinatorSettings,
    dispatch: Dispatcher,
    admission: Arc<Admission>,
    active: Arc<Active>,
    model: OnceLock<Arc<ModelInfo>>,
}

impl Coordinator {
    /// A coordinator over `pool` and `store`; its admission follows the healthy workers'
    /// capacity from a task that ends with the coordinator.
    pub fn new(pool: Arc<Pool>, store: Store, settings: CoordinatorSettings) -> Self {
        let admission = Arc::new(Admission::new(settings.max_queue));
        let dispatch = Dispatcher::new(
            pool.clone(),
            admission.clone(),
            settings.block_timeout,
            settings.max_attempts,
            settings.retry_backoff,
        );
        let inner = Arc::new(Inner {
            pool,
            store,
            settings,
            dispatch,
            admission,
            active: Arc::default(),
            model: OnceLock::new(),
        });
        let watched = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(inner) = watched.upgrade() {
                inner.admission.set_capacity(inner.pool.capacity());
                drop(inner);
                tokio::time::sleep(CAPACITY_INTERVAL).await;
            }
        });
        Self { inner }
    }

    /// Blocks waiting for a worker slot now.
    pub fn queued_blocks(&self) -> usize {
        self.inner.admission.waiting()
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
        .map_err(|e| {
            tracing::error!(error = %e, "loading the tokenizer failed");
            Status::failed_precondition("the server's tokenizer does not fit its model")
        })?;
        let model = Arc::new(ModelInfo { info, text });
        Ok(self.inner.model.get_or_init(|| model).clone())
    }

    /// Validates and plans `req`: its session is stored and ready to be driven.
    async fn prepare(&self, req: GenerateRequest) -> Result<Plan, Status> {
        self.inner.admission.admit()?;
        let model = self.model().await?;
        let settings = &self.inner.settings;
        let valid = validation::validate(req, &settings.limits, &model.vocabulary())?;
        let (store, terms) = (&self.inner.store, settings.lease_terms());
        plan::plan(valid, model, store, &settings.limits, terms).await
    }

    /// Starts driving `plan` on its own task; dropping the receiver stops the work at the
    /// next block.
    fn spawn_drive(&self, plan: Plan) -> mpsc::Receiver<Result<GenerateStreamResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let running = self.inner.active.enter(&plan.record.id);
        let this = self.clone();
        tokio::spawn(async move {
            let inner = &this.inner;
            stream::drive(&inner.store, &inner.dispatch, plan, tx, running).await
        });
        rx
    }

    async fn record(&self, session: &str) -> Result<bd3lm_kvstore::SessionRecord, Status> {
        let model = self.model().await?;
        plan::load(&self.inner.store, &model.info.model_id, session).await
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
        Ok(Response::new(ReceiverStream::new(self.spawn_drive(plan))))
    }

    #[tracing::instrument(skip_all)]
    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<SessionInfo>, Status> {
        let record = self.record(&request.get_ref().session_id).await?;
        let model = self.model().await?;
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
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let id = &request.get_ref().session_id;
        let record = match self.record(id).await {
            Ok(r) => r,
            Err(s) if s.code() == Code::NotFound => {
                return Ok(Response::new(DeleteSessionResponse { deleted: false }));
            }
            Err(s) => return Err(s),
        };
        // Its generations in progress stop first, so none writes the session back.
        self.inner.active.stop(id, STOP_WAIT).await;
        let record = self.record(id).await.unwrap_or(record);
        let deleted = self
            .inner
            .store
            .delete_session(&record.model_id, id, record.committed_blocks)
            .await?;
        self.inner.pool.forget(id);
        Ok(Response::new(DeleteSessionResponse { deleted }))
    }
}
