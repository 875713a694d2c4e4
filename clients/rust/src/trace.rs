//! The caller's OpenTelemetry trace context on every call, with the
//! `opentelemetry` feature: a W3C `traceparent` (and `tracestate`) from
//! [`opentelemetry::Context::current`], so the server's spans join the
//! agent's trace. Without the feature, or outside any span, nothing is
//! added.
//!
//! With `tracing` and `tracing-opentelemetry`, make the span's context
//! current around the call: `client.create_task(r).with_context(span.context())`
//! (`opentelemetry::trace::FutureExt`).

/// Adds the current trace context to `request`, if there is one.
#[cfg(feature = "opentelemetry")]
pub(crate) fn propagate<T>(request: &mut tonic::Request<T>) {
    use opentelemetry::trace::TraceContextExt;

    let context = opentelemetry::Context::current();
    let span = context.span();
    let span = span.span_context();
    if !span.is_valid() {
        return;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    );
    let metadata = request.metadata_mut();
    if let Ok(value) = parent.parse() {
        metadata.insert("traceparent", value);
    }
    let state = span.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = state.parse()
    {
        metadata.insert("tracestate", value);
    }
}

/// Without the `opentelemetry` feature: nothing to add.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn propagate<T>(_request: &mut tonic::Request<T>) {}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use opentelemetry::{
        Context,
        trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    };

    use super::*;

    #[test]
    fn the_current_span_becomes_the_calls_traceparent() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _current = Context::current().with_remote_span_context(span).attach();
        let mut request = tonic::Request::new(());

        propagate(&mut request);

        assert_eq!(
            request.metadata().get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn outside_any_span_nothing_is_added() {
        let mut request = tonic::Request::new(());
        propagate(&mut request);
        assert!(request.metadata().get("traceparent").is_none());
    }
}
