//! The manifest parser's tests: every key, its defaults, and what is refused (with the key
//! and the line).

use std::collections::BTreeMap;

use super::*;

mod balancers;
mod resources;

const FULL: &str = r#"
environment:
  - COMPANY=Convox
  - SECRET
resources:
  db:
    type: postgres
timers:
  cleanup:
    schedule: " 0  3 * * * "
    command: bin/cleanup --all
    service: worker
  report:
    schedule: "*/15 9-17 ? JAN-jun,dec MON-FRI"
    command: [bin/report, 7]
    service: web
    concurrency: forbid
    annotations:
      team: ops
    parallelCount: 2
balancers:
  custom:
    service: web
    ports:
      6000:
        port: 3001
        protocol: udp
      "5000": 3000
    whitelist:
      - 10.0.0.0/16
      - 2001:db8::/32
      - 192.168.1.7
    x-note: kept
services:
  web:
    build:
      path: api
      manifest: Dockerfile.prod
      command: npm ci
    command: bin/web --port 3000
    port: https:3000
    domain: example.org
    health:
      path: /check
      grace: 10
      interval: 7
      timeout: 8
    scale:
      count: 2-4
      cpu: 256
      memory: 512
    environment:
      - PORT_NAME=web
    deployment:
      minimum: 25
      maximum: 150
  worker:
    image: redis:7
    command: [redis-server, --port, 6379]
    scale: 3
"#;

/// Parses `yaml` (indented by four spaces) as the body of service `web`.
fn web(yaml: &str) -> Result<Service, ParseManifestError> {
    parse(&format!("services:\n  web:\n    {yaml}\n")).map(|mut m| m.services.remove("web").unwrap())
}

#[test]
fn full_manifest_parses_with_all_fields() {
    let m = parse(FULL).unwrap();
    assert_eq!(m.environment, ["COMPANY=Convox", "SECRET"]);
    assert_eq!(m.service_names().collect::<Vec<_>>(), ["web", "worker"]);
    let web = &m.services["web"];
    let build = web.build.as_ref().unwrap();
    assert_eq!(
        (&*build.path, &*build.manifest, build.command.as_deref()),
        ("api", "Dockerfile.prod", Some("npm ci"))
    );
    assert_eq!(web.command, Some(Command::Shell("bin/web --port 3000".into())));
    assert_eq!((web.port, &*web.port_scheme), (Some(3000), "https"));
    let health = &web.health;
    assert_eq!(
        (&*health.path, health.grace, health.interval, health.timeout),
        ("/check", 10, 7, 8)
    );
    assert_eq!(
        web.scale,
        Scale {
            count_min: 2,
            count_max: 4,
            cpu: Some(256),
            memory: Some(512)
        }
    );
    assert_eq!(web.environment, ["PORT_NAME=web"]);
    assert_eq!((web.deployment.minimum, web.deployment.maximum), (25, 150));
    let worker = &m.services["worker"];
    assert_eq!((&worker.build, worker.image.as_deref()), (&None, Some("redis:7")));
    let argv = ["redis-server", "--port", "6379"].map(String::from).to_vec();
    assert_eq!(worker.command, Some(Command::Exec(argv)));
    assert_eq!((worker.scale.count_min, worker.scale.count_max), (3, 3));
}

#[test]
fn defaults_apply_to_a_bare_service_and_an_empty_file() {
    assert_eq!(parse("").unwrap(), Manifest::default());
    assert!(parse("# nothing yet\nservices:\n").unwrap().services.is_empty());
    assert_eq!(web("").unwrap(), Service::default());
    let defaults = Service::default();
    assert_eq!(
        defaults.build,
        Some(Build {
            path: ".".into(),
            manifest: "Dockerfile".into(),
            command: None
        })
    );
    assert_eq!(
        (defaults.port, &*defaults.port_scheme, defaults.health.timeout),
        (None, "http", 4)
    );
    assert_eq!(
        (
            defaults.scale.count_min,
            defaults.deployment.minimum,
            defaults.deployment.maximum
        ),
        (1, 50, 200)
    );
}

#[test]
fn short_forms_of_build_health_scale_and_port_are_accepted() {
    let service = web("build: ./web\n    health: /up\n    scale: 1-3").unwrap();
    assert_eq!(
        service.build.map(|b| (b.path, b.manifest)),
        Some(("./web".into(), "Dockerfile".into()))
    );
    assert_eq!(service.health.path, "/up");
    assert_eq!((service.scale.count_min, service.scale.count_max), (1, 3));
    assert!(web("health:\n      disable: true").unwrap().health.disabled);
    for (port, scheme) in [
        ("3000", "http"),
        ("\"3000\"", "http"),
        ("http:3000", "http"),
        ("https:3000", "https"),
    ] {
        let service = web(&format!("port: {port}")).unwrap();
        assert_eq!((service.port, &*service.port_scheme), (Some(3000), scheme));
    }
}

#[test]
fn bad_port_names_key_and_line() {
    let err = parse("services:\n  web:\n    image: nginx\n    port: abc\n").unwrap_err();
    let expected = "convox.yml: services.web.port: invalid port \"abc\": use 1-65535, optionally prefixed with \
                        http: or https: (line 4)";
    assert_eq!(err.to_string(), expected);
    for port in ["0", "65536", "ftp:21", "-1", "[80]"] {
        let err = web(&format!("port: {port}")).unwrap_err();
        assert_eq!((err.key(), err.line()), ("services.web.port", Some(3)), "{port}");
    }
}

#[test]
fn bad_service_names_are_refused() {
    for name in ["Web", "1web", "web_1", "web-", &"a".repeat(64)] {
        let err = parse(&format!("services:\n  {name}:\n    image: x\n")).unwrap_err();
        assert!(err.to_string().contains("invalid service name"), "{name}: {err}");
        assert_eq!(err.line(), Some(2));
    }
}

#[test]
fn bad_scale_deployment_health_and_environment_are_refused() {
    let cases = [
        (
            "scale:\n      count: 3-1",
            "services.web.scale.count",
            "minimum 3 is above maximum 1",
        ),
        ("scale:\n      count: lots", "services.web.scale.count", "got \"lots\""),
        ("scale:\n      memory: 0", "services.web.scale.memory", "at least 1"),
        (
            "deployment:\n      minimum: 120",
            "services.web.deployment.minimum",
            "0 to 100",
        ),
        (
            "deployment:\n      maximum: 90",
            "services.web.deployment.maximum",
            "at least 100",
        ),
        (
            "health:\n      interval: 0",
            "services.web.health.interval",
            "at least 1",
        ),
        ("health: check", "services.web.health.path", "must start with '/'"),
        ("build: ../up", "services.web.build.path", "relative path"),
        ("image: x\n    build: .", "services.web", "either build or image"),
        (
            "environment:\n      - 9LIVES",
            "services.web.environment",
            "invalid variable",
        ),
    ];
    for (yaml, key, message) in cases {
        let err = web(yaml).unwrap_err();
        assert_eq!(err.key(), key, "{yaml}");
        assert!(err.to_string().contains(message), "{yaml}: {err}");
    }
}

#[test]
fn yaml_syntax_error_reports_a_line() {
    let err = parse("services:\n  web:\n    port: 3000\n  - oops\n").unwrap_err();
    assert_eq!((err.key(), err.line()), ("", Some(4)));
    assert!(
        err.to_string().starts_with("convox.yml: did not find expected key"),
        "{err}"
    );
}

#[test]
fn unknown_keys_are_kept() {
    let m = parse(FULL).unwrap();
    assert_eq!(m.services["web"].extra.get("domain"), Some(&Value::from("example.org")));
    let merged = parse("x-base: &base\n  port: 80\nservices:\n  web:\n    <<: *base\n").unwrap();
    assert_eq!(merged.services["web"].port, Some(80));
    assert!(merged.extra.contains_key("x-base"));
}

#[test]
fn timers_and_balancers_parse_with_defaults() {
    let m = parse(FULL).unwrap();
    assert!(!m.extra.contains_key("timers") && !m.extra.contains_key("balancers"));
    assert_eq!(
        m.timers["cleanup"],
        Timer {
            schedule: "0 3 * * *".into(),
            command: Command::Shell("bin/cleanup --all".into()),
            service: "worker".into(),
            concurrency: Concurrency::Allow,
            extra: BTreeMap::new(),
        }
    );
    let report = &m.timers["report"];
    assert_eq!(report.schedule, "*/15 9-17 ? JAN-jun,dec MON-FRI");
    assert_eq!(report.command, Command::Exec(vec!["bin/report".into(), "7".into()]));
    assert_eq!((&*report.service, report.concurrency), ("web", Concurrency::Forbid));
    assert_eq!(m.timers.keys().collect::<Vec<_>>(), ["cleanup", "report"]);
    let port = |source, target, protocol: &str| BalancerPort {
        source,
        target,
        protocol: protocol.into(),
    };
    assert_eq!(
        m.balancers["custom"],
        Balancer {
            service: "web".into(),
            ports: vec![port(5000, 3000, "TCP"), port(6000, 3001, "UDP")],
            whitelist: ["10.0.0.0/16", "2001:db8::/32", "192.168.1.7"]
                .map(String::from)
                .to_vec(),
            extra: BTreeMap::from([("x-note".to_owned(), Value::from("kept"))]),
        }
    );
    assert_eq!(
        [Concurrency::default(), Concurrency::Forbid, Concurrency::Replace].map(|c| c.as_str()),
        ["Allow", "Forbid", "Replace"]
    );
    // Absent or empty, both are empty maps.
    let bare = parse(
        "timers:
balancers: ~
services:
  web:
    image: x
",
    )
    .unwrap();
    assert!(bare.timers.is_empty() && bare.balancers.is_empty() && bare.extra.is_empty());
}

#[test]
fn unknown_timer_keys_are_kept() {
    let m = parse(FULL).unwrap();
    let extra = &m.timers["report"].extra;
    assert_eq!(extra.keys().collect::<Vec<_>>(), ["annotations", "parallelCount"]);
    assert_eq!(extra["parallelCount"], Value::from(2));
    assert!(m.timers["cleanup"].extra.is_empty());
}

/// A manifest with services `web` and `worker` and timer `cleanup`, whose schedule is on line 7.
fn timer(schedule: &str, rest: &str) -> Result<Manifest, ParseManifestError> {
    parse(&format!(
        "services:\n  web:\n    image: x\n  worker:\n    image: y\ntimers:\n  cleanup:\n    schedule: \
             {schedule}\n    command: bin/cleanup\n    service: web\n{rest}"
    ))
}

#[test]
fn timer_schedules_are_checked() {
    let err = timer("\"61 * * * *\"", "").unwrap_err();
    let expected = "convox.yml: timers.cleanup.schedule: \"61 * * * *\": minute 61 is out of range 0-59 (line 8)";
    assert_eq!(err.to_string(), expected);
    let cases = [
        ("\"* * * *\"", "expected 5 fields"),
        ("\"* * * * * *\"", "got 6"),
        ("\"\"", "got 0"),
        ("garbage", "got 1"),
        ("\"x * * * *\"", "invalid minute \"x\""),
        ("\"0 24 * * *\"", "hour 24 is out of range 0-23"),
        ("\"0 0 0 * *\"", "day of month 0 is out of range 1-31"),
        ("\"0 0 32 * *\"", "day of month 32"),
        ("\"0 0 * 13 *\"", "month 13 is out of range 1-12"),
        ("\"0 0 * FOO *\"", "invalid month \"FOO\""),
        (
            "\"0 0 * * 7\"",
            "day of week 7 is out of range 0-6 (0 or SUN is Sunday)",
        ),
        ("\"0 0 * * MON-FUN\"", "invalid day of week"),
        ("\"99999999999 * * * *\"", "minute 99999999999 is out of range"),
        ("\"*/0 * * * *\"", "a step must be at least 1"),
        (
            "\"*/4294967296 * * * *\"",
            "invalid minute \"*/4294967296\": a step must be at most 60",
        ),
        ("\"0 */25 * * *\"", "a step must be at most 24"),
        ("\"0 0 1-31/99999999999 * *\"", "a step must be at most 31"),
        ("\"0 0 30 2 *\"", "it never runs: no month of \"2\" has a day \"30\""),
        ("\"0 0 30 FEB ?\"", "it never runs"),
        ("\"0 0 31 4,6,9,11 *\"", "it never runs"),
        ("\"0 0 30-31 2 */1\"", "it never runs"),
        ("\"*/x * * * *\"", "invalid minute"),
        ("\"*/5/2 * * * *\"", "invalid minute"),
        ("\"1-2-3 * * * *\"", "invalid minute"),
        ("\"5-1 * * * *\"", "minute range 5-1 starts after it ends"),
        ("\"1,,2 * * * *\"", "invalid minute \"\""),
        ("\"-1 * * * *\"", "invalid minute"),
        ("\"+1 * * * *\"", "invalid minute"),
        ("\"? * * * *\"", "minute cannot be ?"),
        ("\"@often\"", "unknown macro"),
        ("\"@DAILY\"", "unknown macro"),
        ("\"@daily 3\"", "unknown macro"),
        ("3", "expected a cron expression"),
        ("[0, 3]", "expected a cron expression"),
    ];
    for (schedule, message) in cases {
        let err = timer(schedule, "").unwrap_err();
        assert_eq!(
            (err.key(), err.line()),
            ("timers.cleanup.schedule", Some(8)),
            "{schedule}"
        );
        assert!(err.to_string().contains(message), "{schedule}: {err}");
    }
    for schedule in [
        "\"@daily\"",
        "\"@annually\"",
        "\"@hourly\"",
        "\"0 0 * * 0\"",
        "\"0 0 * * SUN-sat\"",
        "\"5/15 * * * *\"",
        "\"0-59/7 0,12 1-31/2 * ?\"",
        "\"0 0 ? * 1,3,5\"",
        "\"*/60 * * * *\"",
        "\"0 0 29 2 *\"",
        "\"0 0 30 2 1\"",
        "\"0 0 31 1-12/3 *\"",
        "\"\t0\t3 * *  *\"",
    ] {
        let m = timer(schedule, "").unwrap_or_else(|e| panic!("{schedule}: {e}"));
        let expected = schedule.trim_matches('"').replace("\\t", " ");
        assert_eq!(
            m.timers["cleanup"].schedule,
            expected.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}

#[test]
fn timers_need_a_command_a_known_service_and_a_good_name() {
    let unknown = "services:\n  web:\n    image: x\n  worker:\n    image: y\ntimers:\n  cleanup:\n    \
                       schedule: \"@daily\"\n    command: bin/cleanup\n    service: wbe\n";
    let err = parse(unknown).unwrap_err();
    let expected = "convox.yml: timers.cleanup.service: no service \"wbe\": this manifest's services are web, \
                        worker (line 10)";
    assert_eq!(err.to_string(), expected);
    let lonely = "timers:\n  cleanup:\n    schedule: \"@daily\"\n    command: x\n    service: web\n";
    assert!(
        parse(lonely)
            .unwrap_err()
            .to_string()
            .contains("this manifest has no services")
    );

    let timer_body = |body: &str| {
        parse(&format!(
            "services:\n  web:\n    image: x\ntimers:\n  cleanup:\n    {body}\n"
        ))
        .map(|mut m| m.timers.remove("cleanup").unwrap())
    };
    let cases = [
        ("command: x\n    service: web", "timers.cleanup", "missing schedule"),
        (
            "schedule: \"@daily\"\n    service: web",
            "timers.cleanup",
            "missing command",
        ),
        (
            "schedule: \"@daily\"\n    command: x",
            "timers.cleanup",
            "missing service",
        ),
        (
            "schedule: \"@daily\"\n    command: \"\"\n    service: web",
            "timers.cleanup.command",
            "got \"\"",
        ),
        (
            "schedule: \"@daily\"\n    command: []\n    service: web",
            "timers.cleanup.command",
            "non-empty list",
        ),
        (
            "schedule: \"@daily\"\n    command: x\n    service: []",
            "timers.cleanup.service",
            "non-empty string",
        ),
        (
            "schedule: \"@daily\"\n    command: x\n    service: web\n    concurrency: sometimes",
            "timers.cleanup.concurrency",
            "expected Allow, Forbid or Replace, got \"sometimes\"",
        ),
    ];
    for (body, key, message) in cases {
        let err = timer_body(body).unwrap_err();
        assert_eq!(err.key(), key, "{body}");
        assert!(err.to_string().contains(message), "{body}: {err}");
        assert!(err.line().is_some(), "{body}");
    }
    let replace = timer_body("schedule: \"@daily\"\n    command: x\n    service: web\n    concurrency: REPLACE");
    assert_eq!(replace.unwrap().concurrency, Concurrency::Replace);
    let null = timer_body("schedule: \"@daily\"\n    command: x\n    service: web\n    concurrency: ~");
    assert_eq!(null.unwrap().concurrency, Concurrency::Allow);

    let named = |name: &str| {
        parse(&format!(
            "services:\n  web:\n    image: x\ntimers:\n  {name}:\n    schedule: \"@daily\"\n    command: x\n    \
                 service: web\n"
        ))
    };
    assert!(named(&"a".repeat(46)).is_ok());
    for name in ["Cleanup", "1cleanup", "clean_up", "cleanup-", &"a".repeat(47)] {
        let err = named(name).unwrap_err();
        assert!(err.to_string().contains("invalid timer name"), "{name}: {err}");
        assert!(err.to_string().contains("at most 46"), "{name}: {err}");
        assert_eq!((err.key(), err.line()), (&*format!("timers.{name}"), Some(5)));
    }
    let err = parse("timers: [cleanup]\n").unwrap_err();
    assert_eq!((err.key(), err.line()), ("timers", Some(1)));
    assert!(err.to_string().contains("expected a map, got a list"), "{err}");
    let err = parse("timers:\n  cleanup: ~\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a map of schedule, command and service, got nothing")
    );
}

#[test]
fn hostile_shapes_are_refused_before_parsing() {
    // 100 000 levels in 200 KB: the parser alone would take minutes.
    let deep = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let started = std::time::Instant::now();
    let err = parse(&deep).unwrap_err();
    assert!(err.to_string().contains("nested more than 100 levels"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // Legitimate brackets are fine.
    assert!(parse("services:\n  web:\n    command: [sh, -c, \"echo [ok] {1}\"]\n").is_ok());

    let big = format!("# {}\n", "x".repeat(MAX_MANIFEST_BYTES));
    assert!(parse(&big).unwrap_err().to_string().contains("bytes; the most is"));

    let raw = parse("services:\n  web\0:\n    port: 80\n").unwrap_err();
    assert_eq!(raw.line(), Some(2));
    assert!(raw.to_string().contains("NUL"), "{raw}");
    let escaped = parse("environment:\n  - \"A=x\\0y\"\n").unwrap_err();
    assert_eq!(escaped.key(), "environment");
    let in_key = parse("services:\n  \"w\\0\":\n    port: 80\n").unwrap_err();
    assert!(in_key.to_string().contains("NUL"), "{in_key}");
}

#[test]
fn alias_bombs_stay_small() {
    // Nine levels of nine aliases: 387 million strings if expanded.
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for level in 1..10 {
        let prev = level - 1;
        let refs = vec![format!("*a{prev}"); 9].join(", ");
        yaml.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    let started = std::time::Instant::now();
    assert!(parse(&yaml).is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_service_may_have_a_release_command() {
    assert_eq!(
        web("release: bin/migrate --all").unwrap().release,
        Some(Command::Shell("bin/migrate --all".into()))
    );
    assert_eq!(
        web("release: [bin/migrate]").unwrap().release,
        Some(Command::Exec(vec!["bin/migrate".into()]))
    );
    assert_eq!(web("port: 80").unwrap().release, None);
    assert_eq!(web("release: 3").unwrap_err().key(), "services.web.release");
}

#[test]
fn scale_counts_are_capped() {
    let err = web("scale:\n      count: 4294967295").unwrap_err();
    assert_eq!(err.key(), "services.web.scale.count");
    assert!(
        web("scale: 1001")
            .unwrap_err()
            .to_string()
            .contains("more than the 1000")
    );
    assert!(web("scale: 2-1001").is_err());
    assert_eq!(web("scale: 1000").unwrap().scale.count_min, 1000);
}

#[test]
fn deployment_analysis_is_on_by_default_and_can_be_tuned_or_turned_off() {
    let on = web("image: x").unwrap();
    assert_eq!(on.deployment.analysis, Some(Analysis::default()));
    let defaults = Analysis::default();
    assert_eq!(
        (
            defaults.window,
            defaults.min_requests,
            defaults.max_error_rate,
            defaults.max_latency_ratio
        ),
        (30, 20, 5.0, 2.0)
    );
    let off = web("image: x\n    deployment:\n      analysis: false").unwrap();
    assert_eq!(off.deployment.analysis, None);
    let tuned = web(
        "image: x\n    deployment:\n      minimum: 0\n      analysis:\n        window: 10\n        min_requests: 5\n        max_error_rate: 0.5\n        max_latency_ratio: 3",
    )
    .unwrap();
    assert_eq!(tuned.deployment.minimum, 0);
    assert_eq!(
        tuned.deployment.analysis,
        Some(Analysis {
            window: 10,
            min_requests: 5,
            max_error_rate: 0.5,
            max_latency_ratio: 3.0
        })
    );
}

#[test]
fn bad_analysis_settings_name_their_key_and_line() {
    let cases = [
        ("window: 0", "window", "at least 1"),
        ("window: 600", "window", "from 1 to 120"),
        ("min_requests: none", "min_requests", "whole number"),
        ("max_error_rate: 120", "max_error_rate", "0 to 100"),
        ("max_error_rate: lots", "max_error_rate", "a number"),
        ("max_latency_ratio: 0.5", "max_latency_ratio", "at least 1"),
        ("windw: 10", "windw", "unknown setting"),
    ];
    for (setting, key, message) in cases {
        let yaml = format!("image: x\n    deployment:\n      analysis:\n        {setting}");
        let err = web(&yaml).unwrap_err();
        assert_eq!(
            err.key(),
            format!("services.web.deployment.analysis.{key}"),
            "{setting}"
        );
        assert!(err.to_string().contains(message), "{setting}: {err}");
        assert_eq!(err.line(), Some(6), "{setting}");
    }
    let err = web("image: x\n    deployment:\n      analysis: sometimes").unwrap_err();
    assert_eq!(err.key(), "services.web.deployment.analysis");
    assert_eq!(err.line(), Some(5));
}
