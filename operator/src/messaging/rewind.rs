//! `weir queue rewind <queue> --consumer <microservice> --to <point>`: a consuming
//! Microservice's consumer moved back so that every event from the point is delivered to it
//! again, on the Queue's Broker, whose sidecars keep running. How each kind does it, and how a
//! rewind gets past the sidecars' dedup, is [`weir_broker::rewind`]; RabbitMQ refuses.
//!
//! `--to` is an RFC 3339 time, a duration ago (`10m`, `2h`, `1d`, `1h30m`, optionally followed by
//! ` ago`) or `start` (the oldest message the queue holds) ([`parse_to`]).
//!
//! Exit codes: 0 moved back (or left as it was when nothing at or after the point had been
//! delivered to it), 1 the broker or the cluster failed, 2 the request cannot be carried out:
//! a `--to` that is no point in time, a consumer that is not there, a broker kind that keeps no
//! log.

use super::target::{Target, connect_target};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use weir_broker::admin::Error;
use weir_broker::rewind::{Point, Rewound, rewind};

/// `weir queue`: work on a Queue's consumers.
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum QueueCommand {
    /// Move a consuming Microservice back to a point in time: every event from there is
    /// delivered to it again, past the sidecar's dedup (NATS JetStream, Redis Streams and
    /// Kafka; RabbitMQ keeps no log).
    Rewind {
        #[command(flatten)]
        target: Target,
        /// The consuming Microservice (its durable consumer or consumer group).
        #[arg(long)]
        consumer: String,
        /// Where to: an RFC 3339 time (2026-11-26T10:00:00Z), a duration ago (10m, 2h, 1d), or
        /// `start`.
        #[arg(long)]
        to: String,
    },
}

/// A `--to` that names no point in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--to {value:?}: {why}")]
pub struct ToError {
    pub value: String,
    pub why: String,
}

const EXPECTED: &str =
    "expected an RFC 3339 time (2026-11-26T10:00:00Z), a duration ago (10m, 2h, 1d) or start";

/// The point `--to` names, durations counted back from `now`.
pub fn parse_to(value: &str, now: DateTime<Utc>) -> Result<Point, ToError> {
    let err = |why: String| ToError {
        value: value.to_string(),
        why,
    };
    let v = value.trim();
    if v.eq_ignore_ascii_case("start") {
        return Ok(Point::Start);
    }
    if v.is_empty() {
        return Err(err(format!("empty; {EXPECTED}")));
    }
    // A date first: `2026-…` is no duration.
    let looks_like_a_date =
        v.len() >= 5 && v[..4].bytes().all(|b| b.is_ascii_digit()) && v.as_bytes()[4] == b'-';
    if looks_like_a_date {
        let t = DateTime::parse_from_rfc3339(v)
            .map_err(|e| err(format!("not an RFC 3339 time ({e}); {EXPECTED}")))?
            .with_timezone(&Utc);
        if t > now {
            return Err(err(format!(
                "{} is in the future (now {}): a rewind goes back",
                t.to_rfc3339(),
                now.to_rfc3339()
            )));
        }
        return Ok(Point::Time(t));
    }
    let ago = v.strip_suffix("ago").map_or(v, str::trim_end);
    let span = match ago.strip_suffix('d').map(str::parse::<u32>) {
        Some(Ok(days)) => chrono::Duration::days(i64::from(days)),
        Some(Err(_)) => return Err(err(EXPECTED.to_string())),
        None => {
            let d = weir_crds::duration::parse(ago).map_err(|_| err(EXPECTED.to_string()))?;
            chrono::Duration::from_std(d).map_err(|_| err("too long ago".to_string()))?
        }
    };
    now.checked_sub_signed(span)
        .map(Point::Time)
        .ok_or_else(|| err("too long ago".to_string()))
}

/// Runs `weir queue`: the exit codes are in the module doc.
pub fn run(args: QueueArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir queue: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run_async(args))
}

async fn run_async(args: QueueArgs) -> ExitCode {
    let QueueCommand::Rewind {
        target,
        consumer,
        to,
    } = args.command;
    let point = match parse_to(&to, Utc::now()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weir queue rewind: {e}");
            return ExitCode::from(2);
        }
    };
    let broker = match connect_target(&target).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("weir queue rewind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (ns, q) = (target.namespace.as_str(), target.queue.as_str());
    match rewind(&broker, ns, q, &consumer, point).await {
        Ok(r) => {
            println!("{}", format_rewound(ns, q, &consumer, point, &r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir queue rewind: {e}");
            if matches!(e, Error::Unsupported { .. }) || e.is_not_found() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// What the command prints when the broker did what was asked.
pub fn format_rewound(ns: &str, q: &str, consumer: &str, to: Point, r: &Rewound) -> String {
    match r {
        Rewound::Moved { from, again } => {
            let count = again.map_or(String::new(), |n| format!(" ({n} messages to deliver)"));
            format!(
                "consumer {consumer} of Queue {ns}/{q} rewound to {to}: delivering again from \
                 position {from}{count}"
            )
        }
        Rewound::NothingDelivered => format!(
            "consumer {consumer} of Queue {ns}/{q} was delivered nothing at or after {to}: left \
             as it was"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn at(s: &str) -> Point {
        Point::Time(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn to_takes_an_rfc_3339_time_in_any_offset() {
        assert_eq!(
            parse_to("2026-11-26T10:00:00Z", now()),
            Ok(at("2026-11-26T10:00:00Z"))
        );
        assert_eq!(
            parse_to("2026-11-26T11:30:00.250+01:00", now()),
            Ok(at("2026-11-26T10:30:00.250Z"))
        );
    }

    #[test]
    fn to_takes_a_duration_ago() {
        assert_eq!(parse_to("10m", now()), Ok(at("2026-11-26T11:50:00Z")));
        assert_eq!(parse_to("2h", now()), Ok(at("2026-11-26T10:00:00Z")));
        assert_eq!(parse_to("1h30m ago", now()), Ok(at("2026-11-26T10:30:00Z")));
        assert_eq!(parse_to("1d", now()), Ok(at("2026-11-25T12:00:00Z")));
        assert_eq!(parse_to("250ms", now()), Ok(at("2026-11-26T11:59:59.750Z")));
    }

    #[test]
    fn to_takes_start() {
        assert_eq!(parse_to("start", now()), Ok(Point::Start));
        assert_eq!(parse_to("START", now()), Ok(Point::Start));
    }

    #[test]
    fn a_to_that_is_no_point_in_time_is_refused_naming_the_flag() {
        for bad in ["garbage", "", "10", "10x", "m10", "-5m", "yesterday", "xd"] {
            let e = parse_to(bad, now()).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--to {bad:?}: ")) && e.contains("RFC 3339"),
                "{bad}: {e}"
            );
        }
        let e = parse_to("2026-13-01T00:00:00Z", now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an RFC 3339 time"), "{e}");
        let e = parse_to("2026-11-26", now()).unwrap_err().to_string();
        assert!(e.contains("not an RFC 3339 time"), "a date alone: {e}");
        let e = parse_to("2026-11-27T00:00:00Z", now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("in the future"), "{e}");
    }

    #[test]
    fn the_output_says_where_delivery_starts_again_or_that_nothing_moved() {
        let moved = Rewound::Moved {
            from: "50".into(),
            again: Some(51),
        };
        assert_eq!(
            format_rewound("shop", "orders", "billing", Point::Start, &moved),
            "consumer billing of Queue shop/orders rewound to the start: delivering again from \
             position 50 (51 messages to deliver)"
        );
        let s = format_rewound(
            "shop",
            "orders",
            "billing",
            Point::Start,
            &Rewound::NothingDelivered,
        );
        assert!(s.ends_with("left as it was"), "{s}");
    }
}
