//! What a test reads from outside about a live worker, to prove it served confined.

use std::collections::BTreeMap;
use std::path::Path;

/// Everything checked about a worker, read from /proc while it runs.
#[derive(Debug)]
pub struct SandboxFacts {
    pub pid: u32,
    pub status: BTreeMap<String, String>,
    /// Namespace kinds whose inode differs from the test process's.
    pub own_namespaces: Vec<&'static str>,
    pub root_entries: Vec<String>,
    /// fd number -> link target.
    pub fds: BTreeMap<u32, String>,
    pub maps: Vec<String>,
}

const NAMESPACES: [&str; 6] = ["user", "mnt", "pid", "net", "ipc", "uts"];

/// The memfd a worker creates for inflight tracking before it confines itself.
pub const INFLIGHT_MEMFD: &str = "bulkhead-inflight";

impl SandboxFacts {
    /// Reads the facts of process `pid`; panics if it is gone.
    pub fn read(pid: u32) -> Self {
        let proc = format!("/proc/{pid}");
        let status_text = std::fs::read_to_string(format!("{proc}/status"))
            .unwrap_or_else(|e| panic!("worker {pid} is gone: {e}"));
        let status = status_text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let ns = |p: &str| std::fs::read_link(p).map(|l| l.display().to_string()).ok();
        let own_namespaces = NAMESPACES
            .into_iter()
            .filter(|kind| {
                let theirs = ns(&format!("{proc}/ns/{kind}"));
                theirs.is_some() && theirs != ns(&format!("/proc/self/ns/{kind}"))
            })
            .collect();
        let root_entries = std::fs::read_dir(format!("{proc}/root"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_else(|e| vec![format!("<unreadable: {e}>")]);
        let fds = std::fs::read_dir(format!("{proc}/fd"))
            .expect("read the worker's fd table")
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().parse().ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some((n, target.display().to_string()))
            })
            .collect();
        let maps = std::fs::read_to_string(format!("{proc}/maps"))
            .expect("read the worker's maps")
            .lines()
            .map(str::to_string)
            .collect();
        SandboxFacts {
            pid,
            status,
            own_namespaces,
            root_entries,
            fds,
            maps,
        }
    }

    pub fn field(&self, key: &str) -> &str {
        self.status
            .get(key)
            .map(String::as_str)
            .unwrap_or("<missing>")
    }

    /// Asserts the worker is confined: seccomp filter mode, no_new_privs, every
    /// capability set empty, non-root host ids, its own namespaces, an empty root, only
    /// the expected descriptors, and no file-backed or shared mapping that is not on the
    /// list. `disk` is the image it serves; `shared_memfds` the names of memfds it may map
    /// shared (guest RAM, status page).
    pub fn assert_confined(&self, disk: &Path, shared_memfds: &[&str]) {
        self.assert_confined_with_sockets(disk, shared_memfds, 1);
    }

    /// As [`Self::assert_confined`], for a worker that holds `sockets` sockets (a spawned
    /// worker also keeps its control channel).
    pub fn assert_confined_with_sockets(
        &self,
        disk: &Path,
        shared_memfds: &[&str],
        sockets_kept: usize,
    ) {
        let ctx = format!("worker pid {}: {self:#?}", self.pid);
        assert_eq!(self.field("Seccomp"), "2", "seccomp filter mode: {ctx}");
        assert_eq!(self.field("NoNewPrivs"), "1", "{ctx}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(self.field(caps), "0000000000000000", "{caps}: {ctx}");
        }
        for ids in ["Uid", "Gid"] {
            let values: Vec<&str> = self.field(ids).split_whitespace().collect();
            assert_eq!(values.len(), 4, "{ids}: {ctx}");
            assert!(
                values.iter().all(|v| *v != "0"),
                "host {ids} must not be root: {ctx}"
            );
        }
        for kind in NAMESPACES {
            assert!(
                self.own_namespaces.contains(&kind),
                "{kind} namespace must be the worker's own: {ctx}"
            );
        }
        assert!(self.root_entries.is_empty(), "root must be empty: {ctx}");

        let disk = disk.canonicalize().expect("canonical disk path");
        let disk = disk.display().to_string();
        // The worker's own inflight region (vhost-user inflight tracking) is always there.
        let shared_memfds: Vec<&str> = shared_memfds
            .iter()
            .copied()
            .chain(std::iter::once(INFLIGHT_MEMFD))
            .collect();
        let mut sockets = 0;
        let mut disks = 0;
        let mut epolls = 0;
        let mut rings = 0;
        let mut timers = 0;
        for (fd, target) in &self.fds {
            if target.starts_with("socket:") {
                sockets += 1;
            } else if *target == disk {
                disks += 1;
            } else if target == "anon_inode:[eventpoll]" {
                epolls += 1;
            } else if target == "anon_inode:[io_uring]" {
                rings += 1;
            } else if target == "anon_inode:[timerfd]" {
                timers += 1;
            } else if target == "anon_inode:[eventfd]"
                || (*fd == 2 && (target.starts_with("pipe:") || target.starts_with("/dev/")))
                || shared_memfds
                    .iter()
                    .any(|name| target.starts_with(&format!("/memfd:{name}")))
            {
            } else {
                panic!("unexpected descriptor {fd} -> {target}: {ctx}");
            }
        }
        assert_eq!(
            (sockets, disks, epolls),
            (sockets_kept, 1, 1),
            "{sockets_kept} socket(s), one disk, one epoll: {ctx}"
        );
        assert!(rings <= 1, "at most the io_uring engine's ring: {ctx}");
        assert_eq!(timers, 1, "the rate limit's timerfd: {ctx}");

        for line in &self.maps {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let perms = fields.get(1).copied().unwrap_or("");
            let path = fields.get(5..).map(|p| p.join(" ")).unwrap_or_default();
            if perms.ends_with('s') {
                // The io_uring engine's submission and completion rings.
                let ring = rings == 1 && path == "anon_inode:[io_uring]";
                assert!(
                    ring || shared_memfds
                        .iter()
                        .any(|name| path.starts_with(&format!("/memfd:{name}"))),
                    "shared mapping not on the list: {line}: {ctx}"
                );
            } else if path.starts_with('/') {
                let name = Path::new(&path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let is_lib = name.starts_with("ld-linux")
                    || name.starts_with("libc.so")
                    || name.starts_with("libgcc_s.so")
                    || name.starts_with("libm.so");
                assert!(
                    name == "bulkhead-worker" || is_lib,
                    "file-backed mapping other than the worker and its libraries: {line}: {ctx}"
                );
            }
        }
    }
}
