//! The sidecar's pub/sub bridge config of a Microservice: what it may publish and which queues
//! it consumes, resolved from its Queues (with their schemas) and their Broker. Pure: the
//! operator fetches the objects, `weir render` takes them from its input.

use super::RenderError;
use serde_json::Value;
use std::collections::BTreeMap;
use weir_broker::queue::{dead_letter_stream_name, dead_letter_subject, stream_name};
use weir_broker::topology::{MIN_PROCESSED_TTL, Topology, subjects};
use weir_crds::broker::BrokerKind;
use weir_crds::microservice::MicroserviceSpec;
use weir_crds::proxy::{ConsumeConfig, MessagingConfig, PublishConfig, QueueLimits};
use weir_crds::queue::{MessageSchema, QueueSpec};
use weir_crds::{Broker, duration};

/// Where the Broker's credentials Secret is mounted in the sidecar container. The sidecar's
/// `credentialsFile` is this directory: one file per Secret key (`creds`, `token`, or
/// `username` and `password`), read as [`weir_broker::credentials::Credentials::from_dir`] does.
pub const CREDENTIALS_MOUNT_PATH: &str = "/etc/weir/broker";
/// Name of the pod volume holding the Broker's credentials.
pub const CREDENTIALS_VOLUME: &str = "weir-broker-credentials";

/// A Queue as the renderer needs it: its spec and its schema, already resolved.
#[derive(Debug, Clone)]
pub struct ResolvedQueue {
    pub spec: QueueSpec,
    pub schema: Option<Value>,
}

/// The bridge config and the Secret the sidecar must mount for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Messaging {
    pub config: MessagingConfig,
    /// Name of the Broker's credentials Secret, mounted at [`CREDENTIALS_MOUNT_PATH`].
    pub credentials_secret: Option<String>,
}

/// Why a Queue's schema cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SchemaError {
    pub field: String,
    pub message: String,
}

/// The Queue's JSON Schema: inline, or the text of `configMap` (the data of the ConfigMap named
/// by `configMapRef`, when it was found). The schema must compile as draft 2020-12.
pub fn resolve_schema(
    schema: Option<&MessageSchema>,
    config_map: Option<&BTreeMap<String, String>>,
) -> Result<Option<Value>, SchemaError> {
    let Some(s) = schema else { return Ok(None) };
    let err = |field: &str, message: String| SchemaError {
        field: field.into(),
        message,
    };
    let (value, field) = match (&s.inline, &s.config_map_ref) {
        (Some(v), None) => (v.clone(), "spec.schema.inline"),
        (None, Some(r)) => {
            let data = config_map.ok_or_else(|| {
                err(
                    "spec.schema.configMapRef",
                    format!("ConfigMap {:?} not found", r.name),
                )
            })?;
            let text = data.get(&r.key).ok_or_else(|| {
                err(
                    "spec.schema.configMapRef.key",
                    format!("ConfigMap {:?} has no key {:?}", r.name, r.key),
                )
            })?;
            // JSON, or YAML (a superset) as ConfigMaps are often written.
            let v: Value = serde_yaml::from_str(text).map_err(|e| {
                err(
                    "spec.schema.configMapRef",
                    format!("key {:?} of ConfigMap {:?} is not JSON: {e}", r.key, r.name),
                )
            })?;
            (v, "spec.schema.configMapRef")
        }
        _ => {
            return Err(err(
                "spec.schema",
                "set exactly one of inline or configMapRef".into(),
            ));
        }
    };
    jsonschema::draft202012::new(&value).map_err(|e| {
        err(
            field,
            format!("not a valid JSON Schema (draft 2020-12): {e}"),
        )
    })?;
    Ok(Some(value))
}

/// The URL the sidecar dials for `broker`: its `spec.url`, or the Service of a managed one.
pub fn broker_url(broker: &Broker, namespace: &str, cluster_domain: &str) -> String {
    match broker.spec.effective_url() {
        Some(u) => u,
        None => super::broker::managed_url(
            broker.spec.kind,
            &broker.metadata.name.clone().unwrap_or_default(),
            namespace,
            cluster_domain,
        ),
    }
}

fn ms_of(field: String, value: &str) -> Result<u64, RenderError> {
    duration::parse(value)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| RenderError::Field {
            field,
            message: e.to_string(),
        })
}

/// The bridge config of Microservice `name`, or `None` when it neither publishes nor consumes.
///
/// `queues` maps Queue names (same namespace) to their resolved form, `brokers` maps Broker
/// names to Brokers. A reference to a Queue or Broker not in them, or Queues on different
/// Brokers, is an error naming the field.
pub fn build(
    name: &str,
    namespace: &str,
    spec: &MicroserviceSpec,
    queues: &BTreeMap<String, ResolvedQueue>,
    brokers: &BTreeMap<String, Broker>,
    cluster_domain: &str,
) -> Result<Option<Messaging>, RenderError> {
    if spec.publishes.is_empty() && spec.consumes.is_empty() {
        return Ok(None);
    }
    let refs = spec
        .publishes
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("spec.publishes[{i}].queue"), p.queue.as_str()))
        .chain(
            spec.consumes
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.consumes[{i}].queue"), c.queue.as_str())),
        );
    let mut broker: Option<(&str, &Broker)> = None;
    for (field, q) in refs {
        let queue = queues.get(q).ok_or_else(|| RenderError::Field {
            field: field.clone(),
            message: format!("Queue {q:?} not found in namespace {namespace}"),
        })?;
        let b = brokers
            .get(&queue.spec.broker)
            .ok_or_else(|| RenderError::Field {
                field: field.clone(),
                message: format!(
                    "Broker {:?} of Queue {q:?} not found in namespace {namespace}",
                    queue.spec.broker
                ),
            })?;
        match broker {
            None => broker = Some((queue.spec.broker.as_str(), b)),
            Some((first, _)) if first != queue.spec.broker => {
                return Err(RenderError::Field {
                    field,
                    message: format!(
                        "Queue {q:?} is on Broker {:?} but this service's other queues are on {first:?}; a sidecar talks to one Broker",
                        queue.spec.broker
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let (broker_name, broker) = broker.expect("at least one queue reference");
    if let Err((field, message)) = broker.spec.check() {
        return Err(RenderError::Field {
            field: format!("Broker {broker_name}: {field}"),
            message,
        });
    }
    let redis = broker.spec.kind == BrokerKind::Redis;
    let rabbitmq = broker.spec.kind == BrokerKind::Rabbitmq;

    let publishes = spec
        .publishes
        .iter()
        .map(|p| {
            let q = &queues[&p.queue];
            PublishConfig {
                queue: p.queue.clone(),
                stream: stream_name(namespace, &p.queue),
                subject: subjects(namespace, &p.queue, &q.spec)[0].clone(),
                schema: q.schema.clone(),
                event_type: q.spec.event_type.clone().unwrap_or_else(|| p.queue.clone()),
                // Redis drops repeated ids and trims at publish; the others keep it broker-side.
                duplicate_window_ms: redis
                    .then(|| duration::parse(&q.spec.duplicate_window).ok())
                    .flatten()
                    .map(|d| d.as_millis() as u64),
                max_messages: redis
                    .then(|| q.spec.max_messages.and_then(|m| u64::try_from(m).ok()))
                    .flatten(),
                max_age_ms: redis
                    .then(|| {
                        q.spec
                            .max_age
                            .as_deref()
                            .and_then(|a| duration::parse(a).ok())
                    })
                    .flatten()
                    .map(|d| d.as_millis() as u64),
            }
        })
        .collect();
    let consumes = spec
        .consumes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let q = &queues[&c.queue];
            let at = |f: &str| {
                format!(
                    "Queue {}: spec.{f} (consumed at spec.consumes[{i}])",
                    c.queue
                )
            };
            let consumer = &q.spec.consumer;
            let window = ms_of(at("duplicateWindow"), &q.spec.duplicate_window)?;
            let (dl_stream, dl_subject) = if q.spec.dead_letter.enabled {
                (
                    dead_letter_stream_name(namespace, &c.queue),
                    dead_letter_subject(namespace, &c.queue),
                )
            } else {
                (String::new(), String::new())
            };
            Ok(ConsumeConfig {
                queue: c.queue.clone(),
                stream: stream_name(namespace, &c.queue),
                consumer: name.to_string(),
                path: c.path.clone(),
                max_in_flight: c.max_in_flight,
                max_deliveries: u32::try_from(consumer.max_deliveries.max(1)).unwrap_or(1),
                ack_wait_ms: ms_of(at("consumer.ackWait"), &consumer.ack_wait)?,
                backoff_ms: consumer
                    .backoff
                    .iter()
                    .enumerate()
                    .map(|(j, b)| ms_of(at(&format!("consumer.backoff[{j}]")), &b.0))
                    .collect::<Result<_, _>>()?,
                dead_letter_stream: dl_stream,
                dead_letter_subject: dl_subject,
                schema: q.schema.clone(),
                dedup_window_ms: window.max(MIN_PROCESSED_TTL.as_millis() as u64),
                event_type: Some(q.spec.event_type.clone().unwrap_or_else(|| c.queue.clone())),
                limits: if rabbitmq {
                    Topology::new(namespace, &c.queue, &q.spec)
                        .map_err(|e| RenderError::Field {
                            field: format!("Queue {}", c.queue),
                            message: e.to_string(),
                        })?
                        .rabbitmq_limits()
                } else {
                    QueueLimits::default()
                },
            })
        })
        .collect::<Result<Vec<_>, RenderError>>()?;
    let credentials_secret = super::broker::credentials_secret(broker);
    Ok(Some(Messaging {
        config: MessagingConfig {
            broker_url: broker_url(broker, namespace, cluster_domain),
            broker_kind: broker.spec.kind.name().into(),
            credentials_file: credentials_secret
                .as_ref()
                .map(|_| CREDENTIALS_MOUNT_PATH.to_string()),
            publishes,
            consumes,
        },
        credentials_secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queue(yaml: &str, schema: Option<Value>) -> ResolvedQueue {
        ResolvedQueue {
            spec: serde_yaml::from_str(yaml).unwrap(),
            schema,
        }
    }

    fn broker(yaml: &str) -> Broker {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn inputs() -> (BTreeMap<String, ResolvedQueue>, BTreeMap<String, Broker>) {
        let schema = json!({"type": "object", "required": ["id"]});
        (
            BTreeMap::from([
                (
                    "orders".to_string(),
                    queue(
                        "broker: nats\neventType: order.created\nduplicateWindow: 30m\nconsumer: {maxDeliveries: 3, ackWait: 10s, backoff: [1s, 500ms]}",
                        Some(schema),
                    ),
                ),
                (
                    "audit".to_string(),
                    queue(
                        "broker: nats\nsubjects: [audit.a, audit.b]\ndeadLetter: {enabled: false}",
                        None,
                    ),
                ),
            ]),
            BTreeMap::from([(
                "nats".to_string(),
                broker(
                    "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {name: nats}\nspec: {url: 'nats://nats.infra:4222', credentialsSecret: {name: nats-creds}}",
                ),
            )]),
        )
    }

    fn spec(yaml: &str) -> MicroserviceSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_service_without_queues_has_no_messaging() {
        let (q, b) = inputs();
        assert_eq!(
            build("x", "shop", &spec("image: x"), &q, &b, "cluster.local").unwrap(),
            None
        );
    }

    #[test]
    fn publish_and_consume_entries_follow_the_conventions() {
        let (q, b) = inputs();
        let s = spec(
            "image: billing\npublishes: [{queue: audit}]\nconsumes: [{queue: orders, path: /events/order, maxInFlight: 4}]",
        );
        let m = build("billing", "shop", &s, &q, &b, "cluster.local")
            .unwrap()
            .unwrap();
        assert_eq!(m.credentials_secret.as_deref(), Some("nats-creds"));
        let c = &m.config;
        assert_eq!(c.broker_url, "nats://nats.infra:4222");
        assert_eq!(c.broker_kind, "nats");
        assert_eq!(c.credentials_file.as_deref(), Some("/etc/weir/broker"));
        let p = &c.publishes[0];
        assert_eq!(
            (
                p.queue.as_str(),
                p.stream.as_str(),
                p.subject.as_str(),
                p.event_type.as_str()
            ),
            ("audit", "weir_shop_audit", "audit.a", "audit")
        );
        assert_eq!(p.schema, None);
        let k = &c.consumes[0];
        assert_eq!(k.stream, "weir_shop_orders");
        assert_eq!(k.consumer, "billing");
        assert_eq!(k.path, "/events/order");
        assert_eq!(k.max_in_flight, 4);
        assert_eq!(k.max_deliveries, 3);
        assert_eq!(k.ack_wait_ms, 10_000);
        assert_eq!(k.backoff_ms, [1000, 500]);
        assert_eq!(k.dead_letter_stream, "weir_shop_orders_dlq");
        assert_eq!(k.dead_letter_subject, "weir.dlq.shop.orders");
        assert_eq!(k.dedup_window_ms, 30 * 60_000);
        assert_eq!(k.schema.as_ref().unwrap()["required"][0], "id");
        // The ce-type the sidecar gives a message written without a CloudEvents envelope.
        assert_eq!(k.event_type.as_deref(), Some("order.created"));
    }

    /// A Queue on a kafka Broker: the sidecar gets the kind and the bootstrap URL as written,
    /// and the stream and dead-letter names the topics are named after.
    #[test]
    fn a_kafka_broker_passes_its_kind_and_bootstrap_url() {
        let q = BTreeMap::from([(
            "orders".to_string(),
            queue(
                "broker: bus
partitions: 6",
                None,
            ),
        )]);
        let b = BTreeMap::from([(
            "bus".to_string(),
            broker(
                "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {name: bus}\n\
                 spec: {kind: kafka, url: 'kafka+ssl://k1:9093,k2:9093?sasl=scram-sha-512'}",
            ),
        )]);
        let s = spec("image: a\nconsumes: [{queue: orders, path: /o}]");
        let m = build("billing", "shop", &s, &q, &b, "cluster.local")
            .unwrap()
            .unwrap();
        assert_eq!(m.config.broker_kind, "kafka");
        assert_eq!(
            m.config.broker_url,
            "kafka+ssl://k1:9093,k2:9093?sasl=scram-sha-512"
        );
        let c = &m.config.consumes[0];
        assert_eq!(c.stream, "weir_shop_orders");
        assert_eq!(c.dead_letter_stream, "weir_shop_orders_dlq");
        assert_eq!(c.limits, QueueLimits::default());
        // A scheme of another kind is refused naming the Broker's field.
        let mut wrong = b.clone();
        wrong.get_mut("bus").unwrap().spec.url = Some("nats://k1:4222".into());
        let e = build("billing", "shop", &s, &q, &wrong, "cluster.local").unwrap_err();
        assert!(e.to_string().contains("Broker bus: spec.url"), "{e}");
    }

    #[test]
    fn dedup_window_is_at_least_ten_minutes_and_disabled_dead_letters_are_empty() {
        let (q, b) = inputs();
        let s = spec("image: a\nconsumes: [{queue: audit, path: /a}]");
        let m = build("a", "shop", &s, &q, &b, "cluster.local")
            .unwrap()
            .unwrap();
        let k = &m.config.consumes[0];
        assert_eq!(k.dedup_window_ms, 600_000);
        assert_eq!(k.dead_letter_stream, "");
        assert_eq!(k.max_in_flight, 16);
        assert_eq!(
            k.event_type.as_deref(),
            Some("audit"),
            "no eventType: the name"
        );
    }

    #[test]
    fn a_missing_queue_or_broker_names_the_field() {
        let (q, mut b) = inputs();
        let s = spec("image: a\npublishes: [{queue: audit}]\nconsumes: [{queue: nope, path: /a}]");
        let e = build("a", "shop", &s, &q, &b, "cluster.local").unwrap_err();
        assert!(e.to_string().starts_with("spec.consumes[0].queue:"), "{e}");
        b.clear();
        let s = spec("image: a\npublishes: [{queue: audit}]");
        let e = build("a", "shop", &s, &q, &b, "cluster.local").unwrap_err();
        assert!(e.to_string().contains("Broker \"nats\""), "{e}");
    }

    #[test]
    fn schemas_resolve_inline_or_from_a_config_map_and_must_compile() {
        let inline: MessageSchema =
            serde_json::from_value(json!({"inline": {"type": "object"}})).unwrap();
        assert_eq!(
            resolve_schema(Some(&inline), None).unwrap(),
            Some(json!({"type": "object"}))
        );
        let by_ref: MessageSchema =
            serde_json::from_value(json!({"configMapRef": {"name": "s", "key": "order.json"}}))
                .unwrap();
        let data = BTreeMap::from([(
            "order.json".to_string(),
            "{\"type\": \"string\"}".to_string(),
        )]);
        assert_eq!(
            resolve_schema(Some(&by_ref), Some(&data)).unwrap(),
            Some(json!({"type": "string"}))
        );
        assert_eq!(
            resolve_schema(Some(&by_ref), None).unwrap_err().field,
            "spec.schema.configMapRef"
        );
        assert_eq!(
            resolve_schema(Some(&by_ref), Some(&BTreeMap::new()))
                .unwrap_err()
                .field,
            "spec.schema.configMapRef.key"
        );
        let bad: MessageSchema =
            serde_json::from_value(json!({"inline": {"type": "no-such-type"}})).unwrap();
        let e = resolve_schema(Some(&bad), None).unwrap_err();
        assert_eq!(e.field, "spec.schema.inline");
        assert!(e.message.contains("JSON Schema"), "{e}");
    }

    #[test]
    fn a_managed_broker_is_reached_through_its_service() {
        let b = broker(
            "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {name: bus}\nspec: {managed: {}}",
        );
        assert_eq!(
            broker_url(&b, "shop", "cluster.local"),
            "nats://bus.shop.svc.cluster.local:4222"
        );
    }

    #[test]
    fn redis_and_rabbitmq_brokers_in_the_bridge_config() {
        let q = BTreeMap::from([(
            "orders".to_string(),
            queue(
                "broker: bus\nmaxMessages: 1000\nmaxAge: 1h\nduplicateWindow: 5m",
                None,
            ),
        )]);
        let s =
            spec("image: x\npublishes: [{queue: orders}]\nconsumes: [{queue: orders, path: /e}]");
        let with = |b: &str| {
            BTreeMap::from([(
                "bus".to_string(),
                broker(&format!(
                    "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {{name: bus}}\nspec: {b}"
                )),
            )])
        };
        let m = build(
            "x",
            "shop",
            &s,
            &q,
            &with("{kind: redis, url: 'redis://r:6379'}"),
            "c",
        )
        .unwrap()
        .unwrap()
        .config;
        assert_eq!(m.broker_kind, "redis");
        let p = &m.publishes[0];
        assert_eq!(p.duplicate_window_ms, Some(300_000));
        assert_eq!(p.max_messages, Some(1000));
        assert_eq!(p.max_age_ms, Some(3_600_000));
        assert!(m.consumes[0].limits.is_empty(), "RabbitMQ only");

        let m = build(
            "x",
            "shop",
            &s,
            &q,
            &with("{kind: rabbitmq, url: 'amqp://mq:5672', vhost: shop}"),
            "c",
        )
        .unwrap()
        .unwrap()
        .config;
        assert_eq!(m.broker_kind, "rabbitmq");
        assert_eq!(m.broker_url, "amqp://mq:5672/shop");
        assert_eq!(m.publishes[0].max_messages, None, "Redis only");
        assert_eq!(
            m.consumes[0].limits,
            weir_crds::proxy::QueueLimits {
                max_messages: Some(1000),
                max_age_ms: Some(3_600_000),
                ..Default::default()
            },
            "the consumer queue's limits, as the operator declares them"
        );

        let e = build("x", "shop", &s, &q, &with("{url: 'redis://r:6379'}"), "c").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("Broker bus: spec.url") && text.contains("spec.kind nats"),
            "{text}"
        );
    }
}
