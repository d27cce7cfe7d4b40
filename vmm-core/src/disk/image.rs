//! Opening an image for a worker: the VMM opens and locks the image and hands the worker
//! the descriptor; the worker never opens a path.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipc::messages::BackingImage;

use crate::disk::config::ImageDisk;

/// An image opened and locked for a worker (see [`ipc::image`]: the same checks and
/// QEMU-compatible locks a standalone worker uses), with the backing file its
/// configuration allows.
#[derive(Debug)]
pub struct OpenedImage {
    /// The image file, or the NBD server's export.
    pub served: Served,
    /// The file's length (an NBD export's size).
    pub size: u64,
    /// Device and inode (none for an NBD export).
    pub identity: Option<(u64, u64)>,
    /// The backing file, opened read-only and locked as a reader (so no writer, bulkhead
    /// or QEMU, can change it under the image), and how the image may name it.
    pub backing: Option<OpenedBacking>,
}

/// What a disk's workers serve.
#[derive(Debug)]
pub enum Served {
    File(File),
    /// An NBD export: each worker gets a connection of its own; the one made when the VM
    /// started goes to the first.
    Nbd {
        disk: crate::disk::nbd::NbdDisk,
        first: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
    },
}

/// The disk descriptor one worker gets.
#[derive(Debug)]
pub enum DiskFd<'a> {
    Borrowed(std::os::fd::BorrowedFd<'a>),
    Owned(std::os::fd::OwnedFd),
}

impl std::os::fd::AsFd for DiskFd<'_> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            DiskFd::Borrowed(fd) => *fd,
            DiskFd::Owned(fd) => fd.as_fd(),
        }
    }
}

impl OpenedImage {
    /// The descriptor a new worker serves in `mode`: the image file, or a connection to
    /// the NBD export: the one made when the VM started, for the first worker; after it,
    /// None where the spawner runs (it connects: see [`crate::spawner::start_worker`]),
    /// else a new one made here. A fail-mode worker never touches the disk: it gets one
    /// end of an unconnected pair instead.
    pub fn disk_fd(
        &self,
        mode: ipc::messages::ServeMode,
    ) -> Result<Option<DiskFd<'_>>, crate::disk::nbd::ConnectError> {
        use std::os::fd::AsFd;
        match &self.served {
            Served::File(file) => Ok(Some(DiskFd::Borrowed(file.as_fd()))),
            Served::Nbd { .. } if mode == ipc::messages::ServeMode::Fail => {
                let (end, _) = std::os::unix::net::UnixStream::pair().map_err(|source| {
                    crate::disk::nbd::ConnectError::Connect {
                        server: "(fail mode)".into(),
                        source,
                    }
                })?;
                Ok(Some(DiskFd::Owned(end.into())))
            }
            Served::Nbd { disk, first } => {
                let kept = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                match kept {
                    Some(fd) => Ok(Some(DiskFd::Owned(fd))),
                    None if crate::spawner::running() => Ok(None),
                    None => disk.connect().map(|fd| Some(DiskFd::Owned(fd))),
                }
            }
        }
    }

    /// The NBD export the disk is, if it is one.
    pub fn nbd_export(&self) -> Option<ipc::nbd::Export> {
        match &self.served {
            Served::File(_) => None,
            Served::Nbd { disk, .. } => Some(disk.export),
        }
    }
}

/// A backing file opened for a worker.
#[derive(Debug)]
pub struct OpenedBacking {
    pub file: File,
    pub identity: (u64, u64),
    /// What the worker is told: the path it must be named by.
    pub allowed: BackingImage,
}

/// Errors of opening an image and its backing file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Image(#[from] ipc::image::ImageError),
    #[error("cannot resolve {path}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not UTF-8; a backing file and its image need UTF-8 paths")]
    NotUtf8 { path: PathBuf },
    #[error("backing={} is the image itself", path.display())]
    OwnBacking { path: PathBuf },
    #[error(transparent)]
    Nbd(#[from] crate::disk::nbd::ConnectError),
}

/// Opens the image read-write (or read-only), O_DIRECT on request, and locks it as QEMU
/// would: a writer refuses every other user, readers share with readers. Its backing
/// file, if the configuration gives one, is opened read-only beside it.
pub fn open_image(image: &ImageDisk) -> Result<OpenedImage, OpenError> {
    if let Some(source) = &image.nbd {
        let (disk, first) = crate::disk::nbd::open(source, image.readonly)?;
        return Ok(OpenedImage {
            size: disk.export.size,
            identity: None,
            backing: None,
            served: Served::Nbd {
                disk,
                first: std::sync::Mutex::new(Some(first)),
            },
        });
    }
    let opened = ipc::image::open(
        &image.path,
        access(image.readonly),
        image.direct,
        image.format,
    )?;
    let backing = match &image.backing {
        None => None,
        Some(b) => {
            if ipc::image::check_path(&b.path)? == opened.identity {
                return Err(OpenError::OwnBacking {
                    path: b.path.clone(),
                });
            }
            let file = ipc::image::open(
                &b.path,
                ipc::image::Access::ReadOnly,
                image.direct,
                b.format,
            )?;
            // The names of the files opened (not of whatever the paths name by now).
            let dir = opened_path(&opened.file, &image.path)?
                .parent()
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
            Some(OpenedBacking {
                allowed: BackingImage {
                    format: b.format,
                    path: utf8(opened_path(&file.file, &b.path)?)?,
                    image_dir: utf8(dir)?,
                },
                file: file.file,
                identity: file.identity,
            })
        }
    };
    Ok(OpenedImage {
        served: Served::File(opened.file),
        size: opened.size,
        identity: Some(opened.identity),
        backing,
    })
}

/// The absolute, symlink-free path of the file `file` is (as the kernel names it).
fn opened_path(file: &File, path: &Path) -> Result<PathBuf, OpenError> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|source| {
        OpenError::Resolve {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn utf8(path: PathBuf) -> Result<String, OpenError> {
    path.into_os_string()
        .into_string()
        .map_err(|p| OpenError::NotUtf8 { path: p.into() })
}

fn access(readonly: bool) -> ipc::image::Access {
    if readonly {
        ipc::image::Access::ReadOnly
    } else {
        ipc::image::Access::ReadWrite
    }
}

/// A descriptor of an image that holds no lock, opened while the VMM is set up, to see
/// at the end that the workers released the image: the main thread's seccomp policy has
/// no `openat` by then.
#[derive(Debug)]
pub struct ImageProbe {
    path: PathBuf,
    file: File,
}

impl ImageProbe {
    /// Opens `path` read-only; None when it cannot be opened (nothing of ours to wait for).
    pub fn open(path: &Path) -> Option<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        Some(ImageProbe {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` until no process holds any of the image locks (what a writer
    /// would need); true when none does. A worker's io_uring keeps the image open
    /// (registered) until the kernel tears the ring down, which it does asynchronously
    /// after the worker exited, so the locks (they belong to the open file) can outlive
    /// every process that used the image by a moment.
    pub fn wait_released(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // This descriptor holds no lock, so every lock it sees is someone else's.
            if let Ok(None) = ipc::image::conflict(&self.file, ipc::image::Access::ReadWrite) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
