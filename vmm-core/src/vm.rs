//! Building a VM from its configuration and running it until it stops.
//!
//! Everything that can be wrong with the configuration (the kernel, the initrd, sizes,
//! counts) is found in [`Vm::build`], before any vCPU runs.

use crate::config::VmConfig;
use crate::violations::ViolationLog;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootConfig, EntryPoint};
use crate::cpu;
use crate::devices::serial::SerialPort;
use crate::devices::virtio_mmio::MmioBus;
use crate::devices::LegacyPio;
use crate::disk::attach::{Disk, StartedDisks, WorkerEnv};
use crate::layout::{self, KVM_TSS_START, SERIAL_GSI};
use crate::memory::GuestRam;
use crate::report::VmStats;
use crate::supervisor::DiskHandle;
use crate::uid_lease::{UidLease, LEASE_DIR};
use crate::vcpu::{Vcpu, VcpuEvent};

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
    #[error(transparent)]
    Disk(#[from] crate::disk::attach::AttachError),
    #[error(transparent)]
    Uid(#[from] crate::uid_lease::UidError),
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
    /// The control API asked for a shutdown.
    Shutdown,
    /// Every vCPU thread is gone without saying why (should not happen).
    Vanished,
}

/// What the main thread waits for.
#[derive(Debug)]
pub enum VmEvent {
    Vcpu(VcpuEvent),
    Signal(i32),
    Shutdown,
}

/// Lets another thread (e.g. a signal handler thread) stop a running VM.
#[derive(Clone, Debug)]
pub struct Stopper(SyncSender<VmEvent>);

impl Stopper {
    /// Ends the VM's run with [`VmOutcome::Signal`].
    pub fn signal(&self, sig: i32) {
        // The VM ends on the first event: a full channel already holds one.
        let _ = self.0.try_send(VmEvent::Signal(sig));
    }

    /// Ends the VM's run with [`VmOutcome::Shutdown`].
    pub fn shutdown(&self) {
        let _ = self.0.try_send(VmEvent::Shutdown);
    }
}

/// Pause, resume and shutdown for the control API.
#[derive(Debug)]
pub struct Controls {
    gate: Arc<crate::pause::PauseGate>,
    stopper: Stopper,
    events: Arc<crate::events::EventLog>,
}

impl crate::api::VmControl for Controls {
    fn state(&self) -> &'static str {
        if self.gate.paused() {
            "paused"
        } else {
            "running"
        }
    }

    fn pause(&self) -> Result<(), String> {
        self.gate.pause(|| {
            tracing::info!("api: paused the vCPUs");
            self.events.emit("paused", None, serde_json::json!({}));
        })
    }

    fn resume(&self) -> Result<(), String> {
        self.gate.resume(|| {
            tracing::info!("api: resumed the vCPUs");
            self.events.emit("resumed", None, serde_json::json!({}));
        });
        Ok(())
    }

    fn shutdown(&self) {
        self.stopper.shutdown();
    }
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM fd go before the memory they map.
    vcpus: Vec<Vcpu>,
    events: Receiver<VmEvent>,
    stopper: Stopper,
    pause: Arc<crate::pause::PauseGate>,
    _vm: VmFd,
    _kvm: Kvm,
    ram: Arc<GuestRam>,
    serial: SerialPort,
    disks: Vec<Disk>,
    violations: Arc<ViolationLog>,
    event_log: Arc<crate::events::EventLog>,
    entry: EntryPoint,
    /// The vCPU threads were started.
    running: bool,
    /// Each vCPU's exit counters (kept here: the vCPUs go to their threads).
    vcpu_stats: Vec<Arc<crate::vcpu::VcpuStats>>,
    /// The uid the workers run as, leased for the VM's life.
    _uid: UidLease,
}

impl Vm {
    /// Checks the configuration and builds the VM; no vCPU runs yet. Serial output goes to
    /// `serial_out`. With `learn` (`bulkhead policy learn`), the workers run in learn mode,
    /// their syscalls recorded there.
    pub fn build(
        cfg: &VmConfig,
        learn: Option<&Arc<policies::learn::Recorder>>,
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
        let images = crate::disk::attach::open_images(&cfg.disks)?;
        let uid = match cfg.worker_uids {
            Some(range) => UidLease::take(range, std::path::Path::new(LEASE_DIR))?,
            None => UidLease::nobody(),
        };
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
        let event_log = Arc::new(crate::events::EventLog::default());
        let workers = WorkerEnv {
            bin: cfg.worker_bin.as_deref(),
            learn,
            violations: &violations,
            events: &event_log,
            uid: uid.uid,
        };
        // Until the VM is built, a failure ends the workers already started.
        let mut disks = StartedDisks::default();
        for (index, (disk, image)) in cfg.disks.iter().zip(images).enumerate() {
            let disk = disk.clone().with_default_queues(cfg.vcpus);
            let slot = crate::acpi::VirtioMmioSlot::from_layout(index as u32);
            // Every line about this disk from here on (its threads inherit the span).
            let _in_disk = tracing::info_span!("disk", id = %disk.id).entered();
            disks.push(crate::disk::attach::attach(
                &vm, &ram, &disk, image, slot, &workers,
            )?);
        }
        let slots: Vec<crate::acpi::VirtioMmioSlot> =
            disks.as_slice().iter().map(|d| d.device.slot).collect();
        let bus = Arc::new(MmioBus {
            devices: disks.as_slice().iter().map(|d| d.device.clone()).collect(),
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

        // Bounded: each vCPU says once why it stopped, and one signal ends the VM.
        let (tx, events) = mpsc::sync_channel(usize::from(num_vcpus) + 2);
        crate::pause::install_handler().map_err(|e| VmError::Kvm {
            what: "install the vCPU kick handler",
            source: kvm_ioctls::Error::new(e as i32),
        })?;
        let pause = Arc::new(crate::pause::PauseGate::default());
        pause.expect_vcpus(usize::from(num_vcpus));
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
                pause: pause.clone(),
                stopped: {
                    let tx = tx.clone();
                    // The receiver is gone only when the VMM is already exiting.
                    Box::new(move |e| drop(tx.try_send(VmEvent::Vcpu(e))))
                },
            });
        }
        let vcpu_stats = vcpus.iter().map(|v| v.stats.clone()).collect();
        Ok(Vm {
            vcpus,
            events,
            stopper: Stopper(tx),
            pause,
            _vm: vm,
            _kvm: kvm,
            ram,
            serial,
            disks: disks.keep(),
            violations,
            event_log,
            entry: loaded.entry,
            running: false,
            vcpu_stats,
            _uid: uid,
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
            vcpus: self.vcpu_stats.clone(),
            devices: self.disks.iter().map(|d| d.device.clone()).collect(),
            violations: self.violations.clone(),
        }
    }

    /// The disks whose workers bulkhead supervises, by id (for the control API).
    pub fn disk_handles(&self) -> Vec<(String, Arc<DiskHandle>)> {
        self.disks
            .iter()
            .filter_map(|d| Some((d.id.clone(), d.handle.clone()?)))
            .collect()
    }

    /// What happened to the VM and its disks, for the control API.
    pub fn events(&self) -> Arc<crate::events::EventLog> {
        self.event_log.clone()
    }

    /// Pause, resume and shutdown, for the control API.
    pub fn controls(&self) -> Controls {
        Controls {
            gate: self.pause.clone(),
            stopper: self.stopper.clone(),
            events: self.event_log.clone(),
        }
    }

    /// A handle that stops the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The serial port, e.g. to feed it input.
    pub fn serial(&self) -> &SerialPort {
        &self.serial
    }

    /// Starts every vCPU and waits until one stops the VM or `timeout` expires. Once: a
    /// VM does not run twice. The vCPU threads are left running (see [`Self::shutdown`]).
    pub fn run(&mut self, timeout: Option<Duration>) -> Result<VmOutcome, VmError> {
        let started = Instant::now();
        if self.vcpus.is_empty() {
            return Ok(VmOutcome::Vanished);
        }
        self.running = true;
        let (tids, started_tids) = mpsc::channel();
        for vcpu in self.vcpus.drain(..) {
            let id = vcpu.id;
            let tids = tids.clone();
            crate::thread::spawn(
                format!("vcpu{id}"),
                crate::confine::VmmThread::Vcpu,
                move || {
                    // SAFETY: gettid has no arguments and cannot fail.
                    let _ = tids.send(unsafe { libc::gettid() });
                    drop(tids);
                    vcpu.run()
                },
            )
            .map_err(|source| VmError::SpawnVcpu { vcpu: id, source })?;
        }
        drop(tids);
        // A pidfd on each vCPU thread, opened while this thread may still open one: the
        // API kicks the vCPUs through them to pause the VM.
        for tid in started_tids.iter() {
            self.pause.add_vcpu_thread(tid);
        }
        // Setup is over: from here the main thread only waits, then ends the backends.
        crate::confine::enter(crate::confine::VmmThread::Main);
        let event = match timeout {
            Some(limit) => match self.events.recv_timeout(limit) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => {
                    return Ok(VmOutcome::TimedOut(started.elapsed()));
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => self.events.recv().ok(),
        };
        Ok(match event {
            Some(VmEvent::Vcpu(e)) => VmOutcome::Vcpu(e),
            Some(VmEvent::Signal(sig)) => VmOutcome::Signal(sig),
            Some(VmEvent::Shutdown) => VmOutcome::Shutdown,
            None => VmOutcome::Vanished,
        })
    }

    /// Ends a VM that ran: every disk's backend ends (workers finish what is in flight
    /// and exit; learn mode records them to this normal end), so a next run finds the
    /// images unlocked; then the exit counters are logged. The vCPU threads are not
    /// joined: the caller ends the process, and the VM with it.
    pub fn shutdown(self) {
        crate::disk::attach::end_backends(&self.disks);
        self.stats().log();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.running {
            // vCPU threads may still be in KVM_RUN on this memory: it must never be
            // unmapped under them, so one reference is leaked on purpose.
            std::mem::forget(self.ram.clone());
        }
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
