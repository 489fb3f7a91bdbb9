//! The parser's tests of `balancers:`: ports, protocols, whitelists and what is refused.

use super::*;

/// Parses `yaml` (indented by four spaces, from line 7) into balancer `custom` of service `web`.
fn balancer(yaml: &str) -> Result<Balancer, ParseManifestError> {
    parse(&format!(
        "services:\n  web:\n    image: x\nbalancers:\n  custom:\n    service: web\n    {yaml}\n"
    ))
    .map(|mut m| m.balancers.remove("custom").unwrap())
}

#[test]
fn bad_balancers_are_refused() {
    let cases = [
        ("x: 1", "balancers.custom", "missing ports", 5),
        ("ports: {}", "balancers.custom.ports", "add at least one port", 7),
        (
            "ports: 5000",
            "balancers.custom.ports",
            "expected a map of balancer port",
            7,
        ),
        (
            "ports:\n      0: 3000",
            "balancers.custom.ports.0",
            "invalid port \"0\": use 1-65535",
            8,
        ),
        (
            "ports:\n      70000: 3000",
            "balancers.custom.ports.70000",
            "invalid port",
            8,
        ),
        (
            "ports:\n      abc: 3000",
            "balancers.custom.ports.abc",
            "invalid port \"abc\"",
            8,
        ),
        (
            "ports:\n      [1]: 3000",
            "balancers.custom.ports",
            "expected port numbers as keys",
            7,
        ),
        (
            "ports:\n      5000: 0",
            "balancers.custom.ports.5000",
            "expected a port from 1 to 65535, got 0",
            8,
        ),
        (
            "ports:\n      5000: http",
            "balancers.custom.ports.5000",
            "got \"http\"",
            8,
        ),
        ("ports:\n      5000: ~", "balancers.custom.ports.5000", "got nothing", 8),
        (
            "ports:\n      5000: 3000\n      \"5000\": 3001",
            "balancers.custom.ports.5000",
            "port 5000 is given twice",
            8,
        ),
        (
            "ports:\n      5000:\n        port: 3000\n        protocol: sctp",
            "balancers.custom.ports.5000.protocol",
            "expected tcp or udp, got \"sctp\"",
            10,
        ),
        (
            "ports:\n      5000:\n        protocol: udp",
            "balancers.custom.ports.5000",
            "missing port",
            8,
        ),
        (
            "ports:\n      5000:\n        port: 3000\n        protcol: udp",
            "balancers.custom.ports.5000.protcol",
            "unknown key",
            10,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist:\n      - 10.0.0.0/33",
            "balancers.custom.whitelist",
            "invalid network \"10.0.0.0/33\"",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: 10.0.0.0/8, nope",
            "balancers.custom.whitelist",
            "invalid network \"nope\"",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: [\"2001:db8::/129\"]",
            "balancers.custom.whitelist",
            "invalid network",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: [10.0.0.0/, 10.0.0.0/+8]",
            "balancers.custom.whitelist",
            "invalid network \"10.0.0.0/\"",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: [\"fe80::1%eth0\"]",
            "balancers.custom.whitelist",
            "invalid network",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: [1]",
            "balancers.custom.whitelist",
            "expected a list of networks",
            9,
        ),
        (
            "ports:\n      5000: 3000\n    whitelist: {a: 1}",
            "balancers.custom.whitelist",
            "expected a list of networks",
            9,
        ),
    ];
    for (yaml, key, message, line) in cases {
        let err = balancer(yaml).unwrap_err();
        assert_eq!((err.key(), err.line()), (key, Some(line)), "{yaml}: {err}");
        assert!(err.to_string().contains(message), "{yaml}: {err}");
    }

    let err = parse("balancers:\n  custom:\n    ports:\n      80: 80\n").unwrap_err();
    assert!(err.to_string().contains("missing service"), "{err}");
    let err =
        parse("services:\n  web:\n    image: x\nbalancers:\n  custom:\n    service: api\n    ports:\n      80: 80\n")
            .unwrap_err();
    let expected =
        "convox.yml: balancers.custom.service: no service \"api\": this manifest's services are web (line 6)";
    assert_eq!(err.to_string(), expected);
    let err = parse("balancers: 3\n").unwrap_err();
    assert_eq!((err.key(), err.line()), ("balancers", Some(1)));

    let named = |name: &str| {
        parse(&format!(
            "services:\n  web:\n    image: x\nbalancers:\n  {name}:\n    service: web\n    ports:\n      80: 80\n"
        ))
    };
    assert!(named(&"b".repeat(54)).is_ok());
    for name in ["Custom", "custom_1", &"b".repeat(55)] {
        let err = named(name).unwrap_err();
        assert!(err.to_string().contains("invalid balancer name"), "{name}: {err}");
        assert_eq!(err.line(), Some(5), "{name}");
    }
}

#[test]
fn balancer_short_forms_are_accepted() {
    let b = balancer("ports:\n      \"53\": \"5353\"\n      22:\n        port: 2222\n        protocol: TCP\n    whitelist: \"10.0.0.0/8, ::1 ,0.0.0.0/0\"").unwrap();
    let ports: Vec<_> = b.ports.iter().map(|p| (p.source, p.target, &*p.protocol)).collect();
    assert_eq!(ports, [(22, 2222, "TCP"), (53, 5353, "TCP")]);
    assert_eq!(b.whitelist, ["10.0.0.0/8", "::1", "0.0.0.0/0"]);
    let b = balancer("ports:\n      65535: 1\n    whitelist: ~\n    annotations: ~").unwrap();
    assert!(b.whitelist.is_empty() && b.extra.is_empty());
    assert_eq!(b.ports[0].source, 65535);
}
