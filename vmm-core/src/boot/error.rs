//! What can go wrong while booting, for every boot protocol.

use std::path::PathBuf;

use linux_loader::loader;

use crate::layout::CMDLINE_MAX_SIZE;

/// Errors while loading a kernel or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel this VMM can boot (neither an x86-64 ELF nor a bzImage)")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write {what} to guest memory at {addr:#x}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
}
