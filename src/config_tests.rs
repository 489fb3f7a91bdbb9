//! The settings' parsing and validation: the command line and environment into a `Config`,
//! each refusal with the message that names what to fix.

use super::*;

fn kube_args() -> KubeArgs {
    KubeArgs {
        registry: Some("registry.example.com/rack/".into()),
        url: Some("http://rack.rack.svc.cluster.local:5443/".into()),
        builder_image: "kaniko".into(),
        builder: KubeBuilder::Kaniko,
        buildah_image: "buildah".into(),
        fetch_image: "busybox".into(),
        service_account: Some("rack/rack".into()),
        kubeconfig: None,
        domain: Some(" *.Rack.Example.org ".into()),
        ingress_class: Some(" ".into()),
        cert_issuer: None,
        prometheus_url: Some(" http://127.0.0.1:9090/ ".into()),
    }
}

fn refusal(change: impl FnOnce(&mut KubeArgs)) -> String {
    let mut args = kube_args();
    change(&mut args);
    KubeConfig::from_args(args).unwrap_err().to_string()
}

/// `rack server`'s flags as parsed from `args` (and the environment, which tests leave
/// alone: none of the RACK_TLS variables is set while they run).
fn server_args(args: &[&str]) -> ServerArgs {
    #[derive(clap::Parser)]
    struct Server {
        #[command(flatten)]
        args: ServerArgs,
    }
    <Server as clap::Parser>::try_parse_from(std::iter::once("rack").chain(args.iter().copied()))
        .unwrap()
        .args
}

fn tls_of(args: &[&str]) -> anyhow::Result<Tls> {
    Config::from_args(server_args(args)).map(|config| config.tls)
}

#[test]
fn loopback_stays_plain_http_and_beyond_it_needs_tls() {
    assert_eq!(tls_of(&[]).unwrap(), Tls::Off);
    assert_eq!(tls_of(&["--bind", "[::1]:5443"]).unwrap(), Tls::Off);
    // The embedded default beyond loopback: a self-signed certificate.
    assert_eq!(tls_of(&["--bind", "0.0.0.0:5443"]).unwrap(), Tls::SelfSigned);
    assert_eq!(
        tls_of(&["--bind", "127.0.0.1:5443", "--tls", "on"]).unwrap(),
        Tls::SelfSigned
    );
    let files = tls_of(&["--bind", "0.0.0.0:5443", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
    assert_eq!(
        files,
        Tls::Files(crate::tls::CertFiles {
            cert: "c.pem".into(),
            key: "k.pem".into()
        })
    );
    // Plain HTTP beyond loopback is refused, saying what to do, unless asked for.
    let external = ["--database-url", "postgres://x/y", "--password", "p"];
    for args in [
        vec!["--bind", "0.0.0.0:5443", "--tls", "off"],
        vec!["--bind", "192.0.2.1:5443", "--tls", "off"],
        [&["--bind", "0.0.0.0:5443"][..], &external[..]].concat(),
    ] {
        let message = tls_of(&args).unwrap_err().to_string();
        assert!(
            message.starts_with("refusing to serve plain HTTP on"),
            "{args:?}: {message}"
        );
        assert!(message.contains("RACK_INSECURE_HTTP=1"), "{message}");
        assert!(message.contains("RACK_TLS_CERT"), "{message}");
        let mut insecure = args.clone();
        insecure.push("--insecure-http");
        assert_eq!(tls_of(&insecure).unwrap(), Tls::Off, "{insecure:?}");
    }
    let message = tls_of(&["--tls-cert", "c.pem"]).unwrap_err().to_string();
    assert!(message.contains("go together"), "{message}");
    let message = tls_of(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls", "off"])
        .unwrap_err()
        .to_string();
    assert!(message.contains("contradicts"), "{message}");
}

#[test]
fn kube_settings_are_trimmed_and_split() {
    let config = KubeConfig::from_args(kube_args()).unwrap();
    assert_eq!(config.registry, "registry.example.com/rack");
    assert_eq!(config.url, "http://rack.rack.svc.cluster.local:5443");
    assert_eq!(config.service_account, Some(("rack".into(), "rack".into())));
    assert_eq!(config.ingress.domain.as_deref(), Some("rack.example.org"));
    assert_eq!(config.ingress.class, None, "a blank setting is no setting");
    assert_eq!(config.prometheus_url.as_deref(), Some("http://127.0.0.1:9090"));
    assert_eq!(
        (config.builder, config.builder_image.as_str()),
        (KubeBuilder::Kaniko, "kaniko")
    );
    let mut args = kube_args();
    args.builder = KubeBuilder::Buildah;
    let config = KubeConfig::from_args(args).unwrap();
    assert_eq!(
        (config.builder, config.builder_image.as_str()),
        (KubeBuilder::Buildah, "buildah")
    );
}

#[test]
fn the_builder_is_chosen_by_name_and_kaniko_by_default() {
    let kube = |args: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        KubeConfig::from_args(server_args(&args).kube).unwrap()
    };
    let default = kube("--registry r.example.com/rack --api-url http://rack:5443");
    assert_eq!(default.builder, KubeBuilder::Kaniko);
    assert_eq!(default.builder_image, "gcr.io/kaniko-project/executor:v1.23.2-debug");
    let buildah = kube("--registry r --api-url http://rack:5443 --kube-builder buildah --kube-buildah-image b:1");
    assert_eq!(
        (buildah.builder, buildah.builder_image.as_str()),
        (KubeBuilder::Buildah, "b:1")
    );
}

#[test]
fn kube_settings_name_what_to_fix() {
    assert!(refusal(|a| a.registry = None).starts_with("RACK_REGISTRY is required with RACK_RUNTIME=kube"));
    assert!(refusal(|a| a.registry = Some(" ".into())).starts_with("RACK_REGISTRY is required"));
    assert!(refusal(|a| a.registry = Some("https://r.example.com".into())).starts_with("RACK_REGISTRY must be"));
    assert!(refusal(|a| a.url = None).starts_with("RACK_API_URL is required with RACK_RUNTIME=kube"));
    assert!(refusal(|a| a.url = Some("rack:5443".into())).starts_with("RACK_API_URL must start with http://"));
    assert!(
        refusal(|a| a.prometheus_url = Some("prometheus:9090".into()))
            .starts_with("RACK_PROMETHEUS_URL must start with http://")
    );
    for account in ["rack", "/rack", "rack/", "a/b/c"] {
        let message = refusal(|a| a.service_account = Some(account.into()));
        assert!(
            message.starts_with("RACK_KUBE_SERVICE_ACCOUNT must be <namespace>/<name>"),
            "{account}: {message}"
        );
    }
}
