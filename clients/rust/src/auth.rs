//! API keys: the `authorization: Bearer <token>` metadata every call of
//! [`OncelyClient`](crate::OncelyClient) and [`Worker`](crate::Worker)
//! sends once a key is set, kept out of `Debug` output, logs and errors.

use std::fmt;

use tonic::{
    Request,
    metadata::{AsciiMetadataValue, MetadataValue},
};

use crate::{ClientError, metadata::AUTHORIZATION};

/// The environment variable the examples (and [`api_key_from_env`]) read
/// the API key from.
pub const API_KEY_ENV: &str = "ONCELY_API_KEY";

/// The API key in `ONCELY_API_KEY`, if that variable is set and not empty
/// (surrounding whitespace removed). Nothing in this crate reads the
/// environment by itself: pass the result on yourself,
///
/// ```no_run
/// use oncely_client::{OncelyClient, api_key_from_env};
///
/// # fn example() -> Result<(), oncely_client::ClientError> {
/// let mut client = OncelyClient::connect("http://127.0.0.1:50051")?;
/// if let Some(token) = api_key_from_env() {
///     client = client.with_api_key(token)?;
/// }
/// # Ok(())
/// # }
/// ```
///
/// or as [`WorkerOptions::api_key`](crate::WorkerOptions::api_key).
pub fn api_key_from_env() -> Option<String> {
    non_empty(std::env::var(API_KEY_ENV).ok())
}

/// `value` without surrounding whitespace, unless that leaves nothing.
fn non_empty(value: Option<String>) -> Option<String> {
    let value = value?;
    let token = value.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// An API key as the `authorization` value it is sent as. Its `Debug`
/// shows `"***"`, never the token.
#[derive(Clone)]
pub(crate) struct ApiKey(AsciiMetadataValue);

impl ApiKey {
    /// The key `token` (the token alone, without `Bearer `; surrounding
    /// whitespace is removed), if it can be sent as metadata: one or more
    /// visible ASCII characters. The error never holds the token.
    pub(crate) fn new(token: &str) -> Result<Self, ClientError> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ClientError::InvalidApiKey);
        }
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ClientError::InvalidApiKey)?;
        // Kept out of HTTP/2 header compression tables, and out of the
        // value's own `Debug`.
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// The `authorization` value, `Bearer <token>`.
    #[cfg(test)]
    pub(crate) fn value(&self) -> &AsciiMetadataValue {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Adds `key`, if any, to `request` as `authorization: Bearer <token>`.
pub(crate) fn authorize<T>(request: &mut Request<T>, key: Option<&ApiKey>) {
    if let Some(key) = key {
        request.metadata_mut().insert(AUTHORIZATION, key.0.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "oncely_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn a_key_is_sent_as_a_bearer_token() {
        let key = ApiKey::new(TOKEN).expect("a valid token");
        let mut request = Request::new(());
        authorize(&mut request, Some(&key));
        let sent = request.metadata().get(AUTHORIZATION).expect("the header");
        assert_eq!(sent.to_str().expect("ascii"), format!("Bearer {TOKEN}"));
        assert!(sent.is_sensitive());
        // Surrounding whitespace, say a newline read from a file, is dropped.
        let trimmed = ApiKey::new(&format!("  {TOKEN}\n")).expect("valid");
        assert_eq!(trimmed.value(), key.value());
    }

    #[test]
    fn no_key_sends_no_header() {
        let mut request = Request::new(());
        authorize(&mut request, None);
        assert!(request.metadata().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn tokens_that_cannot_be_metadata_are_refused_without_echoing_them() {
        for bad in [
            "",
            "  ",
            "Bearer oncely_x",
            "oncely_é",
            "one\ntwo",
            "tab\tin",
        ] {
            let error = ApiKey::new(bad).expect_err(bad);
            assert!(matches!(error, ClientError::InvalidApiKey), "{bad:?}");
            let shown = format!("{error} {error:?}");
            assert!(
                !shown.contains("oncely_") && !shown.contains("two"),
                "{shown}"
            );
        }
    }

    #[test]
    fn an_unset_or_blank_variable_is_no_key() {
        assert_eq!(non_empty(None), None);
        assert_eq!(non_empty(Some(" \n".into())), None);
        assert_eq!(
            non_empty(Some(format!("{TOKEN}\n"))),
            Some(TOKEN.to_owned())
        );
    }

    #[test]
    fn debug_never_shows_the_token() {
        let key = ApiKey::new(TOKEN).expect("valid");
        assert_eq!(format!("{key:?}"), "\"***\"");
        assert_eq!(format!("{:?}", Some(key)), "Some(\"***\")");
    }
}
