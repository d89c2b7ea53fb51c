//! The operator's role on RabbitMQ (AMQP 0-9-1, the layout of [`super`]). For a Queue's
//! [`Topology`] (stream name `<s>` = `weir_<ns>_<q>`) it declares:
//!
//! - the durable topic exchange `<s>`, where events are published;
//! - when dead letters are enabled, the fanout exchange and quorum queue `<s>_dlq`, bound;
//! - the processed-event stream queue `weir_processed_<ns>_<q>` (`x-max-age` = the duplicate
//!   window, at least ten minutes);
//! - per consuming Microservice `<ms>`, the quorum queue `<s>.<ms>` bound with `#`, with
//!   [`super::consumer_queue_args`] from the Queue's limits ([`Topology::rabbitmq_limits`]).
//!
//! A queue's arguments cannot change once it exists (RabbitMQ refuses the redeclaration): the
//! operator then reports [`Error::Immutable`] naming the arguments and their spec fields, and
//! the queue must be deleted to be recreated. AMQP cannot list the queues bound to an exchange,
//! so the managed consumers are those the Queue's status last reported that still exist, and
//! deleting needs them too. A retention other than `Limits` and `storage: Memory` are not
//! applied ([`Kind::not_applied`] says so).

use super::declare::{bind_queue, declare_exchange, declare_queue};
use crate::admin::{Admin, CONNECT_TIMEOUT, Error, Figures, Kind, note};
use crate::credentials::{CA_KEY, Credentials};
use crate::rabbitmq;
use crate::topology::Topology;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::collections::BTreeMap;
use std::time::Duration;
use weir_crds::broker::BrokerKind;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// How long `weir dlq` waits for RabbitMQ to hand over the next dead letter.
pub const AMQP_GET_TIMEOUT: Duration = Duration::from_secs(5);

fn other(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::broker(what, e)
}

/// The operator's AMQP connection.
#[derive(Clone)]
pub struct RabbitAdmin {
    pub conn: std::sync::Arc<lapin::Connection>,
}

/// The consumer queue of Microservice `ms` ([`rabbitmq::consumer_queue`]).
pub fn consumer_queue(t: &Topology, ms: &str) -> String {
    rabbitmq::consumer_queue(t.stream_name(), ms)
}

/// The arguments of a consumer queue, as the sidecar declares it too.
pub fn consumer_queue_args(t: &Topology) -> FieldTable {
    rabbitmq::consumer_queue_args(
        t.consumer.max_deliver,
        t.dead_letter.as_ref().map(|d| d.name.as_str()),
        &t.rabbitmq_limits(),
    )
}

impl RabbitAdmin {
    /// Connects once (no retry loop: callers requeue). The credentials' `ca.crt` is trusted
    /// besides the system's roots, and then the URL must be `amqps://`.
    pub async fn connect(url: &str, creds: &Credentials) -> Result<RabbitAdmin, Error> {
        let bad = |m: String| Error::Connect {
            url: weir_crds::redact::url(url),
            message: m,
        };
        let mut u: lapin::uri::AMQPUri = url
            .parse()
            .map_err(|e| bad(format!("not an AMQP URL: {e}")))?;
        if let Some((username, password)) = creds.amqp_auth()? {
            u.authority.userinfo.username = username;
            u.authority.userinfo.password = password;
        }
        creds.require_tls_with_ca(url, "amqps", &format!("key {CA_KEY:?}"), "the URL")?;
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: creds.ca.clone(),
        };
        let props = lapin::ConnectionProperties::default()
            .with_connection_name("weir-operator".to_string().into());
        let runtime = lapin::runtime::default_runtime().map_err(|e| bad(e.to_string()))?;
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            lapin::Connection::connect_uri_with_config(u, props, tls, runtime),
        )
        .await
        .map_err(|_| bad("timed out".into()))?
        .map_err(|e| bad(e.to_string()))?;
        Ok(RabbitAdmin {
            conn: std::sync::Arc::new(conn),
        })
    }

    pub async fn channel(&self) -> Result<lapin::Channel, Error> {
        self.conn
            .create_channel()
            .await
            .map_err(|e| other("AMQP channel", e))
    }

    /// Ready messages in `queue`; `None` when it does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<Option<u64>, Error> {
        let ch = self.channel().await?;
        let r = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match r {
            Ok(q) => {
                let _ = ch.close(200, "ok".into()).await;
                Ok(Some(u64::from(q.message_count())))
            }
            Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(other(format!("queue {queue}"), e)),
        }
    }

    async fn declare(&self, name: &str, args: FieldTable) -> Result<(), Error> {
        let ch = self.channel().await?;
        declare_queue(&ch, name, args).await?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    async fn exchange(&self, name: &str, kind: lapin::ExchangeKind) -> Result<(), Error> {
        let ch = self.channel().await?;
        declare_exchange(&ch, name, kind).await?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
        let ch = self.channel().await?;
        bind_queue(&ch, queue, exchange, key).await?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    /// Deletes queue `name` when it exists.
    async fn delete_if_there(&self, name: &str) -> Result<(), Error> {
        if self.queue_depth(name).await?.is_some() {
            let ch = self.channel().await?;
            ch.queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| other(format!("deleting queue {name}"), e))?;
            let _ = ch.close(200, "ok".into()).await;
        }
        Ok(())
    }
}

impl Admin for RabbitAdmin {
    /// The AMQP client does not expose the server's properties: the protocol is reported.
    async fn server_version(&self) -> String {
        "AMQP 0-9-1".into()
    }

    fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// The exchange, the dead-letter exchange and queue, the processed-event stream.
    async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        self.exchange(t.stream_name(), lapin::ExchangeKind::Topic)
            .await?;
        if let Some(d) = &t.dead_letter {
            self.exchange(&d.name, lapin::ExchangeKind::Fanout).await?;
            self.declare(&d.name, rabbitmq::quorum_args()).await?;
            self.bind(&d.name, &d.name, "").await?;
        }
        self.declare(
            &t.processed.bucket,
            rabbitmq::processed_stream_args(t.processed.max_age),
        )
        .await
    }

    /// The consumer queue with its arguments, bound with `#`. An existing queue with other
    /// arguments is refused by RabbitMQ: [`Error::Immutable`].
    async fn declare_consumer(&self, t: &Topology, ms: &str) -> Result<(), Error> {
        let q = consumer_queue(t, ms);
        self.declare(&q, consumer_queue_args(t))
            .await
            .map_err(|e| match e {
                Error::Immutable { what, message } => Error::Immutable {
                    what,
                    message: format!(
                        "{message}; RabbitMQ cannot change the arguments of an existing queue \
                     (x-delivery-limit = spec.consumer.maxDeliveries {}, dead-lettering from \
                     spec.deadLetter.enabled, x-max-length = spec.maxMessages, \
                     x-max-length-bytes = spec.maxBytes, x-message-ttl = spec.maxAge, \
                     x-quorum-initial-group-size = spec.replicas): delete queue {q} (its \
                     messages go with it) and the operator declares it again",
                        t.consumer.max_deliver
                    ),
                },
                e => e,
            })?;
        self.bind(&q, t.stream_name(), "#").await
    }

    /// AMQP cannot list the queues bound to an exchange: those of `known` that still exist.
    async fn managed_consumers(
        &self,
        t: &Topology,
        known: &[String],
    ) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for k in known {
            if self.queue_depth(&consumer_queue(t, k)).await?.is_some() {
                out.push(k.clone());
            }
        }
        Ok(out)
    }

    /// Deletes the consumer queue and its retry queues.
    async fn delete_consumer(&self, t: &Topology, ms: &str) -> Result<bool, Error> {
        let q = consumer_queue(t, ms);
        let existed = self.queue_depth(&q).await?.is_some();
        let mut names = vec![q.clone()];
        for b in &t.consumer.backoff {
            names.push(rabbitmq::retry_queue(&q, b.as_millis().max(1) as u64));
        }
        for n in names {
            self.delete_if_there(&n).await?;
        }
        Ok(existed)
    }

    /// Messages = ready messages over the consumer queues; pending per consumer = its queue's
    /// ready messages (AMQP does not report unacknowledged ones); dead letters = the dead-letter
    /// queue's messages.
    async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        let mut pending = BTreeMap::new();
        let mut messages = 0;
        for c in consumers {
            let n = self.queue_depth(&consumer_queue(t, c)).await?.unwrap_or(0);
            messages += n;
            pending.insert(c.clone(), n);
        }
        let dead_letters = match &t.dead_letter {
            Some(d) => Some(self.queue_depth(&d.name).await?.unwrap_or(0)),
            None => None,
        };
        Ok(Figures {
            messages,
            pending,
            dead_letters,
        })
    }

    /// Deletes the consumer queues (with their retry queues), the dead-letter queue and
    /// exchange, the processed-event stream and the exchange.
    async fn delete_queue(&self, t: &Topology, consumers: &[String]) -> Result<(), Error> {
        for c in consumers {
            self.delete_consumer(t, c).await?;
        }
        let dlq = t.dead_letter_stream_name();
        for q in [dlq.as_str(), t.processed.bucket.as_str()] {
            self.delete_if_there(q).await?;
        }
        for x in [dlq.as_str(), t.stream_name()] {
            let ch = self.channel().await?;
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| other(format!("deleting exchange {x}"), e))?;
            let _ = ch.close(200, "ok".into()).await;
        }
        Ok(())
    }
}

impl Kind for RabbitAdmin {
    const KIND: BrokerKind = BrokerKind::Rabbitmq;

    async fn connect(url: &str, credentials: &Credentials) -> Result<Self, Error> {
        RabbitAdmin::connect(url, credentials).await
    }

    fn not_applied(spec: &QueueSpec) -> Vec<String> {
        let mut out = Vec::new();
        note(
            &mut out,
            spec.retention != Retention::Limits,
            "retention",
            "each consuming Microservice has its own queue, and a message leaves it when \
             acknowledged",
        );
        note(
            &mut out,
            spec.storage == Storage::Memory,
            "storage",
            "quorum queues always keep messages on disk",
        );
        note(
            &mut out,
            spec.partitions > 1,
            "partitions",
            "each consumer has one queue; only Kafka partitions a queue",
        );
        out
    }
}
