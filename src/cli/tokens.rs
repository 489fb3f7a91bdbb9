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
        /// Limit it to this app (repeat for more; default: every app).
        #[arg(long = "app", short = 'a')]
        apps: Vec<String>,
        /// Let it expire after this long: seconds, or 90m, 12h, 30d (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
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
    #[serde(default)]
    last_used_from: Option<String>,
    #[serde(default)]
    apps: Option<Vec<String>>,
    #[serde(default)]
    expires: Option<String>,
}

pub async fn run(client: &Client, command: Option<TokensCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let tokens: serde_json::Value = client.get("/tokens").await?;
            if output::json(&tokens)? {
                return Ok(());
            }
            let tokens: Vec<Token> = serde_json::from_value(tokens)?;
            let rows: Vec<Vec<String>> = tokens
                .into_iter()
                .map(|t| {
                    vec![
                        t.id,
                        t.name,
                        t.role,
                        t.apps.map_or_else(|| "*".to_owned(), |a| a.join(",")),
                        t.expires.unwrap_or_default(),
                        t.created,
                        t.last_used.unwrap_or_default(),
                        t.last_used_from.unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(
                    &["ID", "NAME", "ROLE", "APPS", "EXPIRES", "CREATED", "LAST USED", "FROM"],
                    &rows
                )
            );
        }
        Some(TokensCommand::Create {
            name,
            role,
            apps,
            expires,
        }) => {
            // Sent whenever --app is given, even empty (`--app "$UNSET"`): the rack refuses an
            // empty name rather than make a token for every app.
            let given = !apps.is_empty();
            let apps = apps.join(",");
            let mut form = vec![("name", name.as_str()), ("role", role.as_str())];
            if given {
                form.push(("apps", apps.as_str()));
            }
            if let Some(expires) = &expires {
                form.push(("expires_in", expires.as_str()));
            }
            let token: serde_json::Value = client.post("/tokens", &form).await?;
            // The secret is in the object: a script keeps it from there.
            if output::json(&token)? {
                return Ok(());
            }
            let token: Token = serde_json::from_value(token)?;
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
