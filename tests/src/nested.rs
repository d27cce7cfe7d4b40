//! The nested harness (`tests/nested/run.sh`) from the tests: runs one scenario, where
//! bulkhead boots a stock Linux L2 inside an L1 Linux under QEMU TCG with an emulated SVM,
//! and reads what it printed.
//!
//! The run's transcript is L1's serial console: `NEST ...` lines from L1's scripts, L2's
//! console as `L2 NAME| ...` and bulkhead's log as `BH NAME| ...` (NAME: the VM). Every
//! assertion message carries the whole transcript, so a failing test shows both layers.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{
    bulkhead_bin, guest_dir, require_file, require_tool, run_with_deadline, worker_bin,
    worker_hooks_bin, workspace_root, RunResult,
};

const KIT: &str = "tests/guest/guestkit.sh";

/// A finished run of one scenario.
#[derive(Debug)]
pub struct NestedRun {
    pub run: RunResult,
    lines: Vec<String>,
}

impl NestedRun {
    /// Runs `scenario` with `args` in a fresh L1, allowing it `limit`. Fails (never skips)
    /// when QEMU, the guest kit or a binary is missing; the harness itself fails when L1
    /// has no SVM or no /dev/kvm.
    pub fn start(scenario: &str, args: &[&str], limit: Duration) -> NestedRun {
        require_tool("qemu-system-x86_64", "qemu-system-x86");
        for f in ["vmlinuz", "vmlinux", "initramfs.cpio.gz", "l1-modules.cpio"] {
            require_file(guest_dir().join(f), KIT);
        }
        let mut cmd = std::process::Command::new(workspace_root().join("tests/nested/run.sh"));
        cmd.env("BULKHEAD_BIN", bulkhead_bin())
            .env("BULKHEAD_WORKER_BIN", worker_bin())
            .env("BULKHEAD_WORKER_HOOKS_BIN", worker_hooks_bin())
            .env("BULKHEAD_GUEST_DIR", guest_dir())
            .arg("--timeout")
            .arg(limit.as_secs().to_string())
            .arg(scenario)
            .args(args);
        // run.sh stops QEMU at `limit`; the deadline here only catches a stuck runner.
        let run = run_with_deadline(cmd, limit + Duration::from_secs(60));
        // After a stalled L1 (run.sh's `NEST restart` line) only the fresh run counts; the
        // transcript keeps both.
        let all: Vec<&str> = run.stdout.lines().collect();
        let fresh = all
            .iter()
            .rposition(|l| l.starts_with("NEST restart"))
            .map_or(0, |i| i + 1);
        let lines = all[fresh..].iter().map(|l| l.to_string()).collect();
        let nested = NestedRun { run, lines };
        assert!(
            !nested.run.killed && nested.run.code != Some(124),
            "the nested run did not finish within {} s: {}",
            limit.as_secs(),
            nested.transcript()
        );
        let errors: Vec<&String> = nested
            .lines
            .iter()
            .filter(|l| l.starts_with("NEST error"))
            .collect();
        assert!(
            errors.is_empty(),
            "the harness failed: {errors:?}: {}",
            nested.transcript()
        );
        let failed: Vec<&String> = nested
            .lines
            .iter()
            .filter(|l| l.starts_with("NEST fail"))
            .collect();
        assert_eq!(
            nested.run.code,
            Some(0),
            "the scenario failed: {failed:#?}: {}",
            nested.transcript()
        );
        nested
    }

    /// Everything L1, L2 and bulkhead printed, and the runner's own messages.
    pub fn transcript(&self) -> String {
        self.run.transcript()
    }

    /// `NEST fact KEY=VALUE` lines of L1's scripts.
    pub fn facts(&self) -> BTreeMap<String, String> {
        facts(self.lines.iter().map(String::as_str), "NEST fact ")
    }

    /// The value of L1 fact `key`; panics with the transcript when it is missing.
    pub fn fact(&self, key: &str) -> String {
        self.facts()
            .remove(key)
            .unwrap_or_else(|| panic!("no fact {key}: {}", self.transcript()))
    }

    /// Lines of VM `vm`'s serial console (L2's console), prefix removed.
    pub fn console(&self, vm: &str) -> Vec<&str> {
        self.tagged(&format!("L2 {vm}| "))
    }

    /// Lines of VM `vm`'s bulkhead log (its stderr), prefix removed.
    pub fn log(&self, vm: &str) -> Vec<&str> {
        self.tagged(&format!("BH {vm}| "))
    }

    /// `NESTL2 fact KEY=VALUE` lines that L2 printed on VM `vm`'s console.
    pub fn l2_facts(&self, vm: &str) -> BTreeMap<String, String> {
        facts(self.console(vm).into_iter(), "NESTL2 fact ")
    }

    /// L2 fact `key` of VM `vm`; panics with the transcript when it is missing.
    pub fn l2_fact(&self, vm: &str, key: &str) -> String {
        self.l2_facts(vm)
            .remove(key)
            .unwrap_or_else(|| panic!("VM {vm}: L2 reported no {key}: {}", self.transcript()))
    }

    fn tagged(&self, prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    }
}

fn facts<'a>(lines: impl Iterator<Item = &'a str>, prefix: &str) -> BTreeMap<String, String> {
    lines
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_key_value_lines_with_their_prefix() {
        let lines = [
            "NEST fact a.rc=0",
            "L2 vm| NESTL2 fact cpus=0-1",
            "NEST fact b=x=y",
            "NEST note fact c=1",
        ];
        let f = facts(lines.iter().copied(), "NEST fact ");
        assert_eq!(f.len(), 2);
        assert_eq!(f["a.rc"], "0");
        assert_eq!(f["b"], "x=y");
    }
}
