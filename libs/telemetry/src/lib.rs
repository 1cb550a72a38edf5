//! Tracing for every binary: logs to stderr, and spans exported over OTLP to any
//! OpenTelemetry backend when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The W3C
//! trace context travels in gRPC metadata, so a worker's spans are children of the
//! coordinator's request span. [`cli`] is the edge every binary shares: arguments,
//! one-line errors, exit codes; [`shutdown`] the graceful stop every server shares.
#![warn(missing_docs)]

pub mod cli;
pub mod metrics;
pub mod probes;
pub mod shutdown;

use std::process::ExitCode;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Flushes and stops span export when dropped (at the end of `main`).
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing traces: {e}");
        }
    }
}

/// Installs the global subscriber of `service`: an `env_filter` (RUST_LOG overrides it)
/// for the logs, and OTLP export of spans when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service: &'static str, env_filter: &str) -> anyhow::Result<Guard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(env_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        Registry::default().with(fmt).try_init()?;
        return Ok(Guard { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let provider = provider(service).with_batch_exporter(exporter).build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(EnvFilter::new("info"));
    Registry::default().with(fmt).with(otel).try_init()?;
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Ok(Guard {
        provider: Some(provider),
    })
}

/// The `main` of a service binary: the async runtime, tracing for `service`, then its
/// arguments (a bad one is one line on stderr and exit code 2), then `run`, whose error
/// is printed as one line with exit code 2 after the spans are flushed. The runtime's
/// threads start here, so whatever must precede every thread comes before the call.
pub fn run_service<A, F>(service: &'static str, run: impl FnOnce(A) -> F) -> ExitCode
where
    A: clap::Parser,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return cli::fail(&anyhow::Error::new(e).context("starting the async runtime")),
    };
    runtime.block_on(async {
        let telemetry = match init(service, "info") {
            Ok(t) => t,
            Err(e) => return cli::fail(&e.context("tracing")),
        };
        let result = run(cli::parse_args()).await;
        drop(telemetry);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => cli::fail(&e),
        }
    })
}

/// A tracer provider named after `service`.
pub fn provider(service: &'static str) -> opentelemetry_sdk::trace::TracerProviderBuilder {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    SdkTracerProvider::builder().with_resource(resource)
}

/// Writes the current span's trace context into outgoing gRPC metadata (`traceparent`).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

/// Makes `span` a child of the trace context in incoming gRPC metadata. Call it before
/// the span is first entered: a started span keeps its parent.
pub fn adopt(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    // Without an OpenTelemetry layer there is nothing to link: not an error.
    let _ = span.set_parent(parent);
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    /// A span that adopts the context injected by another span's metadata is its child in
    /// the same trace, as a worker's span is of the coordinator's request span.
    #[test]
    fn trace_context_in_metadata_links_worker_spans_to_the_request() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = provider("test")
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = Registry::default()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut metadata = tonic::metadata::MetadataMap::new();
            tracing::info_span!("coordinator.generate").in_scope(|| inject(&mut metadata));
            assert!(metadata.get("traceparent").is_some());
            let worker = tracing::info_span!("worker.denoise_block");
            adopt(&worker, &metadata);
            worker.in_scope(|| tracing::info!("denoising"));
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name} not exported"))
        };
        let (request, worker) = (find("coordinator.generate"), find("worker.denoise_block"));
        assert_eq!(
            worker.span_context.trace_id(),
            request.span_context.trace_id()
        );
        assert_eq!(worker.parent_span_id, request.span_context.span_id());
    }
}
