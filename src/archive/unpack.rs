//! Unpacking an untrusted gzip-compressed tar into a build directory: no entry may land or
//! point outside it, nothing is written through a symlink, and sizes and counts are bounded
//! while streaming.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tar::{Archive, Entry, EntryType};

use super::Limits;

/// What [`unpack_tgz`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnpackStats {
    /// Files, symlinks and hard links created (directories are not counted).
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The entry's path is absolute or climbs out with `..`.
    #[error("archive entry {path:?} escapes the build directory")]
    Escapes { path: String },
    /// The entry's path is empty, not UTF-8, or holds a NUL or a backslash.
    #[error("archive entry {path:?} has an invalid name: {reason}")]
    InvalidName { path: String, reason: &'static str },
    /// A symlink whose target is absolute or resolves outside the build directory.
    #[error("archive entry {path:?} is a symlink to {target:?}, which {reason}")]
    BadSymlink {
        path: String,
        target: String,
        reason: &'static str,
    },
    /// A hard link to anything but a regular file unpacked earlier from the same archive.
    #[error("archive entry {path:?} is a hard link to {target:?}, which is not a file earlier in the archive")]
    BadHardLink { path: String, target: String },
    /// The entry would be written through a symlink unpacked earlier.
    #[error("archive entry {path:?} would be written through the symlink {link:?}")]
    ThroughSymlink { path: String, link: String },
    /// The entry clashes with an earlier entry of another kind (a file where a directory is).
    #[error("archive entry {path:?} conflicts with an earlier entry of another type")]
    Conflict { path: String },
    /// A device, fifo or other special entry.
    #[error("archive entry {path:?} is a {kind}; only files, directories and links are allowed")]
    Unsupported { path: String, kind: String },
    /// The content written crossed [`Limits::max_bytes`].
    #[error("archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The entry count crossed [`Limits::max_entries`].
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    /// Not a gzip-compressed tar, or cut short.
    #[error("archive is corrupt or truncated: {0}")]
    Corrupt(String),
    /// Writing into the build directory failed.
    #[error("cannot unpack archive entry {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Decompressed bytes allowed per entry on top of `max_bytes`: a header, padding and extension
/// headers for long names. Bounding the raw stream stops bombs made of data that is never written
/// (skipped entries, huge pax headers) as well.
const ENTRY_OVERHEAD: u64 = 8 << 10;

/// Unpacks a gzip-compressed tar into `dest`, an existing empty directory.
///
/// Only regular files, directories, symlinks resolving inside `dest` and hard links to files
/// unpacked earlier are accepted. Nothing is ever written through a symlink. Files keep only
/// their executable bit (0o755 or 0o644); directories are 0o755; owners and times are not kept.
///
/// # Errors
/// The first refused entry or crossed limit stops the unpack; `dest` then holds a partial tree
/// that the caller should remove.
pub fn unpack_tgz<R: Read>(reader: R, dest: &Path, limits: Limits) -> Result<UnpackStats, UnpackError> {
    let capped_out = Cell::new(false);
    let left = limits
        .max_bytes
        .saturating_add(limits.max_entries.saturating_mul(ENTRY_OVERHEAD));
    let mut archive = Archive::new(Capped {
        inner: GzDecoder::new(reader),
        left,
        hit: &capped_out,
    });
    // Read errors surface from gzip, tar or the cap alike; the flag tells the cap apart.
    let read_error = |err: io::Error| {
        if capped_out.get() {
            UnpackError::TooLarge {
                limit: limits.max_bytes,
            }
        } else {
            UnpackError::Corrupt(err.to_string())
        }
    };
    let mut unpacker = Unpacker {
        dest,
        limits,
        entries: 0,
        stats: UnpackStats::default(),
        files: HashSet::new(),
    };
    for entry in archive.entries().map_err(read_error)? {
        unpacker.unpack(entry.map_err(read_error)?, &read_error)?;
    }
    // An empty upload decompresses to nothing at all rather than failing; it is no archive.
    if unpacker.entries == 0 && archive.into_inner().inner.header().is_none() {
        return Err(UnpackError::Corrupt("not a gzip stream".to_owned()));
    }
    Ok(unpacker.stats)
}

/// A reader that fails once more than `left` bytes have passed, recording that in `hit`.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    hit: &'a Cell<bool>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) => self.left = left,
            None => {
                self.hit.set(true);
                return Err(io::Error::other("decompressed archive is over the size limit"));
            }
        }
        Ok(n)
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: Limits,
    entries: u64,
    stats: UnpackStats,
    /// Regular files unpacked so far, by normalized relative path: the only valid hard link targets.
    files: HashSet<String>,
}

impl Unpacker<'_> {
    fn unpack<R: Read>(&mut self, mut entry: Entry<'_, R>, read_error: &ReadError<'_>) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let kind = entry.header().entry_type();
        // Global pax headers carry defaults for later entries, which the tar crate applies.
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let name = entry_name(&entry.path_bytes())?;
        let Some(parts) = components(&name) else {
            return Err(UnpackError::Escapes { path: name });
        };
        let Some((last, parents)) = parts.split_last() else {
            // `./` names the build directory itself, which exists already.
            if kind == EntryType::Directory {
                return Ok(());
            }
            return Err(UnpackError::InvalidName {
                path: name,
                reason: "it names no file",
            });
        };
        use EntryType::{Continuous, Directory, GNUSparse, Link, Regular, Symlink};
        if !matches!(kind, Regular | Continuous | GNUSparse | Directory | Symlink | Link) {
            return Err(UnpackError::Unsupported {
                path: name,
                kind: kind_name(kind),
            });
        }
        let target = self.make_parents(&name, parents)?.join(last);
        let io_error = |source| UnpackError::Io {
            path: name.clone(),
            source,
        };
        let existing = match fs::symlink_metadata(&target) {
            Ok(meta) => Some(meta.file_type()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(io_error(err)),
        };
        match existing {
            Some(existing) if existing.is_dir() && kind == Directory => return Ok(()),
            Some(existing) if existing.is_dir() || kind == Directory => {
                return Err(UnpackError::Conflict { path: name.clone() });
            }
            // Later entries replace earlier ones, as with tar(1). Unlinking first means the new
            // entry never writes through an old symlink or into an old hard link's file.
            Some(_) => fs::remove_file(&target).map_err(io_error)?,
            None => {}
        }
        let link_name = entry
            .link_name_bytes()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        match kind {
            Directory => return create_dir(&target).map_err(io_error),
            Symlink => {
                let link_name = link_name.unwrap_or_default();
                check_symlink(&name, parents.len(), &link_name)?;
                symlink(&link_name, &target).map_err(io_error)?;
            }
            Link => {
                let link_name = link_name.unwrap_or_default();
                let source = components(&link_name).map(|parts| parts.join("/"));
                let source = source
                    .filter(|source| self.files.contains(source))
                    .map(|s| self.dest.join(s));
                // A symlink may have replaced the file since; link only what is still a file.
                let Some(source) = source.filter(|source| fs::symlink_metadata(source).is_ok_and(|m| m.is_file()))
                else {
                    return Err(UnpackError::BadHardLink {
                        path: name.clone(),
                        target: link_name,
                    });
                };
                fs::hard_link(source, &target).map_err(io_error)?;
            }
            _ => {
                let mode = entry.header().mode().map_err(read_error)?;
                // Only the executable bit is kept: setuid, setgid and sticky have no place in a build.
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                // `create_new` also refuses to follow a symlink that raced into place.
                let file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&target);
                let mut file = file.map_err(io_error)?;
                self.copy(&mut entry, &mut file, read_error, &io_error)?;
                // The umask applied at creation; set the mode exactly, through the open handle.
                file.set_permissions(Permissions::from_mode(mode)).map_err(io_error)?;
                self.files.insert(parts.join("/"));
            }
        }
        self.stats.files += 1;
        Ok(())
    }

    /// Checks, and creates where missing, the directories above an entry. Any of them being a
    /// symlink is refused, whatever it points to: following it is how entries escape.
    fn make_parents(&self, name: &str, parents: &[&str]) -> Result<PathBuf, UnpackError> {
        let mut dir = self.dest.to_path_buf();
        for (i, part) in parents.iter().enumerate() {
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    let link = parents[..=i].join("/");
                    return Err(UnpackError::ThroughSymlink {
                        path: name.to_owned(),
                        link,
                    });
                }
                Ok(_) => return Err(UnpackError::Conflict { path: name.to_owned() }),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    create_dir(&dir).map_err(|source| UnpackError::Io {
                        path: name.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(UnpackError::Io {
                        path: name.to_owned(),
                        source,
                    });
                }
            }
        }
        Ok(dir)
    }

    /// Copies an entry's content, counting the bytes actually read: a header's size can lie.
    fn copy(
        &mut self,
        from: &mut impl Read,
        to: &mut File,
        read_error: &ReadError<'_>,
        write_error: &dyn Fn(io::Error) -> UnpackError,
    ) -> Result<(), UnpackError> {
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(read_error(err)),
            };
            self.stats.bytes += n as u64;
            if self.stats.bytes > self.limits.max_bytes {
                return Err(UnpackError::TooLarge {
                    limit: self.limits.max_bytes,
                });
            }
            to.write_all(&buf[..n]).map_err(write_error)?;
        }
    }
}

/// Turns an error reading the archive into the matching [`UnpackError`].
type ReadError<'a> = dyn Fn(io::Error) -> UnpackError + 'a;

/// An entry's name as text, refusing what no build source needs and tools mishandle.
fn entry_name(bytes: &[u8]) -> Result<String, UnpackError> {
    let name = String::from_utf8(bytes.to_vec()).map_err(|err| UnpackError::InvalidName {
        path: String::from_utf8_lossy(err.as_bytes()).into_owned(),
        reason: "it is not UTF-8",
    })?;
    if name.contains(['\0', '\\']) {
        return Err(UnpackError::InvalidName {
            path: name,
            reason: "it holds a NUL or a backslash",
        });
    }
    Ok(name)
}

/// The normal components of a relative archive path, or `None` if it is absolute or has `..`.
/// Empty and `.` components are dropped, so `./a//b` is `a/b`.
fn components(name: &str) -> Option<Vec<&str>> {
    if name.starts_with('/') {
        return None;
    }
    let parts = name.split('/').filter(|part| !matches!(*part, "" | "."));
    parts.map(|part| (part != "..").then_some(part)).collect()
}

/// Checks that a symlink at depth `depth` below the build directory resolves inside it.
///
/// The check is lexical, so it also demands that `..` only lead the target: in `a/../b`, `a`
/// may itself be a symlink, and `..` would then climb from wherever `a` points. With leading
/// `..` only, the climb runs through the link's real parent directories and the rest descends.
fn check_symlink(name: &str, depth: usize, target: &str) -> Result<(), UnpackError> {
    let bad = |reason| UnpackError::BadSymlink {
        path: name.to_owned(),
        target: target.to_owned(),
        reason,
    };
    if target.is_empty() || target.contains('\0') {
        return Err(bad("is empty or holds a NUL"));
    }
    if target.starts_with('/') {
        return Err(bad("is absolute; links must stay inside the build directory"));
    }
    let mut depth = depth;
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended => return Err(bad("has '..' after a name; only leading '..' are allowed")),
            ".." => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| bad("points outside the build directory"))?
            }
            _ => descended = true,
        }
    }
    Ok(())
}

fn kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "character device".to_owned(),
        EntryType::Block => "block device".to_owned(),
        EntryType::Fifo => "fifo".to_owned(),
        other => format!("entry of type {:?}", other.as_byte() as char),
    }
}

/// Creates a directory with mode 0o755 whatever the header says: a read-only directory early in
/// an archive would otherwise make its own contents unwritable.
fn create_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    fs::set_permissions(path, Permissions::from_mode(0o755))
}
