//! The last seccomp violations of this VM's workers, kept for metrics and the control API
//! (the log line alone is gone once it scrolls by).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

/// How many violations are kept; older ones are dropped (their count is not).
pub const KEPT: usize = 16;

/// One worker killed by its policy, as its status page recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Disk id, e.g. `blk1`.
    pub disk: String,
    /// The confined worker's host pid.
    pub pid: u32,
    /// Policy (worker kind and thread role), e.g. `blk/main`.
    pub policy: String,
    /// Syscall number and argument registers from siginfo.
    pub nr: u64,
    pub args: [u64; 6],
    /// Decoded, e.g. `openat(AT_FDCWD, 0x7f.., O_RDONLY|O_CLOEXEC, 0)`.
    pub call: String,
    pub when: SystemTime,
}

/// A bounded log of violations, newest last, with a running total.
#[derive(Debug, Default)]
pub struct ViolationLog {
    inner: Mutex<(u64, VecDeque<Violation>)>,
}

impl ViolationLog {
    /// Records one violation.
    pub fn push(&self, v: Violation) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        if g.1.len() == KEPT {
            g.1.pop_front();
        }
        g.1.push_back(v);
    }

    /// Violations since the VM started.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The kept violations, oldest first.
    pub fn recent(&self) -> Vec<Violation> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().cloned().collect()
    }

    /// `stats violations total=N`, then one `violation ...` line per kept record.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("stats violations total={}", self.total())];
        for v in self.recent() {
            let secs = v
                .when
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            out.push(format!(
                "violation {} pid={} policy={} nr={} unix_time={secs} call={}",
                v.disk, v.pid, v.policy, v.nr, v.call
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u64) -> Violation {
        Violation {
            disk: "blk0".into(),
            pid: 7,
            policy: "blk/main".into(),
            nr: n,
            args: [0; 6],
            call: format!("syscall_{n}()"),
            when: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_all() {
        let log = ViolationLog::default();
        for n in 0..(KEPT as u64 + 3) {
            log.push(v(n));
        }
        assert_eq!(log.total(), KEPT as u64 + 3);
        let recent = log.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].nr, 3);
        assert_eq!(recent[KEPT - 1].nr, KEPT as u64 + 2);
        let lines = log.lines();
        assert_eq!(lines[0], format!("stats violations total={}", KEPT + 3));
        assert_eq!(
            lines[1],
            "violation blk0 pid=7 policy=blk/main nr=3 unix_time=0 call=syscall_3()"
        );
    }
}
