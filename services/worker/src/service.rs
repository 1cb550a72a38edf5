//! The `DenoiseWorker` gRPC surface: admission within the worker's capacity, the
//! session's record, its cache (see [`crate::cache`]), the session opened on a blocking
//! thread ([`crate::block`]), its block denoised in the running batch
//! ([`crate::scheduler`]) and the commit ([`crate::commit`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bd3lm_kvstore::record::short_id;
use bd3lm_kvstore::{PrefixScope, SessionStore};
use bd3lm_model::{Bd3lm, KvCache, SharedKv};
use bd3lm_proto::status::from_store;
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorker;
use bd3lm_proto::v1::{
    DenoiseBlockRequest, DenoiseBlockResponse, InfoRequest, InfoResponse, PersistKvRequest,
    PersistKvResponse, RunControl, RunEvent, run_control, run_event,
};
use bd3lm_telemetry::probes::LIVENESS;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tracing::Instrument;

use crate::block::{self, Prepared, SharedBlocks, Writes};
use crate::cache::{self, CacheLookup, CacheSource, PromptLookup};
use crate::commit::{BlockCommit, commit, committed_answer};
use crate::metrics;
use crate::models::Models;
use crate::prefix::PrefixCache;
use crate::run::{Caller, Gone, RunSpec};
use crate::scheduler::{Park, PendingBlock, Scheduler};
use crate::sessions::{SessionCaches, SessionState};
use crate::settings::WorkerLimits;

/// The loaded model and what identifies it.
pub struct LoadedModel {
    /// The network.
    pub model: Bd3lm,
    /// Model id used in store keys and blobs.
    pub model_id: String,
    /// Hash of the weights.
    pub fingerprint: String,
    /// Its version in the registry (`None`: a checkpoint directory).
    pub version: Option<u64>,
}

impl LoadedModel {
    /// Whose shared prompt blocks in the store this model state's are.
    pub fn prefix_scope(&self) -> PrefixScope<'_> {
        PrefixScope {
            model: &self.model_id,
            fingerprint: &self.fingerprint,
        }
    }
}

/// The worker's state, shared by its requests (a clone shares it).
#[derive(Clone)]
pub struct WorkerService {
    models: Arc<Models>,
    store: SessionStore,
    sessions: Arc<SessionCaches>,
    /// The shared prompt prefixes (`None`: --prefix-cache false).
    prefix: Option<Arc<PrefixCache>>,
    permits: Arc<Semaphore>,
    limits: WorkerLimits,
    in_flight: Arc<AtomicUsize>,
    /// KV blobs refused (corrupt or of other weights) since start.
    rejected: Arc<AtomicU64>,
    /// Where liveness is reported: a worker without its batch thread is restarted.
    liveness: Option<HealthReporter>,
    /// This process's id in `Info`, drawn at start.
    id: String,
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
    internal()
}

fn internal() -> Status {
    Status::internal("denoising failed on this worker")
}

/// A block's hold on the worker's capacity, released when its work ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlight,
}

impl WorkerService {
    /// A service over `models`: UNAVAILABLE until one is loaded.
    pub fn new(models: Arc<Models>, store: SessionStore, limits: WorkerLimits) -> Self {
        Self {
            models,
            store,
            sessions: Arc::new(SessionCaches::new(limits.cache_bytes)),
            prefix: (limits.prefix_bytes > 0)
                .then(|| Arc::new(PrefixCache::new(limits.prefix_bytes))),
            permits: Arc::new(Semaphore::new(limits.max_batch)),
            limits,
            in_flight: Arc::default(),
            rejected: Arc::default(),
            liveness: None,
            id: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// Reports liveness to `reporter`.
    pub fn with_liveness(self, reporter: HealthReporter) -> Self {
        Self {
            liveness: Some(reporter),
            ..self
        }
    }

    /// The batch thread is gone: every block would fail here, so liveness fails too.
    async fn batch_thread_lost(&self) -> Status {
        tracing::error!("the batch thread has stopped; reporting not live");
        if let Some(reporter) = &self.liveness {
            reporter
                .set_service_status(LIVENESS, tonic_health::ServingStatus::NotServing)
                .await;
        }
        internal()
    }

    fn loading() -> Status {
        Status::unavailable("the model is still loading")
    }

    fn slot(&self) -> Result<Slot, Status> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            bd3lm_telemetry::metrics::refused("worker_capacity");
            Status::resource_exhausted(format!(
                "worker at capacity ({} blocks in flight)",
                self.limits.max_batch
            ))
        })?;
        Ok(Slot {
            _permit: permit,
            _in_flight: InFlight::enter(&self.in_flight),
        })
    }

    /// Denoises and commits the blocks of `spec`, each sent to `caller` once committed
    /// (see the service's documentation).
    async fn run<C>(&self, spec: RunSpec, mut caller: Caller<C>) -> Result<(), Status>
    where
        C: Stream<Item = Result<RunControl, Status>> + Unpin,
    {
        let latest = self.models.latest().ok_or_else(Self::loading)?;
        let slot = self.slot()?;
        if !bd3lm_kvstore::record::is_session_id(&spec.session_id) {
            return Err(Status::invalid_argument(
                "session_id: must be 32 lowercase hex digits",
            ));
        }
        // Versions of one model share its id, vocabulary and block size.
        let bs = latest.loaded.model.config().block_size;
        let block = spec.first_block;
        let mut record = self.record(&latest.loaded, &spec.session_id, bs).await?;
        if block < record.committed_blocks {
            let _ = caller.send(committed_answer(&record, block, bs)?);
            return Ok(());
        }
        if block > record.committed_blocks {
            return Err(Status::failed_precondition(format!(
                "block_index: {block} is past the next block {} of the session",
                record.committed_blocks
            )));
        }
        let served = self
            .models
            .for_session(record.model_version)
            .ok_or_else(Self::loading)?;
        let loaded = served.loaded.clone();
        if record.model_version.is_some() && record.model_version != loaded.version {
            tracing::info!(from = ?record.model_version, to = ?loaded.version, "session moved to another model version");
            metrics::session_moved();
        }
        record.model_version = loaded.version;
        let mut at = BlockCommit {
            block,
            base: record.base(),
            block_size: bs,
            cache_time: Duration::ZERO,
        };
        let started = Instant::now();
        let PromptLookup { lookup, stored } = self.find_cache(&loaded, &record, block).await;
        let (task_loaded, task_record) = (loaded.clone(), record.clone());
        let span = tracing::info_span!("open_session", block);
        let write_blobs = spec.write_blobs;
        let writes = Writes {
            store: write_blobs,
            prefix: self.prefix.is_some(),
            prefix_in_store: spec.share_in_store,
        };
        // Opening the session (a rebuild from tokens, a prefill) is compute: on a blocking
        // thread, beside the batch rather than in it. The slot goes with the compute.
        let opening = tokio::task::spawn_blocking(move || {
            let prepared = span
                .in_scope(|| block::prepare(&task_loaded, &task_record, lookup, writes, &stored));
            (prepared, slot)
        });
        let Ok(opened) = caller.wait(opening, None).await else {
            return Ok(());
        };
        let (prepared, slot) = opened.map_err(|e| {
            tracing::error!(error = %e, "opening the session failed");
            internal()
        })?;
        at.cache_time = started.elapsed();
        let park = self.parker(&spec.session_id, &loaded);
        let mut sharing = None;
        let (state, source, mut prefilled) = match prepared.map_err(work_status)? {
            Prepared::Prefilled(mut work, mut state) => {
                sharing = self.share(&loaded, work.shared.take(), &mut state, &spec);
                (state, CacheSource::Memory, Some(*work))
            }
            Prepared::Ready(state, source) => (state, source, None),
        };
        let first = prefilled
            .as_ref()
            .map_or(block, |w| w.record.committed_blocks);
        let bounds = spec.bounds(caller.end());
        let (reply, mut works) = mpsc::unbounded_channel();
        if first >= bounds.end.load(std::sync::atomic::Ordering::Acquire) {
            // The prompt's blocks reach the run's end: they are the whole run.
            park(state);
            if let Some(work) = prefilled.as_mut() {
                work.ends_run = true;
            }
        } else {
            let record = prefilled.as_ref().map_or(record, |w| w.record.clone());
            let pending = PendingBlock {
                record,
                state,
                source,
                run: bounds,
                reply,
                park,
                slot: Box::new(slot),
                span: tracing::Span::current(),
                write_blobs,
            };
            let submitted = served.scheduler(self.limits).map(|s| s.submit(pending));
            if !matches!(submitted, Some(Ok(()))) {
                return Err(self.batch_thread_lost().await);
            }
        }
        let batch = served.started().map(Scheduler::stats);
        let mut next = prefilled;
        loop {
            let work = match next.take() {
                Some(work) => work,
                None => match caller.wait(works.recv(), batch).await {
                    Ok(Some(work)) => work.map_err(work_status)?,
                    // Only a batch thread that died drops its blocks' replies.
                    Ok(None) => return Err(self.batch_thread_lost().await),
                    Err(Gone) => return Ok(()),
                },
            };
            if caller
                .granted(work.effort.first_block, batch)
                .await
                .is_err()
            {
                return Ok(());
            }
            let ends = work.ends_run || caller.ends_with(work.effort.first_block);
            let answer = commit(&self.store, work, &mut at).await?;
            // With blobs written as blocks go, so are the shared ones: by the first answer.
            if let Some(write) = sharing.take().filter(|_| spec.write_blobs) {
                let _ = write.await;
            }
            let ends = ends || answer.already_committed;
            if caller.send(answer).is_err() || ends {
                return Ok(());
            }
        }
    }

    /// Shares the prompt blocks a new session (now at `state`) computed: into the prefix
    /// cache, and when `spec` lets KV into the store, into the store's shared blocks
    /// (best effort: a failed write is logged and counted, and the blocks are computed
    /// again elsewhere). The store's write, when there is one.
    fn share(
        &self,
        loaded: &Arc<LoadedModel>,
        shared: Option<SharedBlocks>,
        state: &mut SessionState,
        spec: &RunSpec,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (prefix, shared) = (self.prefix.as_ref()?, shared?);
        let SharedBlocks {
            addresses,
            kv,
            blobs,
        } = shared;
        if let Some(kv) = kv {
            keep_run(prefix, &loaded.fingerprint, &addresses, kv, state);
        }
        if !spec.share_in_store || blobs.is_empty() {
            return None;
        }
        Some(self.write_shared(loaded, addresses, blobs))
    }

    /// Writes the blobs of a prompt's computed blocks (of the prompt whose whole blocks
    /// have `addresses`) to the store's shared blocks, beside the run.
    fn write_shared(
        &self,
        loaded: &Arc<LoadedModel>,
        addresses: Vec<u64>,
        blobs: Vec<(usize, Vec<u8>)>,
    ) -> tokio::task::JoinHandle<()> {
        let (store, loaded) = (self.store.clone(), loaded.clone());
        let write = async move {
            let scope = loaded.prefix_scope();
            let bytes = blobs.iter().map(|(_, b)| b.len()).sum();
            match store.put_prefix_blobs(scope, &addresses, blobs).await {
                Ok(()) => metrics::blob_written(bytes),
                Err(e) => {
                    tracing::warn!(error = %e, "writing shared prompt blocks to the store failed");
                    metrics::shared_write_failed();
                }
            }
        };
        tokio::spawn(write.in_current_span())
    }

    /// The record of `session`, checked against itself.
    async fn record(
        &self,
        loaded: &LoadedModel,
        session: &str,
        block_size: usize,
    ) -> Result<bd3lm_kvstore::SessionRecord, Status> {
        let record = self
            .store
            .get_session(&loaded.model_id, session)
            .await
            .map_err(from_store)?
            .ok_or_else(|| from_store(bd3lm_kvstore::Error::NoSession(session.to_string())))?;
        if record.tokens.len() < record.committed_blocks * block_size {
            tracing::error!(
                committed = record.committed_blocks,
                tokens = record.tokens.len(),
                "the stored session holds fewer tokens than its committed blocks"
            );
            return Err(Status::data_loss(
                "session_id: the stored session is inconsistent",
            ));
        }
        Ok(record)
    }

    /// Where the state of `session` on `loaded` goes when it leaves the batch: this
    /// worker's memory, for its next block.
    fn parker(&self, session: &str, loaded: &LoadedModel) -> Park {
        let (sessions, key) = (self.sessions.clone(), cache_key(session, loaded));
        Box::new(move |state| sessions.put(key, state))
    }

    /// The session's cache: this worker's own when it ends where the record does, else
    /// the store's blobs, else nothing (rebuilt from tokens); for a new session, its
    /// prompt's shared blocks (with those the store holds).
    async fn find_cache(
        &self,
        loaded: &crate::LoadedModel,
        record: &bd3lm_kvstore::SessionRecord,
        block: usize,
    ) -> PromptLookup {
        let found = |lookup| PromptLookup {
            lookup,
            stored: Vec::new(),
        };
        let bs = loaded.model.config().block_size;
        let state = self
            .sessions
            .take(&cache_key(&record.id, loaded))
            .filter(|h| {
                h.committed == block * bs && record.tokens.starts_with(&h.tokens[..h.committed])
            });
        if let Some(state) = state {
            metrics::cache_lookup("memory");
            return found(CacheLookup::Memory(state));
        }
        if block == 0 {
            let Some(prefix) = self.prefix.as_deref() else {
                return found(CacheLookup::Nothing);
            };
            let prompt = cache::find_prefix(prefix, &self.store, loaded, record, &self.rejected);
            return prompt.await;
        }
        match cache::read_store(&self.store, loaded, record, block, &self.rejected).await {
            Some(blobs) => found(CacheLookup::Store(blobs)),
            None => {
                metrics::cache_lookup("miss");
                found(CacheLookup::Nothing)
            }
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
        let span = tracing::info_span!("denoise_block", session = %short_id(&req.session_id), block = req.block_index);
        // A child of the coordinator's request span when it sent its trace context.
        bd3lm_telemetry::adopt(&span, request.metadata());
        let spec = RunSpec::one_block(request.into_inner())?;
        let (events, mut answers) = mpsc::unbounded_channel();
        let caller = Caller::new(&spec, tokio_stream::pending(), events);
        self.run(spec, caller).instrument(span).await?;
        match answers.recv().await {
            Some(Ok(RunEvent {
                event: Some(run_event::Event::Block(answer)),
            })) => Ok(Response::new(answer)),
            _ => Err(internal()),
        }
    }

    type DenoiseRunStream = UnboundedReceiverStream<Result<RunEvent, Status>>;

    async fn denoise_run(
        &self,
        request: Request<Streaming<RunControl>>,
    ) -> Result<Response<Self::DenoiseRunStream>, Status> {
        let span = tracing::info_span!(
            "denoise_run",
            session = tracing::field::Empty,
            block = tracing::field::Empty
        );
        bd3lm_telemetry::adopt(&span, request.metadata());
        let mut controls = request.into_inner();
        let start = match controls.message().await? {
            Some(RunControl {
                control: Some(run_control::Control::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "start: a run begins with its start",
                ));
            }
        };
        span.record("session", short_id(&start.session_id).to_string());
        span.record("block", start.first_block);
        let spec = RunSpec::from_wire(start)?;
        let (events, stream) = mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            let caller = Caller::new(&spec, controls, events.clone());
            if let Err(status) = this.run(spec, caller).instrument(span).await {
                let _ = events.send(Err(status));
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(stream)))
    }

    async fn persist_kv(
        &self,
        request: Request<PersistKvRequest>,
    ) -> Result<Response<PersistKvResponse>, Status> {
        let req = request.get_ref();
        let span = tracing::info_span!("persist_kv", session = %short_id(&req.session_id));
        bd3lm_telemetry::adopt(&span, request.metadata());
        crate::persist::persist_kv(
            &self.store,
            &self.models,
            &self.sessions,
            request.into_inner(),
            self.prefix.is_some(),
        )
        .instrument(span)
        .await
        .map(Response::new)
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let latest = self.models.latest().ok_or_else(Self::loading)?;
        let loaded = &latest.loaded;
        let cfg = loaded.model.config();
        let in_flight = self.in_flight.load(Ordering::Relaxed) as u32;
        let (mut batch_size, mut passes, mut batched, mut micros) = (0, 0, 0, 0);
        for served in self.models.all() {
            if let Some(s) = served.started() {
                let stats = s.stats();
                batch_size += stats.batch_size.load(Ordering::Relaxed);
                passes += stats.passes.load(Ordering::Relaxed);
                batched += stats.batched_blocks.load(Ordering::Relaxed);
                micros += stats.pass_micros.load(Ordering::Relaxed);
            }
        }
        Ok(Response::new(InfoResponse {
            model_id: loaded.model_id.clone(),
            weights_fingerprint: loaded.fingerprint.clone(),
            block_size: cfg.block_size as u32,
            dtype: crate::settings::dtype_name(loaded.model.dtype()),
            kv_dtype: crate::settings::dtype_name(loaded.model.kv_dtype()),
            capacity: self.limits.max_batch as u32,
            in_flight,
            batch_size: batch_size as u32,
            waiting: in_flight.saturating_sub(batch_size as u32),
            denoise_passes: passes,
            batched_blocks: batched,
            denoise_pass_seconds: micros as f64 / 1e6,
            max_batch_rows: self.limits.max_rows as u32,
            kv_budget_bytes: self.limits.kv_budget,
            vocab_size: cfg.vocab_size as u32,
            mask_id: cfg.mask_id(),
            model_length: cfg.model_length as u32,
            kv_blobs_rejected: self.rejected.load(Ordering::Relaxed),
            cache_bytes: self.sessions.bytes() as u64,
            prefix_cache_bytes: self.prefix.as_ref().map_or(0, |p| p.bytes() as u64),
            worker_id: self.id.clone(),
            model_version: loaded.version,
            loaded_versions: self.models.versions(),
        }))
    }
}

/// The key of a session's cache in memory: per weights, so a session that moves to
/// another version never picks up state computed with the old one.
pub(crate) fn cache_key(session: &str, loaded: &LoadedModel) -> String {
    format!("{session}@{}", loaded.fingerprint)
}

/// Keeps `kv`, a new session's run (the session at `state`), in `prefix`; unless sessions
/// of its prompt that began together each computed (or read) it: the first to get here
/// keeps its run, and the others take that one, letting theirs go.
fn keep_run(
    prefix: &PrefixCache,
    fingerprint: &str,
    addresses: &[u64],
    kv: Arc<SharedKv>,
    state: &mut SessionState,
) {
    let bs = kv.block_size();
    let same = prefix.longest(fingerprint, addresses);
    let Some((_, held)) = same.filter(|(end, _)| end * bs == kv.end()) else {
        prefix.insert(fingerprint, addresses, kv);
        return;
    };
    match KvCache::on_shared(held, state.cache.next_position()) {
        Ok(cache) => state.cache = cache,
        Err(e) => tracing::error!(error = %e, "a held run does not fit its session"),
    }
}

/// Counts a block in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::in_flight(1.0);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::in_flight(-1.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bd3lm_diffusion::{Filter, Sampler, SamplingParams};
    use bd3lm_kvstore::{SessionRecord, StoreConfig};
    use bd3lm_model::{Backbone, Config, Shape, checkpoint};
    use bd3lm_proto::v1::KvPersistence;
    use candle_core::{DType, Device};

    /// The session id of a test's session `name`: its bytes in hex, zero-padded.
    fn sid(name: &str) -> String {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{hex:0>32}")
    }

    /// A toy model with weights of scale 0.1 and the given fingerprint.
    pub(crate) fn loaded(fingerprint: &str) -> Arc<LoadedModel> {
        loaded_in(fingerprint, DType::F32)
    }

    /// [`loaded`] with its KV caches in `kv_dtype`.
    fn loaded_in(fingerprint: &str, kv_dtype: DType) -> Arc<LoadedModel> {
        random_loaded(&toy_config(), 0.1, fingerprint, kv_dtype)
    }

    fn toy_config() -> Config {
        Config::new(Shape {
            vocab_size: 64,
            model_length: 16,
            block_size: 4,
            backbone: Backbone::TOY,
        })
    }

    /// A random model of shape `cfg` (weights drawn with scale `std`) with its KV caches
    /// in `kv_dtype`, as loaded.
    pub(crate) fn random_loaded(
        cfg: &Config,
        std: f64,
        fingerprint: &str,
        kv_dtype: DType,
    ) -> Arc<LoadedModel> {
        let model = checkpoint::random_model(cfg, std, 1, DType::F32, &Device::Cpu)
            .unwrap()
            .with_kv_dtype(kv_dtype)
            .unwrap();
        Arc::new(LoadedModel {
            model,
            model_id: "m".into(),
            fingerprint: fingerprint.into(),
            version: None,
        })
    }

    /// A worker of `loaded` taking `capacity` blocks, without the prefix cache: sessions
    /// keep their own blobs (the shared ones have tests of their own).
    fn service(
        loaded: Option<Arc<LoadedModel>>,
        store: &SessionStore,
        capacity: usize,
    ) -> WorkerService {
        let models = Arc::new(match loaded {
            Some(l) => Models::fixed(l),
            None => Models::loading(),
        });
        let limits = WorkerLimits {
            max_batch: capacity,
            cache_bytes: 1 << 20,
            prefix_bytes: 0,
            ..WorkerLimits::default()
        };
        WorkerService::new(models, store.clone(), limits)
    }

    async fn session(store: &SessionStore, id: &str) {
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
            version: 0,
            owner: None,
            model_version: None,
        };
        store.create_session(&record).await.unwrap();
    }

    async fn block(
        service: &WorkerService,
        id: &str,
        index: u32,
    ) -> Result<DenoiseBlockResponse, Status> {
        block_as(service, id, index, KvPersistence::Unspecified).await
    }

    /// Block `index` of session `id`, its blobs written as `persistence` says.
    async fn block_as(
        service: &WorkerService,
        id: &str,
        index: u32,
        persistence: KvPersistence,
    ) -> Result<DenoiseBlockResponse, Status> {
        let request = Request::new(DenoiseBlockRequest {
            session_id: id.into(),
            block_index: index,
            kv_persistence: persistence as i32,
        });
        service
            .denoise_block(request)
            .await
            .map(Response::into_inner)
    }

    /// The blocks a PersistKv call of `worker` for session `id` at `committed` wrote.
    async fn persist(worker: &WorkerService, id: &str, committed: u32) -> u32 {
        let request = Request::new(PersistKvRequest {
            session_id: id.into(),
            committed_blocks: committed,
        });
        let answer = worker.persist_kv(request).await.unwrap();
        answer.into_inner().blocks_written
    }

    /// Blocks written under each KV persistence, then block 2 on a fresh worker: every
    /// block writes its blob; at-end writes none until PersistKv, which writes the window
    /// only from the worker holding the session at the stored block count; never writes
    /// none. The fresh worker reads the store or rebuilds, with the same tokens.
    #[tokio::test]
    async fn blobs_follow_the_kv_persistence() {
        let store = SessionStore::memory(StoreConfig::default());
        let mut third_blocks = Vec::new();
        for (name, persistence) in [
            ("every", KvPersistence::EveryBlock),
            ("end", KvPersistence::AtEnd),
            ("never", KvPersistence::Never),
        ] {
            let id = sid(name);
            session(&store, &id).await;
            let first = service(Some(loaded("f")), &store, 1);
            for b in 0..2 {
                block_as(&first, &id, b, persistence).await.unwrap();
            }
            let blobs = store.get_blobs("m", &id, &[0, 1]).await.unwrap();
            let written = persistence == KvPersistence::EveryBlock;
            assert!(blobs.iter().all(|b| b.is_some() == written), "{name}");
            let fresh = service(Some(loaded("f")), &store, 1);
            if persistence == KvPersistence::AtEnd {
                assert_eq!(persist(&fresh, &id, 2).await, 0, "not held");
                assert_eq!(persist(&first, &id, 1).await, 0, "stale count");
                assert_eq!(persist(&first, &id, 2).await, 2);
                let blobs = store.get_blobs("m", &id, &[0, 1]).await.unwrap();
                assert!(blobs.iter().all(Option::is_some));
            }
            let third = block_as(&fresh, &id, 2, persistence).await.unwrap();
            let source = if persistence == KvPersistence::Never {
                "rebuilt"
            } else {
                "store"
            };
            assert_eq!(third.cache_source, source, "{name}");
            third_blocks.push(third.token_ids);
        }
        assert!(third_blocks.windows(2).all(|w| w[0] == w[1]));
        let unknown = Request::new(DenoiseBlockRequest {
            session_id: sid("every"),
            block_index: 3,
            kv_persistence: 9,
        });
        let status = service(Some(loaded("f")), &store, 1)
            .denoise_block(unknown)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("kv_persistence"));
    }

    #[tokio::test]
    async fn refuses_when_loading_or_full_and_names_what_is_wrong() {
        let store = SessionStore::memory(StoreConfig::default());
        session(&store, &sid("s")).await;
        assert_eq!(
            block(&service(None, &store, 1), &sid("s"), 0)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            block(&service(Some(loaded("f")), &store, 0), &sid("s"), 0)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::ResourceExhausted
        );
        let worker = service(Some(loaded("f")), &store, 1);
        assert_eq!(
            block(&worker, &sid("nope"), 0).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            block(&worker, &sid("s"), 5).await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        for bad in ["", "S", "../../etc", &sid("zz").to_uppercase()] {
            assert_eq!(
                block(&worker, bad, 0).await.unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    /// A session keeps the version it began on after a new one is added, while new
    /// sessions get the new one; once its version is retired it moves to the latest, its
    /// KV state rebuilt (the old version's blobs refused), and its record says so.
    #[tokio::test]
    async fn sessions_stay_on_their_version_until_it_is_retired() {
        let store = SessionStore::memory(StoreConfig::default());
        let version = |v: u64| {
            let mut l = loaded(&format!("f{v}"));
            Arc::get_mut(&mut l).unwrap().version = Some(v);
            l
        };
        let models = Arc::new(Models::fixed(version(1)));
        let limits = WorkerLimits {
            max_batch: 2,
            cache_bytes: 1 << 20,
            ..WorkerLimits::default()
        };
        let worker = WorkerService::new(models.clone(), store.clone(), limits);
        session(&store, &sid("old")).await;
        assert_eq!(
            block(&worker, &sid("old"), 0).await.unwrap().model_version,
            Some(1)
        );
        models.add(version(2));
        let on_old = block(&worker, &sid("old"), 1).await.unwrap();
        assert_eq!(
            (on_old.model_version, on_old.cache_source.as_str()),
            (Some(1), "memory")
        );
        session(&store, &sid("new")).await;
        assert_eq!(
            block(&worker, &sid("new"), 0).await.unwrap().model_version,
            Some(2)
        );
        let info = worker
            .info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (info.model_version, info.loaded_versions),
            (Some(2), vec![1, 2])
        );

        let retire = crate::Rollout {
            grace: std::time::Duration::ZERO,
            idle: std::time::Duration::ZERO,
        };
        assert_eq!(models.retire(retire), 1);
        let moved = block(&worker, &sid("old"), 2).await.unwrap();
        assert_eq!(
            (moved.model_version, moved.cache_source.as_str()),
            (Some(2), "rebuilt")
        );
        let record = store.get_session("m", &sid("old")).await.unwrap().unwrap();
        assert_eq!(
            (record.model_version, record.committed_blocks),
            (Some(2), 3)
        );
        assert_eq!(
            block(&worker, &sid("old"), 1).await.unwrap().model_version,
            Some(2)
        );
    }

    /// Prefill, then blocks from memory, from the store and rebuilt after corrupt blobs:
    /// the same tokens every way, a committed block answered as stored, rejections counted.
    #[tokio::test]
    async fn every_cache_source_gives_the_same_tokens() {
        let mut blob_bytes = Vec::new();
        for kv in [DType::F32, DType::BF16, DType::F16] {
            blob_bytes.push(cache_sources_agree(kv).await);
        }
        // The keys and values of a block are half the bytes in bf16 and f16, the rest of
        // the blob (headers, names, checksums) the same.
        let cfg = toy_config();
        let f32_data = 2 * cfg.n_blocks * cfg.block_size * cfg.hidden_dim * 4;
        assert_eq!(blob_bytes[0] - blob_bytes[1], f32_data / 2);
        assert_eq!(blob_bytes[1], blob_bytes[2]);
    }

    /// Memory, the store's blobs and a rebuild give a session the same tokens with KV
    /// caches in `kv`; a blob of another precision is a miss. Returns a blob's bytes.
    async fn cache_sources_agree(kv: DType) -> usize {
        let store = SessionStore::memory(StoreConfig::default());
        session(&store, &sid("a")).await;
        let first = service(Some(loaded_in("f", kv)), &store, 1);
        let prefill = block(&first, &sid("a"), 0).await.unwrap();
        assert_eq!(
            (prefill.token_ids, prefill.committed_blocks),
            (vec![62, 1, 2, 3], 1)
        );
        let again = block(&first, &sid("a"), 0).await.unwrap();
        assert!(again.already_committed);
        let memory = block(&first, &sid("a"), 1).await.unwrap();
        assert_eq!(
            (memory.cache_source.as_str(), &memory.token_ids[..2]),
            ("memory", &[4, 5][..])
        );

        session(&store, &sid("b")).await;
        block(&service(Some(loaded_in("f", kv)), &store, 1), &sid("b"), 0)
            .await
            .unwrap();
        let from_store = block(&service(Some(loaded_in("f", kv)), &store, 1), &sid("b"), 1)
            .await
            .unwrap();
        assert_eq!(from_store.cache_source, "store", "{kv:?}");
        assert_eq!(from_store.token_ids, memory.token_ids, "{kv:?}");

        // Written by a worker of other weights, and by one of another precision that
        // (wrongly) claims the same fingerprint: both rebuilt.
        let other_precision = if kv == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        for (id, writer) in [
            ("c", loaded_in("other", kv)),
            ("d", loaded_in("f", other_precision)),
        ] {
            session(&store, &sid(id)).await;
            block(&service(Some(writer), &store, 1), &sid(id), 0)
                .await
                .unwrap();
            let fresh = service(Some(loaded_in("f", kv)), &store, 1);
            let rebuilt = block(&fresh, &sid(id), 1).await.unwrap();
            assert_eq!(rebuilt.cache_source, "rebuilt", "{kv:?}, session {id}");
            assert_eq!(rebuilt.token_ids, memory.token_ids, "{kv:?}, session {id}");
            let info = fresh
                .info(Request::new(InfoRequest {}))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.kv_blobs_rejected, 1);
            assert_eq!(info.kv_dtype, crate::settings::dtype_name(kv));
        }
        let blob = store.get_blobs("m", &sid("b"), &[0]).await.unwrap();
        blob[0].as_ref().expect("block 0's blob").len()
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
        let loaded = random_loaded(
            &Config::new(Shape {
                vocab_size: 64,
                model_length: 2048,
                block_size: 1024,
                backbone: Backbone::TOY,
            }),
            0.1,
            "f",
            DType::F32,
        );
        let store = SessionStore::memory(StoreConfig::default());
        let record = SessionRecord {
            id: sid("long"),
            model_id: "m".into(),
            tokens: vec![62],
            prompt_len: 1,
            committed_blocks: 0,
            seed: 1,
            sampling: SamplingParams::new(1024),
            returned: 1,
            version: 0,
            owner: None,
            model_version: None,
        };
        store.create_session(&record).await.unwrap();
        let worker = Arc::new(service(Some(loaded), &store, 1));
        let caller = worker.clone();
        let call = tokio::spawn(async move { block(&caller, &sid("long"), 0).await });
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
        let passes = info(&worker).await.denoise_passes;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(info(&worker).await.denoise_passes, passes, "passes went on");
        let stored = store.get_session("m", &sid("long")).await.unwrap().unwrap();
        assert_eq!(
            stored.committed_blocks, 0,
            "the cancelled block was committed"
        );
    }

    /// A run of session `id` to block `end_block` on `worker`, every block granted until
    /// `take` blocks came; then the caller goes. The blocks it got, and whether the run
    /// ended on its own first.
    async fn run_until(
        worker: &Arc<WorkerService>,
        (id, end_block): (&str, usize),
        (stop_tokens, stop_from): (Vec<u32>, usize),
        take: usize,
    ) -> (Vec<DenoiseBlockResponse>, bool) {
        let spec = RunSpec {
            session_id: id.into(),
            first_block: 0,
            end_block,
            write_blobs: true,
            share_in_store: true,
            stop_tokens,
            stop_from,
            heartbeat: Some(std::time::Duration::from_millis(50)),
        };
        let (controls, rx) = mpsc::channel(4);
        let (events, mut out) = mpsc::unbounded_channel();
        let caller = Caller::new(
            &spec,
            tokio_stream::wrappers::ReceiverStream::new(rx),
            events,
        );
        let runner = worker.clone();
        let run = tokio::spawn(async move { runner.run(spec, caller).await });
        let mut blocks = Vec::new();
        let ended = loop {
            // Bounds a stall only: a run that neither sends nor ends.
            let next = tokio::time::timeout(std::time::Duration::from_secs(60), out.recv());
            let event = match next.await.expect("the run neither sent nor ended") {
                Some(event) => event.unwrap().event,
                None => break true,
            };
            let Some(run_event::Event::Block(block)) = event else {
                continue;
            };
            let next = block.committed_blocks;
            blocks.push(block);
            if blocks.len() == take {
                break false;
            }
            let grant = bd3lm_proto::v1::RunGrant {
                commit_below: next + 1,
                last: false,
            };
            let control = RunControl {
                control: Some(run_control::Control::Grant(grant)),
            };
            let _ = controls.send(Ok(control)).await;
        };
        drop((controls, out));
        run.await.unwrap().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while worker.in_flight.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the run's block ran on");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        (blocks, ended)
    }

    /// A run commits only the blocks its caller granted: the caller going after the
    /// 10th leaves 10 committed (the 11th, begun at once, is dropped), with the tokens
    /// block-by-block calls give, and the session's state kept for its next block. A
    /// stop token ends a run on the worker with the block that holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_commits_what_was_granted_and_ends_at_a_stop_token() {
        let store = SessionStore::memory(StoreConfig::default());
        for name in ["one", "run", "stop"] {
            session(&store, &sid(name)).await;
        }
        let worker = Arc::new(service(Some(loaded("f")), &store, 2));
        for b in 0..12 {
            block(&worker, &sid("one"), b).await.unwrap();
        }
        let reference = store.get_session("m", &sid("one")).await.unwrap().unwrap();

        let (blocks, ended) = run_until(&worker, (&sid("run"), 64), (Vec::new(), 0), 10).await;
        assert!(!ended);
        let indices: Vec<u32> = blocks.iter().map(|b| b.block_index).collect();
        assert_eq!(indices, (0..10).collect::<Vec<u32>>());
        let stored = store.get_session("m", &sid("run")).await.unwrap().unwrap();
        assert_eq!(stored.committed_blocks, 10, "a block past the grants");
        assert_eq!(stored.tokens[..], reference.tokens[..40]);
        let next = block(&worker, &sid("run"), 10).await.unwrap();
        assert_eq!(next.cache_source, "memory");
        assert_eq!(next.token_ids[..], reference.tokens[40..44]);

        // The first generated token (from position 6) of block 3 or later not seen
        // before it ends the run there.
        let stop = (12..44)
            .map(|p| reference.tokens[p])
            .find(|t| !reference.tokens[6..12].contains(t))
            .expect("a new token");
        let first = (6..).find(|&p| reference.tokens[p] == stop).unwrap();
        let (blocks, ended) = run_until(&worker, (&sid("stop"), 64), (vec![stop], 6), 64).await;
        assert!(ended);
        assert_eq!(blocks.last().unwrap().block_index as usize, first / 4);
        let stored = store.get_session("m", &sid("stop")).await.unwrap().unwrap();
        assert_eq!(stored.committed_blocks, first / 4 + 1);

        // A new session whose prompt's blocks reach the run's end: they are the run.
        let mut long = stored.clone();
        (long.id, long.committed_blocks, long.version) = (sid("long"), 0, 0);
        long.tokens.truncate(14);
        (long.prompt_len, long.returned) = (14, 14);
        store.create_session(&long).await.unwrap();
        let (blocks, ended) = run_until(&worker, (&sid("long"), 2), (Vec::new(), 0), 64).await;
        assert!(ended, "the run went on past its end");
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].committed_blocks, 3);
    }

    /// A new session of `tokens` (all prompt) with `seed`, as `session` makes them.
    async fn session_of(store: &SessionStore, id: &str, tokens: &[u32], seed: u64) {
        owned_session(store, id, tokens, seed, None).await
    }

    /// [`session_of`], of API key `owner`.
    async fn owned_session(
        store: &SessionStore,
        id: &str,
        tokens: &[u32],
        seed: u64,
        owner: Option<&str>,
    ) {
        let record = SessionRecord {
            id: id.into(),
            model_id: "m".into(),
            tokens: tokens.to_vec(),
            prompt_len: tokens.len(),
            committed_blocks: 0,
            seed,
            sampling: SamplingParams {
                sampler: Sampler::Ddpm,
                filter: Filter::default(),
                ..SamplingParams::new(4)
            },
            returned: tokens.len(),
            version: 0,
            owner: owner.map(str::to_string),
            model_version: None,
        };
        store.create_session(&record).await.unwrap();
    }

    /// Session `id`'s prompt blocks, then 3 blocks, on `worker`: the first answer, and
    /// the session's tokens.
    async fn prompt_and_blocks(
        worker: &WorkerService,
        store: &SessionStore,
        id: &str,
    ) -> (DenoiseBlockResponse, Vec<u32>) {
        prompt_and_blocks_as(worker, store, id, KvPersistence::Unspecified).await
    }

    /// [`prompt_and_blocks`], its blobs written as `persistence` says.
    async fn prompt_and_blocks_as(
        worker: &WorkerService,
        store: &SessionStore,
        id: &str,
        persistence: KvPersistence,
    ) -> (DenoiseBlockResponse, Vec<u32>) {
        let first = block_as(worker, id, 0, persistence).await.unwrap();
        for b in first.committed_blocks..first.committed_blocks + 3 {
            block_as(worker, id, b, persistence).await.unwrap();
        }
        let stored = store.get_session("m", id).await.unwrap().unwrap();
        (first, stored.tokens)
    }

    /// 16 sessions sharing a 512-token prompt, each with its own seed: with the prefix
    /// cache, each after the first takes the prompt's 128 blocks from it and gets the
    /// tokens it gets without. A prompt that differs in its 301st token takes only the
    /// 75 blocks before; new sessions on another model version take none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_prompt_prefix_gives_the_tokens_of_its_computation() {
        let prompt: Vec<u32> = (0..512).map(|i| (i * 7 % 60 + 1) as u32).collect();
        let store = SessionStore::memory(StoreConfig::default());
        let cfg = long_window();
        let version = |fingerprint: &str, v: u64| {
            let mut l = random_loaded(&cfg, 0.1, fingerprint, DType::F32);
            Arc::get_mut(&mut l).unwrap().version = Some(v);
            l
        };
        let models = Arc::new(Models::fixed(version("f", 1)));
        let (on, off) = (
            sharing_worker(&models, &store, 1 << 24),
            sharing_worker(&models, &store, 0),
        );
        for seed in 0..16 {
            let (a, b) = (sid(&format!("on{seed}")), sid(&format!("off{seed}")));
            session_of(&store, &a, &prompt, seed).await;
            session_of(&store, &b, &prompt, seed).await;
            let (first, with) = prompt_and_blocks(&on, &store, &a).await;
            let (plain, without) = prompt_and_blocks(&off, &store, &b).await;
            assert_eq!(with, without, "seed {seed}");
            let reused = if seed == 0 { 0 } else { 128 };
            assert_eq!(first.prefix_blocks, reused, "seed {seed}");
            assert_eq!((plain.prefix_blocks, first.committed_blocks), (0, 128));
        }
        let mut other = prompt.clone();
        other[300] = 61;
        session_of(&store, &sid("on-other"), &other, 1).await;
        session_of(&store, &sid("off-other"), &other, 1).await;
        let (first, with) = prompt_and_blocks(&on, &store, &sid("on-other")).await;
        let (_, without) = prompt_and_blocks(&off, &store, &sid("off-other")).await;
        assert_eq!(
            (first.prefix_blocks, first.cache_source.as_str()),
            (75, "prefix")
        );
        assert_eq!(with, without);

        models.add(version("f2", 2));
        session_of(&store, &sid("v2"), &prompt, 1).await;
        let (first, _) = prompt_and_blocks(&on, &store, &sid("v2")).await;
        assert_eq!((first.prefix_blocks, first.model_version), (0, Some(2)));
    }

    /// The toy shape with a window of 1,020 tokens: every prompt block stays live.
    fn long_window() -> Config {
        Config::new(Shape {
            vocab_size: 64,
            model_length: 1024,
            block_size: 4,
            backbone: Backbone::TOY,
        })
    }

    /// One model state of the [`long_window`] shape, random weights.
    fn long_window_models() -> Arc<Models> {
        let loaded = random_loaded(&long_window(), 0.1, "f", DType::F32);
        Arc::new(Models::fixed(loaded))
    }

    /// A worker with its own prefix cache of `models`, on `store`.
    fn sharing_worker(
        models: &Arc<Models>,
        store: &SessionStore,
        prefix_bytes: usize,
    ) -> WorkerService {
        let limits = WorkerLimits {
            max_batch: 2,
            cache_bytes: 1 << 24,
            prefix_bytes,
            ..WorkerLimits::default()
        };
        WorkerService::new(models.clone(), store.clone(), limits)
    }

    /// Prompt blocks one worker computed are in the store by its first answer, and
    /// another worker takes them from there with the tokens of computing them, then from
    /// its own prefix cache; never for another API key, nor when the first session kept
    /// its KV out of the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_worker_takes_a_computed_prompt_from_the_store() {
        let prompt: Vec<u32> = (0..96).map(|i| (i * 5 % 60 + 1) as u32).collect();
        let store = SessionStore::memory(StoreConfig::default());
        let models = long_window_models();
        let (a, b, off) = (
            sharing_worker(&models, &store, 1 << 24),
            sharing_worker(&models, &store, 1 << 24),
            sharing_worker(&models, &store, 0),
        );
        let run = |worker, name: &str, owner, persistence| {
            let (store, prompt, id) = (store.clone(), prompt.clone(), sid(name));
            async move {
                owned_session(&store, &id, &prompt, 1, owner).await;
                prompt_and_blocks_as(worker, &store, &id, persistence).await
            }
        };
        let every = KvPersistence::EveryBlock;
        let (first, _) = run(&a, "a", None, every).await;
        assert_eq!(first.prefix_blocks, 0);
        // The session wrote no copies of its prompt's blocks: they are the store's
        // shared ones, from which, with its own, another worker continues it.
        let own = store.get_blobs("m", &sid("a"), &[0, 23, 24]).await.unwrap();
        assert_eq!(
            own.iter().map(Option::is_some).collect::<Vec<_>>(),
            [false, false, true]
        );
        let moved = block_as(&b, &sid("a"), 27, every).await.unwrap();
        assert_eq!(moved.cache_source, "store");
        let (computed, tokens) = run(&off, "off", None, every).await;
        let stayed = block_as(&off, &sid("off"), 27, every).await.unwrap();
        assert_eq!(moved.token_ids, stayed.token_ids);
        let (first, reused) = run(&b, "b", None, every).await;
        assert_eq!(
            (first.prefix_blocks, first.cache_source.as_str()),
            (24, "prefix")
        );
        assert_eq!((reused, computed.prefix_blocks), (tokens, 0));
        let (first, _) = run(&b, "b-again", None, every).await;
        assert_eq!(first.prefix_blocks, 24, "from b's own cache now");
        let (first, _) = run(&b, "other-key", Some("k2"), every).await;
        assert_eq!(first.prefix_blocks, 0, "another key's blocks are its own");

        let never = KvPersistence::Never;
        let (first, _) = run(&a, "k3-a", Some("k3"), never).await;
        assert_eq!(first.prefix_blocks, 0);
        let (first, _) = run(&b, "k3-b", Some("k3"), never).await;
        assert_eq!(first.prefix_blocks, 0, "kept out of the store");
    }

    /// At-end persistence puts a session's shared prompt blocks in the store's shared
    /// blocks, not under its own keys, so sessions of one prompt store it once; another
    /// worker continues a session from the two with the tokens of the worker holding it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_end_persistence_stores_a_shared_prompt_once() {
        let prompt: Vec<u32> = (0..96).map(|i| (i * 3 % 60 + 1) as u32).collect();
        let store = SessionStore::memory(StoreConfig::default());
        let models = long_window_models();
        let (holder, fresh) = (
            sharing_worker(&models, &store, 1 << 24),
            sharing_worker(&models, &store, 1 << 24),
        );
        let end = KvPersistence::AtEnd;
        for name in ["x", "y"] {
            let id = sid(name);
            session_of(&store, &id, &prompt, 1).await;
            prompt_and_blocks_as(&holder, &store, &id, end).await;
            assert_eq!(persist(&holder, &id, 27).await, 27, "the window, 27 blocks");
            let own = store.get_blobs("m", &id, &[0, 23, 24, 26]).await.unwrap();
            assert_eq!(
                own.iter().map(Option::is_some).collect::<Vec<_>>(),
                [false, false, true, true],
                "{name}: the prompt's 24 blocks are shared, the generated its own"
            );
        }
        let moved = block_as(&fresh, &sid("x"), 27, end).await.unwrap();
        assert_eq!(moved.cache_source, "store");
        let stayed = block_as(&holder, &sid("y"), 27, end).await.unwrap();
        assert_eq!(stayed.cache_source, "memory");
        assert_eq!(moved.token_ids, stayed.token_ids);
    }

    /// Sessions of one prompt hold its keys and values once (each session's own memory
    /// is its generated blocks), and the shared run stays while any session holds it,
    /// even past the prefix budget, and is freed once the last one has left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_prompt_blocks_are_held_once_and_freed_with_their_last_session() {
        let store = SessionStore::memory(StoreConfig::default());
        let cfg = long_window();
        let loaded = random_loaded(&cfg, 0.1, "f", DType::F32);
        let models = Arc::new(Models::fixed(loaded.clone()));
        // One run of a 512-token prompt's keys and values fits the prefix budget.
        let run = 2 * cfg.n_blocks * cfg.n_heads * 512 * cfg.head_dim() * 4;
        let worker = sharing_worker(&models, &store, run);
        let prompt = |first: u32| -> Vec<u32> {
            (0..512)
                .map(|i| {
                    if i == 0 {
                        first
                    } else {
                        (i * 7 % 60 + 1) as u32
                    }
                })
                .collect()
        };
        let prefix = worker.prefix.clone().unwrap();
        // Kept out of the store: what is found is in the worker's memory.
        let never = KvPersistence::Never;
        let mut reused = Vec::new();
        for seed in 0..4 {
            session_of(&store, &sid(&format!("a{seed}")), &prompt(1), seed).await;
            let (first, _) =
                prompt_and_blocks_as(&worker, &store, &sid(&format!("a{seed}")), never).await;
            reused.push(first.prefix_blocks);
        }
        assert_eq!(reused, [0, 128, 128, 128]);
        assert_eq!(prefix.bytes(), run, "held once");
        assert!(
            worker.sessions.bytes() < run,
            "the sessions' own blocks only"
        );

        // Another prompt's run: both are held, so both stay, past the budget.
        session_of(&store, &sid("b"), &prompt(2), 0).await;
        prompt_and_blocks_as(&worker, &store, &sid("b"), never).await;
        assert_eq!(prefix.bytes(), 2 * run);
        // The first prompt's sessions leave the worker's memory: its run goes.
        for seed in 0..4 {
            worker
                .sessions
                .take(&cache_key(&sid(&format!("a{seed}")), &loaded));
        }
        session_of(&store, &sid("a-again"), &prompt(1), 9).await;
        let (first, _) = prompt_and_blocks_as(&worker, &store, &sid("a-again"), never).await;
        assert_eq!(first.prefix_blocks, 0, "freed");
        assert_eq!(prefix.bytes(), 2 * run);
    }

    /// Sessions of one prompt that computed it at once (each before the other shared it)
    /// end up on one run: the second to share takes the first's and lets its own go.
    #[tokio::test]
    async fn sessions_that_computed_one_prompt_at_once_keep_one_run() {
        let store = SessionStore::memory(StoreConfig::default());
        let loaded = random_loaded(&long_window(), 0.1, "f", DType::F32);
        let worker = sharing_worker(&Arc::new(Models::fixed(loaded.clone())), &store, 1 << 24);
        let prompt: Vec<u32> = (0..64).map(|i| (i * 3 % 60 + 1) as u32).collect();
        let writes = Writes {
            store: false,
            prefix: true,
            prefix_in_store: false,
        };
        let mut states = Vec::new();
        for (seed, name) in ["x", "y"].into_iter().enumerate() {
            session_of(&store, &sid(name), &prompt, seed as u64).await;
            let record = store.get_session("m", &sid(name)).await.unwrap().unwrap();
            let prepared = block::prepare(&loaded, &record, CacheLookup::Nothing, writes, &[]);
            let Ok(Prepared::Prefilled(mut work, state)) = prepared else {
                panic!("the prompt's blocks are committed");
            };
            states.push((work.shared.take(), state));
        }
        let spec = RunSpec::one_block(DenoiseBlockRequest {
            session_id: sid("x"),
            kv_persistence: KvPersistence::Never.into(),
            ..Default::default()
        })
        .unwrap();
        let mut runs = Vec::new();
        for (shared, mut state) in states {
            assert!(worker.share(&loaded, shared, &mut state, &spec).is_none());
            runs.push(state.cache.shared().unwrap().clone());
        }
        assert!(Arc::ptr_eq(&runs[0], &runs[1]));
        assert_eq!(worker.prefix.as_ref().unwrap().bytes(), runs[0].bytes());
    }

    /// A stored record that went backwards (fewer tokens than its committed blocks say)
    /// is DATA_LOSS, not a panic.
    #[tokio::test]
    async fn a_record_that_went_backwards_is_data_loss_not_a_panic() {
        let store = SessionStore::memory(StoreConfig::default());
        session(&store, &sid("s")).await;
        let mut record = store.get_session("m", &sid("s")).await.unwrap().unwrap();
        record.committed_blocks = 3;
        let base = record.base();
        store.update_session(&record, base).await.unwrap();
        let worker = service(Some(loaded("f")), &store, 1);
        let status = block(&worker, &sid("s"), 2).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert!(status.message().starts_with("session_id"));
    }

    async fn info(worker: &WorkerService) -> InfoResponse {
        worker
            .info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    /// Sessions with different samplers, step counts, prompts and seeds, started at
    /// different times so that they join and leave a running batch, get exactly the
    /// tokens each gets alone from the unbatched sampler.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batched_blocks_get_the_tokens_they_get_alone() {
        let loaded = random_loaded(
            &Config::new(Shape {
                vocab_size: 64,
                model_length: 32,
                block_size: 8,
                backbone: Backbone::TOY,
            }),
            0.3,
            "f",
            DType::F32,
        );
        let store = SessionStore::memory(StoreConfig::default());
        let samplers = [
            Sampler::Ddpm,
            Sampler::FirstHitting,
            Sampler::Confidence { threshold: 0.3 },
        ];
        let records: Vec<SessionRecord> = (0..9)
            .map(|i| SessionRecord {
                id: sid(&format!("s{i}")),
                model_id: "m".into(),
                tokens: (1..3 + i as u32 * 2).collect(),
                prompt_len: 2 + i * 2,
                committed_blocks: 0,
                seed: 100 + i as u64,
                sampling: SamplingParams {
                    sampler: samplers[i % 3],
                    steps: 2 + i % 4 * 2,
                    filter: Filter::default(),
                    greedy: false,
                },
                returned: 0,
                version: 0,
                owner: None,
                model_version: None,
            })
            .collect();
        for r in &records {
            store.create_session(r).await.unwrap();
        }
        let worker = Arc::new(service(Some(loaded.clone()), &store, 9));
        let blocks = 6;
        let runs: Vec<_> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (worker, id) = (worker.clone(), r.id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(3 * i as u64)).await;
                    for b in 0..blocks {
                        block(&worker, &id, b).await.unwrap();
                    }
                })
            })
            .collect();
        for run in runs {
            run.await.unwrap();
        }
        for r in &records {
            let stored = store.get_session("m", &r.id).await.unwrap().unwrap();
            let mut alone = bd3lm_diffusion::Session::start(&loaded.model, &r.tokens).unwrap();
            while alone.next_block_index() < blocks as usize {
                alone.next_block(&r.sampling, r.seed, None).unwrap();
            }
            assert_eq!(stored.tokens, alone.tokens(), "session {}", r.id);
        }
        let info = info(&worker).await;
        assert!(
            info.batched_blocks > info.denoise_passes,
            "never batched: {} blocks in {} passes",
            info.batched_blocks,
            info.denoise_passes
        );
        assert_eq!((info.in_flight, info.batch_size), (0, 0));
    }
}
