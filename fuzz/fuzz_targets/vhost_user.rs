//! The worker's vhost-user backend (the protocol handler, the ring state, the data
//! plane) fed an arbitrary byte stream as a frontend's messages, with no descriptors
//! passed (messages that need one are refused). Whatever the stream, the handler answers
//! or refuses each message; it never panics. The device is a virtio-blk device with the
//! synchronous engine over a 1 MiB memfd.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use device_workers::blk_device::BlkDevice;
use device_workers::vhost::VhostBackend;
use ipc::messages::{IoEngine, ServeMode};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::BackendReqHandler;

/// One disk for every run (a memfd; runs do not see each other's writes as inputs).
fn disk_file() -> &'static std::fs::File {
    static DISK: OnceLock<std::fs::File> = OnceLock::new();
    DISK.get_or_init(|| {
        let fd = nix::sys::memfd::memfd_create(c"fuzz-disk", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(1 << 20).unwrap();
        file
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = disk_file().try_clone() else {
        return;
    };
    let Ok(disk) = device_workers::disk::from_file(
        file,
        ipc::messages::ImageFormat::Raw,
        None,
        false,
        false,
        0,
    ) else {
        return;
    };
    let Ok(device) = BlkDevice::new(
        disk,
        2,
        b"fuzz",
        ServeMode::Normal,
        IoEngine::Sync,
        ipc::messages::RateLimit::default(),
    ) else {
        return;
    };
    let backend = Arc::new(Mutex::new(VhostBackend::new(device)));
    let (mut frontend, ours) = UnixStream::pair().unwrap();
    let mut handler = BackendReqHandler::from_stream(ours, backend);
    // The whole stream at once, then the end: the handler reads message after message
    // until it refuses one or the stream ends. Replies pile up unread in the socket.
    frontend.set_nonblocking(true).unwrap();
    let _ = frontend.write_all(data);
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    for _ in 0..64 {
        if handler.handle_request().is_err() {
            break;
        }
    }
});
