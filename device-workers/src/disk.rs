//! Opening a disk image: the only path the worker (in standalone mode) ever opens, before
//! it is sandboxed. In spawned mode the VMM opens the image and passes the fd.
//!
//! The format is what the configuration says, never guessed from the content. Before the
//! sandbox only two fixed fields are read (the magic number, and for qcow2 the virtual
//! size the guest is offered); the qcow2 metadata is parsed inside the sandbox (see
//! [`crate::blk::qcow2_backend`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipc::messages::{BackingImage, ImageFormat};

use crate::blk::qcow2_backend::Qcow2Files;

pub use ipc::image::QCOW2_MAGIC;
/// Largest qcow2 virtual size served (imago's and QEMU's own limit is far above; this
/// keeps the file-size limit below off_t's range): 64 TiB.
pub const MAX_QCOW2_SIZE: u64 = ipc::limits::MAX_DISK_SIZE;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = ipc::image::SECTOR_SIZE;

/// Errors while opening an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] ipc::image::ImageError),
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "disk image {path} starts with a qcow2 header and is {size} bytes, not whole \
         sectors: it is a qcow2 image, so give format=qcow2"
    )]
    Qcow2AsRaw { path: PathBuf, size: u64 },
    #[error(
        "disk image {path} is not a qcow2 image (it does not start with the qcow2 magic); \
         for an image that holds the guest's bytes as they are, give format=raw"
    )]
    NotQcow2 { path: PathBuf },
    #[error("cannot read the header of disk image {path}")]
    Header {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} says its virtual size is {size} bytes, more than {MAX_QCOW2_SIZE}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("a backing file was passed for a {format} image; only qcow2 images have one")]
    UnexpectedBacking { format: &'static str },
    #[error("a resize to {size} bytes was asked for a read-only disk")]
    ResizeReadOnly { size: u64 },
    #[error("format nbd came without the NBD export's description")]
    NbdWithoutExport,
}

/// What serves the disk's bytes.
#[derive(Debug)]
pub enum Image {
    /// The guest's bytes, as they are.
    Raw(File),
    /// A qcow2 image, opened by imago after the sandbox.
    Qcow2(Box<Qcow2Files>),
    /// An NBD export on a socket the VMM connected and negotiated.
    Nbd(std::os::fd::OwnedFd, ipc::nbd::Export),
}

/// An open, locked image.
#[derive(Debug)]
pub struct Disk {
    pub image: Image,
    /// What the guest is offered: the file's size (raw) or the header's virtual size
    /// (qcow2).
    pub size: u64,
    pub readonly: bool,
    pub direct: bool,
    /// The size the image file may reach (the worker's RLIMIT_FSIZE).
    pub max_file_size: u64,
    /// A resize to do once confined (`size` is then already the new size).
    pub resize: Option<Resize>,
}

/// A resize the VMM asked for: done inside the sandbox, before the worker serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    /// The image's size before: what a qcow2 parse must find.
    pub from: u64,
    /// The size to set, and to offer the guest.
    pub to: u64,
}

impl Disk {
    /// The descriptors the device keeps after the sandbox.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        match &self.image {
            Image::Raw(file) => vec![file.as_raw_fd()],
            Image::Qcow2(q) => q.fds().to_vec(),
            Image::Nbd(socket, _) => vec![socket.as_raw_fd()],
        }
    }

    /// Plans a resize to `to` bytes (whole sectors, checked by the message's validation):
    /// the guest is offered `to`, and the file-size limit makes room for the growth (a
    /// qcow2 image's tables grow with it, by at most 1/16 of the growth).
    pub fn plan_resize(&mut self, to: u64) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ResizeReadOnly { size: to });
        }
        let from = self.size;
        let growth = to.saturating_sub(from);
        let tables = match self.image {
            Image::Raw(_) | Image::Nbd(..) => 0,
            Image::Qcow2(_) => growth / 16,
        };
        self.max_file_size = self
            .max_file_size
            .saturating_add(growth)
            .saturating_add(tables);
        self.size = to;
        self.resize = Some(Resize { from, to });
        Ok(())
    }

    /// The format served.
    pub fn format(&self) -> ImageFormat {
        match self.image {
            Image::Raw(_) => ImageFormat::Raw,
            Image::Qcow2(_) => ImageFormat::Qcow2,
            Image::Nbd(..) => ImageFormat::Nbd,
        }
    }
}

/// Opens `path` (O_DIRECT with `direct`) and locks it as QEMU would (see
/// [`ipc::image`]): a writer refuses every other user, readers share with readers.
pub fn open(
    path: &Path,
    format: ImageFormat,
    backing: Option<(File, BackingImage)>,
    readonly: bool,
    direct: bool,
) -> Result<Disk, DiskError> {
    let access = if readonly {
        ipc::image::Access::ReadOnly
    } else {
        ipc::image::Access::ReadWrite
    };
    let image = ipc::image::open(path, access, direct, format)?;
    from_named_file(image.file, path, format, backing, readonly, direct, None)
}

/// A disk the VMM opened (and locked) and passed as a descriptor, with the backing file it
/// allows: checked here as far as two fixed header fields allow.
pub fn from_file(
    file: File,
    format: ImageFormat,
    backing: Option<(File, BackingImage)>,
    readonly: bool,
    direct: bool,
    image_len: u64,
) -> Result<Disk, DiskError> {
    // The worker is not told the path; the VMM's error line names it.
    let path = PathBuf::from("(from the VMM)");
    from_named_file(
        file,
        &path,
        format,
        backing,
        readonly,
        direct,
        Some(image_len),
    )
}

/// A disk an NBD server serves, on the socket the VMM connected and negotiated: nothing
/// is read from it here. The worker writes no file at all (RLIMIT_FSIZE 0).
pub fn from_nbd(socket: std::os::fd::OwnedFd, export: ipc::nbd::Export, readonly: bool) -> Disk {
    Disk {
        image: Image::Nbd(socket, export),
        size: export.size,
        readonly,
        direct: false,
        max_file_size: 0,
        resize: None,
    }
}

/// `image_len`: the file's length when the VM started (None: standalone, now).
fn from_named_file(
    file: File,
    path: &Path,
    format: ImageFormat,
    backing: Option<(File, BackingImage)>,
    readonly: bool,
    direct: bool,
    image_len: Option<u64>,
) -> Result<Disk, DiskError> {
    let path = path.to_path_buf();
    let file_size = {
        use std::io::Seek;
        (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.clone(),
                source,
            })?
    };
    if file_size == 0 {
        return Err(DiskError::Empty { path });
    }
    let header = read_header(&file, &path)?;
    let qcow2_magic = header[..4] == QCOW2_MAGIC;
    match format {
        ImageFormat::Nbd => Err(DiskError::NbdWithoutExport),
        ImageFormat::Raw => {
            if backing.is_some() {
                return Err(DiskError::UnexpectedBacking { format: "raw" });
            }
            if file_size % SECTOR_SIZE != 0 {
                return Err(if qcow2_magic {
                    DiskError::Qcow2AsRaw {
                        path,
                        size: file_size,
                    }
                } else {
                    DiskError::BadSize {
                        path,
                        size: file_size,
                    }
                });
            }
            if qcow2_magic {
                warn_qcow2_magic(&path);
            }
            Ok(Disk {
                image: Image::Raw(file),
                size: file_size,
                readonly,
                direct,
                max_file_size: file_size,
                resize: None,
            })
        }
        ImageFormat::Qcow2 => {
            if !qcow2_magic {
                return Err(DiskError::NotQcow2 { path });
            }
            // The virtual size (big-endian at byte 24) is what the guest is offered; the
            // parse in the sandbox must find the same number.
            let mut size_field = [0u8; 8];
            size_field.copy_from_slice(&header[24..32]);
            let size = u64::from_be_bytes(size_field);
            if size > MAX_QCOW2_SIZE {
                return Err(DiskError::TooLarge { path, size });
            }
            if size == 0 || size % SECTOR_SIZE != 0 {
                return Err(DiskError::BadSize { path, size });
            }
            // A qcow2 file grows as clusters are allocated: by at most the virtual size
            // plus its tables (L2 entries and refcounts take at most 1/32 of it with the
            // smallest, 512-byte clusters), plus room for a refcount table's move; from
            // its length when the VM started, so restarts do not raise the bound.
            let max_file_size = if readonly {
                file_size
            } else {
                image_len
                    .unwrap_or(file_size)
                    .max(1)
                    .saturating_add(size)
                    .saturating_add(size / 16)
                    .saturating_add(256 << 20)
            };
            let files = Qcow2Files::new(file, !readonly, direct, backing).map_err(|source| {
                DiskError::Header {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(Disk {
                image: Image::Qcow2(Box::new(files)),
                size,
                readonly,
                direct,
                max_file_size,
                resize: None,
            })
        }
    }
}

/// The first bytes of the image.
fn read_header(file: &File, path: &Path) -> Result<Vec<u8>, DiskError> {
    ipc::image::read_head(file).map_err(|source| DiskError::Header {
        path: path.to_path_buf(),
        source,
    })
}

/// Said when a raw image starts with a qcow2 header. Not refused: a guest may write
/// these bytes into its own raw disk, and the format is what the configuration says,
/// never probed.
pub fn warn_qcow2_magic(path: &Path) {
    tracing::warn!(
        "disk image {} is served as raw (format=raw) but starts with a qcow2 header; if it \
         is a qcow2 image, give format=qcow2",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn tmp(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn an_inherited_descriptor_must_hold_whole_sectors() {
        let p = tmp("odd.img", 1000);
        assert!(matches!(
            from_file(
                File::open(&p).unwrap(),
                ImageFormat::Raw,
                None,
                true,
                false,
                196_616
            ),
            Err(DiskError::BadSize { size: 1000, .. })
        ));
        let p = tmp("empty.img", 0);
        assert!(matches!(
            from_file(
                File::open(&p).unwrap(),
                ImageFormat::Raw,
                None,
                true,
                false,
                196_616
            ),
            Err(DiskError::Empty { .. })
        ));
    }

    fn with_header(name: &str, len: u64, virtual_size: u64) -> PathBuf {
        let p = tmp(name, len);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&QCOW2_MAGIC, 0).unwrap();
        f.write_all_at(&virtual_size.to_be_bytes(), 24).unwrap();
        p
    }

    #[test]
    fn the_format_is_the_configurations_and_detectable_mismatches_are_refused() {
        // A qcow2 image given as raw: its size gives it away.
        let q = with_header("small.qcow2", 196_616, 1 << 30);
        let err = from_file(
            File::open(&q).unwrap(),
            ImageFormat::Raw,
            None,
            true,
            false,
            196_616,
        );
        assert!(matches!(err, Err(DiskError::Qcow2AsRaw { .. })), "{err:?}");
        assert!(err.unwrap_err().to_string().contains("format=qcow2"));
        // Whole sectors with the magic: served as raw (with a warning), never probed.
        let r = with_header("guest-wrote-a-header.img", 1 << 20, 1 << 40);
        let disk = from_file(
            File::open(&r).unwrap(),
            ImageFormat::Raw,
            None,
            true,
            false,
            196_616,
        )
        .unwrap();
        assert_eq!((disk.format(), disk.size), (ImageFormat::Raw, 1 << 20));
        // Raw bytes given as qcow2.
        let plain = tmp("plain.img", 1 << 20);
        let err = from_file(
            File::open(&plain).unwrap(),
            ImageFormat::Qcow2,
            None,
            true,
            false,
            196_616,
        )
        .unwrap_err();
        assert!(matches!(err, DiskError::NotQcow2 { .. }), "{err:?}");
        assert!(err.to_string().contains("format=raw"), "{err}");
        // qcow2: the guest is offered the header's virtual size, and the file may grow.
        let disk = from_file(
            File::open(&q).unwrap(),
            ImageFormat::Qcow2,
            None,
            false,
            false,
            196_616,
        )
        .unwrap();
        assert_eq!((disk.format(), disk.size), (ImageFormat::Qcow2, 1 << 30));
        assert!(disk.max_file_size > (1 << 30) + 196_616);
        let ro = from_file(
            File::open(&q).unwrap(),
            ImageFormat::Qcow2,
            None,
            true,
            false,
            196_616,
        )
        .unwrap();
        assert_eq!(ro.max_file_size, 196_616, "a read-only image never grows");
        let huge = with_header("huge.qcow2", 196_616, u64::MAX);
        assert!(matches!(
            from_file(
                File::open(&huge).unwrap(),
                ImageFormat::Qcow2,
                None,
                true,
                false,
                196_616
            ),
            Err(DiskError::TooLarge { .. })
        ));
    }

    /// The file-size cap counts from the image's length when the VM started, so a
    /// successor started after the file grew gets the same cap, not a higher one.
    #[test]
    fn a_qcow2_images_file_size_cap_is_from_its_length_at_vm_start() {
        let q = with_header("grown.qcow2", 4 << 20, 1 << 30);
        let cap = |image_len| {
            from_file(
                File::open(&q).unwrap(),
                ImageFormat::Qcow2,
                None,
                false,
                false,
                image_len,
            )
            .unwrap()
            .max_file_size
        };
        let want = (196_616u64 + (1 << 30) + (1 << 30) / 16) + (256 << 20);
        assert_eq!(cap(196_616), want, "not from the file's length now (4 MiB)");
    }

    /// A qcow2 disk offers at most 64 MiB per discard (imago works cluster by cluster);
    /// a raw one keeps the larger limit.
    #[test]
    fn a_qcow2_disk_offers_smaller_discards() {
        use crate::blk_device::BlkDevice;
        let q = with_header("discard.qcow2", 196_616, 1 << 30);
        let disk = |format, path: &Path| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let d = from_file(file, format, None, false, false, 196_616).unwrap();
            BlkDevice::new(
                d,
                1,
                b"",
                ipc::messages::ServeMode::Normal,
                ipc::messages::IoEngine::Sync,
                Default::default(),
            )
            .unwrap()
        };
        let max_discard = |dev: &BlkDevice| {
            use crate::vhost::VhostDevice;
            let config = dev.config();
            // virtio_blk_config: max_discard_sectors is the u32 at byte 36.
            u32::from_le_bytes(config[36..40].try_into().unwrap())
        };
        let qcow2 = disk(ImageFormat::Qcow2, &q);
        assert_eq!(
            max_discard(&qcow2),
            crate::blk::config::MAX_WRITE_ZEROES_SECTORS
        );
        let raw = tmp("discard.img", 1 << 30);
        let raw = disk(ImageFormat::Raw, &raw);
        assert!(max_discard(&raw) > crate::blk::config::MAX_WRITE_ZEROES_SECTORS);
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = open(
            Path::new("/nonexistent/x.img"),
            ImageFormat::Raw,
            None,
            false,
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
    }

    /// A planned resize offers the new size and lets the file grow by the growth (a qcow2
    /// image's tables too), never more; shrinking keeps the cap; a read-only disk refuses.
    #[test]
    fn a_planned_resize_raises_the_file_size_cap_by_the_growth() {
        let r = tmp("resize.img", 1 << 20);
        let open = |path: &Path, format, readonly| {
            from_file(
                File::open(path).unwrap(),
                format,
                None,
                readonly,
                false,
                1 << 20,
            )
            .unwrap()
        };
        let mut raw = open(&r, ImageFormat::Raw, false);
        raw.plan_resize(3 << 20).unwrap();
        assert_eq!((raw.size, raw.max_file_size), (3 << 20, 3 << 20));
        assert_eq!(
            raw.resize,
            Some(Resize {
                from: 1 << 20,
                to: 3 << 20
            })
        );
        let mut raw = open(&r, ImageFormat::Raw, false);
        raw.plan_resize(1 << 19).unwrap();
        assert_eq!((raw.size, raw.max_file_size), (1 << 19, 1 << 20));
        let q = with_header("resize.qcow2", 196_616, 1 << 30);
        let before = open(&q, ImageFormat::Qcow2, false).max_file_size;
        let mut qcow2 = open(&q, ImageFormat::Qcow2, false);
        qcow2.plan_resize(2 << 30).unwrap();
        assert_eq!(qcow2.size, 2 << 30);
        assert_eq!(qcow2.max_file_size, before + (1 << 30) + (1 << 26));
        let mut ro = open(&r, ImageFormat::Raw, true);
        assert!(matches!(
            ro.plan_resize(2 << 20),
            Err(DiskError::ResizeReadOnly { .. })
        ));
    }
}
