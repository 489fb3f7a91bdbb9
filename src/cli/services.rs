//! `rack services` and `rack scale`: what an app runs, and how many of each.

use clap::Args;
use serde::Deserialize;

use super::output;
use super::{AppArg, Client};

/// `rack scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The service.
    service: String,
    #[command(flatten)]
    app: AppArg,
    /// How many processes to run (it holds for later deployments too).
    #[arg(long)]
    count: u32,
}

#[derive(Debug, Deserialize)]
struct Service {
    name: String,
    count: u32,
    domain: String,
    /// Every host (absent from a convox rack, which shows `domain` only).
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    ports: Vec<Port>,
}

#[derive(Debug, Deserialize)]
struct Port {
    balancer: u16,
    container: u16,
}

#[derive(Debug, Deserialize)]
struct Deployment {
    id: String,
}

/// `rack services`.
pub async fn list(client: &Client, app: AppArg) -> anyhow::Result<()> {
    let app = app.resolve()?;
    let services: serde_json::Value = client.get(&format!("/apps/{}/services", client.segment(&app))).await?;
    if output::json(&services)? {
        return Ok(());
    }
    let services: Vec<Service> = serde_json::from_value(services)?;
    let rows: Vec<Vec<String>> = services
        .into_iter()
        .map(|s| {
            let domains = if s.domains.is_empty() {
                s.domain
            } else {
                s.domains.join(" ")
            };
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}:{}", p.balancer, p.container))
                .collect();
            vec![s.name, s.count.to_string(), domains, ports.join(" ")]
        })
        .collect();
    print!("{}", output::table(&["SERVICE", "COUNT", "DOMAIN", "PORTS"], &rows));
    Ok(())
}

/// `rack scale SERVICE --count N`: sets the count and follows the deployment that applies it.
pub async fn scale(client: &Client, args: ScaleArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    eprintln!("Scaling {} to {}...", args.service, args.count);
    let path = format!(
        "/apps/{}/services/{}",
        client.segment(&app),
        client.segment(&args.service)
    );
    let deployment: Deployment = client.put(&path, &[("count", args.count.to_string().as_str())]).await?;
    super::promote::follow_deployment(client, &app, &deployment.id).await?;
    eprintln!("OK");
    Ok(())
}
