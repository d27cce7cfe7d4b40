//! Symbolic constants that policy files may use as argument values, and errno names for the
//! `errno` action. Values are the x86_64 Linux ABI values, written out (not taken from the
//! host's `libc`) so that the build script compiles the same filter on any host.
//!
//! The groups are also used by `decode` to render flags. This file is shared with `build.rs`
//! (`#[path]`), so it must not depend on anything else in the crate.

/// A named constant.
pub type Named = (&'static str, u64);

/// `PROT_*` (mmap, mprotect).
pub const PROT: &[Named] = &[
    ("PROT_NONE", 0),
    ("PROT_READ", 0x1),
    ("PROT_WRITE", 0x2),
    ("PROT_EXEC", 0x4),
    ("PROT_GROWSDOWN", 0x0100_0000),
    ("PROT_GROWSUP", 0x0200_0000),
];

/// `MAP_*` (mmap flags).
pub const MAP: &[Named] = &[
    ("MAP_SHARED", 0x1),
    ("MAP_PRIVATE", 0x2),
    ("MAP_SHARED_VALIDATE", 0x3),
    ("MAP_FIXED", 0x10),
    ("MAP_ANONYMOUS", 0x20),
    ("MAP_32BIT", 0x40),
    ("MAP_GROWSDOWN", 0x100),
    ("MAP_DENYWRITE", 0x800),
    ("MAP_EXECUTABLE", 0x1000),
    ("MAP_LOCKED", 0x2000),
    ("MAP_NORESERVE", 0x4000),
    ("MAP_POPULATE", 0x8000),
    ("MAP_NONBLOCK", 0x1_0000),
    ("MAP_STACK", 0x2_0000),
    ("MAP_HUGETLB", 0x4_0000),
    ("MAP_SYNC", 0x8_0000),
    ("MAP_FIXED_NOREPLACE", 0x10_0000),
];

/// `MREMAP_*`.
pub const MREMAP: &[Named] = &[
    ("MREMAP_MAYMOVE", 0x1),
    ("MREMAP_FIXED", 0x2),
    ("MREMAP_DONTUNMAP", 0x4),
];

/// `MADV_*` (madvise advice; values, not bits).
pub const MADV: &[Named] = &[
    ("MADV_NORMAL", 0),
    ("MADV_RANDOM", 1),
    ("MADV_SEQUENTIAL", 2),
    ("MADV_WILLNEED", 3),
    ("MADV_DONTNEED", 4),
    ("MADV_FREE", 8),
    ("MADV_REMOVE", 9),
    ("MADV_DONTFORK", 10),
    ("MADV_DOFORK", 11),
    ("MADV_MERGEABLE", 12),
    ("MADV_UNMERGEABLE", 13),
    ("MADV_HUGEPAGE", 14),
    ("MADV_NOHUGEPAGE", 15),
    ("MADV_DONTDUMP", 16),
    ("MADV_DODUMP", 17),
    ("MADV_WIPEONFORK", 18),
    ("MADV_KEEPONFORK", 19),
    ("MADV_COLD", 20),
    ("MADV_PAGEOUT", 21),
    ("MADV_POPULATE_READ", 22),
    ("MADV_POPULATE_WRITE", 23),
    ("MADV_COLLAPSE", 25),
    ("MADV_GUARD_INSTALL", 102),
    ("MADV_GUARD_REMOVE", 103),
];

/// `F_*` fcntl commands (values) and `FD_CLOEXEC`.
pub const FCNTL: &[Named] = &[
    ("F_DUPFD", 0),
    ("F_GETFD", 1),
    ("F_SETFD", 2),
    ("F_GETFL", 3),
    ("F_SETFL", 4),
    ("F_GETLK", 5),
    ("F_SETLK", 6),
    ("F_SETLKW", 7),
    ("F_SETOWN", 8),
    ("F_GETOWN", 9),
    ("F_SETSIG", 10),
    ("F_GETSIG", 11),
    ("F_OFD_GETLK", 36),
    ("F_OFD_SETLK", 37),
    ("F_OFD_SETLKW", 38),
    ("F_SETLEASE", 1024),
    ("F_GETLEASE", 1025),
    ("F_NOTIFY", 1026),
    ("F_DUPFD_CLOEXEC", 1030),
    ("F_SETPIPE_SZ", 1031),
    ("F_GETPIPE_SZ", 1032),
    ("F_ADD_SEALS", 1033),
    ("F_GET_SEALS", 1034),
    ("FD_CLOEXEC", 1),
];

/// `O_*` open flags (bits, except the access mode in the low two bits).
pub const OPEN: &[Named] = &[
    ("O_RDONLY", 0),
    ("O_WRONLY", 0x1),
    ("O_RDWR", 0x2),
    ("O_CREAT", 0x40),
    ("O_EXCL", 0x80),
    ("O_NOCTTY", 0x100),
    ("O_TRUNC", 0x200),
    ("O_APPEND", 0x400),
    ("O_NONBLOCK", 0x800),
    ("O_DSYNC", 0x1000),
    ("O_ASYNC", 0x2000),
    ("O_DIRECT", 0x4000),
    ("O_LARGEFILE", 0x8000),
    ("O_DIRECTORY", 0x1_0000),
    ("O_NOFOLLOW", 0x2_0000),
    ("O_NOATIME", 0x4_0000),
    ("O_CLOEXEC", 0x8_0000),
    ("O_SYNC", 0x10_1000),
    ("O_PATH", 0x20_0000),
    ("O_TMPFILE", 0x41_0000),
];

/// `AT_*` (dirfd and flags of the `*at` calls).
pub const AT: &[Named] = &[
    // -100 as a 64-bit register value; `format` also accepts it against 32-bit arguments.
    ("AT_FDCWD", 0xffff_ffff_ffff_ff9c),
    ("AT_SYMLINK_NOFOLLOW", 0x100),
    ("AT_REMOVEDIR", 0x200),
    ("AT_SYMLINK_FOLLOW", 0x400),
    ("AT_NO_AUTOMOUNT", 0x800),
    ("AT_EMPTY_PATH", 0x1000),
    ("AT_STATX_SYNC_AS_STAT", 0),
    ("AT_STATX_FORCE_SYNC", 0x2000),
    ("AT_STATX_DONT_SYNC", 0x4000),
];

/// ioctl requests a policy or a report is likely to name.
pub const IOCTL: &[Named] = &[
    ("TCGETS", 0x5401),
    ("TCSETS", 0x5402),
    ("TIOCSCTTY", 0x540E),
    ("TIOCSTI", 0x5412),
    ("TIOCGWINSZ", 0x5413),
    ("FIONREAD", 0x541B),
    ("TIOCLINUX", 0x541C),
    ("FIONBIO", 0x5421),
    ("FIONCLEX", 0x5450),
    ("FIOCLEX", 0x5451),
    ("FIOASYNC", 0x5452),
    ("BLKGETSIZE64", 0x8008_1272),
    ("BLKSSZGET", 0x1268),
    ("BLKDISCARD", 0x1277),
    ("BLKFLSBUF", 0x1261),
    ("KVM_CREATE_VM", 0xAE01),
    ("KVM_RUN", 0xAE80),
    ("KVM_GET_REGS", 0x8090_AE81),
    ("KVM_GET_SREGS", 0x8138_AE83),
    ("KVM_TRANSLATE", 0xC018_AE85),
    ("SECCOMP_IOCTL_NOTIF_RECV", 0xC050_2100),
    ("SECCOMP_IOCTL_NOTIF_SEND", 0xC018_2101),
    ("SECCOMP_IOCTL_NOTIF_ID_VALID", 0x4008_2102),
];

/// `FALLOC_FL_*` (fallocate mode bits).
pub const FALLOC: &[Named] = &[
    ("FALLOC_FL_KEEP_SIZE", 0x1),
    ("FALLOC_FL_PUNCH_HOLE", 0x2),
    ("FALLOC_FL_NO_HIDE_STALE", 0x4),
    ("FALLOC_FL_COLLAPSE_RANGE", 0x8),
    ("FALLOC_FL_ZERO_RANGE", 0x10),
    ("FALLOC_FL_INSERT_RANGE", 0x20),
    ("FALLOC_FL_UNSHARE_RANGE", 0x40),
    ("FALLOC_FL_WRITE_ZEROES", 0x80),
];

/// `FUTEX_*` operations and op flags.
pub const FUTEX: &[Named] = &[
    ("FUTEX_WAIT", 0),
    ("FUTEX_WAKE", 1),
    ("FUTEX_FD", 2),
    ("FUTEX_REQUEUE", 3),
    ("FUTEX_CMP_REQUEUE", 4),
    ("FUTEX_WAKE_OP", 5),
    ("FUTEX_LOCK_PI", 6),
    ("FUTEX_UNLOCK_PI", 7),
    ("FUTEX_TRYLOCK_PI", 8),
    ("FUTEX_WAIT_BITSET", 9),
    ("FUTEX_WAKE_BITSET", 10),
    ("FUTEX_WAIT_REQUEUE_PI", 11),
    ("FUTEX_CMP_REQUEUE_PI", 12),
    ("FUTEX_LOCK_PI2", 13),
    ("FUTEX_PRIVATE_FLAG", 0x80),
    ("FUTEX_CLOCK_REALTIME", 0x100),
    // The kernel's `~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME)` on the 32-bit `op`.
    ("FUTEX_CMD_MASK", 0xffff_fe7f),
];

/// `PR_*` prctl options.
pub const PRCTL: &[Named] = &[
    ("PR_SET_PDEATHSIG", 1),
    ("PR_GET_PDEATHSIG", 2),
    ("PR_GET_DUMPABLE", 3),
    ("PR_SET_DUMPABLE", 4),
    ("PR_SET_KEEPCAPS", 8),
    ("PR_SET_NAME", 15),
    ("PR_GET_NAME", 16),
    ("PR_GET_SECCOMP", 21),
    ("PR_SET_SECCOMP", 22),
    ("PR_CAPBSET_DROP", 24),
    ("PR_SET_NO_NEW_PRIVS", 38),
    ("PR_GET_NO_NEW_PRIVS", 39),
    ("PR_SET_VMA", 0x5356_4d41),
];

/// `RWF_*` (preadv2/pwritev2 flags).
pub const RWF: &[Named] = &[
    ("RWF_HIPRI", 0x1),
    ("RWF_DSYNC", 0x2),
    ("RWF_SYNC", 0x4),
    ("RWF_NOWAIT", 0x8),
    ("RWF_APPEND", 0x10),
];

/// `EPOLL_CTL_*`.
pub const EPOLL: &[Named] = &[
    ("EPOLL_CTL_ADD", 1),
    ("EPOLL_CTL_DEL", 2),
    ("EPOLL_CTL_MOD", 3),
];

/// `MSG_*` (send/recv flags).
pub const MSG: &[Named] = &[
    ("MSG_OOB", 0x1),
    ("MSG_PEEK", 0x2),
    ("MSG_TRUNC", 0x20),
    ("MSG_DONTWAIT", 0x40),
    ("MSG_WAITALL", 0x100),
    ("MSG_NOSIGNAL", 0x4000),
    ("MSG_CMSG_CLOEXEC", 0x4000_0000),
];

/// Signal numbers and `SIG_BLOCK`-style `how` values.
pub const SIGNAL: &[Named] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGILL", 4),
    ("SIGTRAP", 5),
    ("SIGABRT", 6),
    ("SIGBUS", 7),
    ("SIGFPE", 8),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGSEGV", 11),
    ("SIGUSR2", 12),
    ("SIGPIPE", 13),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGSTKFLT", 16),
    ("SIGCHLD", 17),
    ("SIGCONT", 18),
    ("SIGSTOP", 19),
    ("SIGTSTP", 20),
    ("SIGTTIN", 21),
    ("SIGTTOU", 22),
    ("SIGURG", 23),
    ("SIGXCPU", 24),
    ("SIGXFSZ", 25),
    ("SIGVTALRM", 26),
    ("SIGPROF", 27),
    ("SIGWINCH", 28),
    ("SIGIO", 29),
    ("SIGPWR", 30),
    ("SIGSYS", 31),
    ("SIG_BLOCK", 0),
    ("SIG_UNBLOCK", 1),
    ("SIG_SETMASK", 2),
];

/// `CLOCK_*` ids.
pub const CLOCK: &[Named] = &[
    ("CLOCK_REALTIME", 0),
    ("CLOCK_MONOTONIC", 1),
    ("CLOCK_PROCESS_CPUTIME_ID", 2),
    ("CLOCK_THREAD_CPUTIME_ID", 3),
    ("CLOCK_MONOTONIC_RAW", 4),
    ("CLOCK_REALTIME_COARSE", 5),
    ("CLOCK_MONOTONIC_COARSE", 6),
    ("CLOCK_BOOTTIME", 7),
];

/// `GRND_*` (getrandom flags).
pub const GRND: &[Named] = &[
    ("GRND_NONBLOCK", 0x1),
    ("GRND_RANDOM", 0x2),
    ("GRND_INSECURE", 0x4),
];

/// `AF_*` address families.
pub const AF: &[Named] = &[
    ("AF_UNSPEC", 0),
    ("AF_UNIX", 1),
    ("AF_INET", 2),
    ("AF_INET6", 10),
    ("AF_NETLINK", 16),
    ("AF_PACKET", 17),
    ("AF_ALG", 38),
    ("AF_VSOCK", 40),
    ("AF_XDP", 44),
];

/// `SOCK_*` socket types (low nibble) and type flags.
pub const SOCK: &[Named] = &[
    ("SOCK_STREAM", 1),
    ("SOCK_DGRAM", 2),
    ("SOCK_RAW", 3),
    ("SOCK_RDM", 4),
    ("SOCK_SEQPACKET", 5),
    ("SOCK_PACKET", 10),
    ("SOCK_NONBLOCK", 0x800),
    ("SOCK_CLOEXEC", 0x8_0000),
];

/// `CLONE_*` flags (clone, clone3, unshare, setns).
pub const CLONE: &[Named] = &[
    ("CLONE_NEWTIME", 0x80),
    ("CLONE_VM", 0x100),
    ("CLONE_FS", 0x200),
    ("CLONE_FILES", 0x400),
    ("CLONE_SIGHAND", 0x800),
    ("CLONE_PIDFD", 0x1000),
    ("CLONE_PTRACE", 0x2000),
    ("CLONE_VFORK", 0x4000),
    ("CLONE_PARENT", 0x8000),
    ("CLONE_THREAD", 0x1_0000),
    ("CLONE_NEWNS", 0x2_0000),
    ("CLONE_SYSVSEM", 0x4_0000),
    ("CLONE_SETTLS", 0x8_0000),
    ("CLONE_PARENT_SETTID", 0x10_0000),
    ("CLONE_CHILD_CLEARTID", 0x20_0000),
    ("CLONE_DETACHED", 0x40_0000),
    ("CLONE_UNTRACED", 0x80_0000),
    ("CLONE_CHILD_SETTID", 0x100_0000),
    ("CLONE_NEWCGROUP", 0x200_0000),
    ("CLONE_NEWUTS", 0x400_0000),
    ("CLONE_NEWIPC", 0x800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
    ("CLONE_IO", 0x8000_0000),
];

/// Socket option levels and options (setsockopt, getsockopt).
pub const SOCKOPT: &[Named] = &[
    ("SOL_SOCKET", 1),
    ("SO_ERROR", 4),
    ("SO_RCVTIMEO", 20),
    ("SO_SNDTIMEO", 21),
    ("IPPROTO_TCP", 6),
    ("TCP_NODELAY", 1),
];

/// `LOCK_*` (flock operations).
pub const FLOCK: &[Named] = &[
    ("LOCK_SH", 1),
    ("LOCK_EX", 2),
    ("LOCK_NB", 4),
    ("LOCK_UN", 8),
];

/// `SHUT_*` (shutdown's `how`).
pub const SHUT: &[Named] = &[("SHUT_RD", 0), ("SHUT_WR", 1), ("SHUT_RDWR", 2)];

/// `SECCOMP_*` operations of the seccomp syscall.
pub const SECCOMP: &[Named] = &[
    ("SECCOMP_SET_MODE_STRICT", 0),
    ("SECCOMP_SET_MODE_FILTER", 1),
    ("SECCOMP_GET_ACTION_AVAIL", 2),
    ("SECCOMP_GET_NOTIF_SIZES", 3),
];

/// Every group a policy file can draw a constant from.
pub const ALL: &[&[Named]] = &[
    PROT, MAP, MREMAP, MADV, FCNTL, OPEN, AT, IOCTL, FALLOC, FUTEX, PRCTL, RWF, EPOLL, MSG, SIGNAL,
    CLOCK, GRND, AF, SOCK, SOCKOPT, CLONE, FLOCK, SHUT, SECCOMP,
];

/// The value of the constant called `name`.
pub fn lookup(name: &str) -> Option<u64> {
    ALL.iter()
        .flat_map(|group| group.iter())
        .find(|&&(n, _)| n == name)
        .map(|&(_, v)| v)
}

/// errno names accepted by the `errno NAME` action.
pub const ERRNO: &[(&str, u32)] = &[
    ("EPERM", 1),
    ("ENOENT", 2),
    ("ESRCH", 3),
    ("EINTR", 4),
    ("EIO", 5),
    ("ENXIO", 6),
    ("E2BIG", 7),
    ("ENOEXEC", 8),
    ("EBADF", 9),
    ("ECHILD", 10),
    ("EAGAIN", 11),
    ("ENOMEM", 12),
    ("EACCES", 13),
    ("EFAULT", 14),
    ("EBUSY", 16),
    ("EEXIST", 17),
    ("EXDEV", 18),
    ("ENODEV", 19),
    ("ENOTDIR", 20),
    ("EISDIR", 21),
    ("EINVAL", 22),
    ("ENFILE", 23),
    ("EMFILE", 24),
    ("ENOTTY", 25),
    ("EFBIG", 27),
    ("ENOSPC", 28),
    ("ESPIPE", 29),
    ("EROFS", 30),
    ("EPIPE", 32),
    ("ERANGE", 34),
    ("ENOSYS", 38),
    ("ENOTSOCK", 88),
    ("EOPNOTSUPP", 95),
    ("EAFNOSUPPORT", 97),
];

/// The number of errno `name`.
pub fn errno(name: &str) -> Option<u32> {
    ERRNO.iter().find(|&&(n, _)| n == name).map(|&(_, v)| v)
}

/// The name of errno `value`, if it is in [`ERRNO`].
pub fn errno_name(value: u32) -> Option<&'static str> {
    ERRNO.iter().find(|&&(_, v)| v == value).map(|&(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = ALL.iter().flat_map(|g| g.iter().map(|&(n, _)| n)).collect();
        let len = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), len, "a constant name appears in two groups");
    }

    #[test]
    fn agree_with_libc_on_x86_64() {
        assert_eq!(lookup("PROT_EXEC"), Some(libc::PROT_EXEC as u64));
        assert_eq!(lookup("MAP_SHARED"), Some(libc::MAP_SHARED as u64));
        assert_eq!(lookup("FIONBIO"), Some(libc::FIONBIO));
        assert_eq!(
            lookup("F_DUPFD_CLOEXEC"),
            Some(libc::F_DUPFD_CLOEXEC as u64)
        );
        assert_eq!(lookup("O_CLOEXEC"), Some(libc::O_CLOEXEC as u64));
        assert_eq!(lookup("O_TMPFILE"), Some(libc::O_TMPFILE as u64));
        assert_eq!(lookup("AT_FDCWD"), Some(libc::AT_FDCWD as i64 as u64));
        assert_eq!(
            lookup("FALLOC_FL_ZERO_RANGE"),
            Some(libc::FALLOC_FL_ZERO_RANGE as u64)
        );
        assert_eq!(lookup("CLONE_NEWUSER"), Some(libc::CLONE_NEWUSER as u64));
        assert_eq!(lookup("MADV_FREE"), Some(libc::MADV_FREE as u64));
        assert_eq!(lookup("SOCK_CLOEXEC"), Some(libc::SOCK_CLOEXEC as u64));
        assert_eq!(errno("ENOSYS"), Some(libc::ENOSYS as u32));
        assert_eq!(errno_name(38), Some("ENOSYS"));
        assert_eq!(lookup("NOPE"), None);
    }
}
