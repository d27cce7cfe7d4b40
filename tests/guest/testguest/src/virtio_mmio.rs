//! virtio-mmio transports named on the command line (Linux's syntax:
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`) and their identification registers
//! (virtio 1.2, 4.2.2). A driver comes later.

use core::fmt;

use crate::cmdline::{parse_number, parse_size, Cmdline};
use crate::phys::Mmio;

pub const CMDLINE_KEY: &str = "virtio_mmio.device";
pub const MAX_DEVICES: usize = 16;

/// "virt" little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
/// The registers end at the config space; a window must at least cover them.
const MIN_WINDOW: u64 = 0x100;

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub size: u64,
    pub addr: u64,
    pub irq: u32,
    pub regs: Mmio,
}

#[derive(Clone, Copy, Debug)]
pub enum SlotError {
    Syntax(&'static str),
    Window(&'static str),
    TooMany,
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Syntax(v) => write!(f, "bad {CMDLINE_KEY}={v}"),
            Self::Window(v) => write!(f, "{CMDLINE_KEY}={v} not a usable window"),
            Self::TooMany => write!(f, "more than {MAX_DEVICES} {CMDLINE_KEY} entries"),
        }
    }
}

impl Slot {
    pub fn parse(value: &'static str) -> Result<Self, SlotError> {
        let (size, rest) = value.split_once('@').ok_or(SlotError::Syntax(value))?;
        let mut parts = rest.split(':');
        let addr = parts.next().and_then(parse_size);
        let irq = parts.next().and_then(|s| s.parse::<u32>().ok());
        // An optional platform device id may follow; it does not matter here.
        let id_ok = parts.next().is_none_or(|id| parse_number(id).is_some());
        let (Some(size), Some(addr), Some(irq), true, None) =
            (parse_size(size), addr, irq, id_ok, parts.next())
        else {
            return Err(SlotError::Syntax(value));
        };
        if size < MIN_WINDOW {
            return Err(SlotError::Window(value));
        }
        // SAFETY: the VMM named this window as a virtio-mmio register block.
        let regs = unsafe { Mmio::new(addr, size) }.ok_or(SlotError::Window(value))?;
        Ok(Slot {
            size,
            addr,
            irq,
            regs,
        })
    }

    pub fn magic(&self) -> u32 {
        self.regs.read32(REG_MAGIC)
    }

    pub fn version(&self) -> u32 {
        self.regs.read32(REG_VERSION)
    }

    pub fn device_id(&self) -> u32 {
        self.regs.read32(REG_DEVICE_ID)
    }

    pub fn vendor_id(&self) -> u32 {
        self.regs.read32(REG_VENDOR_ID)
    }
}

/// All entries, in command-line order (their index is the device number).
#[derive(Clone, Copy, Debug)]
pub struct Slots {
    slots: [Option<Slot>; MAX_DEVICES],
    len: usize,
}

impl Slots {
    pub fn from_cmdline(cmdline: &Cmdline) -> Result<Self, SlotError> {
        let mut slots = Slots {
            slots: [None; MAX_DEVICES],
            len: 0,
        };
        for value in cmdline.values(CMDLINE_KEY) {
            if slots.len == MAX_DEVICES {
                return Err(SlotError::TooMany);
            }
            slots.slots[slots.len] = Some(Slot::parse(value)?);
            slots.len += 1;
        }
        Ok(slots)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots[..self.len].iter().flatten()
    }
}
