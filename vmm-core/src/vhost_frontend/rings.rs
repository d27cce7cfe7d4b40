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
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

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
    /// The backend of `generation` failed a command: the owner ends and replaces it.
    fn backend_failed(&self, generation: u64);
}

/// What the thread is told, in order.
#[derive(Debug)]
enum Input {
    Transport(TransportEvent),
    /// Talk to this backend from now on (a successor of a dead worker), bringing the
    /// rings back up if the driver had them up.
    Swap {
        backend: Box<Backend>,
        mode: ServeMode,
        generation: u64,
    },
    /// The VM is over: close the connection once the inputs before this one are done
    /// (the backend then ends as it does when any frontend goes away).
    Disconnect,
}

/// The transport's way into the thread.
#[derive(Debug)]
struct TransportInput(Mutex<Sender<Input>>);

impl EventSink for TransportInput {
    fn send(&self, event: TransportEvent) -> bool {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(Input::Transport(event)).is_ok()
    }
}

/// The disk's way into the thread: new backends, and the end.
#[derive(Debug)]
pub struct FrontendHandle {
    tx: Mutex<Sender<Input>>,
    closing: AtomicBool,
}

impl FrontendHandle {
    fn send(&self, input: Input) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(input).is_ok()
    }

    /// Hands the thread a new backend (a restarted worker, in `mode`), known to its
    /// owner as `generation`; false when the thread is gone.
    pub fn swap_backend(&self, backend: Backend, mode: ServeMode, generation: u64) -> bool {
        self.send(Input::Swap {
            backend: Box::new(backend),
            mode,
            generation,
        })
    }

    /// Closes the backend connection after the pending work (`bulkhead policy learn`
    /// records workers to their normal exit this way). The disk's supervisor does not
    /// replace a worker that ends after this.
    pub fn disconnect(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.send(Input::Disconnect);
    }

    /// Whether the VMM is done with the backend ([`Self::disconnect`]).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// The channel between a device's transport, its disk, and its frontend thread: build
/// the transport with the sink, then start the thread with [`Frontend::spawn`].
pub fn channel() -> (Arc<FrontendHandle>, Box<dyn EventSink>, Inbox) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = Arc::new(FrontendHandle {
        tx: Mutex::new(tx.clone()),
        closing: AtomicBool::new(false),
    });
    (handle, Box::new(TransportInput(Mutex::new(tx))), Inbox(rx))
}

/// The receiving end of [`channel`].
#[derive(Debug)]
pub struct Inbox(Receiver<Input>);

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
    /// The transition on a new backend in `mode`: a fail-mode backend arriving while a
    /// normal one is awaited (one started before the reset) does not serve the rings.
    fn on_swap(self, mode: ServeMode) -> Link {
        match (self, mode) {
            (Link::AwaitingNormal, ServeMode::Fail) => Link::AwaitingNormal,
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

/// The largest inflight region we keep for a backend (1024 queues of 1024 entries fit).
const MAX_INFLIGHT_BYTES: u64 = 64 << 20;

/// Checks a backend's inflight region before it is kept and handed to the backend's
/// successors: a sealed memfd (no truncation can SIGBUS whoever maps it later) at least as
/// large as the range it claims, for the queues we asked.
fn check_inflight(
    file: &std::fs::File,
    info: &VhostUserInflight,
    want: &VhostUserInflight,
) -> Result<(), String> {
    if (info.num_queues, info.queue_size) != (want.num_queues, want.queue_size) {
        return Err(format!(
            "it is for {} queues of {}, {} of {} were asked for",
            info.num_queues, info.queue_size, want.num_queues, want.queue_size
        ));
    }
    if info.mmap_size == 0 || info.mmap_size > MAX_INFLIGHT_BYTES {
        return Err(format!(
            "size {} is not in 1..={MAX_INFLIGHT_BYTES}",
            info.mmap_size
        ));
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if !link.starts_with("/memfd:") {
        return Err(format!("it is {link:?}, not a memfd"));
    }
    // SAFETY: F_GET_SEALS only reads the seals of a descriptor we own.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err("it is not sealed against shrinking".into());
    }
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let end = info.mmap_offset.checked_add(info.mmap_size);
    if end.is_none_or(|end| end > len) {
        return Err(format!(
            "{} bytes at offset {} run past its end ({len} bytes)",
            info.mmap_size, info.mmap_offset
        ));
    }
    Ok(())
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
        crate::thread::spawn(name, move || self.run(inbox)).map(|_| ())
    }

    fn run(mut self, inbox: Inbox) {
        for input in inbox.0 {
            let result = match input {
                Input::Transport(TransportEvent::Activate {
                    driver_features,
                    queues,
                }) => {
                    self.rings = Rings::Active {
                        wanted: Activation {
                            driver_features,
                            queues,
                        },
                        up: Vec::new(),
                    };
                    self.bring_up()
                }
                Input::Transport(TransportEvent::Reset) => {
                    self.reset();
                    Ok(())
                }
                Input::Disconnect => {
                    let _ = self.backend.socket.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Input::Swap {
                    backend,
                    mode,
                    generation,
                } => {
                    tracing::debug!("{}: replacement backend connected", self.device.id);
                    self.backend = *backend;
                    self.generation = generation;
                    self.link = self.link.on_swap(mode);
                    if let Rings::Active { up, .. } = &mut self.rings {
                        up.clear();
                    }
                    self.bring_up()
                }
            };
            if let Err(e) = result {
                self.failed(&e);
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
                // A backend that cannot stop its rings must not touch them again: ended
                // before the reset completes.
                self.failed(&e);
            }
        }
        // The rings are stopped or their backend is gone (a successor starts from the
        // driver's next setup).
        self.device.reset_complete();
    }

    /// A command failed: the owner replaces the backend (its successor gets what the
    /// driver wanted); without one, the device needs a reset.
    fn failed(&self, e: &FrontendError) {
        // A worker that fails commands costs a restart each time; say so a few times a
        // window, not once per failure.
        self.errors.error(format_args!("{}", crate::error_chain(e)));
        match &self.owner {
            Some(owner) => owner.backend_failed(self.generation),
            None => self.device.needs_reset(),
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

    /// GET_INFLIGHT_FD from the first backend of an activation (checked, then kept), and
    /// SET_INFLIGHT_FD to every backend, before its rings start.
    fn share_inflight(&mut self, queues: &[QueueRegs]) -> Result<(), FrontendError> {
        if self.inflight.is_none() {
            let queue_size = queues
                .iter()
                .filter(|q| q.ready)
                .map(|q| q.size)
                .max()
                .unwrap_or(self.queue_max);
            let want = VhostUserInflight::new(0, 0, queues.len() as u16, queue_size);
            let (info, file) = self
                .backend
                .frontend
                .get_inflight_fd(&want)
                .map_err(self.err("GET_INFLIGHT_FD"))?;
            check_inflight(&file, &info, &want).map_err(|why| FrontendError::Inflight {
                id: self.device.id.clone(),
                why,
            })?;
            self.inflight = Some(KeptInflight { file, info });
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

    #[test]
    fn a_normal_backend_serves_and_a_late_fail_mode_one_does_not() {
        let serving = Link::Serving(ServeMode::Normal);
        assert_eq!(
            serving.on_swap(ServeMode::Fail),
            Link::Serving(ServeMode::Fail)
        );
        assert_eq!(
            Link::Serving(ServeMode::Fail).on_swap(ServeMode::Normal),
            serving
        );
        // After a reset of a failing device only a normal backend brings the rings up.
        assert_eq!(
            Link::AwaitingNormal.on_swap(ServeMode::Fail),
            Link::AwaitingNormal
        );
        assert_eq!(Link::AwaitingNormal.on_swap(ServeMode::Normal), serving);
        assert!(!Link::AwaitingNormal.serves_rings());
        assert!(Link::Serving(ServeMode::Fail).serves_rings());
    }
}
