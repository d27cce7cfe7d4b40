//! The vhost-user backend, in four parts that depend on each other one way only:
//!
//! - [`device`]: what the backend needs from a device ([`VhostDevice`]) and what a device
//!   answers for a pass over a queue ([`QueueOutcome`], [`QueueError`], [`Reaped`]);
//! - [`ring`]: one ring and its [`RingState`], with the transitions the protocol and the
//!   data plane make;
//! - [`data_plane`]: kicks, completions and polling: drains rings through the device,
//!   recovers a predecessor's requests, signals the guest, counts;
//! - [`handler`]: the vhost-user protocol, each frontend message checked, setting up the
//!   data plane.
//!
//! `handler` uses `data_plane`, both use `ring` and `device`; nothing here uses this
//! module's re-exports, which are for the event loop and the executable.

pub mod data_plane;
pub mod device;
pub mod handler;
pub mod ring;

pub use data_plane::{DataPlane, KickChanges, Totals};
pub use device::{QueueError, QueueOutcome, Reaped, VhostDevice};
pub use handler::VhostBackend;
pub use ring::MAX_QUEUE_SIZE;
