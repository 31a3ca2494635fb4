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
}
