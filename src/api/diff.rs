//! `GET /apps/{app}/releases/{a}/diff/{b}`: what promoting `b` over `a` changes. The env is
//! compared by key only (added, removed, changed): values never leave the server this way, so
//! a diff can be shown in CI logs and chat. The manifest comes as a unified diff, the build as
//! both sides' id, description, commit and images.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use serde::Serialize;

use crate::AppState;
use crate::api::apps::AppPath;
use crate::api::input::Pretty;
use crate::error::{ApiError, ApiResult};
use crate::store::builds::Build;
use crate::store::releases::Release;

/// What changes from one release to another.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ReleaseDiff {
    pub app: String,
    pub from: String,
    pub to: String,
    pub env: EnvDiff,
    pub manifest: ManifestDiff,
    pub build: BuildDiff,
}

/// The env's keys that differ (never a value).
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct EnvDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Keys in both whose value differs.
    pub changed: Vec<String>,
    /// How many keys are the same in both.
    pub unchanged: usize,
}

/// The manifests' difference.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ManifestDiff {
    pub changed: bool,
    /// A unified diff (empty when unchanged).
    pub diff: String,
}

/// Both releases' builds.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BuildDiff {
    pub changed: bool,
    pub from: Option<BuildSummary>,
    pub to: Option<BuildSummary>,
}

/// What identifies a build's code.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BuildSummary {
    pub id: String,
    pub description: String,
    /// The commit the source carried (`git-sha` of the build), when it did.
    pub commit: Option<String>,
    /// The images the build made, by service.
    pub images: BTreeMap<String, String>,
}

impl From<&Build> for BuildSummary {
    fn from(b: &Build) -> Self {
        Self {
            id: b.id.to_string(),
            description: b.description.clone(),
            commit: Some(b.git_sha.clone()).filter(|c| !c.is_empty()),
            images: b.images.0.clone(),
        }
    }
}

/// An env's `KEY=VALUE` lines as a map, leniently (what is stored was checked on the way in).
fn env_map(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim(), v))
        .collect()
}

/// The keys that differ between two envs.
pub fn env_diff(from: &str, to: &str) -> EnvDiff {
    let (from, to) = (env_map(from), env_map(to));
    let mut diff = EnvDiff::default();
    for (key, value) in &to {
        match from.get(key) {
            None => diff.added.push((*key).to_owned()),
            Some(old) if old != value => diff.changed.push((*key).to_owned()),
            Some(_) => diff.unchanged += 1,
        }
    }
    diff.removed = from
        .keys()
        .filter(|k| !to.contains_key(*k))
        .map(|k| (*k).to_owned())
        .collect();
    diff
}

/// The manifest of `from` against `to`, as a unified diff with three lines of context.
pub fn manifest_diff(from: &Release, to: &Release) -> ManifestDiff {
    if from.manifest == to.manifest {
        return ManifestDiff {
            changed: false,
            diff: String::new(),
        };
    }
    let diff = similar::TextDiff::from_lines(&from.manifest, &to.manifest)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{}/convox.yml", from.id), &format!("{}/convox.yml", to.id))
        .to_string();
    ManifestDiff { changed: true, diff }
}

/// The whole difference of two releases (and their builds).
pub fn diff(from: &Release, from_build: Option<&Build>, to: &Release, to_build: Option<&Build>) -> ReleaseDiff {
    let (from_build, to_build) = (from_build.map(BuildSummary::from), to_build.map(BuildSummary::from));
    ReleaseDiff {
        app: to.app.clone(),
        from: from.id.to_string(),
        to: to.id.to_string(),
        env: env_diff(&from.env, &to.env),
        manifest: manifest_diff(from, to),
        build: BuildDiff {
            changed: from.build_id != to.build_id,
            from: from_build,
            to: to_build,
        },
    }
}

async fn release_and_build(state: &AppState, app: &str, id: &str) -> ApiResult<(Release, Option<Build>)> {
    let release = crate::store::releases::get(&state.pool, app, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("release", id.chars().take(40).collect()))?;
    let build = match &release.build_id {
        Some(build) => crate::store::builds::get(&state.pool, app, build).await?,
        None => None,
    };
    Ok((release, build))
}

#[tracing::instrument(skip_all, fields(app.name = %app.name))]
pub async fn diff_releases(
    State(state): State<AppState>,
    Path((_, from, to)): Path<(String, String, String)>,
    AppPath(app): AppPath,
) -> ApiResult<Pretty<ReleaseDiff>> {
    let (from, from_build) = release_and_build(&state, &app.name, &from).await?;
    let (to, to_build) = release_and_build(&state, &app.name, &to).await?;
    Ok(Pretty(diff(&from, from_build.as_ref(), &to, to_build.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(id: &str, env: &str, manifest: &str) -> Release {
        Release {
            id: crate::ids::ReleaseId::from(id),
            app: "myapp".into(),
            position: 1,
            build_id: None,
            env: env.into(),
            manifest: manifest.into(),
            description: String::new(),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn env_keys_differ_and_values_stay_out() {
        let diff = env_diff("A=1\nB=secret-b\nC=3", "B=other-b\nC=3\nD=secret-d");
        assert_eq!(diff.added, ["D"]);
        assert_eq!(diff.removed, ["A"]);
        assert_eq!(diff.changed, ["B"]);
        assert_eq!(diff.unchanged, 1);
        let json = serde_json::to_string(&diff).unwrap();
        assert!(!json.contains("secret"), "{json}");
    }

    #[test]
    fn the_manifest_is_a_unified_diff() {
        let a = release("RAAAAAAAAAA", "", "services:\n  web:\n    port: 3000\n");
        let b = release("RBBBBBBBBBB", "", "services:\n  web:\n    port: 4000\n");
        let diff = manifest_diff(&a, &b);
        assert!(diff.changed);
        assert!(
            diff.diff
                .starts_with("--- RAAAAAAAAAA/convox.yml\n+++ RBBBBBBBBBB/convox.yml\n@@"),
            "{}",
            diff.diff
        );
        assert!(
            diff.diff.contains("-    port: 3000\n+    port: 4000\n"),
            "{}",
            diff.diff
        );
        assert!(!manifest_diff(&a, &a).changed);
    }
}
