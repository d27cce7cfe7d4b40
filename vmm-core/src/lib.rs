//! bulkhead's trusted side: KVM, guest memory, vCPUs, boot protocols, ACPI, legacy devices.

pub mod acpi;
pub mod layout;
