//! `rack certs ...` and `rack ssl ...`: certificates (admin to change), as `convox certs` and
//! `convox ssl`: list them (`--json` for scripts), import one from PEM files, generate a
//! self-signed one, renew or delete one; list which of an app's services serve which, and give a
//! service's port one. Private keys go up once and are never shown again.

use clap::Subcommand;
use serde::Deserialize;

use super::output;
use super::{AppArg, Client};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Import a certificate and its private key (PEM files).
    Import {
        /// The certificate's PEM file.
        public: std::path::PathBuf,
        /// The private key's PEM file.
        key: std::path::PathBuf,
        /// The intermediate certificates' PEM file.
        #[arg(long)]
        chain: Option<std::path::PathBuf>,
    },
    /// Generate a self-signed certificate for domains (`*.` allowed first).
    Generate {
        #[arg(required = true)]
        domains: Vec<String>,
        /// How long it is valid: hours (2160h) or days (90d); default 365 days.
        #[arg(long)]
        duration: Option<String>,
    },
    /// Re-issue a generated certificate under its id (or, with --app, every generated one the
    /// app's services use).
    Renew {
        /// The certificate (left out: the app's).
        id: Option<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Delete a certificate no service uses.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum SslCommand {
    /// Serve a service's port with a certificate: `rack ssl update web:443 cert-...`.
    Update {
        /// SERVICE:PORT
        target: String,
        /// The certificate's id (`rack certs`).
        id: String,
    },
    /// Stop serving a service's port with its certificate: `rack ssl unset web:443` (rack's
    /// own: convox has no way back).
    Unset {
        /// SERVICE:PORT
        target: String,
    },
}

#[derive(Debug, Deserialize)]
struct Certificate {
    id: String,
    domain: String,
    expiration: String,
    status: String,
}

#[derive(Debug, Deserialize)]
struct Ssl {
    service: String,
    port: i64,
    certificate: String,
    domain: String,
    expiration: Option<String>,
    https: Option<String>,
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

/// Prints a made certificate: as JSON with --json, else its id on standard output.
fn made(cert: &serde_json::Value) -> anyhow::Result<()> {
    let id = cert["id"].as_str().unwrap_or_default();
    eprintln!("OK, {id}");
    if !output::json(cert)? {
        println!("{id}");
    }
    Ok(())
}

pub async fn run(client: &Client, command: Option<CertsCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let certs: serde_json::Value = client.get("/certificates").await?;
            if output::json(&certs)? {
                return Ok(());
            }
            let certs: Vec<Certificate> = serde_json::from_value(certs)?;
            let rows: Vec<Vec<String>> = certs
                .into_iter()
                .map(|c| vec![c.id, c.domain, c.expiration, c.status])
                .collect();
            print!("{}", output::table(&["ID", "DOMAIN", "EXPIRES", "STATUS"], &rows));
        }
        Some(CertsCommand::Import { public, key, chain }) => {
            let (public, key) = (read(&public)?, read(&key)?);
            let chain = chain.as_deref().map(read).transpose()?;
            let mut form = vec![("pub", public.as_str()), ("key", key.as_str())];
            form.extend(chain.as_deref().map(|c| ("chain", c)));
            eprint!("Importing certificate... ");
            made(&client.post("/certificates", &form).await?)?;
        }
        Some(CertsCommand::Generate { domains, duration }) => {
            let domains = domains.join(",");
            let mut form = vec![("domains", domains.as_str())];
            form.extend(duration.as_deref().map(|d| ("duration", d)));
            eprint!("Generating certificate... ");
            made(&client.post("/certificates/generate", &form).await?)?;
        }
        Some(CertsCommand::Renew { id, app }) => {
            let id = match id {
                Some(id) => id,
                None => app.resolve()?,
            };
            eprint!("Renewing {id}... ");
            let renewed: serde_json::Value = client
                .post(&format!("/certificates/{}/renew", client.segment(&id)), &[])
                .await?;
            eprintln!("OK");
            output::json(&renewed)?;
        }
        Some(CertsCommand::Delete { id }) => {
            eprint!("Deleting certificate {id}... ");
            client.delete(&format!("/certificates/{}", client.segment(&id))).await?;
            eprintln!("OK");
        }
    }
    Ok(())
}

pub async fn ssl(client: &Client, app: AppArg, command: Option<SslCommand>) -> anyhow::Result<()> {
    let app = app.resolve()?;
    match command {
        None => {
            let uses: serde_json::Value = client.get(&format!("/apps/{}/ssl", client.segment(&app))).await?;
            if output::json(&uses)? {
                return Ok(());
            }
            let uses: Vec<Ssl> = serde_json::from_value(uses)?;
            let rows: Vec<Vec<String>> = uses
                .into_iter()
                .map(|u| {
                    vec![
                        format!("{}:{}", u.service, u.port),
                        u.certificate,
                        u.domain,
                        u.expiration.unwrap_or_default(),
                        u.https.unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["ENDPOINT", "CERTIFICATE", "DOMAIN", "EXPIRES", "HTTPS"], &rows)
            );
        }
        Some(SslCommand::Update { target, id }) => {
            let (service, port, path) = endpoint(client, &app, &target)?;
            eprint!("Updating certificate of {service}:{port}... ");
            let answer: serde_json::Value = client.put(&path, &[("id", id.as_str())]).await?;
            eprintln!("OK");
            if !output::json(&answer)?
                && let Some(https) = answer["https"].as_str()
            {
                println!("https://{https}");
            }
        }
        Some(SslCommand::Unset { target }) => {
            let (service, port, path) = endpoint(client, &app, &target)?;
            eprint!("Removing certificate of {service}:{port}... ");
            client.delete(&path).await?;
            eprintln!("OK");
        }
    }
    Ok(())
}

/// The service, the port and the API path of `target` (`SERVICE:PORT`) of `app`.
fn endpoint<'a>(client: &Client, app: &str, target: &'a str) -> anyhow::Result<(&'a str, &'a str, String)> {
    let Some((service, port)) = target.split_once(':') else {
        anyhow::bail!("{target}: give SERVICE:PORT (web:443)");
    };
    let path = format!(
        "/apps/{}/ssl/{}/{}",
        client.segment(app),
        client.segment(service),
        client.segment(port)
    );
    Ok((service, port, path))
}
