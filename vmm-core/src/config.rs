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
    /// Guest RAM in MiB; in a file `"mem": 512` (MiB) or `"mem": "1G"` (see
    /// [`parse_mem_mib`]), written back with a unit.
    #[serde(
        rename = "mem",
        alias = "mem_mib",
        default = "default_mem_mib",
        with = "mem_serde"
    )]
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

/// Everything `bulkhead run` takes: the VM, and how bulkhead runs it. The same type reads a
/// configuration file (`--config`), prints the effective configuration
/// (`--print-config`) and is filled from the command line's flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub vm: VmConfig,
    /// The control API's Unix socket; none: no API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Seconds after which the VM is stopped (exit status 124); none: until the guest ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Where the log goes, how it looks, its level.
    #[serde(default)]
    pub log: crate::logging::LogConfig,
}

/// Errors in a size.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} {why}: give {bare} or a size with a binary unit (512M, 1G, 1536M, 1T)")]
pub struct SizeError {
    text: String,
    why: &'static str,
    /// What a bare number counts.
    bare: &'static str,
}

/// Bytes in `text`: a number of `bare` units, or a number with a binary unit, K/M/G/T
/// with an optional `iB` or `B`, any case.
fn with_unit(text: &str, bare: u64) -> Result<u64, &'static str> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| "is not a number")?;
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => bare,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err("has an unknown unit"),
    };
    number.checked_mul(unit).ok_or("is too large")
}

/// A disk's size as the user writes it: bytes (`1073741824`), or a number with a binary
/// unit (`1G`, `1536M`, `2TiB`).
pub fn parse_disk_bytes(text: &str) -> Result<u64, SizeError> {
    with_unit(text, 1).map_err(|why| SizeError {
        text: text.to_string(),
        why,
        bare: "bytes (1073741824)",
    })
}

/// Guest RAM as the user writes it: a bare number of MiB (`512`), or a number with a
/// binary unit, K/M/G/T with an optional `iB` or `B`, any case (`512M`, `1G`, `2GiB`,
/// `1048576K`); whole MiB, more than zero.
pub fn parse_mem_mib(text: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError {
        text: text.to_string(),
        why,
        bare: "MiB (512)",
    };
    let bytes = with_unit(text, 1 << 20).map_err(err)?;
    if bytes % (1 << 20) != 0 {
        return Err(err("is not a whole number of MiB"));
    }
    match bytes >> 20 {
        0 => Err(err("is zero")),
        mib if mib > crate::memory::MAX_MEM_MIB => Err(err("is more than 1T")),
        mib => Ok(mib),
    }
}

/// The shortest way to write `mib` with a unit: `1G` for 1024, `1536M` for 1536.
pub fn format_mem_mib(mib: u64) -> String {
    if mib != 0 && mib % (1024 * 1024) == 0 {
        format!("{}T", mib / (1024 * 1024))
    } else if mib != 0 && mib % 1024 == 0 {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

/// `mem` in a file: MiB as a number, or a size as a string.
mod mem_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mib: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_mem_mib(*mib))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Mem {
            Mib(u64),
            Text(String),
        }
        match Mem::deserialize(d)? {
            Mem::Mib(0) => Err(serde::de::Error::custom(
                "mem 0: guest RAM must be more than zero",
            )),
            Mem::Mib(mib) if mib > crate::memory::MAX_MEM_MIB => Err(serde::de::Error::custom(
                format!("mem {mib} (MiB) is more than 1T"),
            )),
            Mem::Mib(mib) => Ok(mib),
            Mem::Text(t) => super::parse_mem_mib(&t).map_err(serde::de::Error::custom),
        }
    }
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

    #[test]
    fn sizes_take_binary_units_and_whole_mib() {
        for (text, mib) in [
            ("512", 512),
            ("512M", 512),
            ("512m", 512),
            ("512MiB", 512),
            ("1G", 1024),
            ("1gb", 1024),
            ("2GiB", 2048),
            ("1048576K", 1024),
            ("1T", 1 << 20),
            ("1TiB", 1 << 20),
            (" 64M ", 64),
        ] {
            assert_eq!(parse_mem_mib(text).unwrap(), mib, "{text}");
        }
        for (text, says) in [
            ("0", "is zero"),
            ("0G", "is zero"),
            ("1536K", "not a whole number of MiB"),
            ("1X", "unknown unit"),
            ("G", "not a number"),
            ("-1G", "not a number"),
            ("1.5G", "unknown unit"),
            ("99999999999999999999T", "not a number"),
            ("9999999999999T", "too large"),
            ("2T", "more than 1T"),
            ("512B", "unknown unit"),
            ("5ib", "unknown unit"),
        ] {
            let e = parse_mem_mib(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        for mib in [1, 512, 1024, 1536, 3072, 1 << 20] {
            assert_eq!(parse_mem_mib(&format_mem_mib(mib)).unwrap(), mib);
        }
        assert_eq!(format_mem_mib(1024), "1G");
        assert_eq!(format_mem_mib(1536), "1536M");
    }

    #[test]
    fn a_run_file_reads_mem_as_mib_or_a_size_and_writes_it_with_a_unit() {
        let cfg: RunConfig = serde_json::from_str(
            r#"{"vm": {"kernel": "/k", "mem": "1G"}, "api_socket": "/run/b.sock", "timeout": 30}"#,
        )
        .unwrap();
        assert_eq!(cfg.vm.mem_mib, 1024);
        assert_eq!(cfg.timeout, Some(30.0));
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(text.contains(r#""mem":"1G""#), "{text}");
        assert_eq!(serde_json::from_str::<RunConfig>(&text).unwrap(), cfg);
        for (json, mib) in [
            (r#"{"kernel": "/k", "mem": 300}"#, 300),
            (r#"{"kernel": "/k", "mem_mib": 300}"#, 300),
            (r#"{"kernel": "/k"}"#, DEFAULT_MEM_MIB),
        ] {
            let vm: VmConfig = serde_json::from_str(json).unwrap();
            assert_eq!(vm.mem_mib, mib, "{json}");
        }
        for (json, says) in [
            (r#"{"kernel": "/k", "mem": 0}"#, "more than zero"),
            (
                r#"{"kernel": "/k", "mem": 18446744073709551615}"#,
                "more than 1T",
            ),
            (r#"{"kernel": "/k", "mem": "1536K"}"#, "whole number of MiB"),
        ] {
            let e = serde_json::from_str::<VmConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
        let e = serde_json::from_str::<RunConfig>(r#"{"vm": {"kernel": "/k"}, "api": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `api`"), "{e}");
    }
}
