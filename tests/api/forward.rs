//! TCP forwarders for tests that need something between a client and several servers: a load
//! balancer in front of rack replicas, or kube-proxy's part for a Service address. Each new
//! connection goes to the upstream a [`Pick`] chooses for it (a TCP address or a unix socket);
//! the forwarder remembers where each went and when its upstream last sent something, so a
//! test can find the server that carries a stream it follows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where a forwarded connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Picks the upstream of each new connection (`None`: refuse it).
pub type Pick = Arc<dyn Fn() -> BoxFuture<'static, Option<Upstream>> + Send + Sync>;

/// One forwarded connection: where it went, and when its upstream last sent something.
#[derive(Debug, Clone)]
struct Connection {
    upstream: Upstream,
    last_down: Instant,
    open: bool,
}

/// A TCP listener in this network namespace forwarding each connection to an upstream
/// [`Pick`]ed for it, as kube-proxy does for a Service address.
pub struct Forward {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<Connection>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forward {
    pub async fn start(listen: SocketAddr, pick: Pick) -> Self {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("listening on {listen}: {e}"));
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::<Connection>::new()));
        let table = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (pick, table) = (pick.clone(), table.clone());
                tokio::spawn(async move {
                    let Some(upstream) = pick().await else { return };
                    let stream: Box<dyn Duplex> = match &upstream {
                        Upstream::Tcp(addr) => match tokio::net::TcpStream::connect(addr).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        Upstream::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                    };
                    let index = {
                        let mut table = table.lock().unwrap();
                        table.push(Connection {
                            upstream,
                            last_down: Instant::now(),
                            open: true,
                        });
                        table.len() - 1
                    };
                    relay(client, stream, &table, index).await;
                    table.lock().unwrap()[index].open = false;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// The upstream of the open connection whose upstream sent something last (a stream
    /// being followed), if any.
    pub fn busiest(&self) -> Option<Upstream> {
        let table = self.connections.lock().unwrap();
        table
            .iter()
            .filter(|c| c.open)
            .max_by_key(|c| c.last_down)
            .map(|c| c.upstream.clone())
    }

    /// Whether a connection to `upstream` was opened after `since` and got something back.
    pub fn served_after(&self, upstream: &Upstream, since: Instant) -> bool {
        let table = self.connections.lock().unwrap();
        table.iter().any(|c| &c.upstream == upstream && c.last_down > since)
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Copies both ways until either side closes, noting when the upstream last sent something.
async fn relay(client: tokio::net::TcpStream, upstream: Box<dyn Duplex>, table: &Mutex<Vec<Connection>>, index: usize) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
        let _ = up_write.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match up_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    table.lock().unwrap()[index].last_down = Instant::now();
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    // Either direction ending ends the connection, as a reset would.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
