//! Who may use the gateway: the bearer token of a request, and the
//! `server.client_keys` check on `/v1/*`.
//!
//! Invariant: a presented key is never logged or stored; the only things
//! that leave this module are a yes/no and, via [`bearer_token`], the key
//! for hashing (the audit tenant fingerprint, the admin token comparison).

use http::header;

use crate::config::{ClientKeys, KeyGrant, KeyRefusal};
use crate::error::GatewayError;

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 7235), trimmed; `None` when absent or empty.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// With `server.client_keys` set, `/v1/*` needs one of those keys, not
/// expired, as `Authorization: Bearer <key>`, and gets what it grants
/// (tenant, policy binding); without, every client is let through
/// (`Ok(None)`).
pub fn check_client_key(
    keys: &ClientKeys,
    headers: &http::HeaderMap,
) -> Result<Option<KeyGrant>, GatewayError> {
    if !keys.is_enabled() {
        return Ok(None);
    }
    let Some(k) = bearer_token(headers) else {
        return Err(GatewayError::Unauthorized(
            "missing `Authorization: Bearer <key>` header: this gateway needs a client key (ask its operator; server.client_keys)",
        ));
    };
    match keys.grant(k, std::time::SystemTime::now()) {
        Ok(g) => Ok(Some(g.clone())),
        Err(KeyRefusal::Unknown) => Err(GatewayError::Unauthorized(
            "the client key is not accepted by this gateway (server.client_keys)",
        )),
        Err(KeyRefusal::Expired) => Err(GatewayError::Unauthorized(
            "the client key has expired: ask the gateway's operator for a new one (server.client_keys: expires)",
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
