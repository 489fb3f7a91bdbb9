//! TLS on the API: the server's certificate (given as PEM files, or a self-signed one the
//! embedded default generates into its data directory), re-read when its files change so a
//! renewed certificate needs no restart; and the CLI's side, which trusts a rack's certificate
//! by the system's roots, by a pinned SHA-256 fingerprint (`RACK_FINGERPRINT`), or on first use
//! as ssh does (`known_racks`). rustls with the ring provider throughout: kube's client already
//! builds it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often, at most, the certificate files are looked at again (a handshake does it when
/// this long has passed since the last look).
pub const RECHECK: Duration = Duration::from_secs(2);

/// The ring provider: the one crypto provider rack builds.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default crypto provider. Every reqwest client needs one when it is
/// built, even for plain http (reqwest is built with rustls but without a provider of its own,
/// which would be aws-lc-rs and its C build): call this before building any, as `rack`'s main,
/// [`crate::Application::build`] and the CLI's client do. Calling it again does nothing.
pub fn install_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Fails only when a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The SHA-256 of a certificate (DER), as `SHA256:AB:CD:...` (the hex `openssl x509
/// -fingerprint -sha256` prints, after the prefix).
pub fn fingerprint(cert: &[u8]) -> String {
    format_fingerprint(&Sha256::digest(cert).into())
}

/// `SHA256:` and the colon-separated upper-case hex of a digest.
pub fn format_fingerprint(digest: &[u8; 32]) -> String {
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// Reads a fingerprint as the server prints it, or as plain hex (with or without colons,
/// either case, with or without the `SHA256:` prefix).
///
/// # Errors
/// When it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> anyhow::Result<[u8; 32]> {
    let text = text.trim();
    let hex = match text.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &text[7..],
        _ => text,
    };
    let digits: String = hex.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "a certificate fingerprint is 32 bytes of hex, like SHA256:AB:CD:... as rack server prints it, got {text:?}"
        );
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// Loads a certificate chain and its key, checking that they belong together.
fn load_pair(files: &CertFiles) -> anyhow::Result<CertifiedKey> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading the certificate {} (PEM)", files.cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", files.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {} (PEM)", files.key.display()))?;
    CertifiedKey::from_der(certs, key, &provider()).with_context(|| {
        format!(
            "the key {} does not go with the certificate {}",
            files.key.display(),
            files.cert.display()
        )
    })
}

/// What identifies a version of the two files: a replaced or rewritten file changes it.
type Stamp = Vec<(Option<SystemTime>, u64, u64)>;

fn stamp(files: &CertFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key]
        .iter()
        .map(|path| match std::fs::metadata(path) {
            Ok(meta) => (meta.modified().ok(), meta.len(), meta.ino()),
            Err(_) => (None, 0, 0),
        })
        .collect()
}

/// The server's certificate, re-read from its files when they change (looked at by a
/// handshake at most every [`RECHECK`]): new connections get the new one. A pair that does
/// not load (half-written, key and certificate not matching yet) is logged and the one in use
/// kept, until the files change again.
#[derive(Debug)]
struct Reloading {
    files: CertFiles,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

impl Reloading {
    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.checked.elapsed() >= RECHECK {
            current.checked = Instant::now();
            let now = stamp(&self.files);
            if now != current.stamp {
                current.stamp = now;
                match load_pair(&self.files) {
                    Ok(key) => {
                        let key = Arc::new(key);
                        tracing::info!(
                            fingerprint = %fingerprint(key.cert[0].as_ref()),
                            "the certificate files changed: new connections use the new certificate"
                        );
                        current.key = key;
                    }
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        "the certificate files changed but do not load; keeping the certificate in use"
                    ),
                }
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The listener's TLS: accepts handshakes with the current certificate.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    certificate: Arc<Reloading>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.certificate.files).finish()
    }
}

impl Tls {
    /// TLS with the certificate and key in `files`.
    ///
    /// # Errors
    /// When they cannot be read or do not belong together.
    pub fn from_files(files: CertFiles) -> anyhow::Result<Self> {
        let stamp = stamp(&files);
        let key = Arc::new(load_pair(&files)?);
        let certificate = Arc::new(Reloading {
            files,
            current: Mutex::new(Current {
                key,
                stamp,
                checked: Instant::now(),
            }),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        // The listener speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }

    /// The fingerprint of the certificate in use.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.certificate.current().cert[0].as_ref())
    }

    /// Runs the server side of a handshake on `stream` (the caller bounds its time).
    ///
    /// # Errors
    /// When the handshake fails.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<Shared> {
        let stream = self.acceptor.accept(stream).await?;
        Ok(Shared(Arc::new(Mutex::new(stream))))
    }
}

/// A TLS connection that hyper reads and writes, and that the listener can still write a last
/// answer on (408) once hyper has given up on it. Only one of them uses it at a time, so the
/// lock is never contended.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<tokio_rustls::server::TlsStream<TcpStream>>>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(Pin<&mut tokio_rustls::server::TlsStream<TcpStream>>) -> T) -> T {
        let mut stream = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(Pin::new(&mut *stream))
    }

    /// Writes `bytes` and closes the TLS session (best effort, for at most a second).
    pub async fn write_last(&self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut this = self.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            this.write_all(bytes).await?;
            this.shutdown().await
        })
        .await;
    }
}

impl AsyncRead for Shared {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Shared {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.with(|s| s.poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

/// The self-signed certificate of the embedded default, in its data directory.
pub fn self_signed_files(data_dir: &Path) -> CertFiles {
    CertFiles {
        cert: data_dir.join("tls-cert.pem"),
        key: data_dir.join("tls-key.pem"),
    }
}

/// The embedded default's certificate: the one in the data directory, else a new self-signed
/// one for 127.0.0.1, ::1, localhost, the machine's name and the bound address. Returns the
/// files and whether they were generated now.
///
/// # Errors
/// When the files cannot be written.
pub fn ensure_self_signed(data_dir: &Path, bind: SocketAddr) -> anyhow::Result<(CertFiles, bool)> {
    let files = self_signed_files(data_dir);
    if files.cert.exists() && files.key.exists() {
        return Ok((files, false));
    }
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Some(host) = hostname() {
        names.push(host);
    }
    let ip = bind.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).context("naming the self-signed certificate")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "rack");
    let key = rcgen::KeyPair::generate().context("generating the certificate's key")?;
    let cert = params.self_signed(&key).context("making the self-signed certificate")?;
    // The key first, and each file whole (written aside, then renamed): a crash leaves no
    // certificate without its key.
    write_private(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok((files, true))
}

/// The machine's name, when it can be a DNS name in a certificate.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_lowercase();
    let valid = !name.is_empty()
        && name.len() < 254
        && name != "localhost"
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() < 64 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    valid.then_some(name)
}

/// Writes `path` whole with `mode`, through a temporary file renamed over it.
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let aside = path.with_extension("pem.new");
    let _ = std::fs::remove_file(&aside);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&aside)
        .with_context(|| format!("creating {}", aside.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// The CLI's side.

/// How the CLI decides to trust a rack's certificate when the system's roots do not vouch
/// for it.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Only a certificate with this SHA-256 (`RACK_FINGERPRINT`).
    Pinned([u8; 32]),
    /// The fingerprint saved in `file` for `rack` (`host:port`) on the first connection; the
    /// first connection saves it.
    KnownRacks { file: PathBuf, rack: String },
}

/// Verifies a rack's certificate for the CLI: a certificate the system's roots vouch for is
/// accepted (unless a fingerprint is pinned), else its fingerprint must be the pinned or
/// known one; an unknown rack's is saved on first use. A refusal's message is kept for the
/// command to print (rustls' own error would only say the certificate is invalid).
#[derive(Debug)]
pub struct Verifier {
    roots: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    trust: Trust,
    provider: Arc<CryptoProvider>,
    refusal: Mutex<Option<String>>,
    saving: Mutex<()>,
}

impl Verifier {
    /// A verifier for `trust`, with the system's roots when they can be loaded.
    pub fn new(trust: Trust) -> Self {
        let provider = provider();
        let mut store = rustls::RootCertStore::empty();
        // A pinned fingerprint is the only thing that counts: no need to read the roots.
        if matches!(trust, Trust::KnownRacks { .. }) {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
        }
        let roots = (!store.is_empty())
            .then(|| {
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .ok()
            })
            .flatten();
        Self {
            roots,
            trust,
            provider,
            refusal: Mutex::new(None),
            saving: Mutex::new(()),
        }
    }

    /// Why the last handshake was refused, if it was.
    pub fn refusal(&self) -> Option<String> {
        self.refusal.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A rustls client configuration that verifies with this verifier.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    fn refuse(&self, message: String) -> rustls::Error {
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(message.clone());
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    }

    fn check(&self, seen: [u8; 32], roots_vouch: bool) -> Result<(), rustls::Error> {
        let shown = format_fingerprint(&seen);
        match &self.trust {
            Trust::Pinned(pinned) if *pinned == seen => Ok(()),
            Trust::Pinned(pinned) => Err(self.refuse(format!(
                "the rack's certificate has the fingerprint {shown}, not the {} of RACK_FINGERPRINT: \
                 someone may be intercepting the connection. If the rack's certificate was replaced, \
                 set RACK_FINGERPRINT to the fingerprint rack server printed",
                format_fingerprint(pinned)
            ))),
            Trust::KnownRacks { .. } if roots_vouch => Ok(()),
            Trust::KnownRacks { file, rack } => {
                // Connections made at once save one line, not one each.
                let _saving = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
                self.check_known(file, rack, seen)
            }
        }
    }

    fn check_known(&self, file: &Path, rack: &str, seen: [u8; 32]) -> Result<(), rustls::Error> {
        let shown = format_fingerprint(&seen);
        match known_fingerprint(file, rack) {
            Ok(Some(known)) if known == seen => Ok(()),
            Ok(Some(known)) => Err(self.refuse(format!(
                "the certificate of the rack at {rack} has changed: it presents {shown}, but {} holds {} for it. \
                 Someone may be intercepting the connection. If the rack's certificate was replaced on purpose, \
                 remove the line of {rack} from {} (or set RACK_FINGERPRINT to the fingerprint rack server printed)",
                file.display(),
                format_fingerprint(&known),
                file.display()
            ))),
            Ok(None) => match remember(file, rack, &seen) {
                Ok(()) => {
                    eprintln!(
                        "rack: first connection to the rack at {rack}; its certificate's fingerprint is {shown}\n\
                         rack: saved it in {} (check it against the one rack server printed)",
                        file.display()
                    );
                    Ok(())
                }
                Err(e) => Err(self.refuse(format!(
                    "the rack at {rack} has a certificate no system root vouches for ({shown}) and it could not be saved: {e:#}; \
                     set RACK_FINGERPRINT to the fingerprint rack server printed"
                ))),
            },
            Err(e) => Err(self.refuse(format!("reading {}: {e:#}", file.display()))),
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let roots_vouch = matches!(self.trust, Trust::KnownRacks { .. })
            && self.roots.as_ref().is_some_and(|roots| {
                roots
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                    .is_ok()
            });
        self.check(Sha256::digest(end_entity.as_ref()).into(), roots_vouch)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The user's rack configuration directory (`$XDG_CONFIG_HOME/rack`, else `~/.config/rack`),
/// or `None` without a home.
pub fn config_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(dir.join("rack"))
}

/// `known_racks` in the user's configuration directory ([`config_dir`]), or `None` without a
/// home.
pub fn known_racks_file() -> Option<PathBuf> {
    Some(config_dir()?.join("known_racks"))
}

/// The fingerprint `file` holds for `rack` (lines `host:port SHA256:...`).
fn known_fingerprint(file: &Path, rack: &str) -> anyhow::Result<Option<[u8; 32]>> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(print)) = (words.next(), words.next())
            && name == rack
        {
            return parse_fingerprint(print).map(Some);
        }
    }
    Ok(None)
}

/// Adds `rack`'s fingerprint to `file` (created with mode 0600, its directory 0700).
fn remember(file: &Path, rack: &str, seen: &[u8; 32]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)?;
    writeln!(out, "{rack} {}", format_fingerprint(seen))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_back_in_every_spelling() {
        let digest: [u8; 32] = Sha256::digest(b"x").into();
        let shown = format_fingerprint(&digest);
        assert!(shown.starts_with("SHA256:"));
        assert_eq!(parse_fingerprint(&shown).unwrap(), digest);
        let plain: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_fingerprint(&plain).unwrap(), digest);
        assert_eq!(parse_fingerprint(&format!(" sha256:{plain} ")).unwrap(), digest);
        assert!(parse_fingerprint("SHA256:abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_generated_certificate_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let (files, generated) = ensure_self_signed(dir.path(), bind).unwrap();
        assert!(generated);
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = Tls::from_files(files.clone()).unwrap().fingerprint();
        let (again, generated) = ensure_self_signed(dir.path(), bind).unwrap();
        assert!(!generated);
        assert_eq!(again, files);
        assert_eq!(Tls::from_files(again).unwrap().fingerprint(), first);
    }

    #[test]
    fn changed_files_are_picked_up_and_a_bad_pair_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let (files, _) = ensure_self_signed(dir.path(), bind).unwrap();
        let tls = Tls::from_files(files.clone()).unwrap();
        let first = tls.fingerprint();
        // As if RECHECK had passed since the last look.
        let due = || {
            tls.certificate.current.lock().unwrap().checked = Instant::now().checked_sub(RECHECK).unwrap();
        };
        std::fs::write(&files.cert, "not a certificate").unwrap();
        due();
        assert_eq!(tls.fingerprint(), first, "a bad pair leaves the certificate in use");
        let other = tempfile::tempdir().unwrap();
        let (new, _) = ensure_self_signed(other.path(), bind).unwrap();
        std::fs::copy(&new.key, &files.key).unwrap();
        std::fs::copy(&new.cert, &files.cert).unwrap();
        assert_eq!(tls.fingerprint(), first, "looked at again only after RECHECK");
        due();
        let second = tls.fingerprint();
        assert_ne!(second, first);
        assert_eq!(second, Tls::from_files(new).unwrap().fingerprint());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let (a, _) = ensure_self_signed(one.path(), bind).unwrap();
        let (b, _) = ensure_self_signed(two.path(), bind).unwrap();
        let mixed = CertFiles {
            cert: a.cert,
            key: b.key,
        };
        let error = format!("{:#}", Tls::from_files(mixed).unwrap_err());
        assert!(error.contains("does not go with the certificate"), "{error}");
    }

    #[test]
    fn known_racks_are_saved_then_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rack/known_racks");
        let trust = Trust::KnownRacks {
            file: file.clone(),
            rack: "127.0.0.1:5443".into(),
        };
        let first: [u8; 32] = Sha256::digest(b"first").into();
        let other: [u8; 32] = Sha256::digest(b"other").into();
        let verifier = Verifier::new(trust);
        verifier.check(first, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        verifier.check(first, false).unwrap();
        assert!(verifier.check(other, false).is_err());
        let message = verifier.refusal().unwrap();
        assert!(message.contains(&format_fingerprint(&first)), "{message}");
        assert!(message.contains(&format_fingerprint(&other)), "{message}");
        // A certificate the system's roots vouch for needs no pin.
        verifier.check(other, true).unwrap();
        // A pinned fingerprint is the only one accepted, roots or not.
        let pinned = Verifier::new(Trust::Pinned(first));
        pinned.check(first, false).unwrap();
        assert!(pinned.check(other, true).is_err());
    }
}
