//! The app's probe in the gRPC health protocol (grpc/doc/health-checking.md): the admin
//! listener's `/app-health/*` call `grpc.health.v1.Health/Check` on the app over HTTP/2 and
//! answer 200 when it says `SERVING`, 503 naming what it said otherwise, so the kubelet's plain
//! HTTP probe of the sidecar reads a gRPC app's health.
//!
//! The two messages are tiny (`HealthCheckRequest { string service = 1; }`,
//! `HealthCheckResponse { ServingStatus status = 1; }`): they are written and read here rather
//! than generated, to keep a protobuf runtime out of the sidecar.

use crate::body::{self, Reason, Resp, reject};
use crate::forward::HttpClient;
use crate::layers::grpc::{GRPC_STATUS, status_of};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::time::Duration;

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`, by number.
const SERVING_STATUS: [&str; 4] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];
const SERVING: u64 = 1;

/// The request body: one uncompressed length-prefixed `HealthCheckRequest`.
pub fn request_body(service: &str) -> bytes::Bytes {
    let mut msg = Vec::with_capacity(3 + service.len());
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out.into()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a response body (one length-prefixed `HealthCheckResponse`); `None` when
/// the body is not one (compressed, truncated, malformed). Fields other than 1 are skipped, as
/// protobuf readers do.
pub fn serving_status(body: &[u8]) -> Option<u64> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0; // proto3: absent is the zero value, UNKNOWN
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut msg)?,
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 1) => msg = msg.get(8..)?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
            }
            (_, 5) => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn text(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

/// Asks the app at `app` (`host:port`) about `service` with `client` (an HTTP/2 client), within
/// `timeout`; answers as the admin listener's `/app-health/{which}`.
pub async fn probe(
    client: &HttpClient,
    app: std::net::SocketAddr,
    service: &str,
    which: &str,
    timeout: Duration,
) -> Resp {
    let req = Request::post(format!("http://{app}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(
            crate::layers::grpc::GRPC_TIMEOUT,
            crate::layers::grpc::encode_timeout(timeout),
        )
        .body(body::full(request_body(service)));
    let Ok(req) = req else {
        return reject(Reason::BadRequest);
    };
    let call = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let in_headers = status_of(resp.headers());
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().and_then(status_of);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            status,
            in_headers.or(trailers),
            collected.to_bytes(),
        ))
    };
    let (http_status, grpc_status, body) = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::warn!(probe = which, error = %e, "app gRPC health check failed");
            return reject(Reason::AppConnect);
        }
        Err(_) => return reject(Reason::Timeout),
    };
    let unhealthy = |why: String| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app {which}: {why}\n"),
        )
    };
    if http_status != StatusCode::OK {
        return unhealthy(format!(
            "HTTP {} to a gRPC health check",
            http_status.as_u16()
        ));
    }
    match grpc_status {
        Some(0) => {}
        Some(12) => {
            return unhealthy(
                "the app does not serve grpc.health.v1.Health (UNIMPLEMENTED)".into(),
            );
        }
        Some(5) => {
            return unhealthy(format!("the app knows no service {service:?} (NOT_FOUND)"));
        }
        Some(c) => {
            return unhealthy(format!(
                "grpc-status {c} ({})",
                weir_crds::proxy::grpc_code_name(c)
            ));
        }
        None => return unhealthy(format!("no {GRPC_STATUS} in the answer")),
    }
    match serving_status(&body) {
        Some(SERVING) => text(StatusCode::OK, format!("app {which}: SERVING\n")),
        Some(s) => {
            let name = SERVING_STATUS.get(s as usize).copied().unwrap_or("UNKNOWN");
            unhealthy(name.to_string())
        }
        None => unhealthy("not a HealthCheckResponse".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_written_and_read_as_protobuf_does() {
        assert_eq!(&request_body("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &request_body("shop.Orders")[..],
            b"\x00\x00\x00\x00\x0d\x0a\x0bshop.Orders"
        );
        let framed = |msg: &[u8]| {
            let mut b = vec![0];
            b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            b.extend_from_slice(msg);
            b
        };
        assert_eq!(serving_status(&framed(&[0x08, 0x01])), Some(SERVING));
        assert_eq!(serving_status(&framed(&[0x08, 0x02])), Some(2));
        assert_eq!(serving_status(&framed(&[])), Some(0), "absent is UNKNOWN");
        // Unknown fields of every wire type are skipped.
        let extra = [
            0x10, 0x05, 0x1a, 0x02, b'h', b'i', 0x21, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut msg = extra.to_vec();
        msg.extend_from_slice(&[0x08, 0x01]);
        assert_eq!(serving_status(&framed(&msg)), Some(SERVING));
        // Not a message: compressed, cut short, a bad wire type.
        assert_eq!(serving_status(&[1, 0, 0, 0, 2, 0x08, 0x01]), None);
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08, 0x01]), None);
        assert_eq!(serving_status(&framed(&[0x0b])), None);
        assert_eq!(serving_status(&[]), None);
    }
}
