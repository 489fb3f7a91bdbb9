//! A redis import on Kubernetes (`PUT /apps/{app}/resources/{name}/data`): the uploaded RDB
//! file goes into the resource's pod through `exec`, becomes the file redis loads, and the
//! server restarts on it (the kubelet restarts the container in place, same pod, same volume).
//!
//! The protocol, and why:
//! - **Length-delimited stdin.** API servers before 1.29 cannot half-close an exec's stdin (a
//!   client that ends its stdin loses the whole connection, output and exit code included), so
//!   `cat > file` would never end. The upload is spooled first (its size is known), and the
//!   script reads exactly that many bytes (`head -c N`), checks the count, and goes on while
//!   rack's side of stdin stays open.
//! - **The AOF, not `dump.rdb`.** The StatefulSet runs redis with `--appendonly yes`, and redis
//!   ignores `dump.rdb` when its AOF is on. The script turns the AOF off on the running server
//!   (so nothing writes the AOF files any more), moves them aside (`*.before-import`), puts the
//!   RDB where the AOF was (`appendonly.aof`: redis 7 adopts a lone `appendonly.aof` as the
//!   base of a new AOF directory, redis 6 reads it directly, and both load an AOF that starts
//!   with `REDIS` as an RDB preamble), and shuts redis down without saving.
//! - **Checked before anything moves.** `redis-check-rdb` (in every redis image) reads the
//!   file first: one redis cannot load (a newer RDB version, a bad checksum) is refused with
//!   the old data untouched and the server never stopped. Its key counts are what the
//!   restarted server must hold (`INFO keyspace`), which rack checks before it answers.
//! - **No password on a command line.** `redis-cli` reads it from `REDISCLI_AUTH`, which the
//!   container's environment has (from the resource's Secret), as the readiness probe does.
//!
//! On a failure after the restart (the counts differ) the old files are moved back and redis
//! restarted on them again; on success they are removed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::AttachParams;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::KubeRuntime;
use super::databases::{CONTAINER, pod_name};
use super::watch::{Watch, by_name};
use crate::runtime::RuntimeError;

/// Where the redis StatefulSet keeps its data (`--dir`).
const DATA_DIR: &str = "/data";

/// How long one exec may take once its input is sent (`redis-check-rdb` reads the whole file).
const EXEC_LIMIT: Duration = Duration::from_secs(600);

/// How long redis may take to come back: the kubelet may hold a restart back (up to five
/// minutes when the container restarted often lately).
const RESTART_LIMIT: Duration = Duration::from_secs(420);

/// What an exec's output is kept of, per stream.
const OUTPUT_CAP: usize = 64 * 1024;

/// Receives `$1` bytes on stdin into `$2/import.rdb.tmp`, checks it, swaps it in as the AOF and
/// stops redis (see the module's header). Exit codes: 10 the directory, 11 a short upload, 12
/// an RDB redis cannot load, 13 redis refused to turn its AOF off, 14 moving files, 15 redis
/// did not stop (everything put back).
const LOAD_SCRIPT: &str = r#"
cd "$2" || exit 10
rm -f import.rdb.tmp
head -c "$1" > import.rdb.tmp
got=$(wc -c < import.rdb.tmp)
if [ "$got" -ne "$1" ]; then rm -f import.rdb.tmp; echo "received $got of $1 bytes" >&2; exit 11; fi
if command -v redis-check-rdb >/dev/null 2>&1; then
  if ! report=$(redis-check-rdb import.rdb.tmp 2>&1); then
    rm -f import.rdb.tmp
    echo "$report" | grep -v -e 'AUX FIELD' -e 'Checking RDB file' -e '^\[info\]' | head -n 20 >&2
    echo "redis-check-rdb refused the file" >&2
    exit 12
  fi
  echo "$report" | grep '^\[info\]'
fi
off=$(redis-cli -h 127.0.0.1 CONFIG SET appendonly no 2>&1)
if [ "$off" != OK ]; then rm -f import.rdb.tmp; echo "turning the AOF off: $off" >&2; exit 13; fi
back() {
  rm -f appendonly.aof
  [ -e appendonlydir.before-import ] && mv appendonlydir.before-import appendonlydir
  [ -e appendonly.aof.before-import ] && mv appendonly.aof.before-import appendonly.aof
  rm -f import.rdb.tmp
  redis-cli -h 127.0.0.1 CONFIG SET appendonly yes >/dev/null 2>&1
}
rm -rf appendonlydir.before-import appendonly.aof.before-import
{ [ ! -e appendonlydir ] || mv appendonlydir appendonlydir.before-import; } &&
  { [ ! -e appendonly.aof ] || mv appendonly.aof appendonly.aof.before-import; } &&
  mv import.rdb.tmp appendonly.aof || { back; echo "moving the files failed" >&2; exit 14; }
echo "rack-import: restarting"
redis-cli -h 127.0.0.1 SHUTDOWN NOSAVE >/dev/null 2>&1
if redis-cli -h 127.0.0.1 PING 2>/dev/null | grep -q PONG; then
  back
  echo "redis did not stop (SHUTDOWN refused?)" >&2
  exit 15
fi
exit 0
"#;

/// Puts the files an import moved aside back (its data replaced what the import loaded) and
/// stops redis, which restarts on them.
const REVERT_SCRIPT: &str = r#"
cd "$1" || exit 10
[ -e appendonlydir.before-import ] || [ -e appendonly.aof.before-import ] || { echo "nothing to put back" >&2; exit 16; }
off=$(redis-cli -h 127.0.0.1 CONFIG SET appendonly no 2>&1)
[ "$off" = OK ] || { echo "turning the AOF off: $off" >&2; exit 13; }
rm -rf appendonlydir appendonly.aof
[ ! -e appendonlydir.before-import ] || mv appendonlydir.before-import appendonlydir
[ ! -e appendonly.aof.before-import ] || mv appendonly.aof.before-import appendonly.aof
echo "rack-import: restarting"
redis-cli -h 127.0.0.1 SHUTDOWN NOSAVE >/dev/null 2>&1
exit 0
"#;

/// The command of the load: `sh -c LOAD_SCRIPT` with the byte count and the directory as its
/// arguments (nothing secret: the password stays in the container's environment).
pub fn load_command(length: u64, dir: &str) -> Vec<String> {
    ["sh", "-c", LOAD_SCRIPT, "rack-import", &length.to_string(), dir]
        .map(str::to_owned)
        .to_vec()
}

fn revert_command(dir: &str) -> Vec<String> {
    ["sh", "-c", REVERT_SCRIPT, "rack-import", dir]
        .map(str::to_owned)
        .to_vec()
}

fn sh(script: &str) -> Vec<String> {
    ["sh", "-c", script].map(str::to_owned).to_vec()
}

/// What `redis-check-rdb` counted in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub expires: u64,
    pub already_expired: u64,
}

impl Counts {
    /// Whether a server that loaded the file may hold `keys`: every key read but those
    /// already expired (a master drops them as it loads), less any with a TTL that has
    /// passed since.
    pub fn admits(self, keys: u64) -> bool {
        let most = self.read.saturating_sub(self.already_expired);
        keys <= most && keys + self.expires >= most
    }
}

/// The counts in `redis-check-rdb`'s `[info] N keys read` lines (redis 6 and 7), if it ran.
pub fn check_counts(output: &str) -> Option<Counts> {
    let count = |suffix: &str| {
        output.lines().find_map(|line| {
            line.trim()
                .strip_prefix("[info] ")?
                .strip_suffix(suffix)?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(Counts {
        read: count("keys read")?,
        expires: count("expires").unwrap_or(0),
        already_expired: count("already expired").unwrap_or(0),
    })
}

/// The keys of every database in `INFO keyspace` (`db0:keys=2,expires=0,avg_ttl=0`).
pub fn keyspace_keys(info: &str) -> Option<u64> {
    let mut total = 0;
    let mut answered = false;
    for line in info.lines().map(str::trim) {
        if line.starts_with("# Keyspace") {
            answered = true;
        }
        let Some((db, fields)) = line.split_once(':') else {
            continue;
        };
        if !db.starts_with("db") {
            continue;
        }
        let keys = fields.split(',').find_map(|f| f.strip_prefix("keys="))?;
        total += keys.parse::<u64>().ok()?;
    }
    answered.then_some(total)
}

/// What an exec printed and how it ended (`None`: the connection ended without a status, as
/// when the container stops under it).
#[derive(Debug, Default)]
pub(super) struct Output {
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) code: Option<i32>,
}

/// One import at a time per resource on this replica: a second waits for the first.
static IMPORTS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = LazyLock::new(Default::default);

fn lock_of(key: String) -> Arc<tokio::sync::Mutex<()>> {
    let mut imports = IMPORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    imports.entry(key).or_default().clone()
}

/// Replaces the data of redis resource `name` of `app` with the RDB file `rdb` (see the
/// module's header).
///
/// # Errors
/// When the pod is not running, the file is refused or cannot be sent (the data untouched), or
/// redis does not come back holding what the file holds (its old data put back where it can).
pub async fn restore(runtime: &KubeRuntime, app: &str, name: &str, rdb: &Path) -> Result<(), RuntimeError> {
    let pods: Api<Pod> = runtime.api(app);
    let pod = pod_name(name);
    let lock = lock_of(format!("{}/{pod}", runtime.namespace(app)));
    let _held = lock.lock().await;
    let before = ready_pod(&pods, &pod).await?.ok_or_else(|| {
        RuntimeError::Failed(format!(
            "resource {name} of {app} is not running (its pod {pod} is not ready)"
        ))
    })?;
    let file = tokio::fs::File::open(rdb)
        .await
        .map_err(RuntimeError::io("opening the uploaded RDB file"))?;
    let length = file
        .metadata()
        .await
        .map_err(RuntimeError::io("reading the uploaded RDB file"))?
        .len();
    let load = exec(&pods, &pod, load_command(length, DATA_DIR), Some(file)).await?;
    if !stopped_redis(&load) {
        return Err(RuntimeError::Failed(format!(
            "the import failed and the data is as it was: {}",
            why(&load)
        )));
    }
    let counts = check_counts(&load.stdout);
    wait_restarted(&pods, &pod, &before).await?;
    let keys = exec(&pods, &pod, sh("redis-cli -h 127.0.0.1 INFO keyspace"), None).await?;
    let loaded = keyspace_keys(&keys.stdout);
    match (counts, loaded) {
        (_, None) => {
            return Err(RuntimeError::Failed(format!(
                "redis restarted on the imported file but does not answer: {}; its previous data is in \
                 {DATA_DIR}/*.before-import of pod {pod}",
                why(&keys)
            )));
        }
        (Some(counts), Some(loaded)) if !counts.admits(loaded) => {
            let reverted = revert(&pods, &pod).await;
            let data = match reverted {
                Ok(()) => "the data is as it was".to_owned(),
                Err(e) => format!(
                    "putting the old data back failed too ({e}); it is in {DATA_DIR}/*.before-import of pod {pod}"
                ),
            };
            return Err(RuntimeError::Failed(format!(
                "redis holds {loaded} keys after loading a file of {} keys: {data}",
                counts.read
            )));
        }
        _ => {}
    }
    let cleanup = format!("rm -rf {DATA_DIR}/appendonlydir.before-import {DATA_DIR}/appendonly.aof.before-import");
    let cleaned = exec(&pods, &pod, sh(&cleanup), None).await?;
    if cleaned.code != Some(0) {
        tracing::warn!(
            app.name = app,
            "removing the data an import replaced in pod {pod}: {}",
            why(&cleaned)
        );
    }
    Ok(())
}

/// Puts back the data the import moved aside and waits for redis to be back on it.
async fn revert(pods: &Api<Pod>, pod: &str) -> Result<(), RuntimeError> {
    let before = ready_pod(pods, pod)
        .await?
        .ok_or_else(|| RuntimeError::Failed(format!("pod {pod} is not ready")))?;
    let out = exec(pods, pod, revert_command(DATA_DIR), None).await?;
    if !stopped_redis(&out) {
        return Err(RuntimeError::Failed(why(&out)));
    }
    wait_restarted(pods, pod, &before).await
}

/// Whether a script that stops redis got that far: it exits 0 after the stop, or dies with the
/// container (killed by a signal, or the connection ends without a status); its own failures
/// exit with 1 to 127 (10 to 16: before anything changed, or with everything put back).
fn stopped_redis(out: &Output) -> bool {
    !matches!(out.code, Some(1..=127))
}

fn why(out: &Output) -> String {
    let stderr = out.stderr.trim();
    let code = out
        .code
        .map_or_else(|| "no exit status".to_owned(), |c| format!("exit code {c}"));
    if stderr.is_empty() {
        format!("the command in the pod ended ({code})")
    } else {
        format!("{stderr} ({code})")
    }
}

/// The pod if it is ready (and not being deleted), else `None`.
async fn ready_pod(pods: &Api<Pod>, pod: &str) -> Result<Option<Pod>, RuntimeError> {
    let found = pods
        .get_opt(pod)
        .await
        .map_err(RuntimeError::kube(format!("reading pod {pod}")))?;
    Ok(found.filter(is_ready))
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && server_status(pod).is_some_and(|s| s.ready)
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn server_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == CONTAINER)
}

/// Whether `now` is the server of `before` started again (or a new pod of the StatefulSet),
/// and ready: `Ok(true)`; `Err` when redis has exited with an error since (it could not load
/// what it was given).
pub fn restarted(before: &Pod, now: &Pod) -> Result<bool, String> {
    let restarts = |pod: &Pod| server_status(pod).map_or(0, |s| s.restart_count);
    let replaced = before.metadata.uid != now.metadata.uid;
    let again = replaced || restarts(now) > restarts(before);
    let failed = server_status(now)
        .and_then(|s| s.last_state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code != 0 && (replaced || restarts(now) > restarts(before) + 1));
    if let Some(terminated) = failed
        && !is_ready(now)
    {
        return Err(format!(
            "redis exits with code {} on the imported data{}",
            terminated.exit_code,
            terminated
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    Ok(again && is_ready(now))
}

/// Waits for the server of pod `before` to have restarted and to be ready again.
async fn wait_restarted(pods: &Api<Pod>, pod: &str, before: &Pod) -> Result<(), RuntimeError> {
    let mut watch = Watch::start(pods.clone(), by_name(pod), format!("pod {pod}"));
    let waited = tokio::time::timeout(RESTART_LIMIT, async {
        loop {
            let snapshot = watch.current();
            if let Some(now) = snapshot.objects.get(pod) {
                match restarted(before, now) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(why) => return Err(RuntimeError::Failed(failed_restart(&why, pod))),
                }
            }
            watch.changed().await?;
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        Err(RuntimeError::Failed(failed_restart(
            &format!(
                "redis is not ready {} s after restarting on the imported data",
                RESTART_LIMIT.as_secs()
            ),
            pod,
        )))
    })
}

fn failed_restart(why: &str, pod: &str) -> String {
    format!("the import failed: {why}; the previous data is in {DATA_DIR}/*.before-import of pod {pod}")
}

/// Runs `command` in the server container of `pod`, with `input` (if any) as exactly its
/// length of stdin, which stays open until the command ends (see the module's header).
async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    command: Vec<String>,
    input: Option<tokio::fs::File>,
) -> Result<Output, RuntimeError> {
    let params = AttachParams::default()
        .container(CONTAINER)
        .stdin(input.is_some())
        .stdout(true)
        .stderr(true);
    let mut attached = pods
        .exec(pod, command, &params)
        .await
        .map_err(RuntimeError::kube(format!("running a command in pod {pod}")))?;
    let stdout = attached.stdout().map(|r| tokio::spawn(read_capped(r)));
    let stderr = attached.stderr().map(|r| tokio::spawn(read_capped(r)));
    let status = attached.take_status();
    let mut stdin = attached.stdin();
    if let (Some(mut file), Some(writer)) = (input, stdin.as_mut()) {
        // A write that fails means the command ended early: its output says why.
        let _ = tokio::io::copy(&mut file, writer).await;
    }
    let ended = tokio::time::timeout(EXEC_LIMIT, async {
        let mut out = Output::default();
        if let Some(task) = stdout {
            out.stdout = task.await.unwrap_or_default();
        }
        if let Some(task) = stderr {
            out.stderr = task.await.unwrap_or_default();
        }
        if let Some(status) = status {
            out.code = status.await.map(|s| super::process::status_code(&s));
        }
        out
    })
    .await;
    drop(stdin);
    attached.abort();
    ended.map_err(|_| {
        RuntimeError::Failed(format!(
            "a command in pod {pod} did not end within {} s",
            EXEC_LIMIT.as_secs()
        ))
    })
}

/// Everything `reader` gives until it ends, keeping the first [`OUTPUT_CAP`] bytes.
async fn read_capped(mut reader: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_CAP.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
#[path = "redis_import_tests.rs"]
mod tests;
