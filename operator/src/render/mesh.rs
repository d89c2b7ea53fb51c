//! Mutual TLS and authorization for a sidecar of the mesh: its identity and where it gets its
//! certificate, what its inbound listener does with plaintext, the callers it admits (from the
//! declared graph), and the identity each Microservice it depends on must present. Pure: the
//! operator and `weir up` (and `weir render`) apply the same function to the config
//! [`proxy_config::build`](super::proxy_config::build) made.

use std::collections::BTreeSet;
use weir_crds::Microservice;
use weir_crds::microservice::{AuthorizationPolicy, MicroserviceSpec, MtlsMode};
use weir_crds::proxy::{
    AuthorizationConfig, AuthorizationMode, InboundMtlsMode, MtlsConfig, ProxyConfig,
};
use weir_crds::saga::SagaSpec;
use weir_identity::WorkloadId;

/// Where the mesh's certificates come from, as one sidecar sees it.
#[derive(Debug, Clone)]
pub struct Mesh {
    /// The SPIFFE trust domain of every identity (`cluster.local`).
    pub trust_domain: String,
    /// The issuer's endpoint, `https://host:port`.
    pub issuer_url: String,
    /// The trust bundle's file in the sidecar.
    pub trust_bundle_file: String,
    /// The token file the sidecar proves itself with.
    pub token_file: String,
    /// `spec.inbound.mtls` when left out.
    pub default_mode: MtlsMode,
}

/// The callers the declared graph admits to `name` of `namespace`: every Microservice of the
/// namespace with a dependency on it (`<ns>/<caller>`; an edge routes only through its
/// dependencies, so it is one of them), and every Saga with a step (action or compensation)
/// calling it over HTTP (`<ns>/saga/<saga>`). Sorted, each once.
pub fn callers<'a>(
    namespace: &str,
    name: &str,
    microservices: impl IntoIterator<Item = (&'a str, &'a str, &'a MicroserviceSpec)>,
    sagas: impl IntoIterator<Item = (&'a str, &'a str, &'a SagaSpec)>,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for (ns, caller, spec) in microservices {
        if ns == namespace && depends_on(spec, name) {
            out.insert(format!("{ns}/{caller}"));
        }
    }
    for (ns, saga, spec) in sagas {
        if ns == namespace && saga_calls(spec, name) {
            out.insert(format!("{ns}/saga/{saga}"));
        }
    }
    out.into_iter().collect()
}

/// Whether a Microservice of `spec` has a dependency on Microservice `name` of its namespace.
pub fn depends_on(spec: &MicroserviceSpec, name: &str) -> bool {
    spec.dependencies
        .iter()
        .any(|d| d.microservice.as_deref() == Some(name))
}

/// Whether a Saga of `spec` has a step (action or compensation) calling Microservice `name` of
/// its namespace over HTTP.
pub fn saga_calls(spec: &SagaSpec, name: &str) -> bool {
    let calls = |a: &weir_crds::saga::SagaAction| {
        a.http
            .as_ref()
            .is_some_and(|h| h.microservice.as_deref() == Some(name))
    };
    spec.steps
        .iter()
        .any(|s| calls(&s.action) || s.compensation.as_ref().is_some_and(calls))
}

/// The callers of `ms` among `all` (Microservices) and `sagas`, by their metadata.
pub fn callers_of(
    ms: &Microservice,
    namespace: &str,
    all: &[(&str, &Microservice)],
    sagas: &[(&str, &weir_crds::Saga)],
) -> Vec<String> {
    let name = ms.metadata.name.as_deref().unwrap_or_default();
    callers(
        namespace,
        name,
        all.iter()
            .map(|(ns, m)| (*ns, m.metadata.name.as_deref().unwrap_or_default(), &m.spec)),
        sagas
            .iter()
            .map(|(ns, s)| (*ns, s.metadata.name.as_deref().unwrap_or_default(), &s.spec)),
    )
}

/// Adds mutual TLS to the config of `spec`'s sidecar: its certificate (`mesh`), the inbound
/// mode (an edge is always permissive: outside traffic enters there), the allowed set
/// (`callers` from the graph, and `spec.inbound.allowFrom`), and the identity each Microservice
/// dependency must present.
pub fn apply(config: &mut ProxyConfig, spec: &MicroserviceSpec, mesh: &Mesh, callers: &[String]) {
    let ns = config.namespace.clone();
    let id = WorkloadId::microservice(&mesh.trust_domain, &ns, &config.service);
    let inbound = match (
        spec.edge.is_some(),
        spec.inbound.mtls.unwrap_or(mesh.default_mode),
    ) {
        (true, _) | (false, MtlsMode::Permissive) => InboundMtlsMode::Permissive,
        (false, MtlsMode::Strict) => InboundMtlsMode::Strict,
    };
    let mode = match spec.inbound.authorization.unwrap_or_default() {
        AuthorizationPolicy::Graph => AuthorizationMode::Enforce,
        AuthorizationPolicy::Audit => AuthorizationMode::Audit,
        AuthorizationPolicy::Open => AuthorizationMode::Open,
    };
    let allow: BTreeSet<String> = callers
        .iter()
        .chain(&spec.inbound.allow_from)
        .cloned()
        .collect();
    config.mtls = Some(MtlsConfig {
        identity: id.uri(),
        trust_bundle_file: mesh.trust_bundle_file.clone(),
        issuer_url: mesh.issuer_url.clone(),
        token_file: mesh.token_file.clone(),
        renew_at_percent: 70,
        inbound,
        authorization: AuthorizationConfig {
            mode,
            allow: allow.into_iter().collect(),
        },
    });
    for (o, d) in config.outbound.iter_mut().zip(&spec.dependencies) {
        if let Some(target) = &d.microservice {
            o.peer_identity = Some(WorkloadId::microservice(&mesh.trust_domain, &ns, target).uri());
        }
    }
}

/// The ConfigMap of each namespace holding the trust bundle (key [`BUNDLE_KEY`]).
pub const BUNDLE_CONFIG_MAP: &str = "weir-trust-bundle";
pub const BUNDLE_KEY: &str = "ca.crt";
/// Where the sidecar reads the bundle and its token, in a pod.
pub const BUNDLE_DIR: &str = "/etc/weir/mtls";
pub const TOKEN_DIR: &str = "/var/run/secrets/weir.dev";
/// How long a projected token lives before the kubelet rotates it.
pub const TOKEN_SECONDS: i64 = 3600;

/// The ServiceAccount a Microservice's pods run under: its name.
pub fn service_account_name(ms_name: &str) -> String {
    format!("{ms_name}-weir")
}

/// The mesh as the operator renders it into pods.
pub fn pod_mesh(trust_domain: &str, issuer_url: &str, default_mode: MtlsMode) -> Mesh {
    Mesh {
        trust_domain: trust_domain.into(),
        issuer_url: issuer_url.into(),
        trust_bundle_file: format!("{BUNDLE_DIR}/{BUNDLE_KEY}"),
        token_file: format!("{TOKEN_DIR}/token"),
        default_mode,
    }
}

/// Puts a Deployment's pods under `account` and gives the sidecar what mutual TLS needs: a
/// projected token of that account for the audience `weir` (rotated by the kubelet, bound to
/// the pod) and the namespace's trust bundle. The app container gets neither.
pub fn mount_pod_identity(
    deployment: &mut k8s_openapi::api::apps::v1::Deployment,
    account: &str,
    proxy_container: &str,
) {
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, KeyToPath, ProjectedVolumeSource, ServiceAccountTokenProjection,
        Volume, VolumeMount, VolumeProjection,
    };
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    else {
        return;
    };
    pod.service_account_name = Some(account.into());
    pod.volumes.get_or_insert_with(Vec::new).extend([
        Volume {
            name: "weir-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(crate::operator::identity::AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "weir-trust-bundle".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: BUNDLE_CONFIG_MAP.into(),
                items: Some(vec![KeyToPath {
                    key: BUNDLE_KEY.into(),
                    path: BUNDLE_KEY.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]);
    let containers = pod
        .init_containers
        .iter_mut()
        .flatten()
        .chain(pod.containers.iter_mut());
    for c in containers.filter(|c| c.name == proxy_container) {
        c.volume_mounts.get_or_insert_with(Vec::new).extend([
            VolumeMount {
                name: "weir-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "weir-trust-bundle".into(),
                mount_path: BUNDLE_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> MicroserviceSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn mesh() -> Mesh {
        Mesh {
            trust_domain: "cluster.local".into(),
            issuer_url: "https://weir-identity.weir-system.svc:8443".into(),
            trust_bundle_file: "/etc/weir/mtls/bundle.pem".into(),
            token_file: "/var/run/secrets/weir/token".into(),
            default_mode: MtlsMode::Strict,
        }
    }

    #[test]
    fn the_callers_are_who_declares_the_service_and_nobody_else() {
        let orders = spec(
            "image: o\nport: 1\ndependencies: [{name: users, microservice: users}, {name: pay, microservice: payments}]",
        );
        let edge = spec(
            "image: ''\nport: 1\ndependencies: [{name: users, microservice: users}]\nedge: {jwt: {issuer: 'https://id.example.com/', audiences: [a], hmacSecretRef: {name: s, key: k}}, routes: [{pathPrefix: /u, dependency: users}]}",
        );
        let stranger =
            spec("image: s\nport: 1\ndependencies: [{name: ext, url: 'http://users:80'}]");
        let saga: SagaSpec = serde_yaml::from_str(
            "broker: bus\ntrigger: {http: true}\nsteps:\n- name: a\n  action: {http: {microservice: payments, path: /charge}}\n  compensation: {http: {microservice: users, path: /undo}}\n",
        )
        .unwrap();
        let mss = [
            ("shop", "orders", &orders),
            ("shop", "gateway", &edge),
            ("shop", "stranger", &stranger),
            ("other", "orders", &orders),
        ];
        let sagas = [("shop", "checkout", &saga)];
        assert_eq!(
            callers("shop", "users", mss, sagas),
            ["shop/gateway", "shop/orders", "shop/saga/checkout"]
        );
        assert_eq!(
            callers("shop", "payments", mss, sagas),
            ["shop/orders", "shop/saga/checkout"]
        );
        assert!(callers("shop", "orders", mss, sagas).is_empty());
    }

    #[test]
    fn the_config_gets_the_identity_the_modes_the_allowed_set_and_the_peers() {
        let users = spec(
            "image: u\nport: 8080\ninbound: {allowFrom: [ops/*, shop/orders]}\ndependencies: [{name: db, url: 'http://db:5432'}, {name: audit, microservice: audit}]",
        );
        let placement = super::super::proxy_config::PodPlacement {
            cluster_domain: "cluster.local".into(),
        };
        let mut config =
            super::super::proxy_config::build("users", "shop", &users, &placement).unwrap();
        apply(
            &mut config,
            &users,
            &mesh(),
            &["shop/orders".into(), "shop/saga/checkout".into()],
        );
        config.validate().unwrap();
        let m = config.mtls.as_ref().unwrap();
        assert_eq!(m.identity, "spiffe://cluster.local/ns/shop/ms/users");
        assert_eq!(m.inbound, InboundMtlsMode::Strict);
        assert_eq!(m.authorization.mode, AuthorizationMode::Enforce);
        assert_eq!(
            m.authorization.allow,
            ["ops/*", "shop/orders", "shop/saga/checkout"]
        );
        assert_eq!(
            config.outbound[0].peer_identity, None,
            "an external URL is as declared"
        );
        assert_eq!(
            config.outbound[1].peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/ms/audit")
        );

        // The per-Microservice overrides; an edge admits plaintext whatever it says.
        let lax = spec("image: u\nport: 8080\ninbound: {mtls: permissive, authorization: audit}");
        let mut config =
            super::super::proxy_config::build("users", "shop", &lax, &placement).unwrap();
        apply(&mut config, &lax, &mesh(), &[]);
        let m = config.mtls.as_ref().unwrap();
        assert_eq!(
            (m.inbound, m.authorization.mode),
            (InboundMtlsMode::Permissive, AuthorizationMode::Audit)
        );
        let edge = spec(
            "image: ''\nport: 8080\ninbound: {mtls: strict, authorization: open}\ndependencies: [{name: users, microservice: users}]\nedge: {jwt: {issuer: 'https://id.example.com/', audiences: [a], hmacSecretRef: {name: s, key: k}}, routes: [{pathPrefix: /u, dependency: users}]}",
        );
        let mut config =
            super::super::proxy_config::build("gateway", "shop", &edge, &placement).unwrap();
        apply(&mut config, &edge, &mesh(), &[]);
        let m = config.mtls.as_ref().unwrap();
        assert_eq!(
            (m.inbound, m.authorization.mode),
            (InboundMtlsMode::Permissive, AuthorizationMode::Open)
        );
    }
}
