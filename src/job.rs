//! What a worker's handler receives.

use crate::encoding::Encoding;

/// A job handed to a worker's handler.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job<P> {
    /// Job ID, unique per queue.
    pub id: String,
    /// Name of the queue the job came from.
    pub queue: String,
    /// The decoded payload.
    pub payload: P,
    /// Encoding the client used; the result is encoded the same way.
    pub encoding: Encoding,
    /// Which attempt this is, from 1 (recoverable mode; always 1 in simple
    /// mode). Attempts after the first follow a failure with attempts left,
    /// or a stall (the previous attempt's worker died or hung).
    pub attempt: u32,
}
