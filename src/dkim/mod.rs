//! DKIM (RFC 6376) for the mail our users submit: signing keys made by
//! `letterbox dkim keygen`, the DNS record that publishes each one, and
//! the signature itself.
//!
//! - Keys live in the SQL directory (`dkim_keys`, beside the domains they
//!   sign for; `directory::dkim`), the private key as PKCS#8 PEM. One place
//!   to back up, shared by every letterbox on the same database, and no
//!   key files whose paths and modes could drift; Dovecot's role is granted
//!   the `dovecot_passdb` view only and never sees them.
//! - Two algorithms: RSA 2048 (`k=rsa`, the default: every verifier knows
//!   it) and Ed25519 (`k=ed25519`, RFC 8463: short, but not yet verified
//!   everywhere). A domain with both gets both signatures.
//! - Signing uses `mail-auth` on ring, relaxed/relaxed canonicalization,
//!   the usual header fields the message has, and From, Subject and
//!   Reply-To oversigned so none can be added unnoticed.
//!   RSA keys are generated with the `rsa` crate (ring cannot), which is
//!   used for nothing else.
//!
//! Key generation and signing block (CPU); callers on the runtime go
//! through `crate::blocking::run`. Parsed keys are kept (`parsed`):
//! ring checks an RSA key's consistency when it loads it, which cost more
//! than the signature itself when it was done for every message.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::common::headers::Writable;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Serialize;

/// RSA modulus size of generated keys: RFC 8301 §3.2 asks for at least
/// 1024 and recommends 2048; larger keys need records some DNS hosting
/// panels cannot hold.
pub const RSA_BITS: usize = 2048;

/// Header fields signed when the message has them. Absent ones are left
/// out: an MTA on the way may add a missing Date or Message-ID, and that
/// must not break the signature.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Header fields signed once more than they occur (RFC 6376 §8.15), so
/// that one added on the way, a second From say, breaks the signature.
pub const OVERSIGNED: &[&str] = &["From", "Subject", "Reply-To"];

/// The `h=` list for `message`: [`SIGNED_HEADERS`] that it has, then
/// [`OVERSIGNED`].
fn header_list(message: &[u8]) -> Vec<&'static str> {
    let mut present: Vec<&[u8]> = Vec::new();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            present.push(line[..colon].trim_ascii());
        }
    }
    SIGNED_HEADERS
        .iter()
        .filter(|h| present.iter().any(|p| p.eq_ignore_ascii_case(h.as_bytes())))
        .chain(OVERSIGNED)
        .copied()
        .collect()
}

/// Errors of keys and signatures.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error(
        "selector {0:?} is not valid: use letters, digits and hyphens, in dot-separated labels of at most 63"
    )]
    Selector(String),
    #[error("unknown DKIM algorithm {0:?}: use rsa or ed25519")]
    Algorithm(String),
    #[error("generating the key failed: {0}")]
    Generate(String),
    #[error("the stored private key of {selector}._domainkey.{domain} is unusable: {why}")]
    Key {
        domain: String,
        selector: String,
        why: String,
    },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// RSA 2048 with SHA-256 (`k=rsa`): verified everywhere.
    Rsa,
    /// Ed25519 with SHA-256 (`k=ed25519`, RFC 8463).
    Ed25519,
}

impl Algorithm {
    /// The name in the directory, the CLI and the record's `k=` tag.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = DkimError;

    fn from_str(s: &str) -> Result<Algorithm, DkimError> {
        match s {
            "rsa" => Ok(Algorithm::Rsa),
            "ed25519" => Ok(Algorithm::Ed25519),
            other => Err(DkimError::Algorithm(other.into())),
        }
    }
}

/// A new key pair.
#[derive(Clone)]
pub struct NewKey {
    pub algorithm: Algorithm,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_pem: String,
    /// The record's `p=`: base64 of the SubjectPublicKeyInfo (RSA) or of
    /// the raw 32-byte key (Ed25519, RFC 8463 §4.2).
    pub public: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("algorithm", &self.algorithm)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Generates a key pair. Blocking: RSA takes up to a second of CPU.
pub fn generate(algorithm: Algorithm) -> Result<NewKey, DkimError> {
    crate::blocking::assert_off_runtime("generating a DKIM key");
    let err = |e: &dyn fmt::Display| DkimError::Generate(e.to_string());
    let (der, public) = match algorithm {
        Algorithm::Rsa => {
            use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
            let key =
                rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, RSA_BITS).map_err(|e| err(&e))?;
            let der = key.to_pkcs8_der().map_err(|e| err(&e))?;
            let spki = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| err(&e))?;
            (der.as_bytes().to_vec(), STANDARD.encode(spki.as_bytes()))
        }
        Algorithm::Ed25519 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| err(&e))?;
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| err(&e))?;
            (der, STANDARD.encode(key.public_key()))
        }
    };
    Ok(NewKey {
        algorithm,
        private_pem: pem("PRIVATE KEY", &der),
        public,
    })
}

/// PEM: base64 in lines of 64 between BEGIN and END lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Normalizes a selector: lowercase, dot-separated labels of letters,
/// digits and inner hyphens (RFC 6376 §3.1: it becomes part of a DNS name).
pub fn selector(input: &str) -> Result<String, DkimError> {
    let s = input.trim().to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.len() > 200 || !s.split('.').all(label_ok) {
        return Err(DkimError::Selector(input.into()));
    }
    Ok(s)
}

/// The selector `keygen` picks when none is given: the date and the
/// algorithm, `20260715-rsa`. Dated, so the next key (a rotation) gets a
/// new name and both records can be published side by side; named for
/// the algorithm, so an RSA and an Ed25519 key made the same day differ.
pub fn default_selector(algorithm: Algorithm, today: chrono::NaiveDate) -> String {
    format!("{}-{}", today.format("%Y%m%d"), algorithm.name())
}

/// The TXT record for a key, as one zone-file line:
/// `SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=…; p=…"`, the value cut
/// into quoted strings of at most 255 bytes (RFC 1035 §3.3.14; RFC 6376
/// §3.6.2.2 joins them back without spaces).
pub fn dns_record(domain: &str, selector: &str, algorithm: Algorithm, public: &str) -> String {
    let value = format!("v=DKIM1; k={}; p={public}", algorithm.name());
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| {
            format!(
                "\"{}\"",
                std::str::from_utf8(c).expect("the value is ASCII")
            )
        })
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        strings.join(" ")
    )
}

/// A key to sign with, as stored.
#[derive(Clone)]
pub struct SigningKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    pub private_pem: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Signs `message` (the whole message, CRLF) with each key; returns the
/// DKIM-Signature fields, each ending CRLF, to put above it. Blocking: it
/// hashes the whole message.
pub fn sign(message: &[u8], keys: &[SigningKey]) -> Result<String, DkimError> {
    crate::blocking::assert_off_runtime("signing a message");
    let mut out = String::new();
    for key in keys {
        let header = match &*parsed(key)? {
            Parsed::Rsa(k) => sign_with(DkimSigner::from_key(Kept(k.clone())), key, message)?,
            Parsed::Ed25519(k) => sign_with(DkimSigner::from_key(Kept(k.clone())), key, message)?,
        };
        out.push_str(&header);
    }
    Ok(out)
}

/// A private key as ring loaded it.
enum Parsed {
    Rsa(Arc<RsaKey<Sha256>>),
    Ed25519(Arc<Ed25519Key>),
}

/// The keys loaded so far, by their PEM text: a key replaced in the
/// directory is a new entry. Bounded: past 256 keys (far more than any
/// server signs with) it starts again.
fn parsed(key: &SigningKey) -> Result<Arc<Parsed>, DkimError> {
    static LOADED: OnceLock<Mutex<HashMap<String, Arc<Parsed>>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(Default::default);
    if let Some(p) = loaded.lock().unwrap().get(&key.private_pem) {
        return Ok(p.clone());
    }
    let p = Arc::new(load(key)?);
    let mut loaded = loaded.lock().unwrap();
    if loaded.len() >= 256 {
        loaded.clear();
    }
    loaded.insert(key.private_pem.clone(), p.clone());
    Ok(p)
}

fn load(key: &SigningKey) -> Result<Parsed, DkimError> {
    let bad = |why: String| DkimError::Key {
        domain: key.domain.clone(),
        selector: key.selector.clone(),
        why,
    };
    let der = PrivateKeyDer::from_pem_slice(key.private_pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    match key.algorithm {
        Algorithm::Rsa => {
            let k = match &der {
                PrivateKeyDer::Pkcs8(d) => RsaKey::<Sha256>::from_pkcs8_der(d.secret_pkcs8_der()),
                PrivateKeyDer::Pkcs1(d) => RsaKey::<Sha256>::from_der(d.secret_pkcs1_der()),
                _ => return Err(bad("not an RSA key".into())),
            }
            .map_err(|e| bad(e.to_string()))?;
            Ok(Parsed::Rsa(Arc::new(k)))
        }
        Algorithm::Ed25519 => {
            let PrivateKeyDer::Pkcs8(d) = &der else {
                return Err(bad("not a PKCS#8 Ed25519 key".into()));
            };
            let k = Ed25519Key::from_pkcs8_maybe_unchecked_der(d.secret_pkcs8_der())
                .map_err(|e| bad(e.to_string()))?;
            Ok(Parsed::Ed25519(Arc::new(k)))
        }
    }
}

/// A kept key lent to a signer, which wants one it owns.
struct Kept<K>(Arc<K>);

impl<K: mail_auth::common::crypto::SigningKey> mail_auth::common::crypto::SigningKey for Kept<K> {
    type Hasher = K::Hasher;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> mail_auth::common::crypto::Algorithm {
        self.0.algorithm()
    }
}

fn sign_with<T: mail_auth::common::crypto::SigningKey>(
    signer: DkimSigner<T, mail_auth::dkim::NeedDomain>,
    key: &SigningKey,
    message: &[u8],
) -> Result<String, DkimError> {
    let signature = signer
        .domain(key.domain.clone())
        .selector(key.selector.clone())
        .headers(header_list(message))
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .sign(message)
        .map_err(|e| DkimError::Sign(e.to_string()))?;
    let mut header = signature.to_header();
    if !header.ends_with("\r\n") {
        header.push_str("\r\n");
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(selector(" Mail-2026 ").unwrap(), "mail-2026");
        assert_eq!(selector("a.b").unwrap(), "a.b");
        for bad in ["", "a_b", "-a", "a-", "a..b", "a b", "ä"] {
            assert!(selector(bad).is_err(), "{bad}");
        }
        let day = chrono::NaiveDate::from_ymd_opt(2026, 7, 15).unwrap();
        assert_eq!(default_selector(Algorithm::Rsa, day), "20260715-rsa");
        assert_eq!(
            default_selector(Algorithm::Ed25519, day),
            "20260715-ed25519"
        );
    }

    #[test]
    fn records_split_at_255_bytes() {
        let short = dns_record("example.org", "s", Algorithm::Ed25519, "AAAA");
        assert_eq!(
            short,
            "s._domainkey.example.org. IN TXT \"v=DKIM1; k=ed25519; p=AAAA\""
        );
        let long = dns_record("example.org", "s", Algorithm::Rsa, &"B".repeat(400));
        let (_, value) = long.split_once(" IN TXT ").unwrap();
        let parts: Vec<&str> = value.split("\" \"").collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len() - 1, 255, "the first string is full");
        let joined: String = parts.concat().replace('"', "");
        assert_eq!(joined, format!("v=DKIM1; k=rsa; p={}", "B".repeat(400)));
    }

    #[test]
    fn only_present_fields_are_signed_and_some_oversigned() {
        let msg = b"Subject: s\r\nfrom: a@b\r\nX-Other: 1\r\n folded: no\r\n\r\nDate: body\r\n";
        assert_eq!(
            header_list(msg),
            ["From", "Subject", "From", "Subject", "Reply-To"]
        );
    }

    #[test]
    fn keys_sign() {
        crate::blocking::allowed(|| {
            let msg = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
            for alg in [Algorithm::Ed25519, Algorithm::Rsa] {
                let k = generate(alg).unwrap();
                assert!(k.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
                let key = SigningKey {
                    domain: "example.org".into(),
                    selector: "s".into(),
                    algorithm: alg,
                    private_pem: k.private_pem.clone(),
                };
                let h = sign(msg, &[key]).unwrap();
                assert!(h.starts_with("DKIM-Signature: v=1; a="), "{h}");
                assert!(
                    h.contains("; s=s; d=example.org; c=relaxed/relaxed;"),
                    "{h}"
                );
                assert!(h.contains("h=Subject:From:From:Subject:Reply-To;"), "{h}");
                assert!(h.ends_with("\r\n") && !h.ends_with("\r\n\r\n"), "{h:?}");
            }
        });
    }
}
