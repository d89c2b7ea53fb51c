//! The Broker reconciler: connects to the broker and reports `Connected` with the server's
//! version, or the connection error; rechecks periodically. Also the shared pieces of the
//! Queue reconciler's broker side: credentials from the Broker's Secret, cached connections and
//! per-object backoff.

use super::{Context, FIELD_MANAGER, conditions, events, status};
use crate::render::broker as render_broker;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weir_broker::admin::{self, Admin, BrokerAdmin};
use weir_broker::credentials::Credentials;
use weir_crds::broker::{BrokerKind, BrokerStatus};
use weir_crds::{Broker, validate};

/// Recheck of a connected Broker.
pub const HEALTH_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    Missing(&'static str),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Missing(_) => "missing",
        }
    }
}

/// Open broker connections, by Broker (`ns/name`), reused while URL and credentials stay.
#[derive(Default)]
pub struct Connections(Mutex<HashMap<String, (Endpoint, BrokerAdmin)>>);

/// Where a Broker is: its kind, URL (with the vhost for RabbitMQ) and credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub kind: BrokerKind,
    pub url: String,
    pub creds: Credentials,
}

impl Connections {
    /// A connection to `url` with `creds`, reusing the cached one when it matches.
    pub async fn get(&self, key: &str, e: &Endpoint) -> Result<BrokerAdmin, admin::Error> {
        if let Some((cached, b)) = self.0.lock().expect("connections lock").get(key)
            && cached == e
            && b.is_connected()
        {
            return Ok(b.clone());
        }
        let b = admin::connect(e.kind, &e.url, &e.creds).await?;
        self.0
            .lock()
            .expect("connections lock")
            .insert(key.to_string(), (e.clone(), b.clone()));
        Ok(b)
    }

    /// Forgets a connection (after an error, so the next attempt dials afresh).
    pub fn forget(&self, key: &str) {
        self.0.lock().expect("connections lock").remove(key);
    }
}

/// Why a Broker cannot be used, as a condition reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Unusable {
    pub reason: &'static str,
    pub message: String,
}

/// The kind, URL and credentials of `broker`, reading its credentials Secret. A managed
/// Broker is reached through its Service (`cluster_domain` completes the name).
pub async fn endpoint(
    client: &kube::Client,
    ns: &str,
    broker: &Broker,
    cluster_domain: &str,
) -> Result<Result<Endpoint, Unusable>, kube::Error> {
    let name = broker.name_any();
    // A Queue on a Broker that breaks the CRD's rules (both url and managed, or neither)
    // would otherwise dial a URL the Broker's owner did not mean.
    if let Some(e) = validate::broker(&broker.spec).first() {
        return Ok(Err(Unusable {
            reason: "InvalidSpec",
            message: format!("Broker {name}: {e}"),
        }));
    }
    if let Err((field, message)) = broker.spec.check() {
        return Ok(Err(Unusable {
            reason: "InvalidSpec",
            message: format!("Broker {name}: {field}: {message}"),
        }));
    }
    let url = broker
        .spec
        .effective_url()
        .unwrap_or_else(|| render_broker::managed_url(broker.spec.kind, &name, ns, cluster_domain));
    let creds = match render_broker::credentials_secret(broker) {
        None => Credentials::default(),
        Some(secret_name) => {
            let Some(secret) = Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&secret_name)
                .await?
            else {
                return Ok(Err(Unusable {
                    reason: "CredentialsNotFound",
                    message: format!(
                        "Broker {name}: spec.credentialsSecret: Secret {secret_name:?} not found in namespace {ns}",
                    ),
                }));
            };
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            match Credentials::from_secret_data(&data) {
                Ok(c) => c,
                Err(e) => {
                    return Ok(Err(Unusable {
                        reason: e.reason(),
                        message: format!("Broker {name}: Secret {secret_name:?}: {e}"),
                    }));
                }
            }
        }
    };
    Ok(Ok(Endpoint {
        kind: broker.spec.kind,
        url,
        creds,
    }))
}

pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let brokers = match namespace {
        Some(ns) => Api::<Broker>::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let owned = match namespace {
        Some(ns) => Api::<StatefulSet>::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(brokers, watcher::Config::default())
        // A managed broker's pod becoming ready (or not) is reported at once.
        .owns(
            owned,
            watcher::Config::default().labels("app.kubernetes.io/component=broker"),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(super::backoff::log_outcome)
        .await;
}

pub fn error_policy(b: Arc<Broker>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = super::backoff::after_failure(
        &ctx.messaging_backoff,
        &ctx.metrics,
        &*b,
        error,
        error.metric_label(),
    );
    Action::requeue(delay)
}

pub async fn reconcile(b: Arc<Broker>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconcile("Broker", reconcile_inner(&b, &ctx))
        .await
}

async fn reconcile_inner(b: &Broker, ctx: &Context) -> Result<Action, Error> {
    let name = b
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let ns = b.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    if b.metadata.deletion_timestamp.is_some() {
        ctx.connections.forget(&format!("{ns}/{name}"));
        ctx.last_written.forget(&super::backoff::key_of(b));
        return Ok(Action::await_change());
    }
    let generation = b.metadata.generation;
    let current = b.status.clone().unwrap_or_default();
    let k = super::backoff::key_of(b);
    // A spec the apiserver accepted may still break the CRD's CEL rules (clusters without CEL
    // ignore them): with both url and managed the operator would run a broker nobody uses,
    // with neither it would dial a Service nobody made. Report it and wait for an edit;
    // nothing is applied or connected.
    let invalid = validate::broker(&b.spec);
    if !invalid.is_empty() {
        ctx.connections.forget(&format!("{ns}/{name}"));
        let message = invalid
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let cond = conditions::new("Connected", false, "InvalidSpec", message, generation);
        write_status(ctx, b, &ns, &name, &current, cond, None).await?;
        return Ok(Action::await_change());
    }
    let managed = match run_managed(b, ctx, &ns).await? {
        Ok(m) => m,
        Err(u) => {
            // A spec the renderer refuses waits for an edit; a refused apply is retried.
            let action = if u.reason == "InvalidSpec" {
                Action::await_change()
            } else {
                Action::requeue(ctx.messaging_backoff.next_delay(&k))
            };
            let cond = conditions::new("Connected", false, u.reason, u.message, generation);
            write_status(ctx, b, &ns, &name, &current, cond, None).await?;
            return Ok(action);
        }
    };
    let (cond, version, action) = match endpoint(&ctx.client, &ns, b, &ctx.render.cluster_domain)
        .await?
    {
        Err(u) => (
            conditions::new("Connected", false, u.reason, u.message, generation),
            None,
            Action::await_change(),
        ),
        Ok(e) => match admin::connect(e.kind, &e.url, &e.creds).await {
            Ok(conn) => {
                let url = &e.url;
                ctx.messaging_backoff.reset(&k);
                let version = conn.server_version().await;
                (
                    conditions::new(
                        "Connected",
                        true,
                        "Connected",
                        format!("connected to {url} (server {version})"),
                        generation,
                    ),
                    Some(version),
                    Action::requeue(HEALTH_RECHECK),
                )
            }
            Err(e) => {
                ctx.connections.forget(&format!("{ns}/{name}"));
                let delay = ctx.messaging_backoff.next_delay(&k);
                let cond = match managed {
                    // A managed broker that is not ready yet is starting, not failing.
                    Some(Managed { ready: false }) => conditions::new(
                        "Connected",
                        false,
                        "BrokerStarting",
                        format!("StatefulSet {name}: the broker pod is not ready yet ({e})"),
                        generation,
                    ),
                    _ => conditions::new("Connected", false, e.reason(), e.to_string(), generation),
                };
                // The operator runs a managed broker: while it starts (or its Service name
                // is not resolvable yet) check again soon instead of backing off for minutes.
                let action = match managed {
                    Some(Managed { ready: false }) => {
                        Action::requeue(MANAGED_STARTING_RECHECK.min(delay))
                    }
                    Some(Managed { ready: true }) => Action::requeue(MANAGED_RECHECK.min(delay)),
                    None => Action::requeue(delay),
                };
                (cond, None, action)
            }
        },
    };
    write_status(ctx, b, &ns, &name, &current, cond, version).await?;
    Ok(action)
}

/// Recheck of a managed broker whose pod is starting.
pub const MANAGED_STARTING_RECHECK: Duration = Duration::from_secs(5);
/// Longest wait before reconnecting to a managed broker whose pod is ready.
pub const MANAGED_RECHECK: Duration = Duration::from_secs(10);

/// A managed broker's state: whether its pod is ready.
#[derive(Debug, Clone, Copy)]
struct Managed {
    ready: bool,
}

/// For a managed Broker: creates its generated credentials once (RabbitMQ) and applies its
/// StatefulSet and Service. `None` for a Broker with a URL.
async fn run_managed(
    b: &Broker,
    ctx: &Context,
    ns: &str,
) -> Result<Result<Option<Managed>, Unusable>, Error> {
    let rendered = match render_broker::render(b, ns) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Ok(None)),
        Err(e) => {
            return Ok(Err(Unusable {
                reason: "InvalidSpec",
                message: e.to_string(),
            }));
        }
    };
    let name = b.name_any();
    if b.spec.kind == BrokerKind::Rabbitmq && b.spec.credentials_secret.is_none() {
        ensure_generated_credentials(ctx, b, ns).await?;
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // The API server's refusal is the Broker's condition (and retried), not only a log line.
    let refused = |what: &str, e: kube::Error| match e {
        kube::Error::Api(s) => Ok(Err(Unusable {
            reason: "ApplyFailed",
            message: format!("Broker {name}: applying {what} {name}: {}", s.message),
        })),
        e => Err(Error::Kube(e)),
    };
    if let Err(e) = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &pp, &Patch::Apply(&rendered.service))
        .await
    {
        return refused("Service", e);
    }
    let sts = match Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &pp, &Patch::Apply(&rendered.stateful_set))
        .await
    {
        Ok(s) => s,
        Err(e) => return refused("StatefulSet", e),
    };
    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        >= 1;
    Ok(Ok(Some(Managed { ready })))
}

/// The user of a managed RabbitMQ Broker, made once with a random password and owned by the
/// Broker (deleted with it); an existing Secret is never changed.
async fn ensure_generated_credentials(ctx: &Context, b: &Broker, ns: &str) -> Result<(), Error> {
    let secret_name = render_broker::generated_credentials_name(&b.name_any());
    let password: [u8; 24] = rand::random();
    let data = [
        ("username".to_string(), "weir".to_string()),
        ("password".to_string(), hex::encode(password)),
    ]
    .into();
    let owner = b.controller_owner_ref(&());
    if super::secrets::create_once(&ctx.client, ns, &secret_name, data, owner).await? {
        tracing::info!(namespace = ns, secret = %secret_name, "managed broker credentials created");
    }
    Ok(())
}

async fn write_status(
    ctx: &Context,
    b: &Broker,
    ns: &str,
    name: &str,
    current: &BrokerStatus,
    cond: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
    version: Option<String>,
) -> Result<(), Error> {
    let generation = b.metadata.generation;
    publish_on_change(ctx, b, current, &cond).await;
    let status = BrokerStatus {
        observed_generation: generation,
        conditions: conditions::merge(&current.conditions, vec![cond]),
        // Keep the last known version while disconnected: it is what ran there.
        server_version: version.or(current.server_version.clone()),
    };
    ctx.last_written.record(
        &super::backoff::key_of(b),
        b.metadata.uid.as_deref(),
        &status.conditions,
    );
    status::write::<Broker, _>(&ctx.client, ns, name, current, &status).await?;
    Ok(())
}

/// Publishes an Event when the `Connected` condition changes its status, reason or observed
/// generation, so `kubectl describe broker` shows connects and disconnects. Not on every
/// reconcile: a Broker is rechecked every minute, and an Event each time would bury the
/// changes.
async fn publish_on_change(
    ctx: &Context,
    b: &Broker,
    current: &BrokerStatus,
    cond: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) {
    // The cached Broker may not carry the status this process last wrote yet.
    let unchanged = ctx.last_written.has(
        &super::backoff::key_of(b),
        b.metadata.uid.as_deref(),
        &current.conditions,
        (
            &cond.type_,
            &cond.status,
            &cond.reason,
            cond.observed_generation,
        ),
    );
    if unchanged {
        return;
    }
    let type_ = if cond.status == "True" {
        EventType::Normal
    } else {
        EventType::Warning
    };
    events::publish(ctx, b, type_, &cond.reason, &cond.message).await;
}
