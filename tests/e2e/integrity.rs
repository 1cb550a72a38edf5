//! Session integrity under races, against a real `redis-server` and the real binaries:
//! stale writers, concurrent continuations, deletion from another coordinator, two
//! workers committing one block, and a stored record that went backwards.

use std::time::Duration;

use bd3lm_kvstore::{RedisConnection, SessionRecord, SessionStore, StoreConfig};
use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{
    DeleteSessionRequest, DenoiseBlockRequest, GenerateRequest, GenerateResponse,
    GetSessionRequest, StopReason, TokenIds,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::distributed::{checkpoint, local};

/// A generation of `max_new_tokens` with seed 11: a new session of `prompt`, or a
/// continuation of `session` with `prompt` appended.
pub fn request(session: Option<&str>, prompt: Vec<u32>, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        session_id: session.unwrap_or_default().to_string(),
        prompt: (!prompt.is_empty()).then_some(Prompt::TokenIds(TokenIds { ids: prompt })),
        max_new_tokens,
        seed: session.is_none().then_some(11),
        ..Default::default()
    }
}

pub async fn client(addr: &str) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn generate(client: &mut GenerationClient<Channel>, r: GenerateRequest) -> GenerateResponse {
    client.generate(r).await.unwrap().into_inner()
}

async fn stored(client: &mut GenerationClient<Channel>, session: &str) -> Vec<u32> {
    let request = GetSessionRequest {
        session_id: session.into(),
    };
    client
        .get_session(request)
        .await
        .unwrap()
        .into_inner()
        .token_ids
}

/// Where `needle` first occurs in `tokens` from `from` on.
fn find(tokens: &[u32], from: usize, needle: &[u32]) -> Option<usize> {
    let at = tokens
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)?;
    Some(from + at)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A stream cancelled with its next block in flight, then a continuation at once, 100
/// times: every appended prompt is in the session, in order, each followed by the output
/// its request returned (no stale block overwrote it).
#[test]
fn cancel_then_continue_at_once_loses_no_prompt() {
    let cluster = Cluster::start(&checkpoint(), 2, "affinity");
    runtime().block_on(async {
        let mut c = client(&cluster.addr).await;
        let session = generate(&mut c, request(None, vec![1022, 7], 8))
            .await
            .session_id;
        let mut turns = Vec::new();
        for round in 0..100u32 {
            let cut = request(Some(&session), vec![], 64);
            let mut stream = c.generate_stream(cut).await.unwrap().into_inner();
            stream.message().await.unwrap().unwrap();
            drop(stream);
            let prompt = vec![1000, 100 + round];
            let out = c
                .generate(request(Some(&session), prompt.clone(), 4))
                .await
                .unwrap_or_else(|s| panic!("round {round}: {s}"))
                .into_inner();
            turns.push((prompt, out.token_ids));
        }
        let tokens = stored(&mut c, &session).await;
        let mut at = 0;
        for (round, (prompt, output)) in turns.iter().enumerate() {
            at = find(&tokens, at, prompt)
                .unwrap_or_else(|| panic!("round {round}'s prompt is lost"));
            at += prompt.len();
            assert_eq!(&tokens[at..at + output.len()], output, "round {round}");
        }
    });
}

/// Two continuations of one session at once: the one that took the session generates,
/// the other is refused with ABORTED naming the session; the session holds the winner's
/// prompt and output only. The winner asks for the most tokens allowed, and its client
/// cancels it only after the loser's answer.
#[test]
fn two_concurrent_continuations_one_generates_and_one_is_aborted() {
    let cluster = Cluster::start_with(&checkpoint(), 2, "affinity", &["--lease-wait-secs", "0.2"]);
    runtime().block_on(async {
        let mut c = client(&cluster.addr).await;
        let session = generate(&mut c, request(None, vec![1022, 7], 8))
            .await
            .session_id;
        let before = stored(&mut c, &session).await;
        let (first, second) = (vec![1000, 1], vec![1000, 2]);
        let winner = c.generate_stream(request(Some(&session), first.clone(), 8192));
        let mut winner = winner.await.unwrap().into_inner();
        let output = winner.message().await.unwrap().unwrap().token_ids;
        let lost = c.generate(request(Some(&session), second, 400)).await;
        let status = lost.unwrap_err();
        assert_eq!(status.code(), Code::Aborted, "{status}");
        assert!(status.message().starts_with("session_id"), "{status}");
        drop(winner);
        let expected: Vec<u32> = [&before[..], &first, &output].concat();
        // What the winner sent was committed first.
        let tokens = stored(&mut c, &session).await;
        assert_eq!(tokens[..expected.len()], expected);
    });
}

/// DeleteSession on one coordinator stops a generation running on another: its stream
/// ends with NOT_FOUND, and nothing puts the session back (only its tombstone stays).
#[test]
fn a_session_deleted_through_another_coordinator_stops_and_stays_deleted() {
    let cluster = Cluster::start(&checkpoint(), 2, "affinity");
    let (_second, second) = cluster.add_coordinator(&[]);
    runtime().block_on(async {
        let mut a = client(&cluster.addr).await;
        let mut b = client(&second).await;
        let long = request(None, vec![1022, 7], 4000);
        let mut stream = a.generate_stream(long).await.unwrap().into_inner();
        let session = stream.message().await.unwrap().unwrap().session_id;
        let delete = DeleteSessionRequest {
            session_id: session.clone(),
        };
        assert!(b.delete_session(delete).await.unwrap().into_inner().deleted);
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match stream.message().await {
                    Ok(Some(m)) if m.stop_reason == StopReason::Unspecified as i32 => continue,
                    other => return other,
                }
            }
        });
        let status = end.await.expect("the generation stopped").unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status}");
        let get = GetSessionRequest {
            session_id: session.clone(),
        };
        assert_eq!(a.get_session(get).await.unwrap_err().code(), Code::NotFound);
        let keys = cluster.redis.keys(&format!("*{session}*"));
        assert!(keys.len() == 1 && keys[0].ends_with(":deleted"), "{keys:?}");
    });
}

/// Two workers asked for the same block at once: one commits it, the other answers it as
/// committed, with the same tokens; ten blocks so, and the session is the local run's.
#[test]
fn two_workers_committing_the_same_block_agree() {
    let cluster = Cluster::start(&checkpoint(), 2, "affinity");
    runtime().block_on(async {
        let mut c = client(&cluster.addr).await;
        let session = generate(&mut c, request(None, vec![1022, 7, 9], 4))
            .await
            .session_id;
        let mut workers = Vec::new();
        for addr in &cluster.worker_addrs {
            workers.push(
                DenoiseWorkerClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap(),
            );
        }
        for block in 2..12u32 {
            let calls = workers.iter().map(|w| {
                let mut w = w.clone();
                let r = DenoiseBlockRequest {
                    session_id: session.clone(),
                    block_index: block,
                    ..Default::default()
                };
                async move { w.denoise_block(r).await.unwrap().into_inner() }
            });
            let answers = futures::future::join_all(calls).await;
            assert_eq!(answers[0].token_ids, answers[1].token_ids, "block {block}");
            let fresh = answers.iter().filter(|a| !a.already_committed).count();
            assert_eq!(fresh, 1, "block {block}: {answers:?}");
        }
        let tokens = stored(&mut c, &session).await;
        let expected = local(&[
            "--prompt-ids",
            "1022,7,9",
            "--max-tokens",
            "45",
            "--seed",
            "11",
        ]);
        assert_eq!(tokens.len(), 48);
        assert_eq!(tokens[3..], expected[..]);
    });
}

/// A stored record that went backwards (fewer tokens than its committed blocks) is
/// DATA_LOSS for the requests that touch it (not retried), never a panic: the workers
/// keep serving.
#[test]
fn a_record_that_went_backwards_is_data_loss_not_a_panic() {
    let cluster = Cluster::start(&checkpoint(), 2, "affinity");
    let model_id = cluster.worker_info(0).unwrap().model_id;
    runtime().block_on(async {
        let redis = RedisConnection::open(&cluster.redis.url(), Default::default()).unwrap();
        let store = SessionStore::redis(&redis, StoreConfig::default());
        let id = format!("{:032x}", 0xbac4_u128);
        let record = SessionRecord {
            id: id.clone(),
            model_id,
            tokens: vec![1022, 7, 9, 1, 2],
            prompt_len: 5,
            committed_blocks: 3,
            seed: 1,
            sampling: bd3lm_sampling::SamplingParams::new(4),
            returned: 5,
            version: 0,
            owner: None,
            model_version: None,
        };
        store.create_session(&record).await.unwrap();
        let mut c = client(&cluster.addr).await;
        let status = c.generate(request(Some(&id), vec![], 8)).await.unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{status}");
        let mut worker =
            DenoiseWorkerClient::connect(format!("http://{}", cluster.worker_addrs[0]))
                .await
                .unwrap();
        let past = DenoiseBlockRequest {
            session_id: id,
            block_index: 1,
            ..Default::default()
        };
        assert_eq!(
            worker.denoise_block(past).await.unwrap_err().code(),
            Code::DataLoss
        );
        let fine = generate(&mut c, request(None, vec![1022], 8)).await;
        assert_eq!(fine.token_ids.len(), 8);
    });
    for (i, worker) in cluster.workers.iter().enumerate() {
        assert!(cluster.worker_info(i).is_some(), "worker {i} stopped");
        assert!(!worker.log().contains("panicked"), "{}", worker.log());
    }
}

/// Two sessions of one 40-token prompt (ten whole blocks), each of its own seed, through
/// the real binaries: the second takes the prompt's blocks from the worker's prefix cache
/// (on by default), and both get the tokens of a local run of their seed.
#[test]
fn a_shared_prompt_comes_from_the_prefix_cache_with_a_local_runs_tokens() {
    let cluster = Cluster::start(&checkpoint(), 1, "affinity");
    assert_eq!(shared_prompt_generation(&cluster, 1), 0);
    assert_eq!(shared_prompt_generation(&cluster, 2), 10);
}

/// Prompt blocks outlive the workers that computed them: after both workers restarted
/// (their memory empty), a new session of the prompt takes its blocks from the store's
/// shared blocks, with a local run's tokens.
#[test]
fn a_shared_prompt_outlives_its_workers_in_the_store() {
    let mut cluster = Cluster::start(&checkpoint(), 2, "affinity");
    assert_eq!(shared_prompt_generation(&cluster, 1), 0);
    cluster.restart_worker(0);
    cluster.restart_worker(1);
    cluster.wait_ready();
    assert_eq!(shared_prompt_generation(&cluster, 2), 10);
}

/// A new session of a 40-token prompt with `seed` on `cluster`, checked against a local
/// run of that seed: the prompt blocks its first block took from shared ones.
fn shared_prompt_generation(cluster: &Cluster, seed: u64) -> u32 {
    let ids: Vec<u32> = (0..40).map(|i| 100 + i * 7).collect();
    let listed: Vec<String> = ids.iter().map(u32::to_string).collect();
    let mut r = request(None, ids, 16);
    r.seed = Some(seed);
    let out = runtime().block_on(async { generate(&mut client(&cluster.addr).await, r).await });
    let (prompt, seed) = (listed.join(","), seed.to_string());
    let args = [
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "16",
        "--seed",
        &seed,
    ];
    assert_eq!(out.token_ids, local(&args), "seed {seed}");
    let first = &out.blocks[0];
    let source = if first.prefix_blocks > 0 {
        "prefix"
    } else {
        "empty"
    };
    assert_eq!(first.cache_source, source, "seed {seed}");
    first.prefix_blocks
}
