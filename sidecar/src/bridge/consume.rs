//! Pushes one consumer's messages to the app, whatever the broker: `Consumer` is the
//! [`Handler`] the broker's consume loop ([`weir_broker::transport::Connection::consume`]) hands
//! each message to, and settles it through [`Inbound`] and [`Side`].
//!
//! Per message, before the app is called (each failure → a dead letter with its reason, the app
//! never sees the message): size within the app's `inbound.maxBodyBytes` (`too-large`), the
//! CloudEvents envelope ([`envelope`]: `unsupported-specversion`, `invalid-cloudevent`), the
//! schema (`schema`). A plain message (no envelope: another producer wrote it) is an event whose
//! id comes from the broker's identity of the message (`Inbound::identity`). Then: KV look-up
//! of the event id (found → ack, counted as deduplicated), `POST` to the app with the
//! CloudEvents HTTP binary headers, then: 2xx → record the event id in the KV bucket and ack;
//! 4xx other than 408/429 → dead letter `rejected` and term; 5xx, 408, 429, timeout, connection
//! error → nak with `backoffMs[delivery-1]` (the last value repeats), or, at `maxDeliveries`,
//! dead letter `max-deliveries` and term. A dead letter is published and acknowledged by the
//! broker before the original is termed; when that publish fails the original is nak'ed, never
//! dropped.

use super::cloudevents::*;
use super::metrics::QueueMetrics;
use super::schema::{Schema, summarize};
use crate::body;
use crate::forward::HttpClient;
use crate::trace::{TraceContext, new_span_id};
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use weir_broker::transport::{
    Handler, Headers, Inbound, Settle, Side, header, set_header, stopped,
};
use weir_crds::proxy::ConsumeConfig;

/// Longest part of the app's answer kept in `Weir-Last-Error`.
pub const ERROR_EXCERPT_BYTES: usize = 256;
/// Nak delay when the broker could not take a dead letter or a KV look-up failed.
pub use weir_broker::transport::RETRY_LATER;

pub(crate) struct Consumer {
    pub cfg: ConsumeConfig,
    pub schema: Schema,
    pub metrics: QueueMetrics,
    pub http: HttpClient,
    pub app: SocketAddr,
    pub app_timeout: Duration,
    /// Give in-flight deliveries back to the broker now.
    pub abort: watch::Receiver<bool>,
    /// Event ids in the app right now, and those processed lately by this sidecar.
    pub local: std::sync::Mutex<Local>,
    /// The app's `inbound.maxBodyBytes`: a larger message is dead-lettered `too-large` instead
    /// of being pushed to an app that would refuse it from anyone else.
    pub max_body_bytes: u64,
    /// `ce-source` of plain messages ([`queue_source`]).
    pub plain_source: String,
    /// Whether a plain message was seen yet: the first one is logged, so that an operator
    /// learns another producer writes to the queue.
    pub plain_seen: std::sync::atomic::AtomicBool,
}

/// Most event ids remembered as processed by this sidecar (beside the KV bucket).
pub const LOCAL_DONE_MAX: usize = 10_000;

/// What this sidecar knows without asking the broker: it never passes an event to the app while
/// the same event is there already (a redelivery racing a slow delivery), and it remembers the
/// events it processed lately whose record the broker could not take (it was restarting), so
/// that a redelivery of one does not reach the app again; once the record is written the broker
/// is asked instead. Only the broker's record knows of a rewind (`weir queue rewind`), so an
/// event is remembered here only while the broker has no record of it.
#[derive(Debug, Default)]
pub struct Local {
    in_flight: std::collections::HashSet<String>,
    done: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Local {
    /// The broker has the record now: it decides.
    fn forget(&mut self, id: &str) {
        if self.done.remove(id) {
            self.order.retain(|o| o != id);
        }
    }

    fn remember(&mut self, id: &str) {
        if self.done.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            if self.order.len() > LOCAL_DONE_MAX
                && let Some(old) = self.order.pop_front()
            {
                self.done.remove(&old);
            }
        }
    }
}

/// Removes the event id from the in-flight set when the delivery ends, however it ends.
struct InFlight<'a> {
    ctx: &'a Consumer,
    id: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.ctx
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight
            .remove(&self.id);
    }
}

/// The nak delay after failed delivery number `delivered` (1-based).
pub fn backoff(backoff_ms: &[u64], delivered: u64) -> Option<Duration> {
    if backoff_ms.is_empty() {
        return None;
    }
    let i = (delivered.max(1) - 1).min(backoff_ms.len() as u64 - 1) as usize;
    Some(Duration::from_millis(backoff_ms[i]))
}

/// Why a message is dead-lettered: [`DeadLetter::reason`] is its `Weir-Reason` header and the
/// `reason` label of `weir_messaging_dead_lettered_total`; the text is its `Weir-Last-Error`
/// (made header-safe) and the `error` of the log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetter {
    /// Larger than the app's `inbound.maxBodyBytes`: `too-large`.
    #[error("{size} bytes, more than the {max} the app accepts (inbound.maxBodyBytes)")]
    TooLarge { size: u64, max: u64 },
    /// A CloudEvents envelope that cannot be delivered: `unsupported-specversion` or
    /// `invalid-cloudevent` ([`EnvelopeError::reason`]).
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The body fails the queue's schema (the summary of the errors): `schema`.
    #[error("{0}")]
    Schema(String),
    /// The app answered a 4xx other than 408/429 (its status and excerpt): `rejected`.
    #[error("{0}")]
    Rejected(String),
    /// The last of `maxDeliveries` failed (why it failed): `max-deliveries`.
    #[error("{0}")]
    MaxDeliveries(String),
}

impl DeadLetter {
    /// The `Weir-Reason` value.
    pub fn reason(&self) -> &'static str {
        match self {
            DeadLetter::TooLarge { .. } => REASON_TOO_LARGE,
            DeadLetter::Envelope(e) => e.reason(),
            DeadLetter::Schema(_) => REASON_SCHEMA,
            DeadLetter::Rejected(_) => REASON_REJECTED,
            DeadLetter::MaxDeliveries(_) => REASON_MAX_DELIVERIES,
        }
    }
}

/// What the app's answer means for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 4xx other than 408/429: dead letter at once.
    Permanent(String),
    /// 5xx, 408, 429, timeout, connection error: nak and retry.
    Retry(String),
}

pub fn classify(status: u16, excerpt: &str) -> Outcome {
    let err = || {
        if excerpt.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {excerpt}")
        }
    };
    match status {
        200..=299 => Outcome::Success,
        408 | 429 => Outcome::Retry(err()),
        400..=499 => Outcome::Permanent(err()),
        _ => Outcome::Retry(err()),
    }
}

impl Consumer {
    pub(crate) fn queue(&self) -> &str {
        &self.cfg.queue
    }
}

impl Handler for Consumer {
    async fn deliver<S: Side>(&self, side: &S, msg: S::Msg) {
        deliver(self, side, msg).await
    }
}

async fn settle<M: Inbound>(ctx: &Consumer, msg: &M, how: Settle) {
    if let Err(e) = msg.settle(how).await {
        tracing::warn!(queue = ctx.queue(), op = ?how, error = %e, "cannot settle message; the broker will redeliver it");
    }
}

/// Delivers one message and settles it.
pub(crate) async fn deliver<S: Side>(ctx: &Consumer, side: &S, msg: S::Msg) {
    let delivered = msg.delivered().max(1);
    let seq = msg.position();
    let size = msg.payload().len() as u64;
    if size > ctx.max_body_bytes {
        let why = DeadLetter::TooLarge {
            size,
            max: ctx.max_body_bytes,
        };
        tracing::warn!(queue = ctx.queue(), seq, error = %why, "message too large for the app: dead-lettering");
        dead_letter(ctx, side, &msg, delivered, &seq, &why).await;
        return;
    }
    let envelope = match envelope(msg.headers()) {
        Ok(e) => e,
        Err(e) => {
            let why = DeadLetter::Envelope(e);
            tracing::warn!(queue = ctx.queue(), seq, error = %why, "not a CloudEvents 1.0 event: dead-lettering");
            dead_letter(ctx, side, &msg, delivered, &seq, &why).await;
            return;
        }
    };
    if let Err(errors) = ctx.schema.check(msg.payload()) {
        let why = DeadLetter::Schema(header_safe(&summarize(&errors), 1024));
        let id = match &envelope {
            Envelope::CloudEvent { id } => id.as_str(),
            Envelope::Plain => "",
        };
        tracing::warn!(queue = ctx.queue(), id, seq, error = %why, "event fails the schema: dead-lettering");
        dead_letter(ctx, side, &msg, delivered, &seq, &why).await;
        return;
    }
    let (event_id, plain) = match envelope {
        Envelope::CloudEvent { id } => (id, false),
        Envelope::Plain => match msg.identity() {
            Some(identity) => {
                if !ctx
                    .plain_seen
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(
                        queue = ctx.queue(),
                        seq,
                        "a message without a CloudEvents envelope (another producer's): delivering it with an id from the broker; more are counted in weir_messaging_plain_messages_total"
                    );
                }
                (plain_event_id(&ctx.cfg.stream, &identity), true)
            }
            None => {
                // The broker keeps no identity of the message (RabbitMQ): give it one, on a copy
                // that takes its place, so that its redeliveries are known as the same event.
                let identity = uuid::Uuid::new_v4().to_string();
                match msg.requeue_with_identity(&identity).await {
                    Ok(()) => {
                        tracing::debug!(
                            queue = ctx.queue(),
                            identity,
                            "plain message re-queued with an identity"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(queue = ctx.queue(), error = %e, "cannot give a plain message an identity; retrying later");
                        ctx.metrics.naked.inc();
                        settle(ctx, &msg, Settle::Nak(Some(RETRY_LATER))).await;
                    }
                }
                return;
            }
        },
    };
    let key = processed_key(&ctx.cfg.consumer, &event_id);
    let (busy, done) = {
        let mut l = ctx.local.lock().unwrap_or_else(|e| e.into_inner());
        let busy = !l.in_flight.insert(event_id.clone());
        (busy, l.done.contains(&event_id))
    };
    if busy {
        // Never twice in the app at once: come back when the delivery in hand has settled.
        ctx.metrics.naked.inc();
        let later = Duration::from_millis((ctx.cfg.ack_wait_ms / 2).max(100));
        settle(ctx, &msg, Settle::Nak(Some(later))).await;
        return;
    }
    let _in_flight = InFlight {
        ctx,
        id: event_id.clone(),
    };
    if done {
        ctx.metrics.deduplicated.inc();
        // Best effort: the record the broker could not take before.
        if side.record_processed(&key, &seq).await.is_ok() {
            ctx.local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget(&event_id);
        }
        settle(ctx, &msg, Settle::Ack).await;
        return;
    }
    match side.is_processed(&key, &seq).await {
        Ok(true) => {
            ctx.metrics.deduplicated.inc();
            tracing::debug!(queue = ctx.queue(), id = %event_id, "already processed: acking");
            settle(ctx, &msg, Settle::Ack).await;
            return;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(queue = ctx.queue(), id = %event_id, error = %e, "processed-event look-up failed; retrying later");
            ctx.metrics.naked.inc();
            settle(ctx, &msg, Settle::Nak(Some(RETRY_LATER))).await;
            return;
        }
    }
    ctx.metrics.delivered.inc();
    if plain {
        ctx.metrics.plain_messages.inc();
    }
    let mut abort = ctx.abort.clone();
    let outcome = tokio::select! {
        o = call_app(ctx, &msg, &event_id, plain) => Some(o),
        _ = stopped(&mut abort) => None,
    };
    match outcome {
        None => {
            ctx.metrics.naked.inc();
            settle(ctx, &msg, Settle::Nak(None)).await;
        }
        Some(Outcome::Success) => {
            // The broker may be restarting: keep trying for up to one ack wait (the message
            // is not redelivered before that), unless the sidecar is giving deliveries back.
            let give_up =
                tokio::time::Instant::now() + Duration::from_millis(ctx.cfg.ack_wait_ms.max(1000));
            let mut abort = ctx.abort.clone();
            let mut recorded = false;
            let mut pause = Duration::from_millis(50);
            for attempt in 0.. {
                match side.record_processed(&key, &seq).await {
                    Ok(()) => {
                        recorded = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(queue = ctx.queue(), id = %event_id, attempt, error = %e, "cannot record processed event yet");
                    }
                }
                if tokio::time::Instant::now() + pause > give_up || *abort.borrow() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped(&mut abort) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            if !recorded {
                ctx.local
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remember(&event_id);
                tracing::error!(queue = ctx.queue(), id = %event_id, "processed event not recorded in the bucket: only this sidecar will know it");
            }
            ctx.metrics.acked.inc();
            settle(ctx, &msg, Settle::Ack).await;
        }
        Some(Outcome::Permanent(err)) => {
            tracing::warn!(queue = ctx.queue(), id = %event_id, error = %err, "app rejected the event: dead-lettering");
            dead_letter(ctx, side, &msg, delivered, &seq, &DeadLetter::Rejected(err)).await;
        }
        Some(Outcome::Retry(err)) => {
            if delivered >= u64::from(ctx.cfg.max_deliveries) {
                tracing::warn!(queue = ctx.queue(), id = %event_id, delivered, error = %err, "max deliveries reached: dead-lettering");
                dead_letter(
                    ctx,
                    side,
                    &msg,
                    delivered,
                    &seq,
                    &DeadLetter::MaxDeliveries(err),
                )
                .await;
            } else {
                let d = backoff(&ctx.cfg.backoff_ms, delivered);
                tracing::info!(queue = ctx.queue(), id = %event_id, delivered, retry_in_ms = d.map_or(0, |d| d.as_millis() as u64), error = %err, "delivery failed: will retry");
                ctx.metrics.naked.inc();
                settle(ctx, &msg, Settle::Nak(d)).await;
            }
        }
    }
}

/// POSTs the event to the app, sending "in progress" to the broker every half ack wait. A
/// plain message gets the envelope the bridge makes for it: `ce-id` = `event_id`, `ce-type` =
/// the Queue's event type, `ce-source` = the queue; none of its own `ce-*` headers is trusted.
async fn call_app<M: Inbound>(ctx: &Consumer, msg: &M, event_id: &str, plain: bool) -> Outcome {
    let mut req = Request::post(format!("http://{}{}", ctx.app, ctx.cfg.path));
    let hs = msg.headers();
    let h = req.headers_mut().expect("valid request");
    let mut set = |name: &'static str, value: Option<&str>| {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    };
    set(CE_ID, Some(event_id));
    set(CE_SPECVERSION, Some(SPECVERSION));
    if plain {
        set(
            CE_TYPE,
            Some(ctx.cfg.event_type.as_deref().unwrap_or(&ctx.cfg.queue)),
        );
        set(CE_SOURCE, Some(&ctx.plain_source));
    } else {
        set(CE_TYPE, header(hs, CE_TYPE));
        set(CE_SOURCE, header(hs, CE_SOURCE));
        set(CE_TIME, header(hs, CE_TIME));
        set(CE_PARTITIONKEY, header(hs, CE_PARTITIONKEY));
    }
    set(
        CONTENT_TYPE,
        Some(header(hs, CONTENT_TYPE).unwrap_or("application/json")),
    );
    // Continue the publisher's trace: the delivery is a new span of it.
    let mut trace_headers = http::HeaderMap::new();
    if let Some(v) = header(hs, TRACEPARENT).and_then(|v| HeaderValue::from_str(v).ok()) {
        trace_headers.insert(TRACEPARENT, v);
    }
    let (mut tc, _) = TraceContext::from_headers(&trace_headers, 1.0);
    tc.span_id = new_span_id();
    h.insert(TRACEPARENT, tc.traceparent());
    if let Ok(v) = HeaderValue::from_str(&msg.payload().len().to_string()) {
        h.insert(http::header::CONTENT_LENGTH, v);
    }
    let Ok(req) = req.body(body::full(msg.payload().clone())) else {
        return Outcome::Permanent("cannot build the request to the app".into());
    };
    let call = async {
        let resp = ctx
            .http
            .request(req)
            .await
            .map_err(|e| format!("cannot reach the app at {}: {e}", ctx.app))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut excerpt = Vec::new();
        // Read the whole (usually small) answer so the connection can be reused; keep an excerpt.
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(d) = frame.data_ref()
                && excerpt.len() < ERROR_EXCERPT_BYTES
            {
                excerpt.extend_from_slice(&d[..d.len().min(ERROR_EXCERPT_BYTES - excerpt.len())]);
            }
        }
        Ok::<_, String>((status, String::from_utf8_lossy(&excerpt).into_owned()))
    };
    let progress_every = Duration::from_millis((ctx.cfg.ack_wait_ms / 2).max(100));
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    let timeout = tokio::time::sleep(ctx.app_timeout);
    tokio::pin!(call, timeout);
    loop {
        tokio::select! {
            r = &mut call => return match r {
                Ok((status, excerpt)) => classify(status, &header_safe(&excerpt, ERROR_EXCERPT_BYTES)),
                Err(e) => Outcome::Retry(e),
            },
            _ = &mut timeout => return Outcome::Retry(format!("the app did not answer within {} ms", ctx.app_timeout.as_millis())),
            _ = ticker.tick() => msg.progress().await,
        }
    }
}

/// Stores the dead letter (acknowledged by the broker), then terms the original; naks it when
/// the dead letter could not be stored.
async fn dead_letter<S: Side>(
    ctx: &Consumer,
    side: &S,
    msg: &S::Msg,
    delivered: u64,
    seq: &str,
    why: &DeadLetter,
) {
    let (reason, last_error) = (why.reason(), why.to_string());
    if ctx.cfg.dead_letter_subject.is_empty() && ctx.cfg.dead_letter_stream.is_empty() {
        // Dead letters disabled for this queue: the message is terminated and stays on the stream.
        tracing::warn!(queue = ctx.queue(), seq, reason, error = %last_error, "failed for good; dead letters are disabled: terminating");
        ctx.metrics.dead_lettered(reason).inc();
        settle(ctx, msg, Settle::Term).await;
        return;
    }
    let mut h: Headers = msg
        .headers()
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(NATS_MSG_ID) && !k.starts_with("x-"))
        .cloned()
        .collect();
    set_header(&mut h, WEIR_ORIGINAL_SUBJECT, msg.origin());
    set_header(&mut h, WEIR_ORIGINAL_SEQ, seq);
    set_header(&mut h, WEIR_CONSUMER, ctx.cfg.consumer.as_str());
    set_header(&mut h, WEIR_DELIVERY_COUNT, delivered.to_string());
    set_header(&mut h, WEIR_REASON, reason);
    set_header(&mut h, WEIR_LAST_ERROR, header_safe(&last_error, 1024));
    set_header(&mut h, WEIR_DEAD_LETTERED_AT, now_rfc3339());
    match side.dead_letter(msg, h).await {
        Ok(()) => {
            ctx.metrics.dead_lettered(reason).inc();
            settle(ctx, msg, Settle::Term).await;
        }
        Err(e) => {
            tracing::error!(queue = ctx.queue(), seq, error = %e, "cannot store the dead letter; the message stays on the queue");
            ctx.metrics.naked.inc();
            settle(ctx, msg, Settle::Nak(Some(RETRY_LATER))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_repeats_the_last() {
        let b = [100, 1000, 5000];
        assert_eq!(backoff(&b, 1), Some(Duration::from_millis(100)));
        assert_eq!(backoff(&b, 3), Some(Duration::from_millis(5000)));
        assert_eq!(backoff(&b, 9), Some(Duration::from_millis(5000)));
        assert_eq!(backoff(&[], 2), None);
    }

    #[test]
    fn local_memory_is_bounded() {
        let mut l = Local::default();
        for i in 0..LOCAL_DONE_MAX + 5 {
            l.remember(&format!("e-{i}"));
        }
        l.remember("e-9"); // already forgotten: remembered again
        assert_eq!(l.done.len(), LOCAL_DONE_MAX);
        assert!(!l.done.contains("e-0") && l.done.contains("e-9"));
        assert!(l.done.contains(&format!("e-{}", LOCAL_DONE_MAX + 4)));
        l.forget("e-9");
        assert!(!l.done.contains("e-9") && !l.order.iter().any(|o| o == "e-9"));
        assert_eq!(l.done.len(), l.order.len());
    }

    #[test]
    fn classification() {
        assert_eq!(classify(204, ""), Outcome::Success);
        assert!(matches!(classify(400, "bad"), Outcome::Permanent(e) if e == "HTTP 400: bad"));
        assert!(matches!(classify(408, ""), Outcome::Retry(_)));
        assert!(matches!(classify(429, ""), Outcome::Retry(_)));
        assert!(matches!(classify(503, ""), Outcome::Retry(_)));
        assert!(matches!(classify(404, ""), Outcome::Permanent(_)));
    }
}
