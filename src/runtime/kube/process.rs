//! One-off processes on Kubernetes: each a Pod of its own (the service's image and environment,
//! `restartPolicy: Never`, labelled `type=process`), and `exec` through the Pod's `exec`
//! subresource (the websocket channel protocol, through kube-rs).

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::{AttachParams, PostParams, TerminalSize};
use tokio_util::io::ReaderStream;

use super::KubeRuntime;
use super::build::follow_logs;
use super::resources::{self, CONTAINER, ServiceTarget};
use super::watch::{Watch, by_name};
use crate::runtime::{ExecRequest, ExecSession, OneOff, ReleaseSpec, RuntimeError};

/// Starts `one_off` as a Pod; returns its name.
pub async fn run(runtime: &KubeRuntime, release: &ReleaseSpec, one_off: &OneOff) -> Result<String, RuntimeError> {
    let settings = &runtime.0.settings;
    let service =
        release.manifest.services.get(&one_off.service).ok_or_else(|| {
            RuntimeError::Failed(format!("release {} has no service {}", release.id, one_off.service))
        })?;
    runtime.ensure_namespace(&release.app).await?;
    // Its variables come from the Secrets of the resources it links: they must exist first.
    // Bounded by the one-off's own deadline (a `run` has no deployment's to be dropped at).
    tokio::time::timeout(
        one_off.timeout,
        super::database_rollout::ensure_linked(runtime, release, service, one_off.log.as_ref()),
    )
    .await
    .map_err(|_| {
        RuntimeError::Failed(format!(
            "the resources service {} links were not ready within {} s",
            one_off.service,
            one_off.timeout.as_secs()
        ))
    })??;
    let name = format!("{}-run-{}", one_off.service, crate::ids::random_token(8).to_lowercase());
    let target = ServiceTarget {
        rack: &settings.rack,
        registry: &settings.config.registry,
        name: &one_off.service,
        service,
    };
    let body = resources::one_off_pod(
        &target,
        release,
        &name,
        &one_off.command,
        &one_off.env,
        one_off.timeout.as_secs(),
    )?;
    let pod: Pod = serde_json::from_value(body).map_err(|e| RuntimeError::Failed(format!("pod {name}: {e}")))?;
    let pods: Api<Pod> = runtime.api(&release.app);
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(RuntimeError::kube(format!("creating pod {name}")))?;
    if let Some(log) = &one_off.log {
        let stream = crate::stream_names::service(&one_off.service, &name);
        tokio::spawn(follow_logs(pods.clone(), name.clone(), log.clone(), stream));
    }
    Ok(name)
}

/// Waits until the one-off Pod `name` has ended (watched, not polled); its container's exit
/// code.
pub async fn wait(pods: &Api<Pod>, name: &str) -> Result<i32, RuntimeError> {
    let mut pod = Watch::start(pods.clone(), by_name(name), format!("pod {name}"));
    loop {
        let snapshot = pod.current();
        if snapshot.listed {
            match snapshot.objects.get(name) {
                None => return Err(RuntimeError::Failed(format!("pod {name} is gone"))),
                Some(current) => {
                    if let Some(code) = exit_code(current) {
                        return Ok(code);
                    }
                }
            }
        }
        pod.changed().await?;
    }
}

/// The exit code of a Pod that has ended (`None` while it runs).
pub fn exit_code(pod: &Pod) -> Option<i32> {
    let status = pod.status.as_ref()?;
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == CONTAINER)
        .and_then(|s| s.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    match status.phase.as_deref() {
        Some("Succeeded") => Some(terminated.unwrap_or(0)),
        Some("Failed") => Some(terminated.filter(|c| *c != 0).unwrap_or(1)),
        _ => None,
    }
}

/// Runs `request` in the main container of Pod `name`, through the `exec` subresource.
///
/// # Errors
/// When the API server or the kubelet refuses the exec.
pub async fn exec(pods: &Api<Pod>, name: &str, request: ExecRequest) -> Result<ExecSession, RuntimeError> {
    let params = AttachParams::default()
        .container(CONTAINER)
        .stdin(request.stdin)
        .stdout(true)
        .stderr(request.tty.is_none())
        .tty(request.tty.is_some());
    let mut attached = pods
        .exec(name, request.command.clone(), &params)
        .await
        .map_err(RuntimeError::kube(format!("running a command in pod {name}")))?;
    if let (Some((rows, cols)), Some(mut size)) = (request.tty, attached.terminal_size()) {
        use futures_util::SinkExt;
        let _ = size
            .send(TerminalSize {
                height: rows,
                width: cols,
            })
            .await;
    }
    let chunks = |reader: Option<_>| {
        futures_util::stream::iter(reader.map(|r| {
            ReaderStream::new(r)
                .take_while(|c: &std::io::Result<bytes::Bytes>| std::future::ready(c.is_ok()))
                .filter_map(|c| std::future::ready(c.ok()))
        }))
        .flatten()
    };
    let output = futures_util::stream::select(chunks(attached.stdout()), chunks(attached.stderr())).boxed();
    let stdin = attached
        .stdin()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
    let status = attached.take_status();
    let exit = Box::pin(async move {
        let code = match status {
            Some(status) => status.await.map_or(1, |s| status_code(&s)),
            None => 1,
        };
        let _ = attached.join().await;
        code
    });
    Ok(ExecSession { output, stdin, exit })
}

/// The exit code in the Status that ends an exec (`Success`, or `NonZeroExitCode` with the
/// code as the cause `ExitCode`).
pub fn status_code(status: &Status) -> i32 {
    if status.status.as_deref() == Some("Success") {
        return 0;
    }
    status
        .details
        .as_ref()
        .and_then(|d| {
            d.causes
                .iter()
                .flatten()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
                .and_then(|c| c.message.as_deref()?.parse().ok())
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_statuses_give_exit_codes() {
        let ok: Status = serde_json::from_value(serde_json::json!({"status": "Success"})).unwrap();
        assert_eq!(status_code(&ok), 0);
        let failed: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "reason": "NonZeroExitCode",
            "details": { "causes": [{ "reason": "ExitCode", "message": "3" }] }
        }))
        .unwrap();
        assert_eq!(status_code(&failed), 3);
    }

    #[test]
    fn ended_pods_give_exit_codes() {
        let pod = |phase: &str, code: Option<i32>| -> Pod {
            let statuses = code.map_or(serde_json::json!([]), |code| {
                serde_json::json!([{ "name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": { "terminated": { "exitCode": code } } }])
            });
            serde_json::from_value(serde_json::json!({ "status": { "phase": phase, "containerStatuses": statuses } }))
                .unwrap()
        };
        assert_eq!(exit_code(&pod("Running", None)), None);
        assert_eq!(exit_code(&pod("Succeeded", Some(0))), Some(0));
        assert_eq!(exit_code(&pod("Failed", Some(3))), Some(3));
        assert_eq!(exit_code(&pod("Failed", None)), Some(1));
    }
}
