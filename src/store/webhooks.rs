//! Webhooks, their deliveries and each delivery's attempts (`migrations/0015_webhooks.sql`).
//! Deliveries are queued by a trigger on the feed; workers claim due ones with `FOR UPDATE
//! SKIP LOCKED` and a lease, and record each attempt with its outcome in one transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// A webhook (its secret is only read by the delivery worker).
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Hook {
    pub id: Uuid,
    pub url: String,
    #[serde(skip)]
    pub secret: String,
    pub events: Vec<String>,
    pub apps: Option<Vec<String>>,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

/// What a new hook holds.
#[derive(Debug)]
pub struct NewHook<'a> {
    pub id: Uuid,
    pub url: &'a str,
    pub secret: &'a str,
    pub events: &'a [String],
    pub apps: Option<&'a [String]>,
}

/// Stores a new hook.
pub async fn insert(pool: &PgPool, new: &NewHook<'_>) -> Result<Hook, sqlx::Error> {
    sqlx::query_as("insert into webhooks (id, url, secret, events, apps) values ($1, $2, $3, $4, $5) returning *")
        .bind(new.id)
        .bind(new.url)
        .bind(new.secret)
        .bind(new.events)
        .bind(new.apps)
        .fetch_one(pool)
        .await
}

/// Every hook, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Hook>, sqlx::Error> {
    sqlx::query_as("select * from webhooks order by created_at, id")
        .fetch_all(pool)
        .await
}

/// One hook.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Hook>, sqlx::Error> {
    sqlx::query_as("select * from webhooks where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Deletes a hook and its deliveries; false when there was none.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("delete from webhooks where id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// A delivery of one event to one hook.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Delivery {
    pub id: Uuid,
    pub hook_id: Uuid,
    pub event_id: i64,
    pub app: String,
    pub kind: String,
    pub state: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Attempt {
    #[serde(skip)]
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i32,
    pub response: String,
}

/// A hook's newest deliveries, newest first (before `before`, a delivery id, when given).
pub async fn deliveries(
    pool: &PgPool,
    hook: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(
        "select id, hook_id, event_id, app, kind, state, attempts, created_at, next_attempt_at, ended_at, reason
           from webhook_deliveries
          where hook_id = $1
            and ($2::uuid is null
                 or (created_at, id) < (select created_at, id from webhook_deliveries where id = $2))
          order by created_at desc, id desc
          limit $3",
    )
    .bind(hook)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The attempts of these deliveries, in order.
pub async fn attempts(pool: &PgPool, deliveries: &[Uuid]) -> Result<Vec<Attempt>, sqlx::Error> {
    sqlx::query_as(
        "select delivery_id, attempt, at, status, error, latency_ms, response
           from webhook_attempts where delivery_id = any($1) order by id",
    )
    .bind(deliveries)
    .fetch_all(pool)
    .await
}

/// Queues a delivery of the hook again, at once, with retries for as long as a new one gets
/// (same delivery id, so a receiver that already has it can tell). Returns it, or `None` when
/// the hook has no such delivery; `Err(Conflict)`-like cases are told by [`Redelivery`].
pub async fn redeliver(pool: &PgPool, hook: Uuid, delivery: Uuid) -> Result<Redelivery, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let enabled: Option<bool> = sqlx::query_scalar("select enabled from webhooks where id = $1 for update")
        .bind(hook)
        .fetch_optional(&mut *tx)
        .await?;
    match enabled {
        None => return Ok(Redelivery::NoHook),
        Some(false) => return Ok(Redelivery::Disabled),
        Some(true) => {}
    }
    let row: Option<Delivery> = sqlx::query_as(
        "update webhook_deliveries
            set state = 'pending', retry_since = now(), next_attempt_at = now(), ended_at = null, reason = null
          where id = $1 and hook_id = $2 and (state <> 'pending' or lease_owner is null)
          returning id, hook_id, event_id, app, kind, state, attempts, created_at, next_attempt_at, ended_at, reason",
    )
    .bind(delivery)
    .bind(hook)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from webhook_deliveries where id = $1 and hook_id = $2)")
                .bind(delivery)
                .bind(hook)
                .fetch_one(&mut *tx)
                .await?;
        return Ok(if exists {
            Redelivery::InFlight
        } else {
            Redelivery::NoDelivery
        });
    };
    // Wakes the delivery workers of every replica.
    sqlx::query("select pg_notify($1, 'webhook')")
        .bind(crate::store::builds::JOBS_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Redelivery::Queued(row))
}

/// What a redelivery request came to.
#[derive(Debug)]
pub enum Redelivery {
    Queued(Delivery),
    NoHook,
    NoDelivery,
    /// The hook is disabled: nothing is delivered to it.
    Disabled,
    /// An attempt is in flight right now.
    InFlight,
}

/// A claimed delivery, with what its attempt needs.
#[derive(Debug, Clone, FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub hook_id: Uuid,
    pub kind: String,
    pub payload: sqlx::types::Json<serde_json::Value>,
    /// This attempt's number.
    pub attempts: i32,
    pub retry_since: DateTime<Utc>,
    pub url: String,
    pub secret: String,
    /// Set when the previous attempt's holder stopped before it recorded the outcome.
    pub previous_owner: Option<Uuid>,
    pub previous_claimed_at: Option<DateTime<Utc>>,
}

/// Claims the most overdue pending delivery of an enabled hook (or one whose holder's lease
/// has expired) for `owner` until `lease` from now. Concurrent claimers never get the same one.
pub async fn claim_next(pool: &PgPool, owner: Uuid, lease: Duration) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "with next as (
             select d.id, d.lease_owner as previous_owner, d.claimed_at as previous_claimed_at
               from webhook_deliveries d
              where d.state = 'pending' and d.next_attempt_at <= now()
                and (d.lease_expires_at is null or d.lease_expires_at < now())
              order by d.next_attempt_at
              for update skip locked
              limit 1),
         claimed as (
             update webhook_deliveries d
                set lease_owner = $1, lease_expires_at = now() + $2, claimed_at = now(), attempts = d.attempts + 1
               from next
              where d.id = next.id
          returning d.id, d.hook_id, d.kind, d.payload, d.attempts, d.retry_since,
                    next.previous_owner, next.previous_claimed_at)
         select c.*, h.url, h.secret from claimed c join webhooks h on h.id = c.hook_id",
    )
    .bind(owner)
    .bind(lease)
    .fetch_optional(pool)
    .await
}

/// When the next pending delivery is due (none: nothing is pending).
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "select min(greatest(next_attempt_at, coalesce(lease_expires_at, next_attempt_at)))
           from webhook_deliveries where state = 'pending'",
    )
    .fetch_one(pool)
    .await
}

/// Records an attempt its holder never finished (it stopped mid-delivery).
pub async fn record_interrupted(pool: &PgPool, claimed: &Claimed) -> Result<(), sqlx::Error> {
    let latency = claimed.previous_claimed_at.map_or(0, |at| {
        i32::try_from((Utc::now() - at).num_milliseconds().max(0)).unwrap_or(i32::MAX)
    });
    sqlx::query(
        "insert into webhook_attempts (delivery_id, attempt, status, error, latency_ms)
         values ($1, $2, null, 'interrupted: the rack server sending it stopped before it had the answer', $3)",
    )
    .bind(claimed.id)
    .bind(claimed.attempts - 1)
    .bind(latency)
    .execute(pool)
    .await
    .map(drop)
}

/// What an attempt came to.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i32,
    pub response: String,
    /// The receiver took it (2xx).
    pub delivered: bool,
    /// When to try again (`None`: give up, with `reason`).
    pub retry_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

/// What recording an attempt did to the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The outcome is recorded.
    Done,
    /// The claim had been taken over: only the attempt is recorded.
    LeaseLost,
    /// The hook has failed for longer than allowed and is now disabled.
    Disabled,
}

/// Records an attempt and its outcome in one transaction: the attempt's log line, the
/// delivery's new state (when `owner` still holds it), the hook's failure streak, and, when
/// the streak is older than `disable_after`, the hook disabled, its pending deliveries given
/// up and a `webhook.disabled` feed event (rack-wide: its app is empty).
pub async fn record(
    pool: &PgPool,
    claimed: &Claimed,
    owner: Uuid,
    outcome: &Outcome,
    disable_after: Duration,
) -> Result<Recorded, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into webhook_attempts (delivery_id, attempt, status, error, latency_ms, response)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .bind(outcome.status)
    .bind(&outcome.error)
    .bind(outcome.latency_ms)
    .bind(&outcome.response)
    .execute(&mut *tx)
    .await?;
    let state = match (outcome.delivered, outcome.retry_at) {
        (true, _) => "delivered",
        (false, Some(_)) => "pending",
        (false, None) => "failed",
    };
    let updated = sqlx::query(
        "update webhook_deliveries
            set state = $3, next_attempt_at = coalesce($4, next_attempt_at),
                ended_at = case when $3 = 'pending' then null else now() end,
                reason = $5, lease_owner = null, lease_expires_at = null
          where id = $1 and lease_owner = $2",
    )
    .bind(claimed.id)
    .bind(owner)
    .bind(state)
    .bind(outcome.retry_at)
    .bind(&outcome.reason)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        tx.commit().await?;
        return Ok(Recorded::LeaseLost);
    }
    if outcome.delivered {
        sqlx::query("update webhooks set failing_since = null where id = $1 and failing_since is not null")
            .bind(claimed.hook_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(Recorded::Done);
    }
    let since: Option<DateTime<Utc>> = sqlx::query_scalar(
        "update webhooks set failing_since = coalesce(failing_since, now())
          where id = $1 and enabled returning failing_since",
    )
    .bind(claimed.hook_id)
    .fetch_optional(&mut *tx)
    .await?;
    let expired = since
        .is_some_and(|since| chrono::Duration::from_std(disable_after).is_ok_and(|limit| Utc::now() - since >= limit));
    if !expired {
        tx.commit().await?;
        return Ok(Recorded::Done);
    }
    let reason = format!(
        "every delivery failed for {} (the last: {})",
        crate::webhooks::human(disable_after),
        outcome
            .reason
            .as_deref()
            .or(outcome.error.as_deref())
            .unwrap_or("no answer")
    );
    sqlx::query("update webhooks set enabled = false, disabled_at = now(), disabled_reason = $2 where id = $1")
        .bind(claimed.hook_id)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "update webhook_deliveries
            set state = 'failed', ended_at = now(), reason = 'the webhook was disabled', lease_owner = null,
                lease_expires_at = null
          where hook_id = $1 and state = 'pending'",
    )
    .bind(claimed.hook_id)
    .execute(&mut *tx)
    .await?;
    let url: String = sqlx::query_scalar("select url from webhooks where id = $1")
        .bind(claimed.hook_id)
        .fetch_one(&mut *tx)
        .await?;
    // The feed's counter is the last lock of the transaction (see 0011_feed.sql).
    sqlx::query("select rack_feed_append('', 'webhook.disabled', null, null, null, null, $1, $2)")
        .bind(format!("Webhook {} disabled: {reason}", claimed.hook_id))
        .bind(sqlx::types::Json(serde_json::json!({
            "webhook": claimed.hook_id,
            "url": crate::webhooks::redacted(&url),
            "reason": reason,
        })))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Recorded::Disabled)
}

/// Hands a claimed delivery back untried (its holder is shutting down), due at once.
pub async fn release(pool: &PgPool, id: Uuid, owner: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update webhook_deliveries
            set lease_owner = null, lease_expires_at = null, claimed_at = null, attempts = attempts - 1
          where id = $1 and lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(pool)
    .await
    .map(drop)
}

/// Deletes ended deliveries (and their attempts) older than `age`; returns how many.
pub async fn prune(pool: &PgPool, age: Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("delete from webhook_deliveries where state <> 'pending' and ended_at < now() - $1")
        .bind(age)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
