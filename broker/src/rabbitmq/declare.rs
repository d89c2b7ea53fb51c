//! Declaring what [`super`] names on RabbitMQ: durable queues with their arguments, durable
//! exchanges, and bindings, each on a channel the caller opened (and closes). The operator
//! declares a Queue's exchange, dead-letter queue and consumer queues with these; a sidecar
//! declaring the same things uses them too, so both declare alike (RabbitMQ refuses a
//! redeclaration with other arguments).
//!
//! Errors are typed: a queue that exists with other arguments (`PRECONDITION_FAILED`, 406) is
//! [`DeclareError::Immutable`], since it must be deleted to be declared again; anything else is
//! [`DeclareError::Broker`].

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

/// Why a declaration failed; `what` names the queue, exchange or binding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclareError {
    /// It exists with other arguments, which RabbitMQ cannot change.
    #[error("{what} must be recreated: {message}")]
    Immutable { what: String, message: String },
    /// Any other failure (the connection, the channel, a refusal).
    #[error("{what}: {message}")]
    Broker { what: String, message: String },
}

impl DeclareError {
    /// From the client's error: [`DeclareError::Immutable`] when RabbitMQ answered
    /// `PRECONDITION_FAILED`.
    fn of(what: String, e: &lapin::Error) -> Self {
        let message = e.to_string();
        if message.contains("PRECONDITION_FAILED") || message.contains("406") {
            DeclareError::Immutable { what, message }
        } else {
            DeclareError::Broker { what, message }
        }
    }
}

/// Declares the durable queue `name` with `args` (one of [`super::consumer_queue_args`],
/// [`super::retry_queue_args`], [`super::quorum_args`], [`super::processed_stream_args`]);
/// nothing changes when it exists with the same arguments.
pub async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), DeclareError> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(|e| DeclareError::of(format!("queue {name}"), &e))?;
    Ok(())
}

/// Declares the durable exchange `name` of `kind` (topic for a Queue's events, fanout for its
/// dead letters).
pub async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), DeclareError> {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| DeclareError::of(format!("exchange {name}"), &e))
}

/// Binds `queue` to `exchange` with `routing_key` (`#`: every subject of a topic exchange).
pub async fn bind_queue(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), DeclareError> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| DeclareError::Broker {
        what: format!("binding {queue} to {exchange}"),
        message: e.to_string(),
    })
}
