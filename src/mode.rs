//! Operational modes and the protocol version.

use std::fmt;

/// The wire protocol version this library speaks. It is recorded in every
/// queue's metadata; clients and workers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// How a queue carries its jobs. Every client and worker of a queue must
/// use the same mode; the first one to use a queue records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// `simple`: the whole job is pushed on a list, a worker pops it, and the
    /// outcome goes back by pub/sub. Fastest. A job is lost if its worker dies
    /// while running it, and an outcome is lost if its client is not
    /// subscribed when it is published.
    Simple,
    /// `recoverable`: lists carry job IDs; each job's data, state and outcome
    /// live in a hash. Claims carry a lease and a fencing token; a job whose
    /// worker died is put back when its lease runs out; outcomes wait in
    /// Redis for a client that was away (until the result TTL).
    Recoverable,
    /// `reliable`: like recoverable, but each worker atomically moves the job
    /// IDs it takes into its own in-flight list (BLMOVE), and its heartbeat
    /// is the lease of all of them. When a worker dies, recovery puts its
    /// whole in-flight list back on the queue, including IDs it took but
    /// never started. One queue per worker (BLMOVE has one source).
    Reliable,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Recoverable => "recoverable",
            Mode::Reliable => "reliable",
        }
    }

    /// Parses a wire name (`simple`, `recoverable`, `reliable`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "simple" => Some(Mode::Simple),
            "recoverable" => Some(Mode::Recoverable),
            "reliable" => Some(Mode::Reliable),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
