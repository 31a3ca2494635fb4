//! The only place where Redis key and channel names are built.
//!
//! Every key of a queue carries the queue's name as a Redis Cluster hash tag
//! (`<prefix>:{<queue>}:...`), so that every script touches a single hash
//! slot and runs unchanged on a cluster.

use crate::error::Error;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "jq";

/// Key and channel names of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    queue: String,
    base: String,
}

impl QueueKeys {
    /// Builds the names for `queue` under `prefix`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] when the queue name is empty, longer than 256
    /// bytes or contains `{`, `}` or a control character, or when the
    /// prefix contains `{` or `}` (either would break the hash tag).
    pub fn new(prefix: &str, queue: &str) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        if queue.is_empty()
            || queue.len() > 256
            || queue.contains(['{', '}'])
            || queue.chars().any(char::is_control)
        {
            return Err(Error::InvalidName(format!(
                "queue name {queue:?} must be 1 to 256 bytes without '{{', '}}' or control characters"
            )));
        }
        Ok(Self {
            queue: queue.to_owned(),
            base: format!("{prefix}:{{{queue}}}"),
        })
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The glob pattern of every key of the queue, `<prefix>:{<queue>}:*`
    /// (to name them in an error).
    pub(crate) fn pattern(&self) -> String {
        format!("{}:*", self.base)
    }

    /// Queue metadata hash: mode, protocol version, creation time.
    pub fn meta(&self) -> String {
        format!("{}:meta", self.base)
    }

    /// List of pending jobs (envelopes in simple mode).
    pub fn pending(&self) -> String {
        format!("{}:pending", self.base)
    }

    /// Dead-letter list of entries that could not be run.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    /// Hash of one job (recoverable and reliable modes).
    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.base)
    }

    /// Hash of one job whose ID is given as bytes (read from Redis, where an
    /// ID written by another program may not be UTF-8).
    pub fn job_bytes(&self, id: &[u8]) -> Vec<u8> {
        let mut key = format!("{}:job:", self.base).into_bytes();
        key.extend_from_slice(id);
        key
    }

    /// Recoverable mode: one entry per waiting job, which idle workers block
    /// on (the job IDs themselves are only ever taken by a script).
    pub fn tickets(&self) -> String {
        format!("{}:tickets", self.base)
    }

    /// Sorted set of claimed jobs: job ID -> lease deadline (ms, server time).
    pub fn leases(&self) -> String {
        format!("{}:leases", self.base)
    }

    /// Counter that issues fencing tokens.
    pub fn fence(&self) -> String {
        format!("{}:fence", self.base)
    }

    /// Sorted set of dead-lettered job IDs -> time (ms).
    pub fn dead_jobs(&self) -> String {
        format!("{}:dead_jobs", self.base)
    }

    /// Reliable mode: sorted set of workers -> heartbeat deadline (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.base)
    }

    /// Reliable mode: the job IDs a worker has taken and not finished.
    pub fn inflight(&self, worker_id: &str) -> String {
        format!("{}:inflight:{worker_id}", self.base)
    }

    /// The in-flight list of a worker whose ID is given as bytes (a member
    /// of the workers set, which another program may have written).
    pub fn inflight_bytes(&self, worker_id: &[u8]) -> Vec<u8> {
        let mut key = format!("{}:inflight:", self.base).into_bytes();
        key.extend_from_slice(worker_id);
        key
    }

    /// A worker's wake list: its blocking pop waits on it too (first), and
    /// the worker pushes to it to end the pop at shutdown.
    pub fn wake(&self, worker_id: &str) -> String {
        format!("{}:wake:{worker_id}", self.base)
    }

    /// Sorted set of delayed jobs (IDs; simple mode: envelopes), scored by
    /// due time (ms, server time).
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.base)
    }

    /// Lease of the queue's timekeeper: the one worker that sleeps until the
    /// next delayed job is due and promotes it.
    pub fn timekeeper(&self) -> String {
        format!("{}:timekeeper", self.base)
    }

    /// List pushed when a delayed job becomes the earliest, so that the
    /// timekeeper (blocked on it) learns the new due time.
    pub fn clock(&self) -> String {
        format!("{}:clock", self.base)
    }

    /// Sorted set of the queue's recurring schedules (names), scored by
    /// their next fire time (ms, server time).
    pub fn schedules(&self) -> String {
        format!("{}:schedules", self.base)
    }

    /// The record of the recurring schedule `name`.
    pub fn schedule(&self, name: &str) -> String {
        format!("{}:schedule:{name}", self.base)
    }

    /// Reliable mode: the IDs of the jobs started under a concurrency limit
    /// and not finished, scored by start time (ms, server time). Recoverable
    /// mode counts its lease set instead.
    pub fn running(&self) -> String {
        format!("{}:running", self.base)
    }

    /// Sorted set of the starts (fencing tokens) within the window of the
    /// queue's rate limit, scored by start time (ms, server time).
    pub fn rate(&self) -> String {
        format!("{}:rate", self.base)
    }

    /// List (at most one entry) pushed when more jobs may start on a queue
    /// whose pause or limits held workers back: the held workers wait on it.
    pub fn gate(&self) -> String {
        format!("{}:gate", self.base)
    }

    /// The queue's lifecycle event stream (opt-in; protocol.md 8.12).
    pub fn events(&self) -> String {
        format!("{}:events", self.base)
    }

    /// The lock of unique key `key`: the ID of the job holding it
    /// (protocol.md 8.10).
    pub fn unique(&self, key: &str) -> String {
        format!("{}:unique:{key}", self.base)
    }

    /// Channel on which the worker `worker_id` is told to cancel a running
    /// job of this queue (protocol.md 8.11).
    pub fn worker_channel(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.base)
    }

    /// Channel on which job `id`'s progress is published (protocol.md 8.13).
    pub fn progress_channel(&self, id: &str) -> String {
        format!("{}:progress:{id}", self.base)
    }

    /// Guard that lets one worker at a time sweep stale leases (recoverable
    /// mode) or recover dead workers (reliable mode).
    pub fn sweep(&self) -> String {
        format!("{}:sweep", self.base)
    }

    /// Channel on which the client `client_id` receives outcomes of the jobs
    /// it submitted to this queue.
    pub fn reply_channel(&self, client_id: &str) -> String {
        format!("{}:reply:{client_id}", self.base)
    }
}

impl QueueKeys {
    /// True when `channel` is a reply channel of this queue, so a worker
    /// never publishes outside the queue's hash slot or key space.
    pub(crate) fn owns_reply_channel(&self, channel: &str) -> bool {
        channel
            .strip_prefix(&self.reply_channel(""))
            .is_some_and(|id| !id.is_empty())
    }
}

/// Checks that a key prefix cannot break hash tags.
/// Checks a job ID as the protocol requires: 1 to 256 bytes.
pub(crate) fn validate_job_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 256 {
        return Err(Error::InvalidName(format!(
            "job id {id:?} must be 1 to 256 bytes"
        )));
    }
    Ok(())
}

pub(crate) fn validate_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() || prefix.contains(['{', '}']) || prefix.chars().any(char::is_control) {
        return Err(Error::InvalidName(format!(
            "prefix {prefix:?} must be non-empty without '{{', '}}' or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_queue_hash_tag() {
        let k = QueueKeys::new("jq", "emails").unwrap();
        for key in [
            k.meta(),
            k.pending(),
            k.dead(),
            k.job("j1"),
            k.tickets(),
            k.leases(),
            k.fence(),
            k.dead_jobs(),
            k.sweep(),
            k.workers(),
            k.inflight("w1"),
            k.wake("w1"),
            k.delayed(),
            k.timekeeper(),
            k.clock(),
            k.schedules(),
            k.schedule("nightly"),
            k.reply_channel("c1"),
        ] {
            assert!(key.starts_with("jq:{emails}:"), "{key}");
        }
        assert_eq!(k.pending(), "jq:{emails}:pending");
        assert_eq!(k.job_bytes(b"j\xff"), b"jq:{emails}:job:j\xff");
        assert_eq!(k.inflight_bytes(b"w1"), k.inflight("w1").into_bytes());
        assert_eq!(k.reply_channel("abc"), "jq:{emails}:reply:abc");
        assert!(k.owns_reply_channel("jq:{emails}:reply:abc"));
        assert!(!k.owns_reply_channel("jq:{emails}:reply:"));
        assert!(!k.owns_reply_channel("jq:{other}:reply:abc"));
    }

    #[test]
    fn names_that_would_break_the_hash_tag_are_refused() {
        for bad in ["", "a{b", "a}b", "a\nb"] {
            assert!(
                matches!(QueueKeys::new("jq", bad), Err(Error::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(QueueKeys::new("j{q", "ok").is_err());
        assert!(QueueKeys::new("", "ok").is_err());
        assert!(QueueKeys::new("jq", &"x".repeat(257)).is_err());
    }
}
