//! The pub/sub bridge: the app publishes events through `POST /v1/publish/<queue>` on the admin
//! listener (loopback peers only), and the sidecar pushes the queues it consumes to the app.
//! Names, headers and dead-letter format follow `docs/messaging.md`.
//!
//! Lifecycle: [`Bridge::apply`] on every config load (a change of the messaging section, the
//! app's address or timeout restarts the bridge), [`Bridge::broker_status`] for `/brokerz`,
//! [`Bridge::publish`] for the publish endpoint, [`Bridge::shutdown`] on drain.
//!
//! The bridge is the same for every broker kind: it decides what happens to a message
//! ([`consume`], [`publish`]) and talks to the broker only through
//! [`weir_broker::transport::Connection`], which owns connecting, publishing with the broker's
//! confirmation and each kind's consume loop. A config the bridge cannot start with is a
//! [`ConfigError`]; a broker call that fails is a [`weir_broker::transport::Error`].

pub mod cloudevents;
pub mod consume;
pub mod metrics;
pub mod publish;
pub mod schema;

use crate::body::{BoxBody, Resp};
use crate::forward::HttpClient;
use metrics::{BridgeMetrics, QueueMetrics};
use schema::Schema;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_broker::transport::{Connection, Kind, State};
use weir_crds::proxy::{ConsumeConfig, MessagingConfig, ProxyConfig, PublishConfig};

/// How long a publish waits for the broker's acknowledgement before answering 503, and the
/// timeout of other broker calls.
pub use weir_broker::transport::{API_TIMEOUT, PUBLISH_TIMEOUT};

/// What the bridge needs from the proxy config; a change of any of it restarts the bridge.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    messaging: MessagingConfig,
    service: String,
    namespace: String,
    app: SocketAddr,
    app_timeout: Duration,
    max_body_bytes: u64,
    /// This sidecar's name among the consumers of a group (Redis): `<hostname>-<admin port>`.
    instance: String,
}

/// The host's name (the pod's name in a pod), or `local`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "local".into())
}

impl Settings {
    fn from(cfg: &ProxyConfig) -> Option<Settings> {
        Some(Settings {
            instance: format!("{}-{}", hostname(), cfg.admin.listen.port()),
            messaging: cfg.messaging.clone()?,
            service: cfg.service.clone(),
            namespace: cfg.namespace.clone(),
            app: cfg.inbound.app,
            app_timeout: Duration::from_millis(cfg.inbound.timeout_ms),
            max_body_bytes: cfg.inbound.max_body_bytes,
        })
    }
}

pub(crate) struct PublishTarget {
    cfg: PublishConfig,
    schema: Schema,
    metrics: QueueMetrics,
}

/// One running configuration: a broker connection, the publish targets and the consumer tasks.
pub(crate) struct Running {
    settings: Settings,
    conn: Connection,
    publishes: HashMap<String, PublishTarget>,
    source: String,
    stop_tx: watch::Sender<bool>,
    abort_tx: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    connected_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// The bridge of one sidecar; always present, idle while the config has no `messaging`.
pub struct Bridge {
    metrics: BridgeMetrics,
    http: HttpClient,
    current: RwLock<Option<Arc<Running>>>,
    apply_lock: tokio::sync::Mutex<()>,
    /// Set by [`Bridge::shutdown`]: publishing answers 503 from then on.
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bridge")
    }
}

/// Why the bridge cannot start with a config. [`Bridge::apply`] returns it: at start the
/// sidecar exits with it; on a reload the running bridge is kept and the reload is reported
/// failed with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `messaging.brokerKind` names no kind the bridge speaks.
    #[error("messaging.brokerKind: {0:?} is not supported ({names})", names = Kind::names())]
    UnsupportedKind(String),
    /// An entry of `messaging` is not usable: `field` is its path below `messaging`
    /// (`consumes[0].maxInFlight`).
    #[error("messaging.{field}: {message}")]
    Invalid { field: String, message: String },
    /// The broker URL or its credentials are not usable
    /// ([`weir_broker::transport::Error::Config`]), or the first connection could not be set up.
    #[error(transparent)]
    Broker(#[from] weir_broker::transport::Error),
}

/// Compiles every schema of `messaging`; the error names the entry.
pub fn check_config(messaging: &MessagingConfig) -> Result<(), ConfigError> {
    compile_all(messaging).map(|_| ())
}

type Compiled = (Vec<(PublishConfig, Schema)>, Vec<(ConsumeConfig, Schema)>);

fn compile_all(m: &MessagingConfig) -> Result<Compiled, ConfigError> {
    if Kind::from_name(&m.broker_kind).is_none() {
        return Err(ConfigError::UnsupportedKind(m.broker_kind.clone()));
    }
    let invalid = |field: String, message: String| ConfigError::Invalid { field, message };
    let mut pubs = Vec::new();
    for (i, p) in m.publishes.iter().enumerate() {
        let s = Schema::compile(p.schema.as_ref())
            .map_err(|e| invalid(format!("publishes[{i}].schema"), e.to_string()))?;
        pubs.push((p.clone(), s));
    }
    let mut cons = Vec::new();
    for (i, c) in m.consumes.iter().enumerate() {
        let s = Schema::compile(c.schema.as_ref())
            .map_err(|e| invalid(format!("consumes[{i}].schema"), e.to_string()))?;
        let at_least_one = |name: &str| {
            invalid(
                format!("consumes[{i}].{name}"),
                "must be at least 1".to_string(),
            )
        };
        if c.max_in_flight == 0 {
            return Err(at_least_one("maxInFlight"));
        }
        if c.max_deliveries == 0 {
            return Err(at_least_one("maxDeliveries"));
        }
        if !c.path.starts_with('/') {
            return Err(invalid(
                format!("consumes[{i}].path"),
                "must start with /".to_string(),
            ));
        }
        cons.push((c.clone(), s));
    }
    Ok((pubs, cons))
}

impl Bridge {
    /// `metrics` registered in the sidecar's registry; `http` calls the app.
    pub fn new(metrics: BridgeMetrics, http: HttpClient) -> Arc<Bridge> {
        Arc::new(Bridge {
            metrics,
            http,
            current: RwLock::new(None),
            apply_lock: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn running(&self) -> Option<Arc<Running>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts, restarts or stops the bridge for `cfg`. On `Err` (a schema that does not compile,
    /// an unsupported broker) the running bridge is kept.
    pub async fn apply(&self, cfg: &ProxyConfig) -> Result<(), ConfigError> {
        let _guard = self.apply_lock.lock().await;
        let settings = Settings::from(cfg);
        let prev = self.running();
        if prev.as_ref().map(|r| &r.settings) == settings.as_ref() {
            return Ok(());
        }
        let next = match settings {
            None => None,
            Some(s) => Some(self.start(s).await?),
        };
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            next,
        );
        if let Some(old) = old {
            tracing::info!("messaging config changed: stopping the previous bridge");
            old.stop(Duration::from_secs(10)).await;
        }
        Ok(())
    }

    async fn start(&self, settings: Settings) -> Result<Arc<Running>, ConfigError> {
        let (pubs, cons) = compile_all(&settings.messaging)?;
        let m = &settings.messaging;
        let name = format!("weir-proxy {}/{}", settings.namespace, settings.service);
        let gauge = self.metrics.broker_connected.clone();
        let on_state = move |up: bool| {
            gauge.set(i64::from(up));
        };
        let kind = Kind::from_name(&m.broker_kind)
            .ok_or_else(|| ConfigError::UnsupportedKind(m.broker_kind.clone()))?;
        let conn = Connection::open(
            kind,
            &m.broker_url,
            m.credentials_file.as_deref(),
            &name,
            &m.publishes,
            on_state,
        )
        .await?;
        let publishes = pubs
            .into_iter()
            .map(|(cfg, schema)| {
                let metrics = self.metrics.queue(&cfg.queue);
                (
                    cfg.queue.clone(),
                    PublishTarget {
                        cfg,
                        schema,
                        metrics,
                    },
                )
            })
            .collect();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (abort_tx, abort_rx) = watch::channel(false);
        let running = Arc::new(Running {
            conn,
            source: cloudevents::source(&settings.namespace, &settings.service),
            publishes,
            stop_tx,
            abort_tx,
            tasks: std::sync::Mutex::new(Vec::new()),
            settings: settings.clone(),
            connected_gauge: self.metrics.broker_connected.clone(),
        });
        let mut tasks = Vec::new();
        for (cfg, schema) in cons {
            let ctx = Arc::new(consume::Consumer {
                metrics: self.metrics.queue(&cfg.queue),
                plain_source: cloudevents::queue_source(&settings.namespace, &cfg.queue),
                cfg,
                schema,
                http: self.http.clone(),
                app: settings.app,
                app_timeout: settings.app_timeout,
                abort: abort_rx.clone(),
                local: Default::default(),
                max_body_bytes: settings.max_body_bytes,
                plain_seen: Default::default(),
            });
            let cfg = ctx.cfg.clone();
            tasks.push(tokio::spawn(running.conn.consume(
                cfg,
                &settings.instance,
                stop_rx.clone(),
                ctx,
            )));
        }
        *running.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        tracing::info!(
            broker = %weir_crds::redact::url(&m.broker_url),
            publishes = m.publishes.len(),
            consumes = m.consumes.len(),
            "messaging bridge started"
        );
        Ok(running)
    }

    /// The broker connection, for `/brokerz` and the `/readyz` body: `Ok(None)` when messaging
    /// is off, `Ok(Some(url))` (redacted) while connected, `Err` saying what is wrong otherwise.
    /// It does not decide readiness: a broker outage stops publishing (503 with `Retry-After`)
    /// and pauses consuming, but the pod's HTTP path keeps serving, so it stays in its Service.
    pub fn broker_status(&self) -> Result<Option<String>, String> {
        let Some(r) = self.running() else {
            return Ok(None);
        };
        let url = weir_crds::redact::url(&r.settings.messaging.broker_url);
        match r.conn.state() {
            State::Connected => Ok(Some(url)),
            State::Connecting => Err(format!("broker {url} not connected yet")),
            State::Disconnected => Err(format!("broker {url} disconnected")),
            State::NotConnected => Err(format!("broker {url} not connected")),
        }
    }

    /// Handles `/v1/publish/<queue>`; `peer` is the client's address.
    pub async fn publish(&self, peer: Option<SocketAddr>, req: http::Request<BoxBody>) -> Resp {
        let stopping = self.stopping.load(std::sync::atomic::Ordering::Acquire);
        publish::handle(self.running(), stopping, peer, req).await
    }

    /// Stops pulling, lets in-flight deliveries finish within `grace` (then naks the rest),
    /// flushes acknowledgements and closes the broker connection.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let _guard = self.apply_lock.lock().await;
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = old {
            old.stop(grace).await;
        }
    }
}

impl Running {
    async fn stop(&self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            tracing::warn!("grace period over with deliveries in flight: handing them back");
            let _ = self.abort_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), all).await;
        }
        // Acknowledgements still buffered reach the broker before the connection closes.
        self.conn.close().await;
        self.connected_gauge.set(0);
        tracing::info!("messaging bridge stopped");
    }
}
