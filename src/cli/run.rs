//! `rack run SERVICE CMD...` (a one-off process of a service's release, attached, or
//! `--detach`ed) and `rack exec PID CMD...` (a command inside a running process), speaking the
//! same protocol as the convox CLI: the process is started as `sleep <timeout>` and the command
//! runs through the exec websocket, with the terminal passed through when stdin is one.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use super::{AppArg, Client, ExitWith};
use crate::api::run::EXIT_MARKER;

/// `rack run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    app: AppArg,
    /// Start it and print its id instead of attaching to it.
    #[arg(long, short = 'd')]
    detach: bool,
    /// The release to run (default: the app's current one).
    #[arg(long)]
    release: Option<String>,
    /// Extra environment variables, `KEY=VALUE` (repeat for more).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Seconds the process may live when attached.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// The service whose release, image and environment it runs with.
    service: String,
    /// What to run.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

/// `rack exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    app: AppArg,
    /// The process.
    pid: String,
    /// What to run.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Process {
    id: String,
    status: String,
}

/// Runs `rack run`.
pub async fn run(client: &Client, args: RunArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let command = shell_words::join(&args.command);
    let mut headers = Vec::new();
    if let Some(release) = &args.release {
        headers.push(("release", release.clone()));
    }
    if !args.env.is_empty() {
        let pairs: Vec<(String, String)> = args
            .env
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--env takes KEY=VALUE, got {pair:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        headers.push(("environment", serde_urlencoded::to_string(pairs)?));
    }
    let path = format!(
        "/apps/{}/services/{}/processes",
        client.segment(&app),
        client.segment(&args.service)
    );
    if args.detach {
        headers.push(("command", command));
        let process: Process = client.post_headers(&path, &headers).await?;
        eprint!("Running detached process... ");
        eprintln!("OK");
        println!("{}", process.id);
        return Ok(());
    }
    headers.push(("command", format!("sleep {}", args.timeout)));
    let process: Process = client.post_headers(&path, &headers).await?;
    let process_path = format!(
        "/apps/{}/processes/{}",
        client.segment(&app),
        client.segment(&process.id)
    );
    let ready = async {
        loop {
            let now: Process = client.get(&process_path).await?;
            match now.status.as_str() {
                "running" => return Ok(()),
                "complete" | "failed" => bail!("process {} ended before the command could run", now.id),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    };
    let result = match tokio::time::timeout(Duration::from_secs(300), ready).await {
        Ok(Ok(())) => exec(client, &app, &process.id, &command).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("process {} did not start within 5 minutes", process.id)),
    };
    // Whatever happened, the one-off goes.
    let _ = client.delete(&process_path).await;
    result
}

/// Runs `rack exec`.
pub async fn run_exec(client: &Client, args: ExecArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    exec(client, &app, &args.pid, &shell_words::join(&args.command)).await
}

/// Runs `command` in process `pid` of `app`, connected to this terminal (or these pipes);
/// ends with the command's exit code.
async fn exec(client: &Client, app: &str, pid: &str, command: &str) -> anyhow::Result<()> {
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut headers = vec![("command", command.to_owned()), ("tty", tty.to_string())];
    if tty {
        let (rows, cols) = console::Term::stdout().size();
        headers.push(("height", rows.to_string()));
        headers.push(("width", cols.to_string()));
    }
    let path = format!("/apps/{}/processes/{}/exec", client.segment(app), client.segment(pid));
    let socket = client.websocket(&path, &headers).await?;
    let _raw = if tty { RawMode::enter() } else { None };
    let (mut sink, mut source) = socket.split();
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
        // The end of input: one empty binary frame.
        let _ = sink.send(Message::Binary(Vec::new().into())).await;
    });
    let mut code = None;
    let mut stdout = std::io::stdout();
    while let Some(message) = source.next().await {
        match message.context("the exec connection broke")? {
            Message::Text(text) => match text.strip_prefix(EXIT_MARKER).and_then(|rest| rest.strip_prefix(':')) {
                Some(rest) => code = rest.trim().parse::<i32>().ok(),
                None => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
            },
            Message::Binary(data) if data.is_empty() => break,
            Message::Binary(data) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    input.abort();
    match code {
        Some(0) => Ok(()),
        Some(code) => Err(ExitWith(code).into()),
        None => bail!("the command's exit code never came"),
    }
}

/// The terminal in raw mode (keys go to the remote command as typed) until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}
