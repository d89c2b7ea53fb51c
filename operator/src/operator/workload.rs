//! Applying a rendered workload (its ConfigMap, Service, headless Service and Deployment) by
//! server-side apply under [`FIELD_MANAGER`]: the "make it so" half of a Microservice or a saga
//! coordinator, whose "what should exist" is [`crate::render`].

use super::FIELD_MANAGER;
use crate::render::{self, Rendered};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

/// Applies `rendered` as workload `name` of `namespace`, ConfigMap and ServiceAccount first (a
/// new Deployment's pods mount the one and run under the other), and returns the Deployment as the API server now has it (with its status).
pub async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    rendered: &Rendered,
) -> Result<Deployment, kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            &render::config_map_name(name),
            &pp,
            &Patch::Apply(&rendered.config_map),
        )
        .await?;
    if let Some(account) = &rendered.service_account {
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .patch(
                &account.metadata.name.clone().unwrap_or_default(),
                &pp,
                &Patch::Apply(account),
            )
            .await?;
    }
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    services
        .patch(name, &pp, &Patch::Apply(&rendered.service))
        .await?;
    // The headless Service of the pods, which callers' sidecars resolve to balance each call.
    if let Some(headless) = &rendered.endpoints_service {
        services
            .patch(
                &headless.metadata.name.clone().unwrap_or_default(),
                &pp,
                &Patch::Apply(headless),
            )
            .await?;
    }
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(name, &pp, &Patch::Apply(&rendered.deployment))
        .await
}
