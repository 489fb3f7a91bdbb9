//! Secrets rack keeps in its database encrypted (private registries' passwords): sealed with
//! ChaCha20-Poly1305 (ring's, which the TLS stack already builds) under the rack's secrets key.
//! The key is `RACK_SECRETS_KEY` (base64 of 32 bytes) when set, which replicas on one external
//! DATABASE_URL must share; else the data directory's `secrets.key`, made (mode 0600) the first
//! time a secret is sealed. A sealed value is `nonce || ciphertext || tag`, and names what it
//! belongs to as associated data, so a value copied onto another row does not open.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The file in the data directory that keeps a generated key.
pub const KEY_FILE: &str = "secrets.key";

/// Bytes of a key.
const KEY_LEN: usize = 32;

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secrets key: {0}")]
    Key(String),
    #[error(
        "a stored secret does not open with this rack's key (RACK_SECRETS_KEY, or secrets.key in the \
         data directory): it was sealed under another key, or changed"
    )]
    Undecryptable,
}

/// Where the key comes from, and the key once read.
pub struct Keyring {
    setting: Option<[u8; KEY_LEN]>,
    file: PathBuf,
    loaded: Mutex<Option<[u8; KEY_LEN]>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("from_setting", &self.setting.is_some())
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// What a secret belongs to, its associated data: `kind:name` (`registry:127.0.0.1:5000`).
pub fn owner(kind: &str, name: &str) -> String {
    format!("{kind}:{name}")
}

/// Decodes a key given as base64 of 32 bytes (`openssl rand -base64 32`).
fn decode_key(text: &str) -> Result<[u8; KEY_LEN], SecretError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| SecretError::Key("it is not base64 (make one with `openssl rand -base64 32`)".into()))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        SecretError::Key(format!(
            "it is {} bytes, not {KEY_LEN} (make one with `openssl rand -base64 32`)",
            bytes.len()
        ))
    })
}

impl Keyring {
    /// The key of `setting` (RACK_SECRETS_KEY) when given, else the one kept in `data_dir`.
    ///
    /// # Errors
    /// When the setting is not a valid key.
    pub fn new(setting: Option<&str>, data_dir: &Path) -> Result<Self, SecretError> {
        let setting = setting
            .map(|text| decode_key(text).map_err(|e| SecretError::Key(format!("RACK_SECRETS_KEY: {e}"))))
            .transpose()?;
        Ok(Self {
            setting,
            file: data_dir.join(KEY_FILE),
            loaded: Mutex::new(None),
        })
    }

    /// Whether the key is given by the setting (else the data directory's file).
    pub fn from_setting(&self) -> bool {
        self.setting.is_some()
    }

    /// The key: the setting's, or the file's, made on first use when `create`.
    fn key(&self, create: bool) -> Result<LessSafeKey, SecretError> {
        let bytes = match self.setting {
            Some(bytes) => bytes,
            None => {
                let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match *loaded {
                    Some(bytes) => bytes,
                    None => {
                        let bytes = read_or_create(&self.file, create)?;
                        *loaded = Some(bytes);
                        bytes
                    }
                }
            }
        };
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| SecretError::Key("rejected".into()))?;
        Ok(LessSafeKey::new(unbound))
    }

    /// `plain` sealed for `owner` (what it belongs to, e.g. `registry:<server>`).
    ///
    /// # Errors
    /// When the key cannot be read or made.
    pub fn seal(&self, owner: &str, plain: &[u8]) -> Result<Vec<u8>, SecretError> {
        let key = self.key(true)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Key("no randomness for a nonce".into()))?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(owner.as_bytes()),
            &mut sealed,
        )
        .map_err(|_| SecretError::Key("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plain text of `sealed`, which must have been sealed for `owner` under this key.
    ///
    /// # Errors
    /// When the key cannot be read, or the value does not open with it.
    pub fn open(&self, owner: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        let key = self.key(false)?;
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Undecryptable);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Undecryptable)?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(owner.as_bytes()), &mut body)
            .map_err(|_| SecretError::Undecryptable)?;
        Ok(plain.to_vec())
    }
}

/// Reads the key file, or (when `create`) makes it with a new random key, mode 0600, without
/// ever replacing one another process made first.
fn read_or_create(path: &Path, create: bool) -> Result<[u8; KEY_LEN], SecretError> {
    match std::fs::read_to_string(path) {
        Ok(text) => return decode_key(&text).map_err(|e| SecretError::Key(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SecretError::Key(format!(
                "{} does not exist (and RACK_SECRETS_KEY is not set): nothing was sealed on this rack",
                path.display()
            )));
        }
        Err(e) => return Err(SecretError::Key(format!("reading {}: {e}", path.display()))),
    }
    let mut bytes = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SecretError::Key("no randomness for a key".into()))?;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| {
            file.write_all(format!("{text}\n").as_bytes())?;
            file.sync_all()
        });
    match made {
        Ok(()) => Ok(bytes),
        // Another server on this data directory made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_or_create(path, false),
        Err(e) => Err(SecretError::Key(format!("writing {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_owner_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(None, dir.path()).unwrap();
        let sealed = ring.seal("registry:a", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(ring.open("registry:a", &sealed).unwrap(), b"hunter2");
        assert!(matches!(
            ring.open("registry:b", &sealed),
            Err(SecretError::Undecryptable)
        ));
        // The key was made on first use, for its owner only; a second keyring reads it.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = Keyring::new(None, dir.path()).unwrap();
        assert_eq!(again.open("registry:a", &sealed).unwrap(), b"hunter2");
        // Another key does not open it.
        let other = Keyring::new(
            Some(&base64::engine::general_purpose::STANDARD.encode([7u8; 32])),
            dir.path(),
        )
        .unwrap();
        assert!(matches!(
            other.open("registry:a", &sealed),
            Err(SecretError::Undecryptable)
        ));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            ring.open("registry:a", &tampered),
            Err(SecretError::Undecryptable)
        ));
    }

    #[test]
    fn a_bad_setting_is_refused_and_opening_makes_no_key() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Keyring::new(Some("not base64!"), dir.path()).is_err());
        assert!(Keyring::new(Some("c2hvcnQ="), dir.path()).is_err());
        let ring = Keyring::new(None, dir.path()).unwrap();
        assert!(ring.open("x", &[0; 40]).is_err());
        assert!(!dir.path().join(KEY_FILE).exists());
    }
}
