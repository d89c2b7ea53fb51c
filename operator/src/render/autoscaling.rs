//! What scales a Microservice (`spec.autoscaling`): a HorizontalPodAutoscaler for CPU and
//! memory, or a KEDA ScaledObject when it scales on the lag of the queues it consumes.
//!
//! - **CPU and memory only**: an `autoscaling/v2` HorizontalPodAutoscaler named after the
//!   Microservice, owned by it, on its Deployment, with a `Resource` metric of type
//!   `Utilization` per target.
//! - **With `queueLag`, KEDA in the cluster**: a `keda.sh/v1alpha1` ScaledObject instead (named
//!   after the Microservice, owned by it) holding every target: one trigger per queue, of the
//!   scaler that fits the Queue's broker (`nats-jetstream`, `redis-streams`, `rabbitmq`,
//!   `kafka`), aimed at the stream and the consumer the sidecar reads with, and a `cpu` or
//!   `memory` trigger per resource target. KEDA makes the one HorizontalPodAutoscaler from it:
//!   a second one of Weir's on the same Deployment would fight it. Credentials come from the
//!   Broker's Secret through a TriggerAuthentication (`<name>-weir-broker`) that names its keys,
//!   so no secret is copied. The fields and metadata keys are those of KEDA 2.16
//!   ([`KEDA_VERSION`]).
//! - **With `queueLag`, no KEDA**: the HorizontalPodAutoscaler of the CPU and memory targets, if
//!   any; [`Autoscalers::lag_without_keda`] tells the reconciler to say so in a condition.
//!
//! While an autoscaler is rendered the Deployment carries no `replicas`: the autoscaler owns
//! the field ([`Autoscalers::scales`]). The same holds for an autoscaler of the user's own (a
//! HorizontalPodAutoscaler on an external metric such as the operator's
//! `weir_operator_queue_consumer_lag` through a Prometheus adapter), named by the annotation
//! [`ANNOTATION_AUTOSCALED_BY`]: nothing is rendered for it, and `replicas` is left to it.

use super::RenderError;
use super::messaging::Messaging;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};
use weir_crds::Microservice;
use weir_crds::microservice::AutoscalingSpec;

/// The KEDA release whose ScaledObject, TriggerAuthentication and scaler metadata Weir renders.
pub const KEDA_VERSION: &str = "2.16";

/// The API group of KEDA's objects.
pub const KEDA_GROUP: &str = "keda.sh";

/// `scaler` of the status when a HorizontalPodAutoscaler of Weir's scales the Microservice.
pub const SCALER_HPA: &str = "HorizontalPodAutoscaler";
/// `scaler` of the status when a KEDA ScaledObject does.
pub const SCALER_KEDA: &str = "KEDA";
/// `scaler` of the status when an autoscaler of the user's own does
/// ([`ANNOTATION_AUTOSCALED_BY`]).
pub const SCALER_EXTERNAL: &str = "External";

/// Annotation of a Microservice whose replicas an autoscaler of the user's own sets, naming it
/// (`HorizontalPodAutoscaler/orders-lag`): the operator applies no `replicas`.
pub const ANNOTATION_AUTOSCALED_BY: &str = "weir.dev/autoscaled-by";

/// KEDA's ScaledObject.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        KEDA_GROUP,
        "v1alpha1",
        "ScaledObject",
    ))
}

/// KEDA's TriggerAuthentication.
pub fn trigger_authentication_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        KEDA_GROUP,
        "v1alpha1",
        "TriggerAuthentication",
    ))
}

/// The TriggerAuthentication of Microservice `name`'s queue-lag triggers.
pub fn trigger_authentication_name(name: &str) -> String {
    format!("{name}-weir-broker")
}

/// What scales one Microservice; all `None` without `spec.autoscaling`.
#[derive(Debug, Clone, Default)]
pub struct Autoscalers {
    pub hpa: Option<HorizontalPodAutoscaler>,
    pub scaled_object: Option<DynamicObject>,
    pub trigger_authentication: Option<DynamicObject>,
    /// `queueLag` targets were left out: KEDA is not in the cluster.
    pub lag_without_keda: bool,
    /// The user's own autoscaler ([`ANNOTATION_AUTOSCALED_BY`]).
    pub external: Option<String>,
}

impl Autoscalers {
    /// Whether an autoscaler sets the Deployment's replicas (the Deployment then has none).
    pub fn scales(&self) -> bool {
        self.hpa.is_some() || self.scaled_object.is_some() || self.external.is_some()
    }

    /// `HorizontalPodAutoscaler` or `KEDA`, when one scales.
    pub fn scaler(&self) -> Option<&'static str> {
        if self.scaled_object.is_some() {
            Some(SCALER_KEDA)
        } else if self.hpa.is_some() {
            Some(SCALER_HPA)
        } else if self.external.is_some() {
            Some(SCALER_EXTERNAL)
        } else {
            None
        }
    }
}

/// The autoscalers of `ms` (named `name` in `namespace`, objects under `meta`): `keda` says
/// whether KEDA's ScaledObject is served; `bridge` is its resolved pub/sub config (the
/// streams, consumers and broker its queue-lag triggers read).
pub fn render(
    ms: &Microservice,
    meta: &ObjectMeta,
    bridge: Option<&Messaging>,
    keda: bool,
) -> Result<Autoscalers, RenderError> {
    let external = ms
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_AUTOSCALED_BY));
    let field = || format!("metadata.annotations[{ANNOTATION_AUTOSCALED_BY:?}]");
    let Some(a) = &ms.spec.autoscaling else {
        return match external.map(|e| e.trim()) {
            None => Ok(Autoscalers::default()),
            Some("") => Err(RenderError::Field {
                field: field(),
                message: "names no autoscaler: set it to the one that scales the Microservice, e.g. HorizontalPodAutoscaler/<name>".into(),
            }),
            Some(e) => Ok(Autoscalers {
                external: Some(e.to_string()),
                ..Autoscalers::default()
            }),
        };
    };
    if external.is_some() {
        return Err(RenderError::Field {
            field: field(),
            message:
                "spec.autoscaling renders Weir's own autoscaler: set one or the other, not both"
                    .into(),
        });
    }
    let name = meta.name.clone().unwrap_or_default();
    if a.queue_lag.is_empty() || !keda {
        let hpa = (!resource_metrics(a).is_empty()).then(|| hpa(meta, &name, a));
        return Ok(Autoscalers {
            hpa,
            scaled_object: None,
            trigger_authentication: None,
            lag_without_keda: !a.queue_lag.is_empty(),
            external: None,
        });
    }
    let bridge = bridge.ok_or_else(|| RenderError::Field {
        field: "spec.autoscaling.queueLag".into(),
        message: "needs the Microservice's queues (spec.consumes) and their Broker".into(),
    })?;
    let kind = bridge.config.broker_kind.as_str();
    let auth = trigger_auth(kind, bridge);
    let mut triggers = Vec::new();
    for (i, lag) in a.queue_lag.iter().enumerate() {
        let consume = bridge
            .config
            .consumes
            .iter()
            .find(|c| c.queue == lag.queue)
            .ok_or_else(|| RenderError::Field {
                field: format!("spec.autoscaling.queueLag[{i}].queue"),
                message: format!(
                    "queue {:?} is not one this Microservice consumes (spec.consumes)",
                    lag.queue
                ),
            })?;
        let mut t =
            lag_trigger(kind, bridge, consume, lag).map_err(|message| RenderError::Field {
                field: format!("spec.autoscaling.queueLag[{i}]"),
                message,
            })?;
        if auth.is_some() {
            t["authenticationRef"] = json!({"name": trigger_authentication_name(&name)});
        }
        triggers.push(t);
    }
    for (resource, target) in resource_metrics(a) {
        triggers.push(json!({
            "type": resource,
            "metricType": "Utilization",
            "metadata": {"value": target.to_string()},
        }));
    }
    let mut so = DynamicObject::new(&name, &scaled_object_resource()).data(json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "triggers": triggers,
        }
    }));
    so.metadata = meta.clone();
    let trigger_authentication = auth.map(|secret_refs| {
        let auth_name = trigger_authentication_name(&name);
        let mut ta = DynamicObject::new(&auth_name, &trigger_authentication_resource())
            .data(json!({"spec": {"secretTargetRef": secret_refs}}));
        ta.metadata = ObjectMeta {
            name: Some(auth_name),
            ..meta.clone()
        };
        ta
    });
    Ok(Autoscalers {
        hpa: None,
        scaled_object: Some(so),
        trigger_authentication,
        lag_without_keda: false,
        external: None,
    })
}

/// `(cpu|memory, percent)` of each resource target.
fn resource_metrics(a: &AutoscalingSpec) -> Vec<(&'static str, i32)> {
    [
        ("cpu", a.target_cpu_utilization_percentage),
        ("memory", a.target_memory_utilization_percentage),
    ]
    .into_iter()
    .filter_map(|(r, t)| Some((r, t?)))
    .collect()
}

fn hpa(meta: &ObjectMeta, name: &str, a: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: meta.clone(),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name.to_string(),
            },
            // The HorizontalPodAutoscaler cannot scale from zero (without an alpha gate); the
            // schema allows 0 only with queue lag, which KEDA scales.
            min_replicas: Some(a.min_replicas.max(1)),
            max_replicas: a.max_replicas,
            metrics: Some(
                resource_metrics(a)
                    .into_iter()
                    .map(|(resource, target)| MetricSpec {
                        type_: "Resource".into(),
                        resource: Some(ResourceMetricSource {
                            name: resource.into(),
                            target: MetricTarget {
                                type_: "Utilization".into(),
                                average_utilization: Some(target),
                                ..Default::default()
                            },
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            behavior: None,
        }),
        status: None,
    }
}

/// The `secretTargetRef` list of the TriggerAuthentication for a broker of `kind`, or `None`
/// when its triggers take no credentials: the Broker's Secret keys as Weir reads them
/// (`weir_broker::credentials`): `username`, `password`, and `ca.crt` for a TLS URL. A key
/// the Secret does not hold is read by KEDA as empty (no user: the broker's default one).
/// KEDA's `nats-jetstream` scaler reads the server's monitoring endpoint, which takes none.
fn trigger_auth(kind: &str, bridge: &Messaging) -> Option<Vec<Value>> {
    let secret = bridge.credentials_secret.as_deref()?;
    let tls = is_tls_url(&bridge.config.broker_url);
    let mut keys: Vec<(&str, &str)> = match kind {
        "redis" | "rabbitmq" | "kafka" => vec![("username", "username"), ("password", "password")],
        _ => return None,
    };
    // RabbitMQ takes a CA only with the `tls` parameter, which no Secret key holds: an amqps://
    // broker is verified against the system's roots.
    if tls && kind != "rabbitmq" {
        keys.push(("ca", weir_broker::credentials::CA_KEY));
    }
    Some(
        keys.into_iter()
            .map(|(parameter, key)| json!({"parameter": parameter, "name": secret, "key": key}))
            .collect(),
    )
}

fn is_tls_url(url: &str) -> bool {
    let scheme = url
        .split("://")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(scheme.as_str(), "tls" | "rediss" | "amqps" | "kafka+ssl")
}

/// `host:port` of the first server of a broker URL (`scheme://[user@]host:port[,…][/…]`), with
/// `default_port` when it names none.
fn first_host(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let first = authority.split(',').next()?;
    let host_port = first.rsplit_once('@').map_or(first, |(_, h)| h);
    if host_port.is_empty() {
        return None;
    }
    // An IPv6 literal keeps its brackets; a port is what follows the last `]` or `:`.
    let has_port = match host_port.rfind(']') {
        Some(i) => host_port[i..].contains(':'),
        None => host_port.contains(':'),
    };
    Some(if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    })
}

/// NATS serves its monitoring endpoint (KEDA's source of a consumer's lag) on this port; the
/// managed NATS enables it and its Service exposes it.
pub const NATS_MONITORING_PORT: u16 = 8222;

/// The trigger reading the lag of `consume` on a broker of `kind`, named after the queue (a
/// `queueLag` target is the lag per pod: KEDA's `AverageValue`, its default metric type).
fn lag_trigger(
    kind: &str,
    bridge: &Messaging,
    consume: &weir_crds::proxy::ConsumeConfig,
    lag: &weir_crds::microservice::QueueLagTarget,
) -> Result<Value, String> {
    let url = &bridge.config.broker_url;
    let target = lag.target_lag_per_replica.to_string();
    let activation = lag.activation_lag.unwrap_or(0);
    let no_host = || format!("the Broker's url {url:?} names no host");
    let metadata = match kind {
        // The consumer's pending and unacknowledged messages, from the monitoring endpoint of
        // the server the URL names first (on its host, the monitoring port).
        "nats" => {
            let host = first_host(url, 4222).ok_or_else(no_host)?;
            let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            json!({
                "natsServerMonitoringEndpoint": format!("{host}:{NATS_MONITORING_PORT}"),
                "account": "$G",
                "stream": consume.stream,
                "consumer": consume.consumer,
                "lagThreshold": target,
                "activationLagThreshold": activation.to_string(),
            })
        }
        // The consumer group's lag (XINFO GROUPS: entries not yet delivered to the group;
        // Redis 7 or later). KEDA requires an activation threshold above 0 in this mode: 0 is
        // rendered as 1.
        "redis" => json!({
            "address": first_host(url, 6379).ok_or_else(no_host)?,
            "enableTLS": is_tls_url(url).to_string(),
            "stream": consume.stream,
            "consumerGroup": consume.consumer,
            "lagCount": target,
            "activationLagCount": activation.max(1).to_string(),
        }),
        // The ready messages of the Microservice's own queue (AMQP, without credentials in the
        // URL: they come from the TriggerAuthentication).
        "rabbitmq" => {
            let host = first_host(url, 5672).ok_or_else(no_host)?;
            let scheme = if is_tls_url(url) { "amqps" } else { "amqp" };
            let effective = bridge.config.broker_url.clone();
            let vhost = effective
                .split_once("://")
                .and_then(|(_, r)| r.split_once('/'))
                .map(|(_, path)| path.split('?').next().unwrap_or_default().to_string())
                .unwrap_or_default();
            json!({
                "host": format!("{scheme}://{host}/{vhost}"),
                "protocol": "amqp",
                "queueName": weir_broker::rabbitmq::consumer_queue(&consume.stream, &consume.consumer),
                "mode": "QueueLength",
                "value": target,
                "activationValue": activation.to_string(),
            })
        }
        // The group's lag over the topic's partitions.
        "kafka" => {
            let b = weir_broker::kafka::Bootstrap::parse(url).map_err(|e| e.to_string())?;
            let mut m = json!({
                "bootstrapServers": b.servers,
                "consumerGroup": weir_broker::kafka::group_id(&consume.stream, &consume.consumer),
                "topic": weir_broker::kafka::topic(&consume.stream),
                "lagThreshold": target,
                "activationLagThreshold": activation.to_string(),
                "offsetResetPolicy": "earliest",
            });
            if b.tls {
                m["tls"] = json!("enable");
            }
            if bridge.credentials_secret.is_some() {
                m["sasl"] = json!(match b.sasl {
                    weir_broker::kafka::SaslMechanism::Plain => "plaintext",
                    weir_broker::kafka::SaslMechanism::ScramSha256 => "scram_sha256",
                    weir_broker::kafka::SaslMechanism::ScramSha512 => "scram_sha512",
                });
            }
            m
        }
        other => return Err(format!("no queue-lag scaler for broker kind {other}")),
    };
    let scaler = match kind {
        "nats" => "nats-jetstream",
        "redis" => "redis-streams",
        "rabbitmq" => "rabbitmq",
        _ => "kafka",
    };
    Ok(json!({
        "type": scaler,
        "name": format!("queue-{}", lag.queue),
        "metadata": metadata,
    }))
}
