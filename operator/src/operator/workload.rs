//! Applying a rendered workload (its ConfigMap, Service, headless Service and Deployment) by
//! server-side apply under [`FIELD_MANAGER`]: the "make it so" half of a Microservice or a saga
//! coordinator, whose "what should exist" is [`crate::render`].

use super::FIELD_MANAGER;
use super::applied::{Applied, DeploymentState};
use crate::render::{self, Rendered};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

/// Applies `rendered` as workload `name` of `namespace`, ConfigMap and ServiceAccount first (a
/// new Deployment's pods mount the one and run under the other), and returns what a reconcile
/// reads of the Deployment as the API server now has it (with its status). A child that
/// `applied` knows to be as this apply would leave it is not applied again
/// ([`super::applied`]).
pub async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    rendered: &Rendered,
    applied: &Applied,
) -> Result<DeploymentState, kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let cm_name = render::config_map_name(name);
    if !applied.unchanged(namespace, &cm_name, &rendered.config_map) {
        let answer = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .patch(&cm_name, &pp, &Patch::Apply(&rendered.config_map))
            .await?;
        applied.record(
            namespace,
            &cm_name,
            &rendered.config_map,
            answer.metadata.resource_version,
        );
    }
    if let Some(account) = &rendered.service_account {
        let account_name = account.metadata.name.clone().unwrap_or_default();
        if !applied.unchanged(namespace, &account_name, account) {
            let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
                .patch(&account_name, &pp, &Patch::Apply(account))
                .await?;
            applied.record(
                namespace,
                &account_name,
                account,
                answer.metadata.resource_version,
            );
        }
    }
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    // The Service, and the headless Service of the pods, which callers' sidecars resolve to
    // balance each call.
    let mut all = vec![(name.to_string(), &rendered.service)];
    if let Some(headless) = &rendered.endpoints_service {
        all.push((headless.metadata.name.clone().unwrap_or_default(), headless));
    }
    for (svc_name, svc) in all {
        if applied.unchanged(namespace, &svc_name, svc) {
            continue;
        }
        let answer = services.patch(&svc_name, &pp, &Patch::Apply(svc)).await?;
        applied.record(namespace, &svc_name, svc, answer.metadata.resource_version);
    }
    if let Some(d) = applied.unchanged_deployment(namespace, name, &rendered.deployment) {
        return Ok((*d).clone());
    }
    let answer = Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(name, &pp, &Patch::Apply(&rendered.deployment))
        .await?;
    applied.record_deployment(namespace, name, &rendered.deployment, &answer.metadata);
    Ok(answer.into())
}
