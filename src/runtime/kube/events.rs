//! core/v1 Events of an app's namespace as deploy log lines, the way convox prints them:
//! `system/k8s/<object> <message>`, e.g.
//! `system/k8s/web Scaled up replica set web-745f845dc to 1`.

use std::collections::HashSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::runtime::watcher;

use crate::runtime::LogSink;

/// The log line of an event: `(stream, message)`; `None` for an event without an object or text.
pub fn line(event: &Event) -> Option<(String, String)> {
    let object = event.involved_object.name.as_deref().filter(|n| !n.is_empty())?;
    let message = event.message.as_deref()?.trim();
    if message.is_empty() {
        return None;
    }
    // One event is one line, whatever the message holds.
    let message = message.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    Some((format!("system/k8s/{object}"), message))
}

/// What identifies one occurrence of an event: a repeated event is the same object with a new
/// resource version (its count or series moved on).
fn occurrence(event: &Event) -> Option<(String, String)> {
    Some((event.metadata.uid.clone()?, event.metadata.resource_version.clone()?))
}

/// Writes the namespace's events to `log` as they happen, until dropped. Events that exist
/// when it starts are history (an earlier rollout, or one a previous holder already logged)
/// and are skipped; so are occurrences seen before, when the watch is restarted. `ready` is
/// told once that history is known: what happens after comes into the log.
pub async fn forward(api: Api<Event>, log: LogSink, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    // While listing (at the start and after a watch restart) events are only recorded.
    let mut listing = true;
    let mut first_list = true;
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Init) => listing = true,
            Ok(watcher::Event::InitApply(event)) => {
                let Some(key) = occurrence(&event) else { continue };
                if seen.insert(key) && !first_list {
                    // Happened while the watch was down.
                    emit(&event, &log).await;
                }
            }
            Ok(watcher::Event::InitDone) => {
                listing = false;
                first_list = false;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(watcher::Event::Apply(event)) => {
                let Some(key) = occurrence(&event) else { continue };
                if seen.insert(key) && !listing {
                    emit(&event, &log).await;
                }
            }
            Ok(watcher::Event::Delete(_)) => {}
            Err(e) => {
                // The watcher backs off and retries by itself.
                tracing::debug!(error = %e, "watching events");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

async fn emit(event: &Event, log: &LogSink) {
    if let Some((stream, message)) = line(event) {
        log.line(&stream, message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real Events recorded from a v1.20 control plane (a Deployment created, then rolled to a
    /// new image, plus an unschedulable pod), in the order a watch delivered them.
    fn recorded() -> Vec<Event> {
        let list: k8s_openapi::List<Event> =
            serde_json::from_str(include_str!("../../../tests/fixtures/k8s-events.json")).unwrap();
        list.items
    }

    #[test]
    fn recorded_events_become_convox_lines() {
        let lines: Vec<String> = recorded()
            .iter()
            .filter_map(line)
            .map(|(stream, message)| format!("{stream} {message}"))
            .collect();
        assert_eq!(
            lines,
            [
                "system/k8s/web Scaled up replica set web-7ddf4db874 to 1",
                "system/k8s/web-7ddf4db874 Created pod: web-7ddf4db874-5s24m",
                "system/k8s/web-7ddf4db874-5s24m Successfully assigned default/web-7ddf4db874-5s24m to hollow-node-2",
                "system/k8s/web Scaled up replica set web-687bf4b9f5 to 1",
                "system/k8s/web-687bf4b9f5 Created pod: web-687bf4b9f5-thphg",
                "system/k8s/web-687bf4b9f5-thphg Successfully assigned default/web-687bf4b9f5-thphg to hollow-node-1",
                "system/k8s/unsched 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity.",
                "system/k8s/web Scaled down replica set web-7ddf4db874 to 0",
                "system/k8s/web-7ddf4db874 Deleted pod: web-7ddf4db874-5s24m",
                "system/k8s/unsched 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity.",
            ]
        );
    }

    #[test]
    fn occurrences_differ_by_resource_version() {
        let events = recorded();
        let keys: HashSet<_> = events.iter().filter_map(occurrence).collect();
        assert_eq!(keys.len(), events.len());
        // The two FailedScheduling lines are one event object seen twice.
        let unsched: HashSet<_> = events
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some("unsched"))
            .filter_map(|e| e.metadata.uid.clone())
            .collect();
        assert!(unsched.len() <= 2);
    }

    #[test]
    fn multi_line_and_empty_messages() {
        let mut event = recorded().remove(0);
        event.message = Some("Back-off restarting\n  failed container\n".into());
        assert_eq!(line(&event).unwrap().1, "Back-off restarting failed container");
        event.message = Some("  ".into());
        assert_eq!(line(&event), None);
        event.message = Some("x".into());
        event.involved_object.name = None;
        assert_eq!(line(&event), None);
    }
}
