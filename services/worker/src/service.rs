//! The `DenoiseWorker` gRPC surface: admission within the worker's capacity, the
//! session's record, its cache (see [`crate::cache`]), the block's work on a blocking
//! thread ([`crate::block`]) and the commit ([`crate::commit`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bd3lm_kvstore::Store;
use bd3lm_model::Bd3lm;
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorker;
use bd3lm_proto::v1::{DenoiseBlockRequest, DenoiseBlockResponse, InfoRequest, InfoResponse};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cache::{self, Found};
use crate::commit::{commit, committed_answer};
use crate::sessions::SessionCaches;
use crate::settings::WorkerSettings;

/// The loaded model and what identifies it.
pub struct Loaded {
    /// The network.
    pub model: Bd3lm,
    /// Model id used in store keys and blobs.
    pub model_id: String,
    /// Hash of the weights.
    pub fingerprint: String,
}

/// The worker's state, shared by its requests.
pub struct WorkerService {
    loaded: Arc<OnceLock<Arc<Loaded>>>,
    store: Store,
    sessions: Arc<SessionCaches>,
    permits: Arc<Semaphore>,
    capacity: u32,
    in_flight: Arc<AtomicUsize>,
    /// KV blobs refused (corrupt or of other weights) since start.
    rejected: AtomicU64,
}

/// A failure of the block's work: a fault of the request (its stored parameters or
/// tokens) is INVALID_ARGUMENT; a compute failure is INTERNAL, so the coordinator tries
/// another worker, and its detail stays in this worker's log.
fn work_status(e: bd3lm_diffusion::Error) -> Status {
    if e.is_request_fault() {
        return Status::invalid_argument(e.to_string());
    }
    if matches!(e, bd3lm_diffusion::Error::Cancelled) {
        tracing::info!("block cancelled: its request went away");
        return Status::cancelled("the block was cancelled");
    }
    tracing::error!(error = %e, "denoising failed");
    Status::internal("denoising failed on this worker")
}

impl WorkerService {
    /// A service that answers UNAVAILABLE until `loaded` is set.
    pub fn new(
        loaded: Arc<OnceLock<Arc<Loaded>>>,
        store: Store,
        settings: &WorkerSettings,
    ) -> Self {
        Self {
            loaded,
            store,
            sessions: Arc::new(SessionCaches::new(settings.cache_bytes)),
            permits: Arc::new(Semaphore::new(settings.capacity as usize)),
            capacity: settings.capacity,
            in_flight: Arc::default(),
            rejected: AtomicU64::new(0),
        }
    }

    fn loaded(&self) -> Result<Arc<Loaded>, Status> {
        self.loaded
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }

    /// Denoises and commits the requested block (see the service's documentation).
    async fn denoise(&self, req: DenoiseBlockRequest) -> Result<DenoiseBlockResponse, Status> {
        let loaded = self.loaded()?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "worker at capacity ({} blocks in flight)",
                self.capacity
            ))
        })?;
        let in_flight = InFlight::enter(&self.in_flight);
        if req.session_id.is_empty() {
            return Err(Status::invalid_argument("session_id: required"));
        }
        let bs = loaded.model.config().block_size;
        let block = req.block_index as usize;
        let record = self
            .store
            .get_session(&loaded.model_id, &req.session_id)
            .await?
            .ok_or_else(|| bd3lm_kvstore::Error::NoSession(req.session_id.clone()))?;
        if block < record.committed_blocks {
            return Ok(committed_answer(&record, block, bs));
        }
        if block > record.committed_blocks {
            return Err(Status::failed_precondition(format!(
                "block_index: {block} is past the next block {} of the session",
                record.committed_blocks
            )));
        }
        let started = Instant::now();
        let found = self.find_cache(&loaded, &record, block).await;
        let cache_time = started.elapsed();
        let (task_loaded, task_record) = (loaded.clone(), record.clone());
        let span = tracing::info_span!("denoise", block);
        // Dropping this request (the caller went away or timed out) stops the work at its
        // next step. The capacity and the in-flight count go with the work, so they are
        // free again only once the compute has stopped.
        let cancel = CancelOnDrop::default();
        let flag = cancel.0.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _held = (permit, in_flight);
            span.in_scope(|| crate::block::run(&task_loaded, &task_record, found, &flag))
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "denoising task failed");
            Status::internal("denoising failed on this worker")
        })?
        .map_err(work_status)?;
        commit(&self.store, &self.sessions, work, block, bs, cache_time).await
    }

    /// The session's cache: this worker's own when it ends where the record does, else
    /// the store's blobs, else nothing (rebuilt from tokens).
    async fn find_cache(
        &self,
        loaded: &crate::Loaded,
        record: &bd3lm_kvstore::SessionRecord,
        block: usize,
    ) -> Found {
        let bs = loaded.model.config().block_size;
        let held = self.sessions.take(&record.id).filter(|h| {
            h.committed == block * bs && record.tokens.starts_with(&h.tokens[..h.committed])
        });
        if let Some(held) = held {
            return Found::Memory(held);
        }
        if block == 0 {
            return Found::Nothing;
        }
        match cache::from_store(&self.store, loaded, record, block, &self.rejected).await {
            Some(c) => Found::Store(c),
            None => Found::Nothing,
        }
    }
}

#[tonic::async_trait]
impl DenoiseWorker for WorkerService {
    async fn denoise_block(
        &self,
        request: Request<DenoiseBlockRequest>,
    ) -> Result<Response<DenoiseBlockResponse>, Status> {
        let req = request.get_ref();
        let span = tracing::info_span!("denoise_block", session = %req.session_id, block = req.block_index);
        // A child of the coordinator's request span when it sent its trace context.
        bd3lm_telemetry::adopt(&span, request.metadata());
        self.denoise(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let loaded = self.loaded()?;
        let cfg = loaded.model.config();
        Ok(Response::new(InfoResponse {
            model_id: loaded.model_id.clone(),
            weights_fingerprint: loaded.fingerprint.clone(),
            block_size: cfg.block_size as u32,
            dtype: format!("{:?}", loaded.model.dtype()).to_lowercase(),
            capacity: self.capacity,
            in_flight: self.in_flight.load(Ordering::Relaxed) as u32,
            vocab_size: cfg.vocab_size as u32,
            mask_id: cfg.mask_id(),
            model_length: cfg.model_length as u32,
            kv_blobs_rejected: self.rejected.load(Ordering::Relaxed),
            cache_bytes: self.sessions.bytes() as u64,
        }))
    }
}

/// Counts a block in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises its flag when dropped: the request that owns it is gone.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_diffusion::{Filter, Sampler, SamplingParams};
    use bd3lm_kvstore::{SessionRecord, StoreConfig};
    use bd3lm_model::{Config, checkpoint};
    use candle_core::{DType, Device};

    fn loaded(fingerprint: &str) -> Arc<Loaded> {
        let cfg = Config::new(64, 32, 4, 2, 16, 16, 4);
        let model = checkpoint::random_model(&cfg, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
        Arc::new(Loaded {
            model,
            model_id: "m".into(),
            fingerprint: fingerprint.into(),
        })
    }

    fn service(loaded: Option<Arc<Loaded>>, store: &Store, capacity: u32) -> WorkerService {
        let cell = Arc::new(OnceLock::new());
        if let Some(l) = loaded {
            let _ = cell.set(l);
        }
        let settings = WorkerSettings {
            capacity,
            cache_bytes: 1 << 20,
        };
        WorkerService::new(cell, store.clone(), &settings)
    }

    async fn session(store: &Store, id: &str) {
        let record = SessionRecord {
            id: id.into(),
            model_id: "m".into(),
            tokens: vec![62, 1, 2, 3, 4, 5],
            prompt_len: 6,
            committed_blocks: 0,
            seed: 3,
            sampling: SamplingParams {
                sampler: Sampler::Ddpm,
                filter: Filter::default(),
                ..SamplingParams::new(4)
            },
            returned: 6,
        };
        store.create_session(&record).await.unwrap();
    }

    async fn block(
        service: &WorkerService,
        id: &str,
        index: u32,
    ) -> Result<DenoiseBlockResponse, Status> {
        let request = Request::new(DenoiseBlockRequest {
            session_id: id.into(),
            block_index: index,
        });
        service
            .denoise_block(request)
            .await
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn refuses_when_loading_or_full_and_names_what_is_wrong() {
        let store = Store::memory(StoreConfig::default());
        session(&store, "s").await;
        assert_eq!(
            block(&service(None, &store, 1), "s", 0)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            block(&service(Some(loaded("f")), &store, 0), "s", 0)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::ResourceExhausted
        );
        let worker = service(Some(loaded("f")), &store, 1);
        assert_eq!(
            block(&worker, "nope", 0).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            block(&worker, "s", 5).await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            block(&worker, "", 0).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// Prefill, then blocks from memory, from the store and rebuilt after corrupt blobs:
    /// the same tokens every way, a committed block answered as stored, rejections counted.
    #[tokio::test]
    async fn every_cache_source_gives_the_same_tokens() {
        let store = Store::memory(StoreConfig::default());
        session(&store, "a").await;
        let first = service(Some(loaded("f")), &store, 1);
        let prefill = block(&first, "a", 0).await.unwrap();
        assert_eq!(
            (prefill.token_ids, prefill.committed_blocks),
            (vec![62, 1, 2, 3], 1)
        );
        let again = block(&first, "a", 0).await.unwrap();
        assert!(again.already_committed);
        let memory = block(&first, "a", 1).await.unwrap();
        assert_eq!(
            (memory.cache_source.as_str(), &memory.token_ids[..2]),
            ("memory", &[4, 5][..])
        );

        session(&store, "b").await;
        block(&service(Some(loaded("f")), &store, 1), "b", 0)
            .await
            .unwrap();
        let from_store = block(&service(Some(loaded("f")), &store, 1), "b", 1)
            .await
            .unwrap();
        assert_eq!(from_store.cache_source, "store");
        assert_eq!(from_store.token_ids, memory.token_ids);

        session(&store, "c").await;
        block(&service(Some(loaded("other")), &store, 1), "c", 0)
            .await
            .unwrap();
        let fresh = service(Some(loaded("f")), &store, 1);
        let rebuilt = block(&fresh, "c", 1).await.unwrap();
        assert_eq!(rebuilt.cache_source, "rebuilt");
        assert_eq!(rebuilt.token_ids, memory.token_ids);
        let info = fresh
            .info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.kv_blobs_rejected, 1);
    }

    /// Only the request's own faults are client errors; a compute failure is INTERNAL
    /// (retried elsewhere by the coordinator) and keeps its detail out of the answer.
    #[test]
    fn work_failures_say_whose_fault_they_are() {
        let request = bd3lm_diffusion::Error::Param {
            name: "prompt",
            reason: "token id 70000 is outside the vocabulary".into(),
        };
        assert_eq!(work_status(request).code(), tonic::Code::InvalidArgument);
        let compute = bd3lm_diffusion::Error::Candle(candle_core::Error::Msg(
            "CUDA_ERROR_OUT_OF_MEMORY at 0x7f00".into(),
        ));
        let status = work_status(compute);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("0x7f00"));
    }

    /// A request dropped mid-block (its caller went away or timed out) stops the compute
    /// at the next step: nothing is committed, and the in-flight count and the capacity
    /// come back.
    #[tokio::test]
    async fn a_dropped_request_stops_its_block_and_frees_the_capacity() {
        // One block of 1024 positions, one position per pass: seconds of work to cut.
        let cfg = Config::new(64, 32, 4, 2, 16, 2048, 1024);
        let model = checkpoint::random_model(&cfg, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
        let loaded = Arc::new(Loaded {
            model,
            model_id: "m".into(),
            fingerprint: "f".into(),
        });
        let store = Store::memory(StoreConfig::default());
        let record = SessionRecord {
            id: "long".into(),
            model_id: "m".into(),
            tokens: vec![62],
            prompt_len: 1,
            committed_blocks: 0,
            seed: 1,
            sampling: SamplingParams::new(1024),
            returned: 1,
        };
        store.create_session(&record).await.unwrap();
        let worker = Arc::new(service(Some(loaded), &store, 1));
        let caller = worker.clone();
        let call = tokio::spawn(async move { block(&caller, "long", 0).await });
        while worker.in_flight.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        call.abort();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while worker.in_flight.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the block ran on");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(worker.permits.available_permits(), 1);
        let stored = store.get_session("m", "long").await.unwrap().unwrap();
        assert_eq!(
            stored.committed_blocks, 0,
            "the cancelled block was committed"
        );
    }
}
