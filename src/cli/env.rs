//! `rack env ...`: the environment is the `env` of the app's latest release, so reading it
//! reads that release and changing it makes a new release (promoted with `--promote`), as
//! the convox CLI does against a v3 rack.

use anyhow::bail;
use clap::Subcommand;

use super::promote::{self, LogTo, PromoteFlags};
use super::releases;
use super::{AppArg, Client, output};
use crate::env::Env;

/// `rack env ...`.
#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Print one variable's value.
    Get {
        key: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Set variables (KEY=VALUE ...) in a new release.
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        change: Change,
    },
    /// Remove variables in a new release.
    Unset {
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        change: Change,
    },
}

/// What follows a change of the environment.
#[derive(Debug, clap::Args)]
pub struct Change {
    /// Promote the new release (and follow its rollout).
    #[arg(long)]
    promote: bool,
    #[command(flatten)]
    flags: PromoteFlags,
}

/// Runs `rack env ...`; `list_app` is the `-a` given before the subcommand.
pub async fn run(client: &Client, list_app: AppArg, command: Option<EnvCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let env = current(client, &list_app.resolve()?).await?;
            // The values as the API gives them (the release's env), keys sorted.
            if !output::json(&env)? {
                print!("{}", lines(&env));
            }
        }
        Some(EnvCommand::Get { key, app }) => {
            let env = current(client, &app.or(&list_app).resolve()?).await?;
            match env.get(&key) {
                Some(value) => {
                    if !output::json(value)? {
                        println!("{value}");
                    }
                }
                None => bail!("env not found: {key}"),
            }
        }
        Some(EnvCommand::Set { pairs, app, change }) => {
            let app = app.or(&list_app).resolve()?;
            let pairs = parse_pairs(&pairs)?;
            let mut env = current(client, &app).await?;
            let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
            eprint!("Setting {}... ", keys.join(", "));
            env.extend(pairs.iter().cloned());
            release(client, &app, &env, &change).await?;
        }
        Some(EnvCommand::Unset { keys, app, change }) => {
            let app = app.or(&list_app).resolve()?;
            let mut env = current(client, &app).await?;
            for key in &keys {
                if env.remove(key).is_none() {
                    bail!("env not found: {key}");
                }
            }
            eprint!("Unsetting {}... ", keys.join(", "));
            release(client, &app, &env, &change).await?;
        }
    }
    Ok(())
}

/// The env of the app's latest release (empty before its first release).
async fn current(client: &Client, app: &str) -> anyhow::Result<Env> {
    let text = releases::latest(client, app).await?.map(|r| r.env).unwrap_or_default();
    Ok(crate::env::parse(&text)?)
}

/// `KEY=VALUE` lines, each ending with a newline.
fn lines(env: &Env) -> String {
    env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// `KEY=VALUE` arguments, split on the first `=`.
fn parse_pairs(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|arg| {
            let Some((key, value)) = arg.split_once('=') else {
                bail!("expected KEY=VALUE, got {arg:?}");
            };
            if key.is_empty() {
                bail!("expected KEY=VALUE, got {arg:?}");
            }
            // One variable per line: a newline would smuggle in another variable.
            if value.contains('\n') || value.contains('\r') {
                bail!("the value of {key} contains a line break");
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Makes a release with `env` (after the caller's `Setting ...` line), prints its id, and
/// promotes it when asked.
async fn release(client: &Client, app: &str, env: &Env, change: &Change) -> anyhow::Result<()> {
    let text = crate::env::format(env);
    let release: serde_json::Value = client
        .post(
            &format!("/apps/{}/releases", client.segment(app)),
            &[("env", text.as_str())],
        )
        .await?;
    let id = release["id"].as_str().unwrap_or_default().to_owned();
    eprintln!("OK");
    if !output::is_json() {
        println!("Release: {id}");
    }
    if change.promote {
        promote::promote(client, app, &id, &change.flags, LogTo::Stdout).await?;
    }
    // With --json, the new release as the API shows it, once any promote has ended.
    output::json(&release)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_on_the_first_equals_sign() {
        let pairs = parse_pairs(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(
            pairs,
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "x=y".to_owned()),
                ("C".to_owned(), String::new())
            ]
        );
        assert!(parse_pairs(&["A".into()]).is_err());
        assert!(parse_pairs(&["=1".into()]).is_err());
        assert!(parse_pairs(&["A=1\nB=2".into()]).is_err());
    }

    #[test]
    fn env_prints_one_line_per_variable() {
        let env = crate::env::parse("B=2\nA=1").unwrap();
        assert_eq!(lines(&env), "A=1\nB=2\n");
        assert_eq!(lines(&Env::new()), "");
    }
}
