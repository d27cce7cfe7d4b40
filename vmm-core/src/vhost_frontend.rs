//! bulkhead as a vhost-user frontend: the setup a device needs before the guest sees it
//! (features, protocol features, queue count, config space), and a control thread per
//! device that brings the rings up on DRIVER_OK and down on reset. No vCPU thread ever
//! waits on a backend: they only send commands here.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio_mmio::{Command, QueueRegs, VirtioMmioDevice};
use crate::memory::GuestRam;

/// Size of the virtio-blk config space we fetch (through write_zeroes_may_unmap).
pub const BLK_CONFIG_SIZE: u32 = 60;
/// No backend reply may take longer (a hung backend must not hang its control thread).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{id}: vhost-user {what} failed")]
    Vhost {
        id: String,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("{id}: the backend offers {offered} queues, {wanted} were asked for")]
    Queues {
        id: String,
        offered: u64,
        wanted: u16,
    },
    #[error("{id}: the backend does not offer VIRTIO_F_VERSION_1 (features {features:#x})")]
    NotModern { id: String, features: u64 },
    #[error("{id}: queue {queue} address {gpa:#x} is not in guest RAM")]
    RingOutsideRam { id: String, queue: usize, gpa: u64 },
    #[error("{id}: the backend's inflight region is unusable: {why}")]
    Inflight { id: String, why: String },
    #[error("{id}: cannot configure the socket")]
    Socket {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// A backend connection after setup, before any ring is up.
pub struct Backend {
    pub frontend: Frontend,
    /// A second handle on the socket, for deadlines (see [`with_deadline`]).
    pub socket: UnixStream,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub config: Vec<u8>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// Runs `f` (a conversation with a backend over `socket`) with a deadline: if it has not
/// returned after `timeout`, the socket is shut down, so whatever read is blocked returns
/// end-of-file and `f` fails instead of hanging. (A read timeout is not enough: the vhost
/// crate retries reads that time out.)
pub fn with_deadline<T>(socket: &UnixStream, timeout: Duration, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = socket.try_clone().ok().and_then(|s| {
        std::thread::Builder::new()
            .name("vhost-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout)
                {
                    tracing::warn!(
                        "vhost-user backend did not answer within {timeout:?}: disconnecting it"
                    );
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            })
            .ok()
    });
    let result = f();
    drop(done);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    result
}

/// Takes a backend through SET_OWNER, feature and protocol-feature discovery, the queue
/// count and GET_CONFIG.
pub fn setup(id: &str, stream: UnixStream, num_queues: u16) -> Result<Backend, FrontendError> {
    let guard = stream.try_clone().map_err(|source| FrontendError::Socket {
        id: id.to_string(),
        source,
    })?;
    with_deadline(&guard, REPLY_TIMEOUT, || {
        setup_inner(id, stream, num_queues)
    })
}

fn setup_inner(id: &str, stream: UnixStream, num_queues: u16) -> Result<Backend, FrontendError> {
    let err = |what| {
        let id = id.to_string();
        move |source| FrontendError::Vhost { id, what, source }
    };
    let socket = stream.try_clone().map_err(|source| FrontendError::Socket {
        id: id.to_string(),
        source,
    })?;
    let mut frontend = Frontend::from_stream(stream, u64::from(num_queues));
    frontend.set_owner().map_err(err("SET_OWNER"))?;
    let features = frontend.get_features().map_err(err("GET_FEATURES"))?;
    if features & crate::devices::virtio_mmio::VIRTIO_F_VERSION_1 == 0 {
        return Err(FrontendError::NotModern {
            id: id.to_string(),
            features,
        });
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        frontend
            .set_protocol_features(protocol)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let offered = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
        if offered < u64::from(num_queues) {
            return Err(FrontendError::Queues {
                id: id.to_string(),
                offered,
                wanted: num_queues,
            });
        }
    } else if num_queues > 1 {
        return Err(FrontendError::Queues {
            id: id.to_string(),
            offered: 1,
            wanted: num_queues,
        });
    }
    let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        let buf = vec![0u8; BLK_CONFIG_SIZE as usize];
        let (_, payload) = frontend
            .get_config(0, BLK_CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(err("GET_CONFIG"))?;
        payload
    } else {
        Vec::new()
    };
    Ok(Backend {
        frontend,
        socket,
        features,
        protocol,
        config,
    })
}

/// What the control thread of one device owns.
#[derive(Debug)]
pub struct ControlThread {
    pub device: Arc<VirtioMmioDevice>,
    pub backend: Backend,
    pub ram: Arc<GuestRam>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub queue_max: u16,
    /// The worker behind the backend, if we started it: a bad reply gets it killed (its
    /// supervisor then reports how it ended and starts a successor).
    pub worker_pidfd: Option<Arc<std::os::fd::OwnedFd>>,
    /// What the driver last asked for with DRIVER_OK (acked features, queue registers),
    /// until it resets the device: replayed to every new backend.
    pub wanted: Option<(u64, Vec<QueueRegs>)>,
    /// The inflight region from the first backend of this activation, handed to every
    /// later one (vhost-user GET/SET_INFLIGHT_FD).
    pub inflight: Option<KeptInflight>,
    /// The supervisor's side of the disk (None for an external backend): told when the
    /// guest resets a failing device.
    pub disk: Option<Arc<crate::supervisor::DiskControl>>,
    /// The guest reset a failing device: rings wait for the normal worker the supervisor
    /// is starting (the fail-mode one must not answer the driver's new requests).
    pub awaiting_normal: bool,
    /// Failed commands are logged through this.
    pub errors: crate::ratelimit::RateLimitedLog,
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

impl ControlThread {
    /// Serves commands until the device goes away.
    pub fn run(mut self, commands: Receiver<Command>) {
        let mut active: Vec<usize> = Vec::new();
        for command in commands {
            let result = match command {
                Command::Activate {
                    driver_features,
                    queues,
                } => {
                    self.wanted = Some((driver_features, queues));
                    if self.awaiting_normal {
                        Ok(())
                    } else {
                        self.bring_up(&mut active)
                    }
                }
                Command::Reset => {
                    self.wanted = None;
                    // The next activation starts from a fresh region.
                    self.inflight = None;
                    let stopping = std::mem::take(&mut active);
                    let stopped = if self.disk.as_ref().is_some_and(|d| d.guest_reset()) {
                        // A fail-mode worker (or none) goes; nothing to ask it.
                        self.awaiting_normal = true;
                        self.kill_worker();
                        Ok(())
                    } else {
                        self.with_backend(|this| this.stop(&stopping))
                    };
                    if stopped.is_err() {
                        // A backend that cannot stop its rings must not touch them again.
                        self.kill_worker();
                    }
                    // The reset is complete: the rings are stopped or their worker is gone
                    // (a killed worker's successor starts from the driver's next setup).
                    self.device.reset_complete();
                    stopped
                }
                Command::Disconnect => {
                    let _ = self.backend.socket.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Command::Reconnect {
                    backend,
                    worker_pidfd,
                    mode,
                } => {
                    tracing::debug!("{}: replacement backend connected", self.device.id);
                    self.backend = *backend;
                    self.worker_pidfd = worker_pidfd;
                    active.clear();
                    if mode == ipc::messages::ServeMode::Normal {
                        self.awaiting_normal = false;
                    }
                    if self.wanted.is_some() && !self.awaiting_normal {
                        self.bring_up(&mut active)
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = result {
                // A worker that fails commands costs a restart each time; say so a few
                // times a window, not once per failure.
                self.errors
                    .error(format_args!("{}", crate::error_chain(&e)));
                if self.worker_pidfd.is_some() {
                    // Its supervisor starts a successor, which gets what the driver wanted.
                    self.kill_worker();
                } else {
                    self.device.needs_reset();
                }
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

    /// Brings up the rings the driver wants (after DRIVER_OK, or on a new backend).
    fn bring_up(&mut self, active: &mut Vec<usize>) -> Result<(), FrontendError> {
        let Some((features, queues)) = self.wanted.clone() else {
            return Ok(());
        };
        let up = self.with_backend(|this| this.activate(features, &queues))?;
        *active = up;
        tracing::debug!("{}: rings {active:?} up", self.device.id);
        Ok(())
    }

    fn kill_worker(&self) {
        if let Some(fd) = &self.worker_pidfd {
            if !crate::supervisor::kill(fd) {
                tracing::warn!(
                    "{}: cannot kill the worker: {}",
                    self.device.id,
                    std::io::Error::last_os_error()
                );
            }
        }
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

    fn activate(
        &mut self,
        driver_features: u64,
        queues: &[QueueRegs],
    ) -> Result<Vec<usize>, FrontendError> {
        let protocol_bit =
            self.backend.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.backend
            .frontend
            .set_features(driver_features | protocol_bit)
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
            self.share_inflight(queues)?;
        }
        let mut up = Vec::new();
        for (i, q) in queues.iter().enumerate() {
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
