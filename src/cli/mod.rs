//! The `rack` command line: `rack server` runs the server; every other command is a client
//! of a rack's HTTP API, found through `--rack-url`/`RACK_URL` as the convox CLI does, else
//! the rack saved by `rack login` and chosen by `rack switch`, else the local rack.

mod apps;
mod audit;
mod builds;
mod certs;
mod client;
mod cp;
mod deploy;
mod diff;
mod env;
mod exit;
mod logs;
mod output;
mod promote;
mod ps;
mod rack_resources;
mod rack_system;
mod racks;
mod registries;
mod releases;
mod resources;
mod run;
mod services;
mod system;
mod tokens;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServerArgs};

pub use client::Client;

/// rack: build, release and deploy apps.
#[derive(Debug, Parser)]
#[command(name = "rack", version, about, propagate_version = true)]
pub struct Cli {
    /// The rack to talk to, as http://:PASSWORD@HOST:PORT. Without it, the current rack saved
    /// by `rack login`, else the local rack's default address and saved password.
    #[arg(long, env = "RACK_URL", global = true, hide_env_values = true)]
    rack_url: Option<String>,
    /// Over https: accept only a certificate with this SHA-256 fingerprint (as rack server
    /// prints it). Without it, a certificate the system trusts, else the one saved in
    /// ~/.config/rack/known_racks on the first connection.
    #[arg(long, env = "RACK_FINGERPRINT", global = true)]
    fingerprint: Option<String>,
    /// Print what the command lists or shows as JSON (the API's own fields): one object or
    /// one array on stdout, progress and logs on stderr.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the rack API server.
    Server(Box<ServerArgs>),
    /// List apps, or create, inspect, lock and delete one.
    Apps {
        #[command(subcommand)]
        command: Option<apps::AppsCommand>,
    },
    /// Show the rack this client talks to; `rack rack ps`, `releases`, `params`, `logs`,
    /// `resources ...`: the rack itself and its rack-wide resources.
    Rack {
        #[command(subcommand)]
        command: Option<rack_system::RackCommand>,
    },
    /// Check a password or token against a rack and save both as the current rack.
    Login(racks::LoginArgs),
    /// Choose the saved rack commands talk to.
    Switch {
        /// The name it was saved under (see `rack racks`).
        name: String,
    },
    /// List the saved racks (the current one marked).
    Racks,
    /// Print a shell completion script: `rack completion bash > /etc/bash_completion.d/rack`.
    Completion {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Package a directory, upload it and build it.
    Build(builds::BuildArgs),
    /// List an app's builds, or show one or its log.
    Builds {
        #[command(flatten)]
        app: AppArg,
        #[command(subcommand)]
        command: Option<builds::BuildsCommand>,
    },
    /// Build a directory and promote the release it makes.
    Deploy(deploy::DeployArgs),
    /// List an app's releases, or show, promote or roll back to one.
    Releases {
        #[command(flatten)]
        app: AppArg,
        /// How many releases to list (the rack's default is 10).
        #[arg(long)]
        limit: Option<u32>,
        #[command(subcommand)]
        command: Option<releases::ReleasesCommand>,
    },
    /// Print an app's environment, or get, set or unset one variable.
    Env {
        #[command(flatten)]
        app: AppArg,
        #[command(subcommand)]
        command: Option<env::EnvCommand>,
    },
    /// Print an app's logs (following them unless told not to).
    Logs(logs::LogsArgs),
    /// List an app's services and their counts.
    Services {
        #[command(flatten)]
        app: AppArg,
    },
    /// Set how many processes a service runs (for later deployments too).
    Scale(services::ScaleArgs),
    /// Who changed what: the audit log (admin).
    Audit(audit::AuditArgs),
    /// List certificates, or import, generate, renew or delete one (admin to change).
    Certs {
        #[command(subcommand)]
        command: Option<certs::CertsCommand>,
    },
    /// List which of an app's services serve which certificate, or give one a certificate.
    Ssl {
        #[command(flatten)]
        app: AppArg,
        #[command(subcommand)]
        command: Option<certs::SslCommand>,
    },
    /// List private registries, or add or remove one (admin).
    Registries {
        #[command(subcommand)]
        command: Option<registries::RegistriesCommand>,
    },
    /// List API tokens, or create or revoke one (admin).
    Tokens {
        #[command(subcommand)]
        command: Option<tokens::TokensCommand>,
    },
    /// Back the rack up, or show the disk it uses.
    System {
        #[command(subcommand)]
        command: system::SystemCommand,
    },
    /// Run a one-off process of a service (attached; --detach to start it and return).
    Run(run::RunArgs),
    /// Run a command inside a running process.
    Exec(run::ExecArgs),
    /// Copy files into or out of a running process: `rack cp ./x PROCESS:/app/x`, `rack cp
    /// PROCESS:/app/log ./log`.
    Cp(cp::CpArgs),
    /// An app's (or one service's) requests, errors, p95 latency and memory per period.
    Metrics(cp::MetricsArgs),
    /// List an app's resources (convox.yml `resources:`), or show, export, import or delete one.
    Resources {
        #[command(flatten)]
        app: AppArg,
        #[command(subcommand)]
        command: Option<resources::ResourcesCommand>,
    },
    /// List the machines that run the apps: this host, or the cluster's nodes.
    Instances,
    /// List an app's processes, or stop (restart) one.
    Ps {
        #[command(flatten)]
        app: AppArg,
        #[command(subcommand)]
        command: Option<ps::PsCommand>,
    },
    /// (Run by rack server, not by users.) Forwards linked resources' ports into a container.
    #[command(name = crate::runtime::local::forwarder::SUBCOMMAND, hide = true)]
    ResourceForwarder {
        /// The container's first process (its network namespace).
        #[arg(long)]
        pid: u32,
        /// The ports of 127.0.0.1 to forward.
        ports: Vec<u16>,
    },
    /// (Run by rack server, not by users.) Keeps a service's process running across restarts
    /// of rack, holding its output.
    #[command(name = crate::runtime::local::keeper::SUBCOMMAND, hide = true)]
    AppKeeper {
        /// Where it keeps its state and the output.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The instance, as rack describes it (JSON).
        #[arg(long)]
        describe: String,
        /// The uid the command runs as.
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        /// The gid the command runs as.
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// The command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

impl Cli {
    /// Whether this runs an app's keeper (`rack app-keeper`).
    pub fn is_keeper(&self) -> bool {
        matches!(self.command, Command::AppKeeper { .. })
    }
}

/// The shells `rack completion` writes a script for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The app a command works on: `--app`, else the name in `.convox/app`, else the name of the
/// current directory (as the convox CLI decides).
#[derive(Debug, Clone, Args)]
pub struct AppArg {
    /// The app (default: .convox/app, else the current directory's name).
    #[arg(short = 'a', long = "app", env = "RACK_APP")]
    app: Option<String>,
}

impl AppArg {
    /// The app's name.
    ///
    /// # Errors
    /// When no name can be found.
    pub fn resolve(&self) -> anyhow::Result<String> {
        if let Some(app) = &self.app {
            return Ok(app.clone());
        }
        if let Ok(text) = std::fs::read_to_string(".convox/app")
            && !text.trim().is_empty()
        {
            return Ok(text.trim().to_owned());
        }
        let cwd = std::env::current_dir().context("finding the current directory")?;
        cwd.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .context("no app given: use --app NAME")
    }

    /// This `-a`, else `outer`'s: `rack builds -a APP info ID` names the app before the
    /// subcommand, `rack builds info ID -a APP` after it.
    pub fn or(self, outer: &AppArg) -> AppArg {
        AppArg {
            app: self.app.or_else(|| outer.app.clone()),
        }
    }
}

pub use exit::ExitWith;

/// Runs a parsed command line; the exit code is 0 on success, else (after `ERROR: <message>`
/// on stderr) the one [`exit::code`] gives the error: 1, or 3, 4, 5 for a rollback, a refused
/// credential, an unreachable rack.
pub async fn run(cli: Cli) -> ExitCode {
    output::set_json(cli.json);
    let result = match cli.command {
        Command::Server(args) => server(*args).await,
        Command::Login(args) => racks::login(args, cli.fingerprint.as_deref()).await,
        Command::Switch { name } => racks::switch(&name),
        Command::Racks => racks::list(),
        Command::ResourceForwarder { pid, ports } => crate::runtime::local::forwarder::serve(pid, &ports).await,
        Command::AppKeeper {
            dir,
            describe,
            uid,
            gid,
            argv,
        } => crate::runtime::local::keeper::serve(&dir, &describe, uid.zip(gid), &argv).await,
        Command::Completion { shell } => {
            completion(shell);
            Ok(())
        }
        command => match connect(cli.rack_url.as_deref(), cli.fingerprint.as_deref()) {
            Ok(client) => match command {
                Command::Apps { command } => apps::run(&client, command).await,
                Command::Rack { command: None } => show_rack(&client).await,
                Command::Rack { command: Some(command) } => rack_system::run(&client, command).await,
                Command::Instances => rack_system::instances(&client).await,
                Command::Build(args) => builds::run_build(&client, args).await,
                Command::Builds { app, command } => builds::run(&client, app, command).await,
                Command::Deploy(args) => deploy::run(&client, args).await,
                Command::Releases { app, limit, command } => releases::run(&client, app, limit, command).await,
                Command::Env { app, command } => env::run(&client, app, command).await,
                Command::Logs(args) => logs::run(&client, args).await,
                Command::Ps { app, command } => ps::run(&client, app, command).await,
                Command::Resources { app, command } => resources::run(&client, app, command).await,
                Command::Run(args) => run::run(&client, args).await,
                Command::Exec(args) => run::run_exec(&client, args).await,
                Command::Cp(args) => cp::cp(&client, args).await,
                Command::Metrics(args) => cp::metrics(&client, args).await,
                Command::Tokens { command } => tokens::run(&client, command).await,
                Command::Registries { command } => registries::run(&client, command).await,
                Command::Certs { command } => certs::run(&client, command).await,
                Command::Ssl { app, command } => certs::ssl(&client, app, command).await,
                Command::Audit(args) => audit::run(&client, args).await,
                Command::Services { app } => services::list(&client, app).await,
                Command::Scale(args) => services::scale(&client, args).await,
                Command::System { command } => system::run(&client, command).await,
                Command::Server(_)
                | Command::Login(_)
                | Command::Switch { .. }
                | Command::Racks
                | Command::ResourceForwarder { .. }
                | Command::AppKeeper { .. }
                | Command::Completion { .. } => unreachable!("handled above"),
            },
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A remote command's own exit code, passed through.
        Err(e) if e.downcast_ref::<ExitWith>().is_some() => {
            let code = e.downcast_ref::<ExitWith>().map_or(1, |c| c.0);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            ExitCode::from(exit::code(&e))
        }
    }
}

/// The client for a command. Precedence: `--rack-url`/`RACK_URL`, else the current rack saved
/// by `rack login` (its fingerprint unless `--fingerprint`/`RACK_FINGERPRINT` says), else the
/// local rack with the password its data directory holds.
fn connect(rack_url: Option<&str>, fingerprint: Option<&str>) -> anyhow::Result<Client> {
    if rack_url.is_some() {
        return Client::connect(rack_url, fingerprint);
    }
    let racks = racks::Racks::load()?;
    match racks.current() {
        Some(saved) => {
            let fingerprint = fingerprint.or(saved.fingerprint.as_deref());
            Ok(Client::connect(Some(&saved.url), fingerprint)?.with_password(saved.password.clone()))
        }
        None => Client::connect(None, fingerprint),
    }
}

/// Writes the completion script for `shell` to stdout.
fn completion(shell: Shell) {
    use clap::CommandFactory;
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "rack", &mut std::io::stdout());
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format, "info,rack=debug,tower_http=info,sqlx=warn");
    let config = Config::from_args(args)?;
    let app = crate::Application::build(config).await?;
    let stop = CancellationToken::new();
    let signal = {
        let stop = stop.clone();
        async move {
            crate::shutdown_signal().await;
            tracing::info!("shutting down");
            stop.cancel();
        }
    };
    tokio::spawn(signal);
    app.run_until_stopped(stop).await
}

async fn show_rack(client: &Client) -> anyhow::Result<()> {
    let system: serde_json::Value = client.get("/system").await?;
    if output::json(&system)? {
        return Ok(());
    }
    let field = |name: &str| system[name].as_str().unwrap_or_default().to_owned();
    print!(
        "{}",
        output::info(&[
            ("Name", field("name")),
            ("Provider", field("provider")),
            ("Router", field("domain")),
            ("Status", field("status")),
            ("Version", field("version")),
        ])
    );
    Ok(())
}
