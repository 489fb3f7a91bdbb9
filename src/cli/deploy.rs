//! `rack deploy [DIR]`: `rack build`, then a promote of the new release, as `convox deploy`.

use clap::Args;

use super::builds::{self, BuildArgs};
use super::promote::{self, LogTo, PromoteFlags};
use super::{Client, output};

/// `rack deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    promote: PromoteFlags,
}

/// Builds the directory and promotes the release; succeeds only once that release is active.
///
/// # Errors
/// When the build fails, the promote is refused, or the rollout fails or is rolled back.
pub async fn run(client: &Client, args: DeployArgs) -> anyhow::Result<()> {
    let app = args.build.app.resolve()?;
    let build = builds::build(client, &args.build).await?;
    // With `--id` stdout carries the release id alone, so the rollout log goes to stderr.
    let log = if args.build.id || output::is_json() {
        LogTo::Stderr
    } else {
        println!("Build: {}", build.id);
        println!("Release: {}", build.release);
        LogTo::Stdout
    };
    promote::promote(client, &app, &build.release, &args.promote, log).await?;
    if builds::print_json(client, &app, &build.id).await? {
        return Ok(());
    }
    if args.build.id {
        println!("{}", build.release);
    }
    Ok(())
}
