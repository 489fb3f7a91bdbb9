//! The systemd unit in dist/: `systemd-analyze verify` accepts it (when systemd-analyze is
//! installed), and its `ExecStart` line, with its `Environment`, starts a rack that answers and
//! stops cleanly on SIGTERM (what systemd sends).

use std::time::Duration;

use crate::helpers::{PASSWORD, wait_for};

const UNIT: &str = include_str!("../../dist/rack.service");
const INSTALLED: &str = "/usr/local/bin/rack";

/// The values of `key=` lines of the `[Service]` section.
fn service_values(key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && let Some(value) = line.strip_prefix(&format!("{key}=")) {
            values.push(value.to_owned());
        }
    }
    values
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Ok(status) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed (scripts/install-deps installs it): not verified");
        return;
    };
    assert!(status.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("rack.service");
    // As installed, but with the binary this test built (verify checks that it exists).
    std::fs::write(&unit, UNIT.replace(INSTALLED, env!("CARGO_BIN_EXE_rack"))).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("rack.service"), "warnings about the unit: {stderr}");
}

#[tokio::test]
async fn the_units_exec_start_runs_a_rack_that_stops_cleanly() {
    let exec = service_values("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart");
    let argv = shell_words::split(&exec[0]).unwrap();
    assert_eq!(argv[0], INSTALLED);
    let data = crate::helpers::reachable_tempdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"));
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap());
    for assignment in service_values("Environment") {
        let (name, value) = assignment.split_once('=').unwrap();
        command.env(name, value);
    }
    // The unit's own data directory is the host's: this one is the test's.
    command
        .env("RACK_DATA", data.path().join("rack"))
        .env("RACK_BIND", format!("127.0.0.1:{port}"))
        .env("RACK_PASSWORD", PASSWORD)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let client = reqwest::Client::new();
    wait_for(120, "the service to answer", || async {
        let response = client
            .get(format!("http://127.0.0.1:{port}/system"))
            .basic_auth("convox", Some(PASSWORD))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .expect("it stops within the unit's TimeoutStopSec")
        .unwrap();
    assert!(status.success(), "{status}");
}
