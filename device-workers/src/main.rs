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
}

#[derive(Debug, Args)]
struct BlkArgs {
    /// Unix socket to listen on for the frontend.
    #[arg(long)]
    socket: PathBuf,
    /// Disk image (raw).
    #[arg(long)]
    disk: PathBuf,
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
    /// Host uid the worker runs as when started by root.
    #[arg(long, default_value_t = sandbox::DEFAULT_UID)]
    uid: u32,
    /// Host gid the worker runs as when started by root.
    #[arg(long, default_value_t = sandbox::DEFAULT_GID)]
    gid: u32,
    /// Print the status page when the worker ends.
    #[arg(long)]
    print_status: bool,
    /// Test builds only: serve without the sandbox.
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    no_sandbox: bool,
    /// Test builds only: misbehave on purpose once sandboxed (e.g. `openat`).
    #[cfg(feature = "test-hooks")]
    #[arg(long)]
    fault_hook: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Blk(args) => run_blk(args),
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
    let disk = disk::open(&args.disk, args.readonly, args.direct)?;
    let (status_fd, status) = ipc::status::StatusPage::create("bulkhead-worker-status")
        .context("create the status page")?;
    drop(status_fd); // the mapping stays; nothing needs the fd
                     // The mapping must outlive every use, including the SIGSYS handler: leak it.
    let status: &'static ipc::status::StatusMapping = Box::leak(Box::new(status));
    status.set_pid(std::process::id());

    let listener = socket::listen(&args.socket)?;
    say(format_args!("listening on {}", args.socket.display()));
    let stream = socket::accept_one(&listener, &args.socket)?;
    drop(listener);

    let disk_size = disk.size;
    let disk_fd = disk.file.as_raw_fd();
    let device = BlkDevice::new(disk, args.num_queues, args.serial.as_bytes())?;
    let backend = Arc::new(Mutex::new(VhostBackend::new(device)));
    let handler = BackendReqHandler::from_stream(stream, backend.clone());
    let events = EventLoop::new()?;

    let sandboxed = {
        #[cfg(feature = "test-hooks")]
        {
            !args.no_sandbox
        }
        #[cfg(not(feature = "test-hooks"))]
        {
            true
        }
    };
    if sandboxed {
        let cfg = SandboxConfig {
            uid: args.uid,
            gid: args.gid,
            keep_fds: vec![handler.as_raw_fd(), disk_fd, events.as_raw_fd()],
            // Memory regions, and per queue a kick, a call and an error fd, with margin.
            max_fds: 32 + 4 * u64::from(args.num_queues),
            max_file_size: disk_size,
        };
        match sandbox::enter_namespaces(&cfg)? {
            Side::Reaper { worker } => {
                // The reaper holds none of the worker's resources: forget them without
                // dropping (confine_reaper closes their descriptors).
                std::mem::forget((handler, backend, events));
                say(format_args!(
                    "serving {} as pid {worker} (sandboxed)",
                    args.socket.display()
                ));
                sandbox::confine_reaper()?;
                return Ok(reap(worker, status, args.print_status));
            }
            Side::Worker => {
                sandbox::confine(&cfg)?;
                sandbox::seccomp::install(status)?;
                say(format_args!(
                    "confined (namespaces, no capabilities, seccomp)"
                ));
            }
        }
    } else {
        say(format_args!(
            "serving {} as pid {} WITHOUT SANDBOX (test build)",
            args.socket.display(),
            std::process::id()
        ));
    }
    #[cfg(feature = "test-hooks")]
    if let Some(hook) = &args.fault_hook {
        device_workers::hooks::run_after_sandbox(hook).map_err(anyhow::Error::msg)?;
    }
    events.run(handler, backend, status)?;
    if !sandboxed && args.print_status {
        print_status(status);
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the confined worker and ends the same way it did, reporting a policy
/// violation by name.
fn reap(worker: nix::unistd::Pid, status: &ipc::status::StatusMapping, print: bool) -> ExitCode {
    use nix::sys::wait::{waitpid, WaitStatus};
    let code = loop {
        match waitpid(worker, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                say(format_args!("worker (pid {worker}) was killed by {sig}"));
                break 128 + sig as i32;
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
    if let Some(v) = status.violation() {
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
