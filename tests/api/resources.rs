//! Resources of convox.yml on the embedded default: an app in process mode linking a postgres
//! and a redis resource writes and reads through `DATABASE_URL` / `CACHE_URL` (with `psql` and
//! `redis-cli` in its process); the data survives a redeploy, a rollback and a kill -9 of rack;
//! export and import round-trip; the convox CLI's resource requests; manifest errors. The same
//! for mysql (MariaDB's `mysql` client) and memcached (a Python client), and postgis.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::deploys::{promote_follow, rollback_release};
use crate::helpers::{TestApp, wait_for};

/// An app whose `web` (a process, no port) links a postgres and a redis resource.
pub const MANIFEST: &str = "resources:
  database:
    type: postgres
  cache:
    type: redis
    options:
      memory: 32
services:
  web:
    command: sleep 86400
    resources:
      - database
      - cache
";

/// Writes a note (`write <text>`) to both resources, or reads them back (`read`).
pub const NOTES: &str = r#"set -e
case "$1" in
  write)
    psql "$DATABASE_URL" -qtAc "create table if not exists notes (v text); insert into notes values ('$2')"
    redis-cli -u "$CACHE_URL" --no-auth-warning set note "$2" >/dev/null
    ;;
  read)
    echo "pg=$(psql "$DATABASE_URL" -tAc "select string_agg(v, ',' order by v) from notes")"
    echo "redis=$(redis-cli -u "$CACHE_URL" --no-auth-warning get note)"
    ;;
  env)
    echo "$DATABASE_HOST:$DATABASE_PORT/$DATABASE_NAME $DATABASE_USER $CACHE_HOST"
    ;;
esac
"#;

/// Stops the resource servers a test leaves under `data` (they outlive rack by design), even
/// when the test fails half-way.
pub struct ResourceServers(std::path::PathBuf);

impl ResourceServers {
    pub fn at(data: &Path) -> Self {
        Self(data.join("resources"))
    }
}

impl Drop for ResourceServers {
    fn drop(&mut self) {
        for app in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            for resource in std::fs::read_dir(app.path()).into_iter().flatten().flatten() {
                let dir = resource.path();
                let pids = [
                    dir.join("data/postmaster.pid"),
                    dir.join("redis.pid"),
                    dir.join("memcached.pid"),
                    dir.join("mariadbd.pid"),
                ];
                for pid in pids.iter().filter_map(|p| std::fs::read_to_string(p).ok()) {
                    if let Some(pid) = pid.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) {
                        let _ =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
    }
}

/// Builds `files` for `name` and returns the release.
async fn build(app: &TestApp, name: &str, files: &[(&str, &str)]) -> Value {
    let id = app.build_source(name, files).await;
    app.wait_build(name, &id).await
}

/// The id of the running process of `web`.
async fn web_process(app: &TestApp, name: &str) -> String {
    wait_for(60, "the web process", || async {
        let processes: Value = app.get_json(&format!("/apps/{name}/processes")).await;
        processes.as_array()?.iter().find_map(|p| {
            (p["name"] == "web" && p["status"] == "running").then(|| p["id"].as_str().unwrap().to_owned())
        })
    })
    .await
}

/// Runs `notes.sh <args>` in the web process; its output.
pub async fn notes(app: &TestApp, name: &str, args: &str) -> String {
    let id = web_process(app, name).await;
    let (output, code) = crate::run::exec_output(
        app,
        &format!("/apps/{name}/processes/{id}/exec"),
        &[("command", &format!("sh notes.sh {args}"))],
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    // The exec's output comes through a terminal.
    output.replace("\r\n", "\n")
}

#[tokio::test]
async fn a_process_app_reads_and_writes_its_resources_across_redeploys_and_rollbacks() {
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    assert_eq!(app.create_app("shop").await.status(), 201);
    let files = [("convox.yml", MANIFEST), ("notes.sh", NOTES)];
    let first = build(&app, "shop", &files).await;
    assert_eq!(first["status"], "complete", "{first}");
    let first = first["release"].as_str().unwrap().to_owned();
    let log = promote_follow(&app, "shop", &first).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert!(log.contains("system/local/resource/database creating"), "{log}");
    assert!(log.contains("system/local/resource/cache ready"), "{log}");

    let env = notes(&app, "shop", "env").await;
    assert!(
        env.starts_with("127.0.0.1:") && env.contains("/app app 127.0.0.1"),
        "{env}"
    );
    notes(&app, "shop", "write one").await;
    assert_eq!(notes(&app, "shop", "read").await, "pg=one\nredis=one\n");

    // A redeploy (a new build) keeps the data, and the same credentials.
    let second = build(&app, "shop", &files).await["release"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, "shop", &second).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert!(!log.contains("resource/database creating"), "{log}");
    notes(&app, "shop", "write two").await;
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,two\nredis=two\n");

    // A rollback to the first release keeps it too.
    let rollback = rollback_release(&app, "shop", &first).await;
    let log = promote_follow(&app, "shop", &rollback).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,two\nredis=two\n");

    // `convox resources`: the list (the password masked for a read-only token), `info` and
    // `url` (the password shown to a deploy credential).
    let resources: Value = app.get_json("/apps/shop/resources").await;
    assert_eq!(resources[0]["name"], "cache", "{resources}");
    assert_eq!(resources[1]["type"], "postgres", "{resources}");
    assert_eq!(resources[1]["status"], "running", "{resources}");
    let url = resources[1]["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("postgres://app:") && url.ends_with("/app"), "{url}");
    let token: Value = app
        .json(Method::POST, "/tokens")
        .form(&[("name", "viewer"), ("role", "read")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let viewer = token["token"].as_str().unwrap();
    let masked: Value = app
        .client
        .get(app.url("/apps/shop/resources/database"))
        .basic_auth("convox", Some(viewer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(masked["url"].as_str().unwrap().contains(":********@"), "{masked}");
    let feed = app
        .get_text("/events?follow=false&after=0&app=shop&kind=resource.")
        .await;
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    assert!(
        feed.contains("resource.created") && feed.contains("resource.ready"),
        "{feed}"
    );
    assert!(!feed.contains(password), "no secret in the feed");

    // export -> import round-trips the database.
    let dump = export(&app, "shop", "database").await;
    assert!(
        String::from_utf8_lossy(&dump).contains("COPY public.notes"),
        "a plain-SQL dump"
    );
    notes(&app, "shop", "write three").await;
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,three,two\nredis=three\n");
    assert_eq!(import(&app, "shop", "database", dump).await, (200, "ok\n".to_owned()));
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,two\nredis=three\n");
    let rdb = export(&app, "shop", "cache").await;
    assert!(rdb.starts_with(b"REDIS"), "an RDB file");

    // A redis import: anything but an RDB file is refused, the data untouched; an RDB file
    // that redis cannot load fails and leaves the data as it was; the exported one replaces
    // the data (and survives a restart of the server, below).
    let cache: Value = app.get_json("/apps/shop/resources/cache").await;
    let cache_url = cache["url"].as_str().unwrap().to_owned();
    redis_cli(&cache_url, &["set", "note", "changed"]).await;
    let import_cache = |body: Vec<u8>| import(&app, "shop", "cache", body);
    let (status, text) = import_cache(b"COPY public.notes (v) FROM stdin;\n".to_vec()).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("not an RDB file"), "{text}");
    let mut truncated = rdb.to_vec();
    truncated.truncate(rdb.len() - 12);
    let (status, text) = import_cache(truncated).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("end-of-file"), "{text}");
    // A header, the end-of-file marker, and garbage between: redis refuses to load it.
    let mut garbage = b"REDIS0009".to_vec();
    garbage.extend_from_slice(&[0x42; 32]);
    garbage.push(0xFF);
    garbage.extend_from_slice(&[0; 8]);
    let (status, text) = import_cache(garbage).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("the data is as it was"), "{text}");
    assert_eq!(redis_cli(&cache_url, &["get", "note"]).await, "changed");
    assert_eq!(import_cache(rdb.to_vec()).await, (200, "ok\n".to_owned()));
    assert_eq!(redis_cli(&cache_url, &["get", "note"]).await, "three");
    let data = app.state.config.data_dir.join("resources/shop/cache");
    assert!(!data.join("data.before-import").exists(), "the old data is gone");

    // `convox resources proxy`: a postgres session through the websocket (its SSL request is
    // answered `N`); any other address is refused.
    let authority = url.rsplit('@').next().unwrap().split('/').next().unwrap();
    let (host, port) = authority.split_once(':').unwrap();
    let answer = proxy_ssl_request(&app, host, port).await;
    assert_eq!(answer.as_deref(), Ok(&b"N"[..]));
    let own = app.addr.port().to_string();
    for (host, port) in [("127.0.0.1", own.as_str()), ("10.0.0.1", port), ("localhost", port)] {
        assert_eq!(proxy_ssl_request(&app, host, port).await, Err(403), "{host}:{port}");
    }
    // `convox resources console`: psql on a terminal runs a query.
    let output = console(
        &app,
        "/apps/shop/resources/database/console",
        "select 40 + 2 as answer;\n\\q\n",
    )
    .await;
    assert!(output.contains("42"), "{output}");

    // The audit log is written behind the answer.
    wait_for(30, "the refusal to be audited", || async {
        let audit: Value = app.get_json("/audit").await;
        audit.to_string().contains("/proxy/10.0.0.1/").then_some(())
    })
    .await;

    // `rack resources`: list, url, export to a file and import it back.
    let listed = rack_cli(&app, &["resources", "-a", "shop"]).await;
    assert!(
        listed.contains("cache") && listed.contains("postgres") && listed.contains("running"),
        "{listed}"
    );
    assert_eq!(
        rack_cli(&app, &["resources", "url", "database", "-a", "shop"])
            .await
            .trim(),
        url
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    rack_cli(&app, &["resources", "export", "database", "-a", "shop", "-f", path]).await;
    assert!(std::fs::read_to_string(path).unwrap().contains("COPY public.notes"));
    rack_cli(&app, &["resources", "import", "database", "-a", "shop", "-f", path]).await;
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,two\nredis=three\n");

    // The imported data survives a restart of its server: stopped here, it is started again
    // by the next deployment, from its AOF.
    let redis = pid_in(&data.join("redis.pid"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(redis), nix::sys::signal::Signal::SIGTERM).unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    wait_for(60, "redis to stop", || async { (!alive(redis)).then_some(()) }).await;

    // A variable set with `env set` wins over the injected one (an external database).
    let external = crate::deploys::create_release(&app, "shop", &[("env", "DATABASE_USER=external")]).await;
    let log = promote_follow(&app, "shop", external["id"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert_ne!(pid_in(&data.join("redis.pid")), redis, "restarted");
    assert_eq!(notes(&app, "shop", "read").await, "pg=one,two\nredis=three\n");
    let env = notes(&app, "shop", "env").await;
    assert!(env.contains("/app external 127.0.0.1"), "{env}");

    // A release that stops declaring the cache leaves it (unlinked) until it is deleted.
    let without = MANIFEST
        .replace("  cache:\n    type: redis\n    options:\n      memory: 32\n", "")
        .replace("      - cache\n", "");
    let third = build(&app, "shop", &[("convox.yml", &without), ("notes.sh", NOTES)]).await;
    let log = promote_follow(&app, "shop", third["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let cache: Value = app.get_json("/apps/shop/resources/cache").await;
    assert_eq!(cache["status"], "unlinked", "{cache}");
    let refused = app
        .convox(Method::DELETE, "/apps/shop/resources/database")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409, "a linked resource is not deleted");
    rack_cli(&app, &["resources", "delete", "cache", "-a", "shop"]).await;
    let gone = app
        .convox(Method::GET, "/apps/shop/resources/cache")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert!(!app.state.config.data_dir.join("resources/shop/cache").exists());

    assert_eq!(app.delete_app("shop").await.status(), 200);
    let dir = app.state.config.data_dir.join("resources").join("shop");
    wait_for(60, "the resources' data to go with the app", || async {
        (!dir.exists()).then_some(())
    })
    .await;
}

/// Opens the proxy websocket to `host:port` as the convox CLI does, sends postgres's SSL
/// request, and returns the first bytes that come back (or the handshake's refusal status).
async fn proxy_ssl_request(app: &TestApp, host: &str, port: &str) -> Result<Vec<u8>, u16> {
    proxy_exchange(app, host, port, &[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]).await
}

/// Opens the proxy websocket to `host:port` as the convox CLI does, sends `payload`, and returns
/// the first bytes that come back (or the handshake's refusal status).
async fn proxy_exchange(app: &TestApp, host: &str, port: &str, payload: &[u8]) -> Result<Vec<u8>, u16> {
    let mut request = format!("ws://{}/proxy/{host}/{port}", app.addr)
        .into_client_request()
        .unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("convox:{}", crate::helpers::PASSWORD),
    );
    request
        .headers_mut()
        .insert("authorization", format!("Basic {auth}").parse().unwrap());
    let socket = match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => socket,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => return Err(response.status().as_u16()),
        Err(e) => panic!("the handshake: {e}"),
    };
    let (mut sink, mut source) = socket.split();
    sink.send(Message::Binary(payload.to_vec().into())).await.unwrap();
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(30), source.next())
            .await
            .expect("an answer")
            .expect("open")
            .unwrap();
        if let Message::Binary(data) = frame {
            return Ok(data.to_vec());
        }
    }
}

/// The pid in the first line of `file`.
fn pid_in(file: &Path) -> i32 {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// Resources outlive rack: after `kill -9` and a restart, the same servers (adopted, not
/// started again) serve the data written before.
#[tokio::test]
async fn after_kill_9_a_restarted_rack_adopts_its_resources_and_their_data() {
    let database = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let _servers = ResourceServers::at(data.path());
    let mut rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    crate::replicas::create_app(&rack, "keeper").await;
    // A sleep of its own length, to find this test's app process on the host; the app's command
    // runs it as a grandchild (a shell starting a shell), which rack's end must reach too.
    let marker = (90_000 + std::process::id() % 10_000).to_string();
    let manifest = MANIFEST.replace(
        "command: sleep 86400",
        &format!("command: sh -c 'sh notes.sh write started; exec sleep {marker}'"),
    );
    let id = rack
        .build("keeper", &[("convox.yml", &manifest), ("notes.sh", NOTES)])
        .await;
    let build = rack.wait_build("keeper", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let release = build["release"].as_str().unwrap().to_owned();
    let promote = rack
        .request(Method::POST, &format!("/apps/keeper/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 201);
    wait_for(120, "the app to run", || async {
        let app = rack.json("/apps/keeper").await;
        (app["status"] == "running" && app["release"] == release.as_str()).then_some(())
    })
    .await;
    let export = |rack: &crate::replicas::Replica| {
        let request = rack.request(Method::GET, "/apps/keeper/resources/database/data");
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    wait_for(60, "the process to write its note", || async {
        export(&rack).await.contains("started").then_some(())
    })
    .await;
    let dir = data.path().join("resources/keeper");
    let postmaster = pid_in(&dir.join("database/data/postmaster.pid"));
    let redis = pid_in(&dir.join("cache/redis.pid"));

    // Idle, a postgres resource (the postmaster and its children) stays well under 100 MiB.
    let memory = pss_kib(postmaster) + children(postmaster).into_iter().map(pss_kib).sum::<u64>();
    assert!(memory < 100 * 1024, "an idle postgres resource takes {memory} KiB");
    assert!(
        pss_kib(redis) < 50 * 1024,
        "an idle redis resource takes {} KiB",
        pss_kib(redis)
    );
    eprintln!("idle memory: postgres {memory} KiB, redis {} KiB", pss_kib(redis));

    assert!(
        !crate::helpers::processes_with_arg(&marker).is_empty(),
        "the app's sleep runs"
    );
    let app_processes = || {
        let mut pids = crate::helpers::processes_with_arg(&marker);
        pids.sort_unstable();
        pids
    };
    let before = app_processes();
    rack.kill_9().await;
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(postmaster) && alive(redis), "the resources outlive rack");
    // So do the app's processes (under their keepers), grandchildren too.
    assert_eq!(app_processes(), before, "the app outlives rack");

    let rack = crate::replicas::Replica::start(&database, data.path(), &[]).await;
    wait_for(120, "the app to run again", || async {
        let processes = rack.json("/apps/keeper/processes").await;
        processes
            .as_array()?
            .iter()
            .any(|p| p["status"] == "running")
            .then_some(())
    })
    .await;
    assert_eq!(app_processes(), before, "adopted, not started again");
    let dump = export(&rack).await;
    assert!(dump.contains("started"), "{dump}");
    assert_eq!(pid_in(&dir.join("database/data/postmaster.pid")), postmaster, "adopted");
    assert_eq!(pid_in(&dir.join("cache/redis.pid")), redis, "adopted");
    let info = rack.json("/apps/keeper/resources/cache").await;
    assert_eq!(info["status"], "running", "{info}");
    assert!(
        rack.request(Method::DELETE, "/apps/keeper")
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    wait_for(60, "the resources to stop with the app", || async {
        (!alive(postmaster) && !alive(redis)).then_some(())
    })
    .await;
}

/// A manifest whose resources rack cannot honour fails the build, naming the key and line.
#[tokio::test]
async fn bad_resources_fail_the_build_naming_the_key_and_line() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("wrong").await.status(), 201);
    for (manifest, wanted) in [
        (
            "resources:\n  db:\n    type: mongodb\nservices:\n  web:\n    command: sleep 1\n",
            "resources.db.type: unknown resource type \"mongodb\"",
        ),
        (
            "resources:\n  db:\n    type: postgres\n    options:\n      storage: lots\n",
            "resources.db.options.storage: invalid value \"lots\"",
        ),
        (
            "services:\n  web:\n    command: sleep 1\n    resources:\n      - database\n",
            "services.web.resources: no resource \"database\"",
        ),
    ] {
        let build = build(&app, "wrong", &[("convox.yml", manifest)]).await;
        assert_eq!(build["status"], "failed", "{build}");
        let reason = build["reason"].as_str().unwrap();
        assert!(reason.contains(wanted), "{reason}");
        assert!(reason.contains("(line "), "{reason}");
    }
}

/// Runs `redis-cli -u url args` on this host; its output, trimmed.
pub async fn redis_cli(url: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new("redis-cli")
        .args(["-u", url, "--no-auth-warning"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A request as the convox CLI sends it, with `form` as its body: its status and text.
pub async fn send_form(app: &TestApp, method: Method, path: &str, form: &[(&str, &str)]) -> (u16, String) {
    let response = app.convox(method, path).form(form).send().await.unwrap();
    crate::helpers::status_text(response).await
}

/// `text` as JSON (a panic naming it when it is not).
pub fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `rack resources create redis --name shared memory=32`: asserts it answers 200 with the
/// resource running at once; the resource as answered.
pub async fn create_shared_redis(app: &TestApp) -> Value {
    let form = [("kind", "redis"), ("name", "shared"), ("parameters", "memory=32")];
    let (status, text) = send_form(app, Method::POST, "/resources", &form).await;
    assert_eq!(status, 200, "{text}");
    let created = parse_json(&text);
    assert_eq!(created["status"], "running", "{created}");
    created
}

/// Runs the rack CLI against `app`; its standard output (it must succeed).
pub async fn rack_cli(app: &TestApp, args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
        .env(
            "RACK_URL",
            format!("http://convox:{}@{}", crate::helpers::PASSWORD, app.addr),
        )
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("the CLI finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rack {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A resource's export (`GET …/data`, as `convox resources export` asks), which must be 200.
pub async fn export(app: &TestApp, name: &str, resource: &str) -> bytes::Bytes {
    let response = app
        .convox(Method::GET, &format!("/apps/{name}/resources/{resource}/data"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body
}

/// Imports `body` into a resource (`PUT …/data`, as `convox resources import` sends it): the
/// status and the text of the answer.
pub async fn import(app: &TestApp, name: &str, resource: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let response = app
        .convox(Method::PUT, &format!("/apps/{name}/resources/{resource}/data"))
        .body(body)
        .send()
        .await
        .unwrap();
    crate::helpers::status_text(response).await
}

/// The proportional set size of process `pid`, in KiB (shared pages split among their users).
fn pss_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent is the second field after the command, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Opens a console websocket as the convox CLI does, types `input`, and returns what the
/// terminal showed until the console exited.
async fn console(app: &TestApp, path: &str, input: &str) -> String {
    let mut request = format!("ws://{}{path}", app.addr).into_client_request().unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("convox:{}", crate::helpers::PASSWORD),
    );
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Basic {auth}").parse().unwrap());
    headers.insert("height", "24".parse().unwrap());
    headers.insert("width", "80".parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("the handshake");
    let (mut sink, mut source) = socket.split();
    sink.send(Message::Binary(input.as_bytes().to_vec().into()))
        .await
        .unwrap();
    let mut output = Vec::new();
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(30), source.next())
            .await
            .expect("the console to answer and exit");
        match frame {
            Some(Ok(Message::Binary(data))) => output.extend_from_slice(&data),
            Some(Ok(Message::Text(text))) => output.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    String::from_utf8_lossy(&output).into_owned()
}

/// The release phase (a migration, typically) runs before anything else of a release: its
/// resources are there for it, linked.
#[tokio::test]
async fn a_release_command_reaches_the_resources_of_its_first_release() {
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    assert_eq!(app.create_app("migrate").await.status(), 201);
    let manifest = MANIFEST.replace(
        "    command: sleep 86400\n",
        "    command: sleep 86400\n    release: sh notes.sh write migrated\n",
    );
    let built = build(&app, "migrate", &[("convox.yml", &manifest), ("notes.sh", NOTES)]).await;
    assert_eq!(built["status"], "complete", "{built}");
    let log = promote_follow(&app, "migrate", built["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let creating = log.find("resource/database creating").expect("created");
    let released = log.find("Status: Releasing => Updating").expect("released");
    assert!(creating < released, "{log}");
    assert_eq!(notes(&app, "migrate", "read").await, "pg=migrated\nredis=migrated\n");
    assert_eq!(app.delete_app("migrate").await.status(), 200);
}

/// A resource this runtime cannot run (one with an `image:`) fails the deployment, saying so,
/// and is `failed`.
#[tokio::test]
async fn a_resource_the_local_runtime_cannot_run_fails_the_deployment_saying_so() {
    let app = TestApp::spawn().await;
    assert_eq!(app.create_app("imaged").await.status(), 201);
    let manifest = "resources:\n  db:\n    type: mysql\n    image: mysql:8\nservices:\n  web:\n    command: sleep 86400\n    resources: [db]\n";
    let built = build(&app, "imaged", &[("convox.yml", manifest)]).await;
    assert_eq!(built["status"], "complete", "{built}");
    let log = promote_follow(&app, "imaged", built["release"].as_str().unwrap()).await;
    assert!(log.contains("not images: remove `image:`"), "{log}");
    assert!(log.trim_end().ends_with("rollback") || log.contains("ERROR"), "{log}");
    let db: Value = app.get_json("/apps/imaged/resources/db").await;
    assert_eq!(db["status"], "failed", "{db}");
    assert_eq!(db["url"], "", "{db}");
    let feed = app
        .request(
            Method::GET,
            "/events?follow=false&after=0&app=imaged&kind=resource.failed",
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(feed.contains("resource.failed"), "{feed}");
}

/// An app whose `web` links a mysql and a memcached resource.
pub const SQL_MANIFEST: &str = "resources:
  db:
    type: mysql
  sessions:
    type: memcached
    options:
      memory: 16
services:
  web:
    command: sleep 86400
    resources:
      - db
      - sessions
";

/// Writes a note (`write <text>`) to the mysql database (the `mysql` client, with the
/// `DB_*` variables) and to memcached (a few lines of Python speaking its text protocol), or
/// reads them back (`read`).
pub const SQL_NOTES: &str = r#"set -e
export MYSQL_PWD="$DB_PASS"
sql() { mysql --no-defaults -h "$DB_HOST" -P "$DB_PORT" -u "$DB_USER" -N "$DB_NAME" -e "$1"; }
cache() {
  python3 -c '
import os, socket, sys
s = socket.create_connection((os.environ["SESSIONS_HOST"], int(os.environ["SESSIONS_PORT"])), timeout=10)
f = s.makefile("rb")
if sys.argv[1] == "set":
    v = sys.argv[2].encode()
    s.sendall(b"set note 0 0 %d\r\n%s\r\n" % (len(v), v))
    assert f.readline() == b"STORED\r\n"
else:
    s.sendall(b"get note\r\n")
    line = f.readline()
    print(f.readline().decode().strip() if line.startswith(b"VALUE") else "")
' "$@"
}
case "$1" in
  write)
    sql "create table if not exists notes (v varchar(64)); insert into notes values ('$2')"
    cache set "$2"
    ;;
  read)
    echo "sql=$(sql "select group_concat(v order by v) from notes")"
    echo "cache=$(cache get)"
    ;;
  env)
    echo "$DB_URL $SESSIONS_URL"
    ;;
esac
"#;

/// mysql and memcached resources on the embedded default: a process writes and reads both;
/// export → import round-trips the database; memcached has nothing to export (422); another
/// app's credentials do not open this app's database.
#[tokio::test]
async fn a_process_app_reads_and_writes_mysql_and_memcached() {
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    assert_eq!(app.create_app("store").await.status(), 201);
    let files = [("convox.yml", SQL_MANIFEST), ("notes.sh", SQL_NOTES)];
    let built = build(&app, "store", &files).await;
    assert_eq!(built["status"], "complete", "{built}");
    let log = promote_follow(&app, "store", built["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert!(log.contains("system/local/resource/db ready"), "{log}");
    assert!(log.contains("system/local/resource/sessions ready"), "{log}");

    let env = notes(&app, "store", "env").await;
    assert!(env.starts_with("mysql://app:") && env.contains("@127.0.0.1:"), "{env}");
    assert!(env.contains(" memcached://127.0.0.1:"), "{env}");
    notes(&app, "store", "write one").await;
    assert_eq!(notes(&app, "store", "read").await, "sql=one\ncache=one\n");

    // export -> import round-trips the database.
    let dump = export(&app, "store", "db").await;
    assert!(
        String::from_utf8_lossy(&dump).contains("INSERT INTO `notes` VALUES"),
        "a mysqldump"
    );
    notes(&app, "store", "write two").await;
    assert_eq!(notes(&app, "store", "read").await, "sql=one,two\ncache=two\n");
    assert_eq!(import(&app, "store", "db", dump).await, (200, "ok\n".to_owned()));
    assert_eq!(notes(&app, "store", "read").await, "sql=one\ncache=two\n");
    let (status, text) = import(&app, "store", "db", "select * from nowhere;").await;
    assert_eq!(status, 422, "an import stops at an error: {text}");
    let cache = app
        .convox(Method::GET, "/apps/store/resources/sessions/data")
        .send()
        .await
        .unwrap();
    let (status, text) = crate::helpers::status_text(cache).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("a memcached resource is a cache"), "{text}");

    // The console: the mysql client on a terminal runs a query.
    let output = console(
        &app,
        "/apps/store/resources/db/console",
        "select 40 + 2 as answer;\nexit\n",
    )
    .await;
    assert!(output.contains("42"), "{output}");

    // Another app's mysql: its credentials do not open this one's, nor the reverse.
    assert_eq!(app.create_app("rival").await.status(), 201);
    let rival = [(
        "convox.yml",
        SQL_MANIFEST
            .replace("  sessions:\n    type: memcached\n    options:\n      memory: 16\n", "")
            .replace("      - sessions\n", ""),
    )];
    let rival_files: Vec<(&str, &str)> = rival.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let built = build(&app, "rival", &rival_files).await;
    let log = promote_follow(&app, "rival", built["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let url_of = |name: &'static str| {
        let app = &app;
        async move {
            let info: Value = app.get_json(&format!("/apps/{name}/resources/db")).await;
            info["url"].as_str().unwrap().to_owned()
        }
    };
    let (own, other) = (url_of("store").await, url_of("rival").await);
    assert_ne!(own, other);
    let parts = |url: &str| {
        let rest = url.strip_prefix("mysql://").unwrap();
        let (auth, rest) = rest.split_once('@').unwrap();
        let (user, password) = auth.split_once(':').unwrap();
        let (hostport, database) = rest.split_once('/').unwrap();
        let port = hostport.rsplit(':').next().unwrap();
        (
            user.to_owned(),
            password.to_owned(),
            port.to_owned(),
            database.to_owned(),
        )
    };
    let (user, password, _, database) = parts(&other);
    let (_, own_password, port, _) = parts(&own);
    let try_with = |password: String| {
        let (user, port, database) = (user.clone(), port.clone(), database.clone());
        async move {
            tokio::process::Command::new("mysql")
                .args([
                    "--no-defaults",
                    "--protocol=tcp",
                    "-h",
                    "127.0.0.1",
                    "-P",
                    &port,
                    "-u",
                    &user,
                ])
                .args(["-N", &database, "-e", "select count(*) from notes"])
                .env("MYSQL_PWD", password)
                .output()
                .await
                .unwrap()
        }
    };
    let refused = try_with(password).await;
    assert!(!refused.status.success(), "another app's credentials are refused");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Access denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let allowed = try_with(own_password).await;
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));

    for name in ["store", "rival"] {
        assert_eq!(app.delete_app(name).await.status(), 200);
        let dir = app.state.config.data_dir.join("resources").join(name);
        wait_for(60, "the resources' data to go with the app", || async {
            (!dir.exists()).then_some(())
        })
        .await;
    }
}

/// A postgis resource: postgres with the postgis extension in the app's database, reached
/// through `DATABASE_URL`; its export (without the extension, which the app's user does not
/// own) imports back.
#[tokio::test]
async fn a_postgis_resource_answers_postgis_queries() {
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    assert_eq!(app.create_app("maps").await.status(), 201);
    let manifest = "resources:\n  database:\n    type: postgis\nservices:\n  web:\n    command: sleep 86400\n    resources: [database]\n";
    let script = r#"set -e
case "$1" in
  version) psql "$DATABASE_URL" -tAc "select postgis_version()" ;;
  write) psql "$DATABASE_URL" -qtAc "create table if not exists places (name text, at geometry(Point, 4326)); insert into places values ('$2', ST_SetSRID(ST_MakePoint(2.35, 48.85), 4326))" ;;
  read) psql "$DATABASE_URL" -tAc "select string_agg(name || ' ' || ST_AsText(at), ',' order by name) from places" ;;
esac
"#;
    let built = build(&app, "maps", &[("convox.yml", manifest), ("notes.sh", script)]).await;
    assert_eq!(built["status"], "complete", "{built}");
    let log = promote_follow(&app, "maps", built["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let version = notes(&app, "maps", "version").await;
    assert!(version.starts_with("3."), "{version}");
    notes(&app, "maps", "write paris").await;
    assert_eq!(notes(&app, "maps", "read").await, "paris POINT(2.35 48.85)\n");
    let dump = export(&app, "maps", "database").await;
    assert!(
        !String::from_utf8_lossy(&dump).contains("EXTENSION"),
        "the extension is not in the dump"
    );
    notes(&app, "maps", "write rome").await;
    assert_eq!(import(&app, "maps", "database", dump).await, (200, "ok\n".to_owned()));
    assert_eq!(notes(&app, "maps", "read").await, "paris POINT(2.35 48.85)\n");
    assert_eq!(app.delete_app("maps").await.status(), 200);
}

/// `convox rack resources ...` as the convox CLI sends them: the types and their options, create
/// (a redis at once, no deployment), info with the password masked below admin, update, link to
/// an app whose service names it (its process gets `SHARED_URL` and reaches the server), the
/// refusals (unknown type, bad option, a missing app, deleting a linked resource, a non-admin
/// write), unlink and delete.
#[tokio::test]
async fn rack_wide_resources_replay_the_convox_cli() {
    let app = TestApp::spawn().await;
    let _servers = ResourceServers::at(&app.state.config.data_dir);
    let send = async |method: Method, path: &str, form: &[(&str, &str)]| send_form(&app, method, path, form).await;
    let json = parse_json;

    // `rack resources types` / `options redis`.
    let (status, text) = send(Method::OPTIONS, "/resources", &[]).await;
    assert_eq!(status, 200, "{text}");
    let types = json(&text);
    let redis = types
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "redis")
        .expect("redis");
    assert!(redis["parameters"].to_string().contains("\"memory\""), "{redis}");

    // Refusals: an unknown type, an unknown option, a bad value.
    for (form, wanted) in [
        (vec![("kind", "mongodb"), ("name", "shared")], "unknown resource type"),
        (
            vec![("kind", "redis"), ("name", "shared"), ("parameters", "colour=red")],
            "unknown option",
        ),
        (
            vec![("kind", "redis"), ("name", "shared"), ("parameters", "memory=lots")],
            "invalid value",
        ),
    ] {
        let (status, text) = send(Method::POST, "/resources", &form).await;
        assert_eq!(status, 422, "{text}");
        assert!(text.contains(wanted), "{text}");
    }
    assert_eq!(send(Method::GET, "/resources/shared", &[]).await.0, 404);

    // `rack resources create redis --name shared memory=32`: it runs at once.
    let created = create_shared_redis(&app).await;
    assert_eq!(created["parameters"]["memory"], "32", "{created}");
    let url = created["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("redis://default:") && !url.contains("****"), "{url}");
    assert_eq!(redis_cli(&url, &["ping"]).await, "PONG");
    assert!(
        app.state
            .config
            .data_dir
            .join("resources/@rack/shared/redis.pid")
            .exists()
    );
    let (status, text) = send(Method::POST, "/resources", &[("kind", "redis"), ("name", "shared")]).await;
    assert_eq!(status, 409, "{text}");

    // A read-only token lists it with the password masked, and may not write.
    let token: Value = app
        .json(Method::POST, "/tokens")
        .form(&[("name", "viewer"), ("role", "read")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let viewer = token["token"].as_str().unwrap();
    let listed: Value = app
        .client
        .get(app.url("/resources"))
        .basic_auth("convox", Some(viewer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["name"], "shared", "{listed}");
    assert!(listed[0]["url"].as_str().unwrap().contains(":********@"), "{listed}");
    let refused = app
        .client
        .post(app.url("/resources"))
        .basic_auth("convox", Some(viewer))
        .form(&[("kind", "redis"), ("name", "other")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    // `rack resources update shared memory=48`: restarted on the new options, same data.
    redis_cli(&url, &["set", "greeting", "hello"]).await;
    let (status, text) = send(Method::PUT, "/resources/shared", &[("parameters", "memory=48")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["parameters"]["memory"], "48", "{text}");
    assert_eq!(
        redis_cli(&url, &["config", "get", "maxmemory"]).await,
        "maxmemory\n50331648"
    );
    assert_eq!(redis_cli(&url, &["get", "greeting"]).await, "hello");
    let (status, text) = send(Method::PUT, "/resources/shared", &[("parameters", "storage=5")]).await;
    assert_eq!(status, 422, "{text}");

    // `rack resources link shared -a hub`: a missing app is 404; a service of the linked app
    // names it in `resources:` without declaring it, and gets its variables.
    let (status, text) = send(Method::POST, "/resources/shared/links", &[("app", "nowhere")]).await;
    assert_eq!(status, 404, "{text}");
    assert_eq!(app.create_app("hub").await.status(), 201);
    let manifest = "services:\n  web:\n    command: sleep 86400\n    resources:\n      - shared\n";
    let unlinked = build(&app, "hub", &[("convox.yml", manifest)]).await;
    assert_eq!(unlinked["status"], "failed", "{unlinked}");
    assert!(
        unlinked["reason"].as_str().unwrap().contains("no resource \"shared\""),
        "{unlinked}"
    );
    let (status, text) = send(Method::POST, "/resources/shared/links", &[("app", "hub")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["apps"][0]["name"], "hub", "{text}");
    let linked = build(&app, "hub", &[("convox.yml", manifest)]).await;
    assert_eq!(linked["status"], "complete", "{linked}");
    // A rack-wide server that went down is started again by a deployment that links it.
    let pid_file = app.state.config.data_dir.join("resources/@rack/shared/redis.pid");
    let shared = pid_in(&pid_file);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shared), nix::sys::signal::Signal::SIGTERM).unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    wait_for(60, "redis to stop", || async { (!alive(shared)).then_some(()) }).await;
    let log = promote_follow(&app, "hub", linked["release"].as_str().unwrap()).await;
    assert!(log.ends_with("OK\n"), "{log}");
    assert!(log.contains("system/local/resource/shared starting"), "{log}");
    assert_ne!(pid_in(&pid_file), shared, "started again");
    let id = web_process(&app, "hub").await;
    let (output, code) = crate::run::exec_output(
        &app,
        &format!("/apps/hub/processes/{id}/exec"),
        &[(
            "command",
            "sh -c 'echo $SHARED_URL; redis-cli -u \"$SHARED_URL\" --no-auth-warning get greeting'",
        )],
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    // Through a terminal, redis-cli quotes its answer.
    assert_eq!(output.replace("\r\n", "\n"), format!("{url}\n\"hello\"\n"));

    // Deleting a linked resource is refused; unlinked, it goes with its data.
    let (status, text) = send(Method::DELETE, "/resources/shared", &[]).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("linked to hub"), "{text}");
    let (status, text) = send(Method::DELETE, "/resources/shared/links/hub", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert!(json(&text).get("apps").is_none(), "{text}");
    assert_eq!(send(Method::DELETE, "/resources/shared/links/hub", &[]).await.0, 404);
    // Unlinked, a release whose service still names it cannot run, and says so.
    let next = crate::deploys::create_release(&app, "hub", &[("env", "X=1")]).await;
    let log = promote_follow(&app, "hub", next["id"].as_str().unwrap()).await;
    assert!(
        !log.ends_with("OK\n") && log.contains("no resource \"shared\""),
        "{log}"
    );
    let (status, text) = send(Method::DELETE, "/resources/shared", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(send(Method::GET, "/resources/shared", &[]).await.0, 404);
    assert!(!app.state.config.data_dir.join("resources/@rack/shared").exists());
    let (status, text) = send(Method::GET, "/resources", &[]).await;
    assert_eq!((status, json(&text)), (200, serde_json::json!([])));

    // The same through `rack rack resources ...`.
    assert!(
        rack_cli(&app, &["rack", "resources", "types"])
            .await
            .contains("postgis")
    );
    let options = rack_cli(&app, &["rack", "resources", "options", "redis"]).await;
    assert!(options.contains("memory") && options.contains("64"), "{options}");
    let created = rack_cli(
        &app,
        &["rack", "resources", "create", "redis", "--name", "kv", "memory=32"],
    )
    .await;
    assert_eq!(created.trim(), "kv");
    let listed = rack_cli(&app, &["rack", "resources"]).await;
    assert!(listed.contains("kv") && listed.contains("running"), "{listed}");
    let url = rack_cli(&app, &["rack", "resources", "url", "kv"]).await;
    assert_eq!(redis_cli(url.trim(), &["ping"]).await, "PONG");
    // `convox rack resources proxy kv`: the websocket reaches the server (which wants AUTH).
    let authority = url.trim().rsplit('@').next().unwrap().split('/').next().unwrap();
    let (host, port) = authority.split_once(':').unwrap();
    let answer = proxy_exchange(&app, host, port, b"PING\r\n").await.expect("proxied");
    assert!(answer.starts_with(b"-NOAUTH"), "{}", String::from_utf8_lossy(&answer));
    rack_cli(&app, &["rack", "resources", "update", "kv", "memory=40"]).await;
    rack_cli(&app, &["rack", "resources", "link", "kv", "-a", "hub"]).await;
    let info = rack_cli(&app, &["rack", "resources", "info", "kv"]).await;
    assert!(info.contains("memory=40") && info.contains("hub"), "{info}");
    rack_cli(&app, &["rack", "resources", "unlink", "kv", "-a", "hub"]).await;
    rack_cli(&app, &["rack", "resources", "delete", "kv"]).await;
    assert_eq!(send(Method::GET, "/resources/kv", &[]).await.0, 404);
}
