//! A synchronous file backend: preadv / pwritev straight into guest memory, fdatasync,
//! fallocate for discard and write-zeroes.
//!
//! It is given an open `File` (the worker never opens a path once sandboxed). The disk size is
//! the file's size when the backend is created; the capacity advertised to the guest comes
//! from it, so in-range accesses never pass the end of the file unless someone outside the
//! sandbox truncates it, which turns into `IOERR` (never a spin: a read returning 0 is end of
//! file, a write returning 0 is an error).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

use super::backend::{check_range, total_len, BackendError, BlockIo};

/// Most iovecs per preadv/pwritev call (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Chunk used when write-zeroes has to write real zeroes.
const ZERO_CHUNK: usize = 64 * 1024;

/// A disk backed by a regular file (or a block device) through synchronous system calls.
#[derive(Debug)]
pub struct SyncBackend {
    file: File,
    size: u64,
}

impl SyncBackend {
    /// Wraps an open disk file; its current size is the disk size.
    pub fn new(file: File) -> io::Result<Self> {
        let size = file_size(&file)?;
        Ok(Self { file, size })
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off64_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate only takes integers; the fd is owned by `self.file` and open.
            let ret = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Reads what is left of `bufs` after the first `done` bytes (a short transfer's
    /// remainder), from `offset + done`. The range was checked by the caller.
    pub(crate) fn read_rest(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        mut done: u64,
    ) -> Result<(), BackendError> {
        let total = total_len(bufs);
        while done < total {
            let iov = iovecs(bufs, done);
            let pos = offset + done;
            // `check_range` proved offset + total <= size, and a file size fits off64_t.
            let off = pos as libc::off64_t;
            // SAFETY: every iovec points into a live `VolatileSlice` of guest memory (see
            // `iovecs`) that is valid for writes of `iov_len` bytes for the duration of the
            // call; `iov.len() <= IOV_MAX` fits a c_int; the fd is owned by `self.file`.
            let ret = unsafe {
                libc::preadv64(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off,
                )
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BackendError::Read {
                    offset: pos,
                    len: total - done,
                    source: err,
                });
            }
            if ret == 0 {
                return Err(BackendError::UnexpectedEof {
                    offset: pos,
                    remaining: total - done,
                });
            }
            done += ret as u64;
        }
        Ok(())
    }

    /// Writes what is left of `bufs` after the first `done` bytes, at `offset + done`. The
    /// range was checked by the caller.
    pub(crate) fn write_rest(
        &self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        mut done: u64,
    ) -> Result<(), BackendError> {
        let total = total_len(bufs);
        while done < total {
            let iov = iovecs(bufs, done);
            let pos = offset + done;
            let off = pos as libc::off64_t;
            // SAFETY: every iovec points into a live `VolatileSlice` of guest memory (see
            // `iovecs`) that is valid for reads of `iov_len` bytes for the duration of the
            // call; `iov.len() <= IOV_MAX` fits a c_int; the fd is owned by `self.file`.
            let ret = unsafe {
                libc::pwritev64(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off,
                )
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BackendError::Write {
                    offset: pos,
                    len: total - done,
                    source: err,
                });
            }
            if ret == 0 {
                return Err(BackendError::WriteZero {
                    offset: pos,
                    remaining: total - done,
                });
            }
            done += ret as u64;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` with plain writes, through `pwritev` like every
    /// other write (the policy allows no other write call). The buffer is page-aligned, so
    /// an O_DIRECT image takes it too.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut zeroes = ZeroChunk::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let bufs = [VolatileSlice::from(&mut zeroes.as_mut()[..n])];
            self.write_rest(&bufs, offset + done, 0)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// [`ZERO_CHUNK`] zero bytes, aligned to a page.
struct ZeroChunk(std::ptr::NonNull<u8>);

impl ZeroChunk {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(ZERO_CHUNK, 4096) {
        Ok(l) => l,
        Err(_) => panic!("ZERO_CHUNK and 4096 make a valid layout"),
    };

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        match std::ptr::NonNull::new(ptr) {
            Some(p) => ZeroChunk(p),
            None => std::alloc::handle_alloc_error(Self::LAYOUT),
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds ZERO_CHUNK initialised (zeroed) bytes and lives as
        // long as `self`, which this borrow is tied to.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), ZERO_CHUNK) }
    }
}

impl Drop for ZeroChunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::LAYOUT) }
    }
}

/// Size of a regular file or a block device.
fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        use std::io::Seek;
        let mut f = file;
        let size = f.seek(io::SeekFrom::End(0))?;
        f.seek(io::SeekFrom::Start(0))?;
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// Builds the iovecs for `bufs` skipping the first `skip` bytes, at most [`IOV_MAX`] of them.
pub(crate) fn iovecs(bufs: &[VolatileSlice<'_>], mut skip: u64) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(bufs.len().min(IOV_MAX));
    for b in bufs {
        let len = b.len() as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // The guard of a plain mmap'd slice only carries the pointer (vm-memory's `xen`
        // feature, which would unmap on drop, is off), so the pointer stays valid as long as
        // the slice's borrow of guest memory, which outlives the system call.
        let base = b.ptr_guard_mut().as_ptr();
        iov.push(libc::iovec {
            // `skip < len <= usize::MAX`, so the cast is lossless; `wrapping_add` keeps the
            // pointer arithmetic safe and stays inside the slice.
            iov_base: base.wrapping_add(skip as usize).cast(),
            iov_len: (len - skip) as usize,
        });
        skip = 0;
        if iov.len() == IOV_MAX {
            break;
        }
    }
    iov
}

impl BlockIo for SyncBackend {
    fn size(&self) -> u64 {
        self.size
    }

    /// ftruncate: a grown range reads as zeros (a hole), a cut one is gone.
    fn resize(&mut self, size: u64) -> Result<(), BackendError> {
        self.file
            .set_len(size)
            .map_err(|source| BackendError::Resize { size, source })?;
        self.size = size;
        Ok(())
    }

    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        check_range(offset, total_len(bufs), self.size)?;
        self.read_rest(bufs, offset, 0)
    }

    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        check_range(offset, total_len(bufs), self.size)?;
        self.write_rest(bufs, offset, 0)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.file.sync_data().map_err(BackendError::Flush)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // Discard is a hint: a file system that cannot punch holes just keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::trace!(offset, len, "discard not supported by the file system");
                Ok(())
            }
            Err(source) => Err(BackendError::Discard {
                offset,
                len,
                source,
            }),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let wrap = |source| BackendError::WriteZeroes {
            offset,
            len,
            source,
        };
        let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
        let mut result = self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len);
        if unmap && matches!(&result, Err(e) if unsupported(e)) {
            // A punched hole reads back as zeroes and frees the space, which UNMAP allows.
            result = self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            Err(e) => Err(wrap(e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temp file of `size` bytes filled with a pattern; removed from the directory at once
    /// (the open fd keeps it alive).
    pub(crate) fn temp_disk(size: usize) -> File {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bulkhead-blk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all_at(&pattern(size), 0).unwrap();
        file
    }

    /// The byte pattern temp disks start with.
    pub(crate) fn pattern(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i % 251) as u8 + 1).collect()
    }

    pub(crate) fn contents(file: &File) -> Vec<u8> {
        let size = file.metadata().unwrap().len() as usize;
        let mut buf = vec![0u8; size];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn vectored_read_and_write_cross_buffers() {
        let file = temp_disk(8192);
        let mut disk = SyncBackend::new(file).unwrap();
        assert_eq!(disk.size(), 8192);
        let mut a = [0u8; 100];
        let mut b = [0u8; 924];
        {
            let bufs = [
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ];
            disk.read_vectored_at(&bufs, 1000).unwrap();
        }
        let p = pattern(8192);
        assert_eq!(&a[..], &p[1000..1100]);
        assert_eq!(&b[..], &p[1100..2024]);

        let mut w1 = [0xaau8; 512];
        let mut w2 = [0xbbu8; 512];
        {
            let bufs = [
                VolatileSlice::from(&mut w1[..]),
                VolatileSlice::from(&mut w2[..]),
            ];
            disk.write_vectored_at(&bufs, 4096).unwrap();
        }
        disk.flush().unwrap();
        let c = contents(disk.file());
        assert!(c[4096..4608].iter().all(|&x| x == 0xaa));
        assert!(c[4608..5120].iter().all(|&x| x == 0xbb));
        assert_eq!(&c[..4096], &p[..4096]);
        assert_eq!(&c[5120..], &p[5120..]);
    }

    #[test]
    fn out_of_range_is_refused() {
        let mut disk = SyncBackend::new(temp_disk(4096)).unwrap();
        let mut a = [0u8; 512];
        let bufs = [VolatileSlice::from(&mut a[..])];
        assert!(matches!(
            disk.read_vectored_at(&bufs, 4096),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_vectored_at(&bufs, u64::MAX - 10),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(disk.discard(4000, 512).is_err());
        assert!(disk.write_zeroes(0, 8192, false).is_err());
        assert_eq!(contents(disk.file()), pattern(4096));
    }

    #[test]
    fn eof_after_truncation_is_an_error_not_a_spin() {
        let mut disk = SyncBackend::new(temp_disk(8192)).unwrap();
        disk.file().set_len(1024).unwrap();
        let mut a = [0u8; 4096];
        let bufs = [VolatileSlice::from(&mut a[..])];
        assert!(matches!(
            disk.read_vectored_at(&bufs, 0),
            Err(BackendError::UnexpectedEof {
                offset: 1024,
                remaining: 3072
            })
        ));
    }

    #[test]
    fn discard_punches_and_write_zeroes_zeroes() {
        let mut disk = SyncBackend::new(temp_disk(64 * 1024)).unwrap();
        disk.discard(8192, 8192).unwrap();
        disk.write_zeroes(32768, 4096, false).unwrap();
        disk.write_zeroes(40960 + 512, 1024, true).unwrap();
        let c = contents(disk.file());
        let p = pattern(64 * 1024);
        assert_eq!(&c[..8192], &p[..8192]);
        assert!(c[8192..16384].iter().all(|&x| x == 0));
        assert_eq!(&c[16384..32768], &p[16384..32768]);
        assert!(c[32768..36864].iter().all(|&x| x == 0));
        assert_eq!(&c[36864..41472], &p[36864..41472]);
        assert!(c[41472..42496].iter().all(|&x| x == 0));
        assert_eq!(&c[42496..], &p[42496..]);
        // Still the same size (KEEP_SIZE).
        assert_eq!(disk.file().metadata().unwrap().len(), 64 * 1024);
        // Plain zero writing works too.
        disk.write_zero_bytes(0, 65536).unwrap();
        assert!(contents(disk.file()).iter().all(|&x| x == 0));
    }
}
