//! What a managed Broker (`spec.managed`) becomes: a one-replica StatefulSet running the broker
//! and a Service in front of it, both owned by the Broker (deleting the Broker deletes them;
//! a persistent volume claim stays, as StatefulSets leave them). Pure functions: the Broker
//! reconciler applies them, `weir render` prints them.
//!
//! | kind | default image | port | storage | readiness |
//! |---|---|---|---|---|
//! | nats | `nats:2.10-alpine` | 4222 (monitoring 8222) | JetStream in `/data` | `GET /healthz?js-enabled-only=true` |
//! | redis | `redis:7.2-alpine` | 6379 | append-only file in `/data`, fsync every second | TCP |
//! | rabbitmq | `rabbitmq:3.13-alpine` | 5672 | `/var/lib/rabbitmq` | TCP |
//!
//! A RabbitMQ broker needs a user that may connect from other pods: the operator creates the
//! Secret `<broker>-broker-credentials` (`username`, `password`) once, unless the Broker names
//! its own `credentialsSecret`; the broker, the operator and the sidecars all use it.

use super::RenderError;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use weir_crds::Broker;
use weir_crds::broker::BrokerKind;

/// Label on a managed broker's objects and its pod selector.
pub const LABEL_BROKER: &str = "weir.dev/broker";
/// Name of the data volume (and of the claim template when `storage` is set).
pub const DATA_VOLUME: &str = "data";

/// Everything a managed Broker becomes.
#[derive(Debug, Clone)]
pub struct RenderedBroker {
    pub service: Service,
    pub stateful_set: StatefulSet,
}

/// The image run for `kind` when `spec.managed.image` is absent; `None` for a kind the
/// operator does not run (Kafka: Strimzi's).
pub fn default_image(kind: BrokerKind) -> Option<&'static str> {
    match kind {
        BrokerKind::Nats => Some("nats:2.10-alpine"),
        BrokerKind::Redis => Some("redis:7.2-alpine"),
        BrokerKind::Rabbitmq => Some("rabbitmq:3.13-alpine"),
        BrokerKind::Kafka => None,
    }
}

/// The client port of `kind`.
pub fn port(kind: BrokerKind) -> u16 {
    match kind {
        BrokerKind::Nats => 4222,
        BrokerKind::Redis => 6379,
        BrokerKind::Rabbitmq => 5672,
        BrokerKind::Kafka => 9092,
    }
}

/// The URL of managed Broker `name`'s Service, in the scheme of its kind.
pub fn managed_url(kind: BrokerKind, name: &str, namespace: &str, cluster_domain: &str) -> String {
    let scheme = match kind {
        BrokerKind::Nats => "nats",
        BrokerKind::Redis => "redis",
        BrokerKind::Rabbitmq => "amqp",
        BrokerKind::Kafka => "kafka",
    };
    format!(
        "{scheme}://{name}.{namespace}.svc.{cluster_domain}:{}",
        port(kind)
    )
}

/// The Secret the operator creates for a managed RabbitMQ Broker without `credentialsSecret`.
pub fn generated_credentials_name(broker: &str) -> String {
    format!("{broker}-broker-credentials")
}

/// The credentials Secret everyone uses for `b`: its own, or the generated one of a managed
/// RabbitMQ Broker.
pub fn credentials_secret(b: &Broker) -> Option<String> {
    match (&b.spec.credentials_secret, &b.spec.managed) {
        (Some(s), _) => Some(s.name.clone()),
        (None, Some(_)) if b.spec.kind == BrokerKind::Rabbitmq => {
            Some(generated_credentials_name(&b.name_any()))
        }
        _ => None,
    }
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), name.to_string()),
        ("app.kubernetes.io/component".to_string(), "broker".into()),
        ("app.kubernetes.io/managed-by".to_string(), "weir".into()),
        (LABEL_BROKER.to_string(), name.to_string()),
    ])
}

fn metadata(b: &Broker, namespace: &str) -> ObjectMeta {
    let name = b.name_any();
    ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(&name)),
        owner_references: b.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The broker container of `kind`: command, environment, data path and readiness probe;
/// `None` for a kind the operator does not run.
fn container(b: &Broker, image: String) -> Option<Container> {
    let kind = b.spec.kind;
    let tcp = |port: u16| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    let (command, env, data, readiness): (Vec<&str>, Vec<EnvVar>, _, _) = match kind {
        BrokerKind::Nats => (
            vec!["nats-server", "-js", "-sd", "/data", "-m", "8222"],
            vec![],
            "/data",
            Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/healthz?js-enabled-only=true".into()),
                    port: IntOrString::Int(8222),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                ..Default::default()
            },
        ),
        BrokerKind::Redis => (
            vec![
                "redis-server",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                "/data",
                "--protected-mode",
                "no",
            ],
            vec![],
            "/data",
            tcp(port(kind)),
        ),
        BrokerKind::Rabbitmq => {
            let secret = credentials_secret(b).unwrap_or_default();
            let mut env = vec![
                env_from_secret("RABBITMQ_DEFAULT_USER", &secret, "username"),
                env_from_secret("RABBITMQ_DEFAULT_PASS", &secret, "password"),
            ];
            if let Some(v) = &b.spec.vhost {
                env.push(EnvVar {
                    name: "RABBITMQ_DEFAULT_VHOST".into(),
                    value: Some(v.clone()),
                    ..Default::default()
                });
            }
            (vec![], env, "/var/lib/rabbitmq", tcp(port(kind)))
        }
        BrokerKind::Kafka => return None,
    };
    // The protocol is spelled out: server-side apply on older API servers (1.20) needs every
    // key of the ports list.
    let mut ports = vec![ContainerPort {
        name: Some("client".into()),
        container_port: i32::from(port(kind)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    if kind == BrokerKind::Nats {
        ports.push(ContainerPort {
            name: Some("monitoring".into()),
            container_port: 8222,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    Some(Container {
        name: "broker".into(),
        image: Some(image),
        // The image's own entrypoint runs RabbitMQ; NATS and Redis are started explicitly.
        command: (!command.is_empty()).then(|| command.into_iter().map(String::from).collect()),
        env: (!env.is_empty()).then_some(env),
        ports: Some(ports),
        readiness_probe: Some(readiness),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: data.into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The objects of managed Broker `b` in `namespace`; `None` for a Broker with a URL.
pub fn render(b: &Broker, namespace: &str) -> Result<Option<RenderedBroker>, RenderError> {
    let Some(managed) = &b.spec.managed else {
        return Ok(None);
    };
    let name = b.name_any();
    let not_run = || RenderError::Field {
        field: format!("Broker {name}: spec.managed"),
        message: weir_crds::validate::KAFKA_NOT_MANAGED.into(),
    };
    let storage = match managed.storage.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(parse_quantity(s).map_err(|message| RenderError::Field {
            field: format!("Broker {name}: spec.managed.storage"),
            message,
        })?),
        None => None,
    };
    let image = match &managed.image {
        Some(i) => i.clone(),
        None => default_image(b.spec.kind).ok_or_else(not_run)?.to_string(),
    };
    let container = container(b, image).ok_or_else(not_run)?;
    let selector = BTreeMap::from([(LABEL_BROKER.to_string(), name.clone())]);
    let meta = metadata(b, namespace);
    let (volumes, claims) = match storage {
        // Without a size the data lives as long as the pod (an emptyDir).
        None => (
            Some(vec![Volume {
                name: DATA_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            None,
        ),
        Some(size) => (
            None,
            Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.into()),
                    labels: Some(labels(&name)),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
        ),
    };
    let stateful_set = StatefulSet {
        metadata: meta.clone(),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name.clone()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes,
                    termination_grace_period_seconds: Some(30),
                    ..Default::default()
                }),
            },
            volume_claim_templates: claims,
            ..Default::default()
        }),
        ..Default::default()
    };
    let service = Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(service_ports(b.spec.kind)),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Some(RenderedBroker {
        service,
        stateful_set,
    }))
}

/// The client port, and NATS's monitoring port: KEDA reads a consumer's lag there
/// (`autoscaling.queueLag`, see `render::autoscaling`).
fn service_ports(kind: BrokerKind) -> Vec<ServicePort> {
    let tcp = |name: &str, p: u16| ServicePort {
        name: Some(name.into()),
        port: i32::from(p),
        protocol: Some("TCP".into()),
        target_port: Some(IntOrString::Int(i32::from(p))),
        ..Default::default()
    };
    let mut ports = vec![tcp("client", port(kind))];
    if kind == BrokerKind::Nats {
        ports.push(tcp("monitoring", super::autoscaling::NATS_MONITORING_PORT));
    }
    ports
}

/// A storage size such as `1Gi` or `500M`; the error says what was expected.
fn parse_quantity(s: &str) -> Result<Quantity, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    let ok_number = !digits.is_empty() && digits.parse::<f64>().is_ok_and(|n| n > 0.0);
    let ok_suffix = [
        "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
    ]
    .contains(&suffix);
    if ok_number && ok_suffix {
        Ok(Quantity(s.to_string()))
    } else {
        Err(format!(
            "{s:?} is not a storage size (a positive number with an optional suffix such as Mi or Gi)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(spec: &str) -> Broker {
        serde_yaml::from_str(&format!(
            "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {{name: bus, namespace: shop, uid: u-1}}\nspec: {spec}"
        ))
        .unwrap()
    }

    #[test]
    fn a_broker_with_a_url_renders_nothing() {
        assert!(
            render(&broker("{url: 'nats://n:4222'}"), "shop")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn managed_nats_is_a_jetstream_statefulset_with_a_service_owned_by_the_broker() {
        let r = render(&broker("{managed: {}}"), "shop").unwrap().unwrap();
        let sts = r.stateful_set.spec.as_ref().unwrap();
        assert_eq!(sts.replicas, Some(1));
        assert_eq!(sts.service_name.as_deref(), Some("bus"));
        let pod = sts.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("nats:2.10-alpine"));
        assert_eq!(
            c.command.as_ref().unwrap()[..4],
            ["nats-server", "-js", "-sd", "/data"]
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz?js-enabled-only=true")
        );
        // No size: the data is the pod's (emptyDir), no claim.
        assert!(pod.volumes.as_ref().unwrap()[0].empty_dir.is_some());
        assert!(sts.volume_claim_templates.is_none());
        let owner = &r.stateful_set.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Broker", "bus")
        );
        assert_eq!(owner.controller, Some(true));
        let svc = r.service.spec.unwrap();
        assert_eq!(svc.ports.unwrap()[0].port, 4222);
        assert_eq!(svc.selector.unwrap()[LABEL_BROKER], "bus");
        assert_eq!(
            managed_url(BrokerKind::Nats, "bus", "shop", "cluster.local"),
            "nats://bus.shop.svc.cluster.local:4222"
        );
    }

    #[test]
    fn storage_becomes_a_claim_and_a_bad_size_names_the_field() {
        let r = render(
            &broker("{kind: redis, managed: {storage: 2Gi, image: 'my/redis:7'}}"),
            "shop",
        )
        .unwrap()
        .unwrap();
        let sts = r.stateful_set.spec.unwrap();
        let claim = &sts.volume_claim_templates.unwrap()[0];
        let req = claim.spec.as_ref().unwrap().resources.as_ref().unwrap();
        assert_eq!(req.requests.as_ref().unwrap()["storage"].0, "2Gi");
        let pod = sts.template.spec.unwrap();
        assert!(pod.volumes.is_none());
        assert_eq!(pod.containers[0].image.as_deref(), Some("my/redis:7"));
        assert_eq!(
            pod.containers[0].command.as_ref().unwrap()[0],
            "redis-server"
        );
        let e = render(&broker("{managed: {storage: lots}}"), "shop").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Broker bus: spec.managed.storage: \"lots\" is not a storage size"),
            "{e}"
        );
    }

    #[test]
    fn managed_rabbitmq_takes_its_user_from_the_generated_secret() {
        let b = broker("{kind: rabbitmq, vhost: shop, managed: {}}");
        assert_eq!(
            credentials_secret(&b).as_deref(),
            Some("bus-broker-credentials")
        );
        let r = render(&b, "shop").unwrap().unwrap();
        let c = &r
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0];
        assert!(c.command.is_none(), "the image's entrypoint runs RabbitMQ");
        let env = c.env.as_ref().unwrap();
        let secret_of = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|s| (s.name.clone(), s.key.clone()))
        };
        assert_eq!(
            secret_of("RABBITMQ_DEFAULT_PASS"),
            Some(("bus-broker-credentials".into(), "password".into()))
        );
        assert!(
            env.iter()
                .any(|e| e.name == "RABBITMQ_DEFAULT_VHOST" && e.value.as_deref() == Some("shop"))
        );
        // A Broker's own Secret wins; Brokers with a URL have none generated.
        let own = broker("{kind: rabbitmq, credentialsSecret: {name: mine}, managed: {}}");
        assert_eq!(credentials_secret(&own).as_deref(), Some("mine"));
        assert_eq!(
            credentials_secret(&broker("{kind: rabbitmq, url: 'amqp://mq:5672'}")),
            None
        );
    }
}
