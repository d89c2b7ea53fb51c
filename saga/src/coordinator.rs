//! The coordinator: drives instances step by step, compensates in reverse order on failure, and
//! shares the instances with the other replicas through leases.
//!
//! - Every state change is appended to the instance's log before (or, for outcomes, right after)
//!   it is acted on; a replica that restarts folds the log and carries on from there.
//! - Leases: a JetStream KV bucket `weir_saga_leases_<ns>_<saga>` whose `max_age` is the lease
//!   TTL; key = instance id, value = replica id. A replica creates the key to take an instance
//!   (create fails while another holds it), renews it with a revision-checked update every TTL/4,
//!   and deletes it when the instance ends. A replica killed with `kill -9` stops renewing; the
//!   key expires after the TTL and another replica (or the restarted one) takes the instance.
//!   Chosen over a work-queue consumer because a lease follows one instance for its whole life
//!   (a work-queue message would have to be re-published at every step to stay visible), and
//!   every replica already tails the log to know which instances are unfinished.
//! - The log's append is conditional on the last sequence seen: should a lease ever be held
//!   twice (a replica paused longer than the TTL), the second writer's append fails and it stops.

use super::call::{CallHeaders, Caller, Outcome};
use super::config::{CallConfig, CoordinatorConfig, RetryConfig, StepConfig};
use super::log::{
    Entry, Event, Instance, Log, LogError, Request, StateFilter, Status, StepOutcome,
};
use super::metrics::{SagaLabel, SagaMetrics, StepLabel};
use super::template;
use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// One instance as every replica sees it (from tailing the log).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub id: String,
    pub status: Status,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Last step touched (1-based), 0 before the first.
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The definition it runs ([`Definition::version`]); `None`: started before versions.
    pub version: Option<String>,
    #[serde(skip)]
    cancel_requested: bool,
}

/// What an instance runs: the steps and the compensation policy it started with, stored under
/// its content hash (the version) in the versions bucket when a coordinator starts with it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub steps: Vec<StepConfig>,
    pub compensation_retry: RetryConfig,
    /// Where each HTTP target was when the version was first stored (its direct address when
    /// the config had one): how an instance reaches a target the current config no longer has.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
}

impl Definition {
    pub fn of(cfg: &CoordinatorConfig) -> Self {
        Self {
            steps: cfg.steps.clone(),
            compensation_retry: cfg.compensation_retry.clone(),
            targets: cfg
                .targets
                .iter()
                .map(|(k, v)| (k.clone(), cfg.direct_targets.get(k).unwrap_or(v).clone()))
                .collect(),
        }
    }

    /// 12 hex digits of the SHA-256 of the steps and the compensation policy (not the targets'
    /// addresses: the same steps on other ports are the same version).
    pub fn version(&self) -> String {
        let canonical = serde_json::to_vec(&json!({
            "steps": self.steps,
            "compensationRetry": self.compensation_retry,
        }))
        .expect("definitions serialize");
        hex::encode(Sha256::digest(&canonical))[..12].to_string()
    }
}

/// A definition ready to run: its step names and its targets resolved (the current config's
/// address of a target first, else the one stored with the definition).
pub struct Loaded {
    pub version: Option<String>,
    pub def: Definition,
    names: Vec<String>,
    targets: BTreeMap<String, String>,
}

impl Loaded {
    fn new(version: Option<String>, def: Definition, cfg: &CoordinatorConfig) -> Self {
        let mut targets = def.targets.clone();
        targets.extend(cfg.targets.clone());
        Self {
            version,
            names: def.steps.iter().map(|s| s.name.clone()).collect(),
            def,
            targets,
        }
    }
}

/// Counts of one version's instances.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VersionStats {
    /// Unfinished: running, compensating or cancelling.
    pub running: i64,
    pub completed: i64,
    pub compensated: i64,
    pub cancelled: i64,
    pub failed: i64,
}

/// Counts over every instance on the log.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub running: i64,
    pub compensating: i64,
    pub completed: i64,
    pub compensated: i64,
    /// Instances that ended `CompensationFailed`.
    pub failed: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Instances whose cancel was requested, not ended yet.
    #[serde(default)]
    pub cancelling: i64,
    /// Instances cancelled (compensated on request).
    #[serde(default)]
    pub cancelled: i64,
    /// The version new instances start on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Counts per version (`unversioned`: started before versions existed).
    #[serde(default)]
    pub versions: BTreeMap<String, VersionStats>,
}

/// The key of instances without a version in [`Stats::versions`].
pub const UNVERSIONED: &str = "unversioned";

#[derive(Default)]
struct View {
    instances: BTreeMap<String, Summary>,
    last_failure: Option<String>,
}

/// The end of an instance, as broadcast to `?wait` callers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    pub id: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("instance id must be 1 to 64 of [A-Za-z0-9_-]")]
    BadId,
    #[error("instance {0} is being started by another replica; retry")]
    Busy(String),
    #[error("{0}")]
    Log(#[from] LogError),
}

pub struct Coordinator {
    pub cfg: Arc<CoordinatorConfig>,
    pub replica: String,
    pub log: Log,
    pub metrics: Arc<SagaMetrics>,
    js: jetstream::Context,
    leases: kv::Store,
    versions: kv::Store,
    caller: Caller,
    /// The definition new instances run.
    pub current: Arc<Loaded>,
    /// Older definitions, loaded from the versions bucket when an instance needs one.
    defs: Mutex<HashMap<String, Arc<Loaded>>>,
    view: Mutex<View>,
    driving: Mutex<HashSet<String>>,
    finished: broadcast::Sender<Finished>,
    /// True once the view has caught up with the log.
    pub caught_up: AtomicBool,
    pub stopping: AtomicBool,
    crash: CrashPoints,
}

impl Coordinator {
    pub async fn new(
        cfg: CoordinatorConfig,
        client: async_nats::Client,
        replica: String,
    ) -> anyhow::Result<Arc<Self>> {
        let js = jetstream::new(client.clone());
        let retention = Duration::from_millis(
            cfg.retention_ms
                .unwrap_or(super::log::LOG_MAX_AGE.as_millis() as u64),
        );
        let log = Log::open_with(js.clone(), &cfg.namespace, &cfg.name, retention).await?;
        let bucket = super::log::lease_bucket(&cfg.namespace, &cfg.name);
        let ttl = Duration::from_millis(cfg.lease_ttl_ms);
        let leases = match js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                description: format!("Weir Saga {}/{}: instance leases", cfg.namespace, cfg.name),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "lease bucket exists, opening it");
                js.get_key_value(&bucket)
                    .await
                    .map_err(|e| anyhow::anyhow!("lease bucket {bucket}: {e}"))?
            }
        };
        // The definition new instances run, stored under its version before any instance can
        // name it (create: a version's first definition stays, the same steps whatever ports).
        let vbucket = super::log::versions_bucket(&cfg.namespace, &cfg.name);
        let versions = match js
            .create_key_value(kv::Config {
                bucket: vbucket.clone(),
                description: format!(
                    "Weir Saga {}/{}: the definitions instances run, by version",
                    cfg.namespace, cfg.name
                ),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "versions bucket exists, opening it");
                js.get_key_value(&vbucket)
                    .await
                    .map_err(|e| anyhow::anyhow!("versions bucket {vbucket}: {e}"))?
            }
        };
        let def = Definition::of(&cfg);
        let version = def.version();
        let text = serde_json::to_vec(&def).expect("definitions serialize");
        if versions
            .get(&version)
            .await
            .map_err(|e| anyhow::anyhow!("versions bucket {vbucket}: {e}"))?
            .is_none()
            && let Err(e) = versions.create(&version, text.into()).await
        {
            // Another replica stored it first; anything else is fatal.
            if versions.get(&version).await.ok().flatten().is_none() {
                anyhow::bail!("storing definition {version} in {vbucket}: {e}");
            }
        }
        let current = Arc::new(Loaded::new(Some(version), def, &cfg));
        let caller = Caller::new(client, cfg.targets.clone());
        let (finished, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            cfg: Arc::new(cfg),
            replica,
            log,
            metrics: Arc::new(SagaMetrics::default()),
            js,
            leases,
            versions,
            caller,
            current,
            defs: Mutex::new(HashMap::new()),
            view: Mutex::new(View::default()),
            driving: Mutex::new(HashSet::new()),
            finished,
            caught_up: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            crash: CrashPoints::from_env(),
        }))
    }

    fn label(&self) -> SagaLabel {
        SagaLabel {
            saga: self.cfg.name.clone(),
        }
    }

    fn saga_ref(&self) -> String {
        format!("{}/{}", self.cfg.namespace, self.cfg.name)
    }

    /// The definition of `version` (`None`: the current one, for instances started before
    /// versions existed).
    pub async fn definition(&self, version: Option<&str>) -> Result<Arc<Loaded>, LogError> {
        let Some(v) = version else {
            return Ok(self.current.clone());
        };
        if self.current.version.as_deref() == Some(v) {
            return Ok(self.current.clone());
        }
        if let Some(d) = self.defs.lock().expect("defs").get(v) {
            return Ok(d.clone());
        }
        let bytes = self
            .versions
            .get(v)
            .await
            .map_err(|e| LogError::Broker(format!("definition {v}: {e}")))?
            .ok_or_else(|| LogError::Broker(format!("no definition {v} in the versions bucket")))?;
        let def: Definition = serde_json::from_slice(&bytes)
            .map_err(|e| LogError::Broker(format!("definition {v}: {e}")))?;
        let loaded = Arc::new(Loaded::new(Some(v.to_string()), def, &self.cfg));
        self.defs
            .lock()
            .expect("defs")
            .insert(v.to_string(), loaded.clone());
        Ok(loaded)
    }

    /// Runs the background work: tailing the log and taking over unowned unfinished instances.
    pub fn spawn_background(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.tail().await {
                    tracing::warn!(error = %e, "tailing the saga log failed; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis((me.cfg.lease_ttl_ms / 4).max(50));
            loop {
                tokio::time::sleep(every).await;
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if me.caught_up.load(Ordering::SeqCst) {
                    me.scan().await;
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let retention = me.retention();
            let every = (retention / 10).clamp(Duration::from_millis(500), Duration::from_secs(60));
            loop {
                tokio::time::sleep(every).await;
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if me.caught_up.load(Ordering::SeqCst) {
                    me.expire(retention).await;
                }
            }
        });
    }

    /// How long finished instances are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(
            self.cfg
                .retention_ms
                .unwrap_or(super::log::LOG_MAX_AGE.as_millis() as u64),
        )
    }

    /// Purges the finished instances that ended more than `retention` ago (every replica does;
    /// purging twice is harmless).
    async fn expire(&self, retention: Duration) {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let ids: Vec<String> = self
            .view
            .lock()
            .expect("view")
            .instances
            .values()
            .filter(|s| s.status.finished() && s.updated_at.is_some_and(|t| t < cutoff))
            .map(|s| s.id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        match self.log.purge_ids(&ids).await {
            Ok(()) => {
                tracing::info!(
                    purged = ids.len(),
                    "purged finished instances past the retention"
                );
                self.forget(&ids);
            }
            Err(e) => tracing::warn!(error = %e, "cannot purge expired instances"),
        }
    }

    fn forget(&self, ids: &[String]) {
        let mut view = self.view.lock().expect("view");
        for id in ids {
            view.instances.remove(id);
        }
    }

    /// Follows every instance's log into the view (from the beginning, then live).
    async fn tail(self: &Arc<Self>) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&self.log.stream).await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: super::log::subjects(&self.cfg.namespace, &self.cfg.name),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        if consumer.cached_info().num_pending == 0 {
            self.caught_up.store(true, Ordering::SeqCst);
        }
        // Restarting the tail replays everything: start from an empty view.
        *self.view.lock().expect("view") = View::default();
        let mut messages = consumer.messages().await?;
        while let Some(m) = messages.next().await {
            let m = m?;
            let pending = m.info().map(|i| i.pending).unwrap_or(0);
            let id = m.subject.rsplit('.').next().unwrap_or_default().to_string();
            if id == "~purged" {
                if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                    let ids: Vec<String> = v["purged"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.forget(&ids);
                }
            } else if let Ok(entry) = serde_json::from_slice::<Entry>(&m.payload) {
                self.observe(&id, &entry);
            }
            if pending == 0 {
                self.caught_up.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn observe(&self, id: &str, entry: &Entry) {
        let mut view = self.view.lock().expect("view");
        let s = view
            .instances
            .entry(id.to_string())
            .or_insert_with(|| Summary {
                id: id.to_string(),
                status: Status::Running,
                started_at: Some(entry.at),
                updated_at: None,
                step: 0,
                reason: None,
                version: None,
                cancel_requested: false,
            });
        s.updated_at = Some(entry.at);
        let mut done = None;
        let compensating = |s: &mut Summary| {
            if s.status != Status::Cancelling {
                s.status = Status::Compensating;
            }
        };
        match &entry.event {
            Event::Started { version, .. } => s.version = version.clone(),
            Event::StepStarted { step, .. } | Event::StepSucceeded { step, .. } => s.step = *step,
            Event::StepFailed {
                step, name, error, ..
            } => {
                s.step = *step;
                compensating(s);
                s.reason = Some(format!("step {step} ({name}) failed: {error}"));
            }
            Event::CompStarted { .. } => compensating(s),
            Event::CancelRequested {
                requested_by,
                reason,
            } if !s.status.finished() && !s.cancel_requested => {
                s.cancel_requested = true;
                s.status = Status::Cancelling;
                s.reason = Some(super::log::cancel_reason(requested_by, reason));
            }
            Event::RetryRequested { .. } if s.status == Status::CompensationFailed => {
                s.status = if s.cancel_requested {
                    Status::Cancelling
                } else {
                    Status::Compensating
                };
            }
            Event::Cancelled { reason } => {
                s.reason = Some(reason.clone());
                done = Some(Status::Cancelled);
            }
            Event::Completed => done = Some(Status::Completed),
            Event::Compensated { reason } => {
                s.reason = Some(reason.clone());
                done = Some(Status::Compensated);
            }
            Event::CompensationFailed { reason } => {
                s.reason = Some(reason.clone());
                done = Some(Status::CompensationFailed);
            }
            _ => {}
        }
        if let Some(status) = done {
            s.status = status;
            let f = Finished {
                id: id.to_string(),
                status,
                reason: s.reason.clone(),
            };
            if !matches!(status, Status::Completed | Status::Cancelled) {
                view.last_failure = f.reason.clone().map(|r| format!("{id}: {r}"));
            }
            let _ = self.finished.send(f);
        }
    }

    pub fn stats(&self) -> Stats {
        let view = self.view.lock().expect("view");
        let mut st = Stats {
            last_failure: view.last_failure.clone(),
            ..Default::default()
        };
        st.current_version = self.current.version.clone();
        if let Some(v) = &st.current_version {
            st.versions.entry(v.clone()).or_default();
        }
        for s in view.instances.values() {
            let v = st
                .versions
                .entry(s.version.clone().unwrap_or_else(|| UNVERSIONED.to_string()))
                .or_default();
            match s.status {
                Status::Running => st.running += 1,
                Status::Compensating => st.compensating += 1,
                Status::Cancelling => st.cancelling += 1,
                Status::Completed => st.completed += 1,
                Status::Compensated => st.compensated += 1,
                Status::Cancelled => st.cancelled += 1,
                Status::CompensationFailed => st.failed += 1,
            }
            match s.status {
                Status::Completed => v.completed += 1,
                Status::Compensated => v.compensated += 1,
                Status::Cancelled => v.cancelled += 1,
                Status::CompensationFailed => v.failed += 1,
                _ => v.running += 1,
            }
        }
        st
    }

    pub fn summaries(&self) -> Vec<Summary> {
        self.view
            .lock()
            .expect("view")
            .instances
            .values()
            .cloned()
            .collect()
    }

    /// The instances whose status `state` selects (any when `None`) and whose version is
    /// `version` (any when `None`; `unversioned` for those started before versions).
    pub fn filtered(&self, state: Option<StateFilter>, version: Option<&str>) -> Vec<Summary> {
        self.summaries()
            .into_iter()
            .filter(|s| state.is_none_or(|f| f.matches(s.status)))
            .filter(|s| version.is_none_or(|v| s.version.as_deref().unwrap_or(UNVERSIONED) == v))
            .collect()
    }

    /// Logs a cancel request; then takes the instance over when nobody drives it (else its
    /// driver meets the request at its next append).
    pub async fn cancel(
        self: &Arc<Self>,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<Request, LogError> {
        let r = self
            .log
            .request_cancel(id, &self.replica, by, reason)
            .await?;
        if matches!(r, Request::Accepted(_)) {
            tracing::info!(instance = %id, requested_by = %by, %reason, "cancel requested");
            self.take_over(id).await;
        }
        Ok(r)
    }

    /// Logs a retry request on a `CompensationFailed` instance and takes it over.
    pub async fn retry(
        self: &Arc<Self>,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<Request, LogError> {
        let r = self
            .log
            .request_retry(id, &self.replica, by, reason)
            .await?;
        if matches!(r, Request::Accepted(_)) {
            tracing::info!(instance = %id, requested_by = %by, %reason, "retry of the compensations requested");
            self.take_over(id).await;
        }
        Ok(r)
    }

    async fn take_over(self: &Arc<Self>, id: &str) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(rev) = self.acquire(id).await {
            self.drive(id.to_string(), None, rev);
        }
    }

    /// Purges the finished instances `state` selects that ended more than `older_than` ago
    /// (and run `version`, when given). Reads the log rather than the view, so that what is
    /// purged is finished as of now.
    pub async fn purge(
        &self,
        state: StateFilter,
        older_than: Duration,
        version: Option<&str>,
    ) -> Result<Vec<String>, LogError> {
        let ids = self.log.purge(selector(state, older_than, version)).await?;
        self.forget(&ids);
        Ok(ids)
    }

    pub fn summary(&self, id: &str) -> Option<Summary> {
        self.view.lock().expect("view").instances.get(id).cloned()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Finished> {
        self.finished.subscribe()
    }

    /// Number of instances this replica drives now.
    pub fn driving(&self) -> usize {
        self.driving.lock().expect("driving").len()
    }

    /// Takes every unfinished instance nobody holds.
    async fn scan(self: &Arc<Self>) {
        let candidates: Vec<String> = {
            let view = self.view.lock().expect("view");
            let driving = self.driving.lock().expect("driving");
            view.instances
                .values()
                .filter(|s| !s.status.finished() && !driving.contains(&s.id))
                .map(|s| s.id.clone())
                .collect()
        };
        for id in candidates {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Some(rev) = self.acquire(&id).await {
                self.metrics.resumed.get_or_create(&self.label()).inc();
                tracing::info!(instance = %id, replica = %self.replica, "resuming an unfinished instance");
                self.drive(id, None, rev);
            }
        }
    }

    /// Creates the instance's lease; `None` when another replica holds it (or this one does).
    async fn acquire(&self, id: &str) -> Option<u64> {
        {
            let mut driving = self.driving.lock().expect("driving");
            if !driving.insert(id.to_string()) {
                return None;
            }
        }
        match self
            .leases
            .create(id, self.replica.clone().into_bytes().into())
            .await
        {
            Ok(rev) => Some(rev),
            Err(_) => {
                self.driving.lock().expect("driving").remove(id);
                None
            }
        }
    }

    /// Starts instance `id` with `input`; `Ok(false)` when it already exists (idempotent start).
    pub async fn start(self: &Arc<Self>, id: &str, input: Value) -> Result<bool, StartError> {
        if !super::log::valid_instance_id(id) {
            return Err(StartError::BadId);
        }
        let Some(rev) = self.acquire(id).await else {
            return match self.log.load(id, 0).await? {
                Some(_) => Ok(false),
                None => Err(StartError::Busy(id.to_string())),
            };
        };
        let mut inst = Instance::new(id, self.current.def.steps.len());
        let version = self.current.version.clone();
        match self
            .log
            .append(id, 0, &self.replica, Event::Started { input, version })
            .await
        {
            Ok((seq, entry)) => inst.apply(seq, entry),
            Err(e) => {
                self.release(id, rev).await;
                return match e {
                    LogError::Conflict(_) => Ok(false),
                    other => Err(other.into()),
                };
            }
        }
        self.metrics.started.get_or_create(&self.label()).inc();
        self.drive(id.to_string(), Some(inst), rev);
        Ok(true)
    }

    async fn release(&self, id: &str, rev: u64) {
        let _ = self.leases.delete_expect_revision(id, Some(rev)).await;
        self.driving.lock().expect("driving").remove(id);
    }

    /// Drives `id` under its lease (revision `rev`) until it ends or the lease is lost.
    fn drive(self: &Arc<Self>, id: String, preloaded: Option<Instance>, rev: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            let rev = Arc::new(AtomicU64::new(rev));
            let renew = {
                let me = me.clone();
                let id = id.clone();
                let rev = rev.clone();
                async move {
                    let every = Duration::from_millis((me.cfg.lease_ttl_ms / 4).max(25));
                    loop {
                        tokio::time::sleep(every).await;
                        let cur = rev.load(Ordering::SeqCst);
                        match me
                            .leases
                            .update(&id, me.replica.clone().into_bytes().into(), cur)
                            .await
                        {
                            Ok(r) => rev.store(r, Ordering::SeqCst),
                            Err(e) => return e.to_string(),
                        }
                    }
                }
            };
            let result = tokio::select! {
                r = me.run_instance(&id, preloaded) => r.map_err(|e| e.to_string()),
                lost = renew => Err(format!("lease lost: {lost}")),
            };
            match result {
                Ok(()) => me.release(&id, rev.load(Ordering::SeqCst)).await,
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "stopped driving the instance; another replica will resume it");
                    // The lease is left to expire (it may be another replica's by now); the
                    // instance is then resumed from its log, here or elsewhere.
                    me.driving.lock().expect("driving").remove(&id);
                }
            }
        });
    }

    /// Appends `event` after the last entry this driver saw. When the log moved on because of
    /// requests only (a cancel or retry written by the API or the command line, not another
    /// driver), folds them in and appends after them; a `step-started` after a cancel request
    /// is not appended (`LogError::Cancelled`): no step starts once a cancel is on the log.
    async fn append(&self, inst: &mut Instance, event: Event) -> Result<(), LogError> {
        loop {
            match self
                .log
                .append(&inst.id, inst.last_seq, &self.replica, event.clone())
                .await
            {
                Ok((seq, entry)) => {
                    inst.apply(seq, entry);
                    return Ok(());
                }
                Err(LogError::Conflict(id)) => {
                    let Some(fresh) = self.log.load(&inst.id, 0).await? else {
                        return Err(LogError::Conflict(id));
                    };
                    let known = inst.entries.len();
                    if fresh.entries.len() <= known
                        || !fresh.entries[known..].iter().all(|e| e.event.is_request())
                    {
                        return Err(LogError::Conflict(id));
                    }
                    let n = inst.steps.len();
                    *inst = fresh;
                    inst.resize(n);
                    if matches!(event, Event::StepStarted { .. }) && inst.cancel.is_some() {
                        return Err(LogError::Cancelled(id));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_instance(&self, id: &str, preloaded: Option<Instance>) -> Result<(), LogError> {
        let mut inst = match preloaded {
            Some(i) => i,
            None => match self.log.load(id, 0).await? {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        if inst.status.finished() {
            return Ok(());
        }
        let def = self.definition(inst.version.as_deref()).await?;
        inst.resize(def.def.steps.len());
        if inst.status == Status::Running {
            match self.run_steps(&mut inst, &def).await {
                Ok(()) | Err(LogError::Cancelled(_)) => {}
                Err(e) => return Err(e),
            }
            if inst.status == Status::Running {
                return self.finish(&mut inst, Event::Completed, &def).await;
            }
        }
        self.compensate(&mut inst, &def).await
    }

    /// Runs the steps not done yet, until one fails or a cancel is requested.
    async fn run_steps(&self, inst: &mut Instance, def: &Loaded) -> Result<(), LogError> {
        let id = inst.id.clone();
        for i in 0..def.def.steps.len() {
            if matches!(inst.steps[i], StepOutcome::Succeeded(_)) {
                continue;
            }
            let step = &def.def.steps[i];
            let name = step.name.clone();
            let key = format!("{}/{}/{}", self.cfg.name, id, name);
            // One logged attempt per turn. `retry.attempts` bounds the failed attempts across
            // restarts: a restarted coordinator counts the failures its predecessors logged.
            // An attempt cut short by a stop has no outcome; it is made again (same
            // idempotency key), as a resumption rather than a retry.
            let failed = loop {
                let failures = inst.step_failures[i];
                if matches!(inst.steps[i], StepOutcome::Retrying { .. }) {
                    tokio::time::sleep(backoff(&step.retry, failures + 1)).await;
                }
                if inst.cancel.is_some() {
                    return Ok(());
                }
                self.crash.maybe("before-step");
                self.append(
                    inst,
                    Event::StepStarted {
                        step: i + 1,
                        name: name.clone(),
                    },
                )
                .await?;
                let (outcome, uncertain) = self
                    .attempt(
                        inst,
                        def,
                        &step.action,
                        &key,
                        step.timeout_ms,
                        &name,
                        "action",
                    )
                    .await;
                self.crash.maybe("after-step-call");
                let uncertain = uncertain || inst.step_uncertain[i];
                match outcome {
                    Outcome::Ok(result) => {
                        self.append(
                            inst,
                            Event::StepSucceeded {
                                step: i + 1,
                                name: name.clone(),
                                result,
                            },
                        )
                        .await?;
                        break None;
                    }
                    other
                        if other.retryable() && inst.step_failures[i] + 1 < step.retry.attempts =>
                    {
                        self.append(
                            inst,
                            Event::StepAttemptFailed {
                                step: i + 1,
                                name: name.clone(),
                                error: other.error().unwrap_or_default().to_string(),
                                uncertain,
                            },
                        )
                        .await?;
                    }
                    other => {
                        let mut error = other.error().unwrap_or_default().to_string();
                        if other.retryable() && step.retry.attempts > 1 {
                            error.push_str(&format!(
                                    " (attempt {} of {}; failed attempts are counted across coordinator restarts)",
                                    inst.step_failures[i] + 1,
                                    step.retry.attempts
                                ));
                        }
                        break Some((error, uncertain));
                    }
                }
            };
            if let Some((error, uncertain)) = failed {
                self.append(
                    inst,
                    Event::StepFailed {
                        step: i + 1,
                        name,
                        error,
                        uncertain,
                    },
                )
                .await?;
                self.metrics.failed.get_or_create(&self.label()).inc();
                break;
            }
        }
        Ok(())
    }

    /// One attempt of `call`; its callers log each attempt and decide on retries, so that the
    /// retry bounds hold across restarts. The second value is true when the attempt may have
    /// reached the target (so a failure leaves the outcome unknown).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        inst: &Instance,
        def: &Loaded,
        call: &CallConfig,
        key: &str,
        timeout_ms: u64,
        step: &str,
        kind: &str,
    ) -> (Outcome, bool) {
        let started = Instant::now();
        let results = inst.results(&def.names);
        let scope = template::Scope {
            input: &inst.input,
            results: &results,
        };
        let body = match call {
            CallConfig::Http(h) => h.body.as_ref(),
            CallConfig::Request(r) => r.body.as_ref(),
        };
        let body = match body.map(|b| template::render(b, &scope)).transpose() {
            Ok(b) => b,
            Err(e) => {
                return (
                    Outcome::Refused {
                        error: format!("body template: {e}"),
                        retryable: false,
                    },
                    false,
                );
            }
        };
        let headers = CallHeaders {
            idempotency_key: key.to_string(),
            saga_id: inst.id.clone(),
            saga: self.saga_ref(),
        };
        let outcome = self
            .caller
            .call_in(
                &def.targets,
                call,
                body,
                &headers,
                Duration::from_millis(timeout_ms),
            )
            .await;
        let uncertain = matches!(outcome, Outcome::Unknown { .. });
        self.metrics
            .step_duration
            .get_or_create(&StepLabel {
                saga: self.cfg.name.clone(),
                step: step.to_string(),
                kind: kind.to_string(),
                outcome: if matches!(outcome, Outcome::Ok(_)) {
                    "ok"
                } else {
                    "error"
                }
                .into(),
            })
            .observe(started.elapsed().as_secs_f64());
        (outcome, uncertain)
    }

    /// Compensates, in reverse order, every step whose action may have happened.
    async fn compensate(&self, inst: &mut Instance, def: &Loaded) -> Result<(), LogError> {
        let reason = inst.reason.clone().unwrap_or_else(|| "compensating".into());
        let mut failures = Vec::new();
        let policy = def.def.compensation_retry.clone();
        for i in (0..def.def.steps.len()).rev() {
            let step = &def.def.steps[i];
            let Some(comp) = &step.compensation else {
                continue;
            };
            if !inst.may_have_happened(i) || inst.comps[i].succeeded {
                continue;
            }
            let key = format!("{}/{}/{}/compensate", self.cfg.name, inst.id, step.name);
            loop {
                let used = inst.comps[i].failures;
                if used >= policy.attempts {
                    failures.push(format!(
                        "compensation of step {} ({}) failed {used} times: {}",
                        i + 1,
                        step.name,
                        inst.comps[i].last_error.clone().unwrap_or_default()
                    ));
                    break;
                }
                if used > 0 {
                    tokio::time::sleep(backoff(&policy, used + 1)).await;
                }
                self.crash.maybe("before-compensation");
                self.append(
                    inst,
                    Event::CompStarted {
                        step: i + 1,
                        name: step.name.clone(),
                    },
                )
                .await?;
                let (out, _) = self
                    .attempt(
                        inst,
                        def,
                        comp,
                        &key,
                        step.timeout_ms,
                        &step.name,
                        "compensation",
                    )
                    .await;
                self.crash.maybe("after-compensation-call");
                match out {
                    Outcome::Ok(_) => {
                        self.append(
                            inst,
                            Event::CompSucceeded {
                                step: i + 1,
                                name: step.name.clone(),
                            },
                        )
                        .await?;
                        break;
                    }
                    other => {
                        self.append(
                            inst,
                            Event::CompFailed {
                                step: i + 1,
                                name: step.name.clone(),
                                error: other.error().unwrap_or_default().to_string(),
                            },
                        )
                        .await?;
                    }
                }
            }
        }
        if failures.is_empty() {
            let end = if inst.cancel.is_some() {
                Event::Cancelled { reason }
            } else {
                Event::Compensated { reason }
            };
            self.finish(inst, end, def).await
        } else {
            let reason = format!("{reason}; {}", failures.join("; "));
            self.finish(inst, Event::CompensationFailed { reason }, def)
                .await
        }
    }

    /// Dead-letters (when compensation failed), publishes the outcome event, then logs the end.
    /// Publishing first and deduplicating by message id means a crash in between repeats the
    /// publish (dropped by the stream) rather than losing it.
    async fn finish(
        &self,
        inst: &mut Instance,
        event: Event,
        def: &Loaded,
    ) -> Result<(), LogError> {
        let (status, reason) = match &event {
            Event::Completed => (Status::Completed, None),
            Event::Compensated { reason } => (Status::Compensated, Some(reason.clone())),
            Event::Cancelled { reason } => (Status::Cancelled, Some(reason.clone())),
            _ => {
                let Event::CompensationFailed { reason } = &event else {
                    unreachable!("finish takes a terminal event")
                };
                (Status::CompensationFailed, Some(reason.clone()))
            }
        };
        if status == Status::CompensationFailed {
            let body = json!({
                "saga": self.saga_ref(),
                "sagaId": inst.id,
                "reason": reason,
                "input": inst.input,
                "log": inst.entries,
            });
            let mut h = async_nats::HeaderMap::new();
            // One dead letter per time the instance ends CompensationFailed (a retry may fail
            // again), each deduplicated against a crash's repeat.
            let msg_id = match inst.retries {
                0 => format!("{}:dead-letter", inst.id),
                n => format!("{}:dead-letter:retry-{n}", inst.id),
            };
            h.insert("Nats-Msg-Id", msg_id.as_str());
            h.insert("Weir-Saga", self.saga_ref().as_str());
            h.insert("Weir-Saga-Id", inst.id.as_str());
            h.insert(
                weir_broker::queue::dead_letter_headers::REASON,
                "compensation-failed",
            );
            h.insert("content-type", "application/json");
            let subject = super::log::dead_letter_subject(&self.cfg.namespace, &self.cfg.name);
            self.publish_until_acked(&subject, h, &body).await;
        }
        let outcome = if status == Status::Completed {
            self.cfg.on_completed.as_ref()
        } else {
            self.cfg.on_failed.as_ref()
        };
        if let Some(o) = outcome {
            let mut event_id = format!("{}:{}", inst.id, status.as_str().to_ascii_lowercase());
            if status == Status::CompensationFailed && inst.retries > 0 {
                event_id.push_str(&format!(":retry-{}", inst.retries));
            }
            let body = json!({
                "saga": self.cfg.name,
                "sagaId": inst.id,
                "outcome": status.as_str(),
                "input": inst.input,
                "reason": reason,
                "results": inst.results(&def.names),
                "version": def.version,
            });
            let mut h = async_nats::HeaderMap::new();
            h.insert("ce-specversion", "1.0");
            h.insert("ce-id", event_id.as_str());
            h.insert(
                "ce-source",
                format!("weir://{}/saga/{}", self.cfg.namespace, self.cfg.name).as_str(),
            );
            h.insert("ce-type", o.event_type.as_str());
            h.insert("ce-time", chrono::Utc::now().to_rfc3339().as_str());
            h.insert("content-type", "application/json");
            h.insert("Nats-Msg-Id", event_id.as_str());
            h.insert("Weir-Saga-Id", inst.id.as_str());
            match &self.cfg.publish_url {
                Some(base) => {
                    self.publish_through_sidecar(base, &o.queue, &event_id, &body)
                        .await
                }
                None => self.publish_until_acked(&o.subject, h, &body).await,
            }
        }
        // A retry that ended well resolves the instance's dead letters: they are deleted (the
        // log keeps the whole story). Before the end entry, so a crash repeats it.
        if inst.retries > 0 && matches!(status, Status::Compensated | Status::Cancelled) {
            match self.log.resolve_dead_letters(&inst.id).await {
                Ok(n) => tracing::info!(instance = %inst.id, deleted = n, "dead letters resolved"),
                Err(e) => {
                    tracing::warn!(instance = %inst.id, error = %e, "cannot resolve the dead letters");
                    return Err(e);
                }
            }
        }
        self.crash.maybe("before-end");
        self.append(inst, event).await?;
        let counter = match status {
            Status::Completed => &self.metrics.completed,
            Status::Compensated => &self.metrics.compensated,
            Status::Cancelled => &self.metrics.cancelled,
            _ => &self.metrics.compensation_failed,
        };
        counter.get_or_create(&self.label()).inc();
        if status == Status::CompensationFailed {
            tracing::error!(instance = %inst.id, reason = ?reason, "compensation failed: instance dead-lettered");
        }
        Ok(())
    }

    /// Publishes an outcome through the sidecar until it is taken; a 4xx (the queue's schema
    /// refuses it) is logged and not retried: the instance's log still holds the outcome.
    async fn publish_through_sidecar(&self, base: &str, queue: &str, id: &str, body: &Value) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.caller.publish_via_sidecar(base, queue, id, body).await {
                Ok(()) => return,
                Err((true, e)) => {
                    tracing::error!(%queue, event = %id, error = %e, "outcome event refused");
                    return;
                }
                Err((false, e)) => {
                    tracing::warn!(%queue, error = %e, retry_in = ?delay, "cannot publish; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn publish_until_acked(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        body: &Value,
    ) {
        let payload = bytes::Bytes::from(serde_json::to_vec(body).expect("JSON serializes"));
        let mut delay = Duration::from_millis(200);
        loop {
            let r = match self
                .js
                .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%subject, error = %e, retry_in = ?delay, "cannot publish; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Consumes the trigger Queue: one instance per event, its id derived from the event id.
    pub async fn consume_trigger(self: Arc<Self>) {
        let Some(q) = self.cfg.trigger.queue.clone() else {
            return;
        };
        loop {
            if let Err(e) = self.consume_once(&q).await {
                tracing::warn!(queue = %q.queue, error = %e, "trigger consumer failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn consume_once(
        self: &Arc<Self>,
        q: &super::config::QueueTriggerConfig,
    ) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&q.stream).await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &q.consumer,
                consumer::pull::Config {
                    durable_name: Some(q.consumer.clone()),
                    description: Some(format!("Weir Saga {} trigger", self.saga_ref())),
                    filter_subjects: q.subjects.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        while let Some(m) = messages.next().await {
            let m = m?;
            let header = |k: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(k))
                    .map(|v| v.as_str().to_string())
            };
            let event_id = header("ce-id")
                .or_else(|| header("Nats-Msg-Id"))
                .unwrap_or_else(|| {
                    m.info()
                        .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
                        .unwrap_or_default()
                });
            let id = instance_id_for_event(&event_id);
            let input: Value = match serde_json::from_slice(&m.payload) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(%event_id, error = %e, "trigger event is not JSON; dropped");
                    let _ = m.ack_with(jetstream::AckKind::Term).await;
                    continue;
                }
            };
            match self.start(&id, input).await {
                Ok(_) => {
                    let _ = m.ack().await;
                }
                Err(e) => {
                    tracing::warn!(%event_id, error = %e, "cannot start an instance for the event; redelivering");
                    let _ = m
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
        Ok(())
    }
}

/// Selects the instances `state` names that ended more than `older_than` ago and run
/// `version` (any when `None`).
pub fn selector(
    state: StateFilter,
    older_than: Duration,
    version: Option<&str>,
) -> impl Fn(&Instance) -> bool + '_ {
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
    move |i: &Instance| {
        state.matches(i.status)
            && i.updated_at().is_some_and(|t| t <= cutoff)
            && version.is_none_or(|v| i.version.as_deref().unwrap_or(UNVERSIONED) == v)
    }
}

/// The instance started by a trigger event: `ev-` and 32 hex digits of the event id's SHA-256.
pub fn instance_id_for_event(event_id: &str) -> String {
    format!(
        "ev-{}",
        &hex::encode(Sha256::digest(event_id.as_bytes()))[..32]
    )
}

/// Test-only crash injection: `WEIR_SAGA_TEST_CRASH="after-step-call=0.05,before-step=0.02"`
/// makes the process exit at once (no cleanup, like `kill -9`) at a named point with the given
/// probability, after appending the point's name to `$WEIR_SAGA_TEST_CRASH_LOG` if set. Points:
/// `before-step` (before `step-started`), `after-step-call` (the step answered, nothing logged
/// yet), `before-compensation`, `after-compensation-call`, `before-end`. Unset in production.
struct CrashPoints(Vec<(String, f64)>);

impl CrashPoints {
    fn from_env() -> Self {
        let spec = std::env::var("WEIR_SAGA_TEST_CRASH").unwrap_or_default();
        Self(
            spec.split(',')
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.trim().to_string(), v.trim().parse().ok()?))
                })
                .collect(),
        )
    }

    fn maybe(&self, point: &str) {
        for (k, p) in &self.0 {
            if k == point && rand::random::<f64>() < *p {
                eprintln!("WEIR_SAGA_TEST_CRASH: crashing at {point}");
                if let Some(path) = std::env::var_os("WEIR_SAGA_TEST_CRASH_LOG") {
                    use std::io::Write;
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                    {
                        let _ = writeln!(f, "{point}");
                    }
                }
                std::process::exit(137);
            }
        }
    }
}

/// Wait before attempt `n` of `retry` (2 = first retry): full jitter, random in
/// `[0, RetryConfig::backoff_cap_ms(n)]`, so replicas retrying together spread out.
fn backoff(retry: &RetryConfig, n: u32) -> Duration {
    Duration::from_millis(rand::random_range(0..=retry.backoff_cap_ms(n)))
}
