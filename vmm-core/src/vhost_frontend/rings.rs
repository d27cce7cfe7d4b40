//! The frontend's thread for one device: it brings the backend's rings up when the driver
//! sets DRIVER_OK and stops them when the driver resets the device, replays the driver's
//! setup to every new backend, and keeps the inflight region for them. No vCPU thread
//! ever waits on a backend: the transport only sends events here (a reset is the one
//! the vCPU waits for, bounded, as the spec needs it complete).
//!
//! It never ends a backend itself: a backend that fails a command is reported to its
//! owner (the disk's supervisor), which replaces it; an external backend has no owner,
//! and the device then needs a reset.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{with_deadline, Backend, FrontendError, REPLY_TIMEOUT};
use crate::devices::virtio_mmio::{EventSink, QueueRegs, TransportEvent, VirtioMmioDevice};
use crate::memory::GuestRam;
use ipc::messages::ServeMode;

/// Who answers for a device's backend: the disk's supervisor, for a worker bulkhead
/// started.
pub trait BackendOwner: Send + Sync + std::fmt::Debug {
    /// The driver reset the device. True when its backend was in fail mode: the owner has
    /// ended it (it must not answer the driver's next requests) and brings a normal one,
    /// which the rings then wait for.
    fn guest_reset(&self) -> bool;
    /// Whether the owner is still bringing the normal backend a reset of a failing device
    /// asked for (a fail-mode backend handed over now is a stale one).
    fn recovering(&self) -> bool;
    /// The backend of `generation` failed a command: the owner ends and replaces it. True
    /// once that backend's process is gone (it can touch guest RAM no more).
    fn backend_failed(&self, generation: u64) -> bool;
}

/// A backend handed over by the owner.
#[derive(Debug)]
struct Swap {
    backend: Box<Backend>,
    mode: ServeMode,
    generation: u64,
}

/// What the thread has been told and not done yet. It is bounded by construction: the
/// transport's events coalesce (at most one reset and one activation are ever pending,
/// whatever the guest does), a newer backend replaces one not yet taken, and the end is a
/// flag. A guest toggling the status of a device whose backend answers just under the
/// deadline cannot make the VMM queue work without bound (an unbounded channel here grew
/// the VMM by about 1 MB/s that way).
#[derive(Debug, Default)]
struct Pending {
    /// The driver reset the device (the vCPU waits for [`VirtioMmioDevice::reset_complete`]).
    reset: bool,
    /// The driver's last DRIVER_OK after the pending reset, if any.
    activate: Option<Activation>,
    swap: Option<Swap>,
    /// The VM is over: close the connection once the work before it is done (the backend
    /// then ends as it does when any frontend goes away).
    disconnect: bool,
    /// The thread is gone: nothing is taken any more.
    gone: bool,
}

impl Pending {
    fn push_transport(&mut self, event: TransportEvent) {
        match event {
            // A reset cancels an activation that has not been acted on: the rings it
            // named are the driver's to reuse.
            TransportEvent::Reset => {
                self.reset = true;
                self.activate = None;
            }
            TransportEvent::Activate {
                driver_features,
                queues,
            } => {
                self.activate = Some(Activation {
                    driver_features,
                    queues,
                })
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.reset && self.activate.is_none() && self.swap.is_none() && !self.disconnect
    }
}

/// The thread's inbox, shared with the transport's sink and the disk's handle.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` unless the thread is gone; false if it is.
    fn push(&self, f: impl FnOnce(&mut Pending)) -> bool {
        let mut p = self.lock();
        if p.gone {
            return false;
        }
        f(&mut p);
        self.wake.notify_one();
        true
    }

    /// Waits for work and takes all of it.
    fn take(&self) -> Pending {
        let mut p = self.lock();
        while p.is_empty() {
            p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut *p)
    }
}

/// The transport's way into the thread.
#[derive(Debug)]
struct TransportInput(Arc<Shared>);

impl EventSink for TransportInput {
    fn send(&self, event: TransportEvent) -> bool {
        self.0.push(|p| p.push_transport(event))
    }
}

/// The disk's way into the thread: new backends, and the end.
#[derive(Debug)]
pub struct FrontendHandle {
    shared: Arc<Shared>,
    closing: AtomicBool,
}

impl FrontendHandle {
    /// Hands the thread a new backend (a restarted worker, in `mode`), known to its
    /// owner as `generation`; false when the thread is gone. A backend handed over before
    /// and not yet taken is dropped (its worker, superseded, was already reaped).
    pub fn swap_backend(&self, backend: Backend, mode: ServeMode, generation: u64) -> bool {
        self.shared.push(|p| {
            p.swap = Some(Swap {
                backend: Box::new(backend),
                mode,
                generation,
            })
        })
    }

    /// Closes the backend connection after the pending work (`bulkhead policy learn`
    /// records workers to their normal exit this way). The disk's supervisor does not
    /// replace a worker that ends after this.
    pub fn disconnect(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.shared.push(|p| p.disconnect = true);
    }

    /// Whether the VMM is done with the backend ([`Self::disconnect`]).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// The inbox between a device's transport, its disk, and its frontend thread: build the
/// transport with the sink, then start the thread with [`Frontend::spawn`].
pub fn channel() -> (Arc<FrontendHandle>, Box<dyn EventSink>, Inbox) {
    let shared = Arc::new(Shared::default());
    let handle = Arc::new(FrontendHandle {
        shared: shared.clone(),
        closing: AtomicBool::new(false),
    });
    (
        handle,
        Box::new(TransportInput(shared.clone())),
        Inbox(shared),
    )
}

/// The thread's end of [`channel`].
#[derive(Debug)]
pub struct Inbox(Arc<Shared>);

impl Drop for Inbox {
    fn drop(&mut self) {
        self.0.lock().gone = true;
    }
}

/// What the driver set up at DRIVER_OK: acked features and queue registers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Activation {
    driver_features: u64,
    queues: Vec<QueueRegs>,
}

/// The rings as the driver sees them.
#[derive(Debug, PartialEq, Eq)]
enum Rings {
    /// Not activated since the device was created or last reset.
    Idle,
    /// Activated with `wanted`; `up` are the rings running on the current backend (none
    /// while it waits for a backend that may serve them).
    Active { wanted: Activation, up: Vec<usize> },
}

/// The backend the thread talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// A backend serving in this mode: the rings run on it.
    Serving(ServeMode),
    /// The driver reset a device whose backend was in fail mode: that backend is gone,
    /// and the rings wait for the normal one its owner is starting.
    AwaitingNormal,
}

impl Link {
    /// The transition on a new backend in `mode`: a fail-mode backend arriving while the
    /// owner is still recovering (one started before the driver's reset) does not serve
    /// the rings; one that comes after the recovery (normal workers kept failing, and the
    /// owner gave up again) does, so the driver gets errors, not silence.
    fn on_swap(self, mode: ServeMode, recovering: bool) -> Link {
        match (self, mode) {
            (Link::AwaitingNormal, ServeMode::Fail) if recovering => Link::AwaitingNormal,
            (_, mode) => Link::Serving(mode),
        }
    }

    fn serves_rings(self) -> bool {
        matches!(self, Link::Serving(_))
    }
}

/// A backend's inflight region, checked, kept for its successors.
pub struct KeptInflight {
    pub file: std::fs::File,
    pub info: VhostUserInflight,
}

impl std::fmt::Debug for KeptInflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptInflight")
            .field("fd", &self.file.as_raw_fd())
            .field("mmap_size", &self.info.mmap_size)
            .field("num_queues", &self.info.num_queues)
            .field("queue_size", &self.info.queue_size)
            .finish()
    }
}

impl KeptInflight {
    /// The inflight region for `num_queues` queues of `queue_size`, made by the VMM (no
    /// backend's region is ever trusted: one a compromised worker handed over could be
    /// any memfd, guest RAM included, and its successors would write into it): zeroed,
    /// sized as the split-ring layout needs (per queue a 16-byte header and 16 bytes per
    /// descriptor, 64-byte aligned: the layout of QEMU's docs/interop/vhost-user.rst that
    /// libvhost-user and bulkhead's worker use), and sealed, so no backend can resize it
    /// under another.
    fn create(id: &str, num_queues: u16, queue_size: u16) -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let per_queue = (16 + 16 * usize::from(queue_size)).next_multiple_of(64);
        let size = per_queue * usize::from(num_queues);
        let name = std::ffi::CString::new(format!("bulkhead-inflight-{id}"))
            .map_err(std::io::Error::other)?;
        let fd = memfd_create(
            name.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = std::fs::File::from(fd);
        file.set_len(size as u64)?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Ok(KeptInflight {
            file,
            info: VhostUserInflight::new(size as u64, 0, num_queues, queue_size),
        })
    }
}

/// What the frontend thread of one device owns.
#[derive(Debug)]
pub struct Frontend {
    device: Arc<VirtioMmioDevice>,
    backend: Backend,
    ram: Arc<GuestRam>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    queue_max: u16,
    /// Who replaces a failed backend (None for an external one).
    owner: Option<Arc<dyn BackendOwner>>,
    /// The current backend's generation, as its owner counts.
    generation: u64,
    rings: Rings,
    link: Link,
    /// The inflight region from the first backend of this activation, handed to every
    /// later one (vhost-user GET/SET_INFLIGHT_FD).
    inflight: Option<KeptInflight>,
    /// Failed commands are logged through this.
    errors: crate::ratelimit::RateLimitedLog,
}

impl Frontend {
    /// A frontend for `device` over `backend` (serving normally, `generation` to its
    /// owner), with the device's kick and call eventfds.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: Arc<VirtioMmioDevice>,
        backend: Backend,
        ram: Arc<GuestRam>,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
        queue_max: u16,
        owner: Option<Arc<dyn BackendOwner>>,
        generation: u64,
    ) -> Self {
        Frontend {
            device,
            backend,
            ram,
            kicks,
            calls,
            queue_max,
            owner,
            generation,
            rings: Rings::Idle,
            link: Link::Serving(ServeMode::Normal),
            inflight: None,
            errors: Default::default(),
        }
    }

    /// Serves `inbox` on a thread of its own until the device goes away.
    pub fn spawn(self, inbox: Inbox) -> std::io::Result<()> {
        let name = format!("{}-frontend", self.device.id);
        crate::thread::spawn(name, crate::confine::VmmThread::Frontend, move || {
            self.run(inbox)
        })
        .map(|_| ())
    }

    fn run(mut self, inbox: Inbox) {
        loop {
            let work = inbox.0.take();
            // In the order the driver and the owner can have caused them: the reset
            // (stopping the rings on the backend that ran them), the new backend, the
            // driver's setup after the reset, the end.
            if work.reset {
                self.reset();
            }
            if let Some(swap) = work.swap {
                tracing::debug!("{}: replacement backend connected", self.device.id);
                self.backend = *swap.backend;
                self.generation = swap.generation;
                let recovering = self.owner.as_ref().is_some_and(|o| o.recovering());
                self.link = self.link.on_swap(swap.mode, recovering);
                if let Rings::Active { up, .. } = &mut self.rings {
                    up.clear();
                }
                if let Err(e) = self.bring_up() {
                    let _ = self.failed(&e);
                }
            }
            if let Some(wanted) = work.activate {
                self.rings = Rings::Active {
                    wanted,
                    up: Vec::new(),
                };
                if let Err(e) = self.bring_up() {
                    let _ = self.failed(&e);
                }
            }
            if work.disconnect {
                let _ = self.backend.socket.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }

    /// The driver wrote 0 to Status: stop the rings (or let a fail-mode backend go), then
    /// let the waiting vCPU go on.
    fn reset(&mut self) {
        let rings = std::mem::replace(&mut self.rings, Rings::Idle);
        // The next activation starts from a fresh region.
        self.inflight = None;
        if self.owner.as_ref().is_some_and(|o| o.guest_reset()) {
            // Its owner ended the fail-mode backend; nothing to ask it.
            self.link = Link::AwaitingNormal;
        } else if let Rings::Active { up, .. } = rings {
            if let Err(e) = self.with_backend(|this| this.stop(&up)) {
                // A backend that cannot stop its rings must not touch them again: ended,
                // and gone, before the reset completes. If it cannot be made to go, the
                // device is broken (and says so) rather than reset under it.
                if !self.failed(&e) {
                    self.device.needs_reset();
                }
            }
        }
        // The rings are stopped or their backend is gone (a successor starts from the
        // driver's next setup).
        self.device.reset_complete();
    }

    /// A command failed: the owner replaces the backend (its successor gets what the
    /// driver wanted); without one, the device needs a reset. True once the failed
    /// backend can touch guest RAM no more (or, without an owner, the device says it is
    /// broken).
    fn failed(&self, e: &FrontendError) -> bool {
        // A worker that fails commands costs a restart each time; say so a few times a
        // window, not once per failure.
        self.errors.error(format_args!("{}", crate::error_chain(e)));
        match &self.owner {
            Some(owner) => owner.backend_failed(self.generation),
            None => {
                self.device.needs_reset();
                true
            }
        }
    }

    /// Runs `f` against the backend with [`REPLY_TIMEOUT`].
    fn with_backend<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, FrontendError>,
    ) -> Result<T, FrontendError> {
        let socket = self
            .backend
            .socket
            .try_clone()
            .map_err(|source| FrontendError::Socket {
                id: self.device.id.clone(),
                source,
            })?;
        with_deadline(&socket, REPLY_TIMEOUT, || f(self))
    }

    /// Brings up the rings the driver wants, if the backend may serve them.
    fn bring_up(&mut self) -> Result<(), FrontendError> {
        let Rings::Active { wanted, .. } = &self.rings else {
            return Ok(());
        };
        if !self.link.serves_rings() {
            return Ok(());
        }
        let wanted = wanted.clone();
        let up = self.with_backend(|this| this.activate(&wanted))?;
        tracing::debug!("{}: rings {up:?} up", self.device.id);
        if let Rings::Active { up: now, .. } = &mut self.rings {
            *now = up;
        }
        Ok(())
    }

    fn err(&self, what: &'static str) -> impl Fn(vhost::Error) -> FrontendError + '_ {
        move |source| FrontendError::Vhost {
            id: self.device.id.clone(),
            what,
            source,
        }
    }

    fn hva(&self, queue: usize, gpa: u64) -> Result<u64, FrontendError> {
        self.ram
            .memory()
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| FrontendError::RingOutsideRam {
                id: self.device.id.clone(),
                queue,
                gpa,
            })
    }

    fn activate(&mut self, wanted: &Activation) -> Result<Vec<usize>, FrontendError> {
        let protocol_bit =
            self.backend.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.backend
            .frontend
            .set_features(wanted.driver_features | protocol_bit)
            .map_err(self.err("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .ram
            .memory()
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: r.file_offset().map_or(0, |f| f.start()),
                mmap_handle: self.ram.memfd().as_raw_fd(),
            })
            .collect();
        self.backend
            .frontend
            .set_mem_table(&regions)
            .map_err(self.err("SET_MEM_TABLE"))?;
        if self
            .backend
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            self.share_inflight(&wanted.queues)?;
        }
        let mut up = Vec::new();
        for (i, q) in wanted.queues.iter().enumerate() {
            if !q.ready || q.size == 0 {
                continue;
            }
            let ring = VringConfigData {
                queue_max_size: self.queue_max,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.hva(i, q.desc)?,
                used_ring_addr: self.hva(i, q.device)?,
                avail_ring_addr: self.hva(i, q.driver)?,
                log_addr: None,
            };
            let f = &self.backend.frontend;
            f.set_vring_num(i, q.size)
                .map_err(self.err("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &ring)
                .map_err(self.err("SET_VRING_ADDR"))?;
            // A fresh ring's used idx is 0; a backend replacing a dead one continues where
            // the guest saw the last completion (and, with inflight tracking, resubmits
            // what was in flight before popping past it).
            let used_idx = crate::devices::virtio_mmio::ring_idx(self.ram.memory(), q.device)
                .ok_or_else(|| FrontendError::RingOutsideRam {
                    id: self.device.id.clone(),
                    queue: i,
                    gpa: q.device,
                })?;
            f.set_vring_base(i, used_idx)
                .map_err(self.err("SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.calls[i])
                .map_err(self.err("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &self.kicks[i])
                .map_err(self.err("SET_VRING_KICK"))?;
            if protocol_bit != 0 {
                self.backend
                    .frontend
                    .set_vring_enable(i, true)
                    .map_err(self.err("SET_VRING_ENABLE"))?;
            }
            up.push(i);
        }
        Ok(up)
    }

    /// The inflight region of this activation (made at its first backend, see
    /// [`KeptInflight::create`]), handed to every backend with SET_INFLIGHT_FD before its
    /// rings start.
    fn share_inflight(&mut self, queues: &[QueueRegs]) -> Result<(), FrontendError> {
        if self.inflight.is_none() {
            let queue_size = queues
                .iter()
                .filter(|q| q.ready)
                .map(|q| q.size)
                .max()
                .unwrap_or(self.queue_max);
            let kept = KeptInflight::create(&self.device.id, queues.len() as u16, queue_size)
                .map_err(|e| FrontendError::Inflight {
                    id: self.device.id.clone(),
                    why: format!("cannot make it: {e}"),
                })?;
            self.inflight = Some(kept);
        }
        if let Some(kept) = &self.inflight {
            self.backend
                .frontend
                .set_inflight_fd(&kept.info, kept.file.as_raw_fd())
                .map_err(self.err("SET_INFLIGHT_FD"))?;
        }
        Ok(())
    }

    fn stop(&mut self, active: &[usize]) -> Result<(), FrontendError> {
        for &i in active {
            self.backend
                .frontend
                .get_vring_base(i)
                .map_err(self.err("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activate(n: u64) -> TransportEvent {
        TransportEvent::Activate {
            driver_features: n,
            queues: Vec::new(),
        }
    }

    /// However many events the guest causes, what waits is one reset and the setup after
    /// it, in that order.
    #[test]
    fn transport_events_coalesce() {
        let mut p = Pending::default();
        for n in 0..100_000 {
            p.push_transport(TransportEvent::Reset);
            p.push_transport(activate(n));
        }
        assert!(p.reset);
        assert_eq!(p.activate.as_ref().map(|a| a.driver_features), Some(99_999));
        p.push_transport(TransportEvent::Reset);
        assert!(
            p.reset && p.activate.is_none(),
            "a reset cancels the setup before it"
        );
        let mut q = Pending::default();
        q.push_transport(activate(7));
        assert!(!q.reset && q.activate.is_some());
    }

    #[test]
    fn a_gone_thread_takes_nothing() {
        let (handle, sink, inbox) = channel();
        assert!(sink.send(TransportEvent::Reset));
        drop(inbox);
        assert!(!sink.send(TransportEvent::Reset));
        handle.disconnect();
        assert!(handle.closing());
    }

    #[test]
    fn only_a_stale_fail_mode_backend_is_kept_from_the_rings() {
        let serving = Link::Serving(ServeMode::Normal);
        assert_eq!(
            serving.on_swap(ServeMode::Fail, false),
            Link::Serving(ServeMode::Fail)
        );
        assert_eq!(
            Link::Serving(ServeMode::Fail).on_swap(ServeMode::Normal, false),
            serving
        );
        // After a reset of a failing device, while the owner recovers, only a normal
        // backend brings the rings up.
        assert_eq!(
            Link::AwaitingNormal.on_swap(ServeMode::Fail, true),
            Link::AwaitingNormal
        );
        assert_eq!(
            Link::AwaitingNormal.on_swap(ServeMode::Normal, true),
            serving
        );
        // Once the recovery is over and normal workers failed again, a fail-mode backend
        // serves: errors for the driver, not silence.
        assert_eq!(
            Link::AwaitingNormal.on_swap(ServeMode::Fail, false),
            Link::Serving(ServeMode::Fail)
        );
        assert!(!Link::AwaitingNormal.serves_rings());
        assert!(Link::Serving(ServeMode::Fail).serves_rings());
    }
}
