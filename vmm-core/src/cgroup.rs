//! A cgroup v2 per worker, where the host has one with the memory and pids controllers.
//!
//! RLIMIT_AS bounds what a worker maps; it cannot bound what the kernel allocates on a
//! worker's behalf (page cache of its disk, pipe buffers, io_uring's rings and io-wq
//! threads, guest RAM pages the worker is the first to touch) nor how many tasks it has.
//! A cgroup does: `memory.max` and `memory.swap.max` for memory, `pids.max` for tasks.
//!
//! Layout, under the cgroup2 mount found in /proc/self/mountinfo, at the hierarchy's root
//! (as Firecracker's jailer does; there the no-internal-processes rule cannot refuse the
//! controllers): `bulkhead/vm-NS-PID-START/ID.SLOT`. NS-PID-START names the VMM (its pid
//! namespace, pid and start time: unique on the host, and checkable); the VM's directory
//! caps all its workers together; each worker runs in a leaf of its disk, SLOT the first
//! not held by another running worker of that disk (a restarted worker takes its
//! predecessor's leaf, so restarts leave no dying cgroups behind). The VMM makes its
//! directory before its spawner starts; the spawner makes the leaves, moves each forked
//! worker into its leaf before exec (nothing of the worker runs outside it), kills what is
//! left in the directory once the VMM is gone and removes it. A directory whose VMM (of this
//! pid namespace) no longer runs is removed by the next bulkhead that starts.
//!
//! Workers are therefore charged to bulkhead's tree, not to the cgroup bulkhead itself runs
//! in (a systemd unit's limits do not cover them; the VM's own caps do).
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

/// This VMM's cgroup directory, under which each worker gets a leaf.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    dir: PathBuf,
    /// memory.max of each worker's leaf.
    worker_memory_max: u64,
}

impl VmCgroup {
    /// An existing directory (the spawner is given the one its VMM made, and the limit).
    pub fn at(dir: PathBuf, worker_memory_max: u64) -> Self {
        VmCgroup {
            dir,
            worker_memory_max,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn worker_memory_max(&self) -> u64 {
        self.worker_memory_max
    }

    /// Makes (or takes again, after the worker that had it ended) the leaf `name` with its
    /// limits and opens its `cgroup.procs`, which the forked worker writes "0" to (itself)
    /// before exec.
    pub fn leaf(&self, name: &str) -> Result<WorkerLeaf, CgroupError> {
        let dir = self.dir.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // This VMM's own directory: a leaf that exists was made by its spawner.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        write(&dir.join("memory.max"), &self.worker_memory_max.to_string())?;
        // Without swap accounting the file is absent and there is nothing to bypass.
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        write(&dir.join("pids.max"), &WORKER_PIDS_MAX.to_string())?;
        // An OOM kill ends the whole worker (reaper and confined process) at once, not one
        // of its processes, leaving the other to serve half a worker.
        let group = dir.join("memory.oom.group");
        if group.exists() {
            write(&group, "1")?;
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| CgroupError::Write {
                path: procs_path,
                value: "0".into(),
                source,
            })?;
        let mut leaf = WorkerLeaf {
            dir,
            procs: Some(procs.into()),
            oom_kills_before: 0,
        };
        leaf.oom_kills_before = leaf.oom_kills();
        Ok(leaf)
    }

    /// Kills every task left in the VM's directory (`cgroup.kill`, Linux 5.14); false where
    /// the kernel has no such file.
    pub fn kill_all(&self) -> bool {
        write(&self.dir.join("cgroup.kill"), "1").is_ok()
    }

    /// Removes the leaves (their workers ended) and the directory itself; true when it is
    /// gone.
    pub fn remove(&self) -> bool {
        remove_tree(&self.dir)
    }
}

/// A worker's leaf.
#[derive(Debug)]
pub struct WorkerLeaf {
    dir: PathBuf,
    procs: Option<OwnedFd>,
    /// `oom_kill` of the leaf when this worker got it (a leaf outlives its workers).
    oom_kills_before: u64,
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

    /// How many tasks of the leaf the kernel's OOM killer ended (memory.max reached) since
    /// this worker got it.
    pub fn new_oom_kills(&self) -> u64 {
        self.oom_kills().saturating_sub(self.oom_kills_before)
    }

    /// The `oom_kill` count of the leaf's `memory.events`.
    fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.dir.join("memory.events"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// What a VM's workers may use, each and together. Each: guest RAM + `headroom` (guest RAM
/// once, since a shared memfd page is charged to whoever touches it first, and a guest may
/// post a buffer in RAM it never touched, which the worker then faults in; `headroom` for
/// the worker's own pages and what the kernel allocates for it; huge pages are not charged
/// to the memory controller at all) and [`WORKER_PIDS_MAX`] tasks. Together: guest RAM once,
/// and `headroom` and [`WORKER_PIDS_MAX`] for each of `workers`.
#[derive(Clone, Copy, Debug)]
pub struct WorkerBudget {
    pub guest_ram: u64,
    pub headroom: u64,
    /// Most workers of the VM that run at once: an active one, a spare and a successor
    /// starting while its predecessor still exits, per worker-served disk.
    pub workers: u64,
}

impl WorkerBudget {
    pub fn worker_memory_max(&self) -> u64 {
        self.guest_ram.saturating_add(self.headroom)
    }

    fn vm_memory_max(&self) -> u64 {
        self.guest_ram
            .saturating_add(self.headroom.saturating_mul(self.workers))
    }

    fn vm_pids_max(&self) -> u64 {
        WORKER_PIDS_MAX.saturating_mul(self.workers)
    }
}

/// Makes this VMM's directory as `mode` asks, under the cgroup2 mount that
/// /proc/self/mountinfo names. None when `mode` is off, or auto and nothing usable exists.
/// The line says which, and why: the caller logs it once the VM is set up (so that a
/// configuration error stays the only line bulkhead prints).
pub fn prepare(
    mode: CgroupMode,
    budget: WorkerBudget,
) -> Result<(Option<VmCgroup>, String), CgroupError> {
    if mode == CgroupMode::Off {
        let line = "workers run without cgroups of their own (--worker-cgroups off)";
        return Ok((None, line.to_string()));
    }
    let made = find_mount(Path::new("/proc/self/mountinfo"))
        .and_then(|mount| Ok((self_name()?, mount)))
        .and_then(|(name, mount)| prepare_under(&mount, &name, budget));
    match (made, mode) {
        (Ok((vm, enabled_at_root)), _) => {
            let line = format!(
                "workers run in cgroups under {} (each: memory.max guest RAM + {} MiB, pids.max {}; \
                 all: memory.max {} MiB, pids.max {}){}",
                vm.dir.display(),
                budget.headroom >> 20,
                WORKER_PIDS_MAX,
                budget.vm_memory_max() >> 20,
                budget.vm_pids_max(),
                if enabled_at_root {
                    "; enabled the memory and pids controllers at the hierarchy's root"
                } else {
                    ""
                }
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
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who a VMM is, in its directory's name: `vm-NS-PID-START`, its pid namespace's inode, its
/// pid there and its start time (clock ticks after boot). Two VMMs never share it, not in
/// two pid namespaces, not after a pid is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VmmName {
    pid_ns: u64,
    pid: u32,
    start: u64,
}

impl VmmName {
    fn dir_name(&self) -> String {
        format!("vm-{}-{}-{}", self.pid_ns, self.pid, self.start)
    }

    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix("vm-")?.split('-');
        let name = VmmName {
            pid_ns: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok().filter(|&p| p > 0)?,
            start: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(name)
    }
}

/// This process's [`VmmName`].
fn self_name() -> Result<VmmName, CgroupError> {
    let ns = Path::new("/proc/self/ns/pid");
    let link = fs::read_link(ns).map_err(|source| CgroupError::Read {
        path: ns.to_path_buf(),
        source,
    })?;
    // "pid:[4026531836]"
    let pid_ns = link
        .to_str()
        .and_then(|l| l.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok())
        .unwrap_or(0);
    let pid = std::process::id();
    let start = start_time(pid).ok_or_else(|| CgroupError::Read {
        path: PathBuf::from("/proc/self/stat"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })?;
    Ok(VmmName { pid_ns, pid, start })
}

/// The start time of process `pid` of this pid namespace (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Under the cgroup2 mount `mount`: checks the controllers, enables them down to
/// `bulkhead/`, removes what killed VMMs of this pid namespace left, and makes the VMM's
/// directory `name` with the VM's caps. Also says whether it had to enable the controllers
/// at the hierarchy's root.
fn prepare_under(
    mount: &Path,
    name: &VmmName,
    budget: WorkerBudget,
) -> Result<(VmCgroup, bool), CgroupError> {
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
    let enabled_at_root = enable_controllers(mount)?;
    let top = mount.join("bulkhead");
    match fs::create_dir(&top) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(CgroupError::Create { path: top, source }),
    }
    enable_controllers(&top)?;
    remove_stale(&top, name.pid_ns);
    let dir = top.join(name.dir_name());
    // Never another's: a directory of this name exists only if this VMM made it.
    fs::create_dir(&dir).map_err(|source| CgroupError::Create {
        path: dir.clone(),
        source,
    })?;
    let vm = VmCgroup {
        dir,
        worker_memory_max: budget.worker_memory_max(),
    };
    let limits = enable_controllers(&vm.dir)
        .and_then(|_| {
            write(
                &vm.dir.join("memory.max"),
                &budget.vm_memory_max().to_string(),
            )
        })
        .and_then(|()| write(&vm.dir.join("pids.max"), &budget.vm_pids_max().to_string()));
    if let Err(e) = limits {
        vm.remove();
        return Err(e);
    }
    Ok((vm, enabled_at_root))
}

/// Makes memory and pids available to the children of `dir` (if they are not yet); says
/// whether it had to.
fn enable_controllers(dir: &Path) -> Result<bool, CgroupError> {
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
        return Ok(false);
    }
    write(&path, &wanted.join(" ")).map(|()| true)
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

/// Removes the directories of VMMs of pid namespace `pid_ns` that no longer run: no
/// process of that pid, or one that started at another time. Other pid namespaces'
/// directories are never touched (their pids mean nothing here).
fn remove_stale(top: &Path, pid_ns: u64) {
    let Ok(entries) = fs::read_dir(top) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().and_then(VmmName::parse) else {
            continue;
        };
        if name.pid_ns != pid_ns || start_time(name.pid) == Some(name.start) {
            continue;
        }
        let path = entry.path();
        // Workers a killed VMM left (the kernel then refuses the directory's removal).
        let _ = write(&path.join("cgroup.kill"), "1");
        if remove_tree(&path) {
            tracing::info!(
                "removed the cgroup {} a killed bulkhead left",
                path.display()
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

    const BUDGET: WorkerBudget = WorkerBudget {
        guest_ram: 256 << 20,
        headroom: 64 << 20,
        workers: 3,
    };

    fn name(pid_ns: u64, pid: u32, start: u64) -> VmmName {
        VmmName { pid_ns, pid, start }
    }

    #[test]
    fn a_hierarchy_without_the_memory_controller_is_refused_with_what_it_offers() {
        let dir = scratch("controllers");
        fs::write(dir.join("cgroup.controllers"), "cpu io pids\n").unwrap();
        let e = prepare_under(&dir, &name(1, 42, 7), BUDGET).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("lacks the memory controller"), "{text}");
        assert!(text.contains("cpu io pids"), "{text}");
        assert!(!dir.join("bulkhead").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A stand-in hierarchy: the root's interface files and `bulkhead/` with its own.
    fn fake_hierarchy(dir: &Path) {
        fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(dir.join("cgroup.subtree_control"), "memory pids\n").unwrap();
        fs::create_dir(dir.join("bulkhead")).unwrap();
        fs::write(dir.join("bulkhead/cgroup.subtree_control"), "memory pids\n").unwrap();
    }

    #[test]
    fn a_vm_directory_is_never_shared_and_is_removed_when_it_cannot_get_its_limits() {
        let dir = scratch("vmdir");
        fake_hierarchy(&dir);
        // This very process, so the stale sweep keeps its directory.
        let pid = std::process::id();
        let me = name(1, pid, start_time(pid).unwrap());
        // Another directory of the same name (it could only be another VMM's): refused.
        fs::create_dir(dir.join("bulkhead").join(me.dir_name())).unwrap();
        let e = prepare_under(&dir, &me, BUDGET).unwrap_err();
        assert!(matches!(e, CgroupError::Create { .. }), "{e}");
        fs::remove_dir(dir.join("bulkhead").join(me.dir_name())).unwrap();
        // A plain directory has no interface files: setting the VM's caps fails, and the
        // directory made for them goes again.
        let e = prepare_under(&dir, &me, BUDGET).unwrap_err();
        assert!(matches!(e, CgroupError::Read { .. }), "{e}");
        assert!(!dir.join("bulkhead").join(me.dir_name()).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_directories_of_vmms_of_this_pid_namespace_that_ended_are_removed() {
        let top = scratch("stale");
        let me = std::process::id();
        let my_start = start_time(me).unwrap();
        // Above any pid_max (4194304): no such process.
        let gone = 4_194_999;
        let dirs = [
            (name(5, gone, 1).dir_name(), false),
            (name(5, me, my_start + 1).dir_name(), false), // this pid, reused since
            (name(5, me, my_start).dir_name(), true),      // this very process
            (name(6, gone, 1).dir_name(), true),           // another pid namespace
            ("vm-5-0-1".to_string(), true),                // not a name bulkhead makes
            ("vm-5-1".to_string(), true),
            ("unrelated".to_string(), true),
        ];
        for (d, _) in &dirs {
            fs::create_dir(top.join(d)).unwrap();
        }
        // A gone VMM's leaves go with its directory.
        fs::create_dir(top.join(&dirs[0].0).join("blk0.0")).unwrap();
        remove_stale(&top, 5);
        for (d, kept) in &dirs {
            assert_eq!(top.join(d).exists(), *kept, "{d}");
        }
        fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn vmm_names_round_trip_and_nothing_else_parses() {
        let n = name(4026531836, 1234, 987654);
        assert_eq!(n.dir_name(), "vm-4026531836-1234-987654");
        assert_eq!(VmmName::parse(&n.dir_name()), Some(n));
        for bad in [
            "vm-1-0-5",
            "vm-1--1-5",
            "vm-1-2",
            "vm-1-2-3-4",
            "vm-a-2-3",
            "x-1-2-3",
        ] {
            assert_eq!(VmmName::parse(bad), None, "{bad}");
        }
        assert_eq!(unescape_mountinfo("a\\040b\\134c"), "a b\\c");
        // Not what a kernel writes, and no panic either.
        let _ = unescape_mountinfo("\\777\\");
    }

    #[test]
    fn a_leafs_oom_kills_count_from_when_its_worker_got_it() {
        let dir = scratch("events");
        let mut leaf = WorkerLeaf {
            dir: dir.clone(),
            procs: None,
            oom_kills_before: 0,
        };
        assert_eq!(leaf.new_oom_kills(), 0, "no memory.events: none known");
        let events = |kills: u32| {
            format!("low 0\nhigh 0\nmax 12\noom 2\noom_kill {kills}\noom_group_kill 0\n")
        };
        fs::write(dir.join("memory.events"), events(2)).unwrap();
        assert_eq!(leaf.new_oom_kills(), 2);
        // The next worker in the leaf starts from there.
        leaf.oom_kills_before = leaf.oom_kills();
        assert_eq!(leaf.new_oom_kills(), 0);
        fs::write(dir.join("memory.events"), events(3)).unwrap();
        assert_eq!(leaf.new_oom_kills(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
