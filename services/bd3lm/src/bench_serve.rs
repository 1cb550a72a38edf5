//! `bd3lm bench serve`: the costs of serving blocks across workers: per-block latency
//! with the KV cache in the worker's memory, loaded from the store, or rebuilt from
//! tokens; KV blob encode/decode throughput; and the coordinator's overhead per block.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bd3lm_diffusion::SamplingParams;
use bd3lm_kvstore::{BlockBlob, SessionRecord, SessionStore, Stores};
use bd3lm_model::{Config, KvCache, checkpoint};
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorker;
use bd3lm_proto::v1::{DenoiseBlockRequest, GenerateRequest, TokenIds};
use bd3lm_worker::settings::dtype_name;
use bd3lm_worker::{LoadedModel, Precision, WorkerLimits, WorkerService};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// Latency of one block by where its cache came from.
#[derive(Debug, Serialize)]
struct CacheLatency {
    context: usize,
    source: &'static str,
    /// The KV caches' precision.
    kv_dtype: String,
    /// Milliseconds to have the cache ready.
    cache_ms: f64,
    /// Milliseconds of the whole block in the worker.
    block_ms: f64,
}

/// A random-weight model of shape `cfg` as a worker loads it: saved to a temporary
/// checkpoint and loaded back, so it has a fingerprint like any other.
pub async fn random_model(
    cfg: Config,
    precision: Precision,
    device: Device,
) -> anyhow::Result<Arc<LoadedModel>> {
    let dir = std::env::temp_dir().join(format!("bd3lm-bench-{}", std::process::id()));
    let weights = checkpoint::random_weights(&cfg, 0.02, 0)?;
    checkpoint::save(&dir, &cfg, &weights, precision.compute)?;
    let loaded = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || bd3lm_worker::load(&dir, Some("bench"), precision, &device)
    })
    .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Arc::new(loaded?))
}

/// Runs the benchmark on the random-weight tiny model (block size 4) on the CPU, its KV
/// caches in `kv_dtype`; one JSON line per figure.
pub async fn run(
    stores: Stores,
    kv_dtype: DType,
    contexts: &[usize],
    reps: usize,
) -> anyhow::Result<()> {
    let store = stores.sessions.clone();
    let precision = Precision {
        compute: DType::F32,
        kv: kv_dtype,
    };
    let loaded = random_model(Config::tiny(4), precision, Device::Cpu).await?;
    store.ping().await.context("the store does not answer")?;
    for &context in contexts {
        for source in ["memory", "store", "rebuilt"] {
            let mut cache_ms = 0.0;
            let mut block_ms = 0.0;
            for rep in 0..reps {
                let (c, b) = block_latency(&loaded, &store, context, source, rep).await?;
                cache_ms += c;
                block_ms += b;
            }
            let line = CacheLatency {
                context,
                source,
                kv_dtype: dtype_name(kv_dtype),
                cache_ms: cache_ms / reps as f64,
                block_ms: block_ms / reps as f64,
            };
            println!("{}", serde_json::to_string(&line)?);
        }
    }
    blob_throughput(&loaded)?;
    coordinator_overhead(loaded.clone(), stores).await?;
    Ok(())
}

fn worker(loaded: &Arc<LoadedModel>, store: &SessionStore) -> WorkerService {
    let cell = Arc::new(bd3lm_worker::Models::fixed(loaded.clone()));
    let limits = WorkerLimits {
        max_batch: 1,
        ..WorkerLimits::default()
    };
    WorkerService::new(cell, store.clone(), limits)
}

/// A new session with a `context`-token prompt, prefilled by a first worker whose cache
/// then stays in its memory. Returns the worker and the session id.
async fn prefilled(
    loaded: &Arc<LoadedModel>,
    store: &SessionStore,
    context: usize,
    rep: usize,
) -> anyhow::Result<(WorkerService, String)> {
    let vocab = loaded.model.config().vocab_size as u32;
    let id = format!("{:032x}", rand::random::<u128>());
    let record = SessionRecord {
        id: id.clone(),
        model_id: loaded.model_id.clone(),
        tokens: (0..context as u32)
            .map(|i| (i * 7919 + rep as u32) % (vocab - 2))
            .collect(),
        prompt_len: context,
        committed_blocks: 0,
        seed: rep as u64,
        sampling: SamplingParams::new(4),
        returned: context,
        version: 0,
        owner: None,
        model_version: None,
    };
    store.create_session(&record).await?;
    let first = worker(loaded, store);
    first
        .denoise_block(tonic::Request::new(DenoiseBlockRequest {
            session_id: id.clone(),
            block_index: 0,
            ..Default::default()
        }))
        .await?;
    Ok((first, id))
}

/// Cache and block milliseconds of the block after a `context`-token prompt, with the
/// cache in memory, loaded from the store's blobs, or rebuilt (blobs of other weights).
async fn block_latency(
    loaded: &Arc<LoadedModel>,
    store: &SessionStore,
    context: usize,
    source: &str,
    rep: usize,
) -> anyhow::Result<(f64, f64)> {
    let (first, id) = prefilled(loaded, store, context, rep).await?;
    let serving = match source {
        "memory" => first,
        "store" => worker(loaded, store),
        _ => {
            let other = LoadedModel {
                model: clone_model(loaded)?,
                model_id: loaded.model_id.clone(),
                fingerprint: "other-weights".into(),
                version: None,
            };
            worker(&Arc::new(other), store)
        }
    };
    let started = Instant::now();
    let answer = serving
        .denoise_block(tonic::Request::new(DenoiseBlockRequest {
            session_id: id,
            block_index: (context / 4) as u32,
            ..Default::default()
        }))
        .await?
        .into_inner();
    anyhow::ensure!(
        answer.cache_source == source,
        "expected a {source} cache, got {}",
        answer.cache_source
    );
    Ok((answer.cache_ms, started.elapsed().as_secs_f64() * 1e3))
}

/// The same network again (a worker with another fingerprint needs its own `LoadedModel`).
fn clone_model(loaded: &LoadedModel) -> anyhow::Result<bd3lm_model::Bd3lm> {
    let model = &loaded.model;
    let cfg = model.config().clone();
    let copy = checkpoint::random_model(&cfg, 0.02, 0, model.dtype(), model.device())?;
    Ok(copy.with_kv_dtype(model.kv_dtype())?)
}

/// GB/s of turning a full window's KV cache into per-block blobs and back.
fn blob_throughput(loaded: &LoadedModel) -> anyhow::Result<()> {
    let model = &loaded.model;
    let cfg = model.config();
    let mut cache = model.new_cache(1)?;
    let ids: Vec<u32> = (0..cfg.model_length as u32).map(|i| i % 50000).collect();
    let zero = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    model.commit(
        &Tensor::from_vec(ids, (1, cfg.model_length), &Device::Cpu)?,
        &zero,
        &mut cache,
    )?;
    let bs = cfg.block_size;
    let first = cache.first_position();
    let blocks = cache.len() / bs;
    let started = Instant::now();
    let mut blobs = Vec::with_capacity(blocks);
    for b in 0..blocks {
        let payload = cache.export(first + b * bs, bs)?;
        blobs.push(
            BlockBlob {
                model_id: "bench".into(),
                fingerprint: "x".into(),
                block_index: b as u64,
                prefix_hash: 0,
                payload,
            }
            .encode(),
        );
    }
    let encode = started.elapsed();
    let bytes: usize = blobs.iter().map(Vec::len).sum();
    let started = Instant::now();
    let payloads = blobs
        .into_iter()
        .map(|b| BlockBlob::decode(b).map(|b| b.payload))
        .collect::<Result<Vec<_>, _>>()?;
    let parts: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let rebuilt = KvCache::import(&parts, &Device::Cpu)?;
    let decode = started.elapsed();
    anyhow::ensure!(rebuilt.len() == cache.len());
    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "{}",
        serde_json::json!({
            "kv_dtype": dtype_name(model.kv_dtype()),
            "kv_blob_bytes": bytes,
            "blocks": blocks,
            "kv_blob_bytes_per_token": bytes / (blocks * bs),
            "encode_gb_per_s": gbps(encode),
            "decode_gb_per_s": gbps(decode),
        })
    );
    Ok(())
}

/// Milliseconds per block between the coordinator's request and the worker's answer,
/// beyond the worker's own time: gRPC, routing, the session record. Measured with a
/// worker call per block (`--max-run-blocks 1`): in a run the worker denoises a block
/// while the coordinator handles the one before, which hides this time.
async fn coordinator_overhead(loaded: Arc<LoadedModel>, stores: Stores) -> anyhow::Result<()> {
    let settings = bd3lm_coordinator::CoordinatorSettings {
        max_run_blocks: 1,
        ..bd3lm_coordinator::CoordinatorSettings::default()
    };
    let limits = WorkerLimits::default();
    let mut client = crate::bench_load::one_worker_with(loaded.clone(), limits, stores, settings)
        .await?
        .client;
    let vocab = loaded.model.config().vocab_size as u32;
    let request = GenerateRequest {
        prompt: Some(bd3lm_proto::v1::generate_request::Prompt::TokenIds(
            TokenIds {
                ids: vec![vocab - 2],
            },
        )),
        max_new_tokens: 256,
        seed: Some(1),
        ..Default::default()
    };
    let answer = client.generate(request).await?.into_inner();
    let blocks = &answer.blocks;
    let overhead: f64 = blocks
        .iter()
        .map(|b| b.total_ms - b.cache_ms - b.denoise_ms - b.commit_ms)
        .sum::<f64>()
        / blocks.len() as f64;
    let total: f64 = blocks.iter().map(|b| b.total_ms).sum::<f64>() / blocks.len() as f64;
    println!(
        "{}",
        serde_json::json!({"blocks": blocks.len(), "block_total_ms": total, "coordinator_overhead_ms": overhead})
    );
    Ok(())
}
