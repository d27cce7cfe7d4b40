//! What the API's routes read and act on: the VM's facts, its disks, its events, and its
//! pause, resume and shutdown.

use std::sync::Arc;
use std::time::Instant;

use crate::events::EventLog;
use crate::supervisor::DiskHandle;

/// A disk as the API shows it.
#[derive(Debug)]
pub struct ApiDisk {
    pub id: String,
    /// Its configuration, as `--print-config` shows it.
    pub config: serde_json::Value,
    /// Its worker's handle; None for a disk an external vhost-user backend serves.
    pub handle: Option<Arc<DiskHandle>>,
}

/// Pause, resume and shutdown of the running VM, as the API asks for them.
pub trait VmControl: Send + Sync + std::fmt::Debug {
    /// `running` or `paused`.
    fn state(&self) -> &'static str;
    /// Stops every vCPU outside KVM_RUN; returns once they all are (or says why not).
    fn pause(&self) -> Result<(), String>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), String>;
    /// Ends the VM as an ACPI power-off ends it on the host's side (the guest is not
    /// asked first).
    fn shutdown(&self);
}

/// Everything the API reads or acts on.
#[derive(Debug)]
pub struct ApiContext {
    /// When the VM started running.
    pub started: Instant,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The effective configuration (`bulkhead run --print-config`).
    pub config: serde_json::Value,
    /// Every disk, in `--disk` order.
    pub disks: Vec<ApiDisk>,
    pub events: Arc<EventLog>,
    pub control: Arc<dyn VmControl>,
    /// The exit counters and violations, for `/metrics`.
    pub stats: crate::report::VmStats,
}
