//! Running the user's handler: decoding the payload, catching errors and
//! panics, encoding the result. Erased to one function type so that the
//! mode-specific code is not generic.

use std::any::Any;
use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::encoding::Encoding;
use crate::failure::FailureKind;
use crate::job::{Control, Job, JobError, RetryRule};

/// A job as the worker read it, before decoding.
pub(crate) struct Input {
    pub id: String,
    pub queue: String,
    pub mode: crate::mode::Mode,
    /// The encoding name found on the wire.
    pub enc: String,
    pub payload: Vec<u8>,
    pub attempt: u32,
    /// How long the handler may run (`None`: no limit).
    pub timeout: Option<Duration>,
    /// Recoverable and reliable modes: the attempt's cancellation and
    /// progress.
    pub control: Option<Arc<Control>>,
}

/// What became of one job.
pub(crate) enum Outcome {
    Completed(Vec<u8>),
    /// The job was cancelled while it ran (it is already finished in
    /// Redis): nothing to record.
    Cancelled,
    /// The failure, and what the handler asked for its retry (a
    /// [`JobError`]; [`RetryRule::Policy`] for every other failure).
    Failed(FailureKind, String, RetryRule),
}

impl Outcome {
    /// A failure whose retry the job's policy decides.
    pub(crate) fn failed(kind: FailureKind, message: String) -> Self {
        Outcome::Failed(kind, message, RetryRule::Policy)
    }

    /// Failures worth another attempt: the handler's own, unless it said
    /// never.
    pub(crate) fn retryable(&self) -> bool {
        matches!(
            self,
            Outcome::Failed(
                FailureKind::Handler | FailureKind::Panic | FailureKind::Timeout,
                _,
                RetryRule::Policy | RetryRule::After(_)
            )
        )
    }
}

/// The retry rule of a handler's error: its own when it is a [`JobError`],
/// or a boxed error holding one.
fn retry_rule<E: 'static>(error: &E) -> RetryRule {
    let any = error as &dyn Any;
    if let Some(e) = any.downcast_ref::<JobError>() {
        return e.retry();
    }
    if let Some(e) = any.downcast_ref::<Box<dyn std::error::Error + Send + Sync>>() {
        return e
            .downcast_ref::<JobError>()
            .map_or(RetryRule::Policy, JobError::retry);
    }
    if let Some(e) = any.downcast_ref::<Box<dyn std::error::Error + Send>>() {
        return e
            .downcast_ref::<JobError>()
            .map_or(RetryRule::Policy, JobError::retry);
    }
    RetryRule::Policy
}

type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// The handler, erased.
pub(crate) type Erased = Arc<dyn Fn(Input) -> BoxFuture + Send + Sync>;

/// Wraps a typed handler: decode `P`, run, catch panics, encode `R`, check
/// its size against `max_result`.
pub(crate) fn erase<P, R, E, F, Fut>(handler: F, max_result: usize) -> Erased
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    E: Display + Send + 'static,
    F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |input: Input| {
        let handler = handler.clone();
        Box::pin(async move {
            let Some(enc) = Encoding::parse(&input.enc) else {
                return Outcome::failed(
                    FailureKind::Decode,
                    format!("unknown encoding {:?}", input.enc),
                );
            };
            let payload = match enc.decode::<P>(&input.payload, "payload") {
                Ok(p) => p,
                Err(e) => return Outcome::failed(FailureKind::Decode, e.to_string()),
            };
            let job = Job {
                id: input.id,
                queue: input.queue,
                payload,
                encoding: enc,
                attempt: input.attempt,
                control: input.control,
            };
            match AssertUnwindSafe(handler(job)).catch_unwind().await {
                Ok(Ok(value)) => match enc.encode(&value, "result") {
                    Ok(bytes) if bytes.len() > max_result => Outcome::failed(
                        FailureKind::TooLarge,
                        format!(
                            "result of {} bytes exceeds the maximum of {max_result} bytes",
                            bytes.len()
                        ),
                    ),
                    Ok(bytes) => Outcome::Completed(bytes),
                    Err(e) => Outcome::failed(FailureKind::Encode, e.to_string()),
                },
                Ok(Err(e)) => Outcome::Failed(FailureKind::Handler, e.to_string(), retry_rule(&e)),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "handler panicked".into());
                    Outcome::failed(FailureKind::Panic, message)
                }
            }
        })
    })
}

/// Runs the handler unless `hard_stop` fires first (`None`: abandoned).
/// A handler that runs longer than the job's timeout is dropped and the
/// attempt fails with kind `timeout`. A cancelled job's handler has `grace`
/// to return (it sees [`Job::cancelled`]) before it is dropped; either way
/// the outcome is [`Outcome::Cancelled`].
pub(crate) async fn run(
    handler: &Erased,
    input: Input,
    hard_stop: &CancellationToken,
    grace: Duration,
) -> Option<Outcome> {
    let span = job_span(&input);
    let outcome = run_handler(handler, input, hard_stop, grace)
        .instrument(span.clone())
        .await;
    match &outcome {
        Some(Outcome::Completed(_)) => {
            span.record("otel.status_code", "OK");
        }
        Some(Outcome::Failed(kind, ..)) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", kind.as_str());
        }
        Some(Outcome::Cancelled) => {
            span.record("error.type", FailureKind::Cancelled.as_str());
        }
        None => {
            span.record("error.type", FailureKind::Shutdown.as_str());
        }
    }
    outcome
}

/// The span of one attempt, its field names from OpenTelemetry's messaging
/// conventions (a consumer's "process" span) and, for what they do not
/// name, `job_async_redis.*`; the status and `error.type` are recorded
/// when the attempt ends.
fn job_span(input: &Input) -> tracing::Span {
    tracing::info_span!(
        "job",
        otel.name = %format_args!("process {}", input.queue),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = "job_async_redis",
        messaging.operation.type = "process",
        messaging.destination.name = %input.queue,
        messaging.message.id = %input.id,
        job_async_redis.attempt = input.attempt,
        job_async_redis.mode = input.mode.as_str(),
    )
}

async fn run_handler(
    handler: &Erased,
    input: Input,
    hard_stop: &CancellationToken,
    grace: Duration,
) -> Option<Outcome> {
    let timeout = input.timeout;
    let cancel = input.control.as_ref().map(|c| c.cancel.clone());
    let cancelled = async {
        match &cancel {
            Some(token) => {
                token.cancelled().await;
                tokio::time::sleep(grace).await;
            }
            None => std::future::pending().await,
        }
    };
    let handled = async {
        match timeout {
            Some(limit) => tokio::time::timeout(limit, handler(input))
                .await
                .unwrap_or_else(|_| {
                    Outcome::failed(
                        FailureKind::Timeout,
                        format!("the handler ran longer than its timeout of {limit:?}"),
                    )
                }),
            None => handler(input).await,
        }
    };
    tokio::select! {
        outcome = handled => Some(if cancel.is_some_and(|c| c.is_cancelled()) {
            Outcome::Cancelled
        } else {
            outcome
        }),
        _ = cancelled => Some(Outcome::Cancelled),
        _ = hard_stop.cancelled() => None,
    }
}
