//! Request header names containing `_` on the inbound listener (`inbound.underscoreHeaders`).
//!
//! Frameworks that expose headers as CGI-style variables (`HTTP_X_USER_ID`: CGI, Rack, PHP,
//! WSGI) map `-` to `_`, so `x_user_id: admin` reaches such an app as the same variable as the
//! signed `x-user-id`, and may win over it. The identity check only knows the real names; this
//! layer, ahead of it, makes sure no look-alike gets past: a name that normalises (`_` to `-`;
//! names are already lower case) to a reserved prefix is always removed (refused under
//! `reject`), and other names with `_` follow the setting: `drop` (the default) removes them,
//! `reject` answers 400 `underscore-header`, `allow` passes them on.

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, reject_closing};
use http::{HeaderMap, HeaderName};
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::Arc;
use tower::{Layer, Service};
use weir_crds::proxy::UnderscoreHeaders;

/// Prefixes of the names only Weir may set: identity (`x-user-*`) and its own (`x-weir-*`).
pub const RESERVED_PREFIXES: [&str; 2] = ["x-user-", "x-weir-"];

/// Whether `name` (lower case) has `_` and stands for a reserved name once `_` reads as `-`.
pub fn is_look_alike(name: &str) -> bool {
    name.contains('_')
        && RESERVED_PREFIXES.iter().any(|p| {
            name.len() > p.len()
                && name
                    .bytes()
                    .zip(p.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
        })
}

/// Counters, created with the stack.
#[derive(Clone, Debug, Default)]
pub struct HeaderNameCounters {
    /// Requests from which a look-alike of a reserved name was removed.
    pub look_alike_removed: Counter,
    /// Requests from which other names with `_` were removed (`drop`).
    pub underscore_removed: Counter,
    /// Requests refused (`reject`).
    pub rejected: Counter,
}

#[derive(Clone, Debug)]
pub struct HeaderNamesLayer {
    policy: UnderscoreHeaders,
    counters: Arc<HeaderNameCounters>,
}

impl HeaderNamesLayer {
    pub fn new(policy: UnderscoreHeaders, counters: HeaderNameCounters) -> Self {
        HeaderNamesLayer {
            policy,
            counters: Arc::new(counters),
        }
    }
}

impl<S> Layer<S> for HeaderNamesLayer {
    type Service = HeaderNames<S>;
    fn layer(&self, inner: S) -> HeaderNames<S> {
        HeaderNames {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HeaderNames<S> {
    inner: S,
    cfg: HeaderNamesLayer,
}

/// What became of a request's names with `_`.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed on as it is (no such names, or `allow` and no look-alike).
    Unchanged,
    /// Names removed: whether a look-alike and whether any other name was among them.
    Removed { look_alike: bool, other: bool },
    /// `reject`: refuse the request.
    Refused,
}

/// Applies `policy` to the names with `_` in `h`.
pub fn apply(h: &mut HeaderMap, policy: UnderscoreHeaders) -> Outcome {
    if !h.keys().any(|n| n.as_str().contains('_')) {
        return Outcome::Unchanged;
    }
    if policy == UnderscoreHeaders::Reject {
        return Outcome::Refused;
    }
    let doomed: Vec<(HeaderName, bool)> = h
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .map(|n| (n.clone(), is_look_alike(n.as_str())))
        .filter(|(_, look_alike)| *look_alike || policy == UnderscoreHeaders::Drop)
        .collect();
    if doomed.is_empty() {
        return Outcome::Unchanged;
    }
    let look_alike = doomed.iter().any(|(_, l)| *l);
    let other = doomed.iter().any(|(_, l)| !*l);
    for (n, _) in doomed {
        h.remove(n);
    }
    Outcome::Removed { look_alike, other }
}

impl<S> Service<Req> for HeaderNames<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        match apply(req.headers_mut(), self.cfg.policy) {
            Outcome::Unchanged => {}
            Outcome::Removed { look_alike, other } => {
                if look_alike {
                    self.cfg.counters.look_alike_removed.inc();
                }
                if other {
                    self.cfg.counters.underscore_removed.inc();
                }
                tracing::debug!(
                    look_alike,
                    path = req.uri().path(),
                    "request header names with _ removed"
                );
            }
            Outcome::Refused => {
                self.cfg.counters.rejected.inc();
                tracing::warn!(
                    listener = "inbound",
                    reason = "header name with _",
                    method = %req.method(),
                    path = req.uri().path(),
                    "refused request"
                );
                return Box::pin(std::future::ready(Ok(reject_closing(
                    Reason::UnderscoreHeader,
                ))));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn look_alikes_of_reserved_names() {
        for n in [
            "x_user_id",
            "x_user-role",
            "x-user_id",
            "x_weir_identity",
            "x-weir_reason",
        ] {
            assert!(is_look_alike(n), "{n}");
        }
        for n in ["x-user-id", "x_users", "x_user_", "my_header", "x_weird_id"] {
            assert!(!is_look_alike(n), "{n}");
        }
    }

    #[test]
    fn each_policy() {
        let all = [
            "x-user-id",
            "x_user_id",
            "x_user_role",
            "my_header",
            "accept",
        ];
        let mut h = headers(&all);
        assert_eq!(
            apply(&mut h, UnderscoreHeaders::Drop),
            Outcome::Removed {
                look_alike: true,
                other: true
            }
        );
        assert_eq!(names(&h), ["accept", "x-user-id"]);

        let mut h = headers(&all);
        assert_eq!(
            apply(&mut h, UnderscoreHeaders::Allow),
            Outcome::Removed {
                look_alike: true,
                other: false
            }
        );
        assert_eq!(names(&h), ["accept", "my_header", "x-user-id"]);

        let mut h = headers(&["my_header"]);
        assert_eq!(apply(&mut h, UnderscoreHeaders::Allow), Outcome::Unchanged);
        assert_eq!(apply(&mut h, UnderscoreHeaders::Reject), Outcome::Refused);

        let mut h = headers(&["x-user-id", "accept"]);
        for p in [
            UnderscoreHeaders::Allow,
            UnderscoreHeaders::Drop,
            UnderscoreHeaders::Reject,
        ] {
            assert_eq!(apply(&mut h, p), Outcome::Unchanged);
        }
    }
}
