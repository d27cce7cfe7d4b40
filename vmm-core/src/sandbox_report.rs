//! What the VMM can see from outside about a worker's confinement, read from /proc: the
//! operator's (and the demo's) proof that the process serving a disk is boxed in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Confinement facts of one process (read by the spawner, which sends them to the VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxFacts {
    pub pid: u32,
    /// `Seccomp:` from /proc/PID/status (2 = filter).
    pub seccomp: String,
    pub no_new_privs: String,
    /// CapEff of the process (hex).
    pub cap_eff: String,
    pub cap_bnd: String,
    /// Host-visible uid and gid.
    pub uid: String,
    pub gid: String,
    /// Namespaces that differ from the VMM's own.
    pub own_namespaces: Vec<String>,
    /// Entries in its root directory.
    pub root_entries: usize,
    pub fds: usize,
}

const NAMESPACES: [&str; 6] = ["user", "mnt", "pid", "net", "ipc", "uts"];

impl SandboxFacts {
    /// Reads the facts of `pid`, or None if it is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        let ns = |p: String| std::fs::read_link(p).ok();
        let own_namespaces = NAMESPACES
            .into_iter()
            .filter(|k| {
                let theirs = ns(format!("/proc/{pid}/ns/{k}"));
                theirs.is_some() && theirs != ns(format!("/proc/self/ns/{k}"))
            })
            .map(String::from)
            .collect();
        Some(SandboxFacts {
            pid,
            seccomp: field("Seccomp:"),
            no_new_privs: field("NoNewPrivs:"),
            cap_eff: field("CapEff:"),
            cap_bnd: field("CapBnd:"),
            uid: field("Uid:"),
            gid: field("Gid:"),
            own_namespaces,
            root_entries: std::fs::read_dir(format!("/proc/{pid}/root"))
                .map_or(usize::MAX, |d| d.count()),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        })
    }

    /// Fields no longer than /proc writes them (a few dozen bytes), at most six namespaces.
    pub fn is_plausible(&self) -> bool {
        [
            &self.seccomp,
            &self.no_new_privs,
            &self.cap_eff,
            &self.cap_bnd,
            &self.uid,
            &self.gid,
        ]
        .iter()
        .all(|f| f.len() <= 32)
            && self.own_namespaces.len() <= NAMESPACES.len()
            && self.own_namespaces.iter().all(|n| n.len() <= 8)
    }

    /// Seccomp filter on, no_new_privs, no capabilities, non-root, all namespaces its
    /// own, empty root.
    pub fn confined(&self) -> bool {
        self.seccomp == "2"
            && self.no_new_privs == "1"
            && self.cap_eff == "0000000000000000"
            && self.cap_bnd == "0000000000000000"
            && self.uid != "0"
            && self.gid != "0"
            && self.own_namespaces.len() == NAMESPACES.len()
            && self.root_entries == 0
    }
}

impl fmt::Display for SandboxFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {}: seccomp={} no_new_privs={} CapEff={} CapBnd={} uid={} gid={} own namespaces=[{}] root entries={} fds={}",
            self.pid,
            if self.seccomp == "2" { "filter" } else { &self.seccomp },
            self.no_new_privs,
            self.cap_eff,
            self.cap_bnd,
            self.uid,
            self.gid,
            self.own_namespaces.join(","),
            self.root_entries,
            self.fds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_process_is_not_confined() {
        let me = SandboxFacts::read(std::process::id()).unwrap();
        assert!(!me.confined(), "{me}");
        assert!(me.own_namespaces.is_empty());
    }
}
