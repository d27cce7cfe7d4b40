//! Policy -> seccompiler `SeccompFilter`s -> one BPF program, and the byte encoding the build
//! script writes to `$OUT_DIR`.
//!
//! seccompiler 0.5 gives one filter a single match action. A policy may use several (allow,
//! `errno ENOSYS`, log...), so the compiler builds one `SeccompFilter` per action, in
//! precedence order (trap, errno by number, log, allow: the most restrictive first), and
//! chains them: every filter but the last ends "no rule matched" with a sentinel return,
//! which is rewritten into a jump to the next filter; the last one returns the policy's
//! default action. Only the first filter keeps seccompiler's architecture check. A call
//! that matches rules with different actions therefore gets the most restrictive one.
//!
//! This file is shared with `build.rs` (`#[path]`).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::format::{self, Action, Op, ParseError, Policy, Width};

/// Size of one encoded `sock_filter`: `code` (u16 LE), `jt`, `jf`, `k` (u32 LE).
pub const INSN_LEN: usize = 8;

/// Sentinel return that marks "fall through to the next action group". A `SECCOMP_RET_TRACE`
/// value: the format has no trace action, so no rule returns it.
const FALLTHROUGH: SeccompAction = SeccompAction::Trace(0xb1c);

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_RET_K: u16 = 0x06;
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
/// Offset of `arch` in `struct seccomp_data`.
const SECCOMP_DATA_ARCH: u32 = 4;
/// Length of seccompiler's architecture check prologue.
const ARCH_CHECK_LEN: usize = 3;

/// seccompiler's input: syscall number -> rules (OR-ed).
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Errors turning a parsed policy into BPF.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// seccompiler rejected a condition, rule or filter.
    #[error("seccompiler rejected the {what} of `{syscall}` (line {line})")]
    Rule {
        /// Which part: condition or rule.
        what: &'static str,
        /// Syscall name.
        syscall: String,
        /// Policy line.
        line: usize,
        /// seccompiler's error.
        #[source]
        source: BackendError,
    },
    /// seccompiler rejected a whole filter (e.g. too large).
    #[error("seccompiler rejected the filter for action `{action}`")]
    Filter {
        /// The group's action.
        action: Action,
        /// seccompiler's error.
        #[source]
        source: BackendError,
    },
    /// The chained program exceeds the kernel's limit.
    #[error("the BPF program has {0} instructions; the kernel accepts at most 4096")]
    TooLong(usize),
    /// seccompiler's output does not have the shape the chaining relies on.
    #[error("unexpected seccompiler output: {0}")]
    Shape(&'static str),
    /// Embedded bytes are not a whole number of instructions.
    #[error("BPF byte length {0} is not a multiple of 8")]
    BadLength(usize),
    /// `default` override is `allow`.
    #[error("default action `allow` would turn the allow-list off")]
    AllowDefault,
}

/// Parse or compile failure of a policy source.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The text does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The parsed policy does not compile.
    #[error("{file}: {source}")]
    Compile {
        /// Policy file.
        file: String,
        /// What failed.
        #[source]
        source: CompileError,
    },
}

/// Parse `text` (named `file` in errors) and compile it: what the build script runs on every
/// `*.policy` file.
pub fn parse_and_compile(file: &str, text: &str) -> Result<(Policy, BpfProgram), BuildError> {
    let policy = format::parse(file, text)?;
    let program = compile(&policy).map_err(|source| BuildError::Compile {
        file: file.to_string(),
        source,
    })?;
    Ok((policy, program))
}

/// Compile `policy` with its own default action.
pub fn compile(policy: &Policy) -> Result<BpfProgram, CompileError> {
    compile_with_default(policy, policy.default)
}

/// Compile `policy` with another default action (e.g. `log`, to audit a policy through the
/// kernel's audit log without enforcing it). Rules whose
/// action equals `default` are dropped, as they change nothing.
pub fn compile_with_default(policy: &Policy, default: Action) -> Result<BpfProgram, CompileError> {
    if default == Action::Allow {
        return Err(CompileError::AllowDefault);
    }
    // action -> syscall number -> rules (file order within a syscall).
    let mut groups: BTreeMap<(u8, u32), (Action, RuleMap)> = BTreeMap::new();
    for rule in policy.rules.iter().filter(|r| r.action != default) {
        let chain = groups
            .entry(rule.action.precedence())
            .or_insert_with(|| (rule.action, BTreeMap::new()))
            .1
            .entry(rule.nr)
            .or_default();
        if rule.conditions.is_empty() {
            // seccompiler: an empty rule chain matches any arguments.
            chain.clear();
            continue;
        }
        let conditions = rule
            .conditions
            .iter()
            .map(|c| {
                let (len, op) = (
                    match c.width {
                        Width::Qword => SeccompCmpArgLen::Qword,
                        Width::Dword => SeccompCmpArgLen::Dword,
                    },
                    match c.op {
                        Op::Eq => SeccompCmpOp::Eq,
                        Op::Ne => SeccompCmpOp::Ne,
                        Op::Lt => SeccompCmpOp::Lt,
                        Op::Le => SeccompCmpOp::Le,
                        Op::Gt => SeccompCmpOp::Gt,
                        Op::Ge => SeccompCmpOp::Ge,
                        Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
                    },
                );
                SeccompCondition::new(c.arg, len, op, c.value)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CompileError::Rule {
                what: "condition",
                syscall: rule.syscall.clone(),
                line: rule.line,
                source,
            })?;
        let compiled = SeccompRule::new(conditions).map_err(|source| CompileError::Rule {
            what: "rule",
            syscall: rule.syscall.clone(),
            line: rule.line,
            source,
        })?;
        // A syscall that already has an unconditional rule in this group stays unconditional
        // (the parser rejects that case anyway).
        let unconditional = policy
            .rules
            .iter()
            .any(|r| r.nr == rule.nr && r.action == rule.action && r.conditions.is_empty());
        if !unconditional {
            chain.push(compiled);
        }
    }

    let count = groups.len();
    let mut program: BpfProgram = Vec::new();
    for (index, (action, rules)) in groups.into_values().enumerate() {
        let last = index + 1 == count;
        let mismatch = if last {
            to_seccomp(default)
        } else {
            FALLTHROUGH
        };
        let filter = SeccompFilter::new(rules, mismatch, to_seccomp(action), TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|source| CompileError::Filter { action, source })?;
        let first = program.is_empty();
        let body = check_arch_prologue(&filter)?;
        if first {
            program.extend_from_slice(&filter[..ARCH_CHECK_LEN]);
        }
        let group_start = program.len();
        program.extend_from_slice(body);
        if !last {
            let next = program.len();
            let fallthrough = u32::from(FALLTHROUGH);
            for (pc, insn) in program.iter_mut().enumerate().skip(group_start) {
                if insn.code == BPF_RET_K && insn.k == fallthrough {
                    *insn = sock_filter {
                        code: BPF_JMP_JA,
                        jt: 0,
                        jf: 0,
                        k: (next - pc - 1) as u32,
                    };
                }
            }
        }
    }
    if program.is_empty() {
        // No rule survives (every rule had the default action): arch check + default.
        let filter = SeccompFilter::new(
            BTreeMap::new(),
            to_seccomp(default),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|source| CompileError::Filter {
            action: default,
            source,
        })?;
        program = filter;
    }
    if program.len() > 4096 {
        return Err(CompileError::TooLong(program.len()));
    }
    Ok(program)
}

/// The program after seccompiler's architecture check (load arch, compare, kill).
fn check_arch_prologue(filter: &[sock_filter]) -> Result<&[sock_filter], CompileError> {
    match filter.first() {
        Some(insn)
            if filter.len() > ARCH_CHECK_LEN
                && insn.code == BPF_LD_W_ABS
                && insn.k == SECCOMP_DATA_ARCH =>
        {
            Ok(&filter[ARCH_CHECK_LEN..])
        }
        _ => Err(CompileError::Shape("no architecture check prologue")),
    }
}

fn to_seccomp(action: Action) -> SeccompAction {
    match action {
        Action::Allow => SeccompAction::Allow,
        Action::Trap => SeccompAction::Trap,
        Action::Log => SeccompAction::Log,
        Action::Errno(n) => SeccompAction::Errno(n),
    }
}

/// Encode a program as `INSN_LEN`-byte little-endian instructions.
pub fn to_bytes(program: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * INSN_LEN);
    for insn in program {
        out.extend_from_slice(&insn.code.to_le_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_le_bytes());
    }
    out
}

/// Decode what [`to_bytes`] wrote.
pub fn from_bytes(bytes: &[u8]) -> Result<BpfProgram, CompileError> {
    if bytes.len() % INSN_LEN != 0 {
        return Err(CompileError::BadLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(INSN_LEN)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "process: blk\nthread: main\ndefault: trap\narch: x86_64\n";

    #[test]
    fn bad_policy_fails_with_file_and_line() {
        let text = format!("{HEADER}read => allow: ok\nopne => allow: typo\n");
        let err = parse_and_compile("policies/bad.policy", &text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "policies/bad.policy:6:1: unknown syscall `opne` on x86_64"
        );
        let text = format!("{HEADER}read => allow\n");
        let err = parse_and_compile("bad.policy", &text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad.policy:5:6: rule for `read` has no justification (`=> action: why the worker needs it`)"
        );
    }

    #[test]
    fn bytes_round_trip() {
        let text = format!("{HEADER}read => allow: r\nclone3 => errno ENOSYS: c\n");
        let (_, program) = parse_and_compile("t", &text).unwrap();
        let bytes = to_bytes(&program);
        assert_eq!(bytes.len(), program.len() * INSN_LEN);
        assert_eq!(from_bytes(&bytes).unwrap(), program);
        assert!(matches!(
            from_bytes(&bytes[1..]),
            Err(CompileError::BadLength(_))
        ));
    }

    #[test]
    fn groups_are_chained_without_sentinels() {
        let text = format!(
            "{HEADER}read => allow: r\nfcntl arg1 == 3 => errno EPERM: f\nfcntl => allow: rest\n\
             clone3 => errno ENOSYS: c\nwrite => log: w\n"
        );
        let (_, program) = parse_and_compile("t", &text).unwrap();
        let sentinel = u32::from(FALLTHROUGH);
        assert!(!program
            .iter()
            .any(|i| i.code == BPF_RET_K && i.k == sentinel));
        // One architecture check only.
        let arch_loads = program
            .iter()
            .filter(|i| i.code == BPF_LD_W_ABS && i.k == SECCOMP_DATA_ARCH)
            .count();
        assert_eq!(arch_loads, 1);
        // Every jump stays inside the program.
        for (pc, insn) in program.iter().enumerate() {
            if insn.code == BPF_JMP_JA {
                assert!(pc + 1 + (insn.k as usize) < program.len());
            } else if insn.code & 0x07 == 0x05 {
                assert!(pc + 1 + usize::from(insn.jt.max(insn.jf)) < program.len());
            }
        }
        // The program ends with the default action (SECCOMP_RET_TRAP).
        let last = program.last().unwrap();
        assert_eq!((last.code, last.k), (BPF_RET_K, 0x0003_0000));
    }

    #[test]
    fn learn_mode_default() {
        let text = format!("{HEADER}read => allow: r\nclone3 => errno ENOSYS: c\n");
        let policy = format::parse("t", &text).unwrap();
        let program = compile_with_default(&policy, Action::Log).unwrap();
        assert_eq!(program.last().unwrap().k, 0x7ffc_0000); // SECCOMP_RET_LOG
        assert!(matches!(
            compile_with_default(&policy, Action::Allow),
            Err(CompileError::AllowDefault)
        ));
    }
}
