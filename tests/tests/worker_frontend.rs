//! A hostile or broken vhost-user frontend against the standalone worker: out-of-order
//! messages, memory tables that do not cover the rings, oversized and truncated
//! messages. Each ends the worker with a clear error and nothing written; and the seccomp
//! filter a live worker runs is exactly the one compiled from the policy file.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use tests::worker::Worker;
use tests::{scratch_dir, worker_bin, worker_hooks_bin};

const DISK_SIZE: u64 = 1 << 20;
/// Where the test pretends its guest RAM is mapped in its own address space.
const FRONTEND_VA: u64 = 0x7f00_0000_0000;
const RAM_SIZE: u64 = 1 << 20;

struct Setup {
    disk: PathBuf,
    socket: PathBuf,
    worker: Worker,
}

fn start(bin: &Path, name: &str) -> Setup {
    let dir = scratch_dir(name);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0x5a; DISK_SIZE as usize]).unwrap();
    let socket = dir.join("vhu.sock");
    let worker = Worker::start(bin, &socket, &disk, &[]);
    Setup {
        disk,
        socket,
        worker,
    }
}

impl Setup {
    fn frontend(&self) -> Frontend {
        Frontend::connect(&self.socket, 1).expect("connect to the worker")
    }

    /// Waits for the worker to end; returns its exit code and stderr.
    fn finish(self) -> (Option<i32>, String, PathBuf) {
        let (code, stderr) = self.worker.finish(Duration::from_secs(20));
        (code, stderr, self.disk)
    }
}

fn assert_refused(setup: Setup, expected: &str) {
    let (code, stderr, disk) = setup.finish();
    assert!(
        code.is_some() && code != Some(0),
        "worker must fail (exit {code:?}):\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].contains(expected),
        "error should mention {expected:?}:\n{stderr}"
    );
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
        "nothing may be written to the disk"
    );
}

fn guest_ram() -> OwnedFd {
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the fd we own.
    let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), RAM_SIZE as i64) };
    assert_eq!(ret, 0);
    fd
}

/// Hands the worker RAM_SIZE bytes of "guest RAM" at FRONTEND_VA / guest address 0; the
/// memfd must stay open while the worker may still map it.
fn share_guest_ram(frontend: &mut Frontend) -> OwnedFd {
    let ram = guest_ram();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM_SIZE,
        userspace_addr: FRONTEND_VA,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    };
    frontend.set_mem_table(&[region]).unwrap();
    ram
}

fn negotiate(frontend: &mut Frontend) {
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    // Everything but PROTOCOL_FEATURES: rings are then enabled without SET_VRING_ENABLE.
    frontend.set_features(features & !(1 << 30)).unwrap();
}

fn ring(desc: u64, avail: u64, used: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    }
}

#[test]
fn ring_addresses_before_the_memory_table() {
    let setup = start(&worker_bin(), "wfe-order");
    let mut frontend = setup.frontend();
    negotiate(&mut frontend);
    frontend.set_vring_num(0, 256).unwrap();
    let _ = frontend.set_vring_addr(
        0,
        &ring(FRONTEND_VA, FRONTEND_VA + 0x1000, FRONTEND_VA + 0x2000),
    );
    assert_refused(setup, "SET_VRING_ADDR before SET_MEM_TABLE");
}

/// A memory region whose file is shorter than the region: mapping it would work and the
/// first access would kill the worker with SIGBUS; it is refused in one line instead.
#[test]
fn memory_region_longer_than_its_file() {
    let setup = start(&worker_bin(), "wfe-short-memfd");
    let mut frontend = setup.frontend();
    negotiate(&mut frontend);
    let ram = guest_ram();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: RAM_SIZE * 2,
        userspace_addr: FRONTEND_VA,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    };
    let _ = frontend.set_mem_table(&[region]);
    assert_refused(
        setup,
        "memory region 0: its file holds 0x100000 bytes, less than offset 0x0 + size 0x200000",
    );
}

#[test]
fn rings_outside_the_memory_table() {
    let setup = start(&worker_bin(), "wfe-outside");
    let mut frontend = setup.frontend();
    negotiate(&mut frontend);
    let _ram = share_guest_ram(&mut frontend);
    frontend.set_vring_num(0, 256).unwrap();
    // The descriptor table starts inside, the used ring lies past the end of RAM.
    let _ = frontend.set_vring_addr(
        0,
        &ring(
            FRONTEND_VA,
            FRONTEND_VA + 0x1000,
            FRONTEND_VA + RAM_SIZE + 0x1000,
        ),
    );
    assert_refused(setup, "outside the memory table");
}

#[test]
fn ring_that_runs_past_the_end_of_the_memory_table() {
    let setup = start(&worker_bin(), "wfe-past");
    let mut frontend = setup.frontend();
    negotiate(&mut frontend);
    let _ram = share_guest_ram(&mut frontend);
    frontend.set_vring_num(0, 256).unwrap();
    // Starts inside RAM, but a 256-entry descriptor table (4 KiB) does not fit.
    let desc = FRONTEND_VA + RAM_SIZE - 0x100;
    let _ = frontend.set_vring_addr(0, &ring(desc, FRONTEND_VA + 0x1000, FRONTEND_VA + 0x2000));
    assert_refused(setup, "not covered by the memory table");
}

/// A raw vhost-user header: request, flags (version 1), payload size.
fn header(request: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

#[test]
fn oversized_message() {
    let setup = start(&worker_bin(), "wfe-oversized");
    let mut s = UnixStream::connect(&setup.socket).unwrap();
    // SET_FEATURES (2) claiming a 1 MiB payload.
    let mut msg = header(2, 1 << 20);
    msg.extend_from_slice(&[0; 64]);
    let _ = s.write_all(&msg);
    assert_refused(setup, "refuses");
}

#[test]
fn truncated_message() {
    let setup = start(&worker_bin(), "wfe-truncated");
    let mut s = UnixStream::connect(&setup.socket).unwrap();
    // SET_FEATURES (2) needs an 8-byte payload; send 3 bytes of it and hang up.
    let mut msg = header(2, 8);
    msg.extend_from_slice(&[1, 2, 3]);
    s.write_all(&msg).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_refused(setup, "refuses");
}

/// Reads the seccomp filter a live process runs (PTRACE_SECCOMP_GET_FILTER; root can).
fn live_filter(pid: i32) -> Vec<libc::sock_filter> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    // SAFETY: plain ptrace calls on a pid; the buffer passed to GET_FILTER has room for
    // the instruction count the first call returned.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0),
            0,
            "attach to worker {pid}"
        );
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
        let n = libc::ptrace(
            PTRACE_SECCOMP_GET_FILTER,
            pid,
            0,
            std::ptr::null_mut::<libc::c_void>(),
        );
        assert!(n > 0, "worker {pid} has no seccomp filter ({n})");
        let mut prog = vec![
            libc::sock_filter {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            n as usize
        ];
        let got = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, prog.as_mut_ptr());
        assert_eq!(got, n);
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0), 0);
        prog
    }
}

fn assert_runs_the_shipped_filter(bin: &Path, name: &str) {
    let mut setup = start(bin, name);
    let conn = UnixStream::connect(&setup.socket).unwrap();
    let pid = setup.worker.sandboxed_pid() as i32;
    let live = live_filter(pid);
    let shipped = policies::bpf(policies::PolicyId::BLK);
    let same = live.len() == shipped.len()
        && live
            .iter()
            .zip(shipped)
            .all(|(a, b)| (a.code, a.jt, a.jf, a.k) == (b.code, b.jt, b.jf, b.k));
    assert!(
        same,
        "{name}: the live filter ({} instructions) differs from the policy's BPF ({})",
        live.len(),
        shipped.len()
    );
    drop(conn);
    let (code, stderr, _) = setup.finish();
    assert_eq!(
        code,
        Some(0),
        "worker ends cleanly when the frontend hangs up:\n{stderr}"
    );
}

#[test]
fn release_worker_runs_the_shipped_filter() {
    assert_runs_the_shipped_filter(&worker_bin(), "wfe-filter-release");
}

#[test]
fn hook_enabled_worker_runs_the_shipped_filter() {
    assert_runs_the_shipped_filter(&worker_hooks_bin(), "wfe-filter-hooks");
}
