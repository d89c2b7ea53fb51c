//! What a Saga becomes: its coordinator, rendered as a Microservice would be (Deployment with the
//! `weir-proxy` sidecar, Service, ConfigMap) whose dependencies are the steps' HTTP targets, so
//! that every step call goes through the sidecar (timeout, circuit breaker, metrics, traces).
//!
//! - Coordinator `<saga>-saga`: container `app` runs `weir saga-coordinator --saga <ns>/<saga>
//!   --config /etc/weir-saga/saga.json`; the ConfigMap `<saga>-saga-weir-proxy` holds both the
//!   sidecar's `proxy.json` and the coordinator's `saga.json`.
//! - One dependency per distinct target (a Microservice, or a URL's scheme and authority); its
//!   timeout is the longest of the steps calling it, and it has the default circuit breaker. The
//!   step's retry policy is applied by the coordinator, not by the sidecar: the sidecar's timeout
//!   spans all its retries (a hung attempt would never be retried), and retrying in both places
//!   would multiply attempts.
//! - The coordinator's image is [`RenderOptions::coordinator_image`]: the operator's own image
//!   (the chart passes it), since the coordinator is a command of the `weir` binary.

use super::{ANNOTATION_CONFIG_HASH, APP_CONTAINER, RenderError, RenderOptions, Rendered};
use crate::render::messaging::{CREDENTIALS_MOUNT_PATH, CREDENTIALS_VOLUME, broker_url};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use weir_crds::coordinator::{
    CONFIG_KEY, CONFIG_MOUNT_PATH, COORDINATOR_PORT, CallConfig, CoordinatorConfig, HttpCallConfig,
    OutcomeConfig, QueueTriggerConfig, RequestConfig, RetryConfig, StepConfig, TriggerConfig,
};
use weir_crds::microservice::MicroserviceSpec;
use weir_crds::policy::RetryPolicy;
use weir_crds::queue::QueueSpec;
use weir_crds::saga::{OutcomeEvent, SagaAction};
use weir_crds::{Broker, Microservice, Saga, duration};

/// Label on everything rendered for a Saga.
pub const LABEL_SAGA: &str = "weir.dev/saga";
/// Lease TTL of instances in a cluster: a killed replica's instances resume after this.
pub const LEASE_TTL_MS: u64 = 10_000;
const SAGA_CONFIG_VOLUME: &str = "weir-saga-config";

/// Name of the coordinator's Deployment and Service.
pub fn coordinator_name(saga: &str) -> String {
    format!("{saga}-saga")
}

/// The coordinator of one Saga.
#[derive(Debug, Clone)]
pub struct RenderedSaga {
    pub config: CoordinatorConfig,
    /// The coordinator as a Microservice: its ConfigMap also holds `saga.json`.
    pub rendered: Rendered,
    /// What each target of [`CoordinatorConfig::targets`] stands for.
    pub targets: BTreeMap<String, Target>,
}

/// Where an HTTP target really is.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A Microservice of the Saga's namespace.
    Microservice(String),
    /// `scheme://authority` of an external URL.
    Url(String),
}

impl RenderedSaga {
    /// The config for a coordinator without a sidecar (`weir up`, tests): each Microservice
    /// target at `microservice_url(name)` (its sidecar's inbound listener, say), each URL target
    /// called directly.
    pub fn direct_config(
        &self,
        microservice_url: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CoordinatorConfig, RenderError> {
        let mut cfg = self.config.clone();
        for (name, t) in &self.targets {
            let url = match t {
                Target::Microservice(m) => microservice_url(m).ok_or_else(|| {
                    field(
                        "spec.steps",
                        format!("Microservice {m:?} has no local address"),
                    )
                })?,
                Target::Url(u) => u.clone(),
            };
            cfg.targets.insert(name.clone(), url);
        }
        // The targets are direct already.
        cfg.direct_targets.clear();
        Ok(cfg)
    }
}

fn field(field: impl Into<String>, message: impl Into<String>) -> RenderError {
    RenderError::Field {
        field: field.into(),
        message: message.into(),
    }
}

fn ms_of(at: &str, value: &str) -> Result<u64, RenderError> {
    duration::parse(value)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| field(at, e.to_string()))
}

fn retry(at: &str, r: Option<&RetryPolicy>) -> Result<RetryConfig, RenderError> {
    Ok(match r {
        None => RetryConfig::ONCE,
        Some(r) => RetryConfig {
            attempts: r.attempts.max(1),
            backoff_base_ms: ms_of(&format!("{at}.backoff.base"), &r.backoff.base)?,
            backoff_max_ms: ms_of(&format!("{at}.backoff.max"), &r.backoff.max)?,
        },
    })
}

/// A dependency name for a URL target: its host, as a DNS label.
fn url_target_name(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    let mut s: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').chars().take(36).collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s = format!("u-{s}");
    }
    s.trim_end_matches('-').to_string()
}

/// `scheme://authority` of a URL and the rest (path and query).
fn split_url(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    match rest.find('/') {
        Some(i) => (
            format!("{scheme}://{}", &rest[..i]),
            rest[i..].trim_end_matches('/').to_string(),
        ),
        None => (format!("{scheme}://{rest}"), String::new()),
    }
}

/// Renders the coordinator of `saga`. `queues` and `brokers` map names (in the Saga's namespace)
/// to what the trigger, the outcome events and the log need.
pub fn render(
    saga: &Saga,
    queues: &BTreeMap<String, QueueSpec>,
    brokers: &BTreeMap<String, Broker>,
    opts: &RenderOptions,
) -> Result<RenderedSaga, RenderError> {
    let name = saga
        .metadata
        .name
        .clone()
        .ok_or(RenderError::Metadata("name"))?;
    let namespace = saga
        .namespace()
        .unwrap_or_else(|| opts.default_namespace.clone());
    let spec = &saga.spec;
    let broker = brokers.get(&spec.broker).ok_or_else(|| {
        field(
            "spec.broker",
            format!(
                "Broker {:?} not found in namespace {namespace}",
                spec.broker
            ),
        )
    })?;
    let queue = |at: &str, q: &str| -> Result<&QueueSpec, RenderError> {
        let qs = queues.get(q).ok_or_else(|| {
            field(
                at,
                format!("Queue {q:?} not found in namespace {namespace}"),
            )
        })?;
        if qs.broker != spec.broker {
            return Err(field(
                at,
                format!(
                    "Queue {q:?} is on Broker {:?}, the saga's log on {:?}; a coordinator talks to one Broker",
                    qs.broker, spec.broker
                ),
            ));
        }
        Ok(qs)
    };
    let outcome = |at: &str,
                   o: &Option<OutcomeEvent>|
     -> Result<Option<OutcomeConfig>, RenderError> {
        o.as_ref()
            .map(|o| {
                let qs = queue(&format!("{at}.queue"), &o.queue)?;
                Ok(OutcomeConfig {
                    queue: o.queue.clone(),
                    subject: weir_broker::topology::subjects(&namespace, &o.queue, qs)[0].clone(),
                    event_type: o.event_type.clone(),
                })
            })
            .transpose()
    };
    let trigger = TriggerConfig {
        http: spec.trigger.http,
        queue: spec
            .trigger
            .queue
            .as_ref()
            .map(|q| {
                let qs = queue("spec.trigger.queue", q)?;
                Ok(QueueTriggerConfig {
                    queue: q.clone(),
                    stream: weir_broker::queue::stream_name(&namespace, q),
                    subjects: weir_broker::topology::subjects(&namespace, q, qs),
                    consumer: format!("saga-{name}"),
                })
            })
            .transpose()?,
    };

    // Distinct HTTP targets, in order of first use: key → (dependency name, microservice or
    // URL base, longest timeout).
    let mut targets: Vec<(String, String, serde_json::Value, u64)> = Vec::new();
    let mut steps = Vec::new();
    for (i, s) in spec.steps.iter().enumerate() {
        let at = format!("spec.steps[{i}]");
        let timeout_ms = ms_of(&format!("{at}.timeout"), &s.timeout)?;
        let mut call = |which: &str, a: &SagaAction| -> Result<CallConfig, RenderError> {
            let at = format!("{at}.{which}");
            match (&a.http, &a.request) {
                (Some(h), None) => {
                    let (key, dep_name, target, path) = match (&h.microservice, &h.url) {
                        (Some(m), None) => (
                            format!("ms:{m}"),
                            m.clone(),
                            json!({"microservice": m}),
                            h.path.clone(),
                        ),
                        (None, Some(u)) => {
                            let (base, prefix) = split_url(u);
                            (
                                format!("url:{base}"),
                                url_target_name(&base),
                                json!({"url": base}),
                                format!("{prefix}{}", h.path),
                            )
                        }
                        _ => {
                            return Err(field(
                                format!("{at}.http"),
                                "set exactly one of microservice or url",
                            ));
                        }
                    };
                    let dep = match targets.iter_mut().find(|t| t.0 == key) {
                        Some(t) => {
                            t.3 = t.3.max(timeout_ms);
                            t.1.clone()
                        }
                        None => {
                            let mut n = dep_name.clone();
                            let mut k = 2;
                            while targets.iter().any(|t| t.1 == n) {
                                n = format!("{dep_name}-{k}");
                                k += 1;
                            }
                            targets.push((key, n.clone(), target, timeout_ms));
                            n
                        }
                    };
                    Ok(CallConfig::Http(HttpCallConfig {
                        target: dep,
                        method: h.method.clone(),
                        path,
                        body: h.body.clone(),
                    }))
                }
                (None, Some(r)) => Ok(CallConfig::Request(RequestConfig {
                    subject: r.subject.clone(),
                    body: r.body.clone(),
                })),
                _ => Err(field(at, "set exactly one of http or request")),
            }
        };
        let action = call("action", &s.action)?;
        let compensation = s
            .compensation
            .as_ref()
            .map(|c| call("compensation", c))
            .transpose()?;
        steps.push(StepConfig {
            name: s.name.clone(),
            action,
            compensation,
            timeout_ms,
            retry: retry(&format!("{at}.retry"), s.retry.as_ref())?,
        });
    }

    // The coordinator as a Microservice whose dependencies are the targets.
    let coord = coordinator_name(&name);
    let config_path = format!("{CONFIG_MOUNT_PATH}/{CONFIG_KEY}");
    let dependencies: Vec<serde_json::Value> = targets
        .iter()
        .map(|(_, dep, target, timeout_ms)| {
            let mut d = json!({
                "name": dep,
                "timeout": duration::format(std::time::Duration::from_millis(*timeout_ms)),
                "circuitBreaker": {},
            });
            d.as_object_mut()
                .expect("object")
                .extend(target.as_object().expect("object").clone());
            d
        })
        .collect();
    let ms_spec: MicroserviceSpec = serde_json::from_value(json!({
        "image": opts.coordinator_image,
        "imagePullPolicy": opts.coordinator_image_pull_policy,
        "args": ["saga-coordinator", "--saga", format!("{namespace}/{name}"), "--config", config_path],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "RUST_LOG", "value": "info"},
        ],
        "port": COORDINATOR_PORT,
        "replicas": spec.replicas,
        "probes": {"liveness": {"path": "/healthz"}, "readiness": {"path": "/readyz"}},
        "dependencies": dependencies,
        // `POST ...?wait=` may hold a request up to five minutes. Under the mesh, its trigger
        // is called by whoever starts the saga (no graph names them): it admits any caller,
        // as an edge does.
        "inbound": {"timeout": "330s", "mtls": "permissive", "authorization": "open"},
        "terminationGracePeriodSeconds": 30,
    }))
    .map_err(|e| field("spec", format!("coordinator spec: {e}")))?;
    let ms = Microservice {
        metadata: kube::api::ObjectMeta {
            name: Some(coord.clone()),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        spec: ms_spec,
        status: None,
    };
    let mut rendered = super::render(&ms, opts).map_err(|e| match e {
        RenderError::Field { field: f, message } => {
            field(format!("coordinator {coord}: {f}"), message)
        }
        other => other,
    })?;
    // No sidecar calls a coordinator as a dependency: its pods need no headless Service.
    rendered.endpoints_service = None;
    // Under the mesh, the coordinator's sidecar is the Saga (`<ns>/saga/<name>`, what its
    // targets admit), and its account is labelled and owned as the identity endpoint expects.
    if let (Some(mesh), Some(m)) = (&opts.mesh, rendered.config.mtls.as_mut()) {
        m.identity = weir_identity::WorkloadId::saga(&mesh.trust_domain, &namespace, &name).uri();
        let json = serde_json::to_string_pretty(&rendered.config).expect("config serializes");
        rendered.config_hash = super::hash(&json);
        rendered
            .config_map
            .data
            .get_or_insert_with(Default::default)
            .insert(weir_crds::proxy::CONFIG_KEY.into(), json);
    }

    let credentials_secret = super::broker::credentials_secret(broker);
    let config = CoordinatorConfig {
        namespace: namespace.clone(),
        name: name.clone(),
        broker_url: broker_url(broker, &namespace, &opts.cluster_domain),
        credentials_file: credentials_secret
            .as_ref()
            .map(|_| CREDENTIALS_MOUNT_PATH.to_string()),
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], COORDINATOR_PORT)),
        lease_ttl_ms: LEASE_TTL_MS,
        targets: rendered
            .config
            .outbound
            .iter()
            .map(|o| (o.name.clone(), format!("http://{}", o.listen)))
            .collect(),
        steps,
        compensation_retry: retry("spec.compensationRetry", Some(&spec.compensation_retry))?,
        trigger,
        on_completed: outcome("spec.onCompleted", &spec.on_completed)?,
        on_failed: outcome("spec.onFailed", &spec.on_failed)?,
        publish_url: None,
        // Where each target is without the sidecar: what an instance started on an older
        // definition calls when its target has left the config.
        direct_targets: rendered
            .config
            .outbound
            .iter()
            .map(|o| (o.name.clone(), o.upstream.clone()))
            .collect(),
        retention_ms: spec
            .retention
            .as_deref()
            .map(|r| {
                duration::parse_long(r)
                    .map(|d| d.as_millis() as u64)
                    .map_err(|e| field("spec.retention", e.to_string()))
            })
            .transpose()?,
    };
    config
        .validate()
        .map_err(|e| field(format!("coordinator config {}", e.field), e.message))?;
    let saga_json = serde_json::to_string_pretty(&config).expect("config serializes");
    // One hash over both files: a change to either rolls the pods.
    let hash = super::hash(&format!("{}\n{saga_json}", rendered.config_hash));
    rendered.config_hash = hash.clone();

    let owner = saga.controller_owner_ref(&()).map(|o| vec![o]);
    for meta in [
        &mut rendered.config_map.metadata,
        &mut rendered.service.metadata,
        &mut rendered.deployment.metadata,
    ] {
        meta.owner_references = owner.clone();
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(LABEL_SAGA.into(), name.clone());
    }
    if let Some(sa) = rendered.service_account.as_mut() {
        let meta = &mut sa.metadata;
        meta.owner_references = owner.clone();
        let labels = meta.labels.get_or_insert_with(Default::default);
        // The account names the Saga alone: no Microservice of the coordinator's name.
        labels.remove(super::LABEL_MICROSERVICE);
        labels.insert(LABEL_SAGA.into(), name.clone());
    }
    rendered
        .config_map
        .data
        .get_or_insert_with(Default::default)
        .insert(CONFIG_KEY.into(), saga_json);
    let dspec = rendered.deployment.spec.as_mut().expect("deployment spec");
    if let Some(m) = dspec.template.metadata.as_mut() {
        m.annotations
            .get_or_insert_with(Default::default)
            .insert(ANNOTATION_CONFIG_HASH.into(), hash);
        m.labels
            .get_or_insert_with(Default::default)
            .insert(LABEL_SAGA.into(), name.clone());
    }
    let pod = dspec.template.spec.as_mut().expect("pod spec");
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: SAGA_CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: super::config_map_name(&coord),
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Some(secret) = &credentials_secret {
        volumes.push(Volume {
            name: CREDENTIALS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for c in pod
        .containers
        .iter_mut()
        .filter(|c| c.name == APP_CONTAINER)
    {
        // Our own binary: locked down like the sidecar.
        c.security_context = Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        mounts.push(VolumeMount {
            name: SAGA_CONFIG_VOLUME.into(),
            mount_path: CONFIG_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
        if credentials_secret.is_some() {
            mounts.push(VolumeMount {
                name: CREDENTIALS_VOLUME.into(),
                mount_path: CREDENTIALS_MOUNT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
    let targets = targets
        .into_iter()
        .map(|(_, dep, target, _)| {
            let t = match (target["microservice"].as_str(), target["url"].as_str()) {
                (Some(m), _) => Target::Microservice(m.to_string()),
                (None, u) => Target::Url(u.unwrap_or_default().to_string()),
            };
            (dep, t)
        })
        .collect();
    Ok(RenderedSaga {
        config,
        rendered,
        targets,
    })
}

/// The Queues and Brokers of `loaded` in `saga`'s namespace, for `weir render`.
pub fn inputs_from(
    loaded: &[crate::manifest::Loaded],
    saga: &Saga,
) -> (BTreeMap<String, QueueSpec>, BTreeMap<String, Broker>) {
    use crate::manifest::Object;
    let mut queues = BTreeMap::new();
    let mut brokers = BTreeMap::new();
    for l in loaded {
        match &l.object {
            Object::Queue(q) if q.metadata.namespace == saga.metadata.namespace => {
                queues.insert(q.name_any(), q.spec.clone());
            }
            Object::Broker(b) if b.metadata.namespace == saga.metadata.namespace => {
                brokers.insert(b.name_any(), b.clone());
            }
            _ => {}
        }
    }
    (queues, brokers)
}

/// The YAML documents `weir render` prints for a Saga (same order as a Microservice's).
pub fn render_documents(
    loaded: &[crate::manifest::Loaded],
    l: &crate::manifest::Loaded,
    saga: &Saga,
    opts: &RenderOptions,
) -> Result<Vec<String>, String> {
    let name = saga.name_any();
    let (queues, brokers) = inputs_from(loaded, saga);
    let r = render(saga, &queues, &brokers, opts)
        .map_err(|e| format!("{}: Saga/{name}: {e}", l.file.display()))?;
    let head = format!("# Source: {} (Saga/{name})\n", l.file.display());
    Ok([
        r.rendered.service_account.as_ref().map(super::to_yaml),
        Some(super::to_yaml(&r.rendered.config_map)),
        Some(super::to_yaml(&r.rendered.service)),
        Some(super::to_yaml(&r.rendered.deployment)),
    ]
    .into_iter()
    .flatten()
    .map(|doc| format!("{head}{doc}"))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saga(yaml: &str) -> Saga {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn inputs() -> (BTreeMap<String, QueueSpec>, BTreeMap<String, Broker>) {
        let q = |y: &str| serde_yaml::from_str::<QueueSpec>(y).unwrap();
        (
            BTreeMap::from([
                ("orders".to_string(), q("broker: nats")),
                ("order-events".to_string(), q("broker: nats\nsubjects: [orders.outcome]")),
                ("elsewhere".to_string(), q("broker: other")),
            ]),
            BTreeMap::from([(
                "nats".to_string(),
                serde_yaml::from_str(
                    "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {name: nats}\nspec: {url: 'nats://nats.infra:4222', credentialsSecret: {name: nats-creds}}",
                )
                .unwrap(),
            )]),
        )
    }

    const SAGA: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: Saga
metadata: {name: place-order, namespace: shop, uid: u-1}
spec:
  broker: nats
  replicas: 2
  trigger: {queue: orders}
  onCompleted: {queue: order-events, type: OrderConfirmed}
  onFailed: {queue: order-events, type: OrderFailed}
  steps:
    - name: reserve
      timeout: 2s
      retry: {attempts: 3, backoff: {base: 50ms, max: 1s}}
      action: {http: {microservice: inventory, path: /reservations, body: {sku: "{{input.sku}}"}}}
      compensation: {http: {microservice: inventory, method: DELETE, path: /reservations}}
    - name: charge
      timeout: 5s
      action: {http: {url: "https://pay.example.com/v2", path: /charges}}
    - name: ship
      action: {http: {microservice: inventory, path: /ship}}
    - name: notify
      action: {request: {subject: notify.order}}
"#;

    #[test]
    fn the_coordinator_calls_each_target_through_one_sidecar_dependency() {
        let (q, b) = inputs();
        let r = render(&saga(SAGA), &q, &b, &RenderOptions::default()).unwrap();
        let deps: Vec<(&str, &str, u64)> = r
            .rendered
            .config
            .outbound
            .iter()
            .map(|o| (o.name.as_str(), o.upstream.as_str(), o.timeout_ms))
            .collect();
        assert_eq!(
            deps,
            [
                (
                    "inventory",
                    "http://inventory.shop.svc.cluster.local:80",
                    3000
                ),
                ("pay-example-com", "https://pay.example.com", 5000),
            ],
            "one dependency per target, with the longest step timeout"
        );
        assert!(
            r.rendered
                .config
                .outbound
                .iter()
                .all(|o| o.circuit_breaker.is_some() && o.retry.is_none())
        );
        let c = &r.config;
        assert_eq!(c.targets["inventory"], "http://127.0.0.1:15100");
        assert_eq!(c.targets["pay-example-com"], "http://127.0.0.1:15101");
        let CallConfig::Http(h) = &c.steps[1].action else {
            panic!()
        };
        assert_eq!(h.path, "/v2/charges");
        assert_eq!(c.steps[0].retry.attempts, 3);
        assert_eq!(c.steps[2].retry, RetryConfig::ONCE);
        assert_eq!(c.compensation_retry.attempts, 5);
        assert_eq!(c.broker_url, "nats://nats.infra:4222");
        assert_eq!(c.credentials_file.as_deref(), Some("/etc/weir/broker"));
        let t = c.trigger.queue.as_ref().unwrap();
        assert_eq!(
            (t.stream.as_str(), t.consumer.as_str()),
            ("weir_shop_orders", "saga-place-order")
        );
        assert_eq!(t.subjects, ["weir.shop.orders"]);
        assert_eq!(c.on_failed.as_ref().unwrap().subject, "orders.outcome");
        assert_eq!(c.on_failed.as_ref().unwrap().event_type, "OrderFailed");
        let direct = r
            .direct_config(&|m| Some(format!("http://127.0.0.1:9/{m}")))
            .unwrap();
        assert_eq!(direct.targets["inventory"], "http://127.0.0.1:9/inventory");
        assert_eq!(direct.targets["pay-example-com"], "https://pay.example.com");
    }

    #[test]
    fn the_deployment_runs_the_coordinator_beside_its_sidecar() {
        let (q, b) = inputs();
        let opts = RenderOptions {
            proxy_image: "registry.local/weir-proxy:dev".into(),
            coordinator_image: "registry.local/weir:dev".into(),
            ..Default::default()
        };
        let r = render(&saga(SAGA), &q, &b, &opts).unwrap();
        let d = &r.rendered.deployment;
        assert_eq!(d.metadata.name.as_deref(), Some("place-order-saga"));
        assert_eq!(
            d.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Saga"
        );
        assert_eq!(
            d.metadata.labels.as_ref().unwrap()[LABEL_SAGA],
            "place-order"
        );
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        let app = &pod.containers[0];
        assert_eq!(app.image.as_deref(), Some("registry.local/weir:dev"));
        assert_eq!(
            app.args.as_ref().unwrap()[..3],
            [
                "saga-coordinator".to_string(),
                "--saga".into(),
                "shop/place-order".into()
            ]
        );
        let mounts: Vec<&str> = app
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/etc/weir-saga", "/etc/weir/broker"]);
        let data = r.rendered.config_map.data.as_ref().unwrap();
        let parsed = CoordinatorConfig::from_json(&data["saga.json"]).unwrap();
        assert_eq!(parsed, r.config);
        assert!(data.contains_key("proxy.json"));
    }

    #[test]
    fn missing_or_foreign_queues_and_brokers_name_the_field() {
        let (q, b) = inputs();
        let s = saga(&SAGA.replace("trigger: {queue: orders}", "trigger: {queue: nope}"));
        let e = render(&s, &q, &b, &RenderOptions::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.trigger.queue: Queue \"nope\" not found"),
            "{e}"
        );
        let s = saga(&SAGA.replace(
            "onCompleted: {queue: order-events",
            "onCompleted: {queue: elsewhere",
        ));
        let e = render(&s, &q, &b, &RenderOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("spec.onCompleted.queue:"), "{e}");
        let e = render(&saga(SAGA), &q, &BTreeMap::new(), &RenderOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("spec.broker:"), "{e}");
    }

    #[test]
    fn under_the_mesh_the_coordinator_is_the_saga_calling_its_targets_over_mutual_tls() {
        let (q, b) = inputs();
        let opts = RenderOptions {
            mesh: Some(crate::render::MeshOptions {
                trust_domain: "cluster.local".into(),
                issuer_url: "https://weir-identity.weir-system.svc:8443".into(),
                default_mode: weir_crds::microservice::MtlsMode::Strict,
            }),
            ..Default::default()
        };
        let r = render(&saga(SAGA), &q, &b, &opts).unwrap();
        let proxy = &r.rendered.config;
        let m = proxy.mtls.as_ref().expect("an mtls block");
        assert_eq!(
            m.identity,
            "spiffe://cluster.local/ns/shop/saga/place-order"
        );
        // Whoever starts it (no graph names them) reaches its trigger.
        assert_eq!(m.inbound, weir_crds::proxy::InboundMtlsMode::Permissive);
        assert_eq!(
            m.authorization.mode,
            weir_crds::proxy::AuthorizationMode::Open
        );
        let peers: Vec<(&str, Option<&str>)> = proxy
            .outbound
            .iter()
            .map(|o| (o.name.as_str(), o.peer_identity.as_deref()))
            .collect();
        assert_eq!(
            peers,
            [
                (
                    "inventory",
                    Some("spiffe://cluster.local/ns/shop/ms/inventory")
                ),
                ("pay-example-com", None),
            ]
        );
        // The ConfigMap holds the config as changed, and the pods roll on it.
        let data = r.rendered.config_map.data.as_ref().unwrap();
        let stored: weir_crds::proxy::ProxyConfig =
            serde_json::from_str(&data[weir_crds::proxy::CONFIG_KEY]).unwrap();
        assert_eq!(&stored, proxy);
        // The account: the Saga's, owned by it, which the identity endpoint maps to the Saga.
        let sa = r.rendered.service_account.as_ref().expect("an account");
        assert_eq!(sa.metadata.name.as_deref(), Some("place-order-saga-weir"));
        assert_eq!(
            sa.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Saga"
        );
        let labels = sa.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_SAGA], "place-order");
        assert!(!labels.contains_key(crate::render::LABEL_MICROSERVICE));
        assert_eq!(
            crate::operator::identity::workload_of(sa, "shop", "cluster.local").map(|w| w.uri()),
            Some("spiffe://cluster.local/ns/shop/saga/place-order".to_string())
        );
        let pod = r
            .rendered
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("place-order-saga-weir")
        );
    }

    #[test]
    fn a_url_target_is_named_by_its_host() {
        assert_eq!(
            url_target_name("https://pay.example.com"),
            "pay-example-com"
        );
        assert_eq!(url_target_name("http://10.0.0.1:8080"), "u-10-0-0-1");
    }
}
