//! Access to physical memory and MMIO from ring 3: everything below 4 GiB is identity
//! mapped and user accessible.

/// Highest address (exclusive) the page tables map.
pub const MAPPED_END: u64 = 1 << 32;

/// True if `[addr, addr + len)` lies in the identity map.
pub fn mapped(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= MAPPED_END)
}

/// Reads a plain-data value from guest-physical memory (any alignment).
///
/// # Safety
/// `[addr, addr + size_of::<T>())` must be mapped (see [`mapped`]), and every bit
/// pattern must be a valid `T`.
pub unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// A byte slice of guest-physical memory.
///
/// # Safety
/// The range must be mapped and not be written while the slice lives.
pub unsafe fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// A device register window that lies in the identity map.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: u64,
    size: u64,
}

impl Mmio {
    /// `None` unless the window is mapped and 4-byte aligned.
    ///
    /// # Safety
    /// The window must hold device registers (not RAM the guest uses): writes through
    /// it must not corrupt guest memory.
    pub unsafe fn new(base: u64, size: u64) -> Option<Self> {
        (mapped(base, size) && base & 3 == 0).then_some(Mmio { base, size })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// One 32-bit register read; out-of-window offsets read as all ones.
    pub fn read32(&self, offset: u64) -> u32 {
        if offset & 3 != 0 || offset + 4 > self.size {
            return u32::MAX;
        }
        // SAFETY: in the mapped window (checked by `new` and above); a volatile aligned
        // 32-bit load is a single access.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    /// One 8-bit register read; out-of-window offsets read as all ones.
    pub fn read8(&self, offset: u64) -> u8 {
        if offset >= self.size {
            return u8::MAX;
        }
        // SAFETY: in the mapped window (checked by `new` and above).
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u8) }
    }

    /// One 16-bit register read; out-of-window or misaligned offsets read as all ones.
    pub fn read16(&self, offset: u64) -> u16 {
        if offset & 1 != 0 || offset + 2 > self.size {
            return u16::MAX;
        }
        // SAFETY: in the mapped window (checked by `new` and above), aligned.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u16) }
    }

    /// One 32-bit register write; out-of-window offsets are ignored.
    pub fn write32(&self, offset: u64, value: u32) {
        if offset & 3 != 0 || offset + 4 > self.size {
            return;
        }
        // SAFETY: in the mapped device window, which holds no guest data (contract
        // of `new`).
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }
}
