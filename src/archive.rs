//! Source tarballs: unpacks an uploaded `.tgz` into a build directory so that no entry can land
//! or point outside it, and packs a directory (honouring `.dockerignore`) for upload.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use ignore::WalkBuilder;
use tar::{Archive, Builder, Entry, EntryType, Header};

/// Bounds on what one archive may unpack to, enforced while streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of file content written.
    pub max_bytes: u64,
    /// Entries of any kind, directories included.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            max_entries: 100_000,
        }
    }
}

/// What [`unpack_tgz`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnpackStats {
    /// Files, symlinks and hard links created (directories are not counted).
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// What [`pack_tgz`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackStats {
    /// Files and symlinks packed (directories are not counted).
    pub files: u64,
    /// Bytes of file content packed.
    pub bytes: u64,
}

/// Why an archive was refused. `path` is the entry's name as the archive gives it.
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

/// Packs `dir` into a gzip-compressed tar written to `writer`, as `rack deploy` uploads it.
///
/// Paths are relative without `./`, in sorted order; symlinks are stored as links, never
/// followed; sockets and fifos are skipped. Files and directories matched by a `.dockerignore`
/// are left out. The patterns are read with gitignore rules (the `ignore` crate), which agree
/// with Docker's for the usual `node_modules`, `*.log`, `!keep` lines; unlike Docker, a pattern
/// without a slash also matches in subdirectories, and nested `.dockerignore` files apply too.
///
/// # Errors
/// On a walk or read error, an invalid `.dockerignore`, a file that shrinks while being read,
/// or a write error.
pub fn pack_tgz<W: Write>(dir: &Path, writer: W) -> io::Result<PackStats> {
    let mut builder = Builder::new(GzEncoder::new(writer, Compression::default()));
    let mut stats = PackStats::default();
    // Only `.dockerignore`: not .gitignore, hidden-file rules or ignore files above `dir`.
    let walk = WalkBuilder::new(dir)
        .standard_filters(false)
        .add_custom_ignore_filename(".dockerignore")
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walk {
        let entry = entry.map_err(|err| {
            let kind = err.io_error().map_or(io::ErrorKind::Other, io::Error::kind);
            io::Error::new(kind, err)
        })?;
        if entry.depth() > 0 {
            // Name the file: "permission denied" alone does not tell the user what to fix.
            pack_entry(&mut builder, dir, entry.path(), &mut stats)
                .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", entry.path().display())))?;
        }
    }
    builder.into_inner()?.finish()?;
    Ok(stats)
}

fn pack_entry<W: Write>(builder: &mut Builder<W>, dir: &Path, path: &Path, stats: &mut PackStats) -> io::Result<()> {
    let name = path.strip_prefix(dir).map_err(io::Error::other)?;
    let meta = fs::symlink_metadata(path)?;
    let mut header = Header::new_gnu();
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
    header.set_mtime(mtime.map_or(0, |d| d.as_secs()));
    header.set_size(0);
    let kind = meta.file_type();
    if kind.is_dir() {
        header.set_entry_type(EntryType::Directory);
        header.set_mode(0o755);
        builder.append_data(&mut header, name, io::empty())?;
    } else if kind.is_symlink() {
        header.set_entry_type(EntryType::Symlink);
        header.set_mode(0o777);
        builder.append_link(&mut header, name, fs::read_link(path)?)?;
        stats.files += 1;
    } else if kind.is_file() {
        let executable = meta.permissions().mode() & 0o111 != 0;
        header.set_entry_type(EntryType::Regular);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_size(meta.len());
        let content = Exact {
            inner: File::open(path)?.take(meta.len()),
            left: meta.len(),
        };
        builder.append_data(&mut header, name, content)?;
        stats.files += 1;
        stats.bytes += meta.len();
    }
    Ok(())
}

/// Reads exactly `left` bytes: the header already promised the file's size, so a file that
/// shrinks while being read must fail the pack rather than shift every later entry.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a file shrank while being packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    /// An entry written with raw header bytes, as `tar::Builder` refuses `..` and absolute names.
    struct Raw<'a> {
        name: &'a str,
        kind: EntryType,
        link: &'a str,
        mode: u32,
        data: &'a [u8],
    }

    fn file(name: &str) -> Raw<'_> {
        Raw {
            name,
            kind: EntryType::Regular,
            link: "",
            mode: 0o644,
            data: b"hello",
        }
    }

    fn link<'a>(name: &'a str, kind: EntryType, target: &'a str) -> Raw<'a> {
        Raw {
            name,
            kind,
            link: target,
            mode: 0o777,
            data: b"",
        }
    }

    fn tgz(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut builder = Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for raw in entries {
            let mut header = Header::new_gnu();
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..raw.name.len()].copy_from_slice(raw.name.as_bytes());
            gnu.linkname[..raw.link.len()].copy_from_slice(raw.link.as_bytes());
            header.set_entry_type(raw.kind);
            header.set_mode(raw.mode);
            header.set_size(raw.data.len() as u64);
            header.set_cksum();
            builder.append(&header, raw.data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    /// Unpacks into `<tmp>/dest`, so that escapes would land in `<tmp>` where tests can look.
    fn unpack(bytes: &[u8], limits: Limits) -> (TempDir, PathBuf, Result<UnpackStats, UnpackError>) {
        let tmp = TempDir::new().unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let result = unpack_tgz(bytes, &dest, limits);
        (tmp, dest, result)
    }

    fn unpack_err(entries: &[Raw<'_>]) -> UnpackError {
        let (tmp, _, result) = unpack(&tgz(entries), Limits::default());
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["dest"], "something was written outside dest");
        result.unwrap_err()
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        let err = unpack_err(&[file("../x")]);
        assert_eq!(err.to_string(), "archive entry \"../x\" escapes the build directory");
        assert!(matches!(unpack_err(&[file("a/../../x")]), UnpackError::Escapes { .. }));
        assert!(matches!(unpack_err(&[file("/etc/x")]), UnpackError::Escapes { .. }));
        assert!(matches!(
            unpack_err(&[file("a\\..\\x")]),
            UnpackError::InvalidName { .. }
        ));
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        for target in ["/etc", "../x", "a/../../x", "..", "sub/../.."] {
            let err = unpack_err(&[link("l", EntryType::Symlink, target)]);
            assert!(matches!(err, UnpackError::BadSymlink { .. }), "{target}: {err}");
        }
        let err = unpack_err(&[link("d/l", EntryType::Symlink, "../../etc")]);
        assert!(err.to_string().contains("outside the build directory"), "{err}");
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let err = unpack_err(&[link("a", EntryType::Symlink, "/etc"), file("a/passwd")]);
        assert!(matches!(err, UnpackError::BadSymlink { .. }), "{err}");
        let entries = [
            link("sub", EntryType::Directory, ""),
            link("a", EntryType::Symlink, "sub"),
            file("a/passwd"),
        ];
        let err = unpack_err(&entries);
        assert_eq!(
            err.to_string(),
            "archive entry \"a/passwd\" would be written through the symlink \"a\""
        );
        // A file entry replaces a symlink of the same name rather than writing to its target.
        let entries = [link("f", EntryType::Symlink, "target"), file("f")];
        let (_tmp, dest, result) = unpack(&tgz(&entries), Limits::default());
        result.unwrap();
        assert!(fs::symlink_metadata(dest.join("f")).unwrap().is_file());
        assert!(!dest.join("target").exists());
    }

    #[test]
    fn hard_links_only_to_earlier_files() {
        for target in ["../etc/passwd", "/etc/passwd", "missing", "d"] {
            let entries = [link("d", EntryType::Directory, ""), link("h", EntryType::Link, target)];
            assert!(
                matches!(unpack_err(&entries), UnpackError::BadHardLink { .. }),
                "{target}"
            );
        }
        let (_tmp, dest, result) = unpack(&tgz(&[file("f"), link("h", EntryType::Link, "./f")]), Limits::default());
        assert_eq!(result.unwrap(), UnpackStats { files: 2, bytes: 5 });
        assert_eq!(fs::read(dest.join("h")).unwrap(), b"hello");
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
            let err = unpack_err(&[link("dev", kind, "")]);
            assert!(matches!(err, UnpackError::Unsupported { .. }), "{err}");
        }
    }

    #[test]
    fn gzip_bomb_stops_at_the_size_limit() {
        let zeros = vec![0; 10 << 20];
        let bytes = tgz(&[Raw {
            data: &zeros,
            ..file("zeros")
        }]);
        assert!(bytes.len() < 100 << 10, "the bomb should compress well");
        let (_tmp, dest, result) = unpack(
            &bytes,
            Limits {
                max_bytes: 1 << 20,
                ..Limits::default()
            },
        );
        assert!(
            matches!(result, Err(UnpackError::TooLarge { limit }) if limit == 1 << 20),
            "{result:?}"
        );
        assert!(fs::metadata(dest.join("zeros")).unwrap().len() <= 1 << 20);
    }

    #[test]
    fn too_many_entries_are_refused() {
        let names: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
        let entries: Vec<_> = names.iter().map(|name| file(name)).collect();
        let (_tmp, _, result) = unpack(
            &tgz(&entries),
            Limits {
                max_entries: 3,
                ..Limits::default()
            },
        );
        assert!(
            matches!(result, Err(UnpackError::TooManyEntries { limit: 3 })),
            "{result:?}"
        );
    }

    #[test]
    fn corrupt_or_empty_input_is_refused() {
        let mut truncated = tgz(&[file("a"), file("b")]);
        truncated.truncate(truncated.len() / 2);
        for bytes in [&b""[..], b"not a tarball", &truncated] {
            let (_tmp, _, result) = unpack(bytes, Limits::default());
            assert!(matches!(result, Err(UnpackError::Corrupt(_))), "{result:?}");
        }
    }

    #[test]
    fn modes_keep_only_the_executable_bit_and_dot_slash_names_work() {
        let entries = [
            link("./", EntryType::Directory, ""),
            // `git archive` starts with one, holding the commit id.
            Raw {
                data: b"16 comment=abcd\n",
                ..link("pax_global_header", EntryType::XGlobalHeader, "")
            },
            Raw {
                mode: 0o4777,
                ..file("./bin/tool")
            },
            Raw {
                mode: 0o600,
                ..file("./data")
            },
            Raw {
                mode: 0o700,
                ..link("./private/", EntryType::Directory, "")
            },
        ];
        let (_tmp, dest, result) = unpack(&tgz(&entries), Limits::default());
        assert_eq!(result.unwrap(), UnpackStats { files: 2, bytes: 10 });
        let mode = |path: &str| fs::metadata(dest.join(path)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            (mode("bin/tool"), mode("data"), mode("bin"), mode("private")),
            (0o755, 0o644, 0o755, 0o755)
        );
    }

    #[test]
    fn pack_then_unpack_round_trips_and_honours_dockerignore() {
        let src = TempDir::new().unwrap();
        let write = |path: &str, data: &str| {
            let path = src.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        };
        write(".dockerignore", "secret.txt\nnode_modules\n");
        write("app.js", "console.log(1)");
        write("secret.txt", "hunter2");
        write("node_modules/x/index.js", "x");
        write("bin/run", "#!/bin/sh\n");
        let long_name = format!("deep/{}.txt", "n".repeat(120));
        write(&long_name, "long");
        fs::set_permissions(src.path().join("bin/run"), Permissions::from_mode(0o755)).unwrap();
        symlink("../app.js", src.path().join("bin/app")).unwrap();

        let mut bytes = Vec::new();
        let packed = pack_tgz(src.path(), &mut bytes).unwrap();
        assert_eq!(
            packed,
            PackStats {
                files: 5,
                bytes: 24 + 14 + 10 + 4
            }
        );

        let (_tmp, dest, result) = unpack(&bytes, Limits::default());
        assert_eq!(
            result.unwrap(),
            UnpackStats {
                files: packed.files,
                bytes: packed.bytes
            }
        );
        let mut names = Vec::new();
        for entry in walkdir(&dest) {
            names.push(entry.strip_prefix(&dest).unwrap().to_string_lossy().into_owned());
        }
        names.sort();
        let expected = [
            ".dockerignore",
            "app.js",
            "bin",
            "bin/app",
            "bin/run",
            "deep",
            long_name.as_str(),
        ];
        assert_eq!(names, expected);
        assert_eq!(fs::read_link(dest.join("bin/app")).unwrap(), Path::new("../app.js"));
        assert_eq!(fs::read_to_string(dest.join("bin/app")).unwrap(), "console.log(1)");
        assert_eq!(
            fs::metadata(dest.join("bin/run")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(dest.join("app.js")).unwrap().permissions().mode() & 0o777,
            0o644
        );

        // Entries come sorted, relative, without a `./` prefix.
        let mut archive = Archive::new(GzDecoder::new(&bytes[..]));
        let order: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(order, expected);
    }

    /// Every path below `dir`, not following symlinks.
    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                paths.extend(walkdir(&path));
            }
            paths.push(path);
        }
        paths
    }
}
