//! The types every part of the request path shares, in a leaf module so that the parts that
//! build stacks ([`crate::stack`]), route to them ([`crate::edge`]) and serve them
//! ([`crate::listen`]) do not import each other for them.

use crate::body::{Req, Resp};
use std::convert::Infallible;
use std::net::SocketAddr;
use tower::util::BoxCloneSyncService;

/// A listener's whole stack, boxed: what a route or a listener calls.
pub type Stack = BoxCloneSyncService<Req, Resp, Infallible>;

/// The address of the connection a request came on, set by the listener as a request
/// extension (the edge keys anonymous clients on it; the admin listener checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);
