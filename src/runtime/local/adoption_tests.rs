//! Adoption goes through the `Driver` trait: the supervisor asks its drivers (processes under
//! their keepers, containers), whatever they are, for the instances that outlived the previous
//! start, and removes through them those it does not take over. A driver for another host plugs in the same way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Found, Running, Start};
use super::supervisor::Supervisor;
use crate::runtime::{AppLogs, BoxError, ExecRequest, ExecSession, LogSink, PortBook};

/// A driver that reports survivors and records what it is asked.
#[derive(Debug, Default)]
struct Survivors {
    found: Vec<Found>,
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Driver for Survivors {
    async fn start(&self, start: Start) -> std::io::Result<Box<dyn Running>> {
        self.calls.lock().unwrap().push(format!("start {}", start.id));
        Err(std::io::Error::other("not in this test"))
    }

    async fn exec(&self, _: &Start, _: &ExecRequest) -> std::io::Result<ExecSession> {
        Err(std::io::Error::other("not in this test"))
    }

    async fn survivors(&self, app: &str) -> Result<Vec<Found>, String> {
        self.calls.lock().unwrap().push(format!("survivors {app}"));
        Ok(self.found.clone())
    }

    async fn discard(&self, found: &Found, _: Duration) {
        self.calls.lock().unwrap().push(format!("discard {}", found.handle));
    }
}

#[derive(Debug)]
struct Logs;

#[async_trait::async_trait]
impl AppLogs for Logs {
    fn sink(&self, _: &str) -> LogSink {
        LogSink::lossy().0
    }
}

#[derive(Debug)]
struct Ports;

#[async_trait::async_trait]
impl PortBook for Ports {
    async fn get(&self, _: &str, _: &str) -> Result<Option<u16>, BoxError> {
        Ok(None)
    }

    async fn set(&self, _: &str, _: &str, _: u16) -> Result<(), BoxError> {
        Ok(())
    }
}

fn found(handle: &str, running: bool) -> Found {
    Found {
        handle: handle.to_owned(),
        process: format!("web-{handle}"),
        service: "web".to_owned(),
        release: "RGONE".to_owned(),
        build: "BGONE".to_owned(),
        port: None,
        started: chrono::Utc::now(),
        running,
        forward: Vec::new(),
        copied_until: None,
    }
}

#[tokio::test]
async fn the_first_apply_of_an_app_adopts_through_the_driver_trait() {
    let containers = Arc::new(Survivors {
        found: vec![found("c1", true), found("c2", false)],
        ..Survivors::default()
    });
    crate::tls::install_provider();
    let processes = Arc::new(Survivors::default());
    let dir = tempfile::tempdir().unwrap();
    let supervisor = Supervisor::new(
        dir.path().to_path_buf(),
        processes.clone(),
        Some(containers.clone() as Arc<dyn Driver>),
        Arc::new(Logs),
        Arc::new(Ports),
        CancellationToken::new(),
    );
    let (log, _receiver) = LogSink::lossy();
    // Stopping the app (no release): nothing of it is taken over, both are removed.
    supervisor.apply("a", None, &log).await.unwrap();
    supervisor.apply("a", None, &log).await.unwrap();
    assert_eq!(
        *containers.calls.lock().unwrap(),
        ["survivors a", "discard c1", "discard c2"],
        "asked once per app, on its first apply"
    );
    supervisor.apply("b", None, &log).await.unwrap();
    assert_eq!(containers.calls.lock().unwrap().len(), 6);
    // The process driver (its keepers) is asked too, once per app.
    assert_eq!(*processes.calls.lock().unwrap(), ["survivors a", "survivors b"]);
}
