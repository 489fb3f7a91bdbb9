//! `rack system backup -f FILE` (the whole rack as one archive, checked once downloaded) and
//! `rack system usage` (the disk the rack uses, by kind and by app).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::Client;
use super::output;

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Download a backup of the whole rack (admin); restore it with `rack server --restore FILE`.
    Backup {
        /// Where to write the archive.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Leave the built images out (container services are built again after a restore).
        #[arg(long)]
        no_images: bool,
        /// Leave the resources' data out (a restored rack starts its resources empty).
        #[arg(long)]
        no_resources: bool,
    },
    /// Show the disk the rack uses, by kind and by app.
    Usage,
}

pub async fn run(client: &Client, command: SystemCommand) -> anyhow::Result<()> {
    match command {
        SystemCommand::Backup {
            file,
            no_images,
            no_resources,
        } => backup(client, file, no_images, no_resources).await,
        SystemCommand::Usage => usage(client).await,
    }
}

async fn backup(client: &Client, file: PathBuf, no_images: bool, no_resources: bool) -> anyhow::Result<()> {
    let mut left_out = Vec::new();
    if no_images {
        left_out.push("images=false");
    }
    if no_resources {
        left_out.push("resources=false");
    }
    let path = if left_out.is_empty() {
        "/system/backup".to_owned()
    } else {
        format!("/system/backup?{}", left_out.join("&"))
    };
    let response = client.stream(&path).await?;
    let estimate = response
        .headers()
        .get(crate::api::backup::ESTIMATE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bar = output::progress(estimate, "{bytes}/~{total_bytes} {bar:30} {bytes_per_sec}");
    // Written beside the target and renamed once whole and checked: FILE is never a partial
    // archive.
    let partial = file.with_extension("partial");
    let mut out = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the backup was cut off (nothing kept): try again")?;
        out.write_all(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    out.sync_all().await?;
    drop(out);
    bar.finish_and_clear();
    let checked = partial.clone();
    let verified = tokio::task::spawn_blocking(move || crate::backup::restore::verify(&checked)).await?;
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e.context("the downloaded backup is not whole (nothing kept)"));
        }
    };
    tokio::fs::rename(&partial, &file).await?;
    let size = tokio::fs::metadata(&file).await?.len();
    let summary = serde_json::json!({
        "file": file.display().to_string(),
        "entries": verified.manifest.entries.len(),
        "bytes": size,
        "resources": verified.manifest.resources,
    });
    if output::json(&summary)? {
        return Ok(());
    }
    println!(
        "Backup of {} entries ({}) written to {}",
        verified.manifest.entries.len(),
        human(size),
        file.display()
    );
    // What a restore will not bring back is said, not only written in the manifest.
    for resource in &verified.manifest.resources {
        if let Some(why) = &resource.skipped {
            println!("Resource {} of {} left out: {why}", resource.name, resource.app);
        }
    }
    Ok(())
}

async fn usage(client: &Client) -> anyhow::Result<()> {
    let usage: serde_json::Value = client.get("/system/usage").await?;
    if output::json(&usage)? {
        return Ok(());
    }
    let bytes = |v: &serde_json::Value| human(v.as_u64().unwrap_or(0));
    print!(
        "{}",
        output::info(&[
            (
                "Data",
                usage["data_dir"]["path"].as_str().unwrap_or_default().to_owned()
            ),
            ("Size", bytes(&usage["data_dir"]["bytes"])),
            ("Free", bytes(&usage["data_dir"]["free"])),
            ("Reserve", bytes(&usage["data_dir"]["reserve"])),
        ])
    );
    println!();
    let kinds: Vec<Vec<String>> = usage["kinds"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(kind, size)| vec![kind.clone(), bytes(size)])
        .collect();
    print!("{}", output::table(&["KIND", "SIZE"], &kinds));
    println!();
    let apps: Vec<Vec<String>> = usage["apps"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(app, kinds)| {
            vec![
                app.clone(),
                bytes(&kinds["sources"]),
                bytes(&kinds["builds"]),
                bytes(&kinds["images"]),
                bytes(&kinds["logs"]),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["APP", "SOURCES", "BUILDS", "IMAGES", "LOGS"], &apps)
    );
    Ok(())
}

/// Bytes as people read them (1024-based).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[expect(clippy::cast_precision_loss, reason = "a display figure")]
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}
