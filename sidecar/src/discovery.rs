//! Discovery: where a dependency's endpoints are, found by resolving a name again and again.
//!
//! For another Microservice the name is its headless `<name>-weir-endpoints` Service, whose
//! A/AAAA records are its ready pods: the cluster's DNS is the only thing asked, so there is
//! no API-server watch per pod and nothing of the operator's on the request path (the data
//! plane keeps working with the operator down). For an external URL it is the URL's own host.
//!
//! - Every [`refresh_ms`](weir_crds::proxy::EndpointsConfig::refresh_ms) the name is resolved and the balancer's set
//!   replaced by the answer (endpoints that stay keep their state).
//! - A resolution that fails (a timeout, a server failure: `Temporary failure in name
//!   resolution`) keeps the last set: a DNS hiccup must not empty a healthy dependency. An
//!   endpoint that is really gone is found at once by the connection refused to it (outlier
//!   ejection) and leaves at the next answer.
//! - An answer of no address (the name does not exist, or has no record: a headless Service
//!   with no ready pod) empties the set: calls then go to the upstream by name, through the
//!   Service, which answers as it would without Weir (refused at once with no pod), so the
//!   dependency's breaker and fallback work as before.
//! - One address family is used: IPv4 when the answer has any, else IPv6 (a dual-stack name
//!   lists each host twice, and `localhost` is not two endpoints).

use crate::balance::Balancer;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

type Resolution = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves `host:port` to addresses.
#[derive(Clone)]
pub struct Resolver(Arc<dyn Fn(String) -> Resolution + Send + Sync>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    pub fn new(f: impl Fn(String) -> Resolution + Send + Sync + 'static) -> Resolver {
        Resolver(Arc::new(f))
    }

    fn resolve(&self, name: String) -> Resolution {
        (self.0)(name)
    }
}

/// The system's resolver (`getaddrinfo`: `/etc/hosts`, then the pod's nameservers and search
/// domains). A name that does not exist or has no address is an answer (no address), not an
/// error: only a resolution that could not be made is.
pub fn system_resolver() -> Resolver {
    Resolver::new(|name: String| {
        Box::pin(async move {
            match tokio::net::lookup_host(name).await {
                Ok(addrs) => Ok(addrs.collect()),
                Err(e) if is_no_such_name(&e) => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        })
    })
}

/// Whether a `getaddrinfo` error is the answer "no such name" or "no address for it"
/// (`EAI_NONAME`, `EAI_NODATA`), which the standard library passes on as their text only.
fn is_no_such_name(e: &std::io::Error) -> bool {
    let text = e.to_string();
    [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
    ]
    .iter()
    .any(|t| text.contains(t))
}

/// The running resolution loop of one dependency; stopped when dropped (a reload that changes
/// the dependency's endpoints starts a new one).
#[derive(Debug)]
pub struct Discovery {
    task: JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The addresses of one family, IPv4 first, sorted, without duplicates.
pub fn one_family(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.iter().any(SocketAddr::is_ipv4) {
        addrs.retain(SocketAddr::is_ipv4);
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

impl Discovery {
    /// Resolves `name` (`host:port`) now and every `every` after, feeding `balancer`.
    pub fn start(
        dependency: &str,
        name: String,
        every: Duration,
        balancer: Balancer,
        resolve: Resolver,
    ) -> Discovery {
        let dependency = dependency.to_string();
        let task = tokio::spawn(async move {
            let mut last: Vec<SocketAddr> = Vec::new();
            // Logged when it starts failing and when it recovers, not at every attempt.
            let mut failing = false;
            loop {
                match resolve.resolve(name.clone()).await {
                    Ok(addrs) if addrs.is_empty() => {
                        if !last.is_empty() {
                            tracing::warn!(
                                %dependency,
                                %name,
                                "no endpoint: the name has no address; calls go to the upstream by name"
                            );
                            balancer.update(&[]);
                            last.clear();
                        }
                        failing = false;
                    }
                    Ok(addrs) => {
                        let addrs = one_family(addrs);
                        if failing {
                            tracing::info!(%dependency, %name, "endpoints resolve again");
                            failing = false;
                        }
                        if addrs != last {
                            tracing::info!(
                                %dependency,
                                %name,
                                endpoints = ?addrs,
                                "endpoints changed"
                            );
                            balancer.update(&addrs);
                            last = addrs;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            let error = e.to_string();
                            tracing::warn!(
                                %dependency,
                                %name,
                                error,
                                kept = last.len(),
                                "endpoints did not resolve; the last answer is kept"
                            );
                            failing = true;
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        Discovery { task }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Settings;
    use std::sync::Mutex;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A resolver whose answer the test sets: `None` fails the resolution.
    fn scripted() -> (Resolver, Arc<Mutex<Option<Vec<SocketAddr>>>>) {
        let answer: Arc<Mutex<Option<Vec<SocketAddr>>>> = Arc::default();
        let a2 = answer.clone();
        let r = Resolver::new(move |_name| {
            let got = a2.lock().unwrap().clone();
            Box::pin(async move { got.ok_or_else(|| std::io::Error::other("SERVFAIL (scripted)")) })
        });
        (r, answer)
    }

    fn addrs(b: &Balancer) -> Vec<SocketAddr> {
        b.endpoints().iter().map(|e| e.addr).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn answers_replace_the_set_and_failures_keep_the_last_one() {
        let (resolve, answer) = scripted();
        let b = Balancer::new(Settings::default());
        *answer.lock().unwrap() = Some(vec![a("10.0.0.2:15001"), a("10.0.0.1:15001")]);
        let every = Duration::from_secs(5);
        let d = Discovery::start("users", "users:15001".into(), every, b.clone(), resolve);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(addrs(&b), [a("10.0.0.1:15001"), a("10.0.0.2:15001")]);
        // A failed resolution keeps the set.
        *answer.lock().unwrap() = None;
        tokio::time::sleep(every).await;
        assert_eq!(addrs(&b).len(), 2);
        // A pod leaves and another comes: the next resolution says so.
        *answer.lock().unwrap() = Some(vec![a("10.0.0.2:15001"), a("10.0.0.3:15001")]);
        tokio::time::sleep(every).await;
        assert_eq!(addrs(&b), [a("10.0.0.2:15001"), a("10.0.0.3:15001")]);
        // No address at all (no ready pod): the set empties, and calls go by name.
        *answer.lock().unwrap() = Some(vec![]);
        tokio::time::sleep(every).await;
        assert!(addrs(&b).is_empty());
        *answer.lock().unwrap() = Some(vec![a("10.0.0.2:15001"), a("10.0.0.3:15001")]);
        tokio::time::sleep(every).await;
        assert_eq!(addrs(&b).len(), 2);
        // Stopped with its handle.
        drop(d);
        *answer.lock().unwrap() = Some(vec![a("10.0.0.9:15001")]);
        tokio::time::sleep(every * 2).await;
        assert_eq!(addrs(&b).len(), 2);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_no_address_for_a_name_that_does_not_exist() {
        let r = system_resolver();
        assert_eq!(
            r.resolve("weir-no-such-name.invalid:80".into())
                .await
                .unwrap(),
            Vec::<SocketAddr>::new()
        );
        assert!(!r.resolve("localhost:80".into()).await.unwrap().is_empty());
    }

    #[test]
    fn one_family_is_used_ipv4_first() {
        assert_eq!(
            one_family(vec![a("[::1]:80"), a("127.0.0.1:80"), a("127.0.0.1:80")]),
            [a("127.0.0.1:80")]
        );
        assert_eq!(
            one_family(vec![a("[fd00::2]:80"), a("[fd00::1]:80")]),
            [a("[fd00::1]:80"), a("[fd00::2]:80")]
        );
    }
}
