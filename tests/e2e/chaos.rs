//! The chaos test: concurrent generations through a coordinator, three workers and a real
//! `redis-server` while a schedule of faults runs: workers SIGKILLed and restarted, one
//! SIGSTOPped for longer than the stall wait, Redis restarted (its data lost: it keeps
//! none on disk), KV blobs corrupted, clients cancelled. Every generation that was not
//! cancelled must end with the tokens a fault-free run of its seed gives; a cancelled one
//! leaves a session whose tokens are a prefix of them (or none, when a Redis restart took
//! it). It prints `lost`, `mismatched`, `panics` (all must be 0) and the p99 block latency.
//!
//! Short form by default (CI, under 3 minutes); `BD3LM_CHAOS_LONG=1` runs the long form.
//! Once more beside a busy loop holding a core: a worker that is slow but advancing is
//! never taken for a stopped one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GetSessionRequest, StopReason};
use tonic::Code;

use crate::cluster::{Cluster, Redis};
use crate::distributed::{checkpoint, local};
use crate::integrity::request;

/// How much chaos.
struct Form {
    generations: usize,
    tokens: u32,
    /// How long the coordinator waits for a worker's progress (its stall floor and
    /// ceiling): a stopped worker sends none, a slow one heartbeats.
    stall: Duration,
}

/// What one generation got.
#[derive(Debug, Default)]
struct Outcome {
    session: String,
    tokens: Vec<u32>,
    block_ms: Vec<f64>,
    cancelled: bool,
    error: Option<String>,
}

/// Generation `i`'s prompt and seed, as the local run's flags.
fn flags(i: usize, tokens: u32) -> Vec<String> {
    let prompt = format!("1022,{}", 7 + i);
    let (tokens, seed) = (tokens.to_string(), (100 + i).to_string());
    [
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        &tokens,
        "--seed",
        &seed,
    ]
    .map(String::from)
    .to_vec()
}

/// Runs generation `i` (cancelled after `cancel_after` blocks, when given).
async fn run(addr: String, i: usize, tokens: u32, cancel_after: Option<usize>) -> Outcome {
    let mut out = Outcome {
        cancelled: cancel_after.is_some(),
        ..Outcome::default()
    };
    let mut client = GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = request(None, vec![1022, 7 + i as u32], tokens);
    req.seed = Some(100 + i as u64);
    let mut stream = match client.generate_stream(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            out.error = Some(s.to_string());
            return out;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                out.session = m.session_id;
                out.tokens.extend_from_slice(&m.token_ids);
                out.block_ms.extend(m.block.map(|b| b.total_ms));
                if m.stop_reason != StopReason::Unspecified as i32 {
                    return out;
                }
                if cancel_after.is_some_and(|n| out.block_ms.len() >= n) {
                    return out;
                }
            }
            Ok(None) => return out,
            Err(s) => {
                out.error = Some(s.to_string());
                return out;
            }
        }
    }
}

/// One fault of the schedule on one Redis, by its round.
fn fault(cluster: &mut Cluster, round: usize, stall: Duration) -> &'static str {
    match round % 4 {
        0 | 1 => worker_fault(cluster, round, stall),
        2 => {
            cluster.redis.stop();
            cluster.redis.restart();
            "redis restarted empty"
        }
        _ => {
            corrupt_blobs(&cluster.redis);
            "KV blobs corrupted"
        }
    }
}

/// One fault of the schedule on a Redis Cluster, by its round: the master holding a
/// session's slot SIGKILLed (the one killed before back first, as a replica, and
/// every replica in sync, so that each shard can always fail over), that slot migrated to
/// another master, or the worker faults and blob corruption of one Redis.
fn cluster_fault(cluster: &mut Cluster, round: usize, stall: Duration) -> &'static str {
    let redis = cluster.redis_cluster.as_mut().unwrap();
    match round % 5 {
        0 | 1 => worker_fault(cluster, round, stall),
        2 | 3 => {
            redis.restart_stopped();
            redis.wait_ok(Duration::from_secs(60));
            // A generating session's, else (its lease lost with a master, until the
            // generation renews it) any session's.
            let (master, key) = redis
                .any_generating()
                .unwrap_or_else(|| (redis.master_of("*:record"), "*:record".into()));
            if round % 5 == 2 {
                redis.nodes[master].stop();
                "master of a session's slot SIGKILLed"
            } else {
                let key = redis.nodes[master].keys(&key).pop().expect("a session key");
                redis.migrate_slot_of(&key);
                "slot of a session migrated"
            }
        }
        _ => {
            for node in redis.nodes.iter().filter(|n| n.is_running()) {
                corrupt_blobs(node);
            }
            "KV blobs corrupted"
        }
    }
}

/// A worker SIGKILLed and restarted (even rounds), or SIGSTOPped for longer than the stall
/// wait (odd ones).
fn worker_fault(cluster: &mut Cluster, round: usize, stall: Duration) -> &'static str {
    let worker = round % 3;
    if round.is_multiple_of(2) {
        cluster.restart_worker(worker);
        return "worker SIGKILLed and restarted";
    }
    cluster.workers[worker].signal("STOP");
    std::thread::sleep(stall + Duration::from_millis(500));
    cluster.workers[worker].signal("CONT");
    "worker SIGSTOPped past the stall wait"
}

/// Every other KV blob on `node` damaged in place.
fn corrupt_blobs(node: &Redis) {
    for key in node.keys("*:kv:*").iter().step_by(2) {
        let _ = node.command(&[b"SETRANGE", key.as_bytes(), b"40", b"\xde\xad"]);
    }
}

impl Form {
    /// The short form, or the long one with `BD3LM_CHAOS_LONG`.
    fn from_env() -> Self {
        if std::env::var_os("BD3LM_CHAOS_LONG").is_some() {
            Self {
                generations: 16,
                tokens: 8000,
                stall: Duration::from_secs(6),
            }
        } else {
            Self {
                generations: 8,
                // Block runs made a generation several times faster than a call per
                // block: long enough that every kind of fault meets running generations
                // on a machine twice as fast as this one.
                tokens: 6000,
                stall: Duration::from_secs(2),
            }
        }
    }
}

/// A fault of a schedule: applied to the cluster at its round, it names itself.
type Fault = fn(&mut Cluster, usize, Duration) -> &'static str;

impl Form {
    /// The coordinator's flags of this form.
    fn flags(&self) -> Vec<String> {
        let secs = self.stall.as_secs().to_string();
        ["--stall-floor-secs", &secs, "--stall-ceiling-secs", &secs]
            .into_iter()
            .chain(["--max-attempts", "12"])
            .map(String::from)
            .collect()
    }
}

#[test]
fn chaos_loses_nothing() {
    let form = Form::from_env();
    let flags = form.flags();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = Cluster::start_with(&checkpoint(), 3, "affinity", &extra);
    loses_nothing(cluster, form, fault, 4);
}

/// The same beside another process that holds one of the machine's cores the whole time:
/// every block slower, no worker stopped by it taken for dead.
#[test]
fn chaos_beside_a_busy_loop_loses_nothing() {
    let _busy = BusyLoop::start();
    chaos_loses_nothing();
}

/// A process spinning on one core until dropped.
struct BusyLoop(std::process::Child);

impl BusyLoop {
    fn start() -> Self {
        let child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh starts");
        Self(child)
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same on a Redis Cluster of three masters with a replica each: masters SIGKILLed
/// (their replicas take over after a 1 s node timeout) and slots migrated beside the
/// worker faults and the blob corruption.
#[test]
fn chaos_on_a_redis_cluster_loses_nothing() {
    // More tokens: five kinds of fault, and a cluster that is waited on to be whole
    // again before each of its own, need more rounds (within the request limit of 8,192).
    let short = Form::from_env();
    let form = Form {
        tokens: 8000,
        ..short
    };
    let flags = form.flags();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = Cluster::start_on_redis_cluster(&checkpoint(), 3, ("affinity", &extra), 1_000);
    loses_nothing(cluster, form, cluster_fault, 5);
}

/// Runs the form's generations through `cluster` while `fault` runs every 0.6 s, then
/// checks that none was lost or mismatched, nothing panicked, and `kinds` kinds of fault
/// ran.
fn loses_nothing(mut cluster: Cluster, form: Form, fault: Fault, kinds: usize) {
    let stall = form.stall;
    let expected: Vec<Vec<u32>> = (0..form.generations)
        .map(|i| {
            let f = flags(i, form.tokens);
            local(&f.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();

    let done = Arc::new(AtomicBool::new(false));
    let (addr, finished) = (cluster.addr.clone(), done.clone());
    let tokens = form.tokens;
    let generations = form.generations;
    let clients = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let outcomes = runtime.block_on(async {
            let runs = (0..generations).map(|i| {
                // Every fourth generation is cancelled by its client partway.
                let cancel = (i % 4 == 3).then_some(5 + i * 3);
                tokio::spawn(run(addr.clone(), i, tokens, cancel))
            });
            let all = futures::future::join_all(runs).await;
            all.into_iter().map(Result::unwrap).collect::<Vec<_>>()
        });
        finished.store(true, Ordering::SeqCst);
        outcomes
    });
    let started = Instant::now();
    let mut applied = Vec::new();
    while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(150) {
        std::thread::sleep(Duration::from_millis(600));
        applied.push(fault(&mut cluster, applied.len(), stall));
    }
    let outcomes = clients.join().unwrap();

    let mut lost = Vec::new();
    let mut mismatched = Vec::new();
    for (i, (out, want)) in outcomes.iter().zip(&expected).enumerate() {
        match (&out.error, out.cancelled) {
            (Some(e), _) => lost.push(format!("generation {i}: {e}")),
            (None, false) if out.tokens != *want => mismatched.push(i),
            (None, true) if !want.starts_with(&out.tokens) => mismatched.push(i),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = GenerationClient::connect(format!("http://{}", cluster.addr))
            .await
            .unwrap();
        for (i, out) in outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.cancelled && !o.session.is_empty())
        {
            let get = GetSessionRequest {
                session_id: out.session.clone(),
            };
            match client.get_session(get).await {
                Ok(info) => {
                    let stored = &info.get_ref().token_ids;
                    if stored.len() < 2 || !expected[i].starts_with(&stored[2..]) {
                        mismatched.push(i);
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => lost.push(format!("session of generation {i}: {s}")),
            }
        }
    });
    let logs = cluster.worker_logs() + &cluster.coordinator.log();
    let panics = logs.matches("panicked").count();
    let mut block_ms: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.block_ms.iter().copied())
        .collect();
    block_ms.sort_by(f64::total_cmp);
    let p99 = block_ms
        .get(block_ms.len() * 99 / 100)
        .copied()
        .unwrap_or(0.0);
    println!(
        "chaos: {} generations ({} cancelled), {} faults in {:.0} s, lost {}, mismatched {}, panics {}, p99 block {:.0} ms",
        outcomes.len(),
        outcomes.iter().filter(|o| o.cancelled).count(),
        applied.len(),
        started.elapsed().as_secs_f64(),
        lost.len(),
        mismatched.len(),
        panics,
        p99
    );
    let ran: std::collections::HashSet<_> = applied.iter().collect();
    assert_eq!(ran.len(), kinds, "not every kind of fault ran: {applied:?}");
    if !lost.is_empty() {
        // What the coordinator saw of the failures, for the report.
        let log = cluster.coordinator.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
    }
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert!(mismatched.is_empty(), "mismatched: {mismatched:?}");
    assert_eq!(panics, 0, "{logs}");
}
