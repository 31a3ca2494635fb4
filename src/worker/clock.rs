//! Delayed jobs: moving them onto their queue when they are due.
//!
//! Every queue has one timekeeper, a lease in Redis that `job_promote` hands
//! out (`<prefix>:{<queue>}:timekeeper`). The timekeeper sleeps, on its own
//! clock, until the queue's next delayed job is due (the script says how
//! long that is on the server's clock), then promotes every job due, in
//! batches of [`PROMOTE_LIMIT`]; the promoted jobs wake the workers blocked
//! on the queue as any submit does.
//!
//! The other workers call `job_promote` once in a while (at a random time
//! between half a lease and a lease), which moves what is due and takes the
//! role over when the timekeeper has died (its lease ran out). So idle
//! workers cost Redis a few calls per lease each, whatever the number of
//! delayed jobs, and nobody polls every few milliseconds.
//!
//! Every worker also blocks on its queues' clock lists, on a connection of
//! its own (one call for all queues on a single server, one per queue on a
//! cluster, where the keys of one call must share a slot), with a long
//! timeout: a submit or a retry that becomes a queue's earliest job pushes
//! one entry there, which wakes one worker. The timekeeper then sleeps for
//! the new due time instead; another worker takes the role if it is free,
//! or keeps that one due time in mind. A timekeeper that shuts down gives
//! the role up and pushes the clock list, so another worker takes it at
//! once.
//!
//! Recurring schedules ride on the same calls: `job_promote` also says when
//! the queue's next schedule is due, and the worker that learns that one is
//! due fires it (`schedule_fire`, which makes one job per fire however many
//! workers try).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::fetch::pause;
use super::{Backoff, Counters, Shared};
use crate::connection;
use crate::error::Error;
use crate::keys::QueueKeys;
use crate::schedule::Schedule;
use crate::transitions;

/// Most jobs one `job_promote` call moves: a batch that keeps each call
/// short (about a millisecond of Redis time).
pub(crate) const PROMOTE_LIMIT: usize = 1000;

/// How long one wait on the clock lists blocks. Rings are rare and nothing
/// depends on them for correctness (the periodic calls do), so the waits are
/// long: idle workers re-issue them about once a minute.
const CLOCK_WAIT: Duration = Duration::from_secs(60);

/// Starts the clock task. It runs until shutdown (then gives up the roles
/// it holds), or until the handle is dropped.
pub(crate) fn background(shared: &Arc<Shared>) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(run(shared.clone())))
}

/// One queue's side of the clock.
struct Timer {
    keys: Arc<QueueKeys>,
    /// When to call `job_promote` next.
    next: Instant,
    keeper: bool,
    /// The clock list was rung: the next call learns a new earliest due
    /// time, which this worker keeps in mind even if it is not the keeper.
    rung: bool,
    /// Not the keeper, but following due times since a ring, for as long as
    /// its calls find work (jobs due after the one rung for may be due
    /// before the keeper's next call).
    following: bool,
    /// Backoff after failed calls.
    backoff: Backoff,
}

async fn run(shared: Arc<Shared>) {
    let (ring, mut rung) = mpsc::unbounded_channel::<usize>();
    let start = Instant::now();
    let mut timers: Vec<Timer> = shared
        .queues
        .iter()
        .map(|keys| Timer {
            keys: keys.clone(),
            next: start,
            keeper: false,
            rung: false,
            following: false,
            backoff: Backoff::default(),
        })
        .collect();
    // The waits on the clock lists: one for every queue on a single server.
    let lists: Vec<(usize, String)> = timers
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.keys.clock()))
        .collect();
    let groups: Vec<Vec<(usize, String)>> = if shared.con.is_cluster() {
        lists.into_iter().map(|l| vec![l]).collect()
    } else {
        vec![lists]
    };
    let listeners: Vec<AbortOnDropHandle<()>> = groups
        .into_iter()
        .map(|group| {
            AbortOnDropHandle::new(tokio::spawn(listen(shared.clone(), group, ring.clone())))
        })
        .collect();
    let Some(mut soonest) = timers.iter().map(|t| t.next).min() else {
        return;
    };
    loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            Some(i) = rung.recv() => {
                timers[i].next = Instant::now();
                timers[i].rung = true;
            }
            _ = tokio::time::sleep_until(soonest) => {}
        }
        let now = Instant::now();
        for timer in &mut timers {
            if timer.next <= now {
                tick(&shared, timer).await;
            }
        }
        soonest = timers.iter().map(|t| t.next).min().unwrap_or(now);
    }
    // A worker that leaves while it follows a due time passes it on.
    for timer in timers.iter().filter(|t| t.following || t.rung) {
        let rung: redis::RedisResult<i64> = redis::cmd("LPUSH")
            .arg(timer.keys.clock())
            .arg("1")
            .query_async(&mut shared.con.clone())
            .await;
        if let Err(e) = rung {
            tracing::debug!(queue = timer.keys.queue(), error = %e, "could not pass a due time on");
        }
    }
    for timer in timers.iter_mut().filter(|t| t.keeper) {
        let released =
            transitions::job_promote(&shared.con, &timer.keys, shared.mode, &shared.id, 1, None)
                .await;
        if let Err(e) = released {
            tracing::debug!(queue = timer.keys.queue(), error = %e, "could not give up the timekeeper role; it runs out by itself");
        }
    }
    // The ring of the release may have woken this worker's own wait: it
    // pushes it back for another worker (see `listen`). Give it a moment.
    let _ = tokio::time::timeout(LISTENERS_GRACE, futures_util::future::join_all(listeners)).await;
}

/// When a due schedule could not be fired, how long until the next try.
const STUCK_RETRY: Duration = Duration::from_secs(10);

/// Most schedules fired per round and queue.
const FIRE_LIMIT: usize = 100;

/// Fires the queue's schedules that are due at `now_ms` (server time), one
/// fire each. True when every one of them moved on (or was fired by another
/// worker meanwhile).
async fn fire_due_schedules(shared: &Shared, keys: &QueueKeys, now_ms: u64) -> bool {
    let mut con = shared.con.clone();
    let due: redis::RedisResult<Vec<(Vec<u8>, f64)>> = redis::cmd("ZRANGEBYSCORE")
        .arg(keys.schedules())
        .arg("-inf")
        .arg(now_ms)
        .arg("WITHSCORES")
        .arg("LIMIT")
        .arg(0)
        .arg(FIRE_LIMIT)
        .query_async(&mut con)
        .await;
    let due = match due {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(queue = keys.queue(), error = %e, "cannot read the schedules");
            return false;
        }
    };
    let mut all = true;
    for (raw, _) in due {
        let Ok(name) = String::from_utf8(raw) else {
            tracing::error!(
                queue = keys.queue(),
                "a schedule name that is not UTF-8 cannot be fired"
            );
            all = false;
            continue;
        };
        match fire_one(shared, keys, &name, now_ms).await {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(queue = keys.queue(), schedule = %name, error = %e, "cannot fire the schedule");
                all = false;
            }
        }
    }
    all
}

/// Fires schedule `name` once: reads its definition and due time, computes
/// the fires after it, and calls `schedule_fire`.
async fn fire_one(shared: &Shared, keys: &QueueKeys, name: &str, now_ms: u64) -> Result<(), Error> {
    let key = keys.schedule(name);
    let (next_ms, spec, tz): (Option<String>, Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(&key)
        .arg("next_ms")
        .arg("spec")
        .arg("tz")
        .query_async(&mut shared.con.clone())
        .await
        .map_err(|e| crate::error::on_key(e, &key, "hash"))?;
    let Some(next_ms) = next_ms else {
        // Removed meanwhile (or never recorded): the script drops its entry.
        transitions::schedule_fire(&shared.con, keys, shared.mode, name, ("1", 2, 2)).await?;
        return Ok(());
    };
    let due = Some(next_ms.as_str())
        .filter(|v| !v.is_empty() && v.len() <= 15 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok());
    let (Some(due), Some(spec)) = (due, spec) else {
        return Err(Error::Config(format!(
            "schedule {name}: its record has no valid next_ms or spec"
        )));
    };
    let schedule =
        Schedule::from_wire(&spec, tz.as_deref().unwrap_or("UTC")).map_err(Error::Config)?;
    let next = schedule.next_fire(due, due);
    let resume = schedule.next_fire(due, now_ms.max(due));
    let (Some(next), Some(resume)) = (next, resume) else {
        return Err(Error::Config(format!(
            "schedule {name} has no fire after {due}"
        )));
    };
    // DUE goes back exactly as read: the script compares strings.
    let fire = (next_ms.as_str(), next, resume);
    match transitions::schedule_fire(&shared.con, keys, shared.mode, name, fire).await? {
        transitions::FireOutcome::Submitted(job) => {
            Counters::add(&shared.counters.scheduled, 1);
            tracing::debug!(queue = keys.queue(), schedule = name, job, "schedule fired");
        }
        transitions::FireOutcome::MovedOn | transitions::FireOutcome::Moved => {}
        transitions::FireOutcome::Early => {
            return Err(Error::Config(format!(
                "schedule {name}: its entry says it is due but its record says {due}"
            )));
        }
    }
    Ok(())
}

/// How long a worker that shuts down lets its clock waits pass on a ring
/// they took.
const LISTENERS_GRACE: Duration = Duration::from_millis(100);

/// Calls `job_promote` for one queue and decides when to call it next.
async fn tick(shared: &Shared, timer: &mut Timer) {
    let lease = shared.settings.lease;
    let promoted = transitions::job_promote(
        &shared.con,
        &timer.keys,
        shared.mode,
        &shared.id,
        PROMOTE_LIMIT,
        Some(lease),
    )
    .await;
    let now = Instant::now();
    let p = match promoted {
        Ok(p) => p,
        Err(e) => {
            let wait = timer.backoff.next();
            if e.is_transient() {
                tracing::debug!(queue = timer.keys.queue(), error = %e, "job_promote failed; retrying");
            } else {
                Counters::add(&shared.counters.queue_errors, 1);
                tracing::error!(queue = timer.keys.queue(), error = %e, "job_promote failed; retrying");
            }
            timer.next = now + wait;
            return;
        }
    };
    timer.backoff.reset();
    if p.keeper != timer.keeper {
        timer.keeper = p.keeper;
        tracing::debug!(
            queue = timer.keys.queue(),
            keeper = p.keeper,
            "timekeeper role changed"
        );
    }
    let rung = std::mem::take(&mut timer.rung);
    let found_work = p.moved > 0 || p.schedule_in.is_some_and(|d| d.is_zero());
    timer.following = !p.keeper && (rung || (timer.following && found_work));
    let mut due = p.next_in.map(|d| now + d.max(Duration::from_millis(1)));
    let mut fired = false;
    match p.schedule_in {
        Some(d) if d.is_zero() => {
            // Fire what is due, then look again at once (the fires moved
            // the schedules on; a fire caught up after an outage may be
            // followed by the next one). A schedule that cannot be fired
            // (a record another program broke) is tried again in a second.
            let all = fire_due_schedules(shared, &timer.keys, p.now_ms).await;
            let again = if all { now } else { now + STUCK_RETRY };
            fired = all;
            due = Some(due.map_or(again, |d| d.min(again)));
        }
        Some(d) => due = Some(due.map_or(now + d, |x| x.min(now + d))),
        None => {}
    }
    timer.next = if p.moved >= PROMOTE_LIMIT || fired {
        // More are due: the next batch at once (after the other queues).
        now
    } else if p.keeper {
        let renew = now + lease / 3;
        due.map_or(renew, |due| due.min(renew))
    } else {
        // Between half a lease and a lease, at random: the workers that are
        // not the timekeeper spread their calls out. A worker that heard the
        // ring keeps the new earliest due time in mind (the timekeeper may
        // sleep for a later one).
        let periodic = now + lease / 2 + lease.mul_f64(fastrand::f64() / 2.0);
        match due {
            Some(due) if timer.following => due.min(periodic),
            _ => periodic,
        }
    };
}

/// A wait on the clock lists of `lists` (queue index, key): each entry
/// popped sends that queue's index on `ring`, so that the clock task calls
/// `job_promote` at once and learns the new earliest due time.
async fn listen(
    shared: Arc<Shared>,
    lists: Vec<(usize, String)>,
    ring: mpsc::UnboundedSender<usize>,
) {
    let mut config = shared.config.clone();
    config.block_timeout = CLOCK_WAIT;
    let mut backoff = Backoff::default();
    let mut con = None;
    loop {
        let blocking = match con.as_mut() {
            Some(c) => c,
            None => match connection::blocking(&shared.client, &config).await {
                Ok(c) => con.insert(c),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the clock connection; retrying");
                    pause(&shared.shutdown, backoff.next()).await;
                    continue;
                }
            },
        };
        let popped: redis::RedisResult<Option<(String, Vec<Vec<u8>>)>> = redis::cmd("BLMPOP")
            .arg(CLOCK_WAIT.as_secs())
            .arg(lists.len())
            .arg(lists.iter().map(|(_, key)| key).collect::<Vec<_>>())
            .arg("RIGHT")
            .arg("COUNT")
            .arg(100)
            .query_async(blocking)
            .await;
        match popped {
            Ok(None) => backoff.reset(),
            Ok(Some((key, _))) if shared.shutdown.is_cancelled() => {
                // This worker is leaving: the ring is for another one.
                let pushed: redis::RedisResult<i64> = redis::cmd("LPUSH")
                    .arg(&key)
                    .arg("1")
                    .query_async(blocking)
                    .await;
                if let Err(e) = pushed {
                    tracing::debug!(error = %e, "could not pass a clock ring on");
                }
                return;
            }
            Ok(Some((key, _))) => {
                backoff.reset();
                let queue = lists.iter().find(|(_, k)| *k == key).map(|(i, _)| *i);
                if let Some(i) = queue
                    && ring.send(i).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                // A reply lost with the connection may have been a ring:
                // look at the delayed sets again to be sure. (A clock list
                // of another type is refused by job_promote, which reports
                // it; the wait rests meanwhile.)
                tracing::debug!(error = %e, "clock wait failed; retrying");
                con = None;
                for (i, _) in &lists {
                    if ring.send(*i).is_err() {
                        return;
                    }
                }
                pause(
                    &shared.shutdown,
                    backoff.next().max(Duration::from_millis(500)),
                )
                .await;
            }
        }
    }
}
