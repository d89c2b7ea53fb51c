//! The live figures: every sidecar's `/metrics` scraped each tick (rates and p99 from the
//! increase since the previous scrape), the broker's figures per Queue, and each Saga's
//! instances from its coordinator. One [`Collector::tick`] makes one snapshot, the JSON the
//! page draws.

use super::cluster::{Cluster, PodRef};
use super::model::System;
use super::prom::{self, Sample};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_broker::admin::{self, Admin, BrokerAdmin};
use weir_broker::credentials::Credentials;
use weir_broker::topology::Topology;

/// One sidecar the dashboard scrapes.
#[derive(Debug, Clone)]
pub struct Sidecar {
    /// The replica's name (`orders`, `users-1`).
    pub replica: String,
    pub microservice: String,
    pub admin_port: u16,
    /// In a cluster: the pod, scraped through the API server's pod proxy.
    pub pod: Option<PodRef>,
}

/// One replica of a Saga's coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct Coordinator {
    pub saga: String,
    pub url: String,
    /// In a cluster: the pod, asked through the API server's pod proxy.
    pub pod: Option<PodRef>,
}

impl Coordinator {
    /// `<method> /v1/sagas/<saga><suffix>` to this replica: status and body.
    pub async fn call(
        &self,
        client: &HttpClient,
        cluster: Option<&Cluster>,
        method: http::Method,
        suffix: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), String> {
        match (&self.pod, cluster) {
            (Some(p), Some(k)) => {
                let path = format!("v1/sagas/{}{suffix}", p.object);
                k.proxy(p, method, &path, body, timeout).await
            }
            _ => {
                let url = format!("{}/v1/sagas/{}{suffix}", self.url, self.saga);
                request(client, method, &url, body, timeout).await
            }
        }
    }
}

/// What the dashboard reads: the run's sidecars, coordinators and broker.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub sidecars: Vec<Sidecar>,
    pub coordinators: Vec<Coordinator>,
    pub broker_url: Option<String>,
    /// In a cluster: each Queue of the page (by the name it shows) as namespace and name.
    pub queue_refs: HashMap<String, (String, String)>,
}

struct Scrape {
    at: Instant,
    /// When Prometheus scraped it (Unix seconds); `None` when the dashboard did.
    scraped: Option<f64>,
    samples: Vec<Sample>,
}

pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(10))
        .build_http()
}

/// One request with a deadline: status and body.
pub async fn request(
    client: &HttpClient,
    method: http::Method,
    url: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

/// Counts over a window between two scrapes of some replicas.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// Requests per second.
    pub rps: f64,
    /// Share of 5xx answers in the window; `None` without requests.
    pub error_rate: Option<f64>,
    /// p99 of the time to response headers, in milliseconds; `None` without requests.
    pub p99_ms: Option<f64>,
    /// Requests since the sidecars started.
    pub total: f64,
}

/// The requests of `filter` over the `(previous, current)` scrapes of some replicas.
fn window(pairs: &[(&Scrape, &Scrape)], filter: &[(&str, &str)]) -> Window {
    const REQ: &str = "weir_requests_total";
    const LAT: &str = "weir_request_duration_seconds";
    let mut w = Window::default();
    let (mut n, mut errors) = (0.0, 0.0);
    let mut hist: Vec<(f64, f64)> = Vec::new();
    let mut err_filter = filter.to_vec();
    err_filter.push(("status_class", "5xx"));
    for (prev, cur) in pairs {
        let dt = cur.at.duration_since(prev.at).as_secs_f64();
        let now = prom::sum(&cur.samples, REQ, filter);
        w.total += now;
        let inc = prom::increase(now, prom::sum(&prev.samples, REQ, filter));
        if dt > 0.0 {
            w.rps += inc / dt;
        }
        n += inc;
        errors += prom::increase(
            prom::sum(&cur.samples, REQ, &err_filter),
            prom::sum(&prev.samples, REQ, &err_filter),
        );
        let d = prom::bucket_increase(
            &prom::buckets(&cur.samples, LAT, filter),
            &prom::buckets(&prev.samples, LAT, filter),
        );
        for (le, c) in d {
            match hist.iter_mut().find(|(b, _)| *b == le) {
                Some((_, x)) => *x += c,
                None => hist.push((le, c)),
            }
        }
    }
    hist.sort_by(|a, b| a.0.total_cmp(&b.0));
    if n > 0.0 {
        w.error_rate = Some(errors / n);
        w.p99_ms = prom::quantile(0.99, &hist).map(|s| s * 1000.0);
    }
    w
}

fn window_json(w: Window) -> Value {
    json!({
        "rps": (w.rps * 100.0).round() / 100.0,
        "errorRate": w.error_rate.map(|e| (e * 10000.0).round() / 10000.0),
        "p99Ms": w.p99_ms.map(|p| (p * 10.0).round() / 10.0),
        "total": w.total,
    })
}

/// The state a breaker gauge says, in words.
pub fn breaker_word(v: f64) -> &'static str {
    match v as i64 {
        0 => "closed",
        1 => "open",
        2 => "half-open",
        _ => "unknown",
    }
}

/// Sums a counter over the current scrapes.
fn total(scrapes: &[&Scrape], name: &str, filter: &[(&str, &str)]) -> f64 {
    scrapes
        .iter()
        .map(|s| prom::sum(&s.samples, name, filter))
        .sum::<f64>()
        + 0.0
}

pub struct Collector {
    pub system: System,
    pub targets: Targets,
    client: HttpClient,
    prev: HashMap<String, Scrape>,
    cur: HashMap<String, Scrape>,
    broker: Option<BrokerAdmin>,
    /// In a cluster: where everything is read, and the Queues' figures from their status.
    cluster: Option<Arc<Cluster>>,
    queue_figures: HashMap<String, Value>,
    listed: Option<Instant>,
    list_error: Option<String>,
}

/// How often a cluster's objects and pods are listed again.
pub const RELIST: Duration = Duration::from_secs(10);

impl Collector {
    pub fn new(system: System, targets: Targets) -> Self {
        Collector {
            system,
            targets,
            client: client(),
            prev: HashMap::new(),
            cur: HashMap::new(),
            broker: None,
            cluster: None,
            queue_figures: HashMap::new(),
            listed: None,
            list_error: None,
        }
    }

    /// A collector over a cluster: the model and the targets come from its listing.
    pub fn in_cluster(cluster: Arc<Cluster>) -> Self {
        let mut c = Collector::new(System::default(), Targets::default());
        c.cluster = Some(cluster);
        c
    }

    /// In a cluster, lists the objects and pods again every [`RELIST`]; true when it did.
    pub async fn relist(&mut self) -> bool {
        let Some(k) = self.cluster.clone() else {
            return false;
        };
        if self.listed.is_some_and(|t| t.elapsed() < RELIST) {
            return false;
        }
        self.listed = Some(Instant::now());
        match k.list().await {
            Ok(l) => {
                self.system = l.system;
                self.targets = l.targets;
                self.queue_figures = l.queue_figures;
                self.list_error = None;
                let live: std::collections::HashSet<&String> =
                    self.targets.sidecars.iter().map(|s| &s.replica).collect();
                self.cur.retain(|r, _| live.contains(r));
                self.prev.retain(|r, _| live.contains(r));
                true
            }
            Err(e) => {
                tracing::warn!("listing the cluster: {e}");
                self.list_error = Some(format!("listing the cluster: {e}"));
                false
            }
        }
    }

    /// The broker's admin connection, made at first use and again when it dropped.
    pub async fn broker(&mut self) -> Result<BrokerAdmin, String> {
        if let Some(b) = &self.broker
            && b.is_connected()
        {
            return Ok(b.clone());
        }
        let url = self
            .targets
            .broker_url
            .clone()
            .ok_or("this run has no broker")?;
        let kind = admin::kind_of_url(&url).ok_or("not a broker URL")?;
        let b = admin::connect(kind, &url, &Credentials::default())
            .await
            .map_err(|e| e.to_string())?;
        self.broker = Some(b.clone());
        Ok(b)
    }

    /// Reads every sidecar at once; the previous reading of each is kept for the rates.
    async fn scrape(&mut self) {
        let results = match &self.cluster {
            Some(k) => k.read(&self.targets.sidecars).await,
            None => {
                let client = self.client.clone();
                futures::future::join_all(self.targets.sidecars.iter().map(|s| {
                    let client = client.clone();
                    let url = format!("http://127.0.0.1:{}/metrics", s.admin_port);
                    let replica = s.replica.clone();
                    async move {
                        let r = request(
                            &client,
                            http::Method::GET,
                            &url,
                            None,
                            Duration::from_secs(2),
                        )
                        .await;
                        let r = match r {
                            Ok((200, body)) => {
                                Some((prom::parse(&String::from_utf8_lossy(&body)), None))
                            }
                            _ => None,
                        };
                        (replica, r)
                    }
                }))
                .await
            }
        };
        let now = Instant::now();
        let unix_now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        for (replica, r) in results {
            match r {
                Some((samples, scraped)) => {
                    // From Prometheus: a new reading only when it scraped again, dated then.
                    if let (Some(at), Some(cur)) = (scraped, self.cur.get(&replica))
                        && cur.scraped == Some(at)
                    {
                        continue;
                    }
                    let at = match scraped {
                        Some(t) => now
                            .checked_sub(Duration::from_secs_f64((unix_now - t).max(0.0)))
                            .unwrap_or(now),
                        None => now,
                    };
                    let scrape = Scrape {
                        at,
                        scraped,
                        samples,
                    };
                    if let Some(old) = self.cur.insert(replica.clone(), scrape) {
                        self.prev.insert(replica, old);
                    }
                }
                None => {
                    // Down: no figures from it until it answers again.
                    self.cur.remove(&replica);
                    self.prev.remove(&replica);
                }
            }
        }
    }

    fn pairs_of(&self, microservice: &str) -> (Vec<(&Scrape, &Scrape)>, Vec<&Scrape>) {
        let mut pairs = Vec::new();
        let mut current = Vec::new();
        for s in self
            .targets
            .sidecars
            .iter()
            .filter(|s| s.microservice == microservice)
        {
            if let Some(cur) = self.cur.get(&s.replica) {
                current.push(cur);
                if let Some(prev) = self.prev.get(&s.replica) {
                    pairs.push((prev, cur));
                }
            }
        }
        (pairs, current)
    }

    /// Services and calls with their live figures.
    fn services_json(&self) -> (Vec<Value>, Vec<Value>) {
        let mut services = Vec::new();
        for s in &self.system.services {
            let (pairs, current) = self.pairs_of(&s.name);
            let up = current.len();
            let replicas = self
                .targets
                .sidecars
                .iter()
                .filter(|x| x.microservice == s.name)
                .count();
            let mut inbound = window(&pairs, &[("direction", "inbound")]);
            // Since start, from every replica answering (a first scrape has no window yet).
            inbound.total = total(&current, "weir_requests_total", &[("direction", "inbound")]);
            let rejected = |reason: &str| {
                total(
                    &current,
                    "weir_rejections_total",
                    &[("direction", "inbound"), ("reason", reason)],
                )
            };
            services.push(json!({
                "name": s.name,
                "layer": s.layer,
                "edge": s.edge,
                "replicas": replicas,
                "up": up,
                "state": if replicas > 0 && up == 0 { "down" } else if up < replicas { "degraded" } else { "up" },
                "inbound": window_json(inbound),
                "rateLimited": rejected("rate-limited") + rejected("client-rate-limited"),
                "concurrencyLimited": rejected("concurrency-limit"),
                "findings": self.system.findings_on("Microservice", &s.name),
            }));
        }
        let mut calls = Vec::new();
        for c in &self.system.calls {
            let (pairs, current) = self.pairs_of(&c.from);
            let f = [
                ("direction", "outbound"),
                ("dependency", c.dependency.as_str()),
            ];
            let mut w = window(&pairs, &f);
            w.total = total(&current, "weir_requests_total", &f);
            let states: Vec<f64> = current
                .iter()
                .filter_map(|s| {
                    prom::max(
                        &s.samples,
                        "weir_circuit_breaker_state",
                        &[("dependency", c.dependency.as_str())],
                    )
                })
                .collect();
            // The worst replica's breaker: open over half-open over closed.
            let breaker = if !c.has_breaker {
                "none"
            } else if states.contains(&1.0) {
                "open"
            } else if states.contains(&2.0) {
                "half-open"
            } else if states.is_empty() {
                "unknown"
            } else {
                "closed"
            };
            let open = states.iter().filter(|v| **v == 1.0).count();
            let rejected = |reason: &str| {
                let mut f = f.to_vec();
                f.push(("reason", reason));
                total(&current, "weir_rejections_total", &f)
            };
            calls.push(json!({
                "from": c.from,
                "dependency": c.dependency,
                "to": c.to,
                "external": c.external,
                "policy": c.policy,
                "window": window_json(w),
                "breaker": breaker,
                "breakerOpenReplicas": open,
                "breakerReplicas": states.len(),
                "circuitOpenRejections": rejected("circuit-open"),
                "bulkheadRejections": rejected("bulkhead-full"),
                "rateLimited": rejected("rate-limited"),
                "timeouts": rejected("timeout"),
            }));
        }
        (services, calls)
    }

    /// Each Queue: messages, pending per consumer (the lag), dead letters.
    async fn queues_json(&mut self) -> Vec<Value> {
        let ns = self.system.namespace.clone();
        let broker = if self.cluster.is_some() {
            Err(String::new())
        } else {
            self.broker().await
        };
        let mut out = Vec::new();
        for q in self.system.queues.clone() {
            let mut v = json!({
                "name": q.name,
                "eventType": q.event_type,
                "publishers": q.publishers,
                "consumers": q.consumers,
                "triggers": q.triggers,
                "findings": self.system.findings_on("Queue", &q.name),
            });
            if self.cluster.is_some() {
                // In a cluster: the figures the operator wrote in the Queue's status.
                match self.queue_figures.get(&q.name) {
                    Some(f) => {
                        for (k, x) in f.as_object().into_iter().flatten() {
                            v[k] = x.clone();
                        }
                    }
                    None => v["error"] = json!("no such Queue listed"),
                }
                out.push(v);
                continue;
            }
            let figures = match (&broker, &q.spec) {
                (Err(e), _) => Err(e.clone()),
                (_, None) => Err("no spec".to_string()),
                (Ok(b), Some(spec)) => match Topology::new(&ns, &q.name, spec) {
                    Err(e) => Err(e.to_string()),
                    Ok(t) => {
                        let consumers = b
                            .managed_consumers(&t, &q.consumers)
                            .await
                            .unwrap_or_else(|_| q.consumers.clone());
                        b.figures(&t, &consumers).await.map_err(|e| e.to_string())
                    }
                },
            };
            match figures {
                Ok(f) => {
                    v["messages"] = json!(f.messages);
                    v["lag"] = json!(f.pending);
                    v["deadLetters"] = json!(f.dead_letters);
                }
                Err(e) => v["error"] = json!(e),
            }
            out.push(v);
        }
        out
    }

    /// Each Saga: its instances from the first coordinator replica that answers, counted by
    /// status.
    async fn sagas_json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for g in &self.system.sagas {
            let mut v = json!({
                "name": g.name,
                "steps": g.steps,
                "triggerQueue": g.trigger_queue,
                "outcomeQueues": g.outcome_queues,
                "findings": self.system.findings_on("Saga", &g.name),
                "coordinators": self.targets.coordinators.iter().filter(|c| c.saga == g.name).count(),
            });
            let mut got = Err("no coordinator".to_string());
            for c in self
                .targets
                .coordinators
                .iter()
                .filter(|c| c.saga == g.name)
            {
                got = match c
                    .call(
                        &self.client,
                        self.cluster.as_deref(),
                        http::Method::GET,
                        "",
                        None,
                        Duration::from_secs(3),
                    )
                    .await
                {
                    Ok((200, body)) => {
                        serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())
                    }
                    Ok((st, _)) => Err(format!("coordinator answered {st}")),
                    Err(e) => Err(e),
                };
                if got.is_ok() {
                    break;
                }
            }
            match got {
                Ok(list) => {
                    let mut instances = list["instances"].as_array().cloned().unwrap_or_default();
                    // Newest first.
                    instances.sort_by(|a, b| {
                        let t = |v: &Value| {
                            v.get("startedAt")
                                .or_else(|| v.get("started_at"))
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string()
                        };
                        t(b).cmp(&t(a))
                    });
                    let mut by_status: std::collections::BTreeMap<String, u64> = Default::default();
                    for i in &instances {
                        *by_status
                            .entry(i["status"].as_str().unwrap_or("?").to_string())
                            .or_default() += 1;
                    }
                    v["byStatus"] = json!(by_status);
                    v["total"] = json!(instances.len());
                    instances.truncate(500);
                    v["instances"] = json!(instances);
                }
                Err(e) => v["error"] = json!(e),
            }
            out.push(v);
        }
        out
    }

    /// One snapshot: scrape, then everything as the page reads it.
    pub async fn tick(&mut self, actions: bool) -> Value {
        self.relist().await;
        self.scrape().await;
        let (services, calls) = self.services_json();
        let queues = self.queues_json().await;
        let sagas = self.sagas_json().await;
        json!({
            "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "namespace": self.system.namespace,
            "actions": actions,
            "services": services,
            "calls": calls,
            "queues": queues,
            "sagas": sagas,
            "findings": self.system.findings,
            "source": if self.cluster.is_some() { "cluster" } else { "local" },
            "listError": self.list_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(at: Instant, text: &str) -> Scrape {
        Scrape {
            at,
            scraped: None,
            samples: prom::parse(text),
        }
    }

    #[test]
    fn a_window_gives_rates_error_share_and_p99_from_the_increase() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let before = scrape(
            t0,
            r#"weir_requests_total{direction="outbound",dependency="users",status_class="2xx"} 100
weir_requests_total{direction="outbound",dependency="users",status_class="5xx"} 0
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="0.01"} 100
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="0.5"} 100
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="+Inf"} 100
"#,
        );
        let after = scrape(
            t1,
            r#"weir_requests_total{direction="outbound",dependency="users",status_class="2xx"} 108
weir_requests_total{direction="outbound",dependency="users",status_class="5xx"} 2
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="0.01"} 100
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="0.5"} 110
weir_request_duration_seconds_bucket{direction="outbound",dependency="users",status_class="2xx",le="+Inf"} 110
"#,
        );
        let f = [("direction", "outbound"), ("dependency", "users")];
        let w = window(&[(&before, &after)], &f);
        assert!((w.rps - 5.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.error_rate, Some(0.2));
        // All ten of the window took between 10 and 500 ms: the old fast ones do not count.
        let p99 = w.p99_ms.unwrap();
        assert!(p99 > 10.0 && p99 <= 500.0, "{p99}");
        assert_eq!(w.total, 110.0);
        // Nothing in the window: no error share, no p99.
        let idle = window(&[(&after, &after)], &f);
        assert_eq!((idle.rps, idle.error_rate, idle.p99_ms), (0.0, None, None));
    }

    #[test]
    fn breaker_states_in_words() {
        assert_eq!(breaker_word(0.0), "closed");
        assert_eq!(breaker_word(1.0), "open");
        assert_eq!(breaker_word(2.0), "half-open");
    }
}
