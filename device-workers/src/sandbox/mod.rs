//! Confining a worker before it reads its first descriptor, in DESIGN.md's order:
//! unprivileged host uid/gid -> user, mount, pid, net, ipc, uts namespaces -> pivot_root
//! into an empty read-only tmpfs -> fork (the child is pid 1 of the new pid namespace; the
//! parent stays behind as a reaper, in the same empty root) -> every capability set emptied ->
//! no_new_privs -> rlimits -> every fd not on the allow list closed -> seccomp (last).
//!
//! Why switch the uid first: a root process that unshares its user namespace can only map
//! itself to host uid 0. Switching to an unprivileged uid first and then unsharing makes
//! the worker uid 0 inside its namespace (with capabilities there, enough for
//! pivot_root) and an unprivileged uid on the host; it then drops those capabilities too.

pub mod crash;
mod error;
mod fs;
pub mod seccomp;

pub use error::SandboxError;

use std::os::fd::RawFd;

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Gid, Pid, Uid};

/// Host uid/gid a worker runs as when started by root and nothing else is configured
/// (nobody/nogroup).
pub const DEFAULT_UID: u32 = 65534;
pub const DEFAULT_GID: u32 = 65534;

/// What to confine the worker to.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Host uid/gid to switch to (used only when started as root).
    pub uid: u32,
    pub gid: u32,
    /// Descriptors the worker keeps (stderr is always kept); all others are closed.
    pub keep_fds: Vec<RawFd>,
    /// RLIMIT_NOFILE: room for what vhost-user will still send (memory regions, kick,
    /// call and error eventfds per queue).
    pub max_fds: u64,
    /// RLIMIT_FSIZE: no write may extend a file beyond the disk's size.
    pub max_file_size: u64,
    /// RLIMIT_NPROC: 1 (the worker never forks, and seccomp traps clone), or room for
    /// the io-wq threads of an io_uring.
    pub max_procs: u64,
}

/// RLIMIT_NPROC of a worker with an io_uring: the reaper, the worker and its ring's
/// bounded io-wq threads (bound and unbound), with room to spare. The kernel creates those
/// threads; the worker itself still cannot (clone and clone3 trap).
pub const NPROC_WITH_IO_URING: u64 = 2 + 2 * crate::blk::uring_backend::MAX_IOWQ_WORKERS as u64 + 4;

/// Which side of the fork the caller is on.
#[derive(Debug)]
pub enum Side {
    /// The parent: waits for `worker` and reports how it ended, holding `alive` open until
    /// it ends.
    Reaper {
        worker: Pid,
        alive: std::os::fd::OwnedFd,
    },
    /// The confined worker (pid 1 of its pid namespace).
    Worker,
}

/// Switches ids, unshares the namespaces, enters the empty root and forks. The worker side then calls
/// [`confine`]; the reaper side calls [`confine_reaper`] and waits.
pub fn enter_namespaces(cfg: &SandboxConfig) -> Result<Side, SandboxError> {
    let (uid, gid) = if Uid::effective().is_root() {
        switch_ids(cfg.uid, cfg.gid)?;
        (cfg.uid, cfg.gid)
    } else {
        // A non-root user keeps its own ids: already unprivileged.
        (Uid::effective().as_raw(), Gid::effective().as_raw())
    };
    nix::sched::unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(SandboxError::Unshare)?;
    // Switching uid made the process non-dumpable, which makes its /proc files root's:
    // dumpable just long enough to write its own id maps, then not again (no ptrace by
    // other processes of the same uid, no core dumps).
    set_dumpable(true)?;
    write_id_maps(uid, gid)?;
    set_dumpable(false)?;
    // Before the fork, so the reaper ends up in the empty root as well (pivot_root would
    // move it there anyway; the chroot an initramfs host needs instead would not).
    fs::pivot_to_empty_root()?;
    // The reaper holds the write end for as long as it lives: the worker sees it gone
    // (POLLHUP) if the reaper died before the death signal below was armed.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SandboxError::Fork)?;
    // SAFETY: the worker is single-threaded here (no thread has been started: the
    // logger writes synchronously), so the child inherits a consistent address space.
    match unsafe { nix::unistd::fork() }.map_err(SandboxError::Fork)? {
        ForkResult::Parent { child } => {
            drop(alive_r);
            Ok(Side::Reaper {
                worker: child,
                alive: alive_w,
            })
        }
        ForkResult::Child => {
            drop(alive_w);
            // The reaper's death must end the worker: nobody else would wait for it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(
                |source| SandboxError::Prctl {
                    what: "PR_SET_PDEATHSIG",
                    source,
                },
            )?;
            // A reaper killed between the fork and the line above sent no death signal.
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&alive_r),
                nix::poll::PollFlags::POLLIN,
            )];
            let hung_up =
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0);
            if hung_up {
                return Err(SandboxError::ReaperGone);
            }
            drop(alive_r);
            Ok(Side::Worker)
        }
    }
}

/// Finishes confining the worker: no capabilities, no_new_privs, rlimits, only the
/// allowed fds. Seccomp comes last, from [`seccomp::install`].
pub fn confine(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    drop_capabilities()?;
    set_no_new_privs()?;
    set_rlimits(cfg)?;
    let mut keep = cfg.keep_fds.clone();
    keep.push(libc::STDERR_FILENO);
    close_all_except(&keep)
}

/// The reaper needs nothing but stderr, the status page mapping and `alive` (the write end
/// the worker checks its reaper by, held until the reaper ends): drop the rest.
pub fn confine_reaper(alive: &std::os::fd::OwnedFd) -> Result<(), SandboxError> {
    use std::os::fd::AsRawFd;
    drop_capabilities()?;
    set_no_new_privs()?;
    close_all_except(&[libc::STDERR_FILENO, alive.as_raw_fd()])
}

fn switch_ids(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let err = |source| SandboxError::SwitchIds { uid, gid, source };
    nix::unistd::setgroups(&[]).map_err(err)?;
    let gid_ = Gid::from_raw(gid);
    nix::unistd::setresgid(gid_, gid_, gid_).map_err(err)?;
    let uid_ = Uid::from_raw(uid);
    nix::unistd::setresuid(uid_, uid_, uid_).map_err(err)
}

fn set_dumpable(on: bool) -> Result<(), SandboxError> {
    nix::sys::prctl::set_dumpable(on).map_err(|source| SandboxError::Prctl {
        what: "PR_SET_DUMPABLE",
        source,
    })
}

fn write_id_maps(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let write = |path: &'static str, content: String| {
        std::fs::write(path, content).map_err(|source| SandboxError::IdMap { path, source })
    };
    // An unprivileged process may map only its own ids, and gid maps only once
    // setgroups is denied.
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))
}

fn drop_capabilities() -> Result<(), SandboxError> {
    use caps::CapSet;
    // Bounding first: dropping from it needs CAP_SETPCAP, which the next steps remove.
    for (set, name) in [
        (CapSet::Bounding, "bounding"),
        (CapSet::Ambient, "ambient"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        caps::clear(None, set).map_err(|source| SandboxError::Caps { set: name, source })?;
    }
    Ok(())
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(|source| SandboxError::Prctl {
        what: "PR_SET_NO_NEW_PRIVS",
        source,
    })
}

fn set_rlimits(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    use nix::sys::resource::{setrlimit, Resource};
    for (resource, what, value) in [
        (Resource::RLIMIT_NOFILE, "NOFILE", cfg.max_fds),
        // One process, no threads of its own: the worker never creates either.
        (Resource::RLIMIT_NPROC, "NPROC", cfg.max_procs),
        (Resource::RLIMIT_FSIZE, "FSIZE", cfg.max_file_size),
        (Resource::RLIMIT_CORE, "CORE", 0),
    ] {
        setrlimit(resource, value, value).map_err(|source| SandboxError::Rlimit {
            what,
            value,
            source,
        })?;
    }
    // A write past RLIMIT_FSIZE (a qcow2 image whose tables point past any sane end)
    // then fails with EFBIG, an I/O error for that request, rather than killing the
    // worker with SIGXFSZ and sending it through crash restarts.
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    Ok(())
}

/// Closes every descriptor but `keep`, without reading /proc (ranges between the kept
/// ones go with close_range).
fn close_all_except(keep: &[RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd >= 0)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for &fd in keep.iter().chain(std::iter::once(&u32::MAX)) {
        if fd > first {
            let last = fd - 1;
            // SAFETY: close_range takes plain integers; closing descriptors this process
            // owns; nothing in the process refers to them after this point (the caller
            // passed every descriptor it still uses in `keep`).
            let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
            if ret != 0 {
                return Err(SandboxError::CloseFds {
                    first,
                    last,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}
