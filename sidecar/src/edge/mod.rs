//! Edge mode: the sidecar of the Microservice that faces clients. On its inbound listener, in this
//! order: CORS preflights are answered; paths with dot segments or encoded separators are refused
//! (prefix rules must mean what they say); a bearer JWT is validated unless an `anonymous` rule
//! admits the request without one, and its identity becomes `x-user-id` / `x-user-role`; each
//! client spends a token of its own bucket; then a route sends the request to a dependency's
//! outbound stack (with that dependency's timeout, retries and breaker), or it goes to the app,
//! or, for a pure gateway, gets 404.
//!
//! Identity headers on every sidecar, edge or not, are handled by
//! [`crate::layers::identity`] (with the key and signature of [`identity`]).

pub mod client_limit;
pub mod identity;
pub mod jwt;
pub mod keys;
pub mod metrics;

use crate::body::{Reason, Req, Resp, full, reject};
use crate::layers::{BoxFuture, always_ready};
use crate::service::Stack;
use client_limit::ClientLimiter;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};
use identity::{USER_ID, USER_ROLE};
use jwt::{AuthError, Identity};
use keys::KeySource;
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use tower::{Layer, Service, ServiceExt};
use weir_crds::proxy::{AnonymousRuleConfig, CorsConfig, EdgeConfig};

struct Route {
    prefix: String,
    strip: bool,
    stack: Stack,
}

/// Counters of the edge's refusals, created when the stack is built.
#[derive(Clone, Debug)]
pub struct EdgeCounters {
    /// Indexed like [`AuthError::ALL`].
    pub auth: Vec<Counter>,
    pub unauthorized: Counter,
    pub no_route: Counter,
    pub client_rate_limited: Counter,
    pub cors_rejected: Counter,
    pub bad_path: Counter,
}

/// Everything the edge needs per request; shared by all clones of the service.
pub struct Edge {
    service: String,
    cfg: EdgeConfig,
    keys: Arc<KeySource>,
    rules: jwt::Rules,
    routes: Vec<Route>,
    limiter: Option<Arc<ClientLimiter>>,
    counters: EdgeCounters,
}

impl Edge {
    /// `routes` maps each route's dependency to its outbound stack.
    pub fn new(
        service: &str,
        cfg: &EdgeConfig,
        keys: Arc<KeySource>,
        limiter: Option<Arc<ClientLimiter>>,
        dependency: impl Fn(&str) -> Option<Stack>,
        counters: EdgeCounters,
    ) -> Result<Edge, String> {
        let mut routes = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            let stack = dependency(&r.dependency).ok_or_else(|| {
                format!(
                    "edge.routes[{i}].dependency: no dependency named {:?}",
                    r.dependency
                )
            })?;
            routes.push(Route {
                prefix: r.path_prefix.clone(),
                strip: r.strip_prefix,
                stack,
            });
        }
        // Longest prefix first: `/orders/admin` wins over `/orders`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let j = &cfg.jwt;
        Ok(Edge {
            service: service.to_string(),
            cfg: cfg.clone(),
            keys,
            rules: jwt::Rules {
                issuer: j.issuer.clone(),
                audiences: j.audiences.clone(),
                leeway_secs: j.leeway_ms.div_ceil(1000),
                user_id_claim: j.user_id_claim.clone(),
                role_claim: j.role_claim.clone(),
            },
            routes,
            limiter,
            counters,
        })
    }

    fn unauthorized(&self, e: AuthError) -> Resp {
        if let Some(i) = AuthError::ALL.iter().position(|x| *x == e) {
            self.counters.auth[i].inc();
        }
        self.counters.unauthorized.inc();
        let mut resp = reject(Reason::Unauthorized);
        *resp.body_mut() = full(format!("unauthorized: {}\n", e.description()));
        // RFC 6750 §3.1: a request without credentials gets no error code.
        let challenge = if e == AuthError::Missing {
            format!("Bearer realm=\"{}\"", self.service)
        } else {
            format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                self.service,
                e.description()
            )
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }

    /// Validates a token: shape and size, signature (refetching keys once for an unknown key
    /// id), then the claims.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let tok = jwt::parse(token, self.cfg.jwt.max_token_bytes as usize)?;
        let unknown_kid = tok.kid.as_deref().is_some_and(|k| !self.keys.knows_kid(k));
        if self.keys.current().is_none() || unknown_kid {
            self.keys.load_on_demand(tok.kid.as_deref()).await;
        }
        let keys = self.keys.current().ok_or(AuthError::KeysUnavailable)?;
        tok.verify(&keys)?;
        self.rules.check(&tok.claims, jwt::now_secs())
    }

    fn anonymous(&self, method: &Method, path: &str) -> bool {
        self.cfg.anonymous.iter().any(|a: &AnonymousRuleConfig| {
            under(path, &a.path_prefix)
                && (a.methods.is_empty() || a.methods.iter().any(|m| m == method.as_str()))
        })
    }

    fn client_key(&self, req: &Req) -> String {
        let by_user = self
            .cfg
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.key == "user");
        if by_user && let Some(u) = req.headers().get(USER_ID).and_then(|v| v.to_str().ok()) {
            return format!("user:{u}");
        }
        self.ip_key(req)
    }

    fn ip_key(&self, req: &Req) -> String {
        match client_ip(req, self.cfg.xff_num_trusted_hops) {
            Some(ip) => format!("ip:{ip}"),
            None => "ip:unknown".into(),
        }
    }

    /// 429 when `key`'s bucket is empty (a token is taken otherwise).
    fn rate_limited(&self, key: &str) -> Option<Resp> {
        let wait = self.limiter.as_ref()?.try_take(key).err()?;
        self.counters.client_rate_limited.inc();
        let mut resp = reject(Reason::ClientRateLimited);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        Some(resp)
    }

    /// A refused request spends a token of its client IP's bucket too, so guessing tokens is
    /// rate-limited like anonymous traffic: past the burst the answer is 429, not 401.
    fn refuse(&self, req: &Req, e: AuthError) -> Resp {
        self.rate_limited(&self.ip_key(req))
            .unwrap_or_else(|| self.unauthorized(e))
    }

    async fn handle<S>(&self, mut req: Req, inner: S) -> Resp
    where
        S: Service<Req, Response = Resp, Error = Infallible>,
    {
        if suspicious_path(req.uri().path()) {
            self.counters.bad_path.inc();
            tracing::warn!(
                path = req.uri().path(),
                "refused path with dot segments or encoded separators"
            );
            return reject(Reason::BadRequest);
        }
        let token = match bearer(req.headers()) {
            Ok(t) => t,
            Err(e) => return self.refuse(&req, e),
        };
        match token {
            None if !self.anonymous(req.method(), req.uri().path()) => {
                return self.refuse(&req, AuthError::Missing);
            }
            None => {}
            // A token sent on an anonymous route is still checked: a bad one is refused.
            Some(t) => match self.authenticate(&t).await {
                Ok(id) => {
                    let h = req.headers_mut();
                    if let Ok(v) = HeaderValue::from_str(&id.user_id) {
                        h.insert(USER_ID, v);
                    }
                    if let Some(v) = id.role.and_then(|r| HeaderValue::from_str(&r).ok()) {
                        h.insert(USER_ROLE, v);
                    }
                    if !self.cfg.jwt.forward_token {
                        h.remove(header::AUTHORIZATION);
                    }
                }
                Err(e) => return self.refuse(&req, e),
            },
        }
        if let Some(resp) = self.rate_limited(&self.client_key(&req)) {
            return resp;
        }
        let path = req.uri().path().to_string();
        if let Some(r) = self.routes.iter().find(|r| under(&path, &r.prefix)) {
            if r.strip && r.prefix != "/" {
                let rest = &path[r.prefix.len()..];
                let rest = if rest.is_empty() { "/" } else { rest };
                let pq = match req.uri().query() {
                    Some(q) => format!("{rest}?{q}"),
                    None => rest.to_string(),
                };
                if let Ok(pq) = pq.parse::<PathAndQuery>() {
                    let mut parts = req.uri().clone().into_parts();
                    parts.path_and_query = Some(pq);
                    if let Ok(u) = http::Uri::from_parts(parts) {
                        *req.uri_mut() = u;
                    }
                }
            }
            return match r.stack.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        if self.cfg.app {
            return match inner.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        self.counters.no_route.inc();
        reject(Reason::NoRoute)
    }

    fn preflight(&self, c: &CorsConfig, req: &Req) -> Resp {
        let h = req.headers();
        let origin = h.get(header::ORIGIN);
        let method = h
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let wanted: Vec<String> = h
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        let any_header = c.allow_headers.iter().any(|a| a == "*");
        let ok = origin.is_some_and(|o| origin_allowed(c, o))
            && c.allow_methods.iter().any(|m| m == method)
            && (any_header
                || wanted
                    .iter()
                    .all(|w| c.allow_headers.iter().any(|a| a.eq_ignore_ascii_case(w))));
        if !ok {
            self.counters.cors_rejected.inc();
            return reject(Reason::CorsRejected);
        }
        let mut resp = http::Response::new(crate::body::empty());
        *resp.status_mut() = http::StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        if let Some(o) = origin {
            cors_headers(c, o, out);
        }
        let join = |v: &[String]| HeaderValue::from_str(&v.join(", ")).ok();
        if let Some(v) = join(&c.allow_methods) {
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        let headers = if any_header {
            &wanted
        } else {
            &c.allow_headers
        };
        if let Some(v) = join(headers).filter(|_| !headers.is_empty()) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(c.max_age_secs),
        );
        out.append(
            header::VARY,
            HeaderValue::from_static(
                "access-control-request-method, access-control-request-headers",
            ),
        );
        resp
    }
}

/// `path` is `prefix` or below it (`/orders` covers `/orders/3`, not `/orders3`).
fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// Dot segments, backslashes and percent-encoded `.`, `/` or `\`: paths whose meaning changes
/// when normalized behind the edge, so a prefix rule would not mean what it says.
pub fn suspicious_path(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || p.contains('\\')
        || p.split('/').any(|seg| seg == "." || seg == "..")
}

/// The bearer token, if the request has one. Several `Authorization` headers are malformed; a
/// non-Bearer scheme counts as no token.
fn bearer(h: &HeaderMap) -> Result<Option<String>, AuthError> {
    let mut all = h.get_all(header::AUTHORIZATION).iter();
    let Some(v) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        return Err(AuthError::Malformed);
    }
    let v = v.to_str().map_err(|_| AuthError::Malformed)?;
    let Some((scheme, rest)) = v.split_once(' ') else {
        return if v.eq_ignore_ascii_case("bearer") {
            Err(AuthError::Malformed)
        } else {
            Ok(None)
        };
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let t = rest.trim();
    if t.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Some(t.to_string()))
}

/// The client's address: the connection's peer, or with `hops` trusted proxies in front, the
/// `hops`-th address from the right of `X-Forwarded-For` (what the outermost trusted proxy saw).
fn client_ip(req: &Req, hops: u32) -> Option<IpAddr> {
    if hops > 0 {
        let xff: Vec<&str> = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if let Some(ip) = xff
            .len()
            .checked_sub(hops as usize)
            .and_then(|i| xff.get(i))
            .and_then(|s| s.parse().ok())
        {
            return Some(ip);
        }
    }
    req.extensions()
        .get::<crate::service::PeerAddr>()
        .map(|p| p.0.ip())
}

fn origin_allowed(c: &CorsConfig, origin: &HeaderValue) -> bool {
    c.allow_origins
        .iter()
        .any(|a| a == "*" || a.as_bytes() == origin.as_bytes())
}

fn cors_headers(c: &CorsConfig, origin: &HeaderValue, out: &mut HeaderMap) {
    let wildcard = !c.allow_credentials
        && c.allow_origins.iter().any(|a| a == "*")
        && !c
            .allow_origins
            .iter()
            .any(|a| a.as_bytes() == origin.as_bytes());
    if wildcard {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    } else {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.append(header::VARY, HeaderValue::from_static("origin"));
    }
    if c.allow_credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if !c.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&c.expose_headers.join(", "))
    {
        out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

#[derive(Clone)]
pub struct EdgeLayer {
    edge: Arc<Edge>,
}

impl EdgeLayer {
    pub fn new(edge: Edge) -> Self {
        EdgeLayer {
            edge: Arc::new(edge),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            edge: self.edge.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct EdgeService<S> {
    edge: Arc<Edge>,
    inner: S,
}

impl<S> Service<Req> for EdgeService<S>
where
    S: Service<Req, Response = Resp, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let edge = self.edge.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let cors = edge.cfg.cors.as_ref();
            let origin = req.headers().get(header::ORIGIN).cloned();
            if let Some(c) = cors
                && req.method() == Method::OPTIONS
                && origin.is_some()
                && req
                    .headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
            {
                return Ok(edge.preflight(c, &req));
            }
            let mut resp = edge.handle(req, inner).await;
            // Also on refusals, so a browser app can read why it got a 401 or 429.
            if let (Some(c), Some(o)) = (cors, origin)
                && origin_allowed(c, &o)
            {
                cors_headers(c, &o, resp.headers_mut());
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("/orders", "/orders"));
        assert!(under("/orders/3", "/orders"));
        assert!(!under("/orders3", "/orders"));
        assert!(!under("/order", "/orders"));
        assert!(under("/anything", "/"));
    }

    #[test]
    fn paths_that_change_meaning_when_normalized_are_suspicious() {
        for p in [
            "/catalog/../orders",
            "/catalog/..",
            "/./orders",
            "/catalog%2F..%2Forders",
            "/catalog/%2e%2e/orders",
            "/catalog\\..\\orders",
        ] {
            assert!(suspicious_path(p), "{p}");
        }
        for p in ["/orders/3", "/a..b/c", "/.well-known/x", "/"] {
            assert!(!suspicious_path(p), "{p}");
        }
    }

    #[test]
    fn bearer_tokens() {
        let h = |v: &[&str]| {
            let mut m = HeaderMap::new();
            for x in v {
                m.append(header::AUTHORIZATION, HeaderValue::from_str(x).unwrap());
            }
            m
        };
        assert_eq!(bearer(&h(&[])), Ok(None));
        assert_eq!(bearer(&h(&["Bearer abc"])), Ok(Some("abc".into())));
        assert_eq!(bearer(&h(&["bearer  abc "])), Ok(Some("abc".into())));
        assert_eq!(bearer(&h(&["Basic dXNlcg=="])), Ok(None));
        assert_eq!(bearer(&h(&["Bearer"])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearer "])), Err(AuthError::Malformed));
        assert_eq!(
            bearer(&h(&["Bearer a", "Bearer b"])),
            Err(AuthError::Malformed)
        );
    }
}
