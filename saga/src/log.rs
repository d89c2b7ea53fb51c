//! Each instance's append-only log on JetStream, and the state folded from it.
//!
//! Stream `weir_saga_<ns>_<saga>` holds subject `weir.saga.<ns>.<saga>.<instance>` per instance.
//! Every append states the last sequence it saw on the instance's subject
//! (`Nats-Expected-Last-Subject-Sequence`): two replicas can never both extend one log, whatever
//! the leases say, and a `started` entry is only written to an empty subject (an instance id is
//! started once).

use async_nats::jetstream::{self, consumer, stream};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Stream of Saga `<ns>/<saga>`.
pub fn stream_name(namespace: &str, saga: &str) -> String {
    format!("weir_saga_{namespace}_{saga}")
}
/// Subject of one instance's log.
pub fn subject(namespace: &str, saga: &str, instance: &str) -> String {
    format!("weir.saga.{namespace}.{saga}.{instance}")
}
/// Every instance's subject.
pub fn subjects(namespace: &str, saga: &str) -> String {
    format!("weir.saga.{namespace}.{saga}.*")
}
/// Dead-letter stream and subject: instances that ended `CompensationFailed`, with their log.
pub fn dead_letter_stream_name(namespace: &str, saga: &str) -> String {
    format!("weir_saga_{namespace}_{saga}_dlq")
}
pub fn dead_letter_subject(namespace: &str, saga: &str) -> String {
    format!("weir.saga.dlq.{namespace}.{saga}")
}
/// KV bucket of instance leases.
pub fn lease_bucket(namespace: &str, saga: &str) -> String {
    format!("weir_saga_leases_{namespace}_{saga}")
}
/// KV bucket of the definitions instances run, key = version (content hash).
pub fn versions_bucket(namespace: &str, saga: &str) -> String {
    format!("weir_saga_versions_{namespace}_{saga}")
}
/// Subject of the purge notices: which instances were purged, for every replica's view. Not an
/// instance subject (`~` is not allowed in instance ids).
pub fn purge_notice_subject(namespace: &str, saga: &str) -> String {
    format!("weir.saga.{namespace}.{saga}.~purged")
}
/// How long instance logs are kept by default (`spec.retention` left out).
pub const LOG_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// An instance id is one subject token: `[A-Za-z0-9_-]`, 1 to 64 characters.
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    Started {
        input: Value,
        /// The definition (steps and compensation policy) the instance runs: a content hash,
        /// its definition in the versions bucket. Absent on instances started before versions
        /// existed: they follow the coordinator's current definition.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// One attempt of a step's action begins (steps are numbered from 1). Every attempt is
    /// logged, and so is every failed one (`step-attempt-failed`), so that a restarted
    /// coordinator knows how many of the step's `retry.attempts` are spent.
    StepStarted {
        step: usize,
        name: String,
    },
    /// An attempt failed in a way worth retrying and attempts remain; `uncertain` as for
    /// `step-failed`.
    StepAttemptFailed {
        step: usize,
        name: String,
        error: String,
        uncertain: bool,
    },
    StepSucceeded {
        step: usize,
        name: String,
        result: Value,
    },
    /// `uncertain`: the action may have happened (a timeout, a broken connection), so the step
    /// is compensated; otherwise the service answered no and it is not.
    StepFailed {
        step: usize,
        name: String,
        error: String,
        uncertain: bool,
    },
    CompStarted {
        step: usize,
        name: String,
    },
    CompSucceeded {
        step: usize,
        name: String,
    },
    CompFailed {
        step: usize,
        name: String,
        error: String,
    },
    Completed,
    Compensated {
        reason: String,
    },
    CompensationFailed {
        reason: String,
    },
    /// Somebody asked to cancel the instance (`POST .../cancel`, `weir saga cancel`): no step
    /// starts after it, and the steps that may have happened are compensated. `requestedBy` is
    /// who asked (the entry's `by` is the replica or tool that wrote it).
    CancelRequested {
        #[serde(rename = "requestedBy")]
        requested_by: String,
        #[serde(default)]
        reason: String,
    },
    /// Somebody asked to run the failed compensations of a `CompensationFailed` instance again;
    /// each gets `compensationRetry.attempts` anew, with the same idempotency keys.
    RetryRequested {
        #[serde(rename = "requestedBy")]
        requested_by: String,
        #[serde(default)]
        reason: String,
    },
    /// The end of a cancelled instance whose compensations all succeeded.
    Cancelled {
        reason: String,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::StepStarted { .. } => "step-started",
            Event::StepAttemptFailed { .. } => "step-attempt-failed",
            Event::StepSucceeded { .. } => "step-succeeded",
            Event::StepFailed { .. } => "step-failed",
            Event::CompStarted { .. } => "comp-started",
            Event::CompSucceeded { .. } => "comp-succeeded",
            Event::CompFailed { .. } => "comp-failed",
            Event::Completed => "completed",
            Event::Compensated { .. } => "compensated",
            Event::CompensationFailed { .. } => "compensation-failed",
            Event::CancelRequested { .. } => "cancel-requested",
            Event::RetryRequested { .. } => "retry-requested",
            Event::Cancelled { .. } => "cancelled",
        }
    }

    /// An entry written on request (by the API or the command line), not by the replica that
    /// drives the instance: a driver whose append conflicts with one folds it in and goes on.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Event::CancelRequested { .. } | Event::RetryRequested { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub at: DateTime<Utc>,
    /// The replica that wrote it.
    pub by: String,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum Status {
    Running,
    Compensating,
    Completed,
    Compensated,
    CompensationFailed,
    /// Cancel requested, not ended yet: compensating (or finishing the step in flight).
    Cancelling,
    /// Cancelled, every step that may have happened compensated.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Running,
        Status::Compensating,
        Status::Cancelling,
        Status::Completed,
        Status::Compensated,
        Status::Cancelled,
        Status::CompensationFailed,
    ];

    pub fn finished(self) -> bool {
        matches!(
            self,
            Status::Completed
                | Status::Compensated
                | Status::CompensationFailed
                | Status::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "Running",
            Status::Compensating => "Compensating",
            Status::Completed => "Completed",
            Status::Compensated => "Compensated",
            Status::CompensationFailed => "CompensationFailed",
            Status::Cancelling => "Cancelling",
            Status::Cancelled => "Cancelled",
        }
    }

    /// Parses a status as written on the command line or in a query, case and dashes ignored
    /// (`compensation-failed`, `CompensationFailed`; `failed` = `CompensationFailed`).
    pub fn parse(s: &str) -> Option<Status> {
        let norm: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if norm == "failed" {
            return Some(Status::CompensationFailed);
        }
        Status::ALL
            .into_iter()
            .find(|st| st.as_str().to_ascii_lowercase() == norm)
    }
}

/// Which instances a state filter (`?state=`, `--state`) selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    One(Status),
    /// Every unfinished instance (running, compensating, cancelling).
    Unfinished,
    /// Every finished instance.
    Finished,
}

impl StateFilter {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "finished" => Ok(StateFilter::Finished),
            "unfinished" | "active" => Ok(StateFilter::Unfinished),
            _ => Status::parse(s).map(StateFilter::One).ok_or_else(|| {
                format!(
                    "unknown state {s:?}: one of running, compensating, cancelling, completed, \
                     compensated, cancelled, failed (compensation-failed), finished, unfinished"
                )
            }),
        }
    }
    pub fn matches(self, s: Status) -> bool {
        match self {
            StateFilter::One(x) => x == s,
            StateFilter::Unfinished => !s.finished(),
            StateFilter::Finished => s.finished(),
        }
    }
}

/// What happened to one step's action.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    NotStarted,
    /// Started, no outcome logged: it may have happened.
    InFlight,
    /// An attempt failed and another may follow.
    Retrying {
        error: String,
        uncertain: bool,
    },
    Succeeded(Value),
    Failed {
        error: String,
        uncertain: bool,
    },
}

/// What happened to one step's compensation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompState {
    pub started: bool,
    pub succeeded: bool,
    /// Failed attempts so far (across restarts).
    pub failures: u32,
    pub last_error: Option<String>,
}

/// An instance as its log tells it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub input: Value,
    pub entries: Vec<Entry>,
    /// Stream sequence of the last entry (0: no entry yet).
    pub last_seq: u64,
    pub steps: Vec<StepOutcome>,
    /// Attempts of each step's action that failed so far (across restarts): what
    /// `retry.attempts` bounds. An attempt cut short by the coordinator stopping has no outcome
    /// and is made again on resumption, not counted as failed.
    pub step_failures: Vec<u32>,
    /// Whether any failed attempt of each step may have happened (its outcome unknown: a
    /// timeout, a broken connection).
    pub step_uncertain: Vec<bool>,
    pub comps: Vec<CompState>,
    pub status: Status,
    /// Why it is compensating (the failed step's error).
    pub reason: Option<String>,
    /// The definition it runs (`started.version`); `None`: started before versions existed.
    pub version: Option<String>,
    /// Who asked to cancel it, and why.
    pub cancel: Option<(String, String)>,
    /// Retries requested after it ended `CompensationFailed`.
    pub retries: u32,
}

impl Instance {
    pub fn new(id: &str, steps: usize) -> Self {
        Self {
            id: id.to_string(),
            input: Value::Null,
            entries: Vec::new(),
            last_seq: 0,
            steps: vec![StepOutcome::NotStarted; steps],
            step_failures: vec![0; steps],
            step_uncertain: vec![false; steps],
            comps: vec![CompState::default(); steps],
            status: Status::Running,
            reason: None,
            version: None,
            cancel: None,
            retries: 0,
        }
    }

    /// Makes room for `steps` steps (an instance's own definition may have more than the
    /// count it was read with).
    pub fn resize(&mut self, steps: usize) {
        if steps > self.steps.len() {
            self.steps.resize(steps, StepOutcome::NotStarted);
            self.step_failures.resize(steps, 0);
            self.step_uncertain.resize(steps, false);
            self.comps.resize(steps, CompState::default());
        }
    }

    /// Compensating, unless a cancel asked for it (then it stays `Cancelling`).
    fn compensating(&mut self) {
        if self.status != Status::Cancelling {
            self.status = Status::Compensating;
        }
    }

    /// Folds one entry in (entries of steps beyond `steps` are kept but not folded).
    pub fn apply(&mut self, seq: u64, entry: Entry) {
        self.last_seq = seq;
        let idx = |step: usize| step.checked_sub(1);
        // Entries name steps by number: grow to the largest one seen (bounded: steps <= 50).
        let named = match &entry.event {
            Event::StepStarted { step, .. }
            | Event::StepAttemptFailed { step, .. }
            | Event::StepSucceeded { step, .. }
            | Event::StepFailed { step, .. }
            | Event::CompStarted { step, .. }
            | Event::CompSucceeded { step, .. }
            | Event::CompFailed { step, .. } => *step,
            _ => 0,
        };
        if named <= 1000 {
            self.resize(named);
        }
        match &entry.event {
            Event::Started { input, version } => {
                self.input = input.clone();
                self.version = version.clone();
            }
            Event::StepStarted { step, .. } => {
                if let Some(i) = idx(*step).filter(|i| *i < self.steps.len()) {
                    // An earlier attempt cut short (no outcome logged) is not marked uncertain:
                    // this one carries the same idempotency key, so its answer covers both.
                    self.steps[i] = StepOutcome::InFlight;
                }
            }
            Event::StepAttemptFailed {
                step,
                error,
                uncertain,
                ..
            } => {
                if let Some(i) = idx(*step).filter(|i| *i < self.steps.len()) {
                    self.step_failures[i] += 1;
                    self.step_uncertain[i] |= *uncertain;
                    self.steps[i] = StepOutcome::Retrying {
                        error: error.clone(),
                        uncertain: self.step_uncertain[i],
                    };
                }
            }
            Event::StepSucceeded { step, result, .. } => {
                if let Some(s) = idx(*step).and_then(|i| self.steps.get_mut(i)) {
                    *s = StepOutcome::Succeeded(result.clone());
                }
            }
            Event::StepFailed {
                step,
                name,
                error,
                uncertain,
            } => {
                if let Some(s) = idx(*step).and_then(|i| self.steps.get_mut(i)) {
                    *s = StepOutcome::Failed {
                        error: error.clone(),
                        uncertain: *uncertain,
                    };
                }
                let failure = format!("step {step} ({name}) failed: {error}");
                self.reason = Some(match (&self.reason, self.status) {
                    (Some(r), Status::Cancelling) => format!("{r}; {failure}"),
                    _ => failure,
                });
                self.compensating();
            }
            Event::CompStarted { step, .. } => {
                if let Some(c) = idx(*step).and_then(|i| self.comps.get_mut(i)) {
                    c.started = true;
                }
                self.compensating();
            }
            Event::CompSucceeded { step, .. } => {
                if let Some(c) = idx(*step).and_then(|i| self.comps.get_mut(i)) {
                    c.succeeded = true;
                }
            }
            Event::CompFailed { step, error, .. } => {
                if let Some(c) = idx(*step).and_then(|i| self.comps.get_mut(i)) {
                    c.failures += 1;
                    c.last_error = Some(error.clone());
                }
            }
            Event::Completed => self.status = Status::Completed,
            Event::Compensated { reason } => {
                self.status = Status::Compensated;
                self.reason = Some(reason.clone());
            }
            Event::CompensationFailed { reason } => {
                self.status = Status::CompensationFailed;
                self.reason = Some(reason.clone());
            }
            Event::CancelRequested {
                requested_by,
                reason,
            } => {
                // A request that came after the end changes nothing (it lost a race with the
                // last step); a second one keeps the first's who and why.
                if !self.status.finished() && self.cancel.is_none() {
                    self.cancel = Some((requested_by.clone(), reason.clone()));
                    let why = cancel_reason(requested_by, reason);
                    self.reason = Some(match (&self.reason, self.status) {
                        (Some(r), Status::Compensating) => format!("{r}; {why}"),
                        _ => why,
                    });
                    self.status = Status::Cancelling;
                }
            }
            Event::RetryRequested { .. } => {
                if self.status == Status::CompensationFailed {
                    self.retries += 1;
                    // Each failed compensation gets its attempts anew.
                    for c in self.comps.iter_mut().filter(|c| !c.succeeded) {
                        c.failures = 0;
                    }
                    self.status = if self.cancel.is_some() {
                        Status::Cancelling
                    } else {
                        Status::Compensating
                    };
                }
            }
            Event::Cancelled { reason } => {
                self.status = Status::Cancelled;
                self.reason = Some(reason.clone());
            }
        }
        self.entries.push(entry);
    }

    /// Results of the succeeded steps, by step name (for templates).
    pub fn results(&self, names: &[String]) -> BTreeMap<String, Value> {
        self.steps
            .iter()
            .zip(names)
            .filter_map(|(s, n)| match s {
                StepOutcome::Succeeded(v) => Some((n.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }

    /// Whether step `i`'s action may have happened: it succeeded, or started with no known
    /// outcome, or failed in a way that leaves the outcome unknown. A step that never started,
    /// or that the service refused, is never compensated.
    pub fn may_have_happened(&self, i: usize) -> bool {
        match &self.steps[i] {
            StepOutcome::NotStarted => false,
            StepOutcome::InFlight | StepOutcome::Succeeded(_) => true,
            StepOutcome::Failed { uncertain, .. } | StepOutcome::Retrying { uncertain, .. } => {
                *uncertain
            }
        }
    }

    /// Whether a retry was asked after the last `compensation-failed` and has not ended yet.
    pub fn retrying(&self) -> bool {
        self.retries > 0 && !self.status.finished()
    }

    pub fn started_at(&self) -> Option<DateTime<Utc>> {
        self.entries.first().map(|e| e.at)
    }
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.entries.last().map(|e| e.at)
    }
}

/// The reason an instance cancelled on request ends with.
pub fn cancel_reason(by: &str, why: &str) -> String {
    if why.is_empty() {
        format!("cancelled by {by}")
    } else {
        format!("cancelled by {by}: {why}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Somebody else extended the log since it was read (another replica drives the instance),
    /// or the instance already exists (on `started`).
    #[error("the log of {0} moved on: another writer")]
    Conflict(String),
    #[error("broker: {0}")]
    Broker(String),
    /// A cancel was requested: the next step must not start.
    #[error("instance {0} was cancelled")]
    Cancelled(String),
}

/// The Saga's log stream.
#[derive(Clone)]
pub struct Log {
    pub js: jetstream::Context,
    pub namespace: String,
    pub saga: String,
    pub stream: String,
}

/// What became of a cancel or retry request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Logged; the instance's status after it.
    Accepted(Status),
    /// Already asked (cancelling or cancelled; retrying): nothing logged.
    Already(Status),
    /// Not possible in this state: why.
    Refused(Status, String),
    NotFound,
}

/// JetStream error code of "wrong last sequence".
const WRONG_LAST_SEQUENCE: u64 = 10071;

impl Log {
    /// Declares the log and dead-letter streams (idempotently) and returns the log.
    pub async fn open(
        js: jetstream::Context,
        namespace: &str,
        saga: &str,
    ) -> Result<Self, LogError> {
        Self::open_with(js, namespace, saga, LOG_MAX_AGE).await
    }

    /// [`Log::open`] with the stream's `max_age` at least `max_age` (raised on an existing
    /// stream, never lowered: finished instances are purged after the retention by the
    /// coordinator, the stream's age only bounds how long any entry is kept).
    pub async fn open_with(
        js: jetstream::Context,
        namespace: &str,
        saga: &str,
        max_age: Duration,
    ) -> Result<Self, LogError> {
        let max_age = max_age.max(LOG_MAX_AGE);
        let cfg = stream::Config {
            name: stream_name(namespace, saga),
            description: Some(format!("Weir Saga {namespace}/{saga}: instance logs")),
            subjects: vec![subjects(namespace, saga)],
            max_age,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let mut existing = js
            .get_or_create_stream(cfg.clone())
            .await
            .map_err(|e| LogError::Broker(format!("log stream: {e}")))?;
        let info = existing
            .info()
            .await
            .map_err(|e| LogError::Broker(format!("log stream: {e}")))?;
        if info.config.max_age != Duration::ZERO && info.config.max_age < max_age {
            let mut raised = info.config.clone();
            raised.max_age = max_age;
            js.update_stream(raised)
                .await
                .map_err(|e| LogError::Broker(format!("log stream max_age: {e}")))?;
        }
        let dlq = stream::Config {
            name: dead_letter_stream_name(namespace, saga),
            description: Some(format!(
                "Weir Saga {namespace}/{saga}: instances whose compensation failed"
            )),
            subjects: vec![dead_letter_subject(namespace, saga)],
            max_age: LOG_MAX_AGE,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        js.get_or_create_stream(dlq)
            .await
            .map_err(|e| LogError::Broker(format!("dead-letter stream: {e}")))?;
        Ok(Self {
            js,
            namespace: namespace.into(),
            saga: saga.into(),
            stream: stream_name(namespace, saga),
        })
    }

    /// Opens an existing log (for `weir saga list/show`) without declaring anything.
    pub fn existing(js: jetstream::Context, namespace: &str, saga: &str) -> Self {
        Self {
            js,
            namespace: namespace.into(),
            saga: saga.into(),
            stream: stream_name(namespace, saga),
        }
    }

    pub fn subject(&self, instance: &str) -> String {
        subject(&self.namespace, &self.saga, instance)
    }

    /// Appends `event` after sequence `last_seq` of the instance (0: the log must be empty).
    /// Returns the new entry's sequence.
    pub async fn append(
        &self,
        instance: &str,
        last_seq: u64,
        by: &str,
        event: Event,
    ) -> Result<(u64, Entry), LogError> {
        let entry = Entry {
            at: Utc::now(),
            by: by.to_string(),
            event,
        };
        let payload = serde_json::to_vec(&entry).expect("entries serialize");
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(last_seq);
        let ack = self
            .js
            .send_publish(self.subject(instance), publish)
            .await
            .map_err(|e| LogError::Broker(e.to_string()))?
            .await;
        match ack {
            Ok(a) => Ok((a.sequence, entry)),
            Err(e) => {
                let code = match e.kind() {
                    jetstream::context::PublishErrorKind::WrongLastSequence => {
                        Some(WRONG_LAST_SEQUENCE)
                    }
                    _ => None,
                };
                if code.is_some() || e.to_string().contains("wrong last sequence") {
                    Err(LogError::Conflict(instance.to_string()))
                } else {
                    Err(LogError::Broker(e.to_string()))
                }
            }
        }
    }

    /// Appends a cancel request to an unfinished instance's log (conditional on its last
    /// entry, re-read on a conflict). Whichever replica drives the instance, or takes it next,
    /// acts on it: the request is on the log before anyone answers.
    pub async fn request_cancel(
        &self,
        id: &str,
        writer: &str,
        requested_by: &str,
        reason: &str,
    ) -> Result<Request, LogError> {
        self.request(id, writer, |inst| match inst.status {
            Status::Cancelling | Status::Cancelled => Err(Request::Already(inst.status)),
            s if s.finished() => Err(Request::Refused(
                s,
                format!(
                    "instance {id} has already ended {}: only an unfinished instance can be cancelled",
                    s.as_str()
                ),
            )),
            _ => Ok(Event::CancelRequested {
                requested_by: requested_by.to_string(),
                reason: reason.to_string(),
            }),
        })
        .await
    }

    /// Appends a retry request to an instance that ended `CompensationFailed`.
    pub async fn request_retry(
        &self,
        id: &str,
        writer: &str,
        requested_by: &str,
        reason: &str,
    ) -> Result<Request, LogError> {
        self.request(id, writer, |inst| match inst.status {
            Status::CompensationFailed => Ok(Event::RetryRequested {
                requested_by: requested_by.to_string(),
                reason: reason.to_string(),
            }),
            s if inst.retrying() => Err(Request::Already(s)),
            s => Err(Request::Refused(
                s,
                format!(
                    "instance {id} is {}: only an instance that ended CompensationFailed can be retried",
                    s.as_str()
                ),
            )),
        })
        .await
    }

    async fn request(
        &self,
        id: &str,
        writer: &str,
        decide: impl Fn(&Instance) -> Result<Event, Request>,
    ) -> Result<Request, LogError> {
        for _ in 0..20 {
            let Some(inst) = self.load(id, 0).await? else {
                return Ok(Request::NotFound);
            };
            let event = match decide(&inst) {
                Ok(e) => e,
                Err(answer) => return Ok(answer),
            };
            match self.append(id, inst.last_seq, writer, event).await {
                Ok((seq, entry)) => {
                    let mut inst = inst;
                    inst.apply(seq, entry);
                    return Ok(Request::Accepted(inst.status));
                }
                // The driver appended meanwhile: read again and decide again.
                Err(LogError::Conflict(_)) => {
                    tokio::time::sleep(Duration::from_millis(rand::random_range(5..50))).await
                }
                Err(e) => return Err(e),
            }
        }
        Err(LogError::Broker(format!(
            "instance {id}: its log kept moving; try again"
        )))
    }

    /// Deletes every entry of the finished instances that `select` picks (purge by subject),
    /// then publishes a purge notice so that every replica forgets them. Unfinished instances
    /// are never purged. Returns the ids purged.
    pub async fn purge(&self, select: impl Fn(&Instance) -> bool) -> Result<Vec<String>, LogError> {
        let all = self.load_all(0).await?;
        let ids: Vec<String> = all
            .values()
            .filter(|i| i.status.finished() && select(i))
            .map(|i| i.id.clone())
            .collect();
        self.purge_ids(&ids).await?;
        Ok(ids)
    }

    /// Purges the logs of `ids` (the caller checked they are finished) and publishes the notice.
    pub async fn purge_ids(&self, ids: &[String]) -> Result<(), LogError> {
        if ids.is_empty() {
            return Ok(());
        }
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| LogError::Broker(format!("stream {}: {e}", self.stream)))?;
        for id in ids {
            stream
                .purge()
                .filter(self.subject(id))
                .await
                .map_err(|e| LogError::Broker(format!("purging {id}: {e}")))?;
        }
        for chunk in ids.chunks(500) {
            let notice =
                serde_json::to_vec(&serde_json::json!({"purged": chunk})).expect("JSON serializes");
            self.js
                .publish(
                    purge_notice_subject(&self.namespace, &self.saga),
                    notice.into(),
                )
                .await
                .map_err(|e| LogError::Broker(e.to_string()))?
                .await
                .map_err(|e| LogError::Broker(e.to_string()))?;
        }
        Ok(())
    }

    /// Deletes the dead letters of instance `id` (its `CompensationFailed` records) from the
    /// dead-letter stream: a retry that ended compensated resolves them. Returns how many.
    pub async fn resolve_dead_letters(&self, id: &str) -> Result<usize, LogError> {
        let name = dead_letter_stream_name(&self.namespace, &self.saga);
        let stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| LogError::Broker(format!("stream {name}: {e}")))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| LogError::Broker(format!("reading {name}: {e}")))?;
        let cname = consumer.cached_info().name.clone();
        let mut found = Vec::new();
        if consumer.cached_info().num_pending > 0 {
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| LogError::Broker(format!("reading {name}: {e}")))?;
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_secs(10), messages.next()).await
            {
                let m = m.map_err(|e| LogError::Broker(format!("reading {name}: {e}")))?;
                let info = m
                    .info()
                    .map_err(|e| LogError::Broker(format!("reading {name}: {e}")))?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                let mine = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Weir-Saga-Id"))
                    .is_some_and(|v| v.as_str() == id);
                if mine {
                    found.push(seq);
                }
                if pending == 0 {
                    break;
                }
            }
        }
        let _ = stream.delete_consumer(&cname).await;
        let mut n = 0;
        for seq in found {
            match stream.delete_message(seq).await {
                Ok(_) => n += 1,
                Err(e) => tracing::debug!(seq, error = %e, "dead letter already gone"),
            }
        }
        Ok(n)
    }

    /// Reads every entry of one instance; `None` when it has none.
    pub async fn load(&self, instance: &str, steps: usize) -> Result<Option<Instance>, LogError> {
        let mut inst = Instance::new(instance, steps);
        let mut n = 0;
        self.read(&self.subject(instance), |id, seq, entry| {
            debug_assert_eq!(id, instance);
            inst.apply(seq, entry);
            n += 1;
        })
        .await?;
        Ok((n > 0).then_some(inst))
    }

    /// Reads every instance (for `weir saga list` and the coordinator's view).
    pub async fn load_all(&self, steps: usize) -> Result<BTreeMap<String, Instance>, LogError> {
        let mut all: BTreeMap<String, Instance> = BTreeMap::new();
        self.read(&subjects(&self.namespace, &self.saga), |id, seq, entry| {
            all.entry(id.to_string())
                .or_insert_with(|| Instance::new(id, steps))
                .apply(seq, entry);
        })
        .await?;
        Ok(all)
    }

    /// Reads the entries on `filter` up to now, calling `f(instance, seq, entry)` for each.
    async fn read(
        &self,
        filter: &str,
        mut f: impl FnMut(&str, u64, Entry),
    ) -> Result<(), LogError> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| LogError::Broker(format!("stream {}: {e}", self.stream)))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| LogError::Broker(format!("reading {filter}: {e}")))?;
        // Ordered consumers linger 30s after use: delete this one when done, or resuming many
        // instances at once would pile them up to the server's consumer limit.
        let name = consumer.cached_info().name.clone();
        let result = Self::read_from(consumer, filter, &mut f).await;
        let _ = stream.delete_consumer(&name).await;
        result
    }

    async fn read_from(
        consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
        filter: &str,
        f: &mut impl FnMut(&str, u64, Entry),
    ) -> Result<(), LogError> {
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| LogError::Broker(format!("reading {filter}: {e}")))?;
        while let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| LogError::Broker(format!("reading {filter}: timed out")))?
        {
            let m = m.map_err(|e| LogError::Broker(format!("reading {filter}: {e}")))?;
            let info = m
                .info()
                .map_err(|e| LogError::Broker(format!("reading {filter}: {e}")))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let id = m.subject.rsplit('.').next().unwrap_or_default().to_string();
            if valid_instance_id(&id) {
                match serde_json::from_slice::<Entry>(&m.payload) {
                    Ok(entry) => f(&id, seq, entry),
                    Err(e) => tracing::warn!(seq, error = %e, "skipping an unreadable log entry"),
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn e(event: Event) -> Entry {
        Entry {
            at: Utc::now(),
            by: "r".into(),
            event,
        }
    }

    #[test]
    fn entries_serialize_flat_with_a_type() {
        let v = serde_json::to_value(e(Event::StepFailed {
            step: 3,
            name: "ship".into(),
            error: "409".into(),
            uncertain: false,
        }))
        .unwrap();
        assert_eq!(v["type"], "step-failed");
        assert_eq!(v["step"], 3);
        assert_eq!(v["by"], "r");
        let back: Entry = serde_json::from_value(v).unwrap();
        assert_eq!(back.event.kind(), "step-failed");
    }

    #[test]
    fn folding_tells_what_may_have_happened() {
        let mut i = Instance::new("x", 3);
        let steps = ["a", "b", "c"];
        i.apply(
            1,
            e(Event::Started {
                input: json!({"n": 1}),
                version: None,
            }),
        );
        i.apply(
            2,
            e(Event::StepStarted {
                step: 1,
                name: "a".into(),
            }),
        );
        i.apply(
            3,
            e(Event::StepSucceeded {
                step: 1,
                name: "a".into(),
                result: json!(7),
            }),
        );
        i.apply(
            4,
            e(Event::StepStarted {
                step: 2,
                name: "b".into(),
            }),
        );
        assert!(i.may_have_happened(0) && i.may_have_happened(1) && !i.may_have_happened(2));
        i.apply(
            5,
            e(Event::StepFailed {
                step: 2,
                name: "b".into(),
                error: "422".into(),
                uncertain: false,
            }),
        );
        assert!(!i.may_have_happened(1));
        assert_eq!(i.status, Status::Compensating);
        assert_eq!(i.last_seq, 5);
        let names: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            i.results(&names),
            BTreeMap::from([("a".to_string(), json!(7))])
        );
        assert_eq!(i.input, json!({"n": 1}));
    }

    fn started(i: &mut Instance, steps: &[(usize, bool)]) {
        i.apply(
            1,
            e(Event::Started {
                input: json!({}),
                version: Some("v1".into()),
            }),
        );
        let mut seq = 2;
        for (step, ok) in steps {
            i.apply(
                seq,
                e(Event::StepStarted {
                    step: *step,
                    name: format!("s{step}"),
                }),
            );
            seq += 1;
            if *ok {
                i.apply(
                    seq,
                    e(Event::StepSucceeded {
                        step: *step,
                        name: format!("s{step}"),
                        result: json!(null),
                    }),
                );
                seq += 1;
            }
        }
    }

    #[test]
    fn a_cancel_request_stops_the_steps_and_ends_cancelled() {
        // Read with no step count: the vectors grow with the steps the entries name.
        let mut i = Instance::new("x", 0);
        started(&mut i, &[(1, true), (2, false)]);
        assert_eq!(i.version.as_deref(), Some("v1"));
        assert_eq!(i.steps.len(), 2);
        i.resize(3);
        i.apply(
            10,
            e(Event::CancelRequested {
                requested_by: "alice".into(),
                reason: "customer called".into(),
            }),
        );
        assert_eq!(i.status, Status::Cancelling);
        assert_eq!(
            i.cancel,
            Some(("alice".to_string(), "customer called".to_string()))
        );
        assert_eq!(
            i.reason.as_deref(),
            Some("cancelled by alice: customer called")
        );
        // Step 2 was in flight: it may have happened; step 3 never started.
        assert!(i.may_have_happened(0) && i.may_have_happened(1) && !i.may_have_happened(2));
        // A second request keeps the first's who and why; compensating keeps `Cancelling`.
        i.apply(
            11,
            e(Event::CancelRequested {
                requested_by: "bob".into(),
                reason: String::new(),
            }),
        );
        i.apply(
            12,
            e(Event::CompStarted {
                step: 2,
                name: "s2".into(),
            }),
        );
        assert_eq!(i.status, Status::Cancelling);
        assert_eq!(i.cancel.as_ref().unwrap().0, "alice");
        assert!(!i.status.finished());
        i.apply(
            13,
            e(Event::Cancelled {
                reason: "cancelled by alice: customer called".into(),
            }),
        );
        assert_eq!(i.status, Status::Cancelled);
        assert!(i.status.finished());
        let v = serde_json::to_value(&i.entries[i.entries.len() - 4]).unwrap();
        assert_eq!(v["type"], "cancel-requested");
        assert_eq!(v["requestedBy"], "alice");
    }

    #[test]
    fn a_cancel_after_the_end_changes_nothing() {
        let mut i = Instance::new("x", 1);
        started(&mut i, &[(1, true)]);
        i.apply(
            5,
            e(Event::CancelRequested {
                requested_by: "a".into(),
                reason: "late".into(),
            }),
        );
        i.apply(6, e(Event::Completed));
        assert_eq!(i.status, Status::Completed);
        let mut j = Instance::new("y", 1);
        started(&mut j, &[(1, true)]);
        j.apply(6, e(Event::Completed));
        j.apply(
            7,
            e(Event::CancelRequested {
                requested_by: "a".into(),
                reason: String::new(),
            }),
        );
        assert_eq!(j.status, Status::Completed);
        assert_eq!(j.cancel, None);
    }

    #[test]
    fn a_retry_request_gives_the_failed_compensations_their_attempts_again() {
        let mut i = Instance::new("x", 2);
        started(&mut i, &[(1, true), (2, true)]);
        let mut seq = 10;
        let mut ap = |i: &mut Instance, ev: Event| {
            i.apply(seq, e(ev));
            seq += 1;
        };
        ap(
            &mut i,
            Event::StepFailed {
                step: 2,
                name: "s2".into(),
                error: "x".into(),
                uncertain: true,
            },
        );
        for _ in 0..3 {
            ap(
                &mut i,
                Event::CompFailed {
                    step: 2,
                    name: "s2".into(),
                    error: "500".into(),
                },
            );
        }
        ap(
            &mut i,
            Event::CompSucceeded {
                step: 1,
                name: "s1".into(),
            },
        );
        ap(
            &mut i,
            Event::CompensationFailed {
                reason: "comp 2 failed".into(),
            },
        );
        assert_eq!(i.status, Status::CompensationFailed);
        assert!(!i.retrying());
        ap(
            &mut i,
            Event::RetryRequested {
                requested_by: "ops".into(),
                reason: "payments fixed".into(),
            },
        );
        assert_eq!(i.status, Status::Compensating);
        assert!(i.retrying());
        assert_eq!(i.retries, 1);
        assert_eq!(i.comps[1].failures, 0, "attempts anew");
        assert!(
            i.comps[0].succeeded,
            "a compensation that succeeded is not run again"
        );
        ap(
            &mut i,
            Event::CompSucceeded {
                step: 2,
                name: "s2".into(),
            },
        );
        ap(&mut i, Event::Compensated { reason: "x".into() });
        assert_eq!(i.status, Status::Compensated);
        assert!(!i.retrying());
        // A retry request on an instance that is not CompensationFailed changes nothing.
        ap(
            &mut i,
            Event::RetryRequested {
                requested_by: "ops".into(),
                reason: String::new(),
            },
        );
        assert_eq!(i.status, Status::Compensated);
    }

    #[test]
    fn a_retried_cancel_ends_cancelled() {
        let mut i = Instance::new("x", 1);
        started(&mut i, &[(1, true)]);
        i.apply(
            5,
            e(Event::CancelRequested {
                requested_by: "a".into(),
                reason: String::new(),
            }),
        );
        i.apply(6, e(Event::CompensationFailed { reason: "r".into() }));
        i.apply(
            7,
            e(Event::RetryRequested {
                requested_by: "a".into(),
                reason: String::new(),
            }),
        );
        assert_eq!(i.status, Status::Cancelling);
    }

    #[test]
    fn states_parse_as_written_on_the_command_line() {
        assert_eq!(
            Status::parse("compensation-failed"),
            Some(Status::CompensationFailed)
        );
        assert_eq!(Status::parse("failed"), Some(Status::CompensationFailed));
        assert_eq!(Status::parse("Cancelled"), Some(Status::Cancelled));
        assert_eq!(StateFilter::parse("finished"), Ok(StateFilter::Finished));
        assert!(StateFilter::parse("done").is_err());
        assert!(StateFilter::Finished.matches(Status::Cancelled));
        assert!(!StateFilter::Finished.matches(Status::Cancelling));
    }

    #[test]
    fn instance_ids_are_subject_tokens() {
        assert!(valid_instance_id("ev-0a1b"));
        for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(65)] {
            assert!(!valid_instance_id(bad), "{bad}");
        }
    }
}
