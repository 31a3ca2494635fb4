//! The queue's lifecycle event stream (protocol.md 8.12): with events on
//! ([`Queue::set_events`]), the scripts append one entry per step of each
//! job to the Redis stream `<prefix>:{<queue>}:events`, in the same atomic
//! call as the step itself. [`Queue::events`] reads a page of it,
//! [`Queue::follow_events`] follows it as it grows.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::Stream;
use redis::Value;

use crate::Queue;
use crate::config::Config;
use crate::connection::{self, Backend, Conn};
use crate::error::Error;
use crate::failure::FailureKind;

/// Most entries one blocking read of [`Queue::follow_events`] takes.
const FOLLOW_BATCH: usize = 256;

/// One lifecycle event of a job, read from the queue's event stream.
///
/// Events are written by the scripts only, but anyone with write access to
/// the stream can add entries: every entry is returned, with what parses
/// (a missing event name or job ID reads as `""`, a field that is not what
/// it should be as `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The stream entry's ID, such as `"1733234567890-0"`: pass it as
    /// `after` to [`Queue::events`] or [`Queue::follow_events`] to resume
    /// reading after this event.
    pub stream_id: String,
    /// What happened: one of [`Event::SUBMITTED`], [`Event::DELAYED`],
    /// [`Event::STARTED`], [`Event::RETRIED`], [`Event::COMPLETED`],
    /// [`Event::FAILED`], [`Event::DEAD`], [`Event::CANCELLED`] and
    /// [`Event::PROGRESS`], or a name this version does not know (written by
    /// a newer version or another program).
    pub kind: String,
    /// The job's ID.
    pub job_id: String,
    /// The attempt the event is about, counted from 1 (`started`,
    /// `retried`, `completed`, `failed`, `progress`; `cancelled`, where 0
    /// means the job never started).
    pub attempt: Option<u32>,
    /// The worker that ran the attempt (`started`, `retried`, `completed`,
    /// `failed`, `progress`, `cancelled` while running). `None` when not
    /// recorded or empty.
    pub worker: Option<String>,
    /// Why the attempt failed (`retried`, `failed`; `dead`: `stalled`).
    pub failure: Option<FailureKind>,
    /// When the job is due, in ms since the Unix epoch, server time
    /// (`delayed`; `retried` when the next attempt waits for a backoff).
    pub due_ms: Option<u64>,
    /// When the event was recorded, in ms since the Unix epoch: the time
    /// part of [`Event::stream_id`] (the server's clock, never earlier than
    /// the previous entry's).
    pub at_ms: u64,
}

impl Event {
    /// `submitted`: the job was enqueued (by a submit or a schedule fire).
    pub const SUBMITTED: &'static str = "submitted";
    /// `delayed`: the job was stored to run later ([`Event::due_ms`]).
    pub const DELAYED: &'static str = "delayed";
    /// `started`: a worker started an attempt.
    pub const STARTED: &'static str = "started";
    /// `retried`: an attempt failed and the job was queued again (at once,
    /// or at [`Event::due_ms`]).
    pub const RETRIED: &'static str = "retried";
    /// `completed`: the job completed.
    pub const COMPLETED: &'static str = "completed";
    /// `failed`: the job failed for good.
    pub const FAILED: &'static str = "failed";
    /// `dead`: the job stalled too often and was dead-lettered.
    pub const DEAD: &'static str = "dead";
    /// `cancelled`: the job was cancelled.
    pub const CANCELLED: &'static str = "cancelled";
    /// `progress`: the running job reported progress.
    pub const PROGRESS: &'static str = "progress";

    /// Reads one stream entry (`[id, [field, value, ...]]`), leniently.
    /// `None` only when it is not an entry at all (no ID).
    fn parse(entry: &Value) -> Option<Event> {
        let (id, fields) = match entry {
            Value::Array(parts) if !parts.is_empty() => (&parts[0], parts.get(1)),
            _ => return None,
        };
        let stream_id = text(id)?;
        let mut event = Event {
            at_ms: stream_id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0),
            stream_id,
            kind: String::new(),
            job_id: String::new(),
            attempt: None,
            worker: None,
            failure: None,
            due_ms: None,
        };
        let pairs: Vec<(&Value, &Value)> = match fields {
            Some(Value::Array(flat)) => flat
                .chunks_exact(2)
                .map(|pair| (&pair[0], &pair[1]))
                .collect(),
            Some(Value::Map(map)) => map.iter().map(|(k, v)| (k, v)).collect(),
            _ => Vec::new(),
        };
        for (name, value) in pairs {
            let (Some(name), Some(value)) = (text(name), text(value)) else {
                continue;
            };
            // The first occurrence of a field counts (XADD keeps duplicates).
            match name.as_str() {
                "event" if event.kind.is_empty() => event.kind = value,
                "id" if event.job_id.is_empty() => event.job_id = value,
                "attempt" if event.attempt.is_none() => {
                    event.attempt =
                        crate::wire::lenient_u64(Some(&value)).and_then(|a| u32::try_from(a).ok());
                }
                "worker" if event.worker.is_none() && !value.is_empty() => {
                    event.worker = Some(value);
                }
                "kind" if event.failure.is_none() && !value.is_empty() => {
                    event.failure = Some(FailureKind::parse(&value));
                }
                "due_ms" if event.due_ms.is_none() => {
                    event.due_ms = crate::wire::lenient_u64(Some(&value));
                }
                _ => {}
            }
        }
        Some(event)
    }
}

/// A string reply as text (invalid UTF-8 replaced).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The entries of an XRANGE reply (or of one stream of an XREAD reply).
fn entries(reply: &Value) -> Vec<Event> {
    match reply {
        Value::Array(items) => items.iter().filter_map(Event::parse).collect(),
        _ => Vec::new(),
    }
}

/// The entries of an XREAD reply on one stream: RESP3 answers a map of
/// stream key to entries, RESP2 an array of `[key, entries]`; nil when the
/// block timed out.
fn read_entries(reply: &Value) -> Vec<Event> {
    match reply {
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(parts) if parts.len() == 2 => entries(&parts[1]),
                _ => Vec::new(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Checks a stream entry ID given by the caller: `<ms>` or `<ms>-<seq>`,
/// decimal, each fitting in 64 bits.
fn check_id(id: &str) -> Result<(), Error> {
    let number = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok()
    };
    let ok = match id.split_once('-') {
        Some((ms, seq)) => number(ms) && number(seq),
        None => number(id),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{id:?} is not a stream entry ID (<ms>-<seq>)"
        )))
    }
}

impl Queue {
    /// Up to `count` events of the queue, oldest first: from the oldest
    /// entry still in the stream (`after` = `None`), or from the first one
    /// after the entry ID `after` (an [`Event::stream_id`]). Page through
    /// the stream by passing the last ID read. Simple mode records no
    /// events.
    ///
    /// # Errors
    /// [`Error::Config`] when `after` is not a stream entry ID;
    /// [`Error::WrongType`] when the stream key holds another type;
    /// [`Error::Redis`].
    pub async fn events(&self, after: Option<&str>, count: usize) -> Result<Vec<Event>, Error> {
        let start = match after {
            Some(id) => {
                check_id(id)?;
                format!("({id}")
            }
            None => "-".to_owned(),
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys().events();
        let reply: Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.con().clone())
            .await
            .map_err(|e| crate::error::on_key(e, &key, "stream"))?;
        Ok(entries(&reply))
    }

    /// Follows the queue's events as they are recorded: every event after
    /// the entry ID `after` (an [`Event::stream_id`]), or from the oldest
    /// entry still in the stream (`None`), or only those recorded after the
    /// stream is first polled (`Some("$")`), then each new one as it comes,
    /// in order.
    ///
    /// The stream opens a connection of its own (its blocking reads,
    /// `XREAD BLOCK` for up to [`Config::block_timeout`] each, must not
    /// hold up the client's shared connection), when first polled. When
    /// that connection drops, it reconnects (backing off up to 1 s) and
    /// resumes after the last event it returned: nothing is skipped or
    /// repeated, unless the entries were trimmed meanwhile. To resume after
    /// a restart, keep the last [`Event::stream_id`] and pass it as
    /// `after`.
    ///
    /// The stream ends after yielding an error that retrying would not
    /// mend: [`Error::Config`] for an `after` that is not an entry ID,
    /// [`Error::WrongType`] when the stream key holds another type, or a
    /// refusal from Redis (such as a missing ACL permission).
    pub fn follow_events(
        &self,
        after: Option<String>,
    ) -> impl Stream<Item = Result<Event, Error>> + Send + Unpin + 'static {
        let follow = Follow {
            backend: self.backend().clone(),
            config: self.config().clone(),
            key: self.keys().events(),
            last: after.unwrap_or_else(|| "0-0".to_owned()),
            checked: false,
            con: None,
            buffered: VecDeque::new(),
            retry: RETRY_MIN,
        };
        Box::pin(futures_util::stream::unfold(
            Some(follow),
            |follow| async move {
                let mut follow = follow?;
                match follow.next().await {
                    Ok(event) => Some((Ok(event), Some(follow))),
                    Err(e) => Some((Err(e), None)),
                }
            },
        ))
    }
}

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The state of [`Queue::follow_events`].
struct Follow {
    backend: Backend,
    config: Config,
    key: String,
    /// The ID to read after: the last entry returned (or given), or `$`
    /// until resolved.
    last: String,
    /// `last` was checked.
    checked: bool,
    con: Option<Conn>,
    buffered: VecDeque<Event>,
    retry: Duration,
}

impl Follow {
    /// The next event; an error ends the stream.
    async fn next(&mut self) -> Result<Event, Error> {
        if !self.checked {
            if self.last != "$" {
                check_id(&self.last)?;
            }
            self.checked = true;
        }
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Ok(event);
            }
            let con = match &mut self.con {
                Some(con) => con,
                None => match connection::blocking(&self.backend, &self.config).await {
                    Ok(con) => self.con.insert(con),
                    Err(e) if e.is_transient() => {
                        tracing::warn!(stream = %self.key, error = %e, "cannot open the event connection; retrying");
                        self.back_off().await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let result = if self.last == "$" {
                // "$" resolved once to the newest entry's ID, so that what is
                // added between two reads is not missed.
                redis::cmd("XREVRANGE")
                    .arg(&self.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async::<Value>(con)
                    .await
                    .map(|reply| {
                        self.last = entries(&reply)
                            .pop()
                            .map_or_else(|| "0-0".to_owned(), |e| e.stream_id);
                    })
            } else {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(FOLLOW_BATCH)
                    .arg("BLOCK")
                    .arg(self.config.block_timeout.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&self.key)
                    .arg(&self.last)
                    .query_async::<Value>(con)
                    .await
                    .map(|reply| {
                        for event in read_entries(&reply) {
                            self.last.clone_from(&event.stream_id);
                            self.buffered.push_back(event);
                        }
                    })
            };
            match result {
                Ok(()) => self.retry = RETRY_MIN,
                Err(e) if crate::error::is_transient(&e) => {
                    tracing::warn!(stream = %self.key, error = %e, "event connection failed; reconnecting");
                    self.con = None;
                    self.back_off().await;
                }
                Err(e) => return Err(crate::error::on_key(e, &self.key, "stream")),
            }
        }
    }

    async fn back_off(&mut self) {
        tokio::time::sleep(self.retry).await;
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn entries_parse_leniently() {
        let e = Event::parse(&entry(
            "1733-4",
            &[
                "event", "retried", "id", "j1", "attempt", "2", "worker", "w", "kind", "timeout",
                "due_ms", "1800",
            ],
        ))
        .unwrap();
        assert_eq!(
            e,
            Event {
                stream_id: "1733-4".into(),
                kind: Event::RETRIED.into(),
                job_id: "j1".into(),
                attempt: Some(2),
                worker: Some("w".into()),
                failure: Some(FailureKind::Timeout),
                due_ms: Some(1800),
                at_ms: 1733,
            }
        );
        // What another program may write: kept, with what parses.
        let odd = Event::parse(&entry(
            "5-0",
            &["attempt", "-1", "worker", "", "due_ms", "soon", "extra"],
        ))
        .unwrap();
        assert_eq!(odd.kind, "");
        assert_eq!(odd.job_id, "");
        assert_eq!((odd.attempt, odd.worker, odd.due_ms), (None, None, None));
        assert_eq!(odd.at_ms, 5);
        assert!(Event::parse(&Value::Nil).is_none());
        // XREAD, RESP3 and RESP2.
        let one = Value::Array(vec![entry("7-0", &["event", "started", "id", "x"])]);
        let resp3 = Value::Map(vec![(bulk("k"), one.clone())]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("k"), one])]);
        assert_eq!(read_entries(&resp3), read_entries(&resp2));
        assert_eq!(read_entries(&resp3)[0].job_id, "x");
        assert!(read_entries(&Value::Nil).is_empty());
    }

    #[test]
    fn stream_ids_are_checked() {
        assert!(check_id("1733-0").is_ok());
        assert!(check_id("1733").is_ok());
        assert!(check_id("0-0").is_ok());
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "$",
            "+",
            "99999999999999999999-0",
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
