//! The size cap of a build's directory while its build commands run (`RACK_BUILD_DIR_MAX_BYTES`).
//! Not a filesystem quota (rack's data directory may be on any filesystem, quotas need
//! setting up per filesystem): a watcher sums the directory's disk usage now and then and the
//! build is stopped once it is past the cap. So a build may overshoot by what it writes between
//! two checks (at most a few seconds of writing), and the checks cost little: the next one
//! waits ten times as long as the last walk took, and at least [`MIN_INTERVAL`].

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The shortest time between two checks.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Returns (the size it found) once `dir` uses more than `max` bytes of disk; never when `max`
/// is 0.
pub async fn exceeded(dir: PathBuf, max: u64) -> u64 {
    if max == 0 {
        return std::future::pending().await;
    }
    loop {
        let started = Instant::now();
        let walked = dir.clone();
        let size = tokio::task::spawn_blocking(move || usage(&walked)).await.unwrap_or(0);
        if size > max {
            return size;
        }
        tokio::time::sleep((started.elapsed() * 10).max(MIN_INTERVAL)).await;
    }
}

/// The disk `dir` and everything under it uses (allocated blocks: a sparse file counts what it
/// holds, a file with several links once). Symlinks are not followed; files that vanish while
/// it walks count nothing.
pub fn usage(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_once_per_file_and_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let empty = usage(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/data"), vec![7u8; 1 << 20]).unwrap();
        std::fs::hard_link(dir.path().join("sub/data"), dir.path().join("again")).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("usr")).unwrap();
        let used = usage(dir.path()) - empty;
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&used), "{used}");
    }

    #[tokio::test]
    async fn the_watcher_fires_past_the_cap_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small"), vec![1u8; 4096]).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), exceeded(dir.path().to_owned(), 1 << 20)).await;
        assert!(quiet.is_err(), "fired under the cap");
        std::fs::write(dir.path().join("big"), vec![1u8; 2 << 20]).unwrap();
        let size = tokio::time::timeout(Duration::from_secs(60), exceeded(dir.path().to_owned(), 1 << 20))
            .await
            .expect("the watcher fires");
        assert!(size > 2 << 20, "{size}");
    }
}
