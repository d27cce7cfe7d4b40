//! The guest's memory map as both boot protocols describe it (e820, PVH memmap).

/// Kind of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    Ram = 1,
    Reserved = 2,
}

/// One memory map entry: `[start, start + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: MemoryType,
}
