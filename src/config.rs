//! Every server setting: a flag and an environment variable each, parsed and validated once
//! at startup into [`Config`]. Tests build a `Config` directly and never touch the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::archive::Limits;
use crate::objects::ObjectsLocation;

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
    /// Largest number of Postgres connections this server opens.
    #[arg(long, env = "RACK_DB_CONNECTIONS", default_value_t = 20)]
    pub db_connections: u32,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database: Database,
    pub password: Option<String>,
    pub runtime: RuntimeKind,
    pub rack_name: String,
    pub db_connections: u32,
    pub objects: ObjectsLocation,
    pub max_upload_bytes: u64,
    pub build_timeout: Duration,
    pub build_workers: usize,
    pub source_limits: Limits,
    /// How long a job's claim lasts without renewal (the holder renews it every third of it).
    pub job_lease: Duration,
}

impl Config {
    /// Validates the flags.
    ///
    /// # Errors
    /// A message that names the variable to fix.
    pub fn from_args(args: ServerArgs) -> anyhow::Result<Self> {
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
        if args.runtime == RuntimeKind::Kube {
            bail!("RACK_RUNTIME=kube is not available in this version of rack; use RACK_RUNTIME=local");
        }
        validate_rack_name(&args.name)?;
        if args.db_connections < 2 {
            bail!("RACK_DB_CONNECTIONS must be at least 2");
        }
        if args.job_lease < 3 {
            bail!("RACK_JOB_LEASE must be at least 3 seconds");
        }
        if args.build_timeout == 0 {
            bail!("RACK_BUILD_TIMEOUT must be at least 1 second");
        }
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
            runtime: args.runtime,
            rack_name: args.name,
            db_connections: args.db_connections,
            objects,
            max_upload_bytes: args.max_upload_bytes,
            build_timeout: Duration::from_secs(args.build_timeout),
            build_workers: args.build_workers,
            source_limits: Limits {
                max_bytes: args.max_source_bytes,
                max_entries: args.max_source_entries,
            },
            job_lease: Duration::from_secs(args.job_lease),
        })
    }

    /// A configuration for tests: port 0 on loopback, the given data directory and database.
    pub fn for_tests(data_dir: PathBuf, database: Database, password: &str) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            objects: ObjectsLocation::Dir(data_dir.join("objects")),
            max_upload_bytes: 1 << 30,
            build_timeout: Duration::from_secs(60),
            build_workers: 2,
            source_limits: Limits::default(),
            job_lease: Duration::from_secs(30),
            data_dir,
            database,
            password: Some(password.to_owned()),
            runtime: RuntimeKind::Local,
            rack_name: "rack".to_owned(),
            db_connections: 5,
        }
    }
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
