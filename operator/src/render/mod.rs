//! What should exist for a Microservice: a Deployment (app + `weir-proxy`), a Service, the
//! headless Service of its pods (`<name>-weir-endpoints`) and the sidecar's ConfigMap. Pure functions: the operator applies their output, `weir render`
//! prints it, `weir up` runs it.

pub mod autoscaling;
pub mod broker;
pub mod mesh;
pub mod messaging;
pub mod proxy_config;
pub mod saga;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, ExecAction,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use proxy_config::{PodPlacement, dependency_env_name};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use weir_crds::Microservice;
use weir_crds::microservice::endpoints_service_name;
use weir_crds::proxy::{ADMIN_PORT, CONFIG_KEY, CONFIG_MOUNT_PATH, INBOUND_PORT, ProxyConfig};

/// Label on everything rendered for a Microservice, and the pods' selector.
pub const LABEL_MICROSERVICE: &str = "weir.dev/microservice";
/// Pod-template annotation holding the sidecar config's hash: a config change rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "weir.dev/config-hash";
/// Name of the sidecar container.
pub const PROXY_CONTAINER: &str = "weir-proxy";
/// Name of the app container.
pub const APP_CONTAINER: &str = "app";
/// Port of the Service in front of each Microservice.
pub const SERVICE_PORT: i32 = 80;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    #[error("metadata.{0}: missing (the object must have a name and a namespace)")]
    Metadata(&'static str),
}

/// Settings of the operator that shape what is rendered.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub proxy_image: String,
    pub proxy_image_pull_policy: Option<String>,
    /// Image of saga coordinators: the operator's own (`weir saga-coordinator` is a command of
    /// the `weir` binary), set by the chart from its `image` values.
    pub coordinator_image: String,
    pub coordinator_image_pull_policy: Option<String>,
    /// Sidecar as an init container with `restartPolicy: Always` (Kubernetes 1.29+); when false,
    /// a plain second container that waits for its readiness before the app starts.
    pub native_sidecar: bool,
    pub cluster_domain: String,
    /// Namespace used for objects that have none (e.g. `weir render` of a file without one).
    pub default_namespace: String,
    /// The mesh's mutual TLS in pods: each Microservice under a ServiceAccount of its own, with
    /// a projected `weir` token and the trust bundle, and the sidecar's `mtls` block.
    pub mesh: Option<MeshOptions>,
    /// KEDA's ScaledObject is served: `autoscaling.queueLag` renders one (see
    /// [`autoscaling`]). The operator sets it from the API server's discovery.
    pub keda: bool,
}

/// What pods need of the mesh's mutual TLS.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub trust_domain: String,
    /// The identity endpoint, as sidecars reach it.
    pub issuer_url: String,
    /// `spec.inbound.mtls` when left out.
    pub default_mode: weir_crds::microservice::MtlsMode,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            proxy_image: format!("ghcr.io/weir-dev/weir-proxy:{}", env!("CARGO_PKG_VERSION")),
            proxy_image_pull_policy: None,
            coordinator_image: format!("ghcr.io/weir-dev/weir:{}", env!("CARGO_PKG_VERSION")),
            coordinator_image_pull_policy: None,
            native_sidecar: true,
            cluster_domain: "cluster.local".into(),
            default_namespace: "default".into(),
            mesh: None,
            keda: true,
        }
    }
}

/// Everything one Microservice becomes.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub config: ProxyConfig,
    pub config_hash: String,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// The headless `<name>-weir-endpoints` Service of a Microservice (made by
    /// `endpoints_service`); `None` for a saga coordinator, which no sidecar calls.
    pub endpoints_service: Option<Service>,
    /// The ServiceAccount its pods run under, with the mesh's mutual TLS (its token is the
    /// workload's proof of identity): labelled for the Microservice and owned by it.
    pub service_account: Option<k8s_openapi::api::core::v1::ServiceAccount>,
    /// What scales it (`spec.autoscaling`); nothing for a saga coordinator.
    pub autoscalers: autoscaling::Autoscalers,
}

pub fn config_map_name(ms_name: &str) -> String {
    format!("{ms_name}-weir-proxy")
}

/// Labels shared by every object rendered for `name`.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), name.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "weir".to_string(),
        ),
        (LABEL_MICROSERVICE.to_string(), name.to_string()),
    ])
}

fn owner_reference(ms: &Microservice) -> Option<OwnerReference> {
    // An object from a file has no uid yet: no owner reference until it is on a cluster.
    ms.controller_owner_ref(&())
}

fn metadata(ms: &Microservice, name: String, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(&ms.name_any())),
        owner_references: owner_reference(ms).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Renders a Microservice for a cluster.
pub fn render(ms: &Microservice, opts: &RenderOptions) -> Result<Rendered, RenderError> {
    render_with(ms, opts, None)
}

/// Renders a Microservice with its pub/sub bridge config (see [`messaging::build`]).
pub fn render_with(
    ms: &Microservice,
    opts: &RenderOptions,
    bridge: Option<&messaging::Messaging>,
) -> Result<Rendered, RenderError> {
    render_in_mesh(ms, opts, bridge, &[])
}

/// [`render_with`], and with `opts.mesh` the sidecar's mutual TLS admitting `callers` (the
/// graph's, see [`mesh::callers`]).
pub fn render_in_mesh(
    ms: &Microservice,
    opts: &RenderOptions,
    bridge: Option<&messaging::Messaging>,
    callers: &[String],
) -> Result<Rendered, RenderError> {
    let name = ms
        .metadata
        .name
        .clone()
        .ok_or(RenderError::Metadata("name"))?;
    let namespace = ms
        .namespace()
        .unwrap_or_else(|| opts.default_namespace.clone());
    let placement = PodPlacement {
        cluster_domain: opts.cluster_domain.clone(),
    };
    let mut config = proxy_config::build(&name, &namespace, &ms.spec, &placement)?;
    config.messaging = bridge.map(|m| m.config.clone());
    if let Some(m) = &opts.mesh {
        let pod = mesh::pod_mesh(&m.trust_domain, &m.issuer_url, m.default_mode);
        mesh::apply(&mut config, &ms.spec, &pod, callers);
    }
    let config_json = serde_json::to_string_pretty(&config).expect("proxy config serializes");
    let config_hash = hash(&config_json);
    // The pods roll on a change of their config, but not of the callers they admit: the sidecar
    // reloads those from the ConfigMap, and a new caller must not restart its targets.
    let template_hash = match &config.mtls {
        Some(m) if !m.authorization.allow.is_empty() => {
            let mut without = config.clone();
            if let Some(m) = without.mtls.as_mut() {
                m.authorization.allow.clear();
            }
            hash(&serde_json::to_string_pretty(&without).expect("proxy config serializes"))
        }
        _ => config_hash.clone(),
    };

    let config_map = ConfigMap {
        metadata: metadata(ms, config_map_name(&name), &namespace),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config_json)])),
        ..Default::default()
    };
    let service = Service {
        metadata: metadata(ms, name.clone(), &namespace),
        spec: Some(ServiceSpec {
            selector: Some(pods_of(&name)),
            ports: Some(vec![inbound_service_port(ms, SERVICE_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let endpoints_service = endpoints_service(ms, &name, &namespace);
    let autoscalers = autoscaling::render(
        ms,
        &metadata(ms, name.clone(), &namespace),
        bridge,
        opts.keda,
    )?;
    let mut deployment = deployment(ms, &name, &namespace, &config, &template_hash, opts);
    if autoscalers.scales()
        && let Some(spec) = deployment.spec.as_mut()
    {
        // The autoscaler owns the count: applying one here would undo its every change.
        spec.replicas = None;
    }
    if let Some(secret) = bridge.and_then(|m| m.credentials_secret.as_deref()) {
        mount_broker_credentials(&mut deployment, secret);
    }
    mount_identity_and_edge_secrets(&mut deployment, &ms.spec);
    let service_account = opts.mesh.as_ref().map(|_| {
        let account = mesh::service_account_name(&name);
        mesh::mount_pod_identity(&mut deployment, &account, PROXY_CONTAINER);
        k8s_openapi::api::core::v1::ServiceAccount {
            metadata: metadata(ms, account, &namespace),
            ..Default::default()
        }
    });
    Ok(Rendered {
        config,
        config_hash,
        config_map,
        deployment,
        service,
        endpoints_service: Some(endpoints_service),
        service_account,
        autoscalers,
    })
}

/// The headless Service beside the Microservice's own, for its callers' sidecars: its A records
/// are the pods that are ready (`publishNotReadyAddresses: false`), so a caller resolving
/// `<name>-weir-endpoints` every few seconds (`outbound[].endpoints.dns`) learns where the
/// pods are, with no API-server watch per pod and nothing of the operator's on the request
/// path, and balances each call across them instead of each connection through the virtual IP.
/// Its one port is the pods' inbound sidecar.
fn endpoints_service(ms: &Microservice, name: &str, namespace: &str) -> Service {
    Service {
        metadata: metadata(ms, endpoints_service_name(name), namespace),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(false),
            selector: Some(pods_of(name)),
            ports: Some(vec![inbound_service_port(ms, i32::from(INBOUND_PORT))]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The selector of a Microservice's pods.
fn pods_of(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_MICROSERVICE.to_string(), name.to_string())])
}

/// A Service port onto the pods' inbound sidecar, which accepts HTTP/1.1 and HTTP/2 alike;
/// `appProtocol` says what the app behind it speaks, for tools that read it.
fn inbound_service_port(ms: &Microservice, port: i32) -> ServicePort {
    ServicePort {
        name: Some(service_port_name(ms.spec.protocol).into()),
        port,
        target_port: Some(IntOrString::String("weir-inbound".into())),
        protocol: Some("TCP".into()),
        app_protocol: Some(ms.spec.protocol.service_app_protocol().into()),
        ..Default::default()
    }
}

/// Mounts the Broker's credentials Secret into the sidecar at
/// [`messaging::CREDENTIALS_MOUNT_PATH`].
fn mount_broker_credentials(deployment: &mut Deployment, secret: &str) {
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    else {
        return;
    };
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: messaging::CREDENTIALS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let containers = pod
        .init_containers
        .iter_mut()
        .flatten()
        .chain(pod.containers.iter_mut());
    for c in containers.filter(|c| c.name == PROXY_CONTAINER) {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: messaging::CREDENTIALS_VOLUME.into(),
                mount_path: messaging::CREDENTIALS_MOUNT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            });
    }
}

/// Mounts Secrets into the sidecar: the namespace's identity key (optional: a namespace without
/// it simply trusts no `x-user-*` header) and, for an edge, its JWKS or HS256 Secret key.
fn mount_identity_and_edge_secrets(
    deployment: &mut Deployment,
    spec: &weir_crds::microservice::MicroserviceSpec,
) {
    use proxy_config::{EDGE_HMAC_FILE, EDGE_JWKS_FILE, IDENTITY_KEY_FILE, IDENTITY_SECRET};
    use std::path::Path;
    // (volume, secret, key in the Secret, file it becomes, optional)
    let mut mounts = vec![(
        "weir-identity",
        IDENTITY_SECRET.to_string(),
        proxy_config::IDENTITY_SECRET_KEY.to_string(),
        IDENTITY_KEY_FILE,
        true,
    )];
    if let Some(j) = spec.edge.as_ref().map(|e| &e.jwt) {
        if let Some(r) = &j.jwks_secret_ref {
            mounts.push((
                "weir-edge-jwks",
                r.name.clone(),
                r.key.clone(),
                EDGE_JWKS_FILE,
                false,
            ));
        }
        if let Some(r) = &j.hmac_secret_ref {
            mounts.push((
                "weir-edge-hmac",
                r.name.clone(),
                r.key.clone(),
                EDGE_HMAC_FILE,
                false,
            ));
        }
    }
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    else {
        return;
    };
    for (volume, secret, key, file, optional) in mounts {
        let file = Path::new(file);
        let dir = file
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                items: Some(vec![KeyToPath {
                    key,
                    path: name,
                    ..Default::default()
                }]),
                optional: optional.then_some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        let containers = pod
            .init_containers
            .iter_mut()
            .flatten()
            .chain(pod.containers.iter_mut());
        for c in containers.filter(|c| c.name == PROXY_CONTAINER) {
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: volume.into(),
                    mount_path: dir.clone(),
                    read_only: Some(true),
                    ..Default::default()
                });
        }
    }
}

fn hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

fn http_probe(path: &str, port: i32, spec: &weir_crds::microservice::ProbeSpec) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(spec.period_seconds),
        failure_threshold: Some(spec.failure_threshold),
        initial_delay_seconds: Some(spec.initial_delay_seconds).filter(|d| *d > 0),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn deployment(
    ms: &Microservice,
    name: &str,
    namespace: &str,
    config: &ProxyConfig,
    config_hash: &str,
    opts: &RenderOptions,
) -> Deployment {
    let spec = &ms.spec;
    let admin = i32::from(ADMIN_PORT);
    let config_file = format!("{CONFIG_MOUNT_PATH}/{CONFIG_KEY}");

    // The app reaches each dependency through its local sidecar port.
    let mut env: Vec<EnvVar> = spec.env.clone();
    for o in &config.outbound {
        env.push(EnvVar {
            name: dependency_env_name(&o.name),
            value: Some(format!("http://{}", o.listen)),
            ..Default::default()
        });
    }
    env.push(EnvVar {
        name: "WEIR_SIDECAR_URL".into(),
        value: Some(format!("http://127.0.0.1:{ADMIN_PORT}")),
        ..Default::default()
    });
    env.push(EnvVar {
        name: "PORT".into(),
        value: Some(spec.port.to_string()),
        ..Default::default()
    });

    let app = Container {
        name: APP_CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("app".into()),
            container_port: spec.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: spec.resources.clone(),
        // Probed through the sidecar, so the app may listen on loopback only.
        liveness_probe: Some(http_probe(
            "/app-health/liveness",
            admin,
            &spec.probes.liveness,
        )),
        readiness_probe: Some(http_probe(
            "/app-health/readiness",
            admin,
            &spec.probes.readiness,
        )),
        ..Default::default()
    };

    let proxy_probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(admin),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        timeout_seconds: Some(2),
        ..Default::default()
    };
    let mut proxy = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(opts.proxy_image.clone()),
        image_pull_policy: opts.proxy_image_pull_policy.clone(),
        args: Some(vec!["--config".into(), config_file.clone()]),
        env: Some(vec![EnvVar {
            name: "RUST_LOG".into(),
            value: Some("info".into()),
            ..Default::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("weir-inbound".into()),
                container_port: i32::from(INBOUND_PORT),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("weir-admin".into()),
                container_port: admin,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: "weir-proxy-config".into(),
            mount_path: CONFIG_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        liveness_probe: Some(proxy_probe("/healthz")),
        readiness_probe: Some(proxy_probe("/readyz")),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".into()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let (init_containers, containers) = if spec.image.is_empty() {
        // A gateway without an app: the proxy is the pod's only container.
        (None, vec![proxy])
    } else if opts.native_sidecar {
        // A native sidecar starts, and must be started (startupProbe), before the app; it is
        // stopped only after the app has exited, so the app's in-flight calls keep their proxy.
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(Probe {
            failure_threshold: Some(60),
            period_seconds: Some(1),
            ..proxy_probe("/readyz")
        });
        (Some(vec![proxy]), vec![app])
    } else {
        // Before native sidecars: the kubelet starts containers in order and waits for each
        // postStart hook, so `await` holds the app back until the proxy is ready; on shutdown
        // `drain` keeps the proxy up until the app has stopped taking requests.
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/usr/local/bin/weir-proxy".into(),
                        "await".into(),
                        "--config".into(),
                        config_file.clone(),
                    ]),
                }),
                ..Default::default()
            }),
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/usr/local/bin/weir-proxy".into(),
                        "drain".into(),
                        "--config".into(),
                        config_file,
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        (None, vec![proxy, app])
    };

    let selector = pods_of(name);
    Deployment {
        metadata: metadata(ms, name.to_string(), namespace),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(name)),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_CONFIG_HASH.to_string(),
                        config_hash.to_string(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    init_containers,
                    containers,
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    volumes: Some(vec![Volume {
                        name: "weir-proxy-config".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: config_map_name(name),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Objects of `loaded` rendered as one YAML stream, each document headed by its source.
/// The callers of `ms` among the loaded Microservices and Sagas (see [`mesh::callers`]).
fn callers_in(
    loaded: &[crate::manifest::Loaded],
    ms: &Microservice,
    opts: &RenderOptions,
) -> Vec<String> {
    use crate::manifest::Object;
    let ns_of = |n: Option<String>| n.unwrap_or_else(|| opts.default_namespace.clone());
    let mss: Vec<(String, &Microservice)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => Some((ns_of(m.namespace()), m)),
            _ => None,
        })
        .collect();
    let sagas: Vec<(String, &weir_crds::Saga)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Saga(s) => Some((ns_of(s.namespace()), s)),
            _ => None,
        })
        .collect();
    let mss: Vec<(&str, &Microservice)> = mss.iter().map(|(n, m)| (n.as_str(), *m)).collect();
    let sagas: Vec<(&str, &weir_crds::Saga)> =
        sagas.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    mesh::callers_of(ms, &ns_of(ms.namespace()), &mss, &sagas)
}

pub fn render_all(
    loaded: &[crate::manifest::Loaded],
    opts: &RenderOptions,
) -> Result<String, String> {
    use crate::manifest::Object;
    let mut docs = Vec::new();
    for l in loaded {
        if let Object::Saga(sg) = &l.object {
            docs.extend(saga::render_documents(loaded, l, sg, opts)?);
            continue;
        }
        if let Object::Broker(b) = &l.object {
            let name = b.name_any();
            let ns = b
                .namespace()
                .unwrap_or_else(|| opts.default_namespace.clone());
            let rendered = broker::render(b, &ns)
                .map_err(|e| format!("{}: Broker/{name}: {e}", l.file.display()))?;
            if let Some(r) = rendered {
                let head = format!("# Source: {} (Broker/{name})\n", l.file.display());
                docs.push(format!("{head}{}", to_yaml(&r.service)));
                docs.push(format!("{head}{}", to_yaml(&r.stateful_set)));
            }
            continue;
        }
        let Object::Microservice(ms) = &l.object else {
            continue;
        };
        let name = ms.name_any();
        let callers = match opts.mesh {
            Some(_) => callers_in(loaded, ms, opts),
            None => Vec::new(),
        };
        let r = bridge_from_input(loaded, ms, opts)
            .and_then(|bridge| render_in_mesh(ms, opts, bridge.as_ref(), &callers))
            .map_err(|e| format!("{}: Microservice/{name}: {e}", l.file.display()))?;
        let head = format!("# Source: {} (Microservice/{name})\n", l.file.display());
        let docs_of_ms = [
            r.service_account.as_ref().map(to_yaml),
            Some(to_yaml(&r.config_map)),
            Some(to_yaml(&r.service)),
            r.endpoints_service.as_ref().map(to_yaml),
            Some(to_yaml(&r.deployment)),
            r.autoscalers.hpa.as_ref().map(to_yaml),
            r.autoscalers.trigger_authentication.as_ref().map(to_yaml),
            r.autoscalers.scaled_object.as_ref().map(to_yaml),
        ];
        for doc in docs_of_ms.into_iter().flatten() {
            docs.push(format!("{head}{doc}"));
        }
    }
    Ok(docs.join("---\n"))
}

/// The bridge config of `ms` from the Queues and Brokers of the input (same namespace).
fn bridge_from_input(
    loaded: &[crate::manifest::Loaded],
    ms: &Microservice,
    opts: &RenderOptions,
) -> Result<Option<messaging::Messaging>, RenderError> {
    use crate::manifest::Object;
    if ms.spec.publishes.is_empty() && ms.spec.consumes.is_empty() {
        return Ok(None);
    }
    let wanted: std::collections::BTreeSet<&str> = ms
        .spec
        .publishes
        .iter()
        .map(|p| p.queue.as_str())
        .chain(ms.spec.consumes.iter().map(|c| c.queue.as_str()))
        .collect();
    let same_ns = |m: &ObjectMeta| m.namespace == ms.metadata.namespace;
    let mut queues = BTreeMap::new();
    let mut brokers = BTreeMap::new();
    for l in loaded {
        match &l.object {
            Object::Queue(q) if same_ns(&q.metadata) && wanted.contains(q.name_any().as_str()) => {
                let qname = q.name_any();
                if q.spec
                    .schema
                    .as_ref()
                    .is_some_and(|s| s.config_map_ref.is_some())
                {
                    return Err(RenderError::Field {
                        field: format!("Queue/{qname}: spec.schema.configMapRef"),
                        message: "weir render reads no ConfigMaps; inline the schema to render its publishers and consumers".into(),
                    });
                }
                let schema =
                    messaging::resolve_schema(q.spec.schema.as_ref(), None).map_err(|e| {
                        RenderError::Field {
                            field: format!("Queue/{qname}: {}", e.field),
                            message: e.message,
                        }
                    })?;
                queues.insert(
                    qname,
                    messaging::ResolvedQueue {
                        spec: q.spec.clone(),
                        schema,
                    },
                );
            }
            Object::Broker(b) if same_ns(&b.metadata) => {
                brokers.insert(b.name_any(), b.clone());
            }
            _ => {}
        }
    }
    let namespace = ms
        .namespace()
        .unwrap_or_else(|| opts.default_namespace.clone());
    messaging::build(
        &ms.name_any(),
        &namespace,
        &ms.spec,
        &queues,
        &brokers,
        &opts.cluster_domain,
    )
}

fn to_yaml<T: serde::Serialize>(obj: &T) -> String {
    serde_yaml::to_string(obj).expect("Kubernetes objects serialize")
}

/// The Service port's name: the protocol, as meshes and dashboards read port names.
fn service_port_name(p: weir_crds::microservice::AppProtocol) -> &'static str {
    use weir_crds::microservice::AppProtocol;
    match p {
        AppProtocol::Http => "http",
        AppProtocol::Http2 => "http2",
        AppProtocol::Grpc => "grpc",
    }
}

#[cfg(test)]
mod protocol_tests {
    use super::*;
    use weir_crds::proxy::WireProtocol;

    fn rendered(yaml: &str) -> Rendered {
        let mut ms: Microservice = serde_yaml::from_str(yaml).unwrap();
        ms.metadata.namespace = Some("shop".into());
        render(&ms, &RenderOptions::default()).unwrap()
    }

    #[test]
    fn the_protocol_reaches_the_service_port_and_each_hop_of_the_sidecar() {
        let r = rendered(
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders}
spec:
  image: orders:1
  protocol: grpc
  dependencies:
    - {name: users, microservice: users}
    - {name: geo, url: "https://geo.example.com", protocol: grpc}
    - {name: legacy, url: "http://legacy.example.com"}
"#,
        );
        let port = &r.service.spec.unwrap().ports.unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("grpc"));
        assert_eq!(port.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
        assert_eq!(r.config.inbound.app_protocol, WireProtocol::Http2);
        let protocols: Vec<_> = r.config.outbound.iter().map(|o| o.protocol).collect();
        // Sidecar to sidecar: HTTP/2 whatever users speaks; external URLs as declared.
        assert_eq!(
            protocols,
            [
                WireProtocol::Http2,
                WireProtocol::Http2,
                WireProtocol::Http1
            ]
        );

        // gRPC statuses: the defaults, resolved to numbers, unless given.
        let users = &r.config.outbound[0];
        assert!(users.retry.is_none());
        let r2 = rendered(
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders}
spec:
  image: orders:1
  dependencies:
    - name: users
      microservice: users
      retry: {}
      circuitBreaker: {}
      grpc: {retryOn: [UNAVAILABLE, RESOURCE_EXHAUSTED], failureOn: [NOT_FOUND]}
      fallback: {grpcStatus: FAILED_PRECONDITION, grpcMessage: "no stock data"}
    - name: geo
      microservice: geo
      retry: {}
      circuitBreaker: {}
"#,
        );
        let (users, geo) = (&r2.config.outbound[0], &r2.config.outbound[1]);
        assert_eq!(users.retry.as_ref().unwrap().grpc_statuses, [14, 8]);
        assert_eq!(
            users
                .circuit_breaker
                .as_ref()
                .unwrap()
                .failure_on
                .grpc_statuses,
            [5]
        );
        let fb = users.fallback.as_ref().unwrap();
        assert_eq!(
            (fb.grpc_status, fb.grpc_message.as_str()),
            (Some(9), "no stock data")
        );
        assert_eq!(geo.retry.as_ref().unwrap().grpc_statuses, [14]);
        assert_eq!(
            geo.circuit_breaker
                .as_ref()
                .unwrap()
                .failure_on
                .grpc_statuses,
            [2, 4, 13, 14, 15]
        );

        let r = rendered(
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users}\nspec: {image: users:1}\n",
        );
        let port = &r.service.spec.unwrap().ports.unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.app_protocol.as_deref()),
            (Some("http"), Some("http"))
        );
        assert_eq!(r.config.inbound.app_protocol, WireProtocol::Http1);
    }

    #[test]
    fn a_headless_service_lists_the_ready_pods_on_their_inbound_port() {
        let r = rendered(
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users}\nspec: {image: users:1, protocol: grpc}\n",
        );
        let headless = r.endpoints_service.expect("a headless Service");
        assert_eq!(
            headless.metadata.name.as_deref(),
            Some("users-weir-endpoints")
        );
        assert_eq!(headless.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(headless.metadata.labels, r.service.metadata.labels);
        let (spec, service) = (headless.spec.unwrap(), r.service.spec.unwrap());
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(false));
        assert_eq!(spec.selector, service.selector);
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, i32::from(INBOUND_PORT));
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("weir-inbound".into()))
        );
        assert_eq!(
            (port.name.as_deref(), port.app_protocol.as_deref()),
            (Some("grpc"), Some("kubernetes.io/h2c"))
        );
    }

    #[test]
    fn a_microservice_dependency_is_found_through_its_headless_service() {
        use weir_crds::proxy::{BalanceAlgorithm, LoadBalancerConfig, OutlierDetectionConfig};
        let r = rendered(
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders}
spec:
  image: orders:1
  dependencies:
    - {name: users, microservice: users}
    - name: geo
      url: https://geo.example.com
      loadBalancer: {algorithm: roundRobin, decay: 2s, slowStart: 0s}
      outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 10s, maxEjectionTime: 1m, maxEjectionPercent: 0}
    - {name: stock, microservice: stock, loadBalancer: {}, outlierDetection: {}}
"#,
        );
        let (users, geo, stock) = (
            &r.config.outbound[0],
            &r.config.outbound[1],
            &r.config.outbound[2],
        );
        let dns = users.endpoints.as_ref().unwrap();
        assert_eq!(
            dns.dns.as_deref(),
            Some("users-weir-endpoints.shop.svc.cluster.local.:15001")
        );
        assert!(dns.addresses.is_empty());
        assert_eq!(dns.refresh_ms, weir_crds::proxy::DEFAULT_REFRESH_MS);
        // An external URL's own host is resolved by the sidecar: nothing to name here.
        assert_eq!(geo.endpoints, None);
        assert_eq!(
            geo.load_balancer,
            LoadBalancerConfig {
                algorithm: BalanceAlgorithm::RoundRobin,
                decay_ms: 2_000,
                slow_start_ms: 0,
                ..LoadBalancerConfig::default()
            }
        );
        assert_eq!(
            geo.outlier_detection,
            OutlierDetectionConfig {
                consecutive_failures: 3,
                base_ejection_ms: 10_000,
                max_ejection_ms: 60_000,
                max_ejected_percent: 0,
            }
        );
        // A block left out and a block given empty are the same: the contract's defaults.
        for o in [users, stock] {
            assert_eq!(o.load_balancer, LoadBalancerConfig::default());
            assert_eq!(o.outlier_detection, OutlierDetectionConfig::default());
        }
        r.config.validate().unwrap();
    }

    #[test]
    fn a_grpc_probe_becomes_a_health_check_in_the_sidecar_config() {
        let r = rendered(
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders}
spec:
  image: orders:1
  protocol: grpc
  probes:
    readiness: {grpc: {}, periodSeconds: 5}
    liveness: {grpc: {service: shop.Orders}}
"#,
        );
        let ib = &r.config.inbound;
        assert_eq!(
            (
                ib.readiness_path.as_deref(),
                ib.readiness_grpc_service.as_deref()
            ),
            (None, Some(""))
        );
        assert_eq!(
            (
                ib.liveness_path.as_deref(),
                ib.liveness_grpc_service.as_deref()
            ),
            (None, Some("shop.Orders"))
        );
        // The kubelet still probes the sidecar's relay, at the probe's period.
        let pod = r.deployment.spec.unwrap().template.spec.unwrap();
        let app = pod.containers.iter().find(|c| c.name == "app").unwrap();
        let readiness = app.readiness_probe.as_ref().unwrap();
        assert_eq!(
            readiness.http_get.as_ref().unwrap().path.as_deref(),
            Some("/app-health/readiness")
        );
        assert_eq!(readiness.period_seconds, Some(5));
        // A probe naming neither kind is an HTTP probe of the default path.
        let r = rendered(
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users}\nspec: {image: users:1, probes: {readiness: {periodSeconds: 3}}}\n",
        );
        assert_eq!(r.config.inbound.readiness_path.as_deref(), Some("/readyz"));
        assert_eq!(r.config.inbound.readiness_grpc_service, None);
    }
}

#[cfg(test)]
mod mesh_tests {
    use super::*;

    #[test]
    fn with_the_mesh_a_microservice_runs_under_its_own_account_with_a_weir_token_and_the_bundle() {
        let mut ms: Microservice = serde_yaml::from_str(
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users, namespace: shop, uid: u-1}\nspec:\n  image: users:1\n  dependencies: [{name: audit, microservice: audit}]\n",
        )
        .unwrap();
        ms.metadata.uid = Some("u-1".into());
        let opts = RenderOptions {
            mesh: Some(MeshOptions {
                trust_domain: "cluster.local".into(),
                issuer_url: "https://weir-identity.weir-system.svc:8443".into(),
                default_mode: weir_crds::microservice::MtlsMode::Strict,
            }),
            ..Default::default()
        };
        let r = render_in_mesh(&ms, &opts, None, &["shop/orders".to_string()]).unwrap();
        // The account: named for it, labelled for it, owned by it (what the identity endpoint
        // maps a token by).
        let sa = r.service_account.as_ref().expect("a ServiceAccount");
        assert_eq!(sa.metadata.name.as_deref(), Some("users-weir"));
        assert_eq!(
            sa.labels().get(LABEL_MICROSERVICE).map(String::as_str),
            Some("users")
        );
        let owner = &sa.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Microservice", "users", "u-1")
        );
        // The pods run under it; the sidecar, and only the sidecar, mounts the token and bundle.
        let pod = r
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("users-weir"));
        let token = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "weir-token")
            .unwrap();
        let proj = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(proj.audience.as_deref(), Some("weir"));
        let mounts = |c: &k8s_openapi::api::core::v1::Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| m.name.clone())
                .collect()
        };
        let all: Vec<_> = pod
            .init_containers
            .iter()
            .flatten()
            .chain(&pod.containers)
            .collect();
        let proxy = all.iter().find(|c| c.name == PROXY_CONTAINER).unwrap();
        let app = all.iter().find(|c| c.name == APP_CONTAINER).unwrap();
        assert!(mounts(proxy).contains(&"weir-token".to_string()));
        assert!(mounts(proxy).contains(&"weir-trust-bundle".to_string()));
        assert!(
            !mounts(app).iter().any(|m| m.starts_with("weir-t")),
            "{:?}",
            mounts(app)
        );
        // The sidecar's config reads what is mounted, and names its peers.
        let m = r.config.mtls.as_ref().unwrap();
        assert_eq!(m.identity, "spiffe://cluster.local/ns/shop/ms/users");
        assert_eq!(m.token_file, "/var/run/secrets/weir.dev/token");
        assert_eq!(m.trust_bundle_file, "/etc/weir/mtls/ca.crt");
        assert_eq!(m.authorization.allow, ["shop/orders"]);
        assert_eq!(
            r.config.outbound[0].peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/ms/audit")
        );
        r.config.validate().unwrap();
        // Without the mesh: none of it.
        let plain = render(&ms, &RenderOptions::default()).unwrap();
        assert!(plain.service_account.is_none() && plain.config.mtls.is_none());
        let pod = plain.deployment.spec.unwrap().template.spec.unwrap();
        assert!(pod.service_account_name.is_none());
    }
}
