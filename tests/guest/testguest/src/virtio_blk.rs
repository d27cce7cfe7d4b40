//! A ring-3 virtio-blk driver for the virtio-mmio transport, version 2 only (virtio 1.2:
//! 4.2.2 registers, 2.7 split virtqueues, 5.2 block device). One request queue, which
//! lives in this image's .bss (DMA address == guest physical == virtual). Completions
//! are polled from the used ring, or waited for by interrupt (IOAPIC edge -> ring-0
//! count + EOI -> ring 3 wakes, acknowledges InterruptStatus and reaps).
//!
//! Request slots: slot `s` owns descriptors `3s` (header), `3s + 1` (data) and `3s + 2`
//! (status), its 16-byte header, one 4 KiB data buffer and one status byte, so up to
//! `queue size / 3` requests can be in flight without descriptor allocation.

use core::fmt;
use core::sync::atomic::{compiler_fence, fence, Ordering};

use crate::boot;
use crate::cpu::{self, Deadline};
use crate::irq::{IoApics, Routing, VECTOR_DEVICE};
use crate::phys::Mmio;
use crate::tg;
use crate::virtio_mmio::{Slot, MAGIC_VALUE};

// ---- virtio-mmio version 2 registers (4.2.2) ----
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

// ---- device status bits (2.1) ----
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

/// InterruptStatus: configuration change (bit 0 is the used-ring interrupt).
const INT_CONFIG: u32 = 2;

// ---- feature bits ----
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
/// Everything this driver takes when offered (VERSION_1 is also required).
const WANTED: u64 = F_VERSION_1
    | F_MQ
    | F_FLUSH
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_SEG_MAX
    | F_BLK_SIZE
    | F_RO
    | F_EVENT_IDX;

// ---- requests (5.2.6) ----
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const ST_OK: u8 = 0;
pub const ST_IOERR: u8 = 1;
pub const ST_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
pub const ST_UNWRITTEN: u8 = 0xff;
pub const ID_LEN: usize = 20;
pub const SECTOR: u64 = 512;
pub const BLOCK: usize = 4096;

// ---- split virtqueue (2.7) ----
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
const AVAIL_NO_INTERRUPT: u16 = 1;
const USED_NO_NOTIFY: u16 = 1;
/// Largest queue this driver sets up (the rings' static space).
pub const MAX_QUEUE: u16 = 256;
/// Most requests in flight (slots).
pub const MAX_SLOTS: usize = MAX_QUEUE as usize / 3;

/// The rings: descriptor table, driver (avail) and device (used) areas, a page each.
#[repr(C, align(4096))]
struct Rings {
    desc: [u8; 4096],
    avail: [u8; 4096],
    used: [u8; 4096],
}

/// Per-slot buffers.
#[repr(C, align(4096))]
struct Bufs {
    data: [[u8; BLOCK]; MAX_SLOTS],
    hdr: [[u8; 16]; MAX_SLOTS],
    status: [u8; MAX_SLOTS],
}

/// Two sets of rings: every plan drives one device at a time with the first, but
/// `blk-pair` drives two at once (see [`use_ring_set`]).
static mut RINGS: [Rings; 2] = [
    Rings {
        desc: [0; 4096],
        avail: [0; 4096],
        used: [0; 4096],
    },
    Rings {
        desc: [0; 4096],
        avail: [0; 4096],
        used: [0; 4096],
    },
];

/// The ring set the next [`Blk::init`] takes.
static RING_SET: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Makes the next [`Blk::init`] take ring set `set` (0 or 1), so two devices can run at
/// once. The two must also use different slots (buffers are shared).
pub fn use_ring_set(set: usize) {
    assert!(set < 2);
    RING_SET.store(set, core::sync::atomic::Ordering::Relaxed);
}
static mut BUFS: Bufs = Bufs {
    data: [[0; BLOCK]; MAX_SLOTS],
    hdr: [[0; 16]; MAX_SLOTS],
    status: [0; MAX_SLOTS],
};

const _: () = assert!(16 * MAX_QUEUE as usize <= 4096);
const _: () = assert!(6 + 2 * MAX_QUEUE as usize <= 4096);
const _: () = assert!(6 + 8 * MAX_QUEUE as usize <= 4096);

/// Guest RAM the driver shares with the device: bounds-checked volatile access.
#[derive(Clone, Copy, Debug)]
struct Dma {
    base: u64,
    size: u64,
}

impl Dma {
    fn at(&self, off: u64, len: u64) -> u64 {
        assert!(off + len <= self.size, "dma access out of range");
        self.base + off
    }
    fn r16(&self, off: u64) -> u16 {
        // SAFETY: inside one of the static DMA areas (`at` checks), naturally aligned
        // by every caller (ring offsets are even).
        unsafe { core::ptr::read_volatile(self.at(off, 2) as *const u16) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as for `r16`.
        unsafe { core::ptr::read_volatile(self.at(off, 4) as *const u32) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as for `r16`; the driver owns these bytes (the device only reads them).
        unsafe { core::ptr::write_volatile(self.at(off, 2) as *mut u16, v) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as for `w16`.
        unsafe { core::ptr::write_volatile(self.at(off, 4) as *mut u32, v) }
    }
    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as for `w16`.
        unsafe { core::ptr::write_volatile(self.at(off, 8) as *mut u64, v) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as for `w16`.
        unsafe { core::ptr::write_volatile(self.at(off, 1) as *mut u8, v) }
    }
    fn r8(&self, off: u64) -> u8 {
        // SAFETY: as for `r16`.
        unsafe { core::ptr::read_volatile(self.at(off, 1) as *const u8) }
    }
}

fn rings() -> (Dma, Dma, Dma) {
    let set = RING_SET.load(core::sync::atomic::Ordering::Relaxed);
    let all = &raw mut RINGS;
    // SAFETY: only an address is taken; `set` is 0 or 1 (checked when stored).
    let r = unsafe { (&raw mut (*all)[set]) };
    // SAFETY: only addresses are taken; no reference to the static is formed.
    let (d, a, u) = unsafe {
        (
            (&raw mut (*r).desc) as u64,
            (&raw mut (*r).avail) as u64,
            (&raw mut (*r).used) as u64,
        )
    };
    (
        Dma {
            base: d,
            size: 4096,
        },
        Dma {
            base: a,
            size: 4096,
        },
        Dma {
            base: u,
            size: 4096,
        },
    )
}

/// Address of slot `s`'s data buffer.
pub fn data_addr(s: usize) -> u64 {
    assert!(s < MAX_SLOTS);
    let b = &raw mut BUFS;
    // SAFETY: only the address is taken.
    unsafe { (&raw mut (*b).data[s]) as u64 }
}

fn hdr_addr(s: usize) -> u64 {
    let b = &raw mut BUFS;
    // SAFETY: only the address is taken (`s` bounds-checked by indexing).
    unsafe { (&raw mut (*b).hdr[s]) as u64 }
}

pub fn status_addr(s: usize) -> u64 {
    let b = &raw mut BUFS;
    // SAFETY: only the address is taken (`s` bounds-checked by indexing).
    unsafe { (&raw mut (*b).status[s]) as u64 }
}

fn bufs_dma() -> Dma {
    Dma {
        base: (&raw mut BUFS) as u64,
        size: core::mem::size_of::<Bufs>() as u64,
    }
}

/// Slot `s`'s data buffer. The caller must not hold it while the slot is in flight.
pub fn data(s: usize) -> &'static mut [u8; BLOCK] {
    // SAFETY: a static buffer; the driver is single-threaded and callers only touch a
    // slot's buffer while the device does not own it (before submit, after completion),
    // with a fence on the completion path.
    unsafe { &mut *(data_addr(s) as *mut [u8; BLOCK]) }
}

/// The device configuration (5.2.4), fields of features not negotiated are zero.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    Init(&'static str),
    Version(u32),
    NeedsReset,
    Timeout,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Init(what) => write!(f, "init: {what}"),
            Self::Version(v) => write!(f, "virtio-mmio version {v}, need 2"),
            Self::NeedsReset => write!(f, "device needs reset"),
            Self::Timeout => write!(f, "timeout"),
        }
    }
}

/// How completions are waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    Poll,
    Irq,
}

/// A request for one slot.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Read `len` bytes (a multiple of 512, at most 4 KiB) at `sector` into the slot.
    In {
        sector: u64,
        len: u32,
    },
    /// Write `len` bytes from the slot at `sector`.
    Out {
        sector: u64,
        len: u32,
    },
    Flush,
    GetId,
    /// One discard / write-zeroes segment.
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// What a slot's request came back with.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub slot: usize,
    pub status: u8,
    pub len: u32,
}

/// An initialised device with queue 0 running.
#[derive(Debug)]
pub struct Blk {
    regs: Mmio,
    /// The virtqueue this driver uses (one per device).
    pub queue: u16,
    pub offered: u64,
    pub features: u64,
    pub config: Config,
    pub num: u16,
    desc: Dma,
    avail: Dma,
    used: Dma,
    /// Next avail index to fill, and the one last published with a notify decision.
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    pub notifies: u64,
    /// Interrupt waits that ended without a device interrupt (the watchdog tick) and
    /// found completions: a sign of a lost or misrouted interrupt.
    pub late: u64,
    mode: Completion,
    routing: Option<Routing>,
    /// Device interrupts seen (and acknowledged) so far.
    irqs_acked: u64,
    /// Config-change interrupts acknowledged (InterruptStatus bit 1).
    pub config_interrupts: u64,
    irq_base: u64,
    tsc_hz: u64,
}

/// `true` if the device asked to be notified between `old` and `new` (2.7.10).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A driver error on purpose, for [`Blk::init_sabotaged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// The rings at guest addresses far outside RAM.
    RingsOutsideRam,
    /// This QueueNum instead of a power of two.
    QueueNum(u16),
}

impl Blk {
    /// Resets the device and brings it up with queue 0 of at most `want_num` entries.
    /// `irq` is (LAPIC base MSR, I/O APICs) for interrupt completion.
    pub fn init(
        slot: &Slot,
        queue: u16,
        want_num: u16,
        mode: Completion,
        apic: (u64, &IoApics),
        tsc_hz: u64,
    ) -> Result<Blk, BlkError> {
        Self::init_sabotaged(slot, queue, want_num, mode, apic, tsc_hz, None)
    }

    /// [`Blk::init`], with the queue set up wrongly as `sabotage` says.
    pub fn init_sabotaged(
        slot: &Slot,
        queue: u16,
        want_num: u16,
        mode: Completion,
        apic: (u64, &IoApics),
        tsc_hz: u64,
        sabotage: Option<Sabotage>,
    ) -> Result<Blk, BlkError> {
        let regs = slot.regs;
        if slot.magic() != MAGIC_VALUE {
            return Err(BlkError::Init("bad magic"));
        }
        if slot.version() != 2 {
            return Err(BlkError::Version(slot.version()));
        }
        if slot.device_id() != 2 {
            return Err(BlkError::Init("not a block device"));
        }
        reset(&regs, tsc_hz)?;
        regs.write32(REG_STATUS, S_ACKNOWLEDGE);
        regs.write32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        regs.write32(REG_DEVICE_FEATURES_SEL, 0);
        let lo = regs.read32(REG_DEVICE_FEATURES);
        regs.write32(REG_DEVICE_FEATURES_SEL, 1);
        let hi = regs.read32(REG_DEVICE_FEATURES);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        if offered & F_VERSION_1 == 0 {
            fail_device(&regs);
            return Err(BlkError::Init("VERSION_1 not offered"));
        }
        let features = offered & WANTED;
        regs.write32(REG_DRIVER_FEATURES_SEL, 0);
        regs.write32(REG_DRIVER_FEATURES, features as u32);
        regs.write32(REG_DRIVER_FEATURES_SEL, 1);
        regs.write32(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let st = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
        regs.write32(REG_STATUS, st);
        if regs.read32(REG_STATUS) & S_FEATURES_OK == 0 {
            fail_device(&regs);
            return Err(BlkError::Init("FEATURES_OK not kept"));
        }

        if queue > 0 {
            // Queues past the first exist only with VIRTIO_BLK_F_MQ, as many as the config's
            // num_queues (virtio 1.2, 5.2.3 and 5.2.4).
            let queues = regs.read32(REG_CONFIG + 32) >> 16;
            if features & F_MQ == 0 || u32::from(queue) >= queues {
                fail_device(&regs);
                return Err(BlkError::Init("no such queue (MQ not offered or too few)"));
            }
        }
        regs.write32(REG_QUEUE_SEL, u32::from(queue));
        if regs.read32(REG_QUEUE_READY) != 0 {
            fail_device(&regs);
            return Err(BlkError::Init("queue already ready"));
        }
        let max = regs.read32(REG_QUEUE_NUM_MAX);
        if max == 0 {
            fail_device(&regs);
            return Err(BlkError::Init("queue unavailable"));
        }
        // A power of two (split queues), no more than the device, our rings or the
        // caller want.
        let cap = max
            .min(u32::from(MAX_QUEUE))
            .min(u32::from(want_num.max(1)));
        let num = 1u16 << (31 - cap.leading_zeros());
        let (desc, avail, used) = rings();
        for area in [desc, avail, used] {
            for off in (0..area.size).step_by(8) {
                area.w64(off, 0);
            }
        }
        let written_num = match sabotage {
            Some(Sabotage::QueueNum(n)) => n,
            _ => num,
        };
        regs.write32(REG_QUEUE_NUM, u32::from(written_num));
        let far = match sabotage {
            Some(Sabotage::RingsOutsideRam) => 0x100_0000_0000,
            _ => 0,
        };
        for (reg, addr) in [
            (REG_QUEUE_DESC, desc.base + far),
            (REG_QUEUE_DRIVER, avail.base + far),
            (REG_QUEUE_DEVICE, used.base + far),
        ] {
            regs.write32(reg, addr as u32);
            regs.write32(reg + 4, (addr >> 32) as u32);
        }
        let mut blk = Blk {
            regs,
            queue,
            offered,
            features,
            config: Config::default(),
            num,
            desc,
            avail,
            used,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            notifies: 0,
            late: 0,
            mode,
            routing: None,
            irqs_acked: 0,
            config_interrupts: 0,
            irq_base: 0,
            tsc_hz,
        };
        blk.suppress_interrupts();
        regs.write32(REG_QUEUE_READY, 1);
        blk.config = blk.read_config();
        if mode == Completion::Irq {
            let routing = Routing::new(apic.0, apic.1, slot.irq).map_err(BlkError::Init)?;
            blk.routing = Some(routing);
            blk.irq_base = boot::irq_count(VECTOR_DEVICE);
            blk.irqs_acked = blk.irq_base;
        }
        regs.write32(REG_STATUS, st | S_DRIVER_OK);
        blk.check_status()?;
        Ok(blk)
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Device interrupts taken since init.
    pub fn irqs(&self) -> u64 {
        boot::irq_count(VECTOR_DEVICE) - self.irq_base
    }

    /// The device's ConfigGeneration register: it changes whenever the config space does.
    pub fn config_generation(&self) -> u32 {
        self.regs.read32(REG_CONFIG_GENERATION)
    }

    /// Reads the config space again (after a config change).
    pub fn reread_config(&mut self) {
        self.config = self.read_config();
    }

    /// Takes a pending config-change interrupt status (acknowledging it), counting it
    /// in [`Blk::config_interrupts`]; true if one was taken here or before.
    pub fn take_config_interrupt(&mut self) -> bool {
        let isr = self.regs.read32(REG_INTERRUPT_STATUS);
        if isr & INT_CONFIG != 0 {
            self.regs.write32(REG_INTERRUPT_ACK, INT_CONFIG);
            self.config_interrupts += 1;
        }
        self.config_interrupts > 0
    }

    fn read_config(&self) -> Config {
        let r = &self.regs;
        loop {
            let generation = r.read32(REG_CONFIG_GENERATION);
            let c = REG_CONFIG;
            let mut cfg = Config {
                capacity: u64::from(r.read32(c)) | u64::from(r.read32(c + 4)) << 32,
                ..Config::default()
            };
            if self.has(F_SEG_MAX) {
                cfg.seg_max = r.read32(c + 12);
            }
            if self.has(F_BLK_SIZE) {
                cfg.blk_size = r.read32(c + 20);
            }
            if self.has(F_DISCARD) {
                cfg.max_discard_sectors = r.read32(c + 36);
                cfg.max_discard_seg = r.read32(c + 40);
                cfg.discard_sector_alignment = r.read32(c + 44);
            }
            if self.has(F_WRITE_ZEROES) {
                cfg.max_write_zeroes_sectors = r.read32(c + 48);
                cfg.max_write_zeroes_seg = r.read32(c + 52);
                cfg.write_zeroes_may_unmap = r.read8(c + 56);
            }
            if r.read32(REG_CONFIG_GENERATION) == generation {
                return cfg;
            }
        }
    }

    /// Fails if the device set DEVICE_NEEDS_RESET (or FAILED).
    pub fn check_status(&self) -> Result<(), BlkError> {
        let st = self.regs.read32(REG_STATUS);
        if st & (S_NEEDS_RESET | S_FAILED) != 0 {
            tg!("note device needs reset");
            return Err(BlkError::NeedsReset);
        }
        Ok(())
    }

    /// Whether the device set DEVICE_NEEDS_RESET (quietly, for drivers that poll it).
    pub fn needs_reset(&self) -> bool {
        self.regs.read32(REG_STATUS) & S_NEEDS_RESET != 0
    }

    /// Resets the device: it stops using the rings. Also done on drop.
    pub fn reset(&mut self) {
        self.routing = None;
        let _ = reset(&self.regs, self.tsc_hz);
    }

    // ---- descriptors and rings ----

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = u64::from(i % self.num) * 16;
        self.desc.w64(off, addr);
        self.desc.w32(off + 8, len);
        self.desc.w16(off + 12, flags);
        self.desc.w16(off + 14, next);
    }

    /// Puts chain `head` in the avail ring (published by [`Blk::kick`]).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.num);
        self.avail.w16(4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the avail index and notifies the device if it wants to be.
    pub fn kick(&mut self) {
        // The ring entries and descriptors before the index (x86 keeps store order; the
        // compiler must too).
        compiler_fence(Ordering::SeqCst);
        self.avail.w16(2, self.avail_idx);
        // The index store before the device's event / flag load.
        fence(Ordering::SeqCst);
        let notify = if self.has(F_EVENT_IDX) {
            let event = self.used.r16(4 + 8 * u64::from(self.num));
            need_event(event, self.avail_idx, self.kicked_idx)
        } else {
            self.used.r16(0) & USED_NO_NOTIFY == 0
        };
        self.kicked_idx = self.avail_idx;
        if notify {
            self.notifies += 1;
            self.regs.write32(REG_QUEUE_NOTIFY, u32::from(self.queue));
        }
    }

    /// Publishes the avail index without notifying the device, whatever it asked for (a
    /// driver that breaks the rule).
    pub fn publish_without_kick(&mut self) {
        compiler_fence(Ordering::SeqCst);
        self.avail.w16(2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Publishes an avail index more than a ring's worth past the last one (a driver
    /// corrupting its ring) and notifies.
    pub fn corrupt_avail_idx(&mut self) {
        let bad = self.avail_idx.wrapping_add(self.num).wrapping_add(1);
        fence(Ordering::SeqCst);
        self.avail.w16(2, bad);
        fence(Ordering::SeqCst);
        self.regs.write32(REG_QUEUE_NOTIFY, u32::from(self.queue));
    }

    /// Writes `value` to QueueNotify, whatever the ring holds (for timing a kick).
    pub fn notify_value(&self, value: u32) {
        self.regs.write32(REG_QUEUE_NOTIFY, value);
    }

    /// Tells the device not to interrupt (as far as it can be told).
    fn suppress_interrupts(&self) {
        if self.has(F_EVENT_IDX) {
            // Far ahead: the used index never gets there between two reaps.
            self.set_used_event(self.last_used.wrapping_add(0x8000));
        } else {
            self.avail.w16(0, AVAIL_NO_INTERRUPT);
        }
    }

    fn set_used_event(&self, v: u16) {
        self.avail.w16(4 + 2 * u64::from(self.num), v);
    }

    /// Asks for an interrupt once `count` more entries are used (`count` >= 1).
    fn arm_interrupt(&self, count: u16) {
        if self.has(F_EVENT_IDX) {
            self.set_used_event(self.last_used.wrapping_add(count.max(1) - 1));
        } else {
            self.avail.w16(0, 0);
        }
    }

    fn used_idx(&self) -> u16 {
        self.used.r16(2)
    }

    /// The next used entry, if the device published one.
    pub fn next_used(&mut self) -> Option<Used> {
        if self.used_idx() == self.last_used {
            return None;
        }
        // The entry (and the buffers) after the index.
        compiler_fence(Ordering::SeqCst);
        let off = 4 + 8 * u64::from(self.last_used % self.num);
        let e = Used {
            id: self.used.r32(off),
            len: self.used.r32(off + 4),
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.mode == Completion::Poll && self.has(F_EVENT_IDX) {
            self.suppress_interrupts();
        }
        Some(e)
    }

    /// Waits up to `timeout_us` for the next used entry. In interrupt mode, asks to be
    /// woken after `batch` more completions (EVENT_IDX) and sleeps in between.
    pub fn wait_used(&mut self, batch: u16, timeout_us: u64) -> Result<Used, BlkError> {
        let deadline = Deadline::after_us(self.tsc_hz, timeout_us);
        // Status checks (one exit each) at most every 10 ms while nothing happens.
        let period = self.tsc_hz / 100;
        let mut next_check = cpu::rdtsc() + period;
        loop {
            if let Some(e) = self.next_used() {
                return Ok(e);
            }
            let now = cpu::rdtsc();
            if now >= next_check {
                next_check = now + period;
                self.check_status()?;
            }
            if deadline.passed() {
                self.check_status()?;
                return Err(BlkError::Timeout);
            }
            if self.mode == Completion::Poll {
                core::hint::spin_loop();
                continue;
            }
            let seen = boot::irq_count(VECTOR_DEVICE);
            if seen != self.irqs_acked {
                // Acknowledge before the next look at the ring: completions after this
                // raise a new edge.
                self.irqs_acked = seen;
                let isr = self.regs.read32(REG_INTERRUPT_STATUS);
                if isr != 0 {
                    self.regs.write32(REG_INTERRUPT_ACK, isr);
                }
                if isr & INT_CONFIG != 0 {
                    self.config_interrupts += 1;
                    self.check_status()?;
                }
                continue;
            }
            self.arm_interrupt(batch);
            fence(Ordering::SeqCst);
            if self.used_idx() != self.last_used {
                continue;
            }
            boot::wait_for_irq(VECTOR_DEVICE, seen);
            if boot::irq_count(VECTOR_DEVICE) == seen && self.used_idx() != self.last_used {
                self.late += 1;
            }
        }
    }

    // ---- slot requests ----

    /// Starts `op` in slot `s` (not kicked yet: call [`Blk::kick`]).
    pub fn submit(&mut self, s: usize, op: Op) {
        assert!(s < MAX_SLOTS && (3 * s + 2) < usize::from(self.num));
        let (kind, sector, data_len, data_write) = match op {
            Op::In { sector, len } => (T_IN, sector, len, true),
            Op::Out { sector, len } => (T_OUT, sector, len, false),
            Op::Flush => (T_FLUSH, 0, 0, false),
            Op::GetId => (T_GET_ID, 0, ID_LEN as u32, true),
            Op::Discard { sector, sectors } => {
                self.segment(s, sector, sectors, 0);
                (T_DISCARD, 0, 16, false)
            }
            Op::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                self.segment(s, sector, sectors, u32::from(unmap));
                (T_WRITE_ZEROES, 0, 16, false)
            }
        };
        self.submit_raw(s, kind, sector, data_len, data_write);
    }

    /// Starts a request of any `kind` in slot `s`: header, then `data_len` bytes of the
    /// slot's buffer (device-writable if `data_write`; none if 0), then status.
    pub fn submit_raw(
        &mut self,
        s: usize,
        kind: u32,
        sector: u64,
        data_len: u32,
        data_write: bool,
    ) {
        self.prepare(s, kind, sector);
        let d = 3 * s as u16;
        if data_len == 0 {
            self.set_desc(d, hdr_addr(s), 16, DESC_NEXT, d + 2);
        } else {
            self.set_desc(d, hdr_addr(s), 16, DESC_NEXT, d + 1);
            let w = if data_write { DESC_WRITE } else { 0 };
            self.set_desc(d + 1, data_addr(s), data_len, w | DESC_NEXT, d + 2);
        }
        self.set_desc(d + 2, status_addr(s), 1, DESC_WRITE, 0);
        self.push(d);
    }

    /// Fills slot `s`'s header, marks its status byte unwritten and returns the
    /// addresses of header and status byte (for hand-made chains).
    pub fn prepare(&self, s: usize, kind: u32, sector: u64) -> (u64, u64) {
        let bufs = bufs_dma();
        let hdr = hdr_addr(s) - bufs.base;
        bufs.w32(hdr, kind);
        bufs.w32(hdr + 4, 0);
        bufs.w64(hdr + 8, sector);
        bufs.w8(status_addr(s) - bufs.base, ST_UNWRITTEN);
        (hdr_addr(s), status_addr(s))
    }

    fn segment(&self, s: usize, sector: u64, sectors: u32, flags: u32) {
        let bufs = bufs_dma();
        let off = data_addr(s) - bufs.base;
        bufs.w64(off, sector);
        bufs.w32(off + 8, sectors);
        bufs.w32(off + 12, flags);
    }

    /// The status byte of slot `s`.
    pub fn status(&self, s: usize) -> u8 {
        let bufs = bufs_dma();
        bufs.r8(status_addr(s) - bufs.base)
    }

    /// Waits for the next slot request to complete.
    pub fn wait_done(&mut self, batch: u16, timeout_us: u64) -> Result<Done, BlkError> {
        let e = self.wait_used(batch, timeout_us)?;
        Ok(self.done(e))
    }

    /// The next completed slot request, if any, without waiting.
    pub fn poll_done(&mut self) -> Option<Done> {
        self.next_used().map(|e| self.done(e))
    }

    fn done(&self, e: Used) -> Done {
        let slot = (e.id / 3) as usize;
        Done {
            slot,
            status: if slot < MAX_SLOTS {
                self.status(slot)
            } else {
                ST_UNWRITTEN
            },
            len: e.len,
        }
    }

    /// Runs one request in slot 0 to completion.
    pub fn run_one(&mut self, op: Op, timeout_us: u64) -> Result<Done, BlkError> {
        self.submit(0, op);
        self.kick();
        self.wait_done(1, timeout_us)
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Writes 0 to Status and waits until it reads back 0 (4.2.2.2: the reset is done then).
fn reset(regs: &Mmio, tsc_hz: u64) -> Result<(), BlkError> {
    regs.write32(REG_STATUS, 0);
    let deadline = Deadline::after_us(tsc_hz, 1_000_000);
    while regs.read32(REG_STATUS) != 0 {
        if deadline.passed() {
            return Err(BlkError::Init("reset did not complete"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn fail_device(regs: &Mmio) {
    let st = regs.read32(REG_STATUS);
    regs.write32(REG_STATUS, st | S_FAILED);
}
