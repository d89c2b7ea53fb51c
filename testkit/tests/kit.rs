//! The test kit's own contracts: free ports are free, waiting gives up, a NATS server killed
//! with SIGKILL comes back on its port with its store, a proxy-less HTTP server answers.

use std::time::{Duration, Instant};
use weir_testkit::brokers::{Kind, require};
use weir_testkit::{NatsServer, eventually, free_addr, free_port, serve};

#[test]
fn a_free_port_can_be_bound_on_loopback() {
    let port = free_port();
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    assert!(free_addr().ip().is_loopback());
}

#[tokio::test]
async fn eventually_says_whether_the_condition_held_in_time() {
    let mut n = 0;
    assert!(
        eventually(Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .await
    );
    let start = Instant::now();
    assert!(!eventually(Duration::from_millis(100), || false).await);
    assert!(start.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn serve_answers_every_connection_with_the_handler() {
    let (addr, task) = serve(|_req| async {
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"hi")))
    })
    .await;
    for _ in 0..2 {
        let (status, body) = weir_testkit::proxy::http_get(&format!("http://{addr}/"))
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "hi"));
    }
    task.abort();
}

#[tokio::test]
async fn a_nats_server_killed_comes_back_on_its_port_with_its_store() {
    if require(Kind::Nats).is_none() {
        return;
    }
    let mut nats = NatsServer::start();
    let port = nats.port;
    let js = nats.js().await;
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "kit".into(),
        subjects: vec!["kit".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("kit", "one".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let pid = nats.pid();
    nats.kill9();
    assert!(nats.pid().is_none());
    nats.restart();
    assert_eq!(nats.port, port);
    assert_ne!(nats.pid(), pid);
    let mut stream = nats.js().await.get_stream("kit").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}
