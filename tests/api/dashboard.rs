//! The dashboard in a real browser: headless Chromium (Debian's `chromium`), driven through
//! WebDriver (`chromedriver`) by fantoccini, signs in, watches a deployment that the test starts
//! through the API, and sees the app go `updating` then `running` and the rollout lines appear
//! as they happen. The page's screenshot is saved as an artifact of the run
//! (`target/artifacts/dashboard.png`).

use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use reqwest::Method;

use crate::feed::built;
use crate::helpers::{PASSWORD, TestApp};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver on a free loopback port, in a process group of its own: the guard kills the
/// group, so the browsers it started go too, even when the test fails half-way.
pub struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

pub async fn chromedriver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "the browser test needs Debian's chromium and chromium-driver (scripts/install-deps installs them)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("starting chromedriver");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// Types `password` into the sign-in form (replacing what is there) and submits it.
async fn sign_in(browser: &fantoccini::Client, field: &fantoccini::elements::Element, password: &str) {
    field.clear().await.unwrap();
    field.send_keys(password).await.unwrap();
    browser
        .find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Polls `check` (a script returning a value, `null` while not yet) until it returns one.
async fn wait_script(browser: &fantoccini::Client, what: &str, script: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let value = browser.execute(script, vec![]).await.expect("the script runs");
        if !value.is_null() && value != serde_json::Value::Bool(false) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the element with id `id` on the page.
async fn element_text(browser: &fantoccini::Client, id: &str) -> String {
    let element = browser.find(Locator::Id(id)).await.unwrap();
    element.text().await.unwrap()
}

/// A headless Chromium session with a fresh profile in `profile`.
pub async fn browser(driver: &Driver, profile: &std::path::Path) -> fantoccini::Client {
    browser_with(driver, profile, &[]).await
}

/// [`browser`] with more command-line arguments for Chromium.
async fn browser_with(driver: &Driver, profile: &std::path::Path, more: &[String]) -> fantoccini::Client {
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,860",
    ]
    .map(str::to_owned)
    .to_vec();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend_from_slice(more);
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({ "binary": CHROMIUM, "args": args }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

#[tokio::test]
async fn the_dashboard_shows_a_deployment_live_in_a_real_browser() {
    let app = TestApp::spawn().await;
    let release = built(&app, "web").await;
    let driver = chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = browser(&driver, profile.path()).await;

    browser.goto(&app.url("/")).await.unwrap();
    let secret = browser.wait().for_element(Locator::Id("secret")).await.unwrap();
    // A wrong password is refused on the form.
    sign_in(&browser, &secret, "not-the-password").await;
    wait_script(
        &browser,
        "the sign-in error",
        "return document.getElementById('login-error').textContent.includes('not valid') || null",
    )
    .await;
    sign_in(&browser, &secret, PASSWORD).await;
    wait_script(
        &browser,
        "the app in the table",
        "return document.querySelector('tr[data-app=web]') && document.getElementById('feed-state').textContent === 'live' || null",
    )
    .await;

    // A deploy started through the API, as CI would.
    app.promote("web", &release).await;
    let updating = wait_script(
        &browser,
        "the app updating, with rollout lines",
        "const row = document.querySelector('tr[data-app=web]'); \
         const lines = document.querySelectorAll('#rollout .line').length; \
         return row.dataset.history.split(' ').includes('updating') && lines > 0 ? {status: row.dataset.status, lines} : null",
    )
    .await;
    let finished = wait_script(
        &browser,
        "the app running again",
        "const row = document.querySelector('tr[data-app=web]'); \
         return row.dataset.status === 'running' && row.dataset.history.includes('updating') ? \
           {history: row.dataset.history, lines: document.querySelectorAll('#rollout .line').length, \
            release: row.querySelector('.release').textContent} : null",
    )
    .await;
    let history: Vec<&str> = finished["history"].as_str().unwrap().split(' ').collect();
    let at = history.iter().rposition(|s| *s == "updating").unwrap();
    assert_eq!(history[at + 1..].first(), Some(&"running"), "{history:?}");
    assert_eq!(finished["release"], release.as_str());
    let lines = finished["lines"].as_u64().unwrap();
    assert!(
        lines > updating["lines"].as_u64().unwrap(),
        "lines kept coming: {updating} then {finished}"
    );
    let rollout = element_text(&browser, "rollout").await;
    assert!(rollout.contains("Started process"), "{rollout}");
    let deployments = element_text(&browser, "deployments").await;
    assert!(deployments.contains(&release), "{deployments}");

    // A second release while nobody uses the app: its traffic analysis is skipped at once, and
    // the deployment's row says so (from the `deployment.analysis` event).
    let second = crate::deploys::create_release(&app, "web", &[("env", "GREETING=two")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = crate::deploys::promote_follow(&app, "web", &second).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let analysis = wait_script(
        &browser,
        "the deployment's analysis",
        &format!(
            "const row = [...document.querySelectorAll('#deployments tr')].find((r) => r.textContent.includes('{second}')); \
             const cell = row && row.querySelector('.analysis'); \
             return cell && cell.textContent !== '' ? cell.textContent : null"
        ),
    )
    .await;
    assert_eq!(analysis, "web: skipped: 0 requests in the last 30s (fewer than 20)");

    // Traffic through the router shows in the traffic table (read again every 15 s).
    let router = app.get_json::<serde_json::Value>("/apps/web").await["router"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..12 {
        let status = reqwest::get(format!("http://{router}/")).await.unwrap().status();
        assert_eq!(status, 200);
    }
    let traffic = wait_script(
        &browser,
        "the app's traffic",
        "const row = document.querySelector('#traffic tr[data-app=web]'); \
         return row && Number(row.dataset.requests) >= 12 ? {requests: Number(row.dataset.requests), errors: Number(row.dataset.errors)} : null",
    )
    .await;
    assert_eq!(traffic, serde_json::json!({"requests": 12, "errors": 0}));

    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    browser.close().await.unwrap();
    drop(driver);
}

/// The base64 SHA-256 of the public key (SubjectPublicKeyInfo) of the self-signed certificate
/// of `app`: what Chromium's `--ignore-certificate-errors-spki-list` takes, as an admin would
/// give it to trust the rack's own certificate and no other.
fn spki_hash(app: &TestApp) -> String {
    use rcgen::PublicKeyData;
    use sha2::Digest;
    let files = rack::tls::self_signed_files(&app.state.config.data_dir);
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(files.key).unwrap()).unwrap();
    base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        sha2::Sha256::digest(key.subject_public_key_info()),
    )
}

#[tokio::test]
async fn the_dashboard_loads_and_streams_over_https_with_the_racks_certificate() {
    let app = TestApp::spawn_with(|config| config.tls = rack::config::Tls::SelfSigned).await;
    let release = built(&app, "web").await;
    let driver = chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let trust = format!("--ignore-certificate-errors-spki-list={}", spki_hash(&app));
    let browser = browser_with(&driver, profile.path(), &[trust]).await;

    let url = app.url("/");
    assert!(url.starts_with("https://"), "{url}");
    // Without the flag, Chromium refuses the certificate: its warning page, not the dashboard.
    {
        let other = tempfile::tempdir().unwrap();
        let untrusting = browser_with(&driver, other.path(), &[]).await;
        let _ = untrusting.goto(&url).await;
        let warning = wait_script(
            &untrusting,
            "Chromium's certificate warning",
            "return document.readyState === 'complete' && document.getElementById('details-button') !== null \
               ? {title: document.title, dashboard: document.getElementById('secret') !== null} : null",
        )
        .await;
        assert_eq!(warning["dashboard"], false, "{warning}");
        untrusting.close().await.unwrap();
    }
    browser.goto(&url).await.unwrap();
    let secret = browser.wait().for_element(Locator::Id("secret")).await.unwrap();
    sign_in(&browser, &secret, PASSWORD).await;
    let page = wait_script(
        &browser,
        "the app in the table, its feed live",
        "return document.querySelector('tr[data-app=web]') && document.getElementById('feed-state').textContent === 'live' \
           ? {protocol: location.protocol, secure: window.isSecureContext} : null",
    )
    .await;
    assert_eq!(page["protocol"], "https:", "{page}");
    assert_eq!(page["secure"], true, "{page}");

    // A deploy started through the API streams into the page, over TLS.
    app.promote("web", &release).await;
    let finished = wait_script(
        &browser,
        "the rollout's lines and the app running again",
        "const row = document.querySelector('tr[data-app=web]'); \
         return row.dataset.status === 'running' && row.dataset.history.includes('updating') ? \
           {lines: document.querySelectorAll('#rollout .line').length, \
            release: row.querySelector('.release').textContent} : null",
    )
    .await;
    assert_eq!(finished["release"], release.as_str());
    assert!(finished["lines"].as_u64().unwrap() > 0, "{finished}");
    let rollout = element_text(&browser, "rollout").await;
    assert!(rollout.contains("Started process"), "{rollout}");
    browser.close().await.unwrap();
    drop(driver);
}

/// A manifest whose `web` (a process, no port) links one postgres resource.
const POSTGRES_MANIFEST: &str = "resources:
  database:
    type: postgres
services:
  web:
    command: sleep 86400
    resources:
      - database
";

/// A release of `build` with the env `env`; its id.
async fn release_with_env(app: &TestApp, name: &str, build: &str, env: &str) -> String {
    let response = app
        .json(Method::POST, &format!("/apps/{name}/releases"))
        .form(&[("build", build), ("env", env)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let release: serde_json::Value = response.json().await.unwrap();
    release["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_dashboard_shows_resources_masked_and_what_each_deployment_changed() {
    let app = TestApp::spawn().await;
    let _servers = crate::resources::ResourceServers::at(&app.state.config.data_dir);
    assert_eq!(app.create_app("shop").await.status(), 201);
    let build_id = app.build_source("shop", &[("convox.yml", POSTGRES_MANIFEST)]).await;
    let build = app.wait_build("shop", &build_id).await;
    assert_eq!(build["status"], "complete", "{build}");
    let first = release_with_env(&app, "shop", &build_id, "ALPHA=alpha-hush-1\nKEEP=keep-hush").await;
    let second = release_with_env(&app, "shop", &build_id, "ALPHA=alpha-hush-2\nKEEP=keep-hush").await;

    let driver = chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = browser(&driver, profile.path()).await;
    browser.goto(&app.url("/")).await.unwrap();
    let secret = browser.wait().for_element(Locator::Id("secret")).await.unwrap();
    // The rack password: an admin credential, which the API shows the resource's password.
    sign_in(&browser, &secret, PASSWORD).await;
    wait_script(
        &browser,
        "the app in the table, the feed live",
        "return document.querySelector('tr[data-app=shop]') && document.getElementById('feed-state').textContent === 'live' || null",
    )
    .await;

    // The first deploy creates the resource: the page learns of it from the feed.
    let log = crate::deploys::promote_follow(&app, "shop", &first).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let row = wait_script(
        &browser,
        "the resource running with its URL",
        "const row = document.querySelector('#resources tr[data-app=shop][data-resource=database]'); \
         return row && row.dataset.status === 'running' && row.querySelector('.url').textContent.includes('@') ? \
           {type: row.querySelector('.type').textContent, status: row.querySelector('.status').textContent, \
            url: row.querySelector('.url').textContent} : null",
    )
    .await;
    assert_eq!(row["type"], "postgres", "{row}");
    assert_eq!(row["status"], "running", "{row}");
    let shown = row["url"].as_str().unwrap();
    assert!(shown.starts_with("postgres://app:********@127.0.0.1:"), "{row}");
    let resources: serde_json::Value = app.get_json("/apps/shop/resources").await;
    let url = resources[0]["url"].as_str().unwrap();
    let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
    assert!(
        password.len() >= 8 && !password.contains('*'),
        "the API shows the admin the password: {url}"
    );

    // The second deploy changes ALPHA's value: the deployment's row names the key, not a value.
    let log = crate::deploys::promote_follow(&app, "shop", &second).await;
    assert!(log.ends_with("OK\n"), "{log}");
    let changes = wait_script(
        &browser,
        "the deployment's changes",
        &format!(
            "const row = [...document.querySelectorAll('#deployments tr')].find((r) => r.textContent.includes('{second}')); \
             const cell = row && row.querySelector('.changes'); \
             return cell && cell.textContent.includes('ALPHA') ? cell.textContent : null"
        ),
    )
    .await;
    let changes = changes.as_str().unwrap();
    assert!(changes.contains("~ALPHA") && !changes.contains("KEEP"), "{changes}");
    let first_changes = wait_script(
        &browser,
        "the first deployment's row",
        &format!(
            "const row = [...document.querySelectorAll('#deployments tr')].find((r) => r.textContent.includes('{first}')); \
             const cell = row && row.querySelector('.changes'); \
             return cell && cell.textContent !== '…' && cell.textContent !== '' ? cell.textContent : null"
        ),
    )
    .await;
    assert_eq!(first_changes, "first release");

    let html = browser
        .execute("return document.documentElement.outerHTML", vec![])
        .await
        .unwrap();
    let html = html.as_str().unwrap();
    assert!(
        html.contains("~ALPHA") && html.contains(":********@"),
        "the page shows both"
    );
    assert!(!html.contains(password), "the resource's password is in the page");
    assert!(!html.contains("hush"), "an env value is in the page");
    browser.close().await.unwrap();
    drop(driver);
}
