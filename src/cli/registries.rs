//! `rack registries ...`: private registries whose credentials image builds and pulls use
//! (admin), as `convox registries`: list (server and user name; `--json` for scripts), add
//! (the password as an argument, as convox takes it, or from standard input when left out, so
//! it stays out of the shell's history and the process list), remove.

use std::io::BufRead;

use clap::Subcommand;
use serde::Deserialize;

use super::Client;
use super::output;

#[derive(Debug, Subcommand)]
pub enum RegistriesCommand {
    /// Add a registry, or replace its credentials.
    Add {
        /// Its host (and port), as image names start: registry.example.com, 127.0.0.1:5000.
        server: String,
        username: String,
        /// The password or token (left out: the first line of standard input).
        password: Option<String>,
    },
    /// Remove a registry.
    Remove { server: String },
}

#[derive(Debug, Deserialize)]
struct Registry {
    server: String,
    username: String,
}

pub async fn run(client: &Client, command: Option<RegistriesCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let registries: serde_json::Value = client.get("/registries").await?;
            if output::json(&registries)? {
                return Ok(());
            }
            let registries: Vec<Registry> = serde_json::from_value(registries)?;
            let rows: Vec<Vec<String>> = registries.into_iter().map(|r| vec![r.server, r.username]).collect();
            print!("{}", output::table(&["SERVER", "USERNAME"], &rows));
        }
        Some(RegistriesCommand::Add {
            server,
            username,
            password,
        }) => {
            let password = match password {
                Some(password) => password,
                None => {
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            eprint!("Adding registry {server}... ");
            let form = [
                ("server", server.as_str()),
                ("username", username.as_str()),
                ("password", password.as_str()),
            ];
            let added: serde_json::Value = client.post("/registries", &form).await?;
            eprintln!("OK");
            output::json(&added)?;
        }
        Some(RegistriesCommand::Remove { server }) => {
            eprint!("Removing registry {server}... ");
            client
                .delete(&format!("/registries/{}", client.segment(&server)))
                .await?;
            eprintln!("OK");
        }
    }
    Ok(())
}
