//! Free loopback ports and addresses, and waiting for a condition.
//!
//! Ports come from [`weir_broker::local::free_port`] (the span kept for tests, below the
//! ephemeral range, each port once per test process): the kernel's port 0 may hand out the same
//! port twice in one test (seen: a proxy's admin and inbound listeners given one port while a
//! Kafka client was reconnecting hundreds of times).

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A free TCP port on `127.0.0.1`.
pub fn free_port() -> u16 {
    weir_broker::local::free_port(weir_broker::local::PortSpan::Tests)
        .expect("a free loopback port for tests")
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    eventually_async(timeout, || std::future::ready(cond())).await
}

/// Like [`eventually`] with an async condition.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
