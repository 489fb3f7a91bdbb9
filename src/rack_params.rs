//! The rack's settable parameters (convox `rack params set`, `PUT /system`): the few settings
//! rack reads where it uses them, so a change applies from the next build, run or prune on
//! every replica without a restart. Each starts at what the environment gave at startup; a
//! value set through the API overrides it until it is set empty again. Every other setting
//! stays with the environment (README, Configuration): naming one is refused.

use std::collections::BTreeMap;

use crate::config::Config;

/// One settable parameter: its name, what it is, its bounds, and its value from the
/// environment.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub description: &'static str,
    pub min: u64,
    pub max: u64,
    default: fn(&Config) -> u64,
}

impl Setting {
    /// Its value from the environment (when nothing was set through the API).
    pub fn default_value(&self, config: &Config) -> u64 {
        (self.default)(config)
    }

    /// Checks a value given through the API.
    ///
    /// # Errors
    /// A message naming the parameter and its bounds.
    pub fn parse(&self, value: &str) -> Result<u64, String> {
        value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| (self.min..=self.max).contains(v))
            .ok_or_else(|| {
                format!(
                    "{}: {value:?} is not a whole number from {} to {} ({})",
                    self.name, self.min, self.max, self.description
                )
            })
    }
}

const DAY: u64 = 86_400;

pub const BUILD_TIMEOUT: Setting = Setting {
    name: "build_timeout",
    description: "seconds a build may run; RACK_BUILD_TIMEOUT",
    min: 1,
    max: DAY,
    default: |c| c.build_timeout.as_secs(),
};

pub const RUN_TIMEOUT: Setting = Setting {
    name: "run_timeout",
    description: "seconds a one-off process may run; RACK_RUN_TIMEOUT",
    min: 1,
    max: 7 * DAY,
    default: |c| c.run_timeout.as_secs(),
};

pub const AUDIT_RETENTION_DAYS: Setting = Setting {
    name: "audit_retention_days",
    description: "days the audit log keeps; RACK_AUDIT_RETENTION_DAYS",
    min: 1,
    max: 3650,
    default: |c| c.audit_retention.as_secs() / DAY,
};

pub const FEED_RETENTION_DAYS: Setting = Setting {
    name: "feed_retention_days",
    description: "days the event feed and webhook deliveries keep; RACK_FEED_RETENTION_DAYS",
    min: 1,
    max: 3650,
    default: |c| c.feed_retention.as_secs() / DAY,
};

pub const METRICS_RETENTION_DAYS: Setting = Setting {
    name: "metrics_retention_days",
    description: "days the apps' per-minute traffic history keeps; RACK_METRICS_RETENTION_DAYS",
    min: 1,
    max: 3650,
    default: |c| c.metrics_retention.as_secs() / DAY,
};

/// Every settable parameter, by name.
pub const SETTINGS: [Setting; 5] = [
    BUILD_TIMEOUT,
    RUN_TIMEOUT,
    AUDIT_RETENTION_DAYS,
    FEED_RETENTION_DAYS,
    METRICS_RETENTION_DAYS,
];

/// The setting named `name`.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Every parameter's value now (`overrides`: those set through the API).
pub fn effective(config: &Config, overrides: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    SETTINGS
        .iter()
        .map(|s| {
            let value = overrides
                .get(s.name)
                .and_then(|v| s.parse(v).ok())
                .unwrap_or_else(|| s.default_value(config));
            (s.name.to_owned(), value.to_string())
        })
        .collect()
}

/// The value of `setting` now. When Postgres cannot say, the environment's (a build or a
/// prune is not held up by a settings lookup).
pub async fn value(pool: &sqlx::PgPool, config: &Config, setting: &Setting) -> u64 {
    match crate::store::rack_system::param(pool, setting.name).await {
        Ok(Some(text)) => setting.parse(&text).unwrap_or_else(|_| setting.default_value(config)),
        Ok(None) => setting.default_value(config),
        Err(e) => {
            tracing::warn!(error = %e, "reading the rack parameter {}; using its default", setting.name);
            setting.default_value(config)
        }
    }
}

/// [`value`] as a duration of seconds.
pub async fn seconds(pool: &sqlx::PgPool, config: &Config, setting: &Setting) -> std::time::Duration {
    std::time::Duration::from_secs(value(pool, config, setting).await)
}

/// [`value`] as a duration of days.
pub async fn days(pool: &sqlx::PgPool, config: &Config, setting: &Setting) -> std::time::Duration {
    std::time::Duration::from_secs(value(pool, config, setting).await.saturating_mul(DAY))
}
