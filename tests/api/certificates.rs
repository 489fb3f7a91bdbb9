//! Certificates: `convox certs`, `certs import`, `certs generate`, `certs delete`, `ssl` and
//! `ssl update` replayed as the convox CLI sends them (forms); the refusals (not PEM, another
//! certificate's key, unknown ids, deleting a certificate in use); the key sealed at rest and
//! never shown or logged; and the local router serving the service over HTTPS with the
//! certificate, checked with a real TLS client that trusts only that certificate.

use std::sync::Arc;

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::deploys::{MANIFEST, SERVER};
use crate::helpers::{TestApp, status_text, wait_for};

/// A self-signed certificate for `names` and its key, as PEM.
fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `convox certs import PUB KEY [--chain FILE]`, as the CLI sends it.
async fn import(app: &TestApp, public: &str, key: &str, chain: Option<&str>) -> (u16, String) {
    let mut form = vec![("pub", public), ("key", key)];
    form.extend(chain.map(|c| ("chain", c)));
    status_text(
        app.convox(Method::POST, "/certificates")
            .form(&form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `convox ssl update SERVICE:PORT ID`.
async fn ssl_update(app: &TestApp, name: &str, service: &str, port: u16, id: &str) -> (u16, String) {
    let path = format!("/apps/{name}/ssl/{service}/{port}");
    status_text(app.convox(Method::PUT, &path).form(&[("id", id)]).send().await.unwrap()).await
}

/// `convox certs delete ID`: its status and text.
async fn delete_certificate(app: &TestApp, id: &str) -> (u16, String) {
    status_text(
        app.convox(Method::DELETE, &format!("/certificates/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `GET /` over TLS to `addr`, trusting only `ca` (PEM) and naming `localhost`: the answer, or
/// the TLS error.
async fn https_get(addr: &str, ca: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn certificates_answer_the_convox_cli_and_refuse_what_is_wrong() {
    let app = TestApp::spawn().await;

    // `convox certs generate a.example.com b.example.com`: the SDK joins the domains with commas.
    let (status, body) = status_text(
        app.convox(Method::POST, "/certificates/generate")
            .form(&[("domains", "a.example.com,*.b.example.com"), ("duration", "2160h")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.contains("PRIVATE"), "{body}");
    let generated: Value = serde_json::from_str(&body).unwrap();
    let generated_id = generated["id"].as_str().unwrap().to_owned();
    assert_eq!(generated["domain"], "a.example.com");
    assert_eq!(
        generated["domains"],
        serde_json::json!(["a.example.com", "*.b.example.com"])
    );
    let expiration = chrono::DateTime::parse_from_rfc3339(generated["expiration"].as_str().unwrap()).unwrap();
    let days = (expiration.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_days();
    assert!((88..=90).contains(&days), "{days}");

    // `convox certs import` with a chain.
    let (public, key) = self_signed(&["shop.example.com"]);
    let (chain, _) = self_signed(&["intermediate.example.com"]);
    let (status, body) = import(&app, &public, &key, Some(&chain)).await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.contains("PRIVATE"), "{body}");
    let imported: Value = serde_json::from_str(&body).unwrap();
    let imported_id = imported["id"].as_str().unwrap().to_owned();
    assert_eq!(imported["domains"], serde_json::json!(["shop.example.com"]));

    // `convox certs` reads id, domain, expiration and status.
    let (status, list) = status_text(app.convox(Method::GET, "/certificates").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(!list.contains("PRIVATE"), "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&generated_id.as_str()) && ids.contains(&imported_id.as_str()),
        "{list}"
    );
    assert!(list.as_array().unwrap().iter().all(|c| c["status"] == "Ready"));
    let only: Value = app.get_json("/certificates?generated=true").await;
    assert_eq!(only.as_array().unwrap().len(), 1, "{only}");

    // Refusals say what is wrong.
    let (_, other_key) = self_signed(&["other.example.com"]);
    let (status, body) = import(&app, &public, &other_key, None).await;
    assert_eq!(
        (status, body.contains("key: it does not match the certificate")),
        (400, true),
        "{body}"
    );
    let (status, body) = import(&app, "not a certificate", &key, None).await;
    assert_eq!((status, body.starts_with("pub:")), (400, true), "{body}");
    let (status, body) = import(
        &app,
        &public,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        None,
    )
    .await;
    assert_eq!((status, body.starts_with("key:")), (400, true), "{body}");
    let (status, body) = import(&app, &public, &key, Some("garbage")).await;
    assert_eq!((status, body.starts_with("chain:")), (400, true), "{body}");
    let (status, body) = status_text(
        app.convox(Method::POST, "/certificates/generate")
            .form(&[("domains", "not a domain")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.starts_with("domains:")), (400, true), "{body}");
    let (status, body) = status_text(
        app.convox(Method::DELETE, "/certificates/cert-nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (404, "certificate not found: cert-nope\n"));
    assert_eq!(app.create_app("plain").await.status(), 201);
    let (status, body) = ssl_update(&app, "plain", "web", 443, "cert-nope").await;
    assert_eq!((status, body.as_str()), (404, "certificate not found: cert-nope\n"));
    let (status, _) = ssl_update(&app, "missing", "web", 443, &imported_id).await;
    assert_eq!(status, 404);

    // The key is sealed in Postgres.
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar("select key_sealed from certificates")
        .fetch_all(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(sealed.len(), 2);
    assert!(sealed.iter().all(|s| !s.windows(11).any(|w| w == b"PRIVATE KEY")));

    // `convox certs renew`: a generated certificate is re-issued under its id, an imported one
    // is refused (rack cannot re-issue it), an app without generated certificates too.
    let pem_before: String = sqlx::query_scalar("select certificate_pem from certificates where id = $1")
        .bind(&generated_id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    let renew = |id: String| {
        let app = &app;
        async move {
            status_text(
                app.convox(Method::POST, &format!("/certificates/{id}/renew"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let (status, body) = renew(generated_id.clone()).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let pem_after: String = sqlx::query_scalar("select certificate_pem from certificates where id = $1")
        .bind(&generated_id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_ne!(pem_before, pem_after);
    let renewed: Value = app.get_json("/certificates?generated=true").await;
    assert_eq!(renewed[0]["domains"], generated["domains"], "{renewed}");
    let (status, body) = renew(imported_id.clone()).await;
    assert_eq!((status, body.contains("was imported")), (409, true), "{body}");
    let (status, body) = renew("plain".into()).await;
    assert_eq!(
        (status, body.contains("serves no generated certificate")),
        (409, true),
        "{body}"
    );
    let (status, _) = renew("cert-nope".into()).await;
    assert_eq!(status, 404);

    // Deleted as `convox certs delete` sends it.
    let (status, body) = status_text(
        app.convox(Method::DELETE, &format!("/certificates/{generated_id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let list: Value = app.get_json("/certificates").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Never in rack's own log or the audit log.
    let audit = wait_for(30, "the certificate requests in the audit log", || async {
        let text = app
            .json(Method::GET, "/audit")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (text.matches("/certificates").count() >= 3).then_some(text)
    })
    .await;
    assert!(!audit.contains("PRIVATE KEY"), "{audit}");
    let (lines, _) = rack::rack_log::snapshot();
    assert!(
        lines
            .iter()
            .any(|l| l.text.contains(&format!("imported certificate {imported_id}")))
    );
    assert!(!lines.iter().any(|l| l.text.contains("PRIVATE KEY")));
}

#[tokio::test]
async fn ssl_update_serves_the_service_over_https_with_the_certificate() {
    let app = TestApp::spawn().await;
    let name = "secure";
    assert_eq!(app.create_app(name).await.status(), 201);
    let (release, _) = app
        .deploy_files(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;

    let (first_pem, first_key) = self_signed(&["localhost"]);
    let (status, body) = import(&app, &first_pem, &first_key, None).await;
    assert_eq!(status, 201, "{body}");
    let first: String = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // `convox ssl update web:443 ID`.
    assert_eq!(
        ssl_update(&app, name, "web", 443, &first).await,
        (200, "ok\n".to_owned())
    );
    let ssl: Value = app.get_json(&format!("/apps/{name}/ssl")).await;
    assert_eq!(ssl[0]["service"], "web");
    assert_eq!(ssl[0]["port"], 443);
    assert_eq!(ssl[0]["certificate"], first.as_str());
    let addr = ssl[0]["https"].as_str().unwrap().to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // `convox ssl` reads the certificate from the service's port.
    let services: Value = app.get_json(&format!("/apps/{name}/services")).await;
    assert_eq!(services[0]["ports"][0]["certificate"], first.as_str(), "{services}");

    // A TLS client that trusts only this certificate reaches the app.
    let answer = https_get(&addr, &first_pem).await.unwrap();
    assert!(answer.starts_with("HTTP/1.") && answer.contains(" 200 "), "{answer}");
    assert!(answer.contains(&release), "{answer}");

    // In use: not deleted.
    let (status, body) = delete_certificate(&app, &first).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&format!("{name}/web:443")), "{body}");

    // Another certificate: new connections get it, on the same address.
    let (second_pem, second_key) = self_signed(&["localhost"]);
    let (status, body) = import(&app, &second_pem, &second_key, None).await;
    assert_eq!(status, 201, "{body}");
    let second: String = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ssl_update(&app, name, "web", 443, &second).await.0, 200);
    let answer = https_get(&addr, &second_pem).await.unwrap();
    assert!(answer.contains(&release), "{answer}");
    let refused = https_get(&addr, &first_pem).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    // The first is free now; the second is not.
    let (status, _) = delete_certificate(&app, &first).await;
    assert_eq!(status, 200);
    let (status, _) = delete_certificate(&app, &second).await;
    assert_eq!(status, 409);

    // A new deployment keeps serving it.
    let (release2, _) = app
        .deploy_files(name, &[("convox.yml", MANIFEST), ("server.py", SERVER)])
        .await;
    let answer = wait_for(60, "the new release over HTTPS", || async {
        let answer = https_get(&addr, &second_pem).await.ok()?;
        answer.contains(&release2).then_some(answer)
    })
    .await;
    assert!(answer.starts_with("HTTP/1.") && answer.contains(" 200 "), "{answer}");

    // `rack ssl unset web:443`: HTTPS stops, plain HTTP goes on, the certificate is free.
    let unset = |port: u16| {
        let path = format!("/apps/{name}/ssl/web/{port}");
        let request = app.convox(Method::DELETE, &path);
        async move { status_text(request.send().await.unwrap()).await }
    };
    assert_eq!(unset(443).await, (200, "ok\n".to_owned()));
    let ssl: Value = app.get_json(&format!("/apps/{name}/ssl")).await;
    assert_eq!(ssl, serde_json::json!([]));
    wait_for(10, "the HTTPS port to close", || async {
        tokio::net::TcpStream::connect(&addr).await.is_err().then_some(())
    })
    .await;
    let plain = crate::deploys::through_router(&app, name).await;
    assert!(plain.contains(&release2), "{plain}");
    let (status, _) = delete_certificate(&app, &second).await;
    assert_eq!(status, 200, "no longer in use");
    // Again, or a port that never had one: 404, saying so.
    let (status, body) = unset(443).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("web:443"), "{body}");
    assert_eq!(unset(0).await.0, 400);
}

#[tokio::test]
async fn the_rack_cli_generates_imports_lists_renews_and_deletes_certificates() {
    use crate::registries::rack_cli;
    let app = TestApp::spawn().await;
    let (code, generated, err) = rack_cli(&app, &["certs", "generate", "a.example.com", "--duration", "90d"], "").await;
    assert_eq!(code, 0, "{err}");
    let generated = generated.trim().to_owned();
    assert!(generated.starts_with("cert-"), "{generated}");

    let dir = tempfile::tempdir().unwrap();
    let (public, key) = self_signed(&["shop.example.com"]);
    std::fs::write(dir.path().join("cert.pem"), &public).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let (pub_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (code, imported, err) = rack_cli(
        &app,
        &[
            "certs",
            "import",
            pub_path.to_str().unwrap(),
            key_path.to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let imported = imported.trim().to_owned();
    // The key file of another certificate: refused, saying why.
    let (_, other_key) = self_signed(&["other.example.com"]);
    std::fs::write(&key_path, other_key).unwrap();
    let (code, _, err) = rack_cli(
        &app,
        &[
            "certs",
            "import",
            pub_path.to_str().unwrap(),
            key_path.to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("does not match"), "{err}");

    let (code, table, _) = rack_cli(&app, &["certs"], "").await;
    assert_eq!(code, 0);
    assert!(
        table.starts_with("ID") && table.contains(&generated) && table.contains(&imported),
        "{table}"
    );
    let (code, json, _) = rack_cli(&app, &["certs", "--json"], "").await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(!json.contains("PRIVATE"), "{json}");

    // `rack ssl` lists what an app's services serve.
    assert_eq!(app.create_app("shop").await.status(), 201);
    rack::store::certificates::set_use(&app.state.pool, "shop", "web", 443, &imported)
        .await
        .unwrap();
    let (code, table, err) = rack_cli(&app, &["ssl", "-a", "shop"], "").await;
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("web:443") && table.contains(&imported), "{table}");
    let (code, json, _) = rack_cli(&app, &["ssl", "-a", "shop", "--json"], "").await;
    assert_eq!(code, 0);
    let uses: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(uses[0]["certificate"], imported.as_str(), "{uses}");
    let (code, _, err) = rack_cli(&app, &["ssl", "-a", "shop", "update", "web", &imported], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("SERVICE:PORT"), "{err}");

    // Renew: the generated one is re-issued; the imported one is refused.
    let (code, _, err) = rack_cli(&app, &["certs", "renew", &generated], "").await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = rack_cli(&app, &["certs", "renew", &imported], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("was imported"), "{err}");

    // Delete: refused while in use.
    let (code, _, err) = rack_cli(&app, &["certs", "delete", &imported], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    let (code, _, err) = rack_cli(&app, &["certs", "delete", &generated], "").await;
    assert_eq!(code, 0, "{err}");
    let list: Value = app.get_json("/certificates").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // `rack ssl unset` frees it; a second time there is nothing to unset.
    let (code, _, err) = rack_cli(&app, &["ssl", "-a", "shop", "unset", "web:443"], "").await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = rack_cli(&app, &["ssl", "-a", "shop", "unset", "web:443"], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("certificate not found: on web:443"), "{err}");
    let (code, _, err) = rack_cli(&app, &["certs", "delete", &imported], "").await;
    assert_eq!(code, 0, "{err}");
}
