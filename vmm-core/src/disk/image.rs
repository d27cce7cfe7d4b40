//! Opening an image for a worker: the VMM opens and locks the image and hands the worker
//! the descriptor; the worker never opens a path.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// An image opened and locked for a worker (see [`ipc::image`]: the same checks and
/// QEMU-compatible locks a standalone worker uses).
pub type OpenedImage = ipc::image::Image;

/// Opens `path` read-write (or read-only), O_DIRECT on request, and locks it as QEMU
/// would: a writer refuses every other user, readers share with readers.
pub fn open_image(
    path: &Path,
    readonly: bool,
    direct: bool,
) -> Result<OpenedImage, ipc::image::ImageError> {
    ipc::image::open(path, access(readonly), direct)
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
