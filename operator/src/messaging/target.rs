//! The Queue a messaging command works on (`weir dlq`, `weir queue rewind`) and the connection to
//! its Broker: `--broker-url`, whose scheme names the kind (the system's roots trusted), or the
//! Queue's Broker read from the cluster with its credentials Secret.

use clap::Args;
use weir_broker::admin::{self, BrokerAdmin};
use weir_broker::credentials::Credentials;

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The Queue's name.
    pub queue: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Broker URL (nats://, redis:// or amqp://, the kind follows the scheme); by default the
    /// Queue's Broker, read from the cluster with the current kubeconfig (with its credentials
    /// Secret).
    #[arg(long, env = "WEIR_BROKER_URL")]
    pub broker_url: Option<String>,
}

/// Connects to the Queue's broker (see the module doc); the error says what failed, naming the
/// flag, the URL or the object.
pub async fn connect_target(t: &Target) -> Result<BrokerAdmin, String> {
    let (kind, url, creds) = match &t.broker_url {
        Some(u) => (
            admin::kind_of_url(u).ok_or_else(|| {
                format!("--broker-url {u:?}: not a nats://, redis:// or amqp:// URL")
            })?,
            u.clone(),
            Credentials::default(),
        ),
        None => broker_from_cluster(&t.namespace, &t.queue)
            .await
            .map_err(|e| format!("{e:#}"))?,
    };
    admin::connect(kind, &url, &creds)
        .await
        .map_err(|e| e.to_string())
}

/// The kind, URL and credentials of the Queue's Broker, from the cluster.
async fn broker_from_cluster(
    namespace: &str,
    queue: &str,
) -> anyhow::Result<(weir_crds::broker::BrokerKind, String, Credentials)> {
    use anyhow::Context as _;
    use k8s_openapi::api::core::v1::Secret;
    use kube::Api;
    let client = kube::Client::try_default()
        .await
        .context("no cluster (pass --broker-url to reach the broker directly)")?;
    let q = Api::<weir_crds::Queue>::namespaced(client.clone(), namespace)
        .get(queue)
        .await
        .with_context(|| format!("Queue {namespace}/{queue}"))?;
    let b = Api::<weir_crds::Broker>::namespaced(client.clone(), namespace)
        .get(&q.spec.broker)
        .await
        .with_context(|| format!("Broker {namespace}/{}", q.spec.broker))?;
    let url = b
        .spec
        .effective_url()
        .with_context(|| format!("Broker {namespace}/{} has no spec.url", q.spec.broker))?;
    let creds = match &b.spec.credentials_secret {
        None => Credentials::default(),
        Some(s) => {
            let secret = Api::<Secret>::namespaced(client, namespace)
                .get(&s.name)
                .await
                .with_context(|| format!("Secret {namespace}/{}", s.name))?;
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            Credentials::from_secret_data(&data)?
        }
    };
    Ok((b.spec.kind, url, creds))
}
