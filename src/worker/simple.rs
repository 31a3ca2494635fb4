//! Simple mode: pop whole envelopes, run them, publish outcomes.

use std::sync::Arc;
use std::time::Duration;

use serde_bytes::ByteBuf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::execute::{self, Input, Outcome};
use super::fetch::Fetcher;
use super::health::is_fatal;
use super::{Counters, Shared, persist, queue_of, queues_to_serve, rest_queues_of, take_slots};
use crate::error::Error;
use crate::failure::FailureKind;
use crate::keys::QueueKeys;
use crate::transitions;
use crate::wire::{
    COMPLETED, DeadRecord, Envelope, FAILED, Reply, WireError, now_ms, pack, unpack,
};

/// Pops envelopes while there are free slots, until shutdown. A queue whose
/// pending list cannot be popped (another Redis type) is rested while the
/// others are served.
pub(crate) async fn fetch_loop(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> Result<(), Error> {
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency));
    let mut fetcher = Fetcher::default();
    loop {
        while tasks.try_join_next().is_some() {}
        let Some(mut permits) = take_slots(shared, &slots).await else {
            return Ok(());
        };
        let serving = queues_to_serve(shared).await;
        if serving.is_empty() {
            continue;
        }
        let popped = fetcher
            .pop(shared, &serving, |q| q.pending(), permits.len())
            .await;
        let (key, entries) = match popped {
            Ok(Some(popped)) => popped,
            Ok(None) => continue,
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                rest_queues_of(shared, &serving, |q| q.pending(), "pop", &e);
                continue;
            }
        };
        let keys = queue_of(shared, &key, |q| q.pending());
        shared.health.recovered(keys.queue());
        if shared.shutdown.is_cancelled() {
            give_back(shared, &keys, entries).await;
            return Ok(());
        }
        for entry in entries {
            let permit = permits.pop().expect("never pops more than the free slots");
            tasks.spawn(run_job(shared.clone(), keys.clone(), entry, permit));
        }
    }
}

/// Gives entries popped after shutdown was requested back to the queue.
async fn give_back(shared: &Shared, keys: &QueueKeys, entries: Vec<Vec<u8>>) {
    let call = transitions::simple_requeue(keys, &entries);
    match persist::<i64>(&shared.con, &call, keys, None).await {
        Ok(_) => Counters::add(&shared.counters.returned, entries.len() as u64),
        Err(e) => {
            tracing::error!(queue = keys.queue(), error = %e, lost = entries.len(), "could not give popped jobs back")
        }
    }
}

async fn run_job(
    shared: Arc<Shared>,
    keys: Arc<QueueKeys>,
    entry: Vec<u8>,
    _permit: OwnedSemaphorePermit,
) {
    let envelope = match unpack::<Envelope>(&entry, "job envelope") {
        Ok(env)
            if env
                .reply
                .as_deref()
                .is_none_or(|c| keys.owns_reply_channel(c)) =>
        {
            env
        }
        Ok(env) => {
            let reason = format!(
                "reply channel {:?} is not a reply channel of this queue",
                env.reply
            );
            return dead_letter(&shared, &keys, entry, reason).await;
        }
        Err(e) => {
            // Not a valid envelope. If its ID and reply channel can still be
            // read, its client is told; the entry is kept either way.
            let reason = e.to_string();
            // Best effort, so more lenient than `unpack`: bytes after the
            // map, for example, do not stop us from telling the client.
            if let Ok(partial) =
                crate::encoding::msgpack_prefix::<PartialEnvelope>(&entry, "job envelope")
                && let Some(channel) = partial.reply.filter(|c| keys.owns_reply_channel(c))
            {
                let failure = Outcome::failed(
                    FailureKind::Decode,
                    format!("invalid job envelope: {reason}"),
                );
                Counters::add(&shared.counters.failed, 1);
                send_reply(&shared, &keys, &partial.id, &channel, None, failure).await;
            }
            return dead_letter(&shared, &keys, entry, reason).await;
        }
    };
    let input = Input {
        id: envelope.id.clone(),
        queue: keys.queue().to_owned(),
        mode: crate::mode::Mode::Simple,
        enc: envelope.enc.clone(),
        payload: envelope.payload.into_vec(),
        attempt: 1,
        timeout: envelope
            .timeout_ms
            .map(Duration::from_millis)
            .or(shared.settings.timeout),
        // Simple mode: no record to cancel or keep progress in.
        control: None,
    };
    let outcome = execute::run(&shared.handler, input, &shared.hard_stop, Duration::ZERO)
        .await
        .unwrap_or_else(|| {
            Outcome::failed(
                FailureKind::Shutdown,
                "worker shut down before the job finished".into(),
            )
        });
    match &outcome {
        // Never without a control (simple mode has none).
        Outcome::Cancelled => return,
        Outcome::Completed(_) => Counters::add(&shared.counters.completed, 1),
        Outcome::Failed(kind, message, _) => {
            tracing::info!(job = %envelope.id, queue = keys.queue(), %kind, message, "job failed");
            Counters::add(&shared.counters.failed, 1);
        }
    }
    if let Some(channel) = &envelope.reply {
        send_reply(
            &shared,
            &keys,
            &envelope.id,
            channel,
            Some(envelope.enc),
            outcome,
        )
        .await;
    }
}

/// The fields of an envelope needed to tell its client that it is invalid.
#[derive(serde::Deserialize)]
struct PartialEnvelope {
    id: String,
    #[serde(default)]
    reply: Option<String>,
}

/// Publishes a job's outcome on its client's reply channel.
async fn send_reply(
    shared: &Shared,
    keys: &QueueKeys,
    id: &str,
    channel: &str,
    enc: Option<String>,
    outcome: Outcome,
) {
    let reply = match outcome {
        Outcome::Cancelled => return,
        Outcome::Completed(bytes) => Reply {
            id: id.to_owned(),
            status: COMPLETED.into(),
            enc,
            result: Some(ByteBuf::from(bytes)),
            error: None,
        },
        Outcome::Failed(kind, message, _) => Reply {
            id: id.to_owned(),
            status: FAILED.into(),
            enc: None,
            result: None,
            error: Some(WireError {
                kind: kind.as_str().into(),
                message,
            }),
        },
    };
    let Ok(message) = pack(&reply, "reply message") else {
        return;
    };
    let call = transitions::simple_reply(keys, channel, &message, shared.con.is_cluster());
    if let Err(e) = persist::<i64>(&shared.con, &call, keys, Some(id)).await {
        tracing::error!(job = %id, error = %e, "could not deliver the outcome");
    }
}

/// Keeps an entry that is not a valid job in the queue's dead-letter list.
/// When that list cannot take it (another Redis type, or Redis unreachable
/// for longer than the worker retries), the entry goes back to the pending
/// list, unchanged, and the queue is rested: the entry is never dropped, and
/// it holds no job slot meanwhile, so a run of such entries cannot starve
/// the worker's other queues.
async fn dead_letter(shared: &Shared, keys: &QueueKeys, entry: Vec<u8>, reason: String) {
    tracing::warn!(queue = keys.queue(), %reason, "moving an invalid entry to the dead-letter list");
    let record = DeadRecord {
        reason,
        entry: ByteBuf::from(entry),
        at_ms: now_ms(),
    };
    let Ok(packed) = pack(&record, "dead-letter record") else {
        return;
    };
    let call = transitions::simple_dead(keys, &packed, shared.settings.dead_letter_max);
    match persist::<i64>(&shared.con, &call, keys, None).await {
        Ok(_) => Counters::add(&shared.counters.dead_lettered, 1),
        Err(e) => {
            shared.health.failed(
                &shared.counters,
                keys.queue(),
                "dead-letter an invalid entry",
                &e,
            );
            give_back(shared, keys, vec![record.entry.into_vec()]).await;
        }
    }
}
