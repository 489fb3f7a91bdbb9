//! HTTPS for a service's router (`convox ssl update`): a second listener on 127.0.0.1, of its
//! own port, that ends TLS with the service's certificate and hands each request to the same
//! proxy as the plain listener (same backends, same tallies). A per-service listener rather than
//! SNI on one port: the local runtime already gives each service a port of its own, and a client
//! reaches it by address, with no name to select a certificate by. Giving the service another
//! certificate swaps it for new connections; open ones keep theirs. Taking its certificate away
//! (`rack ssl unset`) closes the listener and its connections.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{Inner, Router, proxy};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Marks a request that came in over the HTTPS listener (`X-Forwarded-Proto: https`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Https;

/// The HTTPS listener of a router, and the certificate it serves now.
#[derive(Debug)]
pub(super) struct Front {
    addr: SocketAddr,
    certificate: Arc<Current>,
    /// Stops this listener and its connections (a child of the router's own stop).
    stop: tokio_util::sync::CancellationToken,
}

/// The certificate new connections get.
#[derive(Debug)]
struct Current(Mutex<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// The certificate (PEM, with its chain) and key, loaded for rustls.
///
/// # Errors
/// When they do not parse or do not belong together.
pub fn certified_key(certificate_pem: &str, key_pem: &str) -> std::io::Result<Arc<CertifiedKey>> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let chain = CertificateDer::pem_slice_iter(certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("the certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid(format!("the key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| invalid(format!("the certificate and key: {e}")))
}

impl Router {
    /// Serves this router over HTTPS with `key` too: starts the HTTPS listener the first time
    /// (on 127.0.0.1, any free port), else swaps its certificate. Returns where it listens.
    ///
    /// # Errors
    /// When the listener cannot be bound or TLS cannot be set up.
    pub async fn serve_tls(&self, key: Arc<CertifiedKey>) -> std::io::Result<SocketAddr> {
        if let Some(addr) = self.swap_certificate(&key) {
            return Ok(addr);
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let certificate = Arc::new(Current(Mutex::new(key.clone())));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(std::io::Error::other)?
                .with_no_client_auth()
                .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let stop = self.inner.stop.child_token();
        {
            let mut front = self.inner.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Another call started one meanwhile: use it.
            if front.is_some() {
                drop(front);
                return self
                    .swap_certificate(&key)
                    .ok_or_else(|| std::io::Error::other("router TLS"));
            }
            *front = Some(Front {
                addr,
                certificate,
                stop: stop.clone(),
            });
        }
        tokio::spawn(accept_loop(Arc::clone(&self.inner), listener, acceptor, stop));
        tracing::info!(app.name = %self.inner.app, router.https = %addr, "router for {} serves HTTPS on {addr}", self.inner.app);
        Ok(addr)
    }

    /// Stops serving HTTPS (the service's certificate was taken away): the listener closes, and
    /// so do its open connections. Plain HTTP goes on.
    pub fn stop_tls(&self) {
        let front = self
            .inner
            .tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(front) = front {
            front.stop.cancel();
            tracing::info!(app.name = %self.inner.app, router.https = %front.addr, "router for {} no longer serves HTTPS", self.inner.app);
        }
    }

    /// Where this router serves HTTPS, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        let front = self.inner.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        front.as_ref().map(|f| f.addr)
    }

    fn swap_certificate(&self, key: &Arc<CertifiedKey>) -> Option<SocketAddr> {
        let front = self.inner.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let front = front.as_ref()?;
        *front
            .certificate
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key.clone();
        Some(front.addr)
    }
}

/// Accepts HTTPS connections until the router stops or `stop` (its certificate taken away).
async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = axum::Router::new().fallback(proxy).with_state(Arc::clone(&inner));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "router for {}: accepting an HTTPS connection", inner.app);
                    // Out of descriptors, typically: give others a moment to close theirs.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await else {
                return;
            };
            let service = app.map_request(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(Https);
                request.map(axum::body::Body::new)
            });
            let serve = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::select! {
                _ = serve => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    /// A backend that answers with the `X-Forwarded-Proto` it was given.
    async fn proto_echo() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
            format!(
                "proto={}",
                headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
            )
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// `GET /` on `addr`, over TLS when `ca` (trusted alone) is given, claiming
    /// `X-Forwarded-Proto: spoofed`; the whole answer.
    async fn get(addr: SocketAddr, ca: Option<&str>) -> String {
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: spoofed\r\nConnection: close\r\n\r\n";
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        if let Some(ca) = ca {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                .unwrap();
            let config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .unwrap();
            tls.write_all(request).await.unwrap();
            let _ = tls.read_to_end(&mut answer).await;
        } else {
            let mut tcp = tcp;
            tcp.write_all(request).await.unwrap();
            let _ = tcp.read_to_end(&mut answer).await;
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn the_app_learns_the_scheme_its_client_used() {
        let shutdown = CancellationToken::new();
        let router = Router::start("myapp".into(), 0, shutdown.clone()).await.unwrap();
        router.set_backends(vec![proto_echo().await]);
        let cert = crate::certificate::generate(&["localhost".to_owned()], 1).unwrap();
        let https = router
            .serve_tls(certified_key(&cert.certificate_pem, &cert.key_pem).unwrap())
            .await
            .unwrap();

        let plain = get(router.local_addr(), None).await;
        assert!(plain.ends_with("proto=http"), "{plain}");
        let secure = get(https, Some(&cert.certificate_pem)).await;
        assert!(secure.ends_with("proto=https"), "{secure}");

        // Its certificate taken away: the HTTPS port closes, plain HTTP goes on.
        router.stop_tls();
        assert_eq!(router.tls_addr(), None);
        let refused = async {
            loop {
                if tokio::net::TcpStream::connect(https).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("the HTTPS port closes");
        let plain = get(router.local_addr(), None).await;
        assert!(plain.ends_with("proto=http"), "{plain}");
        shutdown.cancel();
    }
}
