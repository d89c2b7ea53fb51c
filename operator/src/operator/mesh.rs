//! The mesh in pods, when the operator runs with `--mtls`: the trust bundle every namespace's
//! sidecars verify with, and who may call whom, read from the declared graph as the operator's
//! caches hold it. The render itself is [`crate::render::mesh`]; this is the state around it.
//!
//! - **The bundle.** ConfigMap `weir-trust-bundle` (key `ca.crt`) in each namespace with a
//!   Microservice, applied by the reconcile before the pods that mount it, and again in every
//!   such namespace when the issuer Secret's `ca.crt` changes (an anchor rotation), which is
//!   read every [`RELOAD_EVERY`](super::mesh_ca::RELOAD_EVERY).
//! - **The callers.** A Microservice admits the Microservices of its namespace that depend on it
//!   and the Sagas with a step calling it ([`crate::render::mesh::callers`]). Those change with
//!   *other* objects, so a target is reconciled again when: a caller's own reconcile finds its
//!   targets changed (added or removed: [`PodMesh::rendered`]); a Saga changes (for the targets
//!   it calls and those that admitted it: [`PodMesh::saga_targets`]); a Microservice goes away
//!   (for those that admitted it: [`PodMesh::admitting`]). The allowed set is left out of the
//!   pod template's hash: the sidecar reloads it from its ConfigMap, so a new caller does not
//!   roll its targets' pods.

use super::FIELD_MANAGER;
use crate::render::mesh::{BUNDLE_CONFIG_MAP, BUNDLE_KEY, callers, depends_on, saga_calls};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, OnceLock, RwLock};
use tokio::sync::mpsc;
use weir_crds::{Microservice, Saga};

/// What the Microservice reconciler keeps of the mesh.
pub struct PodMesh {
    /// The trust bundle (PEM) every sidecar verifies with.
    bundle: RwLock<String>,
    /// The bundle last applied to each namespace's ConfigMap.
    applied: Mutex<HashMap<String, String>>,
    pub(crate) microservices: OnceLock<Store<Microservice>>,
    pub(crate) sagas: OnceLock<Store<Saga>>,
    /// The callers each Microservice (`ns/name`) was last rendered to admit.
    admitted: Mutex<HashMap<String, Vec<String>>>,
    /// The Microservices each Microservice (`ns/name`) depended on at its last reconcile.
    targets: Mutex<HashMap<String, BTreeSet<String>>>,
    trigger: mpsc::UnboundedSender<ObjectRef<Microservice>>,
    triggered: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<Microservice>>>>,
}

impl PodMesh {
    pub fn new(bundle_pem: String) -> Self {
        let (trigger, rx) = mpsc::unbounded_channel();
        Self {
            bundle: RwLock::new(bundle_pem),
            applied: Default::default(),
            microservices: OnceLock::new(),
            sagas: OnceLock::new(),
            admitted: Default::default(),
            targets: Default::default(),
            trigger,
            triggered: Mutex::new(Some(rx)),
        }
    }

    /// The Microservices to reconcile again because of another's change; taken once, by the
    /// controller.
    pub fn take_triggers(&self) -> Option<mpsc::UnboundedReceiver<ObjectRef<Microservice>>> {
        self.triggered.lock().unwrap().take()
    }

    /// Applies the bundle ConfigMap in `ns` unless this process already applied this bundle.
    pub async fn ensure_bundle(&self, client: &Client, ns: &str) -> Result<(), kube::Error> {
        let pem = self.bundle.read().unwrap().clone();
        if self.applied.lock().unwrap().get(ns) == Some(&pem) {
            return Ok(());
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(BUNDLE_CONFIG_MAP.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "weir".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(BUNDLE_KEY.to_string(), pem.clone())])),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(
                BUNDLE_CONFIG_MAP,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await?;
        self.applied.lock().unwrap().insert(ns.into(), pem);
        Ok(())
    }

    /// A new bundle: applied again to every namespace that has one, at once. Returns whether it
    /// changed.
    pub async fn set_bundle(&self, client: &Client, pem: String) -> bool {
        if *self.bundle.read().unwrap() == pem {
            return false;
        }
        *self.bundle.write().unwrap() = pem;
        let namespaces: Vec<String> = self.applied.lock().unwrap().keys().cloned().collect();
        for ns in namespaces {
            if let Err(e) = self.ensure_bundle(client, &ns).await {
                // The next reconcile in that namespace applies it.
                tracing::warn!(namespace = %ns, error = %e, "applying the new trust bundle");
            }
        }
        true
    }

    /// The callers the graph admits to `ns/name` now.
    pub fn callers(&self, ns: &str, name: &str) -> Vec<String> {
        // Once per reconcile over the whole cache: looked at in place under the stores' locks,
        // only the callers taken out. (Thousands of names copied per reconcile, then a snapshot
        // of every cached object, an `Arc` cloned and dropped for each, made the operator's work
        // grow with the square of the count.)
        let in_ns = |m: &kube::api::ObjectMeta| m.namespace.as_deref() == Some(ns);
        let mss = self
            .microservices
            .get()
            .map(|s| s.state_filter(|m| in_ns(&m.metadata) && depends_on(&m.spec, name)))
            .unwrap_or_default();
        let sagas = self
            .sagas
            .get()
            .map(|s| s.state_filter(|o| in_ns(&o.metadata) && saga_calls(&o.spec, name)))
            .unwrap_or_default();
        fn meta(m: &kube::api::ObjectMeta) -> (&str, &str) {
            (
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            )
        }
        callers(
            ns,
            name,
            mss.iter().map(|m| {
                let (n, s) = meta(&m.metadata);
                (n, s, &m.spec)
            }),
            sagas.iter().map(|o| {
                let (n, s) = meta(&o.metadata);
                (n, s, &o.spec)
            }),
        )
    }

    /// Notes what `ms` was rendered with, and has its targets reconciled again when its set of
    /// targets changed (a target added must admit it; one removed must stop admitting it).
    pub fn rendered(&self, ns: &str, ms: &Microservice, admitted: Vec<String>) {
        let name = ms.name_any();
        let key = format!("{ns}/{name}");
        // Most Microservices of a large namespace admit no caller or call no other: no entry is
        // kept for them (an empty one is a key and a map slot each, thousands of times).
        let mut all_admitted = self.admitted.lock().unwrap();
        match admitted.is_empty() {
            true => all_admitted.remove(&key),
            false => all_admitted.insert(key.clone(), admitted),
        };
        drop(all_admitted);
        let now: BTreeSet<String> = ms
            .spec
            .dependencies
            .iter()
            .filter_map(|d| d.microservice.clone())
            .collect();
        let mut targets = self.targets.lock().unwrap();
        let before = match now.is_empty() {
            true => targets.remove(&key),
            false => targets.insert(key, now.clone()),
        }
        .unwrap_or_default();
        drop(targets);
        for target in now.symmetric_difference(&before) {
            let _ = self.trigger.send(ObjectRef::new(target).within(ns));
        }
    }

    /// Microservices last rendered to admit `caller` (`ns/name` or `ns/saga/name`).
    pub fn admitting(&self, caller: &str) -> Vec<ObjectRef<Microservice>> {
        self.admitted
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, callers)| callers.iter().any(|c| c == caller))
            .filter_map(|(key, _)| {
                let (ns, name) = key.split_once('/')?;
                Some(ObjectRef::new(name).within(ns))
            })
            .collect()
    }

    /// The Microservices a change of `saga` concerns: those it calls now, and those that
    /// admitted it.
    pub fn saga_targets(&self, saga: &Saga) -> Vec<ObjectRef<Microservice>> {
        let ns = saga.namespace().unwrap_or_default();
        let mut out = self.admitting(&format!("{ns}/saga/{}", saga.name_any()));
        let calls = saga.spec.steps.iter().flat_map(|s| {
            std::iter::once(&s.action)
                .chain(s.compensation.as_ref())
                .filter_map(|a| a.http.as_ref()?.microservice.clone())
        });
        out.extend(calls.map(|t| ObjectRef::new(&t).within(&ns)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup();
        out
    }

    /// Forgets a Microservice that is gone.
    pub fn forget(&self, ns: &str, name: &str) {
        let key = format!("{ns}/{name}");
        self.admitted.lock().unwrap().remove(&key);
        self.targets.lock().unwrap().remove(&key);
    }
}

/// Reads the issuer Secret's `ca.crt` every [`RELOAD_EVERY`](super::mesh_ca::RELOAD_EVERY) and
/// hands a changed bundle to [`PodMesh::set_bundle`], until the task is dropped.
pub async fn follow_bundle(client: Client, ns: String, mesh: std::sync::Arc<PodMesh>) {
    use super::mesh_ca::{ISSUER_SECRET, RELOAD_EVERY, key};
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        match api.get(ISSUER_SECRET).await {
            Ok(s) => match key(&s, BUNDLE_KEY) {
                Some(pem) if !pem.trim().is_empty() => {
                    if mesh.set_bundle(&client, pem).await {
                        tracing::info!("the trust bundle changed; applied to every namespace");
                    }
                }
                _ => tracing::warn!(
                    "Secret {ns}/{ISSUER_SECRET} has no {BUNDLE_KEY}; the previous bundle stays"
                ),
            },
            Err(e) => tracing::warn!(error = %e, "reading the issuer Secret for the trust bundle"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ns: &str, yaml: &str) -> Microservice {
        let mut m: Microservice = serde_yaml::from_str(yaml).unwrap();
        m.metadata.namespace = Some(ns.into());
        m
    }

    #[test]
    fn a_caller_whose_targets_change_has_the_added_and_the_removed_reconciled() {
        let mesh = PodMesh::new("pem".into());
        let mut rx = mesh.take_triggers().unwrap();
        assert!(mesh.take_triggers().is_none(), "taken once");
        let mut drained = || {
            let mut v = Vec::new();
            while let Ok(r) = rx.try_recv() {
                v.push(format!("{}/{}", r.namespace.unwrap(), r.name));
            }
            v.sort();
            v
        };
        let v1 = ms(
            "shop",
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: orders}\nspec: {image: o, port: 1, dependencies: [{name: u, microservice: users}, {name: p, microservice: payments}, {name: x, url: 'http://x:1'}]}",
        );
        mesh.rendered("shop", &v1, vec![]);
        assert_eq!(drained(), ["shop/payments", "shop/users"]);
        // Reconciled again unchanged: nothing to tell.
        mesh.rendered("shop", &v1, vec![]);
        assert!(drained().is_empty());
        // payments dropped, audit added: both told, users not.
        let v2 = ms(
            "shop",
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: orders}\nspec: {image: o, port: 1, dependencies: [{name: u, microservice: users}, {name: a, microservice: audit}]}",
        );
        mesh.rendered("shop", &v2, vec![]);
        assert_eq!(drained(), ["shop/audit", "shop/payments"]);

        // Who admitted whom, for a caller that goes away.
        let users = ms(
            "shop",
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users}\nspec: {image: u, port: 1}",
        );
        mesh.rendered(
            "shop",
            &users,
            vec!["shop/orders".into(), "shop/saga/checkout".into()],
        );
        let names = |v: Vec<ObjectRef<Microservice>>| -> Vec<String> {
            v.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(names(mesh.admitting("shop/orders")), ["users"]);
        assert!(mesh.admitting("other/orders").is_empty());

        let saga: Saga = serde_yaml::from_str(
            "apiVersion: weir.dev/v1alpha1\nkind: Saga\nmetadata: {name: checkout, namespace: shop}\nspec:\n  broker: bus\n  trigger: {http: true}\n  steps:\n  - name: a\n    action: {http: {microservice: payments, path: /charge}}\n    compensation: {http: {microservice: payments, path: /refund}}\n",
        )
        .unwrap();
        // users admitted it (an older version of the saga called it), payments is called now.
        assert_eq!(names(mesh.saga_targets(&saga)), ["payments", "users"]);
        mesh.forget("shop", "users");
        assert_eq!(names(mesh.saga_targets(&saga)), ["payments"]);
    }
}
