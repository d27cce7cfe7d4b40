//! Attaching a disk to a VM being built: its image opened (before any worker starts), its
//! backend (a worker bulkhead starts, or an external vhost-user backend) taken through
//! setup, its transport device with the kick ioeventfds and call irqfds, its frontend
//! thread and, for a worker, the worker's supervisor. And the end of it all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::VirtioMmioSlot;
use crate::devices::virtio_mmio::{DeviceInfo, VirtioMmioDevice, QUEUE_NOTIFY_OFFSET};
use crate::disk::config::{ConfigError, DiskConfig, DiskSource, IoEventFdMatch, WorkerDisk};
use crate::disk::image::{open_image, ImageProbe, OpenedImage};
use crate::memory::GuestRam;
use crate::supervisor::{DiskHandle, Supervisor};
use crate::vhost_frontend::{self, BackendOwner, Frontend, FrontendHandle};
use crate::violations::ViolationLog;

/// Largest queue the transport offers (QueueNumMax).
pub const QUEUE_MAX: u16 = 256;

/// How long a worker gets to finish its in-flight requests and exit once its disk is
/// disconnected, before it is killed.
pub const WORKER_GRACE: Duration = Duration::from_secs(2);

/// Errors while attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Image(#[from] crate::disk::image::OpenError),
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    #[error(transparent)]
    Frontend(#[from] crate::vhost_frontend::FrontendError),
    #[error("disk {id}: cannot {what}")]
    Setup {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {id}: cannot {what}")]
    Kvm {
        id: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot connect to vhost-user backend {path}")]
    VhostUserConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no worker executable: bulkhead-worker is not beside this executable; pass --worker-bin"
    )]
    NoWorkerBin,
}

/// One attached disk: its transport device, its frontend thread, and its worker's
/// handle (none for an external vhost-user backend).
#[derive(Clone, Debug)]
pub struct Disk {
    pub id: String,
    pub device: Arc<VirtioMmioDevice>,
    pub frontend: Arc<FrontendHandle>,
    /// For planned restarts and the control API (None for external backends).
    pub handle: Option<Arc<DiskHandle>>,
    /// The image a worker serves, to see it released at the end.
    pub image: Option<Arc<ImageProbe>>,
}

/// What starting and supervising workers needs besides each disk's configuration.
#[derive(Debug)]
pub struct WorkerEnv<'a> {
    /// The worker executable; default: `bulkhead-worker` beside this executable.
    pub bin: Option<&'a std::path::Path>,
    /// `bulkhead policy learn`: workers run in learn mode, recorded here.
    pub learn: Option<&'a Arc<policies::learn::Recorder>>,
    pub violations: &'a Arc<ViolationLog>,
    pub events: &'a Arc<crate::events::EventLog>,
    /// The host uid the VM's workers run as.
    pub uid: u32,
}

/// Opens and locks every disk's image before any worker starts: one that cannot be had
/// (in use elsewhere, the wrong size) ends the start with nothing to undo. One image
/// under two names is refused (checked by path before; a file renamed in between must not
/// slip through).
pub fn open_images(disks: &[DiskConfig]) -> Result<Vec<Option<Arc<OpenedImage>>>, AttachError> {
    let mut images: Vec<Option<Arc<OpenedImage>>> = Vec::with_capacity(disks.len());
    for disk in disks {
        let opened = match &disk.source {
            DiskSource::Image(i) => Some(Arc::new(open_image(i)?)),
            DiskSource::VhostUser(_) => None,
        };
        if let Some(a) = &opened {
            if let Some(j) = images.iter().position(|b| {
                b.as_ref()
                    .is_some_and(|b| a.identity.is_some() && b.identity == a.identity)
            }) {
                return Err(ConfigError::Conflict(format!(
                    "disks {} and {} are the same image",
                    disks[j].id, disk.id
                ))
                .into());
            }
            // A disk's image as another's backing file: the locks refuse a writable one;
            // a shared read-only one would be fine, but is named here to be plain.
            let backs = |x: &OpenedImage, y: &OpenedImage| {
                x.backing
                    .as_ref()
                    .is_some_and(|b| Some(b.identity) == y.identity)
            };
            if let Some(j) = images
                .iter()
                .position(|b| b.as_ref().is_some_and(|b| backs(a, b) || backs(b, a)))
            {
                return Err(ConfigError::Conflict(format!(
                    "disks {} and {}: one's image is the other's backing file",
                    disks[j].id, disk.id
                ))
                .into());
            }
        }
        images.push(opened);
    }
    Ok(images)
}

/// The disks of a VM being built: dropped before the VM is, they end their workers.
#[derive(Debug, Default)]
pub struct StartedDisks(Vec<Disk>);

impl StartedDisks {
    pub fn push(&mut self, disk: Disk) {
        self.0.push(disk);
    }

    pub fn as_slice(&self) -> &[Disk] {
        &self.0
    }

    /// The VM is built: the disks are its to end.
    pub fn keep(mut self) -> Vec<Disk> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for StartedDisks {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            end_backends(&self.0);
        }
    }
}

/// Ends every disk's backend: disconnects it, gives the workers [`WORKER_GRACE`] to end,
/// kills those that did not and waits for them as long again; then waits (as long again)
/// for the images to be released.
pub fn end_backends(disks: &[Disk]) {
    for disk in disks {
        disk.frontend.disconnect();
    }
    let deadline = Instant::now() + WORKER_GRACE;
    let lingering: Vec<(&str, &Arc<DiskHandle>)> = disks
        .iter()
        .filter_map(|d| Some((d.id.as_str(), d.handle.as_ref()?)))
        .filter(|(_, handle)| !handle.wait_ended(deadline))
        .collect();
    for (_, handle) in &lingering {
        handle.kill_worker();
    }
    let deadline = Instant::now() + WORKER_GRACE;
    for (id, handle) in lingering {
        if !handle.wait_ended(deadline) {
            tracing::warn!("disk {id}: its worker did not end, even killed");
        }
    }
    // A worker's io_uring keeps its image locked a moment after the worker is gone.
    let deadline = Instant::now() + WORKER_GRACE;
    for disk in disks {
        if let Some(probe) = &disk.image {
            let left = deadline.saturating_duration_since(Instant::now());
            if !probe.wait_released(left) {
                tracing::warn!(
                    "disk {}: {} is still locked",
                    disk.id,
                    probe.path().display()
                );
            }
        }
    }
}

/// Guest RAM as (start, length) ranges, for the transport's ring checks.
fn ram_ranges(ram: &GuestRam) -> Vec<(u64, u64)> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    ram.memory()
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// A worker started for a disk, with what its supervisor needs to start the next.
struct Started {
    worker: crate::worker::Worker,
    disk: WorkerDisk,
    image: Arc<OpenedImage>,
    bin: PathBuf,
    output: Arc<crate::ratelimit::RateLimitedLog>,
}

/// Starts the disk's worker (for an image, opened by the caller) or connects to its
/// external backend, and sets the device up at `slot`. Any failure fails the VM's start.
/// `cfg` has its queue count resolved.
pub fn attach(
    vm: &VmFd,
    ram: &Arc<GuestRam>,
    cfg: &DiskConfig,
    image: Option<Arc<OpenedImage>>,
    slot: VirtioMmioSlot,
    workers: &WorkerEnv,
) -> Result<Disk, AttachError> {
    let num_queues = cfg.queues();
    let (stream, started) = match (&cfg.source, image) {
        (DiskSource::Image(options), Some(image)) => {
            let bin = match workers.bin {
                Some(b) => b.to_path_buf(),
                None => crate::worker::default_worker_bin().ok_or(AttachError::NoWorkerBin)?,
            };
            let disk = WorkerDisk {
                id: cfg.id.clone(),
                image: options.clone(),
                num_queues,
                address_space: crate::worker::address_space_limit(ram.size()),
                uid: workers.uid,
                resize_to: None,
            };
            let output = crate::worker_output::limiter();
            let w = crate::worker::spawn(
                &disk,
                &image,
                &bin,
                workers.learn,
                ipc::messages::ServeMode::Normal,
                &output,
            )?;
            tracing::info!(
                "disk {}: {} served by worker pid {} ({} bytes)",
                cfg.id,
                options.path.display(),
                w.child.id(),
                w.disk_size
            );
            let vhost = w
                .vhost
                .try_clone()
                .map_err(|source| AttachError::VhostUserConnect {
                    path: options.path.clone(),
                    source,
                })?;
            let started = Started {
                worker: w,
                disk,
                image,
                bin,
                output,
            };
            (vhost, Some(started))
        }
        (DiskSource::Image(options), None) => {
            unreachable!(
                "open_images opens every image first ({})",
                options.path.display()
            )
        }
        (DiskSource::VhostUser(path), _) => {
            let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                AttachError::VhostUserConnect {
                    path: path.clone(),
                    source,
                }
            })?;
            tracing::info!(
                "disk {}: served by the vhost-user backend at {}",
                cfg.id,
                path.display()
            );
            (s, None)
        }
    };
    let backend = match vhost_frontend::setup(&cfg.id, stream, num_queues) {
        Ok(b) => b,
        Err(e) => {
            if let Some(s) = started {
                report_failed_setup(&cfg.id, s.worker, workers.violations);
            }
            return Err(e.into());
        }
    };
    let setup_err = |what: &'static str| {
        let id = cfg.id.clone();
        move |source| AttachError::Setup { id, what, source }
    };
    let kvm_err = |what: &'static str| {
        let id = cfg.id.clone();
        move |source| AttachError::Kvm { id, what, source }
    };
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("create an eventfd"));
    let queues = usize::from(num_queues);
    let mut kicks = Vec::with_capacity(queues);
    let mut calls = Vec::with_capacity(queues);
    for q in 0..queues {
        let kick = eventfd()?;
        // The kick never leaves the kernel: a QueueNotify write of this queue's index
        // signals the worker's eventfd directly.
        let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
        match cfg.ioeventfd {
            IoEventFdMatch::Any => vm.register_ioevent(&kick, &addr, kvm_ioctls::NoDatamatch),
            IoEventFdMatch::Datamatch => vm.register_ioevent(&kick, &addr, q as u32),
        }
        .map_err(kvm_err("register a QueueNotify ioeventfd"))?;
        let call = eventfd()?;
        // Nor does a completion: the worker's call eventfd raises the GSI.
        vm.register_irqfd(&call, slot.gsi)
            .map_err(kvm_err("register a completion irqfd"))?;
        kicks.push(kick);
        calls.push(call);
    }
    let config_irq = eventfd()?;
    vm.register_irqfd(&config_irq, slot.gsi)
        .map_err(kvm_err("register the config irqfd"))?;
    let (frontend_handle, sink, inbox) = vhost_frontend::rings::channel();
    let info = DeviceInfo {
        id: cfg.id.clone(),
        slot,
        device_features: backend.features,
        config: backend.config.clone(),
        num_queues: queues,
        queue_max: QUEUE_MAX,
        ram: ram_ranges(ram),
    };
    let device = Arc::new(VirtioMmioDevice::new(info, config_irq, sink));
    let mut disk = Disk {
        id: cfg.id.clone(),
        device: device.clone(),
        frontend: frontend_handle.clone(),
        handle: None,
        image: cfg.image_path().and_then(ImageProbe::open).map(Arc::new),
    };
    // The supervisor adopts the first worker before the frontend thread starts, so the
    // frontend knows the generation it reports failures for.
    let mut owner: Option<Arc<dyn BackendOwner>> = None;
    let mut generation = 0;
    if let Some(s) = started {
        let handle = Arc::new(DiskHandle::default());
        let pidfd = s
            .worker
            .child
            .pidfd()
            .map_err(|e| {
                tracing::warn!(
                    "worker {} (pid {}): no pidfd: {e}",
                    cfg.id,
                    s.worker.child.id()
                )
            })
            .ok()
            .map(Arc::new);
        let supervisor = Supervisor {
            disk: s.disk,
            image: s.image,
            bin: s.bin,
            learn: workers.learn.cloned(),
            violations: workers.violations.clone(),
            events: workers.events.clone(),
            device: device.clone(),
            ram: ram.clone(),
            features: backend.features,
            config: backend.config.clone(),
            handle: handle.clone(),
            output: s.output,
            frontend: frontend_handle,
            kicks: kicks
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(setup_err("duplicate the kick eventfds"))?,
        };
        generation = supervisor
            .start(s.worker, pidfd)
            .map_err(setup_err("start its worker's supervisor"))?;
        disk.handle = Some(handle.clone());
        owner = Some(handle);
    }
    let frontend = Frontend::new(
        device,
        backend,
        ram.clone(),
        kicks,
        calls,
        QUEUE_MAX,
        owner,
        generation,
    );
    if let Err(e) = frontend.spawn(inbox) {
        // Its supervisor runs already: end the worker with it.
        end_backends(std::slice::from_ref(&disk));
        return Err(setup_err("start its frontend thread")(e));
    }
    Ok(disk)
}

/// A worker that failed its vhost-user setup: it may have died by itself (that may be
/// why setup failed): give it a moment, then make sure, and say how it ended.
fn report_failed_setup(id: &str, mut w: crate::worker::Worker, violations: &ViolationLog) {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut exited = None;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = w.child.try_wait() {
            exited = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if exited.is_none() {
        let _ = w.child.kill();
        exited = w.child.wait().ok();
    }
    let how = exited.map_or_else(|| "ended".to_string(), crate::report::describe_exit);
    let _ = crate::report::report_worker_end(id, w.child.id(), &w.status, &how, exited, violations);
}
