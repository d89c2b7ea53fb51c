//! Who may reach the app (`mtls.inbound`, `mtls.authorization`): the inbound listener's
//! authorization, in front of every other inbound policy.
//!
//! A request came either over mutual TLS, with its caller's identity from the verified chain
//! (the [`Caller`] extension the listener sets), or in plaintext:
//! - plaintext from loopback is the pod's own containers (and `weir up`'s local callers):
//!   always admitted, counted as `loopback`;
//! - plaintext from elsewhere is refused under `strict` (403 `mtls-required`, gRPC
//!   `UNAUTHENTICATED`) and admitted and counted as `admitted` under `permissive`;
//! - a verified caller is admitted when `allow` names it (`<ns>/<name>`, `<ns>/saga/<name>`)
//!   or its namespace (`<ns>/*`); otherwise `enforce` refuses it (403 `caller-not-allowed`,
//!   gRPC `PERMISSION_DENIED`), `audit` admits it counted as `audit-denied`, and `open` admits
//!   every verified caller.
//!
//! Each decision is counted in `weir_inbound_authorizations_total{transport, caller,
//! decision}`; each refusal (and audit) is logged, at most once a second per caller, so a
//! caller in a loop cannot flood the log. The set is the config's: a reload (the graph
//! changed) builds a new layer, with no restart and no connection dropped.

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, reject};
use crate::mtls::{Caller, MtlsMetrics};
use crate::service::PeerAddr;
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tower::{Layer, Service};
use weir_crds::proxy::{AuthorizationMode, InboundMtlsMode, MtlsConfig};

/// Callers whose counters are kept at hand; past it, each request looks its counter up.
const CACHED_CALLERS: usize = 4_096;
/// At most one log line per caller (or per plaintext peer kind) this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The decision for one verified caller, and its counter.
#[derive(Debug)]
struct CallerEntry {
    admitted: bool,
    decision: &'static str,
    counter: Counter,
    /// The refusal's `weir_rejections_total` counter, when it is one.
    rejections: Option<Counter>,
    last_log: Mutex<Option<Instant>>,
}

impl CallerEntry {
    /// Counts one decision, and one rejection when it refuses.
    fn count(&self) {
        self.counter.inc();
        if let Some(r) = &self.rejections {
            r.inc();
        }
    }

    /// Whether this refusal (or audit) gets a log line now.
    fn log_now(&self) -> bool {
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The policy of one config, shared by every connection.
#[derive(Debug)]
pub struct Authorizer {
    plaintext: InboundMtlsMode,
    mode: AuthorizationMode,
    callers: HashSet<String>,
    namespaces: HashSet<String>,
    metrics: MtlsMetrics,
    /// `weir_rejections_total{reason="caller-not-allowed"}`, as every refusal is counted there.
    denied: Counter,
    loopback: Counter,
    plaintext_admitted: Counter,
    plaintext_refused: CallerEntry,
    known: RwLock<HashMap<Arc<str>, Arc<CallerEntry>>>,
}

impl Authorizer {
    pub fn new(cfg: &MtlsConfig, all: &crate::metrics::Metrics) -> Authorizer {
        let metrics = &all.mtls;
        let mut callers = HashSet::new();
        let mut namespaces = HashSet::new();
        for a in &cfg.authorization.allow {
            match a.strip_suffix("/*") {
                Some(ns) => namespaces.insert(ns.to_string()),
                None => callers.insert(a.clone()),
            };
        }
        Authorizer {
            plaintext: cfg.inbound,
            mode: cfg.authorization.mode,
            callers,
            namespaces,
            metrics: metrics.clone(),
            denied: all.rejections("inbound", "", Reason::CallerNotAllowed),
            loopback: metrics.authorization("plaintext", "", "loopback"),
            plaintext_admitted: metrics.authorization("plaintext", "", "admitted"),
            plaintext_refused: CallerEntry {
                admitted: false,
                decision: "refused",
                counter: metrics.authorization("plaintext", "", "refused"),
                rejections: Some(all.rejections("inbound", "", Reason::MtlsRequired)),
                last_log: Mutex::new(None),
            },
            known: RwLock::default(),
        }
    }

    /// Whether `allow` names `caller` (`<ns>/<name>` or `<ns>/saga/<name>`) or its namespace.
    fn allows(&self, caller: &str) -> bool {
        self.callers.contains(caller)
            || caller
                .split_once('/')
                .is_some_and(|(ns, _)| self.namespaces.contains(ns))
    }

    fn entry(&self, caller: &Arc<str>) -> Arc<CallerEntry> {
        if let Some(e) = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(caller)
        {
            return e.clone();
        }
        let (admitted, decision) = match (self.allows(caller), self.mode) {
            (true, _) => (true, "allowed"),
            (false, AuthorizationMode::Open) => (true, "open"),
            (false, AuthorizationMode::Audit) => (true, "audit-denied"),
            (false, AuthorizationMode::Enforce) => (false, "denied"),
        };
        let entry = Arc::new(CallerEntry {
            admitted,
            decision,
            counter: self.metrics.authorization("mtls", caller, decision),
            rejections: (!admitted).then(|| self.denied.clone()),
            last_log: Mutex::new(None),
        });
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.len() < CACHED_CALLERS {
            known.insert(caller.clone(), entry.clone());
        }
        entry
    }

    /// `None`: admitted; else the refusal's reason.
    fn decide<B>(&self, req: &http::Request<B>) -> Option<Reason> {
        if let Some(Caller(caller)) = req.extensions().get::<Caller>() {
            let e = self.entry(caller);
            e.count();
            if e.decision != "allowed" && e.decision != "open" && e.log_now() {
                if e.admitted {
                    tracing::warn!(caller = %caller, "caller not allowed (audit: admitted)");
                } else {
                    tracing::warn!(caller = %caller, "caller not allowed: refused");
                }
            }
            return (!e.admitted).then_some(Reason::CallerNotAllowed);
        }
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
        if peer.is_none_or(|p| p.ip().is_loopback()) {
            self.loopback.inc();
            return None;
        }
        match self.plaintext {
            InboundMtlsMode::Permissive => {
                self.plaintext_admitted.inc();
                None
            }
            InboundMtlsMode::Strict => {
                let e = &self.plaintext_refused;
                e.count();
                if e.log_now() {
                    tracing::warn!(peer = ?peer, "plaintext from outside the pod refused (mtls strict)");
                }
                Some(Reason::MtlsRequired)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    authorizer: Arc<Authorizer>,
}

impl AuthorizeLayer {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        AuthorizeLayer { authorizer }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
}

impl<S> Service<Req> for Authorize<S>
where
    S: Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture>,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        match self.authorizer.decide(&req) {
            None => self.inner.call(req),
            Some(reason) => Box::pin(std::future::ready(Ok(reject(reason)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// The contract's check of an `allow` entry (weir-crds) and the identity parser (weir-identity)
    /// judge names alike: an entry the config accepts names a workload a certificate can carry,
    /// and a name no certificate can carry is refused in the config, not left to match nothing.
    #[test]
    fn allow_entries_and_identities_agree_on_what_a_name_is() {
        let names = [
            "orders",
            "a",
            "0rders",
            "ord-ers",
            "9",
            "-orders",
            "orders-",
            "Orders",
            "or_ders",
            "or.ders",
            "",
            &"x".repeat(63),
            &"x".repeat(64),
        ];
        for ns in names {
            for name in names {
                for (entry, uri) in [
                    (
                        format!("{ns}/{name}"),
                        format!("spiffe://cluster.local/ns/{ns}/ms/{name}"),
                    ),
                    (
                        format!("{ns}/saga/{name}"),
                        format!("spiffe://cluster.local/ns/{ns}/saga/{name}"),
                    ),
                ] {
                    let parsed = weir_identity::WorkloadId::parse(&uri);
                    assert_eq!(
                        weir_crds::proxy::is_allow_entry(&entry),
                        parsed.is_ok(),
                        "{entry:?} vs {uri:?}: {parsed:?}"
                    );
                    if let Ok(id) = parsed {
                        assert_eq!(id.short(), entry);
                    }
                }
            }
        }
    }

    fn authorizer(
        inbound: InboundMtlsMode,
        mode: AuthorizationMode,
        allow: &[&str],
    ) -> (Authorizer, Arc<Metrics>) {
        let metrics = Metrics::new();
        let cfg = MtlsConfig {
            identity: "spiffe://cluster.local/ns/shop/ms/users".into(),
            trust_bundle_file: "/b".into(),
            issuer_url: "https://issuer:8443".into(),
            token_file: "/t".into(),
            renew_at_percent: 70,
            inbound,
            authorization: weir_crds::proxy::AuthorizationConfig {
                mode,
                allow: allow.iter().map(|s| s.to_string()).collect(),
            },
        };
        (Authorizer::new(&cfg, &metrics), metrics)
    }

    fn from(caller: Option<&str>, peer: &str) -> http::Request<()> {
        let mut req = http::Request::new(());
        if let Some(c) = caller {
            req.extensions_mut().insert(Caller(c.into()));
        }
        req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        req
    }

    fn text(m: &Metrics) -> String {
        m.encode()
    }

    #[test]
    fn the_allowed_set_admits_callers_and_namespaces_and_nothing_else() {
        let (a, reg) = authorizer(
            InboundMtlsMode::Strict,
            AuthorizationMode::Enforce,
            &["shop/orders", "shop/saga/checkout", "ops/*"],
        );
        let remote = "10.1.2.3:40000";
        for ok in [
            "shop/orders",
            "shop/saga/checkout",
            "ops/prober",
            "ops/saga/x",
        ] {
            assert_eq!(a.decide(&from(Some(ok), remote)), None, "{ok}");
        }
        for refused in [
            "shop/payments",
            "shop/checkout",
            "shop/saga/orders",
            "other/orders",
            "shopx/orders",
            "op/prober",
        ] {
            assert_eq!(
                a.decide(&from(Some(refused), remote)),
                Some(Reason::CallerNotAllowed),
                "{refused}"
            );
        }
        // A verified caller on loopback is still a caller: its identity decides.
        assert_eq!(
            a.decide(&from(Some("shop/payments"), "127.0.0.1:5")),
            Some(Reason::CallerNotAllowed)
        );
        let t = text(&reg);
        assert!(t.contains(r#"inbound_authorizations_total{transport="mtls",caller="shop/payments",decision="denied"} 2"#), "{t}");
        assert!(t.contains(r#"inbound_authorizations_total{transport="mtls",caller="ops/prober",decision="allowed"} 1"#), "{t}");
    }

    #[test]
    fn plaintext_is_refused_from_outside_the_pod_under_strict_only() {
        let (strict, reg) = authorizer(InboundMtlsMode::Strict, AuthorizationMode::Enforce, &[]);
        assert_eq!(
            strict.decide(&from(None, "10.1.2.3:1")),
            Some(Reason::MtlsRequired)
        );
        assert_eq!(
            strict.decide(&from(None, "[fd00::1]:1")),
            Some(Reason::MtlsRequired)
        );
        assert_eq!(strict.decide(&from(None, "127.0.0.1:1")), None);
        assert_eq!(strict.decide(&from(None, "[::1]:1")), None);
        let t = text(&reg);
        assert!(
            t.contains(r#"{transport="plaintext",caller="",decision="refused"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"{transport="plaintext",caller="",decision="loopback"} 2"#),
            "{t}"
        );

        let (permissive, reg) =
            authorizer(InboundMtlsMode::Permissive, AuthorizationMode::Enforce, &[]);
        assert_eq!(permissive.decide(&from(None, "10.1.2.3:1")), None);
        // Permissive is about plaintext: a verified caller is still authorized.
        assert_eq!(
            permissive.decide(&from(Some("shop/orders"), "10.1.2.3:1")),
            Some(Reason::CallerNotAllowed)
        );
        assert!(text(&reg).contains(r#"{transport="plaintext",caller="",decision="admitted"} 1"#));
    }

    #[test]
    fn audit_admits_and_counts_open_admits_every_verified_caller() {
        let (audit, reg) = authorizer(
            InboundMtlsMode::Strict,
            AuthorizationMode::Audit,
            &["shop/orders"],
        );
        assert_eq!(
            audit.decide(&from(Some("shop/payments"), "10.0.0.1:1")),
            None
        );
        assert_eq!(audit.decide(&from(Some("shop/orders"), "10.0.0.1:1")), None);
        assert_eq!(
            audit.decide(&from(None, "10.0.0.1:1")),
            Some(Reason::MtlsRequired)
        );
        let t = text(&reg);
        assert!(
            t.contains(r#"{transport="mtls",caller="shop/payments",decision="audit-denied"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"{transport="mtls",caller="shop/orders",decision="allowed"} 1"#),
            "{t}"
        );

        let (open, reg) = authorizer(InboundMtlsMode::Strict, AuthorizationMode::Open, &[]);
        assert_eq!(
            open.decide(&from(Some("elsewhere/anyone"), "10.0.0.1:1")),
            None
        );
        assert!(
            text(&reg)
                .contains(r#"{transport="mtls",caller="elsewhere/anyone",decision="open"} 1"#)
        );
    }
}
