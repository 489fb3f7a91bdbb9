//! The Kubernetes objects' shapes: Deployments from manifests, linked resources, build Jobs,
//! ingress hosts, timers and balancers.

use super::*;
use crate::config::KubeBuilder;

fn release(manifest: &str) -> ReleaseSpec {
    ReleaseSpec {
        app: "myapp".into(),
        id: "RABCDEFGHI".into(),
        build_id: "BABCDEFGHI".into(),
        images: Default::default(),
        env: [("FOO".to_owned(), "bar".to_owned())].into(),
        manifest: crate::manifest::parse(manifest).unwrap(),
        resources: Default::default(),
        rack_linked: Default::default(),
        analyse: false,
    }
}

fn web_deployment(manifest: &str) -> Value {
    let release = release(manifest);
    let service = &release.manifest.services["web"];
    let target = ServiceTarget {
        rack: "rack",
        registry: "registry.host/convox",
        name: "web",
        service,
    };
    deployment(&target, &release, 2).unwrap()
}

#[test]
fn a_deployment_follows_the_manifest() {
    let d = web_deployment(
        "services:\n  web:\n    port: 3000\n    command: bin/web\n    health:\n      path: /check\n      grace: 7\n      interval: 3\n    deployment:\n      minimum: 25\n      maximum: 150\n    scale:\n      cpu: 250\n      memory: 512\n",
    );
    assert_eq!(d["metadata"]["namespace"], "rack-myapp");
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["selector"]["matchLabels"],
        json!({"app": "myapp", "service": "web"})
    );
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": "50%", "maxUnavailable": "75%"})
    );
    let pod = &d["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["release"], "RABCDEFGHI");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["name"], "main");
    assert_eq!(c["image"], "registry.host/convox/myapp:web.BABCDEFGHI");
    assert_eq!(c["command"], json!(["/bin/sh", "-c", "bin/web"]));
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/check", "port": 3000, "scheme": "HTTP"})
    );
    assert_eq!(c["readinessProbe"]["initialDelaySeconds"], 7);
    assert_eq!(c["readinessProbe"]["periodSeconds"], 3);
    assert_eq!(c["resources"]["requests"], json!({"cpu": "250m", "memory": "512Mi"}));
    let env = c["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "FOO", "value": "bar"})));
    assert!(env.contains(&json!({"name": "PORT", "value": "3000"})));
    assert!(env.contains(&json!({"name": "RELEASE", "value": "RABCDEFGHI"})));
    // The selector must not hold the release: it is immutable, and each release rolls.
    assert!(d["spec"]["selector"]["matchLabels"].get("release").is_none());
}

#[test]
fn full_capacity_rolls_by_surging_only() {
    let d = web_deployment("services:\n  web:\n    deployment:\n      minimum: 100\n      maximum: 150\n");
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": "50%", "maxUnavailable": "0%"})
    );
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("readinessProbe").is_none(), "no port, no probe");
    assert!(c.get("command").is_none());
}

#[test]
fn linked_processes_get_the_resource_secret_and_the_env_wins() {
    use crate::resource::{Credentials, Definition, Kind, ResourceSpec};
    let mut release = release(
        "environment:\n  - DATABASE_HOST=from-manifest\nservices:\n  web:\n    port: 3000\ntimers:\n  nightly:\n    schedule: \"0 3 * * *\"\n    command: bin/nightly\n    service: web\n",
    );
    release.manifest.services.get_mut("web").unwrap().resources = vec!["database".to_owned()];
    release
        .env
        .insert("DATABASE_URL".to_owned(), "postgres://elsewhere/db".to_owned());
    release.resources.insert(
        "database".to_owned(),
        ResourceSpec {
            name: "database".to_owned(),
            definition: Definition {
                kind: Kind::Postgres,
                options: Default::default(),
                image: None,
            },
            credentials: Credentials {
                user: "app".to_owned(),
                password: "pw".to_owned(),
                database: "app".to_owned(),
            },
        },
    );
    let target = ServiceTarget {
        rack: "rack",
        registry: "r",
        name: "web",
        service: &release.manifest.services["web"],
    };
    let timer = &release.manifest.timers["nightly"];
    let extra: crate::env::Env = [("DATABASE_NAME".to_owned(), "other".to_owned())].into();
    let containers =
        [
            deployment(&target, &release, 1).unwrap()["spec"]["template"]["spec"]["containers"][0].clone(),
            timer_cronjob(&target, &release, "nightly", timer, "batch/v1").unwrap()["spec"]["jobTemplate"]["spec"]
                ["template"]["spec"]["containers"][0]
                .clone(),
            one_off_pod(
                &target,
                &release,
                "web-run-x",
                &["sh".to_owned()],
                &Default::default(),
                60,
            )
            .unwrap()["spec"]["containers"][0]
                .clone(),
        ];
    for container in &containers {
        let env = container["env"].as_array().unwrap();
        let named = |name: &str| env.iter().filter(|e| e["name"] == name).cloned().collect::<Vec<_>>();
        // `env set` wins: a plain value, no secretKeyRef.
        assert_eq!(
            named("DATABASE_URL"),
            [json!({ "name": "DATABASE_URL", "value": "postgres://elsewhere/db" })]
        );
        // A manifest default loses to the link.
        assert_eq!(
            named("DATABASE_HOST"),
            [json!({ "name": "DATABASE_HOST",
                "valueFrom": { "secretKeyRef": { "name": "resource-database", "key": "HOST" } } })]
        );
        for key in ["USER", "PASS", "PORT", "NAME"] {
            assert_eq!(named(&format!("DATABASE_{key}")).len(), 1, "{key}: {env:?}");
        }
        assert!(
            !container.to_string().contains("\"pw\""),
            "the password is only in the Secret"
        );
    }
    // A one-off's own variable wins too.
    let one_off = one_off_pod(&target, &release, "web-run-y", &["sh".to_owned()], &extra, 60).unwrap();
    let env = one_off["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    assert!(env.contains(&json!({ "name": "DATABASE_NAME", "value": "other" })));
    assert_eq!(env.iter().filter(|e| e["name"] == "DATABASE_NAME").count(), 1);
}

#[test]
fn a_missing_required_variable_is_refused() {
    let release = release("environment:\n  - SECRET\nservices:\n  web: {}\n");
    let target = ServiceTarget {
        rack: "rack",
        registry: "r",
        name: "web",
        service: &release.manifest.services["web"],
    };
    let err = deployment(&target, &release, 1).unwrap_err();
    assert!(err.to_string().contains("SECRET"), "{err}");
}

#[test]
fn a_build_job_fetches_then_builds_each_service() {
    let spec = BuildSpec {
        rack: "rack",
        app: "myapp",
        build_id: "BABC",
        services: vec![
            ServiceBuild {
                service: "api".into(),
                context: "./api".into(),
                dockerfile: "Dockerfile".into(),
                image: "r/myapp:api.BABC".into(),
            },
            ServiceBuild {
                service: "web".into(),
                context: ".".into(),
                dockerfile: "web.Dockerfile".into(),
                image: "r/myapp:web.BABC".into(),
            },
        ],
        source_url: "http://rack:5443/apps/myapp/objects/tmp/x.tgz".into(),
        secret: "build-babc".into(),
        fetch_image: "busybox",
        builder: KubeBuilder::Kaniko,
        builder_image: "kaniko",
        deadline_secs: 600,
    };
    let job = build_job(&spec);
    assert_eq!(job["metadata"]["name"], "build-babc");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
    let init = job["spec"]["template"]["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fetch", "build-api", "build-web"]);
    assert_eq!(
        init[1]["args"].as_array().unwrap()[0..3],
        [
            json!("--context=dir:///workspace/api"),
            json!("--dockerfile=/workspace/api/Dockerfile"),
            json!("--destination=r/myapp:api.BABC")
        ]
    );
    assert_eq!(init[2]["args"][0], "--context=dir:///workspace");
    // The token is only ever in the Secret.
    let text = job.to_string();
    assert!(!text.contains("rack_"), "{text}");
    assert_eq!(
        init[0]["env"][1]["valueFrom"]["secretKeyRef"],
        json!({"name": "build-babc", "key": "token"})
    );
    // The builders read the build Secret's docker config, and only that key of it.
    assert_eq!(
        job["spec"]["template"]["spec"]["volumes"][1],
        json!({ "name": "registry", "secret": {
            "secretName": "build-babc",
            "items": [{ "key": "config.json", "path": "config.json" }],
        } })
    );
    assert_eq!(
        init[1]["volumeMounts"][1],
        json!({ "name": "registry", "mountPath": "/kaniko/.docker", "readOnly": true })
    );
    let secret = build_secret(&spec, "rack_token", r#"{"auths":{}}"#);
    assert_eq!(secret["stringData"]["config.json"], r#"{"auths":{}}"#);
    assert_eq!(secret["stringData"]["token"], "rack_token");
}

#[test]
fn a_buildah_job_builds_privileged_with_vfs_and_reads_the_same_docker_config() {
    let spec = BuildSpec {
        rack: "rack",
        app: "myapp",
        build_id: "BABC",
        services: vec![ServiceBuild {
            service: "web".into(),
            context: "./web/".into(),
            dockerfile: "Dockerfile".into(),
            image: "r/myapp:web.BABC".into(),
        }],
        source_url: "http://rack:5443/apps/myapp/objects/tmp/x.tgz".into(),
        secret: "build-babc".into(),
        fetch_image: "busybox",
        builder: KubeBuilder::Buildah,
        builder_image: "buildah",
        deadline_secs: 600,
    };
    let job = build_job(&spec);
    let pod = &job["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_array().unwrap();
    let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fetch", "build-web"]);
    let build = &init[1];
    assert_eq!(build["image"], "buildah");
    assert_eq!(build["securityContext"], json!({ "privileged": true }));
    let script = build["command"][2].as_str().unwrap();
    for part in [
        "buildah --storage-driver=vfs bud --isolation=chroot",
        "buildah --storage-driver=vfs push \"$RACK_IMAGE\" \"docker://$RACK_IMAGE\"",
    ] {
        assert!(script.contains(part), "{part} in {script}");
    }
    let env: std::collections::BTreeMap<&str, &str> = build["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env["RACK_CONTEXT"], "/workspace/web");
    assert_eq!(env["RACK_DOCKERFILE"], "/workspace/web/Dockerfile");
    assert_eq!(env["RACK_IMAGE"], "r/myapp:web.BABC");
    assert_eq!(env["RACK_BUILD"], "BABC");
    // The same docker config as kaniko's, where REGISTRY_AUTH_FILE says.
    assert_eq!(env["REGISTRY_AUTH_FILE"], "/rack/registry/config.json");
    assert_eq!(
        build["volumeMounts"][1],
        json!({ "name": "registry", "mountPath": "/rack/registry", "readOnly": true })
    );
    assert_eq!(pod["volumes"][1]["secret"]["items"][0]["key"], "config.json");
    // Its image store is the pod's, not the container's overlay root.
    assert_eq!(
        build["volumeMounts"][2],
        json!({ "name": "containers", "mountPath": "/var/lib/containers" })
    );
    assert_eq!(pod["volumes"][2], json!({ "name": "containers", "emptyDir": {} }));
    // Only the builders run privileged; the token is still only in the Secret.
    assert!(init[0].get("securityContext").is_none());
    assert!(!job.to_string().contains("rack_"));
}
#[test]
fn ingress_hosts_follow_the_domain_setting_domain_names_and_internal() {
    use crate::config::IngressConfig;
    let settings = IngressConfig {
        domain: Some("rack.example.org".into()),
        class: Some("nginx".into()),
        cert_issuer: Some("letsencrypt".into()),
    };
    let manifest = crate::manifest::parse(
        "services:\n  web:\n    port: 3000\n    domain: ${HOST}, www.Example.com\n  api:\n    port: 4000\n    internal: true\n  worker:\n    command: work\n",
    )
    .unwrap();
    let env: crate::env::Env = [("HOST".to_owned(), "shop.example.com".to_owned())].into();
    let hosts = |name: &str| super::ingress_hosts(&settings, "shop", name, &manifest.services[name], &env);
    assert_eq!(
        hosts("web").unwrap(),
        ["web.shop.rack.example.org", "shop.example.com", "www.example.com"]
    );
    assert!(hosts("api").unwrap().is_empty(), "internal");
    assert!(hosts("worker").unwrap().is_empty(), "no port");
    let missing = super::ingress_hosts(&settings, "shop", "web", &manifest.services["web"], &Default::default());
    assert!(missing.unwrap_err().to_string().contains("${HOST}"));

    let own = super::ingress(
        "rack",
        "shop",
        "web",
        3000,
        &hosts("web").unwrap(),
        &settings,
        Some("rack-tls-web"),
    );
    assert_eq!(own["spec"]["tls"][0]["secretName"], "rack-tls-web");
    assert_eq!(own["spec"]["tls"][0]["hosts"][2], "www.example.com");
    assert!(
        own["metadata"]["annotations"]
            .get("cert-manager.io/cluster-issuer")
            .is_none()
    );
    let body = super::ingress("rack", "shop", "web", 3000, &hosts("web").unwrap(), &settings, None);
    assert_eq!(body["spec"]["ingressClassName"], "nginx");
    assert_eq!(
        body["metadata"]["annotations"]["cert-manager.io/cluster-issuer"],
        "letsencrypt"
    );
    assert_eq!(body["spec"]["tls"][0]["secretName"], "web-tls");
    assert_eq!(body["spec"]["rules"][1]["host"], "shop.example.com");
    assert_eq!(
        body["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"],
        serde_json::json!({ "name": "web", "port": { "number": 3000 } })
    );
}

#[test]
fn a_timer_is_a_cronjob_of_its_service() {
    let release = release(
        "services:\n  worker:\n    build: .\ntimers:\n  nightly:\n    schedule: \"0 3 * * *\"\n    command: bin/nightly --all\n    service: worker\n    concurrency: replace\n",
    );
    let target = ServiceTarget {
        rack: "rack",
        registry: "registry.host/convox",
        name: "worker",
        service: &release.manifest.services["worker"],
    };
    let timer = &release.manifest.timers["nightly"];
    let cronjob = timer_cronjob(&target, &release, "nightly", timer, "batch/v1beta1").unwrap();
    assert_eq!(cronjob["apiVersion"], "batch/v1beta1");
    assert_eq!(cronjob["metadata"]["name"], "timer-nightly");
    assert_eq!(cronjob["metadata"]["namespace"], "rack-myapp");
    assert_eq!(cronjob["metadata"]["labels"]["type"], "timer");
    assert_eq!(cronjob["spec"]["schedule"], "0 3 * * *");
    assert_eq!(cronjob["spec"]["concurrencyPolicy"], "Replace");
    let template = &cronjob["spec"]["jobTemplate"]["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert_eq!(
        (&labels["app"], &labels["service"], &labels["timer"], &labels["release"]),
        (
            &json!("myapp"),
            &json!("worker"),
            &json!("nightly"),
            &json!("RABCDEFGHI")
        )
    );
    assert_eq!(cronjob["spec"]["jobTemplate"]["spec"]["backoffLimit"], 0);
    assert_eq!(template["spec"]["restartPolicy"], "Never");
    let container = &template["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.host/convox/myapp:worker.BABCDEFGHI");
    assert_eq!(container["command"], json!(["/bin/sh", "-c", "bin/nightly --all"]));
    let env = container["env"].as_array().unwrap();
    assert!(env.contains(&json!({ "name": "FOO", "value": "bar" })));
    assert!(env.contains(&json!({ "name": "TIMER", "value": "nightly" })));
}

#[test]
fn a_balancer_is_a_load_balancer_service_to_its_service_pods_only() {
    let whitelisted = release(
        "services:\n  web:\n    port: 3000\nbalancers:\n  edge:\n    service: web\n    ports:\n      443: 3000\n      8443:\n        port: 3001\n    whitelist: [10.1.0.0/16, 192.0.2.7, \"2001:db8::1\"]\n",
    );
    let service = balancer_service("rack", "myapp", "edge", &whitelisted.manifest.balancers["edge"]);
    assert_eq!(service["metadata"]["name"], "balancer-edge");
    assert_eq!(service["metadata"]["labels"]["type"], "balancer");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        service["spec"]["selector"],
        json!({ "app": "myapp", "service": "web", "type": "service" })
    );
    assert_eq!(
        service["spec"]["ports"],
        json!([
            { "name": "tcp-443", "port": 443, "targetPort": 3000, "protocol": "TCP" },
            { "name": "tcp-8443", "port": 8443, "targetPort": 3001, "protocol": "TCP" },
        ])
    );
    assert_eq!(
        service["spec"]["loadBalancerSourceRanges"],
        json!(["10.1.0.0/16", "192.0.2.7/32", "2001:db8::1/128"])
    );
    let open = release(
        "services:\n  web:\n    port: 3000\nbalancers:\n  edge:\n    service: web\n    ports:\n      443: 3000\n",
    );
    let service = balancer_service("rack", "myapp", "edge", &open.manifest.balancers["edge"]);
    assert!(service["spec"].get("loadBalancerSourceRanges").is_none(), "open to all");
    // The Service of a service with a port selects its own pods only, not its one-offs'.
    assert_eq!(
        super::service("rack", "myapp", "web", 3000)["spec"]["selector"],
        json!({ "app": "myapp", "service": "web", "type": "service" })
    );
}

#[test]
fn the_builders_docker_config_merges_the_private_registries_under_the_operator_s() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let registries = [
        crate::runtime::RegistryCredential {
            server: "private.example.com".into(),
            username: "puller".into(),
            password: "pw".into(),
        },
        crate::runtime::RegistryCredential {
            server: "registry.host".into(),
            username: "not-the-pusher".into(),
            password: "x".into(),
        },
    ];
    let operator =
        json!({ "auths": { "registry.host": { "auth": b64("pusher:push") } }, "credHelpers": { "gcr.io": "gcloud" } });
    let merged = super::builder_docker_config(Some(operator.to_string().as_bytes()), &registries).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&merged).unwrap(),
        json!({
            "auths": {
                "private.example.com": { "auth": b64("puller:pw") },
                "registry.host": { "auth": b64("pusher:push") },
            },
            "credHelpers": { "gcr.io": "gcloud" },
        })
    );
    // No operator Secret: the private registries alone; neither: an empty config.
    let alone = super::builder_docker_config(None, &registries[..1]).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&alone).unwrap(),
        json!({ "auths": { "private.example.com": { "auth": b64("puller:pw") } } })
    );
    assert_eq!(super::builder_docker_config(None, &[]).unwrap(), r#"{"auths":{}}"#);
    let err = super::builder_docker_config(Some(b"not json"), &[]).unwrap_err();
    assert!(err.contains("rack-registry"), "{err}");
}
