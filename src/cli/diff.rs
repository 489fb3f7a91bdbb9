//! `rack releases diff [A] B`, and the summary `rack releases promote` and `rack deploy` print
//! before they promote: env keys added, removed and changed (never a value), the build, and
//! the manifest as a unified diff.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use super::Client;

/// A release diff as the API returns it.
#[derive(Debug, Deserialize)]
pub struct ReleaseDiff {
    pub from: String,
    pub to: String,
    pub env: EnvDiff,
    pub manifest: ManifestDiff,
    pub build: BuildDiff,
}

#[derive(Debug, Deserialize)]
pub struct EnvDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
}

#[derive(Debug, Deserialize)]
pub struct ManifestDiff {
    pub changed: bool,
    pub diff: String,
}

#[derive(Debug, Deserialize)]
pub struct BuildDiff {
    pub changed: bool,
    pub from: Option<BuildSummary>,
    pub to: Option<BuildSummary>,
}

#[derive(Debug, Deserialize)]
pub struct BuildSummary {
    pub id: String,
    pub description: String,
    pub commit: Option<String>,
    pub images: BTreeMap<String, String>,
}

/// What promoting `to` over `from` changes, as a [`ReleaseDiff`] or as the API's JSON.
///
/// # Errors
/// When either release does not exist or the rack cannot be reached.
pub async fn get<T: serde::de::DeserializeOwned>(
    client: &Client,
    app: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<T> {
    client
        .get(&format!(
            "/apps/{}/releases/{}/diff/{}",
            client.segment(app),
            client.segment(from),
            client.segment(to)
        ))
        .await
}

fn build_line(build: Option<&BuildSummary>) -> String {
    let Some(b) = build else {
        return "none".into();
    };
    let mut line = b.id.clone();
    if let Some(commit) = &b.commit {
        let _ = write!(line, " commit {}", commit.chars().take(12).collect::<String>());
    }
    if !b.description.is_empty() {
        let _ = write!(line, " ({})", b.description);
    }
    line
}

/// The diff as people read it.
pub fn render(diff: &ReleaseDiff) -> String {
    let mut out = format!("Changes from {} to {}:\n", diff.from, diff.to);
    let env = &diff.env;
    if env.added.is_empty() && env.removed.is_empty() && env.changed.is_empty() {
        let _ = writeln!(out, "  env:      unchanged ({} keys)", env.unchanged);
    } else {
        let mut parts = Vec::new();
        parts.extend(env.added.iter().map(|k| format!("+{k}")));
        parts.extend(env.removed.iter().map(|k| format!("-{k}")));
        parts.extend(env.changed.iter().map(|k| format!("~{k}")));
        let _ = writeln!(
            out,
            "  env:      {} (values not shown; {} unchanged)",
            parts.join(" "),
            env.unchanged
        );
    }
    if diff.build.changed {
        let _ = writeln!(
            out,
            "  build:    {} => {}",
            build_line(diff.build.from.as_ref()),
            build_line(diff.build.to.as_ref())
        );
        if let (Some(from), Some(to)) = (&diff.build.from, &diff.build.to) {
            for (service, image) in &to.images {
                match from.images.get(service) {
                    Some(old) if old == image => {}
                    Some(old) => {
                        let _ = writeln!(out, "  image:    {service}: {old} => {image}");
                    }
                    None => {
                        let _ = writeln!(out, "  image:    {service}: {image} (new)");
                    }
                }
            }
        }
    } else {
        let _ = writeln!(out, "  build:    unchanged ({})", build_line(diff.build.to.as_ref()));
    }
    if diff.manifest.changed {
        out.push_str("  manifest:\n");
        for line in diff.manifest.diff.lines() {
            let _ = writeln!(out, "    {line}");
        }
    } else {
        out.push_str("  manifest: unchanged\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_names_keys_and_builds() {
        let diff = ReleaseDiff {
            from: "R1".into(),
            to: "R2".into(),
            env: EnvDiff {
                added: vec!["NEW".into()],
                removed: vec!["OLD".into()],
                changed: vec!["TOKEN".into()],
                unchanged: 2,
            },
            manifest: ManifestDiff {
                changed: true,
                diff: "--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n".into(),
            },
            build: BuildDiff {
                changed: true,
                from: Some(BuildSummary {
                    id: "B1".into(),
                    description: String::new(),
                    commit: None,
                    images: BTreeMap::new(),
                }),
                to: Some(BuildSummary {
                    id: "B2".into(),
                    description: "fix".into(),
                    commit: Some("0123456789abcdef".into()),
                    images: BTreeMap::new(),
                }),
            },
        };
        let text = render(&diff);
        assert!(
            text.contains("env:      +NEW -OLD ~TOKEN (values not shown; 2 unchanged)"),
            "{text}"
        );
        assert!(text.contains("build:    B1 => B2 commit 0123456789ab (fix)"), "{text}");
        assert!(text.contains("    +y\n"), "{text}");
    }
}
