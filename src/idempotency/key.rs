//! The `idempotency-key` newtype: parsed once, valid from then on.

use std::fmt;

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A client-chosen idempotency key: 1 to 255 visible ASCII characters
/// (0x21 to 0x7E). Clients should send a UUID v4.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyKeyError {
    /// The key is the empty string.
    #[error("the idempotency-key is empty; send a UUID v4")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("the idempotency-key is {0} bytes long; at most 255 are allowed")]
    TooLong(usize),
    /// The key holds a byte outside visible ASCII.
    #[error(
        "the idempotency-key holds a character outside visible ASCII (0x21 to 0x7E) at byte {0}"
    )]
    BadCharacter(usize),
    /// The metadata holds more than one key.
    #[error("the request holds {0} idempotency-key values; send exactly one")]
    Repeated(usize),
    /// `idempotency-fallback` names no rule oncely has.
    #[error("idempotency-fallback may only be `fingerprint`; send that, or leave it out")]
    UnknownFallback,
}

impl IdempotencyKey {
    /// Parses a key from raw metadata bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, IdempotencyKeyError> {
        if bytes.is_empty() {
            return Err(IdempotencyKeyError::Empty);
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(IdempotencyKeyError::TooLong(bytes.len()));
        }
        if let Some(at) = bytes.iter().position(|b| !(0x21..=0x7e).contains(b)) {
            return Err(IdempotencyKeyError::BadCharacter(at));
        }
        // Every byte is ASCII, so this cannot fail; map instead of unwrapping.
        std::str::from_utf8(bytes)
            .map(|s| Self(s.to_owned()))
            .map_err(|e| IdempotencyKeyError::BadCharacter(e.valid_up_to()))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = IdempotencyKeyError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::parse(value.as_bytes())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_a_valid_key() {
        let key = IdempotencyKey::try_from("0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11").unwrap();
        assert_eq!(key.as_str(), "0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11");
    }

    #[test]
    fn visible_ascii_bounds_are_accepted() {
        assert!(IdempotencyKey::try_from("!~").is_ok());
        assert!(IdempotencyKey::try_from("a".repeat(255).as_str()).is_ok());
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert_eq!(
            IdempotencyKey::try_from(""),
            Err(IdempotencyKeyError::Empty)
        );
        assert_eq!(
            IdempotencyKey::try_from("a".repeat(256).as_str()),
            Err(IdempotencyKeyError::TooLong(256))
        );
        assert_eq!(
            IdempotencyKey::try_from("a b"),
            Err(IdempotencyKeyError::BadCharacter(1))
        );
        assert_eq!(
            IdempotencyKey::try_from("ab\u{7f}"),
            Err(IdempotencyKeyError::BadCharacter(2))
        );
        assert_eq!(
            IdempotencyKey::try_from("é"),
            Err(IdempotencyKeyError::BadCharacter(0))
        );
    }
}
