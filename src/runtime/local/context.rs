//! A service's own copy of its build context, made by rack before podman sees it.
//!
//! The build directory belongs to the sandbox user, and build commands run there: by the time
//! podman builds an image, anything in it may have been made by code from whoever can deploy,
//! symlinks to `/` included (podman follows a link in a `RUN --mount=type=bind,source=` on the
//! host, as root). So each image builds from a fresh copy in a directory only root can write,
//! made without following any link, and a link whose target leaves the context is refused, not
//! copied. Services no longer share one directory either: one service's build command cannot
//! change what another service's image is built from.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::archive::Limits;

/// Copies the tree at `from` into `into` (which must not exist; made mode 0711: a `RUN` step's
/// bind mount of a file in it is made as the build's unprivileged root), refusing links
/// that lead out of it and anything but files, directories and links, within `limits`.
///
/// # Errors
/// What was refused (with its path inside the context), or the I/O error.
pub fn copy(from: &Path, into: &Path, limits: Limits) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(into)
        .map_err(|e| format!("making {}: {e}", into.display()))?;
    let mut budget = Budget {
        limits,
        bytes: 0,
        entries: 0,
    };
    copy_dir(from, into, Path::new(""), &mut budget)
}

struct Budget {
    limits: Limits,
    bytes: u64,
    entries: u64,
}

fn copy_dir(from: &Path, into: &Path, at: &Path, budget: &mut Budget) -> Result<(), String> {
    let io = |e: std::io::Error| format!("copying the build context at {}: {e}", shown(at));
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        budget.entries += 1;
        if budget.entries > budget.limits.max_entries {
            return Err(format!(
                "the build context has more than {} entries (RACK_MAX_SOURCE_ENTRIES)",
                budget.limits.max_entries
            ));
        }
        let name = entry.file_name();
        let (source, target, inner) = (entry.path(), into.join(&name), at.join(&name));
        // The entry itself, never what a link points to.
        let meta = std::fs::symlink_metadata(&source).map_err(io)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = std::fs::read_link(&source).map_err(io)?;
            if !stays_inside(&inner, &link) {
                return Err(format!(
                    "the build context's link {} points to {}, outside the build context",
                    shown(&inner),
                    link.display()
                ));
            }
            std::os::unix::fs::symlink(&link, &target).map_err(io)?;
        } else if kind.is_dir() {
            std::fs::DirBuilder::new().mode(0o755).create(&target).map_err(io)?;
            copy_dir(&source, &target, &inner, budget)?;
        } else if kind.is_file() {
            budget.bytes += meta.len();
            if budget.bytes > budget.limits.max_bytes {
                return Err(format!(
                    "the build context is larger than {} bytes (RACK_MAX_SOURCE_BYTES)",
                    budget.limits.max_bytes
                ));
            }
            copy_file(&source, &target, meta.permissions().mode()).map_err(io)?;
        } else {
            return Err(format!(
                "the build context's {} is not a file, a directory or a link",
                shown(&inner)
            ));
        }
    }
    Ok(())
}

/// Copies a regular file's bytes, opening the source without following a link (a build command
/// could swap the file for one between the listing and the copy), with its permission bits but
/// never set-id ones.
fn copy_file(source: &Path, target: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(source)?;
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .open(target)?;
    std::io::copy(&mut reader, &mut writer)?;
    Ok(())
}

/// Whether the link at `at` (a path inside the context) pointing to `target` resolves inside
/// the context, judged on the names alone: an absolute target, or one that climbs above the
/// context's root, does not.
fn stays_inside(at: &Path, target: &Path) -> bool {
    let mut depth: Vec<&std::ffi::OsStr> = at
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(part) => depth.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn shown(at: &Path) -> String {
    if at.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        at.display().to_string()
    }
}

/// What `relative` names inside `root`, following links only while they stay inside: a
/// service's build path and its Dockerfile, which rack then reads as root.
///
/// # Errors
/// When it does not exist, or leads out of `root`.
pub fn resolve_inside(root: &Path, relative: &str) -> Result<PathBuf, String> {
    let path = crate::runtime::source::inside(root, relative)
        .ok_or_else(|| format!("{relative:?} leads out of the source"))?;
    let resolved = std::fs::canonicalize(&path).map_err(|_| format!("{relative} is not in the source"))?;
    let root = std::fs::canonicalize(root).map_err(|e| e.to_string())?;
    if !resolved.starts_with(&root) {
        return Err(format!("{relative} leads out of the source"));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_bytes: 1 << 20,
            max_entries: 100,
        }
    }

    #[test]
    fn links_are_judged_by_where_they_lead() {
        let at = Path::new("a/b/link");
        assert!(stays_inside(at, Path::new("target")));
        assert!(stays_inside(at, Path::new("../../top")));
        assert!(stays_inside(at, Path::new("./../c/./d")));
        assert!(!stays_inside(at, Path::new("../../../out")));
        assert!(!stays_inside(at, Path::new("/")));
        assert!(!stays_inside(Path::new("link"), Path::new("..")));
    }

    #[test]
    fn a_tree_is_copied_with_its_inner_links() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/file"), "content").unwrap();
        std::fs::set_permissions(from.join("sub/file"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("sub/file", from.join("link")).unwrap();
        let into = dir.path().join("into");
        copy(&from, &into, limits()).unwrap();
        assert_eq!(std::fs::read_to_string(into.join("sub/file")).unwrap(), "content");
        let mode = std::fs::metadata(into.join("sub/file")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "no set-id bit survives the copy");
        assert_eq!(std::fs::read_link(into.join("link")).unwrap(), Path::new("sub/file"));
        assert_eq!(
            resolve_inside(&into, "link").unwrap(),
            into.canonicalize().unwrap().join("sub/file")
        );
        let mode = std::fs::metadata(&into).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711);
    }

    #[test]
    fn links_out_of_the_context_are_refused() {
        for target in ["/", "../..", "/var/lib/rack/password"] {
            let dir = tempfile::tempdir().unwrap();
            let from = dir.path().join("from");
            std::fs::create_dir_all(from.join("deep")).unwrap();
            std::os::unix::fs::symlink(target, from.join("deep/rootlink")).unwrap();
            let error = copy(&from, &dir.path().join("into"), limits()).unwrap_err();
            assert!(
                error.contains("deep/rootlink") && error.contains("outside the build context"),
                "{target}: {error}"
            );
        }
    }

    #[test]
    fn a_dockerfile_reached_through_a_link_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("Dockerfile")).unwrap();
        assert!(resolve_inside(&root, "Dockerfile").is_err());
        assert!(resolve_inside(&root, "../secret").is_err());
        assert!(resolve_inside(&root, "missing").is_err());
    }

    #[test]
    fn limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("big"), vec![0u8; 2 << 20]).unwrap();
        let error = copy(&from, &dir.path().join("into"), limits()).unwrap_err();
        assert!(error.contains("larger than"), "{error}");
    }
}
