//! Each app's network (local runtime, rack as root): the app's sandboxed processes (service
//! instances, one-offs, the release phase, timers, `exec`) share a network namespace of their
//! own with user-mode networking (see `user_network`), so they reach the outside as containers
//! do, and never the host's loopback: not rack's API, not its Postgres, not another app's ports
//! or resources. In that namespace:
//!
//! - the app's linked resources are on `127.0.0.1:<port>` as in the variables, through a
//!   resource forwarder (see `forwarder`) started for the ports the namespace lacks;
//! - instances listen on their `PORT`; the router and the health checks reach them with sockets
//!   made inside the namespace by a dialer thread that joined it (`setns`): a socket belongs to
//!   the namespace it was made in, wherever it is connected from, so a connection costs one hop
//!   to that thread and nothing on the way of its traffic.
//!
//! A network outlives rack, as the app's service processes do (see `keeper`): its holder's pid
//! and start time are recorded in `<data>/app-networks/<app>.json`, and the next start of rack
//! adopts it from there (the router and health checks reach the adopted processes through it).
//! The holder lives while that record does, slirp4netns and the forwarders exit with the
//! holder. A network is made again if its holder is gone, and removed with the app (its record
//! first). A rack that is not root cannot join namespaces: its app processes stay
//! on the host's network, and rack says so at startup.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpSocket, TcpStream};

use super::forwarder::Forwarders;
use super::user_network::UserNetwork;

/// The networks of the apps of this rack.
#[derive(Debug)]
pub struct AppNetworks {
    enabled: bool,
    forwarders: Forwarders,
    /// Each app's slot, locked while its network is made (other apps' are not held up).
    apps: Mutex<HashMap<String, Slot>>,
    /// Where each app's network is recorded.
    records: PathBuf,
}

/// What an app network's record holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    holder: super::keeper::Proc,
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<AppNetwork>>>>;

impl AppNetworks {
    /// Networks for the apps, when rack is root (else every app process uses the host's network).
    pub fn new(forwarders: Forwarders, records: PathBuf) -> Self {
        let enabled = nix::unistd::geteuid().is_root();
        if !enabled {
            tracing::warn!(
                "app processes share the host's network (rack is not root, so it cannot give each app a \
                 network namespace): they can reach the API and other apps' ports on 127.0.0.1"
            );
        }
        Self {
            enabled,
            forwarders,
            apps: Mutex::default(),
            records,
        }
    }

    fn record_of(&self, app: &str) -> PathBuf {
        self.records.join(format!("{app}.json"))
    }

    /// The network of `app`, made if it has none (or its holder is gone), with a forwarder for
    /// each of `forward` (resource ports) it lacks. `None` when apps use the host's network.
    ///
    /// # Errors
    /// When the namespace or a forwarder cannot be made.
    pub async fn ensure(&self, app: &str, forward: &[u16]) -> std::io::Result<Option<Arc<AppNetwork>>> {
        if !self.enabled {
            return Ok(None);
        }
        let slot = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(app.to_owned())
            .or_default()
            .clone();
        let network = {
            let mut slot = slot.lock().await;
            match slot.as_ref().filter(|network| !network.has_exited()) {
                Some(network) => network.clone(),
                None => {
                    let record = self.record_of(app);
                    let adopted = std::fs::read(&record)
                        .ok()
                        .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
                        .and_then(|record| UserNetwork::adopt(record.holder));
                    let network = match adopted {
                        Some(network) => {
                            tracing::info!(app.name = app, "adopted the network namespace of {app}");
                            AppNetwork::with(network)?
                        }
                        None => {
                            std::fs::create_dir_all(&self.records)?;
                            let network = UserNetwork::start_kept(&record).await.map_err(std::io::Error::other)?;
                            let holder = network
                                .kept_holder()
                                .ok_or_else(|| std::io::Error::other("no holder"))?;
                            let written = serde_json::to_vec(&Record { holder })
                                .map_err(std::io::Error::other)
                                .and_then(|bytes| super::keeper::write_atomically(&record, &bytes));
                            if let Err(e) = written {
                                network.end();
                                return Err(e);
                            }
                            tracing::info!(app.name = app, "made the network namespace of {app}");
                            AppNetwork::with(network)?
                        }
                    };
                    let network = Arc::new(network);
                    *slot = Some(network.clone());
                    network
                }
            }
        };
        network.forward(&self.forwarders, forward).await?;
        Ok(Some(network))
    }

    /// Removes the network of `app` (its processes are stopped): the holder and slirp4netns are
    /// killed, and the forwarders exit with the holder.
    pub async fn remove(&self, app: &str) {
        let slot = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(app);
        // Its holder exits once the record is gone, even one not adopted yet.
        let _ = std::fs::remove_file(self.record_of(app));
        if let Some(slot) = slot
            && let Some(network) = slot.lock().await.take()
        {
            network.end();
        }
    }
}

/// One app's network namespace.
#[derive(Debug)]
pub struct AppNetwork {
    network: Mutex<UserNetwork>,
    holder: u32,
    /// Asks the dialer thread for a socket made inside the namespace.
    dialer: std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<std::io::Result<TcpSocket>>>,
    /// Held while forwarders are checked and started (two instances starting at once must not
    /// both start one for the same port).
    forwarding: tokio::sync::Mutex<()>,
}

impl AppNetwork {
    /// A network that dies with rack (tests).
    #[cfg(test)]
    async fn start() -> Result<Self, String> {
        Self::with(UserNetwork::start().await?).map_err(|e| e.to_string())
    }

    /// The app network of `network`, with its dialer.
    fn with(network: UserNetwork) -> std::io::Result<Self> {
        Self::dialing(network).map_err(std::io::Error::other)
    }

    fn dialing(network: UserNetwork) -> Result<Self, String> {
        let holder = network.holder().ok_or("the namespace holder exited")?;
        let namespace = std::fs::File::open(format!("/proc/{holder}/ns/net"))
            .map_err(|e| format!("opening the app's network namespace: {e}"))?;
        let (dialer, requests) = std::sync::mpsc::channel();
        let (joined, joining) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("rack-dialer".to_owned())
            .spawn(move || dial_inside(&namespace, &joined, &requests))
            .map_err(|e| format!("starting the app network's dialer: {e}"))?;
        joining
            .recv()
            .map_err(|_| "the app network's dialer stopped".to_owned())??;
        Ok(Self {
            network: Mutex::new(network),
            holder,
            dialer,
            forwarding: tokio::sync::Mutex::new(()),
        })
    }

    /// The namespace's path, for a process to join (`nsenter --net=...`).
    pub fn namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder))
    }

    /// Ends a kept network now (its record is removed first).
    fn end(&self) {
        self.network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .end();
    }

    fn has_exited(&self) -> bool {
        self.network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .has_exited()
    }

    /// A connection to `addr` inside the namespace (an instance's `127.0.0.1:<port>`).
    ///
    /// # Errors
    /// When the namespace is gone, or the connection fails.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let (reply, socket) = tokio::sync::oneshot::channel();
        self.dialer
            .send(reply)
            .map_err(|_| std::io::Error::other("the app network's dialer stopped"))?;
        let socket = socket
            .await
            .map_err(|_| std::io::Error::other("the app network's dialer stopped"))??;
        // No Nagle: a request's head and body go out as separate writes.
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    }

    /// Starts a forwarder for those of `ports` that nothing listens on in the namespace.
    async fn forward(&self, forwarders: &Forwarders, ports: &[u16]) -> std::io::Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        let _turn = self.forwarding.lock().await;
        forwarders
            .ensure(self.holder, ports)
            .await
            .map_err(std::io::Error::other)
    }
}

/// The dialer thread: joins `namespace`, says so on `joined`, then makes a socket for each
/// request until the network is dropped.
fn dial_inside(
    namespace: &std::fs::File,
    joined: &std::sync::mpsc::Sender<Result<(), String>>,
    requests: &std::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<std::io::Result<TcpSocket>>>,
) {
    let entered = nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the app's network namespace: {e}"));
    let ok = entered.is_ok();
    let _ = joined.send(entered);
    if !ok {
        return;
    }
    while let Ok(reply) = requests.recv() {
        let _ = reply.send(TcpSocket::new_v4());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_dialer_reaches_the_namespace_and_not_the_hosts_loopback() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a network namespace needs root");
            return;
        }
        // A listener on the host's loopback: the namespace's 127.0.0.1 is another address.
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = host.local_addr().unwrap().port();
        let network = AppNetwork::start().await.unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(network.connect(addr).await.is_err(), "the host's listener was reached");

        // A listener made inside (as an instance's): the dialer reaches it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        network.dialer.send(tx).unwrap();
        let socket = rx.await.unwrap().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let inside = socket.listen(4).unwrap();
        let inside_addr = inside.local_addr().unwrap();
        let accepted = tokio::spawn(async move { inside.accept().await.map(|(_, peer)| peer) });
        let stream = network.connect(inside_addr).await.unwrap();
        assert_eq!(accepted.await.unwrap().unwrap(), stream.local_addr().unwrap());
        // And the host never saw it.
        host.set_nonblocking(true).unwrap();
        assert!(host.accept().is_err());
    }

    /// Serves `listener`, answering every request with `body` (HTTP/1.1, kept alive).
    fn answer(listener: tokio::net::TcpListener, body: &'static str) {
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_| async move {
                        Ok::<_, std::convert::Infallible>(axum::http::Response::new(axum::body::Body::from(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    #[tokio::test]
    async fn the_router_keeps_an_instance_inside_apart_from_a_host_port_of_the_same_number() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a network namespace needs root");
            return;
        }
        crate::tls::install_provider();
        let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = host.local_addr().unwrap();
        answer(host, "host");
        let network = Arc::new(AppNetwork::start().await.unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        network.dialer.send(tx).unwrap();
        let socket = rx.await.unwrap().unwrap();
        socket.bind(addr).unwrap();
        answer(socket.listen(16).unwrap(), "inside");

        let stop = tokio_util::sync::CancellationToken::new();
        let router = super::super::router::Router::start("app".to_owned(), 0, stop.clone())
            .await
            .unwrap();
        router.set_backends([
            super::super::router::Backend::from(addr),
            super::super::router::Backend {
                addr,
                network: Some(network.clone()),
            },
        ]);
        // Round robin over one client connection: each answer from its own side, every time,
        // although the pool holds a connection to each.
        let client = reqwest::Client::new();
        let mut answers = Vec::new();
        for _ in 0..6 {
            let url = format!("http://{}/", router.local_addr());
            answers.push(client.get(url).send().await.unwrap().text().await.unwrap());
        }
        stop.cancel();
        answers.sort();
        assert_eq!(answers, ["host", "host", "host", "inside", "inside", "inside"]);
    }
}
