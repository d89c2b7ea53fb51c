//! A Queue's dead letters on JetStream ([`crate::dead_letters`]): `seq` is the dead-letter
//! stream's sequence; a replay is published on `Weir-Original-Subject` with
//! `Nats-Msg-Id: <event id>:replay:<seq>`, then deleted.

use super::admin::{NatsAdmin, map_err};
use crate::admin::{Error, codes};
use crate::dead_letters::{DeadLetter, DeadLetters, NATS_MSG_ID, replayed_header};
use crate::queue::dead_letter_stream_name;
use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;

impl DeadLetters for NatsAdmin {
    async fn get(
        &self,
        namespace: &str,
        queue: &str,
        seq: &str,
    ) -> Result<Option<DeadLetter>, Error> {
        match seq.parse::<u64>() {
            Ok(n) => nats_get(self, namespace, queue, n).await,
            Err(_) => Ok(None),
        }
    }

    async fn list(&self, namespace: &str, queue: &str) -> Result<Vec<DeadLetter>, Error> {
        nats_list(self, namespace, queue).await
    }

    async fn replay(
        &self,
        namespace: &str,
        queue: &str,
        chosen: &[DeadLetter],
    ) -> Vec<(DeadLetter, Result<String, Error>)> {
        let mut out = Vec::new();
        for d in chosen {
            let r = nats_replay_one(self, namespace, queue, d)
                .await
                .map(|s| s.to_string());
            out.push((d.clone(), r));
        }
        out
    }
}

fn headers_of(map: &HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = map
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
        .collect();
    out.sort();
    out
}

/// The broker's timestamp as text (the type depends on async-nats features, so only Display).
fn stored_time(t: &impl std::fmt::Display) -> String {
    t.to_string()
}

/// Reads the JetStream dead letter at `seq`.
async fn nats_get(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
    seq: u64,
) -> Result<Option<DeadLetter>, Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let stream = broker
        .jetstream()
        .get_stream_no_info(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    match stream.get_raw_message(seq).await {
        Ok(m) => Ok(Some(DeadLetter {
            seq: m.sequence.to_string(),
            headers: headers_of(&m.headers),
            body: m.payload,
            stored_at: stored_time(&m.time),
        })),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => {
            let mapped = map_err(format!("message {seq} of stream {name}"))(e);
            if mapped.code() == Some(codes::NO_MESSAGE_FOUND) {
                Ok(None)
            } else {
                Err(mapped)
            }
        }
    }
}

async fn nats_list(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let mut stream = broker
        .jetstream()
        .get_stream(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    let state = stream
        .info()
        .await
        .map_err(map_err(format!("stream {name}")))?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Some(d) = nats_get(broker, namespace, queue, seq).await? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Republishes a dead letter on its original subject (original body, `ce-*`, `traceparent`
/// and `content-type` headers, `Nats-Msg-Id: <event id>:replay:<dlq seq>`), waits for the
/// stream's acknowledgement, then deletes the dead letter. Returns the new stream sequence.
/// A dead letter without `ce-id` (a message another producer wrote without a CloudEvents
/// envelope, which the sidecar delivers with an id from the stream) is replayed too, under
/// `<dead-letter stream>:replay:<dlq seq>`: the Nats-Msg-Id only has to make a repeated replay
/// of the same dead letter a duplicate.
async fn nats_replay_one(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
    d: &DeadLetter,
) -> Result<u64, Error> {
    let subject = d.original_subject()?;
    let name = dead_letter_stream_name(namespace, queue);
    let replayed_as = d.event_id().unwrap_or(&name);
    let mut headers = HeaderMap::new();
    for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
        headers.append(k.as_str(), v.as_str());
    }
    headers.insert(
        NATS_MSG_ID,
        format!("{replayed_as}:replay:{}", d.seq).as_str(),
    );
    let what = format!("replay of dead letter {} on {subject}", d.seq);
    let ack = broker
        .jetstream()
        .publish_with_headers(subject.to_string(), headers, d.body.clone())
        .await
        .map_err(map_err(what.clone()))?
        .await
        .map_err(map_err(what))?;
    let stream = broker
        .jetstream()
        .get_stream_no_info(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    let seq: u64 = d.seq.parse().map_err(|_| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: "not a stream sequence".into(),
    })?;
    stream
        .delete_message(seq)
        .await
        .map_err(map_err(format!("deleting dead letter {} of {name}", d.seq)))?;
    Ok(ack.sequence)
}
