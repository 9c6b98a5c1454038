//! TLS for the SIP listener (`sip.transports` with `"tls"`, `[sip.tls]`):
//! rustls (ring provider), the certificate chain and key read from PEM
//! files, optional client certificates. The acceptor in force is swapped on
//! reload ([`TlsListener::reload`]): connections already established keep
//! the session they have; new handshakes use the new certificate.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::{TlsAcceptor, TlsConnector};

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

/// The certificate chain and key of `cfg` (both given, or `None`).
fn identity(
    cfg: &TlsConfig,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let (Some(cert), Some(key)) = (&cfg.certificate, &cfg.key) else {
        return Ok(None);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sip.tls.certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sip.tls.certificate {}: no certificate in the file",
            cert.display()
        ));
    }
    let k = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("sip.tls.key {}: {e}", key.display()))?;
    Ok(Some((certs, k)))
}

/// The CA certificates in `path` (`field` names it in errors).
fn roots(field: &str, path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{field} {}: {e}", path.display()))?
    {
        let c = c.map_err(|e| format!("{field} {}: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{field} {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{field} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(roots)
}

fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (certs, key) = identity(cfg)?.ok_or("sip.tls: the listener needs certificate and key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("sip.tls: {e}"))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = roots("sip.tls.client_ca", path)?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("sip.tls.client_ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("sip.tls.key: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS side towards servers (`transport = "tls"`): their certificates
/// checked against `sip.tls.server_ca` and the name each server's
/// `tls_name` (or its IP address) gives; our certificate presented when
/// `[sip.tls]` has one (servers that ask for client certificates).
pub struct TlsClient {
    connector: ArcSwap<TlsConnector>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient(..)")
    }
}

impl TlsClient {
    /// Reads `cfg`'s files.
    ///
    /// # Errors
    /// No `server_ca`, or a file that cannot be used (named).
    pub fn new(cfg: &TlsConfig) -> Result<TlsClient, String> {
        Ok(TlsClient {
            connector: ArcSwap::from_pointee(connector(cfg)?),
        })
    }

    /// The connector for the next connection.
    #[must_use]
    pub fn connector(&self) -> Arc<TlsConnector> {
        self.connector.load_full()
    }

    /// Re-reads the files; on an error the ones in force stay.
    ///
    /// # Errors
    /// As [`TlsClient::new`].
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), String> {
        self.connector.store(Arc::new(connector(cfg)?));
        Ok(())
    }
}

fn connector(cfg: &TlsConfig) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let path = cfg
        .server_ca
        .as_ref()
        .ok_or("sip.tls.server_ca: needed for servers with transport = \"tls\"")?;
    let roots = roots("sip.tls.server_ca", path)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("sip.tls: {e}"))?
        .with_root_certificates(roots);
    let config = match identity(cfg)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("sip.tls.key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a server's certificate must carry: `tls_name`, else its IP.
///
/// # Errors
/// A `tls_name` that is no DNS name.
pub fn server_name(
    tls_name: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<rustls_pki_types::ServerName<'static>, String> {
    match tls_name {
        Some(n) => rustls_pki_types::ServerName::try_from(n.to_owned())
            .map_err(|e| format!("tls_name '{n}': {e}")),
        None => Ok(rustls_pki_types::ServerName::IpAddress(addr.ip().into())),
    }
}
