//! Building a VM from its configuration and running it until it stops.
//!
//! Everything that can be wrong with the configuration (the kernel, the initrd, sizes,
//! counts) is found in [`Vm::build`], before any vCPU runs.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootConfig, EntryPoint};
use crate::cpu;
use crate::devices::serial::SerialPort;
use crate::devices::LegacyPio;
use crate::layout::{KVM_TSS_START, SERIAL_GSI};
use crate::memory::GuestRam;
use crate::vcpu::{Vcpu, VcpuEvent};

/// Command line when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A virtual machine as the user described it.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u32,
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
    ram: GuestRam,
    serial: SerialPort,
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
        let ram = GuestRam::new(cfg.mem_mib)?;
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

        // Devices with a virtio-mmio slot come with the worker issues; the builder
        // already takes the slot list.
        let slots: Vec<crate::acpi::VirtioMmioSlot> = Vec::new();
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
        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..num_vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            cpu::configure_common(&fd, id, &cpu::cpuid_for(&base_cpuid, id, num_vcpus))?;
            if id == 0 {
                cpu::configure_boot_vcpu(&fd, loaded.entry)?;
            }
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
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
    use crate::layout;

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
