//! A rollout's analysis on Kubernetes, from what the cluster tells of the new release's pods
//! (rack does not carry the traffic there): once the Deployments have rolled out, the new pods
//! of every service whose `deployment.analysis` is on and that replaced an earlier release are
//! watched until `window` seconds after the first of them became ready. A container restart of
//! one of them (its `restartCount` above zero) or a pod that was ready and no longer is (its
//! readiness flapping) fails the release, which is rolled back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use super::KubeRuntime;
use super::watch::Watch;
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// Watches the new pods of `services` (those judged, each with its window) of `release`.
pub async fn judge(
    runtime: &KubeRuntime,
    app: &str,
    release: &ReleaseSpec,
    services: &BTreeMap<String, u32>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let Some(window) = services.values().max().map(|w| Duration::from_secs(u64::from(*w))) else {
        return Ok(());
    };
    let mut pods = Watch::start(
        runtime.api::<Pod>(app),
        watcher::Config::default().labels(&format!("app={app},type=service,release={}", release.id)),
        format!("the pods of {app}"),
    );
    let first = services.keys().next().cloned().unwrap_or_default();
    log.line(
        &crate::stream_names::system("k8s", &first),
        format!(
            "analysis: watching the new pods of {} for restarts and readiness changes, {}s from the first one ready",
            release.id,
            window.as_secs()
        ),
    )
    .await;
    let started = tokio::time::Instant::now();
    let mut deadline = None;
    let mut tracker = Tracker::default();
    loop {
        let snapshot = pods.current();
        if snapshot.listed {
            let judged = snapshot
                .objects
                .values()
                .filter(|pod| service_of(pod).is_some_and(|s| services.contains_key(s)));
            for pod in judged {
                if let Some(trouble) = tracker.look(pod) {
                    let service = service_of(pod).unwrap_or_default().to_owned();
                    let line = format!(
                        "analysis: {trouble} within {}s of its rollout: rolling back",
                        window.as_secs()
                    );
                    report(
                        log,
                        app,
                        release,
                        &service,
                        "failed",
                        &line,
                        &tracker,
                        started.elapsed(),
                    )
                    .await;
                    let reason = line.strip_suffix(": rolling back").unwrap_or(&line).to_owned();
                    return Err(RuntimeError::AnalysisFailed(reason));
                }
            }
            // The window runs from the first new pod's readiness (as the cluster dates it).
            if deadline.is_none() {
                let since_ready = snapshot.objects.values().filter_map(ready_for).max();
                deadline = since_ready.map(|ago| tokio::time::Instant::now() + window.saturating_sub(ago));
            }
        }
        let until = deadline.unwrap_or(started + window);
        tokio::select! {
            changed = pods.changed() => changed?,
            () = tokio::time::sleep_until(until) => {
                let line = format!(
                    "analysis passed: {} pods of {}, no restart and no readiness change within {}s",
                    tracker.ready.len(), release.id, window.as_secs()
                );
                report(log, app, release, &first, "passed", &line, &tracker, started.elapsed()).await;
                return Ok(());
            }
        }
    }
}

#[expect(clippy::too_many_arguments, reason = "one report, its parts")]
async fn report(
    log: &LogSink,
    app: &str,
    release: &ReleaseSpec,
    service: &str,
    verdict: &str,
    line: &str,
    tracker: &Tracker,
    elapsed: Duration,
) {
    let data = serde_json::json!({
        "service": service,
        "verdict": verdict,
        "release": release.id.as_str(),
        "seconds": elapsed.as_secs(),
        "pods": tracker.ready.len(),
        "restarts": tracker.restarts,
    });
    let stream = crate::stream_names::system("k8s", service);
    log.analysis(&stream, line.to_owned(), app, release.id.as_str(), data)
        .await;
}

/// What has been seen of the new pods.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Pods seen ready.
    ready: BTreeSet<String>,
    restarts: i32,
}

impl Tracker {
    /// What is wrong with `pod` now, given what was seen of it before: a restart, or readiness
    /// lost.
    pub fn look(&mut self, pod: &Pod) -> Option<String> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.as_ref()?;
        let restarts: i32 = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum();
        if restarts > 0 {
            self.restarts = self.restarts.max(restarts);
            return Some(format!("pod {name} restarted {restarts} time(s)"));
        }
        if is_ready(pod) {
            self.ready.insert(name);
        } else if self.ready.contains(&name) {
            return Some(format!("pod {name} was ready and no longer is"));
        }
        None
    }
}

fn service_of(pod: &Pod) -> Option<&str> {
    pod.metadata.labels.as_ref()?.get("service").map(String::as_str)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// How long ago `pod` became ready (zero for a time in the future: clocks differ).
fn ready_for(pod: &Pod) -> Option<Duration> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    let at = ready.last_transition_time.as_ref()?.0;
    let ago = k8s_openapi::jiff::Timestamp::now().as_second() - at.as_second();
    Some(Duration::from_secs(u64::try_from(ago).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, restarts: i32) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "service": "web" } },
            "status": {
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
                "containerStatuses": [{ "name": "main", "image": "x", "imageID": "", "ready": ready,
                                        "restartCount": restarts }],
            }
        }))
        .unwrap()
    }

    #[test]
    fn restarts_and_lost_readiness_fail_and_a_pod_becoming_ready_does_not() {
        let mut tracker = Tracker::default();
        assert_eq!(tracker.look(&pod("web-a", false, 0)), None, "not ready yet");
        assert_eq!(tracker.look(&pod("web-a", true, 0)), None);
        assert_eq!(tracker.look(&pod("web-b", true, 0)), None);
        assert_eq!(
            tracker.look(&pod("web-a", false, 0)).as_deref(),
            Some("pod web-a was ready and no longer is")
        );
        assert_eq!(
            tracker.look(&pod("web-b", true, 2)).as_deref(),
            Some("pod web-b restarted 2 time(s)")
        );
        assert_eq!(service_of(&pod("web-c", true, 0)), Some("web"));
    }
}
