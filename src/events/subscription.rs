//! One subscriber of a log: what it missed from Postgres first (a resume from a cursor older
//! than its tail's window, or everything since its cursor), then the batches its replica's tail
//! keeps in its window, filtered to what it wants. It tracks `seen`, the seq up to which it has
//! considered every entry of the log, and each time it looks compares it with the window's
//! range: past `seen` in the window, it takes the batches from memory; before the window's
//! start, it catches up from Postgres; so nothing is lost or repeated whatever the timing, and
//! one that falls behind costs no read until it falls out of the window.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::Filter;
use super::tail::{Batch, Follower, Found, IDLE_EVERY, Log, PAGE, Reader, Tails};
use crate::store::events::Event;

/// How a subscription ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Until the topic's terminal event (builds, deployments), or forever (logs, feeds).
    UntilEnd,
    /// Only what exists now.
    Backlog,
}

/// An item of a subscription.
#[derive(Debug, Clone)]
pub enum Item<E = Event> {
    Event(E),
    /// Nothing happened for a while: transports send a heartbeat.
    Idle,
    /// The server is shutting down: clients should reconnect (to another replica).
    ShuttingDown,
    /// The stream ended for a reason of its own (its credential was revoked or expired, it
    /// fell too far behind): why.
    Closed(String),
}

/// What a subscription yields.
type Items<E> = Pin<Box<dyn Stream<Item = Result<Item<E>, sqlx::Error>> + Send>>;

/// A live subscription: a stream of `Result<Item<entry>, sqlx::Error>`.
pub struct Subscription<L: Log, F: Filter<L>> {
    inner: Items<L::Entry>,
    _types: std::marker::PhantomData<fn() -> F>,
}

impl<L: Log, F: Filter<L>> Stream for Subscription<L, F> {
    type Item = Result<Item<L::Entry>, sqlx::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct State<L: Log, F: Filter<L>> {
    reader: Reader,
    log: L,
    filter: F,
    /// Its hold on the log's tail: the window, and its changes.
    tail: Follower<L::Entry>,
    shutdown: CancellationToken,
    /// Every entry of the log up to here has been considered.
    seen: i64,
    /// Matching entries to hand out, in order.
    buffered: VecDeque<L::Entry>,
    /// Postgres has more for us than the last catch-up page held.
    behind: bool,
    follow: Follow,
}

impl<L: Log, F: Filter<L>> Subscription<L, F> {
    /// Subscribes to `log` through this replica's `tails`, for what `filter` wants after seq
    /// `after`.
    pub fn new(
        reader: Reader,
        tails: &Tails<L>,
        shutdown: CancellationToken,
        log: L,
        filter: F,
        after: i64,
        follow: Follow,
    ) -> Self {
        let tail = tails.subscribe(log.clone());
        // A cursor the window holds costs no read (a client resuming a moment later); any
        // other reads Postgres first. Either way the window is compared with `seen` before
        // each wait, so the order of this look and the tail's reads does not matter.
        let behind = follow == Follow::Backlog || !tail.covers(after);
        let state = State {
            reader,
            log,
            filter,
            tail,
            shutdown,
            seen: after,
            buffered: VecDeque::new(),
            behind,
            follow,
        };
        let inner = futures_util::stream::unfold(Some(state), |state| next(state));
        Self {
            inner: Box::pin(inner),
            _types: std::marker::PhantomData,
        }
    }
}

/// How many entries a subscriber takes from the window at a time.
const PAGE_ENTRIES: usize = PAGE.unsigned_abs() as usize;

type Next<L, F> = Option<(Result<Item<<L as Log>::Entry>, sqlx::Error>, Option<State<L, F>>)>;

fn next<L: Log, F: Filter<L>>(state: Option<State<L, F>>) -> BoxFuture<'static, Next<L, F>> {
    Box::pin(async move {
        let mut state = state?;
        loop {
            if let Some(entry) = state.buffered.pop_front() {
                let ends = state.filter.ends(&entry);
                let rest = if ends { None } else { Some(state) };
                return Some((Ok(Item::Event(entry)), rest));
            }
            if state.behind {
                // Once the window holds everything after `seen` (the tail started, or this
                // subscriber read up to where the window begins), the rest is in memory.
                if state.follow == Follow::UntilEnd && state.tail.covers(state.seen) {
                    state.behind = false;
                    continue;
                }
                if let Err(e) = state.catch_up().await {
                    return Some((Err(e), None));
                }
                continue;
            }
            if state.follow == Follow::Backlog {
                return None;
            }
            match state.tail.after(state.seen, PAGE_ENTRIES) {
                Found::Batches(batches) => {
                    for batch in &batches {
                        state.take(batch);
                    }
                    continue;
                }
                // The window begins past `seen` (the tail started or restarted after this
                // subscriber's last read, or it fell behind the window): Postgres has the rest.
                Found::Gap => {
                    state.behind = true;
                    continue;
                }
                Found::Failed(failure) => return Some((Err(sqlx::Error::Protocol(failure)), None)),
                // The server is stopping; or the tail's task ended for a reason of its own,
                // and the client resumes (a new tail starts for it).
                Found::Stopped if state.shutdown.is_cancelled() => return Some((Ok(Item::ShuttingDown), None)),
                Found::Stopped => {
                    let stopped = "the tail of this event log stopped".to_owned();
                    return Some((Err(sqlx::Error::Protocol(stopped)), None));
                }
                Found::Nothing => {}
            }
            tokio::select! {
                () = state.shutdown.cancelled() => return Some((Ok(Item::ShuttingDown), None)),
                () = tokio::time::sleep(IDLE_EVERY) => return Some((Ok(Item::Idle), Some(state))),
                () = state.tail.changed() => {}
            }
        }
    })
}

impl<L: Log, F: Filter<L>> State<L, F> {
    /// Reads what it wants after `seen` from Postgres: one page, and the log's horizon first
    /// (everything up to it is committed, so a short page means it has seen up to there).
    async fn catch_up(&mut self) -> Result<(), sqlx::Error> {
        let (horizon, entries) = self.reader.catch_up(&self.log, &self.filter, self.seen, PAGE).await?;
        let full = i64::try_from(entries.len()).unwrap_or(i64::MAX) >= PAGE;
        let last = entries.last().map(L::seq);
        self.buffered.extend(entries);
        match last {
            Some(last) if full => self.seen = last,
            last => {
                self.seen = self.seen.max(horizon).max(last.unwrap_or_default());
                self.behind = false;
            }
        }
        Ok(())
    }

    /// Takes a batch of the window that ends past `seen` (and, the window being contiguous
    /// from before `seen`, starts at or before it): what it wants of it.
    fn take(&mut self, batch: &Batch<L::Entry>) {
        debug_assert!(batch.after <= self.seen, "a batch past a gap");
        for entry in &batch.entries {
            if L::seq(entry) > self.seen && self.filter.matches(entry) {
                self.buffered.push_back(entry.clone());
            }
        }
        self.seen = self.seen.max(batch.last);
    }
}
