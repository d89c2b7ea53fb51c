//! The mesh's certificate authority in a cluster: the trust anchor and the issuer, kept in
//! Secrets of the operator's namespace, and the identity endpoint every operator replica serves
//! (not only the leader: a sidecar must get its certificate while leadership changes hands).
//!
//! - Secret `weir-trust-anchor` (`tls.crt`, `tls.key`): the anchor. The chart may provide it (a
//!   user's own PKI), with or without its key; without one the first replica makes it.
//! - Secret `weir-issuer` (`tls.crt`, `tls.key`, `ca.crt`): the issuer and the trust bundle
//!   (`ca.crt`: the anchors sidecars verify with; two of them while an anchor is rotated). The
//!   first replica that finds none makes one, signed by the anchor; both are made
//!   create-only, so replicas starting together agree on the one that was created first.
//! - The endpoint's serving certificate is made by each replica from the current issuer, for
//!   `weir-identity.<namespace>.svc` (and `.svc.<cluster domain>`), again when the issuer
//!   changes and before it expires.
//!
//! A change of the issuer Secret (its rotation) is picked up within [`RELOAD_EVERY`] without a
//! restart; certificates signed by the old issuer stay valid until they expire.

use super::secrets;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use weir_identity::endpoint::{self, Endpoint};
use weir_identity::tls::TrustBundle;
use weir_identity::{Authority, Issuer};

/// The anchor's Secret.
pub const ANCHOR_SECRET: &str = "weir-trust-anchor";
/// The issuer's Secret; its `ca.crt` is the trust bundle.
pub const ISSUER_SECRET: &str = "weir-issuer";
/// The Service in front of every replica's endpoint.
pub const SERVICE: &str = "weir-identity";
/// The endpoint's port.
pub const PORT: u16 = 8443;
/// How often the issuer Secret is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// How long a made anchor is valid.
const ANCHOR_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a made issuer is valid.
const ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a workload certificate is valid (renewed at 70 %).
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long the endpoint's own serving certificate is valid; renewed with a third left, and
/// made again whenever the issuer changes.
const SERVING_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the mesh's CA is not available.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading or creating Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {message}")]
    Invalid {
        namespace: String,
        name: String,
        message: String,
    },
}

/// The issuer and the trust bundle, as the Secrets hold them.
pub struct Loaded {
    pub issuer: Issuer,
    /// The anchors, PEM.
    pub bundle_pem: String,
    /// The issuer Secret's `resourceVersion`, to see a change.
    pub version: String,
}

pub(crate) fn key(s: &Secret, k: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(k))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Why a CA Secret gives no authority.
enum CaSecret {
    /// No `tls.crt` or no `tls.key`.
    Incomplete,
    /// They do not parse, or do not match.
    Unusable(String),
}

/// The authority a CA Secret holds (`tls.crt`, `tls.key`): the anchor's or the issuer's.
fn authority_of(s: &Secret) -> Result<Authority, CaSecret> {
    let (Some(cert), Some(k)) = (key(s, "tls.crt"), key(s, "tls.key")) else {
        return Err(CaSecret::Incomplete);
    };
    Authority::from_pem(&cert, &k).map_err(|e| CaSecret::Unusable(e.to_string()))
}

/// Reads the issuer Secret of `ns`, making the anchor and the issuer first when absent.
pub async fn load_or_create(
    client: &Client,
    ns: &str,
    trust_domain: &str,
) -> Result<Loaded, CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let api_err = |name: &str| {
        let (namespace, name) = (ns.to_string(), name.to_string());
        move |source| CaError::Api {
            namespace,
            name,
            source,
        }
    };
    let invalid = |name: &str, message: String| CaError::Invalid {
        namespace: ns.into(),
        name: name.into(),
        message,
    };
    if api
        .get_opt(ISSUER_SECRET)
        .await
        .map_err(api_err(ISSUER_SECRET))?
        .is_none()
    {
        let now = SystemTime::now();
        let anchor = match api
            .get_opt(ANCHOR_SECRET)
            .await
            .map_err(api_err(ANCHOR_SECRET))?
        {
            Some(s) => match authority_of(&s) {
                Ok(a) => a,
                Err(CaSecret::Incomplete) => {
                    return Err(invalid(
                        ISSUER_SECRET,
                        format!(
                            "missing, and {ANCHOR_SECRET} has no tls.key to make it with: provide the issuer (tls.crt, tls.key, ca.crt)"
                        ),
                    ));
                }
                Err(CaSecret::Unusable(e)) => return Err(invalid(ANCHOR_SECRET, e)),
            },
            None => {
                let made = Authority::new_anchor(trust_domain, now, ANCHOR_VALIDITY)
                    .map_err(|e| invalid(ANCHOR_SECRET, e.to_string()))?;
                let data = BTreeMap::from([
                    ("tls.crt".to_string(), made.cert_pem()),
                    ("tls.key".to_string(), made.key_pem()),
                ]);
                if secrets::create_once(client, ns, ANCHOR_SECRET, data, None)
                    .await
                    .map_err(api_err(ANCHOR_SECRET))?
                {
                    tracing::info!(namespace = ns, "made the mesh's trust anchor");
                    made
                } else {
                    // Another replica made it first: use that one.
                    let s = api
                        .get(ANCHOR_SECRET)
                        .await
                        .map_err(api_err(ANCHOR_SECRET))?;
                    authority_of(&s).map_err(|e| match e {
                        CaSecret::Incomplete => {
                            invalid(ANCHOR_SECRET, "needs tls.crt and tls.key".into())
                        }
                        CaSecret::Unusable(e) => invalid(ANCHOR_SECRET, e),
                    })?
                }
            }
        };
        let issuer = Authority::new_issuer(&anchor, trust_domain, now, ISSUER_VALIDITY)
            .map_err(|e| invalid(ISSUER_SECRET, e.to_string()))?;
        let data = BTreeMap::from([
            ("tls.crt".to_string(), issuer.cert_pem()),
            ("tls.key".to_string(), issuer.key_pem()),
            ("ca.crt".to_string(), anchor.cert_pem()),
        ]);
        if secrets::create_once(client, ns, ISSUER_SECRET, data, None)
            .await
            .map_err(api_err(ISSUER_SECRET))?
        {
            tracing::info!(namespace = ns, "made the mesh's issuer");
        }
    }
    let s = api
        .get(ISSUER_SECRET)
        .await
        .map_err(api_err(ISSUER_SECRET))?;
    let needs = || invalid(ISSUER_SECRET, "needs tls.crt, tls.key and ca.crt".into());
    let bundle_pem = key(&s, "ca.crt").ok_or_else(needs)?;
    let issuer = authority_of(&s).map_err(|e| match e {
        CaSecret::Incomplete => needs(),
        CaSecret::Unusable(e) => invalid(ISSUER_SECRET, e),
    })?;
    TrustBundle::from_pem(&bundle_pem)
        .map_err(|e| invalid(ISSUER_SECRET, format!("ca.crt: {e}")))?;
    Ok(Loaded {
        issuer: Issuer::new(issuer),
        bundle_pem,
        version: s.metadata.resource_version.unwrap_or_default(),
    })
}

/// The DNS names of the endpoint's serving certificate.
pub fn dns_names(ns: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        format!("{SERVICE}.{ns}.svc"),
        format!("{SERVICE}.{ns}.svc.{cluster_domain}"),
    ]
}

/// The URL sidecars ask at.
pub fn issuer_url(ns: &str) -> String {
    format!("https://{SERVICE}.{ns}.svc:{PORT}")
}

/// Serves the identity endpoint on `addr` with `authenticate`, and keeps its issuer current,
/// until the task is dropped.
pub async fn serve(
    client: Client,
    ns: String,
    cluster_domain: String,
    loaded: Loaded,
    authenticate: Arc<dyn endpoint::Authenticate>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let serving = endpoint::ServingCert::new(
        &loaded.issuer,
        &dns_names(&ns, &cluster_domain),
        SERVING_LIFETIME,
    )?;
    let tls = serving.config()?;
    let ep = Endpoint::new(loaded.issuer, authenticate, LEAF_LIFETIME);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "identity endpoint listening");
    let task = tokio::spawn(ep.clone().serve(listener, Arc::new(tls)));
    let mut version = loaded.version;
    let api: Api<Secret> = Api::namespaced(client, &ns);
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        match api.get(ISSUER_SECRET).await {
            Ok(s) if s.metadata.resource_version.as_deref() != Some(version.as_str()) => {
                match authority_of(&s) {
                    Ok(a) => {
                        ep.set_issuer(Issuer::new(a));
                        version = s.metadata.resource_version.unwrap_or_default();
                        // The endpoint's own certificate too: once the old anchor leaves the
                        // bundle, sidecars verify the endpoint by the new one.
                        if let Err(e) = serving.reissue(&ep.issuer()) {
                            tracing::warn!(error = %e, "cannot reissue the endpoint's serving certificate");
                        }
                        tracing::info!(
                            "the issuer changed; new certificates, the endpoint's own included, are signed by the new one"
                        );
                    }
                    Err(CaSecret::Unusable(e)) => {
                        tracing::warn!(error = %e, "the issuer Secret changed but is not usable; the previous issuer stays")
                    }
                    Err(CaSecret::Incomplete) => tracing::warn!(
                        "the issuer Secret changed but lacks tls.crt or tls.key; the previous issuer stays"
                    ),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the issuer Secret"),
        }
        match serving.renew_if_due(&ep.issuer(), SystemTime::now()) {
            Ok(true) => tracing::info!("the endpoint's serving certificate renewed"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot renew the endpoint's serving certificate"),
        }
        if task.is_finished() {
            anyhow::bail!("the identity endpoint stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::mock_api::{context, expect, serve as mock};
    use http::{Method, StatusCode};
    use serde_json::{Value, json};
    use std::sync::Mutex;

    const SECRETS: &str = "/api/v1/namespaces/weir-system/secrets";

    fn not_found() -> (StatusCode, Value) {
        (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        )
    }

    /// A Secret as the API server answers it: `stringData` of a create becomes `data`.
    fn stored(created: &Value) -> Value {
        use base64::Engine as _;
        let mut s = created.clone();
        let data: serde_json::Map<String, Value> = created["stringData"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap());
                (k.clone(), json!(b64))
            })
            .collect();
        s["data"] = Value::Object(data);
        s.as_object_mut().unwrap().remove("stringData");
        s["metadata"]["resourceVersion"] = json!("1");
        s
    }

    #[tokio::test]
    async fn the_first_replica_makes_the_anchor_and_an_issuer_it_signed() {
        let anchor = Arc::new(Mutex::new(Value::Null));
        let issuer = Arc::new(Mutex::new(Value::Null));
        let (a1, i1, i2) = (anchor.clone(), issuer.clone(), issuer.clone());
        let script = vec![
            expect(Method::GET, &format!("{SECRETS}/{ISSUER_SECRET}"), |_| {
                not_found()
            }),
            expect(Method::GET, &format!("{SECRETS}/{ANCHOR_SECRET}"), |_| {
                not_found()
            }),
            // create_once: looks, then creates.
            expect(Method::GET, &format!("{SECRETS}/{ANCHOR_SECRET}"), |_| {
                not_found()
            }),
            expect(Method::POST, SECRETS, move |req| {
                *a1.lock().unwrap() = req.clone();
                (StatusCode::CREATED, stored(req))
            }),
            expect(Method::GET, &format!("{SECRETS}/{ISSUER_SECRET}"), |_| {
                not_found()
            }),
            expect(Method::POST, SECRETS, move |req| {
                *i1.lock().unwrap() = req.clone();
                (StatusCode::CREATED, stored(req))
            }),
            expect(
                Method::GET,
                &format!("{SECRETS}/{ISSUER_SECRET}"),
                move |_| (StatusCode::OK, stored(&i2.lock().unwrap())),
            ),
        ];
        let (ctx, handle) = context();
        let server = tokio::spawn(mock(handle, script));
        let loaded = load_or_create(&ctx.client, "weir-system", "cluster.local")
            .await
            .unwrap();
        server.await.unwrap();
        let anchor = anchor.lock().unwrap().clone();
        assert_eq!(anchor["metadata"]["name"], ANCHOR_SECRET);
        let issuer = issuer.lock().unwrap().clone();
        assert_eq!(issuer["metadata"]["name"], ISSUER_SECRET);
        // The bundle is the anchor, and what the issuer signs verifies with it.
        assert_eq!(
            loaded.bundle_pem,
            anchor["stringData"]["tls.crt"].as_str().unwrap()
        );
        let id = weir_identity::WorkloadId::microservice("cluster.local", "shop", "orders");
        let key = weir_identity::WorkloadKey::generate().unwrap();
        let issued = loaded
            .issuer
            .sign(
                &key.csr(&id).unwrap(),
                &id,
                SystemTime::now(),
                LEAF_LIFETIME,
            )
            .unwrap();
        let bundle = TrustBundle::from_pem(&loaded.bundle_pem).unwrap();
        use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
        let chain: Vec<CertificateDer<'_>> =
            CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            bundle.roots(),
            weir_identity::tls::provider(),
        )
        .build()
        .unwrap()
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .unwrap();
    }

    #[tokio::test]
    async fn an_anchor_without_its_key_and_no_issuer_is_an_error_naming_the_secrets() {
        let anchor =
            Authority::new_anchor("cluster.local", SystemTime::now(), ANCHOR_VALIDITY).unwrap();
        let only_cert = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": ANCHOR_SECRET, "namespace": "weir-system"},
            "stringData": {"tls.crt": anchor.cert_pem()}});
        let script = vec![
            expect(Method::GET, &format!("{SECRETS}/{ISSUER_SECRET}"), |_| {
                not_found()
            }),
            expect(
                Method::GET,
                &format!("{SECRETS}/{ANCHOR_SECRET}"),
                move |_| (StatusCode::OK, stored(&only_cert)),
            ),
        ];
        let (ctx, handle) = context();
        let server = tokio::spawn(mock(handle, script));
        let err = load_or_create(&ctx.client, "weir-system", "cluster.local")
            .await
            .err()
            .unwrap();
        server.await.unwrap();
        let text = err.to_string();
        assert!(text.contains("weir-system/weir-issuer"), "{text}");
        assert!(text.contains("weir-trust-anchor has no tls.key"), "{text}");
    }

    /// Your own PKI (the chart's `mtls.issuer` and `mtls.trustAnchorsPEM` make this Secret): the
    /// issuer and the anchors are used as they are, two anchors during a rotation, and nothing
    /// is made (no anchor Secret read or created).
    #[tokio::test]
    async fn a_given_issuer_is_used_as_it_is_and_nothing_is_made() {
        let now = SystemTime::now();
        let old = Authority::new_anchor("cluster.local", now, ANCHOR_VALIDITY).unwrap();
        let new = Authority::new_anchor("cluster.local", now, ANCHOR_VALIDITY).unwrap();
        let issuer = Authority::new_issuer(&new, "cluster.local", now, ISSUER_VALIDITY).unwrap();
        let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
        let given = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": ISSUER_SECRET, "namespace": "weir-system"},
            "stringData": {"tls.crt": issuer.cert_pem(), "tls.key": issuer.key_pem(),
                           "ca.crt": bundle}});
        let g2 = given.clone();
        let script = vec![
            expect(
                Method::GET,
                &format!("{SECRETS}/{ISSUER_SECRET}"),
                move |_| (StatusCode::OK, stored(&given)),
            ),
            expect(
                Method::GET,
                &format!("{SECRETS}/{ISSUER_SECRET}"),
                move |_| (StatusCode::OK, stored(&g2)),
            ),
        ];
        let (ctx, handle) = context();
        let server = tokio::spawn(mock(handle, script));
        let loaded = load_or_create(&ctx.client, "weir-system", "cluster.local")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.await.unwrap();
        assert_eq!(loaded.bundle_pem, bundle);
        assert_eq!(TrustBundle::from_pem(&loaded.bundle_pem).unwrap().len(), 2);
        // What it signs chains to the given issuer.
        let serving = endpoint::ServingCert::new(
            &loaded.issuer,
            &dns_names("weir-system", "cluster.local"),
            SERVING_LIFETIME,
        );
        assert!(serving.is_ok());
    }

    #[test]
    fn sidecars_reach_the_endpoint_by_a_name_its_certificate_carries() {
        let url = issuer_url("weir-system");
        let host = url
            .trim_start_matches("https://")
            .split(':')
            .next()
            .unwrap();
        assert!(
            dns_names("weir-system", "cluster.local")
                .iter()
                .any(|n| n == host),
            "{url}"
        );
    }
}
