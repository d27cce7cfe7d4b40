//! Keeps a disk's worker alive under a running guest: when a worker ends (crash, seccomp
//! violation, OOM kill, kill -9, or killed by its control thread for a bad reply), the
//! supervisor says how, starts a successor with the same disk, takes it through the same
//! vhost-user setup, checks it offers the same device, and hands it to the device's control
//! thread, which replays what the driver had set up (including the inflight region, so the
//! successor resubmits what was in flight).
//!
//! Budget (DESIGN.md): the first restart is immediate; only a worker that died before
//! completing a single request counts toward the crash-loop budget, with exponential
//! backoff between such restarts; a worker that served requests resets both. Past the
//! budget the device reports DEVICE_NEEDS_RESET.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::virtio_mmio::VirtioMmioDevice;
use crate::disk::{DiskConfig, OpenedImage};
use crate::violations::ViolationLog;
use crate::worker::Worker;

/// Consecutive deaths before any completed request that the supervisor tolerates.
pub const CRASH_LOOP_BUDGET: u32 = 5;
/// Backoff before the second restart of a crash loop; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// Everything needed to start a disk's worker again.
#[derive(Debug)]
pub struct Supervisor {
    pub cfg: DiskConfig,
    pub image: Arc<OpenedImage>,
    pub bin: PathBuf,
    pub learn: Option<Arc<policies::learn::Recorder>>,
    pub violations: Arc<ViolationLog>,
    pub device: Arc<VirtioMmioDevice>,
    /// What the first worker offered; a successor must offer the same.
    pub features: u64,
    pub config: Vec<u8>,
}

/// The supervised worker's pidfd, for the control thread (it kills a worker that sends a
/// bad reply).
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Blocks until the process behind `pidfd` has exited.
fn wait_exit(pidfd: &OwnedFd) {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polls one valid pollfd that lives on this stack frame.
        let ret = unsafe { libc::poll(&mut pfd, 1, -1) };
        if ret >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

impl Supervisor {
    /// Watches `worker` (already set up and handed to the control thread) on a thread of
    /// its own, and its successors after it.
    pub fn start(self, worker: Worker, pidfd: Option<Arc<OwnedFd>>) -> std::io::Result<()> {
        let name = format!("{}-sup", self.cfg.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run(worker, pidfd))
            .map(|_| ())
    }

    fn run(self, mut worker: Worker, mut pidfd: Option<Arc<OwnedFd>>) {
        let id = self.cfg.id.clone();
        crate::vm::report_confinement(&id, worker.child.id(), &worker.status);
        let mut crash_loop = 0u32;
        loop {
            // Without a pidfd, child.wait() below blocks just the same.
            if let Some(fd) = &pidfd {
                wait_exit(fd);
            }
            let how = match worker.child.wait() {
                Ok(s) => crate::vm::describe_exit(s),
                Err(e) => format!("cannot be waited for: {e}"),
            };
            crate::vm::report_worker_end(&id, &worker.status, &how, &self.violations);
            let died_at = Instant::now();
            if self.device.closing() {
                return;
            }
            if worker.status.completed() > 0 || worker.status.progress() > 0 {
                crash_loop = 0;
            } else {
                crash_loop += 1;
            }
            // Start a successor; a failed start counts as a death before service.
            loop {
                if crash_loop > CRASH_LOOP_BUDGET {
                    tracing::error!(
                        "disk {id}: {crash_loop} workers in a row ended before serving a \
                         request: giving up; the device needs a reset"
                    );
                    self.device.needs_reset();
                    return;
                }
                if crash_loop >= 2 {
                    std::thread::sleep(FIRST_BACKOFF * (1 << (crash_loop - 2).min(8)));
                }
                match self.replace() {
                    Ok((next, fd)) => {
                        let looping = if crash_loop > 0 {
                            format!("; {crash_loop} in a row died before serving")
                        } else {
                            String::new()
                        };
                        tracing::warn!(
                            "disk {id}: worker restarted in {:.1} ms (pid {}{looping})",
                            died_at.elapsed().as_secs_f64() * 1e3,
                            next.child.id(),
                        );
                        worker = next;
                        pidfd = fd;
                        break;
                    }
                    Err(e) => {
                        tracing::error!("disk {id}: cannot start a successor: {e}");
                        crash_loop += 1;
                    }
                }
            }
        }
    }

    /// Starts a successor and hands it, set up, to the control thread.
    fn replace(&self) -> Result<(Worker, Option<Arc<OwnedFd>>), String> {
        let id = &self.cfg.id;
        let w = crate::worker::spawn(&self.cfg, &self.image, &self.bin, self.learn.as_ref())
            .map_err(|e| crate::error_chain(&e))?;
        let pidfd = pidfd_open(w.child.id()).ok().map(Arc::new);
        let stream = w
            .vhost
            .try_clone()
            .map_err(|e| format!("clone the vhost-user socket: {e}"))?;
        let backend = match crate::vhost_frontend::setup(id, stream, self.cfg.num_queues) {
            Ok(b) => b,
            Err(e) => {
                let mut w = w;
                let _ = w.child.kill();
                let _ = w.child.wait();
                return Err(crate::error_chain(&e));
            }
        };
        if backend.features != self.features || backend.config != self.config {
            let mut w = w;
            let _ = w.child.kill();
            let _ = w.child.wait();
            return Err(format!(
                "the successor offers another device (features {:#x}, was {:#x})",
                backend.features, self.features
            ));
        }
        if !self.device.reconnect_backend(backend, pidfd.clone()) {
            return Err("the device's control thread is gone".into());
        }
        Ok((w, pidfd))
    }
}
