//! The object store for uploads (source tarballs, build logs): a local directory by default,
//! S3 when `RACK_OBJECTS=s3://bucket/prefix` (built with the `s3` feature). Uploads stream
//! straight through with a bounded buffer, are hashed on the way and become visible only when
//! complete and verified; metadata is kept in Postgres by the caller.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

/// Longest object key.
const MAX_KEY_LEN: usize = 1024;

/// Where objects are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectsLocation {
    /// A directory on this host.
    Dir(std::path::PathBuf),
    /// An S3 bucket and key prefix (credentials from the usual AWS variables).
    S3 { bucket: String, prefix: String },
}

impl ObjectsLocation {
    /// Parses `RACK_OBJECTS`: `s3://bucket/prefix`, or a directory path.
    ///
    /// # Errors
    /// When an `s3://` URL has no bucket.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(format!("RACK_OBJECTS {text:?} names no bucket: use s3://bucket/prefix"));
                }
                Ok(Self::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.trim_matches('/').to_owned(),
                })
            }
            None => Ok(Self::Dir(text.into())),
        }
    }
}

/// Why an upload was refused. Nothing is kept after any of them.
#[derive(Debug, thiserror::Error)]
pub enum PutObjectError {
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the upload's SHA-256 is {actual}, not the {expected} the client sent")]
    DigestMismatch { expected: String, actual: String },
    #[error("the upload was interrupted: {0}")]
    Interrupted(String),
    #[error("the object store failed: {0}")]
    Store(#[from] object_store::Error),
}

/// A stored object's size and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// The object store.
#[derive(Debug, Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// Part size of streamed uploads: small for a local directory (memory stays flat), 5 MiB
    /// for S3 (its minimum part size).
    chunk_size: usize,
}

impl Objects {
    /// Opens the store at `location`.
    ///
    /// # Errors
    /// When the directory cannot be created, or S3 is asked of a build without the `s3` feature.
    pub fn open(location: &ObjectsLocation) -> anyhow::Result<Self> {
        match location {
            ObjectsLocation::Dir(dir) => {
                std::fs::create_dir_all(dir)?;
                let store = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
                Ok(Self {
                    store: Arc::new(store),
                    prefix: StorePath::default(),
                    // 1 MiB parts: 4 MiB ones were no faster (benches/suite.rs) and held 4x the memory.
                    chunk_size: 1024 * 1024,
                })
            }
            ObjectsLocation::S3 { bucket, prefix } => open_s3(bucket, prefix),
        }
    }

    /// A new, unique location for a blob of `app`. Blobs live under `_blobs/` (app names cannot
    /// start with `_`, so this never meets the `<app>/<key>` locations of older objects).
    pub fn new_location(app: &str) -> String {
        format!("_blobs/{app}/{}", uuid::Uuid::now_v7().simple())
    }

    fn path(&self, location: &str) -> StorePath {
        let base = self.prefix.as_ref();
        if base.is_empty() {
            StorePath::from(location)
        } else {
            StorePath::from(format!("{base}/{location}"))
        }
    }

    /// Streams `body` into the blob at `location` (from [`Objects::new_location`]). The blob
    /// appears only once the whole body has arrived, fits in `limit` bytes and matches
    /// `expected_sha256` (when the client sent one); otherwise the partial upload is discarded.
    ///
    /// # Errors
    /// See [`PutObjectError`].
    pub async fn put_stream<S, E>(
        &self,
        location: &str,
        body: S,
        limit: u64,
        expected_sha256: Option<&str>,
    ) -> Result<Stored, PutObjectError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut upload = self.store.put_multipart(&self.path(location)).await?;
        // Hashing runs on a thread of its own, beside the receiving and the writing: inline,
        // SHA-256 took a third of an upload's time on a 2-core machine (benches/suite.rs).
        let (to_hash, mut hashing) = tokio::sync::mpsc::channel::<Vec<Bytes>>(4);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(part) = hashing.blocking_recv() {
                for chunk in &part {
                    hasher.update(chunk);
                }
            }
            hex(&hasher.finalize())
        });
        // The body's chunks are gathered into parts of `chunk_size` without copying (the part
        // holds the chunks as they came); at most two parts are being written at once, so
        // memory does not grow with the body.
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        let mut part: Vec<Bytes> = Vec::new();
        let mut part_len = 0usize;
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        let failure = loop {
            let chunk = match body.next().await {
                None => break None,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => break Some(PutObjectError::Interrupted(e.to_string())),
            };
            size += chunk.len() as u64;
            if size > limit {
                break Some(PutObjectError::TooLarge { limit });
            }
            part_len += chunk.len();
            part.push(chunk);
            if part_len < self.chunk_size {
                continue;
            }
            part_len = 0;
            let full = std::mem::take(&mut part);
            if let Err(e) = send_part(&mut upload, &mut in_flight, &to_hash, full).await {
                break Some(e);
            }
        };
        let failure = match failure {
            Some(failure) => Some(failure),
            None if !part.is_empty() => send_part(&mut upload, &mut in_flight, &to_hash, part).await.err(),
            None => None,
        };
        let failure = match failure {
            Some(failure) => Some(failure),
            None => in_flight.try_collect::<Vec<_>>().await.err().map(PutObjectError::from),
        };
        drop(to_hash);
        let (actual, failure) = match hasher.await {
            Ok(actual) => (actual, failure),
            Err(e) => (
                String::new(),
                failure.or_else(|| Some(PutObjectError::Interrupted(format!("hashing the upload: {e}")))),
            ),
        };
        let failure = failure.or_else(|| {
            expected_sha256
                .filter(|expected| !expected.eq_ignore_ascii_case(&actual))
                .map(|expected| PutObjectError::DigestMismatch {
                    expected: expected.to_lowercase(),
                    actual: actual.clone(),
                })
        });
        if let Some(failure) = failure {
            if let Err(e) = upload.abort().await {
                tracing::warn!(error = %e, "discarding a failed upload to {location}");
            }
            return Err(failure);
        }
        upload.complete().await?;
        Ok(Stored { size, sha256: actual })
    }

    /// The bytes of the blob at `location` as a stream.
    ///
    /// # Errors
    /// `object_store::Error::NotFound` when there is no such blob.
    pub async fn get_stream(
        &self,
        location: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>> + Send + 'static, object_store::Error> {
        Ok(self.store.get(&self.path(location)).await?.into_stream())
    }

    /// Copies the blob at `location` into the file at `dest`.
    ///
    /// # Errors
    /// When the blob cannot be read or the file written.
    pub async fn download(&self, location: &str, dest: &Path) -> anyhow::Result<u64> {
        let stream = self.get_stream(location).await?.map_err(std::io::Error::other);
        let mut reader = tokio_util::io::StreamReader::new(stream);
        let mut file = tokio::fs::File::create(dest).await?;
        let copied = tokio::io::copy(&mut reader, &mut file).await?;
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        Ok(copied)
    }

    /// Deletes the blob at `location` (a missing one is not an error).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete(&self, location: &str) -> Result<(), object_store::Error> {
        match self.store.delete(&self.path(location)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The locations of every blob under `dir` (a `/`-separated prefix), as [`Objects::get_stream`]
    /// takes them, with when each was last written.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn list(&self, dir: &str) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>, object_store::Error> {
        let base = self.prefix.as_ref().to_owned();
        let metas: Vec<_> = self.store.list(Some(&self.path(dir))).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|meta| {
                let full = meta.location.as_ref().to_owned();
                let location = match full.strip_prefix(&format!("{base}/")) {
                    Some(rest) if !base.is_empty() => rest.to_owned(),
                    _ => full,
                };
                (location, meta.last_modified)
            })
            .collect())
    }

    /// Deletes every blob of `app` (when the app is deleted), older objects' too.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete_app(&self, app: &str) -> Result<(), object_store::Error> {
        for dir in [app.to_owned(), format!("_blobs/{app}")] {
            let prefix = self.path(&dir);
            let locations = self.store.list(Some(&prefix)).map_ok(|meta| meta.location).boxed();
            self.store.delete_stream(locations).try_collect::<Vec<_>>().await?;
        }
        Ok(())
    }
}

#[cfg(feature = "s3")]
fn open_s3(bucket: &str, prefix: &str) -> anyhow::Result<Objects> {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()?;
    Ok(Objects {
        store: Arc::new(store),
        prefix: StorePath::from(prefix),
        chunk_size: 5 * 1024 * 1024,
    })
}

#[cfg(not(feature = "s3"))]
fn open_s3(_bucket: &str, _prefix: &str) -> anyhow::Result<Objects> {
    anyhow::bail!("this rack was built without S3 support: rebuild it with `cargo build --features s3`")
}

/// Checks an object key: relative, `/`-separated, no empty, `.` or `..` segment, no
/// backslash or control character, at most 1024 bytes. Keys can never leave the app's prefix.
///
/// # Errors
/// A message that says what is wrong with the key.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the object key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("the object key is longer than {MAX_KEY_LEN} bytes"));
    }
    if key.starts_with('/') {
        return Err(format!("invalid object key {key:?}: it must be relative"));
    }
    if key.contains('\\') || key.chars().any(char::is_control) {
        return Err(format!(
            "invalid object key {key:?}: backslashes and control characters are not allowed"
        ));
    }
    if key
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(format!(
            "invalid object key {key:?}: empty, '.' and '..' segments are not allowed"
        ));
    }
    Ok(())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type PartWrites = futures_util::stream::FuturesOrdered<object_store::UploadPart>;

/// Hands `part` to the hashing thread and starts writing it, after waiting (if two are being
/// written already) for the oldest write to finish.
async fn send_part(
    upload: &mut Box<dyn object_store::MultipartUpload>,
    in_flight: &mut PartWrites,
    to_hash: &tokio::sync::mpsc::Sender<Vec<Bytes>>,
    part: Vec<Bytes>,
) -> Result<(), PutObjectError> {
    while in_flight.len() >= 2 {
        if let Some(Err(e)) = in_flight.next().await {
            return Err(e.into());
        }
    }
    if to_hash.send(part.clone()).await.is_err() {
        return Err(PutObjectError::Interrupted("the hashing thread stopped".into()));
    }
    in_flight.push_back(upload.put_part(object_store::PutPayload::from_iter(part)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for key in ["tmp/abc.tgz", "build/BABCDEFGHIJ/logs", "a.b-c_d"] {
            assert_eq!(validate_key(key), Ok(()), "{key}");
        }
        for key in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
            "a/",
        ] {
            assert!(validate_key(key).is_err(), "{key:?} should be refused");
        }
        assert!(validate_key(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            ObjectsLocation::parse("s3://bucket/some/prefix/"),
            Ok(ObjectsLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            })
        );
        assert!(ObjectsLocation::parse("s3:///x").is_err());
        assert_eq!(
            ObjectsLocation::parse("/var/x"),
            Ok(ObjectsLocation::Dir("/var/x".into()))
        );
    }

    #[tokio::test]
    async fn failed_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let objects = Objects::open(&ObjectsLocation::Dir(dir.path().to_path_buf())).unwrap();
        let body =
            |data: &'static [u8]| futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(data))]);
        let first = Objects::new_location("app");
        assert!(first.starts_with("_blobs/app/"));
        let stored = objects.put_stream(&first, body(b"first"), 100, None).await.unwrap();
        assert_eq!(stored.size, 5);
        let too_large = objects
            .put_stream(&Objects::new_location("app"), body(b"second!"), 6, None)
            .await;
        assert!(matches!(too_large, Err(PutObjectError::TooLarge { limit: 6 })));
        let mismatch = objects
            .put_stream(
                &Objects::new_location("app"),
                body(b"third"),
                100,
                Some(&"0".repeat(64)),
            )
            .await;
        assert!(matches!(mismatch, Err(PutObjectError::DigestMismatch { .. })));
        let bytes: Vec<Bytes> = objects.get_stream(&first).await.unwrap().try_collect().await.unwrap();
        assert_eq!(bytes.concat(), b"first");
        // Only the one complete blob is on disk: no temp file of the failed ones.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("_blobs/app")).unwrap().collect();
        assert_eq!(files.len(), 1);
        objects.delete_app("app").await.unwrap();
        assert!(objects.get_stream(&first).await.is_err());
    }
}
