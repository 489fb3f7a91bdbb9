//! Builds as Kubernetes Jobs. rack checks the source first (unpacks it under its limits, reads
//! the manifest, finds each Dockerfile), then the Job's fetch container downloads the same
//! object from the rack API with a token that allows only that one request and expires with
//! the build, and one builder container per service pushes its image. The pod's logs become
//! the build log; the Job's end becomes the build's.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use tokio_util::task::AbortOnDropHandle;

use super::resources::{self, BuildSpec, MANAGER, ServiceBuild};
use super::watch::{Watch, by_name};
use super::{KubeRuntime, delete, describe};
use crate::runtime::BUILD_STREAM;
use crate::runtime::source::{self, inside};
use crate::runtime::{BuildFailure, BuildJob, BuildOutput, LogSink, RuntimeError};

pub async fn run(runtime: &KubeRuntime, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
    let rt = &runtime.0.settings;
    let failed = BuildFailure::Failed;
    let scratch = rt.scratch.join(&job.app).join(&job.id);
    let checked = check_source(runtime, job, &scratch, log).await;
    // Off the build's path: a refused archive can leave a large tree.
    tokio::spawn(async move { tokio::fs::remove_dir_all(&scratch).await });
    let (text, services) = checked?;
    let images = services
        .iter()
        .map(|s| (s.service.clone(), s.image.clone()))
        .collect::<BTreeMap<_, _>>();
    let output = BuildOutput { manifest: text, images };
    if services.is_empty() {
        log.line(BUILD_STREAM, "Nothing to build: every service names its image")
            .await;
        return Ok(output);
    }

    let jobs: Api<Job> = runtime.api(&job.app);
    let name = resources::build_job_name(&job.id);
    let token_name = token_name(&job.app, &job.id);
    let spec = BuildSpec {
        rack: &rt.rack,
        app: &job.app,
        build_id: &job.id,
        services,
        source_url: format!("{}{}", rt.config.url, object_path(&job.app, &job.source_key)),
        secret: name.clone(),
        fetch_image: &rt.config.fetch_image,
        builder: rt.config.builder,
        builder_image: &rt.config.builder_image,
        deadline_secs: rt.build_timeout.as_secs().max(1),
    };
    let existing = jobs
        .get_opt(&name)
        .await
        .map_err(|e| failed(RuntimeError::kube(format!("reading job {name}"))(e).to_string()))?;
    if existing.is_some() {
        // A replica that stopped or died started it; it went on in the cluster.
        log.line(BUILD_STREAM, format!("Resuming: job {name} is already running"))
            .await;
    } else {
        runtime
            .ensure_namespace(&job.app)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let token = rt
            .tokens
            .issue(&token_name, &object_path(&job.app, &job.source_key), rt.build_timeout)
            .await
            .map_err(|e| failed(format!("could not make the source token: {e}")))?;
        let secrets: Api<Secret> = runtime.api(&job.app);
        let docker_config = builder_docker_config(runtime, &secrets)
            .await
            .map_err(|e| failed(e.to_string()))?;
        secrets
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(resources::build_secret(&spec, &token, &docker_config)),
            )
            .await
            .map_err(|e| failed(RuntimeError::kube(format!("creating secret {name}"))(e).to_string()))?;
        let object: Job = serde_json::from_value(resources::build_job(&spec))
            .map_err(|e| failed(format!("job {name} is malformed: {e}")))?;
        match jobs.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => {
                return Err(failed(
                    RuntimeError::kube(format!("creating job {name}"))(e).to_string(),
                ));
            }
        }
        log.line(BUILD_STREAM, format!("Created job {name}")).await;
    }

    // Dropped here (this server stops, or lost its lease), the Job goes on for whoever resumes
    // the build; a cancel or timeout stops it through `cancel`.
    let pods: Api<Pod> = runtime.api(&job.app);
    let result = watch(&jobs, &pods, &name, log).await;
    if result.is_err() {
        // A failed Job has nothing more to do; one we could not follow must not push on.
        if let Err(e) = delete(&jobs, &name).await {
            tracing::warn!(build.id = %job.id, "{e}");
        }
    }
    clean_up(runtime, &job.app, &job.id).await;
    result.map(|()| output)
}

/// The builders' docker config (`resources::builder_docker_config`): the operator's
/// `rack-registry` Secret of the app's namespace, when there is one, merged with the private
/// registries' credentials as they are now.
pub(super) async fn builder_docker_config(
    runtime: &KubeRuntime,
    secrets: &Api<Secret>,
) -> Result<String, RuntimeError> {
    let operator = secrets
        .get_opt(resources::REGISTRY_SECRET)
        .await
        .map_err(RuntimeError::kube(format!(
            "reading secret {}",
            resources::REGISTRY_SECRET
        )))?;
    let operator = operator
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(".dockerconfigjson"))
        .map(|b| b.0);
    let registries = runtime
        .0
        .settings
        .registries
        .credentials()
        .await
        .map_err(|e| RuntimeError::Failed(format!("reading the private registries: {e}")))?;
    resources::builder_docker_config(operator.as_deref(), &registries).map_err(RuntimeError::Failed)
}

/// Stops a cancelled or timed-out build: its Job (and pod), its Secret, its token.
pub async fn cancel(runtime: &KubeRuntime, app: &str, id: &str) -> Result<(), RuntimeError> {
    let jobs: Api<Job> = runtime.api(app);
    let deleted = delete(&jobs, &resources::build_job_name(id)).await;
    // The token and Secret go whether or not the Job did.
    clean_up(runtime, app, id).await;
    deleted
}

/// Revokes the build's source token and deletes the Secret that held it.
async fn clean_up(runtime: &KubeRuntime, app: &str, id: &str) {
    if let Err(e) = runtime.0.settings.tokens.revoke(&token_name(app, id)).await {
        // It expires with the build anyway.
        tracing::warn!(build.id = %id, error = %e, "revoking the source token of build {id}");
    }
    let secrets: Api<Secret> = runtime.api(app);
    if let Err(e) = delete(&secrets, &resources::build_job_name(id)).await {
        tracing::warn!(build.id = %id, "{e}");
    }
}

fn token_name(app: &str, id: &str) -> String {
    format!("build:{app}:{id}")
}

/// Checks the source in `scratch` (see `source::fetch`) and that every service built from it
/// has its Dockerfile; returns the manifest text and the services to build.
async fn check_source(
    runtime: &KubeRuntime,
    job: &BuildJob,
    scratch: &std::path::Path,
    log: &LogSink,
) -> Result<(String, Vec<ServiceBuild>), BuildFailure> {
    let rt = &runtime.0.settings;
    let failed = BuildFailure::Failed;
    let checked = source::fetch(&rt.objects, job, scratch, rt.limits, log).await?;
    let mut services = Vec::new();
    for (name, service) in &checked.manifest.services {
        let Some(build) = &service.build else { continue };
        let dockerfile = inside(&checked.dir, &build.path)
            .and_then(|dir| inside(&dir, &build.manifest))
            .ok_or_else(|| failed(format!("services.{name}.build: {:?} is outside the source", build.path)))?;
        if !tokio::fs::try_exists(&dockerfile).await.unwrap_or(false) {
            return Err(failed(format!(
                "services.{name}.build: no {} in {} of the source",
                build.manifest, build.path
            )));
        }
        let image = resources::image_ref(&rt.config.registry, &job.app, name, &job.id);
        services.push(ServiceBuild {
            service: name.clone(),
            context: build.path.clone(),
            dockerfile: build.manifest.clone(),
            image,
        });
    }
    Ok((checked.text, services))
}

/// `/apps/<app>/objects/<key>` with the key percent-encoded as a URL path.
fn object_path(app: &str, key: &str) -> String {
    let mut path = format!("/apps/{app}/objects/");
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path
}

/// Follows the Job's pod logs and waits for the Job to end. The Job and its pod are watched
/// (one list and one watch request each, however long the build takes).
async fn watch(jobs: &Api<Job>, pods: &Api<Pod>, name: &str, log: &LogSink) -> Result<(), BuildFailure> {
    let selector = format!("job-name={name}");
    let mut job = Watch::start(jobs.clone(), by_name(name), format!("job {name}"));
    let mut pod = Watch::start(
        pods.clone(),
        watcher::Config::default().labels(&selector),
        format!("the pod of job {name}"),
    );
    // Aborted with the build (a cancel or timeout drops this future): a follower left behind
    // would keep the log open, and the build worker waits for the log to close.
    let mut logs: Option<AbortOnDropHandle<()>> = None;
    let result = loop {
        let (jobs_now, pods_now) = (job.current(), pod.current());
        if logs.is_none()
            && let Some(pod_name) = pods_now.objects.keys().next()
        {
            logs = Some(AbortOnDropHandle::new(tokio::spawn(follow_logs(
                pods.clone(),
                pod_name.clone(),
                log.clone(),
                BUILD_STREAM.to_owned(),
            ))));
        }
        if jobs_now.listed {
            let Some(current) = jobs_now.objects.get(name) else {
                break Err(BuildFailure::Failed(format!("job {name} was deleted")));
            };
            if let Some(end) = job_end(current) {
                break match end {
                    Ok(()) => Ok(()),
                    Err(reason) => Err(BuildFailure::Failed(
                        failure_reason(pods, &ListParams::default().labels(&selector), reason).await,
                    )),
                };
            }
        }
        let changed = tokio::select! {
            changed = job.changed() => changed,
            changed = pod.changed() => changed,
        };
        if let Err(e) = changed {
            break Err(BuildFailure::Failed(e.to_string()));
        }
    };
    if let Some(task) = logs {
        // The last lines of a finished container are there to be read; a log that cannot be
        // read (a node that is gone) must not hold the build: dropped on timeout, it is aborted.
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    result
}

/// Whether the Job has ended, and how: `Err` holds the Job's own reason.
fn job_end(job: &Job) -> Option<Result<(), String>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    for condition in conditions {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return Some(Ok(())),
            "Failed" => {
                let reason = match condition.reason.as_deref() {
                    Some("DeadlineExceeded") => "the build job ran past its deadline".to_owned(),
                    _ => condition
                        .message
                        .clone()
                        .unwrap_or_else(|| "the build job failed".to_owned()),
                };
                return Some(Err(reason));
            }
            _ => {}
        }
    }
    None
}

/// The most precise reason for a failed Job: the container that failed and how.
async fn failure_reason(pods: &Api<Pod>, selector: &ListParams, fallback: String) -> String {
    let Ok(list) = pods.list(selector).await else {
        return fallback;
    };
    for pod in list.items {
        let status = pod.status.unwrap_or_default();
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for container in containers {
            if let Some(reason) = container_failure(container) {
                return reason;
            }
        }
    }
    fallback
}

fn container_failure(status: &ContainerStatus) -> Option<String> {
    let terminated = status.state.as_ref()?.terminated.as_ref()?;
    if terminated.exit_code == 0 {
        return None;
    }
    let what = match status.name.as_str() {
        "fetch" => "fetching the source".to_owned(),
        name => match name.strip_prefix("build-") {
            Some(service) => format!("building service {service}"),
            None => format!("container {name}"),
        },
    };
    let detail = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    Some(format!("{what} failed (exit code {}){detail}", terminated.exit_code))
}

/// Streams each container's log in the pod's order (init containers run one after another) as
/// the container starts (the pod is watched for that).
pub(super) async fn follow_logs(pods: Api<Pod>, pod: String, log: LogSink, stream: String) {
    let mut watched = Watch::start(pods.clone(), by_name(&pod), format!("pod {pod}"));
    let mut order: Vec<String> = Vec::new();
    let mut next = 0;
    loop {
        let snapshot = watched.current();
        if snapshot.listed {
            let Some(current) = snapshot.objects.get(&pod) else {
                return;
            };
            if order.is_empty()
                && let Some(spec) = &current.spec
            {
                order = spec
                    .init_containers
                    .iter()
                    .flatten()
                    .chain(&spec.containers)
                    .map(|c| c.name.clone())
                    .collect();
            }
            let Some(container) = order.get(next) else { return };
            let status = current.status.clone().unwrap_or_default();
            let started = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .find(|s| &s.name == container)
                .and_then(|s| s.state.as_ref())
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some());
            let pod_over = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            if started {
                let params = LogParams {
                    container: Some(container.clone()),
                    follow: true,
                    ..LogParams::default()
                };
                match pods.log_stream(&pod, &params).await {
                    Ok(reader) => {
                        let mut lines = reader.lines();
                        while let Some(Ok(line)) = lines.next().await {
                            log.line(&stream, line).await;
                        }
                    }
                    Err(e) => {
                        log.line(
                            &stream,
                            format!("(the log of {container} could not be read: {})", describe(&e)),
                        )
                        .await;
                    }
                }
                next += 1;
                continue;
            }
            if pod_over {
                // It never ran (an earlier container failed).
                return;
            }
        }
        if watched.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_are_encoded() {
        assert_eq!(object_path("app", "tmp/a.tgz"), "/apps/app/objects/tmp/a.tgz");
        assert_eq!(object_path("app", "a b?#%.tgz"), "/apps/app/objects/a%20b%3F%23%25.tgz");
    }

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(serde_json::json!({ "status": { "conditions": conditions } })).unwrap()
    }

    #[test]
    fn the_job_conditions_end_the_build() {
        assert_eq!(job_end(&job(serde_json::json!([]))), None);
        let complete = job(serde_json::json!([{ "type": "Complete", "status": "True" }]));
        assert_eq!(job_end(&complete), Some(Ok(())));
        let deadline = job(serde_json::json!([{
            "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
            "message": "Job was active longer than specified deadline"
        }]));
        assert_eq!(
            job_end(&deadline),
            Some(Err("the build job ran past its deadline".to_owned()))
        );
        let backoff = job(serde_json::json!([{
            "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit"
        }]));
        assert_eq!(
            job_end(&backoff),
            Some(Err("Job has reached the specified backoff limit".to_owned()))
        );
        let not_yet = job(serde_json::json!([{ "type": "Failed", "status": "False" }]));
        assert_eq!(job_end(&not_yet), None);
    }

    #[test]
    fn a_failed_container_names_the_step() {
        let status: ContainerStatus = serde_json::from_value(serde_json::json!({
            "name": "build-web", "image": "kaniko", "imageID": "", "ready": false, "restartCount": 0,
            "state": { "terminated": { "exitCode": 1, "message": "error building image\n" } }
        }))
        .unwrap();
        assert_eq!(
            container_failure(&status).unwrap(),
            "building service web failed (exit code 1): error building image"
        );
    }
}
