//! The worker's one event loop: the vhost-user socket and every live ring's kick eventfd
//! in one epoll set, on one thread (so no locks are ever contended and the seccomp policy
//! needs no thread syscalls).

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags, EpollTimeout};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::vhost::{DataPlane, KickChanges, VhostBackend, VhostDevice};
use ipc::status::StatusMapping;

/// Token of the vhost-user socket; ring `i` uses token `i`.
const SOCKET_TOKEN: u64 = u64::MAX;
/// Token of the device's completion eventfd (asynchronous engines) and of its wake
/// timerfd (a rate limit refilled): either way, reap and serve the rings that waited.
const COMPLETION_TOKEN: u64 = u64::MAX - 1;
/// Token of the control channel from the VMM (spawned workers).
const CONTROL_TOKEN: u64 = u64::MAX - 2;

/// Why serving ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("epoll failed")]
    Epoll(#[source] nix::Error),
    #[error("the frontend sent a message this worker refuses")]
    Frontend(#[source] VhostError),
    /// Test builds: a fault hook that did not do what it should.
    #[cfg(feature = "test-hooks")]
    #[error("fault hook: {0}")]
    Hook(String),
}

/// The event loop's resources, created before the sandbox (epoll_create is not in the
/// policy).
#[derive(Debug)]
pub struct EventLoop {
    epoll: Epoll,
    watched: Vec<(usize, RawFd)>,
    /// Polling before sleeping (`poll_us`), if asked for.
    poller: Option<Poller>,
}

/// Busy-polling the rings (and the io_uring's completions) for a while before the worker
/// sleeps in epoll_wait: a request or completion that arrives in the window is served
/// without a wakeup. Timed with the TSC, calibrated before the sandbox, since reading a
/// clock could need a syscall the policy does not allow.
///
/// The window adapts as KVM's halt polling does: after a sleep shorter than the longest
/// window (`poll_us`) polling that long would have caught the wakeup, so the window
/// doubles (from [`POLL_START_US`]); after a longer sleep it was spent for nothing, so it
/// halves (to none below the start). A worker whose guest is idle or slow thus stops
/// spinning, and one under a steady load polls just long enough.
#[derive(Debug, Clone, Copy)]
struct Poller {
    max_ticks: u64,
    start_ticks: u64,
    window_ticks: u64,
}

/// Where a grown polling window starts, in microseconds.
const POLL_START_US: u64 = 10;

#[cfg(target_arch = "x86_64")]
fn ticks() -> u64 {
    // SAFETY: RDTSC reads the time stamp counter; it touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn ticks() -> u64 {
    0
}

impl Poller {
    /// At most `poll_us` microseconds; None for 0 or where there is no TSC.
    fn new(poll_us: u32) -> Option<Poller> {
        if poll_us == 0 || !cfg!(target_arch = "x86_64") {
            return None;
        }
        let start = std::time::Instant::now();
        let t0 = ticks();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let per_us = (ticks() - t0) / (start.elapsed().as_micros() as u64).max(1);
        Some(Poller::with_ticks_per_us(poll_us, per_us.max(1)))
    }

    fn with_ticks_per_us(poll_us: u32, per_us: u64) -> Poller {
        let max_ticks = per_us * u64::from(poll_us);
        let start_ticks = (per_us * POLL_START_US).min(max_ticks);
        Poller {
            max_ticks,
            start_ticks,
            window_ticks: start_ticks,
        }
    }

    /// Adapts the window to a sleep of `slept` ticks.
    fn slept(&mut self, slept: u64) {
        self.window_ticks = if slept <= self.max_ticks {
            self.window_ticks
                .saturating_mul(2)
                .clamp(self.start_ticks, self.max_ticks)
        } else if self.window_ticks / 2 < self.start_ticks {
            0
        } else {
            self.window_ticks / 2
        };
    }
}

impl EventLoop {
    pub fn new() -> Result<Self, ServeError> {
        Ok(EventLoop {
            epoll: Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(ServeError::Epoll)?,
            watched: Vec::new(),
            poller: None,
        })
    }

    /// Polls for `poll_us` microseconds before each sleep (0: never). Call before the
    /// sandbox: it calibrates the TSC with a clock.
    pub fn with_polling(mut self, poll_us: u32) -> Self {
        self.poller = Poller::new(poll_us);
        self
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }

    fn add(&self, fd: RawFd, token: u64) -> Result<(), ServeError> {
        // SAFETY: `fd` is owned by the backend's vring (or the handler) and stays open at
        // least until it is removed from the set again in `sync_kicks`.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .map_err(ServeError::Epoll)
    }

    /// Re-registers every watched kick fd. Always all of them: a new eventfd may get the
    /// number of the one it replaced. Every watched fd is still open here (the backend
    /// keeps a replaced or dropped kick in `retired` until now), so each delete removes
    /// exactly its registration; only then do the retired ones close.
    fn sync_kicks(&mut self, changes: KickChanges) -> Result<(), ServeError> {
        for &(_, fd) in &self.watched {
            // SAFETY: only removes `fd` from the set. It is open: a ring still holds it,
            // or `changes.retired` does. A kick that never got registered fails with
            // ENOENT, which is ignored.
            let _ = self.epoll.delete(unsafe { BorrowedFd::borrow_raw(fd) });
        }
        drop(changes.retired);
        for &(index, fd) in &changes.watch {
            self.add(fd, index as u64)?;
        }
        self.watched = changes.watch;
        Ok(())
    }

    /// Serves the frontend until it disconnects (Ok) or sends something refused (Err),
    /// and takes the VMM's messages on `control` (a spawned worker's).
    pub fn run<D: VhostDevice>(
        mut self,
        mut handler: BackendReqHandler<Mutex<VhostBackend<D>>>,
        backend: Arc<Mutex<VhostBackend<D>>>,
        status: &StatusMapping,
        control: Option<&ipc::channel::Channel>,
    ) -> Result<(), ServeError> {
        self.add(handler.as_raw_fd(), SOCKET_TOKEN)?;
        let lock = || backend.lock().unwrap_or_else(|e| e.into_inner());
        let fds = {
            let mut b = lock();
            let plane = b.data_plane();
            [plane.completion_fd(), plane.wake_fd()]
        };
        for fd in fds.into_iter().flatten() {
            self.add(fd, COMPLETION_TOKEN)?;
        }
        if let Some(c) = control {
            self.add(c.as_raw_fd(), CONTROL_TOKEN)?;
        }
        let mut events = [EpollEvent::empty(); 16];
        loop {
            // After polling found work, look at the descriptors without sleeping (the
            // socket must not starve), then poll again.
            let timeout = match self.poller {
                Some(p) if poll(p.window_ticks, &backend, status) => EpollTimeout::ZERO,
                _ => EpollTimeout::NONE,
            };
            let asleep = ticks();
            // Asleep until a kick, a completion or a message, notifications on: what the
            // driver publishes without a kick is not this worker's to find, and requests in
            // flight are the disk's to finish (the supervisor's hang check).
            let sleeping = timeout == EpollTimeout::NONE;
            status.set_idle(sleeping);
            let woke = self.epoll.wait(&mut events, timeout);
            status.set_idle(false);
            let n = match woke {
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ServeError::Epoll(e)),
            };
            if let (Some(p), EpollTimeout::NONE) = (&mut self.poller, timeout) {
                p.slept(ticks().wrapping_sub(asleep));
            }
            for event in &events[..n] {
                match event.data() {
                    SOCKET_TOKEN => match handler.handle_request() {
                        Ok(()) =>
                        {
                            #[cfg(feature = "test-hooks")]
                            if let Some(hook) = lock().take_due_hook() {
                                crate::hooks::run_after_config(&hook, status)
                                    .map_err(ServeError::Hook)?;
                            }
                        }
                        Err(VhostError::Disconnected) => {
                            tracing::info!("frontend disconnected");
                            return Ok(());
                        }
                        Err(e) => return Err(ServeError::Frontend(e)),
                    },
                    COMPLETION_TOKEN => {
                        let mut b = lock();
                        let plane = b.data_plane();
                        plane.reap();
                        report(plane, status);
                    }
                    CONTROL_TOKEN => {
                        let Some(c) = control else { continue };
                        if !self.control_message(c, &backend) {
                            // The VMM is gone: nothing more comes this way.
                            // SAFETY: only removes the channel's fd from the set; the
                            // channel stays open (and owned by the caller).
                            let _ = self
                                .epoll
                                .delete(unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) });
                        }
                        report(lock().data_plane(), status);
                    }
                    index => {
                        let mut b = lock();
                        let plane = b.data_plane();
                        plane.kick(index as usize);
                        report(plane, status);
                    }
                }
            }
            let mut b = lock();
            let plane = b.data_plane();
            if let Some(changes) = plane.take_kick_changes() {
                // A ring just became live: serve anything already queued in it (and what a
                // predecessor left in flight).
                plane.process_all();
                status.set_recovery(plane.rings_started(), plane.resubmitted());
                report(plane, status);
                drop(b);
                self.sync_kicks(changes)?;
            }
        }
    }
}

impl EventLoop {
    /// Takes one message from the VMM; false once the channel is closed or broken.
    fn control_message<D: VhostDevice>(
        &self,
        control: &ipc::channel::Channel,
        backend: &Mutex<VhostBackend<D>>,
    ) -> bool {
        use ipc::messages::VmmMessage;
        match control.recv::<VmmMessage>() {
            Ok((VmmMessage::SetRateLimit(limit), _)) => {
                tracing::info!("rate limit now {}", describe(&limit));
                let mut b = backend.lock().unwrap_or_else(|e| e.into_inner());
                let plane = b.data_plane();
                plane.device_mut().set_rate_limit(limit);
                // A lifted or raised limit frees the rings that waited for the old one.
                plane.reap();
                true
            }
            Ok((other, _)) => {
                tracing::warn!("ignoring {other:?} from the VMM while serving");
                true
            }
            Err(e) => {
                tracing::debug!("control channel: {e}");
                false
            }
        }
    }
}

/// A rate limit in words, for the log.
pub fn describe(limit: &ipc::messages::RateLimit) -> String {
    let bucket = |b: &Option<ipc::messages::TokenBucket>, unit: &str| match b {
        None => format!("unlimited {unit}"),
        Some(b) => format!(
            "{} {unit} per {} ms (burst {})",
            b.size, b.refill_time_ms, b.one_time_burst
        ),
    };
    format!(
        "{}, {}",
        bucket(&limit.ops, "requests"),
        bucket(&limit.bandwidth, "bytes")
    )
}

/// Publishes the backend's totals on the status page and bumps the heartbeat the
/// supervisor's hang detector watches.
fn report<D: VhostDevice>(b: &DataPlane<D>, status: &StatusMapping) {
    let totals = b.totals();
    status.set_completed(totals.completed, totals.failed);
    status.set_request_counters(&b.request_counters());
    status.set_rings_broken(b.rings_broken());
    status.bump_progress();
}

/// Spins up to `window` ticks for work on a live ring or completions in the device;
/// serves it and returns true as soon as there is some.
fn poll<D: VhostDevice>(
    window: u64,
    backend: &Mutex<VhostBackend<D>>,
    status: &StatusMapping,
) -> bool {
    let deadline = ticks().saturating_add(window);
    loop {
        {
            let mut b = backend.lock().unwrap_or_else(|e| e.into_inner());
            let plane = b.data_plane();
            if plane.has_work() {
                plane.reap();
                plane.process_all();
                report(plane, status);
                return true;
            }
        }
        if ticks() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polling_window_grows_after_short_sleeps_and_shrinks_after_long_ones() {
        // 1 tick per microsecond, at most 100 us.
        let mut p = Poller::with_ticks_per_us(100, 1);
        assert_eq!(p.window_ticks, POLL_START_US);
        for want in [20, 40, 80, 100, 100] {
            p.slept(30);
            assert_eq!(p.window_ticks, want);
        }
        for want in [50, 25, 12, 0, 0] {
            p.slept(5000);
            assert_eq!(p.window_ticks, want);
        }
        // From none, a short sleep starts it again.
        p.slept(1);
        assert_eq!(p.window_ticks, POLL_START_US);
    }

    #[test]
    fn a_window_below_the_start_is_the_whole_window() {
        let mut p = Poller::with_ticks_per_us(4, 1);
        assert_eq!(p.window_ticks, 4);
        p.slept(1);
        assert_eq!(p.window_ticks, 4);
        p.slept(10);
        assert_eq!(p.window_ticks, 0);
    }
}
