//! `bulkhead-worker`: one sandboxed vhost-user device backend per process.
//!
//! Standalone mode (any vhost-user frontend: QEMU, Cloud Hypervisor, bulkhead):
//! `bulkhead-worker blk --socket PATH --disk IMG [--readonly] [--num-queues N] [--serial ID] [--direct]`
//! opens the image, listens for one frontend, accepts it, sandboxes itself, then serves.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use device_workers::blk_device::BlkDevice;
use device_workers::sandbox::{self, SandboxConfig, Side};
use device_workers::serve::EventLoop;
use device_workers::vhost::VhostBackend;
use device_workers::{disk, socket};
use ipc::messages::{ServeMode, WorkerMessage};
use vhost::vhost_user::BackendReqHandler;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-worker",
    version,
    about = "Sandboxed vhost-user device backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a virtio-blk disk to one vhost-user frontend.
    Blk(BlkArgs),
    /// Started by bulkhead: everything comes through inherited descriptors and the
    /// control channel (not for interactive use).
    #[command(hide = true)]
    Spawned(SpawnedArgs),
}

#[derive(Debug, Args)]
struct SpawnedArgs {
    /// The connected vhost-user socket.
    #[arg(long)]
    vhost_fd: i32,
    /// The control channel (SOCK_SEQPACKET).
    #[arg(long)]
    control_fd: i32,
    /// The disk image the VMM opened and locked.
    #[arg(long)]
    disk_fd: i32,
    /// The status page memfd the VMM created and sealed.
    #[arg(long)]
    status_fd: i32,
    /// The disk id, for logs.
    #[arg(long)]
    id: Option<String>,
    /// Learn mode: hand a seccomp listener to the VMM over this socket (see `bulkhead
    /// policy learn`).
    #[arg(long)]
    learn_fd: Option<i32>,
    /// Test builds only: misbehave on purpose once sandboxed.
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    fault_hook: Option<String>,
}

#[derive(Debug, Args)]
struct BlkArgs {
    /// Unix socket to listen on for the frontend.
    #[arg(long)]
    socket: PathBuf,
    /// Disk image.
    #[arg(long)]
    disk: PathBuf,
    /// The image's format: raw or qcow2 (never guessed from its content).
    #[arg(long, default_value = "raw", value_parser = parse_format)]
    format: ipc::messages::ImageFormat,
    /// The one backing file a qcow2 image may name (opened read-only here, before the
    /// sandbox; the image must name this file).
    #[arg(long, requires = "format")]
    backing: Option<PathBuf>,
    /// The backing file's format: raw or qcow2.
    #[arg(long, default_value = "raw", value_parser = parse_format, requires = "backing")]
    backing_format: ipc::messages::ImageFormat,
    /// Refuse writes (and take only a shared lock on the image).
    #[arg(long)]
    readonly: bool,
    /// Number of virtqueues offered.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Serial number (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "")]
    serial: String,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// I/O engine: auto (io_uring if the kernel allows the restricted ring, else sync),
    /// sync, or io_uring.
    #[arg(long, default_value = "auto", value_parser = parse_engine)]
    engine: ipc::messages::IoEngine,
    /// Busy-poll the rings for this many microseconds before sleeping (0: never).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(ipc::messages::MAX_POLL_US)))]
    poll_us: u32,
    /// Host uid the worker runs as when started by root.
    #[arg(long, default_value_t = sandbox::DEFAULT_UID)]
    uid: u32,
    /// Host gid the worker runs as when started by root.
    #[arg(long, default_value_t = sandbox::DEFAULT_GID)]
    gid: u32,
    /// Print the status page when the worker ends.
    #[arg(long)]
    print_status: bool,
    /// Learn mode, for `bulkhead policy learn --worker`: record and allow every syscall,
    /// handing a seccomp listener to the supervisor over this inherited socket. The rest
    /// of the sandbox stays.
    #[arg(long, hide = true)]
    learn_fd: Option<i32>,
    /// Test builds only: serve without the sandbox.
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    no_sandbox: bool,
    /// Test builds only: misbehave on purpose once sandboxed (e.g. `openat`).
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    fault_hook: Option<String>,
}

fn parse_format(s: &str) -> Result<ipc::messages::ImageFormat, String> {
    use ipc::messages::ImageFormat;
    [ImageFormat::Raw, ImageFormat::Qcow2]
        .into_iter()
        .find(|f| f.name() == s)
        .ok_or_else(|| format!("{s:?} is not raw or qcow2"))
}

/// Opens the backing file standalone mode was given, and says how the image may name it.
fn open_backing(
    image: &std::path::Path,
    backing: &std::path::Path,
    format: ipc::messages::ImageFormat,
    direct: bool,
) -> anyhow::Result<(std::fs::File, ipc::messages::BackingImage)> {
    let opened = ipc::image::open(backing, ipc::image::Access::ReadOnly, direct, format)?;
    let absolute = |p: &std::path::Path, what: &str| -> anyhow::Result<String> {
        let p = std::fs::canonicalize(p)
            .with_context(|| format!("cannot resolve the {what} {}", p.display()))?;
        p.to_str()
            .map(str::to_string)
            .with_context(|| format!("the {what} {} is not UTF-8", p.display()))
    };
    let image = std::fs::canonicalize(image)
        .with_context(|| format!("cannot resolve the image {}", image.display()))?;
    let dir = image.parent().unwrap_or(std::path::Path::new("/"));
    Ok((
        opened.file,
        ipc::messages::BackingImage {
            format,
            path: absolute(backing, "backing file")?,
            image_dir: absolute(dir, "image directory")?,
        },
    ))
}

fn parse_engine(s: &str) -> Result<ipc::messages::IoEngine, String> {
    ipc::messages::IoEngine::parse(s).ok_or_else(|| format!("{s:?} is not auto, sync or io_uring"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        // A log line that cannot be written is lost, not a panic (the default reports the
        // failure with eprintln!, which panics when stderr itself is what failed).
        .log_internal_errors(false)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Blk(args) => run_blk(args),
        Command::Spawned(args) => run_spawned(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            say(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run_blk(args: BlkArgs) -> anyhow::Result<ExitCode> {
    if args.serial.len() > device_workers::blk::request::ID_BYTES {
        anyhow::bail!(
            "--serial {:?} is {} bytes, longer than virtio-blk's {}",
            args.serial,
            args.serial.len(),
            device_workers::blk::request::ID_BYTES
        );
    }
    let backing = match &args.backing {
        Some(backing) => Some(open_backing(
            &args.disk,
            backing,
            args.backing_format,
            args.direct,
        )?),
        None => None,
    };
    let disk = disk::open(&args.disk, args.format, backing, args.readonly, args.direct)?;
    let (status_fd, status) = ipc::status::StatusPage::create("bulkhead-worker-status")
        .context("create the status page")?;
    drop(status_fd); // the mapping stays; nothing needs the fd
                     // The mapping must outlive every use, including the SIGSYS handler: leak it.
    let status: &'static ipc::status::StatusMapping = Box::leak(Box::new(status));
    status.set_pid(std::process::id());

    let learn = args.learn_fd.map(|fd| inherited(fd, "learn")).transpose()?;
    let listener = socket::listen(&args.socket)?;
    say(format_args!("listening on {}", args.socket.display()));
    let stream = socket::accept_one(&listener, &args.socket)?;
    drop(listener);
    serve(Serve {
        ready: None,
        label: args.socket.display().to_string(),
        stream,
        control: None,
        disk,
        num_queues: args.num_queues,
        serial: args.serial,
        uid: args.uid,
        gid: args.gid,
        status,
        print_status: args.print_status,
        learn,
        mode: ServeMode::Normal,
        engine: args.engine,
        poll_us: args.poll_us,
        rate_limit: ipc::messages::RateLimit::default(),
        #[cfg(feature = "test-hooks")]
        sandboxed: !args.no_sandbox,
        #[cfg(feature = "test-hooks")]
        fault_hook: args.fault_hook,
        #[cfg(feature = "test-hooks")]
        hook_after_setup: false,
    })
}

/// Takes ownership of an inherited descriptor, refusing the standard streams.
fn inherited(fd: i32, what: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    anyhow::ensure!(fd > 2, "--{what}-fd {fd} is not an inherited descriptor");
    // SAFETY: F_GETFD only reads the descriptor flags; failure means it is not open.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    anyhow::ensure!(open, "--{what}-fd {fd} is not open");
    // SAFETY: the VMM passed this descriptor to us for our exclusive use; it is open
    // (checked above) and nothing else in this process owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn run_spawned(args: SpawnedArgs) -> anyhow::Result<ExitCode> {
    use ipc::messages::VmmMessage;
    let control = ipc::channel::Channel::from_fd(inherited(args.control_fd, "control")?)
        .context("the control channel")?;
    let learn = args.learn_fd.map(|fd| inherited(fd, "learn")).transpose()?;
    // A fail-mode worker replaces misbehaving ones; test hooks never apply to it.
    #[cfg(feature = "test-hooks")]
    let mut hook = device_workers::hooks::spawned_hook(args.id.as_deref());
    #[cfg(feature = "test-hooks")]
    if hook.as_deref() == Some("die-in-handshake") {
        say(format_args!(
            "fault hook: dying before answering the handshake"
        ));
        std::process::exit(3);
    }
    ipc::handshake_worker_side(&control).context("handshake with the VMM")?;
    let (config, mut passed) = control
        .recv::<VmmMessage>()
        .context("receive the configuration")?;
    let VmmMessage::Configure(config) = config else {
        anyhow::bail!("the VMM sent {config:?} where the configuration was expected");
    };
    let mode = config.mode;
    #[cfg(feature = "test-hooks")]
    if mode == ServeMode::Fail {
        hook = None;
    }
    let status_file = std::fs::File::from(inherited(args.status_fd, "status")?);
    let status = ipc::status::StatusMapping::map(&status_file).context("map the status page")?;
    drop(status_file);
    let status: &'static ipc::status::StatusMapping = Box::leak(Box::new(status));
    let disk_file = std::fs::File::from(inherited(args.disk_fd, "disk")?);
    // The backing file, if the configuration allows one, is the one descriptor that came
    // with it.
    let backing = match (&config.backing, passed.len()) {
        (None, 0) => None,
        (Some(b), 1) => Some((std::fs::File::from(passed.remove(0)), b.clone())),
        (b, n) => anyhow::bail!(
            "the configuration came with {n} descriptors for {} backing file",
            if b.is_some() { "one" } else { "no" }
        ),
    };
    let disk = match (config.format, config.nbd) {
        (ipc::messages::ImageFormat::Nbd, Some(export)) => Ok(disk::from_nbd(
            std::os::fd::OwnedFd::from(disk_file),
            export,
            config.readonly,
        )),
        _ => disk::from_file(
            disk_file,
            config.format,
            backing,
            config.readonly,
            config.direct_io,
            config.image_len,
        ),
    }
    .and_then(|mut disk| {
        if let Some(size) = config.resize_to {
            disk.plan_resize(size)?;
        }
        Ok(disk)
    });
    let disk = match disk {
        Ok(disk) => disk,
        Err(e) => {
            // The VMM's start fails with this line; said there, not twice.
            let message = ipc::messages::error_message(&e.to_string());
            if control.send(&WorkerMessage::Error { message }, &[]).is_ok() {
                return Ok(ExitCode::FAILURE);
            }
            return Err(e.into());
        }
    };
    let stream = std::os::unix::net::UnixStream::from(inherited(args.vhost_fd, "vhost")?);
    let features = device_workers::blk::config::device_features(
        config.readonly,
        usize::from(config.num_queues),
    );
    #[cfg(feature = "test-hooks")]
    if hook.as_deref() == Some("garbage-control") {
        say(format_args!(
            "fault hook: answering the configuration with garbage"
        ));
        device_workers::hooks::send_garbage(control.as_raw_fd());
        std::thread::sleep(std::time::Duration::from_secs(30));
        std::process::exit(3);
    }
    let ready = WorkerMessage::Ready {
        disk_size_bytes: disk.size,
        device_features: features,
        num_queues: config.num_queues,
    };
    serve(Serve {
        ready: Some(ready),
        label: config.device_id.clone(),
        stream,
        control: Some(control),
        disk,
        num_queues: config.num_queues,
        serial: config.serial,
        // One uid for all of a VM's workers, chosen by the VMM; the gid is the same number.
        uid: config.uid,
        gid: config.uid,
        status,
        print_status: false,
        learn,
        mode,
        engine: config.engine,
        poll_us: config.poll_us,
        rate_limit: config.rate_limit,
        // Only a test build may honour a VMM's request to run unconfined.
        #[cfg(feature = "test-hooks")]
        sandboxed: config.sandbox,
        #[cfg(feature = "test-hooks")]
        fault_hook: if mode == ServeMode::Fail {
            None
        } else {
            args.fault_hook.or(hook)
        },
        // The VMM's start waits for the vhost-user setup: a worker that misbehaves before
        // it is done fails the start, so a hook for a running VM waits for its end.
        #[cfg(feature = "test-hooks")]
        hook_after_setup: true,
    })
}

/// Everything one worker serves with, however it was started.
struct Serve {
    /// Spawned mode: what to tell the VMM on the control channel once the image is open
    /// inside the sandbox (or, with the image refused, an error instead).
    ready: Option<ipc::messages::WorkerMessage>,
    label: String,
    stream: std::os::unix::net::UnixStream,
    /// The control channel in spawned mode (kept open: the VMM sees EOF when we end).
    control: Option<ipc::channel::Channel>,
    disk: disk::Disk,
    num_queues: u16,
    serial: String,
    uid: u32,
    gid: u32,
    status: &'static ipc::status::StatusMapping,
    print_status: bool,
    /// Learn mode: the socket the seccomp listener goes out on.
    learn: Option<std::os::fd::OwnedFd>,
    mode: ServeMode,
    engine: ipc::messages::IoEngine,
    poll_us: u32,
    rate_limit: ipc::messages::RateLimit,
    #[cfg(feature = "test-hooks")]
    sandboxed: bool,
    #[cfg(feature = "test-hooks")]
    fault_hook: Option<String>,
    /// Run the fault hook once the frontend's setup is done (its GET_CONFIG answered)
    /// rather than right after the sandbox.
    #[cfg(feature = "test-hooks")]
    hook_after_setup: bool,
}

fn serve(s: Serve) -> anyhow::Result<ExitCode> {
    let max_file_size = s.disk.max_file_size;
    // In fail mode the device closes the image before the sandbox: nothing to keep.
    let disk_fds = match s.mode {
        ServeMode::Normal => s.disk.fds(),
        ServeMode::Fail => Vec::new(),
    };
    let device = BlkDevice::new(
        s.disk,
        s.num_queues,
        s.serial.as_bytes(),
        s.mode,
        s.engine,
        s.rate_limit,
    )?;
    let engine_fds = device.engine_fds();
    let engine = match s.mode {
        ServeMode::Normal => device.engine(),
        ServeMode::Fail => "none",
    };
    // Created now: after the sandbox, a new memfd could not be made or mapped.
    let inflight = device_workers::inflight::InflightRegion::create(
        s.num_queues,
        device_workers::vhost::MAX_QUEUE_SIZE,
    )?;
    let inflight_fds = inflight.fds();
    #[allow(unused_mut)]
    let mut vhost_backend = VhostBackend::new(device).with_inflight(inflight);
    #[cfg(feature = "test-hooks")]
    {
        vhost_backend.bad_config_reply =
            device_workers::hooks::serving_hook(s.fault_hook.as_deref(), "bad-vhost-config");
        vhost_backend.inflight_guest_ram =
            device_workers::hooks::serving_hook(s.fault_hook.as_deref(), "inflight-guest-ram");
        vhost_backend.exit_at_ring_start =
            device_workers::hooks::take_crash_loop_turn(s.fault_hook.as_deref())
                .map_err(anyhow::Error::msg)?;
        if let Some(hook) = &s.fault_hook {
            device_workers::hooks::prepare_before_sandbox(hook).map_err(anyhow::Error::msg)?;
            if s.hook_after_setup {
                vhost_backend.hook_after_config = Some(hook.clone());
            }
        }
    }
    let backend = Arc::new(Mutex::new(vhost_backend));
    let handler = BackendReqHandler::from_stream(s.stream, backend.clone());
    let events = EventLoop::new()?.with_polling(s.poll_us);
    #[cfg(feature = "test-hooks")]
    let sandboxed = s.sandboxed;
    #[cfg(not(feature = "test-hooks"))]
    let sandboxed = true;
    let status = s.status;
    anyhow::ensure!(
        sandboxed || s.learn.is_none(),
        "learn mode records the syscalls of a sandboxed worker; it needs the sandbox"
    );
    if sandboxed {
        let mut keep_fds = vec![handler.as_raw_fd(), events.as_raw_fd()];
        keep_fds.extend(&disk_fds);
        keep_fds.extend(&engine_fds);
        keep_fds.extend(&inflight_fds);
        keep_fds.extend(s.control.as_ref().map(|c| c.as_raw_fd()));
        keep_fds.extend(s.learn.as_ref().map(|l| l.as_raw_fd()));
        let cfg = SandboxConfig {
            uid: s.uid,
            gid: s.gid,
            keep_fds,
            // Memory regions, and per queue a kick, a call and an error fd, with margin.
            max_fds: 32 + 4 * u64::from(s.num_queues),
            max_file_size,
            // The io_uring's io-wq threads count as processes of the worker's user.
            max_procs: if engine != "io_uring" {
                1
            } else {
                sandbox::NPROC_WITH_IO_URING
            },
        };
        match sandbox::enter_namespaces(&cfg)? {
            Side::Reaper { worker, alive } => {
                // The reaper holds none of the worker's resources: forget them without
                // dropping (confine_reaper closes their descriptors).
                std::mem::forget((handler, backend, events, s.control, s.learn));
                // The VMM learns the confined pid from the status page.
                status.set_pid(worker.as_raw() as u32);
                let fail = match s.mode {
                    ServeMode::Normal => "",
                    ServeMode::Fail => {
                        " in FAIL MODE: every request completes with IOERR until the guest \
                         resets the device"
                    }
                };
                say(format_args!(
                    "serving {} as pid {worker} (sandboxed, engine {engine}){fail}",
                    s.label
                ));
                sandbox::confine_reaper(&alive)?;
                return Ok(reap(worker, status, s.print_status));
            }
            Side::Worker => {
                sandbox::confine(&cfg)?;
                sandbox::crash::install(status)?;
                match s.learn {
                    Some(handoff) => {
                        // Said before the filter, so the line is not a recorded call.
                        say(format_args!("{}", policies::learn::BANNER));
                        sandbox::seccomp::install_learning(handoff)?;
                    }
                    None => {
                        sandbox::seccomp::install(status)?;
                        say(format_args!(
                            "confined (namespaces, no capabilities, seccomp)"
                        ));
                    }
                }
            }
        }
    } else {
        say(format_args!(
            "serving {} as pid {} WITHOUT SANDBOX (test build)",
            s.label,
            std::process::id()
        ));
    }
    // A qcow2 image is parsed here, confined; the VMM hears the outcome.
    let opened = backend
        .lock()
        .expect("no other thread")
        .data_plane()
        .device_mut()
        .open_image();
    if let (Some(control), Some(ready)) = (&s.control, s.ready) {
        let answer = match &opened {
            Ok(()) => ready,
            Err(e) => WorkerMessage::Error {
                message: ipc::messages::error_message(&format!("disk image: {e}")),
            },
        };
        control.send(&answer, &[]).context("report readiness")?;
        if opened.is_err() {
            // The VMM says it, in the one line of its failed start (or its restart's).
            return Ok(ExitCode::FAILURE);
        }
    }
    opened.context("disk image")?;
    #[cfg(feature = "test-hooks")]
    if let (Some(hook), false) = (&s.fault_hook, s.hook_after_setup) {
        device_workers::hooks::run_after_sandbox(hook).map_err(anyhow::Error::msg)?;
    }
    events.run(handler, backend, status, s.control.as_ref())?;
    if !sandboxed && s.print_status {
        print_status(status);
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the confined worker and ends the same way it did, reporting a policy
/// violation by name.
fn reap(worker: nix::unistd::Pid, status: &ipc::status::StatusMapping, print: bool) -> ExitCode {
    use ipc::status::WorkerEnd;
    use nix::sys::wait::{waitpid, WaitStatus};
    // The reaper exits with the end's own code, which the VMM checks the record against.
    let code = loop {
        match waitpid(worker, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                let end = WorkerEnd::Exited(code);
                status.record_end(end);
                break end.exit_code();
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                let end = WorkerEnd::Signaled(sig as i32);
                status.record_end(end);
                let trap = sig == nix::sys::signal::Signal::SIGSYS && status.violation().is_some();
                if ipc::status::describe_crash(status.crash(), Some(end)).is_none() && !trap {
                    say(format_args!("worker (pid {worker}) was killed by {sig}"));
                }
                break end.exit_code();
            }
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                say(format_args!(
                    "cannot wait for the worker (pid {worker}): {e}"
                ));
                break 1;
            }
        }
    };
    if let Some(crash) = ipc::status::describe_crash(status.crash(), status.end()) {
        say(format_args!("worker (pid {worker}) {crash}"));
    } else if let (Some(v), Some(WorkerEnd::Exited(_))) = (status.violation(), status.end()) {
        say(format_args!(
            "worker (pid {worker}) exited with a violation record (nr {}) that no trap \
             confirms: its claim, not counted",
            v.nr
        ));
    } else if let (Some(v), Some(WorkerEnd::Signaled(libc::SIGSYS))) =
        (status.violation(), status.end())
    {
        say(format_args!(
            "worker (pid {worker}) violated policy blk: {}",
            policies::decode::format_call(v.nr, v.args)
        ));
        let args: Vec<String> = v.args.iter().map(|a| format!("{a:#x}")).collect();
        say(format_args!(
            "violation nr={} args=[{}] arch={:#x} ip={:#x}",
            v.nr,
            args.join(", "),
            v.arch,
            v.ip
        ));
    }
    if print {
        print_status(status);
    }
    ExitCode::from(code as u8)
}

/// One line on stderr in a single write, so lines from the reaper and the worker (two
/// processes on one pipe) never interleave.
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("bulkhead-worker: {line}\n").as_bytes());
}

fn print_status(status: &ipc::status::StatusMapping) {
    say(format_args!("status {:?}", status.snapshot()));
}
