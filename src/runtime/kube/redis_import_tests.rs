//! The redis import's protocol without a cluster: the load script run by a real `sh` in a
//! directory standing for the pod's `/data`, with a `redis-cli` and a `redis-check-rdb` that
//! record what they are asked; the parsers of what the pod answers; the restart's verdict.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// The line the scripts print once the files are in place and redis is told to stop (for whoever
/// reads the output: the exit status decides).
const RESTARTING: &str = "rack-import: restarting";

/// A fake `redis-cli` (records its arguments and whether it got the password from its
/// environment; PONG while `alive` exists) and `redis-check-rdb` (refuses a file with `BAD`).
fn fake_tools(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let cli = r#"#!/bin/sh
echo "args: $*" >> "$FAKE/log"
[ -n "$REDISCLI_AUTH" ] && echo "auth from the environment" >> "$FAKE/log"
case "$*" in
  *"CONFIG SET appendonly"*) echo OK ;;
  *PING*) [ -e "$FAKE/alive" ] && echo PONG ;;
esac
exit 0
"#;
    let check = r#"#!/bin/sh
if grep -q BAD "$1"; then echo "--- RDB ERROR DETECTED ---"; echo "[offset 9] Unexpected EOF"; exit 1; fi
echo "[offset 0] Checking RDB file $1"
echo "[info] 3 keys read"
echo "[info] 1 expires"
echo "[info] 0 already expired"
"#;
    for (name, text) in [("redis-cli", cli), ("redis-check-rdb", check)] {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A data directory with an AOF directory (the old data) and the tools; the load script started
/// on it for an upload of `length` bytes.
fn start_load(root: &Path, length: u64) -> Child {
    fake_tools(root);
    let data = root.join("data");
    std::fs::create_dir_all(data.join("appendonlydir")).unwrap();
    std::fs::write(data.join("appendonlydir/appendonly.aof.1.base.rdb"), "old data").unwrap();
    let argv = load_command(length, data.to_str().unwrap());
    Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", root.join("bin").display()))
        .env("FAKE", root)
        .env("REDISCLI_AUTH", "secret-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for the script to end, with stdin still open: the length alone ends it.
fn ended(child: &mut Child) -> (i32, String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            use std::io::Read;
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.code().unwrap_or(-1), out, err);
        }
        assert!(Instant::now() < deadline, "the load script did not end with stdin open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log(root: &Path) -> String {
    std::fs::read_to_string(root.join("log")).unwrap_or_default()
}

#[test]
fn the_load_reads_exactly_its_length_with_stdin_open_and_swaps_the_aof() {
    let root = tempfile::tempdir().unwrap();
    let rdb = b"REDIS0011 some data \xff12345678";
    let mut child = start_load(root.path(), rdb.len() as u64);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(rdb).unwrap();
    stdin.flush().unwrap();
    // stdin stays open (as over an exec on API servers before 1.29) until the script ends.
    let (code, out, err) = ended(&mut child);
    drop(stdin);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(RESTARTING), "{out}");
    assert_eq!(
        check_counts(&out),
        Some(Counts {
            read: 3,
            expires: 1,
            already_expired: 0
        })
    );
    let data = root.path().join("data");
    assert_eq!(std::fs::read(data.join("appendonly.aof")).unwrap(), rdb);
    assert_eq!(
        std::fs::read_to_string(data.join("appendonlydir.before-import/appendonly.aof.1.base.rdb")).unwrap(),
        "old data"
    );
    assert!(!data.join("appendonlydir").exists());
    assert!(!data.join("import.rdb.tmp").exists());
    let log = log(root.path());
    assert!(log.contains("args: -h 127.0.0.1 CONFIG SET appendonly no"), "{log}");
    assert!(log.contains("args: -h 127.0.0.1 SHUTDOWN NOSAVE"), "{log}");
    assert!(log.contains("auth from the environment"), "{log}");
    assert!(
        !log.contains("secret-password"),
        "the password on a command line: {log}"
    );
    assert!(load_command(9, "/data").iter().all(|a| !a.contains("secret")));
}

#[test]
fn a_short_upload_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut child = start_load(root.path(), 100);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"REDIS0011 only this").unwrap();
    // The connection ends early: stdin closes.
    drop(stdin);
    let (code, _, err) = ended(&mut child);
    assert_eq!(code, 11, "{err}");
    assert!(err.contains("received 19 of 100 bytes"), "{err}");
    let data = root.path().join("data");
    assert!(data.join("appendonlydir/appendonly.aof.1.base.rdb").exists());
    assert!(!data.join("import.rdb.tmp").exists());
    assert!(!log(root.path()).contains("CONFIG"), "redis was not touched");
}

#[test]
fn a_file_redis_check_rdb_refuses_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let rdb = b"REDIS0011 BAD \xff12345678";
    let mut child = start_load(root.path(), rdb.len() as u64);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(rdb).unwrap();
    let (code, out, err) = ended(&mut child);
    drop(stdin);
    assert_eq!(code, 12, "{out}{err}");
    assert!(!out.contains(RESTARTING));
    assert!(err.contains("Unexpected EOF"), "{err}");
    assert!(root.path().join("data/appendonlydir").exists());
    assert!(!log(root.path()).contains("CONFIG"), "redis was not touched");
}

#[test]
fn a_redis_that_does_not_stop_gets_its_files_and_aof_back() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("alive"), "").unwrap();
    let rdb = b"REDIS0011 data \xff12345678";
    let mut child = start_load(root.path(), rdb.len() as u64);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(rdb).unwrap();
    let (code, _, err) = ended(&mut child);
    drop(stdin);
    assert_eq!(code, 15, "{err}");
    let data = root.path().join("data");
    assert!(data.join("appendonlydir/appendonly.aof.1.base.rdb").exists());
    assert!(!data.join("appendonly.aof").exists());
    assert!(!data.join("appendonlydir.before-import").exists());
    assert!(log(root.path()).contains("CONFIG SET appendonly yes"));
}

#[test]
fn counts_come_from_redis_check_rdb_and_keys_from_info_keyspace() {
    let report = "[offset 0] Checking RDB file import.rdb.tmp\n[offset 191] \\o/ RDB looks OK! \\o/\n\
                  [info] 2 keys read\n[info] 0 expires\n[info] 0 already expired\n";
    let counts = check_counts(report).unwrap();
    assert_eq!(
        counts,
        Counts {
            read: 2,
            expires: 0,
            already_expired: 0
        }
    );
    assert_eq!(check_counts("no report"), None);
    assert!(counts.admits(2));
    assert!(!counts.admits(0) && !counts.admits(3));
    // Keys with a TTL may have expired by the time the server is asked; expired ones are dropped.
    let ttl = Counts {
        read: 10,
        expires: 4,
        already_expired: 1,
    };
    assert!(ttl.admits(9) && ttl.admits(5));
    assert!(!ttl.admits(4) && !ttl.admits(10));

    let info = "# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\ndb3:keys=5,expires=1,avg_ttl=10\r\n";
    assert_eq!(keyspace_keys(info), Some(7));
    assert_eq!(keyspace_keys("# Keyspace\r\n"), Some(0));
    assert_eq!(keyspace_keys("NOAUTH Authentication required."), None);
}

fn pod(uid: &str, restarts: i32, ready: bool, last_exit: Option<i32>) -> Pod {
    let last = last_exit.map_or(
        serde_json::json!({}),
        |code| serde_json::json!({ "terminated": { "exitCode": code, "message": "Bad file format" } }),
    );
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": "resource-cache-0", "uid": uid },
        "status": {
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            "containerStatuses": [{ "name": CONTAINER, "image": "redis", "imageID": "", "ready": ready,
                "restartCount": restarts, "lastState": last }],
        },
    }))
    .unwrap()
}

#[test]
fn a_restart_counts_once_the_server_is_back_and_ready() {
    let before = pod("a", 2, true, None);
    // Not restarted yet (still ready, or the kubelet has not noticed).
    assert_eq!(restarted(&before, &pod("a", 2, true, None)), Ok(false));
    // Stopped by the import (exit 0), not ready yet; then ready.
    assert_eq!(restarted(&before, &pod("a", 3, false, Some(0))), Ok(false));
    assert_eq!(restarted(&before, &pod("a", 3, true, Some(0))), Ok(true));
    // A new pod of the StatefulSet, ready.
    assert_eq!(restarted(&before, &pod("b", 0, true, None)), Ok(true));
    // redis exited with an error after the import's stop: it cannot load the data.
    let failed = restarted(&before, &pod("a", 4, false, Some(1))).unwrap_err();
    assert!(
        failed.contains("code 1") && failed.contains("Bad file format"),
        "{failed}"
    );
}

#[test]
fn a_script_stopped_redis_unless_it_exited_with_its_own_failure() {
    let out = |code| Output {
        code,
        ..Output::default()
    };
    // Exited after the stop, killed with the container, or cut off without a status.
    assert!(stopped_redis(&out(Some(0))));
    assert!(stopped_redis(&out(Some(137))));
    assert!(stopped_redis(&out(None)));
    // Its own failures (nothing changed, or everything put back), or no shell at all.
    for code in [11, 12, 15, 126, 127] {
        assert!(!stopped_redis(&out(Some(code))), "{code}");
    }
}

#[test]
fn a_revert_puts_the_old_aof_back_and_stops_redis() {
    let root = tempfile::tempdir().unwrap();
    fake_tools(root.path());
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("appendonlydir.before-import")).unwrap();
    std::fs::write(data.join("appendonlydir.before-import/appendonly.aof.manifest"), "old").unwrap();
    std::fs::create_dir_all(data.join("appendonlydir")).unwrap();
    std::fs::write(data.join("appendonlydir/appendonly.aof.manifest"), "imported").unwrap();
    let run = || {
        let argv = revert_command(data.to_str().unwrap());
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("PATH", format!("{}:/usr/bin:/bin", root.path().join("bin").display()))
            .env("FAKE", root.path())
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(data.join("appendonlydir/appendonly.aof.manifest")).unwrap(),
        "old"
    );
    assert!(!data.join("appendonlydir.before-import").exists());
    let log = log(root.path());
    assert!(
        log.contains("CONFIG SET appendonly no") && log.contains("SHUTDOWN NOSAVE"),
        "{log}"
    );
    // Nothing set aside: nothing is touched, redis is not stopped.
    let again = run();
    assert_eq!(again.status.code(), Some(16), "{again:?}");
    let log_after = std::fs::read_to_string(root.path().join("log")).unwrap();
    assert_eq!(log_after.matches("SHUTDOWN").count(), 1, "{log_after}");
}
