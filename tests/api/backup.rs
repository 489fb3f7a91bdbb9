//! Backups and restores: a backup taken while a build and a deployment run restores on a second
//! server with a data directory and database of its own, with the app running its release, the
//! same history and streams that resume from the same ids; a damaged or truncated archive is
//! refused before anything is written.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::deploys::{MANIFEST, SERVER, promote_follow};
use crate::helpers::{PASSWORD, TestApp, wait_for};

/// Downloads a backup of `rack` into `file`.
pub(crate) async fn download(rack: &TestApp, query: &str, file: &std::path::Path) {
    let response = rack
        .untimed_client()
        .get(rack.url(&format!("/system/backup{query}")))
        .basic_auth("convox", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-tar");
    let bytes = tokio::time::timeout(Duration::from_secs(120), response.bytes())
        .await
        .expect("the backup ends")
        .unwrap();
    std::fs::write(file, &bytes).unwrap();
}

/// The feed of `app` as far as it goes now: (id, kind) pairs.
async fn feed(rack: &TestApp, app: &str, after: i64) -> Vec<(i64, String)> {
    let text = rack
        .get_text(&format!("/apps/{app}/events?after={after}&follow=false"))
        .await;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| Some((e["id"].as_i64()?, e["kind"].as_str()?.to_owned())))
        .collect()
}

/// A config for a server that restores `file` into a new data directory and an empty database.
pub(crate) async fn restoring(data: &std::path::Path, file: &std::path::Path) -> rack::config::Config {
    let url = crate::helpers::empty_database().await;
    let mut config = rack::config::Config::for_tests(data.join("rack"), rack::config::Database::Url(url), PASSWORD);
    config.backup.restore = Some(file.to_path_buf());
    // The jobs the first server held are taken over as soon as their claims run out.
    config.job_lease = Duration::from_secs(3);
    config
}

#[tokio::test]
async fn a_backup_taken_during_a_build_and_a_deployment_restores_on_a_second_server() {
    let first = TestApp::spawn().await;
    assert_eq!(first.create_app("keep").await.status(), 201);
    let (id, release) = first
        .build_complete("keep", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    promote_follow(&first, "keep", &release).await;
    assert_eq!(
        crate::deploys::through_router(&first, "keep").await,
        format!("{release} \n")
    );
    let first_app: Value = first.get_json("/apps/keep").await;
    let first_router = first_app["router"].as_str().unwrap().to_owned();
    let build_log = first
        .get_plain(&format!("/apps/keep/builds/{id}/logs?after=1&ids=true"))
        .await;

    // A deployment that stays updating for half a minute (its new instance answers only after
    // 30 s, within its grace period), and a build that runs for a minute: both are still
    // running when the backup is taken however slowly this machine starts them.
    let slow = MANIFEST.replace("grace: 1", "grace: 90").replace(
        "command: python3 -u server.py",
        "command: sleep 30 && exec python3 -u server.py",
    );
    assert_ne!(slow, MANIFEST);
    let slow_id = first
        .build_source("keep", &[("convox.yml", &slow), ("server.py", SERVER)])
        .await;
    let slow_release = first.wait_build("keep", &slow_id).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let promote = first
        .request(Method::POST, &format!("/apps/keep/releases/{slow_release}/promote"))
        .send()
        .await
        .unwrap();
    assert!(promote.status().is_success());
    let running = first
        .build_source(
            "keep",
            &[(
                "convox.yml",
                "services:\n  web:\n    build:\n      command: sleep 60\n    command: sleep 600\n",
            )],
        )
        .await;
    let seen = std::sync::Mutex::new(String::new());
    let what = "the build and the deployment to run";
    let both = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let build = first.get_build("keep", &running).await;
            let app: Value = first.get_json("/apps/keep").await;
            if build["status"] == "running" && app["status"] == "updating" {
                return;
            }
            *seen.lock().unwrap() = format!("build {}, app {}", build["status"], app["status"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        both.is_ok(),
        "timed out after 60 s waiting for {what}; last seen: {}",
        seen.lock().unwrap()
    );

    // What the backup must hold, read before it is taken: the deployment and the build go on
    // writing events meanwhile, and those after the backup's snapshot are not in it.
    let releases: Value = first.get_json("/apps/keep/releases").await;
    let builds: Value = first.get_json("/apps/keep/builds").await;
    let deployments: Value = first.get_json("/apps/keep/deployments").await;
    let events = feed(&first, "keep", 0).await;
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("rack.tar");
    download(&first, "", &file).await;
    let fed: Value = first.get_json("/system/usage").await;
    assert!(fed["kinds"]["database"].as_u64().unwrap() > 0, "{fed}");
    first.stop().await;

    let second = TestApp::start(restoring(dir.path(), &file).await).await;
    assert_eq!(second.list_apps().await.len(), 1);
    // The deployment that was running carries on here (once the first server's claim on it
    // has run out), and the app runs its release again, at the same address.
    let router = first_router.clone();
    let now_running = wait_for(150, "the restored app to run its release", || async {
        let app: Value = second.get_json("/apps/keep").await;
        if app["status"] != "running" || app["router"] != router.as_str() {
            return None;
        }
        let release = app["release"].as_str()?.to_owned();
        let text = crate::helpers::try_fetch_text(format!("http://{router}/")).await?;
        (text == format!("{release} \n")).then_some(release)
    })
    .await;
    assert!([&release, &slow_release].contains(&&now_running), "{now_running}");
    // The same history.
    let same = |path: &'static str, before: Value| {
        let second = &second;
        async move {
            let after: Value = second.get_json(path).await;
            let ids = |v: &Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_str().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(ids(&after), ids(&before), "{path}");
        }
    };
    same("/apps/keep/releases", releases).await;
    same("/apps/keep/builds", builds).await;
    same("/apps/keep/deployments", deployments).await;
    // Streams resume from the same ids.
    let restored_log = second
        .get_plain(&format!("/apps/keep/builds/{id}/logs?after=1&ids=true"))
        .await;
    assert_eq!(restored_log, build_log);
    let restored_events = feed(&second, "keep", 0).await;
    assert!(restored_events.len() >= events.len());
    assert_eq!(
        restored_events[..events.len()],
        events[..],
        "the feed from the same ids"
    );
    // The build that was running ends as any build a stopped server was running does (once
    // the first server's claim on it has run out).
    let build = wait_for(150, "the interrupted build to fail", || async {
        let build = second.get_build("keep", &running).await;
        (build["status"] != "running").then_some(build)
    })
    .await;
    assert_eq!(build["status"], "failed", "{build}");
    assert!(build["reason"].as_str().unwrap().contains("interrupted"), "{build}");
    second.stop().await;
}

/// Restores the archive `bytes` (written as `name` in `dir`) on a new server, which must refuse
/// it having written nothing, to its data directory or its database; the error.
async fn refused(dir: &std::path::Path, bytes: Vec<u8>, name: &str) -> String {
    let broken = dir.join(name);
    std::fs::write(&broken, bytes).unwrap();
    let config = restoring(&dir.join(format!("{name}.data")), &broken).await;
    let url = match &config.database {
        rack::config::Database::Url(url) => url.clone(),
        rack::config::Database::Embedded => unreachable!(),
    };
    let data = config.data_dir.clone();
    let error = rack::Application::build(config).await.unwrap_err();
    assert!(!data.exists(), "nothing is written to the data directory");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    assert!(
        rack::store::backup::tables(&pool).await.unwrap().is_empty(),
        "nor to the database"
    );
    pool.close().await;
    format!("{error:#}")
}

#[tokio::test]
async fn a_damaged_or_truncated_backup_is_refused_before_anything_is_written() {
    let rack = TestApp::spawn().await;
    assert_eq!(rack.create_app("small").await.status(), 201);
    rack.build_release("small", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("rack.tar");
    download(&rack, "?images=false", &file).await;
    rack.stop().await;
    let whole = std::fs::read(&file).unwrap();

    let refused = |bytes: Vec<u8>, name: &'static str| refused(dir.path(), bytes, name);
    let truncated = refused(whole[..whole.len() / 2].to_vec(), "truncated.tar").await;
    assert!(truncated.contains("truncated"), "{truncated}");
    // The end of the archive without its manifest.
    let at = whole.windows(13).rposition(|w| w == b"MANIFEST.json").unwrap();
    let cut = refused(whole[..at - (at % 512)].to_vec(), "cut.tar").await;
    assert!(cut.contains("without its manifest"), "{cut}");
    // One byte changed inside the database dump.
    let mut damaged = whole.clone();
    let dump = damaged.windows(15).position(|w| w == b"database.pgdump").unwrap();
    let inside = dump - (dump % 512) + 512 + 100;
    damaged[inside] ^= 0xff;
    let damaged = refused(damaged, "damaged.tar").await;
    assert!(damaged.contains("database.pgdump is damaged"), "{damaged}");
    let not_a_backup = refused(b"hello".repeat(200), "hello.tar").await;
    assert!(not_a_backup.contains("refusing to restore"), "{not_a_backup}");

    // A data directory in use is refused too.
    let used = crate::helpers::reachable_tempdir();
    std::fs::write(used.path().join("something"), "x").unwrap();
    let mut config = restoring(dir.path(), &file).await;
    config.data_dir = used.path().to_path_buf();
    let error = format!("{:#}", rack::Application::build(config).await.unwrap_err());
    assert!(error.contains("needs an empty data directory"), "{error}");
}

/// `rack system usage` counts the data directory as `du` does.
#[tokio::test]
async fn usage_matches_du_of_the_data_directory() {
    let data = crate::helpers::reachable_tempdir();
    let config = rack::config::Config::for_tests(data.path().join("rack"), rack::config::Database::Embedded, PASSWORD);
    let rack = TestApp::start(config).await;
    assert_eq!(rack.create_app("measured").await.status(), 201);
    rack.build_release("measured", &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let usage: Value = rack.get_json("/system/usage").await;
    let du = std::process::Command::new("du")
        .args(["-s", "-B1", "-x"])
        .arg(data.path().join("rack"))
        .output()
        .unwrap();
    let du: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let counted = usage["data_dir"]["bytes"].as_u64().unwrap();
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let off = (counted as f64 - du as f64).abs() / du as f64;
    assert!(off < 0.05, "usage says {counted} bytes, du {du}: {usage}");
    let kinds = &usage["kinds"];
    let sum: u64 = ["database", "sources", "backups", "builds", "other"]
        .iter()
        .map(|k| kinds[k].as_u64().unwrap())
        .sum();
    assert_eq!(sum, counted, "{usage}");
    assert!(usage["apps"]["measured"]["builds"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["apps"]["measured"]["sources"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["apps"]["measured"]["logs"].as_u64().unwrap() > 0, "{usage}");
    rack.stop().await;
}

/// Builds are refused with 507 while the disk is under its reserve, and the rack says so.
#[tokio::test]
async fn builds_are_refused_with_507_when_the_disk_is_nearly_full() {
    let rack = TestApp::spawn_with(|config| {
        config.disk.reserve = u64::MAX;
        config.disk.warn = u64::MAX;
    })
    .await;
    assert_eq!(rack.create_app("full").await.status(), 201);
    let response = rack
        .upload(
            "full",
            "src.tgz",
            crate::helpers::source_tarball(&[("convox.yml", MANIFEST)]),
        )
        .await;
    assert!(response.status().is_success());
    let response = rack
        .convox(Method::POST, "/apps/full/builds")
        .form(&[("url", "object://full/src.tgz")])
        .send()
        .await
        .unwrap();
    let (status, text) = crate::helpers::status_text(response).await;
    assert_eq!(status, 507, "{text}");
    assert!(text.contains("RACK_DISK_RESERVE_BYTES"), "{text}");
    rack.wait_for_feed("system.disk", "nearly full", 30).await;
    rack.stop().await;
}

/// A backup is told in the feed and in the metrics.
#[tokio::test]
async fn a_backup_shows_in_the_feed_and_the_metrics() {
    let rack = TestApp::spawn().await;
    let dir = crate::helpers::reachable_tempdir();
    download(&rack, "?images=false", &dir.path().join("b.tar")).await;
    rack.wait_for_feed("system.backup", "downloaded", 30).await;
    let metrics = rack.get_text("/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("rack_backup_last_size_bytes "))
        .unwrap();
    assert!(!line.ends_with(" 0"), "{line}");
    assert_eq!(rack.status_of(Method::GET, "/system/backup?images=maybe").await, 400);
    rack.stop().await;
}

/// The embedded default backs up and restores its own cluster (the tools reach it on its socket).
#[tokio::test]
async fn the_embedded_default_backs_up_and_restores() {
    let data = crate::helpers::reachable_tempdir();
    let config = rack::config::Config::for_tests(data.path().join("first"), rack::config::Database::Embedded, PASSWORD);
    // A password file, as a generated password leaves (RACK_PASSWORD wins over it here).
    std::fs::create_dir_all(data.path().join("first")).unwrap();
    std::fs::write(data.path().join("first/password"), "saved-password\n").unwrap();
    let first = TestApp::start(config).await;
    assert_eq!(first.create_app("embedded").await.status(), 201);
    let file = data.path().join("embedded.tar");
    download(&first, "?images=false", &file).await;
    let events = feed(&first, "embedded", 0).await;
    first.stop().await;

    let mut config =
        rack::config::Config::for_tests(data.path().join("second"), rack::config::Database::Embedded, PASSWORD);
    config.backup.restore = Some(file);
    let second = TestApp::start(config).await;
    let apps = second.list_apps().await;
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0]["name"], "embedded");
    assert_eq!(feed(&second, "embedded", 0).await[..events.len()], events[..]);
    let password = data.path().join("second/password");
    assert_eq!(std::fs::read_to_string(&password).unwrap(), "saved-password\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&password).unwrap().permissions().mode() & 0o777,
        0o600
    );
    second.stop().await;
}

/// Scheduled backups go into the object store, whole, and only the newest RACK_BACKUP_KEEP stay.
#[tokio::test]
async fn scheduled_backups_go_to_the_object_store_and_the_oldest_are_deleted() {
    let rack = TestApp::spawn_with(|config| config.backup.keep = 2).await;
    assert_eq!(rack.create_app("kept").await.status(), 201);
    let start = chrono::Utc::now();
    for minutes in 0..3 {
        rack::backup::schedule::take(&rack.state, start + chrono::TimeDelta::minutes(minutes)).await;
    }
    let mut kept: Vec<String> = rack
        .state
        .objects
        .list(rack::backup::STORE_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|(location, _)| location)
        .collect();
    kept.sort();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let newest = format!(
        "{}/rack-{}.tar",
        rack::backup::STORE_PREFIX,
        (start + chrono::TimeDelta::minutes(2)).format("%Y%m%dT%H%M%SZ")
    );
    assert_eq!(kept[1], newest);
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("scheduled.tar");
    rack.state.objects.download(&newest, &file).await.unwrap();
    let verified = rack::backup::restore::verify(&file).unwrap();
    assert!(verified.manifest.entries.iter().any(|e| e.path == "database.pgdump"));
    let text = rack.get_text("/events?after=0&follow=false&kind=system.backup").await;
    assert_eq!(text.matches("written to _backups/").count(), 3, "{text}");
    rack.stop().await;
}

/// Blobs no object points at are removed; the ones objects point at stay.
#[tokio::test]
async fn orphaned_blobs_are_pruned() {
    let rack = TestApp::spawn().await;
    assert_eq!(rack.create_app("orphans").await.status(), 201);
    let response = rack.upload("orphans", "kept.bin", b"kept".to_vec()).await;
    assert!(response.status().is_success());
    let orphan = rack::objects::Objects::new_location("orphans");
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"lost"))]);
    rack.state.objects.put_stream(&orphan, body, 1024, None).await.unwrap();
    let blobs = || async {
        let mut blobs: Vec<String> = rack
            .state
            .objects
            .list("_blobs")
            .await
            .unwrap()
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        blobs.sort();
        blobs
    };
    assert_eq!(blobs().await.len(), 2);
    rack::disk::prune_orphans(&rack.state, chrono::TimeDelta::zero())
        .await
        .unwrap();
    let left = blobs().await;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0], orphan);
    let kept = rack
        .request(Method::GET, "/apps/orphans/objects/kept.bin")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&kept[..], b"kept");
    rack.stop().await;
}

/// `rack system backup -f FILE` writes a whole, checked archive; `rack system usage` prints
/// the kinds and apps.
#[tokio::test]
async fn the_cli_backs_up_and_shows_usage() {
    let rack = TestApp::spawn().await;
    assert_eq!(rack.create_app("clied").await.status(), 201);
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("cli.tar");
    let cli = |args: Vec<String>| {
        let addr = rack.addr;
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
                .args(&args)
                .env("RACK_URL", format!("http://convox:{PASSWORD}@{addr}"))
                .env_remove("RACK_DATA")
                .kill_on_drop(true)
                .output();
            let output = tokio::time::timeout(Duration::from_secs(120), output)
                .await
                .expect("the CLI finishes")
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(output.status.success(), "{args:?}: {stdout}{stderr}");
            stdout
        }
    };
    let out = cli(vec![
        "system".into(),
        "backup".into(),
        "-f".into(),
        file.display().to_string(),
        "--no-images".into(),
    ])
    .await;
    assert!(out.starts_with("Backup of "), "{out}");
    assert!(!dir.path().join("cli.partial").exists());
    rack::backup::restore::verify(&file).unwrap();
    let out = cli(vec!["system".into(), "usage".into()]).await;
    assert!(
        out.contains("KIND") && out.contains("database") && out.contains("clied"),
        "{out}"
    );
    rack.stop().await;
}

/// A container app's image is in the backup: with the image gone from the host, the restored
/// rack loads it and runs the app's container again at the same address.
#[tokio::test]
async fn a_restore_brings_back_the_images_of_container_apps() {
    use crate::containers::{Leftovers, base_image, convox_app};
    base_image().await;
    let first = TestApp::spawn().await;
    assert_eq!(first.create_app("boxed").await.status(), 201);
    let files = convox_app("v1");
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let (id, release) = first.build_complete("boxed", &files).await;
    promote_follow(&first, "boxed", &release).await;
    let router = first.get_json::<Value>("/apps/boxed").await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("images.tar");
    download(&first, "", &file).await;
    let verified = rack::backup::restore::verify(&file).unwrap();
    assert!(verified.manifest.entries.iter().any(|e| e.path == "images.tar"));
    // A podman of the test's own (the servers' configurations go with their data directories).
    let podman = rack::runtime::local::podman::Podman::detect(&dir.path().join("podman"), "rack")
        .unwrap()
        .unwrap();
    let image = podman.image_name("boxed", "web", &id);
    let first_host = rack::runtime::local::podman::Podman::detect(&first.state.config.data_dir, "rack")
        .unwrap()
        .unwrap()
        .host;
    first.stop().await;
    // The first rack's containers (they outlive it) and image go: only the backup has it now.
    let label = format!("label=rack.host={first_host}");
    let containers = podman
        .output(&["ps", "--all", "--quiet", "--filter", &label])
        .await
        .unwrap();
    for container in containers.split_whitespace() {
        podman
            .output(&["rm", "--force", "--time", "0", container])
            .await
            .unwrap();
    }
    podman.output(&["rmi", "--force", &image]).await.unwrap();
    assert!(!podman.image_exists(&image).await, "{image} is gone");

    let second = TestApp::start(restoring(dir.path(), &file).await).await;
    let cleanup = Leftovers::of(&second);
    assert!(podman.image_exists(&image).await, "{image} is loaded again");
    wait_for(120, "the container app to answer at its address", || async {
        let text = crate::helpers::try_fetch_text(format!("http://{router}/")).await?;
        (text == "v1\n").then_some(())
    })
    .await;
    second.stop().await;
    drop(cleanup);
    let _ = podman.output(&["rmi", "--force", &image]).await;
}

/// Resources come back with their data: an app with a postgres and a redis resource (a mysql
/// one filled through the import, and a memcached, a cache the backup leaves out, saying so)
/// writes a note, a backup is taken, and
/// a second server restoring it on a data directory of its own creates the resources, loads
/// their exports into them (once: an export left behind is not loaded again) and the app reads
/// the same note there. A tampered export is refused before anything is written.
#[tokio::test]
async fn a_restored_rack_brings_back_its_resources_with_their_data() {
    use crate::resources::{NOTES, ResourceServers, notes};
    let first = TestApp::spawn().await;
    let first_servers = ResourceServers::at(&first.state.config.data_dir);
    assert_eq!(first.create_app("shop").await.status(), 201);
    let manifest = crate::resources::MANIFEST.replacen(
        "resources:\n",
        "resources:\n  sessions:\n    type: memcached\n  orders:\n    type: mysql\n",
        1,
    );
    first
        .deploy_files("shop", &[("convox.yml", &manifest), ("notes.sh", NOTES)])
        .await;
    notes(&first, "shop", "write kept").await;
    assert_eq!(notes(&first, "shop", "read").await, "pg=kept\nredis=kept\n");
    let created = "create table orders (v text); insert into orders values ('kept-order');";
    assert_eq!(
        crate::resources::import(&first, "shop", "orders", created).await,
        (200, "ok\n".to_owned())
    );

    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("rack.tar");
    download(&first, "?images=false", &file).await;
    let verified = rack::backup::restore::verify(&file).unwrap();
    let manifest = verified.manifest;
    let record = |name: &str| {
        manifest
            .resources
            .iter()
            .find(|r| r.app == "shop" && r.name == name)
            .unwrap_or_else(|| panic!("{name} in {:?}", manifest.resources))
            .clone()
    };
    let entry = |path: &str| manifest.entries.iter().find(|e| e.path == path).cloned();
    let database = record("database");
    assert_eq!(database.path.as_deref(), Some("resources/shop/database.sql"));
    assert_eq!(record("cache").path.as_deref(), Some("resources/shop/cache.rdb"));
    let dump = entry("resources/shop/database.sql").expect("the export is an entry");
    assert!(
        dump.size > 0 && dump.sha256.as_ref().is_some_and(|s| s.len() == 64),
        "{dump:?}"
    );
    assert!(entry("resources/shop/cache.rdb").is_some_and(|e| e.sha256.is_some()));
    assert!(entry("resources/shop/orders.sql").is_some_and(|e| e.sha256.is_some()));
    let sessions = record("sessions");
    assert!(sessions.path.is_none(), "{sessions:?}");
    assert!(
        sessions.skipped.as_deref().unwrap_or_default().contains("cache"),
        "{sessions:?}"
    );
    // Left out on request, and said so.
    let without = dir.path().join("without.tar");
    download(&first, "?images=false&resources=false", &without).await;
    let without = rack::backup::restore::verify(&without).unwrap().manifest;
    assert!(without.entries.iter().all(|e| !e.path.starts_with("resources/")));
    assert!(
        without
            .resources
            .iter()
            .all(|r| r.skipped.as_deref().unwrap_or_default().contains("resources=false")),
        "{:?}",
        without.resources
    );
    // A resource that cannot be exported fails the backup, saying which: never left out
    // silently.
    let redis_pid =
        std::fs::read_to_string(first.state.config.data_dir.join("resources/shop/cache/redis.pid")).unwrap();
    let redis_pid = nix::unistd::Pid::from_raw(redis_pid.trim().parse().unwrap());
    nix::sys::signal::kill(redis_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for(60, "the redis resource to stop", || async {
        nix::sys::signal::kill(redis_pid, None).is_err().then_some(())
    })
    .await;
    let failed = first
        .request(Method::GET, "/system/backup?images=false")
        .send()
        .await
        .unwrap();
    let (status, text) = crate::helpers::status_text(failed).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("resource cache of app shop"), "{text}");
    // The first rack's servers go (before the rack: its data directory, where their pid files
    // are, goes with it), then the rack: the second one must not find its data in them.
    drop(first_servers);
    first.stop().await;

    // One byte of the database's export changed: refused, naming it.
    let mut tampered = std::fs::read(&file).unwrap();
    let header = tampered
        .windows(27)
        .position(|w| w == b"resources/shop/database.sql")
        .unwrap();
    let inside = header - (header % 512) + 512 + 10;
    tampered[inside] ^= 0xff;
    let error = refused(dir.path(), tampered, "tampered.tar").await;
    assert!(error.contains("resources/shop/database.sql is damaged"), "{error}");

    let second = TestApp::start(restoring(dir.path(), &file).await).await;
    let data = second.state.config.data_dir.clone();
    let _servers = ResourceServers::at(&data);
    wait_for(150, "the restored app to run", || async {
        let app: Value = second.get_json("/apps/shop").await;
        (app["status"] == "running").then_some(())
    })
    .await;
    assert_eq!(notes(&second, "shop", "read").await, "pg=kept\nredis=kept\n");
    let orders = crate::resources::export(&second, "shop", "orders").await;
    assert!(String::from_utf8_lossy(&orders).contains("kept-order"));
    // The bring-back's log says so (its services start once every resource is ready).
    let mut log = String::new();
    for name in ["database", "cache", "orders"] {
        let line = format!("system/local/resource/{name} restored from the backup");
        log = second.wait_for_log_line("shop", &line, 150).await;
        assert_eq!(log.matches(&line).count(), 1, "loaded once: {log}");
    }
    assert!(!log.contains("resource/sessions restored"), "{log}");
    // The restored redis keeps its data across its own restarts: its AOF (on again) holds it.
    let cache = data.join("resources/shop/cache");
    assert!(
        std::fs::read_to_string(cache.join("redis.conf"))
            .unwrap()
            .contains("appendonly yes")
    );
    let base = crate::helpers::files_under(&cache.join("data/appendonlydir"))
        .into_iter()
        .find(|f| f.to_string_lossy().ends_with(".base.rdb"))
        .expect("an AOF base");
    assert!(
        std::fs::read(&base).unwrap().windows(4).any(|w| w == b"kept"),
        "the AOF holds the restored data"
    );
    let pending = data.join("resource-imports/shop");
    assert!(
        crate::helpers::files_under(&pending).is_empty(),
        "each export is removed once loaded: {:?}",
        crate::helpers::files_under(&pending)
    );

    // An export left behind (rack stopped after loading it, before removing it) is not loaded
    // again into the resource that has it: what was written since stays.
    notes(&second, "shop", "write later").await;
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(&unpacked)
        .arg("resources/shop/database.sql")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(
        unpacked.join("resources/shop/database.sql"),
        pending.join("database.sql"),
    )
    .unwrap();
    let mut config = second.state.config.clone();
    config.backup.restore = None;
    second.stop().await;
    let third = TestApp::start(config).await;
    wait_for(150, "the app to run again", || async {
        let app: Value = third.get_json("/apps/shop").await;
        (app["status"] == "running").then_some(())
    })
    .await;
    assert_eq!(notes(&third, "shop", "read").await, "pg=kept,later\nredis=later\n");
    assert!(!pending.join("database.sql").exists(), "the leftover export is removed");
    third.stop().await;
}

/// On a runtime that does not load exports into the resources of a restored rack (the fake
/// runtime), a backup leaves the resources' data out and
/// its manifest says so for each, rather than holding exports no restore would load.
#[tokio::test]
async fn a_runtime_that_cannot_restore_resources_has_them_listed_as_left_out() {
    use futures_util::StreamExt;
    rack::tls::install_provider();
    let url = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let config = rack::config::Config::for_tests(data.path().join("rack"), rack::config::Database::Url(url), PASSWORD);
    let fake = std::sync::Arc::new(rack::runtime::fake::FakeRuntime::new(MANIFEST));
    let app = rack::Application::build_with(config, fake).await.unwrap();
    let state = app.state().clone();
    let name = rack::names::AppName::parse("shop").unwrap();
    rack::store::apps::insert(&state.pool, &name, "1").await.unwrap();
    let new = rack::store::resources::NewResource {
        name: "database",
        kind: "postgres",
        definition: serde_json::json!({ "options": {} }),
        username: "app",
        password: "secret",
        database: "app",
    };
    rack::store::resources::ensure(&state.pool, "shop", std::slice::from_ref(&new))
        .await
        .unwrap();
    rack::store::resources::applied(&state.pool, "shop", &[("database".to_owned(), new.definition.clone())])
        .await
        .unwrap();

    let options = rack::backup::archive::Options {
        images: false,
        resources: true,
    };
    let prepared = rack::backup::archive::prepare(&state, options, false)
        .await
        .unwrap()
        .unwrap();
    let (mut body, writer) = rack::backup::archive::stream(&state, prepared);
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    writer.await.unwrap().unwrap();
    let file = data.path().join("fake.tar");
    std::fs::write(&file, bytes).unwrap();
    let manifest = rack::backup::restore::verify(&file).unwrap().manifest;
    assert_eq!(manifest.resources.len(), 1, "{:?}", manifest.resources);
    let record = &manifest.resources[0];
    assert_eq!(
        (record.app.as_str(), record.name.as_str(), record.kind.as_str()),
        ("shop", "database", "postgres")
    );
    assert!(record.path.is_none(), "{record:?}");
    let why = record.skipped.as_deref().unwrap_or_default();
    assert!(
        why.contains("fake runtime does not bring resources' data back"),
        "{why}"
    );
    assert!(manifest.entries.iter().all(|e| !e.path.starts_with("resources/")));
}

/// Rack-wide resources (`rack rack resources create`) are in backups too: a shared postgres and
/// a shared redis hold a row and a key, the backup has their exports under `resources/@rack/`,
/// and a second server restoring it brings both back running, with their data, at its start.
#[tokio::test]
async fn rack_wide_resources_come_back_from_a_backup_with_their_data() {
    use crate::resources::{ResourceServers, create_shared_redis, parse_json, redis_cli, send_form};
    use sqlx::Connection;
    let first = TestApp::spawn().await;
    let first_servers = ResourceServers::at(&first.state.config.data_dir);
    let redis = create_shared_redis(&first).await;
    redis_cli(redis["url"].as_str().unwrap(), &["SET", "kept", "shared-value"]).await;
    let form = [("kind", "postgres"), ("name", "ledger")];
    let (status, text) = send_form(&first, Method::POST, "/resources", &form).await;
    assert_eq!(status, 200, "{text}");
    let ledger_url = parse_json(&text)["url"].as_str().unwrap().to_owned();
    let mut ledger = sqlx::PgConnection::connect(&ledger_url).await.unwrap();
    sqlx::raw_sql("create table entries (v text); insert into entries values ('kept-entry')")
        .execute(&mut ledger)
        .await
        .unwrap();
    ledger.close().await.unwrap();

    let dir = crate::helpers::reachable_tempdir();
    let file = dir.path().join("rack.tar");
    download(&first, "?images=false", &file).await;
    let manifest = rack::backup::restore::verify(&file).unwrap().manifest;
    for (name, path) in [
        ("ledger", "resources/@rack/ledger.sql"),
        ("shared", "resources/@rack/shared.rdb"),
    ] {
        let record = manifest
            .resources
            .iter()
            .find(|r| r.app == "@rack" && r.name == name)
            .unwrap_or_else(|| panic!("{name} in {:?}", manifest.resources));
        assert_eq!(record.path.as_deref(), Some(path), "{record:?}");
        let entry = manifest
            .entries
            .iter()
            .find(|e| e.path == path)
            .expect("the export is an entry");
        assert!(
            entry.size > 0 && entry.sha256.as_ref().is_some_and(|s| s.len() == 64),
            "{entry:?}"
        );
    }
    drop(first_servers);
    first.stop().await;

    let second = TestApp::start(restoring(dir.path(), &file).await).await;
    let data = second.state.config.data_dir.clone();
    let _servers = ResourceServers::at(&data);
    let listed = wait_for(150, "the rack-wide resources running again", || async {
        let list: Value = second.get_json("/resources").await;
        let all = list.as_array()?;
        // Its URL shows once its server answers (the restored row said running before).
        let up = |r: &Value| r["status"] == "running" && r["url"].as_str().is_some_and(|u| !u.is_empty());
        (all.len() == 2 && all.iter().all(up)).then_some(list)
    })
    .await;
    let url_of = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["url"].as_str())
            .unwrap_or_else(|| panic!("{name} in {listed}"))
            .to_owned()
    };
    let mut ledger = sqlx::PgConnection::connect(&url_of("ledger")).await.unwrap();
    let kept: String = sqlx::query_scalar("select v from entries")
        .fetch_one(&mut ledger)
        .await
        .unwrap();
    assert_eq!(kept, "kept-entry");
    ledger.close().await.unwrap();
    assert_eq!(redis_cli(&url_of("shared"), &["GET", "kept"]).await, "shared-value");
    let pending = data.join("resource-imports/@rack");
    assert!(
        crate::helpers::files_under(&pending).is_empty(),
        "each export is removed once loaded: {:?}",
        crate::helpers::files_under(&pending)
    );
    second.stop().await;
}
