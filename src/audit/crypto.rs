//! Encryption at rest for audit text: XChaCha20-Poly1305 (RustCrypto
//! `chacha20poly1305`), a fresh random 192-bit nonce per record, the record's
//! `request_id` as associated data (a ciphertext moved to another row fails
//! to open), and a key id stored beside each ciphertext so keys can rotate.
//!
//! Rotation: put the new key in `audit.encryption_key` and the old one in
//! `audit.previous_encryption_keys`. New records are sealed with the new key;
//! old ones still open with the old key, found by key id. Once every record
//! sealed with the old key has aged past `retention_days`, drop the old key.

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256};

/// Length of a key in bytes (256 bits).
pub const KEY_LEN: usize = 32;

/// Why text could not be sealed or opened. Messages never contain text or
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The record names a key id that is not loaded.
    #[error("record was encrypted with key id `{wanted}`, which is not loaded (loaded: {loaded}); supply that key via CAREWALL__AUDIT__ENCRYPTION_KEY or audit.previous_encryption_keys")]
    UnknownKey { wanted: String, loaded: String },
    /// Authentication failed: the key is wrong or the bytes were altered.
    #[error("cannot decrypt record text with key `{key_id}`: wrong key or tampered ciphertext")]
    Decrypt { key_id: String },
    /// Encryption failed (only on absurd input sizes).
    #[error("cannot encrypt record text")]
    Encrypt,
    /// A stored nonce had the wrong length.
    #[error("stored nonce is {0} bytes, expected 24")]
    BadNonce(usize),
    /// A key could not be parsed.
    #[error("{0}")]
    BadKey(String),
}

/// One 256-bit key and its id.
#[derive(Clone)]
pub struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Build a key from raw bytes. The id is a hash of the key, so the same
    /// key always has the same id and the id reveals nothing useful.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Key {
        let mut h = Sha256::new();
        h.update(b"carewall-audit-key-id:");
        h.update(bytes);
        let digest = h.finalize();
        let id = hex(&digest[..8]);
        Key {
            id,
            cipher: XChaCha20Poly1305::new(bytes.into()),
        }
    }

    /// Parse base64 (standard alphabet, padding optional, surrounding
    /// whitespace ignored) of exactly 32 bytes. `what` names the setting in
    /// error messages.
    pub fn from_base64(text: &str, what: &str) -> Result<Key, CryptoError> {
        decode_key_bytes(text, what).map(|b| Key::from_bytes(&b))
    }

    /// The key id stored next to each ciphertext.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Decode base64 of exactly 32 bytes; `what` names the setting in errors.
pub fn decode_key_bytes(text: &str, what: &str) -> Result<[u8; KEY_LEN], CryptoError> {
    let t = text.trim();
    let engine = base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::general_purpose::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(t).map_err(|_| {
        CryptoError::BadKey(format!(
            "{what}: not valid base64; generate a key with `openssl rand -base64 32`"
        ))
    })?;
    let len = bytes.len();
    <[u8; KEY_LEN]>::try_from(bytes).map_err(|_| {
        CryptoError::BadKey(format!(
            "{what}: must be base64 of exactly 32 bytes, got {len} bytes; generate a key with `openssl rand -base64 32`"
        ))
    })
}

/// Ciphertext plus what is needed to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The current key (seals and opens) and older keys (open only).
#[derive(Debug, Clone)]
pub struct Keyring {
    current: Key,
    previous: Vec<Key>,
}

impl Keyring {
    /// A keyring with one key.
    pub fn new(current: Key) -> Keyring {
        Keyring {
            current,
            previous: Vec::new(),
        }
    }

    /// Add a decrypt-only key (after a rotation).
    pub fn with_previous(mut self, key: Key) -> Keyring {
        if key.id != self.current.id && !self.previous.iter().any(|k| k.id == key.id) {
            self.previous.push(key);
        }
        self
    }

    /// Id of the key new records are sealed with.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Encrypt `plaintext`, binding it to `aad` (the request id).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        Ok(Sealed {
            key_id: self.current.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypt what [`Keyring::seal`] produced, with the key its id names.
    pub fn open(
        &self,
        key_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key = std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                wanted: key_id.to_string(),
                loaded: std::iter::once(&self.current)
                    .chain(self.previous.iter())
                    .map(|k| format!("`{}`", k.id))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if nonce.len() != 24 {
            return Err(CryptoError::BadNonce(nonce.len()));
        }
        key.cipher
            .decrypt(
                chacha20poly1305::XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt {
                key_id: key_id.to_string(),
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    hex(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; KEY_LEN])
    }

    #[test]
    fn round_trip_and_fresh_nonces() {
        let ring = Keyring::new(key(1));
        let a = ring.seal(b"req-1", "我很难过 sad".as_bytes()).unwrap();
        let b = ring.seal(b"req-1", "我很难过 sad".as_bytes()).unwrap();
        assert_ne!(a.nonce, b.nonce, "every record gets its own nonce");
        assert_ne!(a.ciphertext, b.ciphertext);
        let pt = ring
            .open(&a.key_id, &a.nonce, &a.ciphertext, b"req-1")
            .unwrap();
        assert_eq!(pt, "我很难过 sad".as_bytes());
        assert!(!a.ciphertext.windows(3).any(|w| w == b"sad"));
    }

    #[test]
    fn wrong_key_wrong_aad_and_rotation() {
        let old = Keyring::new(key(1));
        let sealed = old.seal(b"req-1", b"hello").unwrap();
        // A different key with the same id cannot happen; simulate a wrong
        // key by asking a ring that does not hold it.
        let other = Keyring::new(key(2));
        let err = other
            .open(&sealed.key_id, &sealed.nonce, &sealed.ciphertext, b"req-1")
            .unwrap_err();
        assert!(matches!(err, CryptoError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains(&sealed.key_id));
        // Moving the ciphertext to another record fails authentication.
        let err = old
            .open(&sealed.key_id, &sealed.nonce, &sealed.ciphertext, b"req-2")
            .unwrap_err();
        assert!(matches!(err, CryptoError::Decrypt { .. }));
        // After rotation the old key still opens old records.
        let rotated = Keyring::new(key(2)).with_previous(key(1));
        assert_eq!(
            rotated
                .open(&sealed.key_id, &sealed.nonce, &sealed.ciphertext, b"req-1")
                .unwrap(),
            b"hello"
        );
        assert_ne!(rotated.current_id(), sealed.key_id);
    }

    #[test]
    fn key_parsing_errors_name_the_setting() {
        let err = decode_key_bytes("AAAA", "audit.encryption_key").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("audit.encryption_key") && msg.contains("got 3 bytes"),
            "{msg}"
        );
        let err = decode_key_bytes("not base64!!", "audit.encryption_key").unwrap_err();
        assert!(err.to_string().contains("not valid base64"));
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(decode_key_bytes(&format!(" {b64}\n"), "k").is_ok());
        assert!(decode_key_bytes(b64.trim_end_matches('='), "k").is_ok());
    }
}
