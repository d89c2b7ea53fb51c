//! Weir in a real cluster, the operator running in a pod (`helm install`): pods with their
//! sidecars, traffic through both sidecars of a call, the breaker opening on a dependency
//! scaled to zero with its fallback served and seen in `/metrics`, `kubectl get weir`, and an
//! operator pod killed and replaced without losing anything. Run by tests/e2e/local-cluster.sh
//! (`WEIR_E2E=1 WEIR_E2E_OPERATOR=cluster`).

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir_crds::Microservice;
use weir_e2e::{env_or, http_get, metric, wait_for};

const MANAGER: &str = "weir-e2e";

fn in_cluster_operator() -> bool {
    if !weir_e2e::enabled("cluster_e2e") {
        return false;
    }
    if std::env::var("WEIR_E2E_OPERATOR").as_deref() != Ok("cluster") {
        eprintln!(
            "SKIPPED cluster_e2e: it needs the operator installed in the cluster (WEIR_E2E_OPERATOR=cluster; tests/e2e/local-cluster.sh does it)"
        );
        return false;
    }
    true
}

fn example(name: &str) -> Result<Microservice> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/hello/{name}.yaml"));
    let mut ms: Microservice = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    ms.spec.image_pull_policy = Some(env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent"));
    ms.spec.dependencies.retain(|d| d.microservice.is_some());
    Ok(ms)
}

async fn namespace(client: &Client, prefix: &str) -> Result<String> {
    let ns = format!("{prefix}-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    Ok(ns)
}

async fn ready(mss: &Api<Microservice>, name: &str, timeout: Duration) -> Result<()> {
    wait_for(&format!("{name} Ready=True"), timeout, || {
        let mss = mss.clone();
        async move {
            let ms = mss.get(name).await?;
            let ok = ms.status.as_ref().is_some_and(|s| {
                s.observed_generation == ms.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            Ok(ok.then_some(()))
        }
    })
    .await
}

async fn service_addr(svcs: &Api<Service>, name: &str) -> Result<SocketAddr> {
    let s = svcs.get(name).await?;
    let ip = s.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    Ok(format!("{ip}:80").parse()?)
}

async fn pod_admin(pods: &Api<Pod>, app: &str) -> Result<SocketAddr> {
    let list = pods
        .list(&ListParams::default().labels(&format!("weir.dev/microservice={app}")))
        .await?;
    let pod = list
        .items
        .into_iter()
        .find(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        })
        .context("a running pod")?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("pod IP")?;
    Ok(format!("{ip}:15090").parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_in_a_real_cluster() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-cluster-e2e").await?;
    let result = run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

/// Per-call balancing over a Microservice's pods: `back` with three replicas behind `front`.
/// front's sidecar finds the pods through the headless `back-weir-endpoints` Service (DNS), the
/// calls are spread over the three; then one pod's app fails every call while its probes pass:
/// it is ejected after the configured failures, front's calls all succeed (retried on another
/// pod) and the dependency's breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_and_ejection_in_a_real_cluster() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-balance-e2e").await?;
    let result = balance_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

/// `n` calls of `GET path` on `addr`, four at a time: each answer's status and body.
fn calls(addr: SocketAddr, path: &str, n: usize) -> Vec<(u16, String)> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % 4 == w)
                        .map(|_| http_get(addr, path).unwrap_or((0, String::new())))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

async fn balance_run(client: &Client, ns: &str) -> Result<()> {
    let long = Duration::from_secs(240);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let pull = env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent");
    let back: Microservice = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
        "metadata": {"name": "back"},
        "spec": {"image": "ghcr.io/weir-dev/weir-echo:0.1.0", "port": 8080, "replicas": 3,
                 "imagePullPolicy": pull}
    }))?;
    let front: Microservice = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
        "metadata": {"name": "front"},
        "spec": {"image": "ghcr.io/weir-dev/weir-echo:0.1.0", "port": 8080,
                 "imagePullPolicy": pull,
                 "dependencies": [{
                     "name": "back", "microservice": "back",
                     "retry": {"attempts": 3},
                     "circuitBreaker": {"errorThresholdPercentage": 20, "volumeThreshold": 10},
                     "outlierDetection": {"consecutiveFailures": 3, "baseEjectionTime": "2m"}
                 }, {
                     // An external URL whose name has several addresses (here the cluster's
                     // DNS answers the headless Service's three pods): balanced too.
                     "name": "direct", "url": "http://back-weir-endpoints:15001"
                 }]}
    }))?;
    for ms in [&back, &front] {
        mss.patch(
            &ms.name_any(),
            &PatchParams::apply(MANAGER),
            &Patch::Apply(ms),
        )
        .await?;
    }
    ready(&mss, "back", long).await?;
    ready(&mss, "front", long).await?;
    let headless = svcs.get("back-weir-endpoints").await?;
    assert_eq!(
        headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None"),
        "the companion Service is headless"
    );
    // front's sidecar resolves the headless Service every 5 s: the three pods.
    let front_admin = pod_admin(&pods, "front").await?;
    wait_for(
        "front's sidecar knows back's three pods, by the headless Service and by the URL",
        long,
        || async move {
            let (_, body) = http_get(front_admin, "/endpoints")?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok((v["back"].as_array().map(Vec::len) == Some(3)
                && v["direct"].as_array().map(Vec::len) == Some(3))
            .then_some(()))
        },
    )
    .await?;

    // A pod found at the last resolution is in its slow start (10 s by default): it takes a
    // draw it wins with the chance of its warmth over the others', so right after discovery it
    // gets few calls by design (one CI run: 1 of 120). The spread is measured once every pod
    // has been known for longer than that.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let front_addr = service_addr(&svcs, "front").await?;
    let by_pod = |answers: &[(u16, String)]| {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for (status, body) in answers {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let pod = v["upstream"]["pod"].as_str().unwrap_or("?");
            *m.entry(format!("{status} {pod}")).or_default() += 1;
        }
        m
    };
    let answers = calls(front_addr, "/call/back/", 120);
    let spread = by_pod(&answers);
    eprintln!("calls by back pod: {spread:?}");
    assert_eq!(spread.len(), 3, "three pods answered: {spread:?}");
    // Each pod takes calls, not a third each: a pod whose answer came late (the node is busy)
    // is avoided while its estimate decays. Seven runs: the least served pod got 11 to 34 of
    // 120; before an early estimate decayed faster, one got 0 of 240.
    for (k, n) in &spread {
        assert!(k.starts_with("200 ") && *n >= 6, "spread: {spread:?}");
    }
    let answers = calls(front_addr, "/call/direct/", 120);
    let by_url = by_pod(&answers);
    eprintln!("calls of the url dependency by back pod: {by_url:?}");
    assert_eq!(by_url.len(), 3, "three pods answered: {by_url:?}");
    for (k, n) in &by_url {
        assert!(k.starts_with("200 ") && *n >= 6, "spread: {by_url:?}");
    }

    // One pod's app fails every call (its probes still pass).
    let back_pods: Vec<Pod> = pods
        .list(&ListParams::default().labels("weir.dev/microservice=back"))
        .await?
        .items;
    let bad = back_pods
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .context("a back pod")?;
    let bad_name = bad.name_any();
    let bad_ip = bad
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod IP")?;
    let (status, body) = weir_e2e::http_post(format!("{bad_ip}:15001").parse()?, "/fail", "{}")?;
    assert_eq!(status, 200, "{body}");
    let answers = calls(front_addr, "/call/back/", 120);
    let after = by_pod(&answers);
    eprintln!("after {bad_name} failed: {after:?}");
    // Every call answered by a healthy pod (the failures were retried elsewhere)...
    assert!(
        answers
            .iter()
            .all(|(s, b)| *s == 200 && !b.contains(&bad_name)),
        "{after:?}"
    );
    // ...the bad pod was sent the failures that ejected it...
    let (_, bad_metrics) = http_get(format!("{bad_ip}:15090").parse()?, "/metrics")?;
    let failed = metric(
        &bad_metrics,
        r#"weir_requests_total{direction="inbound",dependency="",status_class="5xx"}"#,
    )
    .unwrap_or(0.0);
    // Three failures in a row eject it; calls already on their way when the third came back
    // (four callers) may still reach it.
    assert!(
        (3.0..=6.0).contains(&failed),
        "consecutiveFailures reached it, and what was in flight, no more ({failed}):\n{bad_metrics}"
    );
    let (_, body) = http_get(front_admin, "/endpoints")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let states: Vec<(String, String)> = v["back"]
        .as_array()
        .context("back's endpoints")?
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or("").to_string(),
                e["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&(format!("{bad_ip}:15001"), "ejected".into())),
        "{states:?}"
    );
    // ...and front's breaker for back stayed closed.
    let (_, fm) = http_get(front_admin, "/metrics")?;
    assert_eq!(
        metric(&fm, r#"weir_circuit_breaker_state{dependency="back"}"#),
        Some(0.0),
        "{fm}"
    );
    assert_eq!(
        metric(&fm, r#"weir_endpoints_ejected{dependency="back"}"#),
        Some(1.0),
        "{fm}"
    );
    Ok(())
}

/// examples/grpc in pods: inventory (tonic, h2c) ready by its gRPC health check relayed by its
/// sidecar, storefront calling it through both sidecars, unary and a server stream, with the
/// calls counted by gRPC method and status on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_in_a_real_cluster() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-grpc-e2e").await?;
    let result = grpc_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

async fn grpc_run(client: &Client, ns: &str) -> Result<()> {
    use serde::Deserialize as _;
    let long = Duration::from_secs(240);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/grpc/services.yaml");
    let text = std::fs::read_to_string(&path)?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut ms = Microservice::deserialize(doc)?;
        ms.spec.image_pull_policy = Some(env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent"));
        let name = ms.name_any();
        mss.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&ms))
            .await?;
    }
    // Ready only once the kubelet's probe of the sidecar's relay got SERVING from the app.
    ready(&mss, "inventory", long).await?;
    ready(&mss, "storefront", long).await?;
    let inventory_admin = pod_admin(&pods, "inventory").await?;
    let (status, body) = http_get(inventory_admin, "/app-health/readiness")?;
    assert_eq!((status, body.as_str()), (200, "app readiness: SERVING\n"));

    let storefront = service_addr(&svcs, "storefront").await?;
    // Ready is the pod's; the Service's rules on the node follow a moment later (kube-proxy),
    // so the first call waits for an answer (any answer: its status is asserted below).
    let (status, body) = wait_for(
        "storefront answers through its Service",
        Duration::from_secs(30),
        || async move { Ok(http_get(storefront, "/stock/apple").ok()) },
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?,
        json!({"sku": "apple", "count": 12})
    );
    for _ in 0..4 {
        let (status, body) = http_get(storefront, "/stock/flaky")?;
        assert_eq!(status, 200, "UNAVAILABLE is retried: {body}");
    }
    let (status, body) = http_get(storefront, "/watch/pear?updates=3")?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?["counts"],
        json!([3, 2, 1])
    );

    let check = |dir: &str, dep: &str, status: &str| {
        format!(
            r#"weir_grpc_requests_total{{direction="{dir}",dependency="{dep}",grpc_service="shop.Inventory",grpc_method="Check",grpc_status="{status}"}}"#
        )
    };
    let (_, sm) = http_get(pod_admin(&pods, "storefront").await?, "/metrics")?;
    assert!(
        metric(&sm, &check("outbound", "inventory", "OK")).unwrap_or(0.0) >= 5.0,
        "storefront's sidecar counted the calls by method and status:\n{sm}"
    );
    let (_, im) = http_get(inventory_admin, "/metrics")?;
    assert!(
        metric(&im, &check("inbound", "", "UNAVAILABLE")).unwrap_or(0.0) >= 1.0,
        "inventory's sidecar saw the failed attempts that were retried:\n{im}"
    );
    Ok(())
}

/// `kubectl apply` refuses a typo inside any block of any kind (`retry: {attemps: 5}` once went
/// through, was pruned and left the defaults in force): before server-side field validation
/// (1.25) that is kubectl's own check against the schema the server publishes, which has to
/// carry every block's type and properties. The cases come from tests/apiserver/objects.yaml;
/// each is a server-side dry run, and the same object without the typo is accepted. The same
/// published schema is what `kubectl explain` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_refuses_a_typo_in_every_block_and_explains_every_field() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-typos").await?;
    let result = typos(&ns);
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

fn typos(ns: &str) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let crds: Vec<serde_json::Value> = std::fs::read_dir(root.join("charts/weir/crds"))?
        .map(|e| Ok(weir_e2e::typos::documents(&e?.path())?.remove(0)))
        .collect::<Result<_>>()?;
    let bases = weir_e2e::typos::documents(&root.join("tests/apiserver/objects.yaml"))?;
    let cases = weir_e2e::typos::cases(&crds, &bases);
    assert!(cases.len() >= 40, "only {} typo cases", cases.len());
    let dir = tempfile::tempdir()?;
    let apply = |name: &str, obj: &serde_json::Value| -> Result<(bool, String)> {
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec(obj)?)?;
        let out = std::process::Command::new("kubectl")
            .args(["apply", "--dry-run=server", "-n", ns, "-f"])
            .arg(&file)
            .output()
            .context("running kubectl")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    for (i, base) in bases.iter().enumerate() {
        let (ok, err) = apply(&format!("base-{i}"), base)?;
        assert!(ok, "control: base object {i} refused: {err}");
    }
    let mut example = String::new();
    for (i, case) in cases.iter().enumerate() {
        let (ok, err) = apply(&format!("case-{i}"), &case.object)?;
        let want = format!("unknown field \"{}\"", case.key);
        assert!(
            !ok && err.contains(&want),
            "{} with {}: kubectl apply ok={ok}, wanted {want}: {err}",
            case.object_name,
            case.field
        );
        if case.field.contains("].") && example.is_empty() {
            example = format!("{}: {}", case.field, err.trim());
        }
    }
    eprintln!(
        "  ok: {} typos refused by kubectl apply, {} base objects accepted; e.g. {example}",
        cases.len(),
        bases.len()
    );
    // `kubectl explain` sees inside the optional blocks and describes each kind and field.
    for (path, want) in [
        ("microservice", "resilience policy"),
        ("microservice.spec.dependencies.retry", "<Object>"),
        (
            "microservice.spec.dependencies.circuitBreaker.errorThresholdPercentage",
            "Failure percentage in the rolling window",
        ),
        (
            "microservice.spec.inbound.timeout",
            "Deadline of one inbound request",
        ),
        ("microservice.status", "What the operator last saw"),
        ("queue.spec", "A durable queue on a Broker"),
        ("saga.spec.steps.action.http", "An HTTP call"),
        (
            "broker.spec.managed.storage",
            "Size of the persistent volume",
        ),
    ] {
        let out = std::process::Command::new("kubectl")
            .args(["explain", path])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want),
            "kubectl explain {path}: wanted {want:?} in:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("  ok: kubectl explain describes kinds and the fields inside optional blocks");
    Ok(())
}

async fn run(client: &Client, ns: &str) -> Result<()> {
    let long = Duration::from_secs(240);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for name in ["users", "orders"] {
        mss.patch(
            name,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(&example(name)?),
        )
        .await?;
    }
    ready(&mss, "users", long).await?;
    ready(&mss, "orders", long).await?;

    // Pods run the app and weir-proxy.
    for p in pods.list(&ListParams::default()).await? {
        let names: Vec<String> = p
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .map(|c| c.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            names.contains(&"app".into()) && names.contains(&"weir-proxy".into()),
            "{}: {names:?}",
            p.name_any()
        );
    }

    // `kubectl get weir` prints the columns.
    let out = std::process::Command::new("kubectl")
        .args(["get", "weir", "-n", ns])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{table}");
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "READY", "REPLICAS", "DEPENDENCIES", "AGE"] {
        assert!(
            header.contains(col),
            "kubectl get weir: no {col} column in {header:?}"
        );
    }
    assert!(
        table
            .lines()
            .any(|l| l.contains("orders") && l.contains("True") && l.contains("1/1")),
        "{table}"
    );

    // A call through orders to users crosses both sidecars.
    let orders = service_addr(&svcs, "orders").await?;
    let (status, body) = http_get(orders, "/call/users/")?;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["upstream"]["service"], "users", "{body}");
    assert!(
        v["upstream"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")),
        "trace context crossed: {body}"
    );
    let orders_admin = pod_admin(&pods, "orders").await?;
    let users_admin = pod_admin(&pods, "users").await?;
    let (_, om) = http_get(orders_admin, "/metrics")?;
    assert!(
        metric(
            &om,
            r#"weir_requests_total{direction="outbound",dependency="users",status_class="2xx"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "orders' sidecar saw the outbound call:\n{om}"
    );
    let mut users_inbound = 0.0;
    for p in pods
        .list(&ListParams::default().labels("weir.dev/microservice=users"))
        .await?
    {
        if let Some(ip) = p.status.and_then(|s| s.pod_ip) {
            let (_, um) = http_get(format!("{ip}:15090").parse()?, "/metrics")?;
            users_inbound += metric(
                &um,
                r#"weir_requests_total{direction="inbound",dependency="",status_class="2xx"}"#,
            )
            .unwrap_or(0.0);
        }
    }
    let _ = users_admin;
    assert!(users_inbound >= 1.0, "a users sidecar saw the inbound call");

    // users scaled to zero: calls fail, the breaker opens, the fallback customer is served.
    let mut users = example("users")?;
    users.spec.replicas = 0;
    mss.patch("users", &PatchParams::apply(MANAGER), &Patch::Apply(&users))
        .await?;
    wait_for("users has no pods", long, || {
        let pods = pods.clone();
        async move {
            let n = pods
                .list(&ListParams::default().labels("weir.dev/microservice=users"))
                .await?
                .items
                .len();
            Ok((n == 0).then_some(()))
        }
    })
    .await?;
    // The Dependencies column says calls to users cannot succeed now.
    wait_for("orders shows dependencies 0/1", long, || {
        let mss = mss.clone();
        async move {
            let st = mss.get("orders").await?.status.unwrap_or_default();
            Ok((st.dependency_summary.as_deref() == Some("0/1")).then_some(()))
        }
    })
    .await?;
    let fallback = wait_for(
        "the breaker opens and the fallback is served",
        Duration::from_secs(60),
        || async move {
            let (status, body) = http_get(orders, "/call/users/")?;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            Ok((status == 200 && v["upstream"]["stale"] == true).then_some(body))
        },
    )
    .await?;
    assert!(fallback.contains("Unknown"), "{fallback}");
    let (_, om) = http_get(orders_admin, "/metrics")?;
    assert_eq!(
        metric(&om, r#"weir_circuit_breaker_state{dependency="users"}"#),
        Some(1.0),
        "breaker open in /metrics:\n{om}"
    );
    assert!(
        om.contains("weir_circuit_breaker_transitions_total{"),
        "{om}"
    );
    eprintln!("  ok: breaker open and counted in orders' sidecar /metrics");

    // Editing a Microservice rolls its pods (the config hash changes).
    let before: Vec<String> = pods
        .list(&ListParams::default().labels("weir.dev/microservice=orders"))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let mut orders_ms = example("orders")?;
    orders_ms.spec.dependencies[0].timeout = "1500ms".into();
    mss.patch(
        "orders",
        &PatchParams::apply(MANAGER),
        &Patch::Apply(&orders_ms),
    )
    .await?;
    wait_for("orders' pods replaced after the edit", long, || {
        let pods = pods.clone();
        let before = before.clone();
        async move {
            let now = pods
                .list(&ListParams::default().labels("weir.dev/microservice=orders"))
                .await?;
            let fresh = now
                .items
                .iter()
                .filter(|p| !before.contains(&p.name_any()))
                .any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                });
            Ok(fresh.then_some(()))
        }
    })
    .await?;

    // Kill the operator pod: its replacement adopts what exists and keeps reconciling.
    let system: Api<Pod> = Api::namespaced(client.clone(), "weir-system");
    let ops = system
        .list(&ListParams::default().labels("app.kubernetes.io/name=weir"))
        .await?;
    let old: Vec<String> = ops.items.iter().map(|p| p.name_any()).collect();
    for p in &old {
        system
            .delete(
                p,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await?;
    }
    let uid_before = deps.get("orders").await?.uid();
    users.spec.replicas = 1;
    mss.patch("users", &PatchParams::apply(MANAGER), &Patch::Apply(&users))
        .await?;
    wait_for("a new operator pod running", long, || {
        let system = system.clone();
        let old = old.clone();
        async move {
            let list = system
                .list(&ListParams::default().labels("app.kubernetes.io/name=weir"))
                .await?;
            Ok(list
                .items
                .iter()
                .any(|p| {
                    !old.contains(&p.name_any())
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .then_some(()))
        }
    })
    .await?;
    ready(&mss, "users", long).await?;
    assert_eq!(
        deps.get("orders").await?.uid(),
        uid_before,
        "the new operator adopted the Deployment instead of recreating it"
    );
    let all = deps.list(&ListParams::default()).await?.items.len();
    assert_eq!(all, 2, "no duplicate children after the operator restart");

    // Deleting a Microservice garbage-collects its children.
    mss.delete("orders", &DeleteParams::background()).await?;
    wait_for("orders' children collected", long, || {
        let (deps, svcs) = (deps.clone(), svcs.clone());
        async move {
            Ok(
                (deps.get_opt("orders").await?.is_none()
                    && svcs.get_opt("orders").await?.is_none())
                .then_some(()),
            )
        }
    })
    .await?;
    Ok(())
}

/// The scale benchmark: 1,000 Microservices applied at once; time until every one's status
/// has caught up with its generation, and the operator's peak RSS (read from /proc on the node).
/// The operator's throughput against its bound, in the same run on the same cluster: for each
/// count of `WEIR_E2E_SCALE_COUNTS` (1000 by default), first with the operator scaled to zero the
/// same writes made directly (each Microservice created, then its rendered objects, from `weir
/// render --mtls` as the chart's operator renders them, and its status server-side applied under
/// the operator's field manager, `WEIR_E2E_SCALE_CONCURRENCY` at a time), then the operator
/// back, the same Microservices created in a fresh namespace and the time until every one's
/// status is current. Prints both times, their ratio, the server-side applies per Microservice
/// (the API server's `apiserver_request_total{verb="APPLY"}`) and the operator's peak RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_benchmark() -> Result<()> {
    if !in_cluster_operator() || std::env::var("WEIR_E2E_SCALE").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED scale_benchmark: set WEIR_E2E_SCALE=1 (with the in-cluster operator) to run it"
        );
        return Ok(());
    }
    let client = Client::try_default().await?;
    let counts: Vec<usize> = env_or("WEIR_E2E_SCALE_COUNTS", "1000")
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()?;
    let concurrency: usize = env_or("WEIR_E2E_SCALE_CONCURRENCY", "32").parse()?;
    let mut lines = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let direct = direct_applies(&client, n, concurrency).await?;
        let OperatorRun {
            took: operator,
            applies,
            cpu,
            peak,
            anon,
            file,
        } = operator_reconciles(&client, n, i + 1 < counts.len()).await?;
        let mib = |k: Option<u64>| {
            k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "unknown (operator process not visible from here)".into())
        };
        let line = format!(
            "SCALE: {n} Microservices: direct applies {:.1}s ({:.1} applies each), operator {:.1}s ({:.1} applies each), ratio {:.2}; operator CPU {}; operator peak RSS {} (when all were current: {} anonymous, {} of files)",
            direct.0.as_secs_f64(),
            direct.1,
            operator.as_secs_f64(),
            applies,
            operator.as_secs_f64() / direct.0.as_secs_f64(),
            cpu.map(|c| format!("{c:.1}s, {:.1} ms per Microservice", c * 1000.0 / n as f64))
                .unwrap_or_else(|| "unknown".into()),
            mib(peak),
            mib(anon),
            mib(file),
        );
        eprintln!("{line}");
        lines.push(line);
    }
    for l in &lines {
        println!("{l}");
    }
    Ok(())
}

/// The Microservices of the benchmark: `svc-0000` … with replicas 0 (no pods: the API server's
/// and the operator's work, not the kubelet's).
fn scale_microservices(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
                "metadata": {"name": format!("svc-{i:04}")},
                "spec": {"image": "ghcr.io/weir-dev/weir-echo:0.1.0", "replicas": 0}
            })
        })
        .collect()
}

/// `apiserver_request_total` of `verb`, all resources.
async fn apiserver_requests(client: &Client, verb: &str) -> Result<f64> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{") && l.contains(&format!("verb=\"{verb}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The operator's Deployment (`weir` in `weir-system`) scaled to `replicas`, and waited for.
async fn scale_operator(client: &Client, replicas: i32) -> Result<()> {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "weir-system");
    deps.patch(
        "weir",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "weir-system");
    wait_for(
        &format!("the operator at {replicas} replicas"),
        Duration::from_secs(180),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/name=weir"))
                    .await?;
                let ready = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                    })
                    .count();
                Ok(
                    (ready == replicas as usize && list.items.len() == replicas as usize)
                        .then_some(()),
                )
            }
        },
    )
    .await
}

/// With the operator scaled to zero: each Microservice created, its objects as `weir render
/// --mtls` renders them and its status applied under the operator's field manager, `concurrency`
/// at a time. The time from the first create to the last apply, and the applies per
/// Microservice the API server counted.
async fn direct_applies(client: &Client, n: usize, concurrency: usize) -> Result<(Duration, f64)> {
    scale_operator(client, 0).await?;
    let ns = namespace(client, &format!("weir-scale-direct-{n}")).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("scale.yaml");
    let mss = scale_microservices(n);
    std::fs::write(
        &file,
        mss.iter()
            .map(|m| serde_yaml::to_string(m).unwrap())
            .collect::<Vec<_>>()
            .join("---\n"),
    )?;
    let bin = std::env::var("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/weir"));
    // As the chart configures the operator: native sidecars from Kubernetes 1.29.
    let v = client.apiserver_version().await?;
    let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["render", "--mtls", "-n", &ns]);
    if minor < 29 {
        cmd.arg("--legacy-sidecar");
    }
    let out = cmd
        .arg("-f")
        .arg(&file)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("weir render: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut children: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        Default::default();
    for doc in serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout)?) {
        use serde::Deserialize as _;
        let v = serde_json::Value::deserialize(doc)?;
        let owner = v["metadata"]["labels"]["weir.dev/microservice"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        children.entry(owner).or_default().push(v);
    }
    let status = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
        "status": {"observedGeneration": 1, "replicas": 0, "readyReplicas": 0,
            "replicaSummary": "0/0", "dependencySummary": "0/0", "configHash": "0000000000000000",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "ScaledToZero", "message": "scaled to zero replicas", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Progressing", "status": "False", "reason": "RolloutComplete", "message": "0 replicas up to date", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "replicas ready and dependencies resolved", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]}
    });
    let applies_before = apiserver_requests(client, "APPLY").await?;
    let pp = PatchParams::apply("weir-operator").force();
    let start = Instant::now();
    futures::stream::iter(mss.into_iter().map(|ms| {
        let name = ms["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let objects = children.remove(&name).unwrap_or_default();
        (name, ms, objects)
    }))
    .map(|(name, ms, objects)| {
        let client = client.clone();
        let ns = ns.clone();
        let pp = pp.clone();
        let status = status.clone();
        async move {
            let mss: Api<Microservice> = Api::namespaced(client.clone(), &ns);
            mss.create(&PostParams::default(), &serde_json::from_value(ms)?)
                .await?;
            for o in objects {
                let kind = o["kind"].as_str().unwrap_or_default().to_string();
                let (group, version) =
                    match o["apiVersion"].as_str().unwrap_or_default().split_once('/') {
                        Some((g, v)) => (g.to_string(), v.to_string()),
                        None => (
                            String::new(),
                            o["apiVersion"].as_str().unwrap_or_default().to_string(),
                        ),
                    };
                let ar = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                    &group, &version, &kind,
                ));
                let api: Api<kube::api::DynamicObject> =
                    Api::namespaced_with(client.clone(), &ns, &ar);
                let oname = o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                api.patch(&oname, &pp, &Patch::Apply(&o)).await?;
            }
            mss.patch_status(&name, &pp, &Patch::Apply(&status)).await?;
            anyhow::Ok(())
        }
    })
    .buffer_unordered(concurrency)
    .try_collect::<Vec<_>>()
    .await?;
    let took = start.elapsed();
    let applies = apiserver_requests(client, "APPLY").await? - applies_before;
    eprintln!(
        "  direct: {n} Microservices written in {:.1}s",
        took.as_secs_f64()
    );
    // Gone before the operator's turn: the garbage collector's deletes would share the API
    // server with it.
    delete_namespace(client, &ns).await?;
    Ok((took, applies / n as f64))
}

/// Deletes namespace `ns` and waits until it is gone.
async fn delete_namespace(client: &Client, ns: &str) -> Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.delete(ns, &DeleteParams::background()).await?;
    wait_for(
        &format!("namespace {ns} gone"),
        Duration::from_secs(900),
        || {
            let namespaces = namespaces.clone();
            let ns = ns.to_string();
            async move { Ok(namespaces.get_opt(&ns).await?.is_none().then_some(())) }
        },
    )
    .await
}

/// What the benchmark measured of the operator's run.
struct OperatorRun {
    took: Duration,
    applies: f64,
    cpu: Option<f64>,
    /// Peak RSS until every status was current, and then `RssAnon` and `RssFile` (KiB).
    peak: Option<u64>,
    anon: Option<u64>,
    file: Option<u64>,
}

/// The operator back (and leading: a probe Microservice reconciled), then `n` Microservices
/// created in a fresh namespace: the time from the first create until every status is current,
/// and the server-side applies per Microservice the API server counted meanwhile. With
/// `more` counts to follow, waits for the namespace's deletion.
async fn operator_reconciles(client: &Client, n: usize, more: bool) -> Result<OperatorRun> {
    scale_operator(client, 1).await?;
    let ns = namespace(client, &format!("weir-scale-{n}")).await?;
    let mss: Api<Microservice> = Api::namespaced(client.clone(), &ns);
    mss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
            "metadata": {"name": "probe"},
            "spec": {"image": "ghcr.io/weir-dev/weir-echo:0.1.0", "replicas": 0}
        }))?,
    )
    .await?;
    wait_for(
        "the operator reconciles again",
        Duration::from_secs(180),
        || {
            let mss = mss.clone();
            async move {
                let ms = mss.get("probe").await?;
                Ok(ms
                    .status
                    .is_some_and(|s| s.observed_generation == ms.metadata.generation)
                    .then_some(()))
            }
        },
    )
    .await?;
    // Watched, not listed: a list of thousands of Microservices every half second would load the
    // API server (and this machine's two cores) during the operator's run and not the direct
    // one's. The watch costs it one more watcher of the events it sends the operator anyway.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let watched = {
        let mss = mss.clone();
        tokio::spawn(async move {
            use kube::runtime::{WatchStreamExt, watcher};
            let mut current = std::collections::HashSet::new();
            let mut events = std::pin::pin!(
                watcher(mss, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            let mut listed = Some(tx);
            while let Some(ms) = events.try_next().await? {
                // The probe is current before the first create: once it is seen, the watch is
                // running and the creates may start.
                if let Some(tx) = listed.take_if(|_| ms.name_any() == "probe") {
                    let _ = tx.send(());
                }
                if ms
                    .status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation == ms.metadata.generation)
                {
                    current.insert(ms.name_any());
                }
                if current.len() == n + 1 {
                    return anyhow::Ok(Instant::now());
                }
            }
            bail!(
                "the watch of Microservices ended with {} current",
                current.len()
            )
        })
    };
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .context("the watch of Microservices did not start")??;
    let applies_before = apiserver_requests(client, "APPLY").await?;
    let cpu_before = operator_cpu_seconds();
    let start = Instant::now();
    futures::stream::iter(scale_microservices(n))
        .map(|ms| {
            let mss = mss.clone();
            async move {
                mss.create(&PostParams::default(), &serde_json::from_value(ms)?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let created = start.elapsed();
    let done = tokio::time::timeout(Duration::from_secs(900), watched)
        .await
        .with_context(|| format!("{n} Microservices not reconciled after 900 s"))???
        .duration_since(start);
    // Writes settle a little after the last status (Events).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let applies = apiserver_requests(client, "APPLY").await? - applies_before;
    let cpu = cpu_before.zip(operator_cpu_seconds()).map(|(a, b)| b - a);
    eprintln!(
        "  operator: {n} created in {:.1}s, all reconciled after {:.1}s",
        created.as_secs_f64(),
        done.as_secs_f64()
    );
    let (peak, anon, file) = (
        operator_peak_rss_kib(),
        operator_status_kib("RssAnon"),
        operator_status_kib("RssFile"),
    );
    // Gone before the next count's direct writes, as theirs are before the operator's turn.
    if more {
        delete_namespace(client, &ns).await?;
    } else {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::background())
            .await;
    }
    Ok(OperatorRun {
        took: done,
        applies: applies / n as f64,
        cpu,
        peak,
        anon,
        file,
    })
}

/// The `/proc` directory of the `weir operator` process, when it runs on this machine (the
/// local cluster).
fn operator_proc() -> Option<PathBuf> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.len() >= 2 && args[0].ends_with(b"weir") && args[1] == b"operator")
                .then(|| entry.path())
        })
}

/// A field of the operator's `/proc/<pid>/status`, in KiB (`VmHWM`, `RssAnon`, `RssFile`).
fn operator_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(operator_proc()?.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// VmHWM of the operator process.
fn operator_peak_rss_kib() -> Option<u64> {
    operator_status_kib("VmHWM")
}

/// The CPU time the operator process has used (user and system), in seconds.
fn operator_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string(operator_proc()?.join("stat")).ok()?;
    // After the command's name in parentheses: utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // In USER_HZ, which Linux fixes at 100 for /proc on every common architecture.
    Some(ticks / 100.0)
}

/// The operator's identity endpoint against the cluster's own TokenReview (the chart installed
/// with `mtls.enabled`): a projected token of a ServiceAccount labelled for and owned by a
/// Microservice gets a certificate naming it, verified to the bundle in `weir-issuer`; a CSR
/// for another workload, a token for another audience, a ServiceAccount Weir did not render
/// and a pod-bound token once its pod is gone are each refused, and nothing is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_endpoint_with_the_clusters_token_review() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-identity-e2e").await?;
    let result = identity_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

async fn identity_run(client: &Client, ns: &str) -> Result<()> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    use weir_identity::endpoint::{ClientError, request_certificate_via};
    use weir_identity::tls::{TrustBundle, peer_identity};
    use weir_identity::{WorkloadId, WorkloadKey};
    let system = env_or("WEIR_E2E_OPERATOR_NAMESPACE", "weir-system");
    // The CA the operator made (or was given), and its endpoint's Service.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &system);
    let issuer = wait_for(
        "the operator's weir-issuer Secret",
        Duration::from_secs(60),
        || {
            let secrets = secrets.clone();
            async move { Ok(secrets.get_opt("weir-issuer").await?) }
        },
    )
    .await?;
    let bundle_pem = issuer
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .context("weir-issuer has ca.crt")?;
    let bundle = TrustBundle::from_pem(&bundle_pem)?;
    let svc = Api::<Service>::namespaced(client.clone(), &system)
        .get("weir-identity")
        .await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let endpoint: SocketAddr = format!("{ip}:8443").parse()?;
    let url = format!("https://weir-identity.{system}.svc:8443");

    // A Microservice (no pods needed) and the ServiceAccount the operator will render for it:
    // labelled for it and owned by it. And one with the label but no owner.
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let mut ms = example("users")?;
    ms.spec.replicas = 0;
    let ms = mss.create(&PostParams::default(), &ms).await?;
    let uid = ms.metadata.uid.clone().context("uid")?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    // The operator renders it (the chart is installed with mtls.enabled): labelled for the
    // Microservice and owned by it.
    let rendered = wait_for(
        "the operator's ServiceAccount users-weir",
        Duration::from_secs(60),
        || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("users-weir").await?) }
        },
    )
    .await?;
    assert_eq!(
        rendered
            .labels()
            .get("weir.dev/microservice")
            .map(String::as_str),
        Some("users")
    );
    assert!(
        rendered
            .owner_references()
            .iter()
            .any(|o| o.kind == "Microservice" && o.uid == uid),
        "{:?}",
        rendered.owner_references()
    );
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "impostor", "labels": {"weir.dev/microservice": "users"}}
        }))?,
    )
    .await?;
    let token = |account: &'static str, audience: &'static str, pod: Option<(String, String)>| {
        let sas = sas.clone();
        async move {
            let req = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![audience.to_string()],
                    expiration_seconds: Some(600),
                    bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(name),
                        uid: Some(uid),
                    }),
                },
                ..Default::default()
            };
            let got: TokenRequest = sas
                .create_subresource("token", account, &PostParams::default(), &req)
                .await?;
            Ok::<_, anyhow::Error>(got.status.context("token status")?.token)
        }
    };
    let users = WorkloadId::microservice("cluster.local", ns, "users");
    let ask = |token: String, id: WorkloadId| {
        let (url, bundle) = (url.clone(), bundle.clone());
        async move {
            let key = WorkloadKey::generate()?;
            let csr = key.csr(&id)?;
            Ok::<_, anyhow::Error>(
                request_certificate_via(
                    &url,
                    Some(endpoint),
                    &bundle,
                    &token,
                    &csr,
                    Duration::from_secs(10),
                )
                .await,
            )
        }
    };
    // A token of the rendered account, audience weir: a certificate for users, to the bundle.
    let good = token("users-weir", "weir", None).await?;
    let chain = wait_for(
        "a certificate from the identity endpoint",
        Duration::from_secs(60),
        || {
            let (good, users) = (good.clone(), users.clone());
            let ask = &ask;
            async move {
                match ask(good, users).await? {
                    Ok(chain) => Ok(Some(chain)),
                    Err(ClientError::Connect(e)) => {
                        eprintln!("  (endpoint not answering yet: {e})");
                        Ok(None)
                    }
                    Err(e) => Err(anyhow::anyhow!("refused: {e}")),
                }
            }
        },
    )
    .await?;
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    let certs: Vec<CertificateDer<'_>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
    assert_eq!(peer_identity(&certs)?, users);
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        bundle.roots(),
        weir_identity::tls::provider(),
    )
    .build()?
    .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())?;
    eprintln!(
        "  ok: {users} issued by the operator, verified to the bundle in {system}/weir-issuer"
    );

    let refused = |r: Result<String, ClientError>| match r {
        Err(ClientError::Refused { status, reason }) => (status, reason),
        Ok(chain) => {
            let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap_or_default();
            panic!(
                "expected a refusal, got a certificate for {:?}",
                peer_identity(&certs)
            )
        }
        Err(e) => panic!("expected a refusal, got {e}"),
    };
    // The same token, a CSR for another workload: 403, nothing signed.
    let payments = WorkloadId::microservice("cluster.local", ns, "payments");
    let (status, reason) = refused(ask(good.clone(), payments).await?);
    assert_eq!(status, 403, "{reason}");
    eprintln!("  ok: a CSR for another workload: {status} {reason}");
    // A token of the same account for the API server's audience: 401.
    let (status, reason) = refused(
        ask(
            token("users-weir", "https://kubernetes.default.svc", None).await?,
            users.clone(),
        )
        .await?,
    );
    assert_eq!(status, 401, "{reason}");
    eprintln!("  ok: a token for another audience: {status} {reason}");
    // The labelled account Weir did not render (no owner): 403.
    let (status, reason) =
        refused(ask(token("impostor", "weir", None).await?, users.clone()).await?);
    assert_eq!(status, 403, "{reason}");
    eprintln!(
        "  ok: another workload's CSR 403, another audience 401, an account Weir did not render 403"
    );

    // A token bound to a pod works while the pod exists and not once it is gone. The pod is
    // never scheduled (a node that does not exist): only the object matters.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "holder"},
                "spec": {"serviceAccountName": "users-weir", "nodeName": "no-such-node",
                    "containers": [{"name": "c", "image": "weir-e2e/none:0"}]}
            }))?,
        )
        .await?;
    let bound = token(
        "users-weir",
        "weir",
        Some((
            "holder".into(),
            pod.metadata.uid.clone().context("pod uid")?,
        )),
    )
    .await?;
    ask(bound.clone(), users.clone())
        .await?
        .map_err(|e| anyhow::anyhow!("bound token refused while its pod exists: {e}"))?;
    pods.delete(
        "holder",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    wait_for("the holder pod gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("holder").await?.is_none().then_some(())) }
    })
    .await?;
    // The API server keeps a token it authenticated for 10 s (kube-apiserver's token cache),
    // so the refusal comes within that, not at once.
    let gone = Instant::now();
    let (status, reason) = wait_for(
        "the pod-bound token refused once its pod is gone",
        Duration::from_secs(30),
        || {
            let (bound, users) = (bound.clone(), users.clone());
            let ask = &ask;
            async move {
                match ask(bound, users).await? {
                    Err(ClientError::Refused { status, reason }) => Ok(Some((status, reason))),
                    Ok(_) => Ok(None),
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                }
            }
        },
    )
    .await?;
    assert_eq!(status, 401, "{reason}");
    assert!(
        gone.elapsed() < Duration::from_secs(15),
        "refused only after {:?}",
        gone.elapsed()
    );
    eprintln!(
        "  ok: a pod-bound token refused {:.1}s after its pod was deleted ({reason})",
        gone.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The mesh in pods: the chart is installed with `mtls.enabled` (tests/e2e/local-cluster.sh,
/// `mtls.mode=permissive` so that the other suites' calls from the node still reach their
/// services), and `users` says `inbound.mtls: strict`. Every pod gets its certificate (else it
/// would not be Ready); `orders` calls `users` over mutual TLS and is admitted by name; a Saga's
/// coordinator calls it as `<ns>/saga/checkout`; a pod calling it in plaintext and the node's
/// plain curl get 403 `mtls-required`; a workload with a certificate that `users` does not
/// admit gets 403 `caller-not-allowed`; once that workload declares the dependency, the
/// operator re-renders `users` and the call goes through, without `users`' pods rolling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_the_declared_graph_in_a_real_cluster() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-mesh-e2e").await?;
    let result = mesh_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

/// The operator's trust bundle (`weir-issuer`'s `ca.crt`), and its identity endpoint's URL and
/// cluster address.
async fn identity_endpoint(client: &Client) -> Result<(String, String, SocketAddr)> {
    use k8s_openapi::api::core::v1::Secret;
    let system = env_or("WEIR_E2E_OPERATOR_NAMESPACE", "weir-system");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &system);
    // Read quietly when it is there (the rotation test reads it in a loop); waited for, and
    // said, when it is not yet.
    let issuer = match secrets.get_opt("weir-issuer").await? {
        Some(s) => s,
        None => {
            wait_for(
                "the operator's weir-issuer Secret",
                Duration::from_secs(60),
                || {
                    let secrets = secrets.clone();
                    async move { Ok(secrets.get_opt("weir-issuer").await?) }
                },
            )
            .await?
        }
    };
    let bundle_pem = issuer
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .context("weir-issuer has ca.crt")?;
    let svc = Api::<Service>::namespaced(client.clone(), &system)
        .get("weir-identity")
        .await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    Ok((
        bundle_pem,
        format!("https://weir-identity.{system}.svc:8443"),
        format!("{ip}:8443").parse()?,
    ))
}

/// The IP of the running pod of Microservice `app`.
async fn pod_ip(pods: &Api<Pod>, app: &str) -> Result<String> {
    let admin = pod_admin(pods, app).await?;
    Ok(admin.ip().to_string())
}

async fn mesh_run(client: &Client, ns: &str) -> Result<()> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    use weir_identity::tls::{CurrentCert, TrustBundle};
    use weir_identity::{WorkloadId, WorkloadKey};
    let long = Duration::from_secs(240);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let pull = env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent");
    let echo = |name: &str, extra: serde_json::Value| -> Result<Microservice> {
        let mut spec = json!({"image": "ghcr.io/weir-dev/weir-echo:0.1.0", "port": 8080,
                              "imagePullPolicy": pull});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        Ok(serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
            "metadata": {"name": name}, "spec": spec
        }))?)
    };
    let apply = |ms: Microservice| {
        let mss = mss.clone();
        async move {
            mss.patch(
                &ms.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&ms),
            )
            .await
        }
    };
    let nats_image = env_or("WEIR_E2E_NATS_IMAGE", "nats:2.10-alpine");
    let brokers: Api<weir_crds::Broker> = Api::namespaced(client.clone(), ns);
    brokers
        .patch(
            "bus",
            &PatchParams::apply(MANAGER),
            &Patch::Apply(json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "bus"},
                "spec": {"kind": "nats", "managed": {"image": nats_image}}
            })),
        )
        .await?;
    let sagas: Api<weir_crds::Saga> = Api::namespaced(client.clone(), ns);
    sagas
        .patch(
            "checkout",
            &PatchParams::apply(MANAGER),
            &Patch::Apply(json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Saga", "metadata": {"name": "checkout"},
                "spec": {"broker": "bus", "trigger": {"http": true},
                         "steps": [{"name": "ask", "action": {"http": {"microservice": "users", "method": "GET", "path": "/"}}}]}
            })),
        )
        .await?;
    apply(echo("users", json!({"inbound": {"mtls": "strict"}}))?).await?;
    apply(echo(
        "orders",
        json!({"dependencies": [{"name": "users", "microservice": "users"}]}),
    )?)
    .await?;
    // Calls users' pods in plaintext: its dependency is a URL, which names no peer identity.
    let stranger_plain =
        json!({"dependencies": [{"name": "users", "url": "http://users-weir-endpoints:15001"}]});
    apply(echo("stranger", stranger_plain)?).await?;
    let started = Instant::now();
    for name in ["users", "orders", "stranger"] {
        ready(&mss, name, long).await?;
    }
    eprintln!(
        "  ok: users, orders and stranger Ready, each sidecar with its certificate ({:.1}s)",
        started.elapsed().as_secs_f64()
    );

    // What the operator rendered: an account per Microservice, the namespace's bundle.
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get("users-weir")
        .await?;
    assert!(
        sa.owner_references()
            .iter()
            .any(|o| o.kind == "Microservice" && o.name == "users")
    );
    let (bundle_pem, url, endpoint) = identity_endpoint(client).await?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("weir-trust-bundle")
        .await?;
    assert_eq!(
        cm.data.as_ref().and_then(|d| d.get("ca.crt")),
        Some(&bundle_pem),
        "the namespace's bundle is the issuer Secret's ca.crt"
    );
    let users_pod = pods
        .list(&ListParams::default().labels("weir.dev/microservice=users"))
        .await?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .context("a users pod")?;
    let spec = users_pod.spec.as_ref().context("pod spec")?;
    assert_eq!(spec.service_account_name.as_deref(), Some("users-weir"));
    let users_pod_name = users_pod.name_any();
    let users_ip = pod_ip(&pods, "users").await?;
    let users_inbound: SocketAddr = format!("{users_ip}:15001").parse()?;
    let users_admin: SocketAddr = format!("{users_ip}:15090").parse()?;

    // orders → users over mutual TLS, admitted by name.
    let orders_addr = service_addr(&svcs, "orders").await?;
    let (status, body) = wait_for(
        "orders' call reaching users",
        Duration::from_secs(60),
        || async move {
            let (s, b) = http_get(orders_addr, "/call/users/")?;
            Ok((s != 0 && s != 502 && s != 503).then_some((s, b)))
        },
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        v["upstream"]["caller"],
        json!(format!("{ns}/orders")),
        "{body}"
    );
    eprintln!("  ok: orders → users over mutual TLS, users' app told {ns}/orders");

    // The Saga's coordinator calls users as the Saga.
    let saga_svc = wait_for("the checkout coordinator's Service", long, || {
        let svcs = svcs.clone();
        async move { Ok(svcs.get_opt("checkout-saga").await?) }
    })
    .await?;
    let saga_ip = saga_svc.spec.and_then(|s| s.cluster_ip).context("IP")?;
    let saga_addr: SocketAddr = format!("{saga_ip}:80").parse()?;
    let (status, body) = wait_for("a checkout saga completing", long, || async move {
        match weir_e2e::http_post(saga_addr, "/v1/sagas/checkout?wait=8s", "{}") {
            Ok((200, b)) => Ok(Some((200, b))),
            Ok((s, b)) if s >= 400 && s != 502 && s != 503 => Ok(Some((s, b))),
            Ok(_) | Err(_) => Ok(None),
        }
    })
    .await?;
    assert!(
        status == 200 && body.to_lowercase().contains("completed"),
        "{status} {body}"
    );
    let (_, um) = http_get(users_admin, "/metrics")?;
    let allowed = |caller: &str| {
        metric(
            &um,
            &format!(
                r#"weir_inbound_authorizations_total{{transport="mtls",caller="{caller}",decision="allowed"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(allowed(&format!("{ns}/orders")) >= 1.0, "{um}");
    assert!(allowed(&format!("{ns}/saga/checkout")) >= 1.0, "{um}");
    eprintln!("  ok: the checkout saga completed, its call admitted as {ns}/saga/checkout");

    // Plaintext from another pod, and from the node: refused under strict.
    let stranger_addr = service_addr(&svcs, "stranger").await?;
    // Its URL names users' headless Service, whose first lookup may have come before users'
    // pod was ready (a negative answer the cluster's DNS keeps a while): 502 until it resolves.
    let (status, body) = wait_for(
        "stranger's sidecar reaching users' pod",
        Duration::from_secs(90),
        || async move {
            let (s, b) = http_get(stranger_addr, "/call/users/")?;
            Ok((s != 502 && s != 503).then_some((s, b)))
        },
    )
    .await?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("mtls-required"), "{body}");
    let (status, body) = http_get(users_inbound, "/")?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("mtls-required"), "{body}");
    eprintln!("  ok: plaintext from the stranger pod and from the node: 403 mtls-required");

    // A certificate users does not admit: stranger's own, from the identity endpoint with a
    // token of its rendered account.
    let bundle = TrustBundle::from_pem(&bundle_pem)?;
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["weir".into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let got: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_subresource("token", "stranger-weir", &PostParams::default(), &req)
        .await?;
    let token = got.status.context("token")?.token;
    let stranger_id = WorkloadId::microservice("cluster.local", ns, "stranger");
    let key = WorkloadKey::generate()?;
    let chain = weir_identity::endpoint::request_certificate_via(
        &url,
        Some(endpoint),
        &bundle,
        &token,
        &key.csr(&stranger_id)?,
        Duration::from_secs(10),
    )
    .await?;
    let cert = CurrentCert::new();
    cert.install(&chain, key.private_key())?;
    let users_id = WorkloadId::microservice("cluster.local", ns, "users");
    let (status, body) = {
        let (bundle, cert, users_id) = (bundle.clone(), cert.clone(), users_id.clone());
        tokio::task::spawn_blocking(move || {
            weir_testkit::mtls::get(users_inbound, &bundle, cert, &users_id, "/")
        })
        .await??
    };
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("caller-not-allowed"), "{body}");
    eprintln!("  ok: {stranger_id} with its own certificate: 403 caller-not-allowed");

    // stranger declares the dependency: the operator re-renders users, whose sidecar reloads
    // the allowed set from its ConfigMap (the kubelet refreshes the volume within a minute or
    // so), and its pods do not roll.
    apply(echo(
        "stranger",
        json!({"dependencies": [{"name": "users", "microservice": "users"}]}),
    )?)
    .await?;
    let declared = Instant::now();
    wait_for(
        "stranger admitted by users",
        Duration::from_secs(180),
        || {
            let (bundle, cert, users_id) = (bundle.clone(), cert.clone(), users_id.clone());
            async move {
                let got = tokio::task::spawn_blocking(move || {
                    weir_testkit::mtls::get(users_inbound, &bundle, cert, &users_id, "/")
                })
                .await?;
                Ok(matches!(got, Ok((200, _))).then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "  ok: stranger admitted {:.1}s after it declared the dependency",
        declared.elapsed().as_secs_f64()
    );
    // Through its own sidecar too, once it has rolled to the new config.
    wait_for(
        "stranger's sidecar calling users over mutual TLS",
        long,
        || async move {
            let (s, b) = http_get(stranger_addr, "/call/users/")?;
            Ok((s == 200 && b.contains(&format!("{ns}/stranger"))).then_some(()))
        },
    )
    .await?;
    let now: Vec<String> = pods
        .list(&ListParams::default().labels("weir.dev/microservice=users"))
        .await?
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    assert_eq!(now, [users_pod_name], "users' pods did not roll");
    eprintln!("  ok: stranger's sidecar → users over mutual TLS; users' pod is the same one");
    Ok(())
}

/// examples/shop in pods, under the mesh: every Microservice but the gateway (called from the
/// node here) made `strict`, so that each call between the shop's pods must be mutual TLS and
/// admitted by the graph. An order placed at the gateway is confirmed by the place-order saga
/// (its coordinator calling catalog, payments and orders as `<ns>/saga/place-order`), and its
/// read shows the customer (orders → users); the sidecars' counters show who called whom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_in_a_real_cluster_over_mutual_tls() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-shop-e2e").await?;
    let result = shop_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

async fn shop_run(client: &Client, ns: &str) -> Result<()> {
    use serde::Deserialize as _;
    let long = Duration::from_secs(300);
    let pull = env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent");
    let nats_image = env_or("WEIR_E2E_NATS_IMAGE", "nats:2.10-alpine");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
    let mut names = Vec::new();
    for file in ["broker.yaml", "queues.yaml", "services.yaml", "saga.yaml"] {
        let text = std::fs::read_to_string(dir.join(file))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v = serde_json::Value::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(a) = v["metadata"].as_object_mut() {
                a.remove("annotations");
            }
            let pp = PatchParams::apply(MANAGER);
            match kind.as_str() {
                "Broker" => {
                    v["spec"]["managed"]["image"] = json!(nats_image);
                    Api::<weir_crds::Broker>::namespaced(client.clone(), ns)
                        .patch(&name, &pp, &Patch::Apply(&v))
                        .await?;
                }
                "Queue" => {
                    Api::<weir_crds::Queue>::namespaced(client.clone(), ns)
                        .patch(&name, &pp, &Patch::Apply(&v))
                        .await?;
                }
                "Saga" => {
                    Api::<weir_crds::Saga>::namespaced(client.clone(), ns)
                        .patch(&name, &pp, &Patch::Apply(&v))
                        .await?;
                }
                "Microservice" => {
                    v["spec"]["imagePullPolicy"] = json!(pull);
                    if name != "gateway" {
                        v["spec"]["inbound"]["mtls"] = json!("strict");
                    }
                    Api::<Microservice>::namespaced(client.clone(), ns)
                        .patch(&name, &pp, &Patch::Apply(&v))
                        .await?;
                    names.push(name);
                }
                other => bail!("examples/shop/{file}: unexpected kind {other:?}"),
            }
        }
    }
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    for name in &names {
        ready(&mss, name, long).await?;
    }
    eprintln!(
        "  ok: the shop's {} Microservices Ready, each pod with its certificate ({:.1}s)",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let gateway = service_addr(&svcs, "gateway").await?;
    let order = json!({"userId": "u1", "items": [{"productId": "p1", "qty": 2}],
                       "cardToken": "tok_visa", "address": "1 Main St"})
    .to_string();
    // The first order waits for the saga's coordinator and the queues' consumers.
    let id = wait_for("an order accepted by the gateway", long, || {
        let order = order.clone();
        async move {
            match weir_e2e::http_post(gateway, "/orders", &order) {
                Ok((201, b)) => {
                    let v: serde_json::Value = serde_json::from_str(&b)?;
                    Ok(v["id"].as_str().map(str::to_string))
                }
                _ => Ok(None),
            }
        }
    })
    .await?;
    let path = format!("/orders/{id}");
    let settled = wait_for(&format!("order {id} settled"), long, || {
        let path = path.clone();
        async move {
            let (_, b) = http_get(gateway, &path)?;
            let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
            Ok(matches!(v["status"].as_str(), Some("confirmed" | "failed")).then_some(v))
        }
    })
    .await?;
    assert_eq!(settled["status"], "confirmed", "{settled}");
    assert_eq!(settled["customer"]["name"], "Ada Lovelace", "{settled}");
    eprintln!("  ok: order {id} confirmed by the saga, its customer read from users");

    // Who called whom, over mutual TLS, as each callee's sidecar counted it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let admitted = |text: &str, caller: &str| {
        metric(
            text,
            &format!(
                r#"weir_inbound_authorizations_total{{transport="mtls",caller="{ns}/{caller}",decision="allowed"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    for (callee, callers) in [
        ("users", &["orders"][..]),
        ("catalog", &["saga/place-order"][..]),
        ("payments", &["saga/place-order"][..]),
        ("orders", &["gateway", "saga/place-order"][..]),
    ] {
        // Replicas balance the calls: the counts of every pod of the callee.
        let list = pods
            .list(&ListParams::default().labels(&format!("weir.dev/microservice={callee}")))
            .await?;
        let mut texts = Vec::new();
        for p in list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
                texts.push(http_get(format!("{ip}:15090").parse()?, "/metrics")?.1);
            }
        }
        for caller in callers {
            let n: f64 = texts.iter().map(|t| admitted(t, caller)).sum();
            assert!(
                n >= 1.0,
                "{callee} admitted {ns}/{caller} {n} times:\n{texts:?}"
            );
        }
        let refused: f64 = texts
            .iter()
            .map(|t| {
                metric(
                    t,
                    r#"weir_inbound_authorizations_total{transport="plaintext",caller="",decision="refused"}"#,
                )
                .unwrap_or(0.0)
            })
            .sum();
        assert_eq!(refused, 0.0, "no plaintext call reached {callee}");
    }
    let users_ip = pod_ip(&pods, "users").await?;
    let (status, body) = http_get(format!("{users_ip}:15001").parse()?, "/users/u1")?;
    assert_eq!(status, 403, "{body}");
    eprintln!(
        "  ok: users admitted orders, the saga called catalog, payments and orders over mutual TLS; users refuses the node's plaintext"
    );
    Ok(())
}

/// Rotation through the operator's Secrets, as docs/security.md tells an operator to do it:
/// (1) a second anchor added to `weir-issuer`'s `ca.crt` reaches every namespace's
/// `weir-trust-bundle`; (2) an issuer of the new anchor put in `weir-issuer` is taken by the
/// identity endpoint without a restart, for the certificates it signs and for its own serving
/// certificate (a client holding the new anchor alone reaches it). The Secret is put back
/// afterwards and the test waits until the endpoint serves from it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_and_anchor_rotation_through_the_operators_secrets() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    use k8s_openapi::api::core::v1::Secret;
    let client = Client::try_default().await?;
    let system = env_or("WEIR_E2E_OPERATOR_NAMESPACE", "weir-system");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &system);
    let original = secrets.get("weir-issuer").await?;
    let ns = namespace(&client, "weir-rotation-e2e").await?;
    let result = rotation_run(&client, &ns, &secrets).await;
    // Put the issuer back, and wait until the endpoint serves and signs from it again.
    let restored = restore_issuer(&client, &secrets, &original).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result.and(restored)
}

fn secret_text(s: &k8s_openapi::api::core::v1::Secret, key: &str) -> Result<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .with_context(|| format!("Secret {} has no {key}", s.name_any()))
}

/// A certificate for `users` of `ns` asked with `bundle` (the endpoint verified by it), and
/// whether its chain verifies to `bundle`; `Ok(None)` when the endpoint is refused or down.
async fn users_certificate(client: &Client, ns: &str, bundle_pem: &str) -> Result<Option<bool>> {
    let (_, url, endpoint) = identity_endpoint(client).await?;
    users_certificate_at(client, ns, &url, endpoint, bundle_pem).await
}

/// [`users_certificate`] from the endpoint at `endpoint` (a Service or one pod).
async fn users_certificate_at(
    client: &Client,
    ns: &str,
    url: &str,
    endpoint: SocketAddr,
    bundle_pem: &str,
) -> Result<Option<bool>> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    use weir_identity::tls::TrustBundle;
    use weir_identity::{WorkloadId, WorkloadKey};
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["weir".into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let got: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_subresource("token", "users-weir", &PostParams::default(), &req)
        .await?;
    let token = got.status.context("token")?.token;
    let bundle = TrustBundle::from_pem(bundle_pem)?;
    let key = WorkloadKey::generate()?;
    let id = WorkloadId::microservice("cluster.local", ns, "users");
    let chain = match weir_identity::endpoint::request_certificate_via(
        url,
        Some(endpoint),
        &bundle,
        &token,
        &key.csr(&id)?,
        Duration::from_secs(10),
    )
    .await
    {
        Ok(c) => c,
        // Refused (TLS, while the endpoint still serves the previous issuer) or not answering.
        Err(_) => return Ok(None),
    };
    let certs: Vec<CertificateDer<'_>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
    let verified = rustls::server::WebPkiClientVerifier::builder_with_provider(
        bundle.roots(),
        weir_identity::tls::provider(),
    )
    .build()?
    .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
    .is_ok();
    Ok(Some(verified))
}

async fn rotation_run(
    client: &Client,
    ns: &str,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::time::SystemTime;
    use weir_identity::Authority;
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let mut users = example("users")?;
    users.spec.replicas = 0;
    mss.create(&PostParams::default(), &users).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let bundle_now = |want: String| {
        let cms = cms.clone();
        async move {
            let cm = cms.get_opt("weir-trust-bundle").await?;
            Ok(cm
                .and_then(|c| c.data)
                .and_then(|d| d.get("ca.crt").cloned())
                .filter(|b| *b == want)
                .map(|_| ()))
        }
    };
    let issuer = secrets.get("weir-issuer").await?;
    let old_bundle = secret_text(&issuer, "ca.crt")?;
    wait_for("the namespace's bundle", Duration::from_secs(60), || {
        bundle_now(old_bundle.clone())
    })
    .await?;

    // (1) Both anchors in the bundle.
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let new_anchor = Authority::new_anchor("cluster.local", now, 30 * day)?;
    let both = format!("{old_bundle}{}", new_anchor.cert_pem());
    secrets
        .patch(
            "weir-issuer",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"ca.crt": both}})),
        )
        .await?;
    let step = Instant::now();
    wait_for(
        "both anchors in the namespace's weir-trust-bundle",
        Duration::from_secs(150),
        || bundle_now(both.clone()),
    )
    .await?;
    eprintln!(
        "  ok: (1) the second anchor reached the namespace's bundle in {:.1}s",
        step.elapsed().as_secs_f64()
    );

    // (2) An issuer of the new anchor: the endpoint signs with it and serves with it.
    let new_issuer = Authority::new_issuer(&new_anchor, "cluster.local", now, 30 * day)?;
    secrets
        .patch(
            "weir-issuer",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"tls.crt": new_issuer.cert_pem(),
                                                 "tls.key": new_issuer.key_pem()}})),
        )
        .await?;
    let step = Instant::now();
    let new_only = new_anchor.cert_pem();
    wait_for(
        "a certificate of the new issuer, from an endpoint the new anchor alone vouches for",
        Duration::from_secs(150),
        || {
            let new_only = new_only.clone();
            async move {
                Ok(users_certificate(client, ns, &new_only)
                    .await?
                    .filter(|v| *v))
            }
        },
    )
    .await?;
    eprintln!(
        "  ok: (2) the endpoint signs and serves with the new issuer {:.1}s after the Secret changed, no restart",
        step.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn restore_issuer(
    client: &Client,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    original: &k8s_openapi::api::core::v1::Secret,
) -> Result<()> {
    let data: serde_json::Map<String, serde_json::Value> = ["tls.crt", "tls.key", "ca.crt"]
        .iter()
        .map(|k| Ok(((*k).to_string(), json!(secret_text(original, k)?))))
        .collect::<Result<_>>()?;
    secrets
        .patch(
            "weir-issuer",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": data})),
        )
        .await?;
    let bundle = secret_text(original, "ca.crt")?;
    // A namespace of its own to ask in (the test's may be gone).
    let ns = namespace(client, "weir-rotation-back").await?;
    let mss: Api<Microservice> = Api::namespaced(client.clone(), &ns);
    let mut users = example("users")?;
    users.spec.replicas = 0;
    mss.create(&PostParams::default(), &users).await?;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    wait_for("the account users-weir", Duration::from_secs(60), || {
        let sas = sas.clone();
        async move { Ok(sas.get_opt("users-weir").await?.map(|_| ())) }
    })
    .await?;
    let back = wait_for(
        "the endpoint back on the original issuer",
        Duration::from_secs(150),
        || {
            let (ns, bundle) = (ns.clone(), bundle.clone());
            async move {
                Ok(users_certificate(client, &ns, &bundle)
                    .await?
                    .filter(|v| *v))
            }
        },
    )
    .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    back.map(|_| ())
}

/// Every operator replica serves the identity endpoint, leader or not (a sidecar starting while
/// leadership moves must still get its certificate): the operator scaled to two replicas, each
/// pod's endpoint asked directly gives a certificate, the one not holding the Lease included.
/// Scaled back to one afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_replica_issues_certificates_leader_or_not() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let system = env_or("WEIR_E2E_OPERATOR_NAMESPACE", "weir-system");
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &system);
    let ns = namespace(&client, "weir-replicas-e2e").await?;
    let result = replicas_run(&client, &ns, &system, &deps).await;
    let _ = deps
        .patch(
            "weir",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

async fn replicas_run(
    client: &Client,
    ns: &str,
    system: &str,
    deps: &Api<Deployment>,
) -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let long = Duration::from_secs(180);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let mut users = example("users")?;
    users.spec.replicas = 0;
    mss.create(&PostParams::default(), &users).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    wait_for("the account users-weir", Duration::from_secs(60), || {
        let sas = sas.clone();
        async move { Ok(sas.get_opt("users-weir").await?.map(|_| ())) }
    })
    .await?;
    deps.patch(
        "weir",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), system);
    let running = wait_for("two operator pods ready", long, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=weir"))
                .await?;
            let ready: Vec<(String, String)> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .filter_map(|p| Some((p.name_any(), p.status.as_ref()?.pod_ip.clone()?)))
                .collect();
            Ok((ready.len() == 2).then_some(ready))
        }
    })
    .await?;
    let holder = Api::<Lease>::namespaced(client.clone(), system)
        .get("weir-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let (bundle_pem, url, _) = identity_endpoint(client).await?;
    let mut standby_issued = false;
    for (pod, ip) in &running {
        let at: SocketAddr = format!("{ip}:8443").parse()?;
        let got = wait_for(
            &format!("a certificate from {pod}'s endpoint"),
            Duration::from_secs(60),
            || {
                let (url, bundle_pem) = (url.clone(), bundle_pem.clone());
                async move { users_certificate_at(client, ns, &url, at, &bundle_pem).await }
            },
        )
        .await?;
        assert!(got, "{pod}: the certificate verifies to the bundle");
        let role = if *pod == holder { "leader" } else { "standby" };
        standby_issued |= *pod != holder;
        eprintln!("  ok: {pod} ({role}) issued a certificate for {ns}/users");
    }
    assert!(
        standby_issued,
        "a replica not holding the Lease ({holder}) issued one"
    );
    Ok(())
}

/// `spec.autoscaling` with the operator in the cluster: `api` (CPU) gets a
/// HorizontalPodAutoscaler it owns, which sets the Deployment's count (the operator applies none);
/// a count set by hand is not undone by the operator's next apply; `worker` (queue lag and CPU)
/// says KEDA is missing (the test cluster has none) and keeps its CPU target; turning autoscaling
/// off deletes the autoscaler and gives `replicas` back to the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_in_a_real_cluster() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = namespace(&client, "weir-autoscaling-e2e").await?;
    let result = autoscaling_run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

async fn autoscaling_run(client: &Client, ns: &str) -> Result<()> {
    use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/autoscaling");
    let mut objects = Vec::new();
    for file in ["broker.yaml", "services.yaml"] {
        let text = std::fs::read_to_string(dir.join(file))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            use serde::Deserialize as _;
            objects.push(serde_json::Value::deserialize(doc)?);
        }
    }
    let long = Duration::from_secs(120);
    let pull = env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent");
    for o in &mut objects {
        if o["kind"] == "Microservice" {
            o["spec"]["imagePullPolicy"] = json!(pull);
        }
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let plural = format!("{}s", kind.to_lowercase());
        let ar = kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("weir.dev", "v1alpha1", &kind),
            &plural,
        );
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&*o))
            .await
            .with_context(|| format!("apply {kind}/{name}"))?;
    }
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);

    // api: its HorizontalPodAutoscaler, owned by it, scales the Deployment up to minReplicas.
    let api_uid = mss.get("api").await?.uid().context("uid")?;
    let hpa = wait_for("HorizontalPodAutoscaler api", long, || {
        let hpas = hpas.clone();
        async move { Ok(hpas.get_opt("api").await?) }
    })
    .await?;
    let spec = hpa.spec.clone().context("HPA spec")?;
    assert_eq!(
        (
            spec.min_replicas,
            spec.max_replicas,
            spec.target_cpu_utilization_percentage
        ),
        (Some(2), 10, Some(70))
    );
    assert_eq!(spec.scale_target_ref.name, "api");
    let owner = &hpa.metadata.owner_references.as_ref().context("owner")?[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Microservice", api_uid.as_str())
    );
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    wait_for("the autoscaler brings api to 2 pods", long, || {
        let deps = deps.clone();
        async move {
            Ok(deps
                .get_opt("api")
                .await?
                .filter(|d| replicas(d) == Some(2))
                .map(|_| ()))
        }
    })
    .await?;
    wait_for("api's status names its autoscaler", long, || {
        let mss = mss.clone();
        async move {
            let ms = mss.get("api").await?;
            let a = ms.status.as_ref().and_then(|s| s.autoscaling.clone());
            let cond = ms
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Autoscaling");
            Ok(
                a.filter(|a| a.scaler.as_deref() == Some("HorizontalPodAutoscaler"))
                    .and(
                        cond.filter(|c| {
                            c.status == "True" && c.reason == "HorizontalPodAutoscaler"
                        }),
                    ),
            )
        }
    })
    .await?;

    // A count set by hand (within the autoscaler's range) stays through the operator's next
    // apply: an edit of api makes it apply the Deployment again.
    deps.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await?;
    mss.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"autoscaling": {"maxReplicas": 11}}})),
    )
    .await?;
    let generation = mss.get("api").await?.metadata.generation;
    wait_for("the operator re-applied api after the edit", long, || {
        let mss = mss.clone();
        let hpas = hpas.clone();
        async move {
            let ms = mss.get("api").await?;
            let current = ms.status.as_ref().and_then(|s| s.observed_generation) == generation;
            let hpa_max = hpas.get("api").await?.spec.map(|s| s.max_replicas);
            Ok((current && hpa_max == Some(11)).then_some(()))
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        replicas(&deps.get("api").await?),
        Some(3),
        "the count set by hand was undone"
    );

    // worker: queue lag needs KEDA, which this cluster lacks; its CPU target still applies.
    let message = wait_for("worker says KEDA is not installed", long, || {
        let mss = mss.clone();
        async move {
            let ms = mss.get("worker").await?;
            Ok(ms
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| {
                    c.type_ == "Autoscaling"
                        && c.reason == "KedaNotInstalled"
                        && c.status == "False"
                })
                .map(|c| c.message))
        }
    })
    .await?;
    eprintln!("  worker's Autoscaling condition: {message}");
    assert!(
        message.contains("HorizontalPodAutoscaler/worker (1-20 replicas)"),
        "{message}"
    );
    let worker_hpa = hpas.get("worker").await?.spec.context("spec")?;
    assert_eq!(
        (worker_hpa.min_replicas, worker_hpa.max_replicas),
        (Some(1), 20)
    );

    // Autoscaling off: the autoscaler goes, the spec's count comes back.
    mss.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"autoscaling": null, "replicas": 1}})),
    )
    .await?;
    wait_for(
        "api's autoscaler deleted and replicas 1 applied",
        long,
        || {
            let deps = deps.clone();
            let hpas = hpas.clone();
            async move {
                let gone = hpas.get_opt("api").await?.is_none();
                let one = replicas(&deps.get("api").await?) == Some(1);
                Ok((gone && one).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}
