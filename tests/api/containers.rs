//! Containers on one host: convox apps as convox users write them (a Dockerfile and a convox.yml
//! with `build: .` and a port, nothing rack-specific) built with podman and run as containers
//! behind the app's router, with real podman and real images. No registry is reachable here:
//! the apps' base image is made once per machine, `FROM scratch` with Debian's busybox-static.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::deploys::{promote_follow, through_router};
use crate::helpers::{TestApp, processes_with_arg, status_text, wait_for};

/// The base image of the test apps (busybox: `sh` and an `httpd`).
pub const BASE: &str = "localhost/rack-test-busybox:1";

static BASE_IMAGE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// rack's podman, as a server on `data` would run it.
pub fn podman(data: &std::path::Path) -> rack::runtime::local::podman::Podman {
    rack::runtime::local::podman::Podman::detect(data, "rack")
        .expect("writing the podman configuration")
        .expect("podman is installed (scripts/install-deps installs it)")
}

/// Removes the containers a test's rack left (they outlive it by design) when the test ends.
pub struct Leftovers(rack::runtime::local::podman::Podman);

impl Leftovers {
    pub fn of(app: &TestApp) -> Self {
        Self::at(&app.state.config.data_dir)
    }

    pub fn at(data: &std::path::Path) -> Self {
        Self(podman(data))
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let label = format!("label=rack.host={}", self.0.host);
        let Ok(out) = self
            .0
            .std_command()
            .args(["ps", "--all", "--quiet", "--filter", &label])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = self
                .0
                .std_command()
                .args(["rm", "--force", "--time", "0"])
                .args(&ids)
                .output();
        }
        // And the images it built: they would pile up run after run, and every podman command
        // takes longer the more images the store holds (seconds each at a few hundred, which
        // made builds time out under load).
        let Ok(out) = self
            .0
            .std_command()
            .args(["images", "--quiet", "--filter", &label])
            .output()
        else {
            return;
        };
        let images: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !images.is_empty() {
            let _ = self.0.std_command().args(["rmi", "--force"]).args(&images).output();
        }
    }
}

/// Makes the base image once per machine.
pub async fn base_image() {
    BASE_IMAGE
        .get_or_init(|| async {
            let dir = tempfile::tempdir().unwrap();
            let podman = podman(dir.path());
            if podman.image_exists(BASE).await {
                return;
            }
            let context = dir.path().join("base");
            std::fs::create_dir(&context).unwrap();
            std::fs::copy("/bin/busybox", context.join("busybox"))
                .expect("/bin/busybox (Debian's busybox-static; scripts/install-deps installs it)");
            std::fs::write(
                context.join("Dockerfile"),
                "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
            )
            .unwrap();
            let context = context.to_string_lossy().into_owned();
            podman
                // No network: the RUN step needs none, and podman as root would put its bridge on an interface.
                .output(&["build", "--network", "none", "--tag", BASE, &context])
                .await
                .expect("building the base image");
        })
        .await;
}

/// A convox app: busybox httpd serving `www/` on port 3000, the build arguments it was given
/// written into files it serves.
pub fn convox_app(version: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "convox.yml",
            "services:\n  web:\n    build: .\n    port: 3000\n    health: /health\n".to_owned(),
        ),
        (
            "Dockerfile",
            format!(
                "FROM {BASE}\nARG GREETING=unset\nARG APP\nARG RELEASE\nARG SERVICE\nCOPY . /app\n\
                 RUN echo \"$GREETING\" > /app/www/greeting && echo \"$APP $SERVICE $RELEASE\" > /app/www/args\n\
                 WORKDIR /app\nCMD [\"httpd\", \"-f\", \"-v\", \"-p\", \"3000\", \"-h\", \"/app/www\"]\n"
            ),
        ),
        (".dockerignore", "secret.txt\n".to_owned()),
        ("secret.txt", "not for the image\n".to_owned()),
        ("www/index.html", format!("{version}\n")),
        ("www/health", "ok\n".to_owned()),
    ]
}

pub fn as_files<'a>(files: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    files.iter().map(|(p, c)| (*p, c.as_str())).collect()
}

/// Builds `files` as `app`, which must succeed (a failure shows the build's log, not a 404 of
/// the release it never made); returns the build.
async fn build(app: &TestApp, name: &str, files: &[(&'static str, String)]) -> Value {
    let id = app.build_source(name, &as_files(files)).await;
    let build = app.wait_build(name, &id).await;
    if build["status"] != "complete" {
        panic!("build {id} of {name}: {build}\n{}", app.build_log(name, &id).await);
    }
    build
}

/// A GET through the app's router.
async fn get(app: &TestApp, name: &str, path: &str) -> (u16, String) {
    let router = app.get_json::<Value>(&format!("/apps/{name}")).await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = reqwest::get(format!("http://{router}{path}")).await.unwrap();
    status_text(response).await
}

/// The ids of this test's containers of `app` (as podman lists them).
async fn containers(app: &TestApp, name: &str) -> Vec<String> {
    let podman = podman(&app.state.config.data_dir);
    let mut ids: Vec<String> = podman.list(name).await.unwrap().into_iter().map(|c| c.id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_convox_app_builds_from_its_dockerfile_and_serves_through_its_router() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    assert_eq!(app.create_app("hello").await.status(), 201);
    // The app's environment gives the Dockerfile's declared ARGs their values.
    let env = app
        .json(Method::POST, "/apps/hello/releases")
        .form(&[("env", "GREETING=bonjour\nUNDECLARED=x")])
        .send()
        .await
        .unwrap();
    assert_eq!(env.status(), 201);
    let build = build(&app, "hello", &convox_app("v1")).await;
    assert_eq!(build["status"], "complete", "{build}");
    let id = build["id"].as_str().unwrap();
    let release = build["release"].as_str().unwrap();
    let log = app.build_log("hello", id).await;
    assert!(log.contains(&format!("Building image rack/hello:web.{id}")), "{log}");
    assert!(log.contains("COMMIT"), "{log}");

    let rollout = promote_follow(&app, "hello", release).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(through_router(&app, "hello").await, "v1\n");
    assert_eq!(get(&app, "hello", "/greeting").await, (200, "bonjour\n".to_owned()));
    assert_eq!(
        get(&app, "hello", "/args").await,
        (200, format!("hello web {release}\n"))
    );
    assert_eq!(
        get(&app, "hello", "/secret.txt").await.0,
        404,
        ".dockerignore is honoured"
    );

    let processes: Vec<Value> = app.get_json("/apps/hello/processes").await;
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(processes[0]["image"], format!("rack/hello:web.{id}"));
    assert_eq!(processes[0]["status"], "running");
    // The container carries rack's labels and the release's environment.
    let podman = podman(&app.state.config.data_dir);
    let ids = containers(&app, "hello").await;
    assert_eq!(ids.len(), 1);
    let labels = podman
        .output(&["inspect", "--format", "{{json .Config.Labels}}", &ids[0]])
        .await
        .unwrap();
    let labels: Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["rack.app"], "hello");
    assert_eq!(labels["rack.service"], "web");
    assert_eq!(labels["rack.release"], release);
    assert_eq!(labels["rack.build"], id);
    assert_eq!(labels["rack.process"], processes[0]["id"]);
    let env = podman
        .output(&["inspect", "--format", "{{json .Config.Env}}", &ids[0]])
        .await
        .unwrap();
    for wanted in ["PORT=3000", "APP=hello", "SERVICE=web", "RACK=rack", "GREETING=bonjour"] {
        assert!(env.contains(wanted), "{wanted} missing in {env}");
    }
    assert!(env.contains(&format!("RELEASE={release}")), "{env}");

    // Deleting the app removes its containers.
    assert_eq!(app.delete_app("hello").await.status(), 200);
    wait_for(30, "the containers to go", || async {
        containers(&app, "hello").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_failing_run_step_fails_the_build_with_its_output() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("broken").await;
    let mut files = convox_app("v1");
    files[1].1 = format!("FROM {BASE}\nRUN echo the step says boom && false\n");
    let id = app.build_source("broken", &as_files(&files)).await;
    let build = app.wait_build("broken", &id).await;
    assert_eq!(build["status"], "failed");
    let reason = build["reason"].as_str().unwrap();
    assert!(reason.contains("service web: the image build failed"), "{reason}");
    let log = app.build_log("broken", build["id"].as_str().unwrap()).await;
    assert!(log.contains("the step says boom"), "{log}");
    assert!(log.ends_with(&format!("ERROR: {reason}\n")), "{log}");
}

#[tokio::test]
async fn a_rolling_update_of_two_containers_loses_no_request() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("rolling").await;
    let with_two = |version: &str| {
        let mut files = convox_app(version);
        files[0].1 =
            "services:\n  web:\n    build: .\n    port: 3000\n    health: /health\n    scale:\n      count: 2\n"
                .to_owned();
        files
    };
    let first = build(&app, "rolling", &with_two("v1")).await;
    promote_follow(&app, "rolling", first["release"].as_str().unwrap()).await;
    let second = build(&app, "rolling", &with_two("v2")).await;

    let router = app.get_json::<Value>("/apps/rolling").await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(format!("http://{router}/")).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        answers.push(r.text().await.unwrap_or_default());
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            answers
        })
    };
    let rollout = promote_follow(&app, "rolling", second["release"].as_str().unwrap()).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    stop.store(true, Ordering::SeqCst);
    let answers = traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests during the rollout");
    assert!(ok.load(Ordering::SeqCst) > 10);
    assert_eq!(answers.last().map(String::as_str), Some("v2\n"));
    let processes: Vec<Value> = app.get_json("/apps/rolling/processes").await;
    assert_eq!(processes.len(), 2);
    assert!(processes.iter().all(|p| p["release"] == second["release"]));
    // The old containers are removed after the rollout said OK, in the background.
    wait_for(60, "the old containers to be removed", || async {
        (containers(&app, "rolling").await.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_release_whose_container_exits_at_once_rolls_back() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("crashy").await;
    let good = build(&app, "crashy", &convox_app("v1")).await;
    promote_follow(&app, "crashy", good["release"].as_str().unwrap()).await;
    let mut files = convox_app("v2");
    files[1].1 = format!("FROM {BASE}\nCMD [\"false\"]\n");
    let bad = build(&app, "crashy", &files).await;
    let rollout = promote_follow(&app, "crashy", bad["release"].as_str().unwrap()).await;
    assert!(rollout.contains("Status: Rollback => Reverted"), "{rollout}");
    assert!(rollout.ends_with(&format!("{}\n", rollout.lines().last().unwrap())));
    assert!(rollout.lines().last().unwrap().starts_with("ERROR: "), "{rollout}");
    assert_eq!(through_router(&app, "crashy").await, "v1\n");
    let info = app.get_json::<Value>("/apps/crashy").await;
    assert_eq!(info["release"], good["release"]);
}

#[tokio::test]
async fn containers_show_in_ps_scale_restart_and_log() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("ops").await;
    let build = build(&app, "ops", &convox_app("v1")).await;
    promote_follow(&app, "ops", build["release"].as_str().unwrap()).await;
    // A request shows in the app's log (httpd -v), as the container's output.
    assert_eq!(get(&app, "ops", "/").await.0, 200);
    let processes: Vec<Value> = app.get_json("/apps/ops/processes").await;
    let pid = processes[0]["id"].as_str().unwrap().to_owned();
    app.wait_for_log_line("ops", &format!("service/web/{pid}"), 30).await;

    // scale
    let log = app.scale_follow("ops", "web", 2).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert_eq!(containers(&app, "ops").await.len(), 2);

    // restart one: a new container under the same process id
    let before = containers(&app, "ops").await;
    let restart = app
        .convox(Method::DELETE, &format!("/apps/ops/processes/{pid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 200);
    wait_for(30, "the restarted container to serve", || async {
        let now = containers(&app, "ops").await;
        let processes: Vec<Value> = app.get_json("/apps/ops/processes").await;
        let running = processes.iter().filter(|p| p["status"] == "running").count();
        (now.len() == 2 && now != before && running == 2).then_some(())
    })
    .await;
    assert_eq!(through_router(&app, "ops").await, "v1\n");
}

#[tokio::test]
async fn a_service_with_an_image_runs_it_and_a_missing_image_fails_the_deployment() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("imaged").await;
    let manifest = format!(
        "services:\n  web:\n    image: {BASE}\n    command: sh -c \"mkdir -p /www && echo from-image > /www/index.html && exec httpd -f -p 3000 -h /www\"\n    port: 3000\n"
    );
    let built = build(&app, "imaged", &[("convox.yml", manifest)]).await;
    assert_eq!(built["status"], "complete", "{built}");
    let rollout = promote_follow(&app, "imaged", built["release"].as_str().unwrap()).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(through_router(&app, "imaged").await, "from-image\n");

    let missing = "services:\n  web:\n    image: localhost/rack-no-such-image:1\n    port: 3000\n";
    let built = build(&app, "imaged", &[("convox.yml", missing.to_owned())]).await;
    let rollout = promote_follow(&app, "imaged", built["release"].as_str().unwrap()).await;
    assert!(
        rollout.contains("pulling image localhost/rack-no-such-image:1"),
        "{rollout}"
    );
    assert!(rollout.contains("Status: Rollback => Reverted"), "{rollout}");
    assert_eq!(through_router(&app, "imaged").await, "from-image\n");
}

#[tokio::test]
async fn cancelling_a_long_image_build_stops_it_at_once() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("slow").await;
    let marker = format!("300.{}", std::process::id());
    let mut files = convox_app("v1");
    files[1].1 = format!("FROM {BASE}\nRUN echo building && sleep {marker}\n");
    let id = app.build_source("slow", &as_files(&files)).await;
    wait_for(60, "the RUN step to start", || async {
        (!processes_with_arg(&marker).is_empty()).then_some(())
    })
    .await;
    let cancelled = std::time::Instant::now();
    let response = app
        .convox(Method::POST, &format!("/apps/slow/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let build = app.wait_build("slow", &id).await;
    assert_eq!(build["reason"], "cancelled");
    wait_for(20, "the RUN step's processes to go", || async {
        processes_with_arg(&marker).is_empty().then_some(())
    })
    .await;
    assert!(cancelled.elapsed() < Duration::from_secs(20));
}

/// Containers outlive rack: after `kill -9` and a restart, the new server adopts the containers
/// it finds by label (the same ones, still serving) instead of starting others.
#[tokio::test]
async fn after_kill_9_a_restarted_rack_adopts_its_running_containers() {
    base_image().await;
    let database = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let _leftovers = Leftovers::at(data.path());
    let mut rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    crate::replicas::create_app(&rack, "keeper").await;
    let files = convox_app("v1");
    let id = rack.build("keeper", &as_files(&files)).await;
    let build = rack.wait_build("keeper", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    let promote = rack
        .request(Method::POST, &format!("/apps/keeper/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 201);
    let router = wait_for(60, "the app to run", || async {
        let app = rack.json("/apps/keeper").await;
        (app["status"] == "running" && app["release"] == release.as_str())
            .then(|| app["router"].as_str().map(str::to_owned))
            .flatten()
    })
    .await;
    let answer = || async {
        let r = reqwest::get(format!("http://{router}/")).await.ok()?;
        r.text().await.ok()
    };
    assert_eq!(answer().await.as_deref(), Some("v1\n"));
    let podman = podman(data.path());
    let before: Vec<String> = podman.list("keeper").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(before.len(), 1);

    rack.kill_9().await;
    let listed = podman.list("keeper").await.unwrap();
    assert_eq!(listed[0].state, "running", "the container outlives rack");

    let rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    wait_for(60, "the app to answer through its router again", || async {
        (answer().await.as_deref() == Some("v1\n")).then_some(())
    })
    .await;
    let after: Vec<String> = podman.list("keeper").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(after, before, "the same container, adopted");
    let log = rack
        .request(Method::GET, "/apps/keeper/logs")
        .header("follow", "false")
        .header("since", "0")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("Adopted container"), "{log}");
    let processes = rack.json("/apps/keeper/processes").await;
    assert_eq!(processes.as_array().unwrap().len(), 1, "{processes}");
}

/// A rollout says OK before the old container is gone (it is stopped in the background): a
/// rack killed right after the OK, while that container still takes its grace to stop, leaves
/// nothing behind once it is back: only the new release's container runs, and serves.
#[tokio::test]
async fn a_rack_killed_while_it_stops_an_old_container_leaks_none() {
    base_image().await;
    let database = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let _leftovers = Leftovers::at(data.path());
    let mut rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    crate::replicas::create_app(&rack, "retire").await;
    let podman = podman(data.path());
    let deploy = |files: Vec<(&'static str, String)>| {
        let rack = &rack;
        async move {
            let id = rack.build("retire", &as_files(&files)).await;
            let build = rack.wait_build("retire", &id).await;
            assert_eq!(build["status"], "complete", "{build}");
            let release = build["release"].as_str().unwrap().to_owned();
            let promote = rack
                .request(Method::POST, &format!("/apps/retire/releases/{release}/promote"))
                .send()
                .await
                .unwrap();
            assert_eq!(promote.status(), 201);
            wait_for(60, "the release to run", || async {
                let app = rack.json("/apps/retire").await;
                (app["status"] == "running" && app["release"] == release.as_str()).then_some(())
            })
            .await;
            release
        }
    };
    // v1 ignores SIGTERM (its shell and httpd both): its stop takes the whole grace.
    let mut v1 = convox_app("v1");
    v1[1].1 = v1[1].1.replace(
        "CMD [\"httpd\", \"-f\", \"-v\", \"-p\", \"3000\", \"-h\", \"/app/www\"]",
        "CMD [\"sh\", \"-c\", \"trap '' TERM; exec httpd -f -v -p 3000 -h /app/www\"]",
    );
    assert!(v1[1].1.contains("trap"), "{}", v1[1].1);
    deploy(v1).await;
    let old: Vec<String> = podman.list("retire").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(old.len(), 1);
    deploy(convox_app("v2")).await;
    let listed = podman.list("retire").await.unwrap();
    assert!(
        listed.iter().any(|c| c.id == old[0]),
        "the old container is still stopping when the rollout is done: {listed:?}"
    );
    rack.kill_9().await;

    let rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    let router = wait_for(60, "the app to run again", || async {
        let app = rack.json("/apps/retire").await;
        let router = app["router"].as_str().filter(|r| !r.is_empty()).map(str::to_owned);
        router.filter(|_| app["status"] == "running")
    })
    .await;
    wait_for(90, "only the new release's container to be left", || async {
        let listed = podman.list("retire").await.ok()?;
        (listed.len() == 1 && listed[0].id != old[0]).then_some(())
    })
    .await;
    wait_for(60, "the new release to answer through the router", || async {
        let answer = reqwest::get(format!("http://{router}/"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (answer == "v2\n").then_some(())
    })
    .await;
}

/// The convox example app on the embedded default: through the convox CLI's wire sequence
/// (upload, build, promote, wait for `running`), then through `rack deploy`, answering through
/// its router each time.
#[tokio::test]
async fn a_convox_app_deploys_on_the_embedded_default_through_convox_and_rack_clis() {
    base_image().await;
    let data = crate::helpers::reachable_tempdir();
    let config = rack::config::Config::for_tests(
        data.path().to_path_buf(),
        rack::config::Database::Embedded,
        crate::helpers::PASSWORD,
    );
    let app = TestApp::start(config).await;
    let _leftovers = Leftovers::of(&app);
    assert_eq!(app.create_app("example").await.status(), 201);

    // convox build + convox deploy, as the CLI sends them.
    let tarball = crate::helpers::source_tarball(&as_files(&convox_app("convox")));
    let upload = app
        .convox(Method::POST, "/apps/example/objects/tmp/9f2c1d.tgz?")
        .header("content-type", "application/octet-stream")
        .body(tarball)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let build: Value = app
        .convox(Method::POST, "/apps/example/builds?")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("description=&url=object%3A%2F%2Fexample%2Ftmp%2F9f2c1d.tgz")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let build = app.wait_build("example", build["id"].as_str().unwrap()).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    let promote = app
        .convox(Method::POST, &format!("/apps/example/releases/{release}/promote?"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("force=false")
        .send()
        .await
        .unwrap();
    assert_eq!(status_text(promote).await, (200, "ok\n".to_owned()));
    wait_for(90, "the app to run the release", || async {
        let info: Value = app.get_json("/apps/example").await;
        (info["status"] == "running" && info["release"] == release.as_str()).then_some(())
    })
    .await;
    assert_eq!(through_router(&app, "example").await, "convox\n");

    // rack deploy of the same app, changed.
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in convox_app("rack deploy") {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(["deploy", ".", "-a", "example"])
        .current_dir(dir.path())
        .env(
            "RACK_URL",
            format!("http://convox:{}@{}", crate::helpers::PASSWORD, app.addr),
        )
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), output)
        .await
        .expect("rack deploy finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Status: Updating => Running"), "{stdout}");
    assert_eq!(through_router(&app, "example").await, "rack deploy\n");
    app.stop().await;
}

/// One-off processes and exec work on containers too: a run is a container of the service's
/// image, an exec runs inside a running container (`podman exec`).
#[tokio::test]
async fn runs_and_execs_work_on_containers() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("box").await;
    let built = build(&app, "box", &convox_app("v1")).await;
    promote_follow(&app, "box", built["release"].as_str().unwrap()).await;
    let run: Value = app
        .json(Method::POST, "/apps/box/services/web/processes")
        .header("command", "sleep 3600")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    wait_for(60, "the one-off container to run", || async {
        let p: Value = app.get_json(&format!("/apps/box/processes/{id}")).await;
        (p["status"] == "running").then_some(())
    })
    .await;
    assert_eq!(containers(&app, "box").await.len(), 2);
    let output = crate::run::exec_output(
        &app,
        &format!("/apps/box/processes/{id}/exec"),
        &[("command", "sh -c 'cat /app/www/index.html; exit 5'"), ("tty", "false")],
    )
    .await;
    assert_eq!(output, ("v1\n".to_owned(), Some(5)));
    let processes: Vec<Value> = app.get_json("/apps/box/processes").await;
    let web = processes.iter().find(|p| p["type"] == "service").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tty = crate::run::exec_output(
        &app,
        &format!("/apps/box/processes/{web}/exec"),
        &[("command", "sh -c 'test -t 0 && echo tty; echo $SERVICE'")],
    )
    .await;
    assert!(tty.0.contains("tty") && tty.0.contains("web"), "{tty:?}");
    assert_eq!(tty.1, Some(0));
    // A client that goes away mid-command takes its command with it: `podman exec` alone would
    // leave it running in the container.
    let marker = crate::helpers::unique_sleep_marker();
    let command = format!("sleep {marker}");
    let request = crate::run::exec_request(
        &app,
        &format!("/apps/box/processes/{web}/exec"),
        &[("command", command.as_str()), ("tty", "false")],
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("the handshake");
    wait_for(60, "the exec'd command to run in the container", || async {
        (!processes_with_arg(&marker).is_empty()).then_some(())
    })
    .await;
    drop(socket);
    wait_for(30, "the exec'd command to end with its client", || async {
        processes_with_arg(&marker).is_empty().then_some(())
    })
    .await;
    let stop = app
        .convox(Method::DELETE, &format!("/apps/box/processes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    wait_for(30, "the one-off container to go", || async {
        (containers(&app, "box").await.len() == 1).then_some(())
    })
    .await;
}

/// Containers report their CPU and memory too, from the cgroups podman made for them: a
/// container spinning beside its server uses most of a core, an idle one next to none, and the
/// app's metrics count their memory.
#[tokio::test]
async fn containers_report_their_cpu_and_memory() {
    base_image().await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    app.create_app("spinning").await;
    let serve = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 3000 -h /www";
    let manifest = format!(
        "services:\n  busy:\n    image: {BASE}\n    command: sh -c \"(while :; do :; done) & {serve}\"\n    port: 3000\n  \
         idle:\n    image: {BASE}\n    command: sh -c \"{serve}\"\n    port: 3000\n"
    );
    let built = build(&app, "spinning", &[("convox.yml", manifest)]).await;
    let rollout = promote_follow(&app, "spinning", built["release"].as_str().unwrap()).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    // Two readings at least a second apart make a figure: `ps` shows it once there is one.
    let cpu = |processes: &[Value], service: &str| {
        processes
            .iter()
            .find(|p| p["name"] == service)
            .and_then(|p| p["cpu"].as_f64())
            .unwrap_or(0.0)
    };
    let processes: Vec<Value> = wait_for(60, "the busy container's CPU in ps", || async {
        let processes: Vec<Value> = app.get_json("/apps/spinning/processes").await;
        (cpu(&processes, "busy") > 0.3).then_some(processes)
    })
    .await;
    assert!(cpu(&processes, "idle") < 0.1, "{processes:?}");
    let metrics: Vec<Value> = app
        .convox(Method::GET, "/apps/spinning/services/idle/metrics")
        .query(&[("metrics", "memory")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let memory = metrics[0]["values"]
        .as_array()
        .and_then(|v| v.last())
        .map(|v| v["sum"].as_f64().unwrap_or(0.0));
    assert!(memory.is_some_and(|m| m > 0.0), "{metrics:?}");
}
