//! The Kubernetes runtime's exec, against a server that speaks the Kubernetes exec protocol
//! (the websocket channel protocol, `v5.channel.k8s.io`): the request names the container and
//! command, stdin arrives on channel 0 and its end as a close of channel 0, output goes out on
//! channels 1 and 2, and the exit code comes as a `Status` on channel 3. (The hollow nodes of
//! the test control plane cannot run commands, so this part of the protocol is tested here.)

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Serves one exec: checks the request, says hello on stdout, echoes stdin back until its end,
/// writes to stderr, then exits with code 3.
#[expect(clippy::result_large_err, reason = "the handshake callback's type is tungstenite's")]
async fn fake_kubelet(listener: tokio::net::TcpListener) -> String {
    let (stream, _) = listener.accept().await.unwrap();
    let mut seen = String::new();
    let socket = tokio_tungstenite::accept_hdr_async(stream, |request: &Request, mut response: Response| {
        seen = request.uri().to_string();
        response
            .headers_mut()
            .insert("sec-websocket-protocol", "v5.channel.k8s.io".parse().unwrap());
        Ok(response)
    })
    .await
    .unwrap();
    let (mut sink, mut source) = socket.split();
    let frame = |channel: u8, data: &[u8]| Message::Binary([&[channel][..], data].concat().into());
    sink.send(frame(1, b"hello from the pod\n")).await.unwrap();
    while let Some(Ok(message)) = source.next().await {
        let Message::Binary(data) = message else { continue };
        match data.first() {
            Some(0) => {
                let mut echoed = b"got ".to_vec();
                echoed.extend_from_slice(&data[1..]);
                sink.send(frame(1, &echoed)).await.unwrap();
            }
            // CLOSE of channel 0: stdin has ended.
            Some(255) if data.get(1) == Some(&0) => break,
            _ => {}
        }
    }
    sink.send(frame(2, b"and a warning\n")).await.unwrap();
    let status = serde_json::json!({
        "status": "Failure", "reason": "NonZeroExitCode",
        "details": { "causes": [{ "reason": "ExitCode", "message": "3" }] }
    });
    sink.send(frame(3, status.to_string().as_bytes())).await.unwrap();
    let _ = sink.close().await;
    seen
}

#[tokio::test]
async fn exec_speaks_the_kubernetes_exec_protocol() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url: axum::http::Uri = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
    let server = tokio::spawn(fake_kubelet(listener));
    let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, "rack-myapp");
    let request = rack::runtime::ExecRequest {
        command: vec!["sh".into(), "-c".into(), "cat; exit 3".into()],
        tty: None,
        stdin: true,
    };
    let session = rack::runtime::kube::process::exec(&pods, "web-run-abc", request)
        .await
        .unwrap();
    let rack::runtime::ExecSession {
        mut output,
        stdin,
        exit,
    } = session;
    let mut stdin = stdin.expect("stdin");
    stdin.write_all(b"input\n").await.unwrap();
    stdin.flush().await.unwrap();
    let mut text = String::new();
    while !text.contains("got input") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), output.next())
            .await
            .expect("output")
            .expect("more output");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    stdin.shutdown().await.unwrap();
    drop(stdin);
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), output.next())
        .await
        .expect("the end")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let code = tokio::time::timeout(Duration::from_secs(10), exit)
        .await
        .expect("an exit code");
    assert_eq!(code, 3);
    assert!(text.contains("hello from the pod\n"), "{text:?}");
    assert!(text.contains("got input\n"), "{text:?}");
    assert!(text.contains("and a warning\n"), "{text:?}");
    let seen = server.await.unwrap();
    assert!(
        seen.starts_with("/api/v1/namespaces/rack-myapp/pods/web-run-abc/exec?"),
        "{seen}"
    );
    for part in [
        "container=main",
        "command=sh",
        "command=-c",
        "stdin=true",
        "stdout=true",
    ] {
        assert!(seen.contains(part), "{part} missing in {seen}");
    }
}
