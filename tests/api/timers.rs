//! Timers on the local runtime: rack's scheduler starts each as a one-off process of its
//! service when it comes due, once per scheduled minute however many replicas there are, and
//! follows its `concurrency`.

use crate::deploys::{MANIFEST, SERVER, promote_follow};
use crate::helpers::{TestApp, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_runs_each_minute_once_across_two_replicas() {
    let app = TestApp::spawn().await;
    // A second replica on the same database and data directory (as a shared volume would be)
    // looks at the same timers, and may be the one that runs them.
    let (data, objects) = (app.state.config.data_dir.clone(), app.state.config.objects.clone());
    let other = TestApp::spawn_on(&app.database_url(), |config| {
        config.objects = objects;
        config.data_dir = data;
    })
    .await;
    let name = "ticker";
    assert_eq!(app.create_app(name).await.status(), 201);
    let manifest = format!(
        "{MANIFEST}timers:\n  tick:\n    schedule: \"* * * * *\"\n    command: echo tick $TIMER $RELEASE\n    service: web\n  slow:\n    schedule: \"* * * * *\"\n    command: sleep 600\n    service: web\n    concurrency: forbid\n"
    );
    let id = app
        .build_source(name, &[("convox.yml", manifest.as_str()), ("server.py", SERVER)])
        .await;
    let build = app.wait_build(name, &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    assert!(promote_follow(&app, name, &release).await.ends_with("OK\n"));

    // Each minute a run starts, with the service's env and TIMER, and writes to the app's log.
    let tick = format!("tick tick {release}");
    let runs = |log: &str| log.lines().filter(|l| l.ends_with(&tick)).count();
    let started = |log: &str| {
        log.lines()
            .filter(|l| l.contains("timer tick (* * * * *, due ") && l.contains("started process"))
            .map(ToOwned::to_owned)
            .collect::<Vec<_>>()
    };
    wait_for(75, "the timer's first run", || async {
        (runs(&app.app_log(name).await) >= 1).then_some(())
    })
    .await;
    let log = wait_for(75, "the timer's second run", || async {
        let log = other.app_log(name).await;
        (runs(&log) >= 2).then_some(log)
    })
    .await;
    // Two minutes, two runs: neither replica ran a minute the other had.
    let notes = started(&log);
    assert_eq!(notes.len(), 2, "{log}");
    assert_eq!(runs(&log), 2, "{log}");
    assert_ne!(notes[0].split("due ").nth(1), notes[1].split("due ").nth(1), "{log}");
    // `forbid`: the slow timer's first run still goes on, so its second time is skipped.
    let slow: Vec<&str> = log.lines().filter(|l| l.contains("timer slow (")).collect();
    assert!(slow.len() >= 2, "{log}");
    assert!(slow[0].contains("started process web-run-"), "{log}");
    let first = slow[0]
        .split("started process ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        slow[1].ends_with(&format!("skipped: the previous run, process {first}, is still running")),
        "{log}"
    );
}
