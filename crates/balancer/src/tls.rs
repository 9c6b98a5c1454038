//! TLS for the SIP listener (`sip.transports` with `"tls"`, `[sip.tls]`):
//! rustls (ring provider), the certificate chain and key read from PEM
//! files, optional client certificates. The acceptor in force is swapped on
//! reload ([`TlsListener::reload`]): connections already established keep
//! the session they have; new handshakes use the new certificate.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::TlsConfig;

/// The TLS side of the SIP listener.
pub struct TlsListener {
    acceptor: ArcSwap<TlsAcceptor>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsListener(..)")
    }
}

impl TlsListener {
    /// Reads `cfg`'s files.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, a key that does not match the
    /// certificate; the message names the field and the file.
    pub fn new(cfg: &TlsConfig) -> Result<TlsListener, String> {
        Ok(TlsListener {
            acceptor: ArcSwap::from_pointee(acceptor(cfg)?),
        })
    }

    /// The acceptor for the next handshake.
    #[must_use]
    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Re-reads the files; on an error the certificate in force stays.
    ///
    /// # Errors
    /// As [`TlsListener::new`].
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), String> {
        self.acceptor.store(Arc::new(acceptor(cfg)?));
        Ok(())
    }
}

fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.certificate)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sip.tls.certificate {}: {e}", cfg.certificate.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sip.tls.certificate {}: no certificate in the file",
            cfg.certificate.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("sip.tls.key {}: {e}", cfg.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("sip.tls: {e}"))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sip.tls.client_ca {}: {e}", path.display()))?
            {
                let c = c.map_err(|e| format!("sip.tls.client_ca {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("sip.tls.client_ca {}: {e}", path.display()))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("sip.tls.client_ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("sip.tls.key {}: {e}", cfg.key.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
