//! Free loopback ports and addresses, and waiting for a condition.
//!
//! A free port is one the kernel handed out for a listener that is closed at once: another
//! process may take it before the test binds it, which on loopback in a test run does not
//! happen in practice. `weir up` has its own allocator (below the ephemeral range, each port
//! once per run) because its brokers must bind the same port again after a restart.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A free TCP port on `127.0.0.1`.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
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
