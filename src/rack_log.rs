//! rack's own log (convox `rack logs`, `GET /system/logs`): what the server logs, also kept in
//! memory (the newest [`KEEP`] lines) and handed to followers as it is written, with anything
//! shaped like a credential masked on the way in. One log per process: a replica serves its own.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Lines kept for a client that asks for what came before it connected.
pub const KEEP: usize = 2000;

/// One line of the log.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: DateTime<Utc>,
    /// `INFO`, `WARN`, ...
    pub level: &'static str,
    /// `<target>: <message> <field>=<value> ...`, credentials masked.
    pub text: String,
}

struct RackLog {
    recent: Mutex<VecDeque<Arc<Line>>>,
    followers: broadcast::Sender<Arc<Line>>,
}

static LOG: LazyLock<RackLog> = LazyLock::new(|| RackLog {
    recent: Mutex::new(VecDeque::with_capacity(KEEP)),
    followers: broadcast::channel(1024).0,
});

/// The kept lines, oldest first, and a receiver of the lines written after them.
pub fn snapshot() -> (Vec<Arc<Line>>, broadcast::Receiver<Arc<Line>>) {
    let recent = LOG.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Subscribed under the lock: no line falls between the two.
    let rx = LOG.followers.subscribe();
    (recent.iter().cloned().collect(), rx)
}

fn push(line: Line) {
    let line = Arc::new(line);
    let mut recent = LOG.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if recent.len() == KEEP {
        recent.pop_front();
    }
    recent.push_back(line.clone());
    let _ = LOG.followers.send(line);
}

/// The layer that writes rack's log here: events at `info` and above.
pub fn layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    Capture.with_filter(tracing_subscriber::filter::LevelFilter::INFO)
}

/// Installs a subscriber that only keeps the log here, when the process has none (a server
/// embedded in another program, or a test); otherwise the one installed (by `telemetry::init`,
/// which includes [`layer`]) stays.
pub fn install_if_none() {
    let _ = tracing_subscriber::registry().with(layer()).try_init();
}

struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let mut text = format!("{}: {}", meta.target(), fields.message);
        text.push_str(&fields.rest);
        push(Line {
            at: Utc::now(),
            level: meta.level().as_str(),
            text: mask(&text),
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// `text` with what looks like a credential replaced by `****`: rack's token secrets
/// (`rack_…`), webhook secrets (`whsec_…`), the password of a URL's user info, the value after
/// `Basic `/`Bearer `, and after `password=`/`secret=`/`token=`.
pub fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for prefix in ["rack_", "whsec_", "Basic ", "Bearer ", "password=", "secret=", "token="] {
            if let Some(after) = strip_prefix_ignore_case(rest, prefix) {
                // A token's secret is letters and digits, and long: a word such as
                // `rack_resources` is no secret.
                let is_token = prefix.ends_with('_');
                let secret_len = after
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || (!is_token && b"+/=_-.~%".contains(b)))
                    .count();
                let long_enough = !is_token || secret_len >= 16;
                if secret_len > 0 && long_enough {
                    out.push_str(&rest[..prefix.len()]);
                    out.push_str("****");
                    rest = &after[secret_len..];
                    continue 'scan;
                }
            }
        }
        if let Some(after) = rest.strip_prefix("://") {
            // `scheme://user:password@host`: keep the user, mask the password.
            let authority_len = after.find(['/', ' ', '"', '\'']).unwrap_or(after.len());
            let authority = &after[..authority_len];
            if let Some(at) = authority.rfind('@')
                && let Some(colon) = authority[..at].find(':')
            {
                out.push_str("://");
                out.push_str(&authority[..=colon]);
                out.push_str("****");
                rest = &after[at..];
                continue;
            }
        }
        let ch = rest.chars().next().unwrap_or_default();
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn credentials_are_masked() {
        assert_eq!(
            mask("token rack_abcdefghijklmnopqrstuvwxyz012345 used"),
            "token rack_**** used"
        );
        assert_eq!(mask("hook secret whsec_0123456789abcdef0123"), "hook secret whsec_****");
        assert_eq!(
            mask("fetching http://convox:s3cretpass@127.0.0.1:5443/apps"),
            "fetching http://convox:****@127.0.0.1:5443/apps"
        );
        assert_eq!(mask("postgres://rack:pw@db/rack"), "postgres://rack:****@db/rack");
        assert_eq!(mask("Authorization: Basic Y29udm94OnB3"), "Authorization: Basic ****");
        assert_eq!(mask("url?password=hunter2&x=1"), "url?password=****&x=1");
        // Words that only look like the start of one stay.
        assert_eq!(
            mask("rack_resources table, https://example.com/x, café"),
            "rack_resources table, https://example.com/x, café"
        );
    }
}
