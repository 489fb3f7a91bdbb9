//! A resource's data, in and out, through the address its runtime gives rack (the local
//! server's port, or a port-forward): `pg_dump` as plain SQL and `psql` to load it back;
//! `redis-cli --rdb` for an RDB snapshot. The password reaches the tools through their
//! environment (`PGPASSWORD`, `REDISCLI_AUTH`), never their command line.

use std::net::SocketAddr;
use std::process::Stdio;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::{ApiError, ApiResult};
use crate::resource::{Credentials, Kind};
use crate::runtime::ResourceEndpoint;

fn tool(name: &str, credentials: &Credentials) -> Command {
    let mut cmd = Command::new(name);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("PGPASSWORD", &credentials.password)
        .env("REDISCLI_AUTH", &credentials.password)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn pg_args(addr: SocketAddr, credentials: &Credentials) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "-U".into(),
        credentials.user.clone(),
        "-d".into(),
        credentials.database.clone(),
    ]
}

fn unsupported(kind: Kind) -> ApiError {
    ApiError::Unprocessable(format!(
        "export and import of {kind} resources are not supported: they are for postgres, postgis and redis"
    ))
}

fn failed(what: &str, stderr: &[u8]) -> ApiError {
    ApiError::Internal(anyhow::anyhow!(
        "{what} failed: {}",
        String::from_utf8_lossy(stderr).trim()
    ))
}

/// The resource's data as a stream: a plain-SQL dump (postgres) or an RDB file (redis).
pub async fn export(kind: Kind, credentials: &Credentials, endpoint: ResourceEndpoint) -> ApiResult<Body> {
    let addr = endpoint.addr;
    match kind {
        Kind::Postgres | Kind::Postgis => {
            let mut cmd = tool("pg_dump", credentials);
            cmd.args(pg_args(addr, credentials))
                .args(["--no-owner", "--no-privileges", "--clean", "--if-exists"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("starting pg_dump")))?;
            let stdout = child.stdout.take().expect("piped");
            let mut chunks = tokio_util::io::ReaderStream::new(stdout);
            // The first chunk (or the end) says whether the dump started: a failure to connect
            // is an error, not an empty 200.
            let first = chunks.next().await;
            if first.is_none() {
                let out = child
                    .wait_with_output()
                    .await
                    .map_err(|e| ApiError::Internal(e.into()))?;
                if !out.status.success() {
                    return Err(failed("pg_dump", &out.stderr));
                }
                return Ok(Body::empty());
            }
            // The child and the runtime's guard (a port-forward) live as long as the stream.
            let keep = (child, endpoint.guard);
            let rest = chunks.map(move |chunk| {
                let _ = &keep;
                chunk
            });
            Ok(Body::from_stream(futures_util::stream::iter(first).chain(rest)))
        }
        Kind::Redis => {
            let dir = tempfile::tempdir().map_err(|e| ApiError::Internal(e.into()))?;
            let file = dir.path().join("dump.rdb");
            let mut cmd = tool("redis-cli", credentials);
            cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["--user", &credentials.user, "--rdb"])
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let out = cmd
                .output()
                .await
                .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("running redis-cli")))?;
            drop(endpoint);
            if !out.status.success() {
                return Err(failed("redis-cli --rdb", &out.stderr));
            }
            let data = tokio::fs::read(&file).await.map_err(|e| ApiError::Internal(e.into()))?;
            Ok(Body::from(Bytes::from(data)))
        }
        other => Err(unsupported(other)),
    }
}

/// Loads `body` (what [`export`] gave) into the resource: SQL run by `psql` as the app's
/// user, stopping at the first error. Redis data cannot be loaded into a running server
/// through its protocol, so a redis import is refused.
pub async fn import(kind: Kind, credentials: &Credentials, endpoint: ResourceEndpoint, body: Body) -> ApiResult<()> {
    if !matches!(kind, Kind::Postgres | Kind::Postgis) {
        return Err(ApiError::Unprocessable(format!(
            "import into {kind} resources is not supported: it is for postgres and postgis (a plain-SQL dump)"
        )));
    }
    let mut cmd = tool("psql", credentials);
    cmd.args(pg_args(endpoint.addr, credentials))
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("starting psql")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stream = body.into_data_stream();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        if stdin.write_all(&chunk).await.is_err() {
            // psql stopped (an error in the SQL): its message says why.
            broken = true;
            break;
        }
    }
    if !broken {
        let _ = stdin.shutdown().await;
    }
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    drop(endpoint);
    if !out.status.success() {
        return Err(ApiError::Unprocessable(format!(
            "the import stopped at an error: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The resource's console on a terminal of `rows` × `cols`: `psql` (postgres, postgis) or
/// `redis-cli` (redis), connected as the app's user. Dropping the session kills it.
///
/// # Errors
/// When the kind has no console here, or the client cannot start.
pub fn console(
    kind: Kind,
    credentials: &Credentials,
    addr: SocketAddr,
    (rows, cols): (u16, u16),
) -> ApiResult<crate::runtime::ExecSession> {
    // `setsid --ctty`: the client's own session, the terminal its controlling one.
    let mut cmd = tool("setsid", credentials);
    cmd.arg("--ctty").env("TERM", "xterm");
    match kind {
        Kind::Postgres | Kind::Postgis => {
            cmd.arg("psql").args(pg_args(addr, credentials));
        }
        Kind::Redis => {
            cmd.args([
                "redis-cli",
                "-h",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
            ])
            .args(["--user", &credentials.user]);
        }
        other => {
            return Err(ApiError::Unprocessable(format!(
                "the console of {other} resources is not supported: it is for postgres, postgis and redis"
            )));
        }
    }
    let request = crate::runtime::ExecRequest {
        command: Vec::new(),
        tty: Some((rows, cols)),
        stdin: true,
    };
    crate::runtime::local::exec::spawn(cmd, &request)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("starting the console")))
}
