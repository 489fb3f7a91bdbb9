//! The tar streams of `cp` into a process (convox `FilesUpload`): an untrusted plain tar whose
//! entries name absolute paths in the process (`/app/file`, as the convox CLI sends them) is
//! checked and rewritten before anything reaches the process: names relative to `/` with no
//! `..`, only files, directories, symlinks that stay inside the tree they point from and hard
//! links to files earlier in the same archive, nothing written through a symlink of the archive,
//! plain permission bits, owner root (the one extracting owns them when it is not root), and
//! content bounded while streaming. What is left for the process's own `tar -x` is a tree it
//! unpacks under its `/`, inside its own filesystem view.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use tar::{Archive, Builder, EntryType, Header};

/// What [`rewrite`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Entries of every kind.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("archive entry {0:?} climbs out of / with ..")]
    Escapes(String),
    #[error("archive entry {path:?} has an invalid name: {reason}")]
    InvalidName { path: String, reason: &'static str },
    #[error("archive entry {path:?} is a symlink to {target:?}, which {reason}")]
    BadSymlink {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error("archive entry {path:?} is a hard link to {target:?}, which is not a file earlier in the archive")]
    BadHardLink { path: String, target: String },
    #[error("archive entry {path:?} would be written through the symlink {link:?} of the same archive")]
    ThroughSymlink { path: String, link: String },
    #[error("archive entry {path:?} is a {kind}; only files, directories and links are allowed")]
    Unsupported { path: String, kind: String },
    #[error("the files are larger than the limit of {0} bytes (RACK_MAX_CP_BYTES)")]
    TooLarge(u64),
    #[error("the archive has more than {0} entries")]
    TooManyEntries(u64),
    #[error("the archive holds no files")]
    Empty,
    #[error("the archive is not a tar, or is cut short: {0}")]
    Corrupt(String),
    #[error("writing the checked archive: {0}")]
    Io(#[source] io::Error),
}

/// Most entries one copy may hold.
pub const MAX_ENTRIES: u64 = 100_000;

/// Reads the tar `input`, checks every entry and writes the checked archive to `output`, with at
/// most `max_bytes` of file content.
///
/// # Errors
/// The first refused entry or crossed limit; `output` then holds a partial archive to discard.
pub fn rewrite<R: Read, W: Write>(input: R, output: W, max_bytes: u64) -> Result<CopyStats, CopyError> {
    let mut archive = Archive::new(input);
    let mut builder = Builder::new(output);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut stats = CopyStats::default();
    let mut files: HashSet<String> = HashSet::new();
    let mut links: HashSet<String> = HashSet::new();
    let corrupt = |e: io::Error| CopyError::Corrupt(e.to_string());
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        stats.entries += 1;
        if stats.entries > MAX_ENTRIES {
            return Err(CopyError::TooManyEntries(MAX_ENTRIES));
        }
        let raw = String::from_utf8(entry.path_bytes().into_owned()).map_err(|_| CopyError::InvalidName {
            path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
            reason: "it is not UTF-8",
        })?;
        let parts = components(&raw)?;
        if parts.is_empty() {
            // `/` itself: it exists.
            if kind == EntryType::Directory {
                continue;
            }
            return Err(CopyError::InvalidName {
                path: raw,
                reason: "it names no file",
            });
        }
        let name = parts.join("/");
        for depth in 1..parts.len() {
            let parent = parts[..depth].join("/");
            if links.contains(&parent) {
                return Err(CopyError::ThroughSymlink {
                    path: raw,
                    link: parent,
                });
            }
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        let mut header = Header::new_gnu();
        header.set_mode(mode);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.header().size().map_err(corrupt)?;
                stats.bytes = stats.bytes.saturating_add(size);
                if stats.bytes > max_bytes {
                    return Err(CopyError::TooLarge(max_bytes));
                }
                header.set_entry_type(EntryType::Regular);
                header.set_size(size);
                builder
                    .append_data(&mut header, &name, (&mut entry).take(size))
                    .map_err(|e| write_or_read(e, &raw))?;
                files.insert(name);
            }
            EntryType::Directory => {
                header.set_entry_type(EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &name, io::empty())
                    .map_err(CopyError::Io)?;
            }
            EntryType::Symlink => {
                let target = link_target(&entry, &raw)?;
                symlink_stays_inside(&parts, &target).map_err(|reason| CopyError::BadSymlink {
                    path: raw.clone(),
                    target: target.clone(),
                    reason,
                })?;
                header.set_entry_type(EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, &name, &target)
                    .map_err(CopyError::Io)?;
                links.insert(name);
            }
            EntryType::Link => {
                let target = link_target(&entry, &raw)?;
                let normal = components(&target).ok().map(|p| p.join("/"));
                let Some(normal) = normal.filter(|t| files.contains(t)) else {
                    return Err(CopyError::BadHardLink { path: raw, target });
                };
                header.set_entry_type(EntryType::Link);
                header.set_size(0);
                builder
                    .append_link(&mut header, &name, &normal)
                    .map_err(CopyError::Io)?;
                files.insert(name);
            }
            other => {
                return Err(CopyError::Unsupported {
                    path: raw,
                    kind: format!("{other:?}").to_lowercase(),
                });
            }
        }
    }
    if stats.entries == 0 {
        return Err(CopyError::Empty);
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(CopyError::Io)?;
    Ok(stats)
}

/// A failure while copying an entry's content: reading the upload (corrupt) or writing out.
fn write_or_read(e: io::Error, path: &str) -> CopyError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        CopyError::Corrupt(format!("entry {path:?} is cut short"))
    } else {
        CopyError::Io(e)
    }
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, path: &str) -> Result<String, CopyError> {
    let target = entry
        .link_name_bytes()
        .ok_or_else(|| CopyError::InvalidName {
            path: path.to_owned(),
            reason: "it is a link with no target",
        })?
        .into_owned();
    String::from_utf8(target).map_err(|_| CopyError::InvalidName {
        path: path.to_owned(),
        reason: "its link target is not UTF-8",
    })
}

/// The components of a path in the process, relative to `/`: leading slashes, empty and `.`
/// components dropped; `..` refused.
///
/// # Errors
/// [`CopyError::Escapes`] for `..`, [`CopyError::InvalidName`] for a NUL.
pub fn components(path: &str) -> Result<Vec<&str>, CopyError> {
    if path.contains('\0') {
        return Err(CopyError::InvalidName {
            path: path.replace('\0', "\\0"),
            reason: "it holds a NUL",
        });
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(CopyError::Escapes(path.to_owned())),
            part => parts.push(part),
        }
    }
    Ok(parts)
}

/// Whether a symlink at `parts` pointing at `target` stays below `/` of the copy: relative,
/// and never climbing above the root on its way.
fn symlink_stays_inside(parts: &[&str], target: &str) -> Result<(), &'static str> {
    if target.starts_with('/') {
        return Err("is absolute");
    }
    if target.is_empty() {
        return Err("is empty");
    }
    let mut depth = parts.len() - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or("climbs out of /")?,
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut b = Builder::new(&mut out);
            for (name, kind, data, target) in entries {
                let mut h = Header::new_gnu();
                h.set_entry_type(*kind);
                h.set_mode(0o4755);
                h.set_uid(1234);
                h.set_size(data.len() as u64);
                // Written raw: the tar crate's setters refuse the `..` an attacker sends.
                let bytes = name.as_bytes();
                h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                if let Some(t) = target {
                    h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                }
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            b.finish().unwrap();
        }
        out
    }

    fn names(tar: &[u8]) -> Vec<(String, u32, u64)> {
        let mut a = Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn absolute_names_become_relative_and_modes_plain() {
        let input = tar_of(&[
            ("/app/", EntryType::Directory, b"", None),
            ("/app/a.txt", EntryType::Regular, b"hello", None),
            ("/app/link", EntryType::Symlink, b"", Some("a.txt")),
            ("/app/hard", EntryType::Link, b"", Some("/app/a.txt")),
        ]);
        let mut out = Vec::new();
        let stats = rewrite(&input[..], &mut out, 100).unwrap();
        assert_eq!(stats, CopyStats { entries: 4, bytes: 5 });
        assert_eq!(
            names(&out),
            vec![
                ("app".into(), 0o755, 0),
                ("app/a.txt".into(), 0o755, 0),
                ("app/link".into(), 0o755, 0),
                ("app/hard".into(), 0o755, 0),
            ]
        );
    }

    #[test]
    fn escapes_are_refused() {
        let refused = |entries: &[(&str, EntryType, &[u8], Option<&str>)]| {
            rewrite(&tar_of(entries)[..], &mut Vec::new(), 100).unwrap_err()
        };
        assert!(matches!(
            refused(&[("/app/../../etc/x", EntryType::Regular, b"x", None)]),
            CopyError::Escapes(_)
        ));
        assert!(matches!(
            refused(&[("app/l", EntryType::Symlink, b"", Some("/etc"))]),
            CopyError::BadSymlink { .. }
        ));
        assert!(matches!(
            refused(&[("app/l", EntryType::Symlink, b"", Some("../../etc"))]),
            CopyError::BadSymlink { .. }
        ));
        assert!(matches!(
            refused(&[
                ("app/l", EntryType::Symlink, b"", Some("../tmp")),
                ("app/l/x", EntryType::Regular, b"x", None)
            ]),
            CopyError::ThroughSymlink { .. }
        ));
        assert!(matches!(
            refused(&[("app/h", EntryType::Link, b"", Some("/etc/shadow"))]),
            CopyError::BadHardLink { .. }
        ));
        assert!(matches!(
            refused(&[("app/dev", EntryType::Char, b"", None)]),
            CopyError::Unsupported { .. }
        ));
        assert!(matches!(
            refused(&[("app/big", EntryType::Regular, &[0u8; 101], None)]),
            CopyError::TooLarge(100)
        ));
        assert!(matches!(rewrite(&[][..], &mut Vec::new(), 100), Err(CopyError::Empty)));
    }
}
