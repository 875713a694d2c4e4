//! The call's own deadline, from the `grpc-timeout` request metadata, so
//! long polls answer before the caller gives up on them.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// The share of the caller's time kept back for the answer to travel.
const MARGIN_DIVISOR: u32 = 10;
/// The most time kept back.
const MAX_MARGIN: Duration = Duration::from_millis(500);

/// How long a long poll may wait: `wanted`, but never past the caller's
/// deadline nor the server's `request_timeout` (less a margin for the
/// answer to arrive).
pub(super) fn bounded_wait(
    metadata: &MetadataMap,
    wanted: Duration,
    request_timeout: Duration,
) -> Duration {
    let limit = grpc_timeout(metadata).map_or(request_timeout, |t| t.min(request_timeout));
    let margin = (limit / MARGIN_DIVISOR).min(MAX_MARGIN);
    wanted.min(limit.saturating_sub(margin))
}

/// The `grpc-timeout` header: at most 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`). `None` when absent or malformed.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(timeout: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", timeout.parse().unwrap());
        metadata
    }

    #[test]
    fn the_wait_ends_before_the_callers_deadline() {
        let wanted = Duration::from_secs(30);
        let server = Duration::from_secs(90);
        assert_eq!(bounded_wait(&MetadataMap::new(), wanted, server), wanted);
        assert_eq!(
            bounded_wait(&metadata("1S"), wanted, server),
            Duration::from_millis(900)
        );
        assert_eq!(bounded_wait(&metadata("2M"), wanted, server), wanted);
        assert_eq!(
            bounded_wait(&metadata("10000m"), wanted, server),
            Duration::from_millis(9500)
        );
        assert_eq!(bounded_wait(&metadata("bogus"), wanted, server), wanted);
        assert_eq!(
            bounded_wait(&metadata("123456789S"), wanted, server),
            wanted
        );
        // The server's own timeout bounds a long poll too.
        assert_eq!(
            bounded_wait(&MetadataMap::new(), wanted, Duration::from_secs(10)),
            Duration::from_millis(9500)
        );
    }
}
