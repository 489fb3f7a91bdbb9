//! The lifecycle of an app's resources, as the jobs see it: the credentials of each resource a
//! release declares (generated on first use, kept in the store), and the status once the
//! runtime has applied a release (running; failed; unlinked when no longer declared).

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::resource::{Credentials, Definition, Kind, ResourceSpec};
use crate::store::resources::{self as store, NewResource};

/// Length of a generated password: alphanumeric, so it needs no escaping anywhere.
const PASSWORD_LEN: usize = 32;

/// The stored form of a definition (its kind has a column of its own).
pub fn definition_json(definition: &Definition) -> serde_json::Value {
    serde_json::json!({ "options": definition.options, "image": definition.image })
}

/// The user and database a new resource of `kind` gets (memcached has neither).
fn account(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Postgres | Kind::Postgis | Kind::Mysql | Kind::Mariadb => ("app", "app"),
        Kind::Redis => ("default", "0"),
        Kind::Memcached => ("", ""),
    }
}

/// Why the resources of a release cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    #[error("{0}")]
    Store(#[source] sqlx::Error),
    /// A resource of that name exists with another type (the message says what to do).
    #[error("{0}")]
    TypeChanged(String),
}

/// The resources `declared` by a release of `app`, with their credentials: those the app did
/// not have yet are created now (with new credentials); the others keep theirs and their data.
///
/// # Errors
/// When the store fails, or a resource of that name exists with another type.
pub async fn for_release(
    pool: &PgPool,
    app: &str,
    declared: &BTreeMap<String, Definition>,
) -> Result<BTreeMap<String, ResourceSpec>, ResourcesError> {
    if declared.is_empty() {
        return Ok(BTreeMap::new());
    }
    let passwords: Vec<String> = declared
        .values()
        .map(|d| {
            if d.kind.has_credentials() {
                crate::ids::random_token(PASSWORD_LEN)
            } else {
                String::new()
            }
        })
        .collect();
    let new: Vec<NewResource<'_>> = declared
        .iter()
        .zip(&passwords)
        .map(|((name, definition), password)| {
            let (username, database) = account(definition.kind);
            NewResource {
                name,
                kind: definition.kind.as_str(),
                definition: definition_json(definition),
                username,
                password,
                database,
            }
        })
        .collect();
    let rows = store::ensure(pool, app, &new).await.map_err(ResourcesError::Store)?;
    let mut specs = BTreeMap::new();
    for row in rows {
        let Some(definition) = declared.get(&row.name) else {
            continue;
        };
        if row.kind != definition.kind.as_str() {
            return Err(ResourcesError::TypeChanged(format!(
                "resource {} of {app} is a {}, and this release declares it as a {}: a resource \
                 keeps its type; delete it first (`rack resources delete {} -a {app}`, after an export) \
                 or give the new one another name",
                row.name, row.kind, definition.kind, row.name
            )));
        }
        let spec = ResourceSpec {
            name: row.name.clone(),
            definition: definition.clone(),
            credentials: Credentials {
                user: row.username,
                password: row.password,
                database: row.database,
            },
        };
        specs.insert(row.name, spec);
    }
    Ok(specs)
}

/// Records what applying a release with `resources` did to them: on success, they run (and
/// the app's other resources are unlinked); on failure, those never seen running failed.
/// Applying no release (`None`) changes nothing. A failure to record is logged: the deployment's outcome stands.
pub async fn applied(pool: &PgPool, app: &str, resources: Option<&BTreeMap<String, ResourceSpec>>, ok: bool) {
    // No release (the rollback of an app's first deployment): nothing runs, nothing changes.
    let Some(resources) = resources else { return };
    let recorded = if ok {
        let declared: Vec<(String, serde_json::Value)> = resources
            .values()
            .map(|r| (r.name.clone(), definition_json(&r.definition)))
            .collect();
        store::applied(pool, app, &declared).await
    } else {
        let names: Vec<String> = resources.keys().cloned().collect();
        store::failed(pool, app, &names).await
    };
    if let Err(e) = recorded {
        tracing::warn!(error = %e, app.name = app, "recording the status of the resources of {app}");
    }
}
