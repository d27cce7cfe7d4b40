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
//! budget the device reports DEVICE_NEEDS_RESET and gets a worker in fail mode (same
//! sandbox, same inflight region, no disk), which completes every pending and new request
//! with IOERR, so the guest sees errors, never a hang. The guest's reset of the device
//! brings a normal worker back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::virtio_mmio::VirtioMmioDevice;
use crate::disk::{DiskConfig, OpenedImage};
use crate::violations::ViolationLog;
use crate::worker::Worker;
use ipc::messages::ServeMode;

/// Consecutive deaths before any completed request that the supervisor tolerates.
pub const CRASH_LOOP_BUDGET: u32 = 5;
/// A worker whose progress counter stands still this long while the guest has requests
/// pending and the worker was told about them (it is busy, or asleep with a kick unread,
/// or stopped; see `watch`) is hung: killed and replaced. Well below the guest drivers' request timeouts
/// (Linux: 30 s; the test guest: 10 s).
pub const HANG_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the supervisor looks at a live worker's progress.
const HANG_CHECK: Duration = Duration::from_millis(100);
/// How long a restart's log line waits for the successor's rings to be up.
const RESUME_WAIT: Duration = Duration::from_millis(200);
/// Backoff before the second restart of a crash loop; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// At most this many restarts of one disk's worker in [`RESTART_WINDOW`]; more wait for
/// room. Whatever makes workers die (a hostile guest that found a way, a broken host), it
/// cannot make bulkhead exec workers and log their ends without bound.
pub const MAX_RESTARTS: usize = 20;
pub const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// How long the next restart must wait so that no [`RESTART_WINDOW`] holds more than
/// [`MAX_RESTARTS`] (`recent`: the latest restarts, oldest first; older ones are dropped).
fn restart_wait(recent: &mut std::collections::VecDeque<Instant>, now: Instant) -> Duration {
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= RESTART_WINDOW)
    {
        recent.pop_front();
    }
    match recent.front() {
        Some(oldest) if recent.len() >= MAX_RESTARTS => {
            RESTART_WINDOW.saturating_sub(now.duration_since(*oldest))
        }
        _ => Duration::ZERO,
    }
}

/// What the control API can ask of a disk's supervisor: a planned restart (e.g. after the
/// worker binary was replaced on disk).
#[derive(Debug, Default)]
pub struct DiskControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ControlState {
    /// The current worker: its reaper and its confined process.
    reaper: Option<Arc<OwnedFd>>,
    confined: Option<Arc<OwnedFd>>,
    worker_pid: u32,
    /// Bumped for every new worker.
    generation: u64,
    /// A planned restart is under way: the next death is not a failure.
    planned: bool,
    /// The supervisor gave up (or the VM is closing): no successor will come.
    ended: bool,
    /// Past the crash-loop budget: the device needs a reset, and its worker (if any) is
    /// in fail mode.
    failing: bool,
    /// The guest reset the device while it was failing: start a normal worker.
    recover: bool,
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

impl DiskControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, reaper: Option<Arc<OwnedFd>>, confined: Option<Arc<OwnedFd>>, pid: u32) {
        let mut st = self.lock();
        st.reaper = reaper;
        st.confined = confined;
        st.worker_pid = pid;
        st.generation += 1;
        self.changed.notify_all();
    }

    fn take_planned(&self) -> bool {
        std::mem::take(&mut self.lock().planned)
    }

    fn set_failing(&self) {
        self.lock().failing = true;
    }

    /// Whether the guest asked for recovery; the supervisor then serves normally again.
    fn take_recover(&self) -> bool {
        let mut st = self.lock();
        let recover = std::mem::take(&mut st.recover);
        if recover {
            st.failing = false;
        }
        recover
    }

    fn recover_requested(&self) -> bool {
        self.lock().recover
    }

    /// Waits up to `timeout` for the guest to reset a failing device; true once it has.
    fn wait_recover(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| !st.recover)
            .unwrap_or_else(|p| p.into_inner());
        st.recover
    }

    /// The control thread saw the guest reset the device. If the device was failing, the
    /// supervisor is asked for a normal worker, and true is returned: the control thread
    /// then lets the fail-mode worker go and waits for that worker before it brings rings
    /// up again.
    pub fn guest_reset(&self) -> bool {
        let mut st = self.lock();
        if st.failing {
            st.recover = true;
            self.changed.notify_all();
        }
        st.failing
    }

    fn end(&self) {
        let mut st = self.lock();
        st.ended = true;
        st.reaper = None;
        st.confined = None;
        self.changed.notify_all();
    }

    /// The VM is over and its backends were told to disconnect: waits until `deadline`
    /// for the supervisor to reap its worker (and discard its spare). True once it ended,
    /// so no process of this disk holds the image (or its lock) any more.
    pub fn wait_ended(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while !st.ended {
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
        let st = self.lock();
        for fd in [&st.confined, &st.reaper].into_iter().flatten() {
            kill(fd);
        }
    }

    /// What the control API reports about the disk.
    pub fn state(&self) -> DiskState {
        let st = self.lock();
        let serving = st.reaper.is_some() && !st.ended;
        DiskState {
            worker_pid: serving.then_some(st.worker_pid),
            mode: match (serving, st.failing) {
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
        let mut st = self.lock();
        let (Some(reaper), false) = (st.reaper.clone(), st.ended) else {
            return Err(RestartError::NoWorker);
        };
        let generation = st.generation;
        st.planned = true;
        if let Some(c) = &st.confined {
            kill(c);
        }
        kill(&reaper);
        while st.generation == generation && !st.ended {
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
        if st.ended {
            return Err(RestartError::NoWorker);
        }
        Ok((st.worker_pid, started.elapsed()))
    }
}

/// Everything needed to start a disk's worker again.
#[derive(Debug)]
pub struct Supervisor {
    pub cfg: DiskConfig,
    pub image: Arc<OpenedImage>,
    pub bin: PathBuf,
    pub learn: Option<Arc<policies::learn::Recorder>>,
    pub violations: Arc<ViolationLog>,
    pub device: Arc<VirtioMmioDevice>,
    /// Guest RAM, to see whether requests are pending (ring indices only).
    pub ram: Arc<crate::memory::GuestRam>,
    /// What the first worker offered; a successor must offer the same.
    pub features: u64,
    pub config: Vec<u8>,
    /// Shared with the control API.
    pub control: Arc<DiskControl>,
    /// Duplicates of the queues' kick eventfds: a kick the worker has not read yet is work
    /// it was told about (polled, never read: reading would take the kick from it).
    pub kicks: Vec<vmm_sys_util::eventfd::EventFd>,
}

/// Whether the kick of one of `queues` (the rings the driver set up; the worker never
/// reads the others') holds a kick nobody has read.
fn kick_unread(kicks: &[vmm_sys_util::eventfd::EventFd], queues: &[usize]) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = queues
        .iter()
        .filter_map(|&q| kicks.get(q))
        .map(|k| libc::pollfd {
            fd: k.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll on descriptors we own, through a live array of fds.len() entries, with
    // no timeout.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    n > 0 && fds.iter().any(|f| f.revents & libc::POLLIN != 0)
}

/// The scheduler state of process `pid` (/proc/PID/stat: `R`, `S`, `D` waiting for the
/// disk, `T` stopped, ...).
fn proc_state(pid: u32) -> Option<char> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
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

/// Waits up to `timeout` for the process behind `pidfd` to exit; true when it has.
pub fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    wait_any_exit(&[pidfd], timeout)
}

/// Waits up to `timeout` for any of the processes behind `pidfds` to exit.
fn wait_any_exit(pidfds: &[&OwnedFd], timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = pidfds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: polls valid pollfds in a vector that outlives the call, with its length.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if ret >= 0 {
            return ret > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// SIGKILL through a pidfd (no pid-reuse race); false if the process is already gone.
pub fn kill(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal on a pidfd we hold; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    ret == 0
}

/// Kills a worker, its confined process first, and waits for its reaper to be gone.
fn stop(reaper: &OwnedFd, confined: Option<&OwnedFd>) {
    if let Some(c) = confined {
        kill(c);
    }
    kill(reaper);
    wait_exit(reaper, Duration::from_secs(5));
}

/// A pidfd on the confined worker (the reaper's child), once the reaper has published
/// its pid in the status page.
fn confined_pidfd(worker: &Worker, timeout: Duration) -> Option<OwnedFd> {
    let deadline = Instant::now() + timeout;
    loop {
        let pid = worker.status.worker_pid();
        if pid != 0 && pid != worker.child.id() {
            return child_pidfd(pid, worker.child.id());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A pidfd on `pid` if that is (still) a living child of `parent`: a pid read from the
/// status page is free for reuse once the reaper has reaped its child, and a pidfd on a
/// stranger must never be signalled.
fn child_pidfd(pid: u32, parent: u32) -> Option<OwnedFd> {
    let fd = pidfd_open(pid).ok()?;
    // The pidfd pins the process; /proc then speaks of it unless it has already exited,
    // which the check after the read catches.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    (ppid == Some(parent) && !wait_exit(&fd, Duration::ZERO)).then_some(fd)
}

/// The pid to show for a worker: the confined process once its reaper has published it.
fn shown_pid(worker: &Worker) -> u32 {
    match worker.status.worker_pid() {
        0 => worker.child.id(),
        pid => pid,
    }
}

/// Kills and reaps a worker that will not serve (a spare no longer wanted, or one that
/// failed its setup).
fn discard(worker: Option<Worker>) {
    if let Some(mut w) = worker {
        // The confined process holds the image too: wait for it, not only its reaper.
        let confined = match w.status.worker_pid() {
            pid if pid != 0 && pid != w.child.id() => child_pidfd(pid, w.child.id()),
            _ => None,
        };
        if let Some(c) = &confined {
            kill(c);
        }
        let _ = w.child.kill();
        let _ = w.child.wait();
        if let Some(c) = &confined {
            wait_exit(c, Duration::from_secs(5));
        }
    }
}

/// How a supervised worker's life ended, for the budget.
struct Ended {
    /// It completed a request (or was stopped on purpose).
    served: bool,
    /// A planned restart stopped it.
    planned: bool,
}

/// What ended a supervised worker.
enum End {
    /// It exited or was killed from outside.
    Died,
    /// Its progress stopped with requests pending: we killed it.
    Hung { stalled: Duration },
    /// It was in fail mode and the guest reset the device: we stopped it.
    Recovering,
}

/// The worker being watched.
struct Current {
    worker: Worker,
    /// Its reaper's pidfd (None if pidfd_open failed: then only wait() tells its end).
    pidfd: Option<Arc<OwnedFd>>,
    /// The confined process under the reaper.
    confined: Option<Arc<OwnedFd>>,
    mode: ServeMode,
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

    fn run(self, worker: Worker, pidfd: Option<Arc<OwnedFd>>) {
        let id = self.cfg.id.clone();
        crate::vm::report_confinement(&id, worker.child.id(), &worker.status);
        let confined = confined_pidfd(&worker, Duration::from_secs(5)).map(Arc::new);
        self.control
            .publish(pidfd.clone(), confined.clone(), shown_pid(&worker));
        let mut current = Current {
            worker,
            pidfd,
            confined,
            mode: ServeMode::Normal,
        };
        // Workers in a row (of the current mode) that ended before serving a request.
        let mut crash_loop = 0u32;
        let mut recent_restarts = std::collections::VecDeque::new();
        let throttled = crate::ratelimit::RateLimitedLog::default();
        // Started and sandboxed ahead of need: a restart then skips exec and sandbox setup.
        let mut spare = self.start_spare();
        loop {
            let ended = self.end_of(&mut current);
            let died_at = Instant::now();
            if self.device.closing() {
                discard(spare.take());
                self.control.end();
                return;
            }
            if ended.planned {
                // A planned restart picks up a replaced binary: the spare runs the old one.
                discard(spare.take());
            }
            let served = ended.served;
            let mut mode = current.mode;
            if self.control.take_recover() {
                tracing::info!("disk {id}: the guest reset the device: starting a normal worker");
                mode = ServeMode::Normal;
                crash_loop = 0;
            } else if served {
                crash_loop = 0;
            } else {
                crash_loop += 1;
            }
            // Start a successor; a failed start counts as a death before service.
            current = loop {
                if self.device.closing() {
                    // The VM ended during the restart: no successor.
                    discard(spare.take());
                    self.control.end();
                    return;
                }
                if crash_loop > CRASH_LOOP_BUDGET {
                    match mode {
                        ServeMode::Normal => {
                            tracing::error!(
                                "disk {id}: {crash_loop} workers in a row ended before serving \
                                 a request: giving up; the device needs a reset, and a worker in \
                                 fail mode answers its requests with errors until then"
                            );
                            self.control.set_failing();
                            self.device.needs_reset();
                            mode = ServeMode::Fail;
                            crash_loop = 0;
                            discard(spare.take());
                        }
                        ServeMode::Fail => {
                            tracing::error!(
                                "disk {id}: fail-mode workers end too: the disk has no worker \
                                 until the guest resets the device"
                            );
                            self.control.publish(None, None, 0);
                            if !self.idle_until_recovery() {
                                self.control.end();
                                return;
                            }
                            tracing::info!(
                                "disk {id}: the guest reset the device: starting a normal worker"
                            );
                            mode = ServeMode::Normal;
                            crash_loop = 0;
                        }
                    }
                }
                if crash_loop >= 2 {
                    std::thread::sleep(FIRST_BACKOFF * (1 << (crash_loop - 2).min(8)));
                }
                let wait = restart_wait(&mut recent_restarts, Instant::now());
                if !wait.is_zero() {
                    throttled.log(format_args!(
                        "disk {id}: {MAX_RESTARTS} restarts in the last {} s: the next waits \
                         {:.1} s",
                        RESTART_WINDOW.as_secs(),
                        wait.as_secs_f64()
                    ));
                    let until = Instant::now() + wait;
                    while Instant::now() < until && !self.device.closing() {
                        std::thread::sleep(HANG_CHECK.min(until - Instant::now()));
                    }
                    continue;
                }
                recent_restarts.push_back(Instant::now());
                let ready = match mode {
                    ServeMode::Normal => spare.take(),
                    ServeMode::Fail => None,
                };
                match self.replace(mode, ready) {
                    Ok(next) => {
                        let looping = if crash_loop > 0 {
                            format!("; {crash_loop} in a row died before serving")
                        } else {
                            String::new()
                        };
                        let started = died_at.elapsed();
                        let rings = self.rings_resumed(&next, died_at);
                        tracing::warn!(
                            "disk {id}: {} in {:.1} ms (pid {}{looping}){rings}",
                            match mode {
                                ServeMode::Normal => "worker restarted",
                                ServeMode::Fail => "fail-mode worker started",
                            },
                            started.as_secs_f64() * 1e3,
                            shown_pid(&next.worker),
                        );
                        self.control.publish(
                            next.pidfd.clone(),
                            next.confined.clone(),
                            shown_pid(&next.worker),
                        );
                        if mode == ServeMode::Normal && spare.is_none() {
                            spare = self.start_spare();
                        }
                        break next;
                    }
                    Err(e) => {
                        tracing::error!("disk {id}: cannot start a successor: {e}");
                        crash_loop += 1;
                    }
                }
            };
        }
    }

    /// A spare worker, if the disk wants one (never in learn mode, which records every
    /// worker to its normal end).
    fn start_spare(&self) -> Option<Worker> {
        if !self.cfg.spare || self.learn.is_some() {
            return None;
        }
        match crate::worker::spawn(&self.cfg, &self.image, &self.bin, None, ServeMode::Normal) {
            Ok(w) => {
                tracing::debug!("disk {}: spare worker pid {}", self.cfg.id, w.child.id());
                Some(w)
            }
            Err(e) => {
                tracing::warn!(
                    "disk {}: cannot start a spare worker: {}",
                    self.cfg.id,
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// Waits for `current` to end (or ends it: hung, or replaced after a guest reset),
    /// reaps it and says how it ended.
    fn end_of(&self, current: &mut Current) -> Ended {
        let id = &self.cfg.id;
        let worker = &mut current.worker;
        let end = match &current.pidfd {
            Some(fd) => self.watch(fd, current.confined.as_deref(), worker),
            // Without a pidfd, child.wait() below blocks just the same.
            None => End::Died,
        };
        // The reaper is gone; its child (killed by the reaper's death signal if not
        // before) must be too before a successor touches the rings.
        if let Some(c) = &current.confined {
            kill(c);
            wait_exit(c, Duration::from_secs(5));
        }
        let waited = worker.child.wait();
        let how = match &waited {
            Ok(s) => crate::vm::describe_exit(*s),
            Err(e) => format!("cannot be waited for: {e}"),
        };
        let reaper_exit = waited.as_ref().ok().copied();
        // The VM is over and told it to go: a clean exit is the expected end (anything
        // else, a policy violation above all, is still reported).
        let ended_with_vm = self.device.closing()
            && waited.as_ref().is_ok_and(|s| s.success())
            && worker.status.violation().is_none();
        let planned = self.control.take_planned();
        let on_purpose = match &end {
            End::Recovering => true,
            End::Died => planned || self.control.recover_requested(),
            End::Hung { .. } => false,
        };
        if ended_with_vm {
            tracing::info!("worker {id} (pid {}) ended with the VM", shown_pid(worker));
        } else if on_purpose {
            tracing::info!(
                "worker {id} (pid {}) stopped {}",
                shown_pid(worker),
                if planned {
                    "for a planned restart"
                } else {
                    "after the guest reset its device"
                }
            );
        } else {
            let how = match &end {
                End::Hung { stalled } => format!(
                    "hung (no progress for {:.1} s with requests pending; killed)",
                    stalled.as_secs_f64()
                ),
                _ => how,
            };
            crate::vm::report_worker_end(id, &worker.status, &how, reaper_exit, &self.violations);
        }
        // Requests answered with an error count as served: the worker ran its loop.
        Ended {
            served: on_purpose || worker.status.completed() + worker.status.failed() > 0,
            planned,
        }
    }

    /// With no worker left to start: waits for the guest to reset the device (true) or the
    /// VM to close (false).
    fn idle_until_recovery(&self) -> bool {
        loop {
            if self.control.wait_recover(HANG_CHECK) {
                return self.control.take_recover();
            }
            if self.device.closing() {
                return false;
            }
        }
    }

    /// After a successor was handed its rings: waits briefly for it to start them, and
    /// says when it did and how many requests it resubmitted (for the restart's log line).
    fn rings_resumed(&self, next: &Current, died_at: Instant) -> String {
        let rings = self.device.driver_rings() as u64;
        if rings == 0 {
            return String::new();
        }
        let deadline = Instant::now() + RESUME_WAIT;
        let status = &next.worker.status;
        while status.rings_started() < rings {
            if next
                .pidfd
                .as_deref()
                .is_some_and(|fd| wait_exit(fd, Duration::ZERO))
            {
                return "; it ended before its rings were up".into();
            }
            if Instant::now() >= deadline {
                return format!("; its rings were not up after {RESUME_WAIT:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        format!(
            ", rings resumed at {:.1} ms: {} request(s) resubmitted",
            died_at.elapsed().as_secs_f64() * 1e3,
            status.resubmitted()
        )
    }

    /// Waits for the worker (its reaper, `pidfd`) to end, or kills it when it hangs: its
    /// progress counter stands still for [`HANG_TIMEOUT`] while requests are pending that
    /// it was told about.
    fn watch(&self, pidfd: &OwnedFd, confined: Option<&OwnedFd>, worker: &Worker) -> End {
        let mut progress = worker.status.progress();
        let mut since = Instant::now();
        let mut broken = 0;
        // The confined worker's own end is seen at once, not after its reaper reacts.
        let watched: Vec<&OwnedFd> = std::iter::once(pidfd).chain(confined).collect();
        loop {
            if wait_any_exit(&watched, HANG_CHECK) {
                return End::Died;
            }
            if self.control.recover_requested() {
                stop(pidfd, confined);
                return End::Recovering;
            }
            // A ring the driver corrupted: the device needs a reset (virtio 1.2, 2.1.2),
            // which only the transport can say; the worker stopped serving that ring.
            let now_broken = worker.status.rings_broken();
            if now_broken > broken {
                broken = now_broken;
                self.device.guest_errors.log(format_args!(
                    "disk {}: the driver corrupted a ring (its worker stopped serving it): \
                     the device needs a reset",
                    self.cfg.id
                ));
                self.device.needs_reset();
            }
            let now = worker.status.progress();
            if now != progress || !self.device.requests_pending(self.ram.memory()) {
                progress = now;
                since = Instant::now();
                continue;
            }
            // Requests pending and no progress: the worker's fault only if it was told
            // about them and is not waiting for the disk. Asleep (until a kick, a
            // completion or a message) with no kick unread, it waits for the driver, which
            // published requests without a kick (a hostile or broken guest), or for the
            // disk to complete what is in flight; in uninterruptible sleep it is in the
            // middle of a slow disk operation (a big flush). Neither is a hang.
            // Stopped (SIGSTOP, a debugger), it reads nothing, however it went to sleep.
            let state = proc_state(worker.status.worker_pid());
            let stopped = matches!(state, Some('T' | 't'));
            let kicked = kick_unread(&self.kicks, &self.device.ready_queues());
            if (worker.status.idle() && !kicked && !stopped) || state == Some('D') {
                since = Instant::now();
                continue;
            }
            let stalled = since.elapsed();
            if stalled >= HANG_TIMEOUT {
                tracing::warn!(
                    "disk {}: worker (pid {}) made no progress for {:.1} s with requests \
                     pending: killing it",
                    self.cfg.id,
                    worker.status.worker_pid(),
                    stalled.as_secs_f64()
                );
                stop(pidfd, confined);
                return End::Hung { stalled };
            }
        }
    }

    /// Starts a successor (or takes `spare`, started earlier in `mode`) and hands it, set
    /// up, to the control thread.
    fn replace(&self, mode: ServeMode, spare: Option<Worker>) -> Result<Current, String> {
        let id = &self.cfg.id;
        let from_spare = spare.is_some();
        let w = match spare {
            Some(w) => w,
            None => {
                crate::worker::spawn(&self.cfg, &self.image, &self.bin, self.learn.as_ref(), mode)
                    .map_err(|e| crate::error_chain(&e))?
            }
        };
        let pidfd = pidfd_open(w.child.id()).ok().map(Arc::new);
        let stream = w
            .vhost
            .try_clone()
            .map_err(|e| format!("clone the vhost-user socket: {e}"))?;
        let backend = match crate::vhost_frontend::setup(id, stream, self.cfg.num_queues) {
            Ok(b) => b,
            Err(e) if from_spare => {
                // It waited unwatched; whatever became of it, a fresh worker will do. If it
                // ended by itself, say how (a policy violation is kept like any other).
                let mut w = w;
                if let Ok(Some(exit)) = w.child.try_wait() {
                    let how = format!("(spare) {}", crate::vm::describe_exit(exit));
                    crate::vm::report_worker_end(id, &w.status, &how, Some(exit), &self.violations);
                }
                tracing::warn!(
                    "disk {id}: the spare worker (pid {}) failed its setup: {}; starting a \
                     fresh one",
                    shown_pid(&w),
                    crate::error_chain(&e)
                );
                discard(Some(w));
                return self.replace(mode, None);
            }
            Err(e) => {
                discard(Some(w));
                return Err(crate::error_chain(&e));
            }
        };
        if backend.features != self.features || backend.config != self.config {
            discard(Some(w));
            return Err(format!(
                "the successor offers another device (features {:#x}, was {:#x})",
                backend.features, self.features
            ));
        }
        if !self.device.reconnect_backend(backend, pidfd.clone(), mode) {
            discard(Some(w));
            return Err("the device's control thread is gone".into());
        }
        let confined = confined_pidfd(&w, Duration::from_secs(1)).map(Arc::new);
        Ok(Current {
            worker: w,
            pidfd,
            confined,
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_wait_for_room_in_their_window() {
        let mut recent = std::collections::VecDeque::new();
        let t0 = Instant::now();
        for i in 0..MAX_RESTARTS {
            let now = t0 + Duration::from_millis(i as u64);
            assert_eq!(restart_wait(&mut recent, now), Duration::ZERO);
            recent.push_back(now);
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(
            restart_wait(&mut recent, now),
            RESTART_WINDOW - Duration::from_secs(1)
        );
        assert_eq!(
            restart_wait(&mut recent, t0 + RESTART_WINDOW),
            Duration::ZERO
        );
    }
}
