//! The event bus: events are appended to Postgres (the source of truth) and announced with
//! NOTIFY; each replica keeps one LISTEN connection and wakes its local subscribers, which then
//! read what is new from Postgres after their cursor. So a subscriber on any replica sees every
//! event of its topic once, in order, whoever wrote it, and a slow subscriber loses nothing.
//!
//! ```text
//! writer ── insert + pg_notify ──► Postgres ──► LISTEN (one per replica) ──► broadcast wake
//!                                     ▲                                         │
//!                                     └──── select … where seq > cursor ◄── subscriber
//! ```

use std::time::Duration;

use futures_util::Stream;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::store::builds::JOBS_CHANNEL;
use crate::store::events::{EVENTS_CHANNEL, Event, Topic};

/// How many events a subscriber reads from Postgres at a time.
const PAGE: i64 = 500;

/// A subscriber that heard nothing for this long reads Postgres anyway: a safety net for a
/// notification lost while the LISTEN connection was being re-established.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// Something changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// New events for this app.
    Events(String),
    /// New work for the job workers.
    Jobs,
    /// Anything may have changed (the LISTEN connection was re-established).
    All,
    /// This token was revoked: the streams it opened end.
    Revoked(uuid::Uuid),
}

/// The replica's end of the bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    wake: broadcast::Sender<Wake>,
}

impl EventBus {
    /// Starts listening. The listener stops when `shutdown` is cancelled.
    ///
    /// # Errors
    /// When the first LISTEN connection cannot be made.
    pub async fn start(pool: &PgPool, shutdown: CancellationToken) -> Result<Self, sqlx::Error> {
        let (wake, _) = broadcast::channel(1024);
        let mut listener = PgListener::connect_with(pool).await?;
        listener
            .listen_all([EVENTS_CHANNEL, JOBS_CHANNEL, crate::store::tokens::REVOKED_CHANNEL])
            .await?;
        let sender = wake.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                let message = match received {
                    Ok(Some(n)) if n.channel() == EVENTS_CHANNEL => Wake::Events(n.payload().to_owned()),
                    Ok(Some(n)) if n.channel() == crate::store::tokens::REVOKED_CHANNEL => match n.payload().parse() {
                        Ok(id) => Wake::Revoked(id),
                        Err(_) => continue,
                    },
                    Ok(Some(_)) => Wake::Jobs,
                    // The connection was lost and is re-established on the next call; whatever
                    // was announced meanwhile is unknown, so everybody looks.
                    Ok(None) => Wake::All,
                    Err(error) => {
                        tracing::warn!(error = %error, "the LISTEN connection failed; retrying");
                        let _ = sender.send(Wake::All);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                };
                // No receivers is fine: nobody is waiting.
                let _ = sender.send(message);
            }
        });
        Ok(Self { wake })
    }

    /// A receiver of wake-ups. Subscribe *before* reading from Postgres, or an event committed
    /// between the read and the subscription would wait for the next poll.
    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.wake.subscribe()
    }

    /// Wakes local subscribers of `app` (used by writers in this replica for lower latency;
    /// the NOTIFY reaches the other replicas).
    pub fn poke(&self, wake: Wake) {
        let _ = self.wake.send(wake);
    }
}

/// How a subscription ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Until the topic's terminal event (builds, deployments), or forever (app logs).
    UntilEnd,
    /// Only what exists now.
    Backlog,
}

/// An item of a subscription.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Event),
    /// Nothing happened for a while: transports send a heartbeat.
    Idle,
    /// The server is shutting down: clients should reconnect (to another replica).
    ShuttingDown,
    /// The stream's credential ended (revoked, expired): why.
    Closed(String),
}

/// The events of `topic` after seq `after`, in order, then live ones as they come, ending
/// after the terminal event (an event with an outcome) or at shutdown.
pub fn subscribe(
    pool: PgPool,
    bus: &EventBus,
    shutdown: CancellationToken,
    topic: Topic,
    after: i64,
    follow: Follow,
) -> impl Stream<Item = Result<Item, sqlx::Error>> + Send + 'static {
    let wake = bus.subscribe();
    futures_util::stream::unfold(
        Some(State {
            pool,
            wake,
            shutdown,
            topic,
            cursor: after,
            buffered: Default::default(),
            follow,
        }),
        |state| async move {
            let mut state = state?;
            loop {
                if let Some(event) = state.buffered.pop_front() {
                    state.cursor = event.seq;
                    let terminal = event.outcome.is_some() && !matches!(state.topic, Topic::App { .. });
                    let next = if terminal { None } else { Some(state) };
                    return Some((Ok(Item::Event(event)), next));
                }
                match crate::store::events::list_after(&state.pool, &state.topic, state.cursor, PAGE).await {
                    Ok(events) if !events.is_empty() => {
                        state.buffered.extend(events);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => return Some((Err(e), None)),
                }
                if state.follow == Follow::Backlog {
                    return None;
                }
                match state.wait().await {
                    Waited::Woken => continue,
                    Waited::Idle => return Some((Ok(Item::Idle), Some(state))),
                    Waited::ShuttingDown => return Some((Ok(Item::ShuttingDown), None)),
                }
            }
        },
    )
}

struct State {
    pool: PgPool,
    wake: broadcast::Receiver<Wake>,
    shutdown: CancellationToken,
    topic: Topic,
    cursor: i64,
    buffered: std::collections::VecDeque<Event>,
    follow: Follow,
}

enum Waited {
    Woken,
    Idle,
    ShuttingDown,
}

impl State {
    /// Waits for a wake-up that concerns this topic's app, a poll interval, or shutdown.
    async fn wait(&mut self) -> Waited {
        let deadline = tokio::time::sleep(POLL_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Waited::ShuttingDown,
                () = &mut deadline => return Waited::Idle,
                received = self.wake.recv() => match received {
                    Ok(Wake::Events(app)) if app == self.topic.app() => return Waited::Woken,
                    Ok(Wake::All) => return Waited::Woken,
                    Ok(_) => {}
                    // Missed wake-ups only mean "look again": the events are in Postgres.
                    Err(broadcast::error::RecvError::Lagged(_)) => return Waited::Woken,
                    Err(broadcast::error::RecvError::Closed) => return Waited::ShuttingDown,
                },
            }
        }
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
