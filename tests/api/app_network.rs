//! Apps off the API's loopback (security round 2, finding 3): the sandboxed processes of an
//! app are in a network namespace of their own, so a process of app `attacker` (its build
//! command, its service instance through `exec`, and a one-off `run`) cannot connect to rack's API, rack's Postgres,
//! nor to app `victim`'s instance or router on 127.0.0.1, while its own router traffic, health
//! checks, resources (postgres and redis, through the forwarder), `run` and `exec` work, and its
//! own processes reach one another. Deleting the app removes the namespace.

use reqwest::Method;
use serde_json::Value;

use crate::deploys::{MANIFEST, SERVER, through_router};
use crate::helpers::{TestApp, wait_for};
use crate::resources::{NOTES, ResourceServers, notes};

/// Tries to connect to each port of 127.0.0.1 given (`own` is `$PORT`); prints
/// `<tag> <port> reached|refused` for each.
const PROBE: &str = r#"tag=$1; shift
for port in "$@"; do
  [ "$port" = own ] && port=$PORT
  if timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
    echo "$tag $port reached"
  else
    echo "$tag $port refused"
  fi
done
echo "$tag done"
"#;

/// The attacker: the fixture server on a port, linking a postgres and a redis resource; its
/// build command probes the ports after `probe.sh build` (the test adds them).
const ATTACKER: &str = "resources:
  database:
    type: postgres
  cache:
    type: redis
    options:
      memory: 32
services:
  web:
    build:
      command: sh probe.sh build PORTS
    command: python3 -u server.py
    port: 3000
    health:
      path: /health
      grace: 1
      interval: 2
    resources:
      - database
      - cache
";

/// The port of the first running process of `web` of `name`, and its pid.
async fn web_instance(app: &TestApp, name: &str) -> (String, u16, u32) {
    wait_for(60, "the web process", || async {
        let processes: Value = app.get_json(&format!("/apps/{name}/processes")).await;
        processes.as_array()?.iter().find_map(|p| {
            (p["name"] == "web" && p["status"] == "running").then(|| {
                (
                    p["id"].as_str().unwrap().to_owned(),
                    p["ports"][0].as_str().unwrap().parse().unwrap(),
                    u32::try_from(p["pid"].as_u64().unwrap()).unwrap(),
                )
            })
        })
    })
    .await
}

/// The network namespace of process `pid` (`net:[4026532…]`).
fn namespace_of(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

/// Whether any process is in the namespace `namespace`.
fn anyone_in(namespace: &std::path::Path) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .any(|entry| std::fs::read_link(entry.path().join("ns/net")).is_ok_and(|ns| ns == namespace))
}

#[tokio::test]
async fn an_apps_processes_reach_neither_the_api_nor_another_app_on_loopback() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: app networks need rack to run as root (as CI does)");
        return;
    }
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    let api = app.addr.port();
    let database = reqwest::Url::parse(&app.database_url()).unwrap().port().unwrap();

    assert_eq!(app.create_app("victim").await.status(), 201);
    app.deploy_files("victim", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let (_, victim, _) = web_instance(&app, "victim").await;
    let victim_router: Value = app.get_json("/apps/victim").await;
    let victim_router: std::net::SocketAddr = victim_router["router"].as_str().unwrap().parse().unwrap();
    // rack itself reaches the victim (and its router) on the host's loopback.
    assert!(through_router(&app, "victim").await.contains(' '));

    assert_eq!(app.create_app("attacker").await.status(), 201);
    let manifest = ATTACKER.replace("PORTS", &format!("{api} {victim}"));
    let files = [
        ("convox.yml", manifest.as_str()),
        ("server.py", SERVER),
        ("probe.sh", PROBE),
        ("notes.sh", NOTES),
    ];
    // Its build command reached neither.
    let id = app.build_source("attacker", &files).await;
    let build = app.wait_build("attacker", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let log = app.get_plain(&format!("/apps/attacker/builds/{id}/logs")).await;
    assert!(log.contains("build done"), "{log}");
    for port in [api, victim] {
        assert!(log.contains(&format!("build {port} refused")), "port {port}: {log}");
    }
    // Its rollout ends OK: the health checks reached the instance inside its network.
    let release = build["release"].as_str().unwrap().to_owned();
    let rollout = crate::deploys::promote_follow(&app, "attacker", &release).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    // The router reaches it too.
    let answer = through_router(&app, "attacker").await;
    assert!(answer.starts_with(&release), "{answer}");
    let (id, own, pid) = web_instance(&app, "attacker").await;
    let namespace = namespace_of(pid).expect("the instance's namespace");
    assert_ne!(Some(&namespace), namespace_of(std::process::id()).as_ref());

    // exec in the instance: its own port answers, nothing of the host's loopback does.
    let targets = [api, database, victim, victim_router.port()];
    let command = format!("sh probe.sh exec own {}", targets.map(|p| p.to_string()).join(" "));
    let (output, code) = crate::run::exec_output(
        &app,
        &format!("/apps/attacker/processes/{id}/exec"),
        &[("command", &command)],
    )
    .await;
    let output = output.replace("\r\n", "\n");
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("exec done"), "{output}");
    assert!(output.contains(&format!("exec {own} reached")), "{output}");
    for port in targets {
        assert!(
            output.contains(&format!("exec {port} refused")),
            "port {port}: {output}"
        );
    }

    // Its resources are where its variables say, through the forwarder.
    notes(&app, "attacker", "write one").await;
    assert_eq!(notes(&app, "attacker", "read").await, "pg=one\nredis=one\n");

    // A one-off (`rack run`) shares the app's network: it reaches the app's instance, and
    // nothing of the host's.
    let run: Value = app
        .json(Method::POST, "/apps/attacker/services/web/processes")
        .header("command", format!("sh probe.sh run {own} {api} {victim}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = run["id"].as_str().expect("a one-off").to_owned();
    let log = wait_for(120, "the one-off's probe", || async {
        let log = app.app_log("attacker").await;
        log.contains("run done").then_some(log)
    })
    .await;
    assert!(log.contains(&format!("run {own} reached")), "{log}");
    for port in [api, victim] {
        assert!(log.contains(&format!("run {port} refused")), "port {port}: {log}");
    }
    let exited: Value = app.get_json(&format!("/apps/attacker/processes/{run}")).await;
    assert_ne!(exited["status"], "failed", "{exited}");

    // The victim still answers, and the attacker's namespace goes with the app.
    assert!(through_router(&app, "victim").await.contains(' '));
    assert_eq!(app.delete_app("attacker").await.status(), 200);
    wait_for(60, "the attacker's network namespace to go", || async {
        (!anyone_in(&namespace)).then_some(())
    })
    .await;
}
