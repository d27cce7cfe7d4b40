//! virtio-blk: configuration space and features, request parsing, execution, I/O engines.
//!
//! Parse, execute and event glue live apart (STYLE.md point 3):
//! - [`config`]: the config space and the feature bits;
//! - [`request`]: [`Request::parse`] turns a hostile descriptor chain into a validated request;
//! - [`backend`]: the [`BlockIo`] trait (synchronous I/O on one disk); [`sync_backend`]:
//!   preadv/pwritev/fallocate on a file the worker was handed; [`nbd_backend`]: NBD's
//!   transmission phase on a socket the VMM connected; [`fail_backend`]: fails everything
//!   (fail mode);
//! - [`execute`]: runs a request against a [`BlockIo`] and guest memory, writes the status;
//! - [`engine`]: the [`RequestEngine`] trait: run a request now ([`Processed::Executed`]) or
//!   submit it ([`Processed::Submitted`]); every [`BlockIo`] is one, and so is
//!   [`uring_backend`]'s restricted io_uring, a batch per `io_uring_enter`;
//! - [`queue`]: [`process_queue`] drains a virtqueue into any engine with notifications
//!   suppressed;
//! - [`stats`]: the worker's counts and latencies of its requests, for the VMM's metrics.

pub mod backend;
pub mod config;
pub mod engine;
pub mod execute;
pub mod fail_backend;
pub mod nbd_backend;
pub mod qcow2_backend;
pub mod queue;
pub mod rate_limit;
pub mod request;
pub mod stats;
pub mod sync_backend;
pub mod uring_backend;

#[cfg(test)]
mod tests;

pub use backend::{BackendError, BlockIo};
pub use config::{device_features, BlkConfig, BlkLimits, ConfigError, VirtioBlkConfig};
pub use engine::{Processed, RequestEngine};
pub use execute::{complete_rejected, execute, Completion, ExecuteError};
pub use fail_backend::FailBackend;
pub use queue::process_queue;
pub use request::{BlkContext, ParseError, Rejected, Request, RequestKind};
pub use sync_backend::SyncBackend;
pub use uring_backend::UringEngine;
