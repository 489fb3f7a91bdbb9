//! An in-memory runtime for tests of the workers: nothing runs, every call is recorded, and
//! what `build`, `apply` and one-off processes do is scripted (succeed, fail, or hang until the
//! worker gives up on them, optionally after writing a few progress lines). Handed to
//! `Application::build_with`, it lets the deploy and build drivers be tested in milliseconds.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::{
    BuildFailure, BuildJob, BuildOutput, ExecRequest, ExecSession, LogSink, OneOff, ProcessInfo, ProcessKind,
    ProcessStatus, ReleaseSpec, Runtime, RuntimeError,
};

/// How a scripted call ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Succeed,
    /// It fails with this message.
    Fail(String),
    /// It never returns (the worker's deadline, a cancel, a lost lease or shutdown ends it).
    Hang,
}

/// One scripted call: `steps` progress lines written to its log, then its ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub steps: u32,
    pub ending: Ending,
}

impl Script {
    pub fn succeed() -> Self {
        Self {
            steps: 0,
            ending: Ending::Succeed,
        }
    }

    pub fn fail(message: &str) -> Self {
        Self {
            steps: 0,
            ending: Ending::Fail(message.to_owned()),
        }
    }

    pub fn hang() -> Self {
        Self {
            steps: 0,
            ending: Ending::Hang,
        }
    }

    /// Succeeds after writing `steps` progress lines.
    pub fn succeed_after(steps: u32) -> Self {
        Self {
            steps,
            ending: Ending::Succeed,
        }
    }
}

/// A call the fake received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateApp(String),
    Build {
        app: String,
        id: String,
    },
    CancelBuild {
        app: String,
        id: String,
    },
    /// `release: None` stops the app.
    Apply {
        app: String,
        release: Option<String>,
    },
    /// A one-off process: its service and command.
    Run {
        app: String,
        service: String,
        command: Vec<String>,
    },
    WaitProcess {
        app: String,
        id: String,
    },
    RestartProcess {
        app: String,
        id: String,
    },
    PruneBuilds {
        app: String,
        ids: Vec<String>,
    },
    DeleteApp(String),
}

/// The in-memory runtime. Unscripted calls succeed (a build with [`FakeRuntime::manifest`]).
#[derive(Debug)]
pub struct FakeRuntime {
    scripts: Mutex<Scripts>,
    calls: Mutex<Vec<Call>>,
    /// The number of calls so far, for tests waiting on one.
    count: watch::Sender<usize>,
    /// The manifest a successful build returns.
    pub manifest: String,
}

#[derive(Debug, Default)]
struct Scripts {
    builds: VecDeque<Script>,
    applies: VecDeque<Script>,
    /// Scripts for the applies of one release (`None`: stopping the app), before `applies`.
    applies_of: std::collections::HashMap<Option<String>, VecDeque<Script>>,
    /// Exit codes of one-off processes (`None`: it never exits).
    exits: VecDeque<Option<i32>>,
}

impl FakeRuntime {
    /// A fake whose builds return `manifest`.
    pub fn new(manifest: &str) -> Self {
        Self {
            scripts: Mutex::new(Scripts::default()),
            calls: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            manifest: manifest.to_owned(),
        }
    }

    /// What the next `apply` (after those already scripted) does.
    pub fn script_apply(&self, script: Script) {
        self.lock_scripts().applies.push_back(script);
    }

    /// What the next `apply` of `release` (`None`: stopping the app) does, whatever the
    /// order of the calls.
    pub fn script_apply_of(&self, release: Option<&str>, script: Script) {
        self.lock_scripts()
            .applies_of
            .entry(release.map(str::to_owned))
            .or_default()
            .push_back(script);
    }

    /// What the next `build` does.
    pub fn script_build(&self, script: Script) {
        self.lock_scripts().builds.push_back(script);
    }

    /// How the next one-off process ends: its exit code, or `None` to run forever.
    pub fn script_exit(&self, code: Option<i32>) {
        self.lock_scripts().exits.push_back(code);
    }

    /// Forgets every script and every call, as if new (a test harness reusing one server for
    /// several tests).
    pub fn reset(&self) {
        *self.lock_scripts() = Scripts::default();
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until a call matching `want` has been made; returns it.
    pub async fn called(&self, want: impl Fn(&Call) -> bool) -> Call {
        self.calls_until(|calls| calls.iter().find(|c| want(c)).cloned()).await
    }

    /// Waits until the `n`th call matching `want` (counting from 1) has been made.
    pub async fn called_times(&self, n: usize, want: impl Fn(&Call) -> bool) {
        self.calls_until(|calls| (calls.iter().filter(|c| want(c)).count() >= n).then_some(()))
            .await;
    }

    /// Waits until `check` finds what it looks for in the calls so far.
    async fn calls_until<T>(&self, check: impl Fn(&[Call]) -> Option<T>) -> T {
        let mut count = self.count.subscribe();
        loop {
            if let Some(found) = check(&self.calls()) {
                return found;
            }
            // The sender lives as long as `self`.
            let _ = count.changed().await;
        }
    }

    fn lock_scripts(&self) -> std::sync::MutexGuard<'_, Scripts> {
        self.scripts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(call);
        self.count.send_modify(|n| *n += 1);
    }

    /// Plays `script`: its progress lines, then its ending.
    async fn play(script: Script, log: &LogSink) -> Result<(), String> {
        for step in 1..=script.steps {
            log.line(
                &crate::stream_names::system("fake", "app"),
                format!("step {step} of {}", script.steps),
            )
            .await;
        }
        match script.ending {
            Ending::Succeed => Ok(()),
            Ending::Fail(message) => Err(message),
            Ending::Hang => std::future::pending().await,
        }
    }
}

fn process(app: &str, id: String, service: &str) -> ProcessInfo {
    ProcessInfo {
        id,
        app: app.to_owned(),
        command: String::new(),
        cpu: 0.0,
        memory: 0.0,
        host: String::new(),
        image: String::new(),
        instance: String::new(),
        name: service.to_owned(),
        ports: Vec::new(),
        release: String::new(),
        started: chrono::Utc::now(),
        status: ProcessStatus::Running,
        pid: 0,
        kind: ProcessKind::Run,
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn create_app(&self, app: &str) -> Result<(), RuntimeError> {
        self.record(Call::CreateApp(app.to_owned()));
        Ok(())
    }

    async fn cancel_build(&self, app: &str, id: &str) -> Result<(), RuntimeError> {
        self.record(Call::CancelBuild {
            app: app.to_owned(),
            id: id.to_owned(),
        });
        Ok(())
    }

    async fn build(&self, job: &BuildJob, log: &LogSink) -> Result<BuildOutput, BuildFailure> {
        self.record(Call::Build {
            app: job.app.clone(),
            id: job.id.to_string(),
        });
        let script = self.lock_scripts().builds.pop_front().unwrap_or_else(Script::succeed);
        Self::play(script, log).await.map_err(BuildFailure::Failed)?;
        Ok(BuildOutput {
            manifest: self.manifest.clone(),
            images: std::collections::BTreeMap::new(),
        })
    }

    async fn apply(&self, app: &str, release: Option<&ReleaseSpec>, log: &LogSink) -> Result<(), RuntimeError> {
        let release = release.map(|r| r.id.to_string());
        let script = {
            let mut scripts = self.lock_scripts();
            let of = scripts.applies_of.get_mut(&release).and_then(VecDeque::pop_front);
            of.or_else(|| scripts.applies.pop_front())
                .unwrap_or_else(Script::succeed)
        };
        self.record(Call::Apply {
            app: app.to_owned(),
            release,
        });
        Self::play(script, log).await.map_err(RuntimeError::Failed)
    }

    async fn processes(&self, _app: &str) -> Result<Vec<ProcessInfo>, RuntimeError> {
        Ok(Vec::new())
    }

    async fn restart_process(&self, app: &str, id: &str) -> Result<(), RuntimeError> {
        self.record(Call::RestartProcess {
            app: app.to_owned(),
            id: id.to_owned(),
        });
        Ok(())
    }

    async fn run(&self, release: &ReleaseSpec, one_off: OneOff) -> Result<ProcessInfo, RuntimeError> {
        let id = format!("{}-run-{}", one_off.service, self.calls().len());
        self.record(Call::Run {
            app: release.app.clone(),
            service: one_off.service.clone(),
            command: one_off.command,
        });
        Ok(process(&release.app, id, &one_off.service))
    }

    async fn wait_process(&self, app: &str, id: &str) -> Result<i32, RuntimeError> {
        self.record(Call::WaitProcess {
            app: app.to_owned(),
            id: id.to_owned(),
        });
        let exit = self.lock_scripts().exits.pop_front();
        match exit {
            Some(Some(code)) => Ok(code),
            Some(None) => std::future::pending().await,
            None => Ok(0),
        }
    }

    async fn exec(&self, _app: &str, id: &str, _request: ExecRequest) -> Result<ExecSession, RuntimeError> {
        Err(RuntimeError::Failed(format!(
            "no process {id}: the fake runtime runs nothing"
        )))
    }

    async fn prune_builds(&self, app: &str, ids: &[crate::ids::BuildId]) -> Result<(), RuntimeError> {
        self.record(Call::PruneBuilds {
            app: app.to_owned(),
            ids: ids.iter().map(ToString::to_string).collect(),
        });
        Ok(())
    }

    async fn delete_app(&self, app: &str) -> Result<(), RuntimeError> {
        self.record(Call::DeleteApp(app.to_owned()));
        Ok(())
    }
}
