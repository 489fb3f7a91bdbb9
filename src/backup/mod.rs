//! Backups of a whole rack and restores from them. A backup is one uncompressed tar stream:
//!
//! - `rack-backup`: the format marker, always first;
//! - `database.pgdump`: `pg_dump --format=custom` of rack's database, taken in the same
//!   exported snapshot as the lists below, so the archive is one consistent point in time;
//! - `password`, `tls-cert.pem`, `tls-key.pem`: the data directory's generated password and
//!   self-signed certificate, when there are (clients keep their credentials and pins);
//! - `objects/<location>`: every blob an object of the database points at;
//! - `builds/<app>/<build>/…`: the directories of the builds releases were made from (what the
//!   local runtime runs process services from);
//! - `images.tar`: `podman save` of those builds' images (unless `images=false`);
//! - `resources/<app>/<name>.sql|.rdb`: the export of each resource (convox.yml `resources:`)
//!   the apps' releases declare, and of each rack-wide one (`resources/@rack/`), unless
//!   `resources=false`: what `GET
//!   /apps/{app}/resources/{name}/data` gives; the manifest's `resources` says which were left
//!   out and why (memcached: a cache; a runtime that cannot bring them back);
//! - `MANIFEST.json`: always last, every entry above with its size and SHA-256.
//!
//! The manifest comes last because the archive is streamed while it is written; a restore reads
//! the whole archive once to check it against the manifest before it writes anything, so a
//! damaged or truncated archive (no manifest at the end) is refused up front. A restore keeps
//! the resources' exports in `<data>/resource-imports/<app>/`, and the runtime loads each into
//! its resource when it first creates it (see [`pending_import`]).

pub mod archive;
pub mod restore;
pub mod schedule;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The first entry of every archive, and its content.
pub const MARKER: &str = "rack-backup";
pub const MARKER_TEXT: &str = "rack backup format 1\n";
/// The last entry of every archive.
pub const MANIFEST: &str = "MANIFEST.json";
/// The database dump.
pub const DATABASE: &str = "database.pgdump";
/// The data directory's own files a backup keeps: the generated password and the self-signed
/// certificate (all small).
pub const KEPT_FILES: [&str; 4] = ["password", "tls-cert.pem", "tls-key.pem", crate::secrets::KEY_FILE];
/// The saved images.
pub const IMAGES: &str = "images.tar";
/// Where resources' exports are in the archive: `resources/<app>/<name>.<ext>`.
pub const RESOURCES: &str = "resources";
/// Where a restore keeps resources' exports until the runtime has loaded each into its new
/// resource: `<data>/resource-imports/<app>/<name>.<ext>`.
pub const PENDING_IMPORTS: &str = "resource-imports";
/// A file a restore leaves in the data directory until the server has applied every restored
/// app's current release once (`jobs::deploys::reconcile_all`), on any runtime.
pub const REAPPLY: &str = "restore-reapply";
/// Where scheduled backups go in the object store.
pub const STORE_PREFIX: &str = "_backups";

/// Backup and restore settings of `rack server`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    /// Take a backup into the object store (under `_backups/`) on this cron schedule (5 fields
    /// or a macro such as @daily, UTC).
    #[arg(long, env = "RACK_BACKUP_SCHEDULE")]
    pub backup_schedule: Option<String>,
    /// How many scheduled backups to keep; older ones are deleted.
    #[arg(long, env = "RACK_BACKUP_KEEP", default_value_t = 7)]
    pub backup_keep: usize,
    /// Restore this backup (from `GET /system/backup` or `rack system backup`) before starting:
    /// the data directory (and the `DATABASE_URL` database) must be empty. The archive is
    /// checked whole before anything is written.
    #[arg(long)]
    pub restore: Option<PathBuf>,
}

/// The validated backup settings.
#[derive(Debug, Clone, Default)]
pub struct BackupSettings {
    pub schedule: Option<String>,
    pub keep: usize,
    pub restore: Option<PathBuf>,
}

impl BackupSettings {
    /// Checks the schedule.
    ///
    /// # Errors
    /// When the schedule is not a cron expression, or `keep` is 0.
    pub fn from_args(args: BackupArgs) -> anyhow::Result<Self> {
        let schedule = args
            .backup_schedule
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if let Some(schedule) = &schedule {
            crate::manifest::check_schedule(schedule)
                .map_err(|e| anyhow::anyhow!("RACK_BACKUP_SCHEDULE {schedule:?}: {e}"))?;
        }
        if args.backup_keep == 0 {
            anyhow::bail!("RACK_BACKUP_KEEP must be at least 1");
        }
        Ok(Self {
            schedule,
            keep: args.backup_keep,
            restore: args.restore,
        })
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One entry of the archive, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    /// Lowercase hex SHA-256 of a file's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// The manifest: what the archive holds and where it comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created: DateTime<Utc>,
    pub rack_version: String,
    /// The newest migration of the dumped database (a restore runs the newer ones).
    pub migration: Option<i64>,
    /// Whether the images are in it.
    pub images: bool,
    pub entries: Vec<Entry>,
    /// Every resource of the apps, with where its export is or why it is not there (absent
    /// from backups taken before resources were backed up).
    #[serde(default)]
    pub resources: Vec<ResourceRecord>,
}

/// A resource in a backup: its export's entry, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecord {
    pub app: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The entry of its export (`resources/<app>/<name>.<ext>`), listed in `entries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why its data is not in the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The file extension of a resource's export: `sql` (postgres, postgis, mysql, mariadb: what
/// `psql` or `mysql` load), `rdb` (redis); `None` for a kind with nothing to export (memcached).
pub fn export_extension(kind: crate::resource::Kind) -> Option<&'static str> {
    use crate::resource::Kind;
    match kind {
        Kind::Postgres | Kind::Postgis | Kind::Mysql | Kind::Mariadb => Some("sql"),
        Kind::Redis => Some("rdb"),
        Kind::Memcached => None,
    }
}

/// The export a restore left for resource `name` of `app` (of `kind`) to be loaded into it when
/// the runtime creates it, if there is one. The runtime loads it into the new resource before
/// it marks the resource created, and removes the file after: a crash half-way leaves a
/// resource the next attempt creates afresh (and loads again), never one loaded twice.
pub fn pending_import(
    data_dir: &std::path::Path,
    app: &str,
    name: &str,
    kind: crate::resource::Kind,
) -> Option<PathBuf> {
    let ext = export_extension(kind)?;
    let path = data_dir.join(PENDING_IMPORTS).join(app).join(format!("{name}.{ext}"));
    path.is_file().then_some(path)
}

/// Whether `s` is a name rack gives apps and resources (a DNS label): what a restore accepts in
/// the path of a resource's export.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a manifest's resource records: each export's path is `resources/<app>/<name>.<ext>` of
/// its own kind (a restore writes it under the data directory: nothing else may get there).
///
/// # Errors
/// When a record names anything else.
pub fn check_resource_records(records: &[ResourceRecord]) -> anyhow::Result<()> {
    for record in records {
        let Some(path) = &record.path else { continue };
        let kind: crate::resource::Kind = record
            .kind
            .parse()
            .map_err(|e| anyhow::anyhow!("the backup's manifest is damaged: resource {}: {e}", record.name))?;
        let expected = export_extension(kind).map(|ext| format!("{RESOURCES}/{}/{}.{ext}", record.app, record.name));
        // An app's name, or the owner of the rack-wide resources.
        let owner = is_label(&record.app) || record.app == crate::runtime::RACK_OWNER;
        if !owner || !is_label(&record.name) || expected.as_deref() != Some(path.as_str()) {
            anyhow::bail!(
                "the backup's manifest is damaged: resource {} of {} has its export at {path:?}",
                record.name,
                record.app
            );
        }
    }
    Ok(())
}

/// A libpq connection string for the tools (`pg_dump`, `pg_restore`) to reach the database
/// `pool` uses: `DATABASE_URL` itself, or the embedded cluster's socket.
pub fn tool_url(config: &crate::config::Config, pool: &sqlx::PgPool) -> String {
    match &config.database {
        crate::config::Database::Url(url) => url.clone(),
        crate::config::Database::Embedded => {
            let options = pool.connect_options();
            let host = options
                .get_socket()
                .map_or_else(|| options.get_host().to_owned(), |s| s.display().to_string());
            format!(
                "postgresql://{}@/{}?host={}&port={}",
                options.get_username(),
                options.get_database().unwrap_or("rack"),
                host,
                options.get_port()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(app: &str, name: &str, kind: &str, path: Option<&str>) -> ResourceRecord {
        ResourceRecord {
            app: app.to_owned(),
            name: name.to_owned(),
            kind: kind.to_owned(),
            path: path.map(str::to_owned),
            skipped: None,
        }
    }

    #[test]
    fn a_resource_record_names_only_its_own_export() {
        let good = [
            record("shop", "database", "postgres", Some("resources/shop/database.sql")),
            record("shop", "cache", "redis", Some("resources/shop/cache.rdb")),
            record("shop", "sessions", "memcached", None),
        ];
        check_resource_records(&good).unwrap();
        for bad in [
            record("shop", "database", "postgres", Some("resources/shop/database.rdb")),
            record("shop", "database", "postgres", Some("builds/shop/x")),
            record("..", "database", "postgres", Some("resources/../database.sql")),
            record("shop", "a/b", "postgres", Some("resources/shop/a/b.sql")),
            record("shop", "sessions", "memcached", Some("resources/shop/sessions.sql")),
            record("shop", "database", "oracle", Some("resources/shop/database.sql")),
        ] {
            let error = check_resource_records(std::slice::from_ref(&bad)).unwrap_err();
            assert!(error.to_string().contains("damaged"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_manifest_without_resources_reads_as_none() {
        let text = r#"{"format":1,"created":"2026-12-04T10:00:00Z","rack_version":"0.1.0","migration":null,"images":true,"entries":[]}"#;
        let manifest: Manifest = serde_json::from_str(text).unwrap();
        assert!(manifest.resources.is_empty());
    }
}
