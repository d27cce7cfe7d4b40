//! bulkhead's untrusted side: the `bulkhead-worker` executable (src/main.rs), the
//! virtio-blk device, its I/O backends, the vhost-user backend and the sandbox.
//!
//! Layout (Firecracker's split): `blk` holds the device state, request parsing and the I/O
//! engines apart from each other; `vhost` is the vhost-user backend request handler;
//! `serve` the event loop; `sandbox` confines the process before it reads its first
//! descriptor.

pub mod blk;
pub mod blk_device;
pub mod disk;
#[cfg(feature = "test-hooks")]
pub mod hooks;
pub mod inflight;
pub mod quiet;
pub mod sandbox;
pub mod serve;
pub mod socket;
pub mod vhost;
