//! bulkhead's trusted side: KVM, guest memory, vCPUs, boot protocols, ACPI, legacy devices.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cgroup;
pub mod config;
pub mod confine;
pub mod cpu;
pub mod devices;
pub mod disk;
pub mod events;
pub mod keyvalue;
pub mod kvm_stats;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pause;
pub mod pids;
pub mod ratelimit;
pub mod report;
pub mod sandbox_report;
pub mod spawner;
pub mod supervisor;
pub mod terminal;
pub mod thread;
pub mod uid_lease;
pub mod vcpu;
pub mod vhost_frontend;
pub mod violations;
pub mod vm;
pub mod worker;
pub mod worker_output;

pub use ipc::error_chain;

/// Writes one line to stderr and ignores a failure: a closed or full stderr (its reader
/// gone) must never end the VMM, and `eprintln!` panics when its write fails.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
