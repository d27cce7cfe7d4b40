//! What the VMM tells its operator: how a worker was confined and how it ended (a crash,
//! a policy violation, a hang), and the VM's exit counters.

use std::sync::Arc;
use std::time::Duration;

use crate::devices::virtio_mmio::VirtioMmioDevice;
use crate::violations::{Violation, ViolationLog};

/// Exit counters of a VM.
#[derive(Debug, Clone)]
pub struct VmStats {
    pub vcpus: Vec<Arc<crate::vcpu::VcpuStats>>,
    pub devices: Vec<Arc<VirtioMmioDevice>>,
    /// The workers' last policy violations.
    pub violations: Arc<ViolationLog>,
}

impl VmStats {
    /// One line per vCPU and per device, `key=value` (tests parse them).
    pub fn lines(&self) -> Vec<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let kvm = v
                .kvm
                .as_ref()
                .and_then(|k| k.read(&["io_exits", "mmio_exits"]).ok())
                .map(|vals| {
                    let show = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
                    format!(
                        " kvm_io_exits={} kvm_mmio_exits={}",
                        show(vals[0]),
                        show(vals[1])
                    )
                })
                .unwrap_or_default();
            out.push(format!(
                "stats vcpu{i} io_exits={} mmio_exits={} io_in={} io_out={} mmio_read={} mmio_write={} other={}{kvm}",
                v.io_exits(),
                v.mmio_exits(),
                v.io_in.load(Relaxed),
                v.io_out.load(Relaxed),
                v.mmio_read.load(Relaxed),
                v.mmio_write.load(Relaxed),
                v.other.load(Relaxed)
            ));
        }
        for d in &self.devices {
            let e = &d.exits;
            out.push(format!(
                "stats {} queue_notify={} interrupt_status={} interrupt_ack={} config={} other={}",
                d.id,
                e.queue_notify.load(Relaxed),
                e.interrupt_status.load(Relaxed),
                e.interrupt_ack.load(Relaxed),
                e.config.load(Relaxed),
                e.other.load(Relaxed)
            ));
        }
        out.extend(self.violations.lines());
        out
    }

    /// Logs [`Self::lines`], each disk's inside its `disk` span (as every line about a
    /// disk is).
    pub fn log(&self) {
        for line in self.lines() {
            let disk = line
                .strip_prefix("stats ")
                .and_then(|rest| rest.split(' ').next())
                .filter(|word| self.devices.iter().any(|d| d.id == *word));
            match disk {
                Some(id) => {
                    let _in_disk = tracing::info_span!("disk", id = %id).entered();
                    tracing::info!("{line}");
                }
                None => tracing::info!("{line}"),
            }
        }
    }
}

/// Logs the sandbox facts of the confined worker `confined` (the pid the VMM checked is
/// its reaper's child), read by `facts`, once it has installed its filter, or says it
/// could not see them.
pub fn report_confinement(
    id: &str,
    confined: Option<u32>,
    mut facts: impl FnMut(u32) -> Option<crate::sandbox_report::SandboxFacts>,
) {
    let Some(pid) = confined else {
        tracing::warn!("worker {id}: no confined process under its reaper to check");
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(facts) = facts(pid) {
            if facts.seccomp == "2" {
                let verdict = if facts.confined() {
                    "confined"
                } else {
                    "NOT fully confined"
                };
                tracing::info!("worker {id} {verdict}: {facts}");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!("worker {id}: could not confirm its confinement within 5 s");
}

/// One log line for a worker that ended: the pid the VMM knows for it (`confined`), and
/// how it ended. A crash
/// (a fault, abort or panic that the worker's own record and its reaper's agree on) is
/// reported with its signal; a policy violation from the status page is decoded by name
/// and kept in `violations`, but only when the reaper saw the kernel kill the worker by
/// SIGSYS: a record alone is the worker's word, and a compromised worker could write one.
pub fn report_worker_end(
    id: &str,
    confined: u32,
    status: &ipc::status::StatusMapping,
    how: &str,
    reaper: Option<std::process::ExitStatus>,
    violations: &ViolationLog,
) -> WorkerEndCause {
    use ipc::status::WorkerEnd;
    use std::os::unix::process::ExitStatusExt;
    // The end record counts only if the reaper itself ended as it says (it exits the way
    // its worker did). A reaper that was killed (by the VMM, on a hang or a bad reply)
    // wrote nothing, and whatever the page holds is the worker's own word.
    let end = status
        .end()
        .filter(|e| reaper.is_some_and(|r| r.code() == Some(e.exit_code())));
    if let Some(crash) = ipc::status::describe_crash(status.crash(), end) {
        tracing::error!("worker {id} (pid {confined}) {crash} ({how})");
        return WorkerEndCause {
            cause: "crash",
            call: None,
        };
    }
    // A trap kills the worker by SIGSYS (its handler records, then traps again with the
    // signal blocked): only the kernel's verdict, seen by the reaper, makes a violation.
    let trapped = end == Some(WorkerEnd::Signaled(libc::SIGSYS));
    // Otherwise: killed by a signal (from outside, or by the kernel's OOM killer), or it
    // exited by itself.
    let plain = if reaper.is_some_and(|r| r.signal().is_some())
        || matches!(end, Some(WorkerEnd::Signaled(_)))
    {
        "killed"
    } else {
        "exited"
    };
    match status.violation() {
        None if trapped => {
            tracing::error!(
                "worker {id} (pid {confined}) was killed by SIGSYS: a seccomp trap its handler \
                 did not record ({how})"
            );
            WorkerEndCause {
                cause: "violation",
                call: None,
            }
        }
        Some(v) if !trapped => {
            tracing::error!(
                "worker {id} (pid {confined}) ended ({how}) with a violation record (nr {}) in \
                 its status page that the kernel did not confirm (it was not killed by SIGSYS): \
                 the worker's claim, not counted",
                v.nr
            );
            WorkerEndCause {
                cause: plain,
                call: None,
            }
        }
        Some(v) => {
            let call = policies::decode::format_call(v.nr, v.args);
            tracing::error!("worker {id} (pid {confined}) violated policy blk: {call} ({how})");
            violations.push(Violation {
                disk: id.to_string(),
                pid: confined,
                policy: "blk/main".to_string(),
                nr: v.nr,
                args: v.args,
                call: call.clone(),
                when: std::time::SystemTime::now(),
            });
            WorkerEndCause {
                cause: "violation",
                call: Some(call),
            }
        }
        None => {
            tracing::error!("worker {id} (pid {confined}) {how}");
            WorkerEndCause {
                cause: plain,
                call: None,
            }
        }
    }
}

/// What ended a worker, as the metrics and the events name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEndCause {
    /// `crash`, `violation`, `killed` or `exited` (see
    /// [`crate::supervisor::counters::CAUSES`]).
    pub cause: &'static str,
    /// The forbidden call, decoded, for a violation the kernel confirmed.
    pub call: Option<String>,
}

pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(ipc::status::EXIT_POLICY_VIOLATION), _) => "exited on a seccomp violation".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}
