//! TLS material: the PEM certificate chain and key from the config, turned
//! into a rustls server config (ring provider, TLS 1.2 and 1.3).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::ring;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors from loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {why}")]
    Cert { path: PathBuf, why: String },
    #[error("TLS key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("TLS key {key} does not match certificate {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The blocking task that reads the files did not finish.
    #[error("TLS setup: {0}")]
    Load(String),
}

/// Loads and checks a certificate chain and its key. Reads files: call it
/// through [`crate::blocking::run`] from async code.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    crate::blocking::assert_off_runtime("reading TLS certificate and key files");
    let cert_err = |why: String| TlsError::Cert {
        path: cert.to_path_buf(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        why: e.to_string(),
    })?;
    let provider = Arc::new(ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            why: e.to_string(),
        })?;
    let certified = CertifiedKey::new(certs.clone(), signing);
    if certified.keys_match().is_err() {
        return Err(TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        });
    }
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Arc::new(config))
}
