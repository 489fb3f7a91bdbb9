//! Build archives: one build carried from one rack to another (`convox builds export` on
//! staging, `convox builds import` on production), so that what runs there is exactly what was
//! built and tested, with no second build. The archive is a gzip-compressed tar of:
//!
//! - `convox.yml`: the build's manifest;
//! - `source.tgz`: the source it was built from, when the rack still stores it;
//! - `files.tgz`: the build directory as the build left it (the local runtime runs a service's
//!   `command` in it);
//! - `images.tar`: the images built from Dockerfiles (`podman save`), when there are any;
//! - `build.json`, last: the build's metadata and the size and SHA-256 of every other entry.
//!
//! `write` streams an archive out with flat memory; `read` checks one coming in entry by entry
//! into a scratch directory, and refuses it (naming what is wrong) unless every entry is one
//! it knows, appears once, and matches `build.json`. The digests find damage (a cut or
//! corrupted transfer, an edited file); they are not a signature: whoever may import a build
//! may run any code on the rack anyway (the deploy role).

pub mod read;
pub mod write;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The entry holding the metadata; always the last one.
pub const METADATA: &str = "build.json";
/// The build's manifest.
pub const MANIFEST: &str = "convox.yml";
/// The source the build was made from.
pub const SOURCE: &str = "source.tgz";
/// The build directory.
pub const FILES: &str = "files.tgz";
/// The build's images.
pub const IMAGES: &str = "images.tar";
/// What `format` says in archives this version writes and reads.
pub const FORMAT: &str = "rack-build/1";
/// Largest `build.json` read (it is held in memory).
pub const MAX_METADATA: u64 = 1 << 20;

/// Every entry an archive may hold besides `build.json`, in the order they are written.
pub const ENTRIES: [&str; 4] = [MANIFEST, SOURCE, FILES, IMAGES];

/// `build.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// [`FORMAT`].
    pub format: String,
    /// The version of rack that wrote it.
    pub rack_version: String,
    pub exported: DateTime<Utc>,
    /// The rack, app and build it came from.
    pub rack: String,
    pub app: String,
    pub id: String,
    pub description: String,
    pub git_sha: String,
    /// Where the manifest was in the source.
    pub manifest_path: String,
    /// Images by service, as the exporting rack named them.
    pub images: BTreeMap<String, String>,
    pub started: Option<DateTime<Utc>>,
    pub ended: Option<DateTime<Utc>>,
    /// Every other entry.
    pub entries: Vec<Entry>,
}

/// One entry of the archive, as `build.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
}
