//! The Microservice operator end to end, against a real API server: CRDs installed, the
//! operator running, an example applied, its children and status observed, an edit rolled
//! out, a deleted child put back, and the children garbage-collected with their owner.

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weir_crds::Microservice;
use weir_e2e::{env_or, wait_for};

const MANAGER: &str = "weir-e2e";

struct Operator(Option<Child>);

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn install_crds(client: &Client, minor: u32) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in weir_crds::crd::all_for_server(minor) {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("apply CRD {name}"))?;
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let c = crds.get(&name).await?;
                    let ok = c
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(ok.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

async fn server_minor(client: &Client) -> Result<u32> {
    let v = client.apiserver_version().await?;
    Ok(v.minor.trim_end_matches('+').parse().unwrap_or(0))
}

fn start_operator(namespace: &str, legacy: bool) -> Result<Operator> {
    if env_or("WEIR_E2E_OPERATOR", "local") == "cluster" {
        eprintln!("  using the operator that runs in the cluster");
        return Ok(Operator(None));
    }
    let bin = std::env::var("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/weir"));
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build -p weir` first or set WEIR_BIN",
            bin.display()
        );
    }
    let mut cmd = Command::new(&bin);
    cmd.args([
        "operator",
        "--watch-namespace",
        namespace,
        "--metrics-addr",
        "127.0.0.1:0",
        "--log-text",
    ])
    .args([
        "--proxy-image",
        &env_or("WEIR_E2E_PROXY_IMAGE", "ghcr.io/weir-dev/weir-proxy:0.1.0"),
    ])
    .args([
        "--proxy-image-pull-policy",
        &env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent"),
    ])
    .stdout(Stdio::inherit())
    .stderr(Stdio::inherit());
    if legacy {
        cmd.arg("--legacy-sidecar");
    }
    Ok(Operator(Some(
        cmd.spawn()
            .with_context(|| format!("start {}", bin.display()))?,
    )))
}

fn example(name: &str, app_image: &str, pull: &str) -> Result<Microservice> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/hello/{name}.yaml"));
    let mut ms: Microservice = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    ms.spec.image = app_image.to_string();
    ms.spec.image_pull_policy = Some(pull.to_string());
    // The e2e cluster has no route to external URLs; keep only in-namespace dependencies.
    ms.spec.dependencies.retain(|d| d.microservice.is_some());
    Ok(ms)
}

fn condition(ms: &Microservice, type_: &str) -> Option<(String, String, String)> {
    ms.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microservice_lifecycle_on_a_real_cluster() -> Result<()> {
    if !weir_e2e::enabled("microservice_e2e") {
        return Ok(());
    }
    let client = Client::try_default().await.context("KUBECONFIG")?;
    let minor = server_minor(&client).await?;
    let legacy = minor < 29;
    let pods = std::env::var("WEIR_E2E_PODS").as_deref() == Ok("1");
    eprintln!(
        "cluster 1.{minor}: {} sidecar; pods {}",
        if legacy { "legacy" } else { "native" },
        if pods {
            "expected to run"
        } else {
            "not awaited"
        }
    );

    install_crds(&client, minor).await?;
    let ns = format!("weir-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let result = run_suite(&client, &ns, legacy, pods).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    result
}

async fn run_suite(client: &Client, ns: &str, legacy: bool, pods: bool) -> Result<()> {
    let _operator = start_operator(ns, legacy)?;
    let mss: Api<Microservice> = Api::namespaced(client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let app_image = env_or("WEIR_E2E_APP_IMAGE", "ghcr.io/weir-dev/weir-echo:0.1.0");
    let pull = env_or("WEIR_E2E_PULL_POLICY", "IfNotPresent");
    let long = Duration::from_secs(if pods { 240 } else { 60 });

    // orders first: its dependency is missing until users arrives.
    let orders = example("orders", &app_image, &pull)?;
    mss.patch(
        "orders",
        &PatchParams::apply(MANAGER),
        &Patch::Apply(&orders),
    )
    .await?;
    wait_for("orders reports DependencyNotFound: users", long, || {
        let mss = mss.clone();
        async move {
            let ms = mss.get("orders").await?;
            Ok(condition(&ms, "Degraded")
                .filter(|(s, r, m)| s == "True" && r == "DependencyNotFound" && m.contains("users"))
                .map(|_| ()))
        }
    })
    .await?;

    let users = example("users", &app_image, &pull)?;
    mss.patch("users", &PatchParams::apply(MANAGER), &Patch::Apply(&users))
        .await?;

    for name in ["orders", "users"] {
        let ms = mss.get(name).await?;
        let uid = ms.uid().unwrap();
        let d = wait_for(&format!("Deployment {name}"), long, || {
            let deps = deps.clone();
            async move { Ok(deps.get_opt(name).await?) }
        })
        .await?;
        let owner = &d
            .metadata
            .owner_references
            .as_ref()
            .context("owner references")?[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Microservice", uid.as_str())
        );
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let has_proxy = if legacy {
            pod.containers.iter().any(|c| c.name == "weir-proxy")
        } else {
            pod.init_containers.as_ref().is_some_and(|i| {
                i.iter().any(|c| {
                    c.name == "weir-proxy" && c.restart_policy.as_deref() == Some("Always")
                })
            })
        };
        assert!(has_proxy, "{name}: weir-proxy sidecar in the pod template");
        assert!(svcs.get_opt(name).await?.is_some(), "Service {name}");
        assert!(
            cms.get_opt(&format!("{name}-weir-proxy")).await?.is_some(),
            "ConfigMap {name}-weir-proxy"
        );
    }

    // Status catches up with the spec: observedGeneration, and the dependency now resolved;
    // it counts as ready (the Dependencies column) once a pod of users is ready, which only
    // happens where the images run.
    let want = if pods { "1/1" } else { "0/1" };
    wait_for(
        &format!("orders status current with dependencies {want}"),
        long,
        || {
            let mss = mss.clone();
            async move {
                let ms = mss.get("orders").await?;
                let st = ms.status.clone().unwrap_or_default();
                Ok((st.observed_generation == ms.metadata.generation
                    && st.dependency_summary.as_deref() == Some(want))
                .then_some(()))
            }
        },
    )
    .await?;
    if pods {
        for name in ["users", "orders"] {
            wait_for(&format!("{name} Ready=True"), long, || {
                let mss = mss.clone();
                async move {
                    Ok(condition(&mss.get(name).await?, "Ready")
                        .filter(|(s, _, _)| s == "True")
                        .map(|_| ()))
                }
            })
            .await?;
        }
    }

    // Edit: a new dependency timeout changes the sidecar config, hence the pod template hash.
    let before = deps.get("orders").await?;
    let hash_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("weir.dev/config-hash").cloned())
    };
    let old_hash = hash_of(&before).context("config hash annotation")?;
    let mut edited = example("orders", &app_image, &pull)?;
    edited.spec.dependencies[0].timeout = "750ms".into();
    mss.patch(
        "orders",
        &PatchParams::apply(MANAGER),
        &Patch::Apply(&edited),
    )
    .await?;
    let new_gen = mss.get("orders").await?.metadata.generation;
    wait_for(
        "edit rolled into the Deployment and the ConfigMap",
        long,
        || {
            let deps = deps.clone();
            let cms = cms.clone();
            let old_hash = old_hash.clone();
            async move {
                let d = deps.get("orders").await?;
                let cm = cms.get("orders-weir-proxy").await?;
                let cfg = cm
                    .data
                    .unwrap_or_default()
                    .get("proxy.json")
                    .cloned()
                    .unwrap_or_default();
                Ok((hash_of(&d).is_some_and(|h| h != old_hash)
                    && cfg.contains("\"timeoutMs\": 750"))
                .then_some(()))
            }
        },
    )
    .await?;
    wait_for("orders observedGeneration follows the edit", long, || {
        let mss = mss.clone();
        async move {
            let st = mss.get("orders").await?.status.unwrap_or_default();
            Ok((st.observed_generation == new_gen).then_some(()))
        }
    })
    .await?;
    if pods {
        wait_for(
            "orders rollout finished (Progressing=False, Ready=True)",
            long,
            || {
                let mss = mss.clone();
                async move {
                    let ms = mss.get("orders").await?;
                    let done = condition(&ms, "Progressing").is_some_and(|(s, _, _)| s == "False")
                        && condition(&ms, "Ready").is_some_and(|(s, _, _)| s == "True");
                    Ok(done.then_some(()))
                }
            },
        )
        .await?;
    }

    // A deleted child is put back; a drifted one is repaired.
    svcs.delete("users", &DeleteParams::default()).await?;
    wait_for("Service users recreated", long, || {
        let svcs = svcs.clone();
        async move {
            Ok(svcs
                .get_opt("users")
                .await?
                .filter(|s| s.metadata.deletion_timestamp.is_none())
                .map(|_| ()))
        }
    })
    .await?;
    deps.patch(
        "users",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await?;
    wait_for(
        "Deployment users scaled back to the spec's 2 replicas",
        long,
        || {
            let deps = deps.clone();
            async move {
                Ok(
                    (deps.get("users").await?.spec.and_then(|s| s.replicas) == Some(2))
                        .then_some(()),
                )
            }
        },
    )
    .await?;

    // Deleting the Microservice garbage-collects its children.
    mss.delete("users", &DeleteParams::background()).await?;
    wait_for(
        "users' Deployment, Service and ConfigMap collected",
        long,
        || {
            let (deps, svcs, cms) = (deps.clone(), svcs.clone(), cms.clone());
            async move {
                let gone = deps.get_opt("users").await?.is_none()
                    && svcs.get_opt("users").await?.is_none()
                    && cms.get_opt("users-weir-proxy").await?.is_none();
                Ok(gone.then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}
