//! The `DenoiseWorker` gRPC service.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bd3lm_diffusion::{Filter, Sampler, SamplingParams, Session};
use bd3lm_kvstore::{BlockBlob, CommitOutcome, SamplingRecord, SessionRecord, Store};
use bd3lm_model::{Bd3lm, KvCache};
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorker;
use bd3lm_proto::v1::{DenoiseBlockRequest, DenoiseBlockResponse, InfoRequest, InfoResponse};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::sessions::{Held, SessionCaches};

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
    capacity: usize,
    in_flight: Arc<AtomicUsize>,
    /// KV blobs refused (corrupt or of other weights) since start.
    rejected: Arc<std::sync::atomic::AtomicU64>,
}

/// Where the KV cache of a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheSource {
    Memory,
    Store,
    Rebuilt,
    Empty,
}

impl CacheSource {
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Store => "store",
            Self::Rebuilt => "rebuilt",
            Self::Empty => "empty",
        }
    }
}

/// The result of the blocking part of a request.
struct Work {
    held: Held,
    record: SessionRecord,
    blobs: Vec<(usize, Vec<u8>)>,
    first_block: usize,
    forward_passes: usize,
    steps: usize,
    denoise_ms: f64,
    commit_ms: f64,
}

impl WorkerService {
    /// A service that answers UNAVAILABLE until `loaded` is set.
    pub fn new(
        loaded: Arc<OnceLock<Arc<Loaded>>>,
        store: Store,
        capacity: usize,
        cache_bytes: usize,
    ) -> Self {
        Self {
            loaded,
            store,
            sessions: Arc::new(SessionCaches::new(cache_bytes)),
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            in_flight: Arc::default(),
            rejected: Arc::default(),
        }
    }

    fn loaded(&self) -> Result<Arc<Loaded>, Status> {
        self.loaded
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }

    /// Reads and checks the blobs of the live blocks before `block`; `None` on any miss,
    /// mismatch or corruption (logged; the cache is then rebuilt from tokens).
    async fn cache_from_store(
        &self,
        loaded: &Loaded,
        record: &SessionRecord,
        block: usize,
    ) -> Option<KvCache> {
        let cfg = loaded.model.config();
        let bs = cfg.block_size;
        let live = (block * bs).min(cfg.model_length - bs) / bs;
        let wanted: Vec<usize> = (block - live..block).collect();
        let blobs = match self
            .store
            .get_blobs(&loaded.model_id, &record.id, &wanted)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading KV blobs failed; rebuilding from tokens");
                return None;
            }
        };
        let mut payloads = Vec::with_capacity(blobs.len());
        for (index, bytes) in wanted.iter().zip(blobs) {
            let Some(bytes) = bytes else {
                tracing::info!(session = %record.id, block = index, "KV blob missing; rebuilding from tokens");
                return None;
            };
            match BlockBlob::decode(&bytes) {
                Ok(blob)
                    if blob.model_id == loaded.model_id
                        && blob.fingerprint == loaded.fingerprint
                        && blob.block_index == *index as u64 =>
                {
                    payloads.push(blob.payload)
                }
                Ok(blob) => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(session = %record.id, block = index, model = %blob.model_id, fingerprint = %blob.fingerprint, "KV blob of another model or block; rebuilding");
                    return None;
                }
                Err(e) => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(session = %record.id, block = index, error = %e, "corrupt KV blob; rebuilding");
                    return None;
                }
            }
        }
        let parts: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let cache = if parts.is_empty() {
            loaded.model.new_cache(1)
        } else {
            KvCache::import(&parts, loaded.model.device())
        };
        match cache {
            Ok(c) if c.next_position() == block * bs => Some(c),
            Ok(c) => {
                tracing::warn!(session = %record.id, end = c.next_position(), "KV blobs end at the wrong position; rebuilding");
                None
            }
            Err(e) => {
                tracing::warn!(session = %record.id, error = %e, "KV blob payload rejected; rebuilding");
                None
            }
        }
    }
}

/// The diffusion library's parameters from a stored record.
pub fn sampling_params(record: &SamplingRecord) -> Result<SamplingParams, Status> {
    let sampler = match record.sampler.as_str() {
        "ddpm" => Sampler::Ddpm,
        "first-hitting" => Sampler::FirstHitting,
        "confidence" => Sampler::Confidence {
            threshold: record.threshold,
        },
        other => {
            return Err(Status::invalid_argument(format!(
                "session has unknown sampler {other:?}"
            )));
        }
    };
    let params = SamplingParams {
        sampler,
        steps: record.steps,
        filter: Filter {
            temperature: record.temperature,
            top_k: record.top_k,
            top_p: record.top_p,
        },
        greedy: record.greedy,
        ..SamplingParams::new(record.steps.max(1))
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(params)
}

fn store_status(e: bd3lm_kvstore::Error) -> Status {
    match e {
        bd3lm_kvstore::Error::NoSession(id) => {
            Status::not_found(format!("session_id: no session {id}"))
        }
        bd3lm_kvstore::Error::Unavailable(m) => {
            Status::unavailable(format!("store unavailable: {m}"))
        }
        other => Status::internal(other.to_string()),
    }
}

/// The committed block `block` of `record`, as an answer.
fn committed_answer(record: &SessionRecord, block: usize, bs: usize) -> DenoiseBlockResponse {
    let end = ((block + 1) * bs).min(record.tokens.len());
    DenoiseBlockResponse {
        block_index: block as u32,
        token_ids: record.tokens[block * bs..end].to_vec(),
        committed_blocks: record.committed_blocks as u32,
        already_committed: true,
        cache_source: "none".into(),
        ..Default::default()
    }
}

/// Denoises (or prefills) the next block of `record` on its cache; CPU- or GPU-bound.
fn work(
    loaded: &Loaded,
    record: &SessionRecord,
    held: Option<Held>,
    from_store: Option<KvCache>,
) -> Result<(Work, CacheSource), Status> {
    let model = &loaded.model;
    let bs = model.config().block_size;
    let committed = record.committed_blocks * bs;
    let bad = |e: bd3lm_diffusion::Error| Status::invalid_argument(e.to_string());
    let (mut session, source) = match (held, from_store) {
        (Some(h), _) => (
            Session::with_cache(model, h.cache, &record.tokens, record.prompt_len, committed)
                .map_err(bad)?,
            CacheSource::Memory,
        ),
        (None, Some(cache)) if committed > 0 => (
            Session::with_cache(model, cache, &record.tokens, record.prompt_len, committed)
                .map_err(bad)?,
            CacheSource::Store,
        ),
        (None, _) if committed == 0 => (
            Session::resume(model, &record.tokens, record.prompt_len, 0).map_err(bad)?,
            CacheSource::Empty,
        ),
        (None, _) => (
            Session::resume(model, &record.tokens, record.prompt_len, committed).map_err(bad)?,
            CacheSource::Rebuilt,
        ),
    };
    let first_block = session.next_block_index();
    let started = Instant::now();
    let (blocks, forward_passes, steps, denoise_ms, commit_ms) =
        match session.prefill().map_err(bad)? {
            0 => {
                let params = sampling_params(&record.sampling)?;
                let report = session
                    .next_block(&params, record.seed, None)
                    .map_err(bad)?;
                (
                    1,
                    report.forward_passes,
                    report.steps,
                    ms(report.denoise),
                    ms(report.commit),
                )
            }
            n => (n, 0, 0, 0.0, ms(started.elapsed())),
        };
    let cache = session.cache();
    let mut blobs = Vec::new();
    for b in first_block..first_block + blocks {
        // Blocks that slid out during a long prefill are never needed again.
        if b * bs >= cache.first_position() {
            let payload = cache
                .export(b * bs, bs)
                .map_err(|e| Status::internal(e.to_string()))?;
            let blob = BlockBlob {
                model_id: loaded.model_id.clone(),
                fingerprint: loaded.fingerprint.clone(),
                block_index: b as u64,
                payload,
            };
            blobs.push((b, blob.encode()));
        }
    }
    let (tokens, _, committed, cache) = session.into_parts();
    let mut next = record.clone();
    next.tokens = tokens.clone();
    next.committed_blocks = committed / bs;
    let held = Held {
        tokens,
        committed,
        cache,
    };
    Ok((
        Work {
            held,
            record: next,
            blobs,
            first_block,
            forward_passes,
            steps,
            denoise_ms,
            commit_ms,
        },
        source,
    ))
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl WorkerService {
    /// Denoises and commits the requested block (see the service's documentation).
    async fn denoise(
        &self,
        req: DenoiseBlockRequest,
    ) -> Result<Response<DenoiseBlockResponse>, Status> {
        let loaded = self.loaded()?;
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "worker at capacity ({} blocks in flight)",
                self.capacity
            ))
        })?;
        let _in_flight = InFlight::enter(&self.in_flight);
        if req.session_id.is_empty() {
            return Err(Status::invalid_argument("session_id: required"));
        }
        let bs = loaded.model.config().block_size;
        let block = req.block_index as usize;
        let record = self
            .store
            .get_session(&loaded.model_id, &req.session_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!("session_id: no session {}", req.session_id))
            })?;
        if block < record.committed_blocks {
            return Ok(Response::new(committed_answer(&record, block, bs)));
        }
        if block > record.committed_blocks {
            return Err(Status::failed_precondition(format!(
                "block_index: {block} is past the next block {} of the session",
                record.committed_blocks
            )));
        }
        let started = Instant::now();
        let held = self.sessions.take(&record.id).filter(|h| {
            h.committed == block * bs && record.tokens.starts_with(&h.tokens[..h.committed])
        });
        let from_store = match (&held, block) {
            (None, b) if b > 0 => self.cache_from_store(&loaded, &record, b).await,
            _ => None,
        };
        let cache_ms = ms(started.elapsed());
        let task_loaded = loaded.clone();
        let task_record = record.clone();
        let span = tracing::info_span!("denoise", session = %record.id, block);
        let (work, source) = tokio::task::spawn_blocking(move || {
            span.in_scope(|| work(&task_loaded, &task_record, held, from_store))
        })
        .await
        .map_err(|e| Status::internal(format!("denoising task failed: {e}")))??;
        let commit_started = Instant::now();
        let outcome = self
            .store
            .commit(&work.record, record.committed_blocks, work.blobs)
            .await
            .map_err(store_status)?;
        let store_ms = ms(commit_started.elapsed());
        match outcome {
            CommitOutcome::Committed => {
                let end = work.record.committed_blocks * bs;
                let token_ids = work.record.tokens[work.first_block * bs..end].to_vec();
                let committed_blocks = work.record.committed_blocks as u32;
                self.sessions.put(record.id.clone(), work.held);
                tracing::debug!(
                    source = source.name(),
                    cache_ms,
                    denoise_ms = work.denoise_ms,
                    "block committed"
                );
                Ok(Response::new(DenoiseBlockResponse {
                    block_index: work.first_block as u32,
                    token_ids,
                    committed_blocks,
                    forward_passes: work.forward_passes as u32,
                    steps: work.steps as u32,
                    cache_ms,
                    denoise_ms: work.denoise_ms,
                    commit_ms: work.commit_ms + store_ms,
                    cache_source: source.name().into(),
                    already_committed: false,
                }))
            }
            CommitOutcome::Superseded(current) => {
                tracing::info!(session = %record.id, block, "block committed by another worker first");
                Ok(Response::new(committed_answer(&current, block, bs)))
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
        let span = tracing::info_span!("denoise_block", session = %req.session_id, block = req.block_index);
        // A child of the coordinator's request span when it sent its trace context.
        bd3lm_telemetry::adopt(&span, request.metadata());
        self.denoise(request.into_inner()).instrument(span).await
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let loaded = self.loaded()?;
        let cfg = loaded.model.config();
        Ok(Response::new(InfoResponse {
            model_id: loaded.model_id.clone(),
            weights_fingerprint: loaded.fingerprint.clone(),
            block_size: cfg.block_size as u32,
            dtype: format!("{:?}", loaded.model.dtype()).to_lowercase(),
            capacity: self.capacity as u32,
            in_flight: self.in_flight.load(Ordering::Relaxed) as u32,
            vocab_size: cfg.vocab_size as u32,
            mask_id: cfg.mask_id(),
            model_length: cfg.model_length as u32,
            kv_blobs_rejected: self.rejected.load(Ordering::Relaxed),
            cache_bytes: self.sessions.bytes() as u64,
        }))
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_kvstore::StoreConfig;
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

    fn service(loaded: Option<Arc<Loaded>>, store: &Store, capacity: usize) -> WorkerService {
        let cell = Arc::new(OnceLock::new());
        if let Some(l) = loaded {
            let _ = cell.set(l);
        }
        WorkerService::new(cell, store.clone(), capacity, 1 << 20)
    }

    async fn session(store: &Store, id: &str) {
        let record = SessionRecord {
            id: id.into(),
            model_id: "m".into(),
            tokens: vec![62, 1, 2, 3, 4, 5],
            prompt_len: 6,
            committed_blocks: 0,
            seed: 3,
            sampling: SamplingRecord {
                sampler: "ddpm".into(),
                steps: 4,
                threshold: 0.9,
                temperature: 1.0,
                top_p: 1.0,
                top_k: None,
                greedy: false,
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
}
