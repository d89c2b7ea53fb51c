//! `weir saga list <saga>` and `weir saga show <saga> <id>`: read the instances' logs on the
//! broker and print them.

use super::log::{Event, Instance, Log};
use std::fmt::Write;
use weir_broker::credentials::Credentials;

#[derive(clap::Args, Debug)]
pub struct SagaArgs {
    #[command(subcommand)]
    pub command: SagaCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum SagaCommand {
    /// Every instance of a Saga: id, status, step, times.
    List {
        saga: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "WEIR_BROKER_URL", default_value = "nats://127.0.0.1:4222")]
        broker_url: String,
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
            } => {
                let log = open(&broker_url, &namespace, &saga).await?;
                // Step count only matters for folding; entries carry their step numbers.
                let all = log.load_all(64).await?;
                Ok(list(&all.into_values().collect::<Vec<_>>()))
            }
            SagaCommand::Show {
                saga,
                id,
                namespace,
                broker_url,
                json,
            } => {
                let log = open(&broker_url, &namespace, &saga).await?;
                let inst = log.load(&id, 64).await?.ok_or_else(|| {
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
        "{:<40} {:<19} {:>4}  {:<20} {:<20} REASON\n",
        "ID", "STATUS", "STEP", "STARTED", "UPDATED"
    );
    let t = |d: Option<chrono::DateTime<chrono::Utc>>| {
        d.map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default()
    };
    for i in rows {
        let _ = writeln!(
            out,
            "{:<40} {:<19} {:>4}  {:<20} {:<20} {}",
            i.id,
            i.status.as_str(),
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
