//! The operator's Prometheus metrics, registered in one place.

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};
use weir_crds::Queue;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: String,
    pub error: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub leader: Gauge,
    /// The Queue controller's cache, set when it starts: the figures exported at each scrape (`weir_operator_queue_*`).
    pub queues: Arc<OnceLock<Store<Queue>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    namespace: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    namespace: String,
    queue: String,
    consumer: String,
}

/// Each Queue's figures as its status last said them (the operator reads them from the broker
/// every 30 s while the Queue is ready), read from the controller's cache at each scrape, so
/// a deleted Queue or a consumer that left has no series left behind:
/// `weir_operator_queue_consumer_lag{namespace,queue,consumer}` (messages not yet delivered to
/// the consumer plus those delivered and not acknowledged: the figure KEDA's scalers scale on,
/// for a Prometheus adapter to scale on without KEDA), `weir_operator_queue_messages` and
/// `weir_operator_queue_dead_letters`.
#[derive(Debug)]
struct QueueFigures(Arc<OnceLock<Store<Queue>>>);

impl Collector for QueueFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let queues = self.0.get().map(|s| s.state()).unwrap_or_default();
        let figures: Vec<_> = queues
            .iter()
            .filter_map(|q| {
                let labels = QueueLabels {
                    namespace: q.namespace().unwrap_or_default(),
                    queue: q.name_any(),
                };
                Some((labels, q.status.as_ref()?))
            })
            .collect();
        let mut lag = encoder.encode_descriptor(
            "queue_consumer_lag",
            "Messages a Queue's consumer (a Microservice) has not yet processed: not delivered, or delivered and not acknowledged",
            None,
            MetricType::Gauge,
        )?;
        for (q, status) in &figures {
            for (consumer, n) in &status.pending {
                let labels = ConsumerLabels {
                    namespace: q.namespace.clone(),
                    queue: q.queue.clone(),
                    consumer: consumer.clone(),
                };
                ConstGauge::new(*n).encode(lag.encode_family(&labels)?)?;
            }
        }
        let mut messages = encoder.encode_descriptor(
            "queue_messages",
            "Messages on a Queue's stream",
            None,
            MetricType::Gauge,
        )?;
        for (q, status) in &figures {
            if let Some(n) = status.messages {
                ConstGauge::new(n).encode(messages.encode_family(q)?)?;
            }
        }
        let mut dead = encoder.encode_descriptor(
            "queue_dead_letters",
            "Messages in a Queue's dead-letter queue",
            None,
            MetricType::Gauge,
        )?;
        for (q, status) in &figures {
            if let Some(n) = status.dead_letters {
                ConstGauge::new(n).encode(dead.encode_family(q)?)?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weir_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        registry.register("leader", "1 when this replica leads", leader.clone());
        let queues = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(QueueFigures(queues.clone())));
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            queues,
        }
    }
}

impl Metrics {
    /// Runs one reconcile of a `kind`, counting it and timing it.
    pub async fn reconcile<T>(&self, kind: &str, work: impl std::future::Future<Output = T>) -> T {
        let label = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&label).inc();
        let started = std::time::Instant::now();
        let out = work.await;
        self.duration
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Counts a failed reconcile of a `kind`, by error.
    pub fn failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn queue(ns: &str, name: &str, status: serde_json::Value) -> Queue {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"broker": "nats"},
            "status": status,
        }))
        .unwrap()
    }

    /// The figures come from the cache at each scrape: a consumer that left, or a Queue that
    /// was deleted, leaves no series behind.
    #[test]
    fn each_consumers_lag_is_exported_from_the_queues_status() {
        let m = Metrics::default();
        assert!(!m.encode().contains("queue_consumer_lag{"));
        let (store, mut writer) = reflector::store();
        m.queues.set(store).unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(queue(
            "shop",
            "orders",
            serde_json::json!({"messages": 40, "pending": {"packer": 12, "billing": 0}, "deadLetters": 2}),
        )));
        writer.apply_watcher_event(&watcher::Event::Apply(queue(
            "shop",
            "empty",
            serde_json::json!({}),
        )));
        let text = m.encode();
        for line in [
            r#"weir_operator_queue_consumer_lag{namespace="shop",queue="orders",consumer="packer"} 12"#,
            r#"weir_operator_queue_consumer_lag{namespace="shop",queue="orders",consumer="billing"} 0"#,
            r#"weir_operator_queue_messages{namespace="shop",queue="orders"} 40"#,
            r#"weir_operator_queue_dead_letters{namespace="shop",queue="orders"} 2"#,
            "# TYPE weir_operator_queue_consumer_lag gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        writer.apply_watcher_event(&watcher::Event::Apply(queue(
            "shop",
            "orders",
            serde_json::json!({"messages": 3, "pending": {"packer": 3}}),
        )));
        let text = m.encode();
        assert!(!text.contains(r#"consumer="billing""#), "{text}");
        writer.apply_watcher_event(&watcher::Event::Delete(queue(
            "shop",
            "orders",
            serde_json::json!({}),
        )));
        assert!(!m.encode().contains(r#"queue="orders""#));
    }
}
