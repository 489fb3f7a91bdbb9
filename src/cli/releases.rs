//! `rack releases ...`: list an app's releases, show one, promote one, or roll back to one
//! (a new release with its build and env, promoted), as the convox CLI does.

use clap::Subcommand;
use serde::Deserialize;

use super::promote::{self, LogTo, PromoteFlags};
use super::{AppArg, Client, output};

/// `rack releases ...`.
#[derive(Debug, Subcommand)]
pub enum ReleasesCommand {
    /// Show a release.
    Info {
        id: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Promote a release (the latest when none is given) and follow its rollout.
    Promote {
        id: Option<String>,
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        flags: PromoteFlags,
    },
    /// What promoting B changes over A (default A: the active release): env keys, build,
    /// manifest. Env values are never shown.
    Diff {
        /// `[A] B`.
        #[arg(num_args = 1..=2, required = true, value_name = "RELEASE")]
        ids: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Make a new release with the build and env of an older one, and promote it.
    Rollback {
        id: String,
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        flags: PromoteFlags,
    },
}

/// A release as the API returns it.
#[derive(Debug, Deserialize)]
pub struct Release {
    /// `R...`.
    pub id: String,
    /// The build it runs (`B...`).
    pub build: String,
    /// `KEY=VALUE` lines.
    pub env: String,
    pub description: String,
    /// RFC 3339.
    pub created: String,
}

/// Runs `rack releases ...`; `list_app` is the `-a` given before the subcommand.
pub async fn run(
    client: &Client,
    list_app: AppArg,
    limit: Option<u32>,
    command: Option<ReleasesCommand>,
) -> anyhow::Result<()> {
    match command {
        None => list(client, &list_app.resolve()?, limit).await,
        Some(ReleasesCommand::Info { id, app }) => info(client, &app.or(&list_app).resolve()?, &id).await,
        Some(ReleasesCommand::Promote { id, app, flags }) => {
            let app = app.or(&list_app).resolve()?;
            let id = match id {
                Some(id) => id,
                None => latest(client, &app)
                    .await?
                    .map(|r| r.id)
                    .ok_or_else(|| anyhow::anyhow!("no releases to promote"))?,
            };
            promote::promote(client, &app, &id, &flags, LogTo::Stdout).await?;
            print_app(client, &app).await
        }
        Some(ReleasesCommand::Diff { ids, app }) => {
            let app = app.or(&list_app).resolve()?;
            let (from, to) = match ids.as_slice() {
                [to] => (promote::app_state(client, &app).await?.release, to.clone()),
                [from, to] => (from.clone(), to.clone()),
                _ => anyhow::bail!("give one release (compared with the active one) or two"),
            };
            if from.is_empty() {
                anyhow::bail!("{app} has no active release: give two releases to compare");
            }
            let diff: serde_json::Value = super::diff::get(client, &app, &from, &to).await?;
            if !output::json(&diff)? {
                print!("{}", super::diff::render(&serde_json::from_value(diff)?));
            }
            Ok(())
        }
        Some(ReleasesCommand::Rollback { id, app, flags }) => {
            let app = app.or(&list_app).resolve()?;
            rollback(client, &app, &id, &flags).await
        }
    }
}

fn releases_path(client: &Client, app: &str) -> String {
    format!("/apps/{}/releases", client.segment(app))
}

/// The release `id` of `app`.
///
/// # Errors
/// When it does not exist.
pub async fn get(client: &Client, app: &str, id: &str) -> anyhow::Result<Release> {
    client
        .get(&format!("{}/{}", releases_path(client, app), client.segment(id)))
        .await
}

/// The newest release of `app`, if it has any.
///
/// # Errors
/// When the rack cannot be reached or the app does not exist.
pub async fn latest(client: &Client, app: &str) -> anyhow::Result<Option<Release>> {
    let list: Vec<Release> = client.get(&format!("{}?limit=1", releases_path(client, app))).await?;
    Ok(list.into_iter().next())
}

/// Creates a release of `app` from `form` (`build`, `env`...).
///
/// # Errors
/// When the rack refuses it.
pub async fn create(client: &Client, app: &str, form: &[(&str, &str)]) -> anyhow::Result<Release> {
    client.post(&releases_path(client, app), form).await
}

async fn list(client: &Client, app: &str, limit: Option<u32>) -> anyhow::Result<()> {
    let active = promote::app_state(client, app).await?.release;
    let path = match limit {
        Some(limit) => format!("{}?limit={limit}", releases_path(client, app)),
        None => releases_path(client, app),
    };
    let releases: serde_json::Value = client.get(&path).await?;
    if output::json(&releases)? {
        return Ok(());
    }
    let releases: Vec<Release> = serde_json::from_value(releases)?;
    let rows: Vec<Vec<String>> = releases
        .into_iter()
        .map(|r| {
            let status = if r.id == active { "active" } else { "" };
            vec![r.id, status.to_owned(), r.build, r.created, r.description]
        })
        .collect();
    print!(
        "{}",
        output::table(&["ID", "STATUS", "BUILD", "CREATED", "DESCRIPTION"], &rows)
    );
    Ok(())
}

async fn info(client: &Client, app: &str, id: &str) -> anyhow::Result<()> {
    let r: serde_json::Value = client
        .get(&format!("{}/{}", releases_path(client, app), client.segment(id)))
        .await?;
    if output::json(&r)? {
        return Ok(());
    }
    let r: Release = serde_json::from_value(r)?;
    let keys = ["Id", "Build", "Created", "Description", "Env"];
    // The env's later lines line up under its first, after the widest key and two spaces.
    let indent = " ".repeat(keys.iter().map(|k| k.len()).max().unwrap_or(0) + 2);
    let env = r.env.lines().collect::<Vec<_>>().join(&format!("\n{indent}"));
    print!(
        "{}",
        output::info(&[
            (keys[0], r.id),
            (keys[1], r.build),
            (keys[2], r.created),
            (keys[3], r.description),
            (keys[4], env),
        ])
    );
    Ok(())
}

async fn rollback(client: &Client, app: &str, id: &str, flags: &PromoteFlags) -> anyhow::Result<()> {
    let old = get(client, app, id).await?;
    eprint!("Rolling back to {id}... ");
    // The env is sent even when empty: without it the new release would take the latest env.
    let new = create(client, app, &[("build", old.build.as_str()), ("env", old.env.as_str())]).await?;
    eprintln!("OK, {}", new.id);
    promote::promote(client, app, &new.id, flags, LogTo::Stdout).await?;
    print_app(client, app).await
}

/// With `--json`, the app as the API shows it once a promote has ended (its `release` the one
/// now active); nothing otherwise.
pub async fn print_app(client: &Client, app: &str) -> anyhow::Result<()> {
    if output::is_json() {
        let app: serde_json::Value = client.get(&format!("/apps/{}", client.segment(app))).await?;
        output::json(&app)?;
    }
    Ok(())
}
