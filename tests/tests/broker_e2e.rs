//! A managed Broker in a real cluster, the operator running in a pod (`helm install`): the
//! Broker's StatefulSet and Service appear, `Connected` turns True with the server's version,
//! the Queue is declared on that broker, and an event published through one Microservice's
//! sidecar reaches another's app through it (an invalid one is refused with 422); deleting the
//! Broker garbage-collects what it became. Once with a managed NATS, once with a managed Redis.
//! And a broker outage of 30 s: the publishing and consuming pods stay Ready and keep serving
//! HTTP, publishing answers 503 meanwhile, and events flow again once the broker is back.
//! Run by tests/e2e/local-cluster.sh (`WEIR_E2E=1 WEIR_E2E_OPERATOR=cluster`;
//! `WEIR_E2E_NATS_IMAGE` and `WEIR_E2E_REDIS_IMAGE` name images the cluster can run, by
//! default `nats:2.10-alpine` and `redis:7.2-alpine`).

use anyhow::{Context as _, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir_crds::{Broker, Microservice, Queue};
use weir_e2e::{env_or, http_get, http_post, wait_for};

const MANAGER: &str = "weir-e2e";

fn in_cluster_operator() -> bool {
    if !weir_e2e::enabled("broker_e2e") {
        return false;
    }
    if std::env::var("WEIR_E2E_OPERATOR").as_deref() != Ok("cluster") {
        eprintln!(
            "SKIPPED broker_e2e: it needs the operator installed in the cluster (WEIR_E2E_OPERATOR=cluster; tests/e2e/local-cluster.sh does it)"
        );
        return false;
    }
    true
}

/// The documents of an example file, in order.
fn example_docs(file: &str) -> Result<Vec<serde_yaml::Value>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{file}"));
    let text = std::fs::read_to_string(&path)?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(serde_yaml::Value::deserialize)
        .collect::<Result<_, _>>()?)
}

fn condition_true(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> bool {
    conds.iter().any(|c| c.type_ == t && c.status == "True")
}

/// The events example (Queue signups, Microservices accounts and mailer) on Broker `bus`.
async fn apply_events_example(
    queues: &Api<Queue>,
    mss: &Api<Microservice>,
    pp: &PatchParams,
) -> Result<()> {
    let mut queue: Queue = serde_yaml::from_value(example_docs("events/signups.yaml")?[0].clone())?;
    queue.spec.broker = "bus".into();
    queues.patch("signups", pp, &Patch::Apply(&queue)).await?;
    for doc in example_docs("events/services.yaml")? {
        let mut ms: Microservice = serde_yaml::from_value(doc)?;
        ms.spec.image_pull_policy = Some(env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent"));
        let name = ms.metadata.name.clone().context("name")?;
        mss.patch(&name, pp, &Patch::Apply(&ms)).await?;
    }
    Ok(())
}

/// Waits until the events example's two Microservices are Ready for their current spec.
async fn events_services_ready(mss: &Api<Microservice>, timeout: Duration) -> Result<()> {
    for name in ["accounts", "mailer"] {
        wait_for(&format!("{name} Ready=True"), timeout, || {
            let mss = mss.clone();
            async move {
                let ms = mss.get(name).await?;
                let ok = ms.status.as_ref().is_some_and(|s| {
                    s.observed_generation == ms.metadata.generation
                        && condition_true(&s.conditions, "Ready")
                });
                Ok(ok.then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

async fn service_addr(svcs: &Api<Service>, name: &str) -> Result<SocketAddr> {
    let s = svcs.get(name).await?;
    let ip = s.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    Ok(format!("{ip}:80").parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_broker_carries_events_between_microservices() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    for (kind, image) in [
        ("nats", env_or("WEIR_E2E_NATS_IMAGE", "nats:2.10-alpine")),
        ("redis", env_or("WEIR_E2E_REDIS_IMAGE", "redis:7.2-alpine")),
    ] {
        eprintln!("== managed {kind} broker ({image})");
        let ns = format!("weir-broker-e2e-{kind}-{}", std::process::id());
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
        let result = run(&client, &ns, kind, &image).await;
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::background())
            .await;
        result.with_context(|| format!("managed {kind} broker"))?;
    }
    Ok(())
}

async fn run(client: &Client, ns: &str, kind: &str, image: &str) -> Result<()> {
    let long = Duration::from_secs(240);
    let pp = PatchParams::apply(MANAGER).force();
    let brokers: Api<Broker> = Api::namespaced(client.clone(), ns);
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);

    // The events example on a managed broker instead of an external one.
    let broker: Broker = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "bus"},
        "spec": {"kind": kind, "managed": {"image": image}},
    }))?;
    brokers.patch("bus", &pp, &Patch::Apply(&broker)).await?;
    apply_events_example(&queues, &mss, &pp).await?;

    // The Broker becomes a StatefulSet and a Service it owns.
    let sts = wait_for("StatefulSet bus", long, || {
        let sets = sets.clone();
        async move { Ok(sets.get_opt("bus").await?) }
    })
    .await?;
    let owner = &sts.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Broker", "bus")
    );
    assert!(svcs.get_opt("bus").await?.is_some(), "Service bus");

    let version = wait_for("Broker bus Connected=True", long, || {
        let brokers = brokers.clone();
        async move {
            let b = brokers.get("bus").await?;
            let s = b.status.unwrap_or_default();
            Ok(condition_true(&s.conditions, "Connected").then_some(s.server_version))
        }
    })
    .await?;
    eprintln!("managed broker connected, server {version:?}");
    assert!(version.is_some_and(|v| !v.is_empty()));

    wait_for("Queue signups Ready=True", long, || {
        let queues = queues.clone();
        async move {
            let q = queues.get("signups").await?;
            let s = q.status.unwrap_or_default();
            Ok(condition_true(&s.conditions, "Ready").then_some(()))
        }
    })
    .await?;
    events_services_ready(&mss, long).await?;

    // accounts publishes through its sidecar; mailer's app receives it through its own.
    let accounts = service_addr(&svcs, "accounts").await?;
    let mailer = service_addr(&svcs, "mailer").await?;
    let event = r#"{"userId":"u-e2e","email":"e2e@example.com"}"#;
    let (status, body) = wait_for(
        "a publish accepted",
        Duration::from_secs(60),
        || async move {
            let (status, body) = http_post(accounts, "/publish/signups", event)?;
            Ok((status == 202).then_some((status, body)))
        },
    )
    .await?;
    eprintln!("publish: {status} {body}");
    let received = wait_for(
        "mailer received u-e2e",
        Duration::from_secs(60),
        || async move {
            let (status, body) = http_get(mailer, "/received")?;
            Ok((status == 200 && body.contains("u-e2e")).then_some(body))
        },
    )
    .await?;
    assert!(received.contains("UserSignedUp"), "{received}");
    let (status, body) = http_post(accounts, "/publish/signups", r#"{"userId":""}"#)?;
    assert_eq!(status, 422, "an event that fails the schema: {body}");

    // Deleting the Broker deletes its StatefulSet and Service (owner references).
    brokers.delete("bus", &DeleteParams::foreground()).await?;
    wait_for("StatefulSet bus garbage-collected", long, || {
        let sets = sets.clone();
        let svcs = svcs.clone();
        async move {
            let gone = sets.get_opt("bus").await?.is_none() && svcs.get_opt("bus").await?.is_none();
            Ok(gone.then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// A broker outage does not take publishing or consuming pods out of their Service. The Broker
/// points at a NATS Deployment of the test's own (an unmanaged Broker: the operator would put a
/// managed one's StatefulSet back at once); it is scaled to zero for 30 s, its JetStream store on
/// a hostPath so that it comes back with its streams, as a broker with a volume does. Meanwhile
/// accounts (publisher) and mailer (consumer) must stay Ready (three failed probes, 30 s, would
/// have taken them out before) and answer HTTP through their Services every second, and a
/// publish gets 503; after the broker is back an event published through accounts reaches
/// mailer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_keeps_the_http_path_up() -> Result<()> {
    if !in_cluster_operator() {
        return Ok(());
    }
    let client = Client::try_default().await?;
    let ns = format!("weir-broker-outage-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let store = format!("/var/lib/weir-e2e/{ns}-nats");
    let result = outage(&client, &ns, &store).await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
    let _ = std::fs::remove_dir_all(&store);
    result
}

async fn outage(client: &Client, ns: &str, store: &str) -> Result<()> {
    let long = Duration::from_secs(240);
    let pp = PatchParams::apply(MANAGER).force();
    let image = env_or("WEIR_E2E_NATS_IMAGE", "nats:2.10-alpine");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let nats = |replicas: i32| -> Result<Deployment> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "nats"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "nats"}},
                "template": {
                    "metadata": {"labels": {"app": "nats"}},
                    "spec": {
                        "containers": [{
                            "name": "nats", "image": image,
                            "imagePullPolicy": env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent"),
                            "command": ["nats-server", "-js", "-sd", "/data"],
                            "ports": [{"containerPort": 4222, "protocol": "TCP"}],
                            "readinessProbe": {"tcpSocket": {"port": 4222}, "periodSeconds": 1},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                        }],
                        "volumes": [{"name": "data",
                                     "hostPath": {"path": store, "type": "DirectoryOrCreate"}}]
                    }
                }
            }
        }))?)
    };
    deploys.patch("nats", &pp, &Patch::Apply(&nats(1)?)).await?;
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "nats"},
        "spec": {"selector": {"app": "nats"}, "ports": [{"port": 4222, "protocol": "TCP"}]}
    }))?;
    svcs.patch("nats", &pp, &Patch::Apply(&svc)).await?;
    let broker: Broker = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "bus"},
        "spec": {"kind": "nats", "url": format!("nats://nats.{ns}:4222")}
    }))?;
    Api::<Broker>::namespaced(client.clone(), ns)
        .patch("bus", &pp, &Patch::Apply(&broker))
        .await?;
    apply_events_example(&Api::namespaced(client.clone(), ns), &mss, &pp).await?;
    events_services_ready(&mss, long).await?;
    let accounts = service_addr(&svcs, "accounts").await?;
    let mailer = service_addr(&svcs, "mailer").await?;
    let publish = |id: &'static str| async move {
        let event = format!(r#"{{"userId":"{id}","email":"{id}@example.com"}}"#);
        http_post(accounts, "/publish/signups", &event)
    };
    wait_for(
        "a publish accepted",
        Duration::from_secs(60),
        || async move { Ok((publish("u-before").await?.0 == 202).then_some(())) },
    )
    .await?;

    // The broker goes away for 30 s.
    deploys.patch("nats", &pp, &Patch::Apply(&nats(0)?)).await?;
    wait_for("the broker pod gone", long, || {
        let pods = pods.clone();
        async move {
            let n = pods
                .list(&ListParams::default().labels("app=nats"))
                .await?
                .items
                .len();
            Ok((n == 0).then_some(()))
        }
    })
    .await?;
    let start = Instant::now();
    let (mut calls, mut refused) = (0, 0);
    while start.elapsed() < Duration::from_secs(30) {
        for (name, addr) in [("accounts", accounts), ("mailer", mailer)] {
            let (status, body) = http_get(addr, "/")?;
            assert_eq!(
                status,
                200,
                "{name} through its Service {:.1}s into the outage: {body}",
                start.elapsed().as_secs_f64()
            );
            calls += 1;
        }
        let (status, body) = publish("u-during").await?;
        assert_eq!(status, 503, "a publish while the broker is down: {body}");
        refused += 1;
        for p in pods
            .list(&ListParams::default().labels("weir.dev/microservice"))
            .await?
            .items
        {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            assert!(
                ready,
                "pod {:?} not Ready {:.1}s into the outage",
                p.metadata.name,
                start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "  ok: 30 s without the broker: {calls} HTTP calls answered 200, pods Ready, {refused} publishes answered 503"
    );

    // Back: publishing and consuming resume.
    deploys.patch("nats", &pp, &Patch::Apply(&nats(1)?)).await?;
    wait_for("a publish accepted again", long, || async move {
        Ok((publish("u-after").await?.0 == 202).then_some(()))
    })
    .await?;
    wait_for(
        "mailer received u-after",
        Duration::from_secs(60),
        || async move {
            let (status, body) = http_get(mailer, "/received")?;
            Ok((status == 200 && body.contains("u-after")).then_some(()))
        },
    )
    .await?;
    Ok(())
}
