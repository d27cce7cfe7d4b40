//! Guest RAM: one sealed memfd, mapped shared, split around the 32-bit MMIO hole.
//!
//! With [`RamPages::Huge`] the memfd lives on hugetlbfs (2 MiB pages, all allocated when
//! the VM is built). A disk worker maps the same pages, so a large guest buffer is
//! physically contiguous in 2 MiB pieces: a 1 MiB O_DIRECT read then reaches the host disk
//! as one segment instead of 256 4 KiB ones, which the host's block layer splits.
//!
//! The memfd is what later gets handed to disk workers (vhost-user SET_MEM_TABLE), so it is
//! sealed against shrinking and growing: a worker that could truncate it would SIGBUS the
//! VMM on its next access.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory as the rest of the VMM uses it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest RAM we accept: enough for the boot structures below 1 MiB and a kernel.
pub const MIN_MEM_MIB: u64 = 8;
/// Largest guest RAM we accept (bounded so a typo cannot ask for an exabyte).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Errors while creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory size (--mem) {mib} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)"
    )]
    SizeOutOfRange { mib: u64 },
    #[error("cannot create the guest memory memfd")]
    CreateMemfd(#[source] std::io::Error),
    #[error("cannot size the guest memory memfd to {size:#x} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("--hugepages needs guest memory in whole 2 MiB pages; {mib} MiB is not")]
    HugeSize { mib: u64 },
    #[error(
        "not enough free 2 MiB huge pages for {mib} MiB of guest memory: {free} free, {needed} \
         needed (reserve them with `sysctl vm.nr_hugepages=N`)"
    )]
    HugePages {
        mib: u64,
        needed: u64,
        free: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot seal the guest memory memfd")]
    Seal(#[source] std::io::Error),
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error(
        "cannot register guest memory slot {slot} at {guest_addr:#x} ({size:#x} bytes) with KVM"
    )]
    RegisterSlot {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The pages behind guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RamPages {
    /// Shared memory in the kernel's base pages (4 KiB).
    #[default]
    Small,
    /// hugetlbfs 2 MiB pages, from the pool the host reserved (`vm.nr_hugepages`).
    Huge,
}

/// Size of a huge page of guest RAM.
pub const HUGE_PAGE: u64 = 2 << 20;

fn huge_page_count(file: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{file}"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// 2 MiB huge pages a new guest could get now: free ones not promised to a mapping yet,
/// plus what the kernel may still add beyond the pool (`vm.nr_overcommit_hugepages`).
pub fn free_huge_pages() -> u64 {
    let free = huge_page_count("free_hugepages").saturating_sub(huge_page_count("resv_hugepages"));
    let more = huge_page_count("nr_overcommit_hugepages")
        .saturating_sub(huge_page_count("surplus_hugepages"));
    free + more
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemory,
    memfd: File,
    size: u64,
}

impl GuestRam {
    /// Creates `mib` MiB of guest RAM: `[0, min(size, hole))` and, above the hole, the rest
    /// from 4 GiB.
    pub fn new(mib: u64, pages: RamPages) -> Result<Self, MemoryError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
            return Err(MemoryError::SizeOutOfRange { mib });
        }
        let size = mib << 20;
        if pages == RamPages::Huge && size % HUGE_PAGE != 0 {
            return Err(MemoryError::HugeSize { mib });
        }
        let memfd = create_sealed_memfd("bulkhead-guest-ram", size, pages)?;
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(guest_addr, len, file_offset)| {
                let fo = FileOffset::new(
                    memfd.try_clone().map_err(MemoryError::CreateMemfd)?,
                    file_offset,
                );
                Ok((guest_addr, len as usize, Some(fo)))
            })
            .collect::<Result<_, MemoryError>>()?;
        let memory = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory,
            memfd,
            size,
        })
    }

    /// The mapped guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The sealed memfd backing all of guest RAM (region offsets follow [`ram_ranges`]).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// RAM end below the MMIO hole (exclusive).
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// Registers every region as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mem_region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping lives in `self.memory`, which outlives the VM
            // (the Vm struct owns both and drops the VM fd first); the size matches it.
            unsafe { vm.set_user_memory_region(mem_region) }.map_err(|source| {
                MemoryError::RegisterSlot {
                    slot,
                    guest_addr: mem_region.guest_phys_addr,
                    size: mem_region.memory_size,
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// RAM ranges for `size` bytes: `(guest address, length, offset in the memfd)`.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low, 0)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low, low));
    }
    ranges
}

/// A memfd of `size` bytes that can neither shrink nor grow.
pub fn create_sealed_memfd(name: &str, size: u64, pages: RamPages) -> Result<File, MemoryError> {
    let cname = CString::new(name).expect("memfd names are static and contain no NUL");
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if pages == RamPages::Huge {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call; the
    // flags are constants; the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    if pages == RamPages::Huge {
        // Every huge page now: the mappings (ours and the workers') are MAP_NORESERVE, so
        // a page the pool could not give later would be a SIGBUS in the guest's or a
        // worker's access instead of this error.
        let free = free_huge_pages();
        let short = |source| MemoryError::HugePages {
            mib: size >> 20,
            needed: size / HUGE_PAGE,
            free,
            source,
        };
        // Asked first, so a pool too small is not drained (other guests' pages) on the way
        // to the error.
        if free < size / HUGE_PAGE {
            return Err(short(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        // SAFETY: fallocate on a memfd we own, within its size; integer arguments only.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) } != 0 {
            return Err(short(std::io::Error::last_os_error()));
        }
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own; takes an int argument, no pointers.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if ret < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Last guest-physical address of RAM (inclusive), for bounds checks.
pub fn last_ram_addr(mem: &GuestMemory) -> u64 {
    mem.last_addr().raw_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn huge_pages_need_whole_2mib_pages() {
        assert!(matches!(
            GuestRam::new(9, RamPages::Huge),
            Err(MemoryError::HugeSize { mib: 9 })
        ));
    }

    #[test]
    fn too_few_free_huge_pages_is_an_error_that_says_how_many() {
        // More pages than the whole pool and what may be added to it: refused before a
        // page is taken, so tests using huge pages meanwhile keep theirs.
        let pages = huge_page_count("nr_hugepages") + free_huge_pages() + 1;
        let mib = (pages * 2).max(MIN_MEM_MIB);
        match GuestRam::new(mib, RamPages::Huge) {
            Err(e @ MemoryError::HugePages { .. }) => {
                let text = e.to_string();
                assert!(text.contains("vm.nr_hugepages"), "{text}");
            }
            other => panic!("{mib} MiB of huge pages: {other:?}"),
        }
    }

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20, 0)]);
    }

    #[test]
    fn big_ram_splits_around_the_hole() {
        let size = MMIO_HOLE_START + (1 << 30);
        assert_eq!(
            ram_ranges(size),
            vec![
                (GuestAddress(0), MMIO_HOLE_START, 0),
                (GuestAddress(MMIO_HOLE_END), 1 << 30, MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn memfd_is_sealed_and_shared() {
        let ram = GuestRam::new(16, RamPages::Small).unwrap();
        assert!(ram.memfd().set_len(1 << 20).is_err(), "shrink must fail");
        assert!(ram.memfd().set_len(32 << 20).is_err(), "grow must fail");
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        nix::sys::uio::pread(ram.memfd(), &mut buf, 0x1000).unwrap();
        assert_eq!(
            u32::from_le_bytes(buf),
            0xdead_beef,
            "mapping must be MAP_SHARED"
        );
    }

    #[test]
    fn size_limits_are_enforced() {
        assert!(matches!(
            GuestRam::new(0, RamPages::Small),
            Err(MemoryError::SizeOutOfRange { mib: 0 })
        ));
    }
}
