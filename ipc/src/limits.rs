//! Sizes every side agrees on, in a module that imports nothing of the crate (the
//! messages, the image checks and the NBD protocol all use them).

/// Bytes per virtio-blk sector: a disk's size is a whole number of them.
pub const SECTOR_SIZE: u64 = 512;
/// Largest disk a worker serves or is resized to: 64 TiB, as QEMU's qcow2 limit.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
