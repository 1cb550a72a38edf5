//! TLS for the gRPC servers and clients (rustls): a process's certificate and key, the CA
//! the servers it calls must chain to, and the CA its own clients' certificates must
//! chain to (mutual TLS).
//!
//! The coordinator's certificate is its server identity on the public port and its client
//! identity to the workers (so it carries both usages); `--tls-ca` verifies the workers,
//! whose `--tls-client-ca` verifies the coordinator.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The TLS files of a process; none given: plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TlsFiles {
    /// PEM certificate (chain) of this process: TLS on its gRPC port, and its client
    /// certificate towards servers that require one.
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "tls-cert",
            env = "BD3LM_TLS_CERT",
            value_name = "FILE",
            requires = "key"
        )
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "tls-key",
            env = "BD3LM_TLS_KEY",
            value_name = "FILE",
            requires = "cert"
        )
    )]
    pub key: Option<PathBuf>,
    /// PEM CA certificate the servers this process calls must chain to: with it, calls
    /// use TLS.
    #[cfg_attr(
        feature = "clap",
        arg(long = "tls-ca", env = "BD3LM_TLS_CA", value_name = "FILE")
    )]
    pub ca: Option<PathBuf>,
    /// PEM CA certificate this server's clients must present a certificate of (mutual
    /// TLS: a client without one is refused).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "tls-client-ca",
            env = "BD3LM_TLS_CLIENT_CA",
            value_name = "FILE",
            requires = "cert"
        )
    )]
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate without its key, or the reverse.
    #[error("--tls-cert and --tls-key go together")]
    Half,
    /// A file that is not the PEM it should be, or a certificate and key that do not go
    /// together.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(read(cert)?, read(key)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Half),
        }
    }

    fn certificate(path: Option<&Path>) -> Result<Option<Certificate>, TlsError> {
        path.map(|p| read(p).map(Certificate::from_pem)).transpose()
    }

    /// The server side: TLS with this process's certificate when one is given (else
    /// `None`, plain text), requiring client certificates signed by the client CA when
    /// one is given.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(identity) = self.identity()? else {
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = Self::certificate(self.client_ca.as_deref())? {
            config = config.client_ca_root(ca);
        }
        Ok(Some(config))
    }

    /// The server side for a port that is not gRPC (the HTTP API): the same certificate
    /// and client CA as [`TlsFiles::server`], as a rustls acceptor offering HTTP/2 and
    /// HTTP/1.1; `None` without a certificate.
    pub fn acceptor(&self) -> Result<Option<TlsAcceptor>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return match (&self.cert, &self.key) {
                (None, None) => Ok(None),
                _ => Err(TlsError::Half),
            };
        };
        let invalid = |path: &Path| {
            let path = path.to_path_buf();
            move |e: &dyn std::fmt::Display| TlsError::Invalid {
                path,
                reason: e.to_string(),
            }
        };
        let chain = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(cert)(&e))?;
        let private = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| invalid(key)(&e))?;
        let provider = Arc::new(crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(cert)(&e))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for root in CertificateDer::pem_slice_iter(&read(ca)?) {
                    roots
                        .add(root.map_err(|e| invalid(ca)(&e))?)
                        .map_err(|e| invalid(ca)(&e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid(ca)(&e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, private)
            .map_err(|e| invalid(key)(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(TlsAcceptor::from(Arc::new(config))))
    }

    /// The client side, towards servers whose certificates carry `server_name`: TLS when
    /// a CA is given (else `None`, plain text), presenting this process's certificate when
    /// one is given.
    pub fn client(&self, server_name: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        let Some(ca) = Self::certificate(self.ca.as_deref())? else {
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name(server_name);
        if let Some(identity) = self.identity()? {
            config = config.identity(identity);
        }
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_given_is_plain_text_and_half_a_pair_is_refused() {
        let none = TlsFiles::default();
        assert!(none.server().unwrap().is_none());
        assert!(none.client("x").unwrap().is_none());
        let half = TlsFiles {
            cert: Some("c.pem".into()),
            ..TlsFiles::default()
        };
        assert!(matches!(half.server(), Err(TlsError::Half)));
        let missing = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = missing.client("x").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
