#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acl;
pub mod admin;
mod backoff;
mod cancel;
mod client;
mod config;
mod connection;
mod control;
mod encoding;
mod error;
mod events;
mod failure;
mod handle;
mod job;
pub mod keys;
mod mode;
mod progress;
mod replies;
mod schedule;
pub mod scripts;
mod status;
mod transitions;
mod unique;
mod wire;
mod worker;

#[allow(deprecated)]
pub use acl::acl_rules;
pub use acl::{AclProfile, AclRole};
pub use backoff::Backoff;
pub use cancel::CancelOutcome;
pub use client::{Client, JobOptions, Queue};
pub use config::Config;
pub use control::{QueueControls, RateLimit};
pub use encoding::Encoding;
pub use error::Error;
pub use events::Event;
pub use failure::FailureKind;
pub use handle::JobHandle;
pub use job::{Job, JobError, RetryRule};
pub use mode::{Mode, PROTOCOL_VERSION};
pub use schedule::{DEFAULT_GRACE, Missed, Schedule, ScheduleInfo};
pub use status::{JobState, JobStatus};
pub use unique::Unique;
pub use worker::{ShutdownHandle, Worker, WorkerBuilder, WorkerStats};

/// The redis crate this library is built on, re-exported so that users get
/// the matching version.
pub use redis;
pub use scripts::load_scripts;
