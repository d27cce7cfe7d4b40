//! Opening an image for a worker: the VMM opens and locks the image and hands the worker
//! the descriptor; the worker never opens a path.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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

/// Waits up to `timeout` until no process holds any of the image locks on `path` (what a
/// writer would need); true when none does. A worker's io_uring keeps the image open
/// (registered) until the kernel tears the ring down, which it does asynchronously after
/// the worker exited, so the locks (they belong to the open file) can outlive every
/// process that used the image by a moment.
pub fn wait_released(path: &Path, timeout: std::time::Duration) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        // Gone or unreadable: nothing of ours to wait for.
        return true;
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // This descriptor holds no lock, so every lock it sees is someone else's.
        if let Ok(None) = ipc::image::conflict(&file, ipc::image::Access::ReadWrite) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
