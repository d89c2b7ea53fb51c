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
/// How long instance logs are kept.
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
        }
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
}

impl Status {
    pub fn finished(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::CompensationFailed
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "Running",
            Status::Compensating => "Compensating",
            Status::Completed => "Completed",
            Status::Compensated => "Compensated",
            Status::CompensationFailed => "CompensationFailed",
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
        }
    }

    /// Folds one entry in (entries of steps beyond `steps` are kept but not folded).
    pub fn apply(&mut self, seq: u64, entry: Entry) {
        self.last_seq = seq;
        let idx = |step: usize| step.checked_sub(1);
        match &entry.event {
            Event::Started { input } => self.input = input.clone(),
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
                self.status = Status::Compensating;
                self.reason = Some(format!("step {step} ({name}) failed: {error}"));
            }
            Event::CompStarted { step, .. } => {
                if let Some(c) = idx(*step).and_then(|i| self.comps.get_mut(i)) {
                    c.started = true;
                }
                self.status = Status::Compensating;
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

    pub fn started_at(&self) -> Option<DateTime<Utc>> {
        self.entries.first().map(|e| e.at)
    }
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.entries.last().map(|e| e.at)
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
}

/// The Saga's log stream.
#[derive(Clone)]
pub struct Log {
    pub js: jetstream::Context,
    pub namespace: String,
    pub saga: String,
    pub stream: String,
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
        let cfg = stream::Config {
            name: stream_name(namespace, saga),
            description: Some(format!("Weir Saga {namespace}/{saga}: instance logs")),
            subjects: vec![subjects(namespace, saga)],
            max_age: LOG_MAX_AGE,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        js.get_or_create_stream(cfg)
            .await
            .map_err(|e| LogError::Broker(format!("log stream: {e}")))?;
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
            match serde_json::from_slice::<Entry>(&m.payload) {
                Ok(entry) => f(&id, seq, entry),
                Err(e) => tracing::warn!(seq, error = %e, "skipping an unreadable log entry"),
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

    #[test]
    fn instance_ids_are_subject_tokens() {
        assert!(valid_instance_id("ev-0a1b"));
        for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(65)] {
            assert!(!valid_instance_id(bad), "{bad}");
        }
    }
}
