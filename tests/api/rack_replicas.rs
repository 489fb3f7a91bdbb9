//! `rack ps` and `rack logs` with two real `rack server` processes on one Postgres: either
//! replica lists both, a follower on one sees the other's lines, and a replica that dies drops
//! out of `rack ps` once its heartbeat expires.

use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{PASSWORD, fresh_database, wait_for};
use crate::replicas::{Replica, create_app};

/// Only the lines about created apps reach the log (and the test's output): the replicas'
/// stderr is the test's.
const LOG: (&str, &str) = ("RUST_LOG", "warn,rack::api::apps=info");

/// The websocket `convox rack logs` opens (`/system/logs`, the log options as headers).
async fn rack_logs(
    replica: &Replica,
    headers: &[(&'static str, &str)],
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let address = replica.base().trim_start_matches("http://");
    let mut request = format!("ws://{address}/system/logs").into_client_request().unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("convox:{PASSWORD}"));
    let request_headers = request.headers_mut();
    request_headers.insert("authorization", format!("Basic {auth}").parse().unwrap());
    request_headers.insert("origin", replica.base().parse().unwrap());
    request_headers.insert("version", "dev".parse().unwrap());
    for (name, value) in headers {
        request_headers.insert(*name, value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The rack rows of `rack ps` on `replica` (`GET /system/processes`, as the CLI asks), by port.
async fn rack_ps(replica: &Replica) -> Vec<(String, String)> {
    let processes = replica.json("/system/processes?all=false").await;
    let mut racks: Vec<(String, String)> = processes
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "rack")
        .map(|p| {
            (
                p["ports"][0].as_str().unwrap().to_owned(),
                p["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    racks.sort();
    racks
}

fn port(replica: &Replica) -> String {
    replica.base().rsplit(':').next().unwrap().to_owned()
}

#[tokio::test]
async fn rack_ps_and_rack_logs_cover_every_replica_and_a_dead_one_drops_out() {
    let database = fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let a = Replica::start(&database, data.path(), &[LOG]).await;
    let mut b = Replica::start(&database, data.path(), &[LOG]).await;

    // `rack ps` on either: both servers, each with its own id.
    let both = wait_for(60, "both replicas in rack ps on a", || async {
        let racks = rack_ps(&a).await;
        (racks.len() == 2).then_some(racks)
    })
    .await;
    assert_eq!(rack_ps(&b).await, both);
    let mut ports: Vec<String> = both.iter().map(|(p, _)| p.clone()).collect();
    ports.sort();
    let mut expected = vec![port(&a), port(&b)];
    expected.sort();
    assert_eq!(ports, expected);
    assert_ne!(both[0].1, both[1].1);
    let id_of = |replica: &Replica| both.iter().find(|(p, _)| *p == port(replica)).unwrap().1.clone();
    let (id_a, id_b) = (id_of(&a), id_of(&b));

    // A follower on a sees what b logs, and what a logs, each on its replica's stream.
    let mut follower = rack_logs(&a, &[("prefix", "true")]).await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let (from_a, from_b) = (format!("a{}", &marker[..12]), format!("b{}", &marker[..12]));
    create_app(&b, &from_b).await;
    create_app(&a, &from_a).await;
    let text = crate::helpers::text_until(&mut follower, "both replicas' lines", |text| {
        text.contains(&format!("created app {from_a}")) && text.contains(&format!("created app {from_b}"))
    })
    .await;
    let line_of = |needle: &str| text.lines().find(|l| l.contains(needle)).unwrap().to_owned();
    let (line_a, line_b) = (
        line_of(&format!("created app {from_a}")),
        line_of(&format!("created app {from_b}")),
    );
    assert_eq!(
        line_b.split(' ').nth(1),
        Some(format!("system/rack/{id_b}").as_str()),
        "{line_b}"
    );
    assert_eq!(
        line_a.split(' ').nth(1),
        Some(format!("system/rack/{id_a}").as_str()),
        "{line_a}"
    );
    assert!(line_b.split(' ').nth(2) == Some("INFO"), "{line_b}");

    // Not following, on b, with a filter: both lines, with ascending ids, and resumable after
    // the first.
    // What `rack logs --no-follow --filter` reads from b at `path`.
    let read = |path: String| {
        b.request(Method::GET, &path)
            .header("accept", "text/plain")
            .header("follow", "false")
            .header("filter", &marker[..12])
            .send()
    };
    let past = read("/system/logs?ids=true".to_owned())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = past.lines().filter(|l| l.contains("created app")).collect();
    assert_eq!(lines.len(), 2, "{past}");
    let ids: Vec<i64> = lines
        .iter()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(ids[0] < ids[1], "{past}");
    let (first, second) = if lines[0].contains(&from_a) {
        (&from_a, &from_b)
    } else {
        (&from_b, &from_a)
    };
    assert!(lines[1].contains(second.as_str()), "{past}");
    let first_id = ids[0];
    let rest = read(format!("/system/logs?after={first_id}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        rest.contains(second.as_str()) && !rest.contains(first.as_str()),
        "{rest}"
    );

    // b dies without a word: once its heartbeat is older than the job lease (3 s here), rack ps
    // on a lists a alone.
    b.kill_9().await;
    let left = wait_for(60, "the killed replica to leave rack ps", || async {
        let racks = rack_ps(&a).await;
        (racks.len() == 1).then_some(racks)
    })
    .await;
    assert_eq!(left, vec![(port(&a), id_a)]);
}
