//! Recurring schedules: a named rule on a queue that submits one job per
//! fire, every interval or on a cron pattern in a time zone.
//!
//! A schedule is a record in Redis (`<prefix>:{<queue>}:schedule:<name>`)
//! and an entry in the queue's schedules set, scored by its next fire. The
//! workers of the queue fire it (the `schedule_fire` script, from the
//! queue's clock task): each fire is one job, whose ID is
//! `<name>@<fire ms>`, queued only while the schedule still waits for that
//! fire, so that many workers firing together make one job (protocol.md
//! 8.8).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::backoff::Backoff;
use crate::client::JobOptions;
use crate::error::Error;
use crate::transitions::{MAX_MS, MAX_RUN_AT};

/// When a schedule fires.
#[derive(Debug, Clone)]
enum Spec {
    /// Every interval, counted from the first fire.
    Every(Duration),
    /// On a cron pattern (5 fields, or 6 with seconds first), in a time zone.
    Cron {
        pattern: String,
        cron: Box<Cron>,
        tz: Tz,
    },
}

/// What a fire that comes later than the schedule's grace does (its workers
/// were all down, or busy past the grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Missed {
    /// One job stands for all the fires missed (the default).
    #[default]
    Once,
    /// The missed fires submit nothing; the schedule resumes at its next
    /// fire after now.
    Skip,
}

impl Missed {
    fn as_str(self) -> &'static str {
        match self {
            Missed::Once => "once",
            Missed::Skip => "skip",
        }
    }
}

/// A recurring schedule, for [`crate::Queue::set_schedule`].
///
/// ```
/// use std::time::Duration;
/// use job_async_redis::{Missed, Schedule};
///
/// // Every 30 s, from 30 s after it is set.
/// let heartbeat = Schedule::every(Duration::from_secs(30));
/// // At 02:30 every night, Paris time (summer and winter), catching up
/// // once when the workers were down at that moment.
/// let nightly = Schedule::cron("30 2 * * *")?
///     .time_zone("Europe/Paris")?
///     .missed(Missed::Once);
/// # Ok::<(), job_async_redis::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    spec: Spec,
    missed: Missed,
    grace: Duration,
    options: JobOptions,
}

/// The grace of a schedule unless [`Schedule::grace`] says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

impl Schedule {
    /// Fires every `interval` (at least 1 ms), the first time one interval
    /// after it is set.
    pub fn every(interval: Duration) -> Self {
        Schedule {
            spec: Spec::Every(interval),
            missed: Missed::default(),
            grace: DEFAULT_GRACE,
            options: JobOptions::default(),
        }
    }

    /// Fires on a cron pattern: 5 fields (minute, hour, day of month,
    /// month, day of week), or 6 with seconds first; names (`MON`, `JAN`),
    /// ranges, steps and lists as in crontab. In UTC unless
    /// [`Schedule::time_zone`] says otherwise.
    ///
    /// # Errors
    /// [`Error::Config`] for a pattern that does not parse.
    pub fn cron(pattern: &str) -> Result<Self, Error> {
        Ok(Schedule {
            spec: Spec::cron(pattern, Tz::UTC).map_err(Error::Config)?,
            missed: Missed::default(),
            grace: DEFAULT_GRACE,
            options: JobOptions::default(),
        })
    }

    /// The time zone of a cron pattern, an IANA name such as
    /// `Europe/Paris`. Fires follow its local time across daylight saving
    /// changes: a local time that does not exist that day (spring forward)
    /// fires at the first instant after it, one that happens twice fires
    /// once.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown name, or on an interval schedule.
    pub fn time_zone(mut self, name: &str) -> Result<Self, Error> {
        let tz =
            Tz::from_str(name).map_err(|_| Error::Config(format!("unknown time zone {name:?}")))?;
        match &mut self.spec {
            Spec::Cron { tz: zone, .. } => *zone = tz,
            Spec::Every(_) => {
                return Err(Error::Config(
                    "a time zone applies to cron schedules only".into(),
                ));
            }
        }
        Ok(self)
    }

    /// What fires later than the grace do (default [`Missed::Once`]).
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// How late a fire may be and still count as on time (default 60 s):
    /// fires late by less are all caught up, one job each, in order (after a
    /// short outage nothing is lost); later ones are missed.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The options of each fire's job: lease, max attempts, timeout and
    /// backoff (an ID, a delay or a run-at time are refused: each fire's job
    /// is due at its fire, with ID `<name>@<fire ms>`).
    pub fn options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }

    /// The first fire strictly after `after_ms` (ms since the Unix epoch),
    /// for an interval schedule counted from `anchor_ms` (a fire time).
    pub(crate) fn next_fire(&self, anchor_ms: u64, after_ms: u64) -> Option<u64> {
        self.spec.next_fire(anchor_ms, after_ms)
    }

    /// Checks everything the scripts check, and returns the wire form.
    pub(crate) fn record<'a>(
        &'a self,
        enc: &'static str,
        payload: &'a [u8],
        now_ms: u64,
    ) -> Result<Record<'a>, Error> {
        let o = &self.options;
        if o.id.is_some() || o.delay.is_some() || o.run_at.is_some() {
            return Err(Error::Config(
                "a schedule's job options may not set an ID, a delay or a run-at time".into(),
            ));
        }
        let in_range = |d: Duration| (1..=MAX_MS).contains(&d.as_millis());
        if !in_range(self.grace)
            || o.lease.is_some_and(|d| !in_range(d))
            || o.timeout.is_some_and(|d| !in_range(d))
            || u64::from(o.max_attempts) > crate::transitions::MAX_COUNT
        {
            return Err(Error::Config(format!(
                "grace, lease and timeout must be 1 ms to {MAX_MS} ms, max attempts at most {}",
                crate::transitions::MAX_COUNT
            )));
        }
        if let Some(backoff) = &o.backoff {
            backoff.validate()?;
        }
        if let Spec::Every(interval) = &self.spec
            && !in_range(*interval)
        {
            return Err(Error::Config(format!(
                "an interval must be 1 ms to {MAX_MS} ms"
            )));
        }
        let next_ms = self
            .spec
            .first_fire(now_ms)
            .ok_or_else(|| Error::Config("the schedule never fires".into()))?;
        Ok(Record {
            spec: self.spec.to_wire(),
            tz: self.spec.tz_name(),
            missed: self.missed.as_str(),
            grace: self.grace,
            next_ms,
            enc,
            payload,
            lease: o.lease,
            max_attempts: o.max_attempts,
            timeout: o.timeout,
            backoff: o.backoff.as_ref().map(Backoff::to_wire).unwrap_or_default(),
        })
    }

    /// Reads a stored definition (its `spec` and `tz` fields).
    pub(crate) fn from_wire(spec: &str, tz: &str) -> Result<Self, String> {
        let spec = if let Some(ms) = spec.strip_prefix("every:") {
            let ms: u64 = ms
                .parse()
                .ok()
                .filter(|&ms| ms >= 1 && u128::from(ms) <= MAX_MS)
                .ok_or_else(|| format!("bad interval in {spec:?}"))?;
            Spec::Every(Duration::from_millis(ms))
        } else if let Some(pattern) = spec.strip_prefix("cron:") {
            let tz = Tz::from_str(tz).map_err(|_| format!("unknown time zone {tz:?}"))?;
            Spec::cron(pattern, tz)?
        } else {
            return Err(format!("unknown schedule spec {spec:?}"));
        };
        Ok(Schedule::every(Duration::from_secs(1)).with_spec(spec))
    }

    fn with_spec(mut self, spec: Spec) -> Self {
        self.spec = spec;
        self
    }
}

impl Spec {
    fn cron(pattern: &str, tz: Tz) -> Result<Self, String> {
        // The documented grammar only: 5 fields, or 6 with seconds (no
        // year field, which would make one-shot schedules, no `@hourly`).
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) || pattern.contains('@') {
            return Err(format!(
                "cron pattern {pattern:?} must have 5 fields, or 6 with seconds first"
            ));
        }
        let cron = Cron::from_str(pattern)
            .map_err(|e| format!("cron pattern {pattern:?} does not parse: {e}"))?;
        Ok(Spec::Cron {
            pattern: pattern.to_owned(),
            cron: Box::new(cron),
            tz,
        })
    }

    fn to_wire(&self) -> String {
        match self {
            Spec::Every(d) => format!("every:{}", d.as_millis()),
            Spec::Cron { pattern, .. } => format!("cron:{pattern}"),
        }
    }

    fn tz_name(&self) -> &'static str {
        match self {
            Spec::Every(_) => "UTC",
            Spec::Cron { tz, .. } => tz.name(),
        }
    }

    /// The first fire of a schedule set at `now_ms`.
    fn first_fire(&self, now_ms: u64) -> Option<u64> {
        match self {
            Spec::Every(d) => Some(now_ms + d.as_millis() as u64),
            Spec::Cron { .. } => self.next_fire(now_ms, now_ms),
        }
    }

    fn next_fire(&self, anchor_ms: u64, after_ms: u64) -> Option<u64> {
        let next = match self {
            Spec::Every(d) => {
                let step = (d.as_millis() as u64).max(1);
                let since = after_ms.saturating_sub(anchor_ms);
                anchor_ms + step * (since / step + 1)
            }
            Spec::Cron { cron, tz, .. } => {
                // Patterns match whole seconds: search from the whole second
                // (exclusive), so that the fire has no milliseconds.
                let second = (after_ms / 1000) as i64;
                let after: DateTime<Tz> =
                    tz.from_utc_datetime(&Utc.timestamp_opt(second, 0).single()?.naive_utc());
                let next = cron.find_next_occurrence(&after, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()?
            }
        };
        (next <= MAX_RUN_AT).then_some(next)
    }
}

/// A schedule as `schedule_set` takes it.
pub(crate) struct Record<'a> {
    pub spec: String,
    pub tz: &'static str,
    pub missed: &'static str,
    pub grace: Duration,
    pub next_ms: u64,
    pub enc: &'static str,
    pub payload: &'a [u8],
    pub lease: Option<Duration>,
    pub max_attempts: u32,
    pub timeout: Option<Duration>,
    pub backoff: String,
}

/// A schedule as stored: its definition, its next fire and its history
/// ([`crate::Queue::schedules`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// The schedule's name.
    pub name: String,
    /// `every:<ms>` or `cron:<pattern>`.
    pub spec: String,
    /// The cron pattern's time zone (`UTC` for intervals).
    pub time_zone: String,
    /// `once` or `skip` ([`Missed`]).
    pub missed: String,
    /// When it fires next (ms since the Unix epoch, server time).
    pub next_ms: Option<u64>,
    /// The due time of its latest fire (submitted, skipped or found done).
    pub last_due_ms: Option<u64>,
    /// When its latest job was submitted (server time).
    pub last_fired_ms: Option<u64>,
    /// The ID of its latest job.
    pub last_job: Option<String>,
    /// How many jobs it submitted.
    pub fires: u64,
    /// How many missed fires it skipped ([`Missed::Skip`]).
    pub skipped: u64,
}

impl ScheduleInfo {
    /// The fields read from a schedule hash, in [`ScheduleInfo::FIELDS`]
    /// order; `None` when the hash has no `spec` (not a schedule).
    pub(crate) fn from_fields(name: String, values: Vec<Option<String>>) -> Option<Self> {
        let get = |i: usize| values.get(i).cloned().flatten();
        let number = |i: usize| crate::wire::lenient_u64(values.get(i).and_then(|v| v.as_deref()));
        Some(ScheduleInfo {
            name,
            spec: get(0)?,
            time_zone: get(1).unwrap_or_else(|| "UTC".into()),
            missed: get(2).unwrap_or_else(|| "once".into()),
            next_ms: number(3),
            last_due_ms: number(4),
            last_fired_ms: number(5),
            last_job: get(6),
            fires: number(7).unwrap_or(0),
            skipped: number(8).unwrap_or(0),
        })
    }

    pub(crate) const FIELDS: [&'static str; 9] = [
        "spec",
        "tz",
        "missed",
        "next_ms",
        "last_due_ms",
        "last_fired_ms",
        "last_job",
        "fires",
        "skipped",
    ];
}

/// Checks a schedule name: 1 to 200 bytes, no control characters.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Error::InvalidName(format!(
            "schedule name {name:?} must be 1 to 200 bytes without control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, tz: Tz) -> u64 {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn intervals_count_from_their_anchor() {
        let s = Schedule::every(Duration::from_millis(200));
        assert_eq!(s.next_fire(1_000, 1_000), Some(1_200));
        assert_eq!(s.next_fire(1_000, 1_199), Some(1_200));
        assert_eq!(s.next_fire(1_000, 1_200), Some(1_400));
        assert_eq!(s.next_fire(1_000, 5_050), Some(5_200));
    }

    #[test]
    fn cron_follows_the_time_zone_across_daylight_saving_changes() {
        let paris = Tz::Europe__Paris;
        let s = Schedule::cron("30 2 * * *")
            .unwrap()
            .time_zone("Europe/Paris")
            .unwrap();
        // An ordinary night: 02:30 Paris is 00:30 UTC in summer.
        let after = ms(2026, 7, 1, 12, 0, paris);
        assert_eq!(s.next_fire(0, after), Some(ms(2026, 7, 2, 2, 30, paris)));
        assert_eq!(s.next_fire(0, after), Some(ms(2026, 7, 2, 0, 30, Tz::UTC)));
        // In winter, 01:30 UTC.
        let winter = ms(2026, 1, 10, 12, 0, paris);
        assert_eq!(
            s.next_fire(0, winter),
            Some(ms(2026, 1, 11, 1, 30, Tz::UTC))
        );
        // Every five minutes with seconds, in UTC.
        let s = Schedule::cron("0 */5 * * * *").unwrap();
        let t = ms(2026, 12, 3, 10, 2, Tz::UTC);
        assert_eq!(s.next_fire(0, t), Some(ms(2026, 12, 3, 10, 5, Tz::UTC)));
        assert!(Schedule::cron("61 * * * *").is_err());
        assert!(
            Schedule::cron("* * * * *")
                .unwrap()
                .time_zone("Mars/Olympus")
                .is_err()
        );
        assert!(
            Schedule::every(Duration::from_secs(1))
                .time_zone("UTC")
                .is_err()
        );
    }

    #[test]
    fn stored_definitions_read_back() {
        let s = Schedule::cron("0 9 * * MON-FRI")
            .unwrap()
            .time_zone("America/New_York")
            .unwrap();
        let record = s.record("json", b"1", 0).unwrap();
        let back = Schedule::from_wire(&record.spec, record.tz).unwrap();
        assert_eq!(back.spec.to_wire(), "cron:0 9 * * MON-FRI");
        assert_eq!(back.spec.tz_name(), "America/New_York");
        assert!(Schedule::from_wire("every:0", "UTC").is_err());
        assert!(Schedule::from_wire("hourly", "UTC").is_err());
        assert!(
            Schedule::every(Duration::from_secs(1))
                .options(JobOptions::default().delay(Duration::from_secs(1)))
                .record("json", b"1", 0)
                .is_err()
        );
    }
}
