//! Writing a build archive: what the runtime produced is already in a scratch directory (a
//! tar header needs each entry's size); the source blob is read from the object store as it
//! is written. The archive is written on a blocking thread into a bounded channel, so memory
//! stays flat however large the build.

use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Entry, FILES, IMAGES, MANIFEST, METADATA, Metadata, SOURCE};
use crate::backup::archive::{Blocking, ChannelWriter, append_file};

/// The source blob of a build, as the database records it.
#[derive(Debug, Clone)]
pub struct Source {
    pub location: String,
    pub size: u64,
    pub sha256: String,
}

/// A build ready to be written.
#[derive(Debug)]
pub struct Prepared {
    /// Holds `files` and `images`; removed once the archive is written (or abandoned).
    pub scratch: tempfile::TempDir,
    /// The metadata; its entries are filled in while writing.
    pub metadata: Metadata,
    pub manifest: String,
    pub source: Option<Source>,
    /// The packed build directory.
    pub files: PathBuf,
    /// The saved images, when the build has any.
    pub images: Option<PathBuf>,
}

/// Writes the archive of `prepared` on a blocking thread; its bytes as a stream. A failure
/// ends the stream with an error (the client's archive then has no `build.json`, which an
/// import refuses).
pub fn stream(
    objects: crate::objects::Objects,
    prepared: Prepared,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel(4);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let out = ChannelWriter::new(tx.clone());
        let build = prepared.metadata.id.clone();
        if let Err(e) = write(out, prepared, &objects, &handle) {
            tracing::warn!(error = %e, build.id = %build, "exporting build {build}");
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn write(
    out: ChannelWriter,
    mut prepared: Prepared,
    objects: &crate::objects::Objects,
    handle: &tokio::runtime::Handle,
) -> io::Result<()> {
    let gzip = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gzip);
    let mut entries = Vec::new();
    let text = prepared.manifest.as_bytes();
    entries.push(entry(append_file(&mut tar, MANIFEST, text, text.len() as u64)?));
    if let Some(source) = &prepared.source {
        let stream = handle
            .block_on(objects.get_stream(&source.location))
            .map_err(|e| io::Error::other(format!("reading the build's source: {e}")))?;
        let reader = std::io::Read::take(Blocking::new(stream, handle.clone()), source.size);
        let written = entry(append_file(&mut tar, SOURCE, reader, source.size)?);
        if written.sha256 != source.sha256 {
            return Err(io::Error::other(format!(
                "the build's source does not hold the bytes the database records (SHA-256 {}, expected {})",
                written.sha256, source.sha256
            )));
        }
        entries.push(written);
    }
    for (name, path) in [(FILES, Some(&prepared.files)), (IMAGES, prepared.images.as_ref())] {
        if let Some(path) = path {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            entries.push(entry(append_file(&mut tar, name, file, size)?));
        }
    }
    prepared.metadata.entries = entries;
    let text = serde_json::to_vec_pretty(&prepared.metadata).map_err(io::Error::other)?;
    append_file(&mut tar, METADATA, text.as_slice(), text.len() as u64)?;
    let mut out = tar.into_inner()?.finish()?;
    out.flush()
}

fn entry(written: crate::backup::Entry) -> Entry {
    Entry {
        path: written.path,
        size: written.size,
        sha256: written.sha256.unwrap_or_default(),
    }
}
