//! Identity headers on every sidecar, edge or not: inbound, `x-user-*` headers are kept only
//! when signed with the namespace's identity key (never at the edge, which sets them itself);
//! outbound, calls to the namespace's Microservices are signed. The key and the signature are
//! [`crate::edge::identity`]'s.

use crate::body::{Req, Resp};
use crate::edge::identity::{self, IdentityKey, Untrusted};
use crate::edge::jwt;
use crate::layers::{BoxFuture, always_ready};
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::Arc;
use tower::{Layer, Service};

/// Every sidecar's inbound: keeps `x-user-*` headers only when signed with the identity key (never
/// at the edge), and never passes the signature on to the app.
#[derive(Clone, Debug)]
pub struct InboundIdentityLayer {
    pub edge: bool,
    pub key: Option<Arc<IdentityKey>>,
    /// Indexed like [`Untrusted::ALL`].
    pub removed: Arc<Vec<Counter>>,
}

impl<S> Layer<S> for InboundIdentityLayer {
    type Service = InboundIdentity<S>;
    fn layer(&self, inner: S) -> InboundIdentity<S> {
        InboundIdentity {
            cfg: self.clone(),
            inner,
        }
    }
}

#[derive(Clone, Debug)]
pub struct InboundIdentity<S> {
    cfg: InboundIdentityLayer,
    inner: S,
}

impl<S> Service<Req> for InboundIdentity<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        let now = jwt::now_secs();
        if let Some(why) = identity::inbound(
            req.headers_mut(),
            self.cfg.edge,
            self.cfg.key.as_deref(),
            now,
        ) {
            if let Some(i) = Untrusted::ALL.iter().position(|u| *u == why) {
                self.cfg.removed[i].inc();
            }
            if why != Untrusted::Edge {
                tracing::debug!(
                    reason = why.as_str(),
                    path = req.uri().path(),
                    "untrusted x-user-* headers removed"
                );
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// A dependency's outbound: signs the `x-user-*` headers of calls to the namespace's
/// Microservices (`sign`), and removes any `x-weir-identity` a call carries elsewhere.
#[derive(Clone, Debug)]
pub struct SignIdentityLayer {
    pub key: Option<Arc<IdentityKey>>,
    pub sign: bool,
}

impl<S> Layer<S> for SignIdentityLayer {
    type Service = SignIdentity<S>;
    fn layer(&self, inner: S) -> SignIdentity<S> {
        SignIdentity {
            cfg: self.clone(),
            inner,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SignIdentity<S> {
    cfg: SignIdentityLayer,
    inner: S,
}

impl<S> Service<Req> for SignIdentity<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        match (&self.cfg.key, self.cfg.sign) {
            (Some(k), true) => {
                identity::sign(req.headers_mut(), k, jwt::now_secs());
            }
            _ => {
                req.headers_mut().remove(identity::IDENTITY_HEADER);
            }
        }
        Box::pin(self.inner.call(req))
    }
}
