//! `bulkhead`: a KVM VMM whose disks are served by sandboxed worker processes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vmm_core::boot::EntryPoint;
use vmm_core::terminal::RawStdin;
use vmm_core::vcpu::VcpuEvent;
use vmm_core::vm::{Vm, VmConfig, VmOutcome, DEFAULT_CMDLINE};

mod policy_cmd;

/// Exit status when the guest crashed (triple fault, KVM internal error).
const EXIT_GUEST_CRASHED: u8 = 120;
/// Exit status when `--timeout` expired (as timeout(1)).
const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A KVM VMM whose disks live in sandboxed worker processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest.
    Run(RunArgs),
    /// Audit the seccomp policies of the workers.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Talk to a running bulkhead through its --api-socket.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
struct CtlArgs {
    /// The socket given to `bulkhead run --api-socket`.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Planned restart of a disk's worker (e.g. after replacing the worker binary); the
    /// guest sees no error. Prints the new worker's pid and the time it took.
    Restart {
        /// Disk id, e.g. blk0.
        disk: String,
    },
    /// A disk's worker: its pid and mode (normal, fail, none).
    Status {
        /// Disk id, e.g. blk0.
        disk: String,
    },
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: the value the guest wrote to port 0xf4 (truncated to 8 bits); \
0 when it reset (i8042) or powered off (ACPI S5); 120 when it crashed (triple fault, KVM error); \
124 when --timeout expired; 128+N on signal N; 1 on any VMM error."
)]
pub struct RunArgs {
    /// Kernel: an ELF with a PVH note (boots through PVH), another x86-64 ELF or a bzImage
    /// (64-bit Linux boot protocol).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Back guest RAM with 2 MiB huge pages (hugetlbfs, from `vm.nr_hugepages`, all taken
    /// at start), shared with the disk workers: large guest I/Os reach the host disk in
    /// fewer, larger segments.
    #[arg(long)]
    hugepages: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A virtio-blk disk served by its own sandboxed worker:
    /// `path=IMG[,id=NAME][,readonly=on][,serial=ID][,direct=on][,num_queues=N][,spare=off]
    /// [,engine=auto|sync|io_uring][,poll_us=N][,ioeventfd=datamatch|any]`,
    /// or by an external vhost-user backend: `vhost_user=SOCKET[,id=NAME][,num_queues=N]`.
    /// `ioeventfd=any` kicks one queue through a zero-length ioeventfd.
    /// A spare worker (on by default) waits sandboxed, so a restart skips its start-up.
    /// num_queues defaults to one per vCPU (at most 8) for worker-served disks.
    /// Repeatable; ids default to blk0, blk1, ...
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// The worker executable (default: bulkhead-worker beside bulkhead).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Serve the control API (HTTP on this Unix socket; `bulkhead ctl` is its client).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Command::Policy(cmd) = cli.command {
        return match policy_cmd::policy_command(cmd) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("bulkhead: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match cli.command {
        Command::Policy(_) => unreachable!("handled above"),
        Command::Ctl(args) => ctl(args),
        Command::Run(args) => match run(args, None) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("bulkhead: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn ctl(args: CtlArgs) -> ExitCode {
    let (method, target) = match &args.command {
        CtlCommand::Restart { disk } => ("POST", format!("/v1/disks/{disk}/restart")),
        CtlCommand::Status { disk } => ("GET", format!("/v1/disks/{disk}")),
    };
    match vmm_core::api::request(&args.api_socket, method, &target) {
        Ok((code, body)) => {
            println!("{body}");
            if (200..300).contains(&code) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "bulkhead: error: cannot reach the API at {}: {e}",
                args.api_socket.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Boots and runs a VM; returns the exit status (see RunArgs' help). With `learn`, its
/// workers run in learn mode, recorded there.
fn run(
    args: RunArgs,
    learn: Option<std::sync::Arc<policies::learn::Recorder>>,
) -> anyhow::Result<u8> {
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            anyhow::bail!("--timeout {t} must be a positive number of seconds")
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    // Signals are taken by one thread: the ones that end the VMM (so the terminal is
    // restored and the exit status says which signal it was) and SIGUSR1, which logs the
    // exit counters (the VMM's and KVM's) of the running VM. Block them before any thread
    // exists.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("block signals")?;
    // Until the VM runs, a stop signal ends bulkhead at once (nothing to restore yet);
    // afterwards it stops the VM through its Stopper.
    let running: std::sync::Arc<
        std::sync::OnceLock<(vmm_core::vm::Stopper, vmm_core::vm::VmStats)>,
    > = Default::default();
    let running_for_signals = running.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = signals.wait() else { return };
            match (sig, running_for_signals.get()) {
                (Signal::SIGUSR1, Some((_, stats))) => {
                    for line in stats.lines() {
                        tracing::info!("{line}");
                    }
                }
                (Signal::SIGUSR1, None) => {}
                (_, Some((stopper, _))) => {
                    stopper.signal(sig as i32);
                    return;
                }
                (_, None) => {
                    eprintln!("bulkhead: stopped by {sig} during setup");
                    std::process::exit(128 + sig as i32);
                }
            }
        })
        .context("start the signal thread")?;

    let disks = args
        .disks
        .iter()
        .enumerate()
        .map(|(i, spec)| vmm_core::disk::DiskConfig::parse(spec, i))
        .collect::<Result<Vec<_>, _>>()?;
    vmm_core::disk::check_disks(&disks)?;
    let cfg = VmConfig {
        disks,
        worker_bin: args.worker_bin,
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem,
        ram_pages: if args.hugepages {
            vmm_core::memory::RamPages::Huge
        } else {
            vmm_core::memory::RamPages::Small
        },
        vcpus: args.vcpus,
        learn,
    };
    let vm = Vm::build(&cfg, Box::new(std::io::stdout()))?;
    let protocol = match vm.entry() {
        EntryPoint::Pvh(_) => "PVH",
        EntryPoint::Linux64(_) => "64-bit Linux boot protocol",
    };
    tracing::info!(
        "booting {} via {protocol}: {} vCPU(s), {} MiB{}",
        cfg.kernel.display(),
        cfg.vcpus,
        cfg.mem_mib,
        if cfg.ram_pages == vmm_core::memory::RamPages::Huge {
            " in 2 MiB huge pages"
        } else {
            ""
        }
    );

    let mut terminal = RawStdin::enable();
    vm.serial()
        .spawn_input(std::io::stdin())
        .context("start the serial input thread")?;
    if let Some(path) = &args.api_socket {
        vmm_core::api::serve(path, vm.disk_controls())?;
    }
    let stats = vm.stats();
    let controls = vm.disk_controls();
    let _ = running.set((vm.stopper(), stats.clone()));
    let outcome = vm.run(timeout)?;
    terminal.restore();
    // Workers end before bulkhead does (learn mode records them to this normal end), so a
    // next run finds the images unlocked.
    vmm_core::vm::end_backends(&stats.devices, &controls);
    drop(controls);
    let deadline = Instant::now() + vmm_core::vm::WORKER_GRACE;
    for disk in &cfg.disks {
        if let vmm_core::disk::DiskBackend::Image(path) = &disk.backend {
            let left = deadline.saturating_duration_since(Instant::now());
            if !vmm_core::disk::wait_released(path, left) {
                tracing::warn!("disk {}: {} is still locked", disk.id, path.display());
            }
        }
    }
    for line in stats.lines() {
        tracing::info!("{line}");
    }
    Ok(report(outcome))
}

fn report(outcome: VmOutcome) -> u8 {
    match outcome {
        VmOutcome::Vcpu(VcpuEvent::DebugExit(code)) => {
            tracing::info!("guest exited with status {code} (port 0xf4)");
            code as u8
        }
        VmOutcome::Vcpu(VcpuEvent::Reset) => {
            tracing::info!("guest reset the machine");
            0
        }
        VmOutcome::Vcpu(VcpuEvent::PowerOff) => {
            tracing::info!("guest powered off (ACPI S5)");
            0
        }
        VmOutcome::Vcpu(VcpuEvent::Crashed { vcpu, what, report }) => {
            tracing::error!("guest crashed on vCPU {vcpu}: {what}");
            for line in report.lines() {
                tracing::error!("vcpu{vcpu}: {line}");
            }
            EXIT_GUEST_CRASHED
        }
        VmOutcome::Vcpu(VcpuEvent::RunFailed { vcpu, error }) => {
            eprintln!("bulkhead: error: KVM_RUN failed on vCPU {vcpu}: {error}");
            1
        }
        VmOutcome::TimedOut(after) => {
            tracing::warn!("timeout: stopped the VM after {:.1} s", after.as_secs_f64());
            EXIT_TIMEOUT
        }
        VmOutcome::Signal(sig) => {
            tracing::warn!("stopped the VM on signal {sig}");
            128u8.wrapping_add(sig as u8)
        }
        VmOutcome::Vanished => {
            eprintln!("bulkhead: error: every vCPU thread ended without a reason");
            1
        }
    }
}
