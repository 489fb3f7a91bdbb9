//! The seed every test process copies its Postgres cluster from: `initdb`, the migrations of
//! the template database and its first clones, done once per set of migrations and Postgres
//! binaries instead of in every test process, and kept in the temp directory.

use std::time::Duration;

use rack::postgres::{Cluster, Durability};
use sqlx::Connection;

/// The database fresh ones are cloned from: migrated in the seed. It is `template1`, which
/// `initdb` makes anyway, rather than one more database every test process copies;
/// `helpers::empty_database` clones the untouched [`PRISTINE`].
pub const TEMPLATE: &str = "template1";

/// A database as `initdb` made it, with no tables at all.
pub const PRISTINE: &str = "template0";

/// Databases of the seed cloned from the template before it was saved.
pub const READY_DATABASES: usize = 2;

/// The seed every test process copies its cluster from: a stopped cluster whose template
/// database is migrated, with [`READY_DATABASES`] clones of it. `initdb`, the migrations and
/// the first clones cost most of a test process's start; they are done once per set of
/// migrations and Postgres binaries (the seed's name is a digest of both) and kept in the
/// temp directory. Test processes starting together take turns on a lock file: one makes it,
/// the others wait and copy it.
pub fn seed_cluster() -> anyhow::Result<std::path::PathBuf> {
    let tmp = std::env::temp_dir();
    let key = seed_key()?;
    let seed = tmp.join(format!("rack-test-pg-seed-{key}"));
    let lock = std::fs::File::create(tmp.join(format!("rack-test-pg-seed-{key}.lock")))?;
    // Held until this returns.
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    if seed.join("data").join("PG_VERSION").exists() {
        // Its time says when it was last used (see `prune_old_seeds`).
        std::fs::File::open(&seed)?.set_modified(std::time::SystemTime::now())?;
        return Ok(seed);
    }
    // Left by a process that died making it: this one holds the lock.
    let partial = tmp.join(format!("rack-test-pg-seed-{key}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    // Durable: an ephemeral cluster deletes its directory when it stops. Its commits need not
    // wait for the disk (below): what is kept is what the clean stop writes.
    let cluster = Cluster::start(&partial, Durability::Durable)?;
    let admin = cluster.connect_options("postgres");
    let template = cluster.connect_options(TEMPLATE);
    // On a runtime of its own: a pool must not outlive the runtime of the test that happened
    // to come first.
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
                let mut migrating = sqlx::PgConnection::connect_with(&template).await?;
                sqlx::query("set synchronous_commit = off")
                    .execute(&mut migrating)
                    .await?;
                rack::store::MIGRATOR.run(&mut migrating).await?;
                migrating.close().await?;
                for n in 0..READY_DATABASES {
                    rack::store::create_database_from(&mut conn, &ready_database(n), TEMPLATE).await?;
                }
                conn.close().await?;
                anyhow::Ok(())
            })
    })
    .join()
    .expect("the seed thread")?;
    cluster.stop()?;
    drop_spare_wal(&partial.join("data"))?;
    std::fs::rename(&partial, &seed)?;
    prune_old_seeds(&tmp, &seed);
    Ok(seed)
}

/// Removes the WAL segments a cleanly stopped cluster in `pgdata` does not need (all but the
/// one its last checkpoint is in): every test process copies the seed, and they are 16 MB each.
fn drop_spare_wal(pgdata: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(rack::postgres::find_bin_dir()?.join("pg_controldata"))
        .arg(pgdata)
        .env("LC_ALL", "C")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pg_controldata {}: {}",
        pgdata.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let redo = text
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint's REDO WAL file:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("no REDO WAL file in pg_controldata's output:\n{text}"))?;
    let shut_down = text
        .lines()
        .any(|l| l.starts_with("Database cluster state:") && l.ends_with("shut down"));
    anyhow::ensure!(shut_down, "the seed cluster was not shut down cleanly:\n{text}");
    for entry in std::fs::read_dir(pgdata.join("pg_wal"))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let segment = name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit());
        if segment && name != redo {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The name of ready database `n` of the seed.
pub fn ready_database(n: usize) -> String {
    format!("rack_ready_{n}")
}

/// A digest of what the seed depends on: the user (a seed made as root belongs to the
/// `postgres` user), the Postgres binaries, the migrations and how the seed is made.
fn seed_key() -> anyhow::Result<String> {
    use sha2::Digest;
    let bin = rack::postgres::find_bin_dir()?;
    let postgres = std::fs::metadata(bin.join("postgres"))?;
    let mut digest = sha2::Sha256::new();
    digest.update(format!(
        "seed 3: {} {} {} {:?} {READY_DATABASES} {TEMPLATE}\n",
        nix::unistd::geteuid(),
        bin.display(),
        postgres.len(),
        postgres.modified()?
    ));
    for migration in rack::store::MIGRATOR.iter() {
        digest.update(migration.version.to_le_bytes());
        digest.update(&*migration.checksum);
    }
    Ok(digest.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Removes the seeds of other migrations or binaries not used in the last two days (a seed is
/// about 60 MB).
fn prune_old_seeds(tmp: &std::path::Path, keep: &std::path::Path) {
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let path = entry.path();
        let is_seed = entry.file_name().to_string_lossy().starts_with("rack-test-pg-seed-");
        let stale = entry.metadata().and_then(|m| m.modified()).is_ok_and(|at| at < old);
        if is_seed && stale && path != keep && path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Copies the cluster directory `from` to `to` (which must not exist) with owners and modes, as
/// the cluster's user needs them when the tests run as root. Creating its two thousand files is
/// most of the work, in the kernel: each database's directory is copied by a `cp` of its own,
/// side by side.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let make_dir_like = |source: &std::path::Path, dir: &std::path::Path| -> anyhow::Result<()> {
        let meta = std::fs::metadata(source)?;
        std::fs::create_dir(dir)?;
        std::fs::set_permissions(dir, meta.permissions())?;
        std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid()))?;
        Ok(())
    };
    make_dir_like(from, to)?;
    make_dir_like(&from.join("base"), &to.join("base"))?;
    let entries = |dir: &std::path::Path| -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::read_dir(dir)?.map(|e| Ok(e?.path())).collect()
    };
    let rest: Vec<std::path::PathBuf> = entries(from)?
        .into_iter()
        .filter(|p| p.file_name() != Some(std::ffi::OsStr::new("base")))
        .collect();
    // Sparse: the seed's WAL segment is mostly zeros.
    let cp = |sources: &[std::path::PathBuf], into: &std::path::Path| {
        std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .args(sources)
            .arg(into)
            .spawn()
    };
    let mut copies = vec![cp(&rest, to)?];
    for database in entries(&from.join("base"))? {
        copies.push(cp(&[database], &to.join("base"))?);
    }
    for mut copy in copies {
        let status = copy.wait()?;
        anyhow::ensure!(
            status.success(),
            "copying {} to {}: cp {status}",
            from.display(),
            to.display()
        );
    }
    Ok(())
}
