//! App logs from pod logs: every service pod's and timer run's `main` container, read with
//! timestamps and merged as they come, as `service/<service>/<pod>` and `timer/<timer>/<pod>`
//! lines. Following watches the pods and attaches to those that start later (a rollout, a
//! restart, a timer's next run) and to a crashed container's successor, until the reader leaves.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams};
use kube::runtime::watcher;
use tokio::sync::mpsc;

use super::resources::CONTAINER;
use super::watch::Watch;
use super::{KubeRuntime, describe};
use crate::runtime::{LineStream, LogLine, ProcessLogs};

/// The output of the app's pods as one stream.
pub fn stream(runtime: &KubeRuntime, request: ProcessLogs) -> LineStream {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(pump(runtime.api(&request.app), request, tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|line| (line, rx)) }).boxed()
}

async fn pump(pods: Api<Pod>, request: ProcessLogs, tx: mpsc::Sender<LogLine>) {
    let mut selector = format!("app={},type in (service,timer)", request.app);
    if let Some(service) = &request.service {
        selector.push_str(&format!(",service={service}"));
    }
    let mut readers = Readers {
        pods: pods.clone(),
        request: &request,
        tx: &tx,
        attached: HashSet::new(),
        tasks: tokio::task::JoinSet::new(),
    };
    if !request.follow {
        match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list.items.iter().for_each(|pod| readers.attach(pod)),
            Err(e) => tracing::debug!("listing pods for their logs: {}", describe(&e)),
        }
        while readers.tasks.join_next().await.is_some() {}
        return;
    }
    // Following: the pods are watched, so new ones (a rollout, a restart, a timer's run) are
    // attached as they start, at the cost of one watch per reader rather than a list every
    // few seconds.
    let mut watched = Watch::start(
        pods,
        watcher::Config::default().labels(&selector),
        format!("the pods of {}", request.app),
    );
    loop {
        watched.current().objects.values().for_each(|pod| readers.attach(pod));
        tokio::select! {
            () = tx.closed() => return,
            changed = watched.changed() => if changed.is_err() { return },
        }
        while readers.tasks.try_join_next().is_some() {}
    }
}

/// The pods' log readers of one request.
struct Readers<'a> {
    pods: Api<Pod>,
    request: &'a ProcessLogs,
    tx: &'a mpsc::Sender<LogLine>,
    /// Containers read so far: (pod, restart count).
    attached: HashSet<(String, i32)>,
    tasks: tokio::task::JoinSet<()>,
}

impl Readers<'_> {
    /// Starts reading `pod`'s container once it has started, once per container (a restart
    /// makes a new one). Service pods write as `service/<service>/<pod>`, timer runs as
    /// `timer/<timer>/<pod>`.
    fn attach(&mut self, pod: &Pod) {
        let Some(name) = pod.metadata.name.clone() else { return };
        let stream = stream_of(pod, &name);
        // A pod has output once its container started.
        let started = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running" | "Succeeded" | "Failed")
        );
        let restarts = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count);
        if started && self.attached.insert((name.clone(), restarts)) {
            let params = LogParams {
                container: Some(CONTAINER.to_owned()),
                follow: self.request.follow,
                since_seconds: self
                    .request
                    .since
                    .map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
                timestamps: true,
                ..LogParams::default()
            };
            self.tasks
                .spawn(read_pod(self.pods.clone(), name, stream, params, self.tx.clone()));
        }
    }
}

async fn read_pod(pods: Api<Pod>, pod: String, stream: String, params: LogParams, tx: mpsc::Sender<LogLine>) {
    let reader = match pods.log_stream(&pod, &params).await {
        Ok(reader) => reader,
        Err(e) => {
            tracing::debug!("reading the log of pod {pod}: {}", describe(&e));
            return;
        }
    };
    let mut lines = reader.lines();
    while let Some(Ok(line)) = lines.next().await {
        let (at, message) = split_timestamp(&line);
        let line = LogLine {
            at,
            stream: stream.clone(),
            message,
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

/// The log stream of pod `name`'s lines: `service/<service>/<pod>`, or `timer/<timer>/<pod>`
/// for a timer's run.
fn stream_of(pod: &Pod, name: &str) -> String {
    let label = |key: &str| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key).cloned())
            .unwrap_or_default()
    };
    match label("type").as_str() {
        "timer" => format!("timer/{}/{name}", label("timer")),
        _ => crate::stream_names::service(&label("service"), name),
    }
}

/// Splits the RFC 3339 timestamp Kubernetes puts before each line (`timestamps=true`); a line
/// without one is dated now.
fn split_timestamp(line: &str) -> (DateTime<Utc>, String) {
    if let Some((time, rest)) = line.split_once(' ')
        && let Ok(at) = DateTime::parse_from_rfc3339(time)
    {
        return (at.with_timezone(&Utc), rest.to_owned());
    }
    (Utc::now(), line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_pods_and_timer_runs_have_streams_of_their_own() {
        let pod = |labels: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({ "metadata": { "labels": labels } })).unwrap()
        };
        let web = pod(serde_json::json!({ "type": "service", "service": "web" }));
        assert_eq!(stream_of(&web, "web-5d9-abc"), "service/web/web-5d9-abc");
        let run = pod(serde_json::json!({ "type": "timer", "service": "worker", "timer": "cleanup" }));
        assert_eq!(
            stream_of(&run, "timer-cleanup-2900-x7k"),
            "timer/cleanup/timer-cleanup-2900-x7k"
        );
    }

    #[test]
    fn kubernetes_timestamps_are_split_off() {
        let (at, message) = split_timestamp("2026-11-27T12:00:01.123456789Z GET / 200 in 3ms");
        assert_eq!(at.to_rfc3339(), "2026-11-27T12:00:01.123456789+00:00");
        assert_eq!(message, "GET / 200 in 3ms");
        let (_, message) = split_timestamp("no timestamp here");
        assert_eq!(message, "no timestamp here");
    }
}
