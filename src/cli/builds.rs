//! `rack build [DIR]` and `rack builds ...`: package a directory, upload it, build it and
//! follow its log, as `convox build` does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::Digest;

use super::client::Lines;
use super::output;
use super::{AppArg, Client};

/// `rack build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The directory to build.
    #[arg(default_value = ".")]
    dir: PathBuf,
    #[command(flatten)]
    pub app: AppArg,
    /// A description of the build.
    #[arg(short, long, default_value = "")]
    description: String,
    /// Path of the manifest inside the directory.
    #[arg(short, long, default_value = "convox.yml")]
    manifest: String,
    /// Print only the release id on stdout (the build log goes to stderr).
    #[arg(long)]
    pub id: bool,
}

#[derive(Debug, Subcommand)]
pub enum BuildsCommand {
    /// Show a build.
    Info {
        id: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Print a build's log (following it while the build runs).
    Logs {
        id: String,
        #[command(flatten)]
        app: AppArg,
    },
    /// Write a complete build's archive (manifest, source, build output, images) to a file or
    /// standard output, for `rack builds import` on another rack.
    Export {
        id: String,
        #[command(flatten)]
        app: AppArg,
        /// The file to write (default: standard output).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Import a build archive from a file or standard input: a new build and release, ready to
    /// promote without building again.
    Import {
        #[command(flatten)]
        app: AppArg,
        /// The file to read (default: standard input).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Print only the new release's id on stdout.
        #[arg(long)]
        id: bool,
    },
}

/// A build as the API returns it.
#[derive(Debug, Deserialize)]
pub struct Build {
    pub id: String,
    pub status: String,
    pub release: String,
    pub description: String,
    pub reason: String,
    pub started: String,
    pub ended: String,
}

#[derive(Debug, Deserialize)]
struct Uploaded {
    #[serde(rename = "Url")]
    url: String,
}

/// Builds a directory; returns the build (complete) or fails with `build failed`.
pub async fn build(client: &Client, args: &BuildArgs) -> anyhow::Result<Build> {
    let app = args.app.resolve()?;
    let dir = args.dir.clone();
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    eprint!("Packaging source... ");
    let tarball = tokio::task::spawn_blocking(move || package(&dir)).await??;
    eprintln!("OK");

    eprint!("Uploading source... ");
    let url = upload(client, &app, tarball).await?;
    eprintln!("OK");

    eprint!("Starting build... ");
    let build: Build = client
        .post(
            &format!("/apps/{}/builds", client.segment(&app)),
            &[
                ("url", url.as_str()),
                ("description", args.description.as_str()),
                ("manifest", args.manifest.as_str()),
            ],
        )
        .await?;
    eprintln!("OK");
    follow_log(client, &app, &build.id, args.id || output::is_json()).await?;
    let build = wait(client, &app, &build.id).await?;
    if build.status != "complete" {
        bail!("build failed");
    }
    Ok(build)
}

/// Runs `rack build` and prints the ids.
pub async fn run_build(client: &Client, args: BuildArgs) -> anyhow::Result<()> {
    let build = build(client, &args).await?;
    if print_json(client, &args.app.resolve()?, &build.id).await? {
        return Ok(());
    }
    if args.id {
        println!("{}", build.release);
    } else {
        println!("Build: {}", build.id);
        println!("Release: {}", build.release);
    }
    Ok(())
}

/// Runs `rack builds ...`.
pub async fn run(client: &Client, list_app: AppArg, command: Option<BuildsCommand>) -> anyhow::Result<()> {
    match command {
        None => {
            let app = list_app.resolve()?;
            let builds: serde_json::Value = client.get(&format!("/apps/{}/builds", client.segment(&app))).await?;
            if output::json(&builds)? {
                return Ok(());
            }
            let builds: Vec<Build> = serde_json::from_value(builds)?;
            let rows: Vec<Vec<String>> = builds
                .into_iter()
                .map(|b| vec![b.id, b.status, b.release, b.started, b.description])
                .collect();
            print!(
                "{}",
                output::table(&["ID", "STATUS", "RELEASE", "STARTED", "DESCRIPTION"], &rows)
            );
        }
        Some(BuildsCommand::Info { id, app }) => {
            let app = app.or(&list_app).resolve()?;
            let b: serde_json::Value = client
                .get(&format!(
                    "/apps/{}/builds/{}",
                    client.segment(&app),
                    client.segment(&id)
                ))
                .await?;
            if output::json(&b)? {
                return Ok(());
            }
            let b: Build = serde_json::from_value(b)?;
            print!(
                "{}",
                output::info(&[
                    ("Id", b.id),
                    ("Status", b.status),
                    ("Release", b.release),
                    ("Description", b.description),
                    ("Started", b.started),
                    ("Ended", b.ended),
                    ("Reason", b.reason),
                ])
            );
        }
        Some(BuildsCommand::Logs { id, app }) => follow_log(client, &app.or(&list_app).resolve()?, &id, false).await?,
        Some(BuildsCommand::Export { id, app, file }) => {
            export(client, &app.or(&list_app).resolve()?, &id, file.as_deref()).await?;
        }
        Some(BuildsCommand::Import { app, file, id }) => {
            let app = app.or(&list_app).resolve()?;
            let build = import(client, &app, file.as_deref()).await?;
            if output::json(&build)? {
                return Ok(());
            }
            let build: Build = serde_json::from_value(build)?;
            if id {
                println!("{}", build.release);
            } else {
                println!("Build: {}", build.id);
                println!("Release: {}", build.release);
            }
        }
    }
    Ok(())
}

/// `rack builds export`: streams the archive to `file` or standard output.
async fn export(client: &Client, app: &str, id: &str, file: Option<&Path>) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    if file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!("pipe this command into a file or give --file");
    }
    let response = client
        .stream(&format!(
            "/apps/{}/builds/{}.tgz",
            client.segment(app),
            client.segment(id)
        ))
        .await?;
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match file {
        Some(file) => Box::new(
            tokio::fs::File::create(file)
                .await
                .with_context(|| format!("creating {}", file.display()))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.context("reading the archive (the export failed on the rack)")?)
            .await?;
    }
    out.flush().await?;
    eprintln!("Exported build {id}");
    Ok(())
}

/// `rack builds import`: streams the archive from `file` or standard input; the new build.
async fn import(client: &Client, app: &str, file: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    let body = match file {
        Some(file) => {
            let file = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file))
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!("pipe an archive into this command or give --file");
            }
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
        }
    };
    eprint!("Importing build... ");
    let build: serde_json::Value = client
        .post_body(&format!("/apps/{}/builds/import", client.segment(app)), body, &[])
        .await?;
    eprintln!("OK");
    Ok(build)
}

/// With `--json`, prints build `id` as the API shows it and answers true.
///
/// # Errors
/// When the rack cannot be reached.
pub async fn print_json(client: &Client, app: &str, id: &str) -> anyhow::Result<bool> {
    if !output::is_json() {
        return Ok(false);
    }
    let build: serde_json::Value = client
        .get(&format!("/apps/{}/builds/{}", client.segment(app), client.segment(id)))
        .await?;
    output::json(&build)
}

/// A gzip tarball of `dir` (honouring `.dockerignore`) in a temporary file.
fn package(dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    crate::archive::pack_tgz(dir, std::io::BufWriter::new(file.as_file_mut()))
        .with_context(|| format!("packaging {}", dir.display()))?;
    Ok(file)
}

async fn upload(client: &Client, app: &str, tarball: tempfile::NamedTempFile) -> anyhow::Result<String> {
    let path = tarball.path().to_path_buf();
    let (size, digest) = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, String)> {
        use std::io::Read;
        let mut hasher = sha2::Sha256::new();
        let mut file = std::fs::File::open(&path)?;
        let mut buffer = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        Ok((size, crate::objects::hex(&hasher.finalize())))
    })
    .await??;
    let bar = output::progress(size, "{bytes}/{total_bytes} {bar:30} {bytes_per_sec}");
    // Content-addressed: a package the rack already holds (the same source deployed again) is
    // not sent twice. The rack's own digest of what it stores decides, not the key's name.
    let key = format!("sources/{digest}.tgz");
    let path = format!("/apps/{}/objects/{key}", client.segment(app));
    if client.object_digest(&path).await?.as_deref() == Some(digest.as_str()) {
        bar.finish_and_clear();
        eprint!("(unchanged, not sent) ");
        return Ok(format!("object://{app}/{key}"));
    }
    let file = tokio::fs::File::open(tarball.path()).await?;
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            progress.inc(chunk.len() as u64);
        }
    });
    let uploaded: Uploaded = client
        .post_body(
            &path,
            reqwest::Body::wrap_stream(stream),
            &[("x-checksum-sha256", digest), ("content-length", size.to_string())],
        )
        .await?;
    bar.finish_and_clear();
    Ok(uploaded.url)
}

/// Prints a build's log until it ends (the server's final `OK` is not printed), on stdout or,
/// when stdout is kept for the release id (`--id`), on stderr.
async fn follow_log(client: &Client, app: &str, id: &str, to_stderr: bool) -> anyhow::Result<()> {
    let response = client
        .stream(&format!(
            "/apps/{}/builds/{}/logs",
            client.segment(app),
            client.segment(id)
        ))
        .await?;
    let mut lines = Lines::new(response);
    while let Some(line) = lines.next().await {
        if line == "OK\n" {
            continue;
        }
        if to_stderr {
            eprint!("{line}");
        } else {
            print!("{line}");
        }
    }
    Ok(())
}

/// Polls the build until it has ended (the log can end early if the server restarts).
async fn wait(client: &Client, app: &str, id: &str) -> anyhow::Result<Build> {
    let path = format!("/apps/{}/builds/{}", client.segment(app), client.segment(id));
    loop {
        let build: Build = client.get(&path).await?;
        if build.status == "complete" || build.status == "failed" {
            return Ok(build);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
