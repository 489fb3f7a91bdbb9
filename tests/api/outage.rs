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
    let (status, text) = status_text(app.convox(Method::GET, "/apps").send().await.unwrap()).await;
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
