//! Private registries: `convox registries`, `registries add` and `registries remove` replayed
//! as the convox CLI sends them; the password sealed at rest, never shown, logged or audited;
//! replicas sharing RACK_SECRETS_KEY; and a Dockerfile build `FROM` an image of a
//! password-protected registry on 127.0.0.1 (Debian's `docker-registry`, started here) that
//! succeeds with the registry added and fails, naming the refusal, without it.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::containers::{BASE, Leftovers, base_image, podman};
use crate::deploys::{promote_follow, through_router};
use crate::helpers::{TestApp, status_text, wait_for};

const PASSWORD: &str = "s3cret-Registry-pw";

/// `convox registries add SERVER USERNAME PASSWORD`, as the CLI sends it.
async fn add(app: &TestApp, server: &str, username: &str, password: &str) -> (u16, String) {
    let response = app
        .convox(Method::POST, "/registries")
        .form(&[("server", server), ("username", username), ("password", password)])
        .send()
        .await
        .unwrap();
    status_text(response).await
}

/// `convox registries remove SERVER`.
async fn remove(app: &TestApp, server: &str) -> (u16, String) {
    let response = app
        .convox(Method::DELETE, &format!("/registries/{server}"))
        .send()
        .await
        .unwrap();
    status_text(response).await
}

#[tokio::test]
async fn registries_answer_the_convox_cli_and_never_show_the_password() {
    let app = TestApp::spawn().await;
    let server = "registry.example.com:5000";
    let (status, body) = add(&app, server, "deployer", PASSWORD).await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.contains(PASSWORD), "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["server"], server);

    // `convox registries` reads server and username.
    let (status, list) = status_text(app.convox(Method::GET, "/registries").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(!list.contains(PASSWORD), "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list, serde_json::json!([{ "server": server, "username": "deployer" }]));

    // Added again: the credentials are replaced (as convox does), still one registry.
    let (status, body) = add(&app, server, "other", "new-password").await;
    assert_eq!(status, 200, "{body}");
    let list: Value = app.get_json("/registries").await;
    assert_eq!(list, serde_json::json!([{ "server": server, "username": "other" }]));

    // A server with a path, removed by its whole path.
    assert_eq!(add(&app, "ghcr.example.com/team", "u", "p").await.0, 201);
    assert_eq!(remove(&app, "ghcr.example.com/team").await, (200, "ok\n".to_owned()));
    // Docker Hub as old docker configs name it: a URL, removed as the convox CLI sends it.
    assert_eq!(add(&app, "https://index.docker.io/v1/", "u", "p").await.0, 201);
    assert_eq!(
        remove(&app, "https://index.docker.io/v1/").await,
        (200, "ok\n".to_owned())
    );

    // Bad input is a 400 that says what is wrong.
    let (status, body) = add(&app, "  ", "u", "p").await;
    assert_eq!(status, 400);
    assert!(body.contains("server: it is empty"), "{body}");
    let (status, body) = add(&app, "r.example.com", "a:b", "p").await;
    assert_eq!(status, 400);
    assert!(body.contains("username"), "{body}");
    let (status, body) = status_text(
        app.convox(Method::POST, "/registries")
            .form(&[("server", "r.example.com"), ("username", "u")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("password: it is empty"), "{body}");

    // The password is sealed in Postgres, under a key made 0600 in the data directory.
    let sealed: Vec<u8> = sqlx::query_scalar("select password_sealed from registries where server = $1")
        .bind(server)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert!(!sealed.windows(12).any(|w| w == &b"new-password"[..]));
    let key = app.state.config.data_dir.join("secrets.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Removed: gone, and removing it again is a 404 that names it.
    assert_eq!(remove(&app, server).await, (200, "ok\n".to_owned()));
    let (status, body) = remove(&app, server).await;
    assert_eq!(status, 404);
    assert_eq!(body, format!("registry not found: {server}\n"));
    assert_eq!(app.get_json::<Value>("/registries").await, serde_json::json!([]));

    // Audited as actions (the server, never the password), and never in rack's own log.
    let audit = wait_for(30, "the registry requests in the audit log", || async {
        let text = app
            .json(Method::GET, "/audit")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (text.matches("/registries").count() >= 6).then_some(text)
    })
    .await;
    assert!(audit.contains(&format!("/registries/{server}")), "{audit}");
    assert!(!audit.contains(PASSWORD) && !audit.contains("new-password"), "{audit}");
    let (lines, _) = rack::rack_log::snapshot();
    assert!(lines.iter().any(|l| l.text.contains(&format!("registry {server}"))));
    assert!(
        !lines
            .iter()
            .any(|l| l.text.contains(PASSWORD) || l.text.contains("new-password"))
    );
}

#[tokio::test]
async fn replicas_open_the_passwords_with_the_shared_key_and_no_other() {
    use rack::runtime::Registries;
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let first = TestApp::spawn_with(|c| c.secrets_key = Some(key.to_owned())).await;
    let second = TestApp::spawn_on(&first.database_url(), |c| c.secrets_key = Some(key.to_owned())).await;
    assert_eq!(add(&first, "127.0.0.1:5999", "user", PASSWORD).await.0, 201);
    // No key file was made: the setting is the key.
    assert!(!first.state.config.data_dir.join("secrets.key").exists());
    let read = |app: &TestApp| rack::jobs::capabilities::StoredRegistries {
        pool: app.state.pool.clone(),
        keyring: app.state.keyring.clone(),
    };
    let credentials = read(&second).credentials().await.unwrap();
    assert_eq!(credentials.len(), 1);
    assert_eq!(credentials[0].password, PASSWORD);
    assert!(!format!("{credentials:?}").contains(PASSWORD), "Debug never shows it");
    // A replica with its own data directory's key cannot open it, and says why.
    let stranger = TestApp::spawn_on(&first.database_url(), |_| {}).await;
    let error = read(&stranger).credentials().await.unwrap_err().to_string();
    assert!(error.contains("registry 127.0.0.1:5999"), "{error}");
}

#[tokio::test]
async fn a_restored_rack_opens_the_passwords_of_its_backup() {
    use rack::runtime::Registries;
    let first = TestApp::spawn().await;
    assert_eq!(add(&first, "registry.example.com", "deployer", PASSWORD).await.0, 201);
    let response = first
        .untimed_client()
        .get(first.url("/system/backup?images=false"))
        .basic_auth("convox", Some(crate::helpers::PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.tar");
    let bytes = tokio::time::timeout(Duration::from_secs(120), response.bytes())
        .await
        .expect("the backup ends")
        .unwrap();
    std::fs::write(&file, &bytes).unwrap();
    let url = crate::helpers::empty_database().await;
    let mut config = rack::config::Config::for_tests(
        dir.path().join("rack"),
        rack::config::Database::Url(url),
        crate::helpers::PASSWORD,
    );
    config.backup.restore = Some(file);
    let second = TestApp::start(config).await;
    // The restored data directory has the key that sealed them.
    let stored = rack::jobs::capabilities::StoredRegistries {
        pool: second.state.pool.clone(),
        keyring: second.state.keyring.clone(),
    };
    let credentials = stored.credentials().await.unwrap();
    assert_eq!(credentials.len(), 1);
    assert_eq!(credentials[0].password, PASSWORD);
    second.stop().await;
}

/// Runs `rack args` against `app`, with `stdin` as its standard input.
pub async fn rack_cli(app: &TestApp, args: &[&str], stdin: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rack"))
        .args(args)
        .env(
            "RACK_URL",
            format!("http://convox:{}@{}", crate::helpers::PASSWORD, app.addr),
        )
        .env_remove("RACK_DATA")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("rack finishes within 30 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_rack_cli_adds_lists_and_removes_registries() {
    let app = TestApp::spawn().await;
    // The password from standard input (kept out of the process list).
    let (code, _, err) = rack_cli(
        &app,
        &["registries", "add", "127.0.0.1:5998", "ci"],
        &format!("{PASSWORD}\n"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = rack_cli(&app, &["registries", "add", "ghcr.example.com/team", "bot", "tok"], "").await;
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = rack_cli(&app, &["registries"], "").await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("SERVER") && out.contains("127.0.0.1:5998") && out.contains("ci"),
        "{out}"
    );
    let (code, out, _) = rack_cli(&app, &["registries", "--json"], "").await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list,
        serde_json::json!([
            { "server": "127.0.0.1:5998", "username": "ci" },
            { "server": "ghcr.example.com/team", "username": "bot" },
        ])
    );
    // What was read from standard input is what the builds get.
    use rack::runtime::Registries;
    let stored = rack::jobs::capabilities::StoredRegistries {
        pool: app.state.pool.clone(),
        keyring: app.state.keyring.clone(),
    };
    assert_eq!(stored.credentials().await.unwrap()[0].password, PASSWORD);
    let (code, _, err) = rack_cli(&app, &["registries", "remove", "ghcr.example.com/team"], "").await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = rack_cli(&app, &["registries", "remove", "ghcr.example.com/team"], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("registry not found"), "{err}");
    let list: Value = app.get_json("/registries").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// A password-protected registry on 127.0.0.1 (`docker-registry serve`, htpasswd auth, its own
/// storage), stopped and its directory removed when dropped.
pub struct PrivateRegistry {
    child: tokio::process::Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl PrivateRegistry {
    pub async fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = std::process::Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd (apache2-utils; scripts/install-deps installs it)");
        assert!(htpasswd.status.success());
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\n\
             http:\n  addr: 127.0.0.1:0\nauth:\n  htpasswd:\n    realm: rack-test\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut child = tokio::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("docker-registry (Debian's docker-registry; scripts/install-deps installs it)");
        // It binds port 0 and says which port it got.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let host = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.split('"').next().unwrap().to_owned();
                }
            }
            panic!("docker-registry ended without listening");
        })
        .await
        .expect("docker-registry listens within 60 s");
        assert!(host.starts_with("127.0.0.1:"), "{host}");
        // Its later output is drained, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, host, _dir: dir }
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Removes the named images when dropped (what this test pushed and pulled).
struct Images(rack::runtime::local::podman::Podman, Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        let _ = self.0.std_command().args(["rmi", "--force"]).args(&self.1).output();
    }
}

/// Builds `files` as `name`; the build as the API shows it, and its log.
async fn build(app: &TestApp, name: &str, files: &[(&str, &str)]) -> (Value, String) {
    let id = app.build_source(name, files).await;
    let build = app.wait_build(name, &id).await;
    let log = app.build_log(name, &id).await;
    (build, log)
}

#[tokio::test]
async fn a_dockerfile_builds_from_a_password_protected_registry_once_it_is_added() {
    base_image().await;
    let registry = PrivateRegistry::start("builder", PASSWORD).await;
    let app = TestApp::spawn().await;
    let _leftovers = Leftovers::of(&app);
    let podman = podman(&app.state.config.data_dir);
    let image = format!("{}/private/base:1", registry.host);
    let _images = Images(podman.clone(), vec![image.clone()]);

    // The private image: busybox and a page, built here without a network, pushed with the
    // registry's credentials, then removed here (only the registry has it).
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("index.html"), "from the private registry\n").unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {BASE}\nCOPY index.html /www/index.html\nCOPY index.html /www/health\n"),
    )
    .unwrap();
    let dir = context.path().to_string_lossy().into_owned();
    podman
        .output(&["build", "--network", "none", "--tag", &image, &dir])
        .await
        .expect("building the private image");
    let creds = format!("builder:{PASSWORD}");
    podman
        .output(&["push", "--creds", &creds, "--tls-verify=false", &image])
        .await
        .expect("pushing to the private registry");
    podman.output(&["rmi", &image]).await.expect("removing the local copy");

    assert_eq!(app.create_app("private").await.status(), 201);
    let dockerfile = format!(
        "FROM {image}\nRUN echo built > /www/built\nCMD [\"httpd\", \"-f\", \"-p\", \"3000\", \"-h\", \"/www\"]\n"
    );
    let files = [
        (
            "convox.yml",
            "services:\n  web:\n    build: .\n    port: 3000\n    health: /health\n",
        ),
        ("Dockerfile", dockerfile.as_str()),
    ];

    // Without the registry: the build fails, and its log says the registry refused.
    let (failed, log) = build(&app, "private", &files).await;
    assert_eq!(failed["status"], "failed", "{failed}\n{log}");
    assert!(
        log.contains(&registry.host) && log.contains("authentication required"),
        "{log}"
    );

    // Added as `convox registries add` sends it: the build pulls with it and succeeds.
    assert_eq!(add(&app, &registry.host, "builder", PASSWORD).await.0, 201);
    let (built, log) = build(&app, "private", &files).await;
    assert_eq!(built["status"], "complete", "{built}\n{log}");
    assert!(!log.contains(PASSWORD), "{log}");
    // The auth file was for that call only: nothing of it is left in rack's podman directory.
    let work = app.state.config.data_dir.join("podman");
    let leftover = walk(&work)
        .into_iter()
        .find(|p| std::fs::read(p).is_ok_and(|bytes| bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes())));
    assert_eq!(leftover, None);
    // The release runs the image built on the private one.
    let rollout = promote_follow(&app, "private", built["release"].as_str().unwrap()).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(through_router(&app, "private").await, "from the private registry\n");

    // A service's `image:` from the registry is pulled with the same credentials. (`rmi` only
    // untags the image here: the build above is its child.)
    podman
        .output(&["rmi", &image])
        .await
        .expect("untagging the pulled copy");
    assert_eq!(app.create_app("pulled").await.status(), 201);
    let manifest = format!(
        "services:\n  web:\n    image: {image}\n    command: httpd -f -p 3000 -h /www\n    port: 3000\n    health: /health\n"
    );
    let (built, log) = build(&app, "pulled", &[("convox.yml", manifest.as_str())]).await;
    assert_eq!(built["status"], "complete", "{built}\n{log}");
    let rollout = promote_follow(&app, "pulled", built["release"].as_str().unwrap()).await;
    assert!(rollout.ends_with("OK\n"), "{rollout}");
    assert_eq!(through_router(&app, "pulled").await, "from the private registry\n");

    // Removed (`convox registries remove`): the next build that needs the image fails again.
    assert_eq!(remove(&app, &registry.host).await, (200, "ok\n".to_owned()));
    assert!(
        app.convox(Method::DELETE, "/apps/pulled")
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    wait_for(120, "the pulled app's containers to go", || async {
        podman.list("pulled").await.is_ok_and(|c| c.is_empty()).then_some(())
    })
    .await;
    podman
        .output(&["rmi", &image])
        .await
        .expect("untagging the pulled copy");
    let (failed, log) = build(&app, "private", &files).await;
    assert_eq!(failed["status"], "failed", "{failed}\n{log}");
    assert!(log.contains("authentication required"), "{log}");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files.extend(walk(&path)),
            Ok(t) if t.is_file() => files.push(path),
            _ => {}
        }
    }
    files
}
