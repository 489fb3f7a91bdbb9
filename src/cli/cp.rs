//! `rack cp` (files into and out of a running process, as `convox cp`) and `rack metrics` (an
//! app's or a service's traffic per period).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::output;
use super::{AppArg, Client};

/// `rack cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local path, or PROCESS:/absolute/path.
    source: String,
    /// Where to: a local path, or PROCESS:/absolute/path.
    destination: String,
    #[command(flatten)]
    app: AppArg,
}

/// `rack metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[command(flatten)]
    app: AppArg,
    /// One service's figures (default: every service summed).
    #[arg(long)]
    service: Option<String>,
    /// Seconds per row.
    #[arg(long, default_value_t = 10)]
    period: u64,
    /// How far back, in seconds (the local router keeps about four minutes).
    #[arg(long, default_value_t = 240)]
    since: i64,
}

/// One side of a copy.
enum Side<'a> {
    Local(&'a str),
    Process { id: &'a str, path: &'a str },
}

fn side(arg: &str) -> anyhow::Result<Side<'_>> {
    match arg.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => {
            if !path.starts_with('/') {
                bail!("paths in processes must be absolute: {arg}");
            }
            Ok(Side::Process { id, path })
        }
        _ => Ok(Side::Local(arg)),
    }
}

pub async fn cp(client: &Client, args: CpArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    match (side(&args.source)?, side(&args.destination)?) {
        (Side::Local(from), Side::Process { id, path }) => upload(client, &app, Path::new(from), id, path).await,
        (Side::Process { id, path }, Side::Local(to)) => download(client, &app, id, path, Path::new(to)).await,
        (Side::Local(_), Side::Local(_)) => bail!("one side of a copy must be a process: PROCESS:/path"),
        (Side::Process { .. }, Side::Process { .. }) => {
            bail!("copying between two processes is not supported: copy to a local path first")
        }
    }
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Copied {
    entries: u64,
    bytes: u64,
}

async fn upload(client: &Client, app: &str, from: &Path, id: &str, to: &str) -> anyhow::Result<()> {
    let from = from.to_path_buf();
    let name = to.trim_start_matches('/').to_owned();
    let tar = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
        let file = tempfile::tempfile()?;
        let mut builder = tar::Builder::new(file);
        builder.follow_symlinks(false);
        let meta = std::fs::metadata(&from).with_context(|| format!("reading {}", from.display()))?;
        if meta.is_dir() {
            builder.append_dir_all(&name, &from)?;
        } else {
            builder.append_path_with_name(&from, &name)?;
        }
        let mut file = builder.into_inner()?;
        std::io::Seek::rewind(&mut file)?;
        Ok(file)
    })
    .await??;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(tar)));
    let path = format!("/apps/{}/processes/{}/files", client.segment(app), client.segment(id));
    let copied: Copied = client
        .post_body(&path, body, &[("content-type", "application/x-tar".to_owned())])
        .await?;
    if !output::json(&copied)? {
        eprintln!(
            "copied {} entries ({} bytes) to {id}:{to}",
            copied.entries, copied.bytes
        );
    }
    Ok(())
}

async fn download(client: &Client, app: &str, id: &str, from: &str, to: &Path) -> anyhow::Result<()> {
    let query = serde_urlencoded::to_string([("file", from)])?;
    let path = format!(
        "/apps/{}/processes/{}/files?{query}",
        client.segment(app),
        client.segment(id)
    );
    let response = client.stream(&path).await?;
    let file = tempfile::tempfile()?;
    let mut writer = tokio::fs::File::from_std(file);
    let mut reader = tokio_util::io::StreamReader::new(response.bytes_stream().map_err(std::io::Error::other));
    tokio::io::copy(&mut reader, &mut writer).await?;
    let mut file = writer.into_std().await;
    std::io::Seek::rewind(&mut file)?;
    let prefix = from.trim_start_matches('/').trim_end_matches('/').to_owned();
    let to = to.to_path_buf();
    let stats = tokio::task::spawn_blocking(move || unpack(file, &prefix, &to)).await??;
    if !output::json(&stats)? {
        eprintln!(
            "copied {} entries ({} bytes) from {id}:{from}",
            stats.entries, stats.bytes
        );
    }
    Ok(())
}

/// Unpacks the tar of `prefix` into `to` (the tar's `prefix` becomes `to`): nothing outside
/// `to`, nothing written through a symlink.
fn unpack(file: std::fs::File, prefix: &str, to: &Path) -> anyhow::Result<Copied> {
    let mut archive = tar::Archive::new(file);
    let mut stats = Copied { entries: 0, bytes: 0 };
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().trim_end_matches('/').to_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            bail!("the process sent {name}, which is not under {prefix}");
        };
        let parts = crate::archive::cp::components(rest)?;
        let target: PathBuf = parts.iter().fold(to.to_path_buf(), |p, part| p.join(part));
        let mut ancestor = to.to_path_buf();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            ancestor.push(part);
            if std::fs::symlink_metadata(&ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!("{name} would be written through the symlink {}", ancestor.display());
            }
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        stats.entries += 1;
        stats.bytes += entry.header().size().unwrap_or(0);
        entry
            .unpack(&target)
            .with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(stats)
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Metric {
    name: String,
    values: Vec<Value>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Value {
    time: chrono::DateTime<chrono::Utc>,
    avg: f64,
    count: f64,
    max: f64,
    min: f64,
    sum: f64,
}

pub async fn metrics(client: &Client, args: MetricsArgs) -> anyhow::Result<()> {
    let app = args.app.resolve()?;
    let now = chrono::Utc::now();
    let start = now - chrono::Duration::seconds(args.since.max(1));
    let query = serde_urlencoded::to_string([
        ("start", start.to_rfc3339()),
        ("end", now.to_rfc3339()),
        ("period", args.period.to_string()),
    ])?;
    let base = match &args.service {
        Some(service) => format!(
            "/apps/{}/services/{}/metrics",
            client.segment(&app),
            client.segment(service)
        ),
        None => format!("/apps/{}/metrics", client.segment(&app)),
    };
    let metrics: serde_json::Value = client.get(&format!("{base}?{query}")).await?;
    if output::json(&metrics)? {
        return Ok(());
    }
    let metrics: Vec<Metric> = serde_json::from_value(metrics)?;
    let find = |name: &str| metrics.iter().find(|m| m.name == name);
    let mut rows = Vec::new();
    if let Some(requests) = find("requests") {
        for value in &requests.values {
            let at = |name: &str| find(name).and_then(|m| m.values.iter().find(|v| v.time == value.time));
            rows.push(vec![
                value.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                format!("{}", value.sum),
                at("errors").map_or_else(String::new, |v| format!("{}", v.sum)),
                at("latency-p95").map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v.max)),
            ]);
        }
    }
    print!("{}", output::table(&["TIME", "REQUESTS", "ERRORS", "P95 MS"], &rows));
    if let Some(memory) = find("memory").and_then(|m| m.values.last()) {
        println!("memory: {:.1} MiB over {} instance(s)", memory.sum, memory.count);
    }
    Ok(())
}
