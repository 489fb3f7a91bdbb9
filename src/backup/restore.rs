//! `rack server --restore FILE`: [`verify`] reads the whole archive and checks every entry
//! against the manifest at its end before anything is written (a damaged or truncated archive
//! is refused with what is wrong); then, on an empty data directory and an empty database,
//! [`load`] puts everything back: the dump with `pg_restore` (the server's migrations then
//! bring an older backup's schema up to date), the blobs into the object store, the build
//! directories into the data directory and the images into podman; the resources' exports wait
//! in `<data>/resource-imports/`, and the file `restore-reapply` marks the data directory
//! restored. The server then starts as usual, and its reconciler starts every app's current
//! release again (on any runtime while the marker is there): the runtime creates each resource
//! and loads its export into it (`crate::backup::pending_import`).

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use sha2::Digest;

use super::archive::Hashing;
use super::{
    DATABASE, Entry, IMAGES, KEPT_FILES, Kind, MANIFEST, MARKER, MARKER_TEXT, Manifest, PENDING_IMPORTS, RESOURCES,
};

/// An archive whose every entry matched its manifest.
#[derive(Debug)]
pub struct Verified {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// The data directory's own files the backup kept (password, certificate), by name.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Reads the archive at `path` through and checks it against its manifest.
///
/// # Errors
/// When the file cannot be read, is not a rack backup, or is damaged or truncated: the message
/// names the entry and what is wrong with it.
pub fn verify(path: &Path) -> anyhow::Result<Verified> {
    let file = std::fs::File::open(path).with_context(|| format!("opening the backup {}", path.display()))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut found: Vec<Entry> = Vec::new();
    let mut manifest: Option<Manifest> = None;
    let mut files = Vec::new();
    let mut last = String::from("the start");
    let mut first = true;
    let entries = archive
        .entries()
        .with_context(|| format!("reading the backup {}", path.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| anyhow!("the backup is damaged or truncated after {last}: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| anyhow!("the backup is damaged after {last}: an entry has no readable name ({e})"))?
            .to_string_lossy()
            .into_owned();
        if manifest.is_some() {
            bail!("the backup has an entry ({name}) after its manifest: it is not one rack wrote");
        }
        if first {
            let mut text = String::new();
            if name != MARKER || entry.read_to_string(&mut text).is_err() || text != MARKER_TEXT {
                bail!(
                    "{} is not a rack backup (it does not start with a `{MARKER}` entry)",
                    path.display()
                );
            }
            first = false;
            last = name;
            continue;
        }
        let kind = entry.header().entry_type();
        let record = if kind.is_file() {
            let size = entry.header().size().unwrap_or(0);
            let mut keep = Vec::new();
            let mut hashing = Hashing::new(&mut entry);
            let kept = KEPT_FILES.contains(&name.as_str());
            let copied = if name == MANIFEST || kept {
                hashing.read_to_end(&mut keep).map(|n| n as u64)
            } else {
                io::copy(&mut hashing, &mut io::sink())
            };
            copied.map_err(|e| anyhow!("the backup is truncated or damaged inside {name}: {e}"))?;
            if hashing.read != size {
                bail!(
                    "the backup is truncated inside {name}: {} of its {size} bytes are there",
                    hashing.read
                );
            }
            let sha256 = crate::objects::hex(&hashing.hasher.finalize());
            if name == MANIFEST {
                let parsed: Manifest =
                    serde_json::from_slice(&keep).map_err(|e| anyhow!("the backup's manifest is damaged: {e}"))?;
                if parsed.format != 1 {
                    bail!(
                        "the backup is in format {}, which this rack ({}) cannot read: restore it with a newer rack",
                        parsed.format,
                        env!("CARGO_PKG_VERSION")
                    );
                }
                manifest = Some(parsed);
                continue;
            }
            if kept {
                files.push((name.clone(), keep));
            }
            Entry {
                path: name.clone(),
                kind: Kind::File,
                size,
                sha256: Some(sha256),
                link: None,
            }
        } else if kind.is_dir() {
            Entry {
                path: name.trim_end_matches('/').to_owned(),
                kind: Kind::Dir,
                size: 0,
                sha256: None,
                link: None,
            }
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .ok()
                .flatten()
                .map(|l| l.to_string_lossy().into_owned());
            Entry {
                path: name.clone(),
                kind: Kind::Symlink,
                size: 0,
                sha256: None,
                link,
            }
        } else {
            bail!("the backup holds {name}, an entry of a kind rack never writes: it is damaged");
        };
        found.push(record);
        last = name;
    }
    if first {
        bail!("{} is empty: not a rack backup", path.display());
    }
    let Some(manifest) = manifest else {
        bail!("the backup is truncated: it ends after {last} without its manifest ({MANIFEST}, always last)");
    };
    compare(&manifest.entries, &found)?;
    super::check_resource_records(&manifest.resources)?;
    for path in manifest.resources.iter().filter_map(|r| r.path.as_ref()) {
        if !found.iter().any(|e| &e.path == path && e.kind == Kind::File) {
            bail!("the backup is missing {path}, the export its manifest lists for a resource");
        }
    }
    Ok(Verified {
        path: path.to_path_buf(),
        manifest,
        files,
    })
}

/// Checks that the archive holds exactly what the manifest lists.
fn compare(listed: &[Entry], found: &[Entry]) -> anyhow::Result<()> {
    let listed_by_path: std::collections::BTreeMap<&str, &Entry> =
        listed.iter().map(|e| (e.path.as_str(), e)).collect();
    for entry in found {
        let Some(expected) = listed_by_path.get(entry.path.as_str()) else {
            bail!(
                "the backup holds {}, which its manifest does not list: it is damaged",
                entry.path
            );
        };
        if *expected != entry {
            if expected.sha256 != entry.sha256 || expected.size != entry.size {
                bail!(
                    "{} is damaged: {} bytes with SHA-256 {}, where the manifest says {} bytes with SHA-256 {}",
                    entry.path,
                    entry.size,
                    entry.sha256.as_deref().unwrap_or("-"),
                    expected.size,
                    expected.sha256.as_deref().unwrap_or("-"),
                );
            }
            bail!("{} is damaged: it is not what the manifest lists", entry.path);
        }
    }
    if listed.len() != found.len() {
        let present: std::collections::BTreeSet<&str> = found.iter().map(|e| e.path.as_str()).collect();
        let missing = listed
            .iter()
            .find(|e| !present.contains(e.path.as_str()))
            .map_or("an entry", |e| e.path.as_str());
        bail!("the backup is missing {missing}, which its manifest lists");
    }
    if !found.iter().any(|e| e.path == DATABASE) {
        bail!("the backup has no database dump ({DATABASE})");
    }
    Ok(())
}

/// Whether `dir` is absent or empty (what a restore needs).
///
/// # Errors
/// When `dir` holds anything.
pub fn check_empty_data_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("reading the data directory {}: {e}", dir.display())),
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(entry) => bail!(
                "--restore needs an empty data directory, and {} holds {}: restore into a new RACK_DATA",
                dir.display(),
                entry
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        },
    }
}

/// Puts the verified backup back into an empty database, object store and data directory.
///
/// # Errors
/// When the database is not empty, or a step fails (the message says which).
pub async fn load(
    config: &crate::config::Config,
    pool: &sqlx::PgPool,
    objects: &crate::objects::Objects,
    verified: Verified,
) -> anyhow::Result<()> {
    let tables = crate::store::backup::tables(pool).await?;
    if !tables.is_empty() {
        bail!(
            "--restore needs an empty database, and this one has tables ({}): restore into a new database",
            tables.join(", ")
        );
    }
    let staging = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(&config.data_dir)
        .context("making the restore's scratch directory")?;
    let (source, data_dir, stage) = (
        verified.path.clone(),
        config.data_dir.clone(),
        staging.path().to_path_buf(),
    );
    tokio::task::spawn_blocking(move || unpack(&source, &data_dir, &stage))
        .await?
        .context("unpacking the backup")?;

    let bin = crate::postgres::find_bin_dir()?;
    let output = tokio::process::Command::new(bin.join("pg_restore"))
        .args([
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
        ])
        .arg("--dbname")
        .arg(super::tool_url(config, pool))
        .arg(staging.path().join(DATABASE))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running pg_restore")?;
    if !output.status.success() {
        bail!(
            "pg_restore failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }

    for entry in &verified.manifest.entries {
        let Some(location) = entry.path.strip_prefix("objects/") else {
            continue;
        };
        let file = tokio::fs::File::open(staging.path().join(&entry.path)).await?;
        objects
            .put_stream(
                location,
                tokio_util::io::ReaderStream::new(file),
                u64::MAX,
                entry.sha256.as_deref(),
            )
            .await
            .with_context(|| format!("restoring the blob {location}"))?;
    }

    // The resources' exports wait in the data directory for the runtime to create their
    // resources (moved, not copied: the staging directory is in the data directory).
    let exports = staging.path().join(RESOURCES);
    if exports.is_dir() {
        std::fs::rename(&exports, config.data_dir.join(PENDING_IMPORTS))
            .context("keeping the resources' exports in the data directory")?;
    }

    // The server applies every app's release once it starts, then removes this.
    std::fs::write(config.data_dir.join(super::REAPPLY), b"").context("marking the data directory restored")?;

    let images = staging.path().join(IMAGES);
    if images.exists() {
        match crate::runtime::local::podman::Podman::detect(&config.data_dir, &config.rack_name) {
            Ok(Some(podman)) => {
                let path = images.display().to_string();
                podman
                    .output_within(&["load", "--input", &path], Some(std::time::Duration::from_secs(3600)))
                    .await
                    .map_err(|e| anyhow!("podman load: {e}"))?;
            }
            _ => tracing::warn!(
                "the backup has images but podman is not installed: services built from a Dockerfile cannot run until they are built again"
            ),
        }
    }
    tracing::info!(
        entries = verified.manifest.entries.len(),
        migration = verified.manifest.migration,
        "restored the backup taken {} by rack {}",
        verified.manifest.created,
        verified.manifest.rack_version
    );
    Ok(())
}

/// Unpacks the dump, blobs and images into `staging`, and the build directories (with their
/// owners and modes) into `data_dir`.
fn unpack(source: &Path, data_dir: &Path, staging: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(source)?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let target = if name.starts_with("builds/") {
            data_dir
        } else if name == DATABASE
            || name == IMAGES
            || name.starts_with("objects/")
            || name.starts_with(&format!("{RESOURCES}/"))
        {
            staging
        } else {
            continue;
        };
        // unpack_in refuses paths that would leave `target` (`..`, absolute paths).
        if !entry.unpack_in(target)? {
            bail!("the backup's entry {name} points outside the data directory");
        }
    }
    Ok(())
}

/// Puts the data directory's own files (generated password, self-signed certificate) back, before
/// the server reads them; a password given in RACK_PASSWORD wins as always.
///
/// # Errors
/// When a file cannot be written.
pub fn write_kept_files(data_dir: &Path, verified: &Verified) -> anyhow::Result<()> {
    for (name, bytes) in &verified.files {
        write_private(&data_dir.join(name), bytes)?;
    }
    Ok(())
}

/// Writes a new file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}
