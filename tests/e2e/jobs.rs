//! The training service as deployed: jobs submitted to the coordinator over gRPC (and
//! with `bd3lm train --addr`), `bd3lm-trainer` processes on a real `redis-server` that
//! are stopped, killed and replaced mid-job, the registry, and a denoise worker that
//! follows the published model.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::training_client::TrainingClient;
use bd3lm_proto::v1::{
    CancelJobRequest, DeleteJobRequest, GenerateRequest, GetJobRequest, GetModelRequest,
    GetSessionRequest, InfoRequest, Job, JobSpec, JobState, LearningRate, ListModelsRequest,
    ListServedModelsRequest, ModelRef, ModelShape, ModelVersionRequest, TokenIds, job_spec::Init,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::cluster::{Proc, Redis, RedisCluster, free_port, spawn, start_coordinator};
use crate::{bd3lm, bin, data_dir};

/// The model trained: tiny, but slow enough per step to stop and kill trainers mid-job.
const SHAPE: [&str; 8] = [
    "--hidden-dim",
    "64",
    "--n-heads",
    "4",
    "--n-blocks",
    "2",
    "--cond-dim",
    "32",
];

/// Optimiser flags shared by the job and the local reference run.
pub(crate) const RUN: [&str; 20] = [
    "--block-size",
    "4",
    "--batch-size",
    "16",
    "--lr",
    "3e-3",
    "--warmup",
    "10",
    "--ema",
    "0.9",
    "--val-every",
    "100",
    "--val-batches",
    "2",
    "--save-every",
    "25",
    "--seed",
    "7",
    "--steps",
    "400",
];

/// Word-level shards of a counting corpus (vocabulary 12 with the mask; rows of 16).
pub(crate) fn shards(dir: &Path) -> PathBuf {
    let text = dir.join("text");
    std::fs::create_dir_all(&text).unwrap();
    for d in 0..24 {
        let words: Vec<String> = (0..60).map(|i| format!("w{}", (d + i) % 10)).collect();
        std::fs::write(text.join(format!("{d:02}.txt")), words.join(" ")).unwrap();
    }
    let out = dir.join("shards");
    let tokenizer = data_dir().join("words-tokenizer.json");
    let args = [
        "prepare-data",
        text.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model-length",
        "16",
        "--val-every",
        "4",
        "--shard-rows",
        "8",
    ];
    let made = bd3lm(&args);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

/// Losses of a run directory's metrics log, in step order.
fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
        .collect()
}

/// A trainer process on the store of `store` flags, with a 2 s lease.
fn trainer(dir: &Path, store: &[String], name: &str) -> Proc {
    trainer_with(dir, store, name, &["--job-lease-secs", "2"])
}

/// [`trainer`] with `extra` flags instead of the short job lease.
fn trainer_with(dir: &Path, store: &[String], name: &str, extra: &[&str]) -> Proc {
    let args: Vec<String> = [
        store[0].as_str(),
        &store[1],
        "--runs-dir",
        dir.join("runs").to_str().unwrap(),
        "--registry-dir",
        dir.join("registry").to_str().unwrap(),
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    spawn(&bin("bd3lm-trainer"), &args, dir, name)
}

/// Submits a job of [`SHAPE`] with the `run` flags on `data` with `bd3lm train --addr
/// --detach`, published as `name`; its id.
pub(crate) fn submit_detached(addr: &str, name: &str, data: &Path, run: &[&str]) -> String {
    let mut submit = vec![
        "train", "--addr", addr, "--detach", "--name", name, "--data",
    ];
    submit.push(data.to_str().unwrap());
    submit.extend(SHAPE.iter().chain(run));
    let out = bd3lm(&submit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub(crate) async fn training(addr: &str) -> TrainingClient<Channel> {
    TrainingClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn job(client: &mut TrainingClient<Channel>, id: &str) -> Job {
    let request = GetJobRequest { job_id: id.into() };
    client.get_job(request).await.unwrap().into_inner()
}

/// Polls job `id` until `done` holds of it (panics after `within`).
pub(crate) async fn wait_job(
    client: &mut TrainingClient<Channel>,
    id: &str,
    within: Duration,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = Instant::now() + within;
    loop {
        let j = job(client, id).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job never got there: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step(j: &Job) -> u64 {
    j.progress.map_or(0, |p| p.step)
}

/// Waits until `proc`'s log holds `needle`.
fn wait_log(proc: &Proc, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !proc.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in: {}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A generation of 8 tokens, new or continuing `session`; its session and the model
/// version of each block.
/// Waits until the coordinator at `addr` serves generations (its worker has a model
/// loaded) or `within` has passed; the next generation's result tells which.
pub(crate) async fn wait_serving(addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut generation = GenerationClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let probe = GenerateRequest {
            max_new_tokens: 1,
            ..Default::default()
        };
        match generation.generate(probe).await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => return,
        }
    }
}

async fn generate(addr: &str, session: Option<&str>) -> (String, Vec<Option<u64>>) {
    let mut client = GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: vec![10, 0, 1],
        })),
        session_id: session.unwrap_or_default().into(),
        max_new_tokens: 8,
        seed: Some(1),
        ..Default::default()
    };
    let out = client.generate(request).await.unwrap().into_inner();
    let versions = out.blocks.iter().map(|b| b.model_version).collect();
    (out.session_id, versions)
}

/// A job survives its trainers: the one holding it is stopped past its lease (another
/// takes over; woken, the first stops without writing), then the second is killed and a
/// third resumes it. Its losses at every step are those of an uninterrupted local run,
/// it publishes version 1, and a worker following the model serves it. A second job (a
/// fine-tune on two data-parallel ranks) publishes version 2: the worker switches, a new
/// generation reports 2 while the session begun before goes on with version 1. Version 2
/// retired, new sessions are served by version 1 again.
#[test]
fn a_job_survives_its_trainers_and_its_model_rolls_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = shards(root);
    let reference = root.join("reference");
    let mut local = vec!["train", "--out", reference.to_str().unwrap(), "--data"];
    local.push(data.to_str().unwrap());
    local.extend(SHAPE.iter().chain(&RUN));
    // One kernel thread, as the trainers run (the e2e processes' setting).
    let made = std::process::Command::new(bin("bd3lm"))
        .args(&local)
        .env("BD3LM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let expected = losses(&reference);
    assert_eq!(expected.len(), 400);

    let redis = Redis::start(root);
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let worker_args: Vec<String> = [
        "--addr",
        &worker_addr,
        "--model",
        "tiny",
        "--registry-dir",
        root.join("registry").to_str().unwrap(),
        "--registry-poll-secs",
        "0.2",
        "--redis",
        &redis.url(),
    ]
    .map(String::from)
    .to_vec();
    let _worker = spawn(&bin("bd3lm-worker"), &worker_args, root, "worker");
    let (_coordinator, addr) = start_coordinator(
        root,
        std::slice::from_ref(&worker_addr),
        &redis.flags(),
        "affinity",
        &[],
    );
    let mut trainers = vec![
        trainer(root, &redis.flags(), "trainer-a"),
        trainer(root, &redis.flags(), "trainer-b"),
    ];

    let id = submit_detached(&addr, "tiny", &data, &RUN);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = training(&addr).await;
        let minute = Duration::from_secs(60);
        wait_job(&mut client, &id, minute, |j| step(j) >= 60).await;
        let holder = trainers
            .iter()
            .position(|t| t.log().contains("training"))
            .unwrap();
        trainers[holder].signal("STOP");
        let taken = wait_job(&mut client, &id, minute, |j| j.attempts == 2).await;
        trainers[holder].signal("CONT");
        wait_log(
            &trainers[holder],
            "another trainer took the job over",
            minute,
        );
        let second = 1 - holder;
        wait_job(&mut client, &id, minute, |j| step(j) >= step(&taken) + 60).await;
        trainers[second].kill();
        trainers.push(trainer(root, &redis.flags(), "trainer-c"));
        let done = wait_job(&mut client, &id, Duration::from_secs(180), |j| {
            j.state != JobState::Running as i32 && j.state != JobState::Queued as i32
        })
        .await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{}", done.error);
        assert_eq!(
            (done.attempts, done.published_versions.clone()),
            (3, vec![1])
        );
        assert_eq!(
            losses(&root.join("runs").join(&id)),
            expected,
            "the curve of one run"
        );

        let models = client
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let v1 = &models.models[0].versions[0];
        assert_eq!((models.models[0].name.as_str(), v1.version), ("tiny", 1));
        assert_eq!((v1.job_id.as_str(), v1.step), (id.as_str(), 400));

        // The worker following `tiny` loads version 1 and becomes ready.
        wait_serving(&addr, minute).await;
        let (session, first) = generate(&addr, None).await;
        assert!(first.iter().all(|v| *v == Some(1)), "{first:?}");

        let fine_tune = JobSpec {
            data: data.display().to_string(),
            init: Some(Init::FineTune(ModelRef {
                name: "tiny".into(),
                version: None,
            })),
            steps: 20,
            batch_size: Some(16),
            save_every: Some(10),
            learning_rate: Some(LearningRate {
                peak: Some(1e-3),
                ..Default::default()
            }),
            publish_as: "tiny".into(),
            // Two data-parallel ranks on the trainer's CPU.
            world_size: Some(2),
            ..Default::default()
        };
        let second_job = client.submit_job(fine_tune).await.unwrap().into_inner();
        let tuned = wait_job(&mut client, &second_job.job_id, minute, |j| {
            j.state == JobState::Succeeded as i32
        })
        .await;
        assert_eq!(tuned.published_versions, vec![2]);
        let mut worker = DenoiseWorkerClient::connect(format!("http://{worker_addr}"))
            .await
            .unwrap();
        let deadline = Instant::now() + minute;
        loop {
            let info = worker.info(InfoRequest {}).await.unwrap().into_inner();
            if info.loaded_versions == [1, 2] {
                assert_eq!(info.model_version, Some(2));
                break;
            }
            assert!(Instant::now() < deadline, "{info:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, continued) = generate(&addr, Some(&session)).await;
        assert!(
            continued.iter().all(|v| *v == Some(1)),
            "the old session: {continued:?}"
        );
        let (_, fresh) = generate(&addr, None).await;
        assert!(
            fresh.iter().all(|v| *v == Some(2)),
            "a new session: {fresh:?}"
        );
        let mut generation = GenerationClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let info = generation
            .get_session(GetSessionRequest {
                session_id: session,
            })
            .await
            .unwrap();
        assert_eq!(info.into_inner().model_version, Some(1));
        // The coordinator sees what its worker serves at its next health check.
        let deadline = Instant::now() + minute;
        let served = loop {
            let request = ListServedModelsRequest {};
            let served = generation.list_served_models(request).await.unwrap();
            let served = served.into_inner().models;
            if served.first().is_some_and(|m| m.versions == [1, 2]) {
                break served;
            }
            assert!(Instant::now() < deadline, "{served:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(served.len(), 1, "{served:?}");
        assert_eq!(served[0].id, "tiny");
        assert_eq!(
            (served[0].latest_version, served[0].ready_workers),
            (Some(2), 1)
        );

        // Version 2 retired: the worker goes back to version 1 for new sessions.
        let retire = ModelVersionRequest {
            name: "tiny".into(),
            version: 2,
        };
        client.retire_model_version(retire).await.unwrap();
        let deadline = Instant::now() + minute;
        loop {
            let info = worker.info(InfoRequest {}).await.unwrap().into_inner();
            if info.model_version == Some(1) {
                break;
            }
            assert!(Instant::now() < deadline, "{info:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, rolled_back) = generate(&addr, None).await;
        assert!(rolled_back.iter().all(|v| *v == Some(1)), "{rolled_back:?}");
    });
}

/// The training service on a Redis Cluster: a job is queued, trained by a trainer that
/// blocks on the queue, published to the registry, and served by a worker following the
/// model, every record of it on the cluster.
#[test]
fn a_job_on_a_redis_cluster_is_trained_published_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = shards(root);
    let redis = RedisCluster::start(root, 2_000);
    let store = redis.flags();
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let registry = root.join("registry");
    let mut worker_args: Vec<String> = [
        "--addr",
        &worker_addr,
        "--model",
        "tiny",
        "--registry-dir",
        registry.to_str().unwrap(),
        "--registry-poll-secs",
        "0.2",
    ]
    .map(String::from)
    .to_vec();
    worker_args.extend(store.iter().cloned());
    let _worker = spawn(&bin("bd3lm-worker"), &worker_args, root, "worker");
    let worker = std::slice::from_ref(&worker_addr);
    let (_coordinator, addr) = start_coordinator(root, worker, &store, "affinity", &[]);
    let _trainer = trainer(root, &store, "trainer");
    let run = [&RUN[..RUN.len() - 2], &["--steps", "30"]].concat();
    let id = submit_detached(&addr, "tiny", &data, &run);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = training(&addr).await;
        let done = wait_job(&mut client, &id, Duration::from_secs(180), |j| {
            j.state != JobState::Running as i32 && j.state != JobState::Queued as i32
        })
        .await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{}", done.error);
        assert_eq!(done.published_versions, vec![1]);
        wait_serving(&addr, Duration::from_secs(60)).await;
        let (_, versions) = generate(&addr, None).await;
        assert!(versions.iter().all(|v| *v == Some(1)), "{versions:?}");
    });
}

/// Bad specs are INVALID_ARGUMENT naming the field, before anything is queued; a running
/// job is cancelled within a step, and the command line shows it.
#[test]
fn jobs_are_checked_and_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = shards(root);
    let redis = Redis::start(root);
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (_coordinator, addr) = start_coordinator(root, &[nowhere], &redis.flags(), "affinity", &[]);
    let _trainer = trainer(root, &redis.flags(), "trainer");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = training(&addr).await;
        let good = || JobSpec {
            data: data.display().to_string(),
            init: Some(Init::Shape(ModelShape {
                hidden_dim: 64,
                n_heads: 4,
                n_blocks: 2,
                cond_dim: 32,
            })),
            steps: 1_000_000,
            batch_size: Some(16),
            publish_as: "tiny".into(),
            ..Default::default()
        };
        let bad: [(&str, JobSpec); 4] = [
            (
                "data",
                JobSpec {
                    data: String::new(),
                    ..good()
                },
            ),
            (
                "shape",
                JobSpec {
                    init: Some(Init::Shape(ModelShape {
                        hidden_dim: 30,
                        n_heads: 4,
                        n_blocks: 2,
                        cond_dim: 32,
                    })),
                    ..good()
                },
            ),
            (
                "learning_rate.peak",
                JobSpec {
                    learning_rate: Some(LearningRate {
                        peak: Some(-0.01),
                        ..Default::default()
                    }),
                    ..good()
                },
            ),
            (
                "fine_tune",
                JobSpec {
                    init: Some(Init::FineTune(ModelRef {
                        name: "unknown".into(),
                        version: None,
                    })),
                    ..good()
                },
            ),
        ];
        for (field, spec) in bad {
            let status = client.submit_job(spec).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status}");
            assert!(
                status.message().starts_with(&format!("{field}:")),
                "{field}: {status}"
            );
        }
        let listed = client
            .list_jobs(bd3lm_proto::v1::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.jobs.is_empty(), "nothing was queued: {listed:?}");

        let id = client.submit_job(good()).await.unwrap().into_inner().job_id;
        let running = wait_job(&mut client, &id, Duration::from_secs(60), |j| step(j) >= 3).await;
        let cancel = CancelJobRequest { job_id: id.clone() };
        let asked = client.cancel_job(cancel).await.unwrap().into_inner();
        assert!(asked.cancel_requested);
        let request = GetJobRequest { job_id: id.clone() };
        let mut watch = client.watch_job(request).await.unwrap().into_inner();
        let mut last = None;
        while let Some(j) = watch.message().await.unwrap() {
            last = Some(j);
        }
        let last = last.unwrap();
        assert_eq!(last.state, JobState::Cancelled as i32);
        assert!(
            step(&last) < step(&running) + 50,
            "{} -> {}",
            step(&running),
            step(&last)
        );
        assert!(last.published_versions.is_empty());
    });
    let listed = bd3lm(&["jobs", "list", "--addr", &addr]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("cancelled"), "{text}");
    let bad = bd3lm(&["jobs", "cancel", "nope", "--addr", &addr]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("job_id: must be 32 lowercase hex digits"),
        "{err}"
    );
}

/// A rolling restart of the trainers: the one training a job gets SIGTERM three times
/// mid-run, and each time a new trainer takes the job over at once (the job lease is
/// ten minutes: nothing lapses) and resumes it; no stop counts as a crash, so a job
/// allowed none succeeds.
#[test]
fn a_job_survives_a_rolling_restart_of_its_trainers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = shards(root);
    let redis = Redis::start(root);
    let (_coordinator, addr) = start_coordinator(root, &[], &redis.flags(), "affinity", &[]);
    let flags = ["--job-lease-secs", "600", "--max-job-crashes", "0"];
    let mut current = trainer_with(root, &redis.flags(), "trainer-0", &flags);
    let id = submit_detached(&addr, "rolled", &data, &RUN);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = training(&addr).await;
        let minute = Duration::from_secs(60);
        for restart in 1..=3 {
            let at = step(&job(&mut client, &id).await);
            wait_job(&mut client, &id, minute, |j| step(j) > at + 10).await;
            assert_eq!(
                current.terminate(minute),
                Some(0),
                "trainer {restart} drained"
            );
            current = trainer_with(root, &redis.flags(), &format!("trainer-{restart}"), &flags);
        }
        let done = wait_job(&mut client, &id, Duration::from_secs(300), |j| {
            j.state != JobState::Running as i32 && j.state != JobState::Queued as i32
        })
        .await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{}", done.error);
        assert_eq!(done.published_versions, vec![1]);
    });
}

/// The API keys of [`Keyed`], the last an administrator's.
const KEYS: [&str; 3] = [
    "key-alpha-0123456789",
    "key-beta-9876543210",
    "key-admin-000000000",
];

/// A coordinator taking [`KEYS`] on its own Redis, no worker or trainer: jobs stay queued.
struct Keyed {
    redis: Redis,
    _coordinator: Proc,
    addr: String,
    data: PathBuf,
}

impl Keyed {
    fn start(root: &Path, extra: &[&str]) -> Self {
        let data = shards(root);
        let redis = Redis::start(root);
        let keys = root.join("api-keys");
        let [alpha, beta, admin] = KEYS;
        std::fs::write(&keys, format!("{alpha}\n{beta}\n{admin} admin\n")).unwrap();
        let keys = keys.display().to_string();
        let flags = [&["--api-keys", keys.as_str()][..], extra].concat();
        let (coordinator, addr) = start_coordinator(root, &[], &redis.flags(), "affinity", &flags);
        Self {
            redis,
            _coordinator: coordinator,
            addr,
            data,
        }
    }

    async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(format!("http://{}", self.addr)).unwrap();
        endpoint.connect().await.unwrap()
    }

    /// A small job on the shards, published as `name`.
    fn spec(&self, name: &str) -> JobSpec {
        JobSpec {
            data: self.data.display().to_string(),
            init: Some(Init::Shape(ModelShape {
                hidden_dim: 64,
                n_heads: 4,
                n_blocks: 2,
                cond_dim: 32,
            })),
            steps: 10,
            publish_as: name.into(),
            ..Default::default()
        }
    }
}

type KeyedClient = TrainingClient<
    tonic::service::interceptor::InterceptedService<Channel, bd3lm_proto::auth::Bearer>,
>;

fn keyed_client(channel: &Channel, key: &str) -> KeyedClient {
    let bearer = bd3lm_proto::auth::Bearer::new(Some(key)).unwrap();
    TrainingClient::with_interceptor(channel.clone(), bearer)
}

/// Jobs are bounded: a spec past a bound is INVALID_ARGUMENT naming the field and the
/// limit, and a key with its limit of jobs queued or running is refused another
/// (RESOURCE_EXHAUSTED) while another key is not; of a burst of one key's submissions
/// at the same instant, only its limit is queued.
#[test]
fn jobs_are_bounded_and_counted_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-job-steps", "8", "--max-jobs-per-key", "1"];
    let keyed = Keyed::start(dir.path(), &flags);
    let [alpha, beta, _] = KEYS;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let (mut a, mut b) = (keyed_client(&channel, alpha), keyed_client(&channel, beta));
        let long = a.submit_job(keyed.spec("bounded")).await.unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument, "{long}");
        assert!(
            long.message().starts_with("steps:") && long.message().contains("limit of 8"),
            "{long}"
        );
        let short = || JobSpec {
            steps: 8,
            ..keyed.spec("bounded")
        };
        a.submit_job(short()).await.unwrap();
        let second = a.submit_job(short()).await.unwrap_err();
        assert_eq!(second.code(), Code::ResourceExhausted, "{second}");
        b.submit_job(JobSpec {
            publish_as: "beta".into(),
            ..short()
        })
        .await
        .unwrap();

        // A burst of one key's submissions at once: exactly its limit is queued.
        let burst = (0..8).map(|_| {
            let mut admin = keyed_client(&channel, KEYS[2]);
            let spec = JobSpec {
                publish_as: "burst".into(),
                ..short()
            };
            async move { admin.submit_job(spec).await }
        });
        let outcomes = futures::future::join_all(burst).await;
        let queued = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(queued, 1, "{outcomes:?}");
        for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
        }
    });
}

/// An ended job's record is deleted once `--job-retention-secs` has passed; a queued one
/// stays.
#[test]
fn ended_jobs_are_deleted_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = Keyed::start(dir.path(), &["--job-retention-secs", "0.5"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let mut a = keyed_client(&channel, KEYS[0]);
        let ended = a.submit_job(keyed.spec("kept")).await.unwrap().into_inner();
        let queued = a.submit_job(keyed.spec("kept")).await.unwrap().into_inner();
        let cancel = CancelJobRequest {
            job_id: ended.job_id.clone(),
        };
        a.cancel_job(cancel).await.unwrap();
        let get = |id: &str| GetJobRequest { job_id: id.into() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.get_job(get(&ended.job_id)).await.is_ok() {
            assert!(Instant::now() < deadline, "the ended job was never deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.get_job(get(&queued.job_id)).await.unwrap();
    });
}

/// WatchJob streams are bounded per API key: beyond `--max-watches-per-key` a watch is
/// RESOURCE_EXHAUSTED, another key is not held to the first's count, and a closed watch
/// gives its place back.
#[test]
fn job_watches_are_bounded_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = Keyed::start(dir.path(), &["--max-watches-per-key", "2"]);
    let [alpha, beta, _] = KEYS;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let (mut a, mut b) = (keyed_client(&channel, alpha), keyed_client(&channel, beta));
        let ours = a
            .submit_job(keyed.spec("watched"))
            .await
            .unwrap()
            .into_inner();
        let theirs = b
            .submit_job(keyed.spec("theirs"))
            .await
            .unwrap()
            .into_inner();
        let watch = |id: &str| GetJobRequest { job_id: id.into() };
        let first = a.watch_job(watch(&ours.job_id)).await.unwrap();
        let _second = a.watch_job(watch(&ours.job_id)).await.unwrap();
        let refused = a.watch_job(watch(&ours.job_id)).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
        assert!(refused.message().starts_with("job_id:"), "{refused}");
        b.watch_job(watch(&theirs.job_id)).await.unwrap();
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.watch_job(watch(&ours.job_id)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "a closed watch gave its place back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Model names belong to API keys: the first key to submit a job publishing under a name
/// owns it; another key's job under it is refused with PERMISSION_DENIED naming
/// `publish_as`, and that key neither sees nor cancels the first key's job (NOT_FOUND);
/// a key marked `admin` in the keys file may publish under it.
#[test]
fn a_model_name_belongs_to_the_key_that_first_claimed_it() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = Keyed::start(dir.path(), &[]);
    let [alpha, beta, admin] = KEYS;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let client = |key: &str| keyed_client(&channel, key);
        let spec = || keyed.spec("team-a");
        let theirs = client(alpha).submit_job(spec()).await.unwrap().into_inner();
        let refused = client(beta).submit_job(spec()).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        assert!(refused.message().starts_with("publish_as:"), "{refused}");
        let get = GetJobRequest {
            job_id: theirs.job_id.clone(),
        };
        assert_eq!(
            client(beta).get_job(get).await.unwrap_err().code(),
            Code::NotFound
        );
        let cancel = CancelJobRequest {
            job_id: theirs.job_id.clone(),
        };
        assert_eq!(
            client(beta).cancel_job(cancel).await.unwrap_err().code(),
            Code::NotFound
        );
        client(admin).submit_job(spec()).await.unwrap();
        client(alpha).submit_job(spec()).await.unwrap();

        // Deleting: not while queued, not by another key; once cancelled, by its key.
        let delete = || DeleteJobRequest {
            job_id: theirs.job_id.clone(),
        };
        let queued = client(alpha).delete_job(delete()).await.unwrap_err();
        assert_eq!(queued.code(), Code::FailedPrecondition, "{queued}");
        let cancel = CancelJobRequest {
            job_id: theirs.job_id.clone(),
        };
        client(alpha).cancel_job(cancel).await.unwrap();
        let other = client(beta).delete_job(delete()).await.unwrap_err();
        assert_eq!(other.code(), Code::NotFound, "{other}");
        client(alpha).delete_job(delete()).await.unwrap();
        let get = GetJobRequest {
            job_id: theirs.job_id.clone(),
        };
        assert_eq!(
            client(alpha).get_job(get).await.unwrap_err().code(),
            Code::NotFound
        );
    });
}

/// Follows job `id` with `client` until it ends: its last state.
async fn ended(client: &mut KeyedClient, id: &str) -> Job {
    let request = GetJobRequest { job_id: id.into() };
    let mut watch = client.watch_job(request).await.unwrap().into_inner();
    let mut last = None;
    while let Some(j) = watch.message().await.unwrap() {
        last = Some(j);
    }
    last.expect("a watch sends the job at once")
}

/// A model's versions are its key's to retire and pin: another key is refused
/// (PERMISSION_DENIED), a pinned version is neither retired by the trainers'
/// `--keep-versions` policy nor by a call (FAILED_PRECONDITION); a retired version leaves
/// the registry at once and its files go at the trainer's next sweep, as does the run of
/// a deleted job.
#[test]
fn versions_are_retired_and_pinned_by_their_key_and_swept_by_the_trainers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keyed = Keyed::start(root, &[]);
    let flags = ["--job-lease-secs", "1", "--keep-versions", "2"];
    let _trainer = trainer_with(root, &keyed.redis.flags(), "trainer", &flags);
    let [alpha, beta, _] = KEYS;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let (mut a, mut b) = (keyed_client(&channel, alpha), keyed_client(&channel, beta));
        let version = |version| ModelVersionRequest {
            name: "kept".into(),
            version,
        };
        let mut jobs = Vec::new();
        for published in 1..=3 {
            let id = a
                .submit_job(keyed.spec("kept"))
                .await
                .unwrap()
                .into_inner()
                .job_id;
            let done = ended(&mut a, &id).await;
            assert_eq!(done.state, JobState::Succeeded as i32, "{}", done.error);
            assert_eq!(done.published_versions, vec![published]);
            jobs.push(id);
            if published == 1 {
                let refused = b.pin_model_version(version(1)).await.unwrap_err();
                assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
                assert!(
                    a.pin_model_version(version(1))
                        .await
                        .unwrap()
                        .into_inner()
                        .pinned
                );
            }
        }
        let listed = |model: bd3lm_proto::v1::Model| -> Vec<(u64, bool)> {
            model
                .versions
                .iter()
                .map(|v| (v.version, v.pinned))
                .collect()
        };
        let get = || GetModelRequest {
            name: "kept".into(),
        };
        let model = b.get_model(get()).await.unwrap().into_inner();
        assert_eq!(
            listed(model),
            vec![(1, true), (2, false), (3, false)],
            "1 pinned"
        );

        let refused = b.retire_model_version(version(2)).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
        let pinned = a.retire_model_version(version(1)).await.unwrap_err();
        assert_eq!(pinned.code(), Code::FailedPrecondition, "{pinned}");
        a.retire_model_version(version(2)).await.unwrap();
        let model = b.get_model(get()).await.unwrap().into_inner();
        assert_eq!(listed(model), vec![(1, true), (3, false)]);

        let delete = DeleteJobRequest {
            job_id: jobs[0].clone(),
        };
        a.delete_job(delete).await.unwrap();
        let registry = root.join("registry").join("kept");
        let (retired_files, run) = (registry.join("2"), root.join("runs").join(&jobs[0]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while retired_files.exists() || run.exists() {
            assert!(Instant::now() < deadline, "the trainer never swept");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(registry.join("1").is_dir() && registry.join("3").is_dir());
        assert!(root.join("runs").join(&jobs[1]).is_dir());
    });
}

/// WatchJob is driven by the store's change notifications: with the fallback read once an
/// hour, a cancel from another connection still reaches an open watch, which then ends.
#[test]
fn a_watch_is_woken_by_the_change_not_a_poll() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = Keyed::start(dir.path(), &["--job-watch-poll-secs", "3600"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = keyed.channel().await;
        let mut a = keyed_client(&channel, KEYS[0]);
        let queued = a
            .submit_job(keyed.spec("woken"))
            .await
            .unwrap()
            .into_inner();
        let request = GetJobRequest {
            job_id: queued.job_id.clone(),
        };
        let mut watch = a.watch_job(request).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.state, JobState::Queued as i32);
        let mut other = keyed_client(&keyed.channel().await, KEYS[0]);
        let cancel = CancelJobRequest {
            job_id: queued.job_id.clone(),
        };
        other.cancel_job(cancel).await.unwrap();
        // A stall bound, far below the hour of the fallback read.
        let next = tokio::time::timeout(Duration::from_secs(120), watch.message());
        let cancelled = next.await.expect("woken by the change").unwrap().unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled as i32);
        assert!(watch.message().await.unwrap().is_none(), "the watch ends");
    });
}
