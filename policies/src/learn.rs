//! Learn mode: which syscalls a worker's workload really makes, and which rules it needed.
//!
//! The worker keeps its whole sandbox (namespaces, uid, capability drop, no_new_privs,
//! rlimits, empty root) but installs, in place of its policy, a filter that turns every
//! syscall into a seccomp user notification ([`learning_filter`]). It hands the listener
//! descriptor to its supervisor (the VMM, or `bulkhead policy learn --worker`) over a socket
//! it inherited ([`enter_learn_mode`]); the supervisor records each call and answers
//! `SECCOMP_USER_NOTIF_FLAG_CONTINUE`, so the call runs as if allowed ([`serve_listener`]).
//! A [`Recorder`] sorts calls against a policy as they arrive (which rule each call needed;
//! which calls no rule matches) and its [`Report`] is the minimal policy the workload needed.
//!
//! CONTINUE is not a security boundary (the kernel's documentation says why): learn mode
//! is an operator's measuring tool, never a way to run untrusted guests.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::format::{Action, Condition, Op, Policy, Rule, Width};
use crate::{audit, decode, sock_filter, syscalls};

/// The line a worker and a supervisor print when learn mode starts.
pub const BANNER: &str = "LEARN MODE: seccomp records and allows every syscall of the worker \
(namespaces, uid, capability drop, no_new_privs, rlimits and the empty root stay); \
not for untrusted guests";

/// Errors of learn mode, on either side.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER) failed")]
    Install(#[source] std::io::Error),
    #[error("cannot hand the seccomp listener over on fd {fd}")]
    Handoff {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("{worker}: no seccomp listener arrived within {timeout:?}")]
    NoListener { worker: String, timeout: Duration },
    #[error("{worker}: cannot receive the seccomp listener")]
    Receive {
        worker: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{worker}: sent {what} where one seccomp listener was expected")]
    NotAListener { worker: String, what: String },
    #[error("{worker}: seccomp notification {op} failed")]
    Notify {
        worker: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

// Classic BPF opcodes (linux/bpf_common.h) and seccomp_data offsets (linux/seccomp.h).
/// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K (0x05 | 0x10 | 0x00).
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG0_LO: u32 = 16;
const DATA_ARG0_HI: u32 = 20;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The learn-mode filter: every x86_64 syscall notifies the listener, except the three
/// calls of the handoff itself, which nobody could answer yet or any more: `sendmsg` on
/// `handoff_fd` (it carries the listener), and `close_range` starting at `handoff_fd` or
/// at `listener_fd` (the worker must not hold its own listener: if the supervisor dies, the
/// last reference goes and the worker's calls fail with ENOSYS instead of waiting forever).
/// The handoff closes with `close_range`, which a worker never calls once sandboxed, so that
/// a later `close` of a reused descriptor number is still recorded. Other architectures'
/// calls kill the process, as in every policy.
pub fn learning_filter(handoff_fd: RawFd, listener_fd: RawFd) -> Vec<sock_filter> {
    const ALLOW: usize = 12;
    const NOTIFY: usize = 13;
    const KILL: usize = 14;
    let mut f = Vec::with_capacity(15);
    // Conditional jumps are relative to the next instruction.
    let to = |from: usize, target: usize| (target - from - 1) as u8;
    f.push(stmt(BPF_LD_W_ABS, DATA_ARCH)); // 0
    f.push(jeq(AUDIT_ARCH_X86_64, 0, to(1, KILL))); // 1
    f.push(stmt(BPF_LD_W_ABS, DATA_ARG0_HI)); // 2
    f.push(jeq(0, 0, to(3, NOTIFY))); // 3: every exempt call has a small fd in arg0
    f.push(stmt(BPF_LD_W_ABS, DATA_NR)); // 4
    f.push(jeq(libc::SYS_sendmsg as u32, 0, to(5, 8))); // 5
    f.push(stmt(BPF_LD_W_ABS, DATA_ARG0_LO)); // 6
    f.push(jeq(handoff_fd as u32, to(7, ALLOW), to(7, NOTIFY))); // 7
    f.push(jeq(libc::SYS_close_range as u32, 0, to(8, NOTIFY))); // 8: the number is still loaded
    f.push(stmt(BPF_LD_W_ABS, DATA_ARG0_LO)); // 9
    f.push(jeq(handoff_fd as u32, to(10, ALLOW), 0)); // 10
    f.push(jeq(listener_fd as u32, 0, to(11, NOTIFY))); // 11
    f.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW)); // 12
    f.push(stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF)); // 13
    f.push(stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS)); // 14
    f
}

/// The lowest descriptor number not in use: the one the kernel gives the next new fd.
fn lowest_free_fd() -> RawFd {
    (0..)
        // SAFETY: F_GETFD only reads a descriptor's flags.
        .find(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0)
        .unwrap_or(RawFd::MAX)
}

/// Worker side: installs [`learning_filter`] on the calling thread (no_new_privs must be
/// set), sends the listener over `handoff_fd`, then closes both. Between install and close
/// nothing may make another syscall (nobody could answer it), so the message is built
/// first, and the listener's number is predicted: a single-threaded process gets the
/// lowest free descriptor.
pub fn enter_learn_mode(handoff_fd: RawFd) -> Result<(), LearnError> {
    let predicted = lowest_free_fd();
    let filter = learning_filter(handoff_fd, predicted);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        // seccompiler's sock_filter is #[repr(C)] with the kernel's layout, as libc's is.
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // One fd of control data, 8-byte aligned.
    let mut control = [0u64; 4];
    let mut byte = [b'L'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: msg_control points at `control` (32 bytes >= CMSG_SPACE(4)), so the first
    // header lies inside it; the header and its data are written in place.
    let data = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        libc::CMSG_DATA(cmsg).cast::<RawFd>()
    };
    // SAFETY: `prog` points at `filter`, alive across the call; the kernel copies it.
    let listener = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if listener < 0 {
        return Err(LearnError::Install(std::io::Error::last_os_error()));
    }
    // SAFETY: `data` points at the fd slot of the header built above, inside `control`;
    // `msg` refers to `iov`, `byte` and `control`, all alive across sendmsg.
    let sent = unsafe {
        data.write_unaligned(listener as RawFd);
        libc::sendmsg(handoff_fd, &msg, libc::MSG_NOSIGNAL)
    };
    if sent != 1 {
        // Every further call of this process waits for an answer that cannot come; the
        // supervisor gives up after its timeout and says so.
        return Err(LearnError::Handoff {
            fd: handoff_fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: closes two descriptors this function owns from here on (the caller gave up
    // `handoff_fd`; the listener was just created); the filter lets both calls through.
    unsafe {
        libc::syscall(libc::SYS_close_range, handoff_fd, handoff_fd, 0);
        if listener as RawFd == predicted {
            libc::syscall(libc::SYS_close_range, predicted, predicted, 0);
        }
    }
    Ok(())
}

/// Supervisor side: the listener a worker sends over `sock`, checked to be a seccomp
/// listener before anything is done with it (the worker is untrusted).
pub fn receive_listener(
    sock: &UnixStream,
    worker: &str,
    timeout: Duration,
) -> Result<OwnedFd, LearnError> {
    let recv_err = |source| LearnError::Receive {
        worker: worker.to_string(),
        source,
    };
    sock.set_read_timeout(Some(timeout)).map_err(recv_err)?;
    let mut control = [0u64; 8];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                LearnError::NoListener {
                    worker: worker.to_string(),
                    timeout,
                }
            }
            _ => recv_err(e),
        });
    }
    // Take ownership of every descriptor that arrived, so extras are closed whatever happens.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG macros walk only
    // within it, and each SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>().cast_const();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let bad = |what: String| LearnError::NotAListener {
        worker: worker.to_string(),
        what,
    };
    if n == 0 {
        return Err(bad("end of file (it exited)".into()));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(bad("truncated control data".into()));
    }
    if fds.len() != 1 {
        return Err(bad(format!("{} descriptors", fds.len())));
    }
    let fd = fds.remove(0);
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if link != "anon_inode:seccomp notify" {
        return Err(bad(format!("a descriptor of {link:?}")));
    }
    Ok(fd)
}

/// Supervisor side: answers every notification of `listener` with CONTINUE after
/// recording it in `recorder`, until no process uses the filter any more. Returns the
/// number of calls seen.
pub fn serve_listener(
    listener: &OwnedFd,
    recorder: &Recorder,
    worker: &str,
) -> Result<u64, LearnError> {
    let err = |op, source| LearnError::Notify {
        worker: worker.to_string(),
        op,
        source,
    };
    let fd = listener.as_raw_fd();
    let mut seen = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err("poll", e));
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: every task that used the filter has exited.
            return Ok(seen);
        }
        // SAFETY: seccomp_notif is plain data; the kernel wants it zeroed before RECV.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV fills the struct it is given, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notif) } < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The caller was interrupted or died before we read it.
                Some(libc::ENOENT) | Some(libc::EINTR) => continue,
                _ => return Err(err("RECV", e)),
            }
        }
        seen += 1;
        recorder.record(i64::from(notif.data.nr), notif.data.args);
        let resp = libc::seccomp_notif_resp {
            id: notif.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: SEND reads the struct it is given, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(err("SEND", e));
            }
        }
    }
}

/// How long a worker has, once started, to hand over its listener.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(20);

/// Supervisor side: the work of a thread that receives the listener of `worker` from
/// `sock` and serves it into the recorder until the worker exits. Failures are printed
/// (learn mode is an interactive tool) and count in [`Recorder::failures`]. The caller
/// starts the thread (the VMM starts every thread of its own through one helper) and
/// calls [`Learner::run`] on it; a learner dropped without running counts as finished.
#[derive(Debug)]
pub struct Learner {
    sock: UnixStream,
    recorder: Arc<Recorder>,
    worker: String,
    ran: bool,
}

/// A [`Learner`] for `worker`, counted by the recorder from now on.
pub fn learner(sock: UnixStream, recorder: Arc<Recorder>, worker: String) -> Learner {
    recorder.learner_started();
    Learner {
        sock,
        recorder,
        worker,
        ran: false,
    }
}

fn say(line: std::fmt::Arguments) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

impl Learner {
    /// A name for the learner's thread.
    pub fn thread_name(&self) -> String {
        format!("learn-{}", self.worker)
    }

    /// Receives the listener and records until the worker exits.
    pub fn run(mut self) {
        self.ran = true;
        let worker = &self.worker;
        let result = receive_listener(&self.sock, worker, HANDOFF_TIMEOUT)
            .and_then(|listener| serve_listener(&listener, &self.recorder, worker));
        match result {
            // A failed write to stderr is no reason to fail (eprintln! would panic).
            Ok(calls) => say(format_args!(
                "bulkhead: learn: {worker}: {calls} syscalls recorded"
            )),
            Err(e) => {
                say(format_args!("bulkhead: learn: error: {e}"));
                self.recorder.failed();
            }
        }
        self.recorder.learner_finished();
    }
}

impl Drop for Learner {
    fn drop(&mut self) {
        if !self.ran {
            self.recorder.learner_finished();
        }
    }
}

/// Calls that one rule of the policy allowed (or one learned rule describes).
#[derive(Clone, Debug)]
pub struct Usage {
    pub rule: Rule,
    pub calls: u64,
    /// The first such call, decoded.
    pub example: String,
}

/// A call as recorded: number and argument registers.
type Call = (i64, [u64; 6]);

#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    /// Per rule of the policy (same index): calls and the first call's arguments.
    per_rule: Vec<(u64, Option<Call>)>,
    /// Calls no rule matched, by the identity of the rule that would allow them.
    missing: BTreeMap<String, (Rule, u64, Call)>,
}

/// Sorts recorded calls against a policy as they arrive (so memory stays bounded however
/// long the workload runs).
#[derive(Debug)]
pub struct Recorder {
    against: Policy,
    by_nr: HashMap<i64, Vec<usize>>,
    tally: Mutex<Tally>,
    learners: Mutex<(usize, usize)>,
    learners_done: Condvar,
}

impl Recorder {
    /// A recorder judging calls against `against`.
    pub fn new(against: Policy) -> Self {
        let mut by_nr: HashMap<i64, Vec<usize>> = HashMap::new();
        for (i, r) in against.rules.iter().enumerate() {
            by_nr.entry(r.nr).or_default().push(i);
        }
        let tally = Tally {
            per_rule: vec![(0, None); against.rules.len()],
            ..Tally::default()
        };
        Recorder {
            against,
            by_nr,
            tally: Mutex::new(tally),
            learners: Mutex::new((0, 0)),
            learners_done: Condvar::new(),
        }
    }

    /// The policy calls are judged against.
    pub fn against(&self) -> &Policy {
        &self.against
    }

    /// The rule that decides call `nr(args)`: among matching rules, the most restrictive
    /// action wins (as the compiled filter resolves overlaps), then the first in the file.
    pub fn deciding_rule(&self, nr: i64, args: &[u64; 6]) -> Option<usize> {
        self.by_nr
            .get(&nr)?
            .iter()
            .copied()
            .filter(|&i| self.against.rules[i].matches(args))
            .min_by_key(|&i| (self.against.rules[i].action.precedence(), i))
    }

    /// Records one call.
    pub fn record(&self, nr: i64, args: [u64; 6]) {
        let decided = self.deciding_rule(nr, &args);
        let learned = match decided {
            Some(_) => None,
            None => Some(learned_rule(&self.against, nr, &args)),
        };
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        t.calls += 1;
        match (decided, learned) {
            (Some(i), _) => {
                let slot = &mut t.per_rule[i];
                slot.0 += 1;
                slot.1.get_or_insert((nr, args));
            }
            (None, Some(rule)) => {
                t.missing
                    .entry(rule.identity())
                    .or_insert_with(|| (rule, 0, (nr, args)))
                    .1 += 1;
            }
            (None, None) => unreachable!("a call is either decided or learned"),
        }
    }

    fn learner_started(&self) {
        self.learners.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn learner_finished(&self) {
        let mut l = self.learners.lock().unwrap_or_else(|p| p.into_inner());
        l.0 -= 1;
        self.learners_done.notify_all();
    }

    fn failed(&self) {
        self.learners.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
    }

    /// Learners that ended in an error (their workers' calls may be missing).
    pub fn failures(&self) -> usize {
        self.learners.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Waits until every learner thread has finished; false if some still run at `timeout`.
    pub fn wait_learners(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut l = self.learners.lock().unwrap_or_else(|p| p.into_inner());
        while l.0 > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            l = self
                .learners_done
                .wait_timeout(l, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// What the recorded workload needed.
    pub fn report(&self) -> Report {
        let t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let mut used = Vec::new();
        let mut unused = Vec::new();
        for (rule, (calls, example)) in self.against.rules.iter().zip(&t.per_rule) {
            match example {
                Some((nr, args)) => used.push(Usage {
                    rule: rule.clone(),
                    calls: *calls,
                    example: decode::format_call(*nr as u64, *args),
                }),
                None => unused.push(rule.clone()),
            }
        }
        let missing = t
            .missing
            .values()
            .map(|(rule, calls, (nr, args))| Usage {
                rule: rule.clone(),
                calls: *calls,
                example: decode::format_call(*nr as u64, *args),
            })
            .collect();
        Report {
            against: self.against.clone(),
            calls: t.calls,
            used,
            missing,
            unused,
        }
    }
}

impl Condition {
    /// Whether argument registers `args` satisfy this condition (the compiled filter's
    /// semantics: `:32` compares the low half only).
    pub fn matches(&self, args: &[u64; 6]) -> bool {
        let raw = args[usize::from(self.arg)];
        let a = match self.width {
            Width::Qword => raw,
            Width::Dword => raw & 0xffff_ffff,
        };
        match self.op {
            Op::Eq => a == self.value,
            Op::Ne => a != self.value,
            Op::Lt => a < self.value,
            Op::Le => a <= self.value,
            Op::Gt => a > self.value,
            Op::Ge => a >= self.value,
            Op::MaskedEq(mask) => a & mask == self.value,
        }
    }
}

impl Rule {
    /// Whether a call with argument registers `args` satisfies every condition.
    pub fn matches(&self, args: &[u64; 6]) -> bool {
        self.conditions.iter().all(|c| c.matches(args))
    }
}

/// Arguments that select what a call does, for syscalls whose rules should say which
/// operation they allow (the rest are allowed or denied as a whole).
fn selectors(name: &str) -> &'static [(u8, Option<u64>)] {
    const FUTEX_CMD_MASK: u64 = !(128 | 256) & 0xffff_ffff;
    const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
    match name {
        "ioctl" | "fcntl" | "fallocate" => &[(1, None)],
        "prctl" | "clone" | "socket" | "unshare" => &[(0, None)],
        "madvise" => &[(2, None)],
        "mmap" | "mprotect" => &[(2, Some(PROT_EXEC))],
        "futex" => &[(1, Some(FUTEX_CMD_MASK))],
        _ => &[],
    }
}

/// A rule allowing exactly the kind of call `nr(args)`: conditions on the arguments the
/// policy's own rules for this syscall look at (so the new rule cannot shadow them), or
/// on the syscall's selector arguments; values as observed.
fn learned_rule(against: &Policy, nr: i64, args: &[u64; 6]) -> Rule {
    let name = syscalls::name(nr)
        .map(str::to_string)
        .unwrap_or_else(|| format!("syscall_{nr}"));
    // (argument, width, mask and how the policy wrote it)
    type Pick = (u8, Width, Option<(u64, String)>);
    let mut picks: Vec<Pick> = Vec::new();
    for c in against
        .rules
        .iter()
        .filter(|r| r.nr == nr)
        .flat_map(|r| &r.conditions)
    {
        let mask = match c.op {
            Op::MaskedEq(m) => Some((m, c.mask_text.clone().unwrap_or(format!("{m:#x}")))),
            _ => None,
        };
        if !picks.iter().any(|p| p.0 == c.arg) {
            picks.push((c.arg, c.width, mask));
        }
    }
    if picks.is_empty() {
        picks = selectors(&name)
            .iter()
            .map(|&(arg, mask)| (arg, Width::Qword, mask.map(|m| (m, format!("{m:#x}")))))
            .collect();
    }
    picks.sort_by_key(|p| p.0);
    let conditions = picks
        .into_iter()
        .map(|(arg, width, mask)| {
            let raw = args[usize::from(arg)];
            let a = match width {
                Width::Qword => raw,
                Width::Dword => raw & 0xffff_ffff,
            };
            let (op, value, mask_text) = match mask {
                Some((m, text)) => (Op::MaskedEq(m), a & m, Some(text)),
                None => (Op::Eq, a, None),
            };
            Condition {
                arg,
                width,
                op,
                value,
                value_text: format!("{value:#x}"),
                mask_text,
            }
        })
        .collect();
    Rule {
        line: 0,
        syscall: name,
        nr,
        conditions,
        action: Action::Allow,
        justification: String::new(),
        flags: Vec::new(),
    }
}

/// What a workload needed, judged against one policy.
#[derive(Clone, Debug)]
pub struct Report {
    /// The policy judged against.
    pub against: Policy,
    /// Calls recorded.
    pub calls: u64,
    /// Rules of `against` that decided at least one call, in file order.
    pub used: Vec<Usage>,
    /// Calls no rule of `against` matches (its default action would have hit them), as
    /// the rules that would allow them.
    pub missing: Vec<Usage>,
    /// Rules of `against` that decided no call.
    pub unused: Vec<Rule>,
}

impl Report {
    /// The minimal policy: the used rules as they are (reasons and flags kept), then one
    /// rule per missing kind of call, marked for review.
    pub fn learned_policy(&self) -> Policy {
        let mut rules: Vec<Rule> = self.used.iter().map(|u| u.rule.clone()).collect();
        rules.extend(self.missing.iter().map(|m| {
            let mut r = m.rule.clone();
            r.justification = format!("LEARNED, REVIEW: {} calls such as {}", m.calls, m.example);
            r
        }));
        Policy {
            file: "learned".to_string(),
            rules,
            ..self.against.clone()
        }
    }

    /// [`Report::learned_policy`] in the policy file format, with a header saying where it
    /// came from.
    pub fn policy_text(&self, provenance: &str) -> String {
        let p = self.learned_policy();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Learned by `bulkhead policy learn` from: {provenance}\n\
             # {} calls; judged against {}: {} rules used, {} unused, {} missing.\n\
             # Rules marked LEARNED need a real justification before this file is used.\n",
            self.calls,
            self.against.file,
            self.used.len(),
            self.unused.len(),
            self.missing.len()
        );
        let _ = writeln!(
            out,
            "process: {}\nthread:  {}\ndefault: {}\narch:    {}\n",
            p.process, p.thread, p.default, p.arch
        );
        for r in &p.rules {
            let _ = writeln!(out, "{r}");
        }
        out
    }

    /// The learned policy compared with the one judged against.
    pub fn diff(&self) -> audit::PolicyDiff {
        audit::diff(&self.against, &self.learned_policy())
    }

    /// A human summary: counts, then every missing and unused rule.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "learned {} calls against {} ({}/{}): {} of {} rules used, {} missing, {} unused",
            self.calls,
            self.against.file,
            self.against.process,
            self.against.thread,
            self.used.len(),
            self.against.rules.len(),
            self.missing.len(),
            self.unused.len()
        );
        for m in &self.missing {
            let _ = writeln!(
                out,
                "  missing: {:<40} {:>8} calls, e.g. {}",
                m.rule.identity(),
                m.calls,
                m.example
            );
        }
        for r in &self.unused {
            let why = match r.rare_path() {
                Some(reason) => format!("rare-path: {reason}"),
                None => "never used and not flagged rare-path".to_string(),
            };
            let _ = writeln!(out, "  unused:  {:<40} {why}", r.identity());
        }
        out
    }

    /// Unused rules that carry no rare-path reason: candidates to delete.
    pub fn unjustified_unused(&self) -> Vec<&Rule> {
        self.unused
            .iter()
            .filter(|r| r.rare_path().is_none())
            .collect()
    }

    /// The report for machines.
    pub fn to_json(&self) -> serde_json::Value {
        let usage = |u: &Usage| {
            serde_json::json!({
                "rule": u.rule.identity(),
                "syscall": u.rule.syscall,
                "calls": u.calls,
                "example": u.example,
            })
        };
        serde_json::json!({
            "against": self.against.file,
            "process": self.against.process,
            "thread": self.against.thread,
            "calls": self.calls,
            "used": self.used.iter().map(usage).collect::<Vec<_>>(),
            "missing": self.missing.iter().map(usage).collect::<Vec<_>>(),
            "unused": self.unused.iter().map(|r| serde_json::json!({
                "rule": r.identity(),
                "rare_path": r.rare_path(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn blk() -> Policy {
        crate::policy(crate::PolicyId::BLK).clone()
    }

    fn nr(name: &str) -> i64 {
        syscalls::number(name).unwrap()
    }

    #[test]
    fn filter_jumps_land_on_the_returns() {
        let f = learning_filter(7, 9);
        assert_eq!(f.len(), 15);
        // Walk the program for a call, as the kernel would.
        let run = |nr: i64, arch: u32, arg0: u64| -> u32 {
            let mut pc = 0;
            let mut acc = 0u32;
            loop {
                let insn = &f[pc];
                match insn.code {
                    BPF_LD_W_ABS => {
                        acc = match insn.k {
                            DATA_NR => nr as u32,
                            DATA_ARCH => arch,
                            DATA_ARG0_LO => arg0 as u32,
                            DATA_ARG0_HI => (arg0 >> 32) as u32,
                            k => panic!("load of offset {k}"),
                        };
                        pc += 1;
                    }
                    BPF_JMP_JEQ_K => {
                        let off = if acc == insn.k { insn.jt } else { insn.jf };
                        pc += 1 + usize::from(off);
                    }
                    BPF_RET_K => return insn.k,
                    c => panic!("opcode {c:#x}"),
                }
            }
        };
        let x86 = AUDIT_ARCH_X86_64;
        let (allow, notify) = (libc::SECCOMP_RET_ALLOW, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(run(libc::SYS_sendmsg, x86, 7), allow);
        assert_eq!(run(libc::SYS_sendmsg, x86, 9), notify);
        assert_eq!(run(libc::SYS_sendmsg, x86, 7 | 1 << 32), notify);
        assert_eq!(run(libc::SYS_close_range, x86, 7), allow);
        assert_eq!(run(libc::SYS_close_range, x86, 9), allow);
        assert_eq!(run(libc::SYS_close_range, x86, 8), notify);
        assert_eq!(run(libc::SYS_close, x86, 7), notify);
        assert_eq!(run(libc::SYS_close, x86, 9), notify);
        assert_eq!(run(libc::SYS_read, x86, 7), notify);
        assert_eq!(run(libc::SYS_read, x86, 9), notify);
        assert_eq!(
            run(libc::SYS_read, 0x4000_0003, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn calls_are_sorted_into_rules() {
        let r = Recorder::new(blk());
        r.record(nr("read"), [5, 0x7f00, 8, 0, 0, 0]);
        r.record(nr("read"), [6, 0x7f00, 8, 0, 0, 0]);
        // F_GETFD is allowed by a conditional rule; F_SETOWN (8) by none.
        r.record(nr("fcntl"), [3, libc::F_GETFD as u64, 0, 0, 0, 0]);
        r.record(nr("fcntl"), [3, libc::F_SETOWN as u64, 9, 0, 0, 0]);
        r.record(nr("uname"), [0x7ffd_0000, 0, 0, 0, 0, 0]);
        r.record(nr("uname"), [0x7ffd_1000, 0, 0, 0, 0, 0]);
        // Executable mmap: the mmap rule demands PROT_EXEC clear.
        r.record(nr("mmap"), [0, 4096, 5, 0x22, u64::MAX, 0]);
        let rep = r.report();
        assert_eq!(rep.calls, 7);
        let used: Vec<String> = rep.used.iter().map(|u| u.rule.identity()).collect();
        assert_eq!(used, ["read", "fcntl arg1 == F_GETFD"]);
        assert_eq!(rep.used[0].calls, 2);
        assert_eq!(rep.used[0].example, "read(5, 0x7f00, 8)");
        assert_eq!(rep.missing[2].example, "uname(0x7ffd0000)");
        let missing: Vec<(String, u64)> = rep
            .missing
            .iter()
            .map(|m| (m.rule.identity(), m.calls))
            .collect();
        assert_eq!(
            missing,
            [
                ("fcntl arg1 == 0x8".to_string(), 1),
                ("mmap arg2 & PROT_EXEC == 0x4".to_string(), 1),
                ("uname".to_string(), 2),
            ]
        );
        assert_eq!(rep.unused.len(), blk().rules.len() - 2);
    }

    #[test]
    fn learned_policy_parses_and_diffs() {
        let r = Recorder::new(blk());
        r.record(nr("read"), [5, 0x7f00, 8, 0, 0, 0]);
        r.record(nr("futex"), [0x7f00, 0x81, 1, 0, 0, 0]); // FUTEX_WAKE|PRIVATE
        r.record(nr("futex"), [0x7f00, 0x85, 1, 0, 0, 0]); // FUTEX_WAKE_OP: not allowed
        r.record(nr("uname"), [0x7ffd_0000, 0, 0, 0, 0, 0]);
        let rep = r.report();
        let text = rep.policy_text("a test");
        let parsed =
            crate::format::parse("learned.policy", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed.rules.len(), 4, "{text}");
        assert!(crate::compile::compile(&parsed).is_ok());
        let d = rep.diff();
        let added: Vec<String> = d.added.iter().map(|r| r.identity()).collect();
        assert_eq!(added, ["futex arg1 & FUTEX_CMD_MASK == 0x5", "uname"]);
        assert_eq!(d.removed.len(), blk().rules.len() - 2);
        // A rule the workload needed is not among the removed ones.
        assert!(d.removed.iter().all(|r| r.syscall != "read"));
    }

    #[test]
    fn a_deleted_rule_shows_up_as_missing() {
        let mut p = blk();
        p.rules.retain(|r| r.syscall != "pwrite64");
        let r = Recorder::new(p);
        r.record(nr("pwrite64"), [5, 0x7f00, 4096, 8192, 0, 0]);
        let rep = r.report();
        assert_eq!(rep.missing.len(), 1);
        assert_eq!(rep.missing[0].rule.identity(), "pwrite64");
        assert!(rep.summary().contains("missing: pwrite64"));
    }

    #[test]
    fn dword_and_mask_conditions_match_like_the_filter() {
        let c = |width, op, value| Condition {
            arg: 1,
            width,
            op,
            value,
            value_text: String::new(),
            mask_text: None,
        };
        let args = [0, 0xffff_ffff_0000_0003, 0, 0, 0, 0];
        assert!(c(Width::Dword, Op::Eq, 3).matches(&args));
        assert!(!c(Width::Qword, Op::Eq, 3).matches(&args));
        assert!(c(Width::Qword, Op::MaskedEq(0xff), 3).matches(&args));
        assert!(c(Width::Qword, Op::Gt, 3).matches(&args));
        assert!(!c(Width::Dword, Op::Gt, 3).matches(&args));
    }
}
