//! What runtimes may use of the rest of rack, handed to them as small capabilities (see the
//! traits in `runtime`): an app's log, the book of router ports, and source tokens. They are
//! built here, over the store and the event bus, so no runtime touches SQL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;

use super::{OwnedOwner, persist_lines};
use tokio::task::JoinHandle;

use crate::runtime::{
    AppLogs, AppUids, BoxError, LogSink, PortBook, Registries, RegistryCredential, SourceTokens, WeakLogSink,
};

/// A writer not yet ended, with its sink (weakly: the writer ends when the sink's users drop it).
type Writer = (WeakLogSink, JoinHandle<u64>);

/// App logs persisted as events (each sink has a writer of its own; it never blocks).
#[derive(Debug, Clone)]
pub struct PersistedLogs {
    pool: PgPool,
    /// The writers not yet ended, with their sinks, for `settle` at rack's shutdown.
    writers: Arc<Mutex<Vec<Writer>>>,
}

impl PersistedLogs {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            writers: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl AppLogs for PersistedLogs {
    async fn copied_until(&self, app: &str, process: &str) -> Option<String> {
        match crate::store::log_cursors::get(&self.pool, app, process).await {
            Ok(position) => position,
            Err(e) => {
                tracing::warn!(error = %e, app.name = app, "reading where the output of {process} was copied to");
                None
            }
        }
    }

    fn sink(&self, app: &str) -> LogSink {
        let (sink, receiver) = LogSink::lossy();
        let owner = OwnedOwner {
            app: app.to_owned(),
            build: None,
            deployment: None,
        };
        let writer = tokio::spawn(persist_lines(self.pool.clone(), owner, receiver));
        let mut writers = self.writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        writers.retain(|(_, writer)| !writer.is_finished());
        writers.push((sink.downgrade(), writer));
        sink
    }

    /// Each writer whose sink is still open stores what was sent before (a flush); one whose
    /// sink is gone is waited for: it is writing what was left in its queue.
    async fn settle(&self) {
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let settled = writers.into_iter().map(|(sink, writer)| async move {
            if !sink.flush().await {
                let _ = writer.await;
            }
        });
        futures_util::future::join_all(settled).await;
    }
}

/// Apps' uid offsets in the `app_uids` table.
#[derive(Debug, Clone)]
pub struct StoredUids(pub PgPool);

#[async_trait::async_trait]
impl AppUids for StoredUids {
    async fn offset(&self, app: &str) -> Result<u32, BoxError> {
        let offset = crate::store::app_uids::get_or_allocate(&self.0, app).await?;
        Ok(u32::try_from(offset)?)
    }
}

/// Router ports in the `routers` table.
#[derive(Debug, Clone)]
pub struct StoredPorts(pub PgPool);

#[async_trait::async_trait]
impl PortBook for StoredPorts {
    async fn get(&self, app: &str, service: &str) -> Result<Option<u16>, BoxError> {
        let port = crate::store::routers::get(&self.0, app, service).await?;
        Ok(port.and_then(|p| u16::try_from(p).ok()))
    }

    async fn set(&self, app: &str, service: &str, port: u16) -> Result<(), BoxError> {
        crate::store::routers::set(&self.0, app, service, i32::from(port)).await?;
        Ok(())
    }
}

/// Scoped tokens in the `tokens` table (see `auth::issue_scoped`).
#[derive(Debug, Clone)]
pub struct StoredTokens(pub PgPool);

#[async_trait::async_trait]
impl SourceTokens for StoredTokens {
    async fn issue(&self, name: &str, path: &str, ttl: Duration) -> Result<String, BoxError> {
        Ok(crate::auth::issue_scoped(&self.0, name, path, ttl).await?)
    }

    async fn revoke(&self, name: &str) -> Result<(), BoxError> {
        crate::store::tokens::delete_scoped(&self.0, name).await?;
        Ok(())
    }
}

/// Private registries in the `registries` table, their passwords opened with the rack's key.
#[derive(Debug, Clone)]
pub struct StoredRegistries {
    pub pool: PgPool,
    pub keyring: std::sync::Arc<crate::secrets::Keyring>,
}

#[async_trait::async_trait]
impl Registries for StoredRegistries {
    async fn credentials(&self) -> Result<Vec<RegistryCredential>, BoxError> {
        let rows = crate::store::registries::list(&self.pool).await?;
        rows.into_iter()
            .map(|row| {
                let plain = self
                    .keyring
                    .open(&crate::secrets::owner("registry", &row.server), &row.password_sealed)
                    .map_err(|e| format!("registry {}: {e}", row.server))?;
                let password = String::from_utf8(plain)
                    .map_err(|_| format!("registry {}: the password is not UTF-8", row.server))?;
                Ok(RegistryCredential {
                    server: row.server,
                    username: row.username,
                    password,
                })
            })
            .collect()
    }
}
