//! Certificates on the Kubernetes runtime (a real control plane, see `kubeenv`): `convox ssl
//! update` makes the certificate the Secret `rack-tls-<service>` (type `kubernetes.io/tls`) of
//! the app's namespace, and the service's Ingress serves it (its `tls` section names that
//! Secret, and cert-manager is not asked for another); the next release keeps it so, another
//! certificate replaces the Secret's, and a release without the service removes it.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use reqwest::Method;

use crate::deploys::{create_release, promote_follow};
use crate::helpers::status_text;
use crate::kubeenv::{ProbeServer, act_as_kubelet, admin_client};
use crate::kubernetes::{complete_build, spawn_kube};

/// The Ingress `web` serves the Secret `rack-tls-web` for all its hosts, without cert-manager.
fn assert_serves_the_certificate(ingress: &Ingress) {
    let spec = ingress.spec.clone().unwrap();
    let tls = spec.tls.clone().unwrap();
    assert_eq!(tls.len(), 1, "{tls:?}");
    assert_eq!(tls[0].secret_name.as_deref(), Some("rack-tls-web"));
    assert_eq!(
        tls[0].hosts.clone().unwrap(),
        ["web.secured.rack.example.org", "shop.example.com"]
    );
    let annotations = ingress.metadata.annotations.clone().unwrap_or_default();
    assert!(
        !annotations.contains_key("cert-manager.io/cluster-issuer"),
        "{annotations:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_update_makes_the_certificate_the_ingress_tls_secret() {
    let app = spawn_kube().await;
    let client = admin_client().await;
    let name = "secured";
    let ns = format!("rack-{name}");
    let probe = ProbeServer::start().await;
    assert_eq!(app.create_app(name).await.status(), 201);
    let manifest = format!(
        "services:\n  web:\n    build: .\n    port: {}\n    domain: ${{HOST}}\n    health:\n      grace: 1\n      interval: 1\n",
        probe.port
    );
    complete_build(&app, &client, name, &manifest).await;
    let kubelet = tokio::spawn(act_as_kubelet(client.clone(), ns.clone()));
    let first = create_release(&app, name, &[("env", "HOST=shop.example.com")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, name, &first).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    let before = ingresses.get("web").await.unwrap();
    assert_eq!(
        before.spec.unwrap().tls.unwrap()[0].secret_name.as_deref(),
        Some("web-tls"),
        "cert-manager's until a certificate is given"
    );

    // `convox certs import` then `convox ssl update web:443 ID`, as the CLI sends them.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["shop.example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (public, private) = (cert.pem(), key.serialize_pem());
    let (status, body) = status_text(
        app.convox(Method::POST, "/certificates")
            .form(&[("pub", public.as_str()), ("key", private.as_str())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = status_text(
        app.convox(Method::PUT, &format!("/apps/{name}/ssl/web/443"))
            .form(&[("id", id.as_str())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get("rack-tls-web").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    assert_eq!(String::from_utf8(data["tls.crt"].0.clone()).unwrap(), public);
    assert_eq!(String::from_utf8(data["tls.key"].0.clone()).unwrap(), private);
    assert_serves_the_certificate(&ingresses.get("web").await.unwrap());

    // The next release keeps it.
    let second = create_release(&app, name, &[("env", "HOST=shop.example.com")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, name, &second).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert_serves_the_certificate(&ingresses.get("web").await.unwrap());

    // Another certificate for the service replaces the Secret's.
    let key = rcgen::KeyPair::generate().unwrap();
    let renewed = rcgen::CertificateParams::new(vec!["shop.example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (public, private) = (renewed.pem(), key.serialize_pem());
    let imported = app
        .convox(Method::POST, "/certificates")
        .form(&[("pub", public.as_str()), ("key", private.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 201);
    let second_id = imported.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let updated = app
        .convox(Method::PUT, &format!("/apps/{name}/ssl/web/443"))
        .form(&[("id", second_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let data = secrets.get("rack-tls-web").await.unwrap().data.unwrap();
    assert_eq!(String::from_utf8(data["tls.crt"].0.clone()).unwrap(), public);
    assert_eq!(String::from_utf8(data["tls.key"].0.clone()).unwrap(), private);
    // The first one is free again: nothing uses it.
    let deleted = app
        .convox(Method::DELETE, &format!("/certificates/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);

    // `rack ssl unset web:443`: the Secret goes and the Ingress is cert-manager's again.
    let unset = app
        .convox(Method::DELETE, &format!("/apps/{name}/ssl/web/443"))
        .send()
        .await
        .unwrap();
    assert_eq!(unset.status(), 200);
    assert!(
        secrets.get_opt("rack-tls-web").await.unwrap().is_none(),
        "the Secret is gone"
    );
    let after = ingresses.get("web").await.unwrap();
    assert_eq!(
        after.spec.as_ref().unwrap().tls.as_ref().unwrap()[0]
            .secret_name
            .as_deref(),
        Some("web-tls"),
        "cert-manager's again"
    );
    assert!(
        after
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("cert-manager.io/cluster-issuer"),
        "cert-manager is asked again"
    );
    let ssl: Vec<serde_json::Value> = app.get_json(&format!("/apps/{name}/ssl")).await;
    assert!(ssl.is_empty(), "{ssl:?}");
    // Given back, as the rest of this test expects.
    let updated = app
        .convox(Method::PUT, &format!("/apps/{name}/ssl/web/443"))
        .form(&[("id", second_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);

    // A release without the service `web` (it is `api` now): its Secret goes with its
    // Ingress, and rack no longer counts the certificate as used.
    let renamed = manifest.replace("  web:\n", "  api:\n");
    complete_build(&app, &client, name, &renamed).await;
    let third = create_release(&app, name, &[("env", "HOST=shop.example.com")]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = promote_follow(&app, name, &third).await;
    assert!(log.ends_with("\nOK\n"), "{log}");
    assert!(
        secrets.get_opt("rack-tls-web").await.unwrap().is_none(),
        "the Secret is gone"
    );
    assert!(ingresses.get_opt("web").await.unwrap().is_none());
    let api = ingresses.get("api").await.unwrap();
    assert_eq!(
        api.spec.unwrap().tls.unwrap()[0].secret_name.as_deref(),
        Some("api-tls"),
        "the new service has cert-manager's, not the old one's"
    );
    let ssl: Vec<serde_json::Value> = app.get_json(&format!("/apps/{name}/ssl")).await;
    assert!(ssl.is_empty(), "{ssl:?}");
    let deleted = app
        .convox(Method::DELETE, &format!("/certificates/{second_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200, "no longer in use");
    kubelet.abort();
    drop(probe);
}
