//! A cgroup v2 per worker, where the host has one with the memory and pids controllers.
//!
//! RLIMIT_AS bounds what a worker maps; it cannot bound what the kernel allocates on a
//! worker's behalf (page cache of its disk, socket and pipe buffers, io_uring's rings and
//! io-wq threads) nor, across a fork, how many tasks it has. A cgroup does both:
//! `memory.max` and `memory.swap.max` for memory, `pids.max` for tasks.
//!
//! Layout, under the cgroup2 mount found in /proc/self/mountinfo (like Firecracker's jailer,
//! at the hierarchy's root, where the no-internal-processes rule cannot refuse controllers):
//! `bulkhead/vm-PID/ID.N`, PID the VMM's, ID the disk and N the spawner's count of workers
//! started. The VMM makes `bulkhead/vm-PID` before its spawner starts; the spawner makes each
//! worker's leaf, moves the forked worker into it before exec (so nothing of the worker ever
//! runs outside it), removes the leaf once it reaped the worker, and `vm-PID` when the VMM
//! is gone. A `vm-PID` left by a VMM that was killed is removed by the next one that starts.
//!
//! Where no such hierarchy is usable (cgroup v1 only, or v2 with those controllers bound to
//! v1 hierarchies as on hybrid hosts, or a cgroup namespace that refuses them) bulkhead says
//! so in one line and workers are limited by RLIMIT_AS and their seccomp filter alone
//! (`--worker-cgroups auto`, the default), or refuses to start (`required`).

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How many tasks (processes and threads) one worker may have: its reaper, its confined
/// process and the kernel's io-wq threads for its io_uring (at most 4 per CPU bounded, a
/// few unbounded; a worker makes no thread itself).
pub const WORKER_PIDS_MAX: u64 = 64;

/// The controllers bulkhead sets limits with.
const CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// Whether workers run in cgroups of their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Where a usable cgroup v2 hierarchy exists; else one line says why not.
    #[default]
    Auto,
    /// Never.
    Off,
    /// Always: without a usable hierarchy bulkhead does not start.
    Required,
}

/// Errors of setting up or using the workers' cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (/proc/self/mountinfo lists none)")]
    NoHierarchy,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the cgroup v2 hierarchy at {mount} lacks the {missing} controller (it offers {offered:?}; \
         on hybrid hosts the v1 hierarchies hold them)"
    )]
    MissingController {
        mount: PathBuf,
        missing: &'static str,
        offered: String,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// This VMM's cgroup directory, `bulkhead/vm-PID`, under which each worker gets a leaf.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    dir: PathBuf,
}

impl VmCgroup {
    /// An existing directory (the spawner is given the one its VMM made).
    pub fn at(dir: PathBuf) -> Self {
        VmCgroup { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the leaf `name` with its limits and opens its `cgroup.procs`, which the forked
    /// worker writes "0" to (itself) before exec.
    pub fn make_leaf(&self, name: &str, memory_max: u64) -> Result<WorkerLeaf, CgroupError> {
        let dir = self.dir.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by a worker whose leaf could not be removed yet: reuse it (limits are
            // written again below).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        let leaf = WorkerLeaf { dir, procs: None };
        write(&leaf.dir.join("memory.max"), &memory_max.to_string())?;
        // Without swap accounting the file is absent and there is nothing to bypass.
        let swap = leaf.dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        write(&leaf.dir.join("pids.max"), &WORKER_PIDS_MAX.to_string())?;
        let procs_path = leaf.dir.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| CgroupError::Write {
                path: procs_path,
                value: "0".into(),
                source,
            })?;
        Ok(WorkerLeaf {
            procs: Some(procs.into()),
            ..leaf
        })
    }

    /// Removes the leaves left (their workers ended) and the directory itself; true when
    /// it is gone.
    pub fn remove(&self) -> bool {
        remove_tree(&self.dir)
    }
}

/// A worker's own cgroup.
#[derive(Debug)]
pub struct WorkerLeaf {
    dir: PathBuf,
    procs: Option<OwnedFd>,
}

impl WorkerLeaf {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open `cgroup.procs` (until the worker is forked: then [`Self::close_procs`]).
    pub fn procs(&self) -> Option<&OwnedFd> {
        self.procs.as_ref()
    }

    pub fn close_procs(&mut self) {
        self.procs = None;
    }

    /// How many of its tasks the kernel's OOM killer ended (memory.max reached): the
    /// `oom_kill` count of its `memory.events`.
    pub fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.dir.join("memory.events"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the leaf; false while a task of it still exits (try again later).
    pub fn remove(&self) -> bool {
        match fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

/// Makes this VMM's `bulkhead/vm-PID` as `mode` asks, under the cgroup2 mount that
/// /proc/self/mountinfo names. None when `mode` is off, or auto and nothing usable exists.
/// The line says which, and why (`headroom`: what memory.max allows beyond guest RAM): the
/// caller logs it once the VM is set up (so that a configuration error stays the only line
/// bulkhead prints).
pub fn prepare(
    mode: CgroupMode,
    vmm_pid: u32,
    headroom: u64,
) -> Result<(Option<VmCgroup>, String), CgroupError> {
    if mode == CgroupMode::Off {
        let line = "workers run without cgroups of their own (--worker-cgroups off)";
        return Ok((None, line.to_string()));
    }
    let made = find_mount(Path::new("/proc/self/mountinfo"))
        .and_then(|mount| prepare_under(&mount, vmm_pid));
    match (made, mode) {
        (Ok(vm), _) => {
            let line = format!(
                "workers run in cgroups under {} (memory.max: guest RAM + {} MiB, pids.max {})",
                vm.dir.display(),
                headroom >> 20,
                WORKER_PIDS_MAX
            );
            Ok((Some(vm), line))
        }
        (Err(e), CgroupMode::Required) => Err(e),
        (Err(e), _) => Ok((
            None,
            format!(
                "workers run without cgroups of their own (RLIMIT_AS and seccomp still hold): {e}"
            ),
        )),
    }
}

/// The first cgroup2 mount point in a mountinfo file.
pub fn find_mount(mountinfo: &Path) -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string(mountinfo).map_err(|source| CgroupError::Read {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    text.lines()
        .find_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split(' ').next()?;
            let mountpoint = before.split(' ').nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mountpoint)))
        })
        .ok_or(CgroupError::NoHierarchy)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Under the cgroup2 mount `mount`: checks the controllers, enables them down to
/// `bulkhead/vm-PID`, removes what killed VMMs left, and makes `vm-PID`.
pub fn prepare_under(mount: &Path, vmm_pid: u32) -> Result<VmCgroup, CgroupError> {
    let controllers = mount.join("cgroup.controllers");
    let offered = fs::read_to_string(&controllers).map_err(|source| CgroupError::Read {
        path: controllers,
        source,
    })?;
    for missing in CONTROLLERS {
        if !offered.split_whitespace().any(|c| c == missing) {
            return Err(CgroupError::MissingController {
                mount: mount.to_path_buf(),
                missing,
                offered: offered.trim().to_string(),
            });
        }
    }
    enable_controllers(mount)?;
    let top = mount.join("bulkhead");
    make_dir(&top)?;
    enable_controllers(&top)?;
    remove_stale(&top);
    let dir = top.join(format!("vm-{vmm_pid}"));
    make_dir(&dir)?;
    enable_controllers(&dir)?;
    Ok(VmCgroup { dir })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes memory and pids available to the children of `dir` (if they are not yet).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    let wanted: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write(&path, &wanted.join(" "))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

/// Removes `vm-PID` directories of VMMs that no longer run (the kernel refuses to remove
/// one that still has a task, so a live VMM's is safe even if its pid was reused).
fn remove_stale(top: &Path) {
    let Ok(entries) = fs::read_dir(top) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the pid exists; nothing is sent.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && remove_tree(&entry.path()) {
            tracing::info!(
                "removed the cgroup {} a killed bulkhead left",
                entry.path().display()
            );
        }
    }
}

/// Removes a cgroup directory and its child cgroups (cgroupfs removes a directory's
/// interface files with it, and refuses one with tasks).
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path());
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulkhead-cgroup-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_hierarchies() {
        let dir = scratch("mountinfo");
        let info = dir.join("mountinfo");
        fs::write(
            &info,
            "30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
             31 30 0:27 / /sys/fs/cgroup/unified\\040dir rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
             32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        )
        .unwrap();
        assert_eq!(
            find_mount(&info).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified dir")
        );
        fs::write(
            &info,
            "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        )
        .unwrap();
        assert!(matches!(find_mount(&info), Err(CgroupError::NoHierarchy)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hierarchy_without_the_memory_controller_is_refused_with_what_it_offers() {
        let dir = scratch("controllers");
        fs::write(dir.join("cgroup.controllers"), "cpu io pids\n").unwrap();
        let e = prepare_under(&dir, 42).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("lacks the memory controller"), "{text}");
        assert!(text.contains("cpu io pids"), "{text}");
        assert!(!dir.join("bulkhead").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_leafs_oom_kills_are_read_from_memory_events() {
        let dir = scratch("events");
        let leaf = WorkerLeaf {
            dir: dir.clone(),
            procs: None,
        };
        assert_eq!(leaf.oom_kills(), 0, "no memory.events: none known");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(leaf.oom_kills(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }
}
