//! The policy file format (see `policies/README.md`): parser and parsed representation.
//!
//! ```text
//! process: blk
//! thread:  main
//! default: trap
//! arch:    x86_64
//!
//! # syscall  [conditions]               => action       : justification
//! read                                  => allow        : eventfd counters, vhost-user socket
//! mmap       arg2 & PROT_EXEC == 0      => allow        : guest RAM regions; never executable
//! clone3                                => errno ENOSYS : glibc falls back to clone
//!     accepted-risk: <why the risk is worth it>
//!     rare-path: <when this runs>
//! ```
//!
//! This file is shared with `build.rs` (`#[path]`): it may only use `crate::syscalls` and
//! `crate::constants`, which the build script includes the same way.

use std::collections::HashMap;
use std::fmt;

use crate::{constants, syscalls};

/// The only architecture the format knows the syscall numbers of.
pub const ARCH_X86_64: &str = "x86_64";

/// What the filter does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the call through.
    Allow,
    /// Deliver SIGSYS (the worker's handler records the call and exits).
    Trap,
    /// Let the call through and log it to the audit log.
    Log,
    /// Fail the call with this errno, without running it.
    Errno(u32),
}

impl Action {
    /// Precedence when one call matches rules with different actions: the lowest wins (most
    /// restrictive first, the order the kernel uses between stacked filters).
    pub fn precedence(self) -> (u8, u32) {
        match self {
            Action::Trap => (0, 0),
            Action::Errno(n) => (1, n),
            Action::Log => (2, 0),
            Action::Allow => (3, 0),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Allow => f.write_str("allow"),
            Action::Trap => f.write_str("trap"),
            Action::Log => f.write_str("log"),
            Action::Errno(n) => match constants::errno_name(n) {
                Some(name) => write!(f, "errno {name}"),
                None => write!(f, "errno {n}"),
            },
        }
    }
}

/// How much of the 64-bit argument register a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// All 64 bits (`argN`): the default, and the strict choice.
    Qword,
    /// The low 32 bits only (`argN:32`), for `int` arguments the kernel truncates.
    Dword,
}

/// Comparison operator of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<` (unsigned)
    Lt,
    /// `<=` (unsigned)
    Le,
    /// `>` (unsigned)
    Gt,
    /// `>=` (unsigned)
    Ge,
    /// `& mask ==`: `(arg & mask) == value`.
    MaskedEq(u64),
}

/// One argument condition; all conditions of a rule must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// Argument index, 0..=5.
    pub arg: u8,
    /// Compared width.
    pub width: Width,
    /// Operator.
    pub op: Op,
    /// Resolved value.
    pub value: u64,
    /// The value as written (for display), e.g. `PROT_READ|PROT_WRITE`.
    pub value_text: String,
    /// The mask as written, for `MaskedEq`.
    pub mask_text: Option<String>,
}

/// Identity of a condition: argument, width, operator, value.
type ConditionKey = (u8, Width, Op, u64);
/// Identity of a rule regardless of condition order: syscall and sorted condition keys.
type RuleKey = (i64, Vec<ConditionKey>);

impl Condition {
    fn key(&self) -> ConditionKey {
        (self.arg, self.width, self.op, self.value)
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "arg{}", self.arg)?;
        if self.width == Width::Dword {
            f.write_str(":32")?;
        }
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::MaskedEq(mask) => {
                match &self.mask_text {
                    Some(text) => write!(f, " & {text}")?,
                    None => write!(f, " & {mask:#x}")?,
                }
                "=="
            }
        };
        write!(f, " {op} {}", self.value_text)
    }
}

/// A reviewed exception attached to a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flag {
    /// `accepted-risk: reason`: the rule grants more than the worker strictly needs.
    AcceptedRisk(String),
    /// `rare-path: reason`: the call happens only on an unusual path (tests rarely see it).
    RarePath(String),
}

impl Flag {
    fn keyword(&self) -> &'static str {
        match self {
            Flag::AcceptedRisk(_) => "accepted-risk",
            Flag::RarePath(_) => "rare-path",
        }
    }

    /// The reason given for the flag.
    pub fn reason(&self) -> &str {
        match self {
            Flag::AcceptedRisk(r) | Flag::RarePath(r) => r,
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.keyword(), self.reason())
    }
}

/// One rule: a syscall, its argument conditions (none: any arguments), an action, a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line of the rule in its file.
    pub line: usize,
    /// Syscall name.
    pub syscall: String,
    /// Syscall number (x86_64).
    pub nr: i64,
    /// Conditions, AND-ed.
    pub conditions: Vec<Condition>,
    /// Action when the call matches.
    pub action: Action,
    /// Why the worker needs it (mandatory).
    pub justification: String,
    /// Reviewed exceptions.
    pub flags: Vec<Flag>,
}

impl Rule {
    /// The `accepted-risk` reason, if the rule has one.
    pub fn accepted_risk(&self) -> Option<&str> {
        self.flags.iter().find_map(|f| match f {
            Flag::AcceptedRisk(r) => Some(r.as_str()),
            Flag::RarePath(_) => None,
        })
    }

    /// The `rare-path` reason, if the rule has one.
    pub fn rare_path(&self) -> Option<&str> {
        self.flags.iter().find_map(|f| match f {
            Flag::RarePath(r) => Some(r.as_str()),
            Flag::AcceptedRisk(_) => None,
        })
    }

    /// What identifies a rule across two versions of a policy: its syscall and its
    /// conditions in canonical order (`openat arg2 & O_CREAT == 0`).
    pub fn identity(&self) -> String {
        let mut conds: Vec<String> = self.conditions.iter().map(ToString::to_string).collect();
        conds.sort();
        if conds.is_empty() {
            self.syscall.clone()
        } else {
            format!("{} {}", self.syscall, conds.join(" && "))
        }
    }

    fn key(&self) -> RuleKey {
        let mut conds: Vec<_> = self.conditions.iter().map(Condition::key).collect();
        conds.sort_by_key(|&(arg, width, op, value)| (arg, width as u8, format!("{op:?}"), value));
        (self.nr, conds)
    }
}

impl fmt::Display for Rule {
    /// The rule in canonical policy syntax (flags on indented lines below it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conds: Vec<String> = self.conditions.iter().map(ToString::to_string).collect();
        let lhs = if conds.is_empty() {
            self.syscall.clone()
        } else {
            format!("{} {}", self.syscall, conds.join(" && "))
        };
        write!(f, "{lhs} => {}: {}", self.action, self.justification)?;
        for flag in &self.flags {
            write!(f, "\n    {flag}")?;
        }
        Ok(())
    }
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The file name used in error messages.
    pub file: String,
    /// The process the policy confines (`process:` header): a worker kind (`blk`) or `vmm`.
    pub process: String,
    /// Thread role (`thread:` header), e.g. `main`.
    pub thread: String,
    /// Action for calls no rule matches (`default:` header).
    pub default: Action,
    /// Target architecture (`arch:` header); only `x86_64`.
    pub arch: String,
    /// The rules in file order.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The rules for syscall `name`, in file order.
    pub fn rules_for<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.syscall == name)
    }
}

/// What is wrong with a line of a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// A required header line is absent.
    #[error("missing header `{0}:` (every policy names process, thread, default and arch)")]
    MissingHeader(&'static str),
    /// A header key appears twice.
    #[error("header `{key}` given twice (first on line {first_line})")]
    DuplicateHeader {
        /// Header key.
        key: String,
        /// Line of the first occurrence.
        first_line: usize,
    },
    /// A `key: value` line with an unknown key.
    #[error("unknown header `{0}` (expected process, thread, default or arch)")]
    UnknownHeader(String),
    /// Header after the first rule.
    #[error("header `{0}` after the first rule: headers go at the top")]
    HeaderAfterRules(String),
    /// Worker or thread name is not `[a-z0-9_-]+`.
    #[error("bad name `{0}` (use lowercase letters, digits, `-` and `_`)")]
    BadName(String),
    /// `default: allow` or an unparsable default.
    #[error("bad default action `{0}` (an allow-list needs trap, errno or log)")]
    BadDefault(String),
    /// `arch:` other than x86_64.
    #[error("unsupported arch `{0}` (only x86_64)")]
    UnsupportedArch(String),
    /// Rule without `: justification`.
    #[error("rule for `{0}` has no justification (`=> action: why the worker needs it`)")]
    MissingJustification(String),
    /// Syscall name not in the x86_64 table.
    #[error("unknown syscall `{0}` on x86_64")]
    UnknownSyscall(String),
    /// Symbolic value not in `constants`.
    #[error("unknown constant `{0}`")]
    UnknownConstant(String),
    /// Malformed number.
    #[error("bad number `{0}`")]
    BadNumber(String),
    /// Not `arg0`..`arg5` (optionally `:32`).
    #[error("bad argument `{0}` (expected arg0..arg5, optionally with :32)")]
    BadArgument(String),
    /// Unexpected token in a condition.
    #[error("expected {expected}, found `{found}`")]
    UnexpectedToken {
        /// What the parser wanted.
        expected: &'static str,
        /// What it found.
        found: String,
    },
    /// A condition stops early.
    #[error("expected {0}, found end of conditions")]
    UnexpectedEnd(&'static str),
    /// `argN & MASK` with an operator other than `==`.
    #[error("a masked condition must use `==`, found `{0}`")]
    MaskNeedsEq(String),
    /// Value does not fit the compared width.
    #[error("value {value:#x} does not fit a 32-bit comparison (drop `:32`)")]
    ValueTooWide {
        /// The value.
        value: u64,
    },
    /// Unknown action word.
    #[error("unknown action `{0}` (expected allow, trap, log or errno N|NAME)")]
    BadAction(String),
    /// `errno` with a bad number or name.
    #[error("bad errno `{0}` (1..=4095 or a name like ENOSYS)")]
    BadErrno(String),
    /// The rule does what the default does anyway.
    #[error("rule action `{0}` equals the default action: drop the rule")]
    ActionIsDefault(Action),
    /// Same syscall, conditions and action as an earlier rule.
    #[error("duplicate rule for `{syscall}` (same as line {first_line})")]
    DuplicateRule {
        /// Syscall name.
        syscall: String,
        /// The earlier rule's line.
        first_line: usize,
    },
    /// Same syscall and conditions as an earlier rule, another action.
    #[error("rule for `{syscall}` has the conditions of line {first_line} with another action")]
    ConflictingRule {
        /// Syscall name.
        syscall: String,
        /// The earlier rule's line.
        first_line: usize,
    },
    /// A conditional rule that an unconditional one for the same syscall makes useless: the
    /// same action, or a more restrictive one (which always wins).
    #[error("rule for `{syscall}` is shadowed by the unconditional rule on line {other_line} (the same action, or a more restrictive one, for every call)")]
    ShadowedRule {
        /// Syscall name.
        syscall: String,
        /// The other rule's line.
        other_line: usize,
    },
    /// Flag line before any rule.
    #[error("flag `{0}` does not follow a rule")]
    FlagWithoutRule(String),
    /// Flag without a reason.
    #[error("flag `{0}` needs a reason (`{0}: why`)")]
    FlagMissingReason(String),
    /// Same flag twice on one rule.
    #[error("flag `{0}` given twice for one rule")]
    DuplicateFlag(String),
    /// Indented line that is not a known flag.
    #[error("unknown flag line `{0}` (expected accepted-risk: or rare-path:)")]
    UnknownFlag(String),
    /// Neither header, rule, flag nor comment.
    #[error("cannot parse `{0}` (expected `syscall [conditions] => action: justification`)")]
    Syntax(String),
    /// The file has no rules.
    #[error("policy has no rules")]
    NoRules,
}

/// A policy file error, displayed as `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {kind}")]
pub struct ParseError {
    /// File name as given to [`parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters) of the offending text, or of the line's first
    /// non-blank character when the whole line is at fault.
    pub column: usize,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

impl ParseErrorKind {
    /// The text of the line this error is about, when one token is at fault.
    fn offending(&self) -> Option<&str> {
        use ParseErrorKind::*;
        let text = match self {
            UnknownHeader(t) | HeaderAfterRules(t) | BadName(t) | BadDefault(t)
            | UnsupportedArch(t) | UnknownSyscall(t) | UnknownConstant(t) | BadNumber(t)
            | BadArgument(t) | MaskNeedsEq(t) | BadAction(t) | BadErrno(t) | UnknownFlag(t)
            | FlagMissingReason(t) | DuplicateFlag(t) | FlagWithoutRule(t) => t,
            DuplicateHeader { key, .. } => key,
            UnexpectedToken { found, .. } => found,
            MissingJustification(_) => "=>",
            _ => return None,
        };
        (!text.is_empty()).then_some(text)
    }
}

/// Where on `raw` (one line of the file) error `kind` points: 1-based, in characters.
fn column_of(raw: &str, kind: &ParseErrorKind) -> usize {
    let byte = kind
        .offending()
        .and_then(|t| raw.find(t))
        .unwrap_or_else(|| raw.len() - raw.trim_start().len());
    raw[..byte].chars().count() + 1
}

const HEADERS: [&str; 4] = ["process", "thread", "default", "arch"];
const FLAGS: [&str; 2] = ["accepted-risk", "rare-path"];

/// Parse policy `text`; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Policy, ParseError> {
    let err = |line: usize, kind: ParseErrorKind| ParseError {
        file: file.to_string(),
        line,
        column: text
            .lines()
            .nth(line - 1)
            .map_or(1, |raw| column_of(raw, &kind)),
        kind,
    };
    let mut headers: HashMap<&'static str, (usize, String)> = HashMap::new();
    let mut rules: Vec<Rule> = Vec::new();

    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indented = raw.starts_with(' ') || raw.starts_with('\t');
        if indented {
            let flag = parse_flag(trimmed).map_err(|k| err(line, k))?;
            let Some(rule) = rules.last_mut() else {
                return Err(err(
                    line,
                    ParseErrorKind::FlagWithoutRule(flag.keyword().into()),
                ));
            };
            if rule.flags.iter().any(|f| f.keyword() == flag.keyword()) {
                return Err(err(
                    line,
                    ParseErrorKind::DuplicateFlag(flag.keyword().into()),
                ));
            }
            rule.flags.push(flag);
            continue;
        }
        if let Some((lhs, rhs)) = trimmed.split_once("=>") {
            let rule = parse_rule(line, lhs, rhs).map_err(|k| err(line, k))?;
            rules.push(rule);
            continue;
        }
        if let Some((key, value)) = trimmed.split_once(':') {
            let key = key.trim();
            let value = value.trim();
            let Some(&known) = HEADERS.iter().find(|&&h| h == key) else {
                if FLAGS.contains(&key) {
                    return Err(err(line, ParseErrorKind::FlagWithoutRule(key.into())));
                }
                return Err(err(line, ParseErrorKind::UnknownHeader(key.into())));
            };
            if !rules.is_empty() {
                return Err(err(line, ParseErrorKind::HeaderAfterRules(key.into())));
            }
            if let Some((first_line, _)) = headers.get(known) {
                return Err(err(
                    line,
                    ParseErrorKind::DuplicateHeader {
                        key: key.into(),
                        first_line: *first_line,
                    },
                ));
            }
            headers.insert(known, (line, value.to_string()));
            continue;
        }
        return Err(err(line, ParseErrorKind::Syntax(trimmed.into())));
    }

    let header = |key: &'static str| -> Result<(usize, String), ParseError> {
        headers
            .get(key)
            .cloned()
            .ok_or_else(|| err(1, ParseErrorKind::MissingHeader(key)))
    };
    let (wline, process) = header("process")?;
    let (tline, thread) = header("thread")?;
    let (dline, default) = header("default")?;
    let (aline, arch) = header("arch")?;
    for (line, name) in [(wline, &process), (tline, &thread)] {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok {
            return Err(err(line, ParseErrorKind::BadName(name.clone())));
        }
    }
    let default = match parse_action(&default) {
        Ok(Action::Allow) | Err(_) => return Err(err(dline, ParseErrorKind::BadDefault(default))),
        Ok(action) => action,
    };
    if arch != ARCH_X86_64 {
        return Err(err(aline, ParseErrorKind::UnsupportedArch(arch)));
    }
    if rules.is_empty() {
        return Err(err(text.lines().count().max(1), ParseErrorKind::NoRules));
    }
    check_rules(&rules, default).map_err(|(line, k)| err(line, k))?;

    Ok(Policy {
        file: file.to_string(),
        process,
        thread,
        default,
        arch,
        rules,
    })
}

/// Rule-set checks: no rule that only restates the default, no duplicates, no conflicts, no
/// shadowed conditional rules.
fn check_rules(rules: &[Rule], default: Action) -> Result<(), (usize, ParseErrorKind)> {
    let mut seen: HashMap<RuleKey, &Rule> = HashMap::new();
    for rule in rules {
        if rule.action == default {
            return Err((rule.line, ParseErrorKind::ActionIsDefault(rule.action)));
        }
        if let Some(first) = seen.get(&rule.key()) {
            let kind = if first.action == rule.action {
                ParseErrorKind::DuplicateRule {
                    syscall: rule.syscall.clone(),
                    first_line: first.line,
                }
            } else {
                ParseErrorKind::ConflictingRule {
                    syscall: rule.syscall.clone(),
                    first_line: first.line,
                }
            };
            return Err((rule.line, kind));
        }
        seen.insert(rule.key(), rule);
    }
    // An unconditional rule matches every call of its syscall, so a conditional rule for
    // the same syscall with the same action adds nothing, and one with a less restrictive
    // action never decides anything (the most restrictive matching action wins).
    for rule in rules.iter().filter(|r| !r.conditions.is_empty()) {
        let shadow = rules.iter().find(|o| {
            o.nr == rule.nr
                && o.conditions.is_empty()
                && o.action.precedence() <= rule.action.precedence()
        });
        if let Some(other) = shadow {
            return Err((
                rule.line.max(other.line),
                ParseErrorKind::ShadowedRule {
                    syscall: rule.syscall.clone(),
                    other_line: other.line.min(rule.line),
                },
            ));
        }
    }
    Ok(())
}

fn parse_flag(text: &str) -> Result<Flag, ParseErrorKind> {
    let Some((key, reason)) = text.split_once(':') else {
        if FLAGS.contains(&text) {
            return Err(ParseErrorKind::FlagMissingReason(text.into()));
        }
        return Err(ParseErrorKind::UnknownFlag(text.into()));
    };
    let key = key.trim();
    let reason = reason.trim().to_string();
    if !FLAGS.contains(&key) {
        return Err(ParseErrorKind::UnknownFlag(text.into()));
    }
    if reason.is_empty() {
        return Err(ParseErrorKind::FlagMissingReason(key.into()));
    }
    Ok(if key == "accepted-risk" {
        Flag::AcceptedRisk(reason)
    } else {
        Flag::RarePath(reason)
    })
}

fn parse_rule(line: usize, lhs: &str, rhs: &str) -> Result<Rule, ParseErrorKind> {
    let lhs = lhs.trim();
    let (syscall, conds) = match lhs.find(char::is_whitespace) {
        Some(i) => (&lhs[..i], lhs[i..].trim()),
        None => (lhs, ""),
    };
    if syscall.is_empty() {
        return Err(ParseErrorKind::Syntax(format!("{lhs}=>{rhs}")));
    }
    let nr = syscalls::number(syscall)
        .ok_or_else(|| ParseErrorKind::UnknownSyscall(syscall.to_string()))?;
    let (action_text, justification) = match rhs.split_once(':') {
        Some((a, j)) => (a.trim(), j.trim()),
        None => (rhs.trim(), ""),
    };
    let action = parse_action(action_text)?;
    if justification.is_empty() {
        return Err(ParseErrorKind::MissingJustification(syscall.to_string()));
    }
    let conditions = parse_conditions(conds)?;
    Ok(Rule {
        line,
        syscall: syscall.to_string(),
        nr,
        conditions,
        action,
        justification: justification.to_string(),
        flags: Vec::new(),
    })
}

fn parse_action(text: &str) -> Result<Action, ParseErrorKind> {
    let mut words = text.split_whitespace();
    let action = match (words.next(), words.next(), words.next()) {
        (Some("allow"), None, _) => Action::Allow,
        (Some("trap"), None, _) => Action::Trap,
        (Some("log"), None, _) => Action::Log,
        (Some("errno"), Some(value), None) => {
            let n = match constants::errno(value) {
                Some(n) => n,
                None => value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=4095).contains(n))
                    .ok_or_else(|| ParseErrorKind::BadErrno(value.into()))?,
            };
            Action::Errno(n)
        }
        (Some("errno"), None, _) => return Err(ParseErrorKind::BadErrno(String::new())),
        _ => return Err(ParseErrorKind::BadAction(text.into())),
    };
    Ok(action)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Sym(&'static str),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => f.write_str(w),
            Token::Sym(s) => f.write_str(s),
        }
    }
}

const SYMBOLS: [&str; 10] = ["&&", "==", "!=", "<=", ">=", "<", ">", "&", "|", ":"];

fn tokenize(text: &str) -> Result<Vec<Token>, ParseErrorKind> {
    let mut tokens = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(sym) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) {
            tokens.push(Token::Sym(sym));
            rest = rest[sym.len()..].trim_start();
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        if end == 0 {
            let bad: String = rest.chars().take(1).collect();
            return Err(ParseErrorKind::UnexpectedToken {
                expected: "a name, number or operator (== != < <= > >= & | &&)",
                found: bad,
            });
        }
        tokens.push(Token::Word(rest[..end].to_string()));
        rest = rest[end..].trim_start();
    }
    Ok(tokens)
}

struct Cursor {
    tokens: Vec<Token>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self, expected: &'static str) -> Result<Token, ParseErrorKind> {
        let tok = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or(ParseErrorKind::UnexpectedEnd(expected))?;
        self.pos += 1;
        Ok(tok)
    }

    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
}

fn parse_conditions(text: &str) -> Result<Vec<Condition>, ParseErrorKind> {
    let mut cur = Cursor {
        tokens: tokenize(text)?,
        pos: 0,
    };
    let mut conditions = Vec::new();
    if cur.peek().is_none() {
        return Ok(conditions);
    }
    loop {
        conditions.push(parse_condition(&mut cur)?);
        match cur.peek() {
            None => return Ok(conditions),
            Some(Token::Sym("&&")) => cur.pos += 1,
            Some(other) => {
                return Err(ParseErrorKind::UnexpectedToken {
                    expected: "`&&` or `=>`",
                    found: other.to_string(),
                })
            }
        }
    }
}

fn parse_condition(cur: &mut Cursor) -> Result<Condition, ParseErrorKind> {
    let arg_tok = cur.next("an argument (arg0..arg5)")?;
    let Token::Word(arg_word) = &arg_tok else {
        return Err(ParseErrorKind::UnexpectedToken {
            expected: "an argument (arg0..arg5)",
            found: arg_tok.to_string(),
        });
    };
    let arg = arg_word
        .strip_prefix("arg")
        .and_then(|d| d.parse::<u8>().ok())
        .filter(|&a| a <= 5 && arg_word.len() == 4)
        .ok_or_else(|| ParseErrorKind::BadArgument(arg_word.clone()))?;
    let mut width = Width::Qword;
    if cur.eat(":") {
        match cur.next("32 after `:`")? {
            Token::Word(w) if w == "32" => width = Width::Dword,
            Token::Word(w) if w == "64" => width = Width::Qword,
            other => return Err(ParseErrorKind::BadArgument(format!("{arg_word}:{other}"))),
        }
    }
    let mut mask = None;
    if cur.eat("&") {
        let (value, text) = parse_value(cur, width)?;
        mask = Some((value, text));
    }
    let op_tok = cur.next("an operator (== != < <= > >=)")?;
    let op = match (&op_tok, &mask) {
        (Token::Sym("=="), Some((m, _))) => Op::MaskedEq(*m),
        (Token::Sym(s), Some(_)) => return Err(ParseErrorKind::MaskNeedsEq((*s).into())),
        (Token::Sym("=="), None) => Op::Eq,
        (Token::Sym("!="), None) => Op::Ne,
        (Token::Sym("<"), None) => Op::Lt,
        (Token::Sym("<="), None) => Op::Le,
        (Token::Sym(">"), None) => Op::Gt,
        (Token::Sym(">="), None) => Op::Ge,
        (other, _) => {
            return Err(ParseErrorKind::UnexpectedToken {
                expected: "an operator (== != < <= > >=)",
                found: other.to_string(),
            })
        }
    };
    let (value, value_text) = parse_value(cur, width)?;
    Ok(Condition {
        arg,
        width,
        op,
        value,
        value_text,
        mask_text: mask.map(|(_, t)| t),
    })
}

/// `term ('|' term)*`, each term a decimal (optionally negative), `0x` hex or a constant.
fn parse_value(cur: &mut Cursor, width: Width) -> Result<(u64, String), ParseErrorKind> {
    let mut value = 0u64;
    let mut parts = Vec::new();
    loop {
        let tok = cur.next("a value")?;
        let Token::Word(word) = tok else {
            return Err(ParseErrorKind::UnexpectedToken {
                expected: "a value",
                found: tok.to_string(),
            });
        };
        value |= parse_term(&word)?;
        parts.push(word);
        if !cur.eat("|") {
            break;
        }
    }
    let value = match width {
        Width::Qword => value,
        Width::Dword => {
            if value <= u64::from(u32::MAX) {
                value
            } else if (value as i64) >= i64::from(i32::MIN) && (value as i64) < 0 {
                // A sign-extended negative int (e.g. AT_FDCWD): compare its low 32 bits.
                value & u64::from(u32::MAX)
            } else {
                return Err(ParseErrorKind::ValueTooWide { value });
            }
        }
    };
    Ok((value, parts.join("|")))
}

fn parse_term(word: &str) -> Result<u64, ParseErrorKind> {
    let bad = || ParseErrorKind::BadNumber(word.to_string());
    if let Some(hex) = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        return u64::from_str_radix(&hex.replace('_', ""), 16).map_err(|_| bad());
    }
    if let Some(neg) = word.strip_prefix('-') {
        let n: i64 = neg.parse().map_err(|_| bad())?;
        return Ok(n.checked_neg().ok_or_else(bad)? as u64);
    }
    if word.starts_with(|c: char| c.is_ascii_digit()) {
        return word.parse::<u64>().map_err(|_| bad());
    }
    constants::lookup(word).ok_or_else(|| ParseErrorKind::UnknownConstant(word.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "process: blk\nthread: main\ndefault: trap\narch: x86_64\n";

    fn with_header(body: &str) -> String {
        format!("{HEADER}{body}")
    }

    /// Error at `line` (counting the 4 header lines) with the given kind.
    fn fails(body: &str, line: usize, kind: ParseErrorKind) {
        let e = parse("t.policy", &with_header(body)).unwrap_err();
        assert_eq!((e.line, &e.kind), (line, &kind), "{e}");
        let column = e.column;
        assert!(e
            .to_string()
            .starts_with(&format!("t.policy:{line}:{column}: ")));
    }

    /// Error at `line`:`column` (counting the 4 header lines).
    fn fails_at(body: &str, line: usize, column: usize) -> ParseError {
        let e = parse("t.policy", &with_header(body)).unwrap_err();
        assert_eq!((e.line, e.column), (line, column), "{e}");
        e
    }

    #[test]
    fn errors_point_at_the_offending_column() {
        fails_at(
            "read => allow: ok
opne => allow: typo
",
            6,
            1,
        );
        fails_at(
            "fcntl arg1 == F_GETFLL => allow: x
",
            5,
            15,
        );
        fails_at(
            "fcntl  arg7 == 1 => allow: x
",
            5,
            8,
        );
        fails_at(
            "fcntl arg1 == 0xzz => allow: x
",
            5,
            15,
        );
        fails_at(
            "read => alow: x
",
            5,
            9,
        );
        fails_at(
            "read => allow
",
            5,
            6,
        );
        fails_at(
            "read => allow: x
    rare-paths: y
",
            6,
            5,
        );
        fails_at(
            "read => allow: x
read => allow: y
",
            6,
            1,
        );
        let e = fails_at(
            "mmap arg2 & PROT_EXEC $ 0 => allow: x
",
            5,
            23,
        );
        assert!(e.to_string().starts_with("t.policy:5:23: expected"), "{e}");
        // Non-ASCII before the fault counts as one column per character.
        fails_at(
            "read => allow: ok
# ä
wrïte => allow: x
",
            7,
            1,
        );
    }

    #[test]
    fn parses_rules_conditions_flags() {
        let text = with_header(
            "# comment\n\
             read => allow: eventfds\n\
             \n\
             mmap arg2 & PROT_EXEC == 0 => allow : memory; never exec\n\
             \x20   accepted-risk: MAP_FIXED can replace mappings\n\
             fcntl arg1 == F_GETFL => allow: flags\n\
             fcntl arg1 == F_SETFL && arg2:32 <= 0x800 => allow: set nonblock\n\
             \trare-path: only at start\n\
             clone3 => errno ENOSYS: glibc fallback\n\
             openat arg0 == AT_FDCWD => errno 2: nothing to open\n\
             mmap arg2 == PROT_READ|PROT_WRITE && arg3 & MAP_SHARED == MAP_SHARED => log: x\n",
        );
        let p = parse("t.policy", &text).unwrap();
        assert_eq!(p.process, "blk");
        assert_eq!(p.thread, "main");
        assert_eq!(p.default, Action::Trap);
        assert_eq!(p.rules.len(), 7);
        let read = &p.rules[0];
        assert_eq!((read.line, read.nr, read.action), (6, 0, Action::Allow));
        assert!(read.conditions.is_empty());
        let mmap = &p.rules[1];
        assert_eq!(mmap.justification, "memory; never exec");
        assert_eq!(mmap.conditions[0].op, Op::MaskedEq(4));
        assert_eq!(mmap.conditions[0].value, 0);
        assert_eq!(mmap.accepted_risk(), Some("MAP_FIXED can replace mappings"));
        let setfl = &p.rules[3];
        assert_eq!(setfl.conditions.len(), 2);
        assert_eq!(setfl.conditions[1].width, Width::Dword);
        assert_eq!(setfl.conditions[1].op, Op::Le);
        assert_eq!(setfl.conditions[1].value, 0x800);
        assert_eq!(setfl.rare_path(), Some("only at start"));
        assert_eq!(p.rules[4].action, Action::Errno(38));
        assert_eq!(p.rules[5].conditions[0].value, (-100i64) as u64);
        assert_eq!(p.rules[5].action, Action::Errno(2));
        assert_eq!(p.rules[6].conditions[0].value, 3);
        assert_eq!(p.rules[6].action, Action::Log);
        assert_eq!(
            p.rules[3].to_string(),
            "fcntl arg1 == F_SETFL && arg2:32 <= 0x800 => allow: set nonblock\n    rare-path: only at start"
        );
        assert_eq!(
            p.rules[4].to_string(),
            "clone3 => errno ENOSYS: glibc fallback"
        );
    }

    #[test]
    fn values() {
        let p = parse(
            "t",
            &with_header(
                "ioctl arg1 == FIONBIO => allow: a\n\
                 ioctl arg1 == 21538 => log: b\n\
                 ioctl arg1:32 == -100 => errno EPERM: c\n\
                 ioctl arg1 == 0x5_421 | 0x10000 => errno 5: d\n",
            ),
        )
        .unwrap();
        let v: Vec<u64> = p.rules.iter().map(|r| r.conditions[0].value).collect();
        assert_eq!(v, [0x5421, 21538, 0xffff_ff9c, 0x15421]);
    }

    #[test]
    fn header_errors() {
        let e = parse(
            "t.policy",
            "thread: main\ndefault: trap\narch: x86_64\nread => allow: x\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (1, ParseErrorKind::MissingHeader("process"))
        );
        let e = parse("t", &format!("{HEADER}process: net\nread => allow: x\n")).unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (
                5,
                ParseErrorKind::DuplicateHeader {
                    key: "process".into(),
                    first_line: 1
                }
            )
        );
        let e = parse(
            "t",
            "process: blk\nthread: main\ndefault: allow\narch: x86_64\nread => trap: x\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (3, ParseErrorKind::BadDefault("allow".into()))
        );
        let e = parse(
            "t",
            "process: blk\nthread: main\ndefault: trap\narch: aarch64\nread => allow: x\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (4, ParseErrorKind::UnsupportedArch("aarch64".into()))
        );
        let e = parse(
            "t",
            "process: Blk!\nthread: main\ndefault: trap\narch: x86_64\nread => allow: x\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (1, ParseErrorKind::BadName("Blk!".into()))
        );
        fails(
            "colour: blue\n",
            5,
            ParseErrorKind::UnknownHeader("colour".into()),
        );
        fails(
            "read => allow: x\narch: x86_64\n",
            6,
            ParseErrorKind::HeaderAfterRules("arch".into()),
        );
        fails("\n", 5, ParseErrorKind::NoRules);
    }

    #[test]
    fn rule_errors() {
        fails(
            "read => allow\n",
            5,
            ParseErrorKind::MissingJustification("read".into()),
        );
        fails(
            "read => allow:   \n",
            5,
            ParseErrorKind::MissingJustification("read".into()),
        );
        fails(
            "opne => allow: x\n",
            5,
            ParseErrorKind::UnknownSyscall("opne".into()),
        );
        fails(
            "read => allow: x\nfcntl arg1 == F_GETFLAGS => allow: x\n",
            6,
            ParseErrorKind::UnknownConstant("F_GETFLAGS".into()),
        );
        fails(
            "fcntl arg1 == 0xZZ => allow: x\n",
            5,
            ParseErrorKind::BadNumber("0xZZ".into()),
        );
        fails(
            "fcntl arg6 == 1 => allow: x\n",
            5,
            ParseErrorKind::BadArgument("arg6".into()),
        );
        fails(
            "fcntl arg12 == 1 => allow: x\n",
            5,
            ParseErrorKind::BadArgument("arg12".into()),
        );
        fails(
            "fcntl arg1 = 1 => allow: x\n",
            5,
            ParseErrorKind::UnexpectedToken {
                expected: "a name, number or operator (== != < <= > >= & | &&)",
                found: "=".into(),
            },
        );
        fails(
            "fcntl arg1 == => allow: x\n",
            5,
            ParseErrorKind::UnexpectedEnd("a value"),
        );
        fails(
            "fcntl arg1 == 1 arg2 == 2 => allow: x\n",
            5,
            ParseErrorKind::UnexpectedToken {
                expected: "`&&` or `=>`",
                found: "arg2".into(),
            },
        );
        fails(
            "mmap arg2 & PROT_EXEC != 0 => allow: x\n",
            5,
            ParseErrorKind::MaskNeedsEq("!=".into()),
        );
        fails(
            "mmap arg1:32 == 0x100000000 => allow: x\n",
            5,
            ParseErrorKind::ValueTooWide { value: 1 << 32 },
        );
        fails(
            "read => permit: x\n",
            5,
            ParseErrorKind::BadAction("permit".into()),
        );
        fails(
            "read => errno EWHAT: x\n",
            5,
            ParseErrorKind::BadErrno("EWHAT".into()),
        );
        fails(
            "read => errno 0: x\n",
            5,
            ParseErrorKind::BadErrno("0".into()),
        );
        fails(
            "read => trap: x\n",
            5,
            ParseErrorKind::ActionIsDefault(Action::Trap),
        );
        fails(
            "read is fine\n",
            5,
            ParseErrorKind::Syntax("read is fine".into()),
        );
    }

    #[test]
    fn rule_set_errors() {
        fails(
            "read => allow: x\nwrite => allow: y\nread => allow: again\n",
            7,
            ParseErrorKind::DuplicateRule {
                syscall: "read".into(),
                first_line: 5,
            },
        );
        fails(
            "fcntl arg1 == 1 && arg2 == 2 => allow: x\nfcntl arg2 == 2 && arg1 == 1 => allow: y\n",
            6,
            ParseErrorKind::DuplicateRule {
                syscall: "fcntl".into(),
                first_line: 5,
            },
        );
        fails(
            "fcntl arg1 == 1 => allow: x\nfcntl arg1 == 1 => errno EPERM: y\n",
            6,
            ParseErrorKind::ConflictingRule {
                syscall: "fcntl".into(),
                first_line: 5,
            },
        );
        fails(
            "fcntl arg1 == 1 => allow: x\nread => allow: r\nfcntl => allow: all\n",
            7,
            ParseErrorKind::ShadowedRule {
                syscall: "fcntl".into(),
                other_line: 5,
            },
        );
        // An unconditional rule with a more restrictive action decides every call: the
        // conditional allow would never apply.
        fails(
            "fcntl arg1 == 1 => allow: x\nfcntl => errno EPERM: the rest\n",
            6,
            ParseErrorKind::ShadowedRule {
                syscall: "fcntl".into(),
                other_line: 5,
            },
        );
        // A less restrictive unconditional rule leaves the conditional one its calls.
        parse(
            "t",
            &with_header("fcntl arg1 == 1 => errno EPERM: x\nfcntl => allow: the rest\n"),
        )
        .unwrap();
    }

    #[test]
    fn flag_errors() {
        fails(
            "    rare-path: early\n",
            5,
            ParseErrorKind::FlagWithoutRule("rare-path".into()),
        );
        fails(
            "accepted-risk: top level\n",
            5,
            ParseErrorKind::FlagWithoutRule("accepted-risk".into()),
        );
        fails(
            "read => allow: x\n    accepted-risk:\n",
            6,
            ParseErrorKind::FlagMissingReason("accepted-risk".into()),
        );
        fails(
            "read => allow: x\n    rare-path\n",
            6,
            ParseErrorKind::FlagMissingReason("rare-path".into()),
        );
        fails(
            "read => allow: x\n    rare-path: a\n    rare-path: b\n",
            7,
            ParseErrorKind::DuplicateFlag("rare-path".into()),
        );
        fails(
            "read => allow: x\n    risky: yes\n",
            6,
            ParseErrorKind::UnknownFlag("risky: yes".into()),
        );
    }
}
