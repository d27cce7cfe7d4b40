//! Why entering the sandbox failed: shared by every step (a leaf, so the steps in the
//! child modules need nothing from their parent).

/// Errors while entering the sandbox. Any of them ends the worker before it serves.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot switch to host uid {uid} / gid {gid}")]
    SwitchIds {
        uid: u32,
        gid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the worker's namespaces (user, mount, pid, net, ipc, uts)")]
    Unshare(#[source] nix::Error),
    #[error("cannot write {path}")]
    IdMap {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fork into the new pid namespace")]
    Fork(#[source] nix::Error),
    #[error("the reaper ended before the worker could arm its death signal")]
    ReaperGone,
    #[error("cannot set up the empty root: {step}")]
    Root {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot drop capabilities ({set})")]
    Caps {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set {what}")]
    Prctl {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set rlimit {what} to {value}")]
    Rlimit {
        what: &'static str,
        value: u64,
        #[source]
        source: nix::Error,
    },
    #[error("cannot close descriptors {first}..={last}")]
    CloseFds {
        first: u32,
        last: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] policies::PolicyError),
    #[error("cannot enter learn mode")]
    Learn(#[source] policies::learn::LearnError),
}
