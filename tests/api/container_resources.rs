//! Resources reached from containers: an app built from a Dockerfile (a container in a network
//! namespace of its own) linking a postgres and a redis resource writes and reads through
//! `DATABASE_URL` / `CACHE_URL` (Debian's `psql` and `redis-cli`, copied into the test image),
//! from its command's first instruction, from a one-off run and through exec, while its port
//! serves through the router; the data survives a redeploy, a rollback and a kill -9 of rack
//! (the forwarder outlives rack with its container, and one killed meanwhile is started again
//! when rack adopts the container); the container reaches nothing else of the host's loopback
//! (rack's API, another listener).

use std::path::Path;

use reqwest::Method;

use crate::containers::{BASE, Leftovers, base_image};
use crate::helpers::wait_for;
use crate::replicas::Replica;
use crate::resources::ResourceServers;

/// The image of the test apps: busybox with `psql` and `redis-cli` (and their libraries).
const CLIENTS: &str = "localhost/rack-test-clients:1";

static CLIENTS_IMAGE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The web service, built from its Dockerfile, links a postgres and a redis resource.
const MANIFEST: &str = "resources:
  database:
    type: postgres
  cache:
    type: redis
    options:
      memory: 32
services:
  web:
    build: .
    port: 3000
    resources:
      - database
      - cache
";

/// `boot` (the container's command, before anything else) records the release in both
/// resources; `write`/`read` a note; `probe PORT...` tries ports of the container's loopback
/// and slirp's alias of the host.
const NOTES: &str = r#"set -e
case "$1" in
  boot)
    psql "$DATABASE_URL" -qtAc "create table if not exists boots (r text primary key); insert into boots values ('$RELEASE') on conflict do nothing" \
      || { echo "boot failed"; exit 1; }
    redis-cli -u "$CACHE_URL" --no-auth-warning sadd boots "$RELEASE" >/dev/null
    ;;
  write)
    psql "$DATABASE_URL" -qtAc "create table if not exists notes (v text); insert into notes values ('$2')"
    redis-cli -u "$CACHE_URL" --no-auth-warning set note "$2" >/dev/null
    ;;
  read)
    pg=$(psql "$DATABASE_URL" -tAc "select string_agg(v, ',' order by v) from notes")
    redis=$(redis-cli -u "$CACHE_URL" --no-auth-warning get note)
    echo "pg=$pg"; echo "redis=$redis"
    ;;
  boots)
    pg=$(psql "$DATABASE_URL" -tAc "select string_agg(r, ',' order by r) from boots")
    redis=$(redis-cli -u "$CACHE_URL" --no-auth-warning scard boots)
    echo "pg=$pg"; echo "redis=$redis"
    ;;
  probe)
    shift
    for port in "$@"; do
      for host in 127.0.0.1 10.0.2.2; do
        if nc -w 2 "$host" "$port" </dev/null >/dev/null 2>&1; then echo "$host:$port reached"; else echo "$host:$port refused"; fi
      done
    done
    ;;
esac
"#;

/// Makes the clients image (once per test run: it copies this host's binaries).
async fn clients_image() {
    base_image().await;
    CLIENTS_IMAGE
        .get_or_init(|| async {
            let dir = tempfile::tempdir().unwrap();
            let context = dir.path().join("clients");
            for dir in ["bin", "lib", "lib64", "etc"] {
                std::fs::create_dir_all(context.join(dir)).unwrap();
            }
            let binaries = ["/usr/lib/postgresql/15/bin/psql", "/usr/bin/redis-cli"];
            for binary in binaries {
                let name = Path::new(binary).file_name().unwrap();
                std::fs::copy(binary, context.join("bin").join(name))
                    .unwrap_or_else(|e| panic!("{binary} (postgresql-client, redis-tools): {e}"));
                for library in libraries(binary) {
                    let name = Path::new(&library).file_name().unwrap().to_owned();
                    let into = if name.to_string_lossy().starts_with("ld-linux") {
                        context.join("lib64").join(name)
                    } else {
                        context.join("lib").join(name)
                    };
                    std::fs::copy(&library, into).unwrap();
                }
            }
            std::fs::write(context.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
            std::fs::write(
                context.join("Dockerfile"),
                format!(
                    "FROM {BASE}\nCOPY bin /clients/bin\nCOPY lib /clients/lib\nCOPY lib64 /lib64\n\
                     COPY etc/passwd /etc/passwd\n\
                     ENV PATH=/clients/bin:/bin LD_LIBRARY_PATH=/clients/lib LC_ALL=C\n"
                ),
            )
            .unwrap();
            let podman = rack::runtime::local::podman::Podman::detect(dir.path(), "rack")
                .unwrap()
                .expect("podman");
            let context = context.to_string_lossy().into_owned();
            podman
                .output(&["build", "--tag", CLIENTS, &context])
                .await
                .expect("building the clients image");
        })
        .await;
}

/// The shared libraries `binary` loads (as `ldd` lists them), the loader included.
fn libraries(binary: &str) -> Vec<String> {
    let out = std::process::Command::new("ldd").arg(binary).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, to)) => to.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// The app's files.
fn files() -> Vec<(&'static str, String)> {
    vec![
        ("convox.yml", MANIFEST.to_owned()),
        (
            "Dockerfile",
            format!(
                "FROM {CLIENTS}\nCOPY . /app\nWORKDIR /app\n\
                 CMD [\"sh\", \"-c\", \"sh notes.sh boot && exec httpd -f -p 3000 -h /app/www\"]\n"
            ),
        ),
        ("notes.sh", NOTES.to_owned()),
        ("www/index.html", "depot\n".to_owned()),
    ]
}

/// Builds the app on `rack`; the release.
async fn build(rack: &Replica) -> String {
    let files = files();
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    let id = rack.build("depot", &files).await;
    let build = rack.wait_build("depot", &id).await;
    assert_eq!(build["status"], "complete", "{build}");
    build["release"].as_str().unwrap().to_owned()
}

/// A rollback to `release` as convox makes it: a new release with its build and environment;
/// its id.
async fn rollback(rack: &Replica, release: &str) -> String {
    let old = rack.json(&format!("/apps/depot/releases/{release}")).await;
    let created = rack
        .request(Method::POST, "/apps/depot/releases")
        .form(&[
            ("build", old["build"].as_str().unwrap()),
            ("env", old["env"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// Promotes `release` and waits until its web process runs; the process id.
async fn promote(rack: &Replica, release: &str) -> String {
    let promote = rack
        .request(Method::POST, &format!("/apps/depot/releases/{release}/promote"))
        .send()
        .await
        .unwrap();
    assert_eq!(promote.status(), 201, "{:?}", promote.text().await);
    wait_for(120, "the release to run", || async {
        let app = rack.json("/apps/depot").await;
        (app["status"] == "running" && app["release"] == release).then_some(())
    })
    .await;
    web_process(rack, release).await
}

/// The running web process of `release`.
async fn web_process(rack: &Replica, release: &str) -> String {
    wait_for(120, "the web process", || async {
        let processes = rack.json("/apps/depot/processes").await;
        processes.as_array()?.iter().find_map(|p| {
            (p["name"] == "web" && p["type"] == "service" && p["status"] == "running" && p["release"] == release)
                .then(|| p["id"].as_str().unwrap().to_owned())
        })
    })
    .await
}

/// Runs `sh notes.sh <args>` in process `id`'s container (`podman exec`: its namespaces and
/// environment); its output, or podman's error.
async fn notes(podman: &rack::runtime::local::podman::Podman, id: &str, args: &[&str]) -> Result<String, String> {
    let name = podman.container_name("depot", id);
    let mut command = vec!["exec", name.as_str(), "sh", "notes.sh"];
    command.extend_from_slice(args);
    podman.output(&command).await
}

/// The resource forwarders serving the container of process `id`.
async fn forwarders(podman: &rack::runtime::local::podman::Podman, id: &str) -> Vec<i32> {
    let pid = podman.pid(&podman.container_name("depot", id)).await;
    assert_ne!(pid, 0, "{id} runs");
    crate::helpers::processes_with_arg(&pid.to_string())
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("resource-forwarder"))
        })
        .map(|p| i32::try_from(p).unwrap())
        .collect()
}

#[tokio::test]
async fn a_container_app_reaches_its_resources_and_nothing_else_across_redeploys_rollbacks_and_kill_9() {
    clients_image().await;
    let database = crate::helpers::fresh_database().await;
    let data = crate::helpers::reachable_tempdir();
    let _leftovers = Leftovers::at(data.path());
    let _servers = ResourceServers::at(data.path());
    let podman = rack::runtime::local::podman::Podman::detect(data.path(), "rack")
        .unwrap()
        .expect("podman");
    let mut rack = Replica::start(&database, data.path(), &[]).await;
    crate::replicas::create_app(&rack, "depot").await;

    // The container's command reached both resources before anything else.
    let first = build(&rack).await;
    let web = promote(&rack, &first).await;
    assert_eq!(
        notes(&podman, &web, &["boots"]).await.unwrap(),
        format!("pg={first}\nredis=1")
    );
    notes(&podman, &web, &["write", "one"]).await.unwrap();
    assert_eq!(notes(&podman, &web, &["read"]).await.unwrap(), "pg=one\nredis=one");
    // Its published port serves through the router as any container's does.
    let router = rack.json("/apps/depot").await["router"].as_str().unwrap().to_owned();
    let page = reqwest::get(format!("http://{router}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "depot\n");

    // Its linked resources are reachable, nothing else of the host's loopback: not rack's API,
    // not another service listening there, neither on 127.0.0.1 nor through slirp's alias of
    // the host.
    let info = rack.json("/apps/depot/resources/database").await;
    let url = info["url"].as_str().unwrap().to_owned();
    let resource_port = url.rsplit(':').next().unwrap().split('/').next().unwrap().to_owned();
    let api_port = rack.base().rsplit(':').next().unwrap().to_owned();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port().to_string();
    let probe = notes(&podman, &web, &["probe", &resource_port, &api_port, &other_port])
        .await
        .unwrap();
    assert_eq!(
        probe,
        format!(
            "127.0.0.1:{resource_port} reached\n10.0.2.2:{resource_port} refused\n\
             127.0.0.1:{api_port} refused\n10.0.2.2:{api_port} refused\n\
             127.0.0.1:{other_port} refused\n10.0.2.2:{other_port} refused"
        )
    );
    drop(other);

    // A one-off run is a container of its own, with its own forwarder.
    let run = rack
        .request(Method::POST, "/apps/depot/services/web/processes")
        .header("command", "sh notes.sh write run")
        .send()
        .await
        .unwrap();
    assert!(run.status().is_success(), "{}", run.text().await.unwrap());
    wait_for(60, "the one-off to write", || async {
        let read = notes(&podman, &web, &["read"]).await.ok()?;
        (read == "pg=one,run\nredis=run").then_some(())
    })
    .await;

    // A redeploy: a new container, the same data.
    let second = build(&rack).await;
    let web = promote(&rack, &second).await;
    notes(&podman, &web, &["write", "two"]).await.unwrap();
    assert_eq!(
        notes(&podman, &web, &["read"]).await.unwrap(),
        "pg=one,run,two\nredis=two"
    );
    let mut releases = [first.clone(), second.clone()];
    releases.sort();
    assert_eq!(
        notes(&podman, &web, &["boots"]).await.unwrap(),
        format!("pg={}\nredis=2", releases.join(","))
    );

    // A rollback to the first release (a new release of its build and environment, as convox
    // makes it): the same data.
    let rollback = rollback(&rack, &first).await;
    let web = promote(&rack, &rollback).await;
    assert_eq!(
        notes(&podman, &web, &["read"]).await.unwrap(),
        "pg=one,run,two\nredis=two"
    );

    // rack killed: the container and its forwarder live on, and the app still reaches its
    // resources while rack is down.
    let forwarder = forwarders(&podman, &web).await;
    assert_eq!(forwarder.len(), 1, "one forwarder per container: {forwarder:?}");
    rack.kill_9().await;
    notes(&podman, &web, &["write", "three"]).await.unwrap();
    assert_eq!(
        notes(&podman, &web, &["read"]).await.unwrap(),
        "pg=one,run,three,two\nredis=three"
    );
    // A forwarder that dies meanwhile is started again when rack adopts the container.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(forwarder[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(30, "the forwarder to go", || async {
        notes(&podman, &web, &["read"]).await.is_err().then_some(())
    })
    .await;

    let rack = Replica::start(&database, data.path(), &[]).await;
    wait_for(120, "the adopted container to reach its resources again", || async {
        let read = notes(&podman, &web, &["read"]).await.ok()?;
        (read == "pg=one,run,three,two\nredis=three").then_some(())
    })
    .await;
    assert_eq!(web_process(&rack, &rollback).await, web, "the same container, adopted");
    notes(&podman, &web, &["write", "four"]).await.unwrap();
    assert_eq!(
        notes(&podman, &web, &["read"]).await.unwrap(),
        "pg=four,one,run,three,two\nredis=four"
    );

    // The forwarder goes with its container.
    let forwarder = forwarders(&podman, &web).await;
    assert_eq!(forwarder.len(), 1, "{forwarder:?}");
    let deleted = rack.request(Method::DELETE, "/apps/depot").send().await.unwrap();
    assert!(deleted.status().is_success());
    wait_for(60, "the forwarder to exit with its container", || async {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(forwarder[0]), None)
            .is_err()
            .then_some(())
    })
    .await;
}
