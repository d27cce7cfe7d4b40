//! KVM's own binary statistics for a vCPU (KVM_GET_STATS_FD): what the kernel counted, to
//! check the VMM's counters against (a kick that exited to userspace would show up here).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use vm_memory::ByteValued;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae00 | 0xce;

/// A vCPU's statistics file.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Header(kvm_stats_header);
// SAFETY: kvm_stats_header is a plain C struct of u32s: any bytes are a valid value.
unsafe impl ByteValued for Header {}

impl KvmStats {
    /// Opens the statistics of the vCPU behind `vcpu_fd`.
    pub fn open(vcpu_fd: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor we own.
        let fd = unsafe { libc::ioctl(vcpu_fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the ioctl and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(KvmStats { file })
    }

    /// The current value of each named counter (first u64 of the stat), in `names` order;
    /// None for a name KVM does not have.
    pub fn read(&self, names: &[&str]) -> std::io::Result<Vec<Option<u64>>> {
        let mut header = Header::default();
        self.file.read_exact_at(header.as_mut_slice(), 0)?;
        let h = header.0;
        let desc_size = std::mem::size_of::<kvm_stats_desc>() + h.name_size as usize;
        let mut descs = vec![0u8; desc_size * h.num_desc as usize];
        self.file
            .read_exact_at(&mut descs, u64::from(h.desc_offset))?;
        let mut out = vec![None; names.len()];
        for d in descs.chunks_exact(desc_size) {
            let offset = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            let name_bytes = &d[std::mem::size_of::<kvm_stats_desc>()..];
            let end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = std::str::from_utf8(&name_bytes[..end]).unwrap_or("");
            if let Some(i) = names.iter().position(|n| *n == name) {
                let mut value = [0u8; 8];
                self.file
                    .read_exact_at(&mut value, u64::from(h.data_offset) + u64::from(offset))?;
                out[i] = Some(u64::from_le_bytes(value));
            }
        }
        Ok(out)
    }
}
