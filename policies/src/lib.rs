//! Seccomp policies per worker kind and thread role, as reviewed data.
//!
//! Each `*.policy` file in this crate (format: `README.md`) is parsed and compiled to a BPF
//! program by `build.rs` with the same parser and compiler this crate exports (`format`,
//! `compile`); a policy error fails the build with `file:line:column: message`. At run time:
//! - [`install`] applies a worker's filter to the calling thread;
//! - [`policy`], [`bpf`], [`bpf_hash`] serve audit tools (show, diff, lint);
//! - [`syscalls`] and [`decode`] turn a violation record into
//!   `openat(AT_FDCWD, 0x7f0012345678, O_RDONLY|O_CLOEXEC, 0)`.

pub mod audit;
pub mod compile;
pub mod constants;
pub mod decode;
pub mod format;
pub mod learn;
pub mod syscalls;

use std::fmt;
use std::sync::OnceLock;

pub use format::{Action, Condition, Flag, Op, Policy, Rule, Width};
pub use seccompiler::{sock_filter, BpfProgram};

/// Kinds of sandboxed worker processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerKind {
    /// The virtio-blk vhost-user backend.
    Blk,
}

impl WorkerKind {
    /// All kinds.
    pub const ALL: [WorkerKind; 1] = [WorkerKind::Blk];

    /// The name used in policy headers (`worker:`).
    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Blk => "blk",
        }
    }
}

impl fmt::Display for WorkerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Thread roles inside a worker; each role has its own policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// The worker's only thread: the epoll loop.
    Main,
}

impl ThreadRole {
    /// The name used in policy headers (`thread:`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
        }
    }
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the run-time API.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter of worker {kind} thread {role}")]
    Install {
        /// Worker kind.
        kind: WorkerKind,
        /// Thread role.
        role: ThreadRole,
        /// seccompiler's error (carries the OS error).
        #[source]
        source: seccompiler::Error,
    },
    /// The filters are compiled for x86_64 only.
    #[error("seccomp policies are compiled for x86_64, not {0}")]
    UnsupportedArch(&'static str),
}

/// A policy embedded at build time: its source and its compiled program.
struct Embedded {
    file: &'static str,
    source: &'static str,
    bytes: &'static [u8],
    policy: OnceLock<Policy>,
    program: OnceLock<BpfProgram>,
}

static BLK_MAIN: Embedded = Embedded {
    file: "policies/blk.policy",
    source: include_str!("../blk.policy"),
    bytes: include_bytes!(concat!(env!("OUT_DIR"), "/blk_main.bpf")),
    policy: OnceLock::new(),
    program: OnceLock::new(),
};

fn embedded(kind: WorkerKind, role: ThreadRole) -> &'static Embedded {
    match (kind, role) {
        (WorkerKind::Blk, ThreadRole::Main) => &BLK_MAIN,
    }
}

/// The parsed policy of `kind`/`role` (rules with conditions, actions, reasons, flags).
pub fn policy(kind: WorkerKind, role: ThreadRole) -> &'static Policy {
    let e = embedded(kind, role);
    e.policy.get_or_init(|| {
        // The build script parsed this very text with this very parser and failed the build
        // on any error, so parsing cannot fail here.
        format::parse(e.file, e.source).expect("policy was validated by build.rs")
    })
}

/// The BPF program of `kind`/`role`, as compiled at build time.
pub fn bpf(kind: WorkerKind, role: ThreadRole) -> &'static [sock_filter] {
    let e = embedded(kind, role);
    e.program.get_or_init(|| {
        // build.rs wrote whole 8-byte instructions.
        compile::from_bytes(e.bytes).expect("build.rs wrote whole instructions")
    })
}

/// The raw program bytes of `kind`/`role` (8 bytes per instruction, little-endian).
pub fn bpf_bytes(kind: WorkerKind, role: ThreadRole) -> &'static [u8] {
    embedded(kind, role).bytes
}

/// A fingerprint of the compiled program: FNV-1a 64 of [`bpf_bytes`], 16 hex digits. It
/// identifies a filter in logs and sandbox reports; it is not a cryptographic hash.
pub fn bpf_hash(kind: WorkerKind, role: ThreadRole) -> String {
    format!("{:016x}", fnv1a64(bpf_bytes(kind, role)))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Apply the filter of `kind`/`role` to the calling thread (after setting no_new_privs).
///
/// Per thread, without `SECCOMP_FILTER_FLAG_TSYNC`: policies are per thread role, so a
/// worker with several roles installs each role's filter in its own thread, and threads
/// created afterwards inherit the creator's filter. The blk worker is single-threaded and
/// installs `Main` on its only thread, as the last sandbox step. Irreversible.
pub fn install(kind: WorkerKind, role: ThreadRole) -> Result<(), PolicyError> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(PolicyError::UnsupportedArch(std::env::consts::ARCH));
    }
    seccompiler::apply_filter(bpf(kind, role)).map_err(|source| PolicyError::Install {
        kind,
        role,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_program_matches_source() {
        for kind in WorkerKind::ALL {
            let p = policy(kind, ThreadRole::Main);
            assert_eq!(p.worker, kind.name());
            assert_eq!(p.thread, "main");
            let program = compile::compile(p).unwrap();
            assert_eq!(bpf(kind, ThreadRole::Main), program.as_slice());
            assert_eq!(
                bpf_bytes(kind, ThreadRole::Main),
                compile::to_bytes(&program)
            );
        }
    }

    #[test]
    fn blk_policy_shape() {
        let p = policy(WorkerKind::Blk, ThreadRole::Main);
        assert_eq!(p.default, Action::Trap);
        for forbidden in [
            "openat",
            "open",
            "execve",
            "socket",
            "connect",
            "clone",
            "clone3",
            "ptrace",
            "io_uring_setup",
            "io_uring_register",
        ] {
            assert_eq!(p.rules_for(forbidden).count(), 0, "{forbidden} must trap");
        }
        assert!(p.rules.iter().all(|r| !r.justification.is_empty()));
        let mmap = p.rules_for("mmap").next().unwrap();
        assert_eq!(mmap.conditions[0].op, Op::MaskedEq(libc::PROT_EXEC as u64));
        assert!(mmap.accepted_risk().is_some());
    }

    #[test]
    fn hash_is_stable_hex() {
        let h = bpf_hash(WorkerKind::Blk, ThreadRole::Main);
        assert_eq!(h.len(), 16);
        assert_eq!(h, bpf_hash(WorkerKind::Blk, ThreadRole::Main));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
