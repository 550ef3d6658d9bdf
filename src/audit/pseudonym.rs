//! Pseudonymous conversation ids: HMAC-SHA256 over (tenant, raw key) with a
//! secret key, so the same user in the same tenant maps to the same id, ids
//! from different tenants never collide, and nobody without the key can test
//! a guessed user id against the table.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::crypto::{to_hex, KEY_LEN};

/// Turns raw conversation keys (user ids) into stable pseudonyms.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer { .. }")
    }
}

impl Pseudonymizer {
    /// A pseudonymizer keyed with `key`.
    pub fn new(key: [u8; KEY_LEN]) -> Pseudonymizer {
        Pseudonymizer { key }
    }

    /// Derive a pseudonym key from the encryption key, domain-separated so
    /// the two uses never share a key directly. Used when no
    /// `audit.pseudonym_key` is configured.
    pub fn derived_from(encryption_key: &[u8; KEY_LEN]) -> Pseudonymizer {
        let mut out = [0u8; KEY_LEN];
        let tag = mac(encryption_key, &[b"carewall pseudonym key v1"]);
        out.copy_from_slice(&tag);
        Pseudonymizer { key: out }
    }

    /// The pseudonym for `raw` within `tenant`: `c_` + 32 hex digits (128
    /// bits of the HMAC).
    pub fn conversation_id(&self, tenant: Option<&str>, raw: &str) -> String {
        let tenant = tenant.unwrap_or("");
        // Length-prefix the tenant so ("ab","c") and ("a","bc") differ.
        let len = (tenant.len() as u64).to_be_bytes();
        let tag = mac(&self.key, &[&len, tenant.as_bytes(), raw.as_bytes()]);
        format!("c_{}", to_hex(&tag[..16]))
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_keyed_and_tenant_scoped() {
        let p = Pseudonymizer::new([1; 32]);
        let a = p.conversation_id(Some("t1"), "user-42");
        assert_eq!(a, p.conversation_id(Some("t1"), "user-42"));
        assert!(a.starts_with("c_") && a.len() == 34);
        assert!(!a.contains("user-42"));
        assert_ne!(a, p.conversation_id(Some("t2"), "user-42"));
        assert_ne!(a, p.conversation_id(Some("t1"), "user-43"));
        assert_ne!(
            a,
            Pseudonymizer::new([2; 32]).conversation_id(Some("t1"), "user-42")
        );
        assert_ne!(
            p.conversation_id(Some("ab"), "c"),
            p.conversation_id(Some("a"), "bc")
        );
        let d = Pseudonymizer::derived_from(&[1; 32]);
        assert_ne!(a, d.conversation_id(Some("t1"), "user-42"));
    }
}
