//! The Broker reconciler: connects to the broker and reports `Connected` with the server's
//! version, or the connection error; rechecks periodically. Also the shared pieces of the
//! Queue reconciler's broker side: credentials from the Broker's Secret, cached connections and
//! per-object backoff.

use super::{Context, FIELD_MANAGER, conditions};
use crate::messaging::brokers::{self, AnyBroker};
use crate::messaging::{self, Credentials};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weir_crds::Broker;
use weir_crds::broker::{BrokerKind, BrokerStatus};

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
pub struct Connections(Mutex<HashMap<String, (Endpoint, AnyBroker)>>);

/// Where a Broker is: its kind, URL (with the vhost for RabbitMQ) and credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub kind: BrokerKind,
    pub url: String,
    pub creds: Credentials,
}

impl Connections {
    /// A connection to `url` with `creds`, reusing the cached one when it matches.
    pub async fn get(&self, key: &str, e: &Endpoint) -> Result<AnyBroker, messaging::Error> {
        if let Some((cached, b)) = self.0.lock().expect("connections lock").get(key)
            && cached == e
            && b.is_connected()
        {
            return Ok(b.clone());
        }
        let b = brokers::connect(e.kind, &e.url, &e.creds).await?;
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

/// The kind, URL and credentials of `broker`, reading its credentials Secret.
pub async fn endpoint(
    client: &kube::Client,
    ns: &str,
    broker: &Broker,
) -> Result<Result<Endpoint, Unusable>, kube::Error> {
    let name = broker.name_any();
    if let Err((field, message)) = broker.spec.check() {
        return Ok(Err(Unusable {
            reason: "InvalidSpec",
            message: format!("Broker {name}: {field}: {message}"),
        }));
    }
    let Some(url) = broker.spec.effective_url() else {
        return Ok(Err(Unusable {
            reason: "ManagedNotSupported",
            message: format!(
                "Broker {name}: managed brokers are not run by the operator yet; set spec.url"
            ),
        }));
    };
    let creds = match &broker.spec.credentials_secret {
        None => Credentials::default(),
        Some(s) => {
            let Some(secret) = Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&s.name)
                .await?
            else {
                return Ok(Err(Unusable {
                    reason: "CredentialsNotFound",
                    message: format!(
                        "Broker {name}: spec.credentialsSecret: Secret {:?} not found in namespace {ns}",
                        s.name
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
                        message: format!("Broker {name}: Secret {:?}: {e}", s.name),
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
    Controller::new(brokers, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "broker reconcile failed");
            }
        })
        .await;
}

fn key(b: &Broker) -> String {
    super::backoff::key("Broker", b.namespace().as_deref(), &b.name_any())
}

pub fn error_policy(b: Arc<Broker>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.messaging_backoff.next_delay(&key(&b));
    tracing::warn!(broker = %b.name_any(), namespace = ?b.namespace(), %error, retry_in = ?delay, "reconcile failed");
    ctx.metrics.failed("Broker", error.metric_label());
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
        return Ok(Action::await_change());
    }
    let generation = b.metadata.generation;
    let current = b.status.clone().unwrap_or_default();
    let k = key(b);
    let (cond, version, action) = match endpoint(&ctx.client, &ns, b).await? {
        Err(u) => (
            conditions::new("Connected", false, u.reason, u.message, generation),
            None,
            Action::await_change(),
        ),
        Ok(e) => match brokers::connect(e.kind, &e.url, &e.creds).await {
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
                (
                    conditions::new("Connected", false, e.reason(), e.to_string(), generation),
                    None,
                    Action::requeue(delay),
                )
            }
        },
    };
    let status = BrokerStatus {
        observed_generation: generation,
        conditions: conditions::merge(&current.conditions, vec![cond]),
        // Keep the last known version while disconnected: it is what ran there.
        server_version: version.or(current.server_version.clone()),
    };
    let unchanged = conditions::same(&current.conditions, &status.conditions)
        && current.observed_generation == status.observed_generation
        && current.server_version == status.server_version;
    if !unchanged {
        let patch = json!({
            "apiVersion": Broker::api_version(&()),
            "kind": Broker::kind(&()),
            "status": status,
        });
        Api::<Broker>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }
    Ok(action)
}
