//! The chart's web dashboard in a real cluster (`dashboard.enabled=true`, read-only, as
//! tests/e2e/local-cluster.sh installs it): examples/hello applied, calls sent through orders to
//! users, then `weir dashboard --no-open` (a `kubectl port-forward` to svc/weir-dashboard) and
//! the dashboard's `/api/snapshot` shows both Microservices with their requests counted, read
//! through the API server's pod proxy; an action answers 403. Run by tests/e2e/local-cluster.sh
//! (`WEIR_E2E=1 WEIR_E2E_OPERATOR=cluster`).

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir_crds::Microservice;
use weir_e2e::{env_or, http_get, http_post, wait_for};

const MANAGER: &str = "weir-e2e";

fn in_cluster_operator() -> bool {
    if !weir_e2e::enabled("dashboard_e2e") {
        return false;
    }
    if std::env::var("WEIR_E2E_OPERATOR").as_deref() != Ok("cluster") {
        eprintln!(
            "SKIPPED dashboard_e2e: it needs the chart installed in the cluster with dashboard.enabled=true (WEIR_E2E_OPERATOR=cluster; tests/e2e/local-cluster.sh does it)"
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

fn weir_bin() -> PathBuf {
    std::env::var("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/weir"))
}

/// `weir dashboard` running; stopped with Ctrl-C (SIGINT) so it stops its port-forward.
struct Forward(Child);

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_dashboard_shows_the_calls_read_through_the_pod_proxy() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = format!("weir-dashboard-e2e-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let result = run(&client, &ns).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    result
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

/// The service of the snapshot for `name` in `ns`: `name` when the dashboard shows one
/// namespace, `<ns>.<name>` when it shows several.
fn service<'a>(snap: &'a Value, ns: &str, name: &str) -> Option<&'a Value> {
    let qualified = format!("{ns}.{name}");
    snap["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == qualified.as_str() || (s["name"] == name && snap["namespace"] == ns))
}

async fn run(client: &Client, ns: &str) -> Result<()> {
    let release_ns = env_or("WEIR_E2E_RELEASE_NAMESPACE", "weir-system");
    Api::<Service>::namespaced(client.clone(), &release_ns)
        .get("weir-dashboard")
        .await
        .with_context(|| {
            format!("Service weir-dashboard in {release_ns}: install the chart with --set dashboard.enabled=true")
        })?;
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    for name in ["users", "orders"] {
        mss.patch(
            name,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(&example(name)?),
        )
        .await?;
    }
    let long = Duration::from_secs(240);
    ready(&mss, "users", long).await?;
    ready(&mss, "orders", long).await?;

    // Calls through orders to users: both sidecars count them.
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get("orders")
        .await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let orders: SocketAddr = format!("{ip}:80").parse()?;
    let mut ok = 0;
    for _ in 0..20 {
        if let Ok((200, _)) = http_get(orders, "/call/users/") {
            ok += 1;
        }
    }
    assert!(ok >= 15, "{ok} of 20 calls through orders answered 200");

    // `weir dashboard`: a port-forward to svc/weir-dashboard, the URL printed once it answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(weir_bin())
        .args([
            "dashboard",
            "-n",
            &release_ns,
            "--port",
            &port.to_string(),
            "--no-open",
            "--timeout",
            "60s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("weir dashboard (cargo build -p weir first, or set WEIR_BIN)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let _forward = Forward(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let url = format!("http://127.0.0.1:{port}/");
    let line = rx
        .recv_timeout(Duration::from_secs(90))
        .context("weir dashboard printed no URL")?;
    assert!(line.contains(&url), "weir dashboard said {line:?}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (st, html) = http_get(addr, "/")?;
    assert_eq!(st, 200);
    assert!(html.contains("<html"), "the page: {html:.200}");

    // The snapshot: both Microservices, their sidecars up and their requests counted (read
    // through the pod proxy: the chart sets no Prometheus). The dashboard lists the cluster
    // every 10 s and reads every 1.5 s.
    let deadline = Instant::now() + Duration::from_secs(120);
    let snap = loop {
        let (st, body) = http_get(addr, "/api/snapshot")?;
        let snap: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let counted = |name: &str| {
            service(&snap, ns, name).is_some_and(|s| {
                s["state"] == "up" && s["inbound"]["total"].as_f64().unwrap_or(0.0) > 0.0
            })
        };
        if st == 200 && counted("orders") && counted("users") {
            break snap;
        }
        if Instant::now() > deadline {
            bail!("the dashboard never showed orders and users with requests: {st} {body:.3000}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(snap["source"], "cluster", "{snap}");
    assert_eq!(snap["actions"], false, "read-only by default");
    let orders_total = service(&snap, ns, "orders").unwrap()["inbound"]["total"]
        .as_f64()
        .unwrap();
    assert!(orders_total >= 15.0, "orders inbound total {orders_total}");
    let from = service(&snap, ns, "orders").unwrap()["name"].clone();
    let edge = snap["calls"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["from"] == from && c["dependency"] == "users")
        })
        .with_context(|| format!("no call orders → users: {snap}"))?;
    assert!(
        edge["window"]["total"].as_f64().unwrap_or(0.0) > 0.0,
        "orders → users counted: {edge}"
    );
    assert_eq!(edge["breaker"], "closed", "{edge}");

    // Read-only: an action answers 403 and says how to allow it.
    let (st, body) = http_post(addr, "/api/sagas/none/i1/cancel", "{}")?;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("dashboard.actions=true"), "{body}");
    Ok(())
}
