//! Builds carried between racks on Kubernetes (`convox builds export` / `import`). A build
//! here is its images in the registry, so the archive's `images.tar` is an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) of the registry's own manifests and blobs,
//! pulled through the registry API v2 (`registry_client`), each image named in `index.json`
//! by its reference (annotation `org.opencontainers.image.ref.name`). `files.tgz` is empty:
//! nothing runs from a build directory here.
//!
//! An import pushes the images into this rack's registry as `<RACK_REGISTRY>/<app>:<service>.<build>`,
//! blob by blob and then the very manifest, so the image digest is the one that was exported.
//! It also reads the `images.tar` a local rack writes (`podman save`, a docker archive:
//! `manifest.json`, the config and uncompressed layers), pushed as an OCI manifest of those.
//! Credentials: those the build Jobs get (`build::builder_docker_config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::KubeRuntime;
use super::registry_client::{ImageRef, Manifest, RegistryClient, digest_of};
use super::resources::image_ref;
use crate::runtime::{ExportedBuild, RuntimeError};

/// The annotation naming an image of the layout.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn failed(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(e.to_string())
}

/// A client of `host` with the credentials rack has for it in `app`'s namespace.
async fn client(runtime: &KubeRuntime, app: &str, host: &str) -> Result<RegistryClient, RuntimeError> {
    let secrets: Api<Secret> = runtime.api(app);
    let config = super::build::builder_docker_config(runtime, &secrets).await?;
    let config: Value = serde_json::from_str(&config).map_err(failed)?;
    let credentials = credentials_for(&config, host);
    RegistryClient::new(host, credentials).map_err(failed)
}

/// The user and password a docker config holds for `host`.
fn credentials_for(config: &Value, host: &str) -> Option<(String, String)> {
    use base64::Engine;
    let entry = &config["auths"][host];
    if let (Some(user), Some(password)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Some((user.to_owned(), password.to_owned()));
    }
    let auth = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .ok()?;
    let (user, password) = std::str::from_utf8(&auth).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Writes `images` (as the build pushed them) and an empty `files.tgz` into `scratch`.
pub async fn export(
    runtime: &KubeRuntime,
    app: &str,
    id: &str,
    images: &[String],
    scratch: &Path,
) -> Result<ExportedBuild, RuntimeError> {
    let files = scratch.join(crate::build_archive::FILES);
    let into = files.clone();
    blocking(move || {
        let gzip = flate2::write::GzEncoder::new(std::fs::File::create(&into)?, flate2::Compression::fast());
        tar::Builder::new(gzip).into_inner()?.finish().map(drop)
    })
    .await?;
    if images.is_empty() {
        return Ok(ExportedBuild { files, images: None });
    }
    let layout = scratch.join("oci");
    let blobs = layout.join("blobs").join("sha256");
    tokio::fs::create_dir_all(&blobs)
        .await
        .map_err(RuntimeError::io("making the image layout"))?;
    let mut index = Vec::new();
    for image in images {
        let reference = ImageRef::parse(image).map_err(failed)?;
        let registry = client(runtime, app, &reference.host).await?;
        let manifest = registry
            .manifest(&reference.repository, &reference.reference)
            .await
            .map_err(|e| failed(format!("the image {image} of build {id} is not in the registry: {e}")))?;
        let parsed: Value = serde_json::from_slice(&manifest.bytes).map_err(failed)?;
        if parsed.get("manifests").is_some() {
            return Err(failed(format!(
                "the image {image} is a multi-platform index: only single images are exported"
            )));
        }
        for digest in blob_digests(&parsed)? {
            let path = blob_path(&layout, &digest)?;
            if !path.exists() {
                registry
                    .blob_to_file(&reference.repository, &digest, &path)
                    .await
                    .map_err(|e| failed(format!("the image {image}: {e}")))?;
            }
        }
        tokio::fs::write(blob_path(&layout, &manifest.digest)?, &manifest.bytes)
            .await
            .map_err(RuntimeError::io("writing a manifest"))?;
        index.push(json!({
            "mediaType": media_type_of(&manifest, &parsed),
            "digest": manifest.digest,
            "size": manifest.bytes.len(),
            "annotations": { REF_NAME: image },
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index,
    });
    tokio::fs::write(layout.join("index.json"), index.to_string())
        .await
        .map_err(RuntimeError::io("writing the image index"))?;
    tokio::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .await
        .map_err(RuntimeError::io("writing the image layout"))?;
    let saved = scratch.join(crate::build_archive::IMAGES);
    let (from, into) = (layout.clone(), saved.clone());
    blocking(move || {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&into)?));
        tar.mode(tar::HeaderMode::Deterministic);
        tar.append_dir_all(".", &from)?;
        tar.into_inner()?.into_inner().map_err(std::io::Error::other).map(drop)
    })
    .await?;
    let _ = tokio::fs::remove_dir_all(&layout).await;
    Ok(ExportedBuild {
        files,
        images: Some(saved),
    })
}

/// Pushes the images of an imported build `id` of `app` into this rack's registry; the images
/// by service, as this rack names them.
pub async fn import(
    runtime: &KubeRuntime,
    app: &str,
    id: &str,
    images: Option<&Path>,
    images_by_service: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    if images_by_service.is_empty() {
        return Ok(BTreeMap::new());
    }
    let images = images.ok_or_else(|| failed("the build has images, and the archive has no images.tar"))?;
    let dir = images.with_file_name("images");
    let (from, into) = (images.to_owned(), dir.clone());
    blocking(move || unpack(&from, &into)).await?;
    let registry = &runtime.0.settings.config.registry;
    let mut named = BTreeMap::new();
    for (service, old) in images_by_service {
        let new = image_ref(registry, app, service, id);
        let target = ImageRef::parse(&new).map_err(failed)?;
        let (manifest, blobs) = if dir.join("index.json").is_file() {
            from_layout(&dir, old).await?
        } else if dir.join("manifest.json").is_file() {
            from_docker_archive(&dir, old).await?
        } else {
            return Err(failed("images.tar is neither an OCI image layout nor a docker archive"));
        };
        let client = client(runtime, app, &target.host).await?;
        for (digest, path) in &blobs {
            client
                .push_blob(&target.repository, digest, path)
                .await
                .map_err(|e| failed(format!("pushing {new}: {e}")))?;
        }
        client
            .put_manifest(&target.repository, &target.reference, &manifest)
            .await
            .map_err(|e| failed(format!("pushing {new}: {e}")))?;
        named.insert(service.clone(), new);
    }
    Ok(named)
}

/// The manifest of `old` in the OCI layout `dir`, and its blobs (each checked).
async fn from_layout(dir: &Path, old: &str) -> Result<(Manifest, Vec<(String, PathBuf)>), RuntimeError> {
    let index: Value = read_json(&dir.join("index.json")).await?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"][REF_NAME] == old)
        .ok_or_else(|| failed(format!("images.tar has no image {old}")))?;
    let digest = entry["digest"].as_str().unwrap_or_default().to_owned();
    let bytes = tokio::fs::read(blob_path(dir, &digest)?)
        .await
        .map_err(|e| failed(format!("images.tar: the manifest {digest}: {e}")))?;
    if digest_of(&bytes) != digest {
        return Err(failed(format!(
            "images.tar: the manifest {digest} does not hold its bytes"
        )));
    }
    let parsed: Value = serde_json::from_slice(&bytes).map_err(failed)?;
    let media_type = entry["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_owned();
    let mut blobs = Vec::new();
    for digest in blob_digests(&parsed)? {
        let path = blob_path(dir, &digest)?;
        check_digest(&path, &digest).await?;
        blobs.push((digest, path));
    }
    Ok((
        Manifest {
            media_type,
            bytes,
            digest,
        },
        blobs,
    ))
}

/// An OCI manifest of `old` in the docker archive `dir` (`podman save` of a local rack).
async fn from_docker_archive(dir: &Path, old: &str) -> Result<(Manifest, Vec<(String, PathBuf)>), RuntimeError> {
    let list: Value = read_json(&dir.join("manifest.json")).await?;
    let names = |tag: &str| {
        tag == old || tag.strip_prefix("localhost/") == Some(old) || old.strip_prefix("localhost/") == Some(tag)
    };
    let entry = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["RepoTags"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t.as_str().is_some_and(names))
        })
        .ok_or_else(|| failed(format!("images.tar has no image {old}")))?;
    let file = |v: &Value| -> Result<PathBuf, RuntimeError> {
        let name = v
            .as_str()
            .ok_or_else(|| failed("images.tar: manifest.json is malformed"))?;
        let path = dir.join(name);
        safe_name(name)
            .then_some(path)
            .ok_or_else(|| failed(format!("images.tar: {name:?}")))
    };
    let config = file(&entry["Config"])?;
    let (config_digest, config_size) = file_digest(&config).await?;
    let mut blobs = vec![(config_digest.clone(), config.clone())];
    let mut layers = Vec::new();
    for layer in entry["Layers"].as_array().into_iter().flatten() {
        let path = file(layer)?;
        let (digest, size) = file_digest(&path).await?;
        let mut magic = [0u8; 2];
        let gzip = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == [0x1f, 0x8b];
        let media_type = if gzip {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        layers.push(json!({ "mediaType": media_type, "digest": digest, "size": size }));
        blobs.push((digest, path));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": layers,
    });
    let bytes = manifest.to_string().into_bytes();
    let digest = digest_of(&bytes);
    Ok((
        Manifest {
            media_type: OCI_MANIFEST.to_owned(),
            bytes,
            digest,
        },
        blobs,
    ))
}

/// The blobs a single-image manifest refers to: its config, then its layers.
fn blob_digests(manifest: &Value) -> Result<Vec<String>, RuntimeError> {
    let mut digests = Vec::new();
    let config = manifest["config"]["digest"].as_str();
    let layers = manifest["layers"].as_array();
    let (Some(config), Some(layers)) = (config, layers) else {
        return Err(failed(
            "a manifest without a config or layers (schema 1 images are not carried)",
        ));
    };
    digests.push(config.to_owned());
    for layer in layers {
        digests.push(
            layer["digest"]
                .as_str()
                .ok_or_else(|| failed("a layer without a digest"))?
                .to_owned(),
        );
    }
    Ok(digests)
}

/// Where blob `digest` is in the layout `dir` (only sha256 digests, so never outside it).
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, RuntimeError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(dir.join("blobs").join("sha256").join(hex))
        }
        _ => Err(failed(format!("the digest {digest:?} is not a sha256 digest"))),
    }
}

/// The manifest's media type: as the registry said, else as the manifest says.
fn media_type_of(manifest: &Manifest, parsed: &Value) -> String {
    let said = manifest.media_type.split(';').next().unwrap_or_default().trim();
    if said.is_empty() || said == "application/json" {
        parsed["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_owned()
    } else {
        said.to_owned()
    }
}

async fn read_json(path: &Path) -> Result<Value, RuntimeError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| failed(format!("images.tar: {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| failed(format!("images.tar: {}: {e}", path.display())))
}

/// The digest and size of a file.
async fn file_digest(path: &Path) -> Result<(String, u64), RuntimeError> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = std::io::Read::read(&mut file, &mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        Ok::<_, std::io::Error>((format!("sha256:{}", crate::objects::hex(&hasher.finalize())), size))
    })
    .await
    .map_err(failed)?
    .map_err(|e| failed(format!("images.tar: {shown}: {e}")))
}

async fn check_digest(path: &Path, digest: &str) -> Result<(), RuntimeError> {
    let (got, _) = file_digest(path).await?;
    if got == digest {
        Ok(())
    } else {
        Err(failed(format!("images.tar: the blob {digest} does not hold its bytes")))
    }
}

/// A relative path of plain names (no `..`, no hidden or absolute parts).
fn safe_name(name: &str) -> bool {
    let name = name.trim_start_matches("./");
    !name.is_empty()
        && name.split('/').count() <= 4
        && name.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        })
}

/// Unpacks `images.tar` into `dir`: regular files of plain names only (directories made as
/// needed); anything else (links, devices, other paths) refuses the archive.
fn unpack(from: &Path, dir: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(from)?));
    std::fs::create_dir_all(dir)?;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let trimmed = path.trim_start_matches("./").trim_end_matches('/');
        if kind.is_dir() && (trimmed.is_empty() || trimmed == "." || safe_name(trimmed)) {
            continue;
        }
        if !kind.is_file() || !safe_name(trimmed) {
            return Err(std::io::Error::other(format!(
                "images.tar: the entry {path:?} is not one an image archive holds"
            )));
        }
        let target = dir.join(trimmed);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&target)?;
        std::io::copy(&mut entry, &mut out)?;
    }
    Ok(())
}

async fn blocking(work: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> Result<(), RuntimeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(failed)?
        .map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_auth_or_user_and_password() {
        let config = json!({ "auths": {
            "a.example": { "auth": "dXNlcjpwOnc=" },
            "b.example": { "username": "u", "password": "p" },
        } });
        assert_eq!(
            credentials_for(&config, "a.example"),
            Some(("user".into(), "p:w".into()))
        );
        assert_eq!(credentials_for(&config, "b.example"), Some(("u".into(), "p".into())));
        assert_eq!(credentials_for(&config, "c.example"), None);
    }

    /// A local rack's `podman save` (docker archive, podman's `localhost/` names) becomes an
    /// OCI manifest of its config and layers, pushed as they are.
    #[tokio::test]
    async fn a_docker_archive_of_a_local_rack_becomes_an_oci_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let (config, layer) = (b"{\"os\":\"linux\"}".to_vec(), vec![0u8; 1024]);
        std::fs::write(dir.path().join("c.json"), &config).unwrap();
        std::fs::write(dir.path().join("l.tar"), &layer).unwrap();
        let list = json!([{ "Config": "c.json", "RepoTags": ["localhost/rack/shop:web.BOLD"], "Layers": ["l.tar"] }]);
        std::fs::write(dir.path().join("manifest.json"), list.to_string()).unwrap();
        let (manifest, blobs) = from_docker_archive(dir.path(), "rack/shop:web.BOLD").await.unwrap();
        let parsed: Value = serde_json::from_slice(&manifest.bytes).unwrap();
        assert_eq!(manifest.digest, digest_of(&manifest.bytes));
        assert_eq!(parsed["config"]["digest"], digest_of(&config));
        assert_eq!(parsed["layers"][0]["digest"], digest_of(&layer));
        assert_eq!(
            parsed["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar"
        );
        assert_eq!(parsed["layers"][0]["size"], 1024);
        let digests: Vec<_> = blobs.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(digests, [digest_of(&config), digest_of(&layer)]);
        let err = from_docker_archive(dir.path(), "rack/shop:api.BOLD").await.unwrap_err();
        assert!(err.to_string().contains("no image rack/shop:api.BOLD"), "{err}");
        // A path out of the archive is refused.
        let list = json!([{ "Config": "../c.json", "RepoTags": ["rack/shop:web.BOLD"], "Layers": [] }]);
        std::fs::write(dir.path().join("manifest.json"), list.to_string()).unwrap();
        assert!(from_docker_archive(dir.path(), "rack/shop:web.BOLD").await.is_err());
    }

    #[test]
    fn only_plain_names_and_sha256_blobs_are_accepted() {
        assert!(safe_name("blobs/sha256/abc"));
        assert!(safe_name("./index.json"));
        assert!(!safe_name("../etc/passwd"));
        assert!(!safe_name("/etc/passwd"));
        assert!(!safe_name("a/../../b"));
        let dir = Path::new("/x");
        assert!(blob_path(dir, "sha256:../../etc").is_err());
        assert!(blob_path(dir, &format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
