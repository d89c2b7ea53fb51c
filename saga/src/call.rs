//! One attempt of a step's action or compensation: an HTTP call (through the coordinator's
//! `weir-proxy` sidecar, or straight to the target) or a request/reply on a broker subject.
//!
//! The attempt's outcome says whether the action may have happened: that decides retries and
//! whether a failed step is compensated.

use super::config::{CallConfig, HttpCallConfig, RequestConfig};
use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
pub const SAGA_ID: &str = "Weir-Saga-Id";
pub const SAGA_NAME: &str = "Weir-Saga";
/// Set by `weir-proxy` on the answers it makes itself.
const PROXY_REASON: &str = "x-weir-reason";

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Value),
    /// The target answered no; `retryable` for 5xx, 408 and 429.
    Refused {
        error: String,
        retryable: bool,
    },
    /// The call never reached the target (connection refused, breaker open, no responders).
    NotSent {
        error: String,
    },
    /// The call may have reached the target (timeout, broken connection): it may have happened.
    Unknown {
        error: String,
    },
}

impl Outcome {
    pub fn retryable(&self) -> bool {
        match self {
            Outcome::Ok(_) => false,
            Outcome::Refused { retryable, .. } => *retryable,
            Outcome::NotSent { .. } | Outcome::Unknown { .. } => true,
        }
    }
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::Refused { error, .. }
            | Outcome::NotSent { error }
            | Outcome::Unknown { error } => Some(error),
        }
    }
}

/// Headers every call carries.
#[derive(Debug, Clone)]
pub struct CallHeaders {
    pub idempotency_key: String,
    pub saga_id: String,
    pub saga: String,
}

#[derive(Clone)]
pub struct Caller {
    http: Client<HttpConnector, Full<Bytes>>,
    nats: async_nats::Client,
    targets: BTreeMap<String, String>,
}

impl Caller {
    pub fn new(nats: async_nats::Client, targets: BTreeMap<String, String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            http,
            nats,
            targets,
        }
    }

    /// Publishes an event through a sidecar's publish endpoint (`POST {base}/v1/publish/{queue}`,
    /// `ce-id` = `id`): how outcome events reach a queue on a broker other than NATS.
    /// `Err((permanent, why))`: permanent for a 4xx (the event will never be taken).
    pub async fn publish_via_sidecar(
        &self,
        base: &str,
        queue: &str,
        id: &str,
        body: &Value,
    ) -> Result<(), (bool, String)> {
        let url = format!("{}/v1/publish/{queue}", base.trim_end_matches('/'));
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("ce-id", header_value(id))
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).expect("JSON serializes"),
            )))
            .map_err(|e| (true, format!("bad request to {url}: {e}")))?;
        let attempt = async {
            let resp = self.http.request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Err(_) => Err((false, format!("{url}: no answer within 10s"))),
            Ok(Err(e)) => Err((false, format!("{url}: {e}"))),
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, b))) => Err((
                status.is_client_error(),
                format!(
                    "{url}: HTTP {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&b)
                ),
            )),
        }
    }

    /// One attempt, with `body` already rendered.
    pub async fn call(
        &self,
        call: &CallConfig,
        body: Option<Value>,
        headers: &CallHeaders,
        timeout: Duration,
    ) -> Outcome {
        self.call_in(&self.targets, call, body, headers, timeout)
            .await
    }

    /// [`Caller::call`] with HTTP targets resolved in `targets` (an instance's definition may
    /// name targets the config no longer has).
    pub async fn call_in(
        &self,
        targets: &BTreeMap<String, String>,
        call: &CallConfig,
        body: Option<Value>,
        headers: &CallHeaders,
        timeout: Duration,
    ) -> Outcome {
        match call {
            CallConfig::Http(h) => self.http_call(targets, h, body, headers, timeout).await,
            CallConfig::Request(r) => self.request(r, body, headers, timeout).await,
        }
    }

    async fn http_call(
        &self,
        targets: &BTreeMap<String, String>,
        h: &HttpCallConfig,
        body: Option<Value>,
        headers: &CallHeaders,
        timeout: Duration,
    ) -> Outcome {
        let Some(base) = targets.get(&h.target) else {
            return Outcome::NotSent {
                error: format!("no target {:?}", h.target),
            };
        };
        let url = format!("{}{}", base.trim_end_matches('/'), h.path);
        let method = Method::from_bytes(h.method.as_bytes()).unwrap_or(Method::POST);
        let bytes = body
            .map(|b| Bytes::from(serde_json::to_vec(&b).expect("JSON serializes")))
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY, header_value(&headers.idempotency_key))
            .header(SAGA_ID, header_value(&headers.saga_id))
            .header(SAGA_NAME, header_value(&headers.saga))
            .body(Full::new(bytes));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                return Outcome::NotSent {
                    error: format!("bad request to {url}: {e}"),
                };
            }
        };
        let attempt = async {
            let resp = self.http.request(req).await?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, bytes))
        };
        let (parts, bytes) = match tokio::time::timeout(timeout, attempt).await {
            Err(_) => {
                return Outcome::Unknown {
                    error: format!("timed out after {}ms", timeout.as_millis()),
                };
            }
            Ok(Err(e)) => {
                let connect = e
                    .downcast_ref::<hyper_util::client::legacy::Error>()
                    .is_some_and(|e| e.is_connect());
                return if connect {
                    Outcome::NotSent {
                        error: format!("cannot connect to {url}: {}", error_chain(&*e)),
                    }
                } else {
                    Outcome::Unknown {
                        error: format!("{url}: {}", error_chain(&*e)),
                    }
                };
            }
            Ok(Ok(r)) => r,
        };
        let status = parts.status;
        if status.is_success() {
            return Outcome::Ok(result_value(&bytes));
        }
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        let error = if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {}", status.as_u16(), truncate(text, 300))
        };
        match parts
            .headers
            .get(PROXY_REASON)
            .and_then(|v| v.to_str().ok())
        {
            // The sidecar gave up waiting, or the connection broke: it may have happened.
            Some("timeout" | "upstream-error") => Outcome::Unknown { error },
            // The upstream's own failure, with the retry budget spent.
            Some("retry-budget") | None => Outcome::Refused {
                error,
                retryable: status.is_server_error()
                    || status.as_u16() == 408
                    || status.as_u16() == 429,
            },
            // The sidecar refused to send it (breaker, bulkhead, connect error, ...).
            Some(_) => Outcome::NotSent { error },
        }
    }

    async fn request(
        &self,
        r: &RequestConfig,
        body: Option<Value>,
        headers: &CallHeaders,
        timeout: Duration,
    ) -> Outcome {
        let mut h = async_nats::HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, headers.idempotency_key.as_str());
        h.insert(SAGA_ID, headers.saga_id.as_str());
        h.insert(SAGA_NAME, headers.saga.as_str());
        h.insert("content-type", "application/json");
        let payload = body
            .map(|b| Bytes::from(serde_json::to_vec(&b).expect("JSON serializes")))
            .unwrap_or_default();
        let req = self
            .nats
            .request_with_headers(r.subject.clone(), h, payload);
        match tokio::time::timeout(timeout, req).await {
            Err(_) => Outcome::Unknown {
                error: format!("no reply on {} within {}ms", r.subject, timeout.as_millis()),
            },
            Ok(Err(e)) => match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Outcome::NotSent {
                    error: format!("no responders on {}", r.subject),
                },
                async_nats::RequestErrorKind::TimedOut => Outcome::Unknown {
                    error: format!("no reply on {}", r.subject),
                },
                _ => Outcome::Unknown {
                    error: format!("request on {}: {e}", r.subject),
                },
            },
            Ok(Ok(m)) => {
                let code = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .and_then(|v| v.as_str().parse::<u16>().ok());
                match code {
                    Some(c) => {
                        let desc = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Service-Error"))
                            .map(|v| v.as_str().to_string())
                            .unwrap_or_default();
                        Outcome::Refused {
                            error: format!("error {c}: {desc}"),
                            retryable: c >= 500,
                        }
                    }
                    None => Outcome::Ok(result_value(&m.payload)),
                }
            }
        }
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// A response body as a step result: its JSON, else its text, else null.
fn result_value(bytes: &[u8]) -> Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}
