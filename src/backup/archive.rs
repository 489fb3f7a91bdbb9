//! Writing a backup: [`prepare`] takes the snapshot (the database dump and, in the same
//! snapshot, the lists of blobs and builds), then [`stream`] writes the tar archive on a thread
//! of its own into a bounded channel, so memory stays flat however large the rack is. The
//! dump, the saved images and the resources' exports are streamed to a scratch directory first
//! (a tar header needs each entry's size); blobs and build directories are read as they are
//! written.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    DATABASE, Entry, IMAGES, KEPT_FILES, Kind, MANIFEST, MARKER, MARKER_TEXT, Manifest, RESOURCES, ResourceRecord,
};
use crate::Rack;
use crate::store::backup::{Blob, ReleasedBuild};

/// Bytes the writer hands over at a time; with the channel's few slots, all the memory a
/// backup holds.
const CHUNK: usize = 256 * 1024;

/// What a backup takes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Whether to `podman save` the builds' images.
    pub images: bool,
    /// Whether to export the apps' resources.
    pub resources: bool,
}

/// A snapshot ready to be written.
#[derive(Debug)]
pub struct Prepared {
    scratch: tempfile::TempDir,
    blobs: Vec<Blob>,
    builds: Vec<ReleasedBuild>,
    migration: Option<i64>,
    images: Option<PathBuf>,
    include_images: bool,
    /// Every resource, with the entry of its export (a file of the scratch directory) or why
    /// it has none.
    resources: Vec<ResourceRecord>,
    /// About how many bytes the archive will have (for progress bars).
    pub estimate: u64,
}

/// A resource's export failed, so the backup did: the message names the resource and what to
/// do (start it, or leave resources out), for the client rather than only the server's log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResourceExportFailed(pub String);

/// What a finished backup wrote.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub bytes: u64,
    pub entries: usize,
}

/// Takes the snapshot: dumps the database with `pg_dump` in a snapshot exported by a
/// transaction that also lists the blobs and builds, and saves the images. With `lock` (the
/// scheduled backups), returns `None` when another server is taking one.
///
/// # Errors
/// When the database, `pg_dump` or `podman save` fails.
pub async fn prepare(rack: &Rack, options: Options, lock: bool) -> anyhow::Result<Option<Prepared>> {
    use anyhow::Context;
    let scratch = tempfile::Builder::new()
        .prefix(".backup-")
        .tempdir_in(&rack.config.data_dir)
        .context("making the backup's scratch directory in the data directory")?;
    let mut tx = rack.pool.begin().await?;
    let Some(snapshot) = crate::store::backup::export_snapshot(&mut tx, lock).await? else {
        return Ok(None);
    };
    let blobs = crate::store::backup::blobs(&mut tx).await?;
    let builds = crate::store::backup::released_builds(&mut tx).await?;
    let migration = crate::store::backup::migration(&mut tx).await?;
    let resources = crate::store::backup::resources(&mut tx, crate::runtime::RACK_OWNER).await?;
    let dump = scratch.path().join(DATABASE);
    let bin = crate::postgres::find_bin_dir()?;
    // The snapshot lives as long as the transaction that exported it: kept open until
    // pg_dump has finished.
    let output = tokio::process::Command::new(bin.join("pg_dump"))
        .arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--file")
        .arg(&dump)
        .arg("--dbname")
        .arg(super::tool_url(&rack.config, &rack.pool))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running pg_dump")?;
    tx.rollback().await?;
    if !output.status.success() {
        anyhow::bail!(
            "pg_dump failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let images = if options.images {
        save_images(rack, &builds, scratch.path()).await?
    } else {
        None
    };
    let resources = export_resources(rack, resources, options, scratch.path()).await?;
    let mut estimate = std::fs::metadata(&dump)?.len();
    for record in &resources {
        if let Some(path) = &record.path {
            estimate += std::fs::metadata(scratch.path().join(path)).map_or(0, |m| m.len()) + 512;
        }
    }
    estimate += images
        .as_ref()
        .map_or(0, |i| std::fs::metadata(i).map_or(0, |m| m.len()));
    estimate += blobs
        .iter()
        .map(|b| u64::try_from(b.size).unwrap_or(0) + 512)
        .sum::<u64>();
    let builds_dir = rack.config.data_dir.join("builds");
    for build in &builds {
        estimate += tree_size(&builds_dir.join(&build.app).join(&build.id));
    }
    Ok(Some(Prepared {
        scratch,
        blobs,
        builds,
        migration,
        images,
        include_images: options.images,
        resources,
        estimate,
    }))
}

/// Exports every resource there is data of into the scratch directory (as
/// `resources/<app>/<name>.<ext>`), through the runtime's endpoint and the tools `GET
/// /apps/{app}/resources/{name}/data` uses; the others are recorded with why they are left
/// out. Exports are taken one after the other, just after the database's snapshot: each is
/// consistent in itself, not with the snapshot to the transaction.
///
/// # Errors
/// When a resource that should have data cannot be exported (its server is down): the backup
/// fails, naming it, rather than leaving its data out silently.
async fn export_resources(
    rack: &Rack,
    resources: Vec<crate::store::resources::Resource>,
    options: Options,
    scratch: &Path,
) -> anyhow::Result<Vec<ResourceRecord>> {
    let mut records = Vec::with_capacity(resources.len());
    for row in resources {
        let mut record = ResourceRecord {
            app: row.app.clone(),
            name: row.name.clone(),
            kind: row.kind.clone(),
            path: None,
            skipped: None,
        };
        let kind: crate::resource::Kind = row
            .kind
            .parse()
            .map_err(|e| anyhow::anyhow!("resource {} of {}: {e}", row.name, row.app))?;
        let extension = super::export_extension(kind);
        record.skipped = if !options.resources {
            Some("left out: the backup was taken with resources=false".to_owned())
        } else if extension.is_none() {
            Some(format!("a {kind} resource is a cache: it has nothing to export"))
        } else if row.status == "unlinked" {
            Some(
                "unlinked: no release declares it, so a restored rack would not create it (export it \
                 with `rack resources export` before deleting it)"
                    .to_owned(),
            )
        } else if row.status == "failed" {
            Some("it never ran (its creation failed): it has no data".to_owned())
        } else if !rack.runtime.capabilities().restores_resource_data {
            Some(format!(
                "the {} runtime does not bring resources' data back from a backup yet: export it \
                 with `rack resources export`",
                rack.runtime.name()
            ))
        } else {
            None
        };
        if let (None, Some(ext)) = (&record.skipped, extension) {
            let path = format!("{RESOURCES}/{}/{}.{ext}", row.app, row.name);
            if let Err(e) = export_resource(rack, &row, kind, &scratch.join(&path)).await {
                let (which, start) = if row.app == crate::runtime::RACK_OWNER {
                    (
                        format!("rack-wide resource {}", row.name),
                        "update it (`rack rack resources update`) to start it",
                    )
                } else {
                    (
                        format!("resource {} of app {}", row.name, row.app),
                        "deploy the app to start it",
                    )
                };
                return Err(ResourceExportFailed(format!(
                    "the backup could not export {which}: {e:#} (it must run for a backup to hold \
                     its data: {start}, or take the backup with resources=false, `rack system \
                     backup --no-resources`, to leave resources out)"
                ))
                .into());
            }
            record.path = Some(path);
        }
        records.push(record);
    }
    Ok(records)
}

/// Streams the export of resource `row` into the file `to`.
async fn export_resource(
    rack: &Rack,
    row: &crate::store::resources::Resource,
    kind: crate::resource::Kind,
    to: &Path,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let credentials = crate::resource::Credentials {
        user: row.username.clone(),
        password: row.password.clone(),
        database: row.database.clone(),
    };
    let body = crate::resource_data::export_resource(rack.runtime.as_ref(), &row.app, &row.name, kind, &credentials)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(to).await?;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        file.write_all(&chunk.map_err(|e| anyhow::anyhow!("the export stopped: {e}"))?)
            .await?;
    }
    file.sync_all().await?;
    Ok(())
}

/// `podman save` of the builds' images that exist on this host, into one archive; `None` when
/// there are none (or no podman).
async fn save_images(rack: &Rack, builds: &[ReleasedBuild], scratch: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Ok(Some(podman)) = crate::runtime::local::podman::Podman::detect(&rack.config.data_dir, &rack.config.rack_name)
    else {
        return Ok(None);
    };
    let mut images = Vec::new();
    for build in builds {
        for image in build.images.values() {
            if podman.image_exists(image).await && !images.contains(image) {
                images.push(image.clone());
            }
        }
    }
    if images.is_empty() {
        return Ok(None);
    }
    let file = scratch.join(IMAGES);
    let mut args = vec![
        "save".to_owned(),
        "--multi-image-archive".to_owned(),
        "--output".to_owned(),
        file.display().to_string(),
    ];
    args.extend(images);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman
        .output_within(&args, Some(std::time::Duration::from_secs(3600)))
        .await
        .map_err(|e| anyhow::anyhow!("podman save: {e}"))?;
    Ok(Some(file))
}

/// The bytes of the files under `dir` (0 when it does not exist).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()) + 512,
            _ => e.metadata().map_or(0, |m| m.len()) + 512,
        })
        .sum()
}

/// Writes the archive of `prepared` on a blocking thread; returns its bytes as a stream (an
/// error item ends it early: the archive then has no manifest, and a restore refuses it) and
/// the writer's outcome.
pub fn stream(
    rack: &Rack,
    prepared: Prepared,
) -> (
    impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    tokio::task::JoinHandle<anyhow::Result<Summary>>,
) {
    let (tx, mut rx) = mpsc::channel(4);
    let objects = rack.objects.clone();
    let data_dir = rack.config.data_dir.clone();
    let handle = tokio::runtime::Handle::current();
    let writer = tokio::task::spawn_blocking(move || {
        let out = ChannelWriter::new(tx.clone());
        let result = write_archive(out, &prepared, &objects, &data_dir, &handle);
        if let Err(e) = &result {
            // The reader sees the archive end with an error instead of a clean end.
            let _ = tx.blocking_send(Err(io::Error::other(format!("{e:#}"))));
        }
        drop(prepared);
        result
    });
    (futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)), writer)
}

fn write_archive(
    out: ChannelWriter,
    prepared: &Prepared,
    objects: &crate::objects::Objects,
    data_dir: &Path,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<Summary> {
    use anyhow::Context;
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    let mut entries = Vec::new();
    append_file(&mut tar, MARKER, MARKER_TEXT.as_bytes(), MARKER_TEXT.len() as u64)?;
    let dump = prepared.scratch.path().join(DATABASE);
    let file = std::fs::File::open(&dump)?;
    let size = file.metadata()?.len();
    entries.push(append_file(&mut tar, DATABASE, file, size)?);
    for name in KEPT_FILES {
        if let Ok(file) = std::fs::File::open(data_dir.join(name)) {
            let size = file.metadata()?.len();
            entries.push(append_file(&mut tar, name, file, size)?);
        }
    }
    for blob in &prepared.blobs {
        let stream = handle.block_on(objects.get_stream(&blob.location)).with_context(|| {
            format!(
                "reading the blob {} (it may have been deleted since the snapshot: take the backup again)",
                blob.location
            )
        })?;
        let reader = Blocking::new(stream, handle.clone());
        let size = u64::try_from(blob.size).unwrap_or(0);
        let entry = append_file(&mut tar, &format!("objects/{}", blob.location), reader.take(size), size)
            .with_context(|| format!("writing the blob {}", blob.location))?;
        if entry.sha256.as_deref() != Some(blob.sha256.as_str()) {
            anyhow::bail!(
                "the blob {} does not hold the bytes the database records (SHA-256 {}, expected {})",
                blob.location,
                entry.sha256.unwrap_or_default(),
                blob.sha256
            );
        }
        entries.push(entry);
    }
    let builds_dir = data_dir.join("builds");
    for build in &prepared.builds {
        let dir = builds_dir.join(&build.app).join(&build.id);
        if dir.is_dir() {
            append_tree(
                &mut tar,
                &dir,
                &format!("builds/{}/{}", build.app, build.id),
                &mut entries,
            )
            .with_context(|| format!("writing the build directory {}", dir.display()))?;
        }
    }
    if let Some(images) = &prepared.images {
        let file = std::fs::File::open(images)?;
        let size = file.metadata()?.len();
        entries.push(append_file(&mut tar, IMAGES, file, size)?);
    }
    for path in prepared.resources.iter().filter_map(|r| r.path.as_ref()) {
        let file = std::fs::File::open(prepared.scratch.path().join(path))?;
        let size = file.metadata()?.len();
        entries.push(append_file(&mut tar, path, file, size).with_context(|| format!("writing {path}"))?);
    }
    let manifest = Manifest {
        format: 1,
        created: chrono::Utc::now(),
        rack_version: env!("CARGO_PKG_VERSION").to_owned(),
        migration: prepared.migration,
        images: prepared.include_images,
        entries,
        resources: prepared.resources.clone(),
    };
    let count = manifest.entries.len();
    let text = serde_json::to_vec_pretty(&manifest)?;
    append_file(&mut tar, MANIFEST, text.as_slice(), text.len() as u64)?;
    let mut out = tar.into_inner()?;
    out.flush()?;
    Ok(Summary {
        bytes: out.written,
        entries: count,
    })
}

/// Appends a file of `size` bytes read from `data`; returns its manifest entry.
pub(crate) fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: impl Read,
    size: u64,
) -> io::Result<Entry> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_uid(u64::from(nix::unistd::geteuid().as_raw()));
    header.set_gid(u64::from(nix::unistd::getegid().as_raw()));
    header.set_mtime(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
    let mut hashing = Hashing::new(data);
    tar.append_data(&mut header, path, &mut hashing)?;
    if hashing.read != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{path}: read {} bytes, expected {size}", hashing.read),
        ));
    }
    Ok(Entry {
        path: path.to_owned(),
        kind: Kind::File,
        size,
        sha256: Some(crate::objects::hex(&hashing.hasher.finalize())),
        link: None,
    })
}

/// Appends the directory `dir` as `name` and everything under it (links as links, with their
/// owners and modes, which the local runtime's sandbox relies on).
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &str,
    entries: &mut Vec<Entry>,
) -> io::Result<()> {
    tar.append_path_with_name(dir, name)?;
    entries.push(Entry {
        path: name.to_owned(),
        kind: Kind::Dir,
        size: 0,
        sha256: None,
        link: None,
    });
    let mut children: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        let path = child.path();
        let child_name = format!("{name}/{}", child.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            append_tree(tar, &path, &child_name, entries)?;
        } else if meta.file_type().is_symlink() {
            tar.append_path_with_name(&path, &child_name)?;
            entries.push(Entry {
                path: child_name,
                kind: Kind::Symlink,
                size: 0,
                sha256: None,
                link: Some(std::fs::read_link(&path)?.to_string_lossy().into_owned()),
            });
        } else if meta.is_file() {
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let size = meta.len();
            header.set_size(size);
            let mut hashing = Hashing::new(std::fs::File::open(&path)?.take(size));
            tar.append_data(&mut header, &child_name, &mut hashing)?;
            if hashing.read != size {
                return Err(io::Error::other(format!(
                    "{} changed while it was read",
                    path.display()
                )));
            }
            entries.push(Entry {
                path: child_name,
                kind: Kind::File,
                size,
                sha256: Some(crate::objects::hex(&hashing.hasher.finalize())),
                link: None,
            });
        }
        // Sockets and fifos a build left behind are not worth keeping.
    }
    Ok(())
}

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    pub hasher: Sha256,
    pub read: u64,
}

impl<R> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads a byte stream (a blob's, an upload's) from a blocking thread.
pub(crate) struct Blocking<S> {
    stream: std::pin::Pin<Box<S>>,
    handle: tokio::runtime::Handle,
    buf: Bytes,
    /// The stream has ended: it is not polled again (some streams panic if they are).
    ended: bool,
}

impl<S> Blocking<S> {
    pub(crate) fn new(stream: S, handle: tokio::runtime::Handle) -> Self {
        Self {
            stream: Box::pin(stream),
            handle,
            buf: Bytes::new(),
            ended: false,
        }
    }
}

impl<S, E> Read for Blocking<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use futures_util::StreamExt;
        while self.buf.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.handle.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.buf = chunk,
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(io::Error::other(e.to_string()));
                }
                None => self.ended = true,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// Hands the archive's bytes to the async side in chunks, waiting while the reader is behind.
pub(crate) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    written: u64,
}

impl ChannelWriter {
    pub(crate) fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
            written: 0,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive's reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
