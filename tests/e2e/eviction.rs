//! Redis at `maxmemory`: what its eviction may take (only what can be rebuilt: KV blobs,
//! sessions' records and tokens) and what it cannot (tombstones, leases, per-key session
//! counts, the training service's keys), on a real `redis-server` under the real binaries.

use std::time::Duration;

use bd3lm_kvstore::contract::record;
use bd3lm_kvstore::{RedisConnection, SessionStore, StoreConfig, Stores, Submitted};
use bd3lm_proto::v1::DeleteSessionRequest;
use tonic::Code;

use crate::cluster::{Cluster, Redis};
use crate::distributed::{checkpoint, local};
use crate::integrity::{client, request, runtime};

/// The remaining time to live of `key` in ms: -1 without one, -2 when it is gone.
fn pttl(redis: &Redis, key: &str) -> i64 {
    redis.integer(&[b"PTTL", key.as_bytes()])
}

/// The one key matching `pattern`.
fn key(redis: &Redis, pattern: &str) -> String {
    let mut keys = redis.keys(pattern);
    assert_eq!(keys.len(), 1, "{pattern}: {keys:?}");
    keys.pop().unwrap()
}

/// Only a session's record, tokens and blobs carry a TTL (the keys a `volatile-*` policy
/// evicts); the tombstone, the lease and the per-key count hold their expiry themselves,
/// and the janitor deletes the expired ones, after which a deleted id may be used again.
#[test]
fn only_what_can_be_rebuilt_carries_a_ttl_and_the_janitor_sweeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    runtime().block_on(async {
        let connection = RedisConnection::open(&redis.url(), Default::default()).unwrap();
        let config = StoreConfig {
            ttl: Duration::from_millis(1_500),
            ..StoreConfig::default()
        };
        let store = SessionStore::redis(&connection, config);
        let mut live = record("live");
        store.create_session(&live).await.unwrap();
        live.tokens.push(4);
        live.committed_blocks = 1;
        let base = store
            .get_session("m", "live")
            .await
            .unwrap()
            .unwrap()
            .base();
        store
            .commit(&live, base, vec![(0, vec![7; 16])], 0..0)
            .await
            .unwrap();
        let lease = Duration::from_millis(300);
        assert!(store.lease("m", "live", "a", lease).await.unwrap());
        assert!(store.claim_slot("m", "key", "live", 4).await.unwrap());
        store.create_session(&record("gone")).await.unwrap();
        assert!(store.delete_session("m", "gone").await.unwrap());

        for suffix in ["record", "tokens", "kv:0"] {
            let ttl = pttl(&redis, &key(&redis, &format!("*{{live}}:{suffix}")));
            assert!(ttl > 0, "{suffix}: {ttl}");
        }
        for pattern in [
            "*{live}:lease",
            "*{gone}:deleted",
            "*:owner:key",
            "*:janitor",
        ] {
            assert_eq!(pttl(&redis, &key(&redis, pattern)), -1, "{pattern}");
        }

        assert_eq!(store.sweep().await.unwrap(), 0, "nothing expired yet");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            store.lease("m", "live", "b", lease).await.unwrap(),
            "a's lapsed"
        );
        assert_eq!(
            store.sweep().await.unwrap(),
            0,
            "b's lease and the tombstone hold"
        );
        assert!(matches!(
            store.create_session(&record("gone")).await,
            Err(bd3lm_kvstore::Error::Deleted(_))
        ));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            store.sweep().await.unwrap(),
            2,
            "the lease and the tombstone"
        );
        assert!(redis.keys("*:lease").is_empty() && redis.keys("*:deleted").is_empty());
        assert!(redis.keys("*:janitor").is_empty(), "the index empties");
        store.create_session(&record("gone")).await.unwrap();
    });
}

/// Concurrent generations through a Redis far too small for them (`volatile-lru`, a few
/// hundred KB above what it holds at the start): Redis evicts blobs, records and tokens
/// all along, and every generation still gives a local run's tokens; afterwards every
/// session continues or answers NOT_FOUND, never INTERNAL. What cannot be rebuilt stays:
/// a deleted session's tombstone, a held lease, an API key's session count, queued jobs.
#[test]
fn redis_at_maxmemory_under_concurrent_generations_keeps_what_cannot_be_rebuilt() {
    let cluster = Cluster::start(&checkpoint(), 2, "rotate");
    let redis = &cluster.redis;
    let runtime = runtime();
    let _inside = runtime.enter();
    let connection = RedisConnection::open(&redis.url(), Default::default()).unwrap();
    let stores = Stores::redis(&connection, StoreConfig::default());
    let deleted = runtime.block_on(async {
        let mut c = client(&cluster.addr).await;
        let session = c.generate(request(None, vec![1022, 3], 8)).await.unwrap();
        let session_id = session.into_inner().session_id;
        let delete = DeleteSessionRequest {
            session_id: session_id.clone(),
        };
        assert!(c.delete_session(delete).await.unwrap().into_inner().deleted);
        let hour = Duration::from_secs(3600);
        assert!(stores.sessions.lease("m", "held", "a", hour).await.unwrap());
        assert!(
            stores
                .sessions
                .claim_slot("m", "key", "s", 1)
                .await
                .unwrap()
        );
        for job in 0..20 {
            let body = format!("job body {job}");
            let submitted = stores
                .jobs
                .submit_job(&format!("j{job}"), body.as_bytes(), None)
                .await
                .unwrap();
            assert!(matches!(submitted, Submitted::Queued { .. }));
        }
        session_id
    });
    let used = info_field(redis, "memory", "used_memory");
    let limit = (used + 400_000).to_string();
    for (setting, value) in [("maxmemory-policy", "volatile-lru"), ("maxmemory", &limit)] {
        let set = [&b"CONFIG"[..], b"SET", setting.as_bytes(), value.as_bytes()];
        assert_eq!(redis.command(&set).unwrap(), b"+OK\r\n");
    }

    let prompts: Vec<u32> = (1..=8).collect();
    let generated = runtime.block_on(async {
        let c = client(&cluster.addr).await;
        let calls = prompts.iter().map(|&p| {
            let mut c = c.clone();
            async move { c.generate(request(None, vec![1022, p], 400)).await }
        });
        futures::future::join_all(calls).await
    });
    let evicted = info_field(redis, "stats", "evicted_keys");
    assert!(evicted > 0, "Redis evicted nothing: the test did not test");
    for (p, answer) in prompts.iter().zip(generated) {
        let answer = answer
            .unwrap_or_else(|s| panic!("prompt {p}: {s}"))
            .into_inner();
        let args = [
            "--prompt-ids",
            &format!("1022,{p}"),
            "--max-tokens",
            "408",
            "--seed",
            "11",
        ];
        let expected = local(&args);
        assert_eq!(answer.token_ids, expected[..400], "prompt {p}");
        let more = runtime.block_on(async {
            let mut c = client(&cluster.addr).await;
            c.generate(request(Some(&answer.session_id), Vec::new(), 8))
                .await
        });
        match more {
            Ok(more) => assert_eq!(more.into_inner().token_ids, expected[400..], "prompt {p}"),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "prompt {p}: {s}"),
        }
    }

    runtime.block_on(async {
        let mut c = client(&cluster.addr).await;
        let back = c.generate(request(Some(&deleted), Vec::new(), 8)).await;
        assert_eq!(
            back.unwrap_err().code(),
            Code::NotFound,
            "a deleted session stays so"
        );
        let hour = Duration::from_secs(3600);
        assert!(
            !stores.sessions.lease("m", "held", "b", hour).await.unwrap(),
            "lease kept"
        );
        assert!(
            !stores
                .sessions
                .claim_slot("m", "key", "t", 1)
                .await
                .unwrap(),
            "count kept"
        );
        for job in 0..20 {
            let stored = stores.jobs.get_job(&format!("j{job}")).await.unwrap();
            assert_eq!(
                stored.expect("job kept").body,
                format!("job body {job}").into_bytes()
            );
        }
    });
    eprintln!("{evicted} keys evicted");
}

/// A numeric field of `INFO section`.
fn info_field(redis: &Redis, section: &str, field: &str) -> u64 {
    let info = redis.strings(&[b"INFO", section.as_bytes()]).join("\n");
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")));
    line.and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
}
