//! Building a VM from its configuration and running it until it stops.
//!
//! Everything that can be wrong with the configuration (the kernel, the initrd, sizes,
//! counts) is found in [`Vm::build`], before any vCPU runs.

use crate::violations::{Violation, ViolationLog};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootConfig, EntryPoint};
use crate::cpu;
use crate::devices::serial::SerialPort;
use crate::devices::virtio_mmio::{DeviceInfo, MmioBus, VirtioMmioDevice, QUEUE_NOTIFY_OFFSET};
use crate::devices::LegacyPio;
use crate::disk::{DiskBackend, DiskConfig};
use crate::layout::{self, KVM_TSS_START, SERIAL_GSI};
use crate::memory::GuestRam;
use crate::vcpu::{Vcpu, VcpuEvent};
use crate::vhost_frontend::ControlThread;
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

/// Command line when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A virtual machine as the user described it.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    /// What pages back guest RAM (`--hugepages`).
    pub ram_pages: crate::memory::RamPages,
    pub vcpus: u32,
    pub disks: Vec<crate::disk::DiskConfig>,
    /// The worker executable; default: `bulkhead-worker` beside this executable.
    pub worker_bin: Option<PathBuf>,
    /// `bulkhead policy learn`: workers run in learn mode, their syscalls recorded here.
    pub learn: Option<Arc<policies::learn::Recorder>>,
}

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("--vcpus {requested} is out of range: this host's KVM allows 1..={max}")]
    VcpuCount { requested: u32, max: u32 },
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("cannot create the serial port")]
    Serial(#[source] std::io::Error),
    #[error("disk {id}: cannot {what}")]
    DiskSetup {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    #[error(transparent)]
    Frontend(#[from] crate::vhost_frontend::FrontendError),
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
    #[error("too many disks: {count} (at most {max})")]
    TooManyDisks { count: usize, max: u32 },
    #[error("cannot start the thread for vCPU {vcpu}")]
    SpawnVcpu {
        vcpu: u8,
        #[source]
        source: std::io::Error,
    },
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// A vCPU stopped the VM (guest exit, reset, crash, KVM failure).
    Vcpu(VcpuEvent),
    /// The VMM was asked to stop by this signal.
    Signal(i32),
    /// `--timeout` expired.
    TimedOut(Duration),
    /// Every vCPU thread is gone without saying why (should not happen).
    Vanished,
}

/// What the main thread waits for.
#[derive(Debug)]
pub enum VmEvent {
    Vcpu(VcpuEvent),
    Signal(i32),
}

/// Lets another thread (e.g. a signal handler thread) stop a running VM.
#[derive(Clone, Debug)]
pub struct Stopper(Sender<VmEvent>);

impl Stopper {
    /// Ends the VM's run with [`VmOutcome::Signal`].
    pub fn signal(&self, sig: i32) {
        let _ = self.0.send(VmEvent::Signal(sig));
    }
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM fd go before the memory they map.
    vcpus: Vec<Vcpu>,
    events: Receiver<VmEvent>,
    stopper: Stopper,
    _vm: VmFd,
    _kvm: Kvm,
    ram: Arc<GuestRam>,
    serial: SerialPort,
    disks: Vec<Disk>,
    violations: Arc<ViolationLog>,
    entry: EntryPoint,
}

impl Vm {
    /// Checks the configuration and builds the VM; no vCPU runs yet. Serial output goes to
    /// `serial_out`.
    pub fn build(
        cfg: &VmConfig,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max = (kvm.get_max_vcpus() as u32).min(u32::from(crate::acpi::MAX_VCPUS));
        if cfg.vcpus == 0 || cfg.vcpus > max {
            return Err(VmError::VcpuCount {
                requested: cfg.vcpus,
                max,
            });
        }
        let num_vcpus = cfg.vcpus as u8;
        if cfg.disks.len() > layout::VIRTIO_MMIO_MAX_SLOTS as usize {
            return Err(VmError::TooManyDisks {
                count: cfg.disks.len(),
                max: layout::VIRTIO_MMIO_MAX_SLOTS,
            });
        }
        // Every image is opened and locked before any worker starts: one that cannot be
        // had (in use elsewhere, the wrong size) ends the start with nothing to undo.
        let mut images = Vec::with_capacity(cfg.disks.len());
        for disk in &cfg.disks {
            images.push(match &disk.backend {
                DiskBackend::Image(path) => Some(Arc::new(
                    crate::disk::open_image(path, disk.readonly, disk.direct)
                        .map_err(crate::worker::WorkerError::from)?,
                )),
                DiskBackend::VhostUser(_) => None,
            });
        }
        // Checked by path before; a file renamed in between must not slip through.
        for (i, a) in images.iter().enumerate() {
            let Some(a) = a else { continue };
            if let Some(j) = images[..i]
                .iter()
                .position(|b| b.as_ref().is_some_and(|b| b.identity == a.identity))
            {
                return Err(VmError::Worker(crate::worker::WorkerError::Disk(
                    crate::disk::DiskError::Conflict(format!(
                        "disks {} and {} are the same image",
                        cfg.disks[j].id, cfg.disks[i].id
                    )),
                )));
            }
        }
        let ram = GuestRam::new(cfg.mem_mib, cfg.ram_pages)?;
        let kvm_err = |what| move |source| VmError::Kvm { what, source };

        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        vm.set_identity_map_address(KVM_TSS_START - 0x1000)
            .map_err(kvm_err("set the identity map address"))?;
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        // The PIT is what Linux calibrates its TSC against when nothing else says.
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;
        ram.register(&vm)?;

        let ram = Arc::new(ram);
        let violations = Arc::new(ViolationLog::default());
        let workers = WorkerEnv {
            bin: cfg.worker_bin.as_deref(),
            learn: cfg.learn.as_ref(),
            violations: &violations,
        };
        // Until the VM is built, a failure ends the workers already started.
        let mut disks = StartedDisks(Vec::with_capacity(cfg.disks.len()));
        for (index, (disk, image)) in cfg.disks.iter().zip(images).enumerate() {
            let disk = disk.clone().with_default_queues(cfg.vcpus);
            let slot = crate::acpi::VirtioMmioSlot::from_layout(index as u32);
            disks
                .0
                .push(Disk::connect(&vm, &ram, &disk, image, slot, &workers)?);
        }
        let slots: Vec<crate::acpi::VirtioMmioSlot> =
            disks.0.iter().map(|d| d.device.slot).collect();
        let bus = Arc::new(MmioBus {
            devices: disks.0.iter().map(|d| d.device.clone()).collect(),
        });
        let tables = crate::acpi::create_acpi_tables(ram.memory(), num_vcpus, &slots)?;
        let cmdline = guest_cmdline(&cfg.cmdline, &slots);
        let loaded = boot::load(
            ram.memory(),
            &BootConfig {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cmdline,
                rsdp: Some(tables.rsdp()),
            },
        )?;

        let serial = SerialPort::new(serial_out).map_err(VmError::Serial)?;
        vm.register_irqfd(serial.irq_evt(), SERIAL_GSI)
            .map_err(kvm_err("connect the serial interrupt"))?;
        let pio = Arc::new(LegacyPio::new(serial.clone()));

        let (tx, events) = mpsc::channel();
        let mut base_cpuid = cpu::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..num_vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            if id == 0 {
                match fd.get_tsc_khz() {
                    Ok(khz) => base_cpuid = cpu::with_tsc_frequency(&base_cpuid, khz),
                    Err(e) => tracing::debug!("no TSC frequency for the guest: {e}"),
                }
            }
            cpu::configure_common(&fd, id, &cpu::cpuid_for(&base_cpuid, id, num_vcpus))?;
            if id == 0 {
                cpu::configure_boot_vcpu(&fd, loaded.entry)?;
            }
            let stats = Arc::new(crate::vcpu::VcpuStats {
                kvm: crate::kvm_stats::KvmStats::open(&fd)
                    .map_err(|e| tracing::debug!("vCPU {id}: no KVM statistics: {e}"))
                    .ok(),
                ..Default::default()
            });
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: bus.clone(),
                stats,
                mem: ram.memory().clone(),
                events: tx.clone(),
            });
        }
        Ok(Vm {
            vcpus,
            events,
            stopper: Stopper(tx),
            _vm: vm,
            _kvm: kvm,
            ram,
            serial,
            disks: disks.keep(),
            violations,
            entry: loaded.entry,
        })
    }

    /// The boot protocol the kernel will enter through.
    pub fn entry(&self) -> EntryPoint {
        self.entry
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, shared (e.g. for a thread that watches rings while the VM runs).
    pub fn shared_ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    /// The disks, in `--disk` order.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Exit counters of every vCPU and device, readable while the VM runs.
    pub fn stats(&self) -> VmStats {
        VmStats {
            vcpus: self.vcpus.iter().map(|v| v.stats.clone()).collect(),
            devices: self.disks.iter().map(|d| d.device.clone()).collect(),
            violations: self.violations.clone(),
        }
    }

    /// The disks whose workers bulkhead supervises, by id (for the control API).
    pub fn disk_controls(&self) -> Vec<(String, Arc<crate::supervisor::DiskControl>)> {
        self.disks
            .iter()
            .filter_map(|d| Some((d.device.id.clone(), d.control.clone()?)))
            .collect()
    }

    /// A handle that stops the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The serial port, e.g. to feed it input.
    pub fn serial(&self) -> &SerialPort {
        &self.serial
    }

    /// Starts every vCPU and waits until one stops the VM or `timeout` expires. The vCPU
    /// threads are left running: the caller ends the process (the VM is gone with it).
    pub fn run(mut self, timeout: Option<Duration>) -> Result<VmOutcome, VmError> {
        let started = Instant::now();
        for vcpu in self.vcpus.drain(..) {
            let id = vcpu.id;
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu.run())
                .map_err(|source| VmError::SpawnVcpu { vcpu: id, source })?;
        }
        let event = match timeout {
            Some(limit) => match self.events.recv_timeout(limit) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => {
                    std::mem::forget(self);
                    return Ok(VmOutcome::TimedOut(started.elapsed()));
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => self.events.recv().ok(),
        };
        let outcome = match event {
            Some(VmEvent::Vcpu(e)) => VmOutcome::Vcpu(e),
            Some(VmEvent::Signal(sig)) => VmOutcome::Signal(sig),
            None => VmOutcome::Vanished,
        };
        // The memory must outlive the still-running vCPU threads: leak it deliberately.
        std::mem::forget(self);
        Ok(outcome)
    }
}

/// What starting and supervising a worker needs besides its disk's configuration.
struct WorkerEnv<'a> {
    bin: Option<&'a std::path::Path>,
    learn: Option<&'a Arc<policies::learn::Recorder>>,
    violations: &'a Arc<ViolationLog>,
}

/// Exit counters of a VM.
#[derive(Debug, Clone)]
pub struct VmStats {
    pub vcpus: Vec<Arc<crate::vcpu::VcpuStats>>,
    pub devices: Vec<Arc<VirtioMmioDevice>>,
    /// The workers' last policy violations.
    pub violations: Arc<ViolationLog>,
}

impl VmStats {
    /// One line per vCPU and per device, `key=value` (tests parse them).
    pub fn lines(&self) -> Vec<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let kvm = v
                .kvm
                .as_ref()
                .and_then(|k| k.read(&["io_exits", "mmio_exits"]).ok())
                .map(|vals| {
                    let show = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
                    format!(
                        " kvm_io_exits={} kvm_mmio_exits={}",
                        show(vals[0]),
                        show(vals[1])
                    )
                })
                .unwrap_or_default();
            out.push(format!(
                "stats vcpu{i} io_exits={} mmio_exits={} io_in={} io_out={} mmio_read={} mmio_write={} other={}{kvm}",
                v.io_exits(),
                v.mmio_exits(),
                v.io_in.load(Relaxed),
                v.io_out.load(Relaxed),
                v.mmio_read.load(Relaxed),
                v.mmio_write.load(Relaxed),
                v.other.load(Relaxed)
            ));
        }
        for d in &self.devices {
            let e = &d.exits;
            out.push(format!(
                "stats {} queue_notify={} interrupt_status={} interrupt_ack={} config={} other={}",
                d.id,
                e.queue_notify.load(Relaxed),
                e.interrupt_status.load(Relaxed),
                e.interrupt_ack.load(Relaxed),
                e.config.load(Relaxed),
                e.other.load(Relaxed)
            ));
        }
        out.extend(self.violations.lines());
        out
    }
}

/// Largest queue the transport offers (QueueNumMax).
pub const QUEUE_MAX: u16 = 256;

/// One disk: its transport device, and the worker serving it (none for an external
/// vhost-user backend).
#[derive(Debug)]
pub struct Disk {
    pub device: Arc<VirtioMmioDevice>,
    /// Its worker's supervisor, for planned restarts (None for external backends).
    pub control: Option<Arc<crate::supervisor::DiskControl>>,
}

/// Guest RAM as (start, length) ranges, for the transport's ring checks.
fn ram_ranges(ram: &GuestRam) -> Vec<(u64, u64)> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    ram.memory()
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// How long a worker gets to finish its in-flight requests and exit once its disk is
/// disconnected, before it is killed.
pub const WORKER_GRACE: Duration = Duration::from_secs(2);

/// Ends every disk's backend: disconnects it, gives the workers [`WORKER_GRACE`] to end,
/// kills those that did not and waits for them as long again.
pub fn end_backends(
    devices: &[Arc<VirtioMmioDevice>],
    controls: &[(String, Arc<crate::supervisor::DiskControl>)],
) {
    for device in devices {
        device.disconnect_backend();
    }
    let deadline = std::time::Instant::now() + WORKER_GRACE;
    let lingering: Vec<_> = controls
        .iter()
        .filter(|(_, control)| !control.wait_ended(deadline))
        .collect();
    for (_, control) in &lingering {
        control.kill_worker();
    }
    let deadline = std::time::Instant::now() + WORKER_GRACE;
    for (id, control) in lingering {
        if !control.wait_ended(deadline) {
            tracing::warn!("disk {id}: its worker did not end, even killed");
        }
    }
}

/// The disks of a VM being built: dropped before the VM is, they end their workers.
struct StartedDisks(Vec<Disk>);

impl StartedDisks {
    fn keep(mut self) -> Vec<Disk> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for StartedDisks {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let devices: Vec<_> = self.0.iter().map(|d| d.device.clone()).collect();
        let controls: Vec<_> = self
            .0
            .iter()
            .filter_map(|d| Some((d.device.id.clone(), d.control.clone()?)))
            .collect();
        end_backends(&devices, &controls);
    }
}

impl Disk {
    /// Starts the disk's worker (for an image, opened by the caller) or connects to its
    /// external backend, and sets the device up. Any failure fails the VM's start.
    fn connect(
        vm: &VmFd,
        ram: &Arc<GuestRam>,
        cfg: &DiskConfig,
        image: Option<Arc<crate::disk::OpenedImage>>,
        slot: crate::acpi::VirtioMmioSlot,
        workers: &WorkerEnv,
    ) -> Result<Disk, VmError> {
        let (stream, worker) = match (&cfg.backend, image) {
            (DiskBackend::Image(path), Some(image)) => {
                let bin = match workers.bin {
                    Some(b) => b.to_path_buf(),
                    None => crate::worker::default_worker_bin().ok_or(VmError::NoWorkerBin)?,
                };
                let w = crate::worker::spawn(
                    cfg,
                    &image,
                    &bin,
                    workers.learn,
                    ipc::messages::ServeMode::Normal,
                )?;
                tracing::info!(
                    "disk {}: {} served by worker pid {} ({} bytes)",
                    cfg.id,
                    path.display(),
                    w.child.id(),
                    w.disk_size
                );
                let vhost = w
                    .vhost
                    .try_clone()
                    .map_err(|source| VmError::VhostUserConnect {
                        path: path.clone(),
                        source,
                    })?;
                (vhost, Some((w, image, bin)))
            }
            (DiskBackend::Image(path), None) => {
                unreachable!("Vm::build opens every image first ({})", path.display())
            }
            (DiskBackend::VhostUser(path), _) => {
                let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                    VmError::VhostUserConnect {
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
        let backend = match crate::vhost_frontend::setup(&cfg.id, stream, cfg.num_queues) {
            Ok(b) => b,
            Err(e) => {
                if let Some((mut w, _, _)) = worker {
                    // It may have died by itself (that may be why setup failed): give it a
                    // moment, then make sure, and say how it ended.
                    let deadline = std::time::Instant::now() + Duration::from_millis(500);
                    let mut exited = None;
                    while std::time::Instant::now() < deadline {
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
                    let how = exited.map_or_else(|| "ended".to_string(), describe_exit);
                    report_worker_end(&cfg.id, &w.status, &how, exited, workers.violations);
                }
                return Err(e.into());
            }
        };
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::DiskSetup {
                id: cfg.id.clone(),
                what: "create an eventfd",
                source,
            })
        };
        let queues = usize::from(cfg.num_queues);
        let mut kicks = Vec::with_capacity(queues);
        let mut calls = Vec::with_capacity(queues);
        for q in 0..queues {
            let kick = eventfd()?;
            // The kick never leaves the kernel: a QueueNotify write of this queue's index
            // signals the worker's eventfd directly.
            let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
            if cfg.ioeventfd == crate::disk::IoEventFdMatch::Any {
                vm.register_ioevent(&kick, &addr, kvm_ioctls::NoDatamatch)
            } else {
                vm.register_ioevent(&kick, &addr, q as u32)
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
        let (tx, rx) = mpsc::channel();
        let info = DeviceInfo {
            id: cfg.id.clone(),
            slot,
            device_features: backend.features,
            config: backend.config.clone(),
            num_queues: queues,
            queue_max: QUEUE_MAX,
            ram: ram_ranges(ram),
        };
        let device = Arc::new(VirtioMmioDevice::new(info, config_irq, tx));
        let features = backend.features;
        let config = backend.config.clone();
        let mut worker_pidfd = None;
        let mut supervised = None;
        let disk_control = Arc::new(crate::supervisor::DiskControl::default());
        if let Some((w, image, bin)) = worker {
            worker_pidfd = crate::supervisor::pidfd_open(w.child.id())
                .map_err(|e| {
                    tracing::warn!("worker {} (pid {}): no pidfd: {e}", cfg.id, w.child.id())
                })
                .ok()
                .map(Arc::new);
            supervised = Some((
                crate::supervisor::Supervisor {
                    cfg: cfg.clone(),
                    image,
                    bin,
                    learn: workers.learn.cloned(),
                    violations: workers.violations.clone(),
                    device: device.clone(),
                    ram: ram.clone(),
                    features,
                    config,
                    control: disk_control.clone(),
                    kicks: kicks
                        .iter()
                        .map(EventFd::try_clone)
                        .collect::<Result<_, _>>()
                        .map_err(|source| VmError::DiskSetup {
                            id: cfg.id.clone(),
                            what: "duplicate the kick eventfds",
                            source,
                        })?,
                },
                w,
            ));
        }
        let control = ControlThread {
            device: device.clone(),
            backend,
            ram: ram.clone(),
            kicks,
            calls,
            queue_max: QUEUE_MAX,
            worker_pidfd: worker_pidfd.clone(),
            wanted: None,
            inflight: None,
            disk: supervised.is_some().then(|| disk_control.clone()),
            awaiting_normal: false,
            errors: Default::default(),
        };
        std::thread::Builder::new()
            .name(format!("{}-ctl", cfg.id))
            .spawn(move || control.run(rx))
            .map_err(|source| VmError::DiskSetup {
                id: cfg.id.clone(),
                what: "start its control thread",
                source,
            })?;
        let supervised_any = supervised.is_some();
        if let Some((supervisor, w)) = supervised {
            supervisor
                .start(w, worker_pidfd)
                .map_err(|source| VmError::DiskSetup {
                    id: cfg.id.clone(),
                    what: "start its worker's supervisor",
                    source,
                })?;
        }
        Ok(Disk {
            control: supervised_any.then_some(disk_control),
            device,
        })
    }
}

/// Logs the confined worker's sandbox facts once its reaper has published its pid and
/// the worker has installed its filter (or says it could not see them).
pub(crate) fn report_confinement(id: &str, reaper: u32, status: &ipc::status::StatusMapping) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let pid = status.worker_pid();
        if pid != 0 && pid != reaper {
            if let Some(facts) = crate::sandbox_report::SandboxFacts::read(pid) {
                if facts.seccomp == "2" {
                    let verdict = if facts.confined() {
                        "confined"
                    } else {
                        "NOT fully confined"
                    };
                    tracing::info!("worker {id} {verdict}: {facts}");
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!("worker {id}: could not confirm its confinement within 5 s");
}

/// One log line for a worker that ended: its confined pid, and how it ended. A crash
/// (a fault, abort or panic that the worker's own record and its reaper's agree on) is
/// reported with its signal; a policy violation from the status page is decoded by name
/// and kept in `violations`, but only when the reaper saw the worker end the way the
/// SIGSYS handler ends it: a record alone is the worker's word, and a compromised worker
/// could write one.
pub(crate) fn report_worker_end(
    id: &str,
    status: &ipc::status::StatusMapping,
    how: &str,
    reaper: Option<std::process::ExitStatus>,
    violations: &ViolationLog,
) {
    use ipc::status::{WorkerEnd, EXIT_POLICY_VIOLATION};
    let confined = status.worker_pid();
    // The end record counts only if the reaper itself ended as it says (it exits the way
    // its worker did). A reaper that was killed (by the VMM, on a hang or a bad reply)
    // wrote nothing, and whatever the page holds is the worker's own word.
    let end = status
        .end()
        .filter(|e| reaper.is_some_and(|r| r.code() == Some(e.exit_code())));
    if let Some(crash) = ipc::status::describe_crash(status.crash(), end) {
        tracing::error!("worker {id} (pid {confined}) {crash} ({how})");
        return;
    }
    if end == Some(WorkerEnd::Signaled(libc::SIGSYS)) {
        // A trap with its SIGSYS handler blocked or undone: a violation nobody recorded.
        tracing::error!(
            "worker {id} (pid {confined}) was killed by SIGSYS: a seccomp trap its handler \
             did not record ({how})"
        );
        return;
    }
    let trapped = end == Some(WorkerEnd::Exited(EXIT_POLICY_VIOLATION));
    match status.violation() {
        Some(v) if !trapped => tracing::error!(
            "worker {id} (pid {confined}) {how}; its status page holds a violation record \
             (nr {}) that its end does not confirm: not counted",
            v.nr
        ),
        Some(v) => {
            let call = policies::decode::format_call(v.nr, v.args);
            tracing::error!("worker {id} (pid {confined}) violated policy blk: {call} ({how})");
            violations.push(Violation {
                disk: id.to_string(),
                pid: confined,
                policy: "blk/main".to_string(),
                nr: v.nr,
                args: v.args,
                call,
                when: std::time::SystemTime::now(),
            });
        }
        None => tracing::error!("worker {id} (pid {confined}) {how}"),
    }
}

pub(crate) fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(ipc::status::EXIT_POLICY_VIOLATION), _) => "exited on a seccomp violation".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// The user's command line plus one `virtio_mmio.device=` entry per slot (the convention
/// of Firecracker and QEMU microvm; stock Debian kernels use the ACPI DSDT instead).
pub fn guest_cmdline(user: &str, slots: &[crate::acpi::VirtioMmioSlot]) -> String {
    let mut cmdline = user.trim().to_string();
    for slot in slots {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            slot.size / 1024,
            slot.base,
            slot.gsi
        ));
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::VirtioMmioSlot;

    #[test]
    fn cmdline_gets_one_entry_per_slot() {
        let slots = [0, 1].map(|i| VirtioMmioSlot {
            base: layout::virtio_mmio_slot_addr(i),
            size: layout::VIRTIO_MMIO_SLOT_SIZE,
            gsi: layout::virtio_mmio_slot_gsi(i),
        });
        assert_eq!(
            guest_cmdline("console=ttyS0 ", &slots),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(guest_cmdline("", &[]), "");
    }
}
