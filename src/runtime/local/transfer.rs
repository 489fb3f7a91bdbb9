//! Moving a build between racks on this host's side: its build directory packed for an
//! export and unpacked on import (through the same checked unpacker as an uploaded source),
//! its images saved with `podman save` and loaded with `podman load`, then named as this rack
//! names a build's images.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::build::Builder;
use crate::runtime::{ExportedBuild, RuntimeError};

/// Longest a `podman save` or `podman load` of a build's images may take.
const PODMAN_IMAGES: Duration = Duration::from_secs(3600);

/// Packs build `id`'s directory and saves its images into `scratch`.
pub(super) async fn export(
    builder: &Builder,
    app: &str,
    id: &str,
    images: &[String],
    scratch: &Path,
) -> Result<ExportedBuild, RuntimeError> {
    let dir = builder.builds_dir.join(app).join(id);
    if !dir.is_dir() {
        return Err(RuntimeError::Failed(format!(
            "the files of build {id} are no longer on this rack (an app keeps its newest builds and \
             those its releases in use need): build it again, then export that build"
        )));
    }
    let files = scratch.join(crate::build_archive::FILES);
    let (from, into) = (dir.clone(), files.clone());
    tokio::task::spawn_blocking(move || {
        let out = std::io::BufWriter::new(std::fs::File::create(&into)?);
        crate::archive::pack_tree_tgz(&from, out).map(drop)
    })
    .await
    .map_err(|e| RuntimeError::Failed(format!("packing the build directory: {e}")))?
    .map_err(RuntimeError::io(format!("packing the build directory of {id}")))?;
    if images.is_empty() {
        return Ok(ExportedBuild { files, images: None });
    }
    let Some(podman) = &builder.podman else {
        return Err(RuntimeError::Failed(format!(
            "build {id} has images, and podman is not installed here to save them"
        )));
    };
    for image in images {
        if !podman.image_exists(image).await {
            return Err(RuntimeError::Failed(format!(
                "the image {image} of build {id} is no longer on this rack: build it again"
            )));
        }
    }
    let saved = scratch.join(crate::build_archive::IMAGES);
    let out = saved.display().to_string();
    let mut args = vec!["save", "--multi-image-archive", "--output", out.as_str()];
    args.extend(images.iter().map(String::as_str));
    podman
        .output_within(&args, Some(PODMAN_IMAGES))
        .await
        .map_err(|e| RuntimeError::Failed(format!("podman save: {e}")))?;
    Ok(ExportedBuild {
        files,
        images: Some(saved),
    })
}

/// Installs build `id` of `app` from an archive's `files.tgz` and `images.tar`; the images
/// by service, as this rack names them. On failure nothing of it is left.
pub(super) async fn import(
    builder: &Builder,
    app: &str,
    id: &str,
    files: &Path,
    images: Option<&Path>,
    images_by_service: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    let dir = builder.builds_dir.join(app).join(id);
    let installed = install(builder, app, id, &dir, files, images, images_by_service).await;
    if installed.is_err() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        if let Some(podman) = &builder.podman {
            for service in images_by_service.keys() {
                let _ = podman.output(&["rmi", &podman.image_name(app, service, id)]).await;
            }
        }
    }
    installed
}

async fn install(
    builder: &Builder,
    app: &str,
    id: &str,
    dir: &Path,
    files: &Path,
    images: Option<&Path>,
    images_by_service: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(RuntimeError::io(format!("making the build directory of {id}")))?;
    let (from, into, limits) = (files.to_owned(), dir.to_owned(), builder.limits);
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&from).map_err(|e| e.to_string())?;
        crate::archive::unpack_tgz(std::io::BufReader::new(file), &into, limits)
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| RuntimeError::Failed(format!("unpacking the build directory: {e}")))?
    .map_err(|e| RuntimeError::Failed(format!("files.tgz: {e}")))?;
    if !dir.join("src").is_dir() {
        return Err(RuntimeError::Failed(
            "files.tgz: the build directory has no src: it is not one a build of a local rack made \
             (a Kubernetes rack's archive has no build directory: import it into a Kubernetes rack)"
                .to_owned(),
        ));
    }
    builder
        .sandbox
        .hand_over(dir)
        .await
        .map_err(RuntimeError::io("handing the build directory to the sandbox"))?;
    if images_by_service.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (Some(podman), Some(images)) = (&builder.podman, images) else {
        return Err(RuntimeError::Failed(
            "the build has images, and podman is not installed here to load them".to_owned(),
        ));
    };
    // A name already here (a build imported into the rack that made it) stays; one that only
    // the load brought is dropped once the image has this rack's name.
    let mut present = Vec::new();
    for old in images_by_service.values() {
        present.push(podman.image_exists(old).await);
    }
    let archive = images.display().to_string();
    podman
        .output_within(&["load", "--input", &archive], Some(PODMAN_IMAGES))
        .await
        .map_err(|e| RuntimeError::Failed(format!("podman load: {e}")))?;
    let mut named = BTreeMap::new();
    for ((service, old), was_here) in images_by_service.iter().zip(present) {
        let new = podman.image_name(app, service, id);
        podman
            .output(&["tag", old, &new])
            .await
            .map_err(|e| RuntimeError::Failed(format!("images.tar has no image {old} for {service}: {e}")))?;
        if !was_here && *old != new {
            let _ = podman.output(&["untag", old, old]).await;
        }
        named.insert(service.clone(), new);
    }
    Ok(named)
}
