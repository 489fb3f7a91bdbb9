//! Several real `rack server` processes on one Postgres: cross-replica streams, the deploy
//! lock under a promote storm, and jobs taken over after `kill -9` or handed back on SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{PASSWORD, fresh_database, send_json, source_tarball, wait_for};

/// A `rack server` child process.
pub struct Replica {
    child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
}

impl Replica {
    /// Starts a server on `database` with the shared `data` directory (objects and builds are
    /// shared, as S3 and a shared volume would be in production).
    pub async fn start(database: &str, data: &Path, env: &[(&str, &str)]) -> Self {
        let mut all = vec![("DATABASE_URL", database)];
        all.extend_from_slice(env);
        Self::launch(data, &all).await
    }

    /// Starts a server on the embedded default: its own Postgres cluster in `data`.
    pub async fn start_embedded(data: &Path) -> Self {
        Self::launch(data, &[]).await
    }

    async fn launch(data: &Path, env: &[(&str, &str)]) -> Self {
        rack::tls::install_provider();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"));
        command
            .arg("server")
            .env("RACK_BIND", format!("127.0.0.1:{port}"))
            .env("RACK_PASSWORD", PASSWORD)
            .env("RACK_DATA", data)
            .env("RACK_JOB_LEASE", "3")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("starting rack server");
        let mut replica = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // A server that exited will never answer: fail now, with its status.
            if let Some(status) = replica.child.try_wait().unwrap() {
                panic!("rack server exited while starting: {status} (its errors are above)");
            }
            let answer = replica.request(Method::GET, "/system").send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return replica;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its address, `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .basic_auth("convox", Some(PASSWORD))
            .header("accept", "application/json")
    }

    pub async fn json(&self, path: &str) -> Value {
        send_json(self.request(Method::GET, path)).await
    }

    pub async fn kill_9(&mut self) {
        self.child.kill().await.unwrap();
    }

    pub async fn sigterm(&mut self) {
        let pid = self.child.id().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "a SIGTERM stops the server cleanly: {status}");
    }

    /// Uploads a source and queues a build of it; returns the build id.
    pub async fn build(&self, app: &str, files: &[(&str, &str)]) -> String {
        let key = format!("src/{}.tgz", uuid::Uuid::new_v4().simple());
        let upload = self
            .request(Method::POST, &format!("/apps/{app}/objects/{key}"))
            .body(source_tarball(files))
            .send()
            .await
            .unwrap();
        assert_eq!(upload.status(), 200);
        let queue = self.request(Method::POST, &format!("/apps/{app}/builds"));
        let build = send_json(queue.form(&[("url", format!("object://{app}/{key}"))])).await;
        build["id"].as_str().unwrap().to_owned()
    }

    pub async fn wait_build(&self, app: &str, id: &str) -> Value {
        wait_for(90, "the build to end", || async {
            let b = self
                .request(Method::GET, &format!("/apps/{app}/builds/{id}"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()?;
            matches!(b["status"].as_str(), Some("complete" | "failed")).then_some(b)
        })
        .await
    }
}

pub async fn create_app(replica: &Replica, name: &str) {
    let response = replica
        .request(Method::POST, "/apps")
        .form(&[("name", name)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

/// A build that waits for a file `gate` in its build directory (its `HOME`: the only host
/// directory its sandbox sees).
const GATED_BUILD: &str = "services:\n  web:\n    build:\n      command: echo started; while [ ! -e $HOME/gate ]; do sleep 0.05; done; echo finished\n";

/// Opens the gate of build `id` of `app` in `data` (again and again until `done` says the build
/// is over: a build that starts over clears its directory, and the gate with it).
async fn open_gate_until<T, F, Fut>(data: &Path, app: &str, id: &str, done: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let gate = data.join("builds").join(app).join(id).join("gate");
    wait_for(60, "the gated build to finish", || {
        // The directory may not exist yet, or be in the middle of being cleared.
        let _ = std::fs::write(&gate, "");
        done()
    })
    .await
}

#[tokio::test]
async fn a_stream_on_one_replica_shows_a_build_running_on_another() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let worker = Replica::start(&database, data.path(), &[]).await;
    let watcher = Replica::start(&database, data.path(), &[("RACK_BUILD_WORKERS", "0")]).await;
    create_app(&worker, "myapp").await;
    let id = watcher.build("myapp", &[("convox.yml", GATED_BUILD)]).await;
    let log = watcher
        .request(Method::GET, &format!("/apps/myapp/builds/{id}/logs"))
        .header("accept", "text/plain");
    let reading = tokio::spawn(async move { log.send().await.unwrap().text().await.unwrap() });
    wait_for(30, "the build to start on the worker replica", || async {
        let b = worker.json(&format!("/apps/myapp/builds/{id}")).await;
        (b["status"] == "running").then_some(())
    })
    .await;
    open_gate_until(data.path(), "myapp", &id, || async {
        reading.is_finished().then_some(())
    })
    .await;
    let text = reading.await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let started = lines.iter().position(|l| *l == "started").expect("started");
    let finished = lines.iter().position(|l| *l == "finished").expect("finished");
    assert!(started < finished, "{text}");
    assert_eq!(lines.last(), Some(&"OK"), "{text}");
}

#[tokio::test]
async fn a_hundred_concurrent_promotes_across_replicas_start_exactly_one_deployment() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let a = Replica::start(&database, data.path(), &[]).await;
    let b = Replica::start(&database, data.path(), &[]).await;
    create_app(&a, "myapp").await;
    // Ready only after 5 s: the deployment is still in progress while the promotes arrive.
    let manifest = "services:\n  worker:\n    command: sleep 600\n    health:\n      grace: 5\n";
    let id = a.build("myapp", &[("convox.yml", manifest)]).await;
    let build = a.wait_build("myapp", &id).await;
    let release = build["release"].as_str().unwrap().to_owned();
    let promotes = (0..100).map(|n| {
        let replica = if n % 2 == 0 { &a } else { &b };
        replica
            .request(Method::POST, &format!("/apps/myapp/releases/{release}/promote"))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(promotes)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 99, "{statuses:?}");
    let deployments = wait_for(60, "the one deployment to end", || async {
        let list = b.json("/apps/myapp/deployments").await;
        let list = list.as_array()?.clone();
        list.iter().all(|d| d["ended"].is_string()).then_some(list)
    })
    .await;
    assert_eq!(deployments.len(), 1);
    assert_eq!(deployments[0]["state"], "running");
}

#[tokio::test]
async fn a_build_on_a_killed_replica_fails_as_interrupted_on_another() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut doomed = Replica::start(&database, data.path(), &[]).await;
    create_app(&doomed, "myapp").await;
    let id = doomed.build("myapp", &[("convox.yml", GATED_BUILD)]).await;
    wait_for(30, "the build to run", || async {
        let b = doomed.json(&format!("/apps/myapp/builds/{id}")).await;
        (b["status"] == "running").then_some(())
    })
    .await;
    doomed.kill_9().await;
    let survivor = Replica::start(&database, data.path(), &[]).await;
    let build = survivor.wait_build("myapp", &id).await;
    assert_eq!(build["status"], "failed");
    assert!(build["reason"].as_str().unwrap().starts_with("interrupted"), "{build}");
}

#[tokio::test]
async fn sigterm_hands_a_running_build_back_to_another_replica() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut leaving = Replica::start(&database, data.path(), &[]).await;
    create_app(&leaving, "myapp").await;
    let id = leaving.build("myapp", &[("convox.yml", GATED_BUILD)]).await;
    wait_for(30, "the build to run", || async {
        let b = leaving.json(&format!("/apps/myapp/builds/{id}")).await;
        (b["status"] == "running").then_some(())
    })
    .await;
    leaving.sigterm().await;
    let staying = Replica::start(&database, data.path(), &[]).await;
    let build = open_gate_until(data.path(), "myapp", &id, || async {
        let b = staying.json(&format!("/apps/myapp/builds/{id}")).await;
        matches!(b["status"].as_str(), Some("complete" | "failed")).then_some(b)
    })
    .await;
    assert_eq!(build["status"], "complete", "{build}");
}

#[tokio::test]
async fn a_deployment_on_a_killed_replica_is_finished_by_another() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut doomed = Replica::start(&database, data.path(), &[]).await;
    create_app(&doomed, "myapp").await;
    // Healthy only after its grace period: the deployment is still Updating when the replica dies.
    let manifest = "services:\n  worker:\n    command: sleep 600\n    health:\n      grace: 4\n";
    let id = doomed.build("myapp", &[("convox.yml", manifest)]).await;
    let release = doomed.wait_build("myapp", &id).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = doomed
        .request(Method::POST, &format!("/apps/myapp/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    wait_for(30, "the deployment to be updating", || async {
        let d = doomed.json(&location).await;
        (d["state"] == "updating").then_some(())
    })
    .await;
    doomed.kill_9().await;
    let survivor = Replica::start(&database, data.path(), &[]).await;
    let deployment = wait_for(90, "the deployment to end", || async {
        let d = survivor.json(&location).await;
        d["ended"].is_string().then_some(d)
    })
    .await;
    assert_eq!(deployment["state"], "running", "{deployment}");
    let app = survivor.json("/apps/myapp").await;
    assert_eq!(
        (app["status"].as_str(), app["release"].as_str()),
        (Some("running"), Some(release.as_str()))
    );
    let processes = survivor.json("/apps/myapp/processes").await;
    assert_eq!(processes.as_array().map(Vec::len), Some(1), "{processes}");
}
