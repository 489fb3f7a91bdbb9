//! Loading a backup's resource exports on Kubernetes. `rack server --restore` leaves each
//! resource's export in `<data>/resource-imports/<app>/` (`crate::backup::pending_import`);
//! when `database_rollout` creates that resource (the restored server applies every app's
//! current release as it starts), it loads the export into it once its pod is ready, before
//! any service of the release starts: SQL through a port-forward with `psql` or the `mysql`
//! client (what `PUT /apps/{app}/resources/{name}/data` does), an RDB through `redis_import`.
//!
//! A StatefulSet created with an export to load carries the annotation [`ANNOTATION`] until
//! the export is in: a crash half-way leaves it marked, and the next attempt loads the export
//! again (a pg_dump `--clean` or a mysqldump drops what it creates first; an RDB replaces the
//! data). One that exists unmarked already holds its data (in the cluster the backup was
//! taken from, say): the export is not loaded over it, and is removed.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::Value;

use super::KubeRuntime;
use super::databases::object_name;
use crate::resource::{Kind, ResourceSpec};
use crate::runtime::RuntimeError;

/// The annotation of a resource's StatefulSet whose export has not been loaded yet.
pub const ANNOTATION: &str = "convox.com/restore-pending";

/// What to do about a resource's export, from whether one waits on this server's disk and
/// whether (and how) its StatefulSet exists.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// No export: nothing to do.
    Nothing,
    /// Created with the export, or created by an attempt that did not load it: load it.
    Load(PathBuf),
    /// The resource existed before (with its data): the export is removed, not loaded.
    Forget(PathBuf),
    /// Marked, and the export is on another server's disk (the one that restored): the mark
    /// stays for that server.
    KeepMark,
}

impl Plan {
    /// Decides, for the export `pending` (if any) and the live StatefulSet (if any).
    pub fn of(pending: Option<PathBuf>, live: Option<&StatefulSet>) -> Self {
        let marked = live.is_some_and(is_marked);
        match (pending, live) {
            (Some(file), None) => Self::Load(file),
            (Some(file), Some(_)) if marked => Self::Load(file),
            (Some(file), Some(_)) => Self::Forget(file),
            (None, Some(_)) if marked => Self::KeepMark,
            (None, _) => Self::Nothing,
        }
    }

    /// Whether the StatefulSet applied now carries the mark.
    pub fn marks(&self) -> bool {
        matches!(self, Self::Load(_) | Self::KeepMark)
    }
}

/// Whether the StatefulSet is marked as waiting for its export.
fn is_marked(set: &StatefulSet) -> bool {
    set.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION))
}

/// Puts the mark on a StatefulSet's body before it is applied.
pub fn mark(body: &mut Value) {
    body["metadata"]["annotations"][ANNOTATION] = Value::from("true");
}

/// Loads the export `file` into resource `spec` of `app`, whose pod is ready; then removes the
/// mark, and the file.
///
/// # Errors
/// When the resource cannot be reached or refuses the export (the mark and the file stay: the
/// next attempt loads it again).
pub async fn load(runtime: &KubeRuntime, app: &str, spec: &ResourceSpec, file: &Path) -> Result<(), RuntimeError> {
    let kind = spec.definition.kind;
    let failed = |e: String| {
        RuntimeError::Failed(format!(
            "resource {}: loading its data from the backup ({}): {e}",
            spec.name,
            file.display()
        ))
    };
    match kind {
        Kind::Redis => super::redis_import::restore(runtime, app, &spec.name, file)
            .await
            .map_err(|e| failed(e.to_string()))?,
        // A cache: a backup never holds an export of one.
        Kind::Memcached => {}
        Kind::Postgres | Kind::Postgis | Kind::Mysql | Kind::Mariadb => {
            let (addr, guard) = super::database_rollout::endpoint(runtime, app, &spec.name).await?;
            let data = tokio::fs::File::open(file).await.map_err(|e| failed(e.to_string()))?;
            let endpoint = crate::runtime::ResourceEndpoint {
                addr,
                guard: Some(Box::new(guard)),
            };
            let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(data));
            crate::resource_data::import(kind, &spec.credentials, endpoint, body)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    unmark(runtime, app, &spec.name).await?;
    forget(file);
    Ok(())
}

/// Removes the mark from resource `name`'s StatefulSet (a merge patch: the next apply, which
/// no longer has it, leaves it off).
async fn unmark(runtime: &KubeRuntime, app: &str, name: &str) -> Result<(), RuntimeError> {
    let sets: Api<StatefulSet> = runtime.api(app);
    let object = object_name(name);
    let patch = serde_json::json!({ "metadata": { "annotations": { ANNOTATION: null } } });
    sets.patch(&object, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(RuntimeError::kube(format!("unmarking statefulset {object}")))?;
    Ok(())
}

/// Removes an export once loaded (or not to be loaded).
pub fn forget(file: &Path) {
    if let Err(e) = std::fs::remove_file(file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "removing {}", file.display());
    }
}

/// The exports a restore left on this server for resource `name` of `app` (any kind), and for
/// all of `app`'s resources when `name` is `None`: removed with the resource or the app.
pub fn forget_all(data_dir: &Path, app: &str, name: Option<&str>) {
    let dir = data_dir.join(crate::backup::PENDING_IMPORTS).join(app);
    match name {
        None => {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, "removing {}", dir.display());
            }
        }
        Some(name) => Kind::ALL
            .into_iter()
            .filter_map(|kind| crate::backup::pending_import(data_dir, app, name, kind))
            .for_each(|file| forget(&file)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(annotations: serde_json::Value) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "resource-db", "annotations": annotations },
        }))
        .unwrap()
    }

    #[test]
    fn an_export_is_loaded_into_a_new_or_marked_resource_only() {
        let file = PathBuf::from("/data/resource-imports/shop/db.sql");
        let marked = set(serde_json::json!({ ANNOTATION: "true" }));
        let plain = set(serde_json::json!({}));
        assert_eq!(Plan::of(Some(file.clone()), None), Plan::Load(file.clone()));
        assert_eq!(Plan::of(Some(file.clone()), Some(&marked)), Plan::Load(file.clone()));
        assert_eq!(Plan::of(Some(file.clone()), Some(&plain)), Plan::Forget(file.clone()));
        assert_eq!(Plan::of(None, Some(&marked)), Plan::KeepMark);
        assert_eq!(Plan::of(None, Some(&plain)), Plan::Nothing);
        assert_eq!(Plan::of(None, None), Plan::Nothing);
        assert!(Plan::Load(file.clone()).marks() && Plan::KeepMark.marks());
        assert!(!Plan::Forget(file).marks() && !Plan::Nothing.marks());
    }

    #[test]
    fn the_mark_goes_on_the_stateful_sets_metadata() {
        let mut body = serde_json::json!({ "metadata": { "name": "resource-db", "labels": {} }, "spec": {} });
        mark(&mut body);
        assert_eq!(body["metadata"]["annotations"][ANNOTATION], "true");
        assert_eq!(body["spec"], serde_json::json!({}), "not the pod template: no restart");
    }
}
