//! Processes by pidfd: open, signal, wait, look at. A pidfd names one process for its
//! whole life, so nothing here can signal a stranger that reused a pid.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd on process `pid`.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Waits up to `timeout` for the process behind `pidfd` to exit; true when it has.
pub fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    wait_any_exit(&[pidfd], timeout)
}

/// Waits up to `timeout` for any of the processes behind `pidfds` to exit.
pub fn wait_any_exit(pidfds: &[&OwnedFd], timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = pidfds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: polls valid pollfds in a vector that outlives the call, with its length.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if ret >= 0 {
            return ret > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// SIGKILL through a pidfd (no pid-reuse race); false if the process is already gone.
pub fn kill(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal on a pidfd we hold; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    ret == 0
}

/// A pidfd on `pid` if that is (still) a living child of `parent`: a pid read from a
/// status page is free for reuse once its parent has reaped it, and a pidfd on a
/// stranger must never be signalled.
pub fn child_pidfd(pid: u32, parent: u32) -> Option<OwnedFd> {
    let fd = pidfd_open(pid).ok()?;
    // The pidfd pins the process; /proc then speaks of it unless it has already exited,
    // which the check after the read catches.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    (ppid == Some(parent) && !wait_exit(&fd, Duration::ZERO)).then_some(fd)
}

/// The scheduler state in an open /proc/PID/stat (`R`, `S`, `D` waiting for the disk, `T`
/// stopped, ...), read afresh from its start each time: the descriptor names the same
/// process for as long as it is open, and reads fail once that process is gone.
pub fn stat_state(stat: &std::fs::File) -> Option<char> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 512];
    let n = stat.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_killed_and_seen_to_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = child_pidfd(child.id(), std::process::id()).expect("our own child");
        assert!(!wait_exit(&fd, Duration::ZERO));
        // Running, sleeping, or still loading its executable ('D'): alive, not a zombie.
        let stat = std::fs::File::open(format!("/proc/{}/stat", child.id())).unwrap();
        let state = stat_state(&stat);
        assert!(state.is_some_and(|s| !matches!(s, 'Z' | 'X')), "{state:?}");
        assert!(kill(&fd));
        assert!(wait_exit(&fd, Duration::from_secs(5)));
        assert_eq!(stat_state(&stat), Some('Z'), "killed, not yet reaped");
        child.wait().unwrap();
        // Reaped: the open stat names a process that is gone.
        assert_eq!(stat_state(&stat), None);
        // Reaped: a pidfd on it cannot be had any more, and nobody is signalled.
        assert!(child_pidfd(child.id(), std::process::id()).is_none());
    }

    #[test]
    fn a_process_that_is_not_our_child_is_refused() {
        // pid 1 is alive and nobody's child here.
        assert!(child_pidfd(1, std::process::id()).is_none());
    }
}
