//! Prometheus metrics: a binary started with `--metrics-addr` serves the text format at
//! `GET /metrics` there. Names start with `bd3lm_` and end with their unit; durations are
//! histograms with fixed buckets (so they aggregate across pods), not summaries.
//!
//! The libraries record through the `metrics` facade; without an installed recorder
//! (tests, a binary without `--metrics-addr`) recording is a no-op.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

/// Where to serve metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct MetricsArgs {
    /// Address to serve Prometheus metrics on (`GET /metrics`, plain HTTP); without it
    /// no metrics are served.
    #[arg(
        long = "metrics-addr",
        env = "BD3LM_METRICS_ADDR",
        value_name = "HOST:PORT"
    )]
    pub metrics_addr: Option<SocketAddr>,
}

/// Bucket bounds of the `_seconds` histograms: a block takes milliseconds on a GPU and
/// seconds on a loaded CPU; a generation takes minutes.
const SECONDS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

/// Bucket bounds of the batch size histogram (sessions per forward pass).
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Bucket bounds of forward passes per token: 1/L' at best (a whole block per pass),
/// `1 + 1/L'` for one token per step, more for many-step samplers.
const PER_TOKEN: [f64; 11] = [
    0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0,
];

impl MetricsArgs {
    /// Installs the global recorder and serves it, on the current tokio runtime, when an
    /// address was given.
    pub fn install(&self) -> anyhow::Result<()> {
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        builder()?
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        metrics::describe_counter!(
            LIMIT_REFUSALS,
            "Requests refused by a limit (RESOURCE_EXHAUSTED or ABORTED), by limit"
        );
        metrics::describe_counter!(
            "bd3lm_unauthenticated_total",
            "Calls refused for want of an accepted API key or internal token"
        );
        Ok(())
    }
}

const LIMIT_REFUSALS: &str = "bd3lm_limit_refusals_total";

/// Counts a request refused by `limit` (every limit has a status and this counter).
pub fn refused(limit: &'static str) {
    metrics::counter!(LIMIT_REFUSALS, "limit" => limit).increment(1);
}

/// A recorder with the buckets above and no endpoint, to render in tests.
pub fn recorder() -> PrometheusRecorder {
    builder()
        .expect("the bucket lists are not empty")
        .build_recorder()
}

/// The value of `series` (its name, with its labels as rendered) in Prometheus `text`,
/// as a scrape reader (or a test of [`recorder`]) sees it.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .and_then(|(_, value)| value.parse().ok())
}

fn builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)?
        .set_buckets_for_metric(Matcher::Full("bd3lm_batch_size".into()), &BATCH)?
        .set_buckets_for_metric(
            Matcher::Full("bd3lm_forward_passes_per_token".into()),
            &PER_TOKEN,
        )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_render_as_histograms_with_the_buckets() {
        let recorder = recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("bd3lm_test_duration_seconds").record(0.003);
            metrics::histogram!("bd3lm_batch_size").record(3.0);
        });
        let text = handle.render();
        assert!(
            text.contains("bd3lm_test_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bd3lm_test_duration_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("bd3lm_batch_size_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert_eq!(sample(&text, "bd3lm_batch_size_count"), Some(1.0));
        assert_eq!(
            sample(&text, "bd3lm_batch_size_bucket{le=\"2\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "bd3lm_batch_size"), None);
    }

    #[test]
    fn no_address_serves_nothing() {
        MetricsArgs::default().install().unwrap();
    }
}
