//! bulkhead's trusted side: KVM, guest memory, vCPUs, boot protocols, ACPI, legacy devices.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod disk;
pub mod kvm_stats;
pub mod layout;
pub mod memory;
pub mod sandbox_report;
pub mod supervisor;
pub mod terminal;
pub mod vcpu;
pub mod vhost_frontend;
pub mod violations;
pub mod vm;
pub mod worker;

/// An error and all its sources on one line (`outer: inner: innermost`), for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
