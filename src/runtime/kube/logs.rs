//! App logs from pod logs: every service pod's `main` container, read with timestamps and
//! merged as they come, as `service/<service>/<pod>` lines. Following also attaches to pods
//! that start later (a rollout, a restart) and to a crashed container's successor, until the
//! reader leaves.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams};
use tokio::sync::mpsc;

use super::resources::CONTAINER;
use super::{KubeRuntime, describe};
use crate::runtime::{LineStream, LogLine, ProcessLogs};

/// How often a follower looks for new pods.
const NEW_PODS: Duration = Duration::from_secs(2);

/// The output of the app's pods as one stream.
pub fn stream(runtime: &KubeRuntime, request: ProcessLogs) -> LineStream {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(pump(runtime.api(&request.app), request, tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|line| (line, rx)) }).boxed()
}

async fn pump(pods: Api<Pod>, request: ProcessLogs, tx: mpsc::Sender<LogLine>) {
    let mut selector = format!("app={},type=service", request.app);
    if let Some(service) = &request.service {
        selector.push_str(&format!(",service={service}"));
    }
    let mut attached = HashSet::new();
    let mut readers = tokio::task::JoinSet::new();
    loop {
        match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                for pod in list.items {
                    let Some(name) = pod.metadata.name.clone() else {
                        continue;
                    };
                    let service = pod
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("service").cloned())
                        .unwrap_or_default();
                    // A pod has output once its container started.
                    let started = matches!(
                        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Running" | "Succeeded" | "Failed")
                    );
                    // Each container (a restart makes a new one) is read once.
                    let restarts = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .and_then(|c| c.first())
                        .map_or(0, |c| c.restart_count);
                    if started && attached.insert((name.clone(), restarts)) {
                        let params = LogParams {
                            container: Some(CONTAINER.to_owned()),
                            follow: request.follow,
                            since_seconds: request
                                .since
                                .map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
                            timestamps: true,
                            ..LogParams::default()
                        };
                        let stream = format!("service/{service}/{name}");
                        readers.spawn(read_pod(pods.clone(), name, stream, params, tx.clone()));
                    }
                }
            }
            Err(e) => tracing::debug!("listing pods for their logs: {}", describe(&e)),
        }
        if !request.follow {
            while readers.join_next().await.is_some() {}
            return;
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(NEW_PODS) => {}
        }
        while readers.try_join_next().is_some() {}
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
    fn kubernetes_timestamps_are_split_off() {
        let (at, message) = split_timestamp("2026-11-27T12:00:01.123456789Z GET / 200 in 3ms");
        assert_eq!(at.to_rfc3339(), "2026-11-27T12:00:01.123456789+00:00");
        assert_eq!(message, "GET / 200 in 3ms");
        let (_, message) = split_timestamp("no timestamp here");
        assert_eq!(message, "no timestamp here");
    }
}
