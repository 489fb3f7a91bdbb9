//! Upgrades keep everything: a database filled at older migrations survives each later
//! migration row for row, and the current rack started on it lists, streams and promotes what
//! was there. Forward-only migrations are each checked from their predecessor.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::helpers::{TestApp, wait_for};

/// The secret of the token seeded at migration 5 (its SHA-256 is what the table holds).
const OLD_TOKEN: &str = "rack_upgradetokenupgradetokenupgradetoken0";

/// Rows written once the database has reached a migration: what a rack of that version would
/// have stored (ids in rack's formats, a finished build with its log, a running deployment).
const SEEDS: &[(i64, &str)] = &[
    (1, "insert into apps (name) values ('oldapp'), ('otherapp')"),
    (
        2,
        "insert into objects (app, key, size, sha256) values
             ('oldapp', 'tmp/src.tgz', 4, '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08');
         insert into builds (id, app, status, description, source_url, manifest, started_at, ended_at)
             values ('BOLDBUILDAA', 'oldapp', 'complete', 'first', 'object:///tmp/src.tgz', '', now(), now());
         insert into releases (id, app, build_id, env, manifest, description)
             values ('ROLDRELEASE', 'oldapp', 'BOLDBUILDAA', 'A=1', '', 'first');
         update builds set release_id = 'ROLDRELEASE' where id = 'BOLDBUILDAA';
         insert into events (app, seq, build_id, stream, message, outcome) values
             ('oldapp', 1, 'BOLDBUILDAA', 'build', 'step one', null),
             ('oldapp', 2, 'BOLDBUILDAA', 'build', 'step two', null),
             ('oldapp', 3, 'BOLDBUILDAA', 'build', 'done', 'ok');
         update apps set event_seq = 3 where name = 'oldapp'",
    ),
    (
        3,
        "insert into releases (id, app, build_id, env, manifest, description)
             values ('RSECONDRELE', 'oldapp', 'BOLDBUILDAA', 'A=2', 'services: {}', 'env change');
         insert into deployments (id, app, release_id, state, timeout_secs, started_at, ended_at)
             values ('0190a6f0-0000-7000-8000-000000000001', 'oldapp', 'ROLDRELEASE', 'running', 600, now(), now());
         update apps set release_id = 'ROLDRELEASE' where name = 'oldapp'",
    ),
    (
        5,
        "insert into tokens (id, name, role, hash)
             values ('0190a6f0-0000-7000-8000-000000000002', 'ci', 'deploy',
                     encode(sha256('rack_upgradetokenupgradetokenupgradetoken0'::bytea), 'hex'))",
    ),
    (
        11,
        "insert into apps (name) values ('feedapp');
         insert into releases (id, app, env, manifest, description)
             values ('RFEEDAPPREL', 'feedapp', '', '', 'made after the feed existed')",
    ),
];

/// Rows a migration drops on purpose (a cache): the table and the migration.
const CLEARED: &[(i64, &str)] = &[(13, "idempotency_keys")];

/// Every row of every table, as JSON objects.
async fn snapshot(conn: &mut PgConnection) -> BTreeMap<String, Vec<serde_json::Map<String, Value>>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables
          where table_schema = 'public' and table_type = 'BASE TABLE' and table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let mut all = BTreeMap::new();
    for table in tables {
        let rows: Vec<Value> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select to_jsonb(t) from \"{table}\" t")))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let rows = rows
            .into_iter()
            .map(|row| match row {
                Value::Object(map) => map,
                other => panic!("a row of {table} is not an object: {other}"),
            })
            .collect();
        all.insert(table, rows);
    }
    all
}

/// Migrates to `version` and writes that version's seed, if it has one.
async fn migrate_and_seed(conn: &mut PgConnection, version: i64) {
    rack::store::MIGRATOR.run_to(version, &mut *conn).await.unwrap();
    for (_, sql) in SEEDS.iter().filter(|(v, _)| *v == version) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("seeding at migration {version}: {e}"));
    }
}

/// Each migration from its predecessor: every row written before it is still there after it,
/// with the same values in every column it kept (columns it adds may be anything).
#[tokio::test]
async fn every_migration_keeps_the_rows_written_before_it() {
    let url = crate::helpers::empty_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let versions: Vec<i64> = rack::store::MIGRATOR.iter().map(|m| m.version).collect();
    assert!(SEEDS.iter().all(|(v, _)| versions.contains(v)));
    for version in versions {
        let before = snapshot(&mut conn).await;
        migrate_and_seed(&mut conn, version).await;
        let after = snapshot(&mut conn).await;
        for (table, rows) in before {
            if CLEARED.contains(&(version, table.as_str())) {
                continue;
            }
            let now = after
                .get(&table)
                .unwrap_or_else(|| panic!("migration {version} dropped the table {table}"));
            let kept: BTreeSet<&String> = now.first().map(|r| r.keys().collect()).unwrap_or_default();
            for row in rows {
                let old: BTreeMap<&String, &Value> = row.iter().filter(|(k, _)| kept.contains(k)).collect();
                let found = now
                    .iter()
                    .any(|new| old.iter().all(|(k, v)| new.get(k.as_str()).is_some_and(|n| n == *v)));
                assert!(found, "migration {version} lost or changed a row of {table}: {row:?}");
            }
        }
    }
    conn.close().await.unwrap();
}

/// A database filled at older migrations, then the current rack started on it: the apps, builds,
/// releases, deployments, tokens and events are all there and usable.
#[tokio::test]
async fn the_current_rack_serves_a_database_filled_by_older_ones() {
    let url = crate::helpers::empty_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // Filled as the versions went by, stopping short of the newest migrations.
    let last = SEEDS.iter().map(|(v, _)| *v).max().unwrap();
    for migration in rack::store::MIGRATOR.iter().filter(|m| m.version <= last) {
        migrate_and_seed(&mut conn, migration.version).await;
    }
    conn.close().await.unwrap();

    let rack = TestApp::spawn_on(&url, |_| {}).await;
    let names: BTreeSet<String> = rack
        .list_apps()
        .await
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["feedapp", "oldapp", "otherapp"].map(str::to_owned).into(),
        "every app"
    );
    let app: Value = rack.get_json("/apps/oldapp").await;
    assert_eq!(app["release"], "ROLDRELEASE", "{app}");
    let builds: Value = rack.get_json("/apps/oldapp/builds").await;
    assert_eq!(builds[0]["id"], "BOLDBUILDAA", "{builds}");
    assert_eq!(builds[0]["status"], "complete", "{builds}");
    let releases: Value = rack.get_json("/apps/oldapp/releases").await;
    let ids: Vec<&str> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["RSECONDRELE", "ROLDRELEASE"], "{releases}");
    let deployments: Value = rack.get_json("/apps/oldapp/deployments").await;
    assert_eq!(deployments[0]["state"], "running", "{deployments}");

    // The build's log resumes after the event id a client saw before the upgrade.
    let log = rack
        .get_plain("/apps/oldapp/builds/BOLDBUILDAA/logs?after=1&ids=true")
        .await;
    assert!(!log.contains("step one"), "{log}");
    assert!(
        log.starts_with("2 step two\n") && log.trim_end().ends_with("OK"),
        "{log}"
    );

    // The token made before the upgrade still authenticates, with its role.
    let response = rack
        .client
        .get(rack.url("/apps"))
        .bearer_auth(OLD_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A release made before the upgrade promotes, and the app runs it.
    let promote = rack
        .request(Method::POST, "/apps/oldapp/releases/RSECONDRELE/promote")
        .send()
        .await
        .unwrap();
    assert!(promote.status().is_success(), "{:?}", promote.text().await);
    wait_for(60, "the app to run the promoted release", || async {
        let app: Value = rack.get_json("/apps/oldapp").await;
        (app["status"] == "running" && app["release"] == "RSECONDRELE").then_some(())
    })
    .await;
    // And the feed goes on from the ids it had.
    let feed = rack.get_text("/apps/oldapp/events?after=0&follow=false").await;
    assert!(feed.contains("RSECONDRELE"), "{feed}");
    rack.stop().await;
}
