//! The interface between request execution and whatever stores the disk's bytes.
//!
//! A backend never opens files (the worker never opens a path after sandboxing): it is handed
//! an open fd. Offsets and lengths reaching a backend have already been checked against the
//! capacity by request parsing; backends check them again against their own size, so a bug
//! above cannot turn into an access outside the disk.

use vm_memory::VolatileSlice;

/// Errors from a disk backend. These are host-side failures (or a disk that shrank under us);
/// the device completes the request with `IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An access outside the disk.
    #[error("access of {len} bytes at offset {offset} is outside the disk of {size} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Disk size in bytes.
        size: u64,
    },
    /// A read failed.
    #[error("reading {len} bytes at offset {offset} failed")]
    Read {
        /// Byte offset of the failed call.
        offset: u64,
        /// Bytes still to read.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A read hit the end of the file before the buffers were full.
    #[error("end of file at offset {offset} with {remaining} bytes still to read")]
    UnexpectedEof {
        /// Byte offset where the file ended.
        offset: u64,
        /// Bytes still to read.
        remaining: u64,
    },
    /// A write failed.
    #[error("writing {len} bytes at offset {offset} failed")]
    Write {
        /// Byte offset of the failed call.
        offset: u64,
        /// Bytes still to write.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write made no progress.
    #[error("write at offset {offset} wrote nothing with {remaining} bytes still to write")]
    WriteZero {
        /// Byte offset.
        offset: u64,
        /// Bytes still to write.
        remaining: u64,
    },
    /// fdatasync failed.
    #[error("flushing the disk failed")]
    Flush(#[source] std::io::Error),
    /// Discarding a range failed.
    #[error("discarding {len} bytes at offset {offset} failed")]
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Zeroing a range failed.
    #[error("zeroing {len} bytes at offset {offset} failed")]
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Setting the disk's size failed.
    #[error("resizing the disk to {size} bytes failed")]
    Resize {
        /// The size asked for.
        size: u64,
        /// The OS error (or the image format's).
        #[source]
        source: std::io::Error,
    },
    /// The worker is in fail mode (see the `fail_backend` module).
    #[error("the device is in fail mode after repeated worker crashes; reset it to recover")]
    FailMode,
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

/// Total length of a list of buffers.
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Synchronous block I/O on one disk: fixed size, vectored positional I/O into guest
/// memory, flush, discard and write-zeroes. Each call returns when its operation is
/// complete. (Not the VMM's `DiskBackend`, which says what a `--disk` is backed by.)
pub trait BlockIo: std::fmt::Debug {
    /// Size of the disk in bytes (changed only by [`BlockIo::resize`]).
    fn size(&self) -> u64;

    /// Sets the disk's size to `size` bytes (a resize the operator asked for, done before
    /// the worker serves). A backend that cannot resize refuses.
    fn resize(&mut self, size: u64) -> Result<(), BackendError> {
        Err(BackendError::Resize {
            size,
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        })
    }

    /// Fills `bufs`, in order, with the disk's bytes starting at `offset`. Either every byte
    /// is read or an error is returned (a short read is retried, end of file is an error).
    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError>;

    /// Writes `bufs`, in order, to the disk starting at `offset`. Either every byte is written
    /// or an error is returned.
    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BackendError>;

    /// Hints that `[offset, offset + len)` is no longer used. Its content afterwards is
    /// unspecified; a backend that cannot deallocate may do nothing.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// Makes `[offset, offset + len)` read back as zeroes; with `unmap` the backend may
    /// deallocate the range.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError>;
}

/// An in-memory disk, for logic tests (and fault injection: `fail` makes every call fail).
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct MemBackend {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Fail every operation with an I/O error.
    pub fail: bool,
    /// Number of flushes.
    pub flushes: usize,
}

#[cfg(test)]
impl MemBackend {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            data: vec![0; size],
            fail: false,
            flushes: 0,
        }
    }

    fn injected() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EIO)
    }
}

#[cfg(test)]
impl BlockIo for MemBackend {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let len = total_len(bufs);
        if self.fail {
            return Err(BackendError::Read {
                offset,
                len,
                source: Self::injected(),
            });
        }
        check_range(offset, len, self.size())?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_from(&self.data[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let len = total_len(bufs);
        if self.fail {
            return Err(BackendError::Write {
                offset,
                len,
                source: Self::injected(),
            });
        }
        check_range(offset, len, self.size())?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_to(&mut self.data[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        if self.fail {
            return Err(BackendError::Flush(Self::injected()));
        }
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        if self.fail {
            return Err(BackendError::WriteZeroes {
                offset,
                len,
                source: Self::injected(),
            });
        }
        check_range(offset, len, self.size())?;
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
