//! The unpacker against hostile archives (written with raw headers, as `tar::Builder` refuses
//! `..` and absolute names), and a pack-then-unpack round trip.

use std::fs::{self, Permissions};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use tar::{Archive, Builder, EntryType, Header};

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
