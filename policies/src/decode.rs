//! Rendering of a recorded system call (number + six raw argument registers) for violation
//! reports, e.g. `openat(AT_FDCWD, 0x7f0012345678, O_RDONLY|O_CLOEXEC, 0)`.
//!
//! Calls a sandbox escape attempt is likely to use get typed arguments (fds, flags, signal
//! names); every other call prints its name and all six registers in hex. Pointers are only
//! printed: the worker's memory is gone by the time the report is read.

use crate::constants::{self, Named};
use crate::syscalls;

/// How to print one argument.
#[derive(Clone, Copy)]
enum Arg {
    /// File descriptor (signed int).
    Fd,
    /// Directory fd of `*at` calls (`AT_FDCWD`).
    DirFd,
    /// Pointer: hex, `NULL` for 0.
    Ptr,
    /// Size or count: unsigned decimal.
    Dec,
    /// Signed int (pids, return-ish values).
    Int,
    /// Raw hex.
    Hex,
    /// File mode: octal.
    Mode,
    /// `O_*` open flags (access mode + bits).
    Open,
    /// `PROT_*`.
    Prot,
    /// `MAP_*` (type + bits).
    Map,
    /// `AF_*`.
    Family,
    /// `SOCK_*` (type + flags).
    SockType,
    /// Signal number.
    Signal,
    /// `CLONE_*` plus the exit signal in the low byte (clone).
    CloneFlags,
    /// `CLONE_*` only (unshare, setns).
    NsFlags,
    /// `PTRACE_*` request.
    Ptrace,
    /// `MS_*` mount flags.
    Mount,
    /// `BPF_*` command.
    BpfCmd,
    /// ioctl request.
    Ioctl,
    /// `F_*` fcntl command.
    Fcntl,
    /// `MADV_*` advice.
    Madv,
    /// `PR_*` option.
    Prctl,
}

/// The typed argument list of the calls we decode.
fn signature(name: &str) -> Option<&'static [Arg]> {
    use Arg::*;
    Some(match name {
        "open" => &[Ptr, Open, Mode],
        "openat" => &[DirFd, Ptr, Open, Mode],
        "openat2" => &[DirFd, Ptr, Ptr, Dec],
        "creat" => &[Ptr, Mode],
        "socket" => &[Family, SockType, Int],
        "socketpair" => &[Family, SockType, Int, Ptr],
        "connect" | "bind" => &[Fd, Ptr, Dec],
        "execve" => &[Ptr, Ptr, Ptr],
        "execveat" => &[DirFd, Ptr, Ptr, Ptr, Hex],
        "mmap" => &[Ptr, Dec, Prot, Map, Fd, Hex],
        "mprotect" => &[Ptr, Dec, Prot],
        "pkey_mprotect" => &[Ptr, Dec, Prot, Int],
        "madvise" => &[Ptr, Dec, Madv],
        "kill" => &[Int, Signal],
        "tkill" => &[Int, Signal],
        "tgkill" => &[Int, Int, Signal],
        "ptrace" => &[Ptrace, Int, Ptr, Ptr],
        "clone" => &[CloneFlags, Ptr, Ptr, Ptr, Hex],
        "clone3" => &[Ptr, Dec],
        "unshare" => &[NsFlags],
        "setns" => &[Fd, NsFlags],
        "mount" => &[Ptr, Ptr, Ptr, Mount, Ptr],
        "umount2" => &[Ptr, Hex],
        "bpf" => &[BpfCmd, Ptr, Dec],
        "io_uring_setup" => &[Dec, Ptr],
        "io_uring_enter" => &[Fd, Dec, Dec, Hex, Ptr, Dec],
        "io_uring_register" => &[Fd, Dec, Ptr, Dec],
        "ioctl" => &[Fd, Ioctl, Hex],
        "fcntl" => &[Fd, Fcntl, Hex],
        "prctl" => &[Prctl, Hex, Hex, Hex, Hex],
        "close" | "fsync" | "fdatasync" => &[Fd],
        "close_range" => &[Fd, Fd, Hex],
        "read" | "write" => &[Fd, Ptr, Dec],
        // The calls a worker makes while serving, so learned examples read well too.
        "recvmsg" | "sendmsg" => &[Fd, Ptr, Hex],
        "epoll_wait" => &[Fd, Ptr, Int, Int],
        "epoll_ctl" => &[Fd, Int, Fd, Ptr],
        "preadv" | "pwritev" => &[Fd, Ptr, Dec, Dec],
        "pread64" | "pwrite64" => &[Fd, Ptr, Dec, Dec],
        "fallocate" => &[Fd, Hex, Dec, Dec],
        "munmap" => &[Ptr, Dec],
        "mremap" => &[Ptr, Dec, Dec, Hex, Ptr],
        "brk" | "uname" => &[Ptr],
        "sigaltstack" => &[Ptr, Ptr],
        "futex" => &[Ptr, Hex, Int, Ptr, Ptr, Hex],
        "exit" | "exit_group" => &[Int],
        _ => return None,
    })
}

const MOUNT: &[Named] = &[
    ("MS_RDONLY", 0x1),
    ("MS_NOSUID", 0x2),
    ("MS_NODEV", 0x4),
    ("MS_NOEXEC", 0x8),
    ("MS_SYNCHRONOUS", 0x10),
    ("MS_REMOUNT", 0x20),
    ("MS_MANDLOCK", 0x40),
    ("MS_DIRSYNC", 0x80),
    ("MS_NOSYMFOLLOW", 0x100),
    ("MS_NOATIME", 0x400),
    ("MS_NODIRATIME", 0x800),
    ("MS_BIND", 0x1000),
    ("MS_MOVE", 0x2000),
    ("MS_REC", 0x4000),
    ("MS_SILENT", 0x8000),
    ("MS_POSIXACL", 0x1_0000),
    ("MS_UNBINDABLE", 0x2_0000),
    ("MS_PRIVATE", 0x4_0000),
    ("MS_SLAVE", 0x8_0000),
    ("MS_SHARED", 0x10_0000),
    ("MS_RELATIME", 0x20_0000),
    ("MS_KERNMOUNT", 0x40_0000),
    ("MS_I_VERSION", 0x80_0000),
    ("MS_STRICTATIME", 0x100_0000),
    ("MS_LAZYTIME", 0x200_0000),
];

const PTRACE: &[Named] = &[
    ("PTRACE_TRACEME", 0),
    ("PTRACE_PEEKTEXT", 1),
    ("PTRACE_PEEKDATA", 2),
    ("PTRACE_PEEKUSER", 3),
    ("PTRACE_POKETEXT", 4),
    ("PTRACE_POKEDATA", 5),
    ("PTRACE_POKEUSER", 6),
    ("PTRACE_CONT", 7),
    ("PTRACE_KILL", 8),
    ("PTRACE_SINGLESTEP", 9),
    ("PTRACE_GETREGS", 12),
    ("PTRACE_SETREGS", 13),
    ("PTRACE_ATTACH", 16),
    ("PTRACE_DETACH", 17),
    ("PTRACE_SYSCALL", 24),
    ("PTRACE_SETOPTIONS", 0x4200),
    ("PTRACE_GETEVENTMSG", 0x4201),
    ("PTRACE_GETSIGINFO", 0x4202),
    ("PTRACE_SETSIGINFO", 0x4203),
    ("PTRACE_SEIZE", 0x4206),
    ("PTRACE_INTERRUPT", 0x4207),
];

const BPF_CMD: &[Named] = &[
    ("BPF_MAP_CREATE", 0),
    ("BPF_MAP_LOOKUP_ELEM", 1),
    ("BPF_MAP_UPDATE_ELEM", 2),
    ("BPF_MAP_DELETE_ELEM", 3),
    ("BPF_MAP_GET_NEXT_KEY", 4),
    ("BPF_PROG_LOAD", 5),
    ("BPF_OBJ_PIN", 6),
    ("BPF_OBJ_GET", 7),
    ("BPF_PROG_ATTACH", 8),
    ("BPF_PROG_DETACH", 9),
    ("BPF_PROG_TEST_RUN", 10),
    ("BPF_BTF_LOAD", 18),
    ("BPF_LINK_CREATE", 28),
];

/// Render call `nr` with argument registers `args`. `nr` is taken as recorded in the status
/// page (`u64`); a value that is no x86_64 syscall renders as `syscall_<nr>` (signed).
pub fn format_call(nr: u64, args: [u64; 6]) -> String {
    let nr = nr as i64;
    let name = match syscalls::name(nr) {
        Some(name) => name.to_string(),
        None => format!("syscall_{nr}"),
    };
    let rendered: Vec<String> = match signature(&name) {
        Some(sig) => sig
            .iter()
            .zip(args)
            .map(|(&kind, v)| arg(kind, v))
            .collect(),
        None => args.iter().map(|v| format!("{v:#x}")).collect(),
    };
    format!("{name}({})", rendered.join(", "))
}

fn arg(kind: Arg, v: u64) -> String {
    let int = v as i32;
    match kind {
        Arg::Fd | Arg::Int => int.to_string(),
        Arg::DirFd if int == -100 => "AT_FDCWD".to_string(),
        Arg::DirFd => int.to_string(),
        Arg::Ptr if v == 0 => "NULL".to_string(),
        Arg::Ptr | Arg::Hex => format!("{v:#x}"),
        Arg::Dec => v.to_string(),
        Arg::Mode if v == 0 => "0".to_string(),
        Arg::Mode => format!("0{v:o}"),
        Arg::Open => {
            let mode = match v & 0x3 {
                0 => "O_RDONLY",
                1 => "O_WRONLY",
                2 => "O_RDWR",
                _ => "O_ACCMODE",
            };
            join(mode, flags(v & !0x3, &constants::OPEN[3..]))
        }
        Arg::Prot if v == 0 => "PROT_NONE".to_string(),
        Arg::Prot => flags(v, constants::PROT),
        Arg::Map => {
            let kind = value(v & 0xf, &constants::MAP[..3]);
            join(&kind, flags(v & !0xf, &constants::MAP[3..]))
        }
        Arg::Family => value(v, constants::AF),
        Arg::SockType => {
            let kind = value(v & 0xf, &constants::SOCK[..6]);
            join(&kind, flags(v & !0xf, &constants::SOCK[6..]))
        }
        Arg::Signal => signal(v),
        Arg::CloneFlags => {
            let rest = flags(v & !0xff, constants::CLONE);
            match v & 0xff {
                0 => rest,
                sig => join(&rest, signal(sig)),
            }
        }
        Arg::NsFlags => flags(v, constants::CLONE),
        Arg::Ptrace => value(v, PTRACE),
        Arg::Mount => flags(v, MOUNT),
        Arg::BpfCmd => value(v, BPF_CMD),
        Arg::Ioctl => value(v, constants::IOCTL),
        Arg::Fcntl => value(v, &constants::FCNTL[..constants::FCNTL.len() - 1]),
        Arg::Madv => value(v, constants::MADV),
        Arg::Prctl => value(v, constants::PRCTL),
    }
}

fn join(first: &str, rest: String) -> String {
    if rest == "0" {
        first.to_string()
    } else {
        format!("{first}|{rest}")
    }
}

fn signal(v: u64) -> String {
    constants::SIGNAL
        .iter()
        .find(|&&(n, s)| s == v && !n.starts_with("SIG_"))
        .map_or_else(|| v.to_string(), |&(n, _)| n.to_string())
}

/// The name of value `v` in `table`, else `v` in hex.
fn value(v: u64, table: &[Named]) -> String {
    table
        .iter()
        .find(|&&(_, x)| x == v)
        .map_or_else(|| format!("{v:#x}"), |&(n, _)| n.to_string())
}

/// `v` as `A|B|0xrest`; multi-bit names are preferred to their parts; `0` if empty.
fn flags(v: u64, table: &[Named]) -> String {
    let mut candidates: Vec<&Named> = table.iter().filter(|&&(_, bits)| bits != 0).collect();
    candidates.sort_by_key(|&&(_, bits)| std::cmp::Reverse(bits.count_ones()));
    let mut rest = v;
    let mut chosen: Vec<(u64, &str)> = Vec::new();
    for &&(name, bits) in &candidates {
        if rest & bits == bits {
            chosen.push((bits, name));
            rest &= !bits;
        }
    }
    chosen.sort_unstable();
    let mut parts: Vec<String> = chosen.into_iter().map(|(_, n)| n.to_string()).collect();
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        "0".to_string()
    } else {
        parts.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &[u64]) -> String {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        format_call(syscalls::number(name).unwrap() as u64, a)
    }

    #[test]
    fn openat() {
        assert_eq!(
            call("openat", &[(-100i64) as u64, 0x7f00_1234_5678, 0x80000, 0]),
            "openat(AT_FDCWD, 0x7f0012345678, O_RDONLY|O_CLOEXEC, 0)"
        );
        assert_eq!(
            call("openat", &[3, 0x10, 0x2 | 0x40 | 0x80 | 0x410000, 0o600]),
            "openat(3, 0x10, O_RDWR|O_CREAT|O_EXCL|O_TMPFILE, 0600)"
        );
        assert_eq!(
            call("open", &[0, 0x101001, 0]),
            "open(NULL, O_WRONLY|O_SYNC, 0)"
        );
    }

    #[test]
    fn sockets() {
        assert_eq!(
            call("socket", &[2, 1 | 0x80000, 0]),
            "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, 0)"
        );
        assert_eq!(
            call("socket", &[16, 3, 9]),
            "socket(AF_NETLINK, SOCK_RAW, 9)"
        );
        assert_eq!(call("connect", &[5, 0x1000, 16]), "connect(5, 0x1000, 16)");
    }

    #[test]
    fn memory() {
        assert_eq!(
            call("mmap", &[0, 4096, 5, 0x22, u64::MAX, 0]),
            "mmap(NULL, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0x0)"
        );
        assert_eq!(
            call("mprotect", &[0x7000, 8192, 0]),
            "mprotect(0x7000, 8192, PROT_NONE)"
        );
        assert_eq!(
            call("mprotect", &[0x7000, 8192, 0x7 | 0x40]),
            "mprotect(0x7000, 8192, PROT_READ|PROT_WRITE|PROT_EXEC|0x40)"
        );
    }

    #[test]
    fn processes() {
        assert_eq!(call("kill", &[1, 9]), "kill(1, SIGKILL)");
        assert_eq!(call("tgkill", &[7, 8, 6]), "tgkill(7, 8, SIGABRT)");
        assert_eq!(
            call("ptrace", &[16, 1234, 0, 0]),
            "ptrace(PTRACE_ATTACH, 1234, NULL, NULL)"
        );
        assert_eq!(
            call("unshare", &[0x1000_0000 | 0x2_0000]),
            "unshare(CLONE_NEWNS|CLONE_NEWUSER)"
        );
        assert_eq!(
            call("clone", &[0x0100_0000 | 0x20_0000 | 17, 0, 0, 0x7ff0, 0]),
            "clone(CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, NULL, NULL, 0x7ff0, 0x0)"
        );
        assert_eq!(
            call("execve", &[0x10, 0x20, 0x30]),
            "execve(0x10, 0x20, 0x30)"
        );
    }

    #[test]
    fn kernel_surfaces() {
        assert_eq!(
            call("mount", &[0, 0x10, 0, 0x1000 | 0x4000, 0]),
            "mount(NULL, 0x10, NULL, MS_BIND|MS_REC, NULL)"
        );
        assert_eq!(
            call("bpf", &[5, 0x10, 128]),
            "bpf(BPF_PROG_LOAD, 0x10, 128)"
        );
        assert_eq!(
            call("io_uring_setup", &[64, 0x10]),
            "io_uring_setup(64, 0x10)"
        );
        assert_eq!(call("ioctl", &[0, 0x5412, 0x10]), "ioctl(0, TIOCSTI, 0x10)");
        assert_eq!(call("ioctl", &[4, 0xdead, 1]), "ioctl(4, 0xdead, 0x1)");
        assert_eq!(
            call("fcntl", &[4, 1030, 0]),
            "fcntl(4, F_DUPFD_CLOEXEC, 0x0)"
        );
    }

    #[test]
    fn fallback() {
        assert_eq!(
            call("getuid", &[1, 2, 3, 4, 5, 0xff]),
            "getuid(0x1, 0x2, 0x3, 0x4, 0x5, 0xff)"
        );
        assert_eq!(
            format_call(999, [0; 6]),
            "syscall_999(0x0, 0x0, 0x0, 0x0, 0x0, 0x0)"
        );
        assert_eq!(
            format_call(u64::MAX, [0; 6]),
            "syscall_-1(0x0, 0x0, 0x0, 0x0, 0x0, 0x0)"
        );
    }
}
