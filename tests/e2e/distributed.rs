//! The distributed system as deployed: a real `redis-server`, the coordinator and worker
//! binaries as separate processes, real gRPC over TCP. Every generation is compared with
//! a local one of the same checkpoint and seed.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bd3lm_kvstore::contract::record;
use bd3lm_kvstore::{RedisConnection, SessionStore, StoreConfig, Stores};
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::{GenerateRequest, Sampler, SamplingParameters, TokenIds};

use crate::cluster::{Cluster, Generated};
use crate::{bd3lm, data_dir};

pub fn checkpoint() -> std::path::PathBuf {
    data_dir().join("reference-bd3lm-bs4")
}

/// Local generation with the same flags.
pub fn local(args: &[&str]) -> Vec<u32> {
    local_with(&checkpoint(), args)
}

/// Local generation of checkpoint `ckpt` with `args`.
pub fn local_with(ckpt: &std::path::Path, args: &[&str]) -> Vec<u32> {
    let mut all = vec!["generate", "--checkpoint", ckpt.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = Generated::from(bd3lm(&all));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.ids
}

/// 120 tokens: past the 64-token window of the test model.
const RUN: [&str; 8] = [
    "--prompt-ids",
    "1022,7,9",
    "--max-tokens",
    "120",
    "--seed",
    "11",
    "--sampler",
    "ddpm",
];

/// [`RUN`] as a gRPC request.
fn run_request() -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: vec![1022, 7, 9],
        })),
        max_new_tokens: 120,
        seed: Some(11),
        sampling: Some(SamplingParameters {
            sampler: Sampler::Ddpm as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The store's contract holds on a real Redis server, as on the in-memory store.
#[test]
fn the_redis_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let redis = crate::cluster::Redis::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = RedisConnection::open(&redis.url(), Default::default()).unwrap();
        let stores = Stores::redis(&connection, StoreConfig::default());
        bd3lm_kvstore::contract::check(stores.sessions).await;
        bd3lm_kvstore::contract::check_jobs(stores.jobs).await;
    });
}

/// A delete racing a writer that commits a block (and its blob) as fast as it can, with
/// the delete landing at a different point of the writer's loop each round: the session
/// ends with its tombstone only, never an orphaned blob.
#[test]
fn a_delete_racing_commits_leaves_only_the_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let redis = crate::cluster::Redis::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = RedisConnection::open(&redis.url(), Default::default()).unwrap();
        let store = SessionStore::redis(&connection, StoreConfig::default());
        for round in 0..40u64 {
            let id = format!("race{round}");
            store.create_session(&record(&id)).await.unwrap();
            let writer = tokio::spawn(commit_until_deleted(store.clone(), id.clone()));
            tokio::time::sleep(Duration::from_micros(150 * round)).await;
            assert!(store.delete_session("m", &id).await.unwrap());
            let committed = writer.await.unwrap();
            let keys = redis.keys(&format!("*{{{id}}}*"));
            assert!(
                keys.len() == 1 && keys[0].ends_with(":deleted"),
                "round {round}, {committed} blocks committed: {keys:?}"
            );
        }
    });
}

/// Commits one block after another to session `id` until it is gone; how many it did.
async fn commit_until_deleted(store: SessionStore, id: String) -> usize {
    loop {
        let Some(read) = store.get_session("m", &id).await.unwrap() else {
            return 0;
        };
        let mut next = read.clone();
        next.tokens.push(5);
        next.committed_blocks += 1;
        let blob = vec![(read.committed_blocks, vec![7; 64])];
        match store.commit(&next, read.base(), blob, 0..0).await {
            Ok(_) => {}
            Err(bd3lm_kvstore::Error::NoSession(_)) => return read.committed_blocks,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Far more concurrent streams than one worker takes at once: the coordinator queues their
/// blocks, and every stream finishes with the tokens a local run gives.
#[test]
fn concurrent_streams_beyond_one_workers_capacity_all_finish() {
    let cluster = Cluster::start(&checkpoint(), 1, "affinity");
    let args = [
        "--prompt-ids",
        "1022,7",
        "--max-tokens",
        "16",
        "--seed",
        "4",
    ];
    let expected = local(&args);
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1022, 7] })),
        max_new_tokens: 16,
        seed: Some(4),
        ..Default::default()
    };
    let outs = cluster.generate_grpc(vec![request; 48]);
    for out in outs {
        assert_eq!(out.unwrap().token_ids, expected);
    }
}

#[test]
fn blocks_on_alternating_workers_give_the_local_tokens_and_sessions_continue() {
    let cluster = Cluster::start(&checkpoint(), 2, "rotate");
    // The cluster is ready once one worker is; on a loaded machine the other may still be
    // loading its model, and the blocks could not alternate yet. Both are in the
    // coordinator's rotation once a short generation's blocks reach both.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut short = run_request();
        short.max_new_tokens = 16;
        let warm = cluster.generate_grpc(vec![short]).remove(0).unwrap();
        let mut workers: Vec<&str> = warm.blocks.iter().map(|b| b.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        if workers.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a worker never joined the rotation"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected = local(&RUN);
    let remote = cluster.generate(&RUN);
    assert_eq!(remote.code, 0, "{}", remote.stderr);
    assert_eq!(remote.ids, expected);
    let direct = cluster
        .generate_grpc(vec![run_request()])
        .remove(0)
        .unwrap();
    assert_eq!(direct.token_ids, expected);
    let served: Vec<&str> = direct.blocks.iter().map(|b| b.worker.as_str()).collect();
    assert!(
        served.windows(2).all(|w| w[0] != w[1]),
        "blocks alternate between the workers: {served:?}"
    );
    // Blocks name their worker by its id, never its address.
    for i in 0..cluster.workers.len() {
        let id = cluster.worker_info(i).unwrap().worker_id;
        assert_eq!(id.len(), 16, "{id}");
        assert!(
            served.contains(&id.as_str()),
            "worker {i} ({id}) served: {served:?}"
        );
    }
    for addr in &cluster.worker_addrs {
        assert!(
            !served.contains(&addr.as_str()),
            "an address reached the client"
        );
    }

    // A finished session continued (by whichever worker) goes on as one long generation.
    let longer: Vec<&str> = RUN
        .iter()
        .map(|a| if *a == "120" { "150" } else { a })
        .collect();
    let long = local(&longer);
    let session = remote.session();
    let more = cluster.generate(&["--session", session.as_str(), "--max-tokens", "30"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(more.ids, long[120..]);
}

/// Starts `bd3lm generate --addr` with `args`, its output piped.
fn spawn_client(addr: &str, args: &[&str]) -> Child {
    Command::new(crate::bin("bd3lm"))
        .args(["generate", "--addr", addr])
        .args(args)
        .env("BD3LM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads the client's streamed output until it holds `count` tokens; panics when the
/// stream ends first.
fn read_tokens(stdout: &mut impl Read, seen: &mut Vec<u8>, count: usize) {
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(seen).split_whitespace().count() < count {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the generation ended before {count} tokens");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Runs a remote generation with `args` and, once it has streamed 40 tokens and while it
/// still runs, the `fault`.
fn during(addr: &str, args: &[&str], fault: impl FnOnce()) -> Generated {
    let mut child = spawn_client(addr, args);
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_tokens(&mut stdout, &mut seen, 40);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the fault must come mid-generation"
    );
    fault();
    stdout.read_to_end(&mut seen).unwrap();
    let mut out = child.wait_with_output().unwrap();
    out.stdout = seen;
    Generated::from(out)
}

#[test]
fn a_worker_killed_mid_generation_loses_nothing() {
    let mut cluster = Cluster::start(&checkpoint(), 2, "rotate");
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "2000",
        "--seed",
        "3",
    ];
    survives(&mut cluster, &args, |cluster| cluster.workers[0].kill());
}

/// With the workers' KV caches in bf16, then in f16, a worker killed mid-generation
/// loses nothing: the session moves to the other worker through blobs of that precision
/// (or a rebuild), and the client gets the tokens of a local run with the same precision.
#[test]
fn a_worker_killed_mid_generation_loses_nothing_in_each_kv_precision() {
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "1000",
        "--seed",
        "5",
    ];
    for kv in ["bf16", "f16"] {
        let precision = ["--kv-dtype", kv];
        let mut cluster = Cluster::start_with_worker_flags(&checkpoint(), 2, "rotate", &precision);
        let local_args = [&args[..], &precision[..]].concat();
        survives_like(&mut cluster, &args, &local_args, |cluster| {
            cluster.workers[0].kill()
        });
        let info = cluster.worker_info(1).expect("worker 1 answers");
        assert_eq!(info.kv_dtype, kv);
    }
}

/// Runs a remote generation with `args` through `cluster` and, once it streams, the
/// `fault`: the generation succeeds with the tokens a local run gives.
pub fn survives(cluster: &mut Cluster, args: &[&str], fault: impl FnOnce(&mut Cluster)) {
    survives_like(cluster, args, args, fault);
}

/// [`survives`], compared with a local run with `local_args`; the remote run's output.
fn survives_like(
    cluster: &mut Cluster,
    args: &[&str],
    local_args: &[&str],
    fault: impl FnOnce(&mut Cluster),
) -> Generated {
    let expected = local(local_args);
    let addr = cluster.addr.clone();
    let out = during(&addr, args, || fault(cluster));
    if out.code != 0 {
        // Shown with the failure: what the servers saw.
        eprintln!("{}\n{}", cluster.coordinator.log(), cluster.worker_logs());
    }
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, expected);
    out
}

/// A request's KV persistence decides what Redis holds of its session: `never` only its
/// tokens, `at-end` the window's blobs once the generation ended (written by the last
/// block's worker). Under both, a worker killed mid-generation loses nothing: the other
/// worker rebuilds from the tokens.
#[test]
fn kv_persistence_decides_the_blobs_stored_and_a_worker_kill_loses_nothing() {
    let args = ["--prompt-ids", "1022", "--max-tokens", "600", "--seed", "4"];
    // The test model's window: 64 tokens less a block of 4, in blocks.
    let window_blocks = 15;
    for (persistence, blobs) in [("never", 0), ("at-end", window_blocks)] {
        let mut cluster = Cluster::start(&checkpoint(), 2, "rotate");
        let remote = [&args[..], &["--kv-persistence", persistence]].concat();
        let out = survives_like(&mut cluster, &remote, &args, |cluster| {
            cluster.workers[0].kill()
        });
        let stored = cluster.redis.keys(&format!("*{}*:kv:*", out.session()));
        assert_eq!(stored.len(), blobs, "{persistence}: {stored:?}");
    }
}

/// The store loses acknowledged writes mid-generation (what a failover to a replica that
/// had not received them does; here the session's record and tokens are put back as they
/// were blocks earlier): the coordinator, which holds every committed token, catches the
/// store up, and the client gets the tokens a local run gives.
#[test]
fn a_store_that_lost_committed_blocks_is_caught_up_with_identical_tokens() {
    let cluster = Cluster::start(&checkpoint(), 2, "affinity");
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "1200",
        "--seed",
        "9",
    ];
    let expected = local(&args);
    let mut child = spawn_client(&cluster.addr, &args);
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_tokens(&mut stdout, &mut seen, 40);
    let record = cluster
        .redis
        .keys("*:record")
        .pop()
        .expect("the session's record");
    let tokens = record.replace(":record", ":tokens");
    let snapshot = (cluster.redis.dump(&record), cluster.redis.dump(&tokens));
    read_tokens(&mut stdout, &mut seen, 200);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the loss must come mid-generation"
    );
    cluster.redis.restore_key(&record, &snapshot.0);
    cluster.redis.restore_key(&tokens, &snapshot.1);
    stdout.read_to_end(&mut seen).unwrap();
    let mut out = child.wait_with_output().unwrap();
    out.stdout = seen;
    let out = Generated::from(out);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, expected);
}

fn as_refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A worker killed while its batch holds several sessions: every one finishes on the
/// other worker with the tokens a local run gives.
#[test]
fn a_worker_killed_with_several_sessions_in_its_batch_loses_nothing() {
    let mut cluster = Cluster::start(&checkpoint(), 2, "affinity");
    let runs: Vec<Vec<String>> = (0..6)
        .map(|seed| {
            let args = ["--prompt-ids", "1022", "--max-tokens", "1500", "--seed"];
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            args.push(seed.to_string());
            args
        })
        .collect();
    let mut clients: Vec<_> = runs
        .iter()
        .map(|args| {
            let mut child = spawn_client(&cluster.addr, &as_refs(args));
            let mut stdout = child.stdout.take().unwrap();
            let mut seen = Vec::new();
            read_tokens(&mut stdout, &mut seen, 20);
            (child, stdout, seen)
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cluster.worker_info(0).is_none_or(|i| i.batch_size < 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "worker 0 never batched two sessions"
        );
    }
    cluster.workers[0].kill();
    for (args, (child, mut stdout, mut seen)) in runs.iter().zip(clients.drain(..)) {
        stdout.read_to_end(&mut seen).unwrap();
        let mut out = child.wait_with_output().unwrap();
        out.stdout = seen;
        let out = Generated::from(out);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.ids, local(&as_refs(args)), "seed {}", args[5]);
    }
}

/// SIGTERM lets the work in flight finish: a worker stops after its block and the other
/// worker takes the session over; the coordinator stops accepting, finishes the stream it
/// serves, and both exit 0.
#[test]
fn sigterm_drains_the_work_in_flight_and_exits_0() {
    let mut cluster = Cluster::start(&checkpoint(), 2, "affinity");
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "1500",
        "--seed",
        "8",
    ];
    let expected = local(&args);
    let addr = cluster.addr.clone();
    let mut codes = Vec::new();
    let out = during(&addr, &args, || {
        codes.push(cluster.workers[0].terminate(Duration::from_secs(30)));
        codes.push(cluster.coordinator.terminate(Duration::from_secs(30)));
    });
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, expected);
    assert_eq!(codes, [Some(0), Some(0)], "{}", cluster.coordinator.log());
    assert!(
        cluster.generate(&args).code != 0,
        "a stopped coordinator took a new call"
    );
}

/// Redis holds a long session's record, its tokens and the KV blobs of its window, not the
/// blobs of every block it ever committed; those it holds are enough: blocks alternate
/// between two workers, so each one's cache comes from the blobs. After 8,192 tokens the
/// session's keys and bytes are the window's blobs, the tokens and a little more.
#[test]
fn redis_keeps_only_the_window_of_a_long_session() {
    let cluster = Cluster::start(&checkpoint(), 2, "rotate");
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "8192",
        "--seed",
        "2",
    ];
    let out = cluster.generate(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let keys = cluster.redis.keys(&format!("*{}*", out.session()));
    // The test model's window: 64 tokens, so the 15 blocks of 4 before a block; the
    // record and its tokens.
    assert!(keys.len() <= 15 + 2, "{} keys: {keys:?}", keys.len());
    assert!(keys.iter().any(|k| k.ends_with(":record")), "{keys:?}");
    let usage = |key: &str| {
        cluster
            .redis
            .integer(&[b"MEMORY", b"USAGE", key.as_bytes()])
    };
    let bytes: i64 = keys.iter().map(|k| usage(k)).sum();
    let blob = keys.iter().find(|k| k.contains(":kv:")).unwrap();
    let blob_bytes = cluster.redis.integer(&[b"STRLEN", blob.as_bytes()]);
    // Redis counts its allocator's size classes: a quarter more, and 1 KiB per key.
    let bound = (15 * blob_bytes + 4 * 8193) * 5 / 4 + 17 * 1024;
    println!(
        "{} keys, {bytes} bytes for 8,193 tokens (bound {bound})",
        keys.len()
    );
    assert!(bytes <= bound, "{bytes} bytes over {bound}: {keys:?}");
    let more = cluster.generate(&["--session", out.session().as_str(), "--max-tokens", "40"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(
        more.ids,
        local(&[
            "--prompt-ids",
            "1022",
            "--max-tokens",
            "8232",
            "--seed",
            "2"
        ])[8192..]
    );
    for worker in &cluster.workers {
        assert!(
            !worker.log().contains("KV blob missing"),
            "a blob the window needs was deleted: {}",
            worker.log()
        );
    }
}

#[test]
fn store_faults_are_survived_or_reported() {
    let mut cluster = Cluster::start(&checkpoint(), 2, "rotate");
    let args = [
        "--prompt-ids",
        "1022,5",
        "--max-tokens",
        "1500",
        "--seed",
        "8",
    ];
    let expected = local(&args);

    // Flushed mid-generation: the coordinator restores the record, workers rebuild the
    // KV state from tokens.
    let addr = cluster.addr.clone();
    let out = during(&addr, &args, || {
        cluster.redis.command(&[b"FLUSHALL"]).unwrap();
    });
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, expected);
    assert!(
        cluster.coordinator.log().contains("restoring"),
        "the session was restored"
    );

    // Corrupt KV blobs are detected and rebuilt from tokens.
    let short = cluster.generate(&[
        "--prompt-ids",
        "1022,5",
        "--max-tokens",
        "40",
        "--seed",
        "8",
    ]);
    assert_eq!(short.code, 0, "{}", short.stderr);
    for key in cluster
        .redis
        .keys(&format!("*{{{}}}:kv:*", short.session()))
    {
        cluster
            .redis
            .command(&[b"SET", key.as_bytes(), b"not a blob"])
            .unwrap();
    }
    let more = cluster.generate(&["--session", short.session().as_str(), "--max-tokens", "30"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(more.ids, expected[40..70]);
    let logs: String = cluster.workers.iter().map(|w| w.log()).collect();
    assert!(logs.contains("corrupt KV blob"), "corruption was detected");

    // Redis down: a clear UNAVAILABLE, quickly; back up: served again.
    cluster.redis.stop();
    let started = std::time::Instant::now();
    let down = cluster.generate(&["--prompt-ids", "1022", "--max-tokens", "8"]);
    assert_eq!(down.code, 2, "{}", down.stderr);
    assert!(down.stderr.contains("Unavailable"), "{}", down.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    assert!(
        cluster.wait_ready_is(false, Duration::from_secs(10)),
        "readiness ignores a store that does not answer"
    );
    cluster.redis.restart();
    assert!(
        cluster.wait_ready_is(true, Duration::from_secs(10)),
        "readiness did not come back with the store"
    );
    let back = cluster.generate(&[
        "--prompt-ids",
        "1022,5",
        "--max-tokens",
        "40",
        "--seed",
        "8",
    ]);
    assert_eq!(back.code, 0, "{}", back.stderr);
    assert_eq!(back.ids, expected[..40]);
}

/// Eviction takes part of a session, its tokens (a policy that evicts keys one by one can):
/// mid-generation the coordinator, which holds every token, puts the session back and the
/// client gets a local run's tokens; between requests a continuation of it is NOT_FOUND,
/// never INTERNAL.
#[test]
fn a_session_whose_tokens_were_evicted_is_restored_or_not_found() {
    let cluster = Cluster::start(&checkpoint(), 2, "rotate");
    let args = [
        "--prompt-ids",
        "1022,9",
        "--max-tokens",
        "1200",
        "--seed",
        "6",
    ];
    let expected = local(&args);
    let out = during(&cluster.addr, &args, || {
        // The generation's session: the one whose lease is held now.
        let lease = cluster.redis.keys("*:lease").pop().expect("a held lease");
        let tokens = lease.replace(":lease", ":tokens");
        assert_eq!(cluster.redis.integer(&[b"DEL", tokens.as_bytes()]), 1);
    });
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, expected);
    assert!(
        cluster.coordinator.log().contains("restoring"),
        "the session was restored"
    );

    let tokens = format!("*{{{}}}:tokens", out.session());
    let key = cluster
        .redis
        .keys(&tokens)
        .pop()
        .expect("the session's tokens");
    assert_eq!(cluster.redis.integer(&[b"DEL", key.as_bytes()]), 1);
    let more = cluster.generate(&["--session", out.session().as_str(), "--max-tokens", "8"]);
    assert_eq!(more.code, 2, "{}", more.stderr);
    assert!(more.stderr.contains("NotFound"), "{}", more.stderr);
}

/// A Redis whose `maxmemory-policy` may evict any key (the training queue, the registry's
/// records, tombstones) is refused at start-up, in one line naming the setting; one that
/// evicts only keys with a TTL (what can be rebuilt) is taken, with a line naming it.
#[test]
fn a_redis_that_may_evict_any_key_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |p: &str| vec!["--maxmemory-policy".to_string(), p.to_string()];
    let redis = crate::cluster::Redis::start_with(dir.path(), policy("allkeys-lru"));
    let url = redis.url();
    let serve = ["serve", "--redis", url.as_str(), "--addr", "127.0.0.1:0"];
    let refused = bd3lm(&serve);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("maxmemory-policy is allkeys-lru"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let set = [&b"CONFIG"[..], b"SET", b"maxmemory-policy", b"volatile-lru"];
    assert_eq!(redis.command(&set).unwrap(), b"+OK\r\n");
    let args: Vec<String> = serve.iter().map(|s| s.to_string()).collect();
    let served = crate::cluster::spawn(&crate::bin("bd3lm"), &args, dir.path(), "serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !served.log().contains("rebuilt from tokens") {
        assert!(std::time::Instant::now() < deadline, "{}", served.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn invalid_requests_get_the_right_status_and_the_servers_keep_serving() {
    let cluster = Cluster::start_with(
        &checkpoint(),
        1,
        "affinity",
        &["--max-request-bytes", "20000"],
    );
    let cases: [(&[&str], &str, &str); 8] = [
        (&["--max-tokens", "8"], "InvalidArgument", "prompt"),
        (
            &["--prompt-ids", "1022", "--max-tokens", "0"],
            "InvalidArgument",
            "max_new_tokens",
        ),
        (
            &["--prompt-ids", "1022", "--max-tokens", "100000000"],
            "InvalidArgument",
            "max_new_tokens",
        ),
        (
            &["--prompt-ids", "1022", "--top-p", "1.5"],
            "InvalidArgument",
            "top_p",
        ),
        (
            &["--prompt-ids", "1022", "--temperature", "0"],
            "InvalidArgument",
            "temperature",
        ),
        (&["--prompt-ids", "1022,5000"], "InvalidArgument", "prompt"),
        (
            &["--prompt", "text without a tokenizer"],
            "InvalidArgument",
            "prompt.text",
        ),
        (
            &[
                "--session",
                "0123456789abcdef0123456789abcdef",
                "--max-tokens",
                "4",
            ],
            "NotFound",
            "session_id",
        ),
    ];
    for (args, code, field) in cases {
        let out = cluster.generate(args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(code) && out.stderr.contains(field),
            "{args:?}: {}",
            out.stderr
        );
    }
    let long: String = (0..9_000).map(|i| format!("{},", i % 1000)).collect();
    let out = cluster.generate(&[
        "--prompt-ids",
        long.trim_end_matches(','),
        "--max-tokens",
        "4",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("InvalidArgument") && out.stderr.contains("prompt"),
        "{}",
        out.stderr
    );
    let huge: String = (0..25_000).map(|i| format!("{},", i % 1000)).collect();
    let out = cluster.generate(&[
        "--prompt-ids",
        huge.trim_end_matches(','),
        "--max-tokens",
        "4",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("OutOfRange") || out.stderr.contains("ResourceExhausted"),
        "oversize message refused: {}",
        out.stderr
    );
    // A client that goes away stops the work.
    let mut client = spawn_client(
        &cluster.addr,
        &["--prompt-ids", "1022", "--max-tokens", "8000"],
    );
    // Gone once it has seen its first tokens: the generation is under way.
    read_tokens(client.stdout.as_mut().unwrap(), &mut Vec::new(), 4);
    client.kill().unwrap();
    client.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cluster.coordinator.log().contains("client went away") {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator kept generating for a gone client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let fine = cluster.generate(&["--prompt-ids", "1022", "--max-tokens", "8", "--seed", "1"]);
    assert_eq!(fine.code, 0, "{}", fine.stderr);
    assert_eq!(
        fine.ids,
        local(&["--prompt-ids", "1022", "--max-tokens", "8", "--seed", "1"])
    );
}

/// Sends `body` (an encoded request, possibly malformed) to a unary method as raw bytes.
mod raw {
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Debug, Clone, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }

    pub fn call(addr: &str, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
            grpc.unary(tonic::Request::new(body), path, RawCodec)
                .await
                .map(tonic::Response::into_inner)
        })
    }
}

/// A text prompt that is not UTF-8 cannot be parsed: INTERNAL, as the gRPC status code
/// specification asks for an unparsable request, with a message saying why; the server
/// goes on serving.
#[test]
fn invalid_utf8_is_refused_with_a_message() {
    let cluster = Cluster::start(&checkpoint(), 1, "affinity");
    // GenerateRequest { text (field 1) = FF FE 41, max_new_tokens (field 4) = 8 }
    let body = vec![0x0a, 3, 0xff, 0xfe, 0x41, 0x20, 8];
    let status = raw::call(&cluster.addr, "/bd3lm.v1.Generation/Generate", body).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());
    // The same request with valid text reaches validation (no tokenizer: named field).
    let body = vec![0x0a, 2, b'h', b'i', 0x20, 8];
    let status = raw::call(&cluster.addr, "/bd3lm.v1.Generation/Generate", body).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("prompt.text"),
        "{}",
        status.message()
    );
}
