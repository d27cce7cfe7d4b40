//! qcow2 images through imago, inside the sandbox.
//!
//! imago (by a QEMU block-layer maintainer) is built with its `sync` feature: plain
//! synchronous calls, no tokio and no threads, so the sandboxed worker stays one thread
//! with the same filter. A qcow2 header is hostile input: [`open`] runs after the worker's
//! seccomp filter is on, and the VMM never parses it. The image and its one allowed
//! backing file arrive as descriptors the VMM opened; nothing here opens a path, and a
//! header that names a file the configuration did not allow is refused.
//!
//! Every write ends with imago's `flush` (its metadata caches written to the file, no
//! fsync): a worker killed after it completed a write leaves the allocation on file, so
//! its successor reads what the guest wrote, as with a raw image. FLUSH adds the fsync.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Component, Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, StorageOpenOptions};
use ipc::messages::{BackingImage, ImageFormat};
use vm_memory::VolatileSlice;

use super::backend::{check_range, total_len, BackendError, BlockIo};

type Storage = imago::file::File;

/// Most refcount table entries read: imago's own limit on the table (4 MiB).
const MAX_REFTABLE_ENTRIES: u64 = (4 << 20) / 8;

/// Why a qcow2 image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("the image is not valid qcow2: {0}")]
    Invalid(#[source] io::Error),
    #[error("the backing file is not valid {format}: {source}")]
    InvalidBacking {
        format: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the image names the backing file {named:?}, which the configuration did not allow \
         (give it as backing=PATH)"
    )]
    BackingNotAllowed { named: String },
    #[error(
        "the image names the backing file {named:?} ({resolved}), but the configuration \
         allows {allowed}"
    )]
    BackingMismatch {
        named: String,
        resolved: String,
        allowed: String,
    },
    #[error("backing={allowed} was given, but the image names no backing file")]
    NoBacking { allowed: String },
    #[error("the image names backing format {named:?}, but the configuration says {configured}")]
    BackingFormat {
        named: String,
        configured: &'static str,
    },
    #[error(
        "the backing file {path} names a backing file of its own ({named:?}); bulkhead \
         allows one backing file per image"
    )]
    ChainTooLong { path: String, named: String },
    #[error("the image needs an external data file, which bulkhead does not serve")]
    ExternalDataFile,
    #[error(
        "the header said {peeked} bytes before the sandbox and {parsed} after: the image changed"
    )]
    SizeChanged { peeked: u64, parsed: u64 },
    #[error("the image's virtual size is {size} bytes, not a multiple of 512")]
    BadSize { size: u64 },
    #[error(
        "its {table} ({offset:#x}, {len} bytes) lies outside the file of {file_len} bytes: \
         the image is truncated or corrupt"
    )]
    TableOutside {
        table: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error(
        "its refcount table has no refcount block at index {first}, though the file needs \
         {needed}: the image is truncated or corrupt"
    )]
    RefcountsMissing { first: u64, needed: u64 },
    #[error(
        "the file is {file_len} bytes, which would need {needed} refcount blocks, more than \
         a qcow2 refcount table may have"
    )]
    FileTooLong { file_len: u64, needed: u64 },
}

/// A qcow2 image served through imago.
pub struct Qcow2Backend {
    image: FormatAccess<Storage>,
    size: u64,
    /// The length of the backing file below, if any: a grown range over it must be
    /// zeroed, not left to show the backing file's bytes.
    backing_len: Option<u64>,
}

impl std::fmt::Debug for Qcow2Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Backend")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The image and its backing file as imago storage, made before the sandbox (imago asks
/// the files' sizes and the filesystem's block size: calls the filter need not allow),
/// parsed by [`open`] after it. Nothing in the files has been read yet.
pub struct Qcow2Files {
    image: Storage,
    writable: bool,
    backing: Option<(Storage, BackingImage)>,
    fds: Vec<RawFd>,
}

impl std::fmt::Debug for Qcow2Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Files")
            .field("writable", &self.writable)
            .field("backing", &self.backing.as_ref().map(|(_, b)| b))
            .field("fds", &self.fds)
            .finish_non_exhaustive()
    }
}

impl Qcow2Files {
    /// Wraps the image and its backing file (read-only) for imago.
    pub fn new(
        image: File,
        writable: bool,
        direct: bool,
        backing: Option<(File, BackingImage)>,
    ) -> io::Result<Self> {
        let mut fds = vec![image.as_raw_fd()];
        fds.extend(backing.as_ref().map(|(f, _)| f.as_raw_fd()));
        let storage = |file, writable| {
            Storage::from_open_file(
                file,
                StorageOpenOptions::new().write(writable).direct(direct),
            )
        };
        Ok(Qcow2Files {
            image: storage(image, writable)?,
            writable,
            backing: backing
                .map(|(file, allowed)| Ok::<_, io::Error>((storage(file, false)?, allowed)))
                .transpose()?,
            fds,
        })
    }

    /// The descriptors to keep through the sandbox.
    pub fn fds(&self) -> &[RawFd] {
        &self.fds
    }
}

/// Parses the image (after the seccomp filter: see the module's comment) and checks its
/// backing file against the configuration.
pub fn open(files: Qcow2Files) -> Result<Qcow2Backend, Qcow2Error> {
    let Qcow2Files {
        image,
        writable,
        backing,
        fds: _,
    } = files;
    check_tables_inside(&image)?;
    let mut qcow2 = Qcow2::<Storage>::open_image(image, writable).map_err(Qcow2Error::Invalid)?;
    if qcow2.requires_external_data_file() {
        return Err(Qcow2Error::ExternalDataFile);
    }
    qcow2.set_data_file(None);
    let named = qcow2.implicit_backing_file().cloned();
    let named_format = qcow2.implicit_backing_format().cloned();
    let backing = match (named, backing) {
        (None, None) => None,
        (Some(named), None) => return Err(Qcow2Error::BackingNotAllowed { named }),
        (None, Some((_, allowed))) => {
            return Err(Qcow2Error::NoBacking {
                allowed: allowed.path,
            })
        }
        (Some(named), Some((file, allowed))) => {
            let resolved = resolve(&named, Path::new(&allowed.image_dir));
            if resolved != normalize(Path::new(&allowed.path)) {
                return Err(Qcow2Error::BackingMismatch {
                    named,
                    resolved: resolved.display().to_string(),
                    allowed: allowed.path,
                });
            }
            if let Some(named) = named_format {
                if named != allowed.format.name() {
                    return Err(Qcow2Error::BackingFormat {
                        named,
                        configured: allowed.format.name(),
                    });
                }
            }
            Some(open_backing(file, &allowed)?)
        }
    };
    let backing_len = backing.as_ref().map(|b| b.size());
    qcow2.set_backing(backing);
    let image = FormatAccess::new(qcow2);
    let size = image.size();
    if size % 512 != 0 {
        return Err(Qcow2Error::BadSize { size });
    }
    Ok(Qcow2Backend {
        image,
        size,
        backing_len,
    })
}

fn open_backing(
    storage: Storage,
    allowed: &BackingImage,
) -> Result<FormatAccess<Storage>, Qcow2Error> {
    let invalid = |source| Qcow2Error::InvalidBacking {
        format: allowed.format.name(),
        source,
    };
    Ok(match allowed.format {
        ImageFormat::Nbd => {
            return Err(invalid(io::Error::other(
                "an NBD export is not a file a qcow2 image can name",
            )))
        }
        ImageFormat::Raw => FormatAccess::new(Raw::open_image(storage, false).map_err(invalid)?),
        ImageFormat::Qcow2 => {
            let mut base = Qcow2::<Storage>::open_image(storage, false).map_err(invalid)?;
            if base.requires_external_data_file() {
                return Err(Qcow2Error::ExternalDataFile);
            }
            if let Some(named) = base.implicit_backing_file() {
                return Err(Qcow2Error::ChainTooLong {
                    path: allowed.path.clone(),
                    named: named.clone(),
                });
            }
            base.set_data_file(None);
            base.set_backing(None);
            FormatAccess::new(base)
        }
    })
}

/// Refuses an image whose L1 or refcount table lies past the end of the file, or whose
/// refcount table leaves part of the file without a refcount block.
///
/// imago reads a table past the end as zeros, and a refcount table of zeros calls every
/// cluster free, the header's too: the first allocation would then overwrite the header.
/// And where refcount blocks are missing inside the file, each allocation needs a new
/// refcount block, whose own allocation needs another: imago recurses once per missing
/// block, deep enough to overflow the worker's stack (found by fuzz/fuzz_targets/
/// qcow2_image.rs). An image QEMU made covers its whole file. (imago checks the tables'
/// alignment and size; QEMU would also stop a write onto metadata with its overlap check.)
fn check_tables_inside(image: &Storage) -> Result<(), Qcow2Error> {
    use imago::{Storage as _, StorageExt as _};
    let mut header = [0u8; 104];
    image
        .read(&mut header[..], 0)
        .map_err(Qcow2Error::Invalid)?;
    let file_len = image.size().map_err(Qcow2Error::Invalid)?;
    let be32 = |at: usize| {
        u64::from(u32::from_be_bytes([
            header[at],
            header[at + 1],
            header[at + 2],
            header[at + 3],
        ]))
    };
    let be64 = |at: usize| (be32(at) << 32) | be32(at + 4);
    let version = be32(4);
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        // imago refuses it, with its own words.
        return Ok(());
    }
    let cluster_size = 1u64 << cluster_bits;
    let reftable_offset = be64(48);
    let reftable_len = be32(56) << cluster_bits;
    let tables = [
        ("L1 table", be64(40), be32(36).saturating_mul(8)),
        ("refcount table", reftable_offset, reftable_len),
    ];
    for (table, offset, len) in tables {
        if len > 0 && offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(Qcow2Error::TableOutside {
                table,
                offset,
                len,
                file_len,
            });
        }
    }
    // Version 2 images have 16-bit refcounts; version 3 says (refcount_order, at 96).
    let refcount_order = if version >= 3 { be32(96) } else { 4 };
    if refcount_order > 6 {
        return Ok(()); // imago refuses it
    }
    let clusters_per_block = (cluster_size * 8) >> refcount_order;
    let file_clusters = file_len.div_ceil(cluster_size);
    let blocks_needed = file_clusters.div_ceil(clusters_per_block);
    // imago refuses a refcount table above 4 MiB; a sparse file too long for one is
    // refused here before its entries are read (they would all be allocated).
    if blocks_needed > MAX_REFTABLE_ENTRIES {
        return Err(Qcow2Error::FileTooLong {
            file_len,
            needed: blocks_needed,
        });
    }
    if blocks_needed * 8 > reftable_len {
        return Err(Qcow2Error::RefcountsMissing {
            first: reftable_len / 8,
            needed: blocks_needed,
        });
    }
    let mut entries = vec![0u8; (blocks_needed * 8) as usize];
    image
        .read(&mut entries[..], reftable_offset)
        .map_err(Qcow2Error::Invalid)?;
    for (index, entry) in entries.chunks_exact(8).enumerate() {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(entry);
        if u64::from_be_bytes(raw) & !0x1ff == 0 {
            return Err(Qcow2Error::RefcountsMissing {
                first: index as u64,
                needed: blocks_needed,
            });
        }
    }
    Ok(())
}

/// Where a backing name in an image points: relative names are taken from the image's
/// directory (as QEMU does), and the result is normalized without touching the
/// filesystem (the worker cannot, and must not, look).
pub fn resolve(named: &str, image_dir: &Path) -> PathBuf {
    let named = Path::new(named);
    if named.is_absolute() {
        normalize(named)
    } else {
        normalize(&image_dir.join(named))
    }
}

/// `path` with `.` dropped and `..` applied lexically (`/..` is `/`).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

impl Qcow2Backend {
    /// The disk's virtual size as parsed, checked against what was read before the
    /// sandbox (the size the guest was offered).
    pub fn check_size(&self, peeked: u64) -> Result<(), Qcow2Error> {
        if self.size == peeked {
            Ok(())
        } else {
            Err(Qcow2Error::SizeChanged {
                peeked,
                parsed: self.size,
            })
        }
    }

    /// Writes imago's dirty metadata to the image file (no fsync).
    fn write_back(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.image.flush().map_err(|source| BackendError::Write {
            offset,
            len,
            source,
        })
    }
}

impl BlockIo for Qcow2Backend {
    fn size(&self) -> u64 {
        self.size
    }

    /// imago's resize, in one step: the header's size is written last, so a worker killed
    /// midway leaves the image at its old size. Where a backing file lies below the grown
    /// range the range is written as zero clusters (the backing file's bytes must not show
    /// through, as QEMU zeroes them too); beyond a backing file's end, or without one,
    /// unallocated clusters read as zeros already and no table is written for them.
    fn resize(&mut self, size: u64) -> Result<(), BackendError> {
        use imago::format::PreallocateMode;
        let resize_err = |source| BackendError::Resize { size, source };
        let old = self.image.size();
        let over_backing = self.backing_len.is_some_and(|len| len > old);
        let mode = if size > old && over_backing {
            PreallocateMode::Zero
        } else {
            PreallocateMode::None
        };
        self.image.resize(size, mode).map_err(resize_err)?;
        self.image.flush().map_err(resize_err)?;
        self.image.sync().map_err(resize_err)?;
        self.size = size;
        Ok(())
    }

    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let len = total_len(bufs);
        check_range(offset, len, self.size)?;
        let (iov, _guard) = IoVectorMut::from_volatile_slice(bufs);
        self.image
            .readv(iov, offset)
            .map_err(|source| BackendError::Read {
                offset,
                len,
                source,
            })
    }

    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let len = total_len(bufs);
        check_range(offset, len, self.size)?;
        let (iov, _guard) = IoVector::from_volatile_slice(bufs);
        self.image
            .writev(iov, offset)
            .map_err(|source| BackendError::Write {
                offset,
                len,
                source,
            })?;
        self.write_back(offset, len)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.image.flush().map_err(BackendError::Flush)?;
        self.image.sync().map_err(BackendError::Flush)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        // To zeros, not "any": over a backing file, "any" lets the backing file's old
        // bytes show through again. QEMU's qcow2 marks discarded clusters zero there too,
        // and a raw disk's punched hole reads as zeros.
        self.image
            .discard_to_zero(offset, len)
            .map_err(|source| BackendError::Discard {
                offset,
                len,
                source,
            })?;
        self.write_back(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        let done = if unmap {
            self.image.discard_to_zero(offset, len)
        } else {
            self.image.write_zeroes(offset, len)
        };
        done.map_err(|source| BackendError::WriteZeroes {
            offset,
            len,
            source,
        })?;
        self.write_back(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_with(bytes: &[u8]) -> File {
        use std::io::Write;
        let fd = nix::sys::memfd::memfd_create("qcow2-test", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        let mut file = File::from(fd);
        file.write_all(bytes).unwrap();
        file
    }

    /// The qcow2_image fuzz target's find: a version 2 image with 512-byte clusters whose
    /// refcount table leaves the file's clusters without refcount blocks. Opened, its
    /// first write made imago recurse until the stack overflowed; it is refused at open.
    #[test]
    fn an_image_whose_refcount_blocks_are_missing_is_refused_at_open() {
        let bytes = include_bytes!("../../../tests/fixtures/qcow2-refcount-recursion.qcow2");
        let files = Qcow2Files::new(memfd_with(bytes), true, false, None).unwrap();
        let err = open(files).unwrap_err();
        assert!(matches!(err, Qcow2Error::RefcountsMissing { .. }), "{err}");
    }

    #[test]
    fn an_image_qemu_img_made_opens_and_serves() {
        let dir = std::env::temp_dir().join(format!("bulkhead-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("made.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("1M")
            .status()
            .expect("qemu-img is missing: apt-get install qemu-utils (the test command does)");
        assert!(made.success());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut disk = open(Qcow2Files::new(file, true, false, None).unwrap()).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        let mut buf = vec![0x5au8; 4096];
        let slice = VolatileSlice::from(&mut buf[..]);
        disk.write_vectored_at(&[slice], 8192).unwrap();
        let mut back = vec![0u8; 4096];
        let slice = VolatileSlice::from(&mut back[..]);
        disk.read_vectored_at(&[slice], 8192).unwrap();
        assert_eq!(back, buf);
        let err = disk.read_vectored_at(&[VolatileSlice::from(&mut back[..])], (1 << 20) - 512);
        assert!(matches!(err, Err(BackendError::OutOfRange { .. })));
    }

    #[test]
    fn relative_backing_names_are_taken_from_the_images_directory() {
        let dir = Path::new("/images/vm1");
        assert_eq!(resolve("base.raw", dir), Path::new("/images/vm1/base.raw"));
        assert_eq!(
            resolve("./base.raw", dir),
            Path::new("/images/vm1/base.raw")
        );
        assert_eq!(resolve("../base.raw", dir), Path::new("/images/base.raw"));
        assert_eq!(resolve("/srv/base.raw", dir), Path::new("/srv/base.raw"));
        assert_eq!(resolve("/../../etc/shadow", dir), Path::new("/etc/shadow"));
        assert_eq!(
            resolve("../../../../etc/shadow", dir),
            Path::new("/etc/shadow")
        );
        assert_eq!(resolve("a//b/./c/..", dir), Path::new("/images/vm1/a/b"));
    }
}
