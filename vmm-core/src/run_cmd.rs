//! `bulkhead run`: boot a guest with its disks, run it until it ends, end its workers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use vmm_core::boot::EntryPoint;
use vmm_core::config::{RunConfig, VmConfig};
use vmm_core::terminal::RawStdin;
use vmm_core::vcpu::VcpuEvent;
use vmm_core::vm::{Vm, VmOutcome};

/// Exit status when the guest crashed (triple fault, KVM internal error).
const EXIT_GUEST_CRASHED: u8 = 120;
/// Exit status when `--timeout` expired (as timeout(1)).
const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: the value the guest wrote to port 0xf4 (truncated to 8 bits); \
0 when it reset (i8042) or powered off (ACPI S5), or on a shutdown through the API; 120 when it crashed (triple fault, KVM error); \
124 when --timeout expired; 128+N on signal N; 1 on any VMM error."
)]
pub struct RunArgs {
    /// The whole run from a JSON file (`{"vm": {"kernel": ..., "disks": [...]}, "api_socket":
    /// ..., "timeout": ...}`; examples/vm.json); no other run option may be given with it.
    /// [default: none, the flags give the run]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (from the flags or --config) as JSON, the format
    /// --config reads, and exit without running anything. [default: off]
    #[arg(long)]
    pub print_config: bool,
    /// Kernel: an ELF with a PVH note (boots through PVH), another x86-64 ELF or a bzImage
    /// (64-bit Linux boot protocol). Required unless --config.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk. [default: none]
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. [default: "console=ttyS0 reboot=k panic=1"]
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM: MiB (512) or a size with a binary unit (512M, 1G, 2GiB). [default: 256M]
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Back guest RAM with 2 MiB huge pages (hugetlbfs, from `vm.nr_hugepages`, all taken
    /// at start), shared with the disk workers: large guest I/Os reach the host disk in
    /// fewer, larger segments. [default: off]
    #[arg(long)]
    pub hugepages: bool,
    /// Number of vCPUs. [default: 1]
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// A virtio-blk disk served by its own sandboxed worker:
    /// `path=IMG[,id=NAME][,readonly=on][,serial=ID][,direct=on][,num_queues=N][,spare=off]
    /// [,engine=auto|sync|io_uring][,poll_us=N][,ioeventfd=datamatch|any]
    /// [,format=raw|qcow2][,backing=PATH][,backing_format=raw|qcow2]
    /// [,iops=N][,bw=BYTES][,iops_burst=N][,bw_burst=BYTES][,iops_refill_ms=MS][,bw_refill_ms=MS]`,
    /// or, for an NBD server's export, `nbd=unix:PATH` or `nbd=HOST:PORT` instead of path=
    /// (with `[,export=NAME]`; the VMM connects, the worker gets the connected socket),
    /// or by an external vhost-user backend: `vhost_user=SOCKET[,id=NAME][,num_queues=N]`.
    /// `ioeventfd=any` kicks one queue through a zero-length ioeventfd.
    /// format is raw unless given (never guessed from the content); a qcow2 image is parsed
    /// inside the worker's sandbox and may name one backing file, the one given as backing=.
    /// iops= and bw= limit the disk to that many requests and bytes a second (token buckets
    /// in its worker; `bulkhead ctl limit` changes them while the VM runs).
    /// A spare worker (on by default for raw images) waits sandboxed, so a restart skips
    /// its start-up.
    /// num_queues defaults to one per vCPU (at most 8) for worker-served disks.
    /// Repeatable; ids default to blk0, blk1, ... [default: no disk]
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// The worker executable. [default: bulkhead-worker beside bulkhead]
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Run this VM's workers as a uid of their own, leased from FIRST-LAST (unprivileged
    /// host uids; one per running VM, held by /run/bulkhead/worker-uid-N.lock).
    /// [default: every worker runs as 65534]
    #[arg(long, value_name = "FIRST-LAST")]
    pub worker_uids: Option<vmm_core::uid_lease::UidRange>,
    /// Run each worker in a cgroup v2 leaf with memory.max (guest RAM + 64 MiB) and
    /// pids.max (64), under bulkhead/ at the root of the host's cgroup2 hierarchy:
    /// `auto` where that hierarchy has the memory and pids controllers (else one line says
    /// why not), `required` refuses to start without them, `off` never. [default: auto]
    #[arg(long, value_enum)]
    pub worker_cgroups: Option<vmm_core::cgroup::CgroupMode>,
    /// Stop the VM after this many seconds (exit status 124). [default: none, the VM runs
    /// until the guest ends it]
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Serve the control API (HTTP on this Unix socket; `bulkhead ctl` is its client).
    /// [default: no API]
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Log lines as `text` or `json` (one object a line; a disk's lines carry its id in
    /// their `disk` span). [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<vmm_core::logging::LogFormat>,
    /// Append the log (the VMM's, its spawner's and its workers' lines) to this file.
    /// [default: stderr]
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace) or `target=level` directives; workers
    /// log at the same level. [default: BULKHEAD_LOG, else info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl RunArgs {
    /// The run these arguments describe: from --config (alone), or from the flags with
    /// their defaults; disks get their default ids either way. (What needs the host, like
    /// whether two disks are one image, is checked when it runs.)
    pub fn into_config(self) -> anyhow::Result<RunConfig> {
        let cfg = match &self.config {
            Some(path) => {
                let given = self.flags_given();
                if let Some(first) = given.first() {
                    anyhow::bail!(
                        "--config {} gives the whole run; {first}{} cannot be given with it",
                        path.display(),
                        match given.len() {
                            1 => String::new(),
                            n => format!(" (and {} more)", n - 1),
                        }
                    );
                }
                let text = read_config(path)?;
                let cfg: RunConfig = serde_json::from_str(&text)
                    .with_context(|| format!("--config {}", path.display()))?;
                RunConfig {
                    vm: cfg.vm.with_disk_ids(),
                    ..cfg
                }
            }
            None => {
                let Some(kernel) = self.kernel else {
                    anyhow::bail!("--kernel is required (or --config FILE)");
                };
                let disks = self
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, spec)| vmm_core::disk::config::DiskConfig::parse(spec, i))
                    .collect::<Result<Vec<_>, _>>()?;
                let defaults = VmConfig::new(kernel);
                RunConfig {
                    vm: VmConfig {
                        initrd: self.initrd,
                        cmdline: self.cmdline.unwrap_or(defaults.cmdline.clone()),
                        mem_mib: match &self.mem {
                            Some(text) => vmm_core::config::parse_mem_mib(text)
                                .map_err(|e| anyhow::anyhow!("--mem {e}"))?,
                            None => defaults.mem_mib,
                        },
                        ram_pages: if self.hugepages {
                            vmm_core::memory::RamPages::Huge
                        } else {
                            defaults.ram_pages
                        },
                        vcpus: self.vcpus.unwrap_or(defaults.vcpus),
                        disks,
                        worker_bin: self.worker_bin,
                        worker_uids: self.worker_uids,
                        worker_cgroups: self.worker_cgroups.unwrap_or(defaults.worker_cgroups),
                        ..defaults
                    },
                    api_socket: self.api_socket,
                    timeout: self.timeout,
                    log: vmm_core::logging::LogConfig {
                        format: self.log_format.unwrap_or_default(),
                        file: self.log_file,
                        level: self.log_level,
                    },
                }
            }
        };
        if let Some(t) = cfg.timeout {
            if !(t.is_finite() && t > 0.0) || Duration::try_from_secs_f64(t).is_err() {
                anyhow::bail!("--timeout {t:?} must be a positive number of seconds");
            }
        }
        // What --print-config prints must run: the log level is checked here too.
        vmm_core::logging::directives(&cfg.log)?;
        Ok(cfg)
    }

    /// Whether anything about the log was given (`policy learn` logs as every command but
    /// `run` does, and refuses these).
    pub fn log_flags_given(&self) -> bool {
        self.log_format.is_some() || self.log_file.is_some() || self.log_level.is_some()
    }

    /// The run options given besides --config and --print-config, by flag.
    fn flags_given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut add = |on: bool, flag| {
            if on {
                given.push(flag);
            }
        };
        add(self.kernel.is_some(), "--kernel");
        add(self.initrd.is_some(), "--initrd");
        add(self.cmdline.is_some(), "--cmdline");
        add(self.mem.is_some(), "--mem");
        add(self.hugepages, "--hugepages");
        add(self.vcpus.is_some(), "--vcpus");
        add(!self.disks.is_empty(), "--disk");
        add(self.worker_bin.is_some(), "--worker-bin");
        add(self.worker_uids.is_some(), "--worker-uids");
        add(self.worker_cgroups.is_some(), "--worker-cgroups");
        add(self.timeout.is_some(), "--timeout");
        add(self.api_socket.is_some(), "--api-socket");
        add(self.log_format.is_some(), "--log-format");
        add(self.log_file.is_some(), "--log-file");
        add(self.log_level.is_some(), "--log-level");
        given
    }
}

/// The largest configuration file read (a VM with many disks is a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file: a regular file of at most [`MAX_CONFIG_BYTES`].
fn read_config(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let context = || format!("cannot read --config {}", path.display());
    let file = std::fs::File::open(path).with_context(context)?;
    if !file.metadata().with_context(context)?.is_file() {
        anyhow::bail!("--config {} is not a regular file", path.display());
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(context)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        anyhow::bail!(
            "--config {} is larger than {} KiB",
            path.display(),
            MAX_CONFIG_BYTES >> 10
        );
    }
    Ok(text)
}

/// `bulkhead run`: prints the effective configuration (`--print-config`), or sets the log
/// up as it says and runs it.
pub fn start(args: RunArgs) -> anyhow::Result<u8> {
    let print = args.print_config;
    let cfg = args.into_config()?;
    if print {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(0);
    }
    let level = vmm_core::logging::init(&cfg.log)?;
    // Workers (through the spawner, which passes on only this variable and the hook's) log
    // at the VMM's level; their lines reach the VMM's log through it. Set while this
    // process has one thread.
    std::env::set_var("BULKHEAD_LOG", level);
    run(cfg, None)
}

/// Boots and runs a VM; returns the exit status (see RunArgs' help). With `learn`, its
/// workers run in learn mode, recorded there.
pub fn run(
    run: RunConfig,
    learn: Option<std::sync::Arc<policies::learn::Recorder>>,
) -> anyhow::Result<u8> {
    // What `GET /v1/vm` shows: the configuration as given, after defaults.
    let effective = serde_json::to_value(&run).unwrap_or_default();
    let RunConfig {
        vm: cfg,
        api_socket,
        timeout,
        log,
    } = run;
    // RunArgs::into_config checked it is positive and finite.
    let timeout = timeout.map(Duration::from_secs_f64);
    // The API socket first of all: in use, or a path that cannot be one, ends the run
    // before any worker or vCPU starts.
    let api = api_socket.as_deref().map(vmm_core::api::bind).transpose()?;
    // Workers are started by a helper process, started now, while bulkhead has no other
    // thread, no guest memory and no image open (no VMM thread then needs fork or exec).
    let mut cgroup_line = None;
    if let Some(bin) = cfg
        .worker_bin
        .clone()
        .or_else(vmm_core::worker::default_worker_bin)
    {
        // Only a VM with worker-served disks gets a cgroup directory.
        let worker_disks = cfg
            .disks
            .iter()
            .filter(|d| matches!(d.source, vmm_core::disk::config::DiskSource::Image(_)))
            .count() as u64;
        let (cgroup, line) = if worker_disks == 0 {
            (None, None)
        } else {
            let budget = vmm_core::cgroup::WorkerBudget {
                guest_ram: cfg.mem_mib.saturating_mul(1 << 20),
                headroom: vmm_core::worker::WORKER_OVERHEAD,
                // An active worker, a spare and a successor starting while its
                // predecessor still exits, per disk.
                workers: 3 * worker_disks,
            };
            let (cgroup, line) = vmm_core::cgroup::prepare(cfg.worker_cgroups, budget)
                .context("--worker-cgroups required")?;
            (cgroup, Some(line))
        };
        cgroup_line = line;
        let required = cfg.worker_cgroups == vmm_core::cgroup::CgroupMode::Required;
        if let Err(e) = vmm_core::spawner::start(
            &bin,
            learn.is_some(),
            cgroup.as_ref(),
            required,
            &log,
            api.as_ref().map(|a| (a.path(), a.identity())),
            &nbd_disks(&cfg.disks),
        ) {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            return Err(e).context("start the worker spawner");
        }
    }
    // However `run` ends from here on (an error, the VM's end), the spawner is ended when
    // bulkhead is done: it removes the workers' cgroups first.
    let _spawner = SpawnerGuard;
    // Every thread the VMM starts from here on confines itself (policies/vmm*.policy); the
    // main thread does once the vCPUs run.
    vmm_core::confine::enable().context("confine the VMM's threads")?;
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
        std::sync::OnceLock<(vmm_core::vm::Stopper, vmm_core::report::VmStats)>,
    > = Default::default();
    let running_for_signals = running.clone();
    vmm_core::thread::spawn(
        "signals",
        vmm_core::confine::VmmThread::Signals,
        move || loop {
            let Ok(sig) = signals.wait() else { return };
            match (sig, running_for_signals.get()) {
                (Signal::SIGUSR1, Some((_, stats))) => stats.log(),
                (Signal::SIGUSR1, None) => {}
                (_, Some((stopper, _))) => {
                    stopper.signal(sig as i32);
                    return;
                }
                (_, None) => {
                    vmm_core::say!("bulkhead: stopped by {sig} during setup");
                    std::process::exit(128 + sig as i32);
                }
            }
        },
    )
    .context("start the signal thread")?;

    vmm_core::disk::config::check_disks(&cfg.disks)?;
    let mut vm = Vm::build(&cfg, learn.as_ref(), Box::new(std::io::stdout()))?;
    if let Some(line) = cgroup_line {
        tracing::info!("{line}");
    }
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
    if let Some(api) = api {
        // The VM's disks are the configuration's, in the same order.
        let disks = cfg
            .disks
            .iter()
            .zip(vm.disks())
            .map(|(config, disk)| vmm_core::api::ApiDisk {
                id: disk.id.clone(),
                config: serde_json::to_value(config).unwrap_or_default(),
                handle: disk.handle.clone(),
            })
            .collect();
        let ctx = vmm_core::api::ApiContext {
            started: std::time::Instant::now(),
            vcpus: cfg.vcpus,
            mem_mib: cfg.mem_mib,
            config: effective,
            disks,
            events: vm.events(),
            control: std::sync::Arc::new(vm.controls()),
            stats: vm.stats(),
        };
        vmm_core::api::serve(api, ctx)?;
    }
    let _ = running.set((vm.stopper(), vm.stats()));
    let outcome = vm.run(timeout)?;
    terminal.restore();
    vm.shutdown();
    Ok(report(outcome))
}

/// Ends the spawner when `run` returns, after the VM's own end (dropped last) or on an
/// error: it removes the workers' cgroups and exits before bulkhead does.
struct SpawnerGuard;

impl Drop for SpawnerGuard {
    fn drop(&mut self) {
        vmm_core::spawner::finish();
    }
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
            vmm_core::say!("bulkhead: error: KVM_RUN failed on vCPU {vcpu}: {error}");
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
        VmOutcome::Shutdown => {
            tracing::info!("shut down through the control API");
            0
        }
        VmOutcome::Vanished => {
            vmm_core::say!("bulkhead: error: every vCPU thread ended without a reason");
            1
        }
    }
}

/// The disks NBD servers serve, for the spawner (the only servers it connects to).
fn nbd_disks(disks: &[vmm_core::disk::config::DiskConfig]) -> Vec<vmm_core::spawner::SpawnerNbd> {
    use vmm_core::disk::config::DiskSource;
    disks
        .iter()
        .filter_map(|d| match &d.source {
            DiskSource::Image(i) => i.nbd.as_ref().map(|n| vmm_core::spawner::SpawnerNbd {
                id: d.id.clone(),
                server: n.server.to_string(),
                export: n.export.clone(),
            }),
            DiskSource::VhostUser(_) => None,
        })
        .collect()
}
