//! `hostile`: malformed descriptor chains on purpose, each followed by a valid read that
//! must still succeed. Completions are polled with a timeout, so a device that never
//! answers costs time, not a hang; a device that sets DEVICE_NEEDS_RESET (or never
//! answers) is reset and brought up again before the valid read.
//!
//! Options: `dev=N` (default every device), `readonly=1` (the disk must be read-only:
//! the `ro_out` case is expected), `check=0` (report what the device did without failing
//! on a difference from [`CASES`], for exploring other devices such as QEMU's).
//!
//! One line per case: `TG hostile CASE status=S used_len=L ok` (S / L are `none` when
//! the device wrote no status / put no used entry; `reset` is appended when the device
//! needed a reset), `differs` instead of `ok` with `check=0`, or
//! `TG fail hostile CASE status=S used_len=L want=S/L`.

use crate::blk_verify::chosen;
use crate::plans::Ctx;
use crate::start_info::MEMMAP_RAM;
use crate::virtio_blk::{
    self, Blk, BlkError, Completion, Op, DESC_NEXT, DESC_WRITE, F_RO, ST_IOERR, ST_OK, ST_UNSUPP,
    ST_UNWRITTEN, T_IN, T_OUT,
};
use crate::virtio_mmio::Slot;
use crate::{fail, tg};

/// What a device does with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A used entry of `len` bytes; `status` is the status byte (`None`: untouched).
    Used { status: Option<u8>, len: u32 },
    /// No used entry before the timeout (or the device needed a reset).
    NotUsed,
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub name: &'static str,
    /// What bulkhead-worker must do.
    pub expect: Outcome,
}

const fn status(s: u8) -> Outcome {
    Outcome::Used {
        status: Some(s),
        len: 1,
    }
}

/// Used length 0, status byte not written.
const SILENT: Outcome = Outcome::Used {
    status: None,
    len: 0,
};

/// The cases and what bulkhead-worker answers (edit here to adjust expectations).
pub const CASES: &[Case] = &[
    // IN whose data descriptor is far outside guest RAM.
    Case {
        name: "addr_far",
        expect: status(ST_IOERR),
    },
    // IN whose data descriptor starts at the end of the highest RAM range.
    Case {
        name: "addr_ram_end",
        expect: status(ST_IOERR),
    },
    // IN whose data descriptor's address + length overflows 64 bits.
    Case {
        name: "addr_overflow",
        expect: status(ST_IOERR),
    },
    // header -> data -> status -> data -> ...: no descriptor ends the chain.
    Case {
        name: "loop",
        expect: SILENT,
    },
    // Every descriptor of the table chained, the last back to the second: more
    // descriptors than the queue size.
    Case {
        name: "too_long",
        expect: SILENT,
    },
    // The header in a device-writable descriptor.
    Case {
        name: "hdr_writable",
        expect: status(ST_IOERR),
    },
    // IN into a device-readable data descriptor.
    Case {
        name: "in_readable",
        expect: status(ST_IOERR),
    },
    // IN of 4 KiB starting 4 sectors before the end of the disk.
    Case {
        name: "past_capacity",
        expect: status(ST_IOERR),
    },
    // Request type 0x7777.
    Case {
        name: "unknown_type",
        expect: status(ST_UNSUPP),
    },
    // OUT to a read-only disk (only run when the device offers RO).
    Case {
        name: "ro_out",
        expect: status(ST_IOERR),
    },
];

/// Queue size for the hostile plan (the `too_long` chain is this long).
const QUEUE: u16 = 16;
const CASE_TIMEOUT_US: u64 = 1_000_000;
const READ_TIMEOUT_US: u64 = 5_000_000;
const FAR_ADDR: u64 = 0xfff0_0000_0000;

pub fn run(ctx: &Ctx) {
    let dev = crate::blk_verify::opts(&ctx.cmdline).dev;
    let readonly = ctx.cmdline.flag("readonly");
    let check = ctx.cmdline.get("check") != Some("0");
    let mut any = false;
    for (n, slot) in chosen(ctx, dev) {
        any = true;
        device(ctx, n, slot, readonly, check);
    }
    if !any {
        fail!("hostile no devices");
    }
}

fn open(ctx: &Ctx, n: usize, slot: &Slot) -> Blk {
    Blk::init(
        slot,
        0,
        QUEUE,
        Completion::Poll,
        (ctx.apic_base_msr, &ctx.ioapics),
        ctx.tsc_hz,
    )
    .unwrap_or_else(|e| fail!("hostile dev={n} {e}"))
}

/// End of the highest RAM range in the memory map.
fn ram_end(ctx: &Ctx) -> Option<u64> {
    ctx.start_info
        .memmap()
        .filter(|e| e.kind == MEMMAP_RAM)
        .map(|e| e.addr + e.size)
        .max()
}

fn device(ctx: &Ctx, n: usize, slot: &Slot, readonly: bool, check: bool) {
    let mut blk = open(ctx, n, slot);
    let ro = blk.has(F_RO);
    if readonly && !ro {
        fail!("hostile dev={n} readonly=1 but RO not offered");
    }
    tg!(
        "hostile dev={n} feat={:#x} num={} cap={}",
        blk.features,
        blk.num,
        blk.config.capacity
    );
    valid_read(&mut blk, n, "before");
    for case in CASES {
        if case.name == "ro_out" && !ro {
            continue;
        }
        let ram_end = ram_end(ctx);
        if case.name == "addr_ram_end" && ram_end.is_none() {
            tg!("hostile {} skip no memory map", case.name);
            continue;
        }
        build(&mut blk, case.name, ram_end.unwrap_or(0));
        blk.kick();
        let (got, reset) = match blk.wait_used(1, CASE_TIMEOUT_US) {
            Ok(e) => {
                if e.id != 0 {
                    fail!("hostile {} used id {} not the head 0", case.name, e.id);
                }
                let st = blk.status(0);
                let status = (st != ST_UNWRITTEN).then_some(st);
                (Outcome::Used { status, len: e.len }, false)
            }
            Err(BlkError::NeedsReset) => (Outcome::NotUsed, true),
            Err(BlkError::Timeout) => (Outcome::NotUsed, false),
            Err(e) => fail!("hostile {} {e}", case.name),
        };
        let (s, l) = show(got);
        let r = if reset { " reset" } else { "" };
        if got == case.expect {
            tg!("hostile {} status={s} used_len={l} ok{r}", case.name);
        } else if !check {
            tg!("hostile {} status={s} used_len={l} differs{r}", case.name);
        } else {
            let (ws, wl) = show(case.expect);
            fail!(
                "hostile {} status={s} used_len={l} want={ws}/{wl}{r}",
                case.name
            );
        }
        if got == Outcome::NotUsed {
            // The device may still hold the chain, or stopped serving: start over.
            drop(blk);
            blk = open(ctx, n, slot);
        }
        valid_read(&mut blk, n, case.name);
    }
}

fn show(o: Outcome) -> (Shown, Shown) {
    match o {
        Outcome::Used { status, len } => (
            status.map_or(Shown::None, |s| Shown::Num(u64::from(s))),
            Shown::Num(u64::from(len)),
        ),
        Outcome::NotUsed => (Shown::None, Shown::None),
    }
}

#[derive(Clone, Copy)]
enum Shown {
    None,
    Num(u64),
}

impl core::fmt::Display for Shown {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            Shown::None => f.write_str("none"),
            Shown::Num(v) => write!(f, "{v}"),
        }
    }
}

/// A 4 KiB read at sector 0 that must succeed.
fn valid_read(blk: &mut Blk, n: usize, after: &str) {
    let op = Op::In {
        sector: 0,
        len: virtio_blk::BLOCK as u32,
    };
    match blk.run_one(op, READ_TIMEOUT_US) {
        Ok(d) if d.status == ST_OK && d.len == virtio_blk::BLOCK as u32 + 1 => {}
        Ok(d) => fail!(
            "hostile dev={n} read after {after} status={} used_len={}",
            d.status,
            d.len
        ),
        Err(e) => fail!("hostile dev={n} read after {after} {e}"),
    }
}

/// Writes the chain of case `name` from descriptor 0 and puts it in the avail ring.
fn build(blk: &mut Blk, name: &str, ram_end: u64) {
    let data = virtio_blk::data_addr(0);
    let block = virtio_blk::BLOCK as u32;
    let cap = blk.config.capacity;
    let (kind, sector) = match name {
        "unknown_type" => (0x7777, 0),
        "ro_out" => (T_OUT, 0),
        "past_capacity" => (T_IN, cap.saturating_sub(4)),
        _ => (T_IN, 0),
    };
    let (hdr, st) = blk.prepare(0, kind, sector);
    let w = DESC_WRITE;
    let nx = DESC_NEXT;
    // The usual three: header (readable), data, status (writable).
    let three = |blk: &Blk, hdr_flags: u16, addr: u64, len: u32, data_flags: u16| {
        blk.set_desc(0, hdr, 16, hdr_flags | nx, 1);
        blk.set_desc(1, addr, len, data_flags | nx, 2);
        blk.set_desc(2, st, 1, w, 0);
    };
    match name {
        "addr_far" => three(blk, 0, FAR_ADDR, block, w),
        "addr_ram_end" => three(blk, 0, ram_end, block, w),
        "addr_overflow" => three(blk, 0, u64::MAX - 0xfff, 2 * block, w),
        // The cycles stay among the writable descriptors after the header, so a
        // device's direction-order check cannot catch them first.
        "loop" => {
            blk.set_desc(0, hdr, 16, nx, 1);
            blk.set_desc(1, data, block, w | nx, 2);
            blk.set_desc(2, st, 1, w | nx, 1);
        }
        "too_long" => {
            let num = blk.num;
            blk.set_desc(0, hdr, 16, nx, 1);
            for i in 1..num {
                let next = if i + 1 < num { i + 1 } else { 1 };
                blk.set_desc(i, data, 512, w | nx, next);
            }
        }
        "hdr_writable" => three(blk, w, data, block, w),
        "in_readable" => three(blk, 0, data, block, 0),
        "past_capacity" => three(blk, 0, data, block, w),
        "unknown_type" => {
            blk.set_desc(0, hdr, 16, nx, 2);
            blk.set_desc(2, st, 1, w, 0);
        }
        "ro_out" => three(blk, 0, data, block, 0),
        _ => fail!("hostile unknown case {name}"),
    }
    blk.push(0);
}
