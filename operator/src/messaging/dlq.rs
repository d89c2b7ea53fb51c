//! `weir dlq`: a Queue's dead letters listed (a table or JSON lines), shown, and replayed after
//! a fix, on the Queue's Broker of any kind. How each kind keeps and replays them is
//! [`weir_broker::dead_letters`].

use super::target::{Target, connect_target};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use weir_broker::admin::Error;
use weir_broker::dead_letters::{DeadLetter, get, list, replay};
use weir_broker::queue::dead_letter_headers::*;
use weir_broker::queue::dead_letter_stream_name;

/// `weir dlq`: inspect and replay a Queue's dead letters.
#[derive(Args, Debug, Clone)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DlqCommand {
    /// List dead letters: sequence, event id, reason, delivery count, time, consumer, last error.
    List {
        #[command(flatten)]
        target: Target,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: its headers and body.
    Show {
        #[command(flatten)]
        target: Target,
        /// The dead letter's SEQ from `list` (stream sequence, Redis entry id, or RabbitMQ
        /// position).
        #[arg(long)]
        seq: String,
    },
    /// Publish dead letters back onto the queue, then delete them from the dead-letter stream.
    Replay {
        #[command(flatten)]
        target: Target,
        /// Sequences to replay (repeat the flag for several).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        seq: Vec<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Runs `weir dlq`: exit 0 on success, 1 when the broker or the cluster fails, 2 on bad input.
pub fn run(args: DlqArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run_async(args))
}

async fn run_async(args: DlqArgs) -> ExitCode {
    let target = match &args.command {
        DlqCommand::List { target, .. }
        | DlqCommand::Show { target, .. }
        | DlqCommand::Replay { target, .. } => target.clone(),
    };
    let broker = match connect_target(&target).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("weir dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (ns, q) = (target.namespace.as_str(), target.queue.as_str());
    let fail = |e: Error| {
        eprintln!("weir dlq: {e}");
        ExitCode::FAILURE
    };
    match args.command {
        DlqCommand::List { json, .. } => {
            let letters = match list(&broker, ns, q).await {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            print!("{}", format_list(&letters, json));
            ExitCode::SUCCESS
        }
        DlqCommand::Show { seq, .. } => match get(&broker, ns, q, &seq).await {
            Ok(Some(d)) => {
                print!("{}", format_show(&d));
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!(
                    "weir dlq: no dead letter {seq} in {}",
                    dead_letter_stream_name(ns, q)
                );
                ExitCode::from(2)
            }
            Err(e) => fail(e),
        },
        DlqCommand::Replay { seq, all, .. } => {
            let chosen = if all {
                match list(&broker, ns, q).await {
                    Ok(l) => l,
                    Err(e) => return fail(e),
                }
            } else {
                let mut v = Vec::new();
                for s in seq {
                    match get(&broker, ns, q, &s).await {
                        Ok(Some(d)) => v.push(d),
                        Ok(None) => {
                            eprintln!(
                                "weir dlq: no dead letter {s} in {}",
                                dead_letter_stream_name(ns, q)
                            );
                            return ExitCode::from(2);
                        }
                        Err(e) => return fail(e),
                    }
                }
                v
            };
            let mut failed = 0;
            for (d, r) in replay(&broker, ns, q, &chosen).await {
                match r {
                    Ok(new_seq) => println!(
                        "replayed dead letter {} (event {}) as message {new_seq}",
                        d.seq,
                        d.event_id().unwrap_or("-")
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("weir dlq: {e}");
                    }
                }
            }
            println!("{} replayed, {failed} failed", chosen.len() - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The `list` output: a table, or JSON lines.
pub fn format_list(letters: &[DeadLetter], json: bool) -> String {
    let mut out = String::new();
    if json {
        for d in letters {
            let v = serde_json::json!({
                "seq": d.seq.parse::<u64>().map(serde_json::Value::from)
                    .unwrap_or_else(|_| serde_json::Value::from(d.seq.clone())),
                "eventId": d.event_id(),
                "reason": d.header(REASON),
                "deliveryCount": d.header(DELIVERY_COUNT).and_then(|c| c.parse::<u64>().ok()),
                "deadLetteredAt": d.time(),
                "consumer": d.header(CONSUMER),
                "lastError": d.header(LAST_ERROR),
                "originalSubject": d.header(ORIGINAL_SUBJECT),
                "originalSeq": d.header(ORIGINAL_SEQ).map(|c| c
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| serde_json::Value::from(c))),
            });
            out.push_str(&v.to_string());
            out.push('\n');
        }
        return out;
    }
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|d| {
            [
                d.seq.to_string(),
                d.event_id().unwrap_or("-").to_string(),
                d.reason().to_string(),
                d.header(DELIVERY_COUNT).unwrap_or("-").to_string(),
                d.time().to_string(),
                d.header(CONSUMER).unwrap_or("-").to_string(),
                d.header(LAST_ERROR).unwrap_or("-").replace('\n', " "),
            ]
        })
        .collect();
    let head = [
        "SEQ",
        "EVENT-ID",
        "REASON",
        "DELIVERIES",
        "DEAD-LETTERED-AT",
        "CONSUMER",
        "LAST-ERROR",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(head.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The `show` output: sequence, headers, then the body (pretty when it is JSON).
pub fn format_show(d: &DeadLetter) -> String {
    let mut out = format!("seq: {}\nstored: {}\nheaders:\n", d.seq, d.stored_at);
    for (k, v) in &d.headers {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str("body:\n");
    match serde_json::from_slice::<serde_json::Value>(&d.body) {
        Ok(v) => out.push_str(&serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => out.push_str(&String::from_utf8_lossy(&d.body)),
    }
    out.push('\n');
    out
}
