//! The local runtime's sandbox, tried as an attacker with a deploy token would: a build command
//! and an app process of a real `rack server` (with its password in its environment) look for
//! rack's secrets, its data and other apps' sources, and find none of them.

use std::time::Duration;

use reqwest::Method;

use crate::helpers::{PASSWORD, fresh_database, reachable_tempdir, wait_for};
use crate::replicas::{Replica, create_app};

/// Prints what a sandboxed command can learn; each probe prints a verdict line.
fn probe(data: &std::path::Path) -> String {
    let data = data.display();
    [
        "echo uid=$(id -u)".to_owned(),
        // The original exploit: rack's environment through the parent's /proc entry.
        r"tr '\0' '\n' < /proc/$PPID/environ | grep RACK_ || echo parent-environ-clean".to_owned(),
        r"for f in /proc/[0-9]*/environ; do tr '\0' '\n' < $f; echo; done | grep -c RACK_ | sed 's/^/environ-rack-lines=/'"
            .to_owned(),
        format!("cat {data}/password 2>/dev/null && echo READ-PASSWORD || echo no-password"),
        format!("ls {data}/builds/other 2>/dev/null && echo READ-OTHER-APP || echo no-other-app"),
        format!("ls {data}/objects 2>/dev/null && echo READ-OBJECTS || echo no-objects"),
        "echo probe-done".to_owned(),
    ]
    .join("; ")
}

fn assert_contained(output: &str) {
    // The build log repeats the command itself (`Running: …`): only what it printed counts.
    let output: String = output
        .lines()
        .filter(|line| !line.contains("Running: "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(output.contains("probe-done"), "{output}");
    for leak in [PASSWORD, "RACK_PASSWORD", "DATABASE_URL", "READ-"] {
        assert!(!output.contains(leak), "the sandbox leaked {leak:?}:\n{output}");
    }
    for verdict in [
        "parent-environ-clean",
        "environ-rack-lines=0",
        "no-password",
        "no-other-app",
        "no-objects",
    ] {
        assert!(output.contains(verdict), "{verdict} missing:\n{output}");
    }
    if nix::unistd::geteuid().is_root() {
        assert!(!output.contains("uid=0"), "a sandboxed command ran as root:\n{output}");
    }
}

#[tokio::test]
async fn builds_and_app_processes_cannot_reach_racks_secrets() {
    let database = fresh_database().await;
    let data = reachable_tempdir();
    // A password file as the embedded default keeps one (this server's comes from its env).
    std::fs::write(data.path().join("password"), PASSWORD).unwrap();
    let rack = Replica::start(&database, data.path(), &[]).await;

    create_app(&rack, "other").await;
    let other = rack
        .build(
            "other",
            &[("convox.yml", "services:\n  web:\n    build:\n      command: echo hi\n")],
        )
        .await;
    assert_eq!(rack.wait_build("other", &other).await["status"], "complete");

    create_app(&rack, "spy").await;
    let manifest = format!(
        "services:\n  web:\n    build:\n      command: \"{build}\"\n    command: \"{run}; sleep 600\"\n    health:\n      grace: 0\n",
        build = probe(data.path()).replace('\\', "\\\\").replace('"', "\\\""),
        run = probe(data.path()).replace('\\', "\\\\").replace('"', "\\\""),
    );
    let id = rack.build("spy", &[("convox.yml", &manifest)]).await;
    let build = rack.wait_build("spy", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let log = rack
        .request(Method::GET, &format!("/apps/spy/builds/{id}/logs"))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_contained(&log);

    let release = build["release"].as_str().unwrap();
    let promote = rack
        .request(Method::POST, &format!("/apps/spy/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 201);
    let output = wait_for(60, "the app process's probe", || async {
        let text = rack
            .request(Method::GET, "/apps/spy/logs")
            .header("follow", "false")
            .header("since", "0")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("probe-done").then_some(text)
    })
    .await;
    assert_contained(&output);
}
