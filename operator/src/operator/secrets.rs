//! Secrets the operator makes once and never changes: a namespace's identity key, a managed
//! broker's generated user. Regenerating either would break whoever already holds it.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;

/// Creates Secret `name` in `ns` holding `data` unless it exists. Returns whether this call
/// created it (another reconcile, or a person, making it first is not an error).
pub async fn create_once(
    client: &kube::Client,
    ns: &str,
    name: &str,
    data: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Result<bool, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    if api.get_opt(name).await?.is_some() {
        return Ok(false);
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "weir".to_string(),
                )]
                .into(),
            ),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
