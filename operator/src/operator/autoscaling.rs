//! Applying what scales a Microservice ([`crate::render::autoscaling`]): which autoscaling APIs
//! the cluster serves, the autoscaler objects by server-side apply, the removal of those no
//! longer rendered, and the hand-over of the Deployment's `replicas` to the autoscaler.
//!
//! - **Discovery**, cached for [`DISCOVERY_TTL`] and asked only when a Microservice has
//!   `spec.autoscaling`: whether KEDA's ScaledObject is served (else `queueLag` cannot apply and
//!   the reconciler says so), and whether `autoscaling/v2` is (Kubernetes 1.23 and later; before,
//!   the same object is applied as `autoscaling/v2beta2`, whose fields Weir uses are the same).
//! - **Removal**: what was applied last is in the Microservice's `status.autoscaling`; when that
//!   autoscaler is no longer rendered (autoscaling removed, or moved between a
//!   HorizontalPodAutoscaler and KEDA) it is deleted, before the new one is applied (KEDA refuses
//!   a ScaledObject for a Deployment another HorizontalPodAutoscaler scales). Owner references
//!   remove them all with the Microservice.
//! - **Hand-over**: the Deployment is applied without `replicas` while an autoscaler scales it.
//!   Server-side apply deletes a field its manager stops applying, which would put the
//!   Deployment back to 1 pod for a moment; so while the operator's field manager still owns
//!   `spec.replicas`, the current value is first applied under [`HANDOVER_MANAGER`], which
//!   keeps it until the autoscaler's first change takes it over.

use super::FIELD_MANAGER;
use crate::render::autoscaling::{
    Autoscalers, SCALER_HPA, SCALER_KEDA, scaled_object_resource, trigger_authentication_name,
    trigger_authentication_resource,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kube::{Client, Resource};
use serde_json::json;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weir_crds::microservice::AutoscalingStatus;

/// How long an answer of discovery is used before the API server is asked again (KEDA installed
/// after the operator is found within this time).
pub const DISCOVERY_TTL: Duration = Duration::from_secs(60);

/// The field manager that holds a Deployment's `replicas` between the operator letting go of it
/// and the autoscaler's first change.
pub const HANDOVER_MANAGER: &str = "weir-operator-replicas-handover";

/// The autoscaling APIs the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// `keda.sh/v1alpha1` ScaledObject.
    pub keda: bool,
    /// `autoscaling/v2` (else `v2beta2`).
    pub hpa_v2: bool,
}

/// The cached answer of discovery.
#[derive(Debug, Default)]
pub struct Discovery(Mutex<Option<(Served, Instant)>>);

impl Discovery {
    /// What the cluster serves, from the cache while it is younger than [`DISCOVERY_TTL`].
    pub async fn served(&self, client: &Client) -> Result<Served, kube::Error> {
        if let Some((s, at)) = *self.0.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(s);
        }
        let s = Served {
            keda: serves(client, "keda.sh/v1alpha1", "scaledobjects").await?,
            hpa_v2: serves(client, "autoscaling/v2", "horizontalpodautoscalers").await?,
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((s, Instant::now()));
        Ok(s)
    }
}

/// Whether `group_version` is served with `resource`; a 404 is "no".
async fn serves(client: &Client, group_version: &str, resource: &str) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == resource)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

fn hpa_resource(v2: bool) -> ApiResource {
    let version = if v2 { "v2" } else { "v2beta2" };
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "autoscaling",
        version,
        "HorizontalPodAutoscaler",
    ))
}

/// Deletes what `previous` says was applied and `now` no longer renders, then applies `now`.
pub async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    now: &Autoscalers,
    previous: Option<&AutoscalingStatus>,
    served: Served,
) -> Result<(), kube::Error> {
    let was = previous.and_then(|p| p.scaler.as_deref());
    let dynamic =
        |r: &ApiResource| Api::<DynamicObject>::namespaced_with(client.clone(), namespace, r);
    if was == Some(SCALER_HPA) && now.hpa.is_none() {
        delete(&dynamic(&hpa_resource(served.hpa_v2)), name).await?;
    }
    if was == Some(SCALER_KEDA) && now.scaled_object.is_none() && served.keda {
        delete(&dynamic(&scaled_object_resource()), name).await?;
        delete(
            &dynamic(&trigger_authentication_resource()),
            &trigger_authentication_name(name),
        )
        .await?;
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    if let Some(hpa) = &now.hpa {
        let r = hpa_resource(served.hpa_v2);
        let mut body = serde_json::to_value(hpa).expect("a HorizontalPodAutoscaler serializes");
        body["apiVersion"] = json!(r.api_version);
        body["kind"] = json!(r.kind);
        dynamic(&r).patch(name, &pp, &Patch::Apply(&body)).await?;
    }
    if let Some(ta) = &now.trigger_authentication {
        dynamic(&trigger_authentication_resource())
            .patch(&trigger_authentication_name(name), &pp, &Patch::Apply(ta))
            .await?;
    }
    if let Some(so) = &now.scaled_object {
        dynamic(&scaled_object_resource())
            .patch(name, &pp, &Patch::Apply(so))
            .await?;
    }
    Ok(())
}

async fn delete(api: &Api<DynamicObject>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Before the Deployment is applied without `replicas`: while the operator's manager owns the
/// field, its current value is applied under [`HANDOVER_MANAGER`] (see the module docs). A
/// Deployment that does not exist yet has nothing to hand over.
pub async fn hand_over_replicas(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    let api = Api::<Deployment>::namespaced(client.clone(), namespace);
    let Some(live) = api.get_opt(name).await? else {
        return Ok(());
    };
    if !owns_replicas(&live, FIELD_MANAGER) {
        return Ok(());
    }
    let Some(replicas) = live.spec.as_ref().and_then(|s| s.replicas) else {
        return Ok(());
    };
    let body = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    tracing::info!(
        namespace,
        microservice = name,
        replicas,
        "replicas handed over to the autoscaler"
    );
    Ok(())
}

/// Whether `manager` owns `spec.replicas` of `d` (by apply).
pub fn owns_replicas(d: &Deployment, manager: &str) -> bool {
    d.meta().managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(manager)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:replicas"))
                .is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn deployment(entries: Vec<(&str, &str, serde_json::Value)>) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.managed_fields = Some(
            entries
                .into_iter()
                .map(|(manager, op, fields)| ManagedFieldsEntry {
                    manager: Some(manager.into()),
                    operation: Some(op.into()),
                    fields_v1: Some(FieldsV1(fields)),
                    ..Default::default()
                })
                .collect(),
        );
        d
    }

    #[test]
    fn the_owner_of_replicas_is_read_from_managed_fields() {
        let with = json!({"f:spec": {"f:replicas": {}, "f:selector": {}}});
        let without = json!({"f:spec": {"f:selector": {}}});
        assert!(owns_replicas(
            &deployment(vec![(FIELD_MANAGER, "Apply", with.clone())]),
            FIELD_MANAGER
        ));
        assert!(!owns_replicas(
            &deployment(vec![(FIELD_MANAGER, "Apply", without)]),
            FIELD_MANAGER
        ));
        // The autoscaler's change (an update by the controller manager) took it.
        assert!(!owns_replicas(
            &deployment(vec![("kube-controller-manager", "Update", with)]),
            FIELD_MANAGER
        ));
    }
}
