//! The parser's tests of `resources:` and of a service's `resources:` list: every type, the
//! options each takes, and what is refused (with the key and the line).

use super::*;
use crate::resource::Kind;

#[test]
fn resources_parse_with_their_options_and_links() {
    let m = parse(
        "resources:
  database:
    type: postgres
    options:
      version: 15
      storage: 20
  cache:
    type: redis
    image: redis:7.0
  gis:
    type: postgis
    options:
      version: 10-3.2
services:
  web:
    resources:
      - database
      - cache
",
    )
    .unwrap();
    let database = &m.resources["database"];
    assert_eq!(database.kind, Kind::Postgres);
    assert_eq!(database.options["version"], "15");
    assert_eq!(database.options["storage"], "20");
    assert_eq!(m.resources["cache"].image.as_deref(), Some("redis:7.0"));
    assert_eq!(m.resources["gis"].options["version"], "10-3.2");
    assert_eq!(m.services["web"].resources, ["database", "cache"]);
    assert!(m.extra.is_empty());
}

#[test]
fn every_kind_parses_bare() {
    for kind in Kind::ALL {
        let m = parse(&format!("resources:\n  main:\n    type: {kind}\n")).unwrap();
        assert_eq!(m.resources["main"].kind, kind);
        assert!(m.resources["main"].options.is_empty());
    }
}

#[test]
fn a_service_may_link_a_resource_declared_after_it() {
    let m = parse("services:\n  web:\n    resources: [db]\nresources:\n  db:\n    type: mysql\n").unwrap();
    assert_eq!(m.services["web"].resources, ["db"]);
}

/// The error of `text`: its key, its line, and its message.
fn refused(text: &str) -> (String, Option<usize>, String) {
    let err = parse(text).unwrap_err();
    (err.key().to_owned(), err.line(), err.to_string())
}

#[test]
fn unknown_types_options_and_keys_name_the_key_and_line() {
    let (key, line, message) = refused("resources:\n  db:\n    type: mongodb\n");
    assert_eq!((key.as_str(), line), ("resources.db.type", Some(3)));
    assert!(message.contains("mongodb") && message.contains("postgres"), "{message}");

    let (key, line, message) = refused("resources:\n  db:\n    type: postgres\n    options:\n      size: large\n");
    assert_eq!((key.as_str(), line), ("resources.db.options.size", Some(5)));
    assert!(
        message.contains("unknown option") && message.contains("storage"),
        "{message}"
    );

    // redis has no storage.
    let (key, line, _) = refused("resources:\n  cache:\n    type: redis\n    options:\n      storage: 10\n");
    assert_eq!((key.as_str(), line), ("resources.cache.options.storage", Some(5)));

    let (key, line, message) = refused("resources:\n  db:\n    type: postgres\n    durable: true\n");
    assert_eq!((key.as_str(), line), ("resources.db.durable", Some(4)));
    assert!(message.contains("unknown key"), "{message}");

    let (key, _, message) = refused("resources:\n  db:\n    options:\n      version: 15\n");
    assert_eq!(key, "resources.db");
    assert!(message.contains("missing type"), "{message}");
}

#[test]
fn bad_option_values_name_the_key_and_line() {
    for (options, key) in [
        ("version: latest", "version"),
        ("version: \"1 5\"", "version"),
        ("storage: 0", "storage"),
        ("storage: -3", "storage"),
        ("storage: 10GB", "storage"),
        ("memory: 8", "memory"),
        ("memory: [1]", "memory"),
    ] {
        let text = format!("resources:\n  db:\n    type: postgres\n    options:\n      {options}\n");
        let (got, line, message) = refused(&text);
        assert_eq!(
            (got.as_str(), line),
            (format!("resources.db.options.{key}").as_str(), Some(5)),
            "{options}: {message}"
        );
    }
    let (key, _, _) = refused("resources:\n  db:\n    type: postgres\n    image: \"a b\"\n");
    assert_eq!(key, "resources.db.image");
}

#[test]
fn bad_resource_names_and_links_are_refused() {
    let (key, _, message) = refused("resources:\n  Main_DB:\n    type: postgres\n");
    assert_eq!(key, "resources.Main_DB");
    assert!(message.contains("invalid resource name"), "{message}");
    let long = "d".repeat(41);
    assert!(parse(&format!("resources:\n  {long}:\n    type: redis\n")).is_err());

    let (key, line, message) =
        refused("resources:\n  db:\n    type: postgres\nservices:\n  web:\n    resources:\n      - database\n");
    assert_eq!((key.as_str(), line), ("services.web.resources", Some(6)));
    assert!(message.contains("\"database\"") && message.contains("db"), "{message}");

    let (key, _, message) = refused("services:\n  web:\n    resources: [db]\n");
    assert_eq!(key, "services.web.resources");
    assert!(message.contains("declares no resources"), "{message}");

    let (_, _, message) = refused("resources:\n  db:\n    type: redis\nservices:\n  web:\n    resources: [db, db]\n");
    assert!(message.contains("twice"), "{message}");
    let (_, _, message) = refused("services:\n  web:\n    resources: db\n");
    assert!(message.contains("a list of resource names"), "{message}");
}
