//! The virtio-mmio transport (version 2) in front of a vhost-user backend.
//!
//! The vCPU thread answers every register access from this device's own state. Two paths
//! never reach here at all: QueueNotify is an ioeventfd (KVM signals the worker's kick
//! eventfd directly) and completions are an irqfd (the worker's call eventfd raises the
//! GSI). InterruptStatus and InterruptACK, which the guest touches per interrupt, are
//! served from atomics without a lock. Bringing rings up or down is not done here: the
//! transport emits [`TransportEvent`]s to whoever serves the device (bulkhead's vhost-user
//! frontend), and knows nothing of it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::acpi::VirtioMmioSlot;

pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4b48_4c42; // "BLHK"
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Feature bits this transport can carry: device-specific bits, INDIRECT_DESC, EVENT_IDX
/// and VERSION_1. Packed rings, IOMMU, notification data and the like are not offered
/// even if a backend has them.
pub const TRANSPORT_FEATURES: u64 = 0x00ff_ffff | 1 << 28 | 1 << 29 | 1 << 32;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A queue as the driver programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// What the transport tells whoever serves the device.
#[derive(Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// DRIVER_OK: negotiate these features and bring these rings up.
    Activate {
        driver_features: u64,
        queues: Vec<QueueRegs>,
    },
    /// The driver wrote 0 to Status: stop the rings, then call
    /// [`VirtioMmioDevice::reset_complete`] (the driver's write waits for it).
    Reset,
}

/// Where a device's [`TransportEvent`]s go.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Delivers `event`; false when nobody serves the device any more.
    fn send(&self, event: TransportEvent) -> bool;
}

/// What a write to the Status register does (virtio 1.2, 2.1 and 3.1.1), given the status
/// before it and whether the driver's features are acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// 0: reset the device (`was_active`: its rings had been brought up).
    Reset,
    /// The new status; `activate`: DRIVER_OK was just set with FEATURES_OK, so the rings
    /// are to be checked and brought up.
    Set { status: u32, activate: bool },
}

/// The status transition table. DEVICE_NEEDS_RESET is the device's to set and stays
/// until a reset, whatever the driver writes; FEATURES_OK sticks only for features the
/// device offers, VERSION_1 included (the driver reads it back and gives up otherwise);
/// DRIVER_OK activates the device once, and only after FEATURES_OK.
pub fn status_change(old: u32, written: u32, features_acceptable: bool) -> StatusChange {
    if written == 0 {
        return StatusChange::Reset;
    }
    let mut new = written & !STATUS_NEEDS_RESET | (old & STATUS_NEEDS_RESET);
    if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 && !features_acceptable {
        new &= !STATUS_FEATURES_OK;
    }
    let activate =
        new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && new & STATUS_FEATURES_OK != 0;
    StatusChange::Set {
        status: new,
        activate,
    }
}

/// The `idx` field of the split-ring area (driver or device) at guest address `ring`: it
/// follows the 16-bit flags. None if that is not in guest RAM.
pub fn ring_idx<M: vm_memory::GuestMemory>(mem: &M, ring: u64) -> Option<u16> {
    use vm_memory::{Address, Bytes, GuestAddress};
    GuestAddress(ring)
        .checked_add(2)
        .and_then(|a| mem.read_obj::<u16>(a).ok())
}

/// Exits this device caused, by register, for stats and tests.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub queue_notify: AtomicU64,
    pub interrupt_status: AtomicU64,
    pub interrupt_ack: AtomicU64,
    pub config: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Debug, Default)]
struct Regs {
    status: u32,
    /// DRIVER_OK brought the backend's rings up (not refused for a bad ring).
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
}

/// What the transport presents for one device (from the backend's setup).
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub id: String,
    pub slot: VirtioMmioSlot,
    /// Features the backend offers (masked to [`TRANSPORT_FEATURES`] here).
    pub device_features: u64,
    /// The device's config space, fetched once from the backend.
    pub config: Vec<u8>,
    pub num_queues: usize,
    pub queue_max: u16,
    /// Guest RAM as (start, length) ranges: every ring the driver sets up must lie in one.
    pub ram: Vec<(u64, u64)>,
}

/// Why a queue the driver set up cannot be used (virtio 1.2, 2.7: split virtqueues).
pub fn check_queue(q: &QueueRegs, queue_max: u16, ram: &[(u64, u64)]) -> Result<(), String> {
    let n = u64::from(q.size);
    if q.size == 0 || q.size > queue_max || !q.size.is_power_of_two() {
        return Err(format!(
            "size {} is not a power of two in 1..={queue_max}",
            q.size
        ));
    }
    for (what, addr, align, len) in [
        ("descriptor table", q.desc, 16, 16 * n),
        ("available ring", q.driver, 2, 6 + 2 * n),
        ("used ring", q.device, 4, 6 + 8 * n),
    ] {
        if addr % align != 0 {
            return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
        }
        let inside = ram.iter().any(|&(start, size)| {
            addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
        });
        if !inside {
            return Err(format!(
                "{what} at {addr:#x} ({len} bytes) is not in guest RAM"
            ));
        }
    }
    Ok(())
}

/// One virtio-mmio device.
#[derive(Debug)]
pub struct VirtioMmioDevice {
    pub id: String,
    pub slot: VirtioMmioSlot,
    device_features: u64,
    /// The device's config space: the backend's, changed only by
    /// [`VirtioMmioDevice::update_config`] (a disk's resize).
    config: Mutex<Vec<u8>>,
    /// ConfigGeneration: bumped with every change of `config`, so a driver reading a
    /// field over several accesses sees whether it changed in between (virtio 1.2, 2.5.1).
    config_generation: AtomicU32,
    /// The config space changed before the driver set DRIVER_OK: it may have read the old
    /// bytes, so the interrupt is raised when it does.
    config_changed_early: AtomicBool,
    queue_max: u16,
    ram: Vec<(u64, u64)>,
    regs: Mutex<Regs>,
    interrupt_status: AtomicU32,
    /// InterruptStatus reports the used-ring bit: the status register's DRIVER_OK, kept
    /// here for the lock-free InterruptStatus read and written only together with the
    /// status, under the register lock. (A fail-mode worker answers a device that needs a
    /// reset through the used ring too, so NEEDS_RESET does not clear it.)
    driver_ok: AtomicBool,
    /// Raises the device's GSI for config interrupts (an irqfd, like the worker's call).
    config_irq: EventFd,
    events: Box<dyn EventSink>,
    pub exits: ExitCounters,
    /// What the guest gets wrong is logged through this, a few lines a window.
    pub guest_errors: crate::ratelimit::RateLimitedLog,
    /// Resets whoever serves the device has completed, for the vCPU waiting on one.
    resets_done: (Mutex<u64>, std::sync::Condvar),
}

/// The longest a vCPU waits for a reset to complete (the frontend's reply timeout and a
/// margin).
const RESET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl VirtioMmioDevice {
    pub fn new(info: DeviceInfo, config_irq: EventFd, events: Box<dyn EventSink>) -> Self {
        VirtioMmioDevice {
            id: info.id,
            slot: info.slot,
            device_features: info.device_features & TRANSPORT_FEATURES,
            config: Mutex::new(info.config),
            config_generation: AtomicU32::new(0),
            config_changed_early: AtomicBool::new(false),
            queue_max: info.queue_max,
            ram: info.ram,
            regs: Mutex::new(Regs {
                queues: vec![QueueRegs::default(); info.num_queues],
                ..Regs::default()
            }),
            interrupt_status: AtomicU32::new(0),
            driver_ok: AtomicBool::new(false),
            config_irq,
            events,
            exits: ExitCounters::default(),
            guest_errors: crate::ratelimit::RateLimitedLog::default(),
            resets_done: Default::default(),
        }
    }

    /// Whether `addr` falls in this device's window.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.slot.base && addr - self.slot.base < self.slot.size
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the config space (a disk's new capacity): a new generation, and for a
    /// driver that is running, a config-change interrupt (virtio 1.2, 4.2.2.1).
    pub fn update_config(&self, config: &[u8]) {
        {
            let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
            if current.as_slice() == config {
                return;
            }
            current.clear();
            current.extend_from_slice(config);
            self.config_generation.fetch_add(1, Ordering::AcqRel);
        }
        if self.driver_ok.load(Ordering::Acquire) {
            self.config_interrupt();
        } else {
            self.config_changed_early.store(true, Ordering::Release);
        }
    }

    fn config_interrupt(&self) {
        self.interrupt_status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        if let Err(e) = self.config_irq.write(1) {
            tracing::warn!("{}: cannot raise the config interrupt: {e}", self.id);
        }
    }

    /// The backend failed: DEVICE_NEEDS_RESET and a config interrupt (virtio 1.2, 2.1.2).
    pub fn needs_reset(&self) {
        self.regs().status |= STATUS_NEEDS_RESET;
        self.interrupt_status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        if let Err(e) = self.config_irq.write(1) {
            tracing::warn!("{}: cannot raise the config interrupt: {e}", self.id);
        }
    }

    /// Whether the driver has requests the backend has not completed: on some ring it set
    /// up, the avail idx differs from the used idx. Reads the two indices from guest RAM,
    /// nothing else (the VMM never parses descriptors). The hang detector asks this.
    pub fn requests_pending<M: vm_memory::GuestMemory>(&self, mem: &M) -> bool {
        let regs = self.regs();
        if regs.status & STATUS_DRIVER_OK == 0 || regs.status & STATUS_NEEDS_RESET != 0 {
            return false;
        }
        regs.queues.iter().filter(|q| q.ready).any(|q| {
            matches!((ring_idx(mem, q.driver), ring_idx(mem, q.device)), (Some(a), Some(u)) if a != u)
        })
    }

    /// The backend's rings are stopped after a reset (or their worker ended): the vCPU
    /// that wrote 0 to Status may go on.
    pub fn reset_complete(&self) {
        let mut done = self.resets_done.0.lock().unwrap_or_else(|e| e.into_inner());
        *done += 1;
        self.resets_done.1.notify_all();
    }

    /// The queues the driver made ready.
    pub fn ready_queues(&self) -> Vec<usize> {
        self.regs()
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, _)| i)
            .collect()
    }

    /// The used idx of queue `queue` in guest RAM, once the driver set the ring up: how
    /// many requests the device completed there (mod 2^16). For benchmarks and tests.
    pub fn used_idx<M: vm_memory::GuestMemory>(&self, mem: &M, queue: usize) -> Option<u16> {
        let ring = self.regs().queues.get(queue).filter(|q| q.ready)?.device;
        ring_idx(mem, ring)
    }

    /// Current device status (for tests and logs).
    pub fn status(&self) -> u32 {
        self.regs().status
    }

    /// A guest read at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.exits.config.fetch_add(1, Ordering::Relaxed);
            let start = (offset - CONFIG_OFFSET) as usize;
            let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let value = if offset == 0x60 {
            self.exits.interrupt_status.fetch_add(1, Ordering::Relaxed);
            let used = if self.driver_ok.load(Ordering::Acquire) {
                INT_VRING
            } else {
                0
            };
            used | self.interrupt_status.load(Ordering::Acquire)
        } else {
            self.exits.other.fetch_add(1, Ordering::Relaxed);
            let regs = self.regs();
            let q = regs.queues.get(regs.queue_sel as usize);
            match offset {
                0x00 => MAGIC_VALUE,
                0x04 => VERSION,
                0x08 => VIRTIO_ID_BLOCK,
                0x0c => VENDOR_ID,
                0x10 => match regs.device_features_sel {
                    0 => self.device_features as u32,
                    1 => (self.device_features >> 32) as u32,
                    _ => 0,
                },
                0x34 => q.map_or(0, |_| u32::from(self.queue_max)),
                0x44 => q.map_or(0, |q| u32::from(q.ready)),
                0x70 => regs.status,
                0xfc => self.config_generation.load(Ordering::Acquire),
                _ => 0,
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write at `offset` into the window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            0x64 => {
                self.exits.interrupt_ack.fetch_add(1, Ordering::Relaxed);
                // The used-ring bit is level-like (reported from DRIVER_OK); only the config
                // bit is ours to clear.
                self.interrupt_status
                    .fetch_and(!(value & INT_CONFIG), Ordering::AcqRel);
                return;
            }
            QUEUE_NOTIFY_OFFSET => {
                // Only a notify the ioeventfd did not match gets here (e.g. a queue index
                // the device does not have): count it, nothing else.
                self.exits.queue_notify.fetch_add(1, Ordering::Relaxed);
                return;
            }
            o if o >= CONFIG_OFFSET => {
                // virtio-blk's config space is read-only here (no writeback cache toggle).
                self.exits.config.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ => {}
        }
        self.exits.other.fetch_add(1, Ordering::Relaxed);
        let mut event = None;
        {
            let mut regs = self.regs();
            let sel = regs.queue_sel as usize;
            let setup_allowed = regs.status & STATUS_DRIVER_OK == 0;
            match offset {
                0x14 => regs.device_features_sel = value,
                0x20 if setup_allowed && regs.status & STATUS_FEATURES_OK == 0 => {
                    match regs.driver_features_sel {
                        0 => {
                            regs.driver_features =
                                (regs.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            regs.driver_features =
                                (regs.driver_features & 0xffff_ffff) | u64::from(value) << 32
                        }
                        _ => {}
                    }
                }
                0x24 => regs.driver_features_sel = value,
                0x30 => regs.queue_sel = value,
                0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if setup_allowed => {
                    let queue_max = self.queue_max;
                    if let Some(q) = regs.queues.get_mut(sel) {
                        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
                        let hi = |old: u64| (old & 0xffff_ffff) | u64::from(value) << 32;
                        match offset {
                            0x38 if value <= u32::from(queue_max) => q.size = value as u16,
                            0x44 => q.ready = value == 1,
                            0x80 => q.desc = lo(q.desc),
                            0x84 => q.desc = hi(q.desc),
                            0x90 => q.driver = lo(q.driver),
                            0x94 => q.driver = hi(q.driver),
                            0xa0 => q.device = lo(q.device),
                            0xa4 => q.device = hi(q.device),
                            _ => {}
                        }
                    }
                }
                0x70 => event = self.write_status(&mut regs, value),
                _ => {}
            }
        }
        if let Some(event) = event {
            let reset = event == TransportEvent::Reset;
            let before = *self.resets_done.0.lock().unwrap_or_else(|e| e.into_inner());
            if !self.events.send(event) {
                tracing::warn!("{}: nobody serves the device any more", self.id);
                return;
            }
            if reset {
                self.wait_reset(before);
            }
        }
    }

    /// A reset completes before the driver's write of 0 to Status does (as in QEMU): a
    /// driver may read 0 back at once and re-use the rings' memory (Linux's virtio-mmio
    /// driver does not wait), so the backend must have stopped them by then. Bounded: the
    /// frontend gives up on a backend that does not answer, and its worker is ended.
    fn wait_reset(&self, before: u64) {
        let (lock, done) = &self.resets_done;
        let mut count = lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + RESET_WAIT;
        while *count == before {
            let now = std::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "{}: the backend did not stop its rings within {} s of the reset",
                    self.id,
                    RESET_WAIT.as_secs()
                );
                return;
            }
            count = done
                .wait_timeout(count, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many rings the driver has set up and started (0 before DRIVER_OK).
    pub fn driver_rings(&self) -> usize {
        let regs = self.regs();
        if regs.status & STATUS_DRIVER_OK == 0 {
            return 0;
        }
        regs.queues.iter().filter(|q| q.ready && q.size > 0).count()
    }

    fn write_status(&self, regs: &mut Regs, value: u32) -> Option<TransportEvent> {
        let features_acceptable = regs.driver_features & !self.device_features == 0
            && regs.driver_features & VIRTIO_F_VERSION_1 != 0;
        let (new, activate) = match status_change(regs.status, value, features_acceptable) {
            StatusChange::Reset => {
                let was_active = regs.activated;
                let queues = regs.queues.len();
                *regs = Regs {
                    queues: vec![QueueRegs::default(); queues],
                    ..Regs::default()
                };
                self.interrupt_status.store(0, Ordering::Release);
                self.driver_ok.store(false, Ordering::Release);
                return was_active.then_some(TransportEvent::Reset);
            }
            StatusChange::Set { status, activate } => (status, activate),
        };
        if value & STATUS_FEATURES_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            tracing::debug!(
                "{}: refusing driver features {:#x}",
                self.id,
                regs.driver_features
            );
        }
        if activate {
            // A driver's bad ring is the guest's own error: the device answers it as the
            // spec says (DEVICE_NEEDS_RESET, 2.1.2), and no backend ever sees the rings.
            let bad = regs
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready)
                .find_map(|(i, q)| {
                    check_queue(q, self.queue_max, &self.ram)
                        .err()
                        .map(|why| (i, why))
                });
            if let Some((i, why)) = bad {
                self.guest_errors.log(format_args!(
                    "{}: the driver set up queue {i} wrongly ({why}): the device needs a reset",
                    self.id
                ));
                regs.status = new | STATUS_NEEDS_RESET;
                // No backend serves these rings: nothing will ever be in the used ring.
                self.driver_ok.store(false, Ordering::Release);
                self.interrupt_status.fetch_or(INT_CONFIG, Ordering::AcqRel);
                if let Err(e) = self.config_irq.write(1) {
                    tracing::warn!("{}: cannot raise the config interrupt: {e}", self.id);
                }
                return None;
            }
        }
        regs.status = new;
        // From DRIVER_OK the backend may complete a request at any moment (the frontend
        // brings its rings up while the driver runs on): the used-ring bit is reported
        // from now, or the first completion's interrupt could find InterruptStatus 0, and
        // the driver, having seen nothing to do, would wait for it forever.
        self.driver_ok
            .store(new & STATUS_DRIVER_OK != 0, Ordering::Release);
        if new & STATUS_DRIVER_OK != 0 && self.config_changed_early.swap(false, Ordering::AcqRel) {
            self.config_interrupt();
        }
        regs.activated |= activate;
        activate.then(|| TransportEvent::Activate {
            driver_features: regs.driver_features,
            queues: regs.queues.clone(),
        })
    }
}

/// Every virtio-mmio device of the VM, found by address on the vCPU's MMIO exits.
#[derive(Debug, Default)]
pub struct MmioBus {
    pub devices: Vec<std::sync::Arc<VirtioMmioDevice>>,
}

impl MmioBus {
    /// Dispatches a read; false if no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.devices.iter().find(|d| d.contains(addr)) {
            Some(d) => {
                d.read(addr - d.slot.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.devices.iter().find(|d| d.contains(addr)) {
            Some(d) => {
                d.write(addr - d.slot.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events into a channel the test reads.
    #[derive(Debug)]
    struct ChannelSink(std::sync::Mutex<std::sync::mpsc::Sender<TransportEvent>>);

    impl EventSink for ChannelSink {
        fn send(&self, event: TransportEvent) -> bool {
            self.0.lock().unwrap().send(event).is_ok()
        }
    }

    fn device() -> (VirtioMmioDevice, std::sync::mpsc::Receiver<TransportEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let info = DeviceInfo {
            id: "blk0".into(),
            slot: VirtioMmioSlot::from_layout(0),
            device_features: VIRTIO_F_VERSION_1 | 1 << 9 | 1 << 40,
            config: vec![1, 2, 3, 4],
            num_queues: 1,
            queue_max: 256,
            ram: vec![(0, 1 << 20)],
        };
        let sink = Box::new(ChannelSink(std::sync::Mutex::new(tx)));
        let d = VirtioMmioDevice::new(info, EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink);
        (d, rx)
    }

    fn r32(d: &VirtioMmioDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(d: &VirtioMmioDevice, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    /// Queue 0 of `size` entries, rings at 0x1000 / 0x2000 / 0x3000, ready.
    fn set_up_queue0(d: &VirtioMmioDevice, size: u32) {
        w32(d, 0x30, 0);
        w32(d, 0x38, size);
        w32(d, 0x80, 0x1000);
        w32(d, 0x90, 0x2000);
        w32(d, 0xa0, 0x3000);
        w32(d, 0x44, 1);
    }

    #[test]
    fn status_transition_table() {
        use StatusChange::{Reset, Set};
        let set = |status, activate| Set { status, activate };
        let (ack_driver, features_ok, driver_ok) = (3, 0xb, 0xf);
        assert_eq!(status_change(driver_ok, 0, true), Reset);
        // DEVICE_NEEDS_RESET is the device's: kept, and never set by the driver.
        let needs = STATUS_NEEDS_RESET;
        assert_eq!(
            status_change(needs | 1, ack_driver, true),
            set(needs | ack_driver, false)
        );
        assert_eq!(
            status_change(1, ack_driver | needs, true),
            set(ack_driver, false)
        );
        // FEATURES_OK sticks only for acceptable features, checked when it is set.
        assert_eq!(
            status_change(ack_driver, features_ok, false),
            set(ack_driver, false)
        );
        assert_eq!(
            status_change(ack_driver, features_ok, true),
            set(features_ok, false)
        );
        // DRIVER_OK activates once, and only on top of FEATURES_OK.
        assert_eq!(
            status_change(features_ok, driver_ok, false),
            set(driver_ok, true)
        );
        assert_eq!(
            status_change(ack_driver, ack_driver | 4, true),
            set(ack_driver | 4, false)
        );
        assert_eq!(
            status_change(driver_ok, driver_ok, true),
            set(driver_ok, false)
        );
        assert_eq!(
            status_change(ack_driver, driver_ok, true),
            set(driver_ok, true)
        );
    }

    #[test]
    fn identity_registers() {
        let (d, _) = device();
        assert_eq!(r32(&d, 0), MAGIC_VALUE);
        assert_eq!(r32(&d, 4), 2);
        assert_eq!(r32(&d, 8), 2);
        w32(&d, 0x14, 1);
        assert_eq!(r32(&d, 0x10), 1, "bit 40 is not a transport feature");
        assert_eq!(r32(&d, 0x100), 0x0403_0201);
        assert_eq!(r32(&d, 0x104), 0, "past the config space reads zero");
    }

    #[test]
    fn driver_ok_activates_with_the_programmed_queue() {
        let (d, rx) = device();
        w32(&d, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&d, 0x24, 1);
        w32(&d, 0x20, 1);
        w32(
            &d,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r32(&d, 0x70) & STATUS_FEATURES_OK, 0);
        set_up_queue0(&d, 128);
        w32(
            &d,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        match rx.try_recv().unwrap() {
            TransportEvent::Activate {
                driver_features,
                queues,
            } => {
                assert_eq!(driver_features, VIRTIO_F_VERSION_1);
                assert_eq!(
                    queues[0],
                    QueueRegs {
                        size: 128,
                        ready: true,
                        desc: 0x1000,
                        driver: 0x2000,
                        device: 0x3000
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        // The write of 0 returns once whoever serves the device has completed the reset.
        let d = std::sync::Arc::new(d);
        let server = {
            let d = d.clone();
            std::thread::spawn(move || {
                let command = rx.recv().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                d.reset_complete();
                (command, rx)
            })
        };
        let t0 = std::time::Instant::now();
        w32(&d, 0x70, 0);
        assert!(t0.elapsed() >= std::time::Duration::from_millis(50));
        let (command, rx) = server.join().unwrap();
        assert!(matches!(command, TransportEvent::Reset));
        assert_eq!(r32(&d, 0x70), 0);
        w32(&d, 0x70, 0);
        assert!(
            rx.try_recv().is_err(),
            "no second reset of an inactive device"
        );
    }

    #[test]
    fn features_without_version_1_or_unknown_are_refused() {
        let (d, rx) = device();
        w32(&d, 0x24, 0);
        w32(&d, 0x20, 1 << 9);
        w32(&d, 0x70, STATUS_FEATURES_OK);
        assert_eq!(r32(&d, 0x70) & STATUS_FEATURES_OK, 0);
        w32(&d, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(rx.try_recv().is_err(), "no activation without FEATURES_OK");
    }

    #[test]
    fn rings_are_checked_before_any_backend_sees_them() {
        let ram = [(0u64, 1u64 << 20)];
        let q = |size, desc, driver, device| QueueRegs {
            size,
            ready: true,
            desc,
            driver,
            device,
        };
        assert!(check_queue(&q(128, 0x1000, 0x2000, 0x3000), 256, &ram).is_ok());
        for (bad, why) in [
            (q(3, 0x1000, 0x2000, 0x3000), "size 3 is not a power of two"),
            (q(0, 0x1000, 0x2000, 0x3000), "size 0"),
            (q(512, 0x1000, 0x2000, 0x3000), "size 512"),
            (q(128, 0x1008, 0x2000, 0x3000), "not 16-byte aligned"),
            (q(128, 0x1000, 0x2001, 0x3000), "not 2-byte aligned"),
            (q(128, 0x1000, 0x2000, 0x3002), "not 4-byte aligned"),
            (
                q(128, 0x1000_0000_0000, 0x2000, 0x3000),
                "descriptor table at",
            ),
            // The used ring's end (6 + 8 * 128 bytes) runs past RAM.
            (q(128, 0x1000, 0x2000, (1 << 20) - 0x100), "used ring at"),
            (q(128, 0x1000, u64::MAX - 1, 0x3000), "available ring at"),
        ] {
            let err = check_queue(&bad, 256, &ram).unwrap_err();
            assert!(err.contains(why), "{err} (want {why:?})");
        }
        // At DRIVER_OK: DEVICE_NEEDS_RESET and a config interrupt, no activation.
        let (d, rx) = device();
        w32(&d, 0x24, 1);
        w32(&d, 0x20, 1);
        w32(&d, 0x70, STATUS_FEATURES_OK);
        set_up_queue0(&d, 3);
        w32(&d, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(rx.try_recv().is_err(), "no backend may see the rings");
        assert_ne!(r32(&d, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(r32(&d, 0x60), INT_CONFIG);
        // A reset clears it; a good setup then activates.
        w32(&d, 0x70, 0);
        assert_eq!(r32(&d, 0x70), 0);
    }

    /// The driver may submit as soon as it sets DRIVER_OK, and the backend may complete
    /// before the frontend has finished bringing the rings up: the used-ring bit
    /// must already be reported then (a reset clears it again).
    #[test]
    fn interrupt_status_reports_the_rings_from_driver_ok() {
        let (d, rx) = device();
        w32(&d, 0x24, 1);
        w32(&d, 0x20, 1);
        w32(&d, 0x70, STATUS_FEATURES_OK);
        assert_eq!(r32(&d, 0x60), 0);
        w32(&d, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(matches!(rx.try_recv(), Ok(TransportEvent::Activate { .. })));
        assert_eq!(r32(&d, 0x60), INT_VRING, "before the frontend did anything");
        let d = std::sync::Arc::new(d);
        let server = {
            let d = d.clone();
            std::thread::spawn(move || {
                assert!(matches!(rx.recv(), Ok(TransportEvent::Reset)));
                d.reset_complete();
            })
        };
        w32(&d, 0x70, 0);
        server.join().unwrap();
        assert_eq!(r32(&d, 0x60), 0);
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_interrupts_a_running_driver() {
        let (d, rx) = device();
        assert_eq!(r32(&d, 0xfc), 0);
        // Before DRIVER_OK: the new bytes and generation, no interrupt (the driver reads
        // the config space when it starts).
        d.update_config(&[5, 6, 7, 8]);
        assert_eq!(r32(&d, 0x100), u32::from_le_bytes([5, 6, 7, 8]));
        assert_eq!(r32(&d, 0xfc), 1);
        assert_eq!(r32(&d, 0x60), 0);
        assert!(
            d.config_irq.read().is_err(),
            "no interrupt before DRIVER_OK"
        );
        w32(&d, 0x24, 1);
        w32(&d, 0x20, 1);
        w32(&d, 0x70, STATUS_FEATURES_OK);
        w32(&d, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(matches!(rx.try_recv(), Ok(TransportEvent::Activate { .. })));
        // The driver may have read the old bytes before the change: it is told at
        // DRIVER_OK.
        assert_eq!(d.config_irq.read().unwrap(), 1, "raised at DRIVER_OK");
        assert_eq!(r32(&d, 0x60), INT_VRING | INT_CONFIG);
        w32(&d, 0x64, INT_CONFIG);
        // The same bytes again change nothing.
        d.update_config(&[5, 6, 7, 8]);
        assert_eq!(r32(&d, 0xfc), 1);
        assert!(d.config_irq.read().is_err());
        d.update_config(&[9, 9, 9, 9]);
        assert_eq!(r32(&d, 0x100), 0x0909_0909);
        assert_eq!(r32(&d, 0xfc), 2);
        assert_eq!(r32(&d, 0x60), INT_VRING | INT_CONFIG);
        assert_eq!(d.config_irq.read().unwrap(), 1, "the GSI was raised");
        w32(&d, 0x64, INT_CONFIG);
        assert_eq!(r32(&d, 0x60), INT_VRING);
    }

    #[test]
    fn interrupt_status_and_needs_reset() {
        let (d, _) = device();
        assert_eq!(r32(&d, 0x60), 0);
        w32(&d, 0x24, 1);
        w32(&d, 0x20, 1);
        w32(&d, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(r32(&d, 0x60), INT_VRING);
        // A fail-mode worker answers through the used ring: its bit stays.
        d.needs_reset();
        assert_eq!(r32(&d, 0x60), INT_CONFIG | INT_VRING);
        assert_ne!(r32(&d, 0x70) & STATUS_NEEDS_RESET, 0);
        w32(&d, 0x64, INT_CONFIG);
        assert_eq!(r32(&d, 0x60), INT_VRING);
        assert_eq!(d.exits.interrupt_ack.load(Ordering::Relaxed), 1);
        w32(&d, 0x70, 0);
        assert_eq!(r32(&d, 0x60), 0);
    }
}
