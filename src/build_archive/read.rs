//! Reading a build archive that a client uploads: entry by entry into a scratch directory,
//! each file hashed as it is written, then held to `build.json`. Nothing here is trusted: the
//! decompressed size is bounded while streaming, only the known entries are taken, each once,
//! and `build.json` must come last and list exactly what came before it.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::{ENTRIES, Entry, FORMAT, IMAGES, MANIFEST, MAX_METADATA, METADATA, Metadata};

/// Why an archive was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The archive is damaged, altered or not a build archive; the message says what is wrong.
    #[error("{0}")]
    Refused(String),
    /// It decompresses to more than the limit.
    #[error("the build archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    /// Writing the scratch directory failed.
    #[error("writing the build archive's entries: {0}")]
    Io(io::Error),
}

/// A checked archive: its metadata and where its entries are.
#[derive(Debug)]
pub struct Checked {
    pub metadata: Metadata,
    pub manifest: String,
    /// Each entry's file in the scratch directory, and its SHA-256.
    pub files: BTreeMap<&'static str, (PathBuf, Entry)>,
}

impl Checked {
    /// The file of entry `name`, when the archive has it.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(|(path, _)| path.as_path())
    }
}

/// Reads the gzip-compressed tar from `reader` into `scratch` (an empty directory), allowing
/// at most `limit` decompressed bytes.
///
/// # Errors
/// [`ReadError::Refused`] naming the first thing wrong with the archive.
pub fn read<R: Read>(reader: R, scratch: &Path, limit: u64) -> Result<Checked, ReadError> {
    let hit = std::cell::Cell::new(false);
    let mut archive = tar::Archive::new(Capped {
        inner: flate2::read::GzDecoder::new(reader),
        left: limit,
        hit: &hit,
    });
    let damaged = |e: io::Error| {
        if hit.get() {
            ReadError::TooLarge(limit)
        } else {
            ReadError::Refused(format!("the build archive is damaged or cut short: {e}"))
        }
    };
    let mut files = BTreeMap::new();
    let mut metadata: Option<Vec<u8>> = None;
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let path = entry.path().map_err(damaged)?.to_string_lossy().into_owned();
        if metadata.is_some() {
            return Err(refused(format!(
                "the entry {path:?} comes after {METADATA}, which must be last"
            )));
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(refused(format!("the entry {path:?} is not a regular file")));
        }
        if path == METADATA {
            if entry.size() > MAX_METADATA {
                return Err(refused(format!("{METADATA} is larger than {MAX_METADATA} bytes")));
            }
            let mut text = Vec::new();
            entry.read_to_end(&mut text).map_err(damaged)?;
            metadata = Some(text);
            continue;
        }
        let Some(name) = ENTRIES.iter().copied().find(|known| *known == path) else {
            return Err(refused(format!(
                "unexpected entry {path:?}: a build archive holds only {} and {METADATA}",
                ENTRIES.join(", ")
            )));
        };
        if files.contains_key(name) {
            return Err(refused(format!("the entry {name} appears twice")));
        }
        let file = scratch.join(name);
        let mut out = std::fs::File::create(&file).map_err(ReadError::Io)?;
        let mut hashing = crate::backup::archive::Hashing::new(&mut entry);
        // A read error is the archive's; a write error the scratch directory's.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = hashing.read(&mut buf).map_err(damaged)?;
            if n == 0 {
                break;
            }
            io::Write::write_all(&mut out, &buf[..n]).map_err(ReadError::Io)?;
        }
        let found = Entry {
            path: name.to_owned(),
            size: hashing.read,
            sha256: crate::objects::hex(&hashing.hasher.finalize()),
        };
        files.insert(name, (file, found));
    }
    // The rest of the gzip stream: its trailer's checksum and length are checked at its end.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(damaged)?;
    if rest.inner.header().is_none() {
        return Err(refused("the build archive is not gzip-compressed".to_owned()));
    }
    let Some(metadata) = metadata else {
        return Err(refused(format!(
            "the build archive has no {METADATA}: it was cut short, or it is not a build archive \
             (make one with `convox builds export`)"
        )));
    };
    let metadata: Metadata = serde_json::from_slice(&metadata).map_err(|e| refused(format!("{METADATA}: {e}")))?;
    if metadata.format != FORMAT {
        return Err(refused(format!(
            "{METADATA}: format {:?} is not one this rack reads ({FORMAT})",
            metadata.format
        )));
    }
    compare(&metadata.entries, &files)?;
    for name in [MANIFEST, super::FILES] {
        if !files.contains_key(name) {
            return Err(refused(format!("the build archive has no {name}")));
        }
    }
    let manifest =
        std::fs::read_to_string(&files[MANIFEST].0).map_err(|_| refused(format!("{MANIFEST} is not UTF-8 text")))?;
    check_text(&metadata)?;
    Ok(Checked {
        metadata,
        manifest,
        files,
    })
}

/// Holds what was found to what `build.json` lists.
fn compare(listed: &[Entry], found: &BTreeMap<&'static str, (PathBuf, Entry)>) -> Result<(), ReadError> {
    for entry in listed {
        let Some((_, actual)) = found.get(entry.path.as_str()) else {
            return Err(refused(format!(
                "{METADATA} lists {:?}, which the archive does not hold (it was cut short or altered)",
                entry.path
            )));
        };
        if actual.size != entry.size {
            return Err(refused(format!(
                "{}: {} bytes, but {METADATA} says {} (the archive is damaged or was altered)",
                entry.path, actual.size, entry.size
            )));
        }
        if !actual.sha256.eq_ignore_ascii_case(&entry.sha256) {
            return Err(refused(format!(
                "{}: SHA-256 {} does not match {} in {METADATA} (the archive is damaged or was altered)",
                entry.path, actual.sha256, entry.sha256
            )));
        }
    }
    if let Some(extra) = found.keys().find(|name| !listed.iter().any(|e| e.path == **name)) {
        return Err(refused(format!("{extra} is not listed in {METADATA}")));
    }
    Ok(())
}

/// Text that goes into Postgres and image names that go to podman.
fn check_text(metadata: &Metadata) -> Result<(), ReadError> {
    let fields = [
        ("description", &metadata.description),
        ("git_sha", &metadata.git_sha),
        ("manifest_path", &metadata.manifest_path),
        ("id", &metadata.id),
    ];
    for (name, value) in fields {
        if value.contains('\0') || value.len() > 64 * 1024 {
            return Err(refused(format!("{METADATA}: {name} holds a NUL or is too long")));
        }
    }
    let image_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
            && !s.starts_with('-')
    };
    for (service, image) in &metadata.images {
        let service_name = !service.is_empty()
            && service.len() <= 63
            && service
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !service_name || !image_name(image) {
            return Err(refused(format!(
                "{METADATA}: the image of {service:?} ({image:?}) is not a valid name"
            )));
        }
    }
    if !metadata.images.is_empty() && !metadata.entries.iter().any(|e| e.path == IMAGES) {
        return Err(refused(format!(
            "{METADATA} names images, but the archive has no {IMAGES}"
        )));
    }
    Ok(())
}

fn refused(message: String) -> ReadError {
    ReadError::Refused(message)
}

/// A reader that fails once more than `left` bytes have passed, recording that in `hit`.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    hit: &'a std::cell::Cell<bool>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) => self.left = left,
            None => {
                self.hit.set(true);
                return Err(io::Error::other("the decompressed archive is over the size limit"));
            }
        }
        Ok(n)
    }
}
