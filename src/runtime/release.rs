//! A release as a runtime runs it: its build's images, its environment, its manifest and the
//! resources it links.

use super::RuntimeError;

/// A release to run.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    pub app: String,
    pub id: crate::ids::ReleaseId,
    pub build_id: crate::ids::BuildId,
    /// The images its build made, by service (for the services that run them).
    pub images: std::collections::BTreeMap<String, String>,
    pub env: crate::env::Env,
    pub manifest: crate::manifest::Manifest,
    /// The resources the manifest declares, with their credentials, by name.
    pub resources: std::collections::BTreeMap<String, crate::resource::ResourceSpec>,
    /// The rack-wide resources linked to the app, with their credentials, by name: a service
    /// that names one in its `resources:` (and the app declares none of that name) gets its
    /// variables. The runtime does not create them (`POST /resources` did).
    pub rack_linked: std::collections::BTreeMap<String, crate::resource::ResourceSpec>,
    /// Whether the rollout is judged by its traffic (each service's `deployment.analysis`):
    /// true only for a deployment rolling its own release out, never for a rollback or a
    /// restore after a restart (they bring back what ran).
    pub analyse: bool,
}

impl ReleaseSpec {
    /// The environment of one service's processes: the manifest's defaults (app-wide, then the
    /// service's), overridden by the release's variables.
    ///
    /// # Errors
    /// When the manifest requires a variable the release does not set.
    pub fn service_env(&self, name: &str, service: &crate::manifest::Service) -> Result<crate::env::Env, RuntimeError> {
        let mut env = crate::env::Env::new();
        for entry in self.manifest.environment.iter().chain(&service.environment) {
            match entry.split_once('=') {
                Some((key, default)) => {
                    env.insert(key.to_owned(), default.to_owned());
                }
                None if !self.env.contains_key(entry) => {
                    return Err(RuntimeError::Failed(format!(
                        "service {name} needs the environment variable {entry}: set it with `env set {entry}=...`"
                    )));
                }
                None => {}
            }
        }
        env.extend(self.env.clone());
        Ok(env)
    }
}
