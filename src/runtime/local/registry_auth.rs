//! Private registries for podman: the credentials of `convox registries add` written as an auth
//! file (docker's `config.json` shape, `{"auths": {server: {"auth": base64(user:pass)}}}`),
//! mode 0600, for one podman call (`--authfile`) and removed when it ends; and whether that call
//! may reach its registries without TLS verification: only when every one of them is on this
//! host's loopback (`localhost`, 127.0.0.0/8, `::1`), where no one sits between rack and the
//! registry, as Docker treats them by default. Any other registry is reached over verified TLS.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::runtime::{Registries, RegistryCredential, docker_config_json};

/// An auth file on disk for as long as this lives.
#[derive(Debug)]
pub struct AuthFile {
    path: PathBuf,
    /// The private directory it is in, when it was made for it.
    _dir: Option<tempfile::TempDir>,
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AuthFile {
    /// Writes `credentials` to `path` (a new file, mode 0600).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(path: PathBuf, credentials: &[RegistryCredential]) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let written = file.write_all(docker_config_json(credentials).as_bytes());
        let file = Self { path, _dir: None };
        written.map(|()| file)
    }

    /// Writes `credentials` into a new private directory in `parent`.
    ///
    /// # Errors
    /// When the directory or the file cannot be made.
    pub fn write_in(parent: &Path, credentials: &[RegistryCredential]) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("auth-").tempdir_in(parent)?;
        let mut file = Self::write(dir.path().join("auth.json"), credentials)?;
        file._dir = Some(dir);
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The registries' credentials for one call: none when there are none (or no capability);
/// when they cannot be read, none, and `Err` says why (the call goes on: an image that needs
/// them then fails with the registry's own refusal).
pub async fn credentials(registries: Option<&dyn Registries>) -> Result<Vec<RegistryCredential>, String> {
    match registries {
        None => Ok(Vec::new()),
        Some(registries) => registries
            .credentials()
            .await
            .map_err(|e| format!("could not read the private registries: {e}")),
    }
}

/// The registry host of an image reference, as podman resolves it: the first component when it
/// looks like a host (a `.` or `:` in it, or `localhost`), else Docker Hub.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Whether `host` (with or without a port) is this host's loopback.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inside, _)| inside)
    } else if host.matches(':').count() == 1 {
        host.split_once(':').map_or(host, |(name, _)| name)
    } else {
        host
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// podman's arguments for a call that reaches the registries of `images`: the auth file, and
/// `--tls-verify=false` only when every one of them is on the loopback (an image whose name
/// is known only at build time, `$` in it, counts as elsewhere).
pub fn podman_args(auth: Option<&AuthFile>, images: &[String]) -> Vec<OsString> {
    let mut args = Vec::new();
    if let Some(auth) = auth {
        args.push("--authfile".into());
        args.push(auth.path().as_os_str().to_owned());
    }
    let all_loopback = !images.is_empty()
        && images
            .iter()
            .all(|image| !image.contains('$') && is_loopback(registry_host(image)));
    if all_loopback {
        args.push("--tls-verify=false".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(server: &str) -> RegistryCredential {
        RegistryCredential {
            server: server.to_owned(),
            username: "user".to_owned(),
            password: "p:ss".to_owned(),
        }
    }

    #[test]
    fn the_auth_file_is_dockers_shape_for_its_owner_only_and_goes_with_its_guard() {
        let dir = tempfile::tempdir().unwrap();
        let file = AuthFile::write_in(dir.path(), &[credential("127.0.0.1:5000")]).unwrap();
        let path = file.path().to_owned();
        let text: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // base64("user:p:ss")
        assert_eq!(text["auths"]["127.0.0.1:5000"]["auth"], "dXNlcjpwOnNz");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        drop(file);
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "its directory goes too"
        );
    }

    #[test]
    fn tls_verification_is_off_only_when_every_registry_is_on_the_loopback() {
        let off = |images: &[&str]| {
            let images: Vec<String> = images.iter().map(|i| (*i).to_owned()).collect();
            podman_args(None, &images).iter().any(|a| a == "--tls-verify=false")
        };
        assert!(off(&["127.0.0.1:5000/base:1"]));
        assert!(off(&["localhost/base", "127.8.0.1/x", "[::1]:5000/y"]));
        assert!(!off(&["127.0.0.1:5000/base", "debian"]));
        assert!(!off(&["registry.example.com/base"]));
        assert!(!off(&["127.0.0.1.example.com:5000/base"]));
        assert!(!off(&["$BASE"]));
        assert!(!off(&[]));
        assert_eq!(registry_host("busybox"), "docker.io");
        assert_eq!(registry_host("library/busybox"), "docker.io");
        assert_eq!(registry_host("ghcr.io/a/b"), "ghcr.io");
    }
}
