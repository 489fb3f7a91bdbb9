//! A postgres resource's dump on Kubernetes, taken by the `pg_dump` of the resource's own image
//! in its pod (`exec`), so that its version is always the server's: a `pg_dump` older than its
//! server refuses to dump it, and the rack host's (Debian 12: 15) is older than the default
//! image's (16). It connects over the pod's unix socket, where the postgres images trust local
//! connections, so no password travels (an exec's command line reaches the API server's audit
//! log). Other kinds are dumped by the rack host's tools through a port-forward.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::AttachParams;
use tokio::io::AsyncReadExt;

use super::KubeRuntime;
use super::databases::{CONTAINER, owner_app};
use crate::resource::{Credentials, Kind};
use crate::runtime::{ByteStream, RuntimeError};

/// Most of pg_dump's error output kept for the message.
const STDERR_CAP: usize = 16 * 1024;

/// The dump of postgres (or postgis) resource `name` of `owner`, streamed from its pod; `None`
/// for other kinds.
///
/// # Errors
/// When its pod is not running, or the dump fails before its first byte.
pub async fn dump(
    runtime: &KubeRuntime,
    owner: &str,
    name: &str,
    kind: Kind,
    credentials: &Credentials,
) -> Result<Option<ByteStream>, RuntimeError> {
    if !matches!(kind, Kind::Postgres | Kind::Postgis) {
        return Ok(None);
    }
    let app = owner_app(owner);
    let pods: Api<Pod> = runtime.api(app);
    let pod = super::database_rollout::running_pod(&pods, owner, name).await?;
    let params = AttachParams::default()
        .container(CONTAINER)
        .stdin(false)
        .stdout(true)
        .stderr(true);
    let mut attached = pods
        .exec(&pod, command(kind, credentials), &params)
        .await
        .map_err(RuntimeError::kube(format!("running pg_dump in pod {pod}")))?;
    let stdout = attached
        .stdout()
        .ok_or_else(|| RuntimeError::Failed(format!("pg_dump in pod {pod} gave no output stream")))?;
    let stderr = attached.stderr().map(|mut reader| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let _ = (&mut reader).take(STDERR_CAP as u64).read_to_end(&mut kept).await;
            // The rest is drained, so pg_dump never blocks on a full pipe.
            let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
            String::from_utf8_lossy(&kept).trim().to_owned()
        })
    });
    let status = attached.take_status();
    let finished = async move {
        let status = match status {
            Some(status) => status.await,
            None => None,
        };
        let stderr = match stderr {
            Some(task) => task.await.unwrap_or_default(),
            None => String::new(),
        };
        // The connection (and the exec with it) lives until the dump has ended.
        drop(attached);
        match status.map(|s| super::process::status_code(&s)) {
            Some(0) => Ok(()),
            Some(code) => Err(format!("pg_dump in pod {pod} failed (exit {code}): {stderr}")),
            None => Err(format!("pg_dump in pod {pod} ended without an exit status: {stderr}")),
        }
    };
    crate::resource_data::checked(stdout, finished)
        .await
        .map(Some)
        .map_err(RuntimeError::Failed)
}

/// `pg_dump` as the host's dump runs it (plain SQL that drops what it creates first, no owners
/// or privileges), over the pod's socket as the resource's user.
fn command(kind: Kind, credentials: &Credentials) -> Vec<String> {
    let mut command: Vec<String> = [
        "pg_dump",
        "--host=/var/run/postgresql",
        "--no-owner",
        "--no-privileges",
        "--clean",
        "--if-exists",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    command.push(format!("--username={}", credentials.user));
    command.push(format!("--dbname={}", credentials.database));
    if kind == Kind::Postgis {
        // Only plpgsql (built in, never dumped itself): the extension belongs to the
        // superuser, as with the host's dump.
        command.extend(["--extension".to_owned(), "plpgsql".to_owned()]);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dump_runs_over_the_socket_without_a_password() {
        let credentials = Credentials {
            user: "app".into(),
            password: "secret-password".into(),
            database: "app".into(),
        };
        let postgres = command(Kind::Postgres, &credentials);
        assert_eq!(postgres[0], "pg_dump");
        assert!(postgres.contains(&"--host=/var/run/postgresql".to_owned()));
        assert!(postgres.contains(&"--username=app".to_owned()));
        assert!(postgres.contains(&"--dbname=app".to_owned()));
        assert!(!postgres.iter().any(|a| a.contains("secret-password")));
        assert!(!postgres.contains(&"plpgsql".to_owned()));
        assert!(command(Kind::Postgis, &credentials).ends_with(&["--extension".to_owned(), "plpgsql".to_owned()]));
    }
}
