//! The store on a real local Redis Cluster (three masters with a replica each): the store
//! contracts, and generations whose sessions live on the cluster while workers die.

use std::time::Duration;

use bd3lm_kvstore::{RedisConnection, StoreConfig, Stores};

use crate::cluster::{Cluster, RedisCluster};
use crate::distributed::{checkpoint, local, survives};

/// Both stores keep their contracts on a cluster: every script and multi-key command
/// names keys of one slot, and the client follows the slots to their masters.
#[test]
fn the_store_contracts_hold_on_a_redis_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisCluster::start(dir.path(), 2_000);
    let nodes: Vec<String> = redis.urls().split(',').map(String::from).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = RedisConnection::open_cluster(&nodes, Default::default()).unwrap();
        connection.ping().await.unwrap();
        let stores = Stores::redis(&connection, StoreConfig::default());
        bd3lm_kvstore::contract::check(stores.sessions).await;
        bd3lm_kvstore::contract::check_jobs(stores.jobs).await;
    });
}

/// A worker killed mid-generation while the session lives on the cluster: the other
/// worker continues it from the cluster with the tokens a local run gives.
#[test]
fn a_worker_killed_mid_generation_on_a_redis_cluster_loses_nothing() {
    let mut cluster = Cluster::start_on_redis_cluster(&checkpoint(), 2, ("rotate", &[]), 2_000);
    let args = ["--prompt-ids", "1022", "--max-tokens", "768", "--seed", "5"];
    survives(&mut cluster, &args, |cluster| cluster.workers[0].kill());
}

/// The master holding the session's slot is killed mid-generation: its replica takes over
/// (after the cluster's node timeout), the client follows the new slot map, any commit the
/// replica had not received is put back from the coordinator's tokens, and the client gets
/// the tokens a local run gives.
#[test]
fn a_master_killed_mid_generation_loses_nothing() {
    let mut cluster = Cluster::start_on_redis_cluster(&checkpoint(), 2, ("affinity", &[]), 1_000);
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "1536",
        "--seed",
        "11",
    ];
    survives(&mut cluster, &args, |cluster| {
        let redis = cluster.redis_cluster.as_mut().unwrap();
        let (master, _) = redis.generating();
        redis.nodes[master].stop();
    });
    let redis = cluster.redis_cluster.as_ref().unwrap();
    redis.wait_ok(Duration::from_secs(30));
}

/// The slot of the session moves to another master mid-generation, its keys migrated
/// one by one while the generation writes them: the clients follow ASK (and ride out
/// TRYAGAIN while the slot's keys are split between the masters), then MOVED, and the
/// client gets the tokens a local run gives.
#[test]
fn a_slot_migrated_mid_generation_loses_nothing() {
    let mut cluster = Cluster::start_on_redis_cluster(&checkpoint(), 2, ("affinity", &[]), 2_000);
    let args = [
        "--prompt-ids",
        "1022",
        "--max-tokens",
        "1536",
        "--seed",
        "13",
    ];
    let mut moved = None;
    survives(&mut cluster, &args, |cluster| {
        let redis = cluster.redis_cluster.as_ref().unwrap();
        let (from, lease) = redis.generating();
        let to = redis.migrate_slot_of(&lease);
        moved = Some((from, to, lease.replace(":lease", ":record")));
    });
    let (from, to, record) = moved.unwrap();
    let redis = cluster.redis_cluster.as_ref().unwrap();
    let holds = |node: usize| !redis.nodes[node].keys(&record).is_empty();
    assert!(
        from != to && holds(to) && !holds(from),
        "the session lives on its new master only"
    );
}

/// With `--redis-sync-replicas 1` every session write waits for its master's replica
/// (Redis' `WAIT`, routed to the session's slot): the generation gives a local run's
/// tokens, and the masters answered a `WAIT` for every committed block.
#[test]
fn synchronous_replication_waits_for_the_replica_of_every_write() {
    let sync = [
        "--redis-sync-replicas",
        "1",
        "--redis-sync-timeout-ms",
        "2000",
    ];
    let cluster =
        Cluster::start_on_redis_cluster_with(&checkpoint(), 2, ("rotate", &[]), 2_000, &sync);
    let args = ["--prompt-ids", "1022", "--max-tokens", "120", "--seed", "9"];
    let out = cluster.generate(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, local(&args));
    let redis = cluster.redis_cluster.as_ref().unwrap();
    let waits: u64 = redis
        .nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| {
            let stats = n.strings(&[b"INFO", b"commandstats"]).join("\n");
            let calls = stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_wait:calls="));
            calls
                .and_then(|c| c.split(',').next()?.parse().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(waits >= 30, "{waits} WAITs for 30 blocks");
}
