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

#[test]
fn errors_reach_http_only_through_api_error() {
    // `Pretty` is the JSON body of a success; this file names the needles.
    let mut found = offending(
        "",
        &["IntoResponse for"],
        &["src/error.rs", "api/input.rs", "src/architecture.rs"],
    );
    // The route table's layers (a request past its time, a body for a bare status) are the
    // edge itself.
    found.extend(offending(
        "api",
        &[
            "StatusCode::INTERNAL_SERVER_ERROR",
            "StatusCode::BAD_GATEWAY",
            "StatusCode::SERVICE_UNAVAILABLE",
            "StatusCode::GATEWAY_TIMEOUT",
            "StatusCode::INSUFFICIENT_STORAGE",
        ],
        &["api/mod.rs"],
    ));
    assert!(
        found.is_empty(),
        "a failure becomes an ApiError (src/error.rs), which alone turns it into a response:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_the_event_bus_listens() {
    let found = offending("", &["PgListener"], &["src/events/mod.rs", "src/architecture.rs"]);
    assert!(
        found.is_empty(),
        "a replica listens on one connection, the event bus's (subscribe to it):\n{}",
        found.join("\n")
    );
}

#[test]
fn webhooks_reach_only_the_network() {
    let found = offending(
        "webhooks",
        &["crate::store", "crate::jobs", "crate::api", "crate::runtime", "sqlx"],
        &[],
    );
    assert!(
        found.is_empty(),
        "src/webhooks sends; the loop in src/jobs/webhooks.rs does the store work:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_api_never_builds_or_rolls_out() {
    let found = offending("api", &["runtime.apply(", "runtime.build("], &[]);
    assert!(
        found.is_empty(),
        "builds and rollouts are the jobs' (the API queues them):\n{}",
        found.join("\n")
    );
}

#[test]
fn workers_claim_with_skip_locked() {
    let mut claims = 0;
    for (path, text) in sources("store") {
        for (at, _) in text.match_indices("pub async fn claim_next(") {
            claims += 1;
            let body = &text[at..];
            let body = &body[..body[1..].find("\npub ").map_or(body.len(), |end| end + 1)];
            assert!(
                body.to_lowercase().contains("for update skip locked"),
                "{}: claim_next must skip rows another worker holds",
                path.display()
            );
        }
    }
    assert!(claims >= 2, "the builds' and deployments' claims at least");
}

#[test]
fn statuses_are_never_compared_as_text() {
    let mut names: Vec<&str> = crate::deploy::DeployState::ALL.iter().map(|s| s.as_str()).collect();
    // (Not `ok`, `Outcome::Ok`'s name: other programs' answers say it too, as redis's INFO.)
    names.extend(["created", "complete", "failed", "starting", "crashed", "stopping"]);
    let needles: Vec<String> = names
        .iter()
        .flat_map(|name| [format!("== \"{name}\""), format!("!= \"{name}\"")])
        .collect();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let mut found = Vec::new();
    for dir in ["api", "jobs", "store", "deploy", "events", "webhooks", "runtime"] {
        // podman's `State` is podman's text, not one of rack's statuses.
        found.extend(offending(dir, &needles, &["runtime/local/container.rs"]));
    }
    assert!(
        found.is_empty(),
        "compare DeployState, BuildStatus, ProcessStatus values, not their names:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_source_file_says_what_it_holds() {
    let found: Vec<String> = sources("")
        .into_iter()
        .filter(|(_, text)| !text.starts_with("//!"))
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        found.is_empty(),
        "start each file with a `//!` header:\n{}",
        found.join("\n")
    );
}

#[test]
fn untrusted_input_is_unpacked_and_parsed_off_the_async_workers() {
    let mut calls = 0;
    let mut found = Vec::new();
    for (path, text) in sources("runtime") {
        let name = path.to_string_lossy();
        if name.ends_with("tests.rs") {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        // Test modules at the end of a file parse their own fixtures.
        let end = lines
            .iter()
            .position(|l| l.starts_with("#[cfg(test)]"))
            .unwrap_or(lines.len());
        for n in 0..end {
            if lines[n].contains("unpack_tgz(")
                || lines[n].contains("manifest::parse(")
                || lines[n].contains("manifest::parse_linking(")
            {
                calls += 1;
                if !lines[n.saturating_sub(3)..n]
                    .iter()
                    .any(|l| l.contains("spawn_blocking"))
                {
                    found.push(format!("{name}:{}: {}", n + 1, lines[n].trim()));
                }
            }
        }
    }
    assert!(calls >= 2, "the source unpacker and the build's manifest parse");
    assert!(
        found.is_empty(),
        "unpacking a source and parsing its manifest run in spawn_blocking:\n{}",
        found.join("\n")
    );
}
