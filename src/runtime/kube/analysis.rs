//! A rollout's analysis on Kubernetes, from what the cluster tells of the new release's pods
//! (rack does not carry the traffic there): once the Deployments have rolled out, the new pods
//! of every service whose `deployment.analysis` is on and that replaced an earlier release are
//! watched until `window` seconds after the first of them became ready. A container restart of
//! one of them (its `restartCount` above zero) or a pod that was ready and no longer is (its
//! readiness flapping) fails the release, which is rolled back. With `RACK_PROMETHEUS_URL`, the
//! services with an Ingress are then judged by the ingress controller's request metrics too
//! (`prometheus.rs`).
//!
//! Which services replaced an earlier release is read from their ReplicaSets (one of another
//! release is still there, scaled down), not from the Deployments before they are applied: a
//! replica that takes a deployment over applies the same objects again, finds the Deployments
//! already on the new release, and must still judge it. The window is dated by the cluster (the
//! pods' readiness), so a takeover after it ended judges at once what was seen: restarts are
//! counted by the pods themselves, and the metrics are in Prometheus.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::ListParams;
use kube::runtime::watcher;

use super::KubeRuntime;
use super::prometheus::{Prometheus, QUERY_TIMEOUT, Target};
use super::watch::Watch;
use crate::deploy::analysis::{Figures, Names, Verdict};
use crate::manifest::Analysis;
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

/// A service judged: its settings, and the release it replaced.
#[derive(Debug, Clone)]
pub struct Judged {
    pub settings: Analysis,
    pub previous: String,
}

/// The services of `release` that replaced another release, with the newest such release (from
/// the ReplicaSets the cluster keeps, `revisionHistoryLimit`).
pub async fn replaced(
    runtime: &KubeRuntime,
    app: &str,
    release: &ReleaseSpec,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    let sets = runtime
        .api::<ReplicaSet>(app)
        .list(&ListParams::default().labels(&super::resources::selector(app, "service")))
        .await
        .map_err(RuntimeError::kube("listing replica sets"))?;
    let mut newest: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for set in sets.items {
        let labels = set.metadata.labels.clone().unwrap_or_default();
        let (Some(service), Some(other)) = (labels.get("service"), labels.get("release")) else {
            continue;
        };
        if other == release.id.as_str() {
            continue;
        }
        let revision = set
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("deployment.kubernetes.io/revision"))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let entry = newest.entry(service.clone()).or_insert((revision, other.clone()));
        if revision > entry.0 {
            *entry = (revision, other.clone());
        }
    }
    Ok(newest.into_iter().map(|(s, (_, r))| (s, r)).collect())
}

/// Watches the new pods of `services` (those judged) of `release`, then asks Prometheus about
/// their traffic when one is configured.
pub async fn judge(
    runtime: &KubeRuntime,
    app: &str,
    release: &ReleaseSpec,
    services: &BTreeMap<String, Judged>,
    log: &LogSink,
) -> Result<(), RuntimeError> {
    let Some(window) = services
        .values()
        .map(|j| Duration::from_secs(u64::from(j.settings.window)))
        .max()
    else {
        return Ok(());
    };
    let prometheus = runtime.0.settings.config.prometheus_url.as_deref();
    let mut pods = Watch::start(
        runtime.api::<Pod>(app),
        watcher::Config::default().labels(&format!("app={app},type=service,release={}", release.id)),
        format!("the pods of {app}"),
    );
    let first = services.keys().next().cloned().unwrap_or_default();
    let also = if prometheus.is_some() {
        ", then their requests at the ingress (Prometheus)"
    } else {
        ""
    };
    log.line(
        &crate::stream_names::system("k8s", &first),
        format!(
            "analysis: watching the new pods of {} for restarts and readiness changes, {}s from the first one ready{also}",
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
            () = tokio::time::sleep_until(until) => break,
        }
    }
    let line = format!(
        "analysis passed: {} pods of {}, no restart and no readiness change within {}s",
        tracker.ready.len(),
        release.id,
        window.as_secs()
    );
    report(log, app, release, &first, "passed", &line, &tracker, started.elapsed()).await;
    let Some(base) = prometheus else { return Ok(()) };
    let pods: Vec<Pod> = pods.current().objects.values().cloned().collect();
    for (service, judged) in services {
        let Some(ingress) = ingress_of(runtime, app, service).await? else {
            continue;
        };
        let ingress_line = IngressLine {
            log,
            app,
            release,
            service,
            judged,
        };
        let target = Target {
            namespace: &runtime.namespace(app),
            ingress: &ingress,
            service,
        };
        let Some(times) = Times::of(pods.iter().filter(|p| service_of(p) == Some(service.as_str()))) else {
            continue;
        };
        let answer = ingress_figures(base, &target, &times, judged.settings.window).await;
        let names = Names {
            new: release.id.as_str(),
            old: &judged.previous,
        };
        let figures = answer.as_ref().ok().map(|(new, old, range)| (new, old, *range));
        let error = answer.as_ref().err().map(String::as_str);
        match super::prometheus::decide(&judged.settings, names, &answer) {
            Verdict::Failed(line) => {
                ingress_line.report("failed", line.clone(), figures, error).await;
                let reason = line.strip_suffix(": rolling back").unwrap_or(&line).to_owned();
                return Err(RuntimeError::AnalysisFailed(reason));
            }
            Verdict::Passed(line) => ingress_line.report("passed", line, figures, error).await,
            Verdict::Skipped(line) => ingress_line.report("skipped", line, figures, error).await,
            // `decide` gives none: the window has ended.
            Verdict::Watching => {}
        }
    }
    Ok(())
}

/// When a service's new pods came (Unix seconds): the first created (the rollout began), the
/// first ready (they took traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    pub began: i64,
    pub ready: i64,
}

impl Times {
    fn of<'a>(pods: impl Iterator<Item = &'a Pod>) -> Option<Self> {
        let mut began = None::<i64>;
        let mut ready = None::<i64>;
        for pod in pods {
            if let Some(at) = pod.metadata.creation_timestamp.as_ref() {
                let at = at.0.as_second();
                began = Some(began.map_or(at, |b| b.min(at)));
            }
            if let Some(at) = ready_at(pod) {
                ready = Some(ready.map_or(at, |r| r.min(at)));
            }
        }
        Some(Self {
            began: began?,
            ready: ready?,
        })
    }

    /// The two windows, as (evaluated at, seconds): the new pods' traffic up to now, from their
    /// first readiness (at least `window`), and `window` seconds up to the rollout's start.
    pub fn windows(&self, now: i64, window: u32) -> ((Option<i64>, u64), (Option<i64>, u64)) {
        let window = u64::from(window).max(1);
        let since_ready = u64::try_from(now - self.ready).unwrap_or(0).max(window);
        ((None, since_ready), (Some(self.began), window))
    }
}

/// The new and old figures of `target` and the new one's range in seconds.
async fn ingress_figures(
    base: &str,
    target: &Target<'_>,
    times: &Times,
    window: u32,
) -> Result<(Figures, Figures, u64), String> {
    let prometheus = Prometheus::new(base, QUERY_TIMEOUT)?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let ((new_at, new_range), (old_at, old_range)) = times.windows(now, window);
    let new = prometheus.figures(target, new_range, new_at).await?;
    let old = prometheus.figures(target, old_range, old_at).await?;
    Ok((new, old, new_range))
}

/// The Ingress of `service` (rack names it after the service), when it has one.
async fn ingress_of(runtime: &KubeRuntime, app: &str, service: &str) -> Result<Option<String>, RuntimeError> {
    let ingress = runtime
        .api::<Ingress>(app)
        .get_opt(service)
        .await
        .map_err(RuntimeError::kube(format!("reading ingress {service}")))?;
    Ok(ingress.and_then(|i| i.metadata.name))
}

/// The line and `deployment.analysis` event of one service's ingress analysis.
struct IngressLine<'a> {
    log: &'a LogSink,
    app: &'a str,
    release: &'a ReleaseSpec,
    service: &'a str,
    judged: &'a Judged,
}

impl IngressLine<'_> {
    async fn report(
        &self,
        verdict: &str,
        line: String,
        figures: Option<(&Figures, &Figures, u64)>,
        error: Option<&str>,
    ) {
        let side = |f: &Figures| {
            serde_json::json!({
                "requests": f.requests,
                "errors": f.errors,
                "error_rate": (f.error_rate() * 10.0).round() / 10.0,
                "p95_ms": f.p95.map(|d| d.as_secs_f64() * 1000.0),
            })
        };
        let settings = &self.judged.settings;
        let data = serde_json::json!({
            "service": self.service,
            "verdict": verdict,
            "source": "ingress",
            "release": self.release.id.as_str(),
            "previous_release": self.judged.previous,
            "seconds": figures.map(|(_, _, range)| range),
            "new": figures.map(|(new, _, _)| side(new)),
            "old": figures.map(|(_, old, _)| side(old)),
            "error": error,
            "window": settings.window,
            "min_requests": settings.min_requests,
            "max_error_rate": settings.max_error_rate,
            "max_latency_ratio": settings.max_latency_ratio,
        });
        let stream = crate::stream_names::system("k8s", self.service);
        self.log
            .analysis(&stream, line, self.app, self.release.id.as_str(), data)
            .await;
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
        "source": "pods",
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

/// When `pod` became ready (Unix seconds), if it is.
fn ready_at(pod: &Pod) -> Option<i64> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(ready.last_transition_time.as_ref()?.0.as_second())
}

/// How long ago `pod` became ready (zero for a time in the future: clocks differ).
fn ready_for(pod: &Pod) -> Option<Duration> {
    let ago = k8s_openapi::jiff::Timestamp::now().as_second() - ready_at(pod)?;
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
