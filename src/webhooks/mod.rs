//! Webhooks: feed events sent as signed JSON to URLs that admins register. The queue is in
//! Postgres (`store/webhooks.rs`, filled by a trigger on the feed), the workers in
//! `jobs/webhooks.rs`; this module holds their settings, the signature, the address policy
//! and the HTTP attempt itself.

pub mod address;
pub mod send;
pub mod signature;

use std::time::Duration;

/// `rack server`'s webhook flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Allow webhooks to reach loopback, private and link-local addresses (checked when a hook
    /// is created and again at each delivery). RACK_WEBHOOK_ALLOW_PRIVATE=1 sets it.
    #[arg(long, env = "RACK_WEBHOOK_ALLOW_PRIVATE", value_parser = clap::builder::FalseyValueParser::new())]
    pub webhook_allow_private: bool,
    /// Seconds a receiver has to answer a delivery.
    #[arg(long, env = "RACK_WEBHOOK_TIMEOUT", default_value_t = 10.0)]
    pub webhook_timeout: f64,
    /// Seconds before the first retry of a failed delivery; each retry waits twice as long as
    /// the one before, up to RACK_WEBHOOK_RETRY_MAX.
    #[arg(long, env = "RACK_WEBHOOK_RETRY_BASE", default_value_t = 10.0)]
    pub webhook_retry_base: f64,
    /// Longest wait between two attempts of a delivery, in seconds.
    #[arg(long, env = "RACK_WEBHOOK_RETRY_MAX", default_value_t = 3600.0)]
    pub webhook_retry_max: f64,
    /// Hours a delivery is retried for before it is given up.
    #[arg(long, env = "RACK_WEBHOOK_RETRY_HOURS", default_value_t = 24.0)]
    pub webhook_retry_hours: f64,
    /// Days of failed deliveries (none succeeding) after which a webhook is disabled.
    #[arg(long, env = "RACK_WEBHOOK_DISABLE_DAYS", default_value_t = 3.0)]
    pub webhook_disable_days: f64,
    /// Deliveries this server sends at once (0: this server sends none, other replicas do;
    /// deliveries still queue).
    #[arg(long, env = "RACK_WEBHOOK_WORKERS", default_value_t = 4)]
    pub webhook_workers: usize,
}

/// The validated webhook settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whether hooks may reach loopback, private and link-local addresses.
    pub allow_private: bool,
    /// How long a receiver has to answer.
    pub timeout: Duration,
    /// The first retry's delay (doubled for each next one).
    pub retry_base: Duration,
    /// The longest delay between attempts.
    pub retry_max: Duration,
    /// How long a delivery is retried.
    pub retry_for: Duration,
    /// How long a hook may fail (no delivery succeeding) before it is disabled.
    pub disable_after: Duration,
    /// Concurrent deliveries per server (0: none).
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allow_private: false,
            timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(3600),
            retry_for: Duration::from_secs(24 * 3600),
            disable_after: Duration::from_secs(3 * 86_400),
            workers: 4,
        }
    }
}

impl Settings {
    /// Validates the flags.
    ///
    /// # Errors
    /// A message that names the variable to fix.
    pub fn from_args(args: &WebhookArgs) -> anyhow::Result<Self> {
        let seconds = |name: &str, value: f64, min: f64| {
            if value.is_finite() && value >= min && value <= 1e9 {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(anyhow::anyhow!(
                    "{name} must be a number of at least {min}, got {value}"
                ))
            }
        };
        Ok(Self {
            allow_private: args.webhook_allow_private,
            timeout: seconds("RACK_WEBHOOK_TIMEOUT", args.webhook_timeout, 0.1)?,
            retry_base: seconds("RACK_WEBHOOK_RETRY_BASE", args.webhook_retry_base, 0.01)?,
            retry_max: seconds("RACK_WEBHOOK_RETRY_MAX", args.webhook_retry_max, 0.01)?,
            retry_for: seconds("RACK_WEBHOOK_RETRY_HOURS", args.webhook_retry_hours * 3600.0, 0.0)?,
            disable_after: seconds("RACK_WEBHOOK_DISABLE_DAYS", args.webhook_disable_days * 86_400.0, 0.0)?,
            workers: args.webhook_workers,
        })
    }

    /// The wait before attempt `next` (2 for the first retry): the base doubled for each retry
    /// before it, at most `retry_max`.
    pub fn backoff(&self, next: i32) -> Duration {
        let doublings = u32::try_from(next.saturating_sub(2)).unwrap_or(0).min(30);
        self.retry_base.saturating_mul(1 << doublings).min(self.retry_max)
    }
}

/// A duration as people say it: `3 days`, `24 hours`, `90 seconds`.
pub fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => plural(s / 86_400, "day"),
        s if s >= 3600 && s % 3600 == 0 => plural(s / 3600, "hour"),
        s if s >= 60 && s % 60 == 0 => plural(s / 60, "minute"),
        s if s >= 1 => plural(s, "second"),
        _ => format!("{} ms", duration.as_millis()),
    }
}

fn plural(n: u64, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// A URL without what may be a credential (user info, query, fragment), for events and logs.
pub fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let settings = Settings {
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(60),
            ..Settings::default()
        };
        let waits: Vec<u64> = (2..8).map(|n| settings.backoff(n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 60, 60, 60]);
        assert_eq!(settings.backoff(i32::MAX).as_secs(), 60);
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redacted("https://user:pw@hooks.example.com/x?token=s#f"),
            "https://hooks.example.com/x"
        );
        assert_eq!(human(Duration::from_secs(3 * 86_400)), "3 days");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
    }
}
