//! The vCPU thread: KVM_RUN, exits dispatched to the legacy devices, and a crash report
//! (registers and instruction bytes) when the guest dies.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{LegacyPio, PioAction};
use crate::memory::GuestMemory;

/// Why a vCPU asks the VMM to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest reset the machine (i8042) or asked KVM to shut down or reset.
    Reset,
    /// The guest powered off through ACPI (S5).
    PowerOff,
    /// The guest can no longer run: triple fault, KVM internal error, failed entry, or an
    /// exit this VMM does not handle. `report` holds the vCPU state.
    Crashed {
        vcpu: u8,
        what: String,
        report: String,
    },
    /// KVM_RUN failed.
    RunFailed { vcpu: u8, error: String },
}

/// Userspace exits of one vCPU, by kind (KVM's own `io_exits` / `mmio_exits` count the
/// same events, which tests compare).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// KVM's own statistics of this vCPU, when the kernel offers them.
    pub kvm: Option<crate::kvm_stats::KvmStats>,
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub other: AtomicU64,
}

impl VcpuStats {
    pub fn io_exits(&self) -> u64 {
        self.io_in.load(Ordering::Relaxed) + self.io_out.load(Ordering::Relaxed)
    }

    pub fn mmio_exits(&self) -> u64 {
        self.mmio_read.load(Ordering::Relaxed) + self.mmio_write.load(Ordering::Relaxed)
    }
}

/// What one exit turned into, once the borrow of the run structure has ended.
enum Step {
    Continue,
    Stop(VcpuEvent),
    Crash(String),
}

/// A vCPU and what its thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<LegacyPio>,
    pub mmio: Arc<crate::devices::virtio_mmio::MmioBus>,
    pub stats: Arc<VcpuStats>,
    pub mem: GuestMemory,
    /// Where the vCPU waits while the VM is paused.
    pub pause: Arc<crate::pause::PauseGate>,
    /// Told why the vCPU stopped (the VM's main thread listens).
    pub stopped: Box<dyn FnOnce(VcpuEvent) + Send>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Runs the guest until it stops, then says why through `stopped`.
    pub fn run(mut self) {
        let stopped = std::mem::replace(&mut self.stopped, Box::new(|_| {}));
        crate::pause::register_vcpu(&mut self.fd.get_kvm_run().immediate_exit);
        let event = loop {
            self.pause.wait_if_paused();
            let step = self.step();
            match step {
                Step::Continue => {}
                Step::Stop(event) => break event,
                Step::Crash(what) => {
                    let report = self.crash_report();
                    break VcpuEvent::Crashed {
                        vcpu: self.id,
                        what,
                        report,
                    };
                }
            }
        };
        // The kvm_run mapping goes with `self`: a kick from now on must not write there.
        crate::pause::register_vcpu(std::ptr::null_mut());
        stopped(event);
    }

    fn step(&mut self) -> Step {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.stats.io_out.fetch_add(1, Ordering::Relaxed);
                match self.pio.write(port, data) {
                    PioAction::Continue => Step::Continue,
                    PioAction::Reset => Step::Stop(VcpuEvent::Reset),
                    PioAction::PowerOff => Step::Stop(VcpuEvent::PowerOff),
                    PioAction::DebugExit(code) => Step::Stop(VcpuEvent::DebugExit(code)),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.stats.io_in.fetch_add(1, Ordering::Relaxed);
                self.pio.read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.stats.mmio_read.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.read(addr, data) {
                    // Unassigned addresses read all ones.
                    tracing::trace!(vcpu = self.id, "MMIO read of unassigned {addr:#x}");
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.stats.mmio_write.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.write(addr, data) {
                    tracing::trace!(vcpu = self.id, "MMIO write to unassigned {addr:#x}");
                }
                Step::Continue
            }
            // With the in-kernel irqchip a halt waits in the kernel; tolerate one anyway.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                self.stats.other.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => Step::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Step::Stop(VcpuEvent::Reset)
                }
                other => Step::Crash(format!("system event {other}")),
            },
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union for this exit
                // reason (KVM_EXIT_INTERNAL_ERROR); it is plain integers.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Step::Crash(format!(
                    "KVM internal error, suberror {} data {:x?}",
                    internal.suberror,
                    &internal.data[..n]
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Crash(format!(
                "VM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(other) => Step::Crash(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (a pause) set immediate_exit: the next KVM_RUN is to run.
                self.stats.other.fetch_add(1, Ordering::Relaxed);
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Stop(VcpuEvent::RunFailed {
                vcpu: self.id,
                error: e.to_string(),
            }),
        }
    }

    /// Registers, segment state and the bytes at RIP, for the log.
    fn crash_report(&self) -> String {
        let mut out = String::new();
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return format!("registers unavailable: {e}"),
        };
        let _ = write!(
            out,
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
             rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
             rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
             r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
             r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
            regs.rip,
            regs.rsp,
            regs.rflags,
            regs.rax,
            regs.rbx,
            regs.rcx,
            regs.rdx,
            regs.rsi,
            regs.rdi,
            regs.rbp,
            regs.r8,
            regs.r9,
            regs.r10,
            regs.r11,
            regs.r12,
            regs.r13,
            regs.r14,
            regs.r15
        );
        let mut rip_linear = regs.rip;
        if let Ok(s) = self.fd.get_sregs() {
            let _ = write!(
                out,
                "\ncs={:#06x} (base {:#x}, l={} db={} dpl={}) ss={:#06x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.cs.dpl, s.ss.selector, s.cr0, s.cr2,
                s.cr3, s.cr4, s.efer
            );
            if s.cs.l == 0 {
                rip_linear = s.cs.base.wrapping_add(regs.rip);
            }
        }
        match self.fd.translate_gva(rip_linear) {
            Ok(t) if t.valid != 0 => {
                let mut bytes = [0u8; 16];
                match self
                    .mem
                    .read_slice(&mut bytes, GuestAddress(t.physical_address))
                {
                    Ok(()) => {
                        let _ = write!(
                            out,
                            "\ncode at rip (gpa {:#x}): {}",
                            t.physical_address,
                            bytes
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                    }
                    Err(e) => {
                        let _ = write!(
                            out,
                            "\ncode at rip (gpa {:#x}) unreadable: {e}",
                            t.physical_address
                        );
                    }
                }
            }
            Ok(_) => out.push_str("\nrip does not translate to a guest-physical address"),
            Err(e) => {
                let _ = write!(out, "\ncannot translate rip: {e}");
            }
        }
        out
    }
}
