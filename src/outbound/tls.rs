//! TLS as a client: the trust anchors (the system's bundle and
//! `outbound.ca_file`), a strict configuration that refuses a certificate
//! it cannot verify (MTA-STS in enforce mode, the smarthost we log in to,
//! policy fetches over HTTPS), and an opportunistic one that encrypts
//! whatever the server presents (RFC 7435: better than plaintext; the
//! certificate is still checked afterwards, for the log).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where Debian, Fedora, Alpine and others keep the system's bundle;
/// `SSL_CERT_FILE` comes first, as for OpenSSL.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why the client TLS setup could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("outbound.ca_file {path}: {why}")]
    CaFile { path: String, why: String },
    #[error("TLS client configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The client configurations, built once at start. Blocking (reads files).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Verifies chain and name; the handshake fails otherwise.
    pub strict: Arc<ClientConfig>,
    /// Accepts any certificate (opportunistic TLS).
    pub opportunistic: Arc<ClientConfig>,
    /// The strict verifier, to judge an opportunistic connection's
    /// certificate after the fact.
    verifier: Arc<WebPkiServerVerifier>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Trusts the system's bundle and the PEM certificates in `ca_file`
    /// (when not empty). Blocking.
    pub fn new(ca_file: &Path) -> Result<ClientTls, ClientTlsError> {
        crate::blocking::assert_off_runtime("reading trust anchors");
        let mut roots = RootCertStore::empty();
        let system = std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from))
            .find(|p| p.is_file());
        if let Some(bundle) = system {
            match CertificateDer::pem_file_iter(&bundle) {
                Ok(certs) => {
                    let (added, skipped) = roots.add_parsable_certificates(certs.flatten());
                    tracing::debug!(bundle = %bundle.display(), added, skipped, "system trust anchors");
                }
                Err(e) => {
                    tracing::warn!(bundle = %bundle.display(), error = %e, "cannot read the system's trust anchors")
                }
            }
        } else {
            tracing::warn!("no system trust anchors found; only outbound.ca_file is trusted");
        }
        if !ca_file.as_os_str().is_empty() {
            let bad = |why: String| ClientTlsError::CaFile {
                path: ca_file.display().to_string(),
                why,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let strict = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let opportunistic = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(verifier.clone())))
            .with_no_client_auth();
        Ok(ClientTls {
            strict: Arc::new(strict),
            opportunistic: Arc::new(opportunistic),
            verifier,
        })
    }

    /// Whether `certs` (the server's chain, leaf first) is valid for
    /// `name` now: None when it is, else why not.
    pub fn judge(&self, certs: &[CertificateDer<'_>], name: &ServerName<'_>) -> Option<String> {
        let (leaf, rest) = certs.split_first()?;
        self.verifier
            .verify_server_cert(leaf, rest, name, &[], UnixTime::now())
            .err()
            .map(|e| e.to_string())
    }
}

/// Opportunistic TLS: any certificate is accepted (its chain is judged
/// separately, for the log), but the handshake's signatures are still
/// checked against the key it holds.
#[derive(Debug)]
struct AnyCertificate(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
