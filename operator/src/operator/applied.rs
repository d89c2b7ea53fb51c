//! What the operator last applied of each child, to skip an apply that would change nothing.
//!
//! A reconcile renders every child and server-side applies it. Most reconciles change nothing:
//! the echo of the operator's own applies (each child's watch event reconciles its owner
//! again), a Deployment's status moving, the periodic resync. Each of those applies is still a
//! request the API server decodes, merges and compares, and at a thousand Microservices they
//! are most of its work. So an apply is skipped when both hold:
//!
//! - the rendered object is the one last applied (the same hash of its JSON), and
//! - the child is as that apply left it: its `resourceVersion` in the operator's watch cache is
//!   the one the apply answered. Anyone's change to it (an edit, a delete, a scale, the
//!   controller manager's status update) moves the version, and the next reconcile applies it
//!   again, so drift is repaired as before.
//!
//! Nothing is skipped before the caches are set ([`Applied::watch`]) or for a child they do not
//! hold, and an operator that restarts applies everything once. The Deployment's answer is kept
//! too: a reconcile that skips its apply reads the Deployment's status from it, which is current
//! since its version has not moved.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Resource;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// The operator's metadata caches of the children it watches.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<PartialObjectMeta<Deployment>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
}

/// A child: its kind, namespace and name.
type Key = (&'static str, String, String);

#[derive(Clone)]
struct Last {
    hash: u64,
    resource_version: String,
    deployment: Option<Arc<Deployment>>,
}

/// The last applies, and the caches to compare them with.
#[derive(Default)]
pub struct Applied {
    last: Mutex<HashMap<Key, Last>>,
    stores: OnceLock<Stores>,
}

/// The children [`Applied`] knows the current version of.
pub trait Child: Resource<DynamicType = ()> + Serialize {
    /// The kind, in the key of its last apply.
    const KIND: &'static str;
    /// Its `resourceVersion` in the watch cache, if the cache holds it.
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<String>;
}

fn version<K>(store: &Store<PartialObjectMeta<K>>, namespace: &str, name: &str) -> Option<String>
where
    K: Resource<DynamicType = ()> + Clone,
    PartialObjectMeta<K>: Resource<DynamicType = ()>,
{
    let r = ObjectRef::<PartialObjectMeta<K>>::new(name).within(namespace);
    store.get(&r)?.metadata.resource_version.clone()
}

impl Child for Deployment {
    const KIND: &'static str = "Deployment";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<String> {
        version(&stores.deployments, namespace, name)
    }
}
impl Child for Service {
    const KIND: &'static str = "Service";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<String> {
        version(&stores.services, namespace, name)
    }
}
impl Child for ConfigMap {
    const KIND: &'static str = "ConfigMap";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<String> {
        version(&stores.config_maps, namespace, name)
    }
}

fn hash_of(object: &impl Serialize) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(object)
        .expect("a rendered object serializes")
        .hash(&mut h);
    h.finish()
}

impl Applied {
    /// Sets the caches (once, when the controller starts its watches).
    pub fn watch(&self, stores: Stores) {
        let _ = self.stores.set(stores);
    }

    /// Whether applying `object` as `<namespace>/<name>` would change nothing (module docs).
    pub fn unchanged<K: Child>(&self, namespace: &str, name: &str, object: &K) -> bool {
        let Some(stores) = self.stores.get() else {
            return false;
        };
        let key = (<K as Child>::KIND, namespace.to_string(), name.to_string());
        let Some(last) = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
        else {
            return false;
        };
        last.hash == hash_of(object)
            && K::cached_version(stores, namespace, name).as_deref()
                == Some(last.resource_version.as_str())
    }

    /// Records an apply of `object` that the API server answered with `resource_version`.
    pub fn record<K: Child>(
        &self,
        namespace: &str,
        name: &str,
        object: &K,
        resource_version: Option<String>,
    ) {
        let key = (<K as Child>::KIND, namespace.to_string(), name.to_string());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match resource_version {
            Some(rv) => {
                last.insert(
                    key,
                    Last {
                        hash: hash_of(object),
                        resource_version: rv,
                        deployment: None,
                    },
                );
            }
            None => {
                last.remove(&key);
            }
        }
    }

    /// Records the Deployment the API server answered an apply of `object` with: of the answer,
    /// what a reconcile reads (its generation, replicas and status), not its pod template.
    pub fn record_deployment(
        &self,
        namespace: &str,
        name: &str,
        object: &Deployment,
        answer: &Deployment,
    ) {
        self.record(
            namespace,
            name,
            object,
            answer.metadata.resource_version.clone(),
        );
        let kept = Deployment {
            metadata: kube::api::ObjectMeta {
                name: answer.metadata.name.clone(),
                namespace: answer.metadata.namespace.clone(),
                generation: answer.metadata.generation,
                resource_version: answer.metadata.resource_version.clone(),
                ..Default::default()
            },
            spec: answer
                .spec
                .as_ref()
                .map(|s| k8s_openapi::api::apps::v1::DeploymentSpec {
                    replicas: s.replicas,
                    ..Default::default()
                }),
            status: answer.status.clone(),
        };
        if let Some(l) = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&(<Deployment as Child>::KIND, namespace.into(), name.into()))
        {
            l.deployment = Some(Arc::new(kept));
        }
    }

    /// The Deployment of the last apply, when applying `object` would change nothing.
    pub fn unchanged_deployment(
        &self,
        namespace: &str,
        name: &str,
        object: &Deployment,
    ) -> Option<Arc<Deployment>> {
        if !self.unchanged(namespace, name, object) {
            return None;
        }
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(<Deployment as Child>::KIND, namespace.into(), name.into()))?
            .deployment
            .clone()
    }

    /// Forgets every child of `namespace` named `name…` (an owner deleted).
    pub fn forget(&self, namespace: &str, names: &[String]) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, ns, n), _| !(ns == namespace && names.contains(n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn meta<K>(name: &str, rv: &str) -> PartialObjectMeta<K>
    where
        K: Resource<DynamicType = ()> + Default,
    {
        let mut m = PartialObjectMeta::<K>::default();
        m.metadata.name = Some(name.into());
        m.metadata.namespace = Some("shop".into());
        m.metadata.resource_version = Some(rv.into());
        m
    }

    fn config_map(value: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("orders-weir-proxy".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            data: Some([("proxy.json".to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_apply_is_skipped_only_for_the_same_object_at_the_version_it_left() {
        let applied = Applied::default();
        let cm = config_map("{}");
        // No caches yet: never skipped.
        applied.record("shop", "orders-weir-proxy", &cm, Some("10".into()));
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        let (config_maps, mut writer) = reflector::store();
        applied.watch(Stores {
            deployments: reflector::store().0,
            services: reflector::store().0,
            config_maps,
        });
        // Not in the cache (not seen yet, or deleted): applied.
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        writer.apply_watcher_event(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "10",
        )));
        assert!(applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Another rendering: applied.
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &config_map("{\"a\":1}")));
        // Someone else's change (a new version): applied, until this apply is recorded.
        writer.apply_watcher_event(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "11",
        )));
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        applied.record("shop", "orders-weir-proxy", &cm, Some("12".into()));
        writer.apply_watcher_event(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        assert!(applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Deleted: applied again.
        writer.apply_watcher_event(&watcher::Event::Delete(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Forgotten with its owner.
        writer.apply_watcher_event(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        applied.forget("shop", &["orders-weir-proxy".to_string()]);
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
    }
}
