//! The dashboard's source in a cluster (`weir dashboard serve`): the Weir objects listed from
//! the API server (all namespaces, or one), the same model as `weir up`'s, and the live figures
//! read without any other network path than the API server's:
//!
//! - the sidecars' metrics: each Weir pod's admin `/metrics` through the API server's pod proxy
//!   (`/api/v1/namespaces/<ns>/pods/<pod>:15090/proxy/metrics`), or, with `--prometheus URL`,
//!   one instant query over the series the page draws, grouped by the `namespace` and `pod`
//!   labels of the scrape;
//! - the queues' figures from `Queue.status` (the operator writes them every ~30 s);
//! - the sagas through the pod proxy to a coordinator pod's `:8080`;
//! - dead letters (listing, showing, replaying) only with `--actions`: they need the Broker's
//!   credentials Secret, which a read-only dashboard is not granted.
//!
//! When the objects span more than one namespace, every name on the page is `<ns>.<name>`.

use super::collect::{Coordinator, HttpClient, Sidecar, Targets, request};
use super::model::{self, System};
use super::prom::Sample;
use crate::manifest::{Loaded, Object};
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use weir_broker::admin::BrokerAdmin;
use weir_crds::proxy::ADMIN_PORT;
use weir_crds::{Broker, Microservice, Queue, Saga};

/// The coordinators' HTTP port (container `app` of `<saga>-saga`).
pub const COORDINATOR_PORT: u16 = 8080;

/// The series the page reads, in one instant query.
pub const SERIES: [&str; 4] = [
    "weir_requests_total",
    "weir_request_duration_seconds_bucket",
    "weir_circuit_breaker_state",
    "weir_rejections_total",
];

/// One pod reached through the API server's pod proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub port: u16,
    /// The object's own name (a Saga's, for the coordinator's `/v1/sagas/<name>`).
    pub object: String,
}

/// `weir dashboard serve`'s reading options.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Read the sidecars' series from this Prometheus instead of scraping them.
    pub prometheus: Option<String>,
    /// Completes a managed Broker's Service name (dead letters, with `--actions`).
    pub cluster_domain: String,
}

/// The API server, and what the dashboard reads through it.
pub struct Cluster {
    pub client: kube::Client,
    pub opts: ClusterOptions,
    http: HttpClient,
    connections: crate::operator::broker::Connections,
}

/// One listing of the cluster: the model, what to read, the queues' figures by Queue.
pub struct Listing {
    pub system: System,
    pub targets: Targets,
    pub queue_figures: HashMap<String, Value>,
}

/// `/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`.
pub fn proxy_path(p: &PodRef, path: &str) -> String {
    format!(
        "/api/v1/namespaces/{}/pods/{}:{}/proxy/{}",
        p.namespace,
        p.pod,
        p.port,
        path.trim_start_matches('/')
    )
}

/// The name the page shows for `name` of `ns`: qualified when the page spans namespaces.
pub fn display(qualify: bool, ns: &str, name: &str) -> String {
    if qualify {
        format!("{ns}.{name}")
    } else {
        name.to_string()
    }
}

/// The model of one namespace's names made the page's: `<ns>.<name>` for every object named.
pub fn qualify(mut sys: System, ns: &str) -> System {
    let q = |n: &str| format!("{ns}.{n}");
    let services: BTreeSet<String> = sys.services.iter().map(|s| s.name.clone()).collect();
    for s in &mut sys.services {
        s.name = q(&s.name);
        s.publishes = s.publishes.iter().map(|x| q(x)).collect();
        s.consumes = s.consumes.iter().map(|x| q(x)).collect();
    }
    for c in &mut sys.calls {
        c.from = q(&c.from);
        if !c.external {
            c.to = q(&c.to);
        }
    }
    for x in &mut sys.queues {
        x.name = q(&x.name);
        for p in &mut x.publishers {
            *p = match p.strip_prefix("saga ") {
                Some(saga) => format!("saga {}", q(saga)),
                None => q(p),
            };
        }
        x.consumers = x.consumers.iter().map(|c| q(c)).collect();
        x.triggers = x.triggers.iter().map(|t| q(t)).collect();
    }
    for g in &mut sys.sagas {
        g.name = q(&g.name);
        for st in &mut g.steps {
            if services.contains(&st.target) {
                st.target = q(&st.target);
            }
        }
        g.trigger_queue = g.trigger_queue.as_deref().map(q);
        g.outcome_queues = g.outcome_queues.iter().map(|o| q(o)).collect();
    }
    for f in &mut sys.findings {
        for o in &mut f.objects {
            if let Some((kind, name)) = o.split_once('/') {
                *o = format!("{kind}/{}", q(name));
            }
        }
    }
    sys
}

/// The model of the objects of several namespaces: one [`model::build`] per namespace (calls,
/// queues and lint stay within a namespace), names qualified when there is more than one.
pub fn system_of(by_ns: &BTreeMap<String, Vec<Loaded>>, namespace: Option<&str>) -> System {
    let qualified = by_ns.len() > 1;
    let mut out = System {
        namespace: match (namespace, by_ns.keys().next()) {
            (Some(ns), _) => ns.to_string(),
            (None, Some(ns)) if !qualified => ns.clone(),
            _ => String::new(),
        },
        ..Default::default()
    };
    for (ns, loaded) in by_ns {
        let mut s = model::build(loaded, ns);
        if qualified {
            s = qualify(s, ns);
        }
        out.services.extend(s.services);
        out.calls.extend(s.calls);
        out.queues.extend(s.queues);
        out.sagas.extend(s.sagas);
        out.findings.extend(s.findings);
    }
    out
}

fn ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The sidecars and coordinators among `pods`: a Microservice's pods (label
/// `weir.dev/microservice`) are scraped, a Saga's (label `weir.dev/saga`) asked about instances
/// (only the Ready ones).
pub fn targets_of(pods: &[Pod], qualified: bool) -> Targets {
    let mut t = Targets::default();
    for p in pods {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = p.labels();
        let ns = p.namespace().unwrap_or_default();
        let pod = p.name_any();
        if let Some(saga) = labels.get(crate::render::saga::LABEL_SAGA) {
            if ready(p) {
                t.coordinators.push(Coordinator {
                    saga: display(qualified, &ns, saga),
                    url: String::new(),
                    pod: Some(PodRef {
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        port: COORDINATOR_PORT,
                        object: saga.clone(),
                    }),
                });
            }
        } else if let Some(ms) = labels.get(crate::render::LABEL_MICROSERVICE) {
            t.sidecars.push(Sidecar {
                replica: format!("{ns}/{pod}"),
                microservice: display(qualified, &ns, ms),
                admin_port: ADMIN_PORT,
                pod: Some(PodRef {
                    namespace: ns,
                    pod,
                    port: ADMIN_PORT,
                    object: ms.clone(),
                }),
            });
        }
    }
    t
}

/// A Queue's figures as the page reads them, from its status.
pub fn queue_figures(q: &Queue) -> Value {
    let Some(s) = &q.status else {
        return json!({"error": "no status yet (the operator writes it every ~30 s)"});
    };
    json!({
        "messages": s.messages,
        "lag": s.pending,
        "deadLetters": s.dead_letters,
    })
}

/// The PromQL of the series the page reads, in `namespace` when given.
pub fn series_query(namespace: Option<&str>) -> String {
    let ns = namespace
        .map(|n| format!(r#",namespace="{n}""#))
        .unwrap_or_default();
    format!(r#"{{__name__=~"{}"{ns}}}"#, SERIES.join("|"))
}

/// An instant query's vector grouped by pod (`<ns>/<pod>` from the labels `namespace` and
/// `pod`, or `kubernetes_namespace` and `kubernetes_pod_name`): each pod's samples and the
/// newest sample time (Unix seconds).
pub fn samples_by_pod(answer: &Value) -> Result<HashMap<String, (Vec<Sample>, f64)>, String> {
    if answer["status"] != "success" {
        return Err(format!(
            "Prometheus: {}",
            answer["error"].as_str().unwrap_or("query failed")
        ));
    }
    if answer["data"]["resultType"] != "vector" {
        return Err("Prometheus: not a vector".into());
    }
    let mut out: HashMap<String, (Vec<Sample>, f64)> = HashMap::new();
    for r in answer["data"]["result"].as_array().into_iter().flatten() {
        let Some(metric) = r["metric"].as_object() else {
            continue;
        };
        let label = |a: &str, b: &str| {
            metric
                .get(a)
                .or_else(|| metric.get(b))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let (Some(ns), Some(pod), Some(name)) = (
            label("namespace", "kubernetes_namespace"),
            label("pod", "kubernetes_pod_name"),
            label("__name__", "__name__"),
        ) else {
            continue;
        };
        let at = r["value"][0].as_f64().unwrap_or_default();
        let Some(value) = r["value"][1].as_str().and_then(|v| match v {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            v => v.parse().ok(),
        }) else {
            continue;
        };
        let labels = metric
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let e = out.entry(format!("{ns}/{pod}")).or_default();
        e.0.push(Sample {
            name,
            labels,
            value,
        });
        e.1 = e.1.max(at);
    }
    Ok(out)
}

/// One instant query: the answer's JSON.
pub async fn instant_query(http: &HttpClient, base: &str, query: &str) -> Result<Value, String> {
    let url = format!(
        "{}/api/v1/query?query={}",
        base.trim_end_matches('/'),
        urlencode(query)
    );
    let (status, body) = request(http, http::Method::GET, &url, None, Duration::from_secs(5))
        .await
        .map_err(|e| format!("Prometheus: {e}"))?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("Prometheus answered {status}, not JSON: {e}"))?;
    Ok(v)
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What one sidecar read gives: its samples and, from Prometheus, when they were scraped.
pub type Read = Option<(Vec<Sample>, Option<f64>)>;

impl Cluster {
    pub fn new(client: kube::Client, opts: ClusterOptions) -> Self {
        Cluster {
            client,
            opts,
            http: super::collect::client(),
            connections: Default::default(),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match &self.opts.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Lists the Weir objects and their pods: the model, what to read, the queues' figures.
    pub async fn list(&self) -> Result<Listing, kube::Error> {
        let lp = ListParams::default();
        let (a, b, c, d) = (
            self.api::<Microservice>(),
            self.api::<Queue>(),
            self.api::<Saga>(),
            self.api::<Broker>(),
        );
        let (ms, qs, sagas, brokers) =
            futures::try_join!(a.list(&lp), b.list(&lp), c.list(&lp), d.list(&lp))?;
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=weir"))
            .await?;
        let mut by_ns: BTreeMap<String, Vec<Loaded>> = BTreeMap::new();
        let mut add = |ns: Option<String>, object: Object| {
            let ns = ns.unwrap_or_else(|| "default".into());
            by_ns.entry(ns.clone()).or_default().push(Loaded {
                file: PathBuf::from(format!("namespace {ns}")),
                object,
            });
        };
        for m in ms.items {
            add(m.namespace(), Object::Microservice(m));
        }
        for q in qs.items.iter().cloned() {
            add(q.namespace(), Object::Queue(q));
        }
        for s in sagas.items {
            add(s.namespace(), Object::Saga(s));
        }
        for b in brokers.items {
            add(b.namespace(), Object::Broker(b));
        }
        let qualified = by_ns.len() > 1;
        let system = system_of(&by_ns, self.opts.namespace.as_deref());
        let mut targets = targets_of(&pods.items, qualified);
        let mut figures = HashMap::new();
        for q in &qs.items {
            let ns = q.namespace().unwrap_or_default();
            let name = display(qualified, &ns, &q.name_any());
            targets
                .queue_refs
                .insert(name.clone(), (ns.clone(), q.name_any()));
            figures.insert(name, queue_figures(q));
        }
        Ok(Listing {
            system,
            targets,
            queue_figures: figures,
        })
    }

    /// One request through the API server's pod proxy: status and body.
    pub async fn proxy(
        &self,
        p: &PodRef,
        method: http::Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), String> {
        let uri = proxy_path(p, path);
        let req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(kube::client::Body::from(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let fut = async {
            let resp = self.client.send(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect_bytes()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body))
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            format!(
                "pod {}/{}: no answer within {timeout:?}",
                p.namespace, p.pod
            )
        })?
    }

    /// Every sidecar's samples: from Prometheus when given, else scraped through the pod proxy.
    pub async fn read(&self, sidecars: &[Sidecar]) -> Vec<(String, Read)> {
        if let Some(url) = &self.opts.prometheus {
            let q = series_query(self.opts.namespace.as_deref());
            let by_pod = match instant_query(&self.http, url, &q).await {
                Ok(v) => samples_by_pod(&v),
                Err(e) => Err(e),
            };
            return match by_pod {
                Err(e) => {
                    tracing::warn!("{e}");
                    sidecars.iter().map(|s| (s.replica.clone(), None)).collect()
                }
                Ok(mut by_pod) => sidecars
                    .iter()
                    .map(|s| {
                        // A pod Prometheus has not scraped yet has no series: down until then.
                        let r = by_pod.remove(&s.replica).map(|(v, at)| (v, Some(at)));
                        (s.replica.clone(), r)
                    })
                    .collect(),
            };
        }
        futures::future::join_all(sidecars.iter().map(|s| async move {
            let r = match &s.pod {
                None => None,
                Some(p) => match self
                    .proxy(
                        p,
                        http::Method::GET,
                        "metrics",
                        None,
                        Duration::from_secs(3),
                    )
                    .await
                {
                    Ok((200, body)) => {
                        Some((super::prom::parse(&String::from_utf8_lossy(&body)), None))
                    }
                    _ => None,
                },
            };
            (s.replica.clone(), r)
        }))
        .await
    }

    /// The broker of Queue `name` in `ns`, connected with its Broker's credentials (read from
    /// its Secret: only the dashboard with `--actions` may).
    pub async fn broker_of_queue(&self, ns: &str, name: &str) -> Result<BrokerAdmin, String> {
        let q = Api::<Queue>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
            .map_err(|e| format!("Queue {ns}/{name}: {e}"))?;
        let b = Api::<Broker>::namespaced(self.client.clone(), ns)
            .get(&q.spec.broker)
            .await
            .map_err(|e| format!("Broker {ns}/{}: {e}", q.spec.broker))?;
        let e = crate::operator::broker::endpoint(&self.client, ns, &b, &self.opts.cluster_domain)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|u| u.message)?;
        let key = format!("{ns}/{}", q.spec.broker);
        self.connections.get(&key, &e).await.map_err(|err| {
            self.connections.forget(&key);
            err.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_proxy_path_names_the_pod_and_port() {
        let p = PodRef {
            namespace: "shop".into(),
            pod: "orders-7d9-abc".into(),
            port: ADMIN_PORT,
            object: "orders".into(),
        };
        assert_eq!(
            proxy_path(&p, "/metrics"),
            "/api/v1/namespaces/shop/pods/orders-7d9-abc:15090/proxy/metrics"
        );
    }

    #[test]
    fn the_query_asks_for_the_pages_series_in_the_namespace() {
        assert_eq!(
            series_query(Some("shop")),
            r#"{__name__=~"weir_requests_total|weir_request_duration_seconds_bucket|weir_circuit_breaker_state|weir_rejections_total",namespace="shop"}"#
        );
        assert!(!series_query(None).contains("namespace"));
    }

    #[test]
    fn an_instant_vector_is_grouped_by_pod() {
        let v = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"__name__": "weir_requests_total", "namespace": "shop", "pod": "orders-1",
                        "direction": "inbound", "status_class": "2xx"}, "value": [1700000000.5, "12"]},
            {"metric": {"__name__": "weir_request_duration_seconds_bucket", "namespace": "shop",
                        "pod": "orders-1", "le": "+Inf"}, "value": [1700000001.0, "12"]},
            {"metric": {"__name__": "weir_requests_total", "kubernetes_namespace": "shop",
                        "kubernetes_pod_name": "users-1"}, "value": [1700000000.0, "3"]},
            {"metric": {"__name__": "weir_requests_total", "job": "no-pod"}, "value": [1.0, "1"]}
        ]}});
        let by = samples_by_pod(&v).unwrap();
        assert_eq!(by.len(), 2);
        let (orders, at) = &by["shop/orders-1"];
        assert_eq!(*at, 1700000001.0);
        assert_eq!(
            super::super::prom::sum(orders, "weir_requests_total", &[("direction", "inbound")]),
            12.0
        );
        assert_eq!(orders[1].label("le"), Some("+Inf"));
        assert_eq!(by["shop/users-1"].0[0].value, 3.0);
        let err = json!({"status": "error", "error": "parse error"});
        assert!(samples_by_pod(&err).unwrap_err().contains("parse error"));
    }

    #[test]
    fn names_are_qualified_across_namespaces() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
        let files = crate::manifest::expand_paths(&[dir]).unwrap();
        let loaded = crate::manifest::load(&files, &crate::manifest::Schemas::new())
            .unwrap()
            .0;
        let one = system_of(
            &BTreeMap::from([("shop".to_string(), loaded.clone())]),
            None,
        );
        assert_eq!(one.namespace, "shop");
        assert!(one.services.iter().any(|s| s.name == "orders"));
        let two = system_of(
            &BTreeMap::from([("a".to_string(), loaded.clone()), ("b".to_string(), loaded)]),
            None,
        );
        assert_eq!(two.namespace, "");
        assert_eq!(two.services.len(), 2 * one.services.len());
        let call = two
            .calls
            .iter()
            .find(|c| c.from == "b.orders" && c.dependency == "users")
            .unwrap();
        assert_eq!(call.to, "b.users");
        let q = two.queues.iter().find(|q| q.name == "a.orders").unwrap();
        assert_eq!(q.publishers, ["a.orders"]);
        assert_eq!(q.triggers, ["a.place-order"]);
        let saga = two
            .sagas
            .iter()
            .find(|s| s.name == "a.place-order")
            .unwrap();
        assert_eq!(saga.steps[0].target, "a.catalog");
        assert_eq!(saga.trigger_queue.as_deref(), Some("a.orders"));
        for f in &two.findings {
            for o in &f.objects {
                let name = o.split_once('/').unwrap().1;
                assert!(name.starts_with("a.") || name.starts_with("b."), "{o}");
            }
        }
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], is_ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if is_ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn pods_become_sidecars_and_ready_coordinators() {
        let pods = [
            pod(
                "shop",
                "orders-1",
                &[("weir.dev/microservice", "orders")],
                true,
            ),
            pod(
                "shop",
                "orders-2",
                &[("weir.dev/microservice", "orders")],
                false,
            ),
            pod(
                "shop",
                "place-order-saga-1",
                &[
                    ("weir.dev/microservice", "place-order-saga"),
                    ("weir.dev/saga", "place-order"),
                ],
                true,
            ),
            pod(
                "shop",
                "place-order-saga-2",
                &[("weir.dev/saga", "place-order")],
                false,
            ),
        ];
        let t = targets_of(&pods, false);
        let replicas: Vec<&str> = t.sidecars.iter().map(|s| s.replica.as_str()).collect();
        assert_eq!(
            replicas,
            ["shop/orders-1", "shop/orders-2"],
            "not-Ready pods count as down"
        );
        assert_eq!(t.coordinators.len(), 1);
        let c = &t.coordinators[0];
        assert_eq!(c.saga, "place-order");
        assert_eq!(
            proxy_path(c.pod.as_ref().unwrap(), "v1/sagas/place-order"),
            "/api/v1/namespaces/shop/pods/place-order-saga-1:8080/proxy/v1/sagas/place-order"
        );
        let q = targets_of(&pods, true);
        assert_eq!(q.sidecars[0].microservice, "shop.orders");
        assert_eq!(q.coordinators[0].saga, "shop.place-order");
    }

    #[test]
    fn a_queue_without_status_says_so() {
        let mut q: Queue = serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"broker": "nats", "eventType": "order.placed"}
        }))
        .unwrap();
        assert!(queue_figures(&q)["error"].is_string());
        q.status = Some(weir_crds::queue::QueueStatus {
            messages: Some(5),
            pending: BTreeMap::from([("billing".to_string(), 2)]),
            dead_letters: Some(1),
            ..Default::default()
        });
        assert_eq!(
            queue_figures(&q),
            json!({"messages": 5, "lag": {"billing": 2}, "deadLetters": 1})
        );
    }
}
