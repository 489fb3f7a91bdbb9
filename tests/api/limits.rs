//! Per-instance limits of sandboxed app processes (security round 2, finding 6): a memory hog
//! is stopped at its service's `scale.memory` by the kernel, inside its own cgroup, and a fork
//! bomb stops at the instance's process cap, while rack keeps answering.

use std::time::Duration;

use reqwest::Method;

use crate::deploys::promote_follow;
use crate::helpers::{TestApp, wait_for};

/// This process's cgroup in the v1 `pids` hierarchy (rack runs in the test's process).
fn own_pids_cgroup() -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let names = fields.nth(1)?;
        names.split(',').any(|n| n == "pids").then(|| fields.next()).flatten()
    })?;
    Some(std::path::Path::new("/sys/fs/cgroup/pids").join(path.trim_start_matches('/')))
}

#[tokio::test]
async fn a_memory_hog_and_a_fork_bomb_stay_inside_their_instance() {
    let Some(pids_root) = own_pids_cgroup().filter(|_| nix::unistd::geteuid().is_root()) else {
        eprintln!("skipped: limits need root and cgroup v1 (as CI has)");
        return;
    };
    let app = TestApp::spawn().await;
    app.create_app("greedy").await;
    let manifest = "services:\n\
                    \x20 hog:\n    build:\n      command: \"true\"\n    scale:\n      memory: 64\n\
                    \x20   command: \"head -c 400000000 /dev/zero | tail >/dev/null && echo hog survived || echo hog was stopped; sleep 600\"\n\
                    \x20 bomb:\n    build:\n      command: \"true\"\n\
                    \x20   command: \"sh -c 'for i in $(seq 3000); do sleep 600 & done'; echo bomb went off; exec sleep 600\"\n";
    let id = app.build_source("greedy", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("greedy", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    promote_follow(&app, "greedy", build["release"].as_str().unwrap()).await;

    // (The bomb's own shell dies of its first failed fork; the bomb's processes stay.)
    let log = wait_for(60, "the hog and the bomb to have run", || async {
        let log = app.app_log("greedy").await;
        (log.contains("hog ") && log.contains("bomb went off")).then_some(log)
    })
    .await;
    assert!(
        log.contains("hog was stopped") && !log.contains("hog survived"),
        "{log}"
    );

    // The bomb's instance holds as many processes as its cap allows, and no more.
    let host = rack::runtime::local::podman::host_id(&app.state.config.data_dir);
    let instances = pids_root.join(format!("rack-{host}")).join("greedy");
    let current = wait_for(30, "the bomb's instance to reach its cap", || async {
        std::fs::read_dir(&instances).ok()?.flatten().find_map(|instance| {
            let current: u32 = std::fs::read_to_string(instance.path().join("pids.current"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (current > 1000).then_some(current)
        })
    })
    .await;
    assert!(current <= 1024, "{current} processes in one instance");

    // rack answers on time meanwhile.
    let answered = tokio::time::timeout(Duration::from_secs(5), app.request(Method::GET, "/apps/greedy").send()).await;
    assert_eq!(answered.expect("rack answers within 5 s").unwrap().status(), 200);
    app.delete_app("greedy").await;
}

#[tokio::test]
async fn one_offs_of_an_app_are_capped() {
    let app = TestApp::spawn().await;
    crate::run::running_app(&app, "busy").await;
    let start = |command: &'static str| {
        app.json(Method::POST, "/apps/busy/services/web/processes")
            .header("command", command)
            .send()
    };
    // Started together: the cap holds however the requests interleave.
    let cap = rack::runtime::local::MAX_ONE_OFFS_PER_APP;
    let answers = futures_util::future::join_all((0..cap + 4).map(|_| start("sleep 600"))).await;
    let mut statuses: Vec<u16> = answers.into_iter().map(|a| a.unwrap().status().as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), cap, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 4, "{statuses:?}");
    let refused = start("true").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let text = refused.text().await.unwrap();
    assert!(
        text.contains(&format!("already has {cap} one-off processes running")),
        "{text}"
    );
    // Other apps are not held back by this one.
    crate::run::running_app(&app, "calm").await;
    let other = app
        .json(Method::POST, "/apps/calm/services/web/processes")
        .header("command", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    app.delete_app("busy").await;
}

/// The cgroup path of process `pid` in the v1 `controller` hierarchy.
fn cgroup_of(pid: u32, controller: &str) -> Option<String> {
    let lines = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    lines.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let names = fields.nth(1)?;
        names
            .split(',')
            .any(|n| n == controller)
            .then(|| fields.next().map(str::to_owned))
            .flatten()
    })
}

#[tokio::test]
async fn a_command_run_with_exec_counts_against_its_instances_limits() {
    if own_pids_cgroup().is_none() || !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: limits need root and cgroup v1 (as CI has)");
        return;
    }
    let app = TestApp::spawn().await;
    app.create_app("quiet").await;
    let manifest = "services:\n  web:\n    build:\n      command: \"true\"\n    command: sleep 86400\n    scale:\n      memory: 128\n";
    let id = app.build_source("quiet", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("quiet", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    promote_follow(&app, "quiet", build["release"].as_str().unwrap()).await;
    let instance = wait_for(60, "the web process", || async {
        let processes: serde_json::Value = app.get_json("/apps/quiet/processes").await;
        processes.as_array()?.iter().find_map(|p| {
            (p["name"] == "web" && p["status"] == "running").then(|| p["id"].as_str().unwrap().to_owned())
        })
    })
    .await;
    let host = rack::runtime::local::podman::host_id(&app.state.config.data_dir);
    let expected = format!("/rack-{host}/quiet/{instance}");

    // While the exec'd command runs, every process of it is in the instance's cgroups.
    let marker = crate::helpers::unique_sleep_marker();
    let marker = marker.as_str();
    let (path, command) = (
        format!("/apps/quiet/processes/{instance}/exec"),
        format!("sleep {marker}"),
    );
    let headers = [("command", command.as_str()), ("tty", "false")];
    let exec = crate::run::exec_output(&app, &path, &headers);
    let seen = async {
        wait_for(60, "the exec'd command", || async {
            let pids = crate::helpers::processes_with_arg(marker);
            // Once the command itself runs: before, the chain that starts it may be between
            // joining one cgroup and the next.
            let comm = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !pids.iter().any(|pid| comm(pid).trim() == "sleep") {
                return None;
            }
            let cgroups: Vec<(Option<String>, Option<String>)> = pids
                .iter()
                .map(|pid| (cgroup_of(*pid, "pids"), cgroup_of(*pid, "memory")))
                .collect();
            (!cgroups.is_empty()).then_some(cgroups)
        })
        .await
    };
    let cgroups = tokio::select! {
        ended = exec => panic!("the exec ended: {ended:?}"),
        cgroups = seen => cgroups,
    };
    for (pids, memory) in &cgroups {
        for cgroup in [pids, memory] {
            let cgroup = cgroup.as_deref().unwrap_or_default();
            assert!(cgroup.ends_with(&expected), "{cgroup} is not {expected}: {cgroups:?}");
        }
    }
    // The exec's end (its websocket closed) ends the command.
    wait_for(60, "the exec'd command to end", || async {
        crate::helpers::processes_with_arg(marker).is_empty().then_some(())
    })
    .await;
    app.delete_app("quiet").await;
}

#[tokio::test]
async fn a_build_that_fills_its_directory_past_the_cap_is_stopped() {
    let cap: u64 = 32 << 20;
    let app = TestApp::spawn_with(|config| config.build_dir_max_bytes = cap).await;
    app.create_app("filler").await;
    // 128 MB written, then a wait the build timeout (60 s) would end with another message.
    let manifest = "services:\n  web:\n    build:\n      command: \"head -c 128000000 /dev/zero > big; echo wrote; sleep 300\"\n    command: sleep 86400\n";
    let id = app.build_source("filler", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("filler", &id).await;
    let log = app.build_log("filler", &id).await;
    assert_eq!(build["status"], "failed", "{build} {log}");
    assert!(
        log.contains(&format!("more than RACK_BUILD_DIR_MAX_BYTES ({cap} bytes)")),
        "{build} {log}"
    );
    // The rest of the rack goes on: another app builds (and within the cap).
    app.create_app("calm").await;
    let manifest = "services:\n  web:\n    build:\n      command: \"head -c 1000000 /dev/zero > small\"\n    command: sleep 86400\n";
    let id = app.build_source("calm", &[("convox.yml", manifest)]).await;
    let build = app.wait_build("calm", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
}

/// Runs `argv` on the host (outside any sandbox) as `uid`, and says whether it succeeded.
fn as_uid(uid: u32, argv: &[&str]) -> bool {
    std::process::Command::new("/usr/bin/setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
        ])
        .arg("--")
        .args(argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn each_app_runs_as_a_uid_of_its_own_that_cannot_reach_another_apps_files_or_processes() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: apps get uids of their own when rack is root");
        return;
    }
    let app = TestApp::spawn().await;
    let mut uids = Vec::new();
    let mut secrets = Vec::new();
    for name in ["alpha", "beta"] {
        let marker = crate::helpers::unique_sleep_marker();
        let marker = marker.as_str();
        app.create_app(name).await;
        let manifest = format!(
            "services:\n  web:\n    build:\n      command: \"echo {name}-secret > secret.txt\"\n    command: sleep {marker}\n"
        );
        let id = app.build_source(name, &[("convox.yml", manifest.as_str())]).await;
        let build = app.wait_build(name, &id).await;
        assert_eq!(build["status"], "complete", "{build}");
        promote_follow(&app, name, build["release"].as_str().unwrap()).await;
        let secret = app.build_dir(name, &id).join("src/secret.txt");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), format!("{name}-secret\n"));
        let uid = std::fs::metadata(&secret).unwrap().uid();
        // The app's own `sleep`, not the root chain that starts its sandbox.
        let pid = wait_for(60, "the web process", || async {
            crate::helpers::processes_with_arg(marker).into_iter().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sleep")
            })
        })
        .await;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())),
            "the process of {name} does not run as its files' owner {uid}: {status}"
        );
        uids.push(uid);
        secrets.push((secret, pid));
    }
    let sandbox_user = nix::unistd::User::from_name(rack::runtime::local::sandbox::DEFAULT_USER)
        .unwrap()
        .map(|u| u.uid.as_raw());
    assert_ne!(uids[0], uids[1], "both apps run as {}", uids[0]);
    for uid in &uids {
        assert!(*uid != 0 && Some(*uid) != sandbox_user, "an app runs as {uid}");
    }
    let (alpha, (beta_secret, beta_pid)) = (uids[0], &secrets[1]);
    let (secret, pid) = (beta_secret.to_str().unwrap(), beta_pid.to_string());
    // Even outside the sandbox's namespaces, alpha's uid can neither read beta's file nor
    // signal beta's process; beta's own uid can (the check itself works).
    assert!(!as_uid(alpha, &["cat", secret]), "alpha read {secret}");
    assert!(
        !as_uid(alpha, &["kill", "-0", &pid]),
        "alpha could signal beta's process"
    );
    assert!(as_uid(uids[1], &["cat", secret]));
    assert!(as_uid(uids[1], &["kill", "-0", &pid]));
    app.delete_app("alpha").await;
    app.delete_app("beta").await;
}

#[tokio::test]
async fn apps_asking_for_uids_at_once_get_distinct_ones_that_stay_theirs() {
    let url = crate::helpers::fresh_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let names: Vec<String> = (0..24).map(|i| format!("app{i}")).collect();
    let first: Vec<i32> = futures_util::future::join_all(
        names
            .iter()
            .map(|name| rack::store::app_uids::get_or_allocate(&pool, name)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let distinct: std::collections::BTreeSet<i32> = first.iter().copied().collect();
    assert_eq!(distinct.len(), names.len(), "{first:?}");
    let again: Vec<i32> = futures_util::future::join_all(
        names
            .iter()
            .map(|name| rack::store::app_uids::get_or_allocate(&pool, name)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    assert_eq!(first, again);
    pool.close().await;
}
