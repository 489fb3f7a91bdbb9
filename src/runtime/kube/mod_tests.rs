//! Unit tests of the Kubernetes runtime's own module (`mod.rs`).

use super::*;

fn pod(labels: serde_json::Value, status: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web-5d9-abc", "labels": labels, "creationTimestamp": "2026-11-27T12:00:00Z" },
        "spec": {
            "nodeName": "node-1",
            "containers": [{
                "name": "main", "image": "r/app:web.B1",
                "command": ["/bin/sh", "-c", "bin/web --port 3000"],
                "ports": [{ "containerPort": 3000 }],
            }],
        },
        "status": status,
    }))
    .unwrap()
}

fn web() -> serde_json::Value {
    serde_json::json!({ "type": "service", "service": "web", "release": "R1" })
}

#[test]
fn pods_are_convox_processes() {
    let running = pod(
        web(),
        serde_json::json!({
            "phase": "Running", "podIP": "10.0.0.7", "startTime": "2026-11-27T12:00:05Z",
            "conditions": [{ "type": "Ready", "status": "True" }],
        }),
    );
    let process = process_info("app", &running).unwrap();
    assert_eq!(
        (
            process.id.as_str(),
            process.name.as_str(),
            process.release.as_str(),
            process.status
        ),
        ("web-5d9-abc", "web", "R1", ProcessStatus::Running)
    );
    assert_eq!(
        (process.host.as_str(), process.instance.as_str()),
        ("10.0.0.7", "node-1")
    );
    assert_eq!(process.command, "bin/web --port 3000");
    assert_eq!(process.ports, ["3000"]);
    assert_eq!(process.started.to_rfc3339(), "2026-11-27T12:00:05+00:00");

    let status = |status: serde_json::Value| process_info("app", &pod(web(), status)).unwrap().status;
    assert_eq!(
        status(serde_json::json!({ "phase": "Pending" })),
        ProcessStatus::Starting
    );
    assert_eq!(
        status(serde_json::json!({ "phase": "Running" })),
        ProcessStatus::Unhealthy
    );
    let crashing = serde_json::json!({ "phase": "Running", "containerStatuses": [{
        "name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
        "state": { "waiting": { "reason": "CrashLoopBackOff" } },
    }]});
    assert_eq!(status(crashing), ProcessStatus::Crashed);
    let mut stopping = running.clone();
    stopping.metadata.deletion_timestamp = stopping.metadata.creation_timestamp.clone();
    assert_eq!(process_info("app", &stopping).unwrap().status, ProcessStatus::Stopping);

    let build = pod(
        serde_json::json!({ "type": "build" }),
        serde_json::json!({ "phase": "Running" }),
    );
    assert!(process_info("app", &build).is_none(), "build pods are not processes");
}
