//! A resource's data, in and out, through the address its runtime gives rack (the local
//! server's port, or a port-forward): `pg_dump` as plain SQL and `psql` to load it back;
//! `mysqldump --single-transaction` and the `mysql` client (mysql, mariadb); `redis-cli --rdb`
//! for an RDB snapshot. A memcached resource is a cache: it has nothing to export. The
//! password reaches the tools through their environment (`PGPASSWORD`, `MYSQL_PWD`,
//! `REDISCLI_AUTH`), never their command line.

use std::net::SocketAddr;
use std::process::Stdio;

use axum::body::Body;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::resource::{Credentials, Kind};
use crate::runtime::ResourceEndpoint;

/// Why moving a resource's data failed; the API maps it to a status once (`error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The upload could not be read (the client's side: 400).
    #[error("{0}")]
    Upload(String),
    /// The data or the request is not something the resource takes (422).
    #[error("{0}")]
    Refused(String),
    /// Rack's side failed: a tool, a file, a server (500).
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// The upload is larger than the limit (413), in bytes.
    #[error("the upload is larger than the limit of {0} bytes (RACK_MAX_UPLOAD_BYTES)")]
    TooLarge(u64),
}

fn tool(name: &str, credentials: &Credentials) -> Command {
    let mut cmd = Command::new(name);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C")
        .env("PGPASSWORD", &credentials.password)
        .env("REDISCLI_AUTH", &credentials.password)
        .env("MYSQL_PWD", &credentials.password)
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

/// The arguments of the `mysql` client and `mysqldump`: this address over TCP, as the app's
/// user, none of the host's option files (`/etc/mysql` names another server's socket).
fn mysql_args(addr: SocketAddr, credentials: &Credentials) -> Vec<String> {
    vec![
        "--no-defaults".into(),
        "--protocol=tcp".into(),
        "-h".into(),
        addr.ip().to_string(),
        "-P".into(),
        addr.port().to_string(),
        "-u".into(),
        credentials.user.clone(),
    ]
}

/// A cache has no data worth moving.
fn memcached_refused(what: &str) -> DataError {
    DataError::Refused(format!(
        "{what} of memcached resources is not supported: a memcached resource is a cache, with \
         nothing to export or import (its data lives only in memory and may be evicted at any time)"
    ))
}

fn failed(what: &str, stderr: &[u8]) -> DataError {
    DataError::Failed(anyhow::anyhow!(
        "{what} failed: {}",
        String::from_utf8_lossy(stderr).trim()
    ))
}

/// The resource's data as a stream: a plain-SQL dump (postgres) or an RDB file (redis).
pub async fn export(kind: Kind, credentials: &Credentials, endpoint: ResourceEndpoint) -> Result<Body, DataError> {
    let addr = endpoint.addr;
    match kind {
        Kind::Postgres | Kind::Postgis => {
            let mut cmd = tool("pg_dump", credentials);
            cmd.args(pg_args(addr, credentials))
                .args(["--no-owner", "--no-privileges", "--clean", "--if-exists"]);
            if kind == Kind::Postgis {
                // The extension belongs to the cluster's superuser: the app's user could neither
                // drop nor create it on import, and its tables are the extension's. Naming only
                // plpgsql, which is built in (so never dumped itself), leaves every extension
                // out; a pattern matching none makes pg_dump fail ("no matching extensions"),
                // and --exclude-extension needs pg_dump 17.
                cmd.args(["--extension", "plpgsql"]);
            }
            streamed(cmd, "pg_dump", endpoint.guard).await
        }
        Kind::Mysql | Kind::Mariadb => {
            let mut cmd = tool("mysqldump", credentials);
            cmd.args(mysql_args(addr, credentials))
                .args(["--single-transaction", "--no-tablespaces", "--routines", "--triggers"])
                .arg(&credentials.database);
            streamed(cmd, "mysqldump", endpoint.guard).await
        }
        Kind::Redis => {
            let dir = tempfile::tempdir().map_err(|e| DataError::Failed(e.into()))?;
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
                .map_err(|e| DataError::Failed(anyhow::Error::new(e).context("running redis-cli")))?;
            drop(endpoint);
            if !out.status.success() {
                return Err(failed("redis-cli --rdb", &out.stderr));
            }
            // Streamed from the file (an RDB may be large), which lives as long as the stream.
            let data = tokio::fs::File::open(&file)
                .await
                .map_err(|e| DataError::Failed(e.into()))?;
            let chunks = tokio_util::io::ReaderStream::new(data).map(move |chunk| {
                let _ = &dir;
                chunk
            });
            Ok(Body::from_stream(chunks))
        }
        Kind::Memcached => Err(memcached_refused("export")),
    }
}

/// The standard output of the dump `cmd` as a stream (see [`checked`]); the runtime's `guard`
/// (a port-forward) lives as long as it.
async fn streamed<G: Send + 'static>(mut cmd: Command, what: &str, guard: G) -> Result<Body, DataError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| DataError::Failed(anyhow::Error::new(e).context(format!("starting {what}"))))?;
    let stdout = child.stdout.take().expect("piped");
    let what = what.to_owned();
    let finished = async move {
        let out = child.wait_with_output().await;
        drop(guard);
        match out {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("{what}: {e}")),
        }
    };
    let stream = checked(stdout, finished)
        .await
        .map_err(|e| DataError::Failed(anyhow::anyhow!(e)))?;
    Ok(Body::from_stream(stream))
}

/// The dump a program writes to `output`, as a stream, with `finished` saying whether it
/// succeeded. The first chunk (or the end) says whether the dump started: a failure to connect
/// is an error, not an empty dump; a dump that fails half-way ends the stream with an error,
/// not a clean end (a backup must not keep a truncated dump as if it were whole).
///
/// # Errors
/// When the program ended without output and failed (its message).
pub async fn checked<R, F>(output: R, finished: F) -> Result<crate::runtime::ByteStream, String>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut chunks = tokio_util::io::ReaderStream::new(output);
    let Some(first) = chunks.next().await else {
        finished.await?;
        return Ok(futures_util::stream::empty().boxed());
    };
    let end = futures_util::stream::once(async move { finished.await.err().map(|e| Err(std::io::Error::other(e))) })
        .filter_map(futures_util::future::ready);
    Ok(futures_util::stream::iter([first]).chain(chunks).chain(end).boxed())
}

/// The export of resource `name` of `app`: dumped next to its server where the runtime does
/// that ([`crate::runtime::Runtime::dump_resource`]), else by this host's tools through the
/// address the runtime gives.
///
/// # Errors
/// As [`export`]; a runtime's own dump failing is [`DataError::Failed`].
pub async fn export_resource(
    runtime: &dyn crate::runtime::Runtime,
    app: &str,
    name: &str,
    kind: Kind,
    credentials: &Credentials,
) -> Result<Body, DataError> {
    let dumped = runtime
        .dump_resource(app, name, kind, credentials)
        .await
        .map_err(|e| DataError::Failed(anyhow::anyhow!("dumping resource {name}: {e}")))?;
    if let Some(stream) = dumped {
        return Ok(Body::from_stream(stream));
    }
    let endpoint = runtime
        .resource_endpoint(app, name)
        .await
        .map_err(|e| DataError::Failed(anyhow::anyhow!("reaching resource {name}: {e}")))?;
    export(kind, credentials, endpoint).await
}

/// Writes the upload `body` to a new file in `dir` and checks that it is an RDB file (what
/// [`export`] gives for redis): the magic `REDIS`, a four-digit version, and the end-of-file
/// opcode (0xFF) before the 8-byte checksum, so a truncated upload is refused too. Anything
/// else is refused (422) before the resource is touched. At most `limit` bytes are kept: the
/// file is on rack's disk.
///
/// # Errors
/// 422 when the upload is not an RDB file; 400 when it cannot be read; 413 past `limit`.
pub async fn spool_rdb(dir: &std::path::Path, body: Body, limit: u64) -> Result<tempfile::NamedTempFile, DataError> {
    let file = tempfile::Builder::new()
        .prefix(".import-")
        .tempfile_in(dir)
        .map_err(|e| DataError::Failed(e.into()))?;
    let mut out = tokio::fs::File::create(file.path())
        .await
        .map_err(|e| DataError::Failed(e.into()))?;
    let mut head = Vec::with_capacity(9);
    let mut tail = Vec::with_capacity(9);
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| DataError::Upload(format!("reading the upload: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(DataError::TooLarge(limit));
        }
        if head.len() < 9 {
            let take = (9 - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() == 9 && !is_rdb_header(&head) {
                return Err(not_rdb(NO_HEADER));
            }
        }
        tail.extend_from_slice(&chunk);
        let excess = tail.len().saturating_sub(9);
        tail.drain(..excess);
        out.write_all(&chunk).await.map_err(|e| DataError::Failed(e.into()))?;
    }
    out.flush().await.map_err(|e| DataError::Failed(e.into()))?;
    if head.len() < 9 || !is_rdb_header(&head) {
        return Err(not_rdb(NO_HEADER));
    }
    // The header itself is 9 bytes: a whole file has at least the EOF opcode and checksum more.
    let length = out.metadata().await.map_err(|e| DataError::Failed(e.into()))?.len();
    if length < 18 || tail.first() != Some(&0xFF) {
        return Err(not_rdb(
            "it does not end with the RDB end-of-file marker (a truncated file?)",
        ));
    }
    Ok(file)
}

const NO_HEADER: &str = "it does not start with an RDB header (`REDIS` and a four-digit version)";

/// `REDIS` and four ASCII digits.
fn is_rdb_header(head: &[u8]) -> bool {
    head.len() == 9 && head.starts_with(b"REDIS") && head[5..].iter().all(u8::is_ascii_digit)
}

fn not_rdb(why: &str) -> DataError {
    DataError::Refused(format!(
        "the upload is not an RDB file: {why}; a redis resource imports what its export gives (`redis-cli --rdb`); nothing was changed"
    ))
}

/// Loads `body` (what [`export`] gave) into the resource: SQL run by `psql` or the `mysql`
/// client as the app's user, stopping at the first error. Redis data cannot be loaded into a
/// running server through its protocol: the runtime restarts it on the RDB file instead
/// (`api::resources::import_resource`, with [`spool_rdb`]).
pub async fn import(
    kind: Kind,
    credentials: &Credentials,
    endpoint: ResourceEndpoint,
    body: Body,
) -> Result<(), DataError> {
    let mut cmd = match kind {
        Kind::Postgres | Kind::Postgis => {
            let mut cmd = tool("psql", credentials);
            cmd.args(pg_args(endpoint.addr, credentials))
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]);
            cmd
        }
        Kind::Mysql | Kind::Mariadb => {
            // Batch mode stops at the first error.
            let mut cmd = tool("mysql", credentials);
            cmd.args(mysql_args(endpoint.addr, credentials))
                .arg("--batch")
                .arg(&credentials.database);
            cmd
        }
        Kind::Memcached => return Err(memcached_refused("import")),
        Kind::Redis => {
            return Err(DataError::Failed(anyhow::anyhow!(
                "a redis import is the runtime's (restore_redis)"
            )));
        }
    };
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| DataError::Failed(anyhow::Error::new(e).context("starting the import's client")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stream = body.into_data_stream();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| DataError::Upload(format!("reading the upload: {e}")))?;
        if stdin.write_all(&chunk).await.is_err() {
            // The client stopped (an error in the SQL): its message says why.
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
        .map_err(|e| DataError::Failed(e.into()))?;
    drop(endpoint);
    if !out.status.success() {
        return Err(DataError::Refused(format!(
            "the import stopped at an error: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The resource's console on a terminal of `rows` × `cols`: `psql` (postgres, postgis), the
/// `mysql` client (mysql, mariadb) or `redis-cli` (redis), connected as the app's user.
/// Dropping the session kills it.
///
/// # Errors
/// When the kind has no console here, or the client cannot start.
pub fn console(
    kind: Kind,
    credentials: &Credentials,
    addr: SocketAddr,
    (rows, cols): (u16, u16),
) -> Result<crate::runtime::ExecSession, DataError> {
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
        Kind::Mysql | Kind::Mariadb => {
            cmd.arg("mysql")
                .args(mysql_args(addr, credentials))
                .arg(&credentials.database);
        }
        Kind::Memcached => {
            return Err(DataError::Refused(
                "the console of memcached resources is not supported: memcached has no client \
                 console; it is for postgres, postgis, mysql, mariadb and redis (use `rack resources \
                 proxy` and a memcached client)"
                    .to_owned(),
            ));
        }
    }
    let request = crate::runtime::ExecRequest {
        command: Vec::new(),
        tty: Some((rows, cols)),
        stdin: true,
    };
    crate::runtime::local::exec::spawn(cmd, &request)
        .map_err(|e| DataError::Failed(anyhow::Error::new(e).context("starting the console")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RDB file's shape: header, a byte of data, the end-of-file opcode and a checksum.
    fn rdb() -> Vec<u8> {
        let mut rdb = b"REDIS0011".to_vec();
        rdb.push(0xFE);
        rdb.push(0xFF);
        rdb.extend_from_slice(&[0; 8]);
        rdb
    }

    #[tokio::test]
    async fn an_rdb_upload_is_spooled_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = spool_rdb(dir.path(), Body::from(rdb()), 19).await.unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), rdb());
        let refused = spool_rdb(dir.path(), Body::from(rdb()), 18).await.unwrap_err();
        assert!(matches!(refused, DataError::TooLarge(18)), "{refused}");
        let refused = spool_rdb(dir.path(), Body::from(b"SET a b".to_vec()), 100)
            .await
            .unwrap_err();
        assert!(matches!(refused, DataError::Refused(_)), "{refused}");
    }
}
