//! The event bus: events are appended to Postgres (the source of truth) and announced with
//! NOTIFY; each replica keeps one LISTEN connection, and one tail per log that has local
//! subscribers (`tail`): the tail reads each new batch once and hands it to every local
//! subscriber (`subscription`). So a subscriber on any replica sees every event of its topic
//! once, in order, whoever wrote it; a line costs one query per replica whatever the number of
//! subscribers; and a slow subscriber loses nothing: it falls behind and catches up by itself,
//! without delaying anyone, from the tail's window of recent batches in memory (or from
//! Postgres when it fell out of the window).
//!
//! ```text
//! writer ── insert + pg_notify ──► Postgres ──► LISTEN (one per replica) ──► wake
//!                                     ▲                                        │
//!                                     ├──── tail: select … where seq > last ◄──┘ (one per log)
//!                                     │          │ window of recent batches (memory)
//!                                     └── catch-up (older than the window) ◄── subscribers
//! ```

mod subscription;
pub mod tail;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use subscription::{Follow, Item, Subscription};

use crate::store::builds::JOBS_CHANNEL;
use crate::store::events::{EVENTS_CHANNEL, Event, Topic};
use crate::store::feed::{FEED_CHANNEL, FeedEvent, FeedFilter};

/// Something changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// New events for this app.
    Events(String),
    /// New events in the rack-wide feed.
    Feed,
    /// New work for the job workers.
    Jobs,
    /// Anything may have changed (the LISTEN connection was re-established).
    All,
    /// This token was revoked: the streams it opened end.
    Revoked(uuid::Uuid),
    /// New lines in rack's own log.
    RackLog,
}

/// The replica's end of the bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    wake: broadcast::Sender<Wake>,
    shutdown: CancellationToken,
    apps: tail::Tails<AppLog>,
    feed: tail::Tails<FeedLog>,
    /// Reads the event logs, counting (see [`EventBus::reads`]).
    reader: tail::Reader,
}

impl EventBus {
    /// Starts listening, with tails that keep windows within `window`. The listener stops when
    /// `shutdown` is cancelled.
    ///
    /// # Errors
    /// When the first LISTEN connection cannot be made.
    pub async fn start(
        pool: &PgPool,
        shutdown: CancellationToken,
        window: tail::WindowLimits,
    ) -> Result<Self, sqlx::Error> {
        let (wake, _) = broadcast::channel(1024);
        // Its own connection, not one of the shared pool's (see `store::single`).
        let listening = crate::store::single(pool);
        let mut listener = listen(&listening).await?;
        let sender = wake.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    () = stop.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                let message = match received {
                    Ok(Some(n)) if n.channel() == EVENTS_CHANNEL => Wake::Events(n.payload().to_owned()),
                    Ok(Some(n)) if n.channel() == FEED_CHANNEL => Wake::Feed,
                    Ok(Some(n)) if n.channel() == crate::store::rack_log::RACK_LOG_CHANNEL => Wake::RackLog,
                    Ok(Some(n)) if n.channel() == crate::store::tokens::REVOKED_CHANNEL => match n.payload().parse() {
                        Ok(id) => Wake::Revoked(id),
                        Err(_) => continue,
                    },
                    Ok(Some(_)) => Wake::Jobs,
                    // The connection was lost and has been re-established (the listener
                    // reconnects before it says so); whatever was announced meanwhile is
                    // unknown, so everybody looks.
                    Ok(None) => {
                        tracing::debug!("the LISTEN connection was lost and listens again");
                        Wake::All
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "the LISTEN connection failed; listening again on a new one");
                        let _ = sender.send(Wake::All);
                        // A new listener, not the old one: after some failures (a backend
                        // terminated by the server) the old one keeps its dead connection, and
                        // a query through a listening connection fails whenever a notification
                        // comes first, so "is it back?" cannot be asked of it.
                        // Quick retries first (Postgres may be back already), then every second.
                        let mut pause = Duration::from_millis(50);
                        listener = loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(pause) => {}
                            }
                            match listen(&listening).await {
                                Ok(listener) => break listener,
                                Err(error) => tracing::debug!(error = %error, "listening again failed; retrying"),
                            }
                            pause = (pause * 2).min(Duration::from_secs(1));
                        };
                        // Events committed while nobody listened were announced to nobody, so
                        // everybody looks once more (else the last of them would wait for the
                        // tails' poll).
                        let _ = sender.send(Wake::All);
                        continue;
                    }
                };
                // No receivers is fine: nobody is waiting.
                let _ = sender.send(message);
            }
        });
        let reader = tail::Reader::new(pool.clone());
        let apps = tail::Tails::new(reader.clone(), wake.clone(), shutdown.clone(), window);
        let feed = tail::Tails::new(reader.clone(), wake.clone(), shutdown.clone(), window);
        Ok(Self {
            inner: Arc::new(Inner {
                wake,
                shutdown,
                apps,
                feed,
                reader,
            }),
        })
    }

    /// A receiver of wake-ups. Subscribe *before* reading from Postgres, or an event committed
    /// between the read and the subscription would wait for the next poll.
    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.inner.wake.subscribe()
    }

    /// Wakes local subscribers of `app` (used by writers in this replica for lower latency;
    /// the NOTIFY reaches the other replicas).
    pub fn poke(&self, wake: Wake) {
        let _ = self.inner.wake.send(wake);
    }

    /// How many times this replica has read the event log for its subscribers (tails'
    /// batches and subscribers' catch-ups): what a line costs, for tests and metrics.
    pub fn reads(&self) -> u64 {
        self.inner.reader.reads.load(Ordering::Relaxed)
    }

    /// How late the newest batch reached this replica's subscribers: from the commit of its
    /// last event to its read.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.inner.reader.lag_micros.load(Ordering::Relaxed))
    }

    /// How many logs this replica tails now (each has at least one local subscriber).
    pub fn tails(&self) -> usize {
        self.inner.apps.len() + self.inner.feed.len()
    }

    /// The events of `topic` after seq `after`, in order, then live ones as they come, ending
    /// after the terminal event (an event with an outcome; never for an app's log) or at
    /// shutdown.
    pub fn events(&self, topic: Topic, after: i64, follow: Follow) -> Subscription<AppLog, Topic> {
        let log = AppLog {
            app: topic.app().to_owned(),
        };
        Subscription::new(
            self.inner.reader.clone(),
            &self.inner.apps,
            self.inner.shutdown.clone(),
            log,
            topic,
            after,
            follow,
        )
    }
}

impl EventBus {
    /// The feed events `filter` wants after id `after`, in order, then live ones as they come,
    /// until shutdown (or, with [`Follow::Backlog`], until what exists now has been read).
    pub fn feed(&self, filter: FeedFilter, after: i64, follow: Follow) -> Subscription<FeedLog, FeedFilter> {
        Subscription::new(
            self.inner.reader.clone(),
            &self.inner.feed,
            self.inner.shutdown.clone(),
            FeedLog,
            filter,
            after,
            follow,
        )
    }
}

/// The rack-wide feed, as a tail follows it.
#[derive(Debug, Clone, Copy)]
pub struct FeedLog;

#[async_trait::async_trait]
impl tail::Log for FeedLog {
    type Entry = FeedEvent;

    fn key(&self) -> String {
        "feed".to_owned()
    }

    fn concerns(&self, wake: &Wake) -> bool {
        matches!(wake, Wake::Feed | Wake::All)
    }

    async fn horizon(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        crate::store::feed::horizon(pool).await
    }

    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<FeedEvent>, sqlx::Error> {
        crate::store::feed::list_after(pool, &FeedFilter::default(), after, limit).await
    }

    fn seq(entry: &FeedEvent) -> i64 {
        entry.id
    }

    fn at(entry: &FeedEvent) -> chrono::DateTime<chrono::Utc> {
        entry.at
    }

    fn weight(entry: &FeedEvent) -> usize {
        let text = [
            Some(&entry.app),
            Some(&entry.kind),
            entry.build_id.as_ref(),
            entry.release_id.as_ref(),
        ]
        .into_iter()
        .chain([entry.process_id.as_ref(), Some(&entry.message)])
        .flatten()
        .map(String::len)
        .sum::<usize>();
        std::mem::size_of::<FeedEvent>() + text + json_weight(&entry.data.0)
    }
}

/// Roughly what a JSON value holds in memory (its text's length, plus a word per node).
fn json_weight(value: &serde_json::Value) -> usize {
    let node = std::mem::size_of::<serde_json::Value>();
    match value {
        serde_json::Value::String(s) => node + s.len(),
        serde_json::Value::Array(items) => node + items.iter().map(json_weight).sum::<usize>(),
        serde_json::Value::Object(fields) => node + fields.iter().map(|(k, v)| k.len() + json_weight(v)).sum::<usize>(),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => node,
    }
}

#[async_trait::async_trait]
impl Filter<FeedLog> for FeedFilter {
    fn matches(&self, event: &FeedEvent) -> bool {
        self.contains(event)
    }

    fn ends(&self, _: &FeedEvent) -> bool {
        false
    }

    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<FeedEvent>, sqlx::Error> {
        crate::store::feed::list_after(pool, self, after, limit).await
    }
}

/// An app's events, as a tail follows them.
#[derive(Debug, Clone)]
pub struct AppLog {
    app: String,
}

#[async_trait::async_trait]
impl tail::Log for AppLog {
    type Entry = Event;

    fn key(&self) -> String {
        self.app.clone()
    }

    fn concerns(&self, wake: &Wake) -> bool {
        match wake {
            Wake::Events(app) => *app == self.app,
            Wake::All => true,
            Wake::Jobs | Wake::Feed | Wake::Revoked(_) | Wake::RackLog => false,
        }
    }

    async fn horizon(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        crate::store::events::horizon(pool, &self.app).await
    }

    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
        let all = Topic::App {
            app: self.app.clone(),
            service: None,
            filter: None,
        };
        crate::store::events::list_after(pool, &all, after, limit).await
    }

    fn seq(entry: &Event) -> i64 {
        entry.seq
    }

    fn at(entry: &Event) -> chrono::DateTime<chrono::Utc> {
        entry.at
    }

    fn weight(entry: &Event) -> usize {
        std::mem::size_of::<Event>()
            + entry.app.len()
            + entry.stream.len()
            + entry.message.len()
            + entry.build_id.as_deref().map_or(0, str::len)
    }
}

/// What a subscriber of a log wants of it: its entries that match, read from Postgres when it
/// catches up, and which one ends it.
#[async_trait::async_trait]
pub trait Filter<L: tail::Log>: Send + Sync + 'static {
    /// Whether `entry` is one of the subscriber's.
    fn matches(&self, entry: &L::Entry) -> bool;
    /// Whether `entry` (a match) is the last the subscriber gets.
    fn ends(&self, entry: &L::Entry) -> bool;
    /// Up to `limit` matching entries after seq `after`, from Postgres.
    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<L::Entry>, sqlx::Error>;
}

#[async_trait::async_trait]
impl Filter<AppLog> for Topic {
    fn matches(&self, event: &Event) -> bool {
        self.contains(event)
    }

    fn ends(&self, event: &Event) -> bool {
        event.outcome.is_some() && !matches!(self, Topic::App { .. })
    }

    async fn read(&self, pool: &PgPool, after: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
        crate::store::events::list_after(pool, self, after, limit).await
    }
}

/// An event as a log line: `<RFC3339> <stream> <message>` with `prefix`, else the message.
pub fn format_line(event: &Event, prefix: bool) -> String {
    if prefix {
        format!(
            "{} {} {}\n",
            event.at.format("%Y-%m-%dT%H:%M:%SZ"),
            event.stream,
            event.message
        )
    } else {
        format!("{}\n", event.message)
    }
}

/// The last line of a finished topic in our own text format: `OK`, or `ERROR: <reason>`.
pub fn outcome_line(event: &Event) -> Option<String> {
    match event.outcome? {
        crate::deploy::Outcome::Ok => Some("OK\n".to_owned()),
        crate::deploy::Outcome::Error => Some(format!("ERROR: {}\n", event.message)),
    }
}

/// A new LISTEN connection (from `pool`, which it then holds) on every channel rack announces on.
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([
            EVENTS_CHANNEL,
            FEED_CHANNEL,
            JOBS_CHANNEL,
            crate::store::tokens::REVOKED_CHANNEL,
            crate::store::rack_log::RACK_LOG_CHANNEL,
        ])
        .await?;
    Ok(listener)
}
