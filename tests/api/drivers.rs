//! The deploy and build drivers on the fake runtime (`Application::build_with`): each test
//! claims one job as the server's replica and runs the driver to its end, in milliseconds, with
//! the runtime scripted to succeed, fail or hang. Every row of the state table the driver turns
//! into effects is here: lease loss (rolling out, in the release phase, rolling back), the
//! deadline (rolling out, in the release phase, of the rollback itself), a cancel (rolling out,
//! in the release phase), a failed rollback (re-applying, stopping) and shutdown. No server is
//! serving: nothing else claims the jobs.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rack::config::{Config, Database};
use rack::deploy::DeployState;
use rack::runtime::fake::{Call, FakeRuntime, Script};
use rack::store::deployments::{self, Deployment};
use rack::store::events::{Outcome, Topic};
use uuid::Uuid;

use crate::helpers::{PASSWORD, ReusedDatabase, reused_database};

const APP: &str = "drv";
/// The (ended) build every release of the tests comes from.
const FAKE_BUILD: &str = "BFAKEBUILDS";
const MANIFEST: &str = "services:\n  web:\n    command: sleep 1000\n";
const WITH_RELEASE_PHASE: &str = "services:\n  web:\n    command: sleep 1000\n    release: ./migrate\n";

/// The runtime every test of this file runs on: a built server's pool and tasks belong to the
/// runtime that built it, and the tests share their servers (see `Rig`).
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
});

/// Runs a test on [`RUNTIME`].
fn on_runtime(test: impl std::future::Future<Output = ()>) {
    RUNTIME.block_on(test);
}

/// Runs a test on [`RUNTIME`] with a [`Rig::new`].
fn with_rig<Test: std::future::Future<Output = ()>>(test: impl FnOnce(Rig) -> Test) {
    on_runtime(async { test(Rig::new().await).await });
}

/// Servers given back by the tests done with them, for the next to reuse: building one (a pool,
/// the migrations' check, the event bus) cost more than a driver test itself.
static SPARE_RIGS: Mutex<Vec<Built>> = Mutex::new(Vec::new());

/// A built (not serving) server on a database of its own with the fake runtime, and one app
/// with one ended build: a spare one emptied, or a new one. No server is serving: nothing else
/// claims the jobs.
struct Rig {
    built: Option<Built>,
    fake: Arc<FakeRuntime>,
}

/// What a rig owns.
struct Built {
    app: rack::Application,
    fake: Arc<FakeRuntime>,
    _data: tempfile::TempDir,
    // Dropped after `app`: the database is spare again only once this test's server is gone.
    _database: ReusedDatabase,
}

impl Rig {
    async fn new() -> Self {
        let spare = SPARE_RIGS.lock().unwrap().pop();
        let rig = match spare {
            Some(built) => {
                built.fake.reset();
                // Everything a test makes hangs off its app.
                sqlx::query("delete from apps")
                    .execute(&built.app.state().pool)
                    .await
                    .unwrap();
                Self {
                    fake: built.fake.clone(),
                    built: Some(built),
                }
            }
            None => Self::build().await,
        };
        rig.prepare().await;
        rig
    }

    async fn build() -> Self {
        rack::tls::install_provider();
        let database = reused_database().await;
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(
            data.path().to_path_buf(),
            Database::Url(database.url().to_owned()),
            PASSWORD,
        );
        // Renewals every 20 ms: a lost lease is seen at once. Nothing but the tests themselves
        // claims here, so a renewal that comes late loses nothing.
        config.job_lease = Duration::from_millis(60);
        // A rollback gets the longer of its deployment's deadline and this: only a deployment
        // with no time at all (`a_rollback_past_its_own_deadline_ends_in_failure`) gets 50 ms.
        config.rollback_min_timeout = Duration::from_millis(50);
        let fake = Arc::new(FakeRuntime::new(MANIFEST));
        let app = rack::Application::build_with(config, fake.clone()).await.unwrap();
        Self {
            built: Some(Built {
                app,
                fake: fake.clone(),
                _data: data,
                _database: database,
            }),
            fake,
        }
    }

    /// The app, and the ended build every release of the tests comes from.
    async fn prepare(&self) {
        let name = rack::names::AppName::parse(APP).unwrap();
        rack::store::apps::insert(self.pool(), &name, "3").await.unwrap();
        queue_build(self, FAKE_BUILD).await;
        let mut conn = self.pool().acquire().await.unwrap();
        let done = rack::store::builds::Finish {
            status: rack::store::builds::BuildStatus::Complete,
            ..rack::store::builds::Finish::failed("")
        };
        assert!(
            rack::store::builds::finish(&mut conn, FAKE_BUILD, None, &done)
                .await
                .unwrap()
        );
    }

    fn state(&self) -> &rack::AppState {
        self.built.as_ref().expect("a built rig").app.state()
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.state().pool
    }

    /// This server's state with `change` made to its configuration: the same pool, runtime,
    /// bus and replica, for a test that needs one setting changed without building a server
    /// of its own (building one costs more than the test). Its shutdown token is a child of
    /// the server's: a test may shut it down and still give the server back for reuse.
    fn state_with(&self, change: impl FnOnce(&mut Config)) -> rack::AppState {
        let state = self.state();
        let mut config = state.config.clone();
        change(&mut config);
        rack::AppState(Arc::new(rack::Rack {
            pool: state.pool.clone(),
            config,
            password: state.password.clone(),
            objects: state.objects.clone(),
            keyring: state.keyring.clone(),
            runtime: state.runtime.clone(),
            bus: state.bus.clone(),
            replica: state.replica,
            shutdown: state.shutdown.child_token(),
            throttle: rack::throttle::Throttle::new(1, Duration::from_secs(60)),
            streams: state.streams.clone(),
            metrics: rack::metrics::Metrics::new(),
        }))
    }

    /// A release of the app with `manifest`; its id.
    async fn release(&self, manifest: &str) -> String {
        let id = rack::ids::ReleaseId::generate().to_string();
        let mut conn = self.pool().acquire().await.unwrap();
        rack::store::releases::insert(
            &mut conn,
            &rack::store::releases::NewRelease {
                id: &id,
                app: APP,
                build_id: Some(FAKE_BUILD),
                env: "",
                manifest,
                description: "",
            },
        )
        .await
        .unwrap();
        id
    }

    /// Promotes `release` (deadline `timeout`) and claims the deployment as this replica.
    async fn claim(&self, release: &str, timeout: Duration) -> Deployment {
        let mut conn = self.pool().acquire().await.unwrap();
        deployments::insert(&mut conn, Uuid::now_v7(), APP, release, timeout, &atom())
            .await
            .unwrap();
        let state = self.state();
        deployments::claim_next(self.pool(), state.replica, state.config.job_lease)
            .await
            .unwrap()
            .expect("a deployment to claim")
    }

    /// Runs the driver on `deployment` to its end (within 10 s).
    async fn drive(&self, deployment: Deployment) {
        within(rack::jobs::deploys::run(self.state(), deployment)).await;
    }

    /// Promotes a new release with `manifest` and drives its deployment to its end; the
    /// deployment's id and the release.
    async fn promote(&self, manifest: &str) -> (Uuid, String) {
        let release = self.release(manifest).await;
        let deployment = self.claim(&release, Duration::from_secs(60)).await;
        let id = deployment.id;
        self.drive(deployment).await;
        (id, release)
    }

    /// Asserts that the deployment's log holds each of `lines`; returns its lines.
    async fn assert_logged(&self, id: Uuid, lines: &[&str]) -> Vec<String> {
        let (logged, _) = self.log(id).await;
        for line in lines {
            assert!(has(&logged, line), "{line:?} missing from {logged:#?}");
        }
        logged
    }

    /// Claims the deployment of `release` as started 60 s ago, so its deadline is now (a clock
    /// moved, not a test that waits), and drives it to its end; its id.
    async fn drive_past_deadline(&self, release: &str) -> Uuid {
        let mut deployment = self.claim(release, Duration::from_secs(60)).await;
        deployment.claim.started_at = Some(chrono::Utc::now() - chrono::Duration::seconds(60));
        let id = deployment.id;
        self.drive(deployment).await;
        id
    }

    /// Asserts that deployment `id` failed in `from` as `failed` and was rolled back to
    /// `previous` (applied last, and still the app's release), ending Reverted with an error.
    /// Returns the reason it failed.
    async fn assert_rolled_back(&self, id: Uuid, previous: &str, from: DeployState, failed: DeployState) -> String {
        let ended = self.get(id).await;
        assert_eq!(ended.state, DeployState::Reverted);
        let applies = self.applies();
        assert_eq!(applies.last(), Some(&Some(previous.to_owned())), "{applies:?}");
        assert_eq!(self.current_release().await.as_deref(), Some(previous));
        let (lines, outcome) = self.log(id).await;
        assert_eq!(outcome, Some(Outcome::Error));
        for want in [
            (from, failed),
            (failed, DeployState::Rollback),
            (DeployState::Rollback, DeployState::Reverted),
        ] {
            let line = rack::deploy::machine::status_line(want.0, want.1);
            assert!(has(&lines, &line), "{line:?} missing from {lines:#?}");
        }
        ended.reason
    }

    /// Runs the driver on `deployment` in a task of its own (for a test to act meanwhile).
    fn spawn_drive(&self, deployment: Deployment) -> tokio::task::JoinHandle<()> {
        spawn_drive_on(self.state().clone(), deployment)
    }

    /// Claims the deployment of `release` and drives it in a task of its own until the runtime
    /// got a call matching `until`; its id and the task.
    async fn drive_until(&self, release: &str, until: impl Fn(&Call) -> bool) -> (Uuid, tokio::task::JoinHandle<()>) {
        self.drive_on_until(self.state().clone(), release, until).await
    }

    /// [`Rig::drive_until`] with the server's `state` (see [`Rig::state_with`]).
    async fn drive_on_until(
        &self,
        state: rack::AppState,
        release: &str,
        until: impl Fn(&Call) -> bool,
    ) -> (Uuid, tokio::task::JoinHandle<()>) {
        let deployment = self.claim(release, Duration::from_secs(60)).await;
        let id = deployment.id;
        let driving = spawn_drive_on(state, deployment);
        within(self.fake.called(until)).await;
        (id, driving)
    }

    /// Asserts that the release command was stopped.
    fn assert_command_stopped(&self) {
        let calls = self.fake.calls();
        assert!(
            calls.iter().any(|c| matches!(c, Call::RestartProcess { .. })),
            "the command outlived the driver: {calls:?}"
        );
    }

    /// A release deployed to Running (what later deployments roll back to).
    async fn deployed(&self) -> String {
        let release = self.release(MANIFEST).await;
        let deployment = self.claim(&release, Duration::from_secs(60)).await;
        self.drive(deployment).await;
        release
    }

    /// Another replica takes deployment `id` over (as after a missed renewal of this one's
    /// lease); its id.
    async fn take_over(&self, id: Uuid) -> Uuid {
        assert!(
            deployments::hand_back(self.pool(), id, self.state().replica)
                .await
                .unwrap()
        );
        let other = Uuid::now_v7();
        deployments::claim_next(self.pool(), other, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        other
    }

    /// Whether the deployment's log has a state change out of `state`.
    async fn left(&self, id: Uuid, state: DeployState) -> bool {
        let out = format!("Status: {} =>", state.title());
        self.log(id).await.0.iter().any(|l| l.starts_with(&out))
    }

    async fn get(&self, id: Uuid) -> Deployment {
        deployments::get(self.pool(), APP, id).await.unwrap().unwrap()
    }

    /// The deployment's log: its lines and the outcome it ended with. Checks the rule that
    /// the terminal event is written with the state that ends the deployment: one at most,
    /// the last, and there exactly when the deployment has ended.
    async fn log(&self, id: Uuid) -> (Vec<String>, Option<Outcome>) {
        let topic = Topic::Deployment {
            app: APP.to_owned(),
            deployment: id,
        };
        let events = rack::store::events::list_after(self.pool(), &topic, 0, 1000)
            .await
            .unwrap();
        let ended = self.get(id).await.state.is_terminal();
        let terminal: Vec<usize> = (0..events.len()).filter(|&n| events[n].outcome.is_some()).collect();
        let want = if ended { vec![events.len() - 1] } else { vec![] };
        assert_eq!(terminal, want, "terminal events of a deployment that ended: {ended}");
        let outcome = events.iter().find_map(|e| e.outcome);
        (events.into_iter().map(|e| e.message).collect(), outcome)
    }

    async fn current_release(&self) -> Option<String> {
        let name = rack::names::AppName::parse(APP).unwrap();
        let app = rack::store::apps::get(self.pool(), &name).await.unwrap().unwrap();
        app.release_id.map(|r| r.to_string())
    }

    /// Asserts that the runtime was asked for exactly these applies, in order (`None`: stop the
    /// app).
    fn assert_applies(&self, want: &[Option<&String>]) {
        let want: Vec<Option<String>> = want.iter().map(|r| r.cloned()).collect();
        assert_eq!(self.applies(), want);
    }

    /// The applies the runtime was asked for, in order (`None`: stop the app).
    fn applies(&self) -> Vec<Option<String>> {
        self.fake
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Apply { release, .. } => Some(release),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let Some(built) = self.built.take() else { return };
        let state = built.app.state();
        if !std::thread::panicking() && !state.shutdown.is_cancelled() {
            SPARE_RIGS.lock().unwrap().push(built);
        } else {
            // Its tasks (the event bus) run on the shared runtime: stop them.
            state.shutdown.cancel();
        }
    }
}

/// Runs the driver on `deployment` with `state` in a task of its own.
fn spawn_drive_on(state: rack::AppState, deployment: Deployment) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { rack::jobs::deploys::run(&state, deployment).await })
}

/// Whether `call` is an apply of `release`.
fn applying(release: &str) -> impl Fn(&Call) -> bool + '_ {
    move |call| matches!(call, Call::Apply { release: Some(r), .. } if r == release)
}

fn atom() -> String {
    rack::stream_names::atom("fake")
}

async fn within<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("the driver ends within 10 s")
}

fn has(lines: &[String], line: &str) -> bool {
    lines.iter().any(|l| l == line)
}

#[test]
fn pending_without_release_phase_goes_updating_then_running_and_switches_the_release() {
    with_rig(|rig| async move {
        rig.fake.script_apply(Script::succeed_after(3));
        let (id, release) = rig.promote(MANIFEST).await;

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Running);
        assert!(ended.claim.owner.is_none() && ended.claim.ended_at.is_some());
        assert_eq!(rig.current_release().await.as_deref(), Some(release.as_str()));
        rig.assert_applies(&[Some(&release)]);
        let (lines, outcome) = rig.log(id).await;
        assert_eq!(outcome, Some(Outcome::Ok));
        let want = [
            "Status: Running => Pending".to_owned(),
            "Status: Pending => Updating".to_owned(),
            "step 1 of 3".to_owned(),
            "step 3 of 3".to_owned(),
            "Status: Updating => Running".to_owned(),
            format!("Release {release} is now active"),
        ];
        for line in &want[1..] {
            assert!(has(&lines, line), "{line:?} missing from {lines:#?}");
        }
        // The runtime's progress comes between the states it happened in.
        let at = |l: &str| lines.iter().position(|x| x == l).unwrap();
        assert!(at(&want[1]) < at(&want[2]) && at(&want[3]) < at(&want[4]), "{lines:#?}");
    });
}

#[test]
fn a_release_phase_runs_its_commands_before_updating() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let (id, release) = rig.promote(WITH_RELEASE_PHASE).await;

        assert_eq!(rig.get(id).await.state, DeployState::Running);
        let calls = rig.fake.calls();
        let run = calls
        .iter()
        .position(|c| matches!(c, Call::Run { service, command, .. } if service == "web" && command.join(" ").contains("./migrate")))
        .expect("the release command ran");
        let apply = calls
            .iter()
            .rposition(|c| matches!(c, Call::Apply { release: Some(r), .. } if *r == release))
            .expect("the release was applied");
        assert!(run < apply, "the release command runs before the rollout: {calls:?}");
        rig.assert_applies(&[Some(&previous), Some(&release)]);
        rig.assert_logged(
            id,
            &[
                "Status: Pending => Releasing",
                "Running release command of web: ./migrate",
                "Release command of web succeeded",
                "Status: Releasing => Updating",
                "Status: Updating => Running",
            ],
        )
        .await;
    });
}

#[test]
fn a_failed_release_command_rolls_back_without_touching_what_runs() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        rig.fake.script_exit(Some(3));
        let (id, _) = rig.promote(WITH_RELEASE_PHASE).await;

        let reason = rig
            .assert_rolled_back(id, &previous, DeployState::Releasing, DeployState::Error)
            .await;
        assert!(reason.contains("exited with code 3"), "{reason}");
        // The new release was never applied: the rollback re-applies the previous one.
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
    });
}

#[test]
fn a_failed_apply_rolls_back_to_the_previous_release() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        rig.fake.script_apply(Script::fail("web did not become healthy"));
        let (id, release) = rig.promote(MANIFEST).await;

        let reason = rig
            .assert_rolled_back(id, &previous, DeployState::Updating, DeployState::Error)
            .await;
        assert_eq!(reason, "web did not become healthy");
        rig.assert_applies(&[Some(&previous), Some(&release), Some(&previous)]);
    });
}

#[test]
fn a_failed_first_deployment_rolls_back_to_nothing() {
    with_rig(|rig| async move {
        rig.fake.script_apply(Script::fail("no"));
        let (id, release) = rig.promote(MANIFEST).await;

        assert_eq!(rig.get(id).await.state, DeployState::Reverted);
        // No previous release: the rollback stops the app.
        rig.assert_applies(&[Some(&release), None]);
        assert_eq!(rig.current_release().await, None);
    });
}

#[test]
fn a_failed_rollback_ends_in_failure_with_both_reasons() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        rig.fake.script_apply(Script::fail("new one broke"));
        rig.fake.script_apply(Script::fail("old one broke too"));
        let (id, _) = rig.promote(MANIFEST).await;

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Failure);
        assert!(ended.claim.owner.is_none());
        assert_eq!(rig.current_release().await, Some(previous));
        let (lines, outcome) = rig.log(id).await;
        assert_eq!(outcome, Some(Outcome::Error));
        assert!(has(&lines, "Status: Rollback => Failure"), "{lines:#?}");
        assert!(
            has(&lines, "new one broke; rollback failed: old one broke too"),
            "{lines:#?}"
        );
    });
}

#[test]
fn a_failed_first_deployment_whose_stop_fails_ends_in_failure() {
    with_rig(|rig| async move {
        rig.fake.script_apply(Script::fail("no"));
        rig.fake.script_apply_of(None, Script::fail("could not stop"));
        let (id, release) = rig.promote(MANIFEST).await;

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Failure);
        assert_eq!(ended.reason, "no; rollback failed: could not stop");
        rig.assert_applies(&[Some(&release), None]);
        assert_eq!(rig.current_release().await, None);
    });
}

#[test]
fn a_rollback_past_its_own_deadline_ends_in_failure() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let release = rig.release(MANIFEST).await;
        rig.fake.script_apply_of(Some(&release), Script::fail("new one broke"));
        rig.fake.script_apply_of(Some(&previous), Script::hang());
        // No time at all for the new release (it fails, or its deadline passes: either way the
        // rollback comes), then 50 ms for the rollback.
        let deployment = rig.claim(&release, Duration::ZERO).await;
        let id = deployment.id;
        rig.drive(deployment).await;

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Failure);
        assert!(
            ended.reason.ends_with("; rollback failed: it did not finish within 0s"),
            "{}",
            ended.reason
        );
        let applies = rig.applies();
        assert_eq!(applies.last(), Some(&Some(previous.clone())), "{applies:?}");
        let (lines, outcome) = rig.log(id).await;
        assert_eq!(outcome, Some(Outcome::Error));
        assert!(has(&lines, "Status: Rollback => Failure"), "{lines:#?}");
    });
}

#[test]
fn the_deadline_during_the_release_phase_stops_the_command_and_rolls_back() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        rig.fake.script_exit(None);
        let release = rig.release(WITH_RELEASE_PHASE).await;
        let id = rig.drive_past_deadline(&release).await;

        let reason = rig
            .assert_rolled_back(id, &previous, DeployState::Releasing, DeployState::Deadline)
            .await;
        assert_eq!(reason, "the deployment did not become healthy within 60s");
        rig.assert_command_stopped();
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
    });
}

#[test]
fn a_cancel_during_the_rollout_rolls_back() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let release = rig.release(MANIFEST).await;
        rig.fake.script_apply_of(Some(&release), Script::hang());
        let (id, driving) = rig.drive_until(&release, applying(&release)).await;
        deployments::request_cancel(rig.pool(), APP).await.unwrap().unwrap();
        within(driving).await.unwrap();

        let reason = rig
            .assert_rolled_back(id, &previous, DeployState::Updating, DeployState::Cancelled)
            .await;
        assert_eq!(reason, "cancelled");
        rig.assert_applies(&[Some(&previous), Some(&release), Some(&previous)]);
    });
}

#[test]
fn the_deadline_stops_the_rollout_and_rolls_back() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let release = rig.release(MANIFEST).await;
        rig.fake.script_apply_of(Some(&release), Script::hang());
        let id = rig.drive_past_deadline(&release).await;

        // The rollout may or may not have begun when the deadline won; the rollback applied the
        // previous release last (which `assert_rolled_back` checks).
        rig.assert_rolled_back(id, &previous, DeployState::Updating, DeployState::Deadline)
            .await;
    });
}

#[test]
fn a_cancel_during_the_release_phase_stops_the_command_and_rolls_back() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        rig.fake.script_exit(None);
        let release = rig.release(WITH_RELEASE_PHASE).await;
        let (id, driving) = rig
            .drive_until(&release, |c| matches!(c, Call::WaitProcess { .. }))
            .await;
        deployments::request_cancel(rig.pool(), APP).await.unwrap().unwrap();
        within(driving).await.unwrap();

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Reverted);
        // The command went with the cancel; the new release was never applied.
        rig.assert_command_stopped();
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
        rig.assert_logged(id, &["Status: Releasing => Cancelled", "Status: Cancelled => Rollback"])
            .await;
    });
}

#[test]
fn a_lost_lease_stops_the_driver_without_recording_anything() {
    with_rig(|rig| async move {
        rig.deployed().await;
        rig.fake.script_apply(Script::hang());
        let release = rig.release(MANIFEST).await;
        let (id, driving) = rig.drive_until(&release, applying(&release)).await;
        let other = rig.take_over(id).await;
        let (before, _) = rig.log(id).await;
        within(driving).await.unwrap();

        let now = rig.get(id).await;
        assert_eq!(now.state, DeployState::Updating);
        assert_eq!(now.claim.owner, Some(other));
        assert_eq!(rig.log(id).await.0, before, "the driver wrote after losing its lease");
        // The app still exists: nothing is torn down.
        assert!(!rig.fake.calls().iter().any(|c| matches!(c, Call::DeleteApp(_))));
    });
}

#[test]
fn a_lost_lease_during_the_release_phase_stops_the_command_and_records_nothing() {
    with_rig(|rig| async move {
        rig.deployed().await;
        rig.fake.script_exit(None);
        let release = rig.release(WITH_RELEASE_PHASE).await;
        let (id, driving) = rig
            .drive_until(&release, |c| matches!(c, Call::WaitProcess { .. }))
            .await;
        let other = rig.take_over(id).await;
        within(driving).await.unwrap();

        let now = rig.get(id).await;
        assert_eq!((now.state, now.claim.owner), (DeployState::Releasing, Some(other)));
        assert!(
            !rig.left(id, DeployState::Releasing).await,
            "the driver wrote after losing its lease"
        );
        // The command does not outlive the driver; the new release was never applied.
        rig.assert_command_stopped();
        assert_eq!(rig.applies().len(), 1);
    });
}

#[test]
fn a_lost_lease_during_the_rollback_leaves_it_to_the_new_holder() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let release = rig.release(MANIFEST).await;
        rig.fake.script_apply_of(Some(&release), Script::fail("broke"));
        rig.fake.script_apply_of(Some(&previous), Script::hang());
        let deployment = rig.claim(&release, Duration::from_secs(60)).await;
        let id = deployment.id;
        let driving = rig.spawn_drive(deployment);
        // The second apply of the previous release is the rollback's.
        within(rig.fake.called_times(
            2,
            |c| matches!(c, Call::Apply { release: Some(r), .. } if *r == previous),
        ))
        .await;
        let other = rig.take_over(id).await;
        within(driving).await.unwrap();

        let now = rig.get(id).await;
        assert_eq!((now.state, now.claim.owner), (DeployState::Rollback, Some(other)));
        assert!(
            !rig.left(id, DeployState::Rollback).await,
            "the driver wrote after losing its lease"
        );
        assert_eq!(rig.log(id).await.1, None, "it has not ended");
    });
}

#[test]
fn a_lost_lease_of_a_deleted_app_stops_what_the_rollout_started() {
    with_rig(|rig| async move {
        rig.fake.script_apply(Script::hang());
        let release = rig.release(MANIFEST).await;
        let (_, driving) = rig.drive_until(&release, |c| matches!(c, Call::Apply { .. })).await;
        let name = rack::names::AppName::parse(APP).unwrap();
        rack::store::apps::delete(rig.pool(), &name).await.unwrap();
        within(driving).await.unwrap();
        assert!(rig.fake.calls().contains(&Call::DeleteApp(APP.to_owned())));
    });
}

#[test]
fn a_superseded_deployment_is_left_to_the_new_one() {
    with_rig(|rig| async move {
        rig.deployed().await;
        rig.fake.script_apply(Script::hang());
        let release = rig.release(MANIFEST).await;
        let (id, driving) = rig.drive_until(&release, applying(&release)).await;
        let mut tx = rig.pool().begin().await.unwrap();
        rack::jobs::deploys::supersede(&mut tx, APP, Uuid::now_v7(), &atom())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        within(driving).await.unwrap();

        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Superseded);
        let (lines, outcome) = rig.log(id).await;
        assert_eq!(outcome, Some(Outcome::Error));
        assert!(has(&lines, "Status: Updating => Superseded"), "{lines:#?}");
        // No rollback: the new deployment decides what runs.
        assert_eq!(rig.applies().len(), 2);
    });
}

#[test]
fn shutting_down_hands_the_deployment_back() {
    with_rig(|rig| async move {
        rig.fake.script_apply(Script::hang());
        let release = rig.release(MANIFEST).await;
        // A shutdown of its own: the server stays reusable.
        let stopping = rig.state_with(|_| {});
        let (id, driving) = rig
            .drive_on_until(stopping.clone(), &release, |c| matches!(c, Call::Apply { .. }))
            .await;
        stopping.shutdown.cancel();
        within(driving).await.unwrap();

        let now = rig.get(id).await;
        assert_eq!(now.state, DeployState::Updating);
        assert_eq!(now.claim.owner, None, "handed back for another replica to resume");
    });
}

/// A deployment taken over in `state` (its holder died there) resumes with what that state
/// does next.
async fn taken_over_in(state: DeployState, manifest: &str) -> (Rig, Uuid, String, String) {
    let rig = Rig::new().await;
    let previous = rig.deployed().await;
    let release = rig.release(manifest).await;
    let mut deployment = rig.claim(&release, Duration::from_secs(60)).await;
    // Recorded in `state` by its previous holder, whose lease ran out.
    for step in path_to(state) {
        let mut snapshot = deployment.snapshot();
        snapshot.release_phase = manifest != MANIFEST;
        let transition = rack::deploy::next(&snapshot, &step).unwrap();
        assert!(
            deployments::record(rig.pool(), &deployment, rig.state().replica, &transition, &atom())
                .await
                .unwrap()
        );
        deployment.state = transition.to;
        if let Some(reason) = transition.reason {
            deployment.reason = reason;
        }
    }
    let id = deployment.id;
    assert!(
        deployments::hand_back(rig.pool(), id, rig.state().replica)
            .await
            .unwrap()
    );
    let resumed = deployments::claim_next(rig.pool(), rig.state().replica, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.state, state);
    rig.drive(resumed).await;
    (rig, id, previous, release)
}

/// The signals that bring a pending deployment to `state`.
fn path_to(state: DeployState) -> Vec<rack::deploy::Signal> {
    use rack::deploy::Signal::{ApplyFailed, Proceed};
    match state {
        DeployState::Releasing | DeployState::Updating => vec![Proceed],
        DeployState::Error => vec![Proceed, ApplyFailed("it broke".to_owned())],
        DeployState::Rollback => vec![Proceed, ApplyFailed("it broke".to_owned()), Proceed],
        other => panic!("no path to {other:?}"),
    }
}

#[test]
fn a_deployment_taken_over_while_releasing_runs_the_commands_again() {
    on_runtime(async {
        let (rig, id, previous, release) = taken_over_in(DeployState::Releasing, WITH_RELEASE_PHASE).await;
        assert_eq!(rig.get(id).await.state, DeployState::Running);
        assert!(rig.fake.calls().iter().any(|c| matches!(c, Call::Run { .. })));
        rig.assert_applies(&[Some(&previous), Some(&release)]);
    });
}

#[test]
fn a_deployment_taken_over_while_updating_applies_again() {
    on_runtime(async {
        let (rig, id, previous, release) = taken_over_in(DeployState::Updating, MANIFEST).await;
        assert_eq!(rig.get(id).await.state, DeployState::Running);
        rig.assert_applies(&[Some(&previous), Some(&release)]);
        assert_eq!(rig.current_release().await, Some(release));
    });
}

#[test]
fn a_deployment_taken_over_in_error_rolls_back() {
    on_runtime(async {
        let (rig, id, previous, _) = taken_over_in(DeployState::Error, MANIFEST).await;
        let ended = rig.get(id).await;
        assert_eq!(ended.state, DeployState::Reverted);
        assert_eq!(ended.reason, "it broke");
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
    });
}

#[test]
fn a_deployment_taken_over_in_rollback_applies_the_previous_release_again() {
    on_runtime(async {
        let (rig, id, previous, _) = taken_over_in(DeployState::Rollback, MANIFEST).await;
        assert_eq!(rig.get(id).await.state, DeployState::Reverted);
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
        let (lines, _) = rig.log(id).await;
        assert!(has(&lines, "Status: Rollback => Reverted"), "{lines:#?}");
    });
}

#[test]
fn a_release_that_cannot_be_loaded_fails_the_deployment() {
    with_rig(|rig| async move {
        let previous = rig.deployed().await;
        let release = rig.release("services: [not a map\n").await;
        let deployment = rig.claim(&release, Duration::from_secs(60)).await;
        let id = deployment.id;
        rig.drive(deployment).await;
        assert_eq!(rig.get(id).await.state, DeployState::Reverted);
        rig.assert_applies(&[Some(&previous), Some(&previous)]);
    });
}

/// Queues build `id` of the app, from a source object that exists.
async fn queue_build(rig: &Rig, id: &str) {
    let key = "src/app.tgz";
    rack::store::objects::replace(rig.pool(), APP, key, "blob", 0, "")
        .await
        .unwrap();
    let url = format!("object://{APP}/{key}");
    rack::store::builds::insert(
        rig.pool(),
        &rack::store::builds::NewBuild {
            id,
            app: APP,
            description: "",
            git_sha: "",
            source_url: &url,
            manifest_path: "convox.yml",
            no_cache: false,
        },
    )
    .await
    .unwrap();
}

/// A queued build of the app, claimed as this replica.
async fn claim_build(rig: &Rig) -> rack::store::builds::Build {
    queue_build(rig, &rack::ids::BuildId::generate()).await;
    let state = rig.state();
    rack::store::builds::claim_next(rig.pool(), state.replica, state.config.job_lease)
        .await
        .unwrap()
        .expect("a build to claim")
}

async fn build_now(rig: &Rig, id: &str) -> rack::store::builds::Build {
    rack::store::builds::get(rig.pool(), APP, id).await.unwrap().unwrap()
}

/// Claims a build of the app whose runtime build plays `script`, and runs it to its end; its
/// id and how it ended.
async fn build_to_its_end(rig: &Rig, script: Script) -> (String, rack::store::builds::Build) {
    build_to_its_end_on(rig, rig.state(), script).await
}

/// [`build_to_its_end`] with the server's `state` (its configuration changed).
async fn build_to_its_end_on(
    rig: &Rig,
    state: &rack::AppState,
    script: Script,
) -> (String, rack::store::builds::Build) {
    rig.fake.script_build(script);
    let build = claim_build(rig).await;
    let id = build.id.to_string();
    within(rack::jobs::builds::run(state, build)).await;
    let ended = build_now(rig, &id).await;
    (id, ended)
}

/// Claims a build of the app whose runtime build hangs, and runs it in a task of its own until
/// the runtime builds; its id and the task.
async fn build_running(rig: &Rig) -> (String, tokio::task::JoinHandle<()>) {
    build_running_on(rig, rig.state().clone()).await
}

/// [`build_running`] with the server's `state` (see [`Rig::state_with`]).
async fn build_running_on(rig: &Rig, state: rack::AppState) -> (String, tokio::task::JoinHandle<()>) {
    rig.fake.script_build(Script::hang());
    let build = claim_build(rig).await;
    let id = build.id.to_string();
    let running = tokio::spawn(async move { rack::jobs::builds::run(&state, build).await });
    within(rig.fake.called(|c| matches!(c, Call::Build { .. }))).await;
    (id, running)
}

/// Asserts that the runtime was asked to cancel the build.
fn assert_cancelled_in_the_runtime(rig: &Rig) {
    let calls = rig.fake.calls();
    assert!(calls.iter().any(|c| matches!(c, Call::CancelBuild { .. })), "{calls:?}");
}

#[test]
fn a_build_that_succeeds_makes_a_release_with_its_manifest() {
    with_rig(|rig| async move {
        let (id, ended) = build_to_its_end(&rig, Script::succeed_after(2)).await;
        assert_eq!(ended.status, rack::store::builds::BuildStatus::Complete);
        let release = ended.release_id.expect("a release");
        let release = rack::store::releases::get(rig.pool(), APP, &release)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(release.manifest, MANIFEST);
        assert_eq!(release.build_id.as_deref(), Some(id.as_str()));
    });
}

#[test]
fn a_build_that_fails_ends_failed_with_its_reason() {
    with_rig(|rig| async move {
        let (_, ended) = build_to_its_end(&rig, Script::fail("npm install failed")).await;
        assert_eq!(ended.status, rack::store::builds::BuildStatus::Failed);
        assert_eq!(ended.reason, "npm install failed");
        assert!(ended.release_id.is_none());
    });
}

#[test]
fn a_build_past_its_timeout_fails_and_is_cancelled_in_the_runtime() {
    with_rig(|rig| async move {
        // Under a second: no time at all.
        let state = rig.state_with(|c| c.build_timeout = Duration::from_millis(200));
        let (_, ended) = build_to_its_end_on(&rig, &state, Script::hang()).await;
        assert_eq!(ended.status, rack::store::builds::BuildStatus::Failed);
        assert!(ended.reason.starts_with("timed out after"), "{}", ended.reason);
        assert_cancelled_in_the_runtime(&rig);
    });
}

#[test]
fn a_cancelled_build_fails_as_cancelled() {
    with_rig(|rig| async move {
        let (id, running) = build_running(&rig).await;
        let mut conn = rig.pool().acquire().await.unwrap();
        rack::store::builds::request_cancel(&mut conn, APP, &id).await.unwrap();
        within(running).await.unwrap();
        let ended = build_now(&rig, &id).await;
        assert_eq!(ended.status, rack::store::builds::BuildStatus::Failed);
        assert_eq!(ended.reason, "cancelled");
        assert_cancelled_in_the_runtime(&rig);
    });
}

#[test]
fn a_build_whose_lease_is_lost_is_left_to_its_new_holder() {
    with_rig(|rig| async move {
        let (id, running) = build_running(&rig).await;
        assert!(
            rack::store::builds::hand_back(rig.pool(), &id, rig.state().replica)
                .await
                .unwrap()
        );
        let other = Uuid::now_v7();
        rack::store::builds::claim_next(rig.pool(), other, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        within(running).await.unwrap();
        let now = build_now(&rig, &id).await;
        assert_eq!(now.status, rack::store::builds::BuildStatus::Running);
        assert_eq!(now.claim.owner, Some(other));
    });
}

#[test]
fn shutting_down_hands_the_build_back() {
    with_rig(|rig| async move {
        // A shutdown of its own: the server stays reusable.
        let stopping = rig.state_with(|_| {});
        let (id, running) = build_running_on(&rig, stopping.clone()).await;
        stopping.shutdown.cancel();
        within(running).await.unwrap();
        let now = build_now(&rig, &id).await;
        assert_eq!(now.claim.owner, None);
        assert!(!now.status.is_terminal());
    });
}

#[test]
fn a_build_taken_over_after_its_holder_died_fails_as_interrupted() {
    with_rig(|rig| async move {
        let mut build = claim_build(&rig).await;
        build.claim.attempts = 2;
        let id = build.id.to_string();
        within(rack::jobs::builds::run(rig.state(), build)).await;
        let ended = build_now(&rig, &id).await;
        assert_eq!(ended.status, rack::store::builds::BuildStatus::Failed);
        assert!(ended.reason.starts_with("interrupted"), "{}", ended.reason);
        assert!(!rig.fake.calls().iter().any(|c| matches!(c, Call::Build { .. })));
    });
}
