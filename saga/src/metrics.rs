//! The coordinator's Prometheus metrics (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaLabel {
    pub saga: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub saga: String,
    pub step: String,
    /// `action` or `compensation`.
    pub kind: String,
    /// `ok` or `error`.
    pub outcome: String,
}

pub struct SagaMetrics {
    pub registry: Registry,
    pub started: Family<SagaLabel, Counter>,
    pub completed: Family<SagaLabel, Counter>,
    pub compensated: Family<SagaLabel, Counter>,
    /// Instances in which a step failed (compensation began).
    pub failed: Family<SagaLabel, Counter>,
    pub compensation_failed: Family<SagaLabel, Counter>,
    /// Instances cancelled on request (compensated).
    pub cancelled: Family<SagaLabel, Counter>,
    /// Instances this replica took over from the log (after a crash or from another replica).
    pub resumed: Family<SagaLabel, Counter>,
    pub step_duration: Family<StepLabel, Histogram>,
}

impl Default for SagaMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weir_saga");
        let started = Family::<SagaLabel, Counter>::default();
        let completed = Family::<SagaLabel, Counter>::default();
        let compensated = Family::<SagaLabel, Counter>::default();
        let failed = Family::<SagaLabel, Counter>::default();
        let compensation_failed = Family::<SagaLabel, Counter>::default();
        let resumed = Family::<SagaLabel, Counter>::default();
        let cancelled = Family::<SagaLabel, Counter>::default();
        let step_duration = Family::<StepLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register("instances_started", "Instances started", started.clone());
        registry.register(
            "instances_completed",
            "Instances completed",
            completed.clone(),
        );
        registry.register(
            "instances_compensated",
            "Instances whose compensations all succeeded after a step failed",
            compensated.clone(),
        );
        registry.register(
            "instances_failed",
            "Instances in which a step failed (compensation began)",
            failed.clone(),
        );
        registry.register(
            "instances_compensation_failed",
            "Instances whose compensation still failed after its retries (dead-lettered)",
            compensation_failed.clone(),
        );
        registry.register(
            "instances_cancelled",
            "Instances cancelled on request, their steps compensated",
            cancelled.clone(),
        );
        registry.register(
            "instances_resumed",
            "Unfinished instances taken over from the log",
            resumed.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Time of one step action or compensation, retries included",
            step_duration.clone(),
        );
        Self {
            registry,
            started,
            completed,
            compensated,
            failed,
            compensation_failed,
            cancelled,
            resumed,
            step_duration,
        }
    }
}

impl SagaMetrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode to a String");
        out
    }
}
