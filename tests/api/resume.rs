//! A rollout log that outlives the server serving it: `rack deploy` runs through a forwarder in
//! front of two real `rack server` processes, the one carrying the rollout log gets SIGTERM
//! mid-rollout, and the CLI picks the log up from the other after the last event id it showed:
//! the deploy ends `OK`, every line shown once. tests/api/real_node/in_cluster.rs does the same
//! with rack installed in a cluster and a rack pod killed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::forward::{Forward, Upstream};
use crate::helpers::{PASSWORD, fresh_database, wait_for};
use crate::replicas::{Replica, create_app};

/// `rack deploy` running in the background, its stdout collected line by line as it comes.
pub struct BackgroundDeploy {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
    stderr: tokio::task::JoinHandle<String>,
    started: Instant,
}

/// How a [`BackgroundDeploy`] ended.
pub struct Deployed {
    pub success: bool,
    pub lines: Vec<String>,
    pub stderr: String,
    pub took: Duration,
}

impl BackgroundDeploy {
    /// Starts `rack deploy --app APP` in `dir` (which holds its convox.yml) against `url`.
    pub fn start(url: &str, dir: &Path, app: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
            .args(["deploy", "--app", app])
            .current_dir(dir)
            .env("RACK_URL", url)
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("NO_COLOR", "1")
            .env_remove("RACK_APP")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("running rack deploy");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let collected = lines.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Self {
            child,
            lines,
            reader,
            stderr,
            started: Instant::now(),
        }
    }

    /// Waits until the rollout log has begun (a line after `Release: R`, which ends what the
    /// build printed); returns how many lines were shown by then.
    pub async fn rollout_begun(&self, secs: u64) -> usize {
        wait_for(secs, "the first line of the rollout log", || async {
            let lines = self.lines.lock().unwrap();
            let release = lines.iter().rposition(|l| l.starts_with("Release: "))?;
            (lines.len() > release + 1).then_some(lines.len())
        })
        .await
    }

    /// Waits for the deploy to end.
    pub async fn finish(mut self, secs: u64) -> Deployed {
        let status = tokio::time::timeout(Duration::from_secs(secs), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("rack deploy ends within {secs} s"))
            .unwrap();
        self.reader.await.unwrap();
        let stderr = self.stderr.await.unwrap();
        let lines = self.lines.lock().unwrap().clone();
        Deployed {
            success: status.success(),
            lines,
            stderr,
            took: self.started.elapsed(),
        }
    }
}

impl Deployed {
    /// The deploy succeeded although its log was cut after `before` lines: the CLI said it
    /// resumed, more lines came, the rollout ended `OK`, and what it showed of the rollout is
    /// exactly the deployment's log as the rack keeps it (`log`): no line lost, none twice.
    pub fn assert_resumed(&self, before: usize, log: &[String]) {
        let stdout = self.lines.join("\n");
        let stderr = &self.stderr;
        assert!(self.success, "rack deploy failed:\n{stdout}\n{stderr}");
        assert!(
            stderr.contains("(the rollout log was cut off; resuming it)"),
            "the CLI resumed the log:\n{stderr}"
        );
        assert!(stderr.trim_end().ends_with("OK"), "the rollout ended OK:\n{stderr}");
        assert!(self.lines.len() > before, "lines came after the cut:\n{stdout}");
        let release = self
            .lines
            .iter()
            .rposition(|l| l.starts_with("Release: "))
            .expect("the build's Release line");
        let shown = &self.lines[release + 1..];
        // The rack's copy ends with the outcome, which the CLI keeps back.
        assert_eq!(log.last().map(String::as_str), Some("OK"), "{log:?}");
        assert_eq!(shown, &log[..log.len() - 1], "the CLI showed the rollout's log as kept");
    }
}

/// The whole log of `app`'s latest deployment, line by line, as the rack at `base`
/// (`http://host:port`, with `password`) keeps it.
pub async fn deployment_log(base: &str, password: &str, app: &str) -> Vec<String> {
    let client = reqwest::Client::new();
    let get = |path: String| {
        client
            .get(format!("{base}{path}"))
            .basic_auth("rack", Some(password))
            .timeout(Duration::from_secs(30))
    };
    let list: serde_json::Value = get(format!("/apps/{app}/deployments"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = list[0]["id"].as_str().expect("a deployment").to_owned();
    let text = get(format!("/apps/{app}/deployments/{id}/events"))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_rollout_log_resumes_on_another_replica_when_the_one_serving_it_stops() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut first = Replica::start(&database, data.path(), &[]).await;
    let second = Replica::start(&database, data.path(), &[]).await;
    create_app(&first, "myapp").await;

    // A load balancer in front: the first replica while it is up, then the second.
    let first_up = Arc::new(AtomicBool::new(true));
    let upstream = |replica: &Replica| Upstream::Tcp(replica.base().trim_start_matches("http://").parse().unwrap());
    let (to_first, to_second) = (upstream(&first), upstream(&second));
    let up = first_up.clone();
    let front = Forward::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move || {
            let pick = if up.load(Ordering::SeqCst) {
                to_first.clone()
            } else {
                to_second.clone()
            };
            Box::pin(async move { Some(pick) })
        }),
    )
    .await;

    // Each process takes 4 s to become healthy: the rollout is still going when the cut comes.
    let dir = tempfile::tempdir().unwrap();
    let manifest = "services:\n  worker:\n    command: sleep 600\n    scale: 2\n    health:\n      grace: 4\n";
    std::fs::write(dir.path().join("convox.yml"), manifest).unwrap();
    let url = format!("http://:{PASSWORD}@{}", front.addr);
    let deploy = BackgroundDeploy::start(&url, dir.path(), "myapp");
    let before = deploy.rollout_begun(90).await;
    assert_eq!(
        front.busiest(),
        Some(upstream(&first)),
        "the first replica serves the log"
    );
    let cut = Instant::now();
    first_up.store(false, Ordering::SeqCst);
    first.sigterm().await;

    let deployed = deploy.finish(120).await;
    deployed.assert_resumed(before, &deployment_log(second.base(), PASSWORD, "myapp").await);
    assert!(
        front.served_after(&upstream(&second), cut),
        "the second replica served the rest"
    );
    let app = second.json("/apps/myapp").await;
    assert_eq!(app["status"], "running", "{app}");
}
