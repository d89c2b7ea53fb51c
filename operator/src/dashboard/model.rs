//! The system as the manifests declare it, the same objects `weir graph` draws: Microservices
//! and their calls (each dependency with its policies), Queues with their publishers and
//! consumers, Sagas with their steps, and `weir lint`'s findings on the objects they concern.
//! The live figures are laid over it by [`super::collect`].

use crate::graph::policy_label;
use crate::lint::{self, LintConfig, Severity};
use crate::manifest::{Loaded, Object};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub replicas: i32,
    pub edge: bool,
    pub publishes: Vec<String>,
    pub consumes: Vec<String>,
    /// Call-graph depth: 0 for a service nobody calls, else one more than its deepest caller.
    pub layer: usize,
}

/// One dependency of a Microservice: the edge `from → to`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Call {
    pub from: String,
    /// The dependency's name (the sidecar's `dependency` label).
    pub dependency: String,
    /// The Microservice called, or the external URL.
    pub to: String,
    pub external: bool,
    /// `2s, retry 3, breaker 50%, …` as `weir graph` labels it.
    pub policy: String,
    pub has_breaker: bool,
    pub has_bulkhead: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Queue {
    pub name: String,
    pub event_type: String,
    pub publishers: Vec<String>,
    pub consumers: Vec<String>,
    /// Sagas started by its events.
    pub triggers: Vec<String>,
    #[serde(skip)]
    pub spec: Option<weir_crds::queue::QueueSpec>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    /// The Microservice (or URL) its action calls; empty for a broker request.
    pub target: String,
    pub compensated: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Saga {
    pub name: String,
    pub steps: Vec<Step>,
    pub trigger_queue: Option<String>,
    pub outcome_queues: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub rule: String,
    pub name: String,
    /// `error` or `warning`.
    pub severity: String,
    /// `Microservice/orders`, `Queue/orders`, …
    pub objects: Vec<String>,
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct System {
    pub namespace: String,
    pub services: Vec<Service>,
    pub calls: Vec<Call>,
    pub queues: Vec<Queue>,
    pub sagas: Vec<Saga>,
    pub findings: Vec<Finding>,
}

impl System {
    /// The findings that name `kind/name`.
    pub fn findings_on(&self, kind: &str, name: &str) -> Vec<&Finding> {
        let key = format!("{kind}/{name}");
        self.findings
            .iter()
            .filter(|f| f.objects.contains(&key))
            .collect()
    }
}

/// Builds the model from the manifests `weir up` runs.
pub fn build(loaded: &[Loaded], namespace: &str) -> System {
    let mut sys = System {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    for l in loaded {
        match &l.object {
            Object::Microservice(m) => {
                let name = m.metadata.name.clone().unwrap_or_default();
                sys.services.push(Service {
                    name: name.clone(),
                    replicas: m.spec.replicas,
                    edge: m.spec.edge.is_some(),
                    publishes: m.spec.publishes.iter().map(|p| p.queue.clone()).collect(),
                    consumes: m.spec.consumes.iter().map(|c| c.queue.clone()).collect(),
                    layer: 0,
                });
                for d in &m.spec.dependencies {
                    let (to, external) = match (&d.microservice, &d.url) {
                        (Some(t), _) => (t.clone(), false),
                        (_, Some(u)) => (u.clone(), true),
                        _ => continue,
                    };
                    sys.calls.push(Call {
                        from: name.clone(),
                        dependency: d.name.clone(),
                        to,
                        external,
                        policy: policy_label(d),
                        has_breaker: d.circuit_breaker.is_some(),
                        has_bulkhead: d.bulkhead.is_some(),
                    });
                }
            }
            Object::Queue(q) => sys.queues.push(Queue {
                name: q.metadata.name.clone().unwrap_or_default(),
                event_type: q.spec.event_type.clone().unwrap_or_default(),
                publishers: Vec::new(),
                consumers: Vec::new(),
                triggers: Vec::new(),
                spec: Some(q.spec.clone()),
            }),
            Object::Saga(s) => {
                let target = |a: &weir_crds::saga::SagaAction| {
                    a.http
                        .as_ref()
                        .and_then(|h| h.microservice.clone().or_else(|| h.url.clone()))
                        .unwrap_or_default()
                };
                sys.sagas.push(Saga {
                    name: s.metadata.name.clone().unwrap_or_default(),
                    steps: s
                        .spec
                        .steps
                        .iter()
                        .map(|st| Step {
                            name: st.name.clone(),
                            target: target(&st.action),
                            compensated: st.compensation.is_some(),
                        })
                        .collect(),
                    trigger_queue: s.spec.trigger.queue.clone(),
                    outcome_queues: [&s.spec.on_completed, &s.spec.on_failed]
                        .into_iter()
                        .flatten()
                        .map(|o| o.queue.clone())
                        .fold(Vec::new(), |mut v, q| {
                            if !v.contains(&q) {
                                v.push(q);
                            }
                            v
                        }),
                });
            }
            Object::Broker(_) => {}
        }
    }
    for q in &mut sys.queues {
        for s in &sys.services {
            if s.publishes.contains(&q.name) {
                q.publishers.push(s.name.clone());
            }
            if s.consumes.contains(&q.name) {
                q.consumers.push(s.name.clone());
            }
        }
        for g in &sys.sagas {
            if g.trigger_queue.as_deref() == Some(q.name.as_str()) {
                q.triggers.push(g.name.clone());
            }
            if g.outcome_queues.contains(&q.name) {
                q.publishers.push(format!("saga {}", g.name));
            }
        }
    }
    // Layers: longest call path from a service nobody calls (bounded, should the calls loop).
    let n = sys.services.len();
    for _ in 0..n {
        let mut changed = false;
        for c in sys.calls.iter().filter(|c| !c.external) {
            let from = sys
                .services
                .iter()
                .find(|s| s.name == c.from)
                .map(|s| s.layer);
            if let (Some(from), Some(to)) = (from, sys.services.iter_mut().find(|s| s.name == c.to))
                && to.layer < from + 1
                && from < n
            {
                to.layer = from + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    sys.findings = lint::lint(loaded, &LintConfig::default())
        .into_iter()
        .map(|f| Finding {
            rule: f.rule.to_string(),
            name: f.name.to_string(),
            severity: match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            }
            .to_string(),
            objects: f.objects,
            message: f.message,
            hint: f.hint.to_string(),
        })
        .collect();
    sys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn shop() -> Vec<Loaded> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
        let files = crate::manifest::expand_paths(&[dir]).expect("the shop's files");
        crate::manifest::load(&files, &crate::manifest::Schemas::new())
            .expect("the shop's manifests")
            .0
    }

    #[test]
    fn the_shop_model_has_its_calls_queues_and_saga() {
        let sys = build(&shop(), "default");
        let names: Vec<&str> = sys.services.iter().map(|s| s.name.as_str()).collect();
        for s in [
            "gateway",
            "orders",
            "catalog",
            "payments",
            "users",
            "notifications",
        ] {
            assert!(names.contains(&s), "{names:?}");
        }
        let call = sys
            .calls
            .iter()
            .find(|c| c.from == "orders" && c.dependency == "users")
            .expect("orders → users");
        assert_eq!(call.to, "users");
        assert!(call.has_breaker && !call.external);
        assert!(call.policy.contains("breaker 50%"), "{}", call.policy);
        let layer = |n: &str| sys.services.iter().find(|s| s.name == n).unwrap().layer;
        assert_eq!(layer("gateway"), 0);
        assert_eq!(layer("orders"), 1);
        assert_eq!(layer("users"), 2);
        assert_eq!(layer("catalog"), 2, "its deepest caller is orders");
        let q = sys.queues.iter().find(|q| q.name == "orders").unwrap();
        assert_eq!(q.publishers, ["orders"]);
        assert_eq!(q.triggers, ["place-order"]);
        let outcomes = sys
            .queues
            .iter()
            .find(|q| q.name == "order-outcomes")
            .unwrap();
        assert_eq!(outcomes.consumers, ["orders", "notifications"]);
        assert_eq!(outcomes.publishers, ["saga place-order"]);
        let saga = &sys.sagas[0];
        assert_eq!(saga.name, "place-order");
        let steps: Vec<(&str, &str, bool)> = saga
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.target.as_str(), s.compensated))
            .collect();
        assert_eq!(
            steps,
            [
                ("reserve", "catalog", true),
                ("charge", "payments", true),
                ("ship", "orders", false)
            ]
        );
        assert_eq!(saga.trigger_queue.as_deref(), Some("orders"));
    }

    #[test]
    fn findings_are_attached_to_the_objects_they_name() {
        let sys = System {
            findings: vec![Finding {
                rule: "W001".into(),
                name: "chain".into(),
                severity: "warning".into(),
                objects: vec!["Microservice/a".into(), "Queue/q".into()],
                message: "m".into(),
                hint: "h".into(),
            }],
            ..Default::default()
        };
        assert_eq!(sys.findings_on("Microservice", "a").len(), 1);
        assert_eq!(sys.findings_on("Queue", "q").len(), 1);
        assert!(sys.findings_on("Microservice", "b").is_empty());
    }
}
