//! `Broker`: where a message broker is, or a request for a managed one in the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a message broker is (`url`, credentials), or a broker the operator runs (`managed`).
/// Queues and Sagas name a Broker; the operator and every sidecar connect with what it says.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Broker",
    doc = "A message broker Weir's Queues and Sagas use: where it is (url, credentials Secret) or one the operator runs (managed). Status says whether the operator reaches it.",
    namespaced,
    status = "BrokerStatus",
    shortname = "wb",
    category = "weir",
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.kind"),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.serverVersion"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.url) != has(self.managed)", "message": "set exactly one of url or managed"},
    {"rule": "!has(self.vhost) || self.kind == 'rabbitmq'", "message": "vhost applies to rabbitmq only", "fieldPath": ".vhost"},
    {"rule": "!has(self.managed) || self.kind != 'kafka'", "message": "Weir does not run Kafka: run it with Strimzi (strimzi.io) and set url to its bootstrap servers", "fieldPath": ".managed"},
    {"rule": "!has(self.url) || self.kind != 'kafka' || self.url.matches('^kafka(\\\\+ssl)?://[^,/?@:]+:[0-9]{1,5}(,[^,/?@:]+:[0-9]{1,5})*/?(\\\\?sasl=(plain|scram-sha-256|scram-sha-512))?$')", "message": "a kafka url is kafka://host:port[,host:port…] or kafka+ssl://…, with ?sasl=plain|scram-sha-256|scram-sha-512 at most", "fieldPath": ".url"}
]))]
pub struct BrokerSpec {
    /// `nats` (JetStream, the default), `rabbitmq`, `redis` (Streams) or `kafka`.
    #[serde(default)]
    pub kind: BrokerKind,
    /// `nats://host:4222`, `amqp://host:5672`, `redis://host:6379`,
    /// `kafka://host:9092[,host:9092…]` (`kafka+ssl://` for TLS, `?sasl=scram-sha-512` to pick
    /// the SASL mechanism; PLAIN by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The bound keeps the kafka rule's regex within the API server's CEL cost budget.
    #[schemars(
        regex(pattern = r"^(nats|tls|amqps?|rediss?|kafka(\+ssl)?)://\S+$"),
        length(max = 2048)
    )]
    pub url: Option<String>,
    /// Secret with the credentials (`username`/`password`, `token`, or a NATS `creds` file) and,
    /// for a broker whose TLS certificate a private CA signed, that CA as `ca.crt` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretRef>,
    /// The RabbitMQ virtual host (`rabbitmq` only); the URL's path when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<String>,
    /// A broker run by the operator in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedBroker>,
}

/// The kind of broker; each keeps queues its own way (`weir-broker` says where).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// NATS with JetStream (the default).
    #[default]
    Nats,
    /// RabbitMQ.
    Rabbitmq,
    /// Redis Streams.
    Redis,
    /// Kafka (or a Kafka-protocol broker): a Queue is a topic. Never managed: Strimzi runs
    /// Kafka on Kubernetes far better than a one-replica StatefulSet would.
    Kafka,
}

/// A Secret in the Broker's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Name of the Secret, in the Broker's namespace.
    pub name: String,
}

/// A one-replica broker of `kind` the operator runs as a StatefulSet with a Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManagedBroker {
    /// Broker image; the operator's default for the kind when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Size of the persistent volume; empty for ephemeral storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// What the operator last saw of the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Connected`: whether the operator reaches the broker, and why not (`InvalidSpec`,
    /// unreachable, refused credentials, a managed broker still starting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Version the broker reported when the operator connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
}

impl BrokerKind {
    /// The name used in the sidecar's config (`messaging.brokerKind`).
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Nats => "nats",
            BrokerKind::Rabbitmq => "rabbitmq",
            BrokerKind::Redis => "redis",
            BrokerKind::Kafka => "kafka",
        }
    }

    /// The URL schemes of this kind.
    pub fn schemes(self) -> &'static [&'static str] {
        match self {
            BrokerKind::Nats => &["nats", "tls"],
            BrokerKind::Rabbitmq => &["amqp", "amqps"],
            BrokerKind::Redis => &["redis", "rediss"],
            BrokerKind::Kafka => &["kafka", "kafka+ssl"],
        }
    }
}

impl BrokerSpec {
    /// Checks what the schema cannot: the URL's scheme matches `kind` (`spec.kind` defaults to
    /// `nats`, so a RabbitMQ or Redis Broker names its kind). The error names the field.
    pub fn check(&self) -> Result<(), (String, String)> {
        if let Some(url) = &self.url {
            let scheme = url.split("://").next().unwrap_or_default();
            if !self.kind.schemes().contains(&scheme) {
                return Err((
                    "spec.url".into(),
                    format!(
                        "scheme {scheme}:// does not match spec.kind {} (expected {})",
                        self.kind.name(),
                        self.kind
                            .schemes()
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `spec.url` with `spec.vhost` (RabbitMQ) as its path, percent-encoded (`/` is `%2f`).
    pub fn effective_url(&self) -> Option<String> {
        let url = self.url.clone()?;
        let Some(vhost) = self
            .vhost
            .as_deref()
            .filter(|_| self.kind == BrokerKind::Rabbitmq)
        else {
            return Some(url);
        };
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let query = rest.find('?').map(|i| &rest[i..]).unwrap_or("");
        let mut enc = String::new();
        for b in vhost.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02x}"));
            }
        }
        Some(format!("{scheme}://{authority}/{enc}{query}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: BrokerKind, url: &str, vhost: Option<&str>) -> BrokerSpec {
        BrokerSpec {
            kind,
            url: Some(url.into()),
            credentials_secret: None,
            vhost: vhost.map(str::to_string),
            managed: None,
        }
    }

    #[test]
    fn scheme_matches_kind() {
        assert!(
            spec(BrokerKind::Nats, "nats://n:4222", None)
                .check()
                .is_ok()
        );
        assert!(
            spec(BrokerKind::Redis, "rediss://r:6379", None)
                .check()
                .is_ok()
        );
        let (field, msg) = spec(BrokerKind::Nats, "amqp://r:5672", None)
            .check()
            .unwrap_err();
        assert_eq!(field, "spec.url");
        assert!(msg.contains("spec.kind nats"), "{msg}");
    }

    #[test]
    fn vhost_is_the_path() {
        let s = spec(
            BrokerKind::Rabbitmq,
            "amqp://u:p@mq:5672/old?heartbeat=10",
            Some("shop/a"),
        );
        assert_eq!(
            s.effective_url().unwrap(),
            "amqp://u:p@mq:5672/shop%2fa?heartbeat=10"
        );
        let s = spec(BrokerKind::Rabbitmq, "amqp://mq:5672", Some("/"));
        assert_eq!(s.effective_url().unwrap(), "amqp://mq:5672/%2f");
        let s = spec(BrokerKind::Nats, "nats://n:4222", None);
        assert_eq!(s.effective_url().unwrap(), "nats://n:4222");
    }
}
