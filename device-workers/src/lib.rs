//! The untrusted side: the `bulkhead-worker` executable, the virtio-blk device, I/O
//! backends and the sandbox. Filled in by the worker issue.
