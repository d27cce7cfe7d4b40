//! bulkhead's untrusted side: the `bulkhead-worker` executable (src/main.rs), the
//! virtio-blk device, its I/O backends, the vhost-user backend and the sandbox.
//!
//! Layout (Firecracker's split): `blk` holds the device state, request parsing and the I/O
//! engines apart from each other; `blk_device` makes it a vhost-user device; `vhost` is the
//! vhost-user backend (protocol handler, ring state, data plane); `inflight` the inflight
//! region a successor recovers from; `serve` the event loop; `sandbox` confines the process
//! before it reads its first descriptor. Modules depend on each other one way only (no
//! import cycles): `vhost` and `inflight` know nothing of `blk`.

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
