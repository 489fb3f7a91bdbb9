//! Postgres going away under a running rack: requests get 503 at once, streams end with a
//! line that says why, and everything works again when Postgres is back, with no restart.

use std::time::{Duration, Instant};

use reqwest::Method;

use crate::helpers::{TestApp, reachable_tempdir, status_text, wait_for};
use rack::config::{Config, Database};
use rack::postgres::{Cluster, Durability};

async fn start_cluster(root: std::path::PathBuf) -> Cluster {
    tokio::task::spawn_blocking(move || Cluster::start(&root, Durability::Durable))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_postgres_outage_gives_503_and_rack_recovers_without_a_restart() {
    let dir = reachable_tempdir();
    let root = dir.path().join("pg");
    let cluster = start_cluster(root.clone()).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&cluster.connect_options("postgres"))
        .await
        .unwrap();
    rack::store::ensure_database(&mut conn, "rack").await.unwrap();
    drop(conn);
    let url = cluster.url("rack");
    let app = TestApp::spawn_on(&url, |_| {}).await;
    assert_eq!(app.create_app("before").await.status(), 201);
    let stream = app
        .request(Method::GET, "/apps/before/logs")
        .header("since", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);

    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .unwrap();
    let asked = Instant::now();
    let response = app.convox(Method::GET, "/apps").send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1", "a 503 says when to try again");
    let (status, text) = status_text(response).await;
    assert_eq!(
        (status, text.as_str()),
        (503, "the database is unavailable, try again shortly\n")
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "503 took {:?}",
        asked.elapsed()
    );
    // The open stream ends with a line saying why, instead of hanging.
    let ended = tokio::time::timeout(Duration::from_secs(30), stream.text())
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(
        ended.ends_with("ERROR: the event log is unavailable; reconnect to resume\n"),
        "{ended:?}"
    );

    let _cluster = start_cluster(root).await;
    wait_for(30, "rack to answer again", || async {
        let r = app.convox(Method::GET, "/apps").send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert_eq!(app.create_app("after").await.status(), 201);
    assert_eq!(app.list_apps().await.len(), 2);
}

#[tokio::test]
async fn the_embedded_postgres_is_restarted_when_it_dies() {
    let data = reachable_tempdir();
    let config = Config::for_tests(data.path().to_path_buf(), Database::Embedded, crate::helpers::PASSWORD);
    let app = TestApp::start(config).await;
    assert_eq!(app.create_app("keeper").await.status(), 201);
    let pid_file = data.path().join("postgres/data/postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SIGQUIT: postgres's immediate shutdown, as close to a crash as it gets.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGQUIT).unwrap();
    // Done when a new postmaster runs and the app reads again (a request can still succeed on
    // an old connection before the shutdown takes effect, so the pid decides).
    let read_pid = || -> Option<i32> {
        std::fs::read_to_string(&pid_file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    };
    wait_for(60, "a new postgres serving the app again", || async {
        let new_pid = read_pid().filter(|p| *p != pid)?;
        let r = app.convox(Method::GET, "/apps/keeper").send().await.ok()?;
        (r.status() == 200).then_some(new_pid)
    })
    .await;
    app.stop().await;
}

/// An app that writes its log while Postgres is away keeps running, neither blocked nor
/// restarted: its keeper holds the output on disk, and once Postgres is back the lines written
/// meanwhile are copied into its log, none dropped.
#[tokio::test]
async fn an_app_writing_logs_during_an_outage_is_neither_blocked_nor_restarted() {
    let dir = reachable_tempdir();
    let root = dir.path().join("pg");
    let cluster = start_cluster(root.clone()).await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&cluster.connect_options("postgres"))
        .await
        .unwrap();
    rack::store::ensure_database(&mut conn, "rack").await.unwrap();
    drop(conn);
    let app = TestApp::spawn_on(&cluster.url("rack"), |_| {}).await;
    assert_eq!(app.create_app("chatty").await.status(), 201);
    // Ten lines every 10 ms, and a counter the test reads from the build directory.
    let manifest = "services:\n  talker:\n    command: i=0; while :; do for j in 0 1 2 3 4 5 6 7 8 9; do echo line $i.$j; done; i=$((i+1)); echo $i > $HOME/count.tmp; mv $HOME/count.tmp $HOME/count; sleep 0.01; done\n    health:\n      grace: 0\n";
    let id = app.build_source("chatty", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("chatty", &id).await;
    let release = build["release"].as_str().unwrap().to_owned();
    let log = crate::deploys::promote_follow(&app, "chatty", &release).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let counter = app.build_dir("chatty", &id).join("src/count");
    let count = || -> u64 {
        std::fs::read_to_string(&counter)
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    };
    let processes = app.state.runtime.processes("chatty").await.unwrap();
    assert_eq!(processes.len(), 1);
    let pid = processes[0].pid;

    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .unwrap();
    // Well past what the log's queue and the pipe could hold, the app still makes progress.
    for _ in 0..3 {
        let before = count();
        wait_for(10, "the app to make progress during the outage", || async {
            (count() > before + 50).then_some(())
        })
        .await;
    }
    let processes = app.state.runtime.processes("chatty").await.unwrap();
    assert_eq!(processes[0].pid, pid, "the app was restarted");
    assert_eq!(processes[0].status, rack::runtime::ProcessStatus::Running);

    // The last line written during the outage (the counter moves on after each ten lines).
    let during = format!("line {}.9", count() - 1);
    let _cluster = start_cluster(root).await;
    wait_for(120, "the lines written during the outage in the log", || async {
        let text = app
            .request(Method::GET, "/apps/chatty/logs")
            .header("follow", "false")
            .header("since", "0")
            .header("filter", during.as_str())
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().any(|l| l == during).then_some(())
    })
    .await;
    let notes = app
        .request(Method::GET, "/apps/chatty/logs")
        .header("follow", "false")
        .header("since", "0")
        .header("filter", "lines of output were dropped")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!notes.contains("lines of output were dropped"), "{notes}");
    assert_eq!(app.state.runtime.processes("chatty").await.unwrap()[0].pid, pid);
}
