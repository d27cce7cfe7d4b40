//! Pausing the vCPUs (`PUT /v1/vm/state`): every vCPU thread leaves KVM_RUN and waits
//! outside it until resumed. KVM keeps the guest's state meanwhile; the disks' workers,
//! separate processes, complete what is in flight.
//!
//! A vCPU in KVM_RUN leaves it only for a signal. The gate sends [`KICK_SIGNAL`] to each
//! vCPU thread through a pidfd on that thread (PIDFD_THREAD, Linux 6.9+), so the API's
//! threads may signal those threads and nothing else by id. The signal's handler sets the
//! vCPU's `immediate_exit`, so a kick that lands between the vCPU's look at the gate and
//! its next KVM_RUN still makes that KVM_RUN return at once.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The signal that kicks a vCPU out of KVM_RUN.
pub const KICK_SIGNAL: i32 = libc::SIGUSR2;
/// How long a pause waits for every vCPU to stop.
pub const PAUSE_WAIT: Duration = Duration::from_secs(2);
/// `pidfd_open` flag: a pidfd on one thread (Linux 6.9).
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

thread_local! {
    /// This vCPU thread's `kvm_run.immediate_exit` (null on other threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only a const-initialised thread-local and a volatile store: async-signal-safe.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: set by this thread to its vCPU's kvm_run mapping, which lives as long
        // as the thread runs the vCPU (the VM leaks its mappings rather than unmap them
        // under a running vCPU).
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Installs the kick handler (once per process, before any vCPU runs).
pub fn install_handler() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_kick),
        // No SA_RESTART: KVM_RUN is to return EINTR, not be restarted.
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only touches a thread-local pointer (see `on_kick`).
    unsafe { sigaction(Signal::SIGUSR2, &action) }.map(|_| ())
}

/// Called by a vCPU thread before its first KVM_RUN: where its kicks land; with null
/// before the vCPU (and its kvm_run mapping) is dropped, so a late kick writes nothing.
pub fn register_vcpu(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
}

#[derive(Debug, Default)]
struct Parked {
    /// vCPU threads waiting at the gate.
    count: usize,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PauseGate {
    paused: AtomicBool,
    parked: Mutex<Parked>,
    changed: Condvar,
    /// A pidfd on each vCPU thread; empty when the kernel has no thread pidfds.
    kicks: Mutex<Vec<OwnedFd>>,
    /// vCPUs the VM has: a pause waits until every one is registered.
    expected: std::sync::atomic::AtomicUsize,
    /// Pause and resume one at a time (the API may ask for both at once).
    changing: Mutex<()>,
    /// Why pausing cannot work here, if it cannot.
    unsupported: Mutex<Option<String>>,
}

impl PauseGate {
    /// Whether the vCPUs are to stay out of KVM_RUN.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// A vCPU thread about to enter KVM_RUN: waits here while paused.
    pub fn wait_if_paused(&self) {
        if !self.paused() {
            return;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.count += 1;
        self.changed.notify_all();
        while self.paused() {
            parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        parked.count -= 1;
        self.changed.notify_all();
    }

    /// The VM has `n` vCPUs.
    pub fn expect_vcpus(&self, n: usize) {
        self.expected.store(n, Ordering::Release);
    }

    /// The main thread, once vCPU thread `tid` runs: keeps a pidfd on it to kick it.
    pub fn add_vcpu_thread(&self, tid: libc::pid_t) {
        // SAFETY: pidfd_open takes a tid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            *self.unsupported.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "pausing needs pidfds of threads (Linux 6.9 or later): pidfd_open of vCPU \
                 thread {tid} failed: {e}"
            ));
            return;
        }
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        self.kicks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fd);
    }

    /// Stops every vCPU outside KVM_RUN and returns once all are. If some do not stop
    /// within [`PAUSE_WAIT`], the pause is undone (the VM runs, as before the request)
    /// and the error says how many had stopped. `changed` runs, one state change at a
    /// time, when the VM went from running to paused (for the event).
    pub fn pause(&self, changed: impl FnOnce()) -> Result<(), String> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let unsupported = self
            .unsupported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(why) = unsupported {
            return Err(why);
        }
        // Every vCPU thread registered has its pidfd here (one without makes the gate
        // unsupported, above).
        let kicks = self.kicks.lock().unwrap_or_else(|p| p.into_inner());
        let vcpus = kicks.len();
        let expected = self.expected.load(Ordering::Acquire);
        if vcpus < expected {
            return Err(format!(
                "the vCPUs are starting ({vcpus} of {expected} ready to be paused); try again"
            ));
        }
        if self.paused() {
            return Ok(());
        }
        self.paused.store(true, Ordering::Release);
        for fd in kicks.iter() {
            // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo, no flags.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    KICK_SIGNAL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
        drop(kicks);
        let deadline = Instant::now() + PAUSE_WAIT;
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        while parked.count < vcpus {
            let now = Instant::now();
            if now >= deadline {
                let stopped = parked.count;
                self.paused.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(format!(
                    "only {stopped} of {vcpus} vCPUs stopped within {PAUSE_WAIT:?}: not \
                     paused (the VM runs)"
                ));
            }
            parked = self
                .changed
                .wait_timeout(parked, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(parked);
        changed();
        Ok(())
    }

    /// Lets the vCPUs run again; `changed` runs, one state change at a time, when the
    /// VM went from paused to running.
    pub fn resume(&self, changed: impl FnOnce()) {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if !self.paused() {
            return;
        }
        self.paused.store(false, Ordering::Release);
        self.changed.notify_all();
        drop(parked);
        changed();
    }

    /// vCPU threads waiting at the gate now.
    pub fn parked(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_wait_at_the_gate_until_resumed() {
        install_handler().unwrap();
        let gate = Arc::new(PauseGate::default());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let running = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (g, r) = (gate.clone(), running.clone());
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            for _ in 0..2_000 {
                g.wait_if_paused();
                r.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        gate.expect_vcpus(1);
        gate.add_vcpu_thread(tid_rx.recv().unwrap());
        let mut events = Vec::new();
        // No KVM here: the kick's handler is not needed to reach the gate.
        if let Err(e) = gate.pause(|| events.push("paused")) {
            // Without thread pidfds the pause is refused, and says why.
            assert!(e.contains("Linux 6.9"), "{e}");
            t.join().unwrap();
            return;
        }
        assert_eq!(gate.parked(), 1);
        let at_pause = running.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            running.load(Ordering::Relaxed),
            at_pause,
            "no step while paused"
        );
        assert_eq!(gate.pause(|| events.push("paused again")), Ok(()));
        gate.resume(|| events.push("resumed"));
        gate.resume(|| events.push("resumed again"));
        assert_eq!(events, ["paused", "resumed"], "a change is told once");
        t.join().unwrap();
        assert_eq!(running.load(Ordering::Relaxed), 2_000);
        assert_eq!(gate.parked(), 0);
    }
}

#[cfg(test)]
mod starting {
    use super::*;

    #[test]
    fn a_pause_before_every_vcpu_is_ready_is_refused_and_changes_nothing() {
        let gate = PauseGate::default();
        gate.expect_vcpus(2);
        let e = gate.pause(|| panic!("no change")).unwrap_err();
        assert!(e.contains("0 of 2"), "{e}");
        assert!(!gate.paused());
    }
}
