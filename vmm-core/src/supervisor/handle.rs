//! A disk's handle, shared by its supervisor, its frontend thread and the control API:
//! which worker serves it, the disk's phase, and the requests that change it (a planned
//! restart, the guest's reset of a failing device, the VM's end).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ipc::messages::RateLimit;

use crate::pids;
use crate::vhost_frontend::BackendOwner;

/// Where a disk is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskPhase {
    /// Served by a normal worker (or about to be).
    #[default]
    Serving,
    /// A planned restart stopped the worker: its end is not a failure (`failing`: the
    /// phase it came from was [`DiskPhase::Failing`], and returns to it).
    PlannedRestart { failing: bool },
    /// Past the crash-loop budget: the device needs a reset, and its worker (if any) is
    /// in fail mode.
    Failing,
    /// The guest reset the failing device: a normal worker is to start.
    RecoveryRequested,
    /// The supervisor is gone (the VM is closing): no worker will come.
    Ended,
}

impl DiskPhase {
    /// Whether the device is failing (its worker in fail mode, or none).
    fn failing(self) -> bool {
        matches!(
            self,
            DiskPhase::Failing
                | DiskPhase::RecoveryRequested
                | DiskPhase::PlannedRestart { failing: true }
        )
    }
}

#[derive(Debug, Default)]
struct State {
    /// The current worker: its reaper and its confined process.
    reaper: Option<Arc<OwnedFd>>,
    confined: Option<Arc<OwnedFd>>,
    worker_pid: u32,
    /// Bumped for every new worker.
    generation: u64,
    phase: DiskPhase,
}

impl State {
    fn kill_worker(&self) {
        for fd in self.worker_fds() {
            pids::kill(&fd);
        }
    }

    fn worker_fds(&self) -> Vec<Arc<OwnedFd>> {
        [&self.confined, &self.reaper]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// How long the handle waits for a worker it killed for the frontend to be gone: within
/// the vCPU's wait for a reset (the frontend's reply timeout and this fit in it).
const KILL_WAIT: Duration = Duration::from_secs(3);

/// Kills the processes behind `fds` and waits (up to [`KILL_WAIT`]) until they are gone;
/// true once they are. A process that is gone has no I/O in flight: its io_uring requests
/// are cancelled or completed before it exits, so none lands in guest RAM afterwards.
fn kill_and_wait(fds: &[Arc<OwnedFd>]) -> bool {
    for fd in fds {
        pids::kill(fd);
    }
    let deadline = Instant::now() + KILL_WAIT;
    fds.iter()
        .all(|fd| pids::wait_exit(fd, deadline.saturating_duration_since(Instant::now())))
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct DiskHandle {
    state: Mutex<State>,
    changed: Condvar,
    counters: super::counters::DiskCounters,
    limits: Mutex<Limits>,
    limits_changed: Condvar,
    sizes: Mutex<Sizes>,
    sizes_changed: Condvar,
}

/// The disk's size as the guest is offered it, and a resize under way.
#[derive(Debug, Default)]
struct Sizes {
    /// Bytes the guest is offered now.
    current: u64,
    /// What a size must keep (see [`SizeRules`]).
    rules: SizeRules,
    /// A resize asked for and not done yet: its number and size.
    pending: Option<(u64, u64)>,
    /// Resizes asked for so far (they number the requests).
    asked: u64,
    /// The last resize's outcome, by number: the new size, or why it failed.
    done: Option<(u64, Result<u64, String>)>,
    /// The size of the last resize that did not end as done: its worker may have set the
    /// image to it before something else failed, and a later worker then finds it.
    attempted: Option<u64>,
}

/// What a disk's new size must keep.
#[derive(Clone, Copy, Debug, Default)]
pub struct SizeRules {
    /// Why the disk cannot be resized at all (a read-only disk).
    pub fixed: Option<&'static str>,
    /// Its workers open the image with O_DIRECT: one whose size is whole 4 KiB blocks told
    /// the guest 4 KiB blocks, and keeps them (the guest never reads the block size again).
    pub direct: bool,
}

/// A resize done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub previous: u64,
    pub size: u64,
    /// From the request to the successor serving at the new size.
    pub took: Duration,
}

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{0}")]
    BadSize(String),
    #[error("the disk {0}: its size cannot change")]
    Fixed(&'static str),
    #[error("another resize of this disk is under way")]
    Busy,
    #[error("the disk has no worker to resize it (it failed, or the VM is closing)")]
    NoWorker,
    #[error("the image was not resized: {0}; the disk keeps its size")]
    Failed(String),
    #[error(
        "the resize was not done within {0:?}; it stays asked for, and the disk's next \
         worker does it"
    )]
    Timeout(Duration),
}

/// Checks `size` for a disk of `current` bytes under `rules`.
fn check_size(size: u64, current: u64, shrink: bool, rules: SizeRules) -> Result<(), ResizeError> {
    use ipc::messages::{MAX_DISK_SIZE, SECTOR_SIZE};
    let bad = |why: String| Err(ResizeError::BadSize(why));
    if let Some(why) = rules.fixed {
        return Err(ResizeError::Fixed(why));
    }
    if size == 0 || size % SECTOR_SIZE != 0 {
        return bad(format!(
            "{size} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
        ));
    }
    if size > MAX_DISK_SIZE {
        return bad(format!(
            "{size} bytes is more than the largest disk, {MAX_DISK_SIZE}"
        ));
    }
    if rules.direct && (size % 4096 == 0) != (current % 4096 == 0) {
        return bad(format!(
            "the disk is opened with direct=on and its guest was told {} blocks: give {}",
            if current % 4096 == 0 {
                "4 KiB"
            } else {
                "512-byte"
            },
            if current % 4096 == 0 {
                "a multiple of 4096"
            } else {
                "a size that is not a multiple of 4096"
            }
        ));
    }
    if size < current && !shrink {
        return bad(format!(
            "{size} bytes is smaller than the disk's {current}: shrinking cuts off the guest's \
             data beyond the new end, so it must be asked for as a shrink"
        ));
    }
    Ok(())
}

/// The disk's I/O limits: the configuration's, or what the API set last. Each change gets
/// a generation; the supervisor says which generation its worker has.
#[derive(Debug, Default)]
struct Limits {
    current: RateLimit,
    generation: u64,
    applied: u64,
}

/// Errors of a rate-limit change.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the new limit is kept, but no worker took it within {0:?} (the disk has no \
         worker now; its next one starts with it)"
    )]
    NotApplied(Duration),
}

/// A disk's worker as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// The serving worker's confined pid (None while the disk has no worker).
    pub worker_pid: Option<u32>,
    /// `normal`, `fail` (past the crash-loop budget, answering with errors until the
    /// guest resets the device) or `none`.
    pub mode: &'static str,
}

/// Errors of a planned restart.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("the disk has no worker to restart (it failed, or the VM is closing)")]
    NoWorker,
    #[error("no successor was up within {0:?}")]
    Timeout(Duration),
}

impl DiskHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new worker serves the disk (or none, with all None); returns its generation.
    pub(crate) fn publish(
        &self,
        reaper: Option<Arc<OwnedFd>>,
        confined: Option<Arc<OwnedFd>>,
        pid: u32,
    ) -> u64 {
        let mut st = self.lock();
        // A planned restart asked for while no worker was up (between one's end and the
        // next's start) belonged to the one that had already ended, not to this one.
        if let DiskPhase::PlannedRestart { failing } = st.phase {
            st.phase = if failing {
                DiskPhase::Failing
            } else {
                DiskPhase::Serving
            };
        }
        st.reaper = reaper;
        st.confined = confined;
        st.worker_pid = pid;
        st.generation += 1;
        self.changed.notify_all();
        st.generation
    }

    /// Whether the worker that just ended was stopped for a planned restart.
    pub(crate) fn take_planned(&self) -> bool {
        let mut st = self.lock();
        match st.phase {
            DiskPhase::PlannedRestart { failing } => {
                st.phase = if failing {
                    DiskPhase::Failing
                } else {
                    DiskPhase::Serving
                };
                true
            }
            _ => false,
        }
    }

    pub(crate) fn set_failing(&self) {
        let mut st = self.lock();
        if st.phase != DiskPhase::Ended {
            st.phase = DiskPhase::Failing;
        }
    }

    /// Whether the guest asked for recovery; the disk then serves normally again.
    pub(crate) fn take_recover(&self) -> bool {
        let mut st = self.lock();
        let recover = st.phase == DiskPhase::RecoveryRequested;
        if recover {
            st.phase = DiskPhase::Serving;
        }
        recover
    }

    pub(crate) fn recover_requested(&self) -> bool {
        self.lock().phase == DiskPhase::RecoveryRequested
    }

    /// Waits up to `timeout` for the guest to reset a failing device; true once it has.
    pub(crate) fn wait_recover(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.phase != DiskPhase::RecoveryRequested)
            .unwrap_or_else(|p| p.into_inner());
        st.phase == DiskPhase::RecoveryRequested
    }

    pub(crate) fn end(&self) {
        let mut st = self.lock();
        st.phase = DiskPhase::Ended;
        st.reaper = None;
        st.confined = None;
        self.changed.notify_all();
        drop(st);
        // No worker will come to do a resize still asked for.
        self.fail_pending_resize("the VM is closing");
    }

    /// The disk's counters over all its workers.
    pub fn counters(&self) -> &super::counters::DiskCounters {
        &self.counters
    }

    fn sizes(&self) -> std::sync::MutexGuard<'_, Sizes> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The size the first worker offered, and what a new size must keep.
    pub(crate) fn init_size(&self, size: u64, rules: SizeRules) {
        let mut s = self.sizes();
        s.current = size;
        s.rules = rules;
    }

    /// Bytes the guest is offered now.
    pub fn size(&self) -> u64 {
        self.sizes().current
    }

    /// The resize the next normal worker is to do: its number and size.
    pub(crate) fn pending_resize(&self) -> Option<(u64, u64)> {
        self.sizes().pending
    }

    /// Resize `number` is over: the disk has `outcome`'s size, or kept its own.
    pub(crate) fn resize_done(&self, number: u64, outcome: Result<u64, String>) {
        let mut s = self.sizes();
        if let Some((n, size)) = s.pending {
            if n == number {
                s.pending = None;
                s.attempted = outcome.is_err().then_some(size);
            }
        }
        if let Ok(size) = outcome {
            s.current = size;
        }
        s.done = Some((number, outcome));
        self.sizes_changed.notify_all();
    }

    /// Grows the disk to `size` bytes (or, with `shrink`, cuts it): a planned restart
    /// whose successor resizes the image inside its sandbox before it serves, after which
    /// the guest is told (a config-change interrupt; see the supervisor). Waits up to
    /// `timeout` for it.
    pub fn resize(
        &self,
        size: u64,
        shrink: bool,
        timeout: Duration,
    ) -> Result<Resized, ResizeError> {
        let started = Instant::now();
        let mut s = self.sizes();
        let previous = s.current;
        if s.pending.is_some() {
            return Err(ResizeError::Busy);
        }
        check_size(size, previous, shrink, s.rules)?;
        if size == previous {
            return Ok(Resized {
                previous,
                size,
                took: started.elapsed(),
            });
        }
        {
            let st = self.lock();
            let never_served = st.generation == 0;
            if never_served || st.phase == DiskPhase::Ended || st.phase.failing() {
                return Err(ResizeError::NoWorker);
            }
        }
        s.asked += 1;
        let number = s.asked;
        s.pending = Some((number, size));
        drop(s);
        // Stops the serving worker now; between two workers (a restart under way) there
        // is none to stop, and the supervisor stops the next one (see
        // `Supervisor::watch`), which started without this resize.
        let _ = self.plan_restart(false);
        let s = self.sizes();
        let (s, _) = self
            .sizes_changed
            .wait_timeout_while(s, timeout, |s| {
                s.done.as_ref().is_none_or(|(n, _)| *n != number)
            })
            .unwrap_or_else(|p| p.into_inner());
        match &s.done {
            Some((n, Ok(size))) if *n == number => Ok(Resized {
                previous,
                size: *size,
                took: started.elapsed(),
            }),
            Some((n, Err(why))) if *n == number => Err(ResizeError::Failed(why.clone())),
            _ => Err(ResizeError::Timeout(timeout)),
        }
    }

    /// Stops the serving worker for the resize asked for (the supervisor's watch, when its
    /// worker was not started with it).
    pub(crate) fn stop_for_resize(&self) {
        let _ = self.plan_restart(false);
    }

    /// A worker offers `size` where `size()` was expected: if that is the size a resize
    /// that was reported failed asked for (its worker set the image to it before
    /// something else failed), the disk has it now; true then.
    pub(crate) fn adopt_attempted(&self, size: u64) -> bool {
        let mut s = self.sizes();
        if s.attempted != Some(size) || s.pending.is_some() {
            return false;
        }
        s.attempted = None;
        s.current = size;
        self.sizes_changed.notify_all();
        true
    }

    /// A resize asked for cannot be done: the disk's workers keep failing.
    pub(crate) fn fail_pending_resize(&self, why: &str) {
        let pending = self.sizes().pending;
        if let Some((number, _)) = pending {
            self.resize_done(number, Err(why.to_string()));
        }
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits the disk starts with (its configuration's), already its first worker's.
    pub(crate) fn init_rate_limit(&self, limit: RateLimit) {
        let mut l = self.limits();
        l.current = limit;
    }

    /// The disk's limits now, and their generation.
    pub fn rate_limit(&self) -> (RateLimit, u64) {
        let l = self.limits();
        (l.current, l.generation)
    }

    /// Changes the limits with `change` (which sees the limits in force and may refuse):
    /// kept for every worker from now on, and handed to the running one by its
    /// supervisor, which is waited for up to `timeout`. The read, the change and the write
    /// are one step, so two changes at once never lose one another. Returns the new
    /// limits, and whether the worker took them in time.
    pub fn change_rate_limit(
        &self,
        change: impl FnOnce(RateLimit) -> Result<RateLimit, String>,
        timeout: Duration,
    ) -> Result<(RateLimit, Result<(), LimitError>), String> {
        let mut l = self.limits();
        let limit = change(l.current)?;
        l.current = limit;
        l.generation += 1;
        let generation = l.generation;
        let (l, _) = self
            .limits_changed
            .wait_timeout_while(l, timeout, |l| l.applied < generation)
            .unwrap_or_else(|p| p.into_inner());
        let applied = if l.applied >= generation {
            Ok(())
        } else {
            Err(LimitError::NotApplied(timeout))
        };
        Ok((limit, applied))
    }

    /// The serving worker has the limits of `generation`.
    pub(crate) fn rate_limit_applied(&self, generation: u64) {
        let mut l = self.limits();
        l.applied = l.applied.max(generation);
        self.limits_changed.notify_all();
    }

    /// The disk's phase.
    pub fn phase(&self) -> DiskPhase {
        self.lock().phase
    }

    /// The VM is over and its backends were told to disconnect: waits until `deadline`
    /// for the supervisor to reap its worker (and discard its spare). True once it ended,
    /// so no process of this disk holds the image (or its lock) any more.
    pub fn wait_ended(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while st.phase != DiskPhase::Ended {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Kills the current worker (one that did not end when asked; see [`Self::wait_ended`]).
    pub fn kill_worker(&self) {
        self.lock().kill_worker();
    }

    /// What the control API reports about the disk.
    pub fn state(&self) -> DiskState {
        let st = self.lock();
        let serving = st.reaper.is_some() && st.phase != DiskPhase::Ended;
        DiskState {
            worker_pid: serving.then_some(st.worker_pid),
            mode: match (serving, st.phase.failing()) {
                (false, _) => "none",
                (true, false) => "normal",
                (true, true) => "fail",
            },
        }
    }

    /// The current worker's confined process (or its reaper until that is known) and its
    /// pid; None while the disk has no worker.
    pub fn current_worker(&self) -> Option<(u32, Arc<OwnedFd>)> {
        let st = self.lock();
        let fd = st.confined.clone().or_else(|| st.reaper.clone())?;
        Some((st.worker_pid, fd))
    }

    /// Stops the current worker and waits for its successor, which gets everything the
    /// guest's device needs (as after a crash, without counting as one). Returns the new
    /// worker's pid and how long the switch took.
    pub fn restart(&self, timeout: Duration) -> Result<(u32, Duration), RestartError> {
        let started = Instant::now();
        let generation = self.plan_restart(true)?;
        let mut st = self.lock();
        while st.generation == generation && st.phase != DiskPhase::Ended {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(RestartError::Timeout(timeout));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.phase == DiskPhase::Ended {
            return Err(RestartError::NoWorker);
        }
        Ok((st.worker_pid, started.elapsed()))
    }
}

impl DiskHandle {
    /// Stops the current worker for a planned restart (a failing disk's only with
    /// `failing_too`, and then in fail mode); returns the generation that ends.
    fn plan_restart(&self, failing_too: bool) -> Result<u64, RestartError> {
        let mut st = self.lock();
        let Some(reaper) = st.reaper.clone() else {
            return Err(RestartError::NoWorker);
        };
        match st.phase {
            DiskPhase::Ended => return Err(RestartError::NoWorker),
            // A restart (or a recovery) is already under way: this one waits for it.
            DiskPhase::RecoveryRequested | DiskPhase::PlannedRestart { .. } => {}
            DiskPhase::Serving => st.phase = DiskPhase::PlannedRestart { failing: false },
            // A failing disk's worker is restarted in fail mode.
            DiskPhase::Failing if failing_too => {
                st.phase = DiskPhase::PlannedRestart { failing: true }
            }
            DiskPhase::Failing => return Err(RestartError::NoWorker),
        }
        if let Some(c) = &st.confined {
            pids::kill(c);
        }
        pids::kill(&reaper);
        Ok(st.generation)
    }
}

impl BackendOwner for DiskHandle {
    /// If the device was failing, a normal worker is asked for and the fail-mode worker
    /// is ended here, and waited for, before the reset completes: it must not answer the
    /// driver's next requests on rings it still has mapped.
    fn guest_reset(&self) -> bool {
        let mut st = self.lock();
        if !st.phase.failing() {
            return false;
        }
        st.phase = DiskPhase::RecoveryRequested;
        let fds = st.worker_fds();
        self.changed.notify_all();
        drop(st);
        if !kill_and_wait(&fds) {
            tracing::warn!("a fail-mode worker did not end within {KILL_WAIT:?} of SIGKILL");
        }
        true
    }

    fn recovering(&self) -> bool {
        self.recover_requested()
    }

    /// Kills the worker of `generation` if it still serves (its supervisor then reports
    /// how it ended and starts a successor) and waits for it; a later worker is left
    /// alone. True once that worker is gone.
    fn backend_failed(&self, generation: u64) -> bool {
        let st = self.lock();
        if st.generation != generation {
            // Superseded: the supervisor reaped it before publishing a successor.
            return true;
        }
        let fds = st.worker_fds();
        drop(st);
        kill_and_wait(&fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> (std::process::Child, Arc<OwnedFd>) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = Arc::new(pids::pidfd_open(child.id()).unwrap());
        (child, fd)
    }

    #[test]
    fn a_failed_backend_is_killed_only_while_it_serves() {
        let handle = DiskHandle::default();
        let (mut old, old_fd) = sleeper();
        let first = handle.publish(Some(old_fd.clone()), None, old.id());
        let (mut new, new_fd) = sleeper();
        let second = handle.publish(Some(new_fd.clone()), None, new.id());
        assert!(
            handle.backend_failed(first),
            "a superseded worker is gone already"
        );
        assert!(!pids::wait_exit(&new_fd, Duration::from_millis(100)));
        assert!(handle.backend_failed(second), "killed and waited for");
        assert!(pids::wait_exit(&new_fd, Duration::ZERO));
        pids::kill(&old_fd);
        old.wait().unwrap();
        new.wait().unwrap();
    }

    #[test]
    fn a_guest_reset_of_a_failing_disk_ends_its_worker_and_asks_for_recovery() {
        let handle = DiskHandle::default();
        let (mut w, fd) = sleeper();
        handle.publish(Some(fd.clone()), None, w.id());
        assert!(
            !handle.guest_reset(),
            "a healthy disk's reset is the frontend's"
        );
        assert_eq!(handle.state().mode, "normal");
        handle.set_failing();
        assert_eq!(handle.state().mode, "fail");
        assert!(handle.guest_reset());
        assert!(
            pids::wait_exit(&fd, Duration::ZERO),
            "gone before the reset completes"
        );
        w.wait().unwrap();
        assert!(handle.recover_requested() && handle.recovering());
        assert!(handle.wait_recover(Duration::ZERO));
        assert!(handle.take_recover());
        assert_eq!(handle.phase(), DiskPhase::Serving);
        handle.end();
        assert_eq!(handle.state().mode, "none");
        assert!(handle.wait_ended(Instant::now()));
        handle.set_failing();
        assert_eq!(handle.phase(), DiskPhase::Ended, "the end is final");
    }
}

#[cfg(test)]
mod planned {
    use super::*;

    /// A restart asked for while no worker was up must not stick to the next worker (its
    /// real death would be taken for a planned stop, and not reported).
    #[test]
    fn a_planned_restart_does_not_outlive_the_worker_it_was_for() {
        let handle = DiskHandle::default();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = Arc::new(pids::pidfd_open(child.id()).unwrap());
        child.wait().unwrap();
        handle.publish(Some(fd), None, child.id());
        // The worker is already dead; the API asks for a restart anyway.
        let h = std::thread::scope(|s| {
            let r = s.spawn(|| handle.restart(Duration::from_millis(300)));
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(handle.phase(), DiskPhase::PlannedRestart { failing: false });
            handle.publish(None, None, 0);
            r.join().unwrap()
        });
        assert!(h.is_ok(), "{h:?}");
        assert_eq!(handle.phase(), DiskPhase::Serving);
        assert!(
            !handle.take_planned(),
            "the next death is not a planned one"
        );
    }
}

#[cfg(test)]
mod resize {
    use super::*;

    /// A disk of 1 MiB whose worker is a process that a planned stop kills.
    fn serving() -> (DiskHandle, std::process::Child) {
        let handle = DiskHandle::default();
        handle.init_size(1 << 20, SizeRules::default());
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = Arc::new(pids::pidfd_open(child.id()).unwrap());
        handle.publish(Some(fd), None, child.id());
        (handle, child)
    }

    /// A supervisor stand-in: answers the next resize asked for with `outcome(size)`.
    fn answer(handle: &DiskHandle, outcome: impl Fn(u64) -> Result<u64, String>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some((n, size)) = handle.pending_resize() {
                handle.resize_done(n, outcome(size));
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no resize was asked for");
    }

    #[test]
    fn a_resize_stops_the_worker_and_waits_for_its_successors_answer() {
        let (handle, mut child) = serving();
        let done = std::thread::scope(|s| {
            let r = s.spawn(|| handle.resize(2 << 20, false, Duration::from_secs(5)));
            answer(&handle, Ok);
            r.join().unwrap()
        });
        let done = done.unwrap();
        assert_eq!((done.previous, done.size), (1 << 20, 2 << 20));
        assert_eq!(handle.size(), 2 << 20);
        assert_eq!(handle.phase(), DiskPhase::PlannedRestart { failing: false });
        assert!(
            child.wait().unwrap().code().is_none(),
            "killed for the restart"
        );
        assert!(handle.pending_resize().is_none());
    }

    #[test]
    fn a_failed_resize_keeps_the_size_and_a_second_one_waits_its_turn() {
        let (handle, mut child) = serving();
        let failed = std::thread::scope(|s| {
            let r = s.spawn(|| handle.resize(2 << 20, false, Duration::from_secs(5)));
            // While it is under way, another is refused.
            while handle.pending_resize().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let busy = handle.resize(3 << 20, false, Duration::from_secs(1));
            assert!(matches!(busy, Err(ResizeError::Busy)), "{busy:?}");
            answer(&handle, |_| Err("File too large".into()));
            r.join().unwrap()
        });
        match failed {
            Err(ResizeError::Failed(why)) => assert_eq!(why, "File too large"),
            other => panic!("{other:?}"),
        }
        assert_eq!(handle.size(), 1 << 20, "the disk keeps its size");
        let _ = child.wait();
    }

    #[test]
    fn a_resize_nobody_answers_times_out_and_stays_asked_for() {
        let (handle, mut child) = serving();
        let late = handle.resize(2 << 20, false, Duration::from_millis(100));
        assert!(matches!(late, Err(ResizeError::Timeout(_))), "{late:?}");
        assert_eq!(handle.pending_resize().map(|(_, s)| s), Some(2 << 20));
        assert_eq!(handle.size(), 1 << 20);
        let _ = child.wait();
    }

    #[test]
    fn a_failed_resize_whose_image_changed_after_all_is_adopted_once() {
        let (handle, mut child) = serving();
        std::thread::scope(|s| {
            let r = s.spawn(|| handle.resize(2 << 20, false, Duration::from_secs(5)));
            answer(&handle, |_| Err("its worker died after the resize".into()));
            assert!(matches!(r.join().unwrap(), Err(ResizeError::Failed(_))));
        });
        assert_eq!(handle.size(), 1 << 20);
        assert!(
            !handle.adopt_attempted(3 << 20),
            "only the size that was asked for"
        );
        assert!(handle.adopt_attempted(2 << 20));
        assert_eq!(handle.size(), 2 << 20);
        assert!(!handle.adopt_attempted(2 << 20), "once");
        let _ = child.wait();
    }

    #[test]
    fn the_vms_end_answers_a_resize_still_asked_for() {
        let (handle, mut child) = serving();
        std::thread::scope(|s| {
            let r = s.spawn(|| handle.resize(2 << 20, false, Duration::from_secs(30)));
            while handle.pending_resize().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let started = Instant::now();
            handle.end();
            let r = r.join().unwrap();
            assert!(started.elapsed() < Duration::from_secs(5));
            match r {
                Err(ResizeError::Failed(why)) => assert!(why.contains("closing"), "{why}"),
                other => panic!("{other:?}"),
            }
        });
        let _ = child.wait();
    }

    #[test]
    fn a_disk_restarting_in_fail_mode_is_not_resized() {
        let (handle, mut child) = serving();
        handle.set_failing();
        // A planned restart of the failing disk (its successor is a fail-mode worker).
        handle.plan_restart(true).unwrap();
        assert_eq!(handle.phase(), DiskPhase::PlannedRestart { failing: true });
        let r = handle.resize(2 << 20, false, Duration::from_secs(1));
        assert!(matches!(r, Err(ResizeError::NoWorker)), "{r:?}");
        assert!(handle.pending_resize().is_none());
        let _ = child.wait();
    }

    #[test]
    fn a_failing_disk_is_not_resized_and_nothing_stays_asked_for() {
        let (handle, mut child) = serving();
        handle.set_failing();
        let r = handle.resize(2 << 20, false, Duration::from_secs(1));
        assert!(matches!(r, Err(ResizeError::NoWorker)), "{r:?}");
        assert!(handle.pending_resize().is_none());
        let _ = child.kill();
        let _ = child.wait();
    }
}
