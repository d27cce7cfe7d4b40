//! `bulkhead policy ...`: auditing the worker policies (list, show, diff, lint) and
//! learning what a workload needs (learn).

use std::io::Write as _;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use policies::learn::{Recorder, BANNER};

use crate::run_cmd::RunArgs;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Every embedded policy (the workers' and the VMM threads'), with rule counts.
    List,
    /// One policy as a table (default), JSON, or its compiled BPF's size and hash.
    Show {
        /// An embedded policy (blk, vmm, vmm/vcpu: see `list`) or a policy file.
        policy: String,
        /// The rules as JSON. [default: as text]
        #[arg(long, conflicts_with = "bpf")]
        json: bool,
        /// The compiled program (embedded policies only): size, hash and instructions.
        /// [default: off, the rules]
        #[arg(long)]
        bpf: bool,
    },
    /// Rules added, removed and changed from OLD to NEW (each an embedded policy or a file);
    /// exit status 1 when they differ.
    Diff { old: String, new: String },
    /// Flag dangerous rules that carry no accepted-risk reason; exit status 1 on findings.
    /// Without files, lints every embedded policy.
    Lint { files: Vec<PathBuf> },
    /// Run a workload with its workers in learn mode (every syscall recorded and allowed;
    /// the rest of the sandbox stays) and write the minimal policy it needed.
    Learn(LearnArgs),
}

/// `bulkhead policy learn`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  bulkhead policy learn --out blk.learned -- --kernel K --disk path=IMG\n  \
bulkhead policy learn --worker --out blk.learned -- blk --socket S --disk IMG\n\n\
Exit status: 0 when the workload ran and made no call outside the policy; 1 when it made \
calls the policy would have killed the worker for (listed as missing); 2 when the workload \
or learn mode failed (the learned set may be incomplete)."
)]
pub struct LearnArgs {
    /// The policy to judge calls against: a worker kind (blk) or a policy file.
    #[arg(long, default_value = "blk")]
    against: String,
    /// Write the learned policy (policy file format) here. [default: not written]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the report as JSON here. [default: not written]
    #[arg(long)]
    json: Option<PathBuf>,
    /// Learn a standalone worker: the arguments after `--` are bulkhead-worker's
    /// (e.g. `blk --socket S --disk IMG`), not `bulkhead run`'s. [default: off, a VM's
    /// workers]
    #[arg(long)]
    worker: bool,
    /// With --worker: the worker executable. [default: bulkhead-worker beside bulkhead]
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// `bulkhead run` arguments (or, with --worker, the worker's).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `bulkhead run` arguments on their own.
#[derive(Debug, Parser)]
#[command(name = "bulkhead policy learn --")]
struct RunOnly {
    #[command(flatten)]
    run: RunArgs,
}

/// An embedded policy by name (`blk`, `vmm`, `vmm/vcpu`), or a policy file parsed here.
fn load_policy(spec: &str) -> anyhow::Result<policies::Policy> {
    if let Some(id) = policies::PolicyId::parse(spec) {
        return Ok(policies::policy(id).clone());
    }
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("cannot read policy {spec}"))?;
    Ok(policies::format::parse(spec, &text)?)
}

pub fn policy_command(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    use policies::PolicyId;
    match cmd {
        PolicyCommand::List => {
            println!(
                "{:8}  {:8}  {:>5}  {:>9}  {:16}  confines",
                "process", "thread", "rules", "bpf insns", "bpf hash"
            );
            for id in PolicyId::all() {
                println!(
                    "{:8}  {:8}  {:>5}  {:>9}  {:16}  {}",
                    id.process(),
                    id.thread(),
                    policies::policy(id).rules.len(),
                    policies::bpf(id).len(),
                    policies::bpf_hash(id),
                    confines(id)
                );
            }
            println!(
                "\nWorkers are forked and exec'd by the spawner process, which has no filter \
                 (a worker would inherit it); it starts the worker executable only. \
                 README: \"The VMM confines itself\"."
            );
        }
        PolicyCommand::Show { policy, json, bpf } => {
            let p = load_policy(&policy)?;
            if bpf {
                let id = PolicyId::parse(&policy).context(
                    "--bpf shows an embedded program: blk, vmm or vmm/ROLE (`bulkhead policy list`)",
                )?;
                println!(
                    "policy {id}: {} BPF instructions ({} bytes), hash {}",
                    policies::bpf(id).len(),
                    policies::bpf_bytes(id).len(),
                    policies::bpf_hash(id)
                );
            } else if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&policies::audit::to_json(&p))?
                );
            } else {
                print!("{}", policies::audit::table(&p));
            }
        }
        PolicyCommand::Diff { old, new } => {
            let d = policies::audit::diff(&load_policy(&old)?, &load_policy(&new)?);
            if d.is_empty() {
                println!("no differences");
            } else {
                print!("{}", d.render());
                return Ok(ExitCode::from(1));
            }
        }
        PolicyCommand::Learn(args) => return learn(args),
        PolicyCommand::Lint { files } => {
            let policies_to_lint: Vec<policies::Policy> = if files.is_empty() {
                PolicyId::all()
                    .map(|id| policies::policy(id).clone())
                    .collect()
            } else {
                files
                    .iter()
                    .map(|f| load_policy(&f.display().to_string()))
                    .collect::<anyhow::Result<_>>()?
            };
            let mut findings = 0;
            for p in &policies_to_lint {
                for f in policies::audit::lint(p) {
                    println!("{}:{}: {}: {}", p.file, f.line, f.syscall, f.reason);
                    findings += 1;
                }
            }
            if findings > 0 {
                println!("{findings} finding(s): accept each with `accepted-risk: REASON` or narrow the rule");
                return Ok(ExitCode::from(1));
            }
            println!("{} policies, no findings", policies_to_lint.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the learn socket lands in a standalone worker.
const WORKER_LEARN_FD: RawFd = 3;

fn learn(args: LearnArgs) -> anyhow::Result<ExitCode> {
    let against = load_policy(&args.against)?;
    let recorder = Arc::new(Recorder::new(against));
    vmm_core::say!("bulkhead: {BANNER}");
    let provenance = if args.worker {
        format!("bulkhead-worker {}", args.command.join(" "))
    } else {
        format!("bulkhead run {}", args.command.join(" "))
    };
    // Opened before the workload: `bulkhead run` confines its main thread, which then
    // opens no path (and a bad path is better found before than after). Not truncated
    // until the report is written: a workload that fails leaves an existing file as it was.
    let create = |path: &PathBuf| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    let out = args.out.as_ref().map(create).transpose()?;
    let json = args.json.as_ref().map(create).transpose()?;
    let status = if args.worker {
        learn_standalone(&args, &recorder)?
    } else {
        let mut command = args.command.clone();
        if command.first().map(String::as_str) == Some("run") {
            command.remove(0);
        }
        let run = RunOnly::try_parse_from(std::iter::once("run".to_string()).chain(command))
            .map_err(|e| anyhow::anyhow!("bad `bulkhead run` arguments after `--`:\n{e}"))?
            .run;
        if run.print_config || run.log_flags_given() {
            anyhow::bail!(
                "--print-config and --log-* are not taken after `policy learn --`: learn logs \
                 to stderr as BULKHEAD_LOG says and prints its report"
            );
        }
        let run = run.into_config()?;
        if !run
            .vm
            .disks
            .iter()
            .any(|d| matches!(d.source, vmm_core::disk::config::DiskSource::Image(_)))
        {
            anyhow::bail!("no --disk is served by a worker: nothing to learn");
        }
        // The VMM's own threads learn too: a call outside their policies is recorded and
        // made, where `bulkhead run` would end by SIGSYS.
        vmm_core::confine::enable_learning();
        vmm_core::say!(
            "bulkhead: LEARN MODE: the VMM's own threads record, and make, every call their \
             policies forbid; not for untrusted guests"
        );
        crate::run_cmd::run(run, Some(recorder.clone()))?
    };
    let idle = recorder.wait_learners(Duration::from_secs(10));
    let report = recorder.report();
    print!("{}", report.summary());
    let (vmm_outside, vmm_not_kept) = if args.worker {
        (Vec::new(), 0)
    } else {
        vmm_outside_policies()
    };
    let replace = |path: &PathBuf, mut file: std::fs::File, text: &str| {
        file.set_len(0)
            .and_then(|()| file.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))
    };
    if let (Some(path), Some(file)) = (&args.out, out) {
        replace(path, file, &report.policy_text(&provenance))?;
        println!("wrote the learned policy to {}", path.display());
    }
    if let (Some(path), Some(file)) = (&args.json, json) {
        let mut value = report.to_json();
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "vmm_outside_policies".into(),
                vmm_outside
                    .iter()
                    .map(|(role, calls, example)| {
                        serde_json::json!({ "policy": role, "calls": calls, "example": example })
                    })
                    .collect(),
            );
            map.insert("vmm_outside_policies_not_kept".into(), vmm_not_kept.into());
        }
        replace(path, file, &serde_json::to_string_pretty(&value)?)?;
    }
    let diff = report.diff();
    if diff.is_empty() {
        println!("learned policy = {}", report.against.file);
    } else {
        println!("diff {} -> learned:", report.against.file);
        print!("{}", diff.render());
    }
    let mut failed = false;
    if status != 0 {
        vmm_core::say!("bulkhead: learn: the workload ended with status {status}; the learned set may be incomplete");
        failed = true;
    }
    if !idle || recorder.failures() > 0 {
        vmm_core::say!("bulkhead: learn: not every worker was recorded to its end");
        failed = true;
    }
    Ok(if failed {
        ExitCode::from(2)
    } else if report.missing.is_empty() && vmm_outside.is_empty() && vmm_not_kept == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints, and returns, the calls the VMM's threads made in learn mode that their
/// policies forbid: per policy and call number, the count and the first call decoded; and
/// how many such calls were not kept.
fn vmm_outside_policies() -> (Vec<(String, u64, String)>, usize) {
    let (calls, dropped) = vmm_core::confine::learned();
    let mut by_call: Vec<(String, i64, u64, String)> = Vec::new();
    for c in calls {
        let policy = match c.role {
            Some(role) => format!("vmm/{}", role.name()),
            None => "vmm/(its creator's)".to_string(),
        };
        match by_call
            .iter_mut()
            .find(|(p, nr, ..)| *p == policy && *nr == c.nr)
        {
            Some(entry) => entry.2 += 1,
            None => by_call.push((
                policy,
                c.nr,
                1,
                policies::decode::format_call(c.nr as u64, c.args),
            )),
        }
    }
    if by_call.is_empty() && dropped == 0 {
        println!(
            "VMM threads: 0 calls outside their policies ({} policies)",
            policies::VmmThread::ALL.len()
        );
        return (Vec::new(), 0);
    }
    println!("VMM threads: calls outside their policies (`bulkhead run` ends by SIGSYS on each):");
    for (policy, _, calls, example) in &by_call {
        println!("  {policy}: missing: {calls} calls, e.g. {example}");
    }
    if dropped > 0 {
        println!("  and {dropped} more, not kept");
    }
    let calls = by_call
        .into_iter()
        .map(|(policy, _, calls, example)| (policy, calls, example))
        .collect();
    (calls, dropped)
}

/// Runs a standalone worker in learn mode until it exits; returns its exit status.
fn learn_standalone(args: &LearnArgs, recorder: &Arc<Recorder>) -> anyhow::Result<u8> {
    let bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => vmm_core::worker::default_worker_bin()
            .context("bulkhead-worker is not beside bulkhead; pass --worker-bin")?,
    };
    let (ours, theirs) = UnixStream::pair().context("create the learn socket pair")?;
    let src = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(&args.command)
        .args(["--learn-fd", &WORKER_LEARN_FD.to_string()]);
    // SAFETY: runs between fork and exec in the child; dup2 is async-signal-safe and
    // touches only descriptors (dup2 clears FD_CLOEXEC on the copy; when the numbers are
    // equal the flag is cleared with fcntl instead).
    unsafe {
        cmd.pre_exec(move || {
            let ok = if src == WORKER_LEARN_FD {
                libc::fcntl(src, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(src, WORKER_LEARN_FD) >= 0
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    drop(theirs);
    // Ctrl-C reaches the worker (same process group) and ends the workload; this process
    // outlives it to write what was learned.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let learner = policies::learn::learner(ours, recorder.clone(), "worker".into());
    if let Err(e) = vmm_core::thread::spawn_unconfined(
        learner.thread_name(),
        "learn mode: an operator's tool",
        move || learner.run(),
    ) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e).context("start the learn thread");
    }
    let status = child.wait().context("wait for the worker")?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    })
}

/// Which threads or processes a policy confines, for `policy list`.
fn confines(id: policies::PolicyId) -> &'static str {
    use policies::{PolicyId, VmmThread};
    match id {
        PolicyId::Worker(..) => "the sandboxed worker (its only thread)",
        PolicyId::Vmm(VmmThread::Main) => "the main thread, once the vCPUs run",
        PolicyId::Vmm(VmmThread::Vcpu) => "vcpuN",
        PolicyId::Vmm(VmmThread::Frontend) => "<disk>-frontend",
        PolicyId::Vmm(VmmThread::Supervisor) => "<disk>-sup",
        PolicyId::Vmm(VmmThread::Deadline) => "vhost-deadline",
        PolicyId::Vmm(VmmThread::Output) => "<disk>-out",
        PolicyId::Vmm(VmmThread::Api) => "api, api-req",
        PolicyId::Vmm(VmmThread::Serial) => "serial-in",
        PolicyId::Vmm(VmmThread::Signals) => "signals",
    }
}
