//! virtio-blk: configuration space and features, request parsing, execution, I/O backends.
//!
//! Parse, execute and event glue live apart (STYLE.md point 3):
//! - [`config`]: the config space and the feature bits;
//! - [`request`]: [`Request::parse`] turns a hostile descriptor chain into a validated request;
//! - [`backend`]: the [`BlockIo`] trait; [`sync_backend`]: preadv/pwritev/fallocate on a
//!   file the worker was handed; [`uring_backend`]: the same through a restricted io_uring,
//!   a batch per `io_uring_enter`; [`fail_backend`]: fails everything (fail mode);
//! - [`execute`]: runs a request against a backend and guest memory, writes the status;
//! - [`queue`]: [`process_queue`] drains a virtqueue with notifications suppressed.

pub mod backend;
pub mod config;
pub mod execute;
pub mod fail_backend;
pub mod queue;
pub mod request;
pub mod sync_backend;
pub mod uring_backend;

#[cfg(test)]
mod tests;

pub use backend::{BackendError, BlockIo};
pub use config::{device_features, BlkConfig, BlkLimits, ConfigError, VirtioBlkConfig};
pub use execute::{complete_rejected, execute, Completion, ExecuteError};
pub use fail_backend::FailBackend;
pub use queue::{process_queue, QueueError, QueueOutcome};
pub use request::{BlkContext, ParseError, Rejected, Request, RequestKind};
pub use sync_backend::SyncBackend;
pub use uring_backend::UringEngine;
