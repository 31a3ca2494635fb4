//! Why a job failed, as recorded on the wire.

use std::fmt;

/// The reason a job failed. On the wire it is the lower-case string given
/// for each variant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// `handler`: the handler returned an error.
    Handler,
    /// `panic`: the handler panicked.
    Panic,
    /// `decode`: the worker could not decode the job's payload, or the job
    /// envelope was malformed.
    Decode,
    /// `encode`: the worker could not encode the handler's result.
    Encode,
    /// `too_large`: the result exceeded the worker's maximum size.
    TooLarge,
    /// `shutdown`: the worker shut down and its grace period ran out before
    /// the job finished.
    Shutdown,
    /// `timeout`: the handler ran longer than the job's timeout
    /// ([`crate::JobOptions::timeout`], else the worker's default) and was
    /// abandoned; retried like `handler` while attempts are left.
    Timeout,
    /// `stalled`: the job's worker died or hung more often than allowed
    /// (recoverable and reliable modes); the job is in the dead-letter set.
    Stalled,
    /// `cancelled`: the job was cancelled ([`crate::Queue::cancel`]) before
    /// it could finish; never retried. Awaiting it gives
    /// [`crate::Error::Cancelled`].
    Cancelled,
    /// Any other string, from a newer version or another implementation.
    Other(String),
}

impl FailureKind {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            FailureKind::Handler => "handler",
            FailureKind::Panic => "panic",
            FailureKind::Decode => "decode",
            FailureKind::Encode => "encode",
            FailureKind::TooLarge => "too_large",
            FailureKind::Shutdown => "shutdown",
            FailureKind::Stalled => "stalled",
            FailureKind::Timeout => "timeout",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Other(s) => s,
        }
    }

    /// Parses a wire string; unknown strings become [`FailureKind::Other`],
    /// and a missing (empty) kind becomes `Other("unknown")`.
    pub fn parse(s: &str) -> Self {
        match s {
            "" => FailureKind::Other("unknown".to_owned()),
            "handler" => FailureKind::Handler,
            "panic" => FailureKind::Panic,
            "decode" => FailureKind::Decode,
            "encode" => FailureKind::Encode,
            "too_large" => FailureKind::TooLarge,
            "shutdown" => FailureKind::Shutdown,
            "stalled" => FailureKind::Stalled,
            "timeout" => FailureKind::Timeout,
            "cancelled" => FailureKind::Cancelled,
            other => FailureKind::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_round_trip() {
        for k in [
            FailureKind::Handler,
            FailureKind::Panic,
            FailureKind::Decode,
            FailureKind::Encode,
            FailureKind::TooLarge,
            FailureKind::Shutdown,
            FailureKind::Stalled,
            FailureKind::Timeout,
            FailureKind::Other("custom".into()),
        ] {
            assert_eq!(FailureKind::parse(k.as_str()), k);
        }
    }
}
