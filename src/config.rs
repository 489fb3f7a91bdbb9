//! Every server setting: a flag and an environment variable each, parsed and validated once
//! at startup into [`Config`]. Tests build a `Config` directly and never touch the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::archive::Limits;
use crate::objects::ObjectsLocation;

/// The shortest time a deployment's rollback gets.
const ROLLBACK_MIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the database comes from.
#[derive(Debug, Clone)]
pub enum Database {
    /// Run a private Postgres cluster inside the data directory (the embedded default).
    Embedded,
    /// Use the server at this `postgres://` URL.
    Url(String),
}

/// Which runtime runs builds and releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Processes on this host.
    Local,
    /// A Kubernetes cluster.
    Kube,
}

impl RuntimeKind {
    /// The name used in `GET /system` (`provider`) and in event streams (`system/<name>/...`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Kube => "k8s",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Compact,
    /// One JSON object per event (for log collectors).
    Json,
}

/// Whether the API serves HTTPS when no certificate is given (`RACK_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// A self-signed certificate when the embedded default binds a non-loopback address.
    Auto,
    /// Always HTTPS (a self-signed certificate without RACK_TLS_CERT).
    On,
    /// Plain HTTP.
    Off,
}

/// How the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain HTTP.
    Off,
    /// HTTPS with the given certificate and key.
    Files(crate::tls::CertFiles),
    /// HTTPS with the self-signed certificate of the data directory (generated on first use).
    SelfSigned,
}

/// `rack server`'s flags; each has an environment variable of the same meaning.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "RACK_BIND", default_value = "127.0.0.1:5443")]
    pub bind: SocketAddr,
    /// Data directory: the embedded Postgres cluster, objects and the generated password.
    /// Defaults to /var/lib/rack as root, else $XDG_DATA_HOME/rack or ~/.local/share/rack.
    #[arg(long, env = "RACK_DATA")]
    pub data: Option<PathBuf>,
    /// Postgres server to use instead of the embedded cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Password for HTTP basic auth (any user name). Required with DATABASE_URL; generated
    /// and kept in the data directory otherwise.
    #[arg(long, env = "RACK_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Key that seals secrets kept in the database (private registries' passwords): base64 of
    /// 32 bytes (`openssl rand -base64 32`). Replicas sharing a DATABASE_URL must share it;
    /// without it, the key is `secrets.key` in the data directory, made on first use.
    #[arg(long, env = "RACK_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// Runtime that runs builds and releases.
    #[arg(long, env = "RACK_RUNTIME", value_enum, default_value = "local")]
    pub runtime: RuntimeKind,
    /// Name of this rack, shown by `GET /system`.
    #[arg(long, env = "RACK_NAME", default_value = "rack")]
    pub name: String,
    /// Log format.
    #[arg(long, env = "RUST_LOG_FORMAT", value_enum, default_value = "compact")]
    pub log_format: LogFormat,
    /// Where uploaded objects are kept: a directory, or s3://bucket/prefix (needs the `s3`
    /// build feature and the usual AWS_* variables). Defaults to <data>/objects.
    #[arg(long, env = "RACK_OBJECTS")]
    pub objects: Option<String>,
    /// Largest upload, in bytes.
    #[arg(long, env = "RACK_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: u64,
    /// Largest `cp` into or out of a process (the tar stream), in bytes.
    #[arg(long, env = "RACK_MAX_CP_BYTES", default_value_t = 256 << 20)]
    pub max_cp_bytes: u64,
    /// Longest a build may run, in seconds.
    #[arg(long, env = "RACK_BUILD_TIMEOUT", default_value_t = 1800)]
    pub build_timeout: u64,
    /// Builds this server runs at once.
    #[arg(long, env = "RACK_BUILD_WORKERS", default_value_t = 2)]
    pub build_workers: usize,
    /// Largest unpacked size of a source archive, in bytes.
    #[arg(long, env = "RACK_MAX_SOURCE_BYTES", default_value_t = 4 << 30)]
    pub max_source_bytes: u64,
    /// Largest number of entries in a source archive.
    #[arg(long, env = "RACK_MAX_SOURCE_ENTRIES", default_value_t = 100_000)]
    pub max_source_entries: u64,
    /// Seconds a job (build, deployment) stays claimed by a server that stopped renewing its
    /// claim; then another server takes it over.
    #[arg(long, env = "RACK_JOB_LEASE", default_value_t = 30)]
    pub job_lease: u64,
    /// Largest number of Postgres connections this server opens (one of them listens for
    /// notifications; the others serve requests and jobs).
    #[arg(long, env = "RACK_DB_CONNECTIONS", default_value_t = 20)]
    pub db_connections: u32,
    /// The unprivileged user that build commands and app processes of the local runtime run
    /// as, when rack runs as root (they always run in a sandbox of their own).
    #[arg(long, env = "RACK_SANDBOX_USER", default_value = crate::runtime::local::sandbox::DEFAULT_USER)]
    pub sandbox_user: String,
    /// Largest size of the private `/tmp` of each sandbox (a tmpfs: memory), in bytes (0: the
    /// kernel's default, half the RAM).
    #[arg(long, env = "RACK_SANDBOX_TMP_BYTES", default_value_t = 256 << 20)]
    pub sandbox_tmp_bytes: u64,
    /// The first uid given to apps: each app's build commands and processes run as a uid of
    /// their own from RACK_APP_UID_BASE on, when rack runs as root.
    #[arg(long, env = "RACK_APP_UID_BASE", default_value_t = 1_000_000_000)]
    pub app_uid_base: u32,
    /// How many uids (so apps) the range from RACK_APP_UID_BASE holds.
    #[arg(long, env = "RACK_APP_UID_COUNT", default_value_t = 1_000_000)]
    pub app_uid_count: u32,
    /// Largest size of a build's directory while its build commands run, in bytes (0: no cap);
    /// a build that writes past it is stopped and fails.
    #[arg(long, env = "RACK_BUILD_DIR_MAX_BYTES", default_value_t = 10 << 30)]
    pub build_dir_max_bytes: u64,
    /// Seconds a client has to send a request's headers; an idle keep-alive connection is
    /// closed after as long.
    #[arg(long, env = "RACK_HEADER_TIMEOUT", default_value_t = 15)]
    pub header_timeout: u64,
    /// Largest request head (request line and headers), in bytes; larger ones get 431.
    #[arg(long, env = "RACK_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most connections one client address may hold before it authenticates (0: no limit);
    /// more get 429.
    #[arg(long, env = "RACK_MAX_UNAUTHENTICATED_CONNECTIONS", default_value_t = 256)]
    pub max_unauthenticated_connections: usize,
    /// Failed authentications one client address (or user name) may make per minute; then, until
    /// the minute is over, wrong credentials get 429 and passwords are checked in turns (valid
    /// credentials always pass) (0: no limit).
    #[arg(long, env = "RACK_AUTH_FAILURES", default_value_t = 20)]
    pub auth_failures: u32,
    /// Streams (logs, rollouts, exec) one credential may hold open on a server at once
    /// (0: no limit); more get 429.
    #[arg(long, env = "RACK_MAX_STREAMS_PER_CREDENTIAL", default_value_t = 100)]
    pub max_streams_per_credential: usize,
    /// Days the audit log keeps its entries.
    #[arg(long, env = "RACK_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    pub audit_retention_days: u32,
    /// Days the event feed (`GET /events`) keeps its events.
    #[arg(long, env = "RACK_FEED_RETENTION_DAYS", default_value_t = 14)]
    pub feed_retention_days: u32,
    /// Days the apps' per-minute traffic history (`GET /apps/{app}/metrics`) keeps.
    #[arg(long, env = "RACK_METRICS_RETENTION_DAYS", default_value_t = 7)]
    pub metrics_retention_days: u32,
    /// Longest a one-off process (`run`) may run, in seconds; then it is stopped.
    #[arg(long, env = "RACK_RUN_TIMEOUT", default_value_t = 3600)]
    pub run_timeout: u64,
    /// HTTPS: the certificate chain (PEM) the API serves; re-read when the file changes.
    #[arg(long, env = "RACK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// HTTPS: the private key (PEM) of RACK_TLS_CERT.
    #[arg(long, env = "RACK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// HTTPS without RACK_TLS_CERT: `auto` serves HTTPS with a self-signed certificate (kept in
    /// the data directory) when the embedded default binds a non-loopback address, `on`
    /// always does, `off` never does.
    #[arg(long, env = "RACK_TLS", value_enum, default_value = "auto")]
    pub tls: TlsMode,
    /// Allow plain HTTP on a non-loopback address (behind a proxy that terminates TLS).
    /// RACK_INSECURE_HTTP=1 (or true, yes, on) sets it; 0, false, no, off do not.
    #[arg(long, env = "RACK_INSECURE_HTTP", value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure_http: bool,
    /// Batches of recent events each followed log keeps in memory, for streams that fall
    /// behind to catch up from (older cursors read Postgres).
    #[arg(long, env = "RACK_STREAM_WINDOW_BATCHES", default_value_t = crate::events::tail::WindowLimits::default().batches)]
    pub stream_window_batches: usize,
    /// Bytes of recent events each followed log keeps in memory at most (see
    /// RACK_STREAM_WINDOW_BATCHES).
    #[arg(long, env = "RACK_STREAM_WINDOW_BYTES", default_value_t = crate::events::tail::WindowLimits::default().bytes)]
    pub stream_window_bytes: usize,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub backup: crate::backup::BackupArgs,
    #[command(flatten)]
    pub disk: crate::disk::DiskArgs,
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookArgs,
}

/// Settings of the Kubernetes runtime (`RACK_RUNTIME=kube`). The cluster itself comes from the
/// usual places: `KUBECONFIG` or ~/.kube/config, else the in-cluster service account.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Registry (and path prefix) that builds push to: images are
    /// `<registry>/<app>:<service>.<build id>`. Required with RACK_RUNTIME=kube.
    #[arg(long, env = "RACK_REGISTRY")]
    pub registry: Option<String>,
    /// The rack API as build pods reach it (they fetch their source from it), e.g.
    /// http://rack.rack.svc.cluster.local:5443. Required with RACK_RUNTIME=kube.
    #[arg(long = "api-url", env = "RACK_API_URL")]
    pub url: Option<String>,
    /// Image that builds one service: run with kaniko's executor flags (--context, --dockerfile,
    /// --destination).
    #[arg(
        long,
        env = "RACK_BUILDER_IMAGE",
        default_value = "gcr.io/kaniko-project/executor:v1.23.2-debug"
    )]
    pub builder_image: String,
    /// What builds the images: `kaniko` (RACK_BUILDER_IMAGE) or `buildah`
    /// (RACK_KUBE_BUILDAH_IMAGE; its build containers run privileged, see the README).
    #[arg(long = "kube-builder", env = "RACK_KUBE_BUILDER", value_enum, default_value_t = KubeBuilder::Kaniko)]
    pub builder: KubeBuilder,
    /// Image that builds one service with RACK_KUBE_BUILDER=buildah: `sh` and `buildah` on
    /// PATH.
    #[arg(
        long = "kube-buildah-image",
        env = "RACK_KUBE_BUILDAH_IMAGE",
        default_value = "quay.io/buildah/stable:v1.38"
    )]
    pub buildah_image: String,
    /// Image with `sh`, `wget` and `tar` that downloads a build's source.
    #[arg(long, env = "RACK_FETCH_IMAGE", default_value = "busybox:1.36")]
    pub fetch_image: String,
    /// `<namespace>/<name>` of the service account rack runs as in the cluster: rack then binds
    /// the ClusterRole `rack-app` to it in each app namespace it creates (see docker/k8s).
    #[arg(long, env = "RACK_KUBE_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Kubeconfig file of the cluster; without it, ~/.kube/config, else the in-cluster
    /// service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The rack's wildcard domain: each service with a port (and not `internal`) is reached at
    /// `<service>.<app>.<domain>` through an Ingress. Without it, only `domain:` names are.
    #[arg(long = "domain", env = "RACK_DOMAIN")]
    pub domain: Option<String>,
    /// The ingress class of the apps' Ingresses (none: the cluster's default class).
    #[arg(long, env = "RACK_INGRESS_CLASS")]
    pub ingress_class: Option<String>,
    /// A cert-manager ClusterIssuer: the apps' Ingresses get TLS certificates from it.
    #[arg(long, env = "RACK_CERT_ISSUER")]
    pub cert_issuer: Option<String>,
    /// A Prometheus that scrapes the ingress controller (ingress-nginx), e.g.
    /// http://prometheus.monitoring:9090: a rollout's analysis then also compares each
    /// service's 5xx rate and p95 latency at the ingress with those before the rollout.
    #[arg(long = "prometheus-url", env = "RACK_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database: Database,
    pub password: Option<String>,
    /// RACK_SECRETS_KEY, when set (see `secrets`).
    pub secrets_key: Option<String>,
    pub runtime: RuntimeKind,
    pub rack_name: String,
    pub db_connections: u32,
    pub objects: ObjectsLocation,
    pub max_upload_bytes: u64,
    /// Largest `cp` tar stream into or out of a process.
    pub max_cp_bytes: u64,
    pub build_timeout: Duration,
    pub build_workers: usize,
    pub source_limits: Limits,
    /// How long a job's claim lasts without renewal (the holder renews it every third of it).
    pub job_lease: Duration,
    /// The shortest time a deployment's rollback gets (a short deadline given for the new
    /// release must not doom the old one).
    pub rollback_min_timeout: Duration,
    /// The user sandboxed commands run as when rack is root.
    pub sandbox_user: String,
    /// Largest size of a sandbox's `/tmp` (0: the kernel's default).
    pub sandbox_tmp_bytes: u64,
    /// The range of the apps' own uids: first, and how many.
    pub app_uids: (u32, u32),
    /// Largest size of a build's directory while its build commands run (0: no cap).
    pub build_dir_max_bytes: u64,
    /// Limits of the HTTP listener.
    pub listener: crate::serve::Limits,
    /// Longest a one-off process may run.
    pub run_timeout: Duration,
    pub auth_failures: u32,
    pub max_streams_per_credential: usize,
    /// How long the audit log keeps its entries.
    pub audit_retention: Duration,
    /// How long the event feed keeps its events.
    pub feed_retention: Duration,
    /// How long the per-minute traffic history keeps its minutes.
    pub metrics_retention: Duration,
    /// How much of each followed log the bus keeps in memory.
    pub stream_window: crate::events::tail::WindowLimits,
    /// Settings of the Kubernetes runtime, when it is the one in use.
    pub kube: Option<KubeConfig>,
    /// HTTPS or plain HTTP.
    pub tls: Tls,
    /// Scheduled backups, and the backup to restore before starting.
    pub backup: crate::backup::BackupSettings,
    /// The disk reserve, the free-space warning and the logs' retention.
    pub disk: crate::disk::DiskSettings,
    /// How webhooks are delivered.
    pub webhooks: crate::webhooks::Settings,
    /// The rack binary, run again as a helper (the resource forwarder of containers):
    /// `/proc/self/exe` (the running binary, even once an upgrade has replaced its file); the
    /// tests, whose server runs inside the test binary, point it at their `rack`.
    pub program: PathBuf,
    /// Whether rack's own log is written to Postgres, so that `rack logs` on any replica shows
    /// every replica's lines. The `rack server` process: yes (its log is its own); a server
    /// embedded in another process (the tests) shares that process's log with its neighbours,
    /// so it serves the log from memory instead.
    pub shared_rack_log: bool,
}

/// The running binary.
pub const SELF_PROGRAM: &str = "/proc/self/exe";

/// The image builder of the Kubernetes runtime's build Jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KubeBuilder {
    /// kaniko's executor: builds unprivileged, in its own root filesystem.
    #[default]
    Kaniko,
    /// buildah (`bud`, then `push`), with vfs storage and chroot isolation: runs privileged.
    Buildah,
}

/// The validated settings of the Kubernetes runtime.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub registry: String,
    /// The rack API as build pods reach it, without a trailing slash.
    pub url: String,
    /// What builds images, and its image (RACK_BUILDER_IMAGE for kaniko,
    /// RACK_KUBE_BUILDAH_IMAGE for buildah).
    pub builder: KubeBuilder,
    pub builder_image: String,
    pub fetch_image: String,
    /// `(namespace, name)` of rack's own service account.
    pub service_account: Option<(String, String)>,
    pub kubeconfig: Option<PathBuf>,
    /// How traffic reaches the apps' services.
    pub ingress: IngressConfig,
    /// The Prometheus the analysis queries for the ingress controller's request metrics,
    /// without a trailing slash (none: the analysis watches the pods only).
    pub prometheus_url: Option<String>,
}

/// How traffic from outside the cluster reaches the apps (Ingresses).
#[derive(Debug, Clone, Default)]
pub struct IngressConfig {
    /// The rack's wildcard domain (`<service>.<app>.<domain>`).
    pub domain: Option<String>,
    /// The ingress class (none: the cluster's default).
    pub class: Option<String>,
    /// The cert-manager ClusterIssuer that gives the Ingresses their TLS certificates.
    pub cert_issuer: Option<String>,
}

/// A setting's value, trimmed; `None` when unset or blank.
fn nonempty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl KubeConfig {
    fn from_args(args: KubeArgs) -> anyhow::Result<Self> {
        let Some(registry) = args.registry.filter(|r| !r.trim().is_empty()) else {
            bail!(
                "RACK_REGISTRY is required with RACK_RUNTIME=kube: the registry builds push images to, e.g. registry.example.com/rack"
            );
        };
        let registry = registry.trim().trim_end_matches('/').to_owned();
        if registry.contains("://") || registry.chars().any(char::is_whitespace) {
            bail!("RACK_REGISTRY must be a registry host and path like registry.example.com/rack, got {registry:?}");
        }
        let Some(url) = args.url.filter(|u| !u.trim().is_empty()) else {
            bail!(
                "RACK_API_URL is required with RACK_RUNTIME=kube: the rack API as build pods reach it, e.g. http://rack.rack.svc.cluster.local:5443"
            );
        };
        let url = url.trim().trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("RACK_API_URL must start with http:// or https://, got {url:?}");
        }
        let service_account = match args.service_account {
            None => None,
            Some(text) => match text.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Some((ns.to_owned(), name.to_owned()))
                }
                _ => bail!("RACK_KUBE_SERVICE_ACCOUNT must be <namespace>/<name>, got {text:?}"),
            },
        };
        let prometheus_url = nonempty(args.prometheus_url).map(|u| u.trim_end_matches('/').to_owned());
        if let Some(url) = &prometheus_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("RACK_PROMETHEUS_URL must start with http:// or https://, got {url:?}");
        }
        Ok(Self {
            prometheus_url,
            registry,
            url,
            builder: args.builder,
            builder_image: match args.builder {
                KubeBuilder::Kaniko => args.builder_image,
                KubeBuilder::Buildah => args.buildah_image,
            },
            fetch_image: args.fetch_image,
            service_account,
            kubeconfig: args.kubeconfig.filter(|p| !p.as_os_str().is_empty()),
            ingress: IngressConfig {
                domain: nonempty(args.domain).map(|d| d.trim_start_matches("*.").to_lowercase()),
                class: nonempty(args.ingress_class),
                cert_issuer: nonempty(args.cert_issuer),
            },
        })
    }
}

impl Config {
    /// Validates the flags.
    ///
    /// # Errors
    /// A message that names the variable to fix.
    pub fn from_args(args: ServerArgs) -> anyhow::Result<Self> {
        let tls = tls_setting(&args)?;
        let database = match args.database_url {
            Some(url) if url.trim().is_empty() => bail!("DATABASE_URL is set but empty"),
            Some(url) => Database::Url(url),
            None => Database::Embedded,
        };
        let password = match args.password {
            Some(p) if p.is_empty() => bail!("RACK_PASSWORD is set but empty"),
            p => p,
        };
        if matches!(database, Database::Url(_)) && password.is_none() {
            // Replicas sharing one database must share one password, so none is generated.
            bail!("RACK_PASSWORD is required when DATABASE_URL is set");
        }
        let kube = match args.runtime {
            RuntimeKind::Kube => Some(KubeConfig::from_args(args.kube)?),
            RuntimeKind::Local => None,
        };
        validate_rack_name(&args.name)?;
        if args.db_connections < 2 {
            bail!("RACK_DB_CONNECTIONS must be at least 2");
        }
        if args.job_lease < 3 {
            bail!("RACK_JOB_LEASE must be at least 3 seconds");
        }
        if args.header_timeout == 0 {
            bail!("RACK_HEADER_TIMEOUT must be at least 1 second");
        }
        if args.max_header_bytes < 1024 {
            bail!("RACK_MAX_HEADER_BYTES must be at least 1024");
        }
        if args.build_timeout == 0 {
            bail!("RACK_BUILD_TIMEOUT must be at least 1 second");
        }
        if args.stream_window_batches == 0 {
            bail!("RACK_STREAM_WINDOW_BATCHES must be at least 1");
        }
        if args.stream_window_bytes < 64 * 1024 {
            bail!("RACK_STREAM_WINDOW_BYTES must be at least 65536");
        }
        let webhooks = crate::webhooks::Settings::from_args(&args.webhooks)?;
        let data_dir = args.data.unwrap_or_else(default_data_dir);
        let objects = match args.objects {
            Some(text) => ObjectsLocation::parse(&text).map_err(anyhow::Error::msg)?,
            None => ObjectsLocation::Dir(data_dir.join("objects")),
        };
        Ok(Self {
            bind: args.bind,
            data_dir,
            database,
            password,
            secrets_key: args.secrets_key,
            runtime: args.runtime,
            rack_name: args.name,
            db_connections: args.db_connections,
            objects,
            max_upload_bytes: args.max_upload_bytes,
            max_cp_bytes: args.max_cp_bytes,
            build_timeout: Duration::from_secs(args.build_timeout),
            build_workers: args.build_workers,
            source_limits: Limits {
                max_bytes: args.max_source_bytes,
                max_entries: args.max_source_entries,
            },
            job_lease: Duration::from_secs(args.job_lease),
            rollback_min_timeout: ROLLBACK_MIN_TIMEOUT,
            sandbox_user: args.sandbox_user,
            sandbox_tmp_bytes: args.sandbox_tmp_bytes,
            app_uids: (args.app_uid_base, args.app_uid_count),
            build_dir_max_bytes: args.build_dir_max_bytes,
            run_timeout: Duration::from_secs(args.run_timeout.max(1)),
            auth_failures: args.auth_failures,
            max_streams_per_credential: args.max_streams_per_credential,
            audit_retention: Duration::from_secs(u64::from(args.audit_retention_days.max(1)) * 86_400),
            feed_retention: Duration::from_secs(u64::from(args.feed_retention_days.max(1)) * 86_400),
            metrics_retention: Duration::from_secs(u64::from(args.metrics_retention_days.max(1)) * 86_400),
            stream_window: crate::events::tail::WindowLimits {
                batches: args.stream_window_batches,
                bytes: args.stream_window_bytes,
            },
            listener: crate::serve::Limits {
                header_timeout: Duration::from_secs(args.header_timeout),
                max_header_bytes: args.max_header_bytes,
                max_unauthenticated: args.max_unauthenticated_connections,
            },
            kube,
            tls,
            backup: crate::backup::BackupSettings::from_args(args.backup)?,
            disk: args.disk.into(),
            webhooks,
            program: PathBuf::from(SELF_PROGRAM),
            shared_rack_log: true,
        })
    }

    /// A configuration for tests: port 0 on loopback, the given data directory and database.
    pub fn for_tests(data_dir: PathBuf, database: Database, password: &str) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            objects: ObjectsLocation::Dir(data_dir.join("objects")),
            max_upload_bytes: 1 << 30,
            max_cp_bytes: 256 << 20,
            build_timeout: Duration::from_secs(60),
            build_workers: 2,
            source_limits: Limits::default(),
            job_lease: Duration::from_secs(30),
            rollback_min_timeout: ROLLBACK_MIN_TIMEOUT,
            data_dir,
            database,
            password: Some(password.to_owned()),
            secrets_key: None,
            runtime: RuntimeKind::Local,
            rack_name: "rack".to_owned(),
            db_connections: 5,
            sandbox_user: crate::runtime::local::sandbox::DEFAULT_USER.to_owned(),
            sandbox_tmp_bytes: 256 << 20,
            app_uids: (1_000_000_000, 1_000_000),
            build_dir_max_bytes: 10 << 30,
            listener: crate::serve::Limits::default(),
            run_timeout: Duration::from_secs(600),
            auth_failures: 20,
            max_streams_per_credential: 100,
            audit_retention: Duration::from_secs(90 * 86_400),
            feed_retention: Duration::from_secs(14 * 86_400),
            metrics_retention: Duration::from_secs(7 * 86_400),
            stream_window: crate::events::tail::WindowLimits::default(),
            kube: None,
            tls: Tls::Off,
            backup: crate::backup::BackupSettings::default(),
            disk: crate::disk::DiskSettings {
                // Tests run on machines with little free disk: only a test that asks refuses builds.
                reserve: 0,
                warn: 0,
                ..crate::disk::DiskSettings::default()
            },
            webhooks: crate::webhooks::Settings::default(),
            program: PathBuf::from(SELF_PROGRAM),
            shared_rack_log: false,
        }
    }
}

/// Whether the API serves HTTPS, and with which certificate. Plain HTTP beyond loopback would
/// carry the password and tokens in clear, so it needs `RACK_INSECURE_HTTP` to say a proxy in
/// front of rack takes care of TLS.
fn tls_setting(args: &ServerArgs) -> anyhow::Result<Tls> {
    let embedded = args.database_url.is_none();
    let tls = match (&args.tls_cert, &args.tls_key, args.tls) {
        (Some(_), Some(_), TlsMode::Off) => {
            bail!("RACK_TLS=off contradicts RACK_TLS_CERT and RACK_TLS_KEY: unset one or the other")
        }
        (Some(cert), Some(key), _) => Tls::Files(crate::tls::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (Some(_), None, _) | (None, Some(_), _) => {
            bail!("RACK_TLS_CERT and RACK_TLS_KEY go together: give both, or neither")
        }
        (None, None, TlsMode::On) => Tls::SelfSigned,
        (None, None, TlsMode::Auto) if !args.bind.ip().is_loopback() && embedded => Tls::SelfSigned,
        (None, None, _) => Tls::Off,
    };
    if tls == Tls::Off && !args.bind.ip().is_loopback() && !args.insecure_http {
        bail!(
            "refusing to serve plain HTTP on {} (RACK_BIND): the password and tokens would cross the network in clear. \
             Give a certificate (RACK_TLS_CERT and RACK_TLS_KEY), or set RACK_TLS=on for a self-signed one, \
             or set RACK_INSECURE_HTTP=1 if a proxy in front of rack terminates TLS",
            args.bind
        );
    }
    Ok(tls)
}

fn validate_rack_name(name: &str) -> anyhow::Result<()> {
    if crate::names::AppName::parse(name).is_err() {
        bail!(
            "RACK_NAME must be a lowercase DNS label (letters, digits and '-', starting with a letter), got {name:?}"
        );
    }
    Ok(())
}

/// Root cannot keep a cluster under /root (the postgres user could not reach it), so a server
/// run as root keeps its data in /var/lib/rack, like other system services.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/rack");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rack");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/rack")
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
