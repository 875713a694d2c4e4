//! The call's own deadline, from the `grpc-timeout` request metadata, so
//! long polls answer before the caller gives up on them.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// The share of the caller's time kept back for the last read and the
/// answer: the database, the layers, the network, a busy machine.
const MARGIN_DIVISOR: u32 = 10;
/// The least time kept back (unless the deadline is shorter than twice
/// it: then half of it): a busy two-core server still answers in time.
const MIN_MARGIN: Duration = Duration::from_millis(500);
/// The most time kept back.
const MAX_MARGIN: Duration = Duration::from_secs(1);

/// How long a long poll may wait: `wanted`, but never past the caller's
/// deadline nor the server's `request_timeout`, less a margin for the last
/// read and the answer to arrive: a tenth of that limit, at least half a
/// second and at most a second, and never more than half of it.
pub(super) fn bounded_wait(
    metadata: &MetadataMap,
    wanted: Duration,
    request_timeout: Duration,
) -> Duration {
    let limit = grpc_timeout(metadata).map_or(request_timeout, |t| t.min(request_timeout));
    let margin = (limit / MARGIN_DIVISOR)
        .clamp(MIN_MARGIN, MAX_MARGIN)
        .min(limit / 2);
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
        let ms = Duration::from_millis;
        assert_eq!(bounded_wait(&MetadataMap::new(), wanted, server), wanted);
        // At least half a second held back...
        assert_eq!(bounded_wait(&metadata("1S"), wanted, server), ms(500));
        assert_eq!(bounded_wait(&metadata("3S"), wanted, server), ms(2500));
        // ...a tenth of longer deadlines, at most a second...
        assert_eq!(bounded_wait(&metadata("8S"), wanted, server), ms(7200));
        assert_eq!(bounded_wait(&metadata("10000m"), wanted, server), ms(9000));
        assert_eq!(bounded_wait(&metadata("40S"), wanted, server), wanted);
        assert_eq!(bounded_wait(&metadata("2M"), wanted, server), wanted);
        // ...and half of a deadline under a second.
        assert_eq!(bounded_wait(&metadata("600m"), wanted, server), ms(300));
        assert_eq!(bounded_wait(&metadata("bogus"), wanted, server), wanted);
        assert_eq!(
            bounded_wait(&metadata("123456789S"), wanted, server),
            wanted
        );
        // The server's own timeout bounds a long poll too.
        assert_eq!(
            bounded_wait(&MetadataMap::new(), wanted, Duration::from_secs(10)),
            ms(9000)
        );
    }
}
