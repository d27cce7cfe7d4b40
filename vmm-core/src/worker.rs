//! Starting a disk worker: a fresh `bulkhead-worker` executable (exec'd by the spawner
//! process, never a fork of this multithreaded one: see [`crate::spawner`]) handed exactly
//! four descriptors: the connected vhost-user socket, the control channel, the disk image
//! this VMM opened and locked, and the status page this VMM created and sealed (plus its
//! output pipe, and in learn mode its learn socket). Everything the worker says is checked.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipc::channel::Channel;
use ipc::messages::{VmmMessage, WorkerConfig, WorkerKind, WorkerMessage};
use ipc::status::{StatusMapping, StatusPage};
use policies::learn::Recorder;

use ipc::messages::ServeMode;

use crate::disk::config::WorkerDisk;
use crate::disk::image::OpenedImage;
use crate::ratelimit::RateLimitedLog;

/// What a worker maps besides guest RAM: its executable and libraries, stack, heap, its
/// own inflight region, io_uring rings, the status page. Measured: VmSize 74,536 kB with
/// 64 MiB of guest RAM (io_uring engine), so about 9 MiB; the rest is margin (more
/// queues mean more rings and a larger inflight region, at most about 1 MiB more).
pub const WORKER_OVERHEAD: u64 = 64 << 20;

/// The address space a worker may have (RLIMIT_AS): guest RAM twice (a SET_MEM_TABLE
/// after a device reset maps the new table before the old one is let go) plus
/// [`WORKER_OVERHEAD`]. A compromised worker cannot take the host's memory beyond that
/// (an mmap of 2 GiB with MAP_POPULATE once took 2 GB of RSS).
pub fn address_space_limit(guest_ram: u64) -> u64 {
    guest_ram.saturating_mul(2).saturating_add(WORKER_OVERHEAD)
}

/// How long a worker may take to answer during setup before it is given up on.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while starting a worker. The worker, if started, is killed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("disk {id}: cannot {what}")]
    Setup {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {id}: cannot start worker {bin}")]
    Spawn {
        id: String,
        bin: PathBuf,
        #[source]
        source: crate::spawner::SpawnError,
    },
    #[error("disk {id}: worker (pid {pid}) failed the handshake")]
    Handshake {
        id: String,
        pid: u32,
        #[source]
        source: ipc::handshake::HandshakeError,
    },
    #[error("disk {id}: worker (pid {pid}) sent a bad control message")]
    Control {
        id: String,
        pid: u32,
        #[source]
        source: ipc::channel::ChannelError,
    },
    #[error("disk {id}: worker (pid {pid}) answered the configuration with {answer}")]
    Unexpected {
        id: String,
        pid: u32,
        answer: String,
    },
    #[error("disk {id}: worker (pid {pid}) cannot serve {}: {message}", path.display())]
    Refused {
        id: String,
        pid: u32,
        path: PathBuf,
        message: String,
    },
    #[error("disk {id}")]
    Disk {
        id: String,
        #[source]
        source: crate::disk::nbd::ConnectError,
    },
    #[error("disk {id}: cannot create the status page")]
    Status {
        id: String,
        #[source]
        source: ipc::status::StatusError,
    },
}

/// A started worker, past its handshake, ready for vhost-user.
#[derive(Debug)]
pub struct Worker {
    pub id: String,
    pub child: crate::spawner::WorkerProcess,
    pub control: Channel,
    pub status: std::sync::Arc<StatusMapping>,
    /// Our end of the vhost-user socket.
    pub vhost: UnixStream,
    pub disk_size: u64,
    pub device_features: u64,
}

/// Finds `bulkhead-worker` beside the running executable.
pub fn default_worker_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.join("bulkhead-worker");
    bin.is_file().then_some(bin)
}

/// Sets RLIMIT_AS (soft and hard) of process `pid` to `bytes`.
/// Creates the channels and the status page, execs the worker with a duplicate of `disk`
/// (opened and locked by the VMM, which keeps it for the worker's successors) and takes it
/// through the handshake and its configuration. With `learn`, the worker runs in learn
/// mode and a thread records its syscalls into the recorder (`bulkhead policy learn`).
pub fn spawn(
    cfg: &WorkerDisk,
    disk: &OpenedImage,
    bin: &Path,
    learn: Option<&Arc<Recorder>>,
    mode: ServeMode,
    output: &Arc<RateLimitedLog>,
) -> Result<Worker, WorkerError> {
    let id = cfg.id.clone();
    let setup = |what: &'static str| {
        let id = id.clone();
        move |source| WorkerError::Setup { id, what, source }
    };
    let (vmm_vhost, worker_vhost) =
        UnixStream::pair().map_err(setup("create the vhost-user socket pair"))?;
    let (vmm_control, worker_control) = Channel::pair().map_err(|e| WorkerError::Setup {
        id: id.clone(),
        what: "create the control channel",
        source: std::io::Error::other(e),
    })?;
    let (status_fd, status) =
        StatusPage::create(&format!("bulkhead-status-{id}")).map_err(|source| {
            WorkerError::Status {
                id: id.clone(),
                source,
            }
        })?;
    let learn_pair = match learn {
        Some(_) => Some(UnixStream::pair().map_err(setup("create the learn socket pair"))?),
        None => None,
    };
    // The worker's stdout and stderr: a pipe only the VMM reads (see worker_output).
    let (output_r, output_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| setup("create the output pipe")(std::io::Error::from(e)))?;
    let disk_fd = disk.disk_fd(mode).map_err(|source| WorkerError::Disk {
        id: id.clone(),
        source,
    })?;
    // No descriptor: the spawner connects to the disk's NBD server for this worker.
    let connect = disk_fd.is_none().then(|| disk.nbd_export()).flatten();
    let fds = crate::spawner::WorkerFds {
        vhost: worker_vhost.as_fd(),
        control: worker_control.as_fd(),
        disk: disk_fd.as_ref().map(|d| d.as_fd()),
        status: status_fd.as_fd(),
        output: output_w.as_fd(),
        learn: learn_pair.as_ref().map(|(_, w)| w.as_fd()),
    };
    let started =
        crate::spawner::start_worker(bin, &id, learn.is_some(), cfg.address_space, &fds, connect);
    let child = started.map_err(|source| WorkerError::Spawn {
        id: id.clone(),
        bin: bin.to_path_buf(),
        source,
    })?;
    // The write end is the worker's alone now: the pipe ends when it and its reaper do.
    drop(output_w);
    if let Err(e) =
        crate::worker_output::spawn_forwarder(&id, std::fs::File::from(output_r), output.clone())
    {
        tracing::warn!("disk {id}: cannot start the thread that logs its worker's output: {e}");
    }
    drop((worker_vhost, worker_control, status_fd, disk_fd));
    let pid = child.id();
    if let (Some(recorder), Some((vmm_learn, worker_learn))) = (learn, learn_pair) {
        drop(worker_learn);
        // A learner that cannot start leaves the worker waiting on its first syscall, and
        // the VM's disk with it: give the worker up rather than hang.
        let learner = policies::learn::learner(vmm_learn, recorder.clone(), id.clone());
        if let Err(source) = crate::thread::spawn_unconfined(
            learner.thread_name(),
            "learn mode: an operator's tool",
            move || learner.run(),
        ) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(WorkerError::Setup {
                id,
                what: "start the learn thread",
                source,
            });
        }
    }
    let mut worker = Worker {
        id: id.clone(),
        child,
        control: vmm_control,
        status: std::sync::Arc::new(status),
        vhost: vmm_vhost,
        disk_size: 0,
        device_features: 0,
    };
    if let Err(e) = configure(&mut worker, cfg, disk, pid, mode) {
        let _ = worker.child.kill();
        let _ = worker.child.wait();
        return Err(e);
    }
    Ok(worker)
}

fn configure(
    worker: &mut Worker,
    cfg: &WorkerDisk,
    disk: &OpenedImage,
    pid: u32,
    mode: ServeMode,
) -> Result<(), WorkerError> {
    let id = worker.id.clone();
    ipc::handshake::handshake_vmm_side_timeout(&worker.control, SETUP_TIMEOUT).map_err(
        |source| WorkerError::Handshake {
            id: id.clone(),
            pid,
            source,
        },
    )?;
    let control_err = |source| WorkerError::Control {
        id: id.clone(),
        pid,
        source,
    };
    let config = WorkerConfig {
        kind: WorkerKind::Blk,
        device_id: cfg.id.clone(),
        readonly: cfg.image.readonly,
        num_queues: cfg.num_queues,
        serial: cfg.image.serial.clone(),
        direct_io: cfg.image.direct,
        sandbox: true,
        mode,
        engine: cfg.image.engine,
        poll_us: cfg.image.poll_us,
        uid: cfg.uid,
        format: cfg.image.format,
        backing: disk.backing.as_ref().map(|b| b.allowed.clone()),
        rate_limit: cfg.image.rate_limit,
        image_len: disk.size,
        resize_to: cfg.resize_to,
        nbd: disk.nbd_export(),
    };
    let backing_fd: Vec<_> = disk.backing.iter().map(|b| b.file.as_fd()).collect();
    worker
        .control
        .send(&VmmMessage::Configure(config), &backing_fd)
        .map_err(control_err)?;
    let (answer, fds) = worker
        .control
        .recv_timeout::<WorkerMessage>(SETUP_TIMEOUT)
        .map_err(control_err)?;
    drop(fds); // Ready carries none; any that came are closed unused.
    match answer {
        WorkerMessage::Error { message } => Err(WorkerError::Refused {
            id,
            pid,
            path: cfg.image.path.clone(),
            message,
        }),
        WorkerMessage::Ready {
            disk_size_bytes,
            device_features,
            num_queues,
        } if num_queues == cfg.num_queues => {
            worker.disk_size = disk_size_bytes;
            worker.device_features = device_features;
            Ok(())
        }
        other => Err(WorkerError::Unexpected {
            id,
            pid,
            answer: format!("{other:?}"),
        }),
    }
}
