//! What an operator sees of the real binaries, run as the Helm chart runs them (TLS,
//! keys, metrics and health ports): Prometheus metrics that move with the traffic, and
//! the plain-text health ports that Kubernetes' gRPC probes use.

use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Observed, health_is_serving};
use crate::distributed::checkpoint;

/// The sum of the samples of `name` whose labels include `labels`, in Prometheus text.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, sample) = line.rsplit_once(' ')?;
            let (metric, tags) = match series.split_once('{') {
                Some((metric, tags)) => (metric, tags.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| tags.split(',').any(|t| t == format!("{k}=\"{v}\"")));
            wanted.then(|| sample.parse::<f64>().ok())?
        })
        .sum()
}

/// How far `name` (with `labels`) moved between two scrapes.
fn moved(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

/// Scrapes of a process before and after the traffic.
struct Scrapes {
    before: String,
    after: String,
}

impl Scrapes {
    fn moved(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        moved(&self.before, &self.after, name, labels)
    }
}

fn scrape_around(ports: &[&Observed], traffic: impl FnOnce()) -> Vec<Scrapes> {
    let before: Vec<String> = ports.iter().map(|p| p.scrape()).collect();
    traffic();
    before
        .into_iter()
        .zip(ports)
        .map(|(before, p)| Scrapes {
            before,
            after: p.scrape(),
        })
        .collect()
}

/// A generation moves the coordinator's request, generation, token, queue and store
/// metrics and the worker's block, batch, KV and store metrics, by what it did.
#[test]
fn metrics_move_with_a_generation() {
    let cluster = Cluster::start_observed(&checkpoint(), 1);
    let coordinator = cluster.coordinator_ports.clone().unwrap();
    let worker = cluster.worker_ports[0].clone();
    let mut ids = Vec::new();
    let scrapes = scrape_around(&[&coordinator, &worker], || {
        let out = cluster.generate(&["--prompt-ids", "1022", "--max-tokens", "32", "--seed", "3"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        ids = out.ids;
    });
    let (c, w) = (&scrapes[0], &scrapes[1]);
    let stream_ok = [("method", "GenerateStream"), ("code", "OK")];
    assert_eq!(
        c.moved("bd3lm_requests_total", &stream_ok),
        1.0,
        "{}",
        c.after
    );
    assert_eq!(c.moved("bd3lm_generations_total", &[]), 1.0, "{}", c.after);
    assert_eq!(
        c.moved("bd3lm_generated_tokens_total", &[]),
        ids.len() as f64
    );
    assert_eq!(c.moved("bd3lm_time_to_first_block_seconds_count", &[]), 1.0);
    // One run (fewer blocks than --max-run-blocks): one wait for a slot.
    assert_eq!(c.moved("bd3lm_queue_wait_seconds_count", &[]), 1.0);
    assert!(
        c.moved(
            "bd3lm_store_operation_duration_seconds_count",
            &[("op", "create")]
        ) >= 1.0
    );
    assert_eq!(value(&c.after, "bd3lm_workers_healthy", &[]), 1.0);
    assert_eq!(value(&c.after, "bd3lm_queue_blocks", &[]), 0.0);

    // Every block of the prompt's token and the 32 new ones was committed by the one
    // worker, in one run: the session stayed in its batch, its cache never looked up.
    let blocks = (1 + ids.len()).div_ceil(4) as f64;
    assert_eq!(
        w.moved("bd3lm_block_duration_seconds_count", &[]),
        blocks,
        "{}",
        w.after
    );
    assert_eq!(w.moved("bd3lm_forward_passes_per_token_count", &[]), blocks);
    assert!(w.moved("bd3lm_batch_size_count", &[]) >= blocks);
    assert_eq!(w.moved("bd3lm_kv_cache_lookups_total", &[]), 0.0);
    assert!(w.moved("bd3lm_kv_blob_written_bytes_total", &[]) > 0.0);
    assert!(
        w.moved(
            "bd3lm_store_operation_duration_seconds_count",
            &[("op", "commit")]
        ) >= blocks
    );
    assert!(value(&w.after, "bd3lm_kv_cache_bytes", &[]) > 0.0);
    assert_eq!(value(&w.after, "bd3lm_worker_blocks_in_flight", &[]), 0.0);
    // HELP lines come from the descriptions.
    assert!(
        w.after.contains("# HELP bd3lm_block_duration_seconds"),
        "{}",
        w.after
    );
}

/// Whether `check` gives `wanted` within 10 seconds.
fn becomes(wanted: bool, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() == wanted {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Kubernetes' gRPC probes cannot speak TLS: the plain-text health ports answer
/// liveness and readiness while the API ports refuse plain text; without its store the
/// coordinator is not ready but still live.
#[test]
fn probes_answer_in_plain_text_while_the_api_speaks_tls() {
    let mut cluster = Cluster::start_observed(&checkpoint(), 1);
    let coordinator = cluster.coordinator_ports.clone().unwrap();
    let worker = cluster.worker_ports[0].clone();
    // Readiness follows the workers' health checks: it may take a round to turn.
    assert!(becomes(true, || health_is_serving(&coordinator.health, "")));
    assert!(health_is_serving(
        &coordinator.health,
        "bd3lm.v1.Generation"
    ));
    assert!(health_is_serving(&worker.health, ""));
    assert!(health_is_serving(&worker.health, "bd3lm.v1.DenoiseWorker"));
    for ports in [&coordinator, &worker] {
        assert!(health_is_serving(&ports.health, "liveness"));
    }
    assert!(!health_is_serving(&cluster.addr, ""));
    assert!(!health_is_serving(&cluster.worker_addrs[0], ""));

    cluster.redis.stop();
    assert!(
        becomes(false, || health_is_serving(&coordinator.health, "")),
        "still ready without its store"
    );
    assert!(health_is_serving(&coordinator.health, "liveness"));
}
