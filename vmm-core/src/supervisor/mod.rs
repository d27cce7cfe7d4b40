//! Keeps a disk's worker alive under a running guest: the supervisor alone starts, ends
//! and replaces a disk's workers. When a worker ends (crash, seccomp violation, OOM kill,
//! kill -9, a hang, or a failed command its frontend reported), the supervisor says how,
//! asks its [`policy::RestartPolicy`] what next, starts a successor with the same disk,
//! takes it through the same vhost-user setup, checks it offers the same device, and
//! hands it to the device's frontend thread, which replays what the driver had set up
//! (including the inflight region, so the successor resubmits what was in flight).
//!
//! Past the crash-loop budget the device reports DEVICE_NEEDS_RESET and gets a worker in
//! fail mode (same sandbox, same inflight region, no disk), which completes every pending
//! and new request with IOERR, so the guest sees errors, never a hang. The guest's reset
//! of the device brings a normal worker back.

pub mod counters;
pub mod handle;
pub mod policy;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::messages::ServeMode;

use crate::devices::virtio_mmio::VirtioMmioDevice;
use crate::disk::config::WorkerDisk;
use crate::disk::image::OpenedImage;
use crate::pids::{self, kill, wait_any_exit, wait_exit};
use crate::vhost_frontend::FrontendHandle;
use crate::violations::ViolationLog;
use crate::worker::Worker;
pub use handle::{DiskHandle, DiskPhase, DiskState, ResizeError, Resized, RestartError, SizeRules};
use policy::{RestartPolicy, Step, MAX_RESTARTS, RESTART_WINDOW};

/// A worker whose progress counter stands still this long while the guest has requests
/// pending and the worker was told about them (it is busy, or asleep with a kick unread,
/// or stopped; see `watch`) is hung: killed and replaced. Well below the guest drivers'
/// request timeouts (Linux: 30 s; the test guest: 10 s).
pub const HANG_TIMEOUT: Duration = Duration::from_secs(1);
/// The same for a disk an NBD server serves: its worker waits for the server in a plain
/// socket read (not the uninterruptible sleep of a slow local disk, which is never taken
/// for a hang), and a request over a network (a 32 MiB read, a flush of a big cache) may
/// take seconds. Below Linux's request timeout (30 s).
pub const NBD_HANG_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the supervisor looks at a live worker's progress.
const HANG_CHECK: Duration = Duration::from_millis(100);
/// How long a restart's log line waits for the successor's rings to be up.
const RESUME_WAIT: Duration = Duration::from_millis(200);

/// Everything needed to start a disk's worker again.
#[derive(Debug)]
pub struct Supervisor {
    pub disk: WorkerDisk,
    pub image: Arc<OpenedImage>,
    pub bin: PathBuf,
    pub learn: Option<Arc<policies::learn::Recorder>>,
    pub violations: Arc<ViolationLog>,
    /// Restarts, hangs, violations and fail mode, for `GET /v1/events`.
    pub events: Arc<crate::events::EventLog>,
    pub device: Arc<VirtioMmioDevice>,
    /// Guest RAM, to see whether requests are pending (ring indices only).
    pub ram: Arc<crate::memory::GuestRam>,
    /// What the first worker offered; a successor must offer the same.
    pub features: u64,
    pub config: Vec<u8>,
    /// Shared with the control API and the frontend thread.
    pub handle: Arc<DiskHandle>,
    /// The rate limit of the disk's workers' output, shared by all of them.
    pub output: Arc<crate::ratelimit::RateLimitedLog>,
    /// The device's frontend thread: successors are handed to it.
    pub frontend: Arc<FrontendHandle>,
    /// Duplicates of the queues' kick eventfds: a kick the worker has not read yet is work
    /// it was told about (polled, never read: reading would take the kick from it).
    pub kicks: Vec<vmm_sys_util::eventfd::EventFd>,
}

/// The capacity field of a virtio-blk config space (sectors, little-endian at byte 0).
fn config_capacity(config: &[u8]) -> u64 {
    let mut field = [0u8; 8];
    for (to, from) in field.iter_mut().zip(config) {
        *to = *from;
    }
    u64::from_le_bytes(field)
}

/// `config` with its capacity field set to `sectors`.
fn with_capacity(config: &[u8], sectors: u64) -> Vec<u8> {
    let mut out = config.to_vec();
    for (to, from) in out.iter_mut().zip(sectors.to_le_bytes()) {
        *to = from;
    }
    out
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

/// Kills a worker, its confined process first, and waits for its reaper to be gone.
fn stop(reaper: &OwnedFd, confined: Option<&OwnedFd>) {
    if let Some(c) = confined {
        kill(c);
    }
    kill(reaper);
    wait_exit(reaper, Duration::from_secs(5));
}

/// The confined worker, known to the VMM by a pidfd on it and its /proc/PID/stat, both
/// opened by the spawner (a confined supervisor opens neither).
#[derive(Debug, Clone)]
struct Confined {
    pid: u32,
    fd: Arc<OwnedFd>,
    stat: Arc<std::fs::File>,
}

/// A pidfd on the confined worker once the reaper has published its pid in the status
/// page, if that pid really is the reaper's child: the page is the worker's word, and
/// the pid a compromised worker writes there is never shown, watched or signalled.
fn confined(worker: &Worker, timeout: Duration) -> Option<Confined> {
    let deadline = Instant::now() + timeout;
    loop {
        let pid = worker.status.worker_pid();
        if pid != 0 && pid != worker.child.id() {
            let found = crate::spawner::inspect(&worker.child, pid)?;
            return Some(Confined {
                pid,
                fd: Arc::new(found.pidfd),
                stat: Arc::new(found.stat),
            });
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills and reaps a worker that will not serve (a spare no longer wanted, or one that
/// failed its setup).
fn discard(worker: Option<Worker>) {
    if let Some(mut w) = worker {
        // The confined process holds the image too: wait for it, not only its reaper.
        let confined = match w.status.worker_pid() {
            pid if pid != 0 && pid != w.child.id() => {
                crate::spawner::inspect(&w.child, pid).map(|found| found.pidfd)
            }
            _ => None,
        };
        // The reaper first: a worker that never served has no end worth reporting, and a
        // reaper that saw its worker killed would say so on the VMM's stderr. Its death
        // signal ends the confined process; killed again in case it did not.
        let _ = w.child.kill();
        let _ = w.child.wait();
        if let Some(c) = &confined {
            kill(c);
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
    /// Why it is replaced (see [`counters::CAUSES`]); None when it ended with the VM.
    cause: Option<&'static str>,
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
    confined: Option<Confined>,
    /// The generation of the disk's limits the worker has (None: unknown, as for a spare
    /// started before the last change; it is sent them at once).
    limits: Option<u64>,
    /// The resize it was started to do (its number), if any.
    resized: Option<u64>,
}

impl Current {
    /// The pid the VMM shows for the worker: its confined process (checked to be the
    /// reaper's child), else the reaper it spawned.
    fn pid(&self) -> u32 {
        self.confined
            .as_ref()
            .map_or(self.worker.child.id(), |c| c.pid)
    }

    fn confined_fd(&self) -> Option<Arc<OwnedFd>> {
        self.confined.as_ref().map(|c| c.fd.clone())
    }
}

impl Supervisor {
    /// Adopts the disk's first worker (set up, not yet handed to a frontend thread):
    /// publishes it in the handle and returns its generation, for the frontend thread.
    /// Then watches it on a thread of its own, and its successors after it.
    pub fn start(self, worker: Worker, pidfd: Option<Arc<OwnedFd>>) -> std::io::Result<u64> {
        // The first worker started with the configuration's limits, and offered the size
        // its config space says.
        self.handle.init_rate_limit(self.disk.image.rate_limit);
        self.handle.init_size(
            config_capacity(&self.config) * ipc::messages::SECTOR_SIZE,
            SizeRules {
                fixed: if self.disk.image.nbd.is_some() {
                    Some("is an NBD server's export")
                } else {
                    self.disk.image.readonly.then_some("is read-only")
                },
                direct: self.disk.image.direct,
            },
        );
        let current = Current {
            confined: confined(&worker, Duration::from_secs(5)),
            worker,
            pidfd,
            limits: Some(0),
            resized: None,
        };
        let generation =
            self.handle
                .publish(current.pidfd.clone(), current.confined_fd(), current.pid());
        self.handle.counters().worker_started(
            current.worker.status.clone(),
            current.confined.as_ref().map(|c| c.stat.clone()),
        );
        let name = format!("{}-sup", self.disk.id);
        crate::thread::spawn(name, crate::confine::VmmThread::Supervisor, move || {
            self.run(current)
        })
        .map(|_| generation)
    }

    fn run(self, mut current: Current) {
        let id = self.disk.id.clone();
        let confined_pid = current.confined.as_ref().map(|c| c.pid);
        crate::report::report_confinement(&id, confined_pid, |pid| {
            crate::spawner::inspect(&current.worker.child, pid).and_then(|found| found.facts)
        });
        let mut policy = RestartPolicy::default();
        let throttled = crate::ratelimit::RateLimitedLog::default();
        // Started and sandboxed ahead of need: a restart then skips exec and sandbox setup.
        let mut spare = self.start_spare();
        loop {
            let ended = self.end_of(&mut current);
            let died_at = Instant::now();
            if self.frontend.closing() {
                discard(spare.take());
                self.handle.end();
                return;
            }
            if ended.planned {
                // A planned restart picks up a replaced binary: the spare runs the old one.
                discard(spare.take());
            }
            if self.handle.take_recover() {
                tracing::info!("disk {id}: the guest reset the device: starting a normal worker");
                self.events
                    .emit("guest_reset", Some(&id), serde_json::json!({}));
                policy.guest_reset();
            } else {
                policy.worker_ended(ended.served);
            }
            // Start a successor; a failed start counts as a death before service.
            current = loop {
                if self.frontend.closing() {
                    // The VM ended during the restart: no successor.
                    discard(spare.take());
                    self.handle.end();
                    return;
                }
                let (mode, backoff) = match policy.next(Instant::now()) {
                    Step::Start { mode, backoff } => (mode, backoff),
                    Step::EnterFailMode => {
                        tracing::error!(
                            "disk {id}: {} workers in a row ended before serving a request: \
                             giving up; the device needs a reset, and a worker in fail mode \
                             answers its requests with errors until then",
                            policy::CRASH_LOOP_BUDGET + 1
                        );
                        self.handle.set_failing();
                        self.handle
                            .fail_pending_resize("the disk's workers keep failing");
                        self.events.emit(
                            "fail_mode",
                            Some(&id),
                            serde_json::json!({ "crash_loop": policy::CRASH_LOOP_BUDGET + 1 }),
                        );
                        self.device.needs_reset();
                        discard(spare.take());
                        continue;
                    }
                    Step::NoWorker => {
                        tracing::error!(
                            "disk {id}: fail-mode workers end too: the disk has no worker \
                             until the guest resets the device"
                        );
                        self.handle.publish(None, None, 0);
                        if !self.idle_until_recovery() {
                            self.handle.end();
                            return;
                        }
                        tracing::info!(
                            "disk {id}: the guest reset the device: starting a normal worker"
                        );
                        policy.guest_reset();
                        continue;
                    }
                    Step::Throttled(wait) => {
                        throttled.log(format_args!(
                            "disk {id}: {MAX_RESTARTS} restarts in the last {} s: the next \
                             waits {:.1} s",
                            RESTART_WINDOW.as_secs(),
                            wait.as_secs_f64()
                        ));
                        let until = Instant::now() + wait;
                        while Instant::now() < until && !self.frontend.closing() {
                            std::thread::sleep(HANG_CHECK.min(until - Instant::now()));
                        }
                        continue;
                    }
                };
                // Backing off, but not past the VM's end.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !self.frontend.closing() {
                    std::thread::sleep(HANG_CHECK.min(until - Instant::now()));
                }
                if self.frontend.closing() {
                    continue;
                }
                let ready = match mode {
                    ServeMode::Normal => spare.take(),
                    ServeMode::Fail => None,
                };
                match self.replace(mode, ready) {
                    Ok(next) => {
                        let looping = match policy.crash_loop() {
                            0 => String::new(),
                            n => format!("; {n} in a row died before serving"),
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
                            next.pid(),
                        );
                        let cause = ended.cause.unwrap_or("exited");
                        self.handle.counters().restarted(cause);
                        self.events.emit(
                            "restart",
                            Some(&id),
                            serde_json::json!({
                                "cause": cause,
                                "pid": next.pid(),
                                "mode": match mode {
                                    ServeMode::Normal => "normal",
                                    ServeMode::Fail => "fail",
                                },
                                "restart_ms": (started.as_secs_f64() * 1e4).round() / 10.0,
                            }),
                        );
                        if mode == ServeMode::Normal && spare.is_none() {
                            spare = self.start_spare();
                        }
                        break next;
                    }
                    Err(e) => {
                        tracing::error!("disk {id}: cannot start a successor: {e}");
                        policy.start_failed();
                    }
                }
            };
        }
    }

    /// A spare worker, if the disk wants one (never in learn mode, which records every
    /// worker to its normal end).
    fn start_spare(&self) -> Option<Worker> {
        if !self.disk.image.spare || self.learn.is_some() {
            return None;
        }
        match crate::worker::spawn(
            &self.disk_now().0,
            &self.image,
            &self.bin,
            None,
            ServeMode::Normal,
            &self.output,
        ) {
            Ok(w) => {
                tracing::debug!("disk {}: spare worker pid {}", self.disk.id, w.child.id());
                Some(w)
            }
            Err(e) => {
                tracing::warn!(
                    "disk {}: cannot start a spare worker: {}",
                    self.disk.id,
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// Waits for `current` to end (or ends it: hung, or replaced after a guest reset),
    /// reaps it and says how it ended.
    fn end_of(&self, current: &mut Current) -> Ended {
        let id = &self.disk.id;
        let pid = current.pid();
        let end = match &current.pidfd {
            Some(fd) => self.watch(
                fd,
                current.confined.as_ref(),
                &current.worker,
                &mut current.limits,
                current.resized,
            ),
            // Without a pidfd, child.wait() below blocks just the same.
            None => End::Died,
        };
        // The reaper is gone; its child (killed by the reaper's death signal if not
        // before) must be too before a successor touches the rings.
        if let Some(c) = &current.confined {
            kill(&c.fd);
            wait_exit(&c.fd, Duration::from_secs(5));
        }
        let worker = &mut current.worker;
        let waited = worker.child.wait();
        let how = match &waited {
            Ok(s) => crate::report::describe_exit(*s),
            Err(e) => format!("cannot be waited for: {e}"),
        };
        let reaper_exit = waited.as_ref().ok().copied();
        // The VM is over and told it to go: a clean exit is the expected end (anything
        // else, a policy violation above all, is still reported).
        let ended_with_vm = self.frontend.closing()
            && waited.as_ref().is_ok_and(|s| s.success())
            && worker.status.violation().is_none();
        self.handle.counters().worker_ended();
        let planned = self.handle.take_planned();
        let on_purpose = match &end {
            End::Recovering => true,
            End::Died => planned || self.handle.recover_requested(),
            End::Hung { .. } => false,
        };
        let cause = if ended_with_vm {
            tracing::info!("worker {id} (pid {pid}) ended with the VM");
            None
        } else if on_purpose {
            tracing::info!(
                "worker {id} (pid {pid}) stopped {}",
                if planned {
                    "for a planned restart"
                } else {
                    "after the guest reset its device"
                }
            );
            Some(if planned { "planned" } else { "guest_reset" })
        } else {
            let how = match &end {
                End::Hung { stalled } => format!(
                    "hung (no progress for {:.1} s with requests pending; killed)",
                    stalled.as_secs_f64()
                ),
                _ => how,
            };
            let ended = crate::report::report_worker_end(
                id,
                pid,
                &worker.status,
                &how,
                reaper_exit,
                &self.violations,
            );
            if let End::Hung { stalled } = &end {
                self.handle.counters().hung();
                self.events.emit(
                    "hang",
                    Some(id),
                    serde_json::json!({ "pid": pid, "stalled_ms": stalled.as_millis() as u64 }),
                );
                Some("hang")
            } else {
                if ended.cause == "violation" {
                    self.handle.counters().violated();
                    self.events.emit(
                        "violation",
                        Some(id),
                        serde_json::json!({ "pid": pid, "policy": "blk/main", "call": ended.call }),
                    );
                }
                Some(ended.cause)
            }
        };
        // Requests answered with an error count as served: the worker ran its loop.
        Ended {
            served: on_purpose || worker.status.completed() + worker.status.failed() > 0,
            planned,
            cause,
        }
    }

    /// With no worker left to start: waits for the guest to reset the device (true) or the
    /// VM to close (false).
    fn idle_until_recovery(&self) -> bool {
        loop {
            if self.handle.wait_recover(HANG_CHECK) {
                return self.handle.take_recover();
            }
            if self.frontend.closing() {
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
    fn watch(
        &self,
        pidfd: &OwnedFd,
        known: Option<&Confined>,
        worker: &Worker,
        limits: &mut Option<u64>,
        resized: Option<u64>,
    ) -> End {
        let confined = known.map(|c| &*c.fd);
        // The pid the VMM knows (the reaper's child), never the one the page claims.
        let pid = known.map_or(worker.child.id(), |c| c.pid);
        let mut progress = worker.status.progress();
        let mut since = Instant::now();
        let mut broken = 0;
        // The confined worker's own end is seen at once, not after its reaper reacts.
        let watched: Vec<&OwnedFd> = std::iter::once(pidfd).chain(confined).collect();
        loop {
            self.push_rate_limit(worker, limits);
            // A resize asked for while this worker was being started: it did not do it,
            // so it makes way for one that does (a planned restart).
            if self
                .handle
                .pending_resize()
                .is_some_and(|(n, _)| resized != Some(n))
            {
                self.handle.stop_for_resize();
            }
            if wait_any_exit(&watched, HANG_CHECK) {
                return End::Died;
            }
            self.handle.counters().sample();
            if self.handle.recover_requested() {
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
                    self.disk.id
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
            let state = known.and_then(|c| pids::stat_state(&c.stat));
            let stopped = matches!(state, Some('T' | 't'));
            let kicked = kick_unread(&self.kicks, &self.device.ready_queues());
            if (worker.status.idle() && !kicked && !stopped) || state == Some('D') {
                since = Instant::now();
                continue;
            }
            let stalled = since.elapsed();
            let hang_timeout = if self.disk.image.nbd.is_some() {
                NBD_HANG_TIMEOUT
            } else {
                HANG_TIMEOUT
            };
            if stalled >= hang_timeout {
                tracing::warn!(
                    "disk {}: worker (pid {}) made no progress for {:.1} s with requests \
                     pending: killing it",
                    self.disk.id,
                    pid,
                    stalled.as_secs_f64()
                );
                stop(pidfd, confined);
                return End::Hung { stalled };
            }
        }
    }

    /// The disk as a new worker is to be started now: with the limits in force, and
    /// their generation.
    fn disk_now(&self) -> (WorkerDisk, u64) {
        let (limit, generation) = self.handle.rate_limit();
        let mut disk = self.disk.clone();
        disk.image.rate_limit = limit;
        (disk, generation)
    }

    /// Sends the worker the disk's limits if they changed since it got them (the API
    /// waits for this). A worker that cannot take them is left to its supervisor's other
    /// checks: it will be replaced, and its successor starts with them.
    fn push_rate_limit(&self, worker: &Worker, sent: &mut Option<u64>) {
        let (limit, generation) = self.handle.rate_limit();
        if *sent == Some(generation) {
            return;
        }
        // Never blocks: a worker that stops reading its channel must not stall its
        // supervisor's watch; the change is retried at the next look.
        match worker
            .control
            .try_send(&ipc::messages::VmmMessage::SetRateLimit(limit))
        {
            Ok(()) => {
                tracing::info!(
                    "disk {}: rate limit now {}",
                    self.disk.id,
                    crate::disk::config::describe_limit(&limit)
                );
                *sent = Some(generation);
                self.handle.rate_limit_applied(generation);
            }
            Err(ipc::channel::ChannelError::WouldBlock) => tracing::debug!(
                "disk {}: the worker is not reading its channel; the rate limit waits",
                self.disk.id
            ),
            Err(e) => tracing::warn!(
                "disk {}: cannot send the worker its new rate limit: {e}",
                self.disk.id
            ),
        }
    }

    /// Starts a successor (or takes `spare`, started earlier in `mode`) and hands it, set
    /// up, to the frontend thread.
    fn replace(&self, mode: ServeMode, spare: Option<Worker>) -> Result<Current, String> {
        let id = &self.disk.id;
        // A resize asked for is done by a fresh normal worker: a spare has the old size.
        let resize = match mode {
            ServeMode::Normal => self.handle.pending_resize(),
            ServeMode::Fail => None,
        };
        let spare = match resize {
            Some(_) => {
                discard(spare);
                None
            }
            None => spare,
        };
        let from_spare = spare.is_some();
        let (mut disk, limits) = self.disk_now();
        disk.resize_to = resize.map(|(_, size)| size);
        let limits = (!from_spare).then_some(limits);
        let w = match spare {
            Some(w) => w,
            None => match crate::worker::spawn(
                &disk,
                &self.image,
                &self.bin,
                self.learn.as_ref(),
                mode,
                &self.output,
            ) {
                Ok(w) => w,
                // The worker could not resize the image (it said why, and a resize that
                // fails leaves the image as it was): the resize fails, the disk is served
                // at its size.
                Err(crate::worker::WorkerError::Refused { message, .. }) if resize.is_some() => {
                    let (number, size) = resize.unwrap_or_default();
                    tracing::error!("disk {id}: resize to {size} bytes failed: {message}");
                    self.events.emit(
                        "resize",
                        Some(id),
                        serde_json::json!({
                            "size": size,
                            "previous_size": self.handle.size(),
                            "error": message,
                        }),
                    );
                    self.handle.resize_done(number, Err(message));
                    return self.replace(mode, None);
                }
                Err(e) => return Err(crate::error_chain(&e)),
            },
        };
        let pidfd = w.child.pidfd().ok().map(Arc::new);
        let stream = w
            .vhost
            .try_clone()
            .map_err(|e| format!("clone the vhost-user socket: {e}"))?;
        let backend = match crate::vhost_frontend::setup(id, stream, self.disk.num_queues) {
            Ok(b) => b,
            Err(e) if from_spare => {
                // It waited unwatched; whatever became of it, a fresh worker will do. If it
                // ended by itself, say how (a policy violation is kept like any other).
                let mut w = w;
                if let Ok(Some(exit)) = w.child.try_wait() {
                    let how = format!("(spare) {}", crate::report::describe_exit(exit));
                    crate::report::report_worker_end(
                        id,
                        w.child.id(),
                        &w.status,
                        &how,
                        Some(exit),
                        &self.violations,
                    );
                }
                tracing::warn!(
                    "disk {id}: the spare worker (pid {}) failed its setup: {}; starting a \
                     fresh one",
                    w.child.id(),
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
        // The device the guest knows, at the size this worker is to offer.
        let mut size = resize.map_or_else(|| self.handle.size(), |(_, size)| size);
        let mut config = with_capacity(&self.config, size / ipc::messages::SECTOR_SIZE);
        let offered = config_capacity(&backend.config) * ipc::messages::SECTOR_SIZE;
        let adopted = resize.is_none()
            && backend.features == self.features
            && backend.config == with_capacity(&config, offered / ipc::messages::SECTOR_SIZE)
            && offered != size
            && self.handle.adopt_attempted(offered);
        if adopted {
            // A resize reported failed had set the image's size after all (its worker
            // died, or its flush failed, after the header was written): the image is the
            // truth, and the guest is told.
            tracing::warn!(
                "disk {id}: the image has the size a failed resize asked for ({offered} bytes, \
                 was {size}): the disk has it now"
            );
            size = offered;
            config = with_capacity(&self.config, size / ipc::messages::SECTOR_SIZE);
        }
        if backend.features != self.features || backend.config != config {
            discard(Some(w));
            return Err(format!(
                "the successor offers another device (features {:#x}, was {:#x}; capacity {} \
                 sectors, {} expected)",
                backend.features,
                self.features,
                config_capacity(&backend.config),
                size / ipc::messages::SECTOR_SIZE,
            ));
        }
        // Published first: a failure the frontend reports for this backend names this
        // generation, and kills this worker.
        let next = Current {
            confined: confined(&w, Duration::from_secs(1)),
            worker: w,
            pidfd,
            limits,
            resized: resize.map(|(number, _)| number),
        };
        let generation = self
            .handle
            .publish(next.pidfd.clone(), next.confined_fd(), next.pid());
        if !self.frontend.swap_backend(backend, mode, generation) {
            discard(Some(next.worker));
            self.handle.publish(None, None, 0);
            return Err("the device's frontend thread is gone".into());
        }
        if let Some(limits) = next.limits {
            // It started with them: a change made during the restart is in force.
            self.handle.rate_limit_applied(limits);
        }
        if adopted {
            self.device.update_config(&config);
            self.events.emit(
                "resize",
                Some(id),
                serde_json::json!({ "size": size, "adopted": true }),
            );
        }
        if let Some((number, size)) = resize {
            // Serving at the new size: now the guest is told (virtio 1.2, 4.2.2.1: a new
            // config generation and a config-change interrupt).
            let previous = self.handle.size();
            self.device.update_config(&config);
            self.handle.resize_done(number, Ok(size));
            tracing::info!("disk {id}: resized from {previous} to {size} bytes");
            self.events.emit(
                "resize",
                Some(id),
                serde_json::json!({ "size": size, "previous_size": previous }),
            );
        }
        self.handle.counters().worker_started(
            next.worker.status.clone(),
            next.confined.as_ref().map(|c| c.stat.clone()),
        );
        Ok(next)
    }
}
