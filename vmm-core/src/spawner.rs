//! Who forks and execs a worker. A thread that forks needs a seccomp filter that allows
//! fork and exec, and the worker would inherit that filter; so `bulkhead run` starts a
//! small helper first of all, the spawner (`bulkhead spawner`, exec'd from
//! `/proc/self/exe` before the VMM has a thread, guest memory or an image open), and asks
//! it to start each worker over a SOCK_SEQPACKET socket, passing the worker's descriptors.
//! No VMM thread then needs fork or exec.
//!
//! The spawner builds the worker's command line itself (the fixed `spawned --vhost-fd 3
//! ...` shape, the worker executable it was started with, an environment of
//! [`WORKER_ENV`] only), so a VMM thread that is not what it should be can have workers
//! started, and no other program. For each worker it answers with a pidfd and the read end
//! of a pipe on which it writes the worker's wait status once it reaps it; it ends when the
//! VMM's end of the socket closes (the VMM exits, or [`finish`]es it), once it removed the
//! workers' cgroups. It is not killed with the VMM (no PR_SET_PDEATHSIG): that would leave
//! the cgroups behind, and the socket's end already tells it the VMM is gone.
//!
//! A library user of vmm-core that starts no spawner (`bulkhead-bench restart`, tests) has
//! its workers started directly by the calling thread, the same way.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};

use ipc::channel::{Channel, ChannelError};

use crate::cgroup::{VmCgroup, WorkerLeaf};
use crate::sandbox_report::SandboxFacts;
use ipc::messages::{Validate, ValidationError};
use serde::{Deserialize, Serialize};

/// The environment variables a worker gets (when the VMM has them): its log filter, and
/// the fault hook that test builds of the worker read (release workers ignore it).
pub const WORKER_ENV: [&str; 2] = ["BULKHEAD_LOG", "BULKHEAD_WORKER_FAULT_HOOK"];

/// Where the inherited descriptors land in the worker.
const VHOST_FD: RawFd = 3;
const CONTROL_FD: RawFd = 4;
const DISK_FD: RawFd = 5;
const STATUS_FD: RawFd = 6;
/// Learn mode only: the socket the worker hands its seccomp listener over.
const LEARN_FD: RawFd = 7;

/// Where the spawner finds its socket.
const SPAWNER_SOCKET_FD: RawFd = 3;
/// Where the spawner finds the VMM's log file, when the log goes to one.
const SPAWNER_LOG_FD: RawFd = 4;

/// Longest disk id a request may carry (the worker's own limit is lower).
const MAX_ID_LEN: usize = 64;

/// Bounds of a worker's RLIMIT_AS a request may ask for: at least 16 MiB (below that the
/// worker cannot even load), at most 16 TiB (twice the largest guest RAM anyone runs, and a
/// limit: a request for "unlimited" would switch it off).
const MIN_ADDRESS_SPACE: u64 = 16 << 20;
const MAX_ADDRESS_SPACE: u64 = 1 << 44;

/// Most workers one spawner keeps running at once (all disks' workers, spares included).
const MAX_RUNNING: usize = 256;

/// How long the VMM waits for the spawner's answer (a fork and exec, or a few /proc reads).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Errors of starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start the spawner process")]
    StartSpawner(#[source] std::io::Error),
    #[error("the spawner process is already running")]
    AlreadyStarted,
    #[error("cannot talk to the spawner process")]
    Channel(#[from] ChannelError),
    #[error("the spawner answered {fds} descriptors where a pidfd and an exit pipe were expected")]
    BadReply { fds: usize },
    #[error("no spawner process runs, and a confined VMM thread cannot fork")]
    NoSpawner,
    #[error("the spawner could not start the worker: {0}")]
    Refused(String),
    #[error("cannot start the worker")]
    Exec(#[source] std::io::Error),
    #[error("the spawner cannot wait for its socket and workers")]
    Poll(#[source] std::io::Error),
}

/// A request to start a worker for disk `id`; the descriptors travel beside it, in the
/// order of [`WorkerFds`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SpawnRequest {
    /// Echoed in the reply, which must answer this request and no other.
    seq: u64,
    id: String,
    learn: bool,
    address_space: u64,
    /// The spawner connects to the disk's NBD server (the one it was told for `id` when
    /// it started; no descriptor for the disk comes with the request), and the export it
    /// finds must be this one.
    nbd: Option<ipc::nbd::Export>,
}

/// A disk an NBD server serves, as the spawner is told at its start: the only servers it
/// will ever connect to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnerNbd {
    pub id: String,
    /// `unix:PATH` or `HOST:PORT`.
    pub server: String,
    pub export: String,
}

impl Validate for SpawnRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        if !(MIN_ADDRESS_SPACE..=MAX_ADDRESS_SPACE).contains(&self.address_space) {
            return Err(ValidationError::OutOfRange {
                field: "address_space",
                value: self.address_space,
                min: MIN_ADDRESS_SPACE,
                max: MAX_ADDRESS_SPACE,
            });
        }
        if self.id.is_empty() {
            return Err(ValidationError::Empty { field: "id" });
        }
        if self.id.len() > MAX_ID_LEN {
            return Err(ValidationError::TooLong {
                field: "id",
                len: self.id.len(),
                max: MAX_ID_LEN,
            });
        }
        if let Some((offset, found)) = self
            .id
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            return Err(ValidationError::BadCharacter {
                field: "id",
                found,
                offset,
                allowed: "[A-Za-z0-9_-]",
            });
        }
        Ok(())
    }
}

/// What the VMM asks the spawner.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SpawnerRequest {
    /// Start a worker.
    Start(SpawnRequest),
    /// A pidfd on, an open /proc/PID/stat of, and the sandbox facts of `pid`, which the
    /// status page of the worker whose reaper is `reaper` (a child of the spawner's) names,
    /// if `pid` really is that reaper's living child.
    Inspect { seq: u64, reaper: u32, pid: u32 },
}

impl Validate for SpawnerRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            SpawnerRequest::Start(r) => r.validate(),
            SpawnerRequest::Inspect { .. } => Ok(()),
        }
    }
}

/// The spawner's answer. A pidfd and the exit pipe's read end travel beside `Started`; a
/// pidfd and the /proc/PID/stat descriptor beside `Inspected`.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SpawnReply {
    Started {
        seq: u64,
        pid: u32,
    },
    Inspected {
        seq: u64,
        facts: Option<SandboxFacts>,
    },
    Failed {
        seq: u64,
        error: String,
    },
}

impl SpawnReply {
    fn seq(&self) -> u64 {
        match self {
            SpawnReply::Started { seq, .. }
            | SpawnReply::Inspected { seq, .. }
            | SpawnReply::Failed { seq, .. } => *seq,
        }
    }
}

impl Validate for SpawnReply {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            SpawnReply::Inspected {
                facts: Some(facts), ..
            } if !facts.is_plausible() => Err(ValidationError::TooLong {
                field: "facts",
                len: 0,
                max: 32,
            }),
            SpawnReply::Failed { error, .. } if error.len() > 1024 => {
                Err(ValidationError::TooLong {
                    field: "error",
                    len: error.len(),
                    max: 1024,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The descriptors a worker starts with.
#[derive(Debug)]
pub struct WorkerFds<'a> {
    pub vhost: BorrowedFd<'a>,
    pub control: BorrowedFd<'a>,
    /// None: the spawner connects to the disk's NBD server for it.
    pub disk: Option<BorrowedFd<'a>>,
    pub status: BorrowedFd<'a>,
    /// The write end of its output pipe (its stdout and stderr).
    pub output: BorrowedFd<'a>,
    /// Learn mode: the socket it hands its seccomp listener over.
    pub learn: Option<BorrowedFd<'a>>,
}

impl WorkerFds<'_> {
    fn list(&self) -> Vec<BorrowedFd<'_>> {
        let mut v = vec![self.vhost, self.control];
        v.extend(self.disk);
        v.extend([self.status, self.output]);
        v.extend(self.learn);
        v
    }
}

/// A started worker process (the worker's reaper, which the executable becomes).
#[derive(Debug)]
pub struct WorkerProcess {
    pid: u32,
    how: Started,
}

#[derive(Debug)]
enum Started {
    /// Forked by this process: it reaps it.
    Direct(Child),
    /// Forked by the spawner, which reaps it and writes its wait status to `exit`.
    Spawned {
        pidfd: OwnedFd,
        exit: OwnedFd,
        status: Option<ExitStatus>,
    },
}

impl WorkerProcess {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// A pidfd on it: the one the spawner opened while the process was surely its
    /// unreaped child (a pid alone may be reused once reaped), or one opened on this
    /// process's own child.
    pub fn pidfd(&self) -> std::io::Result<OwnedFd> {
        match &self.how {
            Started::Direct(child) => crate::pids::pidfd_open(child.id()),
            Started::Spawned { pidfd, .. } => pidfd.try_clone(),
        }
    }

    /// Whether its pid still names it: always for this process's own unreaped child; for
    /// the spawner's, only while the process has not ended (the spawner reaps it at once,
    /// and the pid is free for reuse from then on).
    pub fn pid_still_names_it(&self) -> bool {
        match &self.how {
            Started::Direct(_) => true,
            Started::Spawned { pidfd, .. } => {
                !crate::pids::wait_exit(pidfd, std::time::Duration::ZERO)
            }
        }
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) -> std::io::Result<()> {
        match &mut self.how {
            Started::Direct(child) => child.kill(),
            Started::Spawned {
                status: Some(_), ..
            } => Ok(()),
            Started::Spawned { pidfd, .. } => {
                // False only when it is already gone, which is what was asked.
                crate::pids::kill(pidfd);
                Ok(())
            }
        }
    }

    /// Waits until it has ended and returns how.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match &mut self.how {
            Started::Direct(child) => child.wait(),
            Started::Spawned {
                status: Some(s), ..
            } => Ok(*s),
            Started::Spawned { exit, status, .. } => {
                let mut raw = [0u8; 4];
                File::from(exit.try_clone()?)
                    .read_exact(&mut raw)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("the spawner gave no exit status (it is gone): {e}"),
                        )
                    })?;
                let s = ExitStatus::from_raw(i32::from_ne_bytes(raw));
                *status = Some(s);
                Ok(s)
            }
        }
    }

    /// How it ended, if it has (and its status is known).
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match &mut self.how {
            Started::Direct(child) => child.try_wait(),
            Started::Spawned {
                status: Some(s), ..
            } => Ok(Some(*s)),
            Started::Spawned { exit, .. } => {
                // POLLIN: the status arrived (or the spawner is gone, which wait reports).
                if crate::pids::wait_exit(exit, std::time::Duration::ZERO) {
                    self.wait().map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// The VMM's end of the spawner's socket, once started, and the last request number.
static SPAWNER: OnceLock<Mutex<(Channel, u64)>> = OnceLock::new();

/// Whether a spawner runs (it then starts every worker, and connects NBD disks' workers).
pub fn running() -> bool {
    SPAWNER.get().is_some()
}

/// The spawner's pidfd, for [`finish`].
static SPAWNER_PIDFD: OnceLock<OwnedFd> = OnceLock::new();

/// How long [`finish`] waits for the spawner (which itself waits at most 5 s for the
/// workers' cgroups to empty).
const FINISH_TIMEOUT_MS: u16 = 6000;

/// Starts the spawner process for workers run from `worker_bin` (in learn mode with
/// `learn`: only then may a request ask for it). Call it before the process has any thread
/// (it must not be a copy of a multithreaded process's state).
/// With `cgroup`, it starts each worker in a leaf there (see [`crate::cgroup`]); a leaf it
/// cannot make refuses the worker only if the cgroups are `required`.
pub fn start(
    worker_bin: &Path,
    learn: bool,
    cgroup: Option<&VmCgroup>,
    required: bool,
    log: &crate::logging::LogConfig,
    api_socket: Option<(&Path, (u64, u64))>,
    nbd: &[SpawnerNbd],
) -> Result<(), SpawnError> {
    if SPAWNER.get().is_some() {
        return Err(SpawnError::AlreadyStarted);
    }
    let (ours, theirs) = Channel::pair()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("spawner")
        .arg("--socket-fd")
        .arg(SPAWNER_SOCKET_FD.to_string())
        .arg("--worker-bin")
        .arg(worker_bin)
        .stdin(Stdio::null())
        .env_clear();
    if learn {
        cmd.arg("--learn");
    }
    if !nbd.is_empty() {
        // Fixed here, once: no request can name another server.
        let list = serde_json::to_string(nbd)
            .map_err(|e| SpawnError::StartSpawner(std::io::Error::other(e)))?;
        cmd.arg("--nbd-disks").arg(list);
    }
    // Its lines go where the VMM's do, as they look (its level comes with BULKHEAD_LOG):
    // into the very file the VMM opened, handed over (a path could lead elsewhere by now).
    cmd.arg("--log-format").arg(log.format.name());
    // Copies above every target number: the dup2s below never clobber a source.
    let log_copy = crate::logging::log_file()
        .map(|f| dup_high(f.as_fd()))
        .transpose()
        .map_err(SpawnError::StartSpawner)?;
    let log_fd = log_copy.as_ref().map(|f| f.as_raw_fd());
    if log_fd.is_some() {
        cmd.arg("--log-fd").arg(SPAWNER_LOG_FD.to_string());
    }
    if let Some((path, (dev, ino))) = api_socket {
        // The VMM's threads may not unlink a path: the spawner removes the API socket
        // once the VMM is gone, if it is still the one the VMM bound.
        cmd.arg("--api-socket")
            .arg(path)
            .arg("--api-socket-id")
            .arg(format!("{dev}:{ino}"));
    }
    if let Some(cgroup) = cgroup {
        // Fixed here, once: no request can raise a worker's limits.
        cmd.arg("--cgroup-dir")
            .arg(cgroup.dir())
            .arg("--worker-memory-max")
            .arg(cgroup.worker_memory_max().to_string());
        if required {
            cmd.arg("--cgroup-required");
        }
    }
    for name in WORKER_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let theirs_high = dup_high(theirs.as_fd()).map_err(SpawnError::StartSpawner)?;
    let theirs_fd = theirs_high.as_raw_fd();
    // SAFETY: runs between fork and exec in the child: dup2 is async-signal-safe and
    // touches only the child's descriptors (its copies clear close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_fd, SPAWNER_SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = log_fd {
                if libc::dup2(fd, SPAWNER_LOG_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(SpawnError::StartSpawner)?;
    drop((theirs, theirs_high, log_copy));
    tracing::debug!("spawner process started as pid {}", child.id());
    if let Ok(fd) = crate::pids::pidfd_open(child.id()) {
        let _ = SPAWNER_PIDFD.set(fd);
    }
    // Its end is reaped by nobody on purpose: it lives as long as the VMM.
    std::mem::forget(child);
    SPAWNER
        .set(Mutex::new((ours, 0)))
        .map_err(|_| SpawnError::AlreadyStarted)
}

/// Starts the worker for disk `id` from `bin` with `fds`, its address space limited to
/// `address_space` bytes (RLIMIT_AS, set before exec: an unprivileged worker cannot raise
/// it). Through the spawner when one runs (in the VM's cgroups where it has them), else
/// from the calling thread (no cgroup then).
pub fn start_worker(
    bin: &Path,
    id: &str,
    learn: bool,
    address_space: u64,
    fds: &WorkerFds<'_>,
    nbd: Option<ipc::nbd::Export>,
) -> Result<WorkerProcess, SpawnError> {
    let Some(spawner) = SPAWNER.get() else {
        if crate::confine::enabled() {
            return Err(SpawnError::NoSpawner);
        }
        let child = exec_worker(bin, id, address_space, None, fds).map_err(SpawnError::Exec)?;
        return Ok(WorkerProcess {
            pid: child.id(),
            how: Started::Direct(child),
        });
    };
    let request = SpawnerRequest::Start(SpawnRequest {
        seq: 0,
        id: id.to_string(),
        learn,
        address_space,
        nbd,
    });
    let (reply, mut got) = ask(spawner, request, &fds.list())?;
    match reply {
        SpawnReply::Started { pid, .. } if got.len() == 2 => {
            let exit = got.pop().expect("two descriptors");
            let pidfd = got.pop().expect("two descriptors");
            Ok(WorkerProcess {
                pid,
                how: Started::Spawned {
                    pidfd,
                    exit,
                    status: None,
                },
            })
        }
        SpawnReply::Started { .. } | SpawnReply::Inspected { .. } => {
            Err(SpawnError::BadReply { fds: got.len() })
        }
        SpawnReply::Failed { error, .. } => Err(SpawnError::Refused(error)),
    }
}

/// Ends the spawner as the VM ends (its workers ended first): closes its socket and waits
/// (a few seconds at most) until it has removed the workers' cgroups and exited, so nothing
/// of this VM is left behind when bulkhead exits. Without a spawner, nothing to do.
pub fn finish() {
    let Some(spawner) = SPAWNER.get() else {
        return;
    };
    let guard = spawner.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) =
        nix::sys::socket::shutdown(guard.0.as_raw_fd(), nix::sys::socket::Shutdown::Both)
    {
        tracing::warn!("cannot end the spawner: {e}");
        return;
    }
    if let Some(pidfd) = SPAWNER_PIDFD.get() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        if let Ok(0) = poll(&mut fds, PollTimeout::from(FINISH_TIMEOUT_MS)) {
            tracing::warn!("the spawner did not end within {FINISH_TIMEOUT_MS} ms");
        }
    }
}

/// Sends `request` (numbered here) with `fds` and returns the spawner's answer to it. One
/// request in flight at a time; an answer to anything else (a datagram some other thread
/// wrote to the spawner) is skipped.
fn ask(
    spawner: &Mutex<(Channel, u64)>,
    mut request: SpawnerRequest,
    fds: &[BorrowedFd<'_>],
) -> Result<(SpawnReply, Vec<OwnedFd>), SpawnError> {
    let mut guard = spawner.lock().unwrap_or_else(|p| p.into_inner());
    guard.1 += 1;
    let seq = guard.1;
    match &mut request {
        SpawnerRequest::Start(r) => r.seq = seq,
        SpawnerRequest::Inspect { seq: s, .. } => *s = seq,
    }
    guard.0.send(&request, fds)?;
    loop {
        // Bounded: a spawner that answers something else forever (or nothing) fails the
        // request instead of holding every other supervisor's requests behind this lock.
        let (reply, got) = guard.0.recv_timeout::<SpawnReply>(ANSWER_TIMEOUT)?;
        if reply.seq() == seq {
            return Ok((reply, got));
        }
        tracing::warn!("skipped a spawner answer to another request ({reply:?})");
    }
}

/// A worker's confined process, as the spawner (or, without one, this process) found it.
#[derive(Debug)]
pub struct Inspected {
    /// A pidfd on it, opened while it was the reaper's living child.
    pub pidfd: OwnedFd,
    /// Its /proc/PID/stat, open (see [`crate::pids::stat_state`]).
    pub stat: File,
    /// Its sandbox facts, if /proc could be read.
    pub facts: Option<SandboxFacts>,
}

/// The confined process `pid` of the worker whose reaper is `reaper`, if `pid` is that
/// reaper's living child (a pid read from a status page is the worker's word). Through
/// the spawner when one runs: a confined VMM thread opens neither /proc nor pidfds itself.
pub fn inspect(reaper: &WorkerProcess, pid: u32) -> Option<Inspected> {
    let Some(spawner) = SPAWNER.get() else {
        return inspect_here(reaper.id(), pid);
    };
    let request = SpawnerRequest::Inspect {
        seq: 0,
        reaper: reaper.id(),
        pid,
    };
    let (reply, mut got) = match ask(spawner, request, &[]) {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!("cannot ask the spawner about pid {pid}: {e}");
            return None;
        }
    };
    let found = match reply {
        SpawnReply::Inspected { facts, .. } if got.len() == 2 => {
            let stat = File::from(got.pop().expect("two descriptors"));
            let pidfd = got.pop().expect("two descriptors");
            Inspected { pidfd, stat, facts }
        }
        SpawnReply::Failed { error, .. } => {
            tracing::debug!("spawner: {error}");
            return None;
        }
        other => {
            tracing::warn!("the spawner answered {other:?} to an inspection");
            return None;
        }
    };
    // The spawner knew the reaper by its pid: that must still be this reaper's (it is
    // reaped at once when it ends, and its pid is free for another worker from then on).
    reaper.pid_still_names_it().then_some(found)
}

/// [`inspect`] done by this process: `pid` must be `reaper`'s living child.
fn inspect_here(reaper: u32, pid: u32) -> Option<Inspected> {
    let pidfd = crate::pids::child_pidfd(pid, reaper)?;
    let stat = File::open(format!("/proc/{pid}/stat")).ok()?;
    let facts = SandboxFacts::read(pid);
    // Still alive after the reads: they spoke of this process, not of a successor to its pid.
    (!crate::pids::wait_exit(&pidfd, std::time::Duration::ZERO)).then_some(Inspected {
        pidfd,
        stat,
        facts,
    })
}

fn dup_high(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // Copies land above every target number, so the dup2s in the child never clobber a
    // source that is still needed.
    fd.try_clone_to_owned().and_then(|low| {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor we own.
        let new = unsafe { libc::fcntl(low.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
        if new < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `new` was just returned by fcntl and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    })
}

/// Forks and execs the worker: its descriptors at 3.. (learn socket at 7), stdout and
/// stderr the output pipe, stdin /dev/null, an environment of [`WORKER_ENV`] only, RLIMIT_AS
/// set before exec, and with `cgroup_procs` (an open `cgroup.procs`) moved into that cgroup
/// before exec.
fn exec_worker(
    bin: &Path,
    id: &str,
    address_space: u64,
    cgroup_procs: Option<RawFd>,
    fds: &WorkerFds<'_>,
) -> std::io::Result<Child> {
    let disk = fds
        .disk
        .ok_or_else(|| std::io::Error::other("no descriptor for the disk"))?;
    let mut sources = vec![
        dup_high(fds.vhost)?,
        dup_high(fds.control)?,
        dup_high(disk)?,
        dup_high(fds.status)?,
    ];
    if let Some(learn) = fds.learn {
        sources.push(dup_high(learn)?);
    }
    let pairs: Vec<(RawFd, RawFd)> = sources
        .iter()
        .map(|s| s.as_raw_fd())
        .zip([VHOST_FD, CONTROL_FD, DISK_FD, STATUS_FD, LEARN_FD])
        .collect();
    let output = fds.output.try_clone_to_owned()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "spawned",
        "--vhost-fd",
        &VHOST_FD.to_string(),
        "--control-fd",
        &CONTROL_FD.to_string(),
        "--disk-fd",
        &DISK_FD.to_string(),
        "--status-fd",
        &STATUS_FD.to_string(),
        "--id",
        id,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::from(output.try_clone()?))
    .stderr(Stdio::from(output))
    // Nothing of the VMM's environment (its secrets, its locale, its PATH) reaches a
    // worker: only what a worker reads, named in WORKER_ENV.
    .env_clear();
    for name in WORKER_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    if fds.learn.is_some() {
        cmd.args(["--learn-fd", &LEARN_FD.to_string()]);
    }
    let limit = libc::rlimit64 {
        rlim_cur: address_space,
        rlim_max: address_space,
    };
    // SAFETY: runs between fork and exec in the child; dup2, write and setrlimit64 are
    // async-signal-safe and touch only the child; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writer: the worker's first instruction runs in its cgroup.
            if let Some(procs) = cgroup_procs {
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &(src, dst) in &pairs {
                if libc::dup2(src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Before the worker reads its configuration (and forks its confined process,
            // which inherits the limit): an unprivileged process cannot raise it again.
            if libc::setrlimit64(libc::RLIMIT_AS, &limit) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The spawner ignores these; a worker starts with the default actions.
            for sig in IGNORED_SIGNALS {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(sources);
    child
}

/// A disk's NBD server, as the spawner connects to it.
struct NbdTarget {
    id: String,
    source: Result<crate::disk::config::NbdSource, String>,
    address: Result<crate::disk::nbd::Address, String>,
}

impl NbdTarget {
    /// A new connection for disk `id`'s worker, whose export must be `expected`.
    fn connect(
        targets: &[NbdTarget],
        id: &str,
        expected: &ipc::nbd::Export,
    ) -> Result<OwnedFd, String> {
        let target = targets.iter().find(|t| t.id == id).ok_or_else(|| {
            format!("disk {id} has no NBD server (none was named when bulkhead started)")
        })?;
        let source = target.source.as_ref().map_err(Clone::clone)?;
        let address = target.address.as_ref().map_err(Clone::clone)?;
        crate::disk::nbd::connect_to(source, address, expected).map_err(|e| crate::error_chain(&e))
    }
}

/// A worker the spawner started and has not reaped yet.
struct Running {
    child: Child,
    pidfd: OwnedFd,
    exit: OwnedFd,
    /// Its leaf (`DISK.SLOT`), taken by the disk's next worker once it is reaped.
    leaf: Option<WorkerLeaf>,
    leaf_name: Option<String>,
}

/// The signals a terminal or a process-group kill sends that the spawner ignores: the VMM
/// takes them and ends the VM, which closes the spawner's socket and so ends it too (a
/// spawner gone first would leave the VMM blind to how its workers end). Workers get the
/// default actions back before exec.
const IGNORED_SIGNALS: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
];

/// `bulkhead spawner`: serves start requests on the socket at `socket_fd` until the VMM
/// closes it, starting `worker_bin` only (in learn mode only with `learn`).
/// Single-threaded: one poll over the socket and the pidfd of every worker it started, so
/// a worker is reaped (and its status passed on) the moment it ends. A request it cannot
/// take is answered with a refusal, never by ending the spawner.
/// With `cgroup`, each worker starts in a leaf of its own there, and the spawner removes
/// the leaves and that directory once the VMM is gone.
pub fn serve(
    socket_fd: RawFd,
    worker_bin: PathBuf,
    learn: bool,
    cgroup: Option<VmCgroup>,
    cgroup_required: bool,
    api_socket: Option<(PathBuf, (u64, u64))>,
    nbd: Vec<SpawnerNbd>,
) -> Result<(), SpawnError> {
    let mut cgroups = Cgroups {
        vm: cgroup,
        required: cgroup_required,
    };
    // Each disk's server, resolved now (one that cannot be is left out: its disk's
    // workers are refused with the reason).
    let servers: Vec<NbdTarget> =
        nbd.into_iter()
            .map(|d| {
                let source = crate::disk::config::NbdServer::parse(&d.server).map(|server| {
                    crate::disk::config::NbdSource {
                        server,
                        export: d.export,
                    }
                });
                let address = source.clone().map_err(|e| e.to_string()).and_then(|s| {
                    crate::disk::nbd::resolve(&s).map_err(|e| crate::error_chain(&e))
                });
                NbdTarget {
                    id: d.id,
                    source,
                    address,
                }
            })
            .collect();
    let mut running = Vec::new();
    let served = serve_requests(
        socket_fd,
        &worker_bin,
        learn,
        &servers,
        &mut cgroups,
        &mut running,
    );
    cgroups.finish(running);
    if let Some((path, identity)) = api_socket {
        remove_socket(&path, identity);
    }
    served
}

/// Removes the socket file at `path` if it is still the one with `identity` (device,
/// inode): never a file someone put there since.
fn remove_socket(path: &Path, identity: (u64, u64)) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && (m.dev(), m.ino()) == identity => {
            std::fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

/// The spawner's cgroups: the VM's directory, if it has one.
struct Cgroups {
    vm: Option<VmCgroup>,
    /// A worker whose leaf cannot be made is refused (else it starts without one).
    required: bool,
}

impl Cgroups {
    /// The leaf for a new worker of disk `id`: the first slot no running worker holds.
    fn leaf_for(
        &self,
        id: &str,
        running: &[Running],
    ) -> Result<(Option<WorkerLeaf>, Option<String>), String> {
        let Some(vm) = &self.vm else {
            return Ok((None, None));
        };
        let name = (0u32..)
            .map(|slot| format!("{id}.{slot}"))
            .find(|name| !running.iter().any(|r| r.leaf_name.as_ref() == Some(name)))
            .expect("fewer running workers than slots");
        match vm.leaf(&name) {
            Ok(leaf) => Ok((Some(leaf), Some(name))),
            Err(e) if self.required => Err(format!("{e:#}")),
            Err(e) => {
                tracing::warn!("worker of disk {id} starts without a cgroup of its own: {e}");
                Ok((None, None))
            }
        }
    }

    /// A worker was reaped: says so if the kernel's OOM killer ended it.
    fn reaped(leaf: Option<&WorkerLeaf>) {
        let Some(leaf) = leaf else { return };
        let kills = leaf.new_oom_kills();
        if kills > 0 {
            // The VMM sees a worker killed by SIGKILL; this says who killed it.
            tracing::warn!(
                "the worker in {} reached its cgroup's memory.max: the kernel's OOM killer ended {kills} of its processes",
                leaf.dir().display()
            );
        }
    }

    /// Once the VMM is gone: kills the workers still running (nobody can use them now, and
    /// none may outlive its VM), reaps them, and removes the VM's cgroups, within 5 s.
    fn finish(&mut self, mut running: Vec<Running>) {
        if !running.is_empty() {
            if let Some(vm) = &self.vm {
                vm.kill_all();
            }
            for r in &running {
                crate::pids::kill(&r.pidfd);
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            running.retain_mut(|r| match r.child.try_wait() {
                Ok(None) => true,
                Ok(Some(_)) | Err(_) => {
                    Self::reaped(r.leaf.as_ref());
                    false
                }
            });
            let removed = self.vm.as_ref().is_none_or(|vm| vm.remove());
            if running.is_empty() && removed {
                return;
            }
            if std::time::Instant::now() > deadline {
                if let Some(vm) = &self.vm {
                    tracing::warn!(
                        "cannot remove the workers' cgroup {}: a task still runs there",
                        vm.dir().display()
                    );
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn serve_requests(
    socket_fd: RawFd,
    worker_bin: &Path,
    learn: bool,
    nbd: &[NbdTarget],
    cgroups: &mut Cgroups,
    running: &mut Vec<Running>,
) -> Result<(), SpawnError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    for sig in IGNORED_SIGNALS {
        // SAFETY: SIG_IGN for a catchable signal; no handler runs.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // SAFETY: the VMM put the socket at `socket_fd` for this process alone.
    let socket = unsafe { OwnedFd::from_raw_fd(socket_fd) };
    let channel = Channel::from_fd(socket)?;
    loop {
        let mut polled = vec![PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
        polled.extend(
            running
                .iter()
                .map(|r| PollFd::new(r.pidfd.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut polled, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(SpawnError::Poll(e.into())),
        }
        let request = polled[0].any().unwrap_or(true);
        let ended: Vec<bool> = polled[1..]
            .iter()
            .map(|p| p.any().unwrap_or(true))
            .collect();
        drop(polled);
        let mut ended = ended.into_iter();
        running.retain_mut(|r| {
            if !ended.next().unwrap_or(false) {
                return true;
            }
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    let raw = status.into_raw().to_ne_bytes();
                    // The VMM may have dropped its end (a worker it gave up): nothing to do
                    // (SIGPIPE is ignored: Rust's runtime does that).
                    let _ = nix::unistd::write(&r.exit, &raw);
                    Cgroups::reaped(r.leaf.as_ref());
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            }
        });
        if !request {
            continue;
        }
        let (req, fds) = match channel.recv::<SpawnerRequest>() {
            Ok((SpawnerRequest::Start(req), fds)) => (req, fds),
            Ok((SpawnerRequest::Inspect { seq, reaper, pid }, _)) => {
                // Only a worker this spawner started and has not reaped: its pid is its own.
                let found = running
                    .iter()
                    .any(|r| r.child.id() == reaper)
                    .then(|| inspect_here(reaper, pid))
                    .flatten();
                match found {
                    Some(i) => channel.send(
                        &SpawnReply::Inspected {
                            seq,
                            facts: i.facts,
                        },
                        &[i.pidfd.as_fd(), i.stat.as_fd()],
                    )?,
                    None => channel.send(
                        &SpawnReply::Failed {
                            seq,
                            error: format!("pid {pid} is not the living child of worker {reaper}"),
                        },
                        &[],
                    )?,
                }
                continue;
            }
            // The VMM is gone: so is the spawner (its workers are the VMM's to end).
            Err(ChannelError::Eof) => return Ok(()),
            Err(e) => {
                // Not a request the VMM's spawner client makes: refuse it, serve on.
                let error = format!("a request that cannot be read: {e}");
                channel.send(&SpawnReply::Failed { seq: 0, error }, &[])?;
                continue;
            }
        };
        let reply = if running.len() >= MAX_RUNNING {
            Err(format!("{MAX_RUNNING} workers run already"))
        } else if req.learn && !learn {
            Err("learn mode was not asked for when bulkhead started".to_string())
        } else {
            // A disk an NBD server serves: its connection is made here, to its server.
            let connection = match &req.nbd {
                Some(expected) => NbdTarget::connect(nbd, &req.id, expected).map(Some),
                None => Ok(None),
            };
            connection.and_then(|conn| {
                cgroups.leaf_for(&req.id, running).and_then(|(leaf, name)| {
                    start_one(worker_bin, &req, &fds, conn.as_ref(), leaf, name)
                })
            })
        };
        match reply {
            Ok((run, exit_r)) => {
                let pid = run.child.id();
                let sent = channel.send(
                    &SpawnReply::Started { seq: req.seq, pid },
                    &[run.pidfd.as_fd(), exit_r.as_fd()],
                );
                running.push(run);
                sent?;
            }
            Err(error) => channel.send(
                &SpawnReply::Failed {
                    seq: req.seq,
                    error,
                },
                &[],
            )?,
        }
    }
}

fn start_one(
    worker_bin: &Path,
    req: &SpawnRequest,
    fds: &[OwnedFd],
    connection: Option<&OwnedFd>,
    mut leaf: Option<WorkerLeaf>,
    leaf_name: Option<String>,
) -> Result<(Running, OwnedFd), String> {
    // The disk's descriptor came with the request, unless this process connected it.
    let (vhost, control, disk, status, output, learn) = match (fds, connection) {
        ([a, b, c, d, e], None) if !req.learn => (a, b, c, d, e, None),
        ([a, b, c, d, e, f], None) if req.learn => (a, b, c, d, e, Some(f)),
        ([a, b, d, e], Some(c)) if !req.learn => (a, b, c, d, e, None),
        ([a, b, d, e, f], Some(c)) if req.learn => (a, b, c, d, e, Some(f)),
        _ => {
            return Err(format!(
                "{} descriptors for disk {} (learn {}, connected here {}): 5, or 6 in learn \
                 mode, one fewer when connected here, expected",
                fds.len(),
                req.id,
                req.learn,
                connection.is_some()
            ))
        }
    };
    let worker_fds = WorkerFds {
        vhost: vhost.as_fd(),
        control: control.as_fd(),
        disk: Some(disk.as_fd()),
        status: status.as_fd(),
        output: output.as_fd(),
        learn: learn.map(|f| f.as_fd()),
    };
    let procs = leaf.as_ref().and_then(|l| l.procs()).map(|f| f.as_raw_fd());
    let started = exec_worker(worker_bin, &req.id, req.address_space, procs, &worker_fds);
    if let Some(leaf) = &mut leaf {
        leaf.close_procs();
    }
    let mut child = started.map_err(|e| format!("cannot start {}: {e}", worker_bin.display()))?;
    let fail = |child: &mut Child, what: &str, e: std::io::Error| {
        let _ = child.kill();
        let _ = child.wait();
        format!("{what}: {e}")
    };
    let pidfd = match crate::pids::pidfd_open(child.id()) {
        Ok(fd) => fd,
        Err(e) => return Err(fail(&mut child, "pidfd_open", e)),
    };
    let (exit_r, exit_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return Err(fail(&mut child, "pipe2", e.into())),
    };
    Ok((
        Running {
            child,
            pidfd,
            exit: exit_w,
            leaf,
            leaf_name,
        },
        exit_r,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spawner serving on a thread of this test, starting `bin` for every request.
    fn spawner(bin: &str) -> (Channel, std::thread::JoinHandle<Result<(), SpawnError>>) {
        let (ours, theirs) = Channel::pair().unwrap();
        let fd = OwnedFd::from(theirs);
        let raw = fd.as_raw_fd();
        std::mem::forget(fd); // serve() takes ownership of the raw descriptor
        let bin = PathBuf::from(bin);
        (
            ours,
            std::thread::spawn(move || serve(raw, bin, false, None, false, None, Vec::new())),
        )
    }

    fn request(id: &str, learn: bool) -> SpawnRequest {
        SpawnRequest {
            seq: 7,
            id: id.to_string(),
            learn,
            address_space: 1 << 30,
            nbd: None,
        }
    }

    /// A request to connect a disk to an NBD server the spawner was not told of (a VMM
    /// thread that is not what it should be naming a disk of its choosing) is refused: it
    /// connects to the servers named at its start and nowhere else.
    #[test]
    fn the_spawner_connects_only_to_the_servers_it_was_told() {
        let (chan, server) = spawner("/bin/false");
        let null = File::open("/dev/null").unwrap();
        let fds = vec![null.as_fd(); 4];
        let mut req = request("blk0", false);
        req.nbd = Some(ipc::nbd::Export {
            size: 1 << 20,
            flags: ipc::nbd::TFLAG_HAS_FLAGS,
            max_payload: 1 << 20,
        });
        chan.send(&SpawnerRequest::Start(req), &fds).unwrap();
        let (reply, _) = chan.recv::<SpawnReply>().unwrap();
        match reply {
            SpawnReply::Failed { error, .. } => {
                assert!(error.contains("disk blk0 has no NBD server"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        drop(chan);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn the_spawner_starts_its_program_and_passes_on_how_it_ended() {
        // /bin/false stands in for the worker: it ignores its arguments and exits 1.
        let (chan, server) = spawner("/bin/false");
        let null = File::open("/dev/null").unwrap();
        let fds = vec![null.as_fd(); 5];
        chan.send(&SpawnerRequest::Start(request("blk0", false)), &fds)
            .unwrap();
        let (reply, got) = chan.recv::<SpawnReply>().unwrap();
        let SpawnReply::Started { seq: 7, pid } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(got.len(), 2);
        let mut got = got;
        let exit = got.pop().unwrap();
        let pidfd = got.pop().unwrap();
        let mut worker = WorkerProcess {
            pid,
            how: Started::Spawned {
                pidfd,
                exit,
                status: None,
            },
        };
        assert_eq!(worker.wait().unwrap().code(), Some(1));
        assert_eq!(worker.try_wait().unwrap().unwrap().code(), Some(1));
        // The VMM's end closing ends the spawner.
        drop(chan);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn the_spawner_refuses_requests_with_the_wrong_descriptors() {
        let (chan, server) = spawner("/bin/true");
        let null = File::open("/dev/null").unwrap();
        for (learn, count, why) in [
            (false, 4, "descriptors"),
            (false, 6, "descriptors"),
            (true, 5, "learn mode"),
            (true, 6, "learn mode"),
        ] {
            let fds = vec![null.as_fd(); count];
            chan.send(&SpawnerRequest::Start(request("blk0", learn)), &fds)
                .unwrap();
            let (reply, got) = chan.recv::<SpawnReply>().unwrap();
            assert!(
                matches!(&reply, SpawnReply::Failed { seq: 7, error } if error.contains(why)),
                "{count} fds, learn {learn}: {reply:?}"
            );
            assert!(got.is_empty());
        }
        // A datagram that is no request is refused, and the spawner serves on.
        nix::sys::socket::send(
            chan.as_raw_fd(),
            b"\xff\xff\xff",
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let (reply, _) = chan.recv::<SpawnReply>().unwrap();
        assert!(
            matches!(reply, SpawnReply::Failed { seq: 0, .. }),
            "{reply:?}"
        );
        chan.send(
            &SpawnerRequest::Start(request("blk0", false)),
            &[null.as_fd(); 3],
        )
        .unwrap();
        let (reply, _) = chan.recv::<SpawnReply>().unwrap();
        assert!(
            matches!(reply, SpawnReply::Failed { seq: 7, .. }),
            "{reply:?}"
        );
        drop(chan);
        server.join().unwrap().unwrap();
    }

    /// Inspects `pid` as the child of `reaper` through `chan`.
    fn ask_inspect(chan: &Channel, reaper: u32, pid: u32) -> (SpawnReply, Vec<OwnedFd>) {
        let request = SpawnerRequest::Inspect {
            seq: 5,
            reaper,
            pid,
        };
        chan.send(&request, &[]).unwrap();
        chan.recv::<SpawnReply>().unwrap()
    }

    #[test]
    fn the_spawner_inspects_the_child_of_a_worker_it_started() {
        // A "worker" that ignores its arguments and starts one child, as a reaper does.
        let dir = std::env::temp_dir().join(format!("spawner-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("reaper.sh");
        std::fs::write(&script, "#!/bin/sh\nsleep 30 &\nwait\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (chan, server) = spawner(script.to_str().unwrap());
        let null = File::open("/dev/null").unwrap();
        chan.send(
            &SpawnerRequest::Start(request("blk0", false)),
            &[null.as_fd(); 5],
        )
        .unwrap();
        let (reply, mut got) = chan.recv::<SpawnReply>().unwrap();
        let SpawnReply::Started { pid: reaper, .. } = reply else {
            panic!("{reply:?}")
        };
        let exit = got.pop().unwrap();
        let pidfd = got.pop().unwrap();
        // Its child, once it has one.
        let children = format!("/proc/{reaper}/task/{reaper}/children");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let child: u32 = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                break pid.parse().unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the script started no child"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let (reply, got) = ask_inspect(&chan, reaper, child);
        let SpawnReply::Inspected { seq: 5, facts } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(got.len(), 2);
        assert_eq!(facts.map(|f| f.pid), Some(child));
        let stat = File::from(got.into_iter().nth(1).unwrap());
        assert!(
            matches!(crate::pids::stat_state(&stat), Some('S' | 'R')),
            "{:?}",
            crate::pids::stat_state(&stat)
        );
        // Not its child: the reaper itself, and pid 1.
        for pid in [reaper, 1] {
            let (reply, got) = ask_inspect(&chan, reaper, pid);
            assert!(
                matches!(reply, SpawnReply::Failed { seq: 5, .. }),
                "{reply:?}"
            );
            assert!(got.is_empty());
        }
        // Once the reaper has ended (and the spawner reaped it), nothing of it is answered.
        let mut worker = WorkerProcess {
            pid: reaper,
            how: Started::Spawned {
                pidfd,
                exit,
                status: None,
            },
        };
        worker.kill().unwrap();
        assert!(worker.wait().unwrap().signal() == Some(libc::SIGKILL));
        let (reply, _) = ask_inspect(&chan, reaper, child);
        assert!(
            matches!(reply, SpawnReply::Failed { seq: 5, .. }),
            "{reply:?}"
        );
        // SAFETY: kill with the orphaned sleep's pid, which nothing else can have taken
        // while it runs (it was just inspected and is not reaped by us).
        unsafe { libc::kill(child as libc::pid_t, libc::SIGKILL) };
        drop(chan);
        server.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_spawner_inspects_only_the_children_of_workers_it_started() {
        let (chan, server) = spawner("/bin/true");
        // pid 1, as the child of this test process and of pid 1, neither of them a worker
        // the spawner started: both refused, with no descriptor.
        for reaper in [std::process::id(), 1] {
            let request = SpawnerRequest::Inspect {
                seq: 3,
                reaper,
                pid: 1,
            };
            chan.send(&request, &[]).unwrap();
            let (reply, got) = chan.recv::<SpawnReply>().unwrap();
            assert!(
                matches!(&reply, SpawnReply::Failed { seq: 3, error } if error.contains("not the living child")),
                "{reply:?}"
            );
            assert!(got.is_empty());
        }
        drop(chan);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_request_must_name_a_plain_disk_id_and_a_bounded_address_space() {
        for id in ["", "a/b", "blk 0", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(request(id, false).validate().is_err(), "{id:?}");
        }
        assert!(request("blk-0_a", false).validate().is_ok());
        for address_space in [0, MIN_ADDRESS_SPACE - 1, MAX_ADDRESS_SPACE + 1, u64::MAX] {
            let r = SpawnRequest {
                address_space,
                ..request("blk0", false)
            };
            assert!(r.validate().is_err(), "{address_space}");
        }
    }
}
