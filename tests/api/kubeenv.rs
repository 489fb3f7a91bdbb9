//! A real Kubernetes control plane for the Kubernetes runtime's tests: etcd, kube-apiserver,
//! controller-manager, scheduler and kubemark hollow nodes on loopback, started once per test
//! process by `scripts/kube-testenv` (whose binaries `scripts/kube-testenv build` made) and
//! stopped when the process exits. rack runs in it as the service account of docker/k8s, so
//! every test also proves those RBAC rules are enough.
//!
//! Hollow nodes fake their containers: pods are scheduled and run, and their HTTP readiness
//! probes really go out, to the one fake pod IP every hollow pod reports. These tests run in a
//! network namespace of their own (`scripts/test` makes it, as root), whose loopback holds that
//! address, so the tests answer the probes there; it is never added to the host's interfaces.
//! What a fake runtime never does is left to the test, acting as the kubelet would: ending a
//! build pod (`finish_pod`), and recording the kubelet's Events (`act_as_kubelet`).
//!
//! `real_node_env` is a second control plane with one real node instead (containerd, runc and a
//! real kubelet; `RACK_KUBE_REAL_NODE=1` of `scripts/kube-testenv`), for tests/api/real_node.rs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod, Secret, ServiceAccount};
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use kube::{Api, Client};

/// The fake IP every hollow-node pod gets.
pub const POD_IP: &str = "192.168.192.168";

pub struct KubeEnv {
    /// The admin's kubeconfig.
    pub admin: PathBuf,
    /// rack's own kubeconfig: the `rack/rack` service account's token.
    pub rack: PathBuf,
    _dir: tempfile::TempDir,
    /// `scripts/kube-testenv stop` waiting for this process to exit (its stdin closes).
    _stopper: Mutex<Child>,
}

static ENV: OnceLock<KubeEnv> = OnceLock::new();
static REAL_NODE_ENV: OnceLock<KubeEnv> = OnceLock::new();

/// The real node's name, the image its pods can run (busybox; imported into its containerd, as
/// is the pause image) and the range of its pods' addresses (on a bridge in this namespace).
pub const REAL_NODE: &str = "real-node";
pub const REAL_NODE_IMAGE: &str = "localhost/rack-testenv/busybox:1";
pub const REAL_NODE_POD_PREFIX: &str = "10.200.0.";
/// The node's own address on that bridge (its kubelet and its registry listen there).
pub const REAL_NODE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 0, 1);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The process's control plane with hollow nodes, started on first use.
pub fn kube_env() -> &'static KubeEnv {
    ENV.get_or_init(|| {
        // The fake pod IP must be on this namespace's loopback (scripts/test puts it there), so
        // that readiness probes reach the tests' servers. It is never added here: this process
        // may be in the host's namespace.
        assert!(
            std::env::var_os("RACK_TEST_NETNS").is_some() && std::net::TcpListener::bind((POD_IP, 0)).is_ok(),
            "the Kubernetes tests run in a network namespace of their own: run them through scripts/test, as root"
        );
        start_env(&[])
    })
}

/// The process's control plane with one real node and no hollow ones, started on first use.
pub fn real_node_env() -> &'static KubeEnv {
    REAL_NODE_ENV.get_or_init(|| {
        // The node's bridge and its pods' addresses go into this network namespace.
        assert!(
            std::env::var_os("RACK_TEST_NETNS").is_some(),
            "the real-node tests run in a network namespace of their own: run them through scripts/test, as root"
        );
        // rack's own image, when it is built for this source tree, is imported with the
        // node's other images (tests/api/real_node/in_cluster.rs installs rack from it).
        let image = rack_image_archive().unwrap_or_default();
        start_env(&[
            ("RACK_KUBE_NODES", "0"),
            ("RACK_KUBE_REAL_NODE", "1"),
            ("RACK_KUBE_EXTRA_IMAGES", &image),
        ])
    })
}

/// The archive of rack's server image built from docker/Dockerfile for this source tree
/// (`scripts/kube-testenv rack-image`, which scripts/test runs as root before the tests), or
/// why there is none.
pub fn rack_image_archive() -> Result<String, String> {
    let output = Command::new(repo().join("scripts/kube-testenv"))
        .args(["rack-image", "--check"])
        .output()
        .map_err(|e| format!("running scripts/kube-testenv rack-image --check: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Starts a control plane with `scripts/kube-testenv start` (with `vars` in its environment),
/// stopped when this process exits, and installs rack's namespace and RBAC in it.
fn start_env(vars: &[(&str, &str)]) -> KubeEnv {
    {
        let dir = tempfile::Builder::new()
            .prefix("rack-kube-test-")
            .tempdir()
            .expect("a temp dir");
        let script = repo().join("scripts/kube-testenv");
        let output = Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .envs(vars.iter().copied())
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/kube-testenv");
        assert!(
            output.status.success(),
            "scripts/kube-testenv start failed (run `scripts/kube-testenv build` once, as root)"
        );
        let admin = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        let stopper = Command::new("/bin/sh")
            .arg("-c")
            // The directory lives in a static that is never dropped, so the stopper removes it,
            // unless something is still mounted under it (rm would reach through the mount).
            .arg("read _; \"$0\" stop \"$1\" >/dev/null 2>&1; grep -qF \" $1/\" /proc/self/mounts || rm -rf --one-file-system \"$1\"")
            .arg(&script)
            .arg(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("the stopper");
        let rack = dir.path().join("rack.kubeconfig");
        let admin_for_setup = admin.clone();
        let rack_for_setup = rack.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(install_rbac(&admin_for_setup, &rack_for_setup))
        })
        .join()
        .expect("the setup thread");
        KubeEnv {
            admin,
            rack,
            _dir: dir,
            _stopper: Mutex::new(stopper),
        }
    }
}

/// A client with the admin's rights (for the tests' own checks).
pub async fn admin_client() -> Client {
    client_for(&kube_env().admin).await
}

/// A client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Client {
    let file = kube::config::Kubeconfig::read_from(path).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a client config");
    Client::try_from(config).expect("a client")
}

/// Applies every object of a YAML file (several documents) with server-side apply, or with a
/// server-side dry run.
pub async fn apply_file(client: &Client, path: &Path, dry_run: bool) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let discovery = Discovery::new(client.clone()).run().await.map_err(|e| e.to_string())?;
    let mut applied = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(document)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let types = object.types.clone().ok_or("an object without apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .ok_or_else(|| format!("{}: unknown kind {}", path.display(), types.kind))?;
        let name = object.metadata.name.clone().ok_or("an object without a name")?;
        let api: Api<DynamicObject> = match (&caps.scope, &object.metadata.namespace) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (kube::discovery::Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
            (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        let mut params = PatchParams::apply("rack-tests").force();
        params.dry_run = dry_run;
        api.patch(&name, &params, &Patch::Apply(&value))
            .await
            .map_err(|e| format!("{} {name}: {e}", types.kind))?;
        applied.push(format!("{}/{name}", types.kind));
    }
    Ok(applied)
}

/// Installs docker/k8s's namespace and RBAC for real and writes a kubeconfig with the token of
/// the `rack/rack` service account.
async fn install_rbac(admin: &Path, rack: &Path) {
    let client = client_for(admin).await;
    for file in ["namespace.yaml", "rbac.yaml"] {
        apply_file(&client, &repo().join("docker/k8s").join(file), false)
            .await
            .unwrap_or_else(|e| panic!("applying docker/k8s/{file}: {e}"));
    }
    // 1.20's token controller fills in a Secret for the account.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "rack");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "rack");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let token = loop {
        let account = accounts.get("rack").await.expect("the rack service account");
        if let Some(name) = account.secrets.iter().flatten().find_map(|s| s.name.clone())
            && let Some(secret) = secrets.get_opt(&name).await.expect("reading the token secret")
            && let Some(token) = secret.data.as_ref().and_then(|d| d.get("token"))
        {
            break String::from_utf8(token.0.clone()).expect("a text token");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token for the rack service account"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The admin kubeconfig with the account's token instead of the admin's.
    let text = std::fs::read_to_string(admin).expect("the admin kubeconfig");
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| match line.split_once("token:") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}token: {token}"),
            _ => line.to_owned(),
        })
        .collect();
    std::fs::write(rack, rewritten.join("\n") + "\n").expect("writing rack's kubeconfig");
}

/// Ends the pod of a build Job as a kubelet would: every container terminated with
/// `exit_code` for the container named `failing` (0 for the others), the phase Succeeded or
/// Failed.
pub async fn finish_pod(client: &Client, namespace: &str, pod: &Pod, failing: Option<(&str, i32)>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let spec = pod.spec.as_ref().expect("a pod spec");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = |name: &str| {
        let code = failing.filter(|(n, _)| *n == name).map_or(0, |(_, c)| c);
        serde_json::json!({
            "name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": { "terminated": {
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "startedAt": now, "finishedAt": now,
            }},
        })
    };
    let init: Vec<_> = spec.init_containers.iter().flatten().map(|c| status(&c.name)).collect();
    let main: Vec<_> = spec.containers.iter().map(|c| status(&c.name)).collect();
    let phase = if failing.is_some() { "Failed" } else { "Succeeded" };
    let patch = serde_json::json!({ "status": {
        "phase": phase, "initContainerStatuses": init, "containerStatuses": main,
    }});
    pods.patch_status(
        pod.metadata.name.as_deref().expect("a name"),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .expect("patching the pod status");
}

/// Records, for every pod of `namespace` once it is scheduled, the Events a real kubelet
/// records as it starts the container (hollow kubelets send none). Runs until dropped.
pub async fn act_as_kubelet(client: Client, namespace: String) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let events: Api<Event> = Api::namespaced(client, &namespace);
    let mut done = std::collections::HashSet::new();
    loop {
        let scheduled: std::collections::HashSet<String> = match events.list(&Default::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("Scheduled"))
                .filter_map(|e| e.involved_object.uid)
                .collect(),
            Err(_) => Default::default(),
        };
        if let Ok(list) = pods.list(&Default::default()).await {
            for pod in list.items {
                let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone()) else {
                    continue;
                };
                let Some(spec) = &pod.spec else { continue };
                let Some(node) = spec.node_name.clone() else { continue };
                // As on a real node, the kubelet's events come after the scheduler's.
                if !scheduled.contains(&uid) || !done.insert(uid.clone()) {
                    continue;
                }
                let container = &spec.containers[0];
                let image = container.image.clone().unwrap_or_default();
                let messages = [
                    ("Pulling", format!("Pulling image \"{image}\"")),
                    ("Pulled", format!("Successfully pulled image \"{image}\"")),
                    ("Created", format!("Created container {}", container.name)),
                    ("Started", format!("Started container {}", container.name)),
                ];
                for (n, (reason, message)) in messages.into_iter().enumerate() {
                    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    let event: Event = serde_json::from_value(serde_json::json!({
                        "metadata": { "name": format!("{name}.{n}"), "namespace": namespace },
                        "involvedObject": {
                            "kind": "Pod", "name": name, "namespace": namespace, "uid": uid,
                            "apiVersion": "v1", "fieldPath": format!("spec.containers{{{}}}", container.name),
                        },
                        "reason": reason, "message": message, "type": "Normal",
                        "source": { "component": "kubelet", "host": node },
                        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                    }))
                    .expect("an event");
                    let _ = events.create(&PostParams::default(), &event).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Answers HTTP readiness probes on the fake pod IP, until dropped: 200 while `ready` is set
/// (from the start with `start`), 503 before; `probes` counts the probes that came.
pub struct ProbeServer {
    pub port: u16,
    pub ready: Arc<AtomicBool>,
    pub probes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ProbeServer {
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// Answers on `port` (0: any free one).
    pub async fn start_on(port: u16) -> Self {
        let server = Self::listen(port).await;
        server.ready.store(true, Ordering::SeqCst);
        server
    }

    /// Answers 503 until `ready` is set.
    pub async fn unready() -> Self {
        Self::listen(0).await
    }

    async fn listen(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind((POD_IP, port))
            .await
            .expect("binding the fake pod IP (is it on lo?)");
        let port = listener.local_addr().expect("an address").port();
        let ready = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let (answer, count) = (ready.clone(), probes.clone());
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let ready = answer.load(Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let response: &[u8] = if ready {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    };
                    let _ = stream.write_all(response).await;
                });
            }
        });
        Self {
            port,
            ready,
            probes,
            task,
        }
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request rack's service account made, from the API server's audit log.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AuditedRequest {
    #[serde(rename = "auditID")]
    pub id: String,
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub uri: String,
    #[serde(rename = "objectRef", default)]
    pub object: Option<AuditedObject>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AuditedObject {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

/// The requests rack made about namespace `ns` (in it, or the namespace itself), in the order
/// the API server logged them, each once (a watch is logged as it starts and as it ends).
pub fn rack_requests(ns: &str) -> Vec<AuditedRequest> {
    let path = kube_env().admin.parent().expect("the testenv dir").join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut seen = std::collections::HashSet::new();
    text.lines()
        .filter_map(|line| serde_json::from_str::<AuditedRequest>(line).ok())
        .filter(|r| {
            r.object
                .as_ref()
                .is_some_and(|o| o.namespace == ns || (o.resource == "namespaces" && o.name == ns))
        })
        .filter(|r| seen.insert(r.id.clone()))
        .collect()
}

/// A TCP proxy to the API server on 127.0.0.1 that a test can cut: every connection through
/// it is broken and new ones are refused until it is restored, as when the API server drops
/// its watches and goes away for a while. rack is pointed at it by `kubeconfig`.
pub struct ApiProxy {
    pub kubeconfig: PathBuf,
    open: Arc<AtomicBool>,
    cut: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl ApiProxy {
    pub async fn start() -> Self {
        let env = kube_env();
        let text = std::fs::read_to_string(&env.rack).expect("rack's kubeconfig");
        let upstream = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("server: https://"))
            .expect("the API server's address")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a proxy port");
        let port = listener.local_addr().expect("an address").port();
        let dir = tempfile::tempdir().expect("a temp dir");
        // The server's certificate names 127.0.0.1, so TLS goes through unchanged.
        let kubeconfig = dir.path().join("proxied.kubeconfig");
        std::fs::write(
            &kubeconfig,
            text.replace(
                &format!("server: https://{upstream}"),
                &format!("server: https://127.0.0.1:{port}"),
            ),
        )
        .expect("writing the proxied kubeconfig");
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cut = Arc::new(cut);
        let (is_open, cuts) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let upstream = upstream.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            kubeconfig,
            open,
            cut,
            task,
            _dir: dir,
        }
    }

    /// Breaks every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on the fake pod IP where nothing listens (probes to it fail).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((POD_IP, 0)).expect("binding the fake pod IP");
    listener.local_addr().expect("an address").port()
}
