//! Process apps outlive rack: each service process runs under a keeper, so a rack stopped
//! (SIGTERM, or killed with SIGKILL) and started again on the same data directory adopts the
//! same processes, whose log goes on with nothing lost or twice, and which scale and restart
//! as before.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::Value;

use crate::helpers::wait_for;
use crate::replicas::{Replica, create_app};

/// Serves its boot token on every path (health too), and counts `tick N` on stdout.
const TICKER: &str = r#"import http.server, os, sys, threading, time
BOOT = os.urandom(8).hex()
def ticks():
    n = 0
    while True:
        print("tick", n, flush=True)
        n += 1
        time.sleep(0.05)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{BOOT}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
threading.Thread(target=ticks, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const MANIFEST: &str = "services:\n  web:\n    command: python3 -u ticker.py\n    port: 3000\n    health:\n      path: /health\n      grace: 1\n      interval: 2\n";

/// The app's log so far.
async fn log_text(rack: &Replica) -> String {
    rack.request(Method::GET, "/apps/kept/logs")
        .header("follow", "false")
        .header("since", "0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The `tick N` numbers in the app's log, in order.
async fn ticks(rack: &Replica) -> Vec<u64> {
    log_text(rack)
        .await
        .lines()
        .filter_map(|line| line.split("tick ").nth(1)?.trim().parse().ok())
        .collect()
}

/// The app's running processes: (id, pid).
async fn running(rack: &Replica) -> Vec<(String, u64)> {
    let processes = rack.json("/apps/kept/processes").await;
    processes
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|p| p["status"] == "running")
                .map(|p| (p["id"].as_str().unwrap().to_owned(), p["pid"].as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// What the app's router answers (its process's boot token).
async fn answer(rack: &Replica) -> Option<String> {
    let app = rack.json("/apps/kept").await;
    let router = app["router"].as_str()?.to_owned();
    crate::helpers::try_fetch_text(format!("http://{router}/")).await
}

fn alive(pid: u64) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), None).is_ok()
}

async fn survives(kill_9: bool) {
    let database = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let mut rack = Replica::start(&database, data.path(), &[]).await;
    create_app(&rack, "kept").await;
    let id = rack
        .build("kept", &[("convox.yml", MANIFEST), ("ticker.py", TICKER)])
        .await;
    let build = rack.wait_build("kept", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    let promote = rack
        .request(Method::POST, &format!("/apps/kept/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 201);
    let (process, pid) = wait_for(120, "the app to run", || async {
        let app = rack.json("/apps/kept").await;
        let running = running(&rack).await;
        (app["status"] == "running" && running.len() == 1).then(|| running[0].clone())
    })
    .await;
    let boot = wait_for(60, "the app to answer", || answer(&rack)).await;
    wait_for(60, "ticks in the log", || async {
        (ticks(&rack).await.len() > 5).then_some(())
    })
    .await;

    if kill_9 {
        rack.kill_9().await;
    } else {
        rack.sigterm().await;
    }
    assert!(alive(pid), "the process outlives rack");
    let rack = Replica::start(&database, data.path(), &[]).await;
    wait_for(120, "the same process to run again", || async {
        (running(&rack).await == [(process.clone(), pid)]).then_some(())
    })
    .await;
    let again = wait_for(60, "the router to answer again", || answer(&rack)).await;
    assert_eq!(again, boot, "the same process answers");

    // The log goes on: every tick once, those written while rack was down too.
    let seen = ticks(&rack).await.last().copied().unwrap_or(0);
    let log = wait_for(60, "ticks after the restart", || async {
        let log = ticks(&rack).await;
        (log.last().is_some_and(|last| *last > seen + 20)).then_some(log)
    })
    .await;
    let expected: Vec<u64> = (0..log.len() as u64).collect();
    assert_eq!(log, expected, "each tick once, in order");
    let text = log_text(&rack).await;
    assert!(text.contains(&format!("Adopted process {process}")), "{text}");
    eprintln!(
        "pid {pid} kept; {seen} ticks before the restart, {} after, none lost or twice",
        log.len()
    );

    // An adopted process restarts on request, and the service scales.
    let restarted = rack
        .request(Method::DELETE, &format!("/apps/kept/processes/{process}"))
        .send()
        .await
        .unwrap();
    assert!(restarted.status().is_success());
    wait_for(120, "a new process", || async {
        let now = running(&rack).await;
        (now.len() == 1 && now[0].1 != pid).then_some(())
    })
    .await;
    assert!(!alive(pid), "the adopted process was stopped");
    let scale = rack
        .request(Method::PUT, "/apps/kept/services/web")
        .form(&[("count", "2")])
        .send()
        .await
        .unwrap();
    assert_eq!(scale.status(), 202);
    let location = scale.headers()["location"].to_str().unwrap().to_owned();
    let scaled = wait_for(120, "the scale to end", || async {
        let deployment = rack.json(&location).await;
        deployment["ended"].is_string().then_some(deployment)
    })
    .await;
    assert_eq!(scaled["state"], "running", "{scaled}");
    let pids = wait_for(120, "two processes", || async {
        let now = running(&rack).await;
        (now.len() == 2).then(|| now.iter().map(|(_, pid)| *pid).collect::<BTreeSet<u64>>())
    })
    .await;

    // Deleting the app stops them and leaves no keeper behind.
    let deleted = rack.request(Method::DELETE, "/apps/kept").send().await.unwrap();
    assert!(deleted.status().is_success(), "{:?}", deleted.text().await);
    wait_for(60, "the processes to stop", || async {
        pids.iter().all(|pid| !alive(*pid)).then_some(())
    })
    .await;
    let keepers = data.path().join("keepers/kept");
    assert!(
        !keepers.exists(),
        "{:?}",
        std::fs::read_dir(&keepers).map(|d| d.count())
    );
    assert!(!data.path().join("app-networks/kept.json").exists());
    let app: Value = rack.json("/apps").await;
    assert_eq!(app.as_array().map(Vec::len), Some(0), "{app}");
}

#[tokio::test]
async fn a_process_app_keeps_running_across_a_sigterm_restart() {
    survives(false).await;
}

#[tokio::test]
async fn a_process_app_keeps_running_across_a_kill_9() {
    survives(true).await;
}
