//! Who may use the gateway: the bearer token of a request, and the
//! `server.client_keys` check on `/v1/*`.
//!
//! Invariant: a presented key is never logged or stored; the only things
//! that leave this module are a yes/no and, via [`bearer_token`], the key
//! for hashing (the audit tenant fingerprint, the admin token comparison).

use http::header;

use crate::config::ClientKeys;
use crate::error::GatewayError;

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 7235), trimmed; `None` when absent or empty.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// With `server.client_keys` set, `/v1/*` needs one of those keys as
/// `Authorization: Bearer <key>`; without, every client is let through.
pub fn check_client_key(keys: &ClientKeys, headers: &http::HeaderMap) -> Result<(), GatewayError> {
    if !keys.is_enabled() {
        return Ok(());
    }
    match bearer_token(headers) {
        None => Err(GatewayError::Unauthorized(
            "missing `Authorization: Bearer <key>` header: this gateway needs a client key (ask its operator; server.client_keys)",
        )),
        Some(k) if keys.accepts(k) => Ok(()),
        Some(_) => Err(GatewayError::Unauthorized(
            "the client key is not accepted by this gateway (server.client_keys)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().expect("header"));
        h
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_trimmed() {
        assert_eq!(bearer_token(&headers("Bearer abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("BEARER  abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&http::HeaderMap::new()), None);
    }
}
