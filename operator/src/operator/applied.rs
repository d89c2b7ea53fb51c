//! What the operator last applied of each child, to skip an apply that would change nothing.
//!
//! A reconcile renders every child and server-side applies it. Most reconciles change nothing:
//! the echo of the operator's own applies (each child's watch event reconciles its owner
//! again), a Deployment's status moving, the periodic resync. Each of those applies is still a
//! request the API server decodes, merges and compares, and at a thousand Microservices they
//! are most of its work. So an apply is skipped when both hold:
//!
//! - the rendered object is the one last applied (the same hash of its JSON), and
//! - the child is as that apply left it. For a ConfigMap, a Service or a ServiceAccount: its
//!   `resourceVersion` as its watch last told ([`Versions`]) is the one the apply answered, so
//!   anyone's change to it (an edit, a delete) moves the version and the next reconcile applies
//!   it again. For a Deployment, whose version also moves with every status update of the
//!   controller manager: its `generation` (which only a change of its spec moves: an edit, a
//!   scale) is the one the apply answered, and every label, annotation and owner reference the
//!   rendering sets is still there with its value.
//!
//! Nothing is skipped before the caches are set ([`Applied::watch`]) or for a child they do not
//! hold, and an operator that restarts applies everything once. The Deployment cache keeps what
//! a reconcile reads (generation, replicas, status; not the pod template, [`DeploymentState`]),
//! so a reconcile that skips the apply reads the current status from it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// The operator's caches of the children it watches.
#[derive(Clone)]
pub struct Stores {
    /// What a reconcile reads of each Deployment ([`DeploymentState`]).
    pub deployments: Store<DeploymentState>,
    pub services: Arc<Versions>,
    pub config_maps: Arc<Versions>,
    /// Watched only under the mesh (the only time the operator applies ServiceAccounts); empty
    /// otherwise.
    pub service_accounts: Arc<Versions>,
}

/// The `resourceVersion` of each child of one kind, as its watch last told: all an apply's skip
/// needs of a ConfigMap, a Service or a ServiceAccount. A reflector's store of their metadata
/// held a whole `ObjectMeta` each (owner references, uid, timestamps) behind an `Arc`: about
/// 0.8 KiB per child, with thousands of Microservices and four such children each. This keeps
/// two 64-bit hashes per child: of its namespace and name, and of its version (the skip only
/// asks whether the version is the one an apply answered).
#[derive(Default)]
pub struct Versions {
    state: Mutex<VersionsState>,
}

#[derive(Default)]
struct VersionsState {
    /// By the hash of namespace and name.
    current: HashMap<u64, u64>,
    /// A relist in progress: the objects listed so far, in place of `current` when it is done
    /// (as a reflector's store does it).
    relisting: Option<HashMap<u64, u64>>,
}

impl Versions {
    /// Takes in one event of the kind's watch.
    pub fn apply<K: Resource>(&self, event: &watcher::Event<K>) {
        fn key<K: Resource>(o: &K) -> u64 {
            let m = o.meta();
            object_key(
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            )
        }
        fn version<K: Resource>(o: &K) -> u64 {
            hash_of(&o.meta().resource_version)
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(o) => {
                st.current.insert(key(o), version(o));
            }
            watcher::Event::Delete(o) => {
                st.current.remove(&key(o));
            }
            watcher::Event::Init => st.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                st.relisting
                    .get_or_insert_with(HashMap::new)
                    .insert(key(o), version(o));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = st.relisting.take() {
                    st.current = listed;
                }
            }
        }
    }

    /// The hash of the version the watch last told of `namespace/name`; `None` when it does
    /// not know it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<u64> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .get(&object_key(namespace, name))
            .copied()
    }
}

/// The hash of an object's namespace and name, its key in [`Versions`].
fn object_key(namespace: &str, name: &str) -> u64 {
    hash_of(&(namespace, name))
}

/// The hash of a child's kind, namespace and name.
fn key(kind: &str, namespace: &str, name: &str) -> u64 {
    hash_of(&(kind, namespace, name))
}

#[derive(Clone, Copy)]
struct Last {
    /// Of the rendered object's JSON.
    hash: u64,
    /// Of the `resourceVersion` the apply answered; for a Deployment, its `generation`.
    version: u64,
}

/// The last applies, and the caches to compare them with.
///
/// Kept by hashes (of the child's kind, namespace and name; of what was applied; of the version
/// it was answered with): 24 bytes an apply, where the names and versions as strings were about
/// 150 with their allocations. Two children whose keys collide share an entry, and neither is
/// skipped unless the other's rendering also hashes the same: a 64-bit coincidence twice over.
#[derive(Default)]
pub struct Applied {
    last: Mutex<HashMap<u64, Last>>,
    stores: OnceLock<Stores>,
}

/// The children [`Applied`] knows the current version of.
pub trait Child: Resource<DynamicType = ()> + Serialize {
    /// The kind, in the key of its last apply.
    const KIND: &'static str;
    /// The hash of its `resourceVersion` in the watch cache, if the cache holds it.
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<u64>;
}

impl Child for Service {
    const KIND: &'static str = "Service";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<u64> {
        stores.services.get(namespace, name)
    }
}
impl Child for ConfigMap {
    const KIND: &'static str = "ConfigMap";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<u64> {
        stores.config_maps.get(namespace, name)
    }
}
impl Child for ServiceAccount {
    const KIND: &'static str = "ServiceAccount";
    fn cached_version(stores: &Stores, namespace: &str, name: &str) -> Option<u64> {
        stores.service_accounts.get(namespace, name)
    }
}

const DEPLOYMENT: &str = "Deployment";

/// What the Deployment cache keeps of a Deployment: what maps it to its owner, tells whether
/// it is as the operator applied it, and what a reconcile reads (generation, replicas, the
/// counts of its status). Decoded straight from the watch's events, so the pod template (most
/// of a Deployment) and the status conditions are skipped by the decoder, never allocated, and
/// what the metadata carries besides is dropped ([`trim_deployment_metadata`]); a `Deployment`
/// value is 2.4 KB of inline fields before any of its heap, this a few hundred bytes (with
/// thousands of Microservices this cache was a sixth of the operator's heap).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct DeploymentState {
    #[serde(default)]
    pub metadata: kube::api::ObjectMeta,
    #[serde(default)]
    pub spec: Option<DeploymentReplicas>,
    #[serde(default)]
    pub status: Option<DeploymentCounts>,
}

/// The counts of a Deployment's status a reconcile reads: how far its rollout is, and how many
/// pods are ready. Its conditions (two, a few hundred bytes with their messages) are not kept.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentCounts {
    pub observed_generation: Option<i64>,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub updated_replicas: Option<i32>,
}

/// The one field of a Deployment's spec a reconcile reads.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct DeploymentReplicas {
    #[serde(default)]
    pub replicas: Option<i32>,
}

impl Resource for DeploymentState {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;
    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Deployment".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "apps".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "deployments".into()
    }
    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

/// Drops what the operator's caches do not read of an object's metadata: its managed fields and
/// `kubectl apply`'s copy of the whole object (often the larger half of an object).
pub fn trim_metadata(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// [`trim_metadata`], and what else the Deployment cache does not read of a Deployment's
/// metadata: its uid and version (the cache is looked up by name; the skip compares its
/// generation), and the revision annotation of the Deployment controller.
pub fn trim_deployment_metadata(m: &mut kube::api::ObjectMeta) {
    trim_metadata(m);
    m.uid = None;
    m.resource_version = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("deployment.kubernetes.io/revision");
    }
}

impl From<Deployment> for DeploymentState {
    fn from(d: Deployment) -> Self {
        let mut state = DeploymentState {
            metadata: d.metadata,
            spec: d.spec.map(|s| DeploymentReplicas {
                replicas: s.replicas,
            }),
            status: d.status.map(|s| DeploymentCounts {
                observed_generation: s.observed_generation,
                replicas: s.replicas,
                ready_replicas: s.ready_replicas,
                updated_replicas: s.updated_replicas,
            }),
        };
        trim_deployment_metadata(&mut state.metadata);
        state
    }
}

/// Whether `live` still carries every label, annotation and owner reference of `rendered`.
fn keeps_metadata(rendered: &kube::api::ObjectMeta, live: &kube::api::ObjectMeta) -> bool {
    fn has(
        want: &Option<std::collections::BTreeMap<String, String>>,
        got: &Option<std::collections::BTreeMap<String, String>>,
    ) -> bool {
        want.iter()
            .flatten()
            .all(|(k, v)| got.as_ref().and_then(|g| g.get(k)) == Some(v))
    }
    has(&rendered.labels, &live.labels)
        && has(&rendered.annotations, &live.annotations)
        && rendered.owner_references.iter().flatten().all(|o| {
            live.owner_references.iter().flatten().any(|l| {
                l.uid == o.uid
                    && l.kind == o.kind
                    && l.name == o.name
                    && l.controller == o.controller
            })
        })
        && live.deletion_timestamp.is_none()
}

/// The hash of a rendered object's JSON.
fn json_hash(object: &impl Serialize) -> u64 {
    hash_of(&serde_json::to_vec(object).expect("a rendered object serializes"))
}

/// A 64-bit hash without a random state: the same for the same value throughout the process.
/// What the operator keeps per object at scale is kept as such hashes ([`Applied`],
/// [`Versions`], [`super::conditions::LastWritten`]).
pub(super) fn hash_of(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
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
        let Some(last) = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key(K::KIND, namespace, name))
            .copied()
        else {
            return false;
        };
        last.hash == json_hash(object)
            && K::cached_version(stores, namespace, name) == Some(last.version)
    }

    /// Records an apply of `object` that the API server answered with `resource_version`.
    pub fn record<K: Child>(
        &self,
        namespace: &str,
        name: &str,
        object: &K,
        resource_version: Option<String>,
    ) {
        let key = key(K::KIND, namespace, name);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match resource_version {
            Some(rv) => {
                last.insert(
                    key,
                    Last {
                        hash: json_hash(object),
                        version: hash_of(&Some(rv)),
                    },
                );
            }
            None => {
                last.remove(&key);
            }
        }
    }

    /// Records an apply of Deployment `object` that the API server answered with `answer`.
    pub fn record_deployment(
        &self,
        namespace: &str,
        name: &str,
        object: &Deployment,
        answer: &kube::api::ObjectMeta,
    ) {
        let key = key(DEPLOYMENT, namespace, name);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match answer.generation {
            Some(generation) => {
                last.insert(
                    key,
                    Last {
                        hash: json_hash(object),
                        version: generation as u64,
                    },
                );
            }
            None => {
                last.remove(&key);
            }
        }
    }

    /// The cached Deployment (with its current status), when applying `object` would change
    /// nothing (module docs).
    pub fn unchanged_deployment(
        &self,
        namespace: &str,
        name: &str,
        object: &Deployment,
    ) -> Option<Arc<DeploymentState>> {
        let stores = self.stores.get()?;
        let last = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key(DEPLOYMENT, namespace, name))
            .copied()?;
        if last.hash != json_hash(object) {
            return None;
        }
        let live = stores
            .deployments
            .get(&ObjectRef::<DeploymentState>::new(name).within(namespace))?;
        let same_spec = live.metadata.generation.map(|g| g as u64) == Some(last.version);
        (same_spec && keeps_metadata(&object.metadata, &live.metadata)).then_some(live)
    }

    /// How many applies are remembered.
    pub fn remembered(&self) -> usize {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forgets the children of `namespace` named `names`, of every kind (an owner deleted).
    pub fn forget(&self, namespace: &str, names: &[String]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for kind in [
            DEPLOYMENT,
            Service::KIND,
            ConfigMap::KIND,
            ServiceAccount::KIND,
        ] {
            for name in names {
                last.remove(&key(kind, namespace, name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::PartialObjectMeta;
    use kube::runtime::reflector;

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
        let config_maps = Arc::new(Versions::default());
        let writer = config_maps.clone();
        applied.watch(Stores {
            deployments: reflector::store().0,
            services: Default::default(),
            config_maps,
            service_accounts: Default::default(),
        });
        // Not in the cache (not seen yet, or deleted): applied.
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        writer.apply(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "10",
        )));
        assert!(applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Another rendering: applied.
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &config_map("{\"a\":1}")));
        // Someone else's change (a new version): applied, until this apply is recorded.
        writer.apply(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "11",
        )));
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        applied.record("shop", "orders-weir-proxy", &cm, Some("12".into()));
        writer.apply(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        assert!(applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Deleted: applied again.
        writer.apply(&watcher::Event::Delete(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
        // Forgotten with its owner.
        writer.apply(&watcher::Event::Apply(meta::<ConfigMap>(
            "orders-weir-proxy",
            "12",
        )));
        applied.forget("shop", &["orders-weir-proxy".to_string()]);
        assert!(!applied.unchanged("shop", "orders-weir-proxy", &cm));
    }

    /// A version as [`Versions::get`] tells it.
    fn version(rv: &str) -> Option<u64> {
        Some(hash_of(&Some(rv.to_string())))
    }

    #[test]
    fn versions_follow_the_watch_and_a_relist_replaces_them_whole() {
        let v = Versions::default();
        let ev = |name: &str, rv: &str| meta::<ConfigMap>(name, rv);
        // Before the first list is done nothing is known: nothing is skipped.
        v.apply(&watcher::Event::<PartialObjectMeta<ConfigMap>>::Init);
        v.apply(&watcher::Event::InitApply(ev("a", "1")));
        assert_eq!(v.get("shop", "a"), None);
        v.apply(&watcher::Event::InitApply(ev("b", "2")));
        v.apply(&watcher::Event::<PartialObjectMeta<ConfigMap>>::InitDone);
        assert_eq!(v.get("shop", "a"), version("1"));
        assert_eq!(v.get("shop", "b"), version("2"));
        assert_eq!(v.get("other", "a"), None, "by namespace too");
        v.apply(&watcher::Event::Apply(ev("a", "3")));
        assert_eq!(v.get("shop", "a"), version("3"));
        v.apply(&watcher::Event::Delete(ev("b", "4")));
        assert_eq!(v.get("shop", "b"), None);
        // A relist (the watch was down): the old versions stand until it is done, then only
        // what it listed is known (`a`, deleted meanwhile, is forgotten).
        v.apply(&watcher::Event::Apply(ev("b", "5")));
        v.apply(&watcher::Event::<PartialObjectMeta<ConfigMap>>::Init);
        v.apply(&watcher::Event::InitApply(ev("b", "6")));
        assert_eq!(v.get("shop", "a"), version("3"));
        v.apply(&watcher::Event::<PartialObjectMeta<ConfigMap>>::InitDone);
        assert_eq!(v.get("shop", "a"), None);
        assert_eq!(v.get("shop", "b"), version("6"));
    }

    fn deployment(image: &str) -> Deployment {
        let mut d = Deployment {
            metadata: kube::api::ObjectMeta {
                name: Some("orders".into()),
                namespace: Some("shop".into()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "weir".to_string(),
                    )]
                    .into(),
                ),
                annotations: Some([("weir.dev/config-hash".to_string(), "abc".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        d.spec = Some(k8s_openapi::api::apps::v1::DeploymentSpec {
            replicas: Some(2),
            template: k8s_openapi::api::core::v1::PodTemplateSpec {
                spec: Some(k8s_openapi::api::core::v1::PodSpec {
                    containers: vec![k8s_openapi::api::core::v1::Container {
                        name: "app".into(),
                        image: Some(image.into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        });
        d
    }

    /// The live Deployment as the cache holds it: `generation`, `ready` replicas, and what else
    /// `edit` changes.
    fn live(generation: i64, ready: i32, edit: impl FnOnce(&mut Deployment)) -> DeploymentState {
        let mut d = deployment("shop/orders:1");
        d.metadata.generation = Some(generation);
        d.metadata.resource_version = Some(format!("{}", generation * 100 + i64::from(ready)));
        d.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("deployment.kubernetes.io/revision".into(), "1".into());
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            ready_replicas: Some(ready),
            updated_replicas: Some(2),
            replicas: Some(2),
            observed_generation: Some(generation),
            conditions: Some(vec![k8s_openapi::api::apps::v1::DeploymentCondition {
                type_: "Available".into(),
                status: "True".into(),
                message: Some("Deployment has minimum availability.".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        edit(&mut d);
        // As the watch decodes it.
        let mut state: DeploymentState =
            serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        trim_deployment_metadata(&mut state.metadata);
        assert_eq!(state.spec.as_ref().unwrap().replicas, Some(2));
        assert_eq!(
            state.status,
            Some(DeploymentCounts {
                observed_generation: Some(generation),
                replicas: Some(2),
                ready_replicas: Some(ready),
                updated_replicas: Some(2),
            })
        );
        let annotations = state.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key("deployment.kubernetes.io/revision"));
        assert_eq!(
            annotations["weir.dev/config-hash"],
            d.metadata.annotations.as_ref().unwrap()["weir.dev/config-hash"]
        );
        // The same as what an apply's answer becomes.
        let answered = DeploymentState::from(d);
        assert_eq!(answered.status, state.status);
        assert_eq!(answered.metadata, state.metadata);
        state
    }

    #[test]
    fn a_deployment_is_applied_again_for_a_spec_or_metadata_change_not_for_its_status() {
        let applied = Applied::default();
        let (deployments, mut writer) = reflector::store();
        applied.watch(Stores {
            deployments,
            services: Default::default(),
            config_maps: Default::default(),
            service_accounts: Default::default(),
        });
        let rendered = deployment("shop/orders:1");
        // Never applied: applied.
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        applied.record_deployment("shop", "orders", &rendered, &live(3, 0, |_| {}).metadata);
        // Applied, but not in the cache yet: applied.
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        writer.apply_watcher_event(&watcher::Event::Apply(live(3, 0, |_| {})));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_some()
        );
        // The controller manager's status updates move its version, not its generation: skipped,
        // and the status read is the cache's current one.
        writer.apply_watcher_event(&watcher::Event::Apply(live(3, 2, |_| {})));
        let cached = applied
            .unchanged_deployment("shop", "orders", &rendered)
            .expect("skipped");
        assert_eq!(cached.status.as_ref().unwrap().ready_replicas, Some(2));
        assert_eq!(cached.spec.as_ref().unwrap().replicas, Some(2));
        // Another rendering: applied.
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &deployment("shop/orders:2"))
                .is_none()
        );
        // A spec change by anyone (kubectl scale, an edit) moves the generation: applied.
        writer.apply_watcher_event(&watcher::Event::Apply(live(4, 2, |_| {})));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        applied.record_deployment("shop", "orders", &rendered, &live(5, 2, |_| {}).metadata);
        writer.apply_watcher_event(&watcher::Event::Apply(live(5, 2, |_| {})));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_some()
        );
        // A label or annotation of the rendering removed or changed: applied.
        writer.apply_watcher_event(&watcher::Event::Apply(live(5, 2, |d| {
            d.metadata.labels.as_mut().unwrap().clear();
        })));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        writer.apply_watcher_event(&watcher::Event::Apply(live(5, 2, |d| {
            d.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert("weir.dev/config-hash".into(), "edited".into());
        })));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        // Being deleted: applied.
        writer.apply_watcher_event(&watcher::Event::Apply(live(5, 2, |d| {
            d.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
        })));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
        // Deleted: applied.
        writer.apply_watcher_event(&watcher::Event::Delete(live(5, 2, |_| {})));
        assert!(
            applied
                .unchanged_deployment("shop", "orders", &rendered)
                .is_none()
        );
    }
}
