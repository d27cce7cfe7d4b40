//! Seccomp policies per process (each worker kind, and the VMM) and thread role, as
//! reviewed data.
//!
//! Each `*.policy` file in this crate (format: `README.md`) is parsed and compiled to a BPF
//! program by `build.rs` with the same parser and compiler this crate exports (`format`,
//! `compile`); a policy error fails the build with `file:line:column: message`. At run time:
//! - [`install`] applies a policy's filter to the calling thread (a worker's, or a VMM
//!   thread's: [`PolicyId`]);
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
pub mod trap;

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

/// Threads of the VMM (`bulkhead run`), each confined by its own policy once it is set
/// up (`vmm.policy` for the main thread, `vmm-<role>.policy` for the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmmThread {
    /// The main thread once the VM runs: waits for the VM to stop, then ends the backends.
    Main,
    /// A vCPU thread: KVM_RUN and the exits it emulates.
    Vcpu,
    /// A disk's vhost-user frontend thread (and the deadline watchdogs it starts).
    Frontend,
    /// A disk's supervisor: starts (through the spawner), watches and replaces its workers.
    Supervisor,
    /// A watchdog that disconnects a vhost-user backend which does not answer in time.
    Deadline,
    /// A reader of a worker's output pipe, re-emitting its lines in the VMM's log.
    Output,
    /// The control API's listener and its request threads.
    Api,
    /// The serial console's input thread (stdin to the guest's UART).
    Serial,
    /// The thread that takes SIGINT, SIGTERM, SIGHUP and SIGUSR1.
    Signals,
}

impl VmmThread {
    /// All roles, in the order `bulkhead policy list` shows them.
    pub const ALL: [VmmThread; 9] = [
        VmmThread::Main,
        VmmThread::Vcpu,
        VmmThread::Frontend,
        VmmThread::Supervisor,
        VmmThread::Deadline,
        VmmThread::Output,
        VmmThread::Api,
        VmmThread::Serial,
        VmmThread::Signals,
    ];

    /// The name used in policy headers (`thread:`).
    pub fn name(self) -> &'static str {
        match self {
            VmmThread::Main => "main",
            VmmThread::Vcpu => "vcpu",
            VmmThread::Frontend => "frontend",
            VmmThread::Supervisor => "supervisor",
            VmmThread::Deadline => "deadline",
            VmmThread::Output => "output",
            VmmThread::Api => "api",
            VmmThread::Serial => "serial",
            VmmThread::Signals => "signals",
        }
    }
}

impl fmt::Display for VmmThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One embedded policy: a worker's thread role, or a VMM thread's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyId {
    /// A sandboxed worker process's thread.
    Worker(WorkerKind, ThreadRole),
    /// A thread of the VMM process.
    Vmm(VmmThread),
}

impl PolicyId {
    /// The blk worker's policy (its only thread).
    pub const BLK: PolicyId = PolicyId::Worker(WorkerKind::Blk, ThreadRole::Main);

    /// Every embedded policy: the workers' first, then the VMM's threads.
    pub fn all() -> impl Iterator<Item = PolicyId> {
        WorkerKind::ALL
            .into_iter()
            .map(|k| PolicyId::Worker(k, ThreadRole::Main))
            .chain(VmmThread::ALL.into_iter().map(PolicyId::Vmm))
    }

    /// The `process:` header: a worker kind or `vmm`.
    pub fn process(self) -> &'static str {
        match self {
            PolicyId::Worker(kind, _) => kind.name(),
            PolicyId::Vmm(_) => "vmm",
        }
    }

    /// The `thread:` header.
    pub fn thread(self) -> &'static str {
        match self {
            PolicyId::Worker(_, role) => role.name(),
            PolicyId::Vmm(role) => role.name(),
        }
    }

    /// The id of `process`/`thread` (e.g. `vmm`, `vcpu`), if such a policy is embedded.
    pub fn find(process: &str, thread: &str) -> Option<PolicyId> {
        PolicyId::all().find(|id| id.process() == process && id.thread() == thread)
    }

    /// Parses `blk`, `vmm` (its main thread), `vmm/vcpu` or `blk/main`.
    pub fn parse(spec: &str) -> Option<PolicyId> {
        let (process, thread) = spec.split_once('/').unwrap_or((spec, "main"));
        PolicyId::find(process, thread)
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.process(), self.thread())
    }
}

/// Errors of the run-time API.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter {id}")]
    Install {
        /// Which policy.
        id: PolicyId,
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

macro_rules! embed {
    ($file:literal, $bpf:literal) => {
        Embedded {
            file: concat!("policies/", $file),
            source: include_str!(concat!("../", $file)),
            bytes: include_bytes!(concat!(env!("OUT_DIR"), "/", $bpf)),
            policy: OnceLock::new(),
            program: OnceLock::new(),
        }
    };
}

static BLK_MAIN: Embedded = embed!("blk.policy", "blk_main.bpf");
static VMM_MAIN: Embedded = embed!("vmm.policy", "vmm_main.bpf");
static VMM_VCPU: Embedded = embed!("vmm-vcpu.policy", "vmm_vcpu.bpf");
static VMM_FRONTEND: Embedded = embed!("vmm-frontend.policy", "vmm_frontend.bpf");
static VMM_SUPERVISOR: Embedded = embed!("vmm-supervisor.policy", "vmm_supervisor.bpf");
static VMM_DEADLINE: Embedded = embed!("vmm-deadline.policy", "vmm_deadline.bpf");
static VMM_OUTPUT: Embedded = embed!("vmm-output.policy", "vmm_output.bpf");
static VMM_API: Embedded = embed!("vmm-api.policy", "vmm_api.bpf");
static VMM_SERIAL: Embedded = embed!("vmm-serial.policy", "vmm_serial.bpf");
static VMM_SIGNALS: Embedded = embed!("vmm-signals.policy", "vmm_signals.bpf");

fn embedded(id: PolicyId) -> &'static Embedded {
    match id {
        PolicyId::Worker(WorkerKind::Blk, ThreadRole::Main) => &BLK_MAIN,
        PolicyId::Vmm(VmmThread::Main) => &VMM_MAIN,
        PolicyId::Vmm(VmmThread::Vcpu) => &VMM_VCPU,
        PolicyId::Vmm(VmmThread::Frontend) => &VMM_FRONTEND,
        PolicyId::Vmm(VmmThread::Supervisor) => &VMM_SUPERVISOR,
        PolicyId::Vmm(VmmThread::Deadline) => &VMM_DEADLINE,
        PolicyId::Vmm(VmmThread::Output) => &VMM_OUTPUT,
        PolicyId::Vmm(VmmThread::Api) => &VMM_API,
        PolicyId::Vmm(VmmThread::Serial) => &VMM_SERIAL,
        PolicyId::Vmm(VmmThread::Signals) => &VMM_SIGNALS,
    }
}

/// The parsed policy `id` (rules with conditions, actions, reasons, flags).
pub fn policy(id: PolicyId) -> &'static Policy {
    let e = embedded(id);
    e.policy.get_or_init(|| {
        // The build script parsed this very text with this very parser and failed the build
        // on any error, so parsing cannot fail here.
        format::parse(e.file, e.source).expect("policy was validated by build.rs")
    })
}

/// The BPF program of `id`, as compiled at build time.
pub fn bpf(id: PolicyId) -> &'static [sock_filter] {
    let e = embedded(id);
    e.program.get_or_init(|| {
        // build.rs wrote whole 8-byte instructions.
        compile::from_bytes(e.bytes).expect("build.rs wrote whole instructions")
    })
}

/// The raw program bytes of `id` (8 bytes per instruction, little-endian).
pub fn bpf_bytes(id: PolicyId) -> &'static [u8] {
    embedded(id).bytes
}

/// A fingerprint of the compiled program: FNV-1a 64 of [`bpf_bytes`], 16 hex digits. It
/// identifies a filter in logs and sandbox reports; it is not a cryptographic hash.
pub fn bpf_hash(id: PolicyId) -> String {
    format!("{:016x}", fnv1a64(bpf_bytes(id)))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Apply the filter `id` to the calling thread (after setting no_new_privs).
///
/// Per thread, without `SECCOMP_FILTER_FLAG_TSYNC`: policies are per thread role, so each
/// thread installs its role's filter itself, and threads it creates afterwards inherit it
/// (a filter they install then stacks on it: both must allow a call). The blk worker is
/// single-threaded and installs its filter as the last sandbox step; each VMM thread
/// installs its own once it is set up. Irreversible.
pub fn install(id: PolicyId) -> Result<(), PolicyError> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(PolicyError::UnsupportedArch(std::env::consts::ARCH));
    }
    install_program(id, bpf(id))
}

/// Apply `program`, a variant of `id`'s filter (the VMM's learn mode puts a rule in front),
/// to the calling thread (after setting no_new_privs).
pub fn install_program(id: PolicyId, program: &[sock_filter]) -> Result<(), PolicyError> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(PolicyError::UnsupportedArch(std::env::consts::ARCH));
    }
    seccompiler::apply_filter(program).map_err(|source| PolicyError::Install { id, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_program_matches_source() {
        for id in PolicyId::all() {
            let p = policy(id);
            assert_eq!(p.process, id.process(), "{id}");
            assert_eq!(p.thread, id.thread(), "{id}");
            let program = compile::compile(p).unwrap();
            assert_eq!(bpf(id), program.as_slice(), "{id}");
            assert_eq!(bpf_bytes(id), compile::to_bytes(&program), "{id}");
        }
    }

    #[test]
    fn blk_policy_shape() {
        let p = policy(PolicyId::BLK);
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
        let h = bpf_hash(PolicyId::BLK);
        assert_eq!(h.len(), 16);
        assert_eq!(h, bpf_hash(PolicyId::BLK));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
