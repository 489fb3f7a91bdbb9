//! Where the router sends traffic: an instance's address, on the host's loopback (a container's
//! published port) or inside its app's network namespace (a sandboxed process, see
//! `app_network`), and the connector that reaches both. Requests to an instance in an app's
//! network carry the authority [`INSIDE_HOST`]`:<port>` in their URI, so the client's pool never
//! mixes its connections with those of the host's port of the same number; the connector makes
//! those connections through the app network's dialer.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::super::app_network::AppNetwork;

/// The host name of instances inside the app's network, in the router's upstream URIs (a
/// reserved name: nothing resolves it).
const INSIDE_HOST: &str = "app-network.invalid";

/// An instance the router sends traffic to.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Its address (`127.0.0.1:<port>`), in its network.
    pub addr: SocketAddr,
    /// Its app's network; `None`: the host's.
    pub network: Option<Arc<AppNetwork>>,
}

impl PartialEq for Backend {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
            && match (&self.network, &other.network) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl From<SocketAddr> for Backend {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, network: None }
    }
}

impl Backend {
    /// The authority of its upstream URIs.
    pub fn authority(&self) -> String {
        match self.network {
            Some(_) => format!("{INSIDE_HOST}:{}", self.addr.port()),
            None => self.addr.to_string(),
        }
    }
}

/// The router's connector: host addresses through hyper's, [`INSIDE_HOST`] through the app
/// network's dialer (an app's instances are all in one network: the latest one the router was
/// given).
#[derive(Debug, Clone)]
pub struct Connector {
    pub host: HttpConnector,
    pub network: Arc<Mutex<Option<Arc<AppNetwork>>>>,
    pub timeout: std::time::Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.host.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if uri.host() != Some(INSIDE_HOST) {
            let connecting = self.host.call(uri);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        }
        let network = self
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let network = network.ok_or("the app's network is gone")?;
            let port = uri.port_u16().ok_or("no port")?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let stream = tokio::time::timeout(timeout, network.connect(addr))
                .await
                .map_err(|_| format!("connecting to {addr} in the app's network timed out"))??;
            Ok(TokioIo::new(stream))
        })
    }
}
