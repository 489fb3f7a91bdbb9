//! Tracing setup: `RUST_LOG` filters (default `info,rack=debug,tower_http=info` for the server),
//! compact lines for a terminal or JSON objects for log collectors.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to stderr. `default_filter` applies when `RUST_LOG`
/// is unset. Calling it twice keeps the first subscriber.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // rack's own log (`rack logs`) is kept beside stderr, with a filter of its own (info).
    let registry = tracing_subscriber::registry()
        .with(crate::rack_log::layer())
        .with(filter);
    let result = match format {
        LogFormat::Compact => registry
            .with(tracing_subscriber::fmt::layer().compact().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    drop(result);
}
