//! core/v1 Events of an app's namespace as deploy log lines, the way convox prints them:
//! `system/k8s/<object> <message>`, e.g.
//! `system/k8s/web Scaled up replica set web-745f845dc to 1`.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

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
    Some((crate::stream_names::system("k8s", object), message))
}

/// What identifies one occurrence of an event: a repeated event is the same object with a new
/// resource version (its count or series moved on).
fn occurrence(event: &Event) -> Option<(String, String)> {
    Some((event.metadata.uid.clone()?, event.metadata.resource_version.clone()?))
}

/// The namespace's events, written to a rollout's log as they happen. Events that exist when
/// it starts are history (an earlier rollout, or one a previous holder already logged) and
/// are skipped; so are occurrences seen before, when the watch is restarted.
pub struct Forwarder {
    finish: Option<oneshot::Sender<()>>,
    /// Stops with the rollout: dropped (a deadline, a cancel), the forwarder is aborted.
    task: AbortOnDropHandle<()>,
}

impl Forwarder {
    /// Starts forwarding; returns once the history is known (so that nothing the caller does
    /// next is mistaken for it), or after `patience` if the API server is too slow to list it
    /// (that only costs the first lines).
    pub async fn start(api: Api<Event>, log: LogSink, patience: Duration) -> Self {
        let (ready, known) = oneshot::channel();
        let (finish, finishing) = oneshot::channel();
        let task = AbortOnDropHandle::new(tokio::spawn(forward(api, log, ready, finishing)));
        let _ = tokio::time::timeout(patience, known).await;
        Self {
            finish: Some(finish),
            task,
        }
    }

    /// Writes the events the watch has not delivered yet (they trail the status the rollout
    /// watched), then stops.
    pub async fn finish(mut self, patience: Duration) {
        if let Some(finish) = self.finish.take() {
            let _ = finish.send(());
        }
        let _ = tokio::time::timeout(patience, &mut self.task).await;
    }
}

async fn forward(api: Api<Event>, log: LogSink, ready: oneshot::Sender<()>, mut finishing: oneshot::Receiver<()>) {
    let mut ready = Some(ready);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    // While listing (at the start and after a watch restart) events are only recorded.
    let mut listing = true;
    let mut first_list = true;
    // Backed off (exponentially, with jitter) while the API server is away: a watcher retries
    // at once otherwise, hammering a server that is trying to come back.
    let mut stream = std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = &mut finishing => break,
        };
        let Some(item) = item else { return };
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
                // The stream goes on after its backoff.
                tracing::debug!(error = %e, "watching events");
            }
        }
    }
    // Finishing: what is in the namespace now and was neither history nor delivered.
    if first_list {
        return;
    }
    match api.list(&Default::default()).await {
        Ok(list) => {
            for event in undelivered(list.items, &seen) {
                emit(&event, &log).await;
            }
        }
        Err(e) => tracing::debug!(error = %e, "listing the last events"),
    }
}

/// The events of `current` not in `seen`, oldest first.
fn undelivered(current: Vec<Event>, seen: &HashSet<(String, String)>) -> Vec<Event> {
    let mut new: Vec<Event> = current
        .into_iter()
        .filter(|event| occurrence(event).is_some_and(|key| !seen.contains(&key)))
        .collect();
    new.sort_by_key(|event| {
        let at = event
            .event_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
            .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0));
        (at, event.metadata.name.clone())
    });
    new
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
    fn a_repeated_event_is_a_new_occurrence() {
        let events = recorded();
        let keys: HashSet<_> = events.iter().filter_map(occurrence).collect();
        assert_eq!(keys.len(), events.len(), "every recorded event is one occurrence");
        // The same object again after the controller counted it once more.
        let mut again = events[0].clone();
        assert_eq!(occurrence(&again), occurrence(&events[0]), "a re-list is not new");
        again.count = Some(2);
        again.metadata.resource_version = Some("9999".into());
        assert!(!keys.contains(&occurrence(&again).unwrap()));
        // Without a uid or version there is nothing to tell occurrences apart by: not logged.
        again.metadata.uid = None;
        assert_eq!(occurrence(&again), None);
    }

    #[test]
    fn finishing_writes_only_what_was_not_seen_oldest_first() {
        let events = recorded();
        let seen: HashSet<_> = events[..4].iter().filter_map(occurrence).collect();
        let mut shuffled = events.clone();
        shuffled.reverse();
        let names: Vec<_> = undelivered(shuffled, &seen)
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e.involved_object.name.clone().unwrap(),
                    e.reason.clone().unwrap()
                )
            })
            .collect();
        assert_eq!(names.len(), events.len() - 4);
        assert!(
            !names.iter().any(|n| n == "web-7ddf4db874 SuccessfulCreate"),
            "{names:?}"
        );
        let created = names
            .iter()
            .position(|n| n == "web-687bf4b9f5 SuccessfulCreate")
            .unwrap();
        let deleted = names
            .iter()
            .position(|n| n == "web-7ddf4db874 SuccessfulDelete")
            .unwrap();
        assert!(created < deleted, "{names:?}");
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
