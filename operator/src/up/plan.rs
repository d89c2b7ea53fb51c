//! The plan of a local run: what runs where. Every replica of every Microservice gets ports of
//! its own on loopback and a sidecar config built by the operator's own code
//! ([`proxy_config::build`], [`render_messaging::build`]); pure but for the port picks.

use super::process::free_port;
use crate::manifest::{Loaded, Object};
use crate::render::mesh;
use crate::render::messaging::{self as render_messaging, ResolvedQueue};
use crate::render::proxy_config::{self, Placement, dependency_env_name};
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use weir_crds::Microservice;
use weir_crds::proxy::{EndpointsConfig, ProxyConfig};

/// Annotation naming the local command that runs a Microservice's app (run with `sh -c`).
pub const LOCAL_COMMAND: &str = "weir.dev/local-command";

/// Annotation naming the directory the local command runs in (relative to the manifest's file).
pub const LOCAL_WORKDIR: &str = "weir.dev/local-workdir";

/// Annotation fixing the local port of a Microservice's sidecar inbound listener (its URL), so
/// instructions such as `curl http://127.0.0.1:8080/...` hold on every run.
pub const LOCAL_PORT: &str = "weir.dev/local-port";

/// Annotation with a note printed once everything is ready (how to use the service); `{url}`
/// stands for the service's local URL.
pub const LOCAL_USAGE: &str = "weir.dev/local-usage";

/// Ports of one service on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalPorts {
    pub app: u16,
    pub inbound: u16,
    pub admin: u16,
    pub outbound: Vec<u16>,
}

/// Placement on one machine: everything on loopback, each service's sidecar on its own ports,
/// another Microservice reached at its sidecar's inbound port (as its Service would route).
pub struct LocalPlacement<'a> {
    pub me: &'a LocalPorts,
    pub all: &'a BTreeMap<String, LocalPorts>,
    /// Every replica of every Microservice: a dependency's endpoints.
    pub replicas: &'a BTreeMap<String, Vec<LocalPorts>>,
    /// The run's identity key (signs `x-user-*` headers between sidecars), if any.
    pub identity_key: Option<&'a Path>,
}

impl Placement for LocalPlacement<'_> {
    fn inbound(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.inbound))
    }
    fn admin(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.admin))
    }
    fn app(&self, _port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.app))
    }
    fn outbound(&self, index: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.outbound[index]))
    }
    fn identity_key_file(&self) -> Option<String> {
        self.identity_key.map(|p| p.to_string_lossy().into_owned())
    }
    fn microservice_url(&self, _namespace: &str, name: &str) -> String {
        // A missing target was refused when the manifests were loaded.
        let port = self.all.get(name).map(|p| p.inbound).unwrap_or(1);
        format!("http://127.0.0.1:{port}")
    }
    /// Each replica's sidecar, as the pods behind a headless Service: calls are balanced
    /// across them per request.
    fn microservice_endpoints(&self, _namespace: &str, name: &str) -> Option<EndpointsConfig> {
        let replicas = self.replicas.get(name).filter(|r| !r.is_empty())?;
        Some(EndpointsConfig {
            dns: None,
            addresses: replicas
                .iter()
                .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p.inbound)))
                .collect(),
            refresh_ms: weir_crds::proxy::DEFAULT_REFRESH_MS,
        })
    }
}

/// Points an edge's Secret-backed key files at their local stand-ins, `<dir>/<name>/<key>`.
fn local_edge_secrets(
    obj: &str,
    ms: &Microservice,
    config: &mut ProxyConfig,
    dir: Option<&Path>,
) -> Result<()> {
    let (Some(edge), Some(spec)) = (config.edge.as_mut(), ms.spec.edge.as_ref()) else {
        return Ok(());
    };
    let refs = [
        (
            "spec.edge.jwt.jwksSecretRef",
            &spec.jwt.jwks_secret_ref,
            &mut edge.jwt.jwks_file,
        ),
        (
            "spec.edge.jwt.hmacSecretRef",
            &spec.jwt.hmac_secret_ref,
            &mut edge.jwt.hmac_secret_file,
        ),
    ];
    for (field, secret, file) in refs {
        let Some(secret) = secret else { continue };
        let Some(dir) = dir else {
            bail!(
                "{obj}: {field}: Secret {:?} is not available locally: pass --secrets-dir DIR with the key in DIR/{}/{}",
                secret.name,
                secret.name,
                secret.key
            );
        };
        let path = dir.join(&secret.name).join(&secret.key);
        if !path.is_file() {
            bail!(
                "{obj}: {field}: {} not found (the local stand-in for Secret {:?}, key {:?})",
                path.display(),
                secret.name,
                secret.key
            );
        }
        *file = Some(path.to_string_lossy().into_owned());
    }
    Ok(())
}

/// What `weir up` will run for one replica of a Microservice.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// The replica's name: the Microservice's name when it has one replica, else
    /// `<name>-<index>` (`orders-0`, `orders-1`), as log prefixes and the state file show it.
    pub name: String,
    /// The Microservice's name: what its sidecar consumes and publishes as, and its apps'
    /// `SERVICE_NAME`, the same for every replica (they share the queue's consumer).
    pub microservice: String,
    /// Index among the Microservice's replicas; dependants call replica 0.
    pub replica: usize,
    /// `None` for an edge without an app (the sidecar alone routes).
    pub command: Option<String>,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub ports: LocalPorts,
    pub config: ProxyConfig,
}

/// Whether the manifests need a broker (queues, publishers or consumers).
pub fn needs_broker(loaded: &[Loaded]) -> bool {
    loaded.iter().any(|l| match &l.object {
        Object::Queue(_) | Object::Broker(_) | Object::Saga(_) => true,
        Object::Microservice(m) => !m.spec.publishes.is_empty() || !m.spec.consumes.is_empty(),
    })
}

/// The input's Queues (schemas resolved) and a Broker for every name they use, all pointing at
/// the local broker.
pub fn local_messaging(
    loaded: &[Loaded],
    broker_url: &str,
) -> Result<(
    BTreeMap<String, ResolvedQueue>,
    BTreeMap<String, weir_crds::Broker>,
)> {
    let mut queues = BTreeMap::new();
    let mut brokers = BTreeMap::new();
    for l in loaded {
        if let Object::Queue(q) = &l.object {
            let name = q.metadata.name.clone().unwrap_or_default();
            let schema =
                render_messaging::resolve_schema(q.spec.schema.as_ref(), None).map_err(|e| {
                    anyhow!(
                        "{}: Queue/{name}: {e} (weir up reads no ConfigMaps: inline the schema)",
                        l.file.display()
                    )
                })?;
            let kind = weir_broker::admin::kind_of_url(broker_url)
                .unwrap_or_default()
                .name();
            let broker: weir_crds::Broker = serde_json::from_value(serde_json::json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
                "metadata": {"name": q.spec.broker},
                "spec": {"url": broker_url, "kind": kind}
            }))?;
            brokers.insert(q.spec.broker.clone(), broker);
            queues.insert(
                name,
                ResolvedQueue {
                    spec: q.spec.clone(),
                    schema,
                },
            );
        }
    }
    Ok((queues, brokers))
}

/// Plans the local run: ports, sidecar configs, app commands and env. Pure but for port picks.
/// With a broker URL, publishers and consumers get their bridge config pointing at it.
pub fn plan(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: Option<&str>,
) -> Result<Vec<LocalService>> {
    plan_with(loaded, namespace, broker_url, &PlanOptions::default())
}

/// How [`plan_with`] places a system on this machine.
#[derive(Debug, Default)]
pub struct PlanOptions<'a> {
    /// Ignore `weir.dev/local-port`: every port chosen free (a second copy of a system).
    pub any_port: bool,
    /// The run's identity key file (signs `x-user-*` headers between sidecars).
    pub identity_key: Option<&'a Path>,
    /// Local stand-ins for Secrets: `<dir>/<secret name>/<key>` (an edge's JWKS or HS256 key).
    pub secrets_dir: Option<&'a Path>,
    /// Mutual TLS between the sidecars, from the run's CA; `None`: plaintext.
    pub mesh: Option<PlanMesh<'a>>,
}

/// Where a local run's sidecars get their certificates.
#[derive(Debug, Clone, Copy)]
pub struct PlanMesh<'a> {
    pub issuer_url: &'a str,
    pub trust_bundle_file: &'a Path,
    /// `<dir>/<microservice>`: each Microservice's token.
    pub tokens_dir: &'a Path,
}

/// [`plan()`] with options.
pub fn plan_with(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: Option<&str>,
    opts: &PlanOptions,
) -> Result<Vec<LocalService>> {
    let identity_key = opts.identity_key;
    let (queues, brokers) = match broker_url {
        Some(url) => local_messaging(loaded, url)?,
        None => Default::default(),
    };
    let services: Vec<(&Loaded, &Microservice)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => Some((l, m)),
            _ => None,
        })
        .collect();
    if services.is_empty() {
        bail!("no Microservice in the input");
    }
    // Each replica on ports of its own, as each pod has its own address.
    let mut ports: BTreeMap<String, Vec<LocalPorts>> = BTreeMap::new();
    for (l, ms) in &services {
        let name = ms.metadata.name.clone().unwrap_or_default();
        let replicas = usize::try_from(ms.spec.replicas).unwrap_or(0);
        if replicas == 0 {
            eprintln!(
                "note: {}: Microservice/{name}: replicas: 0; not run (as in a cluster, calls to it find no one)",
                l.file.display()
            );
        }
        if ms.spec.autoscaling.is_some() {
            eprintln!(
                "note: {}: Microservice/{name}: spec.autoscaling applies in a cluster (a HorizontalPodAutoscaler or KEDA); here it runs spec.replicas: {replicas}",
                l.file.display()
            );
        }
        let fixed = ms
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LOCAL_PORT))
            .filter(|_| !opts.any_port && replicas > 0)
            .map(|p| {
                let port: u16 = p.parse().map_err(|_| {
                    anyhow!("Microservice/{name}: metadata.annotations[{LOCAL_PORT:?}]: {p:?} is not a port number")
                })?;
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
                    anyhow!("Microservice/{name}: metadata.annotations[{LOCAL_PORT:?}]: port {port} on 127.0.0.1 is not free ({e}); stop what uses it or change the annotation")
                })?;
                Ok::<u16, anyhow::Error>(port)
            })
            .transpose()?;
        let mut all = Vec::new();
        for replica in 0..replicas {
            let outbound = ms
                .spec
                .dependencies
                .iter()
                .map(|_| free_port())
                .collect::<Result<Vec<_>>>()?;
            all.push(LocalPorts {
                app: free_port()?,
                // The fixed port is the service's URL: replica 0's, the one dependants call.
                inbound: match fixed.filter(|_| replica == 0) {
                    Some(p) => p,
                    None => free_port()?,
                },
                admin: free_port()?,
                outbound,
            });
        }
        ports.insert(name, all);
    }
    // A dependant's sidecar balances a Microservice's calls over its replicas, and sends them
    // to replica 0 by name until it has (as a cluster's Service name stands for its pods); a
    // Microservice with no replica is missing here and its callers get connection refused.
    let first: BTreeMap<String, LocalPorts> = ports
        .iter()
        .filter_map(|(name, all)| Some((name.clone(), all.first()?.clone())))
        .collect();
    if first.is_empty() {
        bail!("every Microservice has replicas: 0: nothing to run");
    }
    // The graph, for each sidecar's allowed callers.
    let all_specs: Vec<(&str, &weir_crds::microservice::MicroserviceSpec)> = services
        .iter()
        .map(|&(_, m)| (m.metadata.name.as_deref().unwrap_or_default(), &m.spec))
        .collect();
    let sagas: Vec<(&str, &weir_crds::saga::SagaSpec)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Saga(s) => Some((s.metadata.name.as_deref().unwrap_or_default(), &s.spec)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (l, ms) in services {
        let microservice = ms.metadata.name.clone().unwrap_or_default();
        let obj = format!("{}: Microservice/{microservice}", l.file.display());
        let annotations = ms.metadata.annotations.clone().unwrap_or_default();
        let command = match annotations.get(LOCAL_COMMAND) {
            Some(c) => Some(c.clone()),
            // A pure edge: weir-proxy alone, as in its pod.
            None if ms.spec.image.is_empty() => None,
            None => bail!(
                "{obj}: metadata.annotations[{LOCAL_COMMAND:?}]: missing; weir up runs each app as a local command (it cannot run the image {:?} without a container runtime)",
                ms.spec.image
            ),
        };
        let base = l.file.parent().unwrap_or(Path::new("."));
        let workdir = match annotations.get(LOCAL_WORKDIR) {
            Some(d) => base.join(d),
            None => std::env::current_dir()?,
        };
        let replicas = &ports[&microservice];
        for (replica, me) in replicas.iter().enumerate() {
            let name = match replicas.len() {
                1 => microservice.clone(),
                _ => format!("{microservice}-{replica}"),
            };
            let placement = LocalPlacement {
                me,
                all: &first,
                replicas: &ports,
                identity_key,
            };
            let mut config = proxy_config::build(&microservice, namespace, &ms.spec, &placement)
                .map_err(|e| anyhow!("{obj}: {e}"))?;
            if let Some(pm) = &opts.mesh {
                let callers = mesh::callers(
                    namespace,
                    &microservice,
                    all_specs.iter().map(|(n, s)| (namespace, *n, *s)),
                    sagas.iter().map(|(n, s)| (namespace, *n, *s)),
                );
                let m = mesh::Mesh {
                    trust_domain: super::mtls::TRUST_DOMAIN.into(),
                    issuer_url: pm.issuer_url.into(),
                    trust_bundle_file: pm.trust_bundle_file.display().to_string(),
                    token_file: pm.tokens_dir.join(&microservice).display().to_string(),
                    default_mode: weir_crds::microservice::MtlsMode::Strict,
                };
                mesh::apply(&mut config, &ms.spec, &m, &callers);
            }
            local_edge_secrets(&obj, ms, &mut config, opts.secrets_dir)?;
            if broker_url.is_some() {
                let bridge = render_messaging::build(
                    &microservice,
                    namespace,
                    &ms.spec,
                    &queues,
                    &brokers,
                    "cluster.local",
                )
                .map_err(|e| anyhow!("{obj}: {e}"))?;
                config.messaging = bridge.map(|m| m.config);
            }
            let mut env = Vec::new();
            for e in &ms.spec.env {
                match &e.value {
                    Some(v) => env.push((e.name.clone(), v.clone())),
                    None if replica == 0 => eprintln!(
                        "note: {obj}: spec.env {}: valueFrom is not available locally; unset",
                        e.name
                    ),
                    None => {}
                }
            }
            for o in &config.outbound {
                env.push((dependency_env_name(&o.name), format!("http://{}", o.listen)));
            }
            env.push((
                "WEIR_SIDECAR_URL".into(),
                format!("http://127.0.0.1:{}", me.admin),
            ));
            env.push(("PORT".into(), me.app.to_string()));
            out.push(LocalService {
                name,
                microservice: microservice.clone(),
                replica,
                command: command.clone(),
                workdir: workdir.clone(),
                env,
                ports: me.clone(),
                config,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Schemas, load};

    #[test]
    fn plan_wires_dependencies_to_the_targets_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: users, annotations: {weir.dev/local-command: "weir-echo"}}
spec: {image: users:1}
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders, annotations: {weir.dev/local-command: "weir-echo"}}
spec:
  image: orders:1
  env: [{name: A, value: b}]
  dependencies: [{name: users, microservice: users}]
"#,
        )
        .unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let plan = plan(&loaded, "default", None).unwrap();
        let users = plan.iter().find(|s| s.name == "users").unwrap();
        let orders = plan.iter().find(|s| s.name == "orders").unwrap();
        assert_eq!(
            orders.config.outbound[0].upstream,
            format!("http://127.0.0.1:{}", users.ports.inbound)
        );
        assert_eq!(orders.config.inbound.app.port(), orders.ports.app);
        let env: BTreeMap<_, _> = orders.env.iter().cloned().collect();
        assert_eq!(
            env["USERS_URL"],
            format!("http://127.0.0.1:{}", orders.ports.outbound[0])
        );
        assert_eq!(env["PORT"], orders.ports.app.to_string());
        assert_eq!(env["A"], "b");
    }

    #[test]
    fn each_replica_has_its_own_ports_and_dependants_call_replica_0() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: users, annotations: {weir.dev/local-command: "weir-echo"}}
spec: {image: users:1, replicas: 3}
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders, annotations: {weir.dev/local-command: "weir-echo"}}
spec:
  image: orders:1
  dependencies: [{name: users, microservice: users}]
"#,
        )
        .unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let plan = plan(&loaded, "default", None).unwrap();
        let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["users-0", "users-1", "users-2", "orders"]);
        let users: Vec<&LocalService> = plan.iter().filter(|s| s.microservice == "users").collect();
        let mut ports = std::collections::BTreeSet::new();
        for (i, u) in users.iter().enumerate() {
            assert_eq!(u.replica, i);
            assert_eq!(
                u.config.service, "users",
                "the sidecar acts as the Microservice"
            );
            for p in [u.ports.app, u.ports.inbound, u.ports.admin] {
                assert!(ports.insert(p), "port {p} given twice");
            }
        }
        let orders = plan.iter().find(|s| s.name == "orders").unwrap();
        assert_eq!(
            orders.config.outbound[0].upstream,
            format!("http://127.0.0.1:{}", users[0].ports.inbound)
        );
    }

    #[test]
    fn a_microservice_without_local_command_is_refused_naming_the_annotation() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(&f, "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: a}\nspec: {image: a:1}\n").unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let e = plan(&loaded, "default", None).unwrap_err().to_string();
        assert!(
            e.contains("Microservice/a") && e.contains("weir.dev/local-command"),
            "{e}"
        );
    }
}
