//! `bd3lm bench serve --concurrency 1,8,32`: the system under load. One worker and the
//! coordinator in this process, real gRPC over loopback, the sessions in memory or in
//! Redis (`--redis`, `--redis-cluster`); after one unmeasured stream, at
//! each concurrency that many streams generate at once, and the client measures what a
//! user sees.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bd3lm_coordinator::{CoordinatorSettings, Pool, WorkerSource};
use bd3lm_kvstore::Stores;
use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GenerateRequest, InfoRequest, TokenIds};
use bd3lm_telemetry::probes::Ports;
use bd3lm_worker::{LoadedModel, WorkerLimits};
use serde::Serialize;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

/// What one concurrency level gave.
#[derive(Debug, Serialize)]
struct LoadFigures {
    model: String,
    /// Where the sessions live: `memory` or `redis`.
    store: &'static str,
    device: String,
    dtype: String,
    concurrency: usize,
    /// Most blocks per worker call (the coordinator's --max-run-blocks).
    max_run_blocks: u32,
    /// The worker's batch limit (sessions).
    max_batch: usize,
    tokens: usize,
    wall_s: f64,
    /// Generated tokens per second, all streams together.
    tokens_per_s: f64,
    /// Milliseconds between a stream's consecutive blocks, as the client sees them.
    block_ms_p50: f64,
    block_ms_p99: f64,
    /// Milliseconds from a request to its first block.
    first_block_ms_p50: f64,
    first_block_ms_p99: f64,
    /// Milliseconds a block waited for a worker slot at the coordinator, on average.
    queue_ms_mean: f64,
    /// Blocks per batched pass, on average (the worker's count).
    batch_size_mean: f64,
    /// Milliseconds per batched pass, on average.
    pass_ms_mean: f64,
    /// Beyond the first level (one stream): the pass's fixed cost F and its cost per
    /// block V (from this level's and the first level's passes), the speedup over the
    /// first level in tokens/s, the bound the pass costs allow at this concurrency
    /// N(F+V)/(F+NV), and the share of it reached.
    pass_model: Option<PassModel>,
    /// Of the tokens of the seeds the previous level also ran, the share that came out
    /// identical though batched with other streams (absent at the first level).
    same_tokens_as_previous_level: Option<f64>,
}

/// The pass costs of a level against the first, and what they allow.
#[derive(Debug, Clone, Copy, Serialize)]
struct PassModel {
    fixed_ms: f64,
    per_block_ms: f64,
    speedup: f64,
    bound: f64,
    of_bound: f64,
}

/// The mean pass and tokens/s of a level.
#[derive(Debug, Clone, Copy)]
struct Level {
    concurrency: usize,
    blocks_per_pass: f64,
    pass_ms: f64,
    tokens_per_s: f64,
}

impl PassModel {
    /// From the first level (one stream) and `level`; none when their batches do not
    /// differ enough to tell F from V.
    fn fit(first: Level, level: Level) -> Option<Self> {
        let spread = level.blocks_per_pass - first.blocks_per_pass;
        if spread < 0.5 {
            return None;
        }
        let per_block_ms = (level.pass_ms - first.pass_ms) / spread;
        let fixed_ms = first.pass_ms - first.blocks_per_pass * per_block_ms;
        let n = level.concurrency as f64;
        let bound = n * (fixed_ms + per_block_ms) / (fixed_ms + n * per_block_ms);
        let speedup = level.tokens_per_s / first.tokens_per_s;
        Some(Self {
            fixed_ms,
            per_block_ms,
            speedup,
            bound,
            of_bound: speedup / bound,
        })
    }
}

/// One stream's view: the gaps between its blocks, its first block's delay, its queue
/// times and its tokens.
#[derive(Default)]
struct StreamTimes {
    gaps_ms: Vec<f64>,
    first_ms: f64,
    /// Milliseconds to the first message holding new tokens (a prompt's blocks come
    /// before it without any).
    first_token_ms: f64,
    queue_ms: Vec<f64>,
    tokens: Vec<u32>,
}

/// The load a run puts on the system.
pub struct Load {
    /// Streams at once, level after level.
    pub levels: Vec<usize>,
    /// New tokens per stream.
    pub tokens: u32,
    /// The coordinator's `--max-run-blocks`.
    pub max_run_blocks: u32,
}

/// Serves `loaded` from one worker with `limits` behind the coordinator, its sessions in
/// `stores`, then runs the streams of `load` level after level; one JSON line per level.
pub async fn run(
    loaded: Arc<LoadedModel>,
    name: &str,
    limits: WorkerLimits,
    stores: Stores,
    load: Load,
) -> anyhow::Result<()> {
    let Load {
        levels,
        tokens,
        max_run_blocks,
    } = load;
    let store = if stores.sessions.is_memory() {
        "memory"
    } else {
        "redis"
    };
    let coordinator = CoordinatorSettings {
        max_queue: usize::MAX,
        max_run_blocks,
        ..CoordinatorSettings::default()
    };
    let bench = one_worker_with(loaded.clone(), limits, stores, coordinator).await?;
    let mut worker =
        DenoiseWorkerClient::connect(format!("http://{}", bench.worker_addrs[0])).await?;
    let bos = loaded.model.config().vocab_size as u32 - 2;
    let mut previous: Option<Vec<StreamTimes>> = None;
    let mut first: Option<Level> = None;
    let request = |seed: u64| GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![bos] })),
        max_new_tokens: tokens,
        seed: Some(seed),
        ..Default::default()
    };
    // Unmeasured: a process's first passes pay for allocations and page faults the
    // first level would otherwise be charged with.
    stream(bench.client.clone(), request(u64::MAX)).await?;
    for &concurrency in &levels {
        let before = worker.info(InfoRequest {}).await?.into_inner();
        let started = Instant::now();
        let streams = (0..concurrency).map(|i| stream(bench.client.clone(), request(i as u64)));
        let times = futures::future::try_join_all(streams).await?;
        let wall = started.elapsed().as_secs_f64();
        let after = worker.info(InfoRequest {}).await?.into_inner();
        let passes = after.denoise_passes - before.denoise_passes;
        let batched = after.batched_blocks - before.batched_blocks;
        let pass_s = after.denoise_pass_seconds - before.denoise_pass_seconds;
        let mut gaps: Vec<f64> = times.iter().flat_map(|t| t.gaps_ms.clone()).collect();
        let mut firsts: Vec<f64> = times.iter().map(|t| t.first_ms).collect();
        let queues: Vec<f64> = times.iter().flat_map(|t| t.queue_ms.clone()).collect();
        let total: usize = times.iter().map(|t| t.tokens.len()).sum();
        let same = previous.as_deref().map(|p| agreement(p, &times));
        let level = Level {
            concurrency,
            blocks_per_pass: batched as f64 / passes.max(1) as f64,
            pass_ms: pass_s * 1e3 / passes.max(1) as f64,
            tokens_per_s: total as f64 / wall,
        };
        let pass_model = first.and_then(|f| PassModel::fit(f, level));
        first.get_or_insert(level);
        let figures = LoadFigures {
            model: name.to_string(),
            store,
            device: format!("{:?}", loaded.model.device().location()).to_lowercase(),
            dtype: after.dtype.clone(),
            concurrency,
            max_run_blocks,
            max_batch: limits.max_batch,
            tokens: total,
            wall_s: wall,
            tokens_per_s: level.tokens_per_s,
            block_ms_p50: percentile(&mut gaps, 0.5),
            block_ms_p99: percentile(&mut gaps, 0.99),
            first_block_ms_p50: percentile(&mut firsts, 0.5),
            first_block_ms_p99: percentile(&mut firsts, 0.99),
            queue_ms_mean: queues.iter().sum::<f64>() / queues.len().max(1) as f64,
            batch_size_mean: level.blocks_per_pass,
            pass_ms_mean: level.pass_ms,
            pass_model,
            same_tokens_as_previous_level: same,
        };
        println!("{}", serde_json::to_string(&figures)?);
        previous = Some(times);
    }
    Ok(())
}

/// Workers and the coordinator in front of them, for the benchmarks.
pub struct Served {
    /// A client of the coordinator.
    pub client: GenerationClient<Channel>,
    /// The workers' addresses.
    pub worker_addrs: Vec<String>,
}

impl Served {
    /// Each worker's `Info`, in the order of `worker_addrs`.
    async fn infos(&self) -> anyhow::Result<Vec<bd3lm_proto::v1::InfoResponse>> {
        let mut infos = Vec::with_capacity(self.worker_addrs.len());
        for addr in &self.worker_addrs {
            let mut worker = DenoiseWorkerClient::connect(format!("http://{addr}")).await?;
            infos.push(worker.info(InfoRequest {}).await?.into_inner());
        }
        Ok(infos)
    }
}

/// One worker of `loaded` and a coordinator with `settings` on loopback ports over
/// `stores`.
pub async fn one_worker_with(
    loaded: Arc<LoadedModel>,
    limits: WorkerLimits,
    stores: Stores,
    coordinator: CoordinatorSettings,
) -> anyhow::Result<Served> {
    served_with(loaded, 1, limits, stores, coordinator).await
}

/// `workers` workers of `loaded` and a coordinator with `settings` on loopback ports
/// over `stores`.
pub async fn served_with(
    loaded: Arc<LoadedModel>,
    workers: usize,
    limits: WorkerLimits,
    stores: Stores,
    coordinator: CoordinatorSettings,
) -> anyhow::Result<Served> {
    let mut worker_addrs = Vec::with_capacity(workers);
    for _ in 0..workers {
        let cell = Arc::new(bd3lm_worker::Models::fixed(loaded.clone()));
        let worker = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        worker_addrs.push(worker.local_addr()?.to_string());
        let worker_store = stores.sessions.clone();
        tokio::spawn(async move {
            let open = Arc::new(bd3lm_proto::auth::Tokens::open());
            let never = std::future::pending();
            let serving = bd3lm_worker::serve(
                Ports::plain(worker),
                cell,
                worker_store,
                limits,
                open,
                never,
            );
            if let Err(e) = serving.await {
                tracing::error!(error = %e, "bench worker stopped");
            }
        });
    }
    let pool = Arc::new(Pool::new(
        coordinator.routing,
        1 << 16,
        coordinator.down_after_failures,
    ));
    let source = WorkerSource::Static(worker_addrs.clone());
    while pool.refresh(&source).await < workers {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, coordinator.health_interval);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(bd3lm_coordinator::serve(
        Ports::plain(listener),
        pool,
        stores,
        coordinator,
        std::future::pending(),
    ));
    let client = GenerationClient::connect(format!("http://{addr}")).await?;
    Ok(Served {
        client,
        worker_addrs,
    })
}

/// Times to the first block of one API key's stream, alone and while another key's
/// `burst` streams fill the worker, and of the same stream sent with the burst's key
/// (queued behind the burst's blocks, as first come, first served would queue every
/// stream). One JSON line.
pub async fn fairness(
    loaded: Arc<LoadedModel>,
    limits: WorkerLimits,
    burst: usize,
    tokens: u32,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys: [String; 2] = std::array::from_fn(|_| format!("{:032x}", rand::random::<u128>()));
    std::fs::write(dir.path().join("keys"), keys.join("\n"))?;
    let coordinator = CoordinatorSettings {
        max_queue: usize::MAX,
        api_keys: Some(dir.path().join("keys")),
        limits: bd3lm_coordinator::validation::Limits {
            max_sessions_per_key: usize::MAX,
            ..Default::default()
        },
        ..CoordinatorSettings::default()
    };
    let stores = Stores::memory(Default::default());
    let bench = one_worker_with(loaded.clone(), limits, stores, coordinator).await?;
    let bos = loaded.model.config().vocab_size as u32 - 2;
    let request = |seed: u64, tokens: u32, key: &AsciiMetadataValue| {
        let mut request = tonic::Request::new(GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![bos] })),
            max_new_tokens: tokens,
            seed: Some(seed),
            ..Default::default()
        });
        request.metadata_mut().insert("authorization", key.clone());
        request
    };
    let (small, burst_key) = (bearer(&keys[1])?, bearer(&keys[0])?);
    // Unmeasured, then the small key alone, three times.
    stream(bench.client.clone(), request(u64::MAX, tokens, &small)).await?;
    let mut alone = Vec::new();
    for seed in 0..3 {
        alone.push(
            stream(bench.client.clone(), request(seed, 8, &small))
                .await?
                .first_ms,
        );
    }
    let streams: Vec<_> = (0..burst)
        .map(|i| {
            tokio::spawn(stream(
                bench.client.clone(),
                request(100 + i as u64, tokens, &burst_key),
            ))
        })
        .collect();
    // The burst's first blocks are out and the rest of its blocks queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beside = stream(bench.client.clone(), request(7, 8, &small)).await?;
    // The same stream sent with the burst's key waits behind the burst's queued blocks,
    // as every stream would on a first-come, first-served queue.
    let behind = stream(bench.client.clone(), request(8, 8, &burst_key)).await?;
    // What admission decides is the wait for a slot; the rest of the first block's time
    // is its passes, in a batch the burst fills.
    let queued = |t: &StreamTimes| t.queue_ms.first().copied().unwrap_or(0.0);
    for s in streams {
        s.await??;
    }
    let unloaded = percentile(&mut alone, 0.5);
    println!(
        "{}",
        serde_json::json!({
            "burst_streams": burst,
            "burst_tokens_per_stream": tokens,
            "max_batch": limits.max_batch,
            "first_block_ms_alone": unloaded,
            "first_block_ms_beside_the_burst": beside.first_ms,
            "first_block_queue_ms_beside_the_burst": queued(&beside),
            "first_block_ms_in_the_bursts_queue": behind.first_ms,
            "first_block_queue_ms_in_the_bursts_queue": queued(&behind),
            "ratio_to_alone": beside.first_ms / unloaded,
        })
    );
    Ok(())
}

fn bearer(key: &str) -> anyhow::Result<AsciiMetadataValue> {
    Ok(AsciiMetadataValue::try_from(format!("Bearer {key}"))?)
}

/// Runs one stream to its end and times it.
async fn stream(
    mut client: GenerationClient<Channel>,
    request: impl tonic::IntoRequest<GenerateRequest>,
) -> anyhow::Result<StreamTimes> {
    let started = Instant::now();
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut times = StreamTimes::default();
    let mut last: Option<Instant> = None;
    while let Some(message) = stream.message().await? {
        let Some(block) = message.block else { continue };
        let now = Instant::now();
        match last {
            None => times.first_ms = ms(now - started),
            Some(prev) => times.gaps_ms.push(ms(now - prev)),
        }
        last = Some(now);
        if times.tokens.is_empty() && !message.token_ids.is_empty() {
            times.first_token_ms = ms(now - started);
        }
        times.queue_ms.push(block.queue_ms);
        times.tokens.extend_from_slice(&message.token_ids);
    }
    Ok(times)
}

/// The share of tokens equal in `a` and `b`, stream by stream (stream i has seed i in
/// both), over the streams both have.
fn agreement(a: &[StreamTimes], b: &[StreamTimes]) -> f64 {
    let (mut same, mut all) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        all += x.tokens.len().max(y.tokens.len());
        same += x
            .tokens
            .iter()
            .zip(&y.tokens)
            .filter(|(p, q)| p == q)
            .count();
    }
    same as f64 / all.max(1) as f64
}

const MIB: f64 = (1 << 20) as f64;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile of `values` (nearest rank); 0 when empty.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// What `bench serve --shared-prefix` runs.
#[derive(Debug, Clone, Copy)]
pub struct SharedPrefix {
    /// Tokens of each prompt.
    pub prompt: usize,
    /// Distinct prompts (they differ from their first token).
    pub prompts: usize,
    /// Streams, spread over the prompts in turn.
    pub streams: usize,
    /// New tokens per stream.
    pub tokens: u32,
    /// Workers behind the coordinator.
    pub workers: usize,
}

/// `streams` streams of `prompts` prompts (each its own seed), all at once after one
/// unmeasured stream of each prompt: with one worker, with its prefix cache and without;
/// with several, with prefix-aware routing and without (a fresh deployment each). The
/// time to the first block (the prompt's), to the first new token, the tokens/s they
/// see, the KV bytes the workers hold after them (the sessions' own, the shared) and the
/// busiest worker's share of the blocks. One JSON line each, then their ratios.
pub async fn shared_prefix(
    loaded: Arc<LoadedModel>,
    limits: WorkerLimits,
    bench: SharedPrefix,
) -> anyhow::Result<()> {
    let vocab = loaded.model.config().vocab_size as u32;
    // Ids of the vocabulary short of BOS and the mask, in a fixed scatter; each prompt
    // its own first token.
    let prompt_ids = |p: usize| -> Vec<u32> {
        let scatter = (0..bench.prompt as u32).map(|i| i * 7919 % (vocab - 2));
        scatter
            .enumerate()
            .map(|(i, id)| if i == 0 { p as u32 } else { id })
            .collect()
    };
    let request = |p: usize, seed: u64| GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt_ids(p) })),
        max_new_tokens: bench.tokens,
        seed: Some(seed),
        ..Default::default()
    };
    // One worker compares its prefix cache on and off; several, prefix routing.
    let routing = bench.workers > 1;
    let compared = if routing {
        "prefix_routing"
    } else {
        "prefix_cache"
    };
    let mut seen = Vec::new();
    for on in [true, false] {
        let prefix_cache = on || routing;
        let limits = WorkerLimits {
            prefix_bytes: if prefix_cache {
                limits.prefix_bytes.max(1 << 30)
            } else {
                0
            },
            ..limits
        };
        let coordinator = CoordinatorSettings {
            max_queue: usize::MAX,
            prefix_routing: on || !routing,
            ..CoordinatorSettings::default()
        };
        let stores = Stores::memory(Default::default());
        let served = served_with(loaded.clone(), bench.workers, limits, stores, coordinator);
        let served = served.await?;
        for p in 0..bench.prompts {
            stream(served.client.clone(), request(p, u64::MAX)).await?;
        }
        let before = served.infos().await?;
        let started = Instant::now();
        let runs = (0..bench.streams)
            .map(|i| stream(served.client.clone(), request(i % bench.prompts, i as u64)));
        let times = futures::future::try_join_all(runs).await?;
        let wall = started.elapsed().as_secs_f64();
        let after = served.infos().await?;
        let blocks: Vec<u64> = (after.iter().zip(&before))
            .map(|(a, b)| a.batched_blocks - b.batched_blocks)
            .collect();
        let busiest = *blocks.iter().max().unwrap_or(&0) as f64;
        let mut firsts: Vec<f64> = times.iter().map(|t| t.first_ms).collect();
        let mut first_tokens: Vec<f64> = times.iter().map(|t| t.first_token_ms).collect();
        let total: usize = times.iter().map(|t| t.tokens.len()).sum();
        let held = |f: fn(&bd3lm_proto::v1::InfoResponse) -> u64| {
            after.iter().map(f).sum::<u64>() as f64 / MIB
        };
        let line = serde_json::json!({
            compared: on,
            "workers": bench.workers,
            "prompts": bench.prompts,
            "streams": bench.streams,
            "prompt_tokens": bench.prompt,
            "new_tokens": bench.tokens,
            "first_block_ms_p50": percentile(&mut firsts, 0.5),
            "first_block_ms_p99": percentile(&mut firsts, 0.99),
            "first_token_ms_p50": percentile(&mut first_tokens, 0.5),
            "tokens_per_s": total as f64 / wall,
            "kv_mib_sessions": held(|i| i.cache_bytes),
            "kv_mib_shared": held(|i| i.prefix_cache_bytes),
            "busiest_worker_share": busiest / blocks.iter().sum::<u64>().max(1) as f64,
        });
        println!("{line}");
        let outputs: Vec<Vec<u32>> = times.into_iter().map(|t| t.tokens).collect();
        seen.push((line, outputs));
    }
    let (on, off) = (&seen[0], &seen[1]);
    let ratio =
        |field: &str| off.0[field].as_f64().unwrap_or(0.0) / on.0[field].as_f64().unwrap_or(1.0);
    println!(
        "{}",
        serde_json::json!({
            "first_block_p50_faster": ratio("first_block_ms_p50"),
            "first_token_p50_faster": ratio("first_token_ms_p50"),
            "tokens_per_s_gain": 1.0 / ratio("tokens_per_s"),
            "same_tokens": on.1 == off.1,
        })
    );
    Ok(())
}
