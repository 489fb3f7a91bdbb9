//! Rolling one service of a release out on this host, step by step as `deploy::plan` says:
//! start an instance of the new release and wait until it is ready (then it gets traffic), or
//! stop the oldest instance of an earlier one (taken out of the router first), until enough new
//! instances are ready; then what is left of the old ones goes. When the service's
//! `deployment.analysis` is on, the first new instance to take traffic is judged by it (beside
//! the old ones) before the rollout goes on (`analysis.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::instance::{Health, Instance, Launch};
use super::supervisor::{Supervisor, signal_stop, stopped};
use crate::deploy::plan::{self, Counts, Percentages, Step};
use crate::manifest::Service;
use crate::runtime::{LogSink, ReleaseSpec, RuntimeError};

impl Supervisor {
    /// Rolls `name` of `release` out within the budget of its manifest.
    pub(super) async fn roll_service(
        &self,
        release: &ReleaseSpec,
        name: &str,
        service: &Service,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        let app = release.app.as_str();
        let stream = crate::stream_names::system("local", name);
        let budget = Percentages::of(&service.deployment).budget(service.scale.count_min as usize);
        if service.port.is_some() {
            self.ensure_router(app, name).await?;
        }
        let launch = Launch::new(&self.0.builds_dir, self.has_containers(), release, name, service)?;
        // The releases this rollout replaces, for the analysis (none: nothing to compare with).
        let mut replaced: Vec<String> = self
            .split(app, name, &release.id)
            .1
            .iter()
            .map(|i| i.release.clone())
            .collect();
        replaced.sort();
        replaced.dedup();
        let mut analysis = service
            .deployment
            .analysis
            .filter(|_| release.analyse && service.port.is_some() && !replaced.is_empty());
        loop {
            let (new, old) = self.split(app, name, &release.id);
            match plan::next_step(budget, counts(&new, &old)) {
                Step::Finish => break,
                Step::StopOld => self.scale_down_oldest(app, name, &old, log).await,
                Step::AwaitNew => {
                    if let Some(starting) = new.iter().find(|i| !i.is_ready()) {
                        wait_ready(starting, service, log).await?;
                        self.refresh_routes(app, name);
                    }
                    if let Some(settings) = analysis.take() {
                        self.analyse(release, name, &settings, &replaced.join("+"), log).await?;
                    }
                }
                Step::StartNew => {
                    log.line(
                        &stream,
                        format!("Scaled up {name} release {} to {}", release.id, new.len() + 1),
                    )
                    .await;
                    let instance = self.start_instance(app, &launch, log).await;
                    wait_ready(&instance, service, log).await?;
                    self.refresh_routes(app, name);
                    // Judged while the old instances still serve beside it.
                    if let Some(settings) = analysis.take() {
                        self.analyse(release, name, &settings, &replaced.join("+"), log).await?;
                    }
                    let (new, old) = self.split(app, name, &release.id);
                    if plan::retire_after_ready(budget, counts(&new, &old)) {
                        self.scale_down_oldest(app, name, &old, log).await;
                    }
                }
            }
        }
        let (new, old) = self.split(app, name, &release.id);
        for instance in &old {
            self.retire_instance(app, instance, log).await;
        }
        // More new instances than wanted (a resumed rollout, a lower scale): the newest go.
        for extra in new.iter().skip(budget.desired) {
            self.retire_instance(app, extra, log).await;
        }
        if !old.is_empty() {
            log.line(&stream, format!("Scaled down {name} to 0 of the previous release"))
                .await;
        }
        self.refresh_routes(app, name);
        Ok(())
    }

    /// Stops the oldest of `old` (instances of earlier releases of `service`).
    async fn scale_down_oldest(&self, app: &str, service: &str, old: &[Arc<Instance>], log: &LogSink) {
        let Some(oldest) = old.first() else { return };
        self.retire_instance(app, oldest, log).await;
        let message = format!("Scaled down {service} release {} to {}", oldest.release, old.len() - 1);
        log.line(&crate::stream_names::system("local", service), message).await;
    }
}

impl Supervisor {
    /// Takes an instance out of its router and out of every count and list at once, and stops
    /// it in the background: a rollout goes on (and says OK) without waiting the second or so
    /// podman takes to remove a container. rack's shutdown waits for the stop as for any
    /// instance's task. Should rack die before it is done, the container is still there at the
    /// next start, of an earlier release: adopted, then retired by the rollout of the current
    /// one (see `adopt`).
    pub(super) async fn retire_instance(&self, app: &str, instance: &Arc<Instance>, log: &LogSink) {
        instance.stopping.store(true, Ordering::SeqCst);
        let found = self.with_app(app, |procs| {
            let before = procs.instances.len();
            procs.instances.retain(|i| !Arc::ptr_eq(i, instance));
            procs.instances.len() < before
        });
        if !found {
            return;
        }
        self.refresh_routes(app, &instance.service);
        let task = signal_stop(instance);
        let stream = crate::stream_names::system("local", &instance.id);
        log.line(&stream, format!("Stopping process {}", instance.id)).await;
        let (supervisor, owner, retired) = (self.clone(), app.to_owned(), instance.clone());
        // The rollout's log ends with the rollout: the stop is told in the app's log (a sender
        // of the rollout's own would keep its log open until the container is gone).
        let log = self.0.logs.sink(app);
        let stopping = tokio::spawn(async move {
            stopped(task).await;
            supervisor.tell_stopped(&owner, &retired, &log).await;
        });
        self.with_app(app, |procs| {
            procs.retiring.retain(|task| !task.is_finished());
            procs.retiring.push(stopping);
        });
    }

    /// Says that an instance stopped (a line, and a `process.exited` event).
    pub(super) async fn tell_stopped(&self, app: &str, instance: &Arc<Instance>, log: &LogSink) {
        let event = crate::runtime::ProcessEvent {
            app,
            service: &instance.service,
            process: &instance.id,
            pid: 0,
            exit: Some(-1),
        };
        log.process(
            &crate::stream_names::system("local", &instance.id),
            format!("Stopped process {}", instance.id),
            event,
        )
        .await;
    }
}

fn counts(new: &[Arc<Instance>], old: &[Arc<Instance>]) -> Counts {
    Counts {
        new: new.len(),
        new_ready: new.iter().filter(|i| i.is_ready()).count(),
        old: old.len(),
    }
}

/// Waits until `instance` is ready, or has failed before ever being ready.
async fn wait_ready(instance: &Instance, service: &Service, log: &LogSink) -> Result<(), RuntimeError> {
    let stream = crate::stream_names::system("local", &instance.id);
    let mut rx = instance.health.subscribe();
    loop {
        let health = rx.borrow_and_update().clone();
        match health {
            Health::Ready => {
                let what = if service.port.is_some() {
                    format!("Health check passed: GET {}", service.health.path)
                } else {
                    "Process is up".to_owned()
                };
                log.line(&stream, what).await;
                return Ok(());
            }
            Health::Failed(reason) => {
                log.line(&stream, format!("Health check failed: {reason}")).await;
                return Err(RuntimeError::Failed(format!(
                    "process {} of {} failed: {reason}",
                    instance.id, instance.service
                )));
            }
            Health::Starting | Health::Unhealthy => {}
        }
        if rx.changed().await.is_err() {
            return Err(RuntimeError::Failed(format!("process {} stopped", instance.id)));
        }
    }
}
