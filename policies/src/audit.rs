//! Audit tools over parsed policies: a readable table, JSON, a rule-by-rule diff and a
//! lint that flags dangerous rules unless a reviewer accepted the risk with a reason.

use std::fmt::Write as _;

use crate::format::{Action, Op, Policy, Rule};

/// The policy as a table: syscall, conditions, action, flags, justification.
pub fn table(policy: &Policy) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {} / thread {} ({}, default {}, {} rules)",
        policy.process,
        policy.thread,
        policy.arch,
        policy.default,
        policy.rules.len()
    );
    let conds = |r: &Rule| {
        let c: Vec<String> = r.conditions.iter().map(ToString::to_string).collect();
        if c.is_empty() {
            "-".to_string()
        } else {
            c.join(" && ")
        }
    };
    let flags = |r: &Rule| {
        let mut f = Vec::new();
        if r.accepted_risk().is_some() {
            f.push("accepted-risk");
        }
        if r.rare_path().is_some() {
            f.push("rare-path");
        }
        if f.is_empty() {
            "-".to_string()
        } else {
            f.join(",")
        }
    };
    let w_sys = policy
        .rules
        .iter()
        .map(|r| r.syscall.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let w_cond = policy
        .rules
        .iter()
        .map(|r| conds(r).len())
        .max()
        .unwrap_or(10)
        .max(10);
    let w_act = policy
        .rules
        .iter()
        .map(|r| r.action.to_string().len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:w_sys$}  {:w_cond$}  {:w_act$}  {:24}  justification",
        "syscall", "conditions", "action", "flags"
    );
    for r in &policy.rules {
        let _ = writeln!(
            out,
            "{:w_sys$}  {:w_cond$}  {:w_act$}  {:24}  {}",
            r.syscall,
            conds(r),
            r.action.to_string(),
            flags(r),
            r.justification
        );
        for f in &r.flags {
            let _ = writeln!(out, "{:w_sys$}  {f}", "");
        }
    }
    out
}

/// The policy as JSON (for machines).
pub fn to_json(policy: &Policy) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = policy
        .rules
        .iter()
        .map(|r| {
            serde_json::json!({
                "syscall": r.syscall,
                "nr": r.nr,
                "conditions": r.conditions.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "action": r.action.to_string(),
                "justification": r.justification,
                "accepted_risk": r.accepted_risk(),
                "rare_path": r.rare_path(),
                "line": r.line,
            })
        })
        .collect();
    serde_json::json!({
        "process": policy.process,
        "thread": policy.thread,
        "arch": policy.arch,
        "default": policy.default.to_string(),
        "rules": rules,
    })
}

/// What changed between two policies, rule by rule.
#[derive(Debug, Default)]
pub struct PolicyDiff {
    pub header: Vec<String>,
    pub added: Vec<Rule>,
    pub removed: Vec<Rule>,
    /// Same syscall and conditions, different action, justification or flags.
    pub changed: Vec<(Rule, Rule)>,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.header.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }

    /// `+`, `-` and `~` lines in canonical policy syntax.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for h in &self.header {
            let _ = writeln!(out, "~ {h}");
        }
        for r in &self.removed {
            let _ = writeln!(out, "- {r}");
        }
        for r in &self.added {
            let _ = writeln!(out, "+ {r}");
        }
        for (old, new) in &self.changed {
            let _ = writeln!(out, "~ {old}\n  -> {new}");
        }
        out
    }
}

/// Compares `old` with `new`.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    for (what, a, b) in [
        ("process", &old.process, &new.process),
        ("thread", &old.thread, &new.thread),
        ("arch", &old.arch, &new.arch),
    ] {
        if a != b {
            d.header.push(format!("{what}: {a} -> {b}"));
        }
    }
    if old.default != new.default {
        d.header
            .push(format!("default: {} -> {}", old.default, new.default));
    }
    for o in &old.rules {
        match new.rules.iter().find(|n| n.identity() == o.identity()) {
            None => d.removed.push(o.clone()),
            Some(n) => {
                if n.action != o.action || n.justification != o.justification || n.flags != o.flags
                {
                    d.changed.push((o.clone(), n.clone()));
                }
            }
        }
    }
    for n in &new.rules {
        if !old.rules.iter().any(|o| o.identity() == n.identity()) {
            d.added.push(n.clone());
        }
    }
    d
}

/// A rule the lint flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub line: usize,
    pub syscall: String,
    pub reason: String,
}

/// Calls a sandboxed worker must never be allowed, whatever the arguments.
const FORBIDDEN: &[(&str, &str)] = &[
    ("execve", "runs a new program"),
    ("execveat", "runs a new program"),
    ("ptrace", "inspects or controls other processes"),
    ("process_vm_readv", "reads another process's memory"),
    ("process_vm_writev", "writes another process's memory"),
    ("open", "opens paths"),
    ("openat", "opens paths"),
    ("openat2", "opens paths"),
    ("creat", "creates files"),
    ("socket", "creates sockets"),
    ("socketpair", "creates sockets"),
    ("connect", "connects sockets"),
    ("bind", "binds sockets"),
    ("listen", "listens on sockets"),
    ("accept", "accepts connections"),
    ("accept4", "accepts connections"),
    ("mount", "changes mounts"),
    ("umount2", "changes mounts"),
    ("pivot_root", "changes the root"),
    ("chroot", "changes the root"),
    ("unshare", "creates namespaces"),
    ("setns", "enters namespaces"),
    ("bpf", "loads BPF programs"),
    ("io_uring_setup", "creates io_uring rings after sandboxing"),
    (
        "io_uring_register",
        "changes io_uring rings and their restrictions",
    ),
    ("perf_event_open", "a large kernel attack surface"),
    ("userfaultfd", "a classic exploitation primitive"),
    ("keyctl", "the kernel keyring"),
    ("add_key", "the kernel keyring"),
    ("init_module", "loads kernel modules"),
    ("finit_module", "loads kernel modules"),
    ("kexec_load", "replaces the kernel"),
    ("personality", "changes the execution domain"),
];

const PROT_EXEC: u64 = 0x4;
const CLONE_THREAD: u64 = 0x10000;

fn permits(r: &Rule) -> bool {
    matches!(r.action, Action::Allow | Action::Log)
}

fn excludes_prot_exec(r: &Rule) -> bool {
    r.conditions.iter().any(|c| {
        c.arg == 2
            && matches!(c.op, Op::MaskedEq(mask) if mask & PROT_EXEC != 0)
            && c.value & PROT_EXEC == 0
    })
}

fn requires_clone_thread(r: &Rule) -> bool {
    r.conditions.iter().any(|c| {
        c.arg == 0
            && matches!(c.op, Op::MaskedEq(mask) if mask & CLONE_THREAD != 0)
            && c.value & CLONE_THREAD != 0
    })
}

fn has_condition_on(r: &Rule, arg: u8) -> bool {
    r.conditions.iter().any(|c| c.arg == arg)
}

/// Dangerous rules that no reviewer accepted (`accepted-risk: reason`).
pub fn lint(policy: &Policy) -> Vec<Finding> {
    let mut findings = Vec::new();
    for r in policy
        .rules
        .iter()
        .filter(|r| permits(r) && r.accepted_risk().is_none())
    {
        let reason = if let Some((_, why)) = FORBIDDEN.iter().find(|(name, _)| *name == r.syscall) {
            Some(format!("{} {why}", r.syscall))
        } else {
            match r.syscall.as_str() {
                "mmap" | "mprotect" | "pkey_mprotect" if !excludes_prot_exec(r) => Some(format!(
                    "{} may create executable memory (no `arg2 & PROT_EXEC == 0`)",
                    r.syscall
                )),
                "kill" | "tgkill" | "tkill" | "rt_sigqueueinfo" | "rt_tgsigqueueinfo"
                | "pidfd_send_signal"
                    if !has_condition_on(r, 0) =>
                {
                    Some(format!(
                        "{} can signal any process (no condition on the pid)",
                        r.syscall
                    ))
                }
                "clone" if !requires_clone_thread(r) => Some(
                    "clone may create processes (no `arg0 & CLONE_THREAD == CLONE_THREAD`)"
                        .to_string(),
                ),
                "clone3" => {
                    Some("clone3's flags live in memory seccomp cannot inspect".to_string())
                }
                "ioctl" if !has_condition_on(r, 1) => Some("ioctl with any request".to_string()),
                "prctl" if !has_condition_on(r, 0) => Some("prctl with any option".to_string()),
                "fcntl" if !has_condition_on(r, 1) => Some("fcntl with any command".to_string()),
                _ => None,
            }
        };
        if let Some(reason) = reason {
            findings.push(Finding {
                line: r.line,
                syscall: r.syscall.clone(),
                reason,
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::parse;

    const HEAD: &str = "process: blk\nthread: main\ndefault: trap\narch: x86_64\n";

    fn policy(rules: &str) -> Policy {
        parse("t.policy", &format!("{HEAD}{rules}")).unwrap()
    }

    #[test]
    fn the_shipped_policies_lint_clean() {
        for id in crate::PolicyId::all() {
            assert_eq!(lint(crate::policy(id)), vec![], "{id}");
        }
    }

    #[test]
    fn dangerous_rules_are_flagged_unless_accepted() {
        let p = policy(
            "openat => allow : x\n\
             mmap => allow : y\n\
             kill => allow : z\n\
             clone => allow : w\n\
             ioctl => allow : v\n\
             socket => errno EPERM : refusing is fine\n\
             mprotect arg2 & PROT_EXEC == 0 => allow : fine\n",
        );
        let findings = lint(&p);
        let found: Vec<&str> = findings.iter().map(|f| f.syscall.as_str()).collect();
        assert_eq!(found, ["openat", "mmap", "kill", "clone", "ioctl"]);
        let accepted =
            policy("openat => allow : x\n    accepted-risk: reviewed, paths are empty\n");
        assert_eq!(lint(&accepted), vec![]);
    }

    #[test]
    fn diff_reports_added_removed_and_changed_rules() {
        let old = policy("read => allow : a\nwrite => allow : b\nclose => allow : c\n");
        let new = policy("read => allow : a\nwrite => allow : b, reworded\nbrk => allow : d\n");
        let d = diff(&old, &new);
        assert_eq!(
            d.removed
                .iter()
                .map(|r| r.syscall.as_str())
                .collect::<Vec<_>>(),
            ["close"]
        );
        assert_eq!(
            d.added
                .iter()
                .map(|r| r.syscall.as_str())
                .collect::<Vec<_>>(),
            ["brk"]
        );
        assert_eq!(d.changed.len(), 1);
        assert!(diff(&old, &old).is_empty());
        let text = d.render();
        assert!(
            text.contains("- close") && text.contains("+ brk") && text.contains("~ write"),
            "{text}"
        );
    }

    #[test]
    fn json_carries_every_field() {
        let p = policy("fcntl arg1 == F_GETFL => allow : why\n    rare-path: seldom\n");
        let j = to_json(&p);
        let r = &j["rules"][0];
        assert_eq!(r["syscall"], "fcntl");
        assert_eq!(r["action"], "allow");
        assert_eq!(r["rare_path"], "seldom");
        assert_eq!(r["conditions"][0], "arg1 == F_GETFL");
        assert!(table(&p).contains("rare-path"));
    }
}
