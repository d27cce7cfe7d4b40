//! The VMM and a worker in two real processes: this test binary re-executes itself as the
//! worker, inheriting one end of the control channel. Covers the handshake, passing the
//! status page fd with SCM_RIGHTS, validating and mapping it in the other process, and
//! seeing the other process's heartbeat, counters and violation record through it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use ipc::messages::{VmmMessage, WorkerConfig, WorkerKind, WorkerMessage, VIRTIO_F_VERSION_1};
use ipc::{
    handshake_vmm_side, handshake_worker_side, Channel, ChannelError, StatusMapping, StatusPage,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

const CHILD_FD_VAR: &str = "IPC_TEST_CHILD_CHANNEL_FD";
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// The worker half; does nothing unless started by `vmm_and_worker_processes`.
#[test]
fn child_worker() {
    let Ok(fd) = std::env::var(CHILD_FD_VAR) else {
        return;
    };
    let fd: i32 = fd.parse().unwrap();
    // SAFETY: the parent cleared close-on-exec on exactly this fd for us and nothing else
    // in this process owns it.
    let channel = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap();
    handshake_worker_side(&channel).unwrap();

    let (msg, mut fds) = channel.recv::<VmmMessage>().unwrap();
    let VmmMessage::Configure(config) = msg else {
        panic!("expected Configure, got {msg:?}");
    };
    assert_eq!(fds.len(), 1);
    let file = File::from(fds.pop().unwrap());
    let page = StatusMapping::map(&file).unwrap();
    // The worker cannot resize the page under the VMM's mapping.
    assert!(file.set_len(0).is_err());
    assert!(file.set_len(1 << 20).is_err());

    page.set_pid(std::process::id());
    for _ in 0..10 {
        page.bump_progress();
    }
    page.add_completed(3);
    page.add_failed(1);
    channel
        .send(
            &WorkerMessage::Ready {
                disk_size_bytes: 1 << 20,
                device_features: VIRTIO_F_VERSION_1,
                num_queues: config.num_queues,
            },
            &[],
        )
        .unwrap();
    // openat(AT_FDCWD, ptr, O_RDONLY) as a SIGSYS handler would record it.
    page.record_violation(
        257,
        [-100i64 as u64, 0x5555_0000, 0, 0, 0, 0],
        AUDIT_ARCH_X86_64,
        0x7f00_1234,
    );

    let (msg, _) = channel.recv::<VmmMessage>().unwrap();
    assert_eq!(msg, VmmMessage::Shutdown);
}

#[test]
fn vmm_and_worker_processes() {
    if std::env::var(CHILD_FD_VAR).is_ok() {
        return;
    }
    let (vmm, worker_end) = Channel::pair().unwrap();
    fcntl(worker_end.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_FD_VAR, worker_end.as_raw_fd().to_string())
        .spawn()
        .unwrap();
    drop(worker_end);

    let hello = handshake_vmm_side(&vmm).unwrap();
    assert_eq!(hello.pid, child.id());

    let (file, page) = StatusPage::create("blk0-status").unwrap();
    let config = WorkerConfig {
        kind: WorkerKind::Blk,
        device_id: "blk0".into(),
        readonly: true,
        num_queues: 2,
        serial: "bulkhead-test".into(),
        direct_io: false,
        sandbox: true,
        mode: ipc::messages::ServeMode::Normal,
        engine: ipc::messages::IoEngine::Auto,
        poll_us: 0,
        uid: 65534,
        format: ipc::messages::ImageFormat::Raw,
        backing: None,
        rate_limit: Default::default(),
        image_len: 0,
        resize_to: None,
        nbd: None,
    };
    vmm.send(&VmmMessage::Configure(config), &[file.as_fd()])
        .unwrap();
    let (ready, fds) = vmm
        .recv_timeout::<WorkerMessage>(Duration::from_secs(30))
        .unwrap();
    assert!(fds.is_empty());
    assert_eq!(
        ready,
        WorkerMessage::Ready {
            disk_size_bytes: 1 << 20,
            device_features: VIRTIO_F_VERSION_1,
            num_queues: 2
        }
    );
    vmm.send(&VmmMessage::Shutdown, &[]).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "worker process failed: {status}");

    let snap = page.snapshot();
    assert_eq!(snap.worker_pid, child.id());
    assert_eq!(snap.progress, 10);
    assert_eq!((snap.completed, snap.failed), (3, 1));
    let v = snap.violation.expect("violation recorded by the worker");
    assert!(v.complete);
    assert_eq!(v.nr, 257);
    assert_eq!(v.args[0] as i64, -100);
    assert_eq!(v.arch, AUDIT_ARCH_X86_64);
    assert_eq!(v.ip, 0x7f00_1234);

    // The worker is gone: end of file, not a hang.
    assert!(matches!(
        vmm.recv_timeout::<WorkerMessage>(Duration::from_secs(5)),
        Err(ChannelError::Eof)
    ));
}
