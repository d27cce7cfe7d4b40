//! A VM's configuration as the user gives it: serde types with `deny_unknown_fields`, the
//! same for the command line (`bulkhead run` fills them), a configuration file and the
//! control API. Disks are [`crate::disk::config::DiskConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::disk::config::DiskConfig;
use crate::memory::RamPages;

/// Command line when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest RAM when the user gives none.
pub const DEFAULT_MEM_MIB: u64 = 256;

/// A virtual machine as the user described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// An ELF with a PVH note (PVH), another x86-64 ELF or a bzImage (64-bit boot protocol).
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// What pages back guest RAM (`--hugepages`).
    #[serde(default)]
    pub ram_pages: RamPages,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The worker executable; default: `bulkhead-worker` beside this executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_bin: Option<PathBuf>,
    /// Host uids to lease one from for this VM's workers; default: all run as 65534.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_uids: Option<crate::uid_lease::UidRange>,
    /// Whether each worker gets a cgroup of its own (`--worker-cgroups`).
    #[serde(default)]
    pub worker_cgroups: crate::cgroup::CgroupMode,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}

fn default_vcpus() -> u32 {
    1
}

impl VmConfig {
    /// A VM booting `kernel` with every other option at its default.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            mem_mib: DEFAULT_MEM_MIB,
            ram_pages: RamPages::Small,
            vcpus: default_vcpus(),
            disks: Vec::new(),
            worker_bin: None,
            worker_uids: None,
            worker_cgroups: crate::cgroup::CgroupMode::Auto,
        }
    }

    /// Fills in what each disk leaves to the VM: its default id (`blkN` for the N-th).
    pub fn with_disk_ids(mut self) -> Self {
        for (i, disk) in self.disks.iter_mut().enumerate() {
            if disk.id.is_empty() {
                disk.id = format!("blk{i}");
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gives_the_same_config_as_the_defaults() {
        let json =
            r#"{"kernel": "/k", "disks": [{"path": "/a"}, {"vhost_user": "/s", "id": "x"}]}"#;
        let cfg: VmConfig = serde_json::from_str(json).unwrap();
        let cfg = cfg.with_disk_ids();
        let mut want = VmConfig::new("/k".into());
        want.disks = vec![
            DiskConfig::parse("path=/a", 0).unwrap(),
            DiskConfig::parse("vhost_user=/s,id=x", 1).unwrap(),
        ];
        assert_eq!(cfg, want);
        let again: VmConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_and_repeated_keys_are_refused() {
        for (json, says) in [
            (r#"{"kernel": "/k", "memory": 5}"#, "unknown field `memory`"),
            (
                r#"{"kernel": "/k", "vcpus": 1, "vcpus": 2}"#,
                "duplicate field `vcpus`",
            ),
            (
                r#"{"kernel": "/k", "ram_pages": "giant"}"#,
                "unknown variant `giant`",
            ),
            (
                r#"{"kernel": "/k", "disks": [{"vhost_user": "/s", "direct": true}]}"#,
                "direct= applies to an image",
            ),
        ] {
            let err = serde_json::from_str::<VmConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
