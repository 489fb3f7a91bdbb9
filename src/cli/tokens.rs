//! `rack tokens ...`: scoped API tokens for CI systems and dashboards (admin only).

use clap::Subcommand;
use serde::Deserialize;

use super::Client;
use super::output;

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// What the token is for (a CI system, a dashboard).
        name: String,
        /// read (GETs), deploy (also builds, releases, promotes) or admin (everything).
        #[arg(long, default_value = "deploy")]
        role: String,
    },
    /// Revoke a token.
    Delete { id: String },
}

#[derive(Debug, Deserialize)]
struct Token {
    id: String,
    name: String,
    role: String,
    #[serde(default)]
    token: Option<String>,
    created: String,
    last_used: Option<String>,
}

pub async fn run(client: &Client, command: Option<TokensCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let tokens: Vec<Token> = client.get("/tokens").await?;
            let rows: Vec<Vec<String>> = tokens
                .into_iter()
                .map(|t| vec![t.id, t.name, t.role, t.created, t.last_used.unwrap_or_default()])
                .collect();
            print!(
                "{}",
                output::table(&["ID", "NAME", "ROLE", "CREATED", "LAST USED"], &rows)
            );
        }
        Some(TokensCommand::Create { name, role }) => {
            let token: Token = client
                .post("/tokens", &[("name", name.as_str()), ("role", role.as_str())])
                .await?;
            eprintln!(
                "Created token {} ({}, {}); its secret is shown only now:",
                token.id, token.name, token.role
            );
            println!("{}", token.token.unwrap_or_default());
        }
        Some(TokensCommand::Delete { id }) => {
            eprint!("Revoking token {id}... ");
            client.delete(&format!("/tokens/{}", client.segment(&id))).await?;
            eprintln!("OK");
        }
    }
    Ok(())
}
