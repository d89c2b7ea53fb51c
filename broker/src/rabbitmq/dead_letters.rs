//! A Queue's dead letters on RabbitMQ ([`crate::dead_letters`]): `seq` is the dead letter's
//! position in the dead-letter queue (1 = oldest) when the command runs; a replay is published
//! (confirmed) to the consumer queue named by `Weir-Original-Subject`, then the dead letter is
//! acknowledged (removed). Listing takes the dead letters without acknowledging them and hands
//! them back.

use super::admin::{AMQP_GET_TIMEOUT, RabbitAdmin};
use crate::admin::Error;
use crate::dead_letters::{DeadLetter, DeadLetters, replayed_header};
use crate::queue::dead_letter_headers::*;
use crate::queue::dead_letter_stream_name;
use bytes::Bytes;

impl DeadLetters for RabbitAdmin {
    async fn get(
        &self,
        namespace: &str,
        queue: &str,
        seq: &str,
    ) -> Result<Option<DeadLetter>, Error> {
        let all = rabbit_list(self, namespace, queue).await?;
        Ok(all.into_iter().find(|d| d.seq == seq))
    }

    async fn list(&self, namespace: &str, queue: &str) -> Result<Vec<DeadLetter>, Error> {
        rabbit_list(self, namespace, queue).await
    }

    async fn replay(
        &self,
        namespace: &str,
        queue: &str,
        chosen: &[DeadLetter],
    ) -> Vec<(DeadLetter, Result<String, Error>)> {
        let seqs: Vec<String> = chosen.iter().map(|d| d.seq.clone()).collect();
        match rabbit_replay(self, namespace, queue, &seqs).await {
            Ok(v) => v,
            Err(e) => chosen.iter().map(|d| (d.clone(), Err(e.clone()))).collect(),
        }
    }
}

fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    let what = what.into();
    move |e| Error::Broker {
        what,
        message: e.to_string(),
    }
}

/// Takes every dead letter without acknowledging it (in queue order); the channel returned
/// holds them until it is closed (they go back) or they are acknowledged.
async fn rabbit_take(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
) -> Result<(lapin::Channel, Vec<(DeadLetter, lapin::message::Delivery)>), Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let ch = r.channel().await?;
    let mut out = Vec::new();
    loop {
        let got = tokio::time::timeout(
            AMQP_GET_TIMEOUT,
            ch.basic_get(
                name.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            ),
        )
        .await
        .map_err(|_| Error::Broker {
            what: format!("queue {name}"),
            message: "no answer in time".into(),
        })?
        .map_err(amqp(format!("queue {name}")))?;
        let Some(m) = got else { break };
        let d = m.delivery;
        let mut headers: Vec<(String, String)> = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| {
                        let v = match v {
                            lapin::types::AMQPValue::LongString(s) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            lapin::types::AMQPValue::ShortString(s) => s.as_str().to_string(),
                            lapin::types::AMQPValue::LongInt(i) => i.to_string(),
                            lapin::types::AMQPValue::LongLongInt(i) => i.to_string(),
                            _ => return None,
                        };
                        Some((k.as_str().to_string(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Dead-lettered by RabbitMQ itself (the delivery limit reached while sidecars crashed):
        // no Weir-* headers, but the broker says why and from where.
        let first = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let (x_reason, x_queue) = (first("x-first-death-reason"), first("x-first-death-queue"));
        headers.retain(|(k, _)| !k.starts_with("x-"));
        let has =
            |h: &Vec<(String, String)>, n: &str| h.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        if let Some(r) = x_reason
            && !has(&headers, REASON)
        {
            headers.push((REASON.to_string(), format!("broker: {r}")));
        }
        if let Some(q) = x_queue
            && !has(&headers, ORIGINAL_SUBJECT)
        {
            headers.push((ORIGINAL_SUBJECT.to_string(), q));
        }
        headers.sort();
        let stored_at = d
            .properties
            .timestamp()
            .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        let letter = DeadLetter {
            seq: (out.len() + 1).to_string(),
            headers,
            body: Bytes::from(d.data.clone()),
            stored_at,
        };
        out.push((letter, d));
    }
    Ok((ch, out))
}

async fn rabbit_list(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let (ch, all) = rabbit_take(r, namespace, queue).await?;
    // Closing the channel hands every dead letter back, in order.
    let _ = ch.close(200, "listed".into()).await;
    Ok(all.into_iter().map(|(d, _)| d).collect())
}

/// Publishes each chosen dead letter to its consumer queue (confirmed), then acknowledges it.
async fn rabbit_replay(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
    seqs: &[String],
) -> Result<Vec<(DeadLetter, Result<String, Error>)>, Error> {
    let (ch, all) = rabbit_take(r, namespace, queue).await?;
    let out_ch = r.channel().await?;
    out_ch
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    let mut out = Vec::new();
    for (d, delivery) in all.into_iter().filter(|(d, _)| seqs.contains(&d.seq)) {
        let r = async {
            let target = d.original_subject()?;
            let mut t = lapin::types::FieldTable::default();
            for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
                t.insert(
                    k.as_str().into(),
                    lapin::types::AMQPValue::LongString(v.clone().into()),
                );
            }
            let props = lapin::BasicProperties::default()
                .with_headers(t)
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(d.event_id().unwrap_or_default().into());
            let what = format!("replay of dead letter {} to {target}", d.seq);
            let confirm = out_ch
                .basic_publish(
                    "".into(),
                    target.into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &d.body,
                    props,
                )
                .await
                .map_err(amqp(what.clone()))?
                .await
                .map_err(amqp(what.clone()))?;
            if confirm != lapin::Confirmation::Ack(None) {
                return Err(Error::Broker {
                    what,
                    message: format!("not stored: {confirm:?} (is queue {target} there?)"),
                });
            }
            delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map_err(amqp(format!("removing dead letter {}", d.seq)))?;
            Ok(format!("on {target}"))
        }
        .await;
        out.push((d, r));
    }
    let _ = ch.close(200, "replayed".into()).await;
    let _ = out_ch.close(200, "replayed".into()).await;
    Ok(out)
}
