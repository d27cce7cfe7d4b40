//! virtio-blk: configuration space and features, request parsing, execution, I/O backends.
