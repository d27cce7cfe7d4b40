//! The virtio-blk configuration space and feature bits (virtio v1.2, 5.2.3 and 5.2.4).
//!
//! The worker builds the config space once from the disk it serves; the VMM fetches it with
//! `GET_CONFIG` when the worker is spawned and caches it, so guest reads never reach us. Our
//! config never changes at run time (no resize), so there is no config-change path here.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::ByteValued;

/// Size of a virtio-blk sector: the unit of `capacity` and of every request's `sector` field,
/// whatever the logical block size of the disk.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Errors building or reading the config space.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The block size is not one we advertise.
    #[error("block size {0} is not supported (512 or 4096)")]
    BlockSize(u32),
    /// The disk size is not a multiple of the block size.
    #[error("disk size {size} is not a multiple of the block size {blk_size}")]
    UnalignedSize {
        /// Disk size in bytes.
        size: u64,
        /// Block size in bytes.
        blk_size: u32,
    },
    /// A queue count of zero, or more than virtio-blk's 16-bit field holds.
    #[error("queue count {0} is out of range (1..=65535)")]
    NumQueues(usize),
    /// `seg_max` of zero: the guest could not send any data.
    #[error("seg_max {0} is out of range (must be at least 1)")]
    SegMax(u32),
    /// A `GET_CONFIG` read outside the config space (or with an overflowing range).
    #[error("config read at offset {offset} length {len} is outside the {size}-byte config space")]
    ReadOutOfRange {
        /// Requested offset.
        offset: u32,
        /// Requested length.
        len: u32,
        /// Size of the config space.
        size: usize,
    },
}

/// `struct virtio_blk_config` of virtio v1.2 up to and including the write-zeroes fields
/// (60 bytes). Every multi-byte field is stored little-endian (see [`BlkConfig::new`]).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (not offered: `VIRTIO_BLK_F_SIZE_MAX` is off).
    pub size_max: u32,
    /// Maximum number of data segments in a request.
    pub seg_max: u32,
    /// Geometry: cylinders (not offered).
    pub cylinders: u16,
    /// Geometry: heads (not offered).
    pub heads: u8,
    /// Geometry: sectors (not offered).
    pub sectors: u8,
    /// Logical block size of the disk.
    pub blk_size: u32,
    /// Topology: log2 of physical blocks per logical block (not offered).
    pub physical_block_exp: u8,
    /// Topology: alignment offset (not offered).
    pub alignment_offset: u8,
    /// Topology: minimum I/O size (not offered).
    pub min_io_size: u16,
    /// Topology: optimal I/O size (not offered).
    pub opt_io_size: u32,
    /// Writeback mode (`VIRTIO_BLK_F_CONFIG_WCE`, not offered).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments in one request.
    pub max_discard_seg: u32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments in one request.
    pub max_write_zeroes_seg: u32,
    /// Whether a write-zeroes request with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: `VirtioBlkConfig` is `repr(C, packed)` and consists only of integers and an integer
// array, so it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

const _: () = assert!(std::mem::size_of::<VirtioBlkConfig>() == 60);

/// Default per-segment limit for discard: 2 GiB - 512 bytes.
pub const DEFAULT_MAX_DWZ_SECTORS: u32 = (1 << 22) - 1;
/// Per-segment limit for write-zeroes: 64 MiB. Where the file system cannot zero a range
/// (tmpfs) the worker writes the zeroes, and one request must not keep it busy for long
/// (its supervisor would take a worker that makes no progress for a second as hung).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;

/// Device limits that go into the config space and that request parsing enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkLimits {
    /// Maximum data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Maximum sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with UNMAP may deallocate (advertised as `write_zeroes_may_unmap`).
    pub write_zeroes_may_unmap: bool,
}

impl Default for BlkLimits {
    /// Limits that suit a file-backed disk and Linux's virtio_blk driver: 126 data segments
    /// (a 128-entry queue minus header and status), 2 GiB - 512 per discard segment, 64 MiB
    /// per write-zeroes segment, and a single segment per discard / write-zeroes request.
    fn default() -> Self {
        Self {
            seg_max: 126,
            max_discard_sectors: DEFAULT_MAX_DWZ_SECTORS,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
        }
    }
}

/// The config space of one disk, with the values it was built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    raw: VirtioBlkConfig,
}

impl BlkConfig {
    /// Builds the config space of a disk of `disk_size` bytes.
    ///
    /// `blk_size` is the logical block size we advertise: 512, or 4096 when the disk is
    /// opened with O_DIRECT and the file's logical block size needs it (the caller finds out).
    pub fn new(
        disk_size: u64,
        blk_size: u32,
        num_queues: usize,
        limits: &BlkLimits,
    ) -> Result<Self, ConfigError> {
        if blk_size != 512 && blk_size != 4096 {
            return Err(ConfigError::BlockSize(blk_size));
        }
        if disk_size % u64::from(blk_size) != 0 {
            return Err(ConfigError::UnalignedSize {
                size: disk_size,
                blk_size,
            });
        }
        let num_queues_u16 = u16::try_from(num_queues)
            .ok()
            .filter(|n| *n > 0)
            .ok_or(ConfigError::NumQueues(num_queues))?;
        if limits.seg_max == 0 {
            return Err(ConfigError::SegMax(limits.seg_max));
        }
        let raw = VirtioBlkConfig {
            capacity: (disk_size >> SECTOR_SHIFT).to_le(),
            seg_max: limits.seg_max.to_le(),
            blk_size: blk_size.to_le(),
            num_queues: num_queues_u16.to_le(),
            max_discard_sectors: limits.max_discard_sectors.to_le(),
            max_discard_seg: limits.max_discard_seg.to_le(),
            discard_sector_alignment: limits.discard_sector_alignment.to_le(),
            max_write_zeroes_sectors: limits.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: limits.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: u8::from(limits.write_zeroes_may_unmap),
            ..VirtioBlkConfig::default()
        };
        Ok(Self { raw })
    }

    /// The raw config structure (little-endian fields).
    pub fn raw(&self) -> &VirtioBlkConfig {
        &self.raw
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        u64::from_le(self.raw.capacity)
    }

    /// The config space as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.raw.as_slice()
    }

    /// The bytes a `GET_CONFIG` read of `len` bytes at `offset` returns. The range must lie
    /// inside the config space; the front end (our VMM or QEMU) asks for whole fields.
    pub fn read(&self, offset: u32, len: u32) -> Result<&[u8], ConfigError> {
        let bytes = self.as_bytes();
        let err = ConfigError::ReadOutOfRange {
            offset,
            len,
            size: bytes.len(),
        };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| err.clone())?)
            .ok_or_else(|| err.clone())?;
        bytes.get(start..end).ok_or(err)
    }
}

/// The virtio-blk device features we offer: VERSION_1, SEG_MAX, BLK_SIZE, FLUSH, DISCARD,
/// WRITE_ZEROES, RING_EVENT_IDX, plus MQ when there is more than one queue and RO for a
/// read-only disk. (The vhost-user protocol feature bit is the front end's business.)
pub fn device_features(readonly: bool, num_queues: usize) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_DISCARD)
        | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX);
    if num_queues > 1 {
        features |= 1u64 << VIRTIO_BLK_F_MQ;
    }
    if readonly {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let limits = BlkLimits {
            seg_max: 0x11,
            max_discard_sectors: 0x22,
            max_discard_seg: 0x33,
            discard_sector_alignment: 0x44,
            max_write_zeroes_sectors: 0x55,
            max_write_zeroes_seg: 0x66,
            write_zeroes_may_unmap: true,
        };
        let cfg = BlkConfig::new(1 << 20, 4096, 3, &limits).unwrap();
        let b = cfg.as_bytes();
        assert_eq!(b.len(), 60);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0x11);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 0x22);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 0x33);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 0x44);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 0x55);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 0x66);
        assert_eq!(b[56], 1);
        assert_eq!(cfg.capacity(), 2048);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        let l = BlkLimits::default();
        assert_eq!(
            BlkConfig::new(4096, 1024, 1, &l),
            Err(ConfigError::BlockSize(1024))
        );
        assert!(matches!(
            BlkConfig::new(4096 + 512, 4096, 1, &l),
            Err(ConfigError::UnalignedSize { .. })
        ));
        assert_eq!(
            BlkConfig::new(4096, 512, 0, &l),
            Err(ConfigError::NumQueues(0))
        );
        assert_eq!(
            BlkConfig::new(4096, 512, 70000, &l),
            Err(ConfigError::NumQueues(70000))
        );
    }

    #[test]
    fn reads_are_bounds_checked() {
        let cfg = BlkConfig::new(1 << 20, 512, 1, &BlkLimits::default()).unwrap();
        assert_eq!(cfg.read(0, 8).unwrap(), &2048u64.to_le_bytes());
        assert_eq!(cfg.read(56, 4).unwrap().len(), 4);
        assert_eq!(cfg.read(60, 0).unwrap().len(), 0);
        assert!(cfg.read(57, 4).is_err());
        assert!(cfg.read(61, 0).is_err());
        assert!(cfg.read(u32::MAX, u32::MAX).is_err());
        assert!(cfg.read(8, u32::MAX).is_err());
    }

    #[test]
    fn features() {
        let f = device_features(false, 1);
        for bit in [32, 2, 6, 9, 13, 14, 29] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let f = device_features(true, 2);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
