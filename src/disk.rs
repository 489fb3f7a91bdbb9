//! The disk rack uses, visible and bounded: [`usage`] (`GET /system/usage`) counts the data
//! directory as `du` does (allocated blocks, each inode once) by kind and by app; [`check_room`]
//! refuses new builds with 507 when the data directory's filesystem is nearly full, rather
//! than letting them fail halfway; [`maintain`] warns in the feed (`system.disk`) when free
//! space falls under a threshold, deletes app logs past their retention and removes orphaned
//! blobs (no object points at them) and images (their build is gone).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::AppState;
use crate::error::ApiError;

/// How often [`maintain`] looks at the free space.
const EVERY: Duration = Duration::from_secs(60);
/// How often it prunes (the first time one period after the start: a restart loop must not
/// run podman and scan the object store on every start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// A blob younger than this may be an upload whose object row is not committed yet.
const ORPHAN_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Disk settings of `rack server`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskArgs {
    /// Builds are refused (507) while the data directory's filesystem has fewer free bytes.
    #[arg(long, env = "RACK_DISK_RESERVE_BYTES", default_value_t = 1 << 30)]
    pub disk_reserve_bytes: u64,
    /// A `system.disk` warning goes to the feed when free bytes fall under this.
    #[arg(long, env = "RACK_DISK_WARN_BYTES", default_value_t = 5 << 30)]
    pub disk_warn_bytes: u64,
    /// Days the apps' process logs are kept (builds' and deployments' logs stay with them).
    #[arg(long, env = "RACK_LOG_RETENTION_DAYS", default_value_t = 30)]
    pub log_retention_days: u32,
}

/// The validated disk settings.
#[derive(Debug, Clone)]
pub struct DiskSettings {
    pub reserve: u64,
    pub warn: u64,
    pub log_retention: Duration,
}

impl Default for DiskSettings {
    fn default() -> Self {
        Self {
            reserve: 1 << 30,
            warn: 5 << 30,
            log_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

impl From<DiskArgs> for DiskSettings {
    fn from(args: DiskArgs) -> Self {
        Self {
            reserve: args.disk_reserve_bytes,
            warn: args.disk_warn_bytes.max(args.disk_reserve_bytes),
            log_retention: Duration::from_secs(u64::from(args.log_retention_days.max(1)) * 86_400),
        }
    }
}

/// Free bytes (for an unprivileged user) of the filesystem that holds `dir`.
///
/// # Errors
/// When `dir` cannot be examined.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// 507 when the data directory's filesystem has less free space than the reserve.
///
/// # Errors
/// [`ApiError::InsufficientStorage`], saying how much is free and what to do.
pub fn check_room(state: &AppState) -> Result<(), ApiError> {
    let reserve = state.config.disk.reserve;
    match free_bytes(&state.config.data_dir) {
        Ok(free) if free < reserve => Err(ApiError::InsufficientStorage(format!(
            "the rack's disk is nearly full ({free} bytes free, under the {reserve} bytes reserve of \
             RACK_DISK_RESERVE_BYTES): free some space (see `rack system usage`) and build again"
        ))),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "measuring the free space of the data directory");
            Ok(())
        }
    }
}

/// What `GET /system/usage` answers.
#[derive(Debug, Default, Serialize)]
pub struct Usage {
    /// The data directory as `du` counts it.
    pub data_dir: DataDir,
    /// Bytes by kind. `database`, `sources`, `backups`, `builds` and `other` add up to
    /// `data_dir.bytes` (when the database and the object store are in the data directory);
    /// `logs` is the part of the database the logs, feed and audit take (counted in
    /// `database` too), `images` is podman's storage, outside the data directory.
    pub kinds: BTreeMap<&'static str, u64>,
    /// Bytes by app and kind (sources, builds, logs, images).
    pub apps: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// The data directory's size and free space.
#[derive(Debug, Default, Serialize)]
pub struct DataDir {
    pub path: String,
    pub bytes: u64,
    pub free: u64,
    pub reserve: u64,
}

/// Measures everything.
///
/// # Errors
/// When the database cannot be queried or the data directory read.
pub async fn usage(state: &AppState) -> anyhow::Result<Usage> {
    let data_dir = state.config.data_dir.clone();
    let objects_dir = match &state.config.objects {
        crate::objects::ObjectsLocation::Dir(dir) => Some(dir.clone()),
        crate::objects::ObjectsLocation::S3 { .. } => None,
    };
    let apps = crate::store::usage::apps(&state.pool).await?;
    let walked = {
        let apps = apps.clone();
        tokio::task::spawn_blocking(move || walk(&data_dir, objects_dir.as_deref(), &apps)).await??
    };
    let mut usage = Usage {
        data_dir: DataDir {
            path: state.config.data_dir.display().to_string(),
            bytes: walked.total,
            free: free_bytes(&state.config.data_dir).unwrap_or(0),
            reserve: state.config.disk.reserve,
        },
        ..Usage::default()
    };
    let logs = u64::try_from(crate::store::usage::log_tables(&state.pool).await?).unwrap_or(0);
    let database = match state.config.database {
        crate::config::Database::Embedded => walked.database,
        crate::config::Database::Url(_) => {
            u64::try_from(crate::store::usage::database(&state.pool).await?).unwrap_or(0)
        }
    };
    let images = images(state).await;
    usage.kinds = BTreeMap::from([
        ("database", database),
        ("logs", logs),
        ("sources", walked.sources),
        ("backups", walked.backups),
        ("builds", walked.builds.values().sum()),
        ("images", images.values().sum()),
        ("other", walked.other),
    ]);
    let sources = crate::store::usage::sources_by_app(&state.pool).await?;
    let app_logs = crate::store::usage::logs_by_app(&state.pool).await?;
    for app in apps {
        let get = |map: &BTreeMap<String, i64>| map.get(&app).map_or(0, |v| u64::try_from(*v).unwrap_or(0));
        let by_kind = BTreeMap::from([
            ("sources", get(&sources)),
            ("logs", get(&app_logs)),
            ("builds", walked.builds.get(&app).copied().unwrap_or(0)),
            ("images", images.get(&app).copied().unwrap_or(0)),
        ]);
        usage.apps.insert(app, by_kind);
    }
    Ok(usage)
}

/// The data directory, counted.
#[derive(Debug, Default)]
struct Walked {
    total: u64,
    database: u64,
    sources: u64,
    backups: u64,
    builds: BTreeMap<String, u64>,
    other: u64,
}

/// Counts the data directory as `du` does: allocated blocks of every file and directory, each
/// inode once, not following links and staying on one filesystem.
fn walk(data_dir: &Path, objects_dir: Option<&Path>, apps: &[String]) -> std::io::Result<Walked> {
    let mut seen = HashSet::new();
    let root = std::fs::symlink_metadata(data_dir)?;
    let own = allocated(&root, &mut seen);
    let mut walked = Walked {
        total: own,
        other: own,
        ..Walked::default()
    };
    let objects_dir = objects_dir.filter(|d| d.starts_with(data_dir));
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let path = entry.path();
        let size = if objects_dir == Some(path.as_path()) {
            let backups = tree(&path.join(crate::backup::STORE_PREFIX), root.dev(), &mut seen);
            let rest = tree(&path, root.dev(), &mut seen);
            walked.backups += backups;
            walked.sources += rest;
            backups + rest
        } else if entry.file_name() == "postgres" {
            let size = tree(&path, root.dev(), &mut seen);
            walked.database += size;
            size
        } else if entry.file_name() == "builds" {
            let own = std::fs::symlink_metadata(&path).map_or(0, |m| allocated(&m, &mut seen));
            walked.other += own;
            let mut size = own;
            for app in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let name = app.file_name().to_string_lossy().into_owned();
                let bytes = tree(&app.path(), root.dev(), &mut seen);
                size += bytes;
                if apps.contains(&name) {
                    *walked.builds.entry(name).or_default() += bytes;
                } else {
                    walked.other += bytes;
                }
            }
            size
        } else {
            let size = tree(&path, root.dev(), &mut seen);
            walked.other += size;
            size
        };
        walked.total += size;
    }
    Ok(walked)
}

/// The allocated bytes of `meta`, or 0 when its inode was counted already.
fn allocated(meta: &std::fs::Metadata, seen: &mut HashSet<(u64, u64)>) -> u64 {
    if !seen.insert((meta.dev(), meta.ino())) {
        return 0;
    }
    meta.blocks() * 512
}

/// The allocated bytes of `path` and everything under it on device `dev`.
fn tree(path: &Path, dev: u64, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.dev() != dev {
        return 0;
    }
    let mut size = allocated(&meta, seen);
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            size += tree(&entry.path(), dev, seen);
        }
    }
    size
}

/// One of this rack's images, as `podman images --format json` lists it.
#[derive(Debug, serde::Deserialize)]
struct Image {
    #[serde(rename = "Id", default)]
    id: String,
    #[serde(rename = "Size", default)]
    size: u64,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

/// This rack's images (the local runtime's builds).
async fn rack_images(state: &AppState) -> Option<(crate::runtime::local::podman::Podman, Vec<Image>)> {
    if state.config.kube.is_some() {
        return None;
    }
    let podman = crate::runtime::local::podman::Podman::detect(&state.config.data_dir, &state.config.rack_name)
        .ok()
        .flatten()?;
    let filter = format!("label={}={}", crate::runtime::local::podman::LABEL_HOST, podman.host);
    let listed = podman
        .output(&["images", "--filter", &filter, "--format", "json"])
        .await
        .ok()?;
    let images = serde_json::from_str(&listed).ok()?;
    Some((podman, images))
}

/// Bytes of this rack's images by app.
async fn images(state: &AppState) -> BTreeMap<String, u64> {
    let mut by_app = BTreeMap::new();
    for image in rack_images(state).await.map(|(_, i)| i).unwrap_or_default() {
        let app = image
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::runtime::local::podman::LABEL_APP))
            .cloned()
            .unwrap_or_default();
        *by_app.entry(app).or_default() += image.size;
    }
    by_app
}

/// Watches the free space and keeps the disk bounded, until the server stops.
pub async fn maintain(state: AppState) {
    let mut low = false;
    let mut pruned = tokio::time::Instant::now();
    loop {
        if let Ok(free) = free_bytes(&state.config.data_dir) {
            state
                .metrics
                .disk_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            let warn = state.config.disk.warn;
            if free < warn && !low {
                let message = format!(
                    "The rack's disk is nearly full: {free} bytes free, under the {warn} bytes of RACK_DISK_WARN_BYTES"
                );
                tracing::warn!("{message}");
                let data = serde_json::json!({ "free": free, "warn": warn, "reserve": state.config.disk.reserve });
                if crate::store::backup::feed_system(&state.pool, "system.disk", &message, data)
                    .await
                    .is_ok()
                {
                    low = true;
                }
            } else if free >= warn {
                low = false;
            }
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            match crate::store::usage::prune_app_logs(&state.pool, state.config.disk.log_retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("deleted {n} app log lines past their retention"),
                Err(e) => tracing::warn!(error = %e, "deleting old app logs"),
            }
            if let Err(e) = prune_orphans(&state, ORPHAN_AGE).await {
                tracing::warn!(error = format!("{e:#}"), "removing orphaned blobs and images");
            }
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Removes blobs no object points at (older than `min_age`: younger ones may be uploads about to
/// be committed; [`maintain`] gives them an hour) and images whose build no longer exists:
/// hourly from [`maintain`].
///
/// # Errors
/// When the store or the database fails.
pub async fn prune_orphans(state: &AppState, min_age: chrono::TimeDelta) -> anyhow::Result<()> {
    let cutoff = chrono::Utc::now() - min_age;
    let old: Vec<String> = state
        .objects
        .list("_blobs")
        .await?
        .into_iter()
        .filter(|(_, at)| *at < cutoff)
        .map(|(location, _)| location)
        .collect();
    for location in crate::store::usage::unreferenced_blobs(&state.pool, &old).await? {
        state.objects.delete(&location).await?;
        tracing::info!("deleted the orphaned blob {location}");
    }
    let Some((podman, images)) = rack_images(state).await else {
        return Ok(());
    };
    let build_of = |image: &Image| {
        image
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::runtime::local::podman::LABEL_BUILD))
            .cloned()
    };
    let builds: Vec<String> = images.iter().filter_map(build_of).collect();
    let gone = crate::store::usage::missing_builds(&state.pool, &builds).await?;
    for image in images.iter().filter(|i| build_of(i).is_some_and(|b| gone.contains(&b))) {
        // An image a container still uses stays (podman refuses to remove it).
        if podman.output(&["rmi", &image.id]).await.is_ok() {
            tracing::info!("removed the image {} of a deleted build", image.id);
        }
    }
    Ok(())
}
