//! Retry backoff: how long a failed job waits before its next attempt.
//!
//! The policy travels with the job (its hash's `backoff` field), and the
//! scripts that record a failure compute the delay from it, so every worker,
//! in any language, waits the same time (protocol.md 8.7).

use std::time::Duration;

use crate::error::Error;
use crate::transitions::MAX_MS;

/// A retry backoff policy for [`crate::JobOptions::backoff`].
///
/// The delay before the retry that follows failed attempt `n` (from 1) is
/// - fixed: `base`;
/// - exponential: `base * 2^(n-1)`, at most `max`;
///
/// then, with a jitter `j` (0 to 1), shortened by up to `j` of itself: by
/// `floor(delay * j * h)`, `h` in `[0, 1)` taken from the SHA1 of the job's
/// ID and `n`, so that the delay is the same wherever it is computed and
/// retries of many jobs that failed together spread out.
///
/// ```
/// use std::time::Duration;
/// use job_async_redis::Backoff;
///
/// let policy = Backoff::exponential(Duration::from_secs(1)).max(Duration::from_secs(60));
/// assert_eq!(policy.delay("job-1", 1), Duration::from_secs(1));
/// assert_eq!(policy.delay("job-1", 3), Duration::from_secs(4));
/// assert_eq!(policy.delay("job-1", 30), Duration::from_secs(60));
/// let jittered = policy.jitter(0.5).delay("job-1", 3);
/// assert!(jittered > Duration::from_secs(2) && jittered <= Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    kind: Kind,
    base_ms: u64,
    max_ms: u64,
    /// Thousandths.
    jitter: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fixed,
    Exponential,
}

impl Backoff {
    /// The same delay before every retry.
    pub fn fixed(delay: Duration) -> Self {
        let ms = whole_ms(delay);
        Backoff {
            kind: Kind::Fixed,
            base_ms: ms,
            max_ms: ms,
            jitter: 0,
        }
    }

    /// `base`, doubled after each failed attempt; no cap unless [`Backoff::max`].
    pub fn exponential(base: Duration) -> Self {
        Backoff {
            kind: Kind::Exponential,
            base_ms: whole_ms(base),
            max_ms: MAX_MS as u64,
            jitter: 0,
        }
    }

    /// Caps the delay (exponential policies; a fixed policy's delay is its
    /// own cap).
    pub fn max(mut self, cap: Duration) -> Self {
        if self.kind == Kind::Exponential {
            self.max_ms = whole_ms(cap);
        }
        self
    }

    /// Shortens each delay by a pseudo-random part of up to `fraction` of it
    /// (0 to 1, in thousandths; values outside are clamped).
    pub fn jitter(mut self, fraction: f64) -> Self {
        let thousandths = (fraction.clamp(0.0, 1.0) * 1000.0).round();
        self.jitter = thousandths as u16;
        self
    }

    /// The delay before the retry that follows failed attempt `attempt` (from
    /// 1) of job `job_id`: what the scripts compute.
    pub fn delay(&self, job_id: &str, attempt: u32) -> Duration {
        let base = self.base_ms as f64;
        let max = self.max_ms as f64;
        let mut delay = match self.kind {
            Kind::Fixed => base,
            Kind::Exponential => {
                let doublings = attempt.max(1) - 1;
                if doublings >= 40 {
                    max
                } else {
                    max.min(base * 2f64.powi(doublings as i32))
                }
            }
        };
        if self.jitter > 0 {
            let digest = sha1_smol::Sha1::from(format!("{job_id}:{attempt}"))
                .digest()
                .to_string();
            let h = u32::from_str_radix(&digest[..8], 16).expect("hex digits") as f64;
            // The scripts' order of operations, in IEEE 754 doubles.
            delay -= (delay * f64::from(self.jitter) / 1000.0 * h / 4_294_967_296.0).floor();
        }
        Duration::from_millis(delay as u64)
    }

    /// The policy as stored in the job's hash:
    /// `<fixed|exponential>:<base ms>:<max ms>:<jitter thousandths>`.
    pub fn to_wire(&self) -> String {
        let kind = match self.kind {
            Kind::Fixed => "fixed",
            Kind::Exponential => "exponential",
        };
        format!("{kind}:{}:{}:{}", self.base_ms, self.max_ms, self.jitter)
    }

    /// Reads a stored policy; `None` for anything that is not one.
    pub fn from_wire(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let kind = match parts.next()? {
            "fixed" => Kind::Fixed,
            "exponential" => Kind::Exponential,
            _ => return None,
        };
        let mut number = |max: u64| {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.len() <= 15 && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .filter(|&n| n <= max)
        };
        let base_ms = number(MAX_MS as u64)?;
        let max_ms = number(MAX_MS as u64)?;
        let jitter = number(1000)? as u16;
        if parts.next().is_some() || base_ms == 0 || base_ms > max_ms {
            return None;
        }
        Some(Backoff {
            kind,
            base_ms,
            max_ms,
            jitter,
        })
    }

    /// Checks the policy against what the scripts accept.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.base_ms == 0 || self.base_ms > self.max_ms || self.max_ms > MAX_MS as u64 {
            return Err(Error::Config(format!(
                "a backoff needs 1 ms <= base <= max <= {MAX_MS} ms (got base {} ms, max {} ms)",
                self.base_ms, self.max_ms
            )));
        }
        Ok(())
    }
}

fn whole_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_their_wire_form() {
        for policy in [
            Backoff::fixed(Duration::from_millis(1500)),
            Backoff::exponential(Duration::from_secs(1))
                .max(Duration::from_secs(300))
                .jitter(0.25),
        ] {
            assert_eq!(Backoff::from_wire(&policy.to_wire()), Some(policy));
        }
        assert_eq!(
            Backoff::exponential(Duration::from_secs(2)).to_wire(),
            "exponential:2000:1000000000000:0"
        );
        for bad in [
            "",
            "linear:1:2:0",
            "fixed:0:0:0",
            "fixed:2:1:0",
            "fixed:1:1:1001",
            "fixed:1:1:0:9",
            "fixed:+1:1:0",
            "exponential:1:1e3:0",
        ] {
            assert_eq!(Backoff::from_wire(bad), None, "{bad}");
        }
    }

    #[test]
    fn exponential_delays_double_up_to_the_cap_and_jitter_only_shortens() {
        let p = Backoff::exponential(Duration::from_millis(100)).max(Duration::from_millis(1000));
        let delays: Vec<u64> = (1..=6)
            .map(|n| p.delay("j", n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay("j", 0), Duration::from_millis(100));
        assert_eq!(p.delay("j", u32::MAX), Duration::from_millis(1000));
        let jittered = p.jitter(1.0);
        let spread: std::collections::HashSet<u64> = (0..50)
            .map(|i| jittered.delay(&format!("job-{i}"), 4).as_millis() as u64)
            .inspect(|&d| assert!(d <= 800, "{d}"))
            .collect();
        assert!(spread.len() > 40, "jitter spreads the retries: {spread:?}");
        assert_eq!(jittered.delay("same", 2), jittered.delay("same", 2));
    }
}
