//! `weir saga list|show|cancel|retry|purge`: read (and for cancel, retry and purge, write) the
//! instances' logs on the broker.
//!
//! Cancel and retry append a request to the instance's log (`cancel-requested`,
//! `retry-requested`), conditional on its last entry, as the coordinator's API does: the request
//! is durable before the command returns, and whichever coordinator replica drives the instance
//! (or takes it over next) acts on it. No coordinator address is needed, and a coordinator
//! crashing at any point loses nothing.

use super::coordinator::{UNVERSIONED, selector};
use super::log::{Event, Instance, Log, Request, StateFilter};
use std::fmt::Write;
use weir_broker::credentials::Credentials;

#[derive(clap::Args, Debug)]
pub struct SagaArgs {
    #[command(subcommand)]
    pub command: SagaCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum SagaCommand {
    /// Every instance of a Saga: id, status, version, step, times.
    List {
        saga: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "WEIR_BROKER_URL", default_value = "nats://127.0.0.1:4222")]
        broker_url: String,
        /// Only instances in this state: running, compensating, cancelling, completed,
        /// compensated, cancelled, failed (= compensation-failed), finished, unfinished.
        #[arg(long)]
        state: Option<String>,
        /// Only instances running this version (`unversioned`: started before versions).
        #[arg(long)]
        version: Option<String>,
    },
    /// Cancels an unfinished instance (or every instance in `--state`, default running): no
    /// step starts after the request, and the steps that may have happened are compensated in
    /// reverse order; it ends Cancelled.
    Cancel {
        saga: String,
        /// The instance; or `--all`.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        /// With `--all`: the state of the instances to cancel.
        #[arg(long, requires = "all", default_value = "running")]
        state: String,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Runs again the failed compensations of an instance that ended CompensationFailed (or of
    /// every such instance), with the same idempotency keys; it ends Compensated (or Cancelled)
    /// when they succeed, and its dead letters are deleted.
    Retry {
        saga: String,
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all", default_value = "compensation-failed")]
        state: String,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Deletes the logs of finished instances: by state, age (since they ended) and version.
    Purge {
        saga: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "WEIR_BROKER_URL", default_value = "nats://127.0.0.1:4222")]
        broker_url: String,
        /// completed, compensated, cancelled, failed or finished (never an unfinished state).
        #[arg(long, default_value = "finished")]
        state: String,
        /// Only instances that ended more than this long ago: `7d`, `12h`, `30m`.
        #[arg(long, default_value = "0s")]
        older_than: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// One instance's timeline: each step and compensation with times and results.
    Show {
        saga: String,
        id: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "WEIR_BROKER_URL", default_value = "nats://127.0.0.1:4222")]
        broker_url: String,
        /// Print the log entries as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Who asks, and why: recorded in the request's log entry.
#[derive(clap::Args, Debug)]
pub struct RequestArgs {
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "WEIR_BROKER_URL", default_value = "nats://127.0.0.1:4222")]
    pub broker_url: String,
    /// Why (recorded in the log).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who asks (recorded in the log); default `$USER`, else `cli`.
    #[arg(long)]
    pub by: Option<String>,
}

impl RequestArgs {
    fn by(&self) -> String {
        self.by
            .clone()
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "cli".into())
    }
}

/// The writer of the entries the command line appends (the entry's `by`).
const CLI_WRITER: &str = "weir-cli";

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Cancel,
    Retry,
}

/// Cancel or retry of one instance, or of every instance in `state`. Idempotent: an instance
/// already cancelling/cancelled (or retrying) is reported, not an error. Refusals (a finished
/// instance, an unknown one) are errors naming the instance and its state.
async fn request(
    op: Op,
    saga: &str,
    id: Option<String>,
    state: &str,
    r: &RequestArgs,
) -> anyhow::Result<String> {
    let log = open(&r.broker_url, &r.namespace, saga).await?;
    let ids: Vec<String> = match id {
        Some(id) => vec![id],
        None => {
            let filter = StateFilter::parse(state).map_err(anyhow::Error::msg)?;
            log.load_all(0)
                .await?
                .into_values()
                .filter(|i| filter.matches(i.status))
                .map(|i| i.id)
                .collect()
        }
    };
    let by = r.by();
    let (mut out, mut refused) = (String::new(), Vec::new());
    for id in &ids {
        let answer = match op {
            Op::Cancel => log.request_cancel(id, CLI_WRITER, &by, &r.reason).await?,
            Op::Retry => log.request_retry(id, CLI_WRITER, &by, &r.reason).await?,
        };
        let verb = if op == Op::Cancel { "cancel" } else { "retry" };
        match answer {
            Request::Accepted(s) => {
                let _ = writeln!(out, "{id}: {verb} requested ({})", s.as_str());
            }
            Request::Already(s) => {
                let _ = writeln!(
                    out,
                    "{id}: already {} ({verb} requested before)",
                    s.as_str()
                );
            }
            Request::Refused(_, why) => refused.push(why),
            Request::NotFound => {
                refused.push(format!("no instance {id} of saga {}/{saga}", r.namespace))
            }
        }
    }
    if ids.is_empty() {
        let _ = writeln!(out, "no instance of saga {}/{saga} is {state}", r.namespace);
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        print!("{out}");
        anyhow::bail!("{}", refused.join("\n"))
    }
}

pub fn run(args: SagaArgs) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.command {
            SagaCommand::List {
                saga,
                namespace,
                broker_url,
                state,
                version,
            } => {
                let state = state
                    .as_deref()
                    .map(StateFilter::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?;
                let log = open(&broker_url, &namespace, &saga).await?;
                // Entries carry their step numbers: the fold grows to them.
                let all = log.load_all(0).await?;
                let rows: Vec<Instance> = all
                    .into_values()
                    .filter(|i| state.is_none_or(|f| f.matches(i.status)))
                    .filter(|i| {
                        version
                            .as_deref()
                            .is_none_or(|v| i.version.as_deref().unwrap_or(UNVERSIONED) == v)
                    })
                    .collect();
                Ok(list(&rows))
            }
            SagaCommand::Cancel {
                saga,
                id,
                all: _,
                state,
                request: r,
            } => request(Op::Cancel, &saga, id, &state, &r).await,
            SagaCommand::Retry {
                saga,
                id,
                all: _,
                state,
                request: r,
            } => request(Op::Retry, &saga, id, &state, &r).await,
            SagaCommand::Purge {
                saga,
                namespace,
                broker_url,
                state,
                older_than,
                version,
            } => {
                let filter = StateFilter::parse(&state).map_err(anyhow::Error::msg)?;
                let finished = match filter {
                    StateFilter::One(s) => s.finished(),
                    StateFilter::Finished => true,
                    StateFilter::Unfinished => false,
                };
                if !finished {
                    anyhow::bail!(
                        "--state {state}: unfinished instances are never purged (cancel them first)"
                    );
                }
                let age = weir_crds::duration::parse_long(&older_than)
                    .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
                let log = open(&broker_url, &namespace, &saga).await?;
                let ids = log.purge(selector(filter, age, version.as_deref())).await?;
                let mut out = String::new();
                for id in &ids {
                    let _ = writeln!(out, "purged {id}");
                }
                let _ = writeln!(out, "{} instance(s) purged", ids.len());
                Ok(out)
            }
            SagaCommand::Show {
                saga,
                id,
                namespace,
                broker_url,
                json,
            } => {
                let log = open(&broker_url, &namespace, &saga).await?;
                let inst = log.load(&id, 0).await?.ok_or_else(|| {
                    anyhow::anyhow!("no instance {id} of saga {namespace}/{saga}")
                })?;
                Ok(if json {
                    serde_json::to_string_pretty(&inst.entries)? + "\n"
                } else {
                    show(&inst)
                })
            }
        }
    })
}

async fn open(url: &str, namespace: &str, saga: &str) -> anyhow::Result<Log> {
    let client = weir_broker::nats::connect(url, &Credentials::default(), "weir-saga-cli").await?;
    let js = async_nats::jetstream::new(client);
    let log = Log::existing(js.clone(), namespace, saga);
    if !weir_broker::nats::stream_exists(&js, &log.stream).await? {
        anyhow::bail!(
            "no log stream {} on {}: saga {namespace}/{saga} has never run there",
            log.stream,
            weir_crds::redact::url(url)
        );
    }
    Ok(log)
}

fn last_step(inst: &Instance) -> usize {
    inst.entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepStarted { step, .. } | Event::StepSucceeded { step, .. } => Some(*step),
            Event::StepFailed { step, .. } => Some(*step),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// A table of instances, oldest first.
pub fn list(instances: &[Instance]) -> String {
    let mut rows: Vec<&Instance> = instances.iter().collect();
    rows.sort_by_key(|i| i.started_at());
    let mut out = format!(
        "{:<40} {:<19} {:<12} {:>4}  {:<20} {:<20} REASON\n",
        "ID", "STATUS", "VERSION", "STEP", "STARTED", "UPDATED"
    );
    let t = |d: Option<chrono::DateTime<chrono::Utc>>| {
        d.map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default()
    };
    for i in rows {
        let _ = writeln!(
            out,
            "{:<40} {:<19} {:<12} {:>4}  {:<20} {:<20} {}",
            i.id,
            i.status.as_str(),
            i.version.as_deref().unwrap_or(UNVERSIONED),
            last_step(i),
            t(i.started_at()),
            t(i.updated_at()),
            i.reason.clone().unwrap_or_default()
        );
    }
    let _ = writeln!(out, "{} instance(s)", instances.len());
    out
}

/// One instance's timeline: one line per entry, with the time since the start.
pub fn show(inst: &Instance) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "instance {}: {}", inst.id, inst.status.as_str());
    if let Some(r) = &inst.reason {
        let _ = writeln!(out, "reason:   {r}");
    }
    let _ = writeln!(
        out,
        "version:  {}",
        inst.version.as_deref().unwrap_or(UNVERSIONED)
    );
    let _ = writeln!(out, "input:    {}", inst.input);
    let start = inst.started_at();
    for e in &inst.entries {
        let since = start
            .map(|s| (e.at - s).num_milliseconds())
            .unwrap_or_default();
        let what = match &e.event {
            Event::Started { .. } => "started".to_string(),
            Event::StepStarted { step, name } => format!("step {step} {name}: attempt started"),
            Event::StepAttemptFailed {
                step, name, error, ..
            } => format!("step {step} {name}: attempt failed, will retry: {error}"),
            Event::StepSucceeded { step, name, result } => {
                format!("step {step} {name}: succeeded → {result}")
            }
            Event::StepFailed {
                step,
                name,
                error,
                uncertain,
            } => format!(
                "step {step} {name}: failed ({}) {error}",
                if *uncertain {
                    "outcome unknown, will be compensated"
                } else {
                    "refused"
                }
            ),
            Event::CompStarted { step, name } => format!("compensate {step} {name}: started"),
            Event::CompSucceeded { step, name } => format!("compensate {step} {name}: succeeded"),
            Event::CompFailed { step, name, error } => {
                format!("compensate {step} {name}: failed {error}")
            }
            Event::Completed => "completed".into(),
            Event::Compensated { .. } => "compensated".into(),
            Event::CompensationFailed { reason } => format!("compensation failed: {reason}"),
            Event::CancelRequested {
                requested_by,
                reason,
            } => format!("cancel requested by {requested_by}: {reason}"),
            Event::RetryRequested {
                requested_by,
                reason,
            } => format!("retry of the compensations requested by {requested_by}: {reason}"),
            Event::Cancelled { reason } => format!("cancelled: {reason}"),
        };
        let _ = writeln!(
            out,
            "  {}  +{since:>6}ms  {what}  [{}]",
            e.at.format("%H:%M:%S%.3f"),
            e.by
        );
    }
    out
}
