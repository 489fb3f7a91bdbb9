//! The layering rules of docs/architecture.md, checked on the source text: each rule the
//! document states is held here (or by a test named there), so a change that breaks one fails
//! `cargo test --lib` instead of waiting for a reviewer's grep.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/<dir>`, with its text.
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                out.push((path, text));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut out = Vec::new();
    walk(&root, &mut out);
    assert!(!out.is_empty(), "no sources under {}", root.display());
    out
}

/// The lines of the files under `src/<dir>` (except those `allowed`) that contain any of
/// `needles`, as `path:line: text`.
fn offending(dir: &str, needles: &[&str], allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, text) in sources(dir) {
        let name = path.to_string_lossy();
        if allowed.iter().any(|a| name.ends_with(a)) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle)) {
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn the_runtime_never_reaches_into_the_store_the_jobs_or_the_api() {
    let found = offending("runtime", &["crate::store", "crate::jobs", "crate::api"], &[]);
    assert!(
        found.is_empty(),
        "the runtime gets what it needs as capabilities (docs/architecture.md):\n{}",
        found.join("\n")
    );
}

#[test]
fn sql_is_only_in_the_store() {
    let mut found = Vec::new();
    for dir in ["api", "jobs", "runtime", "deploy", "events", "cli", "manifest"] {
        found.extend(offending(dir, &["sqlx::query", "query_as(", "query_scalar("], &[]));
    }
    assert!(
        found.is_empty(),
        "every SQL statement belongs in src/store:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_state_machine_and_the_rollout_plan_are_pure() {
    let found = offending(
        "deploy",
        &[
            "crate::store",
            "crate::jobs",
            "crate::api",
            "crate::runtime",
            "crate::events",
            // Deriving how a type is stored is fine; talking to Postgres is not.
            "sqlx::query",
            "sqlx::Pg",
            "tokio",
        ],
        &[],
    );
    assert!(
        found.is_empty(),
        "src/deploy is pure functions (docs/architecture.md):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_store_does_not_drive_the_state_machine() {
    let found = offending(
        "store",
        &["deploy::next", "crate::jobs", "crate::runtime", "crate::api"],
        &[],
    );
    assert!(
        found.is_empty(),
        "the store records transitions, the jobs decide them:\n{}",
        found.join("\n")
    );
}

#[test]
fn routes_are_wired_only_in_the_route_table() {
    // The local runtime's router is the apps' proxy, not rack's API.
    let found = offending("api", &[".route(", ".nest("], &["api/mod.rs"]);
    assert!(
        found.is_empty(),
        "every route of rack's API is on the route table in src/api/mod.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn stream_names_are_built_in_one_place() {
    let mut found = Vec::new();
    for dir in ["api", "jobs", "runtime", "store", "events"] {
        found.extend(offending(dir, &["format!(\"system/", "format!(\"service/"], &[]));
    }
    assert!(
        found.is_empty(),
        "build stream names with crate::stream_names:\n{}",
        found.join("\n")
    );
}

/// The most lines of code a file under `src/` may have (blank and comment lines not counted;
/// tests inside the file are): past it, a file holds more than one thing to read.
const MAX_LINES_OF_CODE: usize = 600;

/// The lines of `text` that are neither blank nor comments.
fn lines_of_code(text: &str) -> usize {
    let mut in_block = false;
    let mut count = 0;
    for line in text.lines().map(str::trim) {
        if in_block || line.starts_with("/*") {
            in_block = !line.contains("*/");
        } else if !line.is_empty() && !line.starts_with("//") {
            count += 1;
        }
    }
    count
}

#[test]
fn lines_of_code_leave_out_blanks_and_comments() {
    let text = "//! header\n\nfn a() {\n    // why\n    /* block\n       still */\n    b();\n}\n";
    assert_eq!(lines_of_code(text), 3);
}

#[test]
fn no_source_file_is_over_the_size_limit() {
    let found: Vec<String> = sources("")
        .into_iter()
        .filter_map(|(path, text)| {
            let n = lines_of_code(&text);
            (n > MAX_LINES_OF_CODE).then(|| format!("{}: {n} lines of code", path.display()))
        })
        .collect();
    assert!(
        found.is_empty(),
        "split these along their seams (at most {MAX_LINES_OF_CODE} lines of code a file; tests \
         go in a file of their own):\n{}",
        found.join("\n")
    );
}
