//! The webhook delivery loop of a replica: it claims due deliveries (`FOR UPDATE SKIP
//! LOCKED`, with a lease as long as an attempt may take plus the job lease), sends each as one
//! attempt (at most `RACK_WEBHOOK_WORKERS` at once) and records the outcome: delivered, retried
//! later with exponential backoff, or given up once its retry period is over. A replica that
//! dies mid-attempt leaves its claim to expire; the next claimer logs the lost attempt as
//! interrupted and sends it again, with the same delivery id, so receivers can dedupe.
//!
//! It wakes on feed NOTIFYs (deliveries are queued with feed events), on job NOTIFYs (a
//! redelivery), when the earliest pending delivery comes due, and every few seconds.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinSet;

use crate::AppState;
use crate::events::Wake;
use crate::store::webhooks::{self as store, Claimed, Outcome, Recorded};
use crate::webhooks::send::{Request, Sender};

/// Longest the loop sleeps without being woken.
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Runs until the server stops.
pub async fn deliver(state: AppState) {
    let settings = state.config.webhooks.clone();
    if settings.workers == 0 {
        tracing::info!("this server sends no webhook deliveries (RACK_WEBHOOK_WORKERS=0)");
        return;
    }
    let sender = match Sender::new(&settings) {
        Ok(sender) => sender,
        Err(e) => {
            tracing::error!("webhooks are not delivered: the HTTP client cannot be built: {e:#}");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(settings.workers));
    let lease = settings.timeout + state.config.job_lease;
    let mut wake = state.bus.subscribe();
    let mut attempts = JoinSet::new();
    loop {
        while attempts.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = state.shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        match store::claim_next(&state.pool, state.replica, lease).await {
            Ok(Some(claimed)) => {
                let (state, sender) = (state.clone(), sender.clone());
                attempts.spawn(async move {
                    attempt(&state, &sender, claimed).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                if !wait(&state, &mut wake).await {
                    break;
                }
            }
            Err(e) => {
                drop(permit);
                tracing::warn!("claiming a webhook delivery: {e}");
                tokio::select! {
                    () = state.shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    while attempts.join_next().await.is_some() {}
}

/// Waits until a delivery may be due. Returns false when the server is shutting down.
async fn wait(state: &AppState, wake: &mut tokio::sync::broadcast::Receiver<Wake>) -> bool {
    let pause = match store::next_due(&state.pool).await {
        Ok(Some(due)) => (due - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(IDLE_POLL),
        _ => IDLE_POLL,
    };
    if pause.is_zero() {
        // Due, but claimed by someone else whose lease has not expired by a hair: look again soon.
        tokio::time::sleep(Duration::from_millis(50)).await;
        return !state.shutdown.is_cancelled();
    }
    let deadline = tokio::time::sleep(pause);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return false,
            () = &mut deadline => return true,
            received = wake.recv() => match received {
                Ok(Wake::Events(_) | Wake::Revoked(_) | Wake::RackLog) => {}
                _ => return true,
            },
        }
    }
}

/// One attempt of a claimed delivery, and its record.
async fn attempt(state: &AppState, sender: &Sender, claimed: Claimed) {
    let settings = &state.config.webhooks;
    if claimed.previous_owner.is_some()
        && let Err(e) = store::record_interrupted(&state.pool, &claimed).await
    {
        tracing::warn!(delivery = %claimed.id, "recording an interrupted webhook attempt: {e}");
    }
    let body = serde_json::to_vec(&claimed.payload.0).unwrap_or_default();
    let request = Request {
        url: &claimed.url,
        secret: &claimed.secret,
        delivery: claimed.id,
        kind: &claimed.kind,
        attempt: claimed.attempts,
        body: &body,
    };
    let attempted = tokio::select! {
        attempted = sender.send(&request) => attempted,
        () = state.shutdown.cancelled() => {
            // Handed back untried; another replica (or this one, restarted) sends it.
            if let Err(e) = store::release(&state.pool, claimed.id, state.replica).await {
                tracing::warn!(delivery = %claimed.id, "handing back a webhook delivery: {e}");
            }
            return;
        }
    };
    let delivered = attempted.delivered();
    let now = Utc::now();
    let give_up_at =
        claimed.retry_since + chrono::Duration::from_std(settings.retry_for).unwrap_or(chrono::Duration::MAX);
    let (retry_at, reason) = if delivered {
        (None, None)
    } else if now >= give_up_at {
        (
            None,
            Some(format!(
                "gave up after {} attempts over {}",
                claimed.attempts,
                crate::webhooks::human(settings.retry_for)
            )),
        )
    } else {
        let wait = chrono::Duration::from_std(settings.backoff(claimed.attempts + 1)).unwrap_or(chrono::Duration::MAX);
        (Some((now + wait).min(give_up_at)), None)
    };
    let outcome = Outcome {
        status: attempted.status.map(i32::from),
        error: attempted.error.clone(),
        latency_ms: i32::try_from(attempted.latency.as_millis()).unwrap_or(i32::MAX),
        response: attempted.response,
        delivered,
        retry_at,
        reason,
    };
    tracing::debug!(
        delivery = %claimed.id,
        webhook = %claimed.hook_id,
        attempt = claimed.attempts,
        status = ?outcome.status,
        "webhook attempt: {}",
        if delivered { "delivered" } else { outcome.error.as_deref().unwrap_or("failed") }
    );
    match store::record(&state.pool, &claimed, state.replica, &outcome, settings.disable_after).await {
        Ok(Recorded::Done) => {}
        Ok(Recorded::LeaseLost) => {
            tracing::warn!(delivery = %claimed.id, "a webhook attempt outlived its claim; another replica retries it")
        }
        Ok(Recorded::Disabled) => tracing::warn!(
            webhook = %claimed.hook_id,
            "webhook {} disabled: its deliveries failed for {}",
            claimed.hook_id,
            crate::webhooks::human(settings.disable_after)
        ),
        // The claim expires and the delivery is sent again (receivers dedupe on its id).
        Err(e) => tracing::warn!(delivery = %claimed.id, "recording a webhook attempt: {e}"),
    }
}
