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

use crate::dispatch::Dispatcher;
use crate::plan::{self, ModelInfo, Plan};
use crate::pool::Pool;
use crate::settings::CoordinatorSettings;
use crate::stream;
use crate::validation;

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
    model: OnceLock<Arc<ModelInfo>>,
}

impl Coordinator {
    /// A coordinator over `pool` and `store`.
    pub fn new(pool: Arc<Pool>, store: Store, settings: CoordinatorSettings) -> Self {
        let dispatch = Dispatcher::new(
            pool.clone(),
            settings.block_timeout,
            settings.max_attempts,
            settings.retry_backoff,
        );
        Self {
            inner: Arc::new(Inner {
                pool,
                store,
                settings,
                dispatch,
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
        .map_err(|e| {
            tracing::error!(error = %e, "loading the tokenizer failed");
            Status::failed_precondition("the server's tokenizer does not fit its model")
        })?;
        let model = Arc::new(ModelInfo { info, text });
        Ok(self.inner.model.get_or_init(|| model).clone())
    }

    /// Validates and plans `req`: its session is stored and ready to be driven.
    async fn prepare(&self, req: GenerateRequest) -> Result<Plan, Status> {
        let model = self.model().await?;
        let limits = &self.inner.settings.limits;
        let valid = validation::validate(req, limits, &model.vocabulary())?;
        plan::plan(valid, model, &self.inner.store, limits).await
    }

    /// Starts driving `plan` on its own task; dropping the receiver stops the work at the
    /// next block.
    fn spawn_drive(&self, plan: Plan) -> mpsc::Receiver<Result<GenerateStreamResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            stream::drive(&this.inner.store, &this.inner.dispatch, plan, tx).await
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
        let deleted = self
            .inner
            .store
            .delete_session(&record.model_id, id, record.committed_blocks)
            .await?;
        self.inner.pool.forget(id);
        Ok(Response::new(DeleteSessionResponse { deleted }))
    }
}
