//! What a build is given and what it gives back: the job, its output, and why it failed.

use std::time::Duration;

/// A build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub app: String,
    pub id: crate::ids::BuildId,
    /// The release the build makes when it succeeds (known up front: image builds get it as
    /// their `RELEASE` argument).
    pub release: crate::ids::ReleaseId,
    pub description: String,
    /// The environment of the app's latest release (image builds get the variables their
    /// Dockerfile declares as `ARG`s).
    pub env: crate::env::Env,
    /// Key of the source tarball in the app's objects.
    pub source_key: String,
    /// Where its bytes are in the object store.
    pub source_location: String,
    /// Path of the manifest inside the source.
    pub manifest_path: String,
    pub git_sha: String,
    /// The rack-wide resources linked to the app: a service's `resources:` may name them.
    pub rack_linked: Vec<String>,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The manifest text, as found in the source.
    pub manifest: String,
    /// Images pushed, by service (runtimes that build images).
    pub images: std::collections::BTreeMap<String, String>,
}

/// What a runtime wrote for a build's export (in the scratch directory it was given).
#[derive(Debug, Clone)]
pub struct ExportedBuild {
    /// The packed build directory.
    pub files: std::path::PathBuf,
    /// The saved images, when the build has any.
    pub images: Option<std::path::PathBuf>,
}

/// Why a build failed; the message becomes the build's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildFailure {
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out after {}", humanize(*.0))]
    TimedOut(Duration),
    #[error("interrupted: the rack replica running the build stopped before it finished")]
    Interrupted,
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
