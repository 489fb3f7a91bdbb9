//! What a build or rollout waits on, followed with a watch instead of polling: one list, then
//! one long-lived watch request per kind, so a rack with many apps deploying costs the API
//! server open watches, not requests per second. kube's `watcher` resumes a dropped watch from
//! the last resourceVersion it saw (and lists again only when the server says that version is
//! gone), backing off while the server is away; each change publishes a new snapshot.
//!
//! A lasting outage (the server unreachable or refusing for longer than `OUTAGE_LIMIT`) ends the
//! wait with the API's error, as the polling it replaces did: a restart is ridden out, a
//! revoked credential is not.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch as channel;
use tokio_util::task::AbortOnDropHandle;

use super::describe;
use crate::runtime::RuntimeError;

/// How long the API server may stay unreachable before a wait on it fails.
pub const OUTAGE_LIMIT: Duration = Duration::from_secs(60);

/// How long after its last error an outage counts as over. A resumed watch reports nothing
/// until something changes, so quiet is the only sign of recovery; the watcher's backoff
/// tops out at 30 s, so an outage that goes on errs again sooner than this.
const QUIET: Duration = Duration::from_secs(45);

/// Failures of the watch in a row: when the first and the last happened, and the last error.
#[derive(Debug, Clone)]
struct Outage {
    first: Instant,
    last: Instant,
    error: String,
}

/// The objects a watch holds, by name, as of its last event.
#[derive(Debug, Clone)]
pub struct Snapshot<K> {
    /// Whether the first list is complete (before it, an absent object may just not be listed yet).
    pub listed: bool,
    pub objects: BTreeMap<String, K>,
    /// The failures going on, if any.
    failing: Option<Outage>,
}

impl<K> Default for Snapshot<K> {
    fn default() -> Self {
        Self {
            listed: false,
            objects: BTreeMap::new(),
            failing: None,
        }
    }
}

/// A running watch of the objects of one kind that match a selector. Dropping it stops it.
pub struct Watch<K> {
    what: String,
    /// How long an outage is ridden out (`OUTAGE_LIMIT`).
    limit: Duration,
    snapshots: channel::Receiver<Snapshot<K>>,
    _task: AbortOnDropHandle<()>,
}

impl<K> Watch<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    /// Starts watching what `api` and `config` select; `what` names it in errors.
    pub fn start(api: Api<K>, config: watcher::Config, what: impl Into<String>) -> Self {
        let (tx, snapshots) = channel::channel(Snapshot::default());
        let what = what.into();
        let task = AbortOnDropHandle::new(tokio::spawn(follow(api, config, tx, what.clone())));
        Self {
            what,
            limit: OUTAGE_LIMIT,
            snapshots,
            _task: task,
        }
    }

    /// The objects as they are now (marked seen: `changed` waits for the next change).
    pub fn current(&mut self) -> Snapshot<K> {
        self.snapshots.borrow_and_update().clone()
    }

    /// Waits for the next change.
    ///
    /// # Errors
    /// When the API server has been failing the watch for longer than `OUTAGE_LIMIT`.
    pub async fn changed(&mut self) -> Result<(), RuntimeError> {
        loop {
            let failing = self.snapshots.borrow().failing.clone();
            // A watch that is failing is looked at again when its outage would become too long
            // or would be over, even if no further event arrives (the backoff can be long).
            let patience = match &failing {
                Some(outage) if outage.last.elapsed() < QUIET => match self.limit.checked_sub(outage.first.elapsed()) {
                    Some(left) => left.min(QUIET - outage.last.elapsed()),
                    None => {
                        return Err(RuntimeError::Failed(format!(
                            "watching {}: the Kubernetes API has failed for {} s: {}",
                            self.what,
                            outage.first.elapsed().as_secs(),
                            outage.error
                        )));
                    }
                },
                _ => Duration::MAX,
            };
            match tokio::time::timeout(patience, self.snapshots.changed()).await {
                Ok(Ok(())) if self.snapshots.borrow().failing.is_none() => return Ok(()),
                // A new failure (or the same outage going on): check how long it has lasted.
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => return Err(RuntimeError::Failed(format!("watching {} stopped", self.what))),
            }
        }
    }
}

/// The watch of the one object named `name`.
pub fn by_name(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

/// Runs the watch, publishing each change.
async fn follow<K>(api: Api<K>, config: watcher::Config, tx: channel::Sender<Snapshot<K>>, what: String)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    // A (re)list is collected apart and replaces the objects only once complete, so that a
    // relist after a long outage never shows a partial set.
    let mut listing: Option<BTreeMap<String, K>> = None;
    // Backed off (exponentially, with jitter) while the server is away: a watcher retries at once
    // otherwise, hammering a server that is trying to come back.
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                tx.send_modify(|snapshot| {
                    // `Init` comes before each (re)list is tried; every other event is an answer.
                    if !matches!(event, watcher::Event::Init) {
                        snapshot.failing = None;
                    }
                    match event {
                        watcher::Event::Init => listing = Some(BTreeMap::new()),
                        watcher::Event::InitApply(object) => {
                            if let (Some(list), Some(name)) = (listing.as_mut(), object.meta().name.clone()) {
                                list.insert(name, object);
                            }
                        }
                        watcher::Event::InitDone => {
                            snapshot.objects = listing.take().unwrap_or_default();
                            snapshot.listed = true;
                        }
                        watcher::Event::Apply(object) => {
                            if let Some(name) = object.meta().name.clone() {
                                snapshot.objects.insert(name, object);
                            }
                        }
                        watcher::Event::Delete(object) => {
                            if let Some(name) = &object.meta().name {
                                snapshot.objects.remove(name);
                            }
                        }
                    }
                });
            }
            Err(e) => {
                let error = match &e {
                    watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => describe(e),
                    other => other.to_string(),
                };
                tracing::warn!("watching {what} (resuming): {error}");
                tx.send_modify(|snapshot| {
                    let now = Instant::now();
                    let first = match &snapshot.failing {
                        Some(outage) if outage.last.elapsed() < QUIET => outage.first,
                        _ => now,
                    };
                    snapshot.failing = Some(Outage {
                        first,
                        last: now,
                        error,
                    });
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[tokio::test]
    async fn a_lasting_outage_ends_the_wait_with_the_api_error() {
        // An API server that is not there: every list fails.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let mut watch = Watch::start(
            Api::<Pod>::namespaced(client, "rack-app"),
            by_name("web-1"),
            "pod web-1",
        );
        watch.limit = Duration::from_secs(2);
        let started = Instant::now();
        let error = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Err(e) = watch.changed().await {
                    return e;
                }
            }
        })
        .await
        .expect("the outage ends the wait");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "ridden out until the limit"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("watching pod web-1: the Kubernetes API has failed for 2 s: "),
            "{message}"
        );
        assert!(!watch.current().listed);
    }
}
