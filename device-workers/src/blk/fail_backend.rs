//! The backend of a worker in fail mode: the disk's workers kept crashing, so the VMM
//! started one that completes every request, pending or new, with `IOERR` (errors, never a
//! hang) until the guest resets the device. It holds no disk descriptor at all: whatever
//! made its predecessors crash cannot reach the image through it.

use vm_memory::VolatileSlice;

use super::backend::{BackendError, BlockIo};

/// Fails every operation; reports the size the device was configured with.
#[derive(Debug, Clone, Copy)]
pub struct FailBackend {
    size: u64,
}

impl FailBackend {
    /// A backend for a disk of `size` bytes that fails everything.
    pub fn new(size: u64) -> Self {
        FailBackend { size }
    }
}

impl BlockIo for FailBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored_at(&mut self, _: &[VolatileSlice<'_>], _: u64) -> Result<(), BackendError> {
        Err(BackendError::FailMode)
    }

    fn write_vectored_at(&mut self, _: &[VolatileSlice<'_>], _: u64) -> Result<(), BackendError> {
        Err(BackendError::FailMode)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        Err(BackendError::FailMode)
    }

    fn discard(&mut self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::FailMode)
    }

    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Err(BackendError::FailMode)
    }
}
