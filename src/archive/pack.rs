//! Packing a directory into a gzip-compressed tar for upload (what the CLI's `deploy` sends),
//! leaving out what `.dockerignore` names.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

use flate2::Compression;
use flate2::write::GzEncoder;
use ignore::WalkBuilder;
use tar::{Builder, EntryType, Header};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackStats {
    /// Files and symlinks packed (directories are not counted).
    pub files: u64,
    /// Bytes of file content packed.
    pub bytes: u64,
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
    pack(dir, writer, true)
}

/// Packs all of `dir`, `.dockerignore` or not: a build directory as its build left it (what a
/// build command made may match the patterns that kept it out of the upload).
///
/// # Errors
/// As [`pack_tgz`].
pub fn pack_tree_tgz<W: Write>(dir: &Path, writer: W) -> io::Result<PackStats> {
    pack(dir, writer, false)
}

fn pack<W: Write>(dir: &Path, writer: W, honour_dockerignore: bool) -> io::Result<PackStats> {
    let mut builder = Builder::new(GzEncoder::new(writer, Compression::default()));
    let mut stats = PackStats::default();
    // Only `.dockerignore`: not .gitignore, hidden-file rules or ignore files above `dir`.
    let mut walk = WalkBuilder::new(dir);
    walk.standard_filters(false);
    if honour_dockerignore {
        walk.add_custom_ignore_filename(".dockerignore");
    }
    let walk = walk.follow_links(false).sort_by_file_name(|a, b| a.cmp(b)).build();
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
