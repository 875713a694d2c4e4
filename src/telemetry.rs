//! Logs and traces.
//!
//! - Logs go to standard error (standard output stays for command
//!   output), as text or as one JSON object per line (`LOG_FORMAT`);
//!   `RUST_LOG` sets the verbosity (default `info`). Every line of a call
//!   carries its request id, and its trace id when it has one.
//! - Traces are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, named by
//!   `OTEL_SERVICE_NAME`; nothing is exported otherwise. A W3C
//!   `traceparent` in a call's metadata becomes the parent of its span.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the spans' fields (request id, trace
    /// id) in `spans`.
    Json,
}

/// Whether spans are exported: their OpenTelemetry fields (span name and
/// kind) are added only then, so that text logs stay short.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// What [`init`] set up; [`Telemetry::shutdown`] sends the spans still
/// buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter, if there is one.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The SDK's shutdown blocks until the last export is done.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Whether the environment names an OTLP collector for traces.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
}

/// Installs the global subscriber: logs in `format`, and trace export when
/// the environment asks for it. Must run inside the tokio runtime (the
/// exporter's channel lives there). A second call keeps the first set-up.
pub fn init(format: LogFormat) -> Telemetry {
    init_with(format, "info")
}

/// [`init`], with `default_filter` in place of `info` when `RUST_LOG` is
/// unset.
pub fn init_with(format: LogFormat, default_filter: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours for a terminal only, not for a file or a client's log.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut exporter_error = None;
    let provider = if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    // Reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
                    .with_resource(opentelemetry_sdk::Resource::builder().build())
                    .with_batch_exporter(exporter)
                    .build(),
            ),
            Err(error) => {
                exporter_error = Some(error.to_string());
                None
            }
        }
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Only oncely's own spans, at info and above, whatever RUST_LOG says
    // about logs.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("oncely"))
            .with_filter(Targets::new().with_target("oncely", tracing::Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init()
        .is_ok();
    if installed {
        EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    }
    if let Some(error) = exporter_error {
        tracing::error!(%error, "cannot export traces: check OTEL_EXPORTER_OTLP_ENDPOINT");
    } else if installed && provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

/// The span of one call to `service` and `method` (as its path asks for
/// them), around everything the server does for it: a new request id, the
/// method, and (recorded when known) the gRPC status code and the trace
/// id. A `traceparent` in the metadata becomes its parent. Only the path
/// and the headers are read, whatever the body.
pub fn request_span<B>(request: &http::Request<B>, service: &str, method: &str) -> tracing::Span {
    let path = request.uri().path();
    let request_id = uuid::Uuid::new_v4();
    let span = if EXPORTING.load(Ordering::Relaxed) {
        tracing::info_span!(
            "request",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            request_id = %request_id,
            trace_id = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            "request",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            request_id = %request_id,
            trace_id = tracing::field::Empty,
        )
    };
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(request.headers()))
    });
    let incoming = parent.span().span_context().clone();
    // Fails only when traces are not exported; the trace id is logged anyway.
    let _ = span.set_parent(parent);
    let exported = span.context().span().span_context().clone();
    if exported.is_valid() {
        span.record("trace_id", exported.trace_id().to_string());
    } else if incoming.is_valid() {
        span.record("trace_id", incoming.trace_id().to_string());
    }
    span
}

/// An error and all its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        // Some errors repeat their source's message in their own; say it once.
        if !last.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        last = message;
        source = cause.source();
    }
    text
}
