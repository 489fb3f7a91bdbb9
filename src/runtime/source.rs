//! A build's source, as every runtime first needs it: the uploaded tarball fetched from the
//! object store, unpacked safely (see `archive`) and its manifest read and validated, so that a
//! broken source fails fast with a clear reason.

use std::path::{Component, Path, PathBuf};

use super::BUILD_STREAM;
use super::{BuildFailure, BuildJob, LogSink};
use crate::archive::{Limits, unpack_tgz};
use crate::manifest::Manifest;
use crate::objects::Objects;

/// An unpacked source.
#[derive(Debug)]
pub struct Source {
    /// Where it is unpacked.
    pub dir: PathBuf,
    /// The manifest text, as found.
    pub text: String,
    pub manifest: Manifest,
}

/// Fetches and unpacks `job`'s source into `<build_dir>/src` (emptied first: a retried build
/// starts from scratch) and reads its manifest, writing progress to `log`.
///
/// # Errors
/// A build failure with the reason: the object is missing, the archive is refused, the
/// manifest is missing or invalid.
pub async fn fetch(
    objects: &Objects,
    job: &BuildJob,
    build_dir: &Path,
    limits: Limits,
    log: &LogSink,
) -> Result<Source, BuildFailure> {
    let failed = BuildFailure::Failed;
    let src = build_dir.join("src");
    if build_dir.exists() {
        tokio::fs::remove_dir_all(&build_dir)
            .await
            .map_err(|e| failed(format!("could not clear the build directory: {e}")))?;
    }
    tokio::fs::create_dir_all(&src)
        .await
        .map_err(|e| failed(format!("could not create the build directory: {e}")))?;

    log.line(BUILD_STREAM, format!("Fetching source {}", job.source_key))
        .await;
    let tarball = build_dir.join("source.tgz");
    objects
        .download(&job.source_location, &tarball)
        .await
        .map_err(|e| failed(format!("could not fetch the source object {}: {e:#}", job.source_key)))?;
    let (from, into) = (tarball.clone(), src.clone());
    let stats = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&from)?;
        unpack_tgz(std::io::BufReader::new(file), &into, limits).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| failed(format!("unpacking the source failed: {e}")))?
    .map_err(|e| failed(format!("invalid source archive: {e}")))?;
    let _ = tokio::fs::remove_file(&tarball).await;
    log.line(
        BUILD_STREAM,
        format!("Unpacked {} files ({} bytes)", stats.files, stats.bytes),
    )
    .await;

    let manifest_file = inside(&src, &job.manifest_path)
        .ok_or_else(|| failed(format!("invalid manifest path {:?}", job.manifest_path)))?;
    let missing = || failed(format!("no {} found in the source", job.manifest_path));
    let size = tokio::fs::metadata(&manifest_file).await.map_err(|_| missing())?.len();
    if size > crate::manifest::MAX_MANIFEST_BYTES as u64 {
        return Err(failed(format!(
            "{}: the file is {size} bytes; the most is {}",
            job.manifest_path,
            crate::manifest::MAX_MANIFEST_BYTES
        )));
    }
    let text = tokio::fs::read_to_string(&manifest_file).await.map_err(|_| missing())?;
    // Parsing is CPU work on untrusted input: off the async workers, so it never stalls requests.
    let rack_linked = job.rack_linked.clone();
    let (text, parsed) = tokio::task::spawn_blocking(move || {
        let parsed = crate::manifest::parse_linking(&text, &rack_linked);
        (text, parsed)
    })
    .await
    .map_err(|e| failed(format!("reading the manifest failed: {e}")))?;
    let manifest = parsed.map_err(|e| failed(e.to_string()))?;
    Ok(Source {
        dir: src,
        text,
        manifest,
    })
}

/// `relative` joined to `root`, or `None` if it is absolute or climbs out with `..`.
/// (Symlinks in the tree cannot point outside: the unpacker refuses such archives.)
pub fn inside(root: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    let mut joined = root.to_path_buf();
    for component in path.components() {
        match component {
            Component::Normal(part) => joined.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_source() {
        let root = Path::new("/b/src");
        assert_eq!(inside(root, "convox.yml"), Some(root.join("convox.yml")));
        assert_eq!(inside(root, "./a/b"), Some(root.join("a/b")));
        assert_eq!(inside(root, "."), Some(root.to_path_buf()));
        assert_eq!(inside(root, "../x"), None);
        assert_eq!(inside(root, "/etc/passwd"), None);
    }
}
