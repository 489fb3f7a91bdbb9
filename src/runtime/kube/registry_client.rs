//! A client of one image registry's HTTP API v2 (the Docker Registry / OCI distribution API),
//! enough to carry a build's images between racks: manifests and blobs read and written by
//! digest. It answers the two challenges registries send: `Basic` (e.g. Debian's
//! `docker-registry` with htpasswd) and `Bearer` (a token from the realm the challenge names:
//! Docker Hub, GHCR, Harbor, ...). A registry on this host's loopback is reached over plain
//! HTTP, as the local runtime and Docker do; any other over verified TLS.

use std::path::Path;

use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// The manifest types asked for (single images; an index is refused by the caller).
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// An image reference split as the API addresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`.
    pub host: String,
    /// The repository inside it.
    pub repository: String,
    /// Tag (or digest).
    pub reference: String,
}

impl ImageRef {
    /// Splits `host/repo/...:tag` (rack names every image it builds with its registry's host).
    ///
    /// # Errors
    /// When it has no host or no tag.
    pub fn parse(image: &str) -> Result<Self, String> {
        let (host, rest) = image
            .split_once('/')
            .filter(|(host, _)| host.contains(['.', ':']) || *host == "localhost")
            .ok_or_else(|| format!("the image {image} names no registry host"))?;
        let (repository, reference) = match rest.split_once('@') {
            Some((repo, digest)) => (repo, digest),
            None => rest
                .rsplit_once(':')
                .filter(|(_, tag)| !tag.contains('/'))
                .ok_or_else(|| format!("the image {image} has no tag"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            repository: repository.to_owned(),
            reference: reference.to_owned(),
        })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::objects::hex(&Sha256::digest(bytes)))
}

/// A manifest as the registry holds it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

/// One registry, with the credentials rack has for it (the same for every repository).
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    credentials: Option<(String, String)>,
    /// The `Authorization` value that the last challenge led to.
    authorization: Mutex<Option<String>>,
}

impl RegistryClient {
    /// A client of the registry at `host`, with `credentials` (user, password) when rack has any.
    ///
    /// # Errors
    /// When the TLS stack cannot be set up.
    pub fn new(host: &str, credentials: Option<(String, String)>) -> Result<Self, String> {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("rack/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        let scheme = if crate::runtime::local::registry_auth::is_loopback(host) {
            "http"
        } else {
            "https"
        };
        Ok(Self {
            http,
            base: format!("{scheme}://{host}"),
            credentials,
            authorization: Mutex::new(None),
        })
    }

    fn request(&self, method: Method, path_or_url: &str) -> RequestBuilder {
        let url = if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.base)
        };
        self.http.request(method, url)
    }

    /// Sends what `make` builds, answering one authentication challenge (`scope`: the
    /// repository access a Bearer token is asked for).
    async fn send(&self, scope: &str, make: impl Fn() -> RequestBuilder) -> Result<Response, String> {
        let authorized = |request: RequestBuilder, value: &Option<String>| match value {
            Some(value) => request.header(header::AUTHORIZATION, value),
            None => request,
        };
        let current = self.authorization.lock().await.clone();
        let response = authorized(make(), &current)
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let value = self.answer(&challenge, scope).await?;
        *self.authorization.lock().await = Some(value.clone());
        authorized(make(), &Some(value))
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.base))
    }

    /// The `Authorization` header that answers `challenge`.
    async fn answer(&self, challenge: &str, scope: &str) -> Result<String, String> {
        use base64::Engine;
        let basic = self.credentials.as_ref().map(|(user, password)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| format!("{} asks for credentials, and rack has none for it", self.base));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!("{} refused the request ({challenge:?})", self.base));
        }
        let param = |name: &str| {
            params.split(',').find_map(|p| {
                let (key, value) = p.trim().split_once('=')?;
                (key == name).then(|| value.trim_matches('"').to_owned())
            })
        };
        let realm = param("realm").ok_or_else(|| format!("{}: a Bearer challenge without a realm", self.base))?;
        let mut query = vec![("scope", scope.to_owned())];
        if let Some(service) = param("service") {
            query.push(("service", service));
        }
        let mut request = self.http.get(&realm).query(&query);
        if let Some(basic) = basic {
            request = request.header(header::AUTHORIZATION, basic);
        }
        let response = request.send().await.map_err(|e| format!("{realm}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{realm} refused a token: {}", response.status()));
        }
        let body: serde_json::Value = response.json().await.map_err(|e| format!("{realm}: {e}"))?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or_else(|| format!("{realm} answered no token"))?;
        Ok(format!("Bearer {token}"))
    }

    /// The manifest `reference` of `repository`.
    ///
    /// # Errors
    /// When the registry does not have it or cannot be reached.
    pub async fn manifest(&self, repository: &str, reference: &str) -> Result<Manifest, String> {
        let scope = format!("repository:{repository}:pull");
        let path = format!("/v2/{repository}/manifests/{reference}");
        let response = self
            .send(&scope, || {
                self.request(Method::GET, &path).header(header::ACCEPT, ACCEPT)
            })
            .await?;
        let response = ok(response, &format!("the manifest {repository}:{reference}")).await?;
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("{}: {e}", self.base))?
            .to_vec();
        let digest = digest_of(&bytes);
        Ok(Manifest {
            media_type,
            bytes,
            digest,
        })
    }

    /// Downloads blob `digest` of `repository` into `into`, checking its digest; its size.
    ///
    /// # Errors
    /// When the registry does not have it, or sends other bytes.
    pub async fn blob_to_file(&self, repository: &str, digest: &str, into: &Path) -> Result<u64, String> {
        let scope = format!("repository:{repository}:pull");
        let path = format!("/v2/{repository}/blobs/{digest}");
        let response = self.send(&scope, || self.request(Method::GET, &path)).await?;
        let mut response = ok(response, &format!("the blob {digest} of {repository}")).await?;
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|e| format!("{}: {e}", into.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("{}: {e}", self.base))? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("{}: {e}", into.display()))?;
        }
        file.flush().await.map_err(|e| format!("{}: {e}", into.display()))?;
        let got = format!("sha256:{}", crate::objects::hex(&hasher.finalize()));
        if got != digest {
            return Err(format!("the registry sent other bytes for the blob {digest} ({got})"));
        }
        Ok(size)
    }

    /// Uploads the file `from` as blob `digest` of `repository`, unless the registry has it.
    ///
    /// # Errors
    /// When the registry refuses it.
    pub async fn push_blob(&self, repository: &str, digest: &str, from: &Path) -> Result<(), String> {
        let scope = format!("repository:{repository}:pull,push");
        let head = format!("/v2/{repository}/blobs/{digest}");
        let response = self.send(&scope, || self.request(Method::HEAD, &head)).await?;
        if response.status().is_success() {
            return Ok(());
        }
        let start = format!("/v2/{repository}/blobs/uploads/");
        let response = self.send(&scope, || self.request(Method::POST, &start)).await?;
        let response = ok(response, &format!("an upload to {repository}")).await?;
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("{}: an upload without a Location", self.base))?
            .to_owned();
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let file = tokio::fs::File::open(from)
            .await
            .map_err(|e| format!("{}: {e}", from.display()))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| format!("{}: {e}", from.display()))?
            .len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let authorization = self.authorization.lock().await.clone();
        let mut request = self
            .request(Method::PUT, &url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .body(body);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let response = request.send().await.map_err(|e| format!("{}: {e}", self.base))?;
        ok(response, &format!("the blob {digest} of {repository}"))
            .await
            .map(drop)
    }

    /// Stores `manifest` as `tag` of `repository`.
    ///
    /// # Errors
    /// When the registry refuses it.
    pub async fn put_manifest(&self, repository: &str, tag: &str, manifest: &Manifest) -> Result<(), String> {
        let scope = format!("repository:{repository}:pull,push");
        let path = format!("/v2/{repository}/manifests/{tag}");
        let response = self
            .send(&scope, || {
                self.request(Method::PUT, &path)
                    .header(header::CONTENT_TYPE, &manifest.media_type)
                    .body(manifest.bytes.clone())
            })
            .await?;
        ok(response, &format!("the manifest {repository}:{tag}"))
            .await
            .map(drop)
    }
}

/// `response` when it succeeded, else what the registry said about `what`.
async fn ok(response: Response, what: &str) -> Result<Response, String> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.trim().chars().take(300).collect();
    Err(format!("the registry answered {status} for {what}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::ImageRef;

    #[test]
    fn image_references_split_into_host_repository_and_tag() {
        let parsed = ImageRef::parse("127.0.0.1:5000/convox/myapp:web.BABC").unwrap();
        assert_eq!(
            parsed,
            ImageRef {
                host: "127.0.0.1:5000".into(),
                repository: "convox/myapp".into(),
                reference: "web.BABC".into(),
            }
        );
        let digest = ImageRef::parse("registry.host/a/b@sha256:00").unwrap();
        assert_eq!(
            (digest.repository.as_str(), digest.reference.as_str()),
            ("a/b", "sha256:00")
        );
        assert!(ImageRef::parse("myapp:web").is_err());
        assert!(ImageRef::parse("registry.host/myapp").is_err());
    }
}
