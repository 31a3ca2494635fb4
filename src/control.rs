//! Queue controls (protocol.md 8.9): pause and resume, and the rate and
//! concurrency limits every worker of a queue obeys. They live in the
//! queue's metadata hash; the start scripts enforce them atomically, so
//! they hold across all workers, processes and restarts.

use std::time::Duration;

use crate::Queue;
use crate::error::Error;
use crate::mode::Mode;
use crate::transitions;

/// Most starts a rate limit may allow per window, and most jobs a
/// concurrency limit may let run (protocol.md 10, "Numbers").
const MAX_LIMIT: u32 = 1_000_000;

/// The longest event stream cap (protocol.md 8.12).
const MAX_EVENTS: u64 = 1_000_000_000;

/// At most `max` jobs start in any window of length `per`, across all the
/// queue's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Most starts per window, 1 to 10^6.
    pub max: u32,
    /// The window, 1 ms to 10^12 ms.
    pub per: Duration,
}

impl RateLimit {
    /// At most `max` starts in any window of length `per`.
    pub fn new(max: u32, per: Duration) -> Self {
        RateLimit { max, per }
    }

    fn wire(&self) -> Result<String, Error> {
        if self.max == 0 || self.max > MAX_LIMIT {
            return Err(Error::Config(format!(
                "a rate limit allows 1 to {MAX_LIMIT} starts per window, not {}",
                self.max
            )));
        }
        if !transitions::ms_in_range(self.per, 1) {
            return Err(Error::Config(format!(
                "a rate limit's window is 1 ms to 10^12 ms, not {:?}",
                self.per
            )));
        }
        Ok(format!("{}:{}", self.max, self.per.as_millis()))
    }

    fn parse(value: &str) -> Option<Self> {
        let (max, window) = value.split_once(':')?;
        let max = crate::wire::lenient_u64(Some(max))?;
        let window = crate::wire::lenient_u64(Some(window))?;
        (1..=u64::from(MAX_LIMIT)).contains(&max).then_some(())?;
        (window >= 1).then_some(())?;
        Some(RateLimit::new(max as u32, Duration::from_millis(window)))
    }
}

/// A queue's controls, as stored in its metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueControls {
    /// Workers start no job from the queue (submits and promotions of
    /// delayed jobs go on).
    pub paused: bool,
    /// The queue's rate limit.
    pub rate: Option<RateLimit>,
    /// Most jobs of the queue running at once.
    pub concurrency: Option<u32>,
    /// Jobs submitted now record their lifecycle events, in a stream kept
    /// near this many entries ([`Queue::set_events`]).
    pub events: Option<u64>,
}

impl QueueControls {
    /// The metadata fields the controls are read from, in the order
    /// [`QueueControls::from_fields`] takes them.
    pub(crate) const FIELDS: [&'static str; 4] = ["paused", "rate", "concurrency", "events"];

    /// The controls from the values of [`QueueControls::FIELDS`]; values
    /// that do not parse (written by another program) count as absent.
    pub(crate) fn from_fields(values: &[Option<String>]) -> Self {
        let get = |i: usize| values.get(i).cloned().flatten();
        QueueControls {
            paused: get(0).as_deref() == Some("1"),
            rate: get(1).as_deref().and_then(RateLimit::parse),
            concurrency: crate::wire::lenient_u64(get(2).as_deref())
                .filter(|m| (1..=u64::from(MAX_LIMIT)).contains(m))
                .map(|m| m as u32),
            events: crate::wire::lenient_u64(get(3).as_deref())
                .filter(|m| (1..=MAX_EVENTS).contains(m)),
        }
    }
}

impl Queue {
    /// Pauses the queue: from now on no worker starts a job from it (jobs
    /// already running finish). Submits still succeed and delayed jobs
    /// still become due. Holds across all workers and restarts until
    /// [`Queue::resume`]. Returns whether it was paused already.
    ///
    /// # Errors
    /// [`Error::Config`] in simple mode (its workers pop jobs without a
    /// script); [`Error::WrongType`], [`Error::Redis`].
    pub async fn pause(&self) -> Result<bool, Error> {
        let previous = self.control(&[("paused", Some("1".into()))]).await?;
        Ok(previous[0].is_some())
    }

    /// Resumes a paused queue: the workers waiting on it start jobs at
    /// once. Returns whether it was paused.
    ///
    /// # Errors
    /// As [`Queue::pause`].
    pub async fn resume(&self) -> Result<bool, Error> {
        let previous = self.control(&[("paused", None)]).await?;
        Ok(previous[0].is_some())
    }

    /// Sets (or, with `None`, removes) the queue's rate limit: at most
    /// `max` jobs start in any window of `per`, across all its workers.
    /// Takes effect at the workers' next start; a worker held back waits
    /// without polling and serves its other queues meanwhile.
    ///
    /// # Errors
    /// [`Error::Config`] for a limit out of range or in simple mode;
    /// [`Error::WrongType`], [`Error::Redis`].
    pub async fn set_rate_limit(&self, limit: Option<RateLimit>) -> Result<(), Error> {
        let value = limit.map(|l| l.wire()).transpose()?;
        self.control(&[("rate", value)]).await.map(drop)
    }

    /// Sets (or, with `None`, removes) the queue's concurrency limit: at
    /// most `max` of its jobs run at once, across all its workers. Jobs
    /// already running when a limit is first set are counted in recoverable
    /// mode (its lease set is the count), and not in reliable mode (its
    /// running set counts the jobs started under a limit).
    ///
    /// # Errors
    /// [`Error::Config`] for 0 or more than 10^6, or in simple mode;
    /// [`Error::WrongType`], [`Error::Redis`].
    pub async fn set_concurrency_limit(&self, max: Option<u32>) -> Result<(), Error> {
        if let Some(max) = max
            && (max == 0 || max > MAX_LIMIT)
        {
            return Err(Error::Config(format!(
                "a concurrency limit is 1 to {MAX_LIMIT}, not {max}"
            )));
        }
        self.control(&[("concurrency", max.map(|m| m.to_string()))])
            .await
            .map(drop)
    }

    /// Turns the queue's lifecycle events on, keeping the event stream near
    /// `max_len` entries (1 to 10^9; older entries are trimmed, in whole
    /// stream nodes: the length stays a little above the cap), or off with
    /// `None`. Recoverable and reliable modes.
    ///
    /// The setting is copied into each job when it is submitted (or made
    /// by a schedule): jobs submitted while events are on record every step
    /// until they end, with the cap in force then; jobs submitted while
    /// they are off record none, even after events are turned on.
    ///
    /// # Errors
    /// [`Error::Config`] for a length out of range or in simple mode;
    /// [`Error::WrongType`], [`Error::Redis`].
    pub async fn set_events(&self, max_len: Option<u64>) -> Result<(), Error> {
        if let Some(max) = max_len
            && !(1..=MAX_EVENTS).contains(&max)
        {
            return Err(Error::Config(format!(
                "the event stream's length is 1 to {}, not {max}",
                MAX_EVENTS
            )));
        }
        self.control(&[("events", max_len.map(|m| m.to_string()))])
            .await
            .map(drop)
    }

    /// The queue's controls. Values another program wrote that do not
    /// parse count as absent (as the start scripts read them).
    ///
    /// # Errors
    /// [`Error::WrongType`] when the metadata is not a hash; [`Error::Redis`].
    pub async fn controls(&self) -> Result<QueueControls, Error> {
        let meta = self.keys().meta();
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&meta)
            .arg(&QueueControls::FIELDS[..])
            .query_async(&mut self.con().clone())
            .await
            .map_err(|e| crate::error::on_key(e, &meta, "hash"))?;
        Ok(QueueControls::from_fields(&values))
    }

    async fn control(
        &self,
        changes: &[(&str, Option<String>)],
    ) -> Result<Vec<Option<String>>, Error> {
        if self.mode() == Mode::Simple {
            return Err(Error::Config(
                "simple mode has no queue controls: its workers pop jobs without a script".into(),
            ));
        }
        transitions::queue_control(self.con(), self.keys(), self.mode(), changes).await
    }
}
