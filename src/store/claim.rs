//! What a job row (a build, a deployment) records of the workers that run it, the same for
//! both: who holds it, until when, how many times it was claimed, whether a cancel was asked
//! for, and when it first started and ended.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

/// A job row's claim columns (flattened into `Build` and `Deployment`).
#[derive(Debug, Clone, FromRow)]
pub struct Claim {
    /// A cancel was asked for; the holder learns it at its next renewal.
    pub cancel_requested: bool,
    /// How many times it was claimed: more than once when a holder died and another took over.
    pub attempts: i32,
    /// The replica holding it, if any.
    #[sqlx(rename = "lease_owner")]
    pub owner: Option<Uuid>,
    /// When the holder's lease runs out unless renewed.
    #[sqlx(rename = "lease_expires_at")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was first claimed.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
}
