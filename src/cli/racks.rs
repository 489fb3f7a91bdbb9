//! Saved racks: `rack login URL` checks a credential against a rack and saves both under a
//! name in `racks.json` in the user's configuration directory (mode 0600, as `known_racks`);
//! `rack switch NAME` picks the current one; `rack racks` lists them. A command without
//! `--rack-url`/`RACK_URL` talks to the current saved rack, else to the local one.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::exit::AuthFailed;
use super::{Client, output};

/// The file's name in the configuration directory.
const FILE: &str = "racks.json";

/// `rack login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The rack's address, as http(s)://HOST:PORT (a password in it is used too).
    url: String,
    /// The name to save it under (default: HOST:PORT).
    #[arg(long)]
    name: Option<String>,
    /// The rack's password (default: asked on the terminal, else read from standard input).
    #[arg(long, conflicts_with = "token")]
    password: Option<String>,
    /// An API token (`rack tokens create`), used as the password is.
    #[arg(long)]
    token: Option<String>,
}

/// The saved racks.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Racks {
    /// The name of the rack commands talk to.
    #[serde(default)]
    current: Option<String>,
    #[serde(default)]
    racks: Vec<Saved>,
}

/// One saved rack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub name: String,
    /// Without credentials.
    pub url: String,
    /// The password or token.
    pub password: String,
    /// The certificate fingerprint pinned at login (`--fingerprint`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// One row of `rack racks --json`: never the credential.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    name: &'a str,
    url: &'a str,
    current: bool,
}

/// Where the saved racks live, or `None` without a home.
fn file() -> Option<PathBuf> {
    Some(crate::tls::config_dir()?.join(FILE))
}

impl Racks {
    /// The saved racks (none when the file does not exist).
    ///
    /// # Errors
    /// When the file cannot be read or is not valid.
    pub fn load() -> anyhow::Result<Self> {
        let Some(path) = file() else {
            return Ok(Self::default());
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The current saved rack, if one is chosen.
    pub fn current(&self) -> Option<&Saved> {
        let name = self.current.as_deref()?;
        self.racks.iter().find(|r| r.name == name)
    }

    fn save(&self) -> anyhow::Result<PathBuf> {
        let path = file().context("neither HOME nor XDG_CONFIG_HOME is set: nowhere to save the rack")?;
        write_private(&path, &serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

/// Writes `bytes` to `path` with mode 0600 (its directory 0700), replacing it whole: written
/// beside it, then renamed, so a crash never leaves half a file.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().context("the racks file has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let partial = path.with_extension("partial");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    // A file left from before with a wider mode is narrowed too.
    out.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `rack login URL`: checks the credential (`GET /auth`) and saves the rack as the current one.
///
/// # Errors
/// When the URL is malformed, the rack cannot be reached, or it refuses the credential
/// ([`AuthFailed`], exit 4).
pub async fn login(args: LoginArgs, fingerprint: Option<&str>) -> anyhow::Result<()> {
    let mut url = Url::parse(&args.url).context("the rack's address must look like https://HOST:PORT")?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!(
            "the rack's address must start with http:// or https://, got {}",
            url.scheme()
        );
    }
    let host = url.host_str().context("the rack's address has no host")?.to_owned();
    let in_url = url.password().map(str::to_owned);
    url.set_username("").ok();
    url.set_password(None).ok();
    let password = match args.password.or(args.token) {
        Some(password) => password,
        None => match in_url {
            Some(p) => super::client::percent_decode(&p)?,
            None => read_password()?,
        },
    };
    if password.is_empty() {
        bail!("no password or token given");
    }
    let name = args.name.unwrap_or_else(|| match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    });
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    let url = url.as_str().trim_end_matches('/').to_owned();
    let client = Client::connect(Some(&url), fingerprint)?.with_password(password.clone());
    #[derive(Deserialize)]
    struct Auth {
        role: String,
    }
    let auth: Auth = client.get("/auth").await.map_err(|e| {
        if e.chain().any(|c| c.is::<AuthFailed>()) {
            anyhow::Error::new(AuthFailed(format!(
                "{url} refused this credential ({e}): nothing saved"
            )))
        } else {
            e
        }
    })?;
    let mut racks = Racks::load()?;
    racks.racks.retain(|r| r.name != name);
    racks.racks.push(Saved {
        name: name.clone(),
        url: url.clone(),
        password,
        fingerprint: fingerprint.map(str::to_owned),
    });
    racks.racks.sort_by(|a, b| a.name.cmp(&b.name));
    racks.current = Some(name.clone());
    let path = racks.save()?;
    eprintln!(
        "Logged in to {name} ({url}) with the {} role; saved in {}",
        auth.role,
        path.display()
    );
    output::json(&Listed {
        name: &name,
        url: &url,
        current: true,
    })?;
    Ok(())
}

/// The password: asked without echo on a terminal, else the first line of standard input
/// (`echo "$TOKEN" | rack login URL`).
fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let term = console::Term::stderr();
        term.write_str("Password: ")?;
        return Ok(term.read_secure_line()?.trim().to_owned());
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    Ok(line.trim().to_owned())
}

/// `rack switch NAME`.
///
/// # Errors
/// When no rack is saved under `name`.
pub fn switch(name: &str) -> anyhow::Result<()> {
    let mut racks = Racks::load()?;
    if !racks.racks.iter().any(|r| r.name == name) {
        let names: Vec<&str> = racks.racks.iter().map(|r| r.name.as_str()).collect();
        if names.is_empty() {
            bail!("no rack saved under {name}: save one with rack login URL");
        }
        bail!("no rack saved under {name}; saved: {}", names.join(", "));
    }
    racks.current = Some(name.to_owned());
    racks.save()?;
    eprintln!("Switched to {name}");
    Ok(())
}

/// `rack racks`: the saved racks, the current one marked.
///
/// # Errors
/// When the file cannot be read.
pub fn list() -> anyhow::Result<()> {
    let racks = Racks::load()?;
    let current = racks.current.as_deref();
    let listed: Vec<Listed<'_>> = racks
        .racks
        .iter()
        .map(|r| Listed {
            name: &r.name,
            url: &r.url,
            current: Some(r.name.as_str()) == current,
        })
        .collect();
    if output::json(&listed)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|r| {
            vec![
                r.name.to_owned(),
                r.url.to_owned(),
                if r.current { "*" } else { "" }.to_owned(),
            ]
        })
        .collect();
    print!("{}", output::table(&["NAME", "URL", "CURRENT"], &rows));
    Ok(())
}
