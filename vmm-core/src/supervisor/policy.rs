//! When to start a disk's next worker, and in which mode: the restart budget, the
//! crash-loop backoff and the restart window, as a pure state machine (no clock, no
//! processes), so every rule is tested here.
//!
//! DESIGN.md's rules: the first restart is immediate; only a worker that died before
//! completing a single request counts toward the crash-loop budget, with exponential
//! backoff between such restarts; a worker that served requests resets both. Past the
//! budget the disk gets a worker in fail mode (every request answered with IOERR); if
//! those die too, no worker until the guest resets the device, which brings a normal
//! worker back. However workers die, at most [`MAX_RESTARTS`] start in any
//! [`RESTART_WINDOW`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ipc::messages::ServeMode;

/// Consecutive deaths before any completed request that the supervisor tolerates.
pub const CRASH_LOOP_BUDGET: u32 = 5;
/// Backoff before the second restart of a crash loop; doubles each time.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// The longest backoff: [`FIRST_BACKOFF`] doubled this many times.
const MAX_DOUBLINGS: u32 = 8;
/// At most this many restarts of one disk's worker in [`RESTART_WINDOW`]; more wait for
/// room. Whatever makes workers die (a hostile guest that found a way, a broken host), it
/// cannot make bulkhead exec workers and log their ends without bound.
pub const MAX_RESTARTS: usize = 20;
pub const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// What to do next about a disk whose worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Start a worker in `mode`, after `backoff`.
    Start { mode: ServeMode, backoff: Duration },
    /// Normal workers keep dying before serving: the device needs a reset, and from now
    /// on workers start in fail mode (ask again for the first).
    EnterFailMode,
    /// Fail-mode workers die too: no worker until the guest resets the device
    /// ([`RestartPolicy::guest_reset`]).
    NoWorker,
    /// The restart window is full: ask again after this long.
    Throttled(Duration),
}

/// The restart state of one disk.
#[derive(Debug)]
pub struct RestartPolicy {
    mode: ServeMode,
    /// Workers in a row (of the current mode) that ended before serving a request, or
    /// failed to start.
    crash_loop: u32,
    /// The latest restarts, oldest first, none older than the window.
    recent: VecDeque<Instant>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: ServeMode::Normal,
            crash_loop: 0,
            recent: VecDeque::new(),
        }
    }
}

impl RestartPolicy {
    /// The mode workers start in now.
    pub fn mode(&self) -> ServeMode {
        self.mode
    }

    /// Workers in a row that died before serving (for log lines).
    pub fn crash_loop(&self) -> u32 {
        self.crash_loop
    }

    /// A worker ended; `served`: it completed a request (or was stopped on purpose).
    pub fn worker_ended(&mut self, served: bool) {
        self.crash_loop = if served { 0 } else { self.crash_loop + 1 };
    }

    /// A successor could not be started: counts as a death before service.
    pub fn start_failed(&mut self) {
        self.crash_loop += 1;
    }

    /// The guest reset the device: normal workers again, budget refilled.
    pub fn guest_reset(&mut self) {
        self.mode = ServeMode::Normal;
        self.crash_loop = 0;
    }

    /// The next step at `now`. A [`Step::Start`] counts toward the restart window.
    pub fn next(&mut self, now: Instant) -> Step {
        if self.crash_loop > CRASH_LOOP_BUDGET {
            match self.mode {
                ServeMode::Normal => {
                    self.mode = ServeMode::Fail;
                    self.crash_loop = 0;
                    return Step::EnterFailMode;
                }
                ServeMode::Fail => return Step::NoWorker,
            }
        }
        let wait = self.window_wait(now);
        if !wait.is_zero() {
            return Step::Throttled(wait);
        }
        self.recent.push_back(now);
        let backoff = match self.crash_loop {
            0 | 1 => Duration::ZERO,
            n => FIRST_BACKOFF * (1 << (n - 2).min(MAX_DOUBLINGS)),
        };
        Step::Start {
            mode: self.mode,
            backoff,
        }
    }

    /// How long the next restart must wait so that no window holds more than
    /// [`MAX_RESTARTS`].
    fn window_wait(&mut self, now: Instant) -> Duration {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RESTART_WINDOW)
        {
            self.recent.pop_front();
        }
        match self.recent.front() {
            Some(oldest) if self.recent.len() >= MAX_RESTARTS => {
                RESTART_WINDOW.saturating_sub(now.duration_since(*oldest))
            }
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(mode: ServeMode, backoff_ms: u64) -> Step {
        Step::Start {
            mode,
            backoff: Duration::from_millis(backoff_ms),
        }
    }

    #[test]
    fn the_first_restarts_are_immediate_then_back_off() {
        let mut p = RestartPolicy::default();
        let t = Instant::now();
        p.worker_ended(false);
        assert_eq!(p.next(t), start(ServeMode::Normal, 0));
        p.worker_ended(false);
        assert_eq!(p.next(t), start(ServeMode::Normal, 20));
        p.start_failed();
        assert_eq!(p.next(t), start(ServeMode::Normal, 40));
        p.worker_ended(false);
        assert_eq!(p.next(t), start(ServeMode::Normal, 80));
    }

    #[test]
    fn a_worker_that_served_refills_the_budget() {
        let mut p = RestartPolicy::default();
        let t = Instant::now();
        for _ in 0..CRASH_LOOP_BUDGET {
            p.worker_ended(false);
            assert!(matches!(p.next(t), Step::Start { .. }));
        }
        p.worker_ended(true);
        assert_eq!(p.crash_loop(), 0);
        assert_eq!(p.next(t), start(ServeMode::Normal, 0));
    }

    #[test]
    fn a_crash_loop_ends_in_fail_mode_then_no_worker_until_a_guest_reset() {
        let mut p = RestartPolicy::default();
        let mut t = Instant::now();
        let mut tick = || {
            t += Duration::from_secs(1);
            t
        };
        for _ in 0..CRASH_LOOP_BUDGET {
            p.worker_ended(false);
            assert!(matches!(
                p.next(tick()),
                Step::Start {
                    mode: ServeMode::Normal,
                    ..
                }
            ));
        }
        p.worker_ended(false);
        assert_eq!(p.next(tick()), Step::EnterFailMode);
        assert_eq!(p.mode(), ServeMode::Fail);
        assert_eq!(p.next(tick()), start(ServeMode::Fail, 0));
        for _ in 0..CRASH_LOOP_BUDGET {
            p.worker_ended(false);
            assert!(matches!(
                p.next(tick()),
                Step::Start {
                    mode: ServeMode::Fail,
                    ..
                }
            ));
        }
        p.worker_ended(false);
        assert_eq!(p.next(tick()), Step::NoWorker);
        assert_eq!(p.next(tick()), Step::NoWorker);
        p.guest_reset();
        assert_eq!(p.next(tick()), start(ServeMode::Normal, 0));
    }

    #[test]
    fn restarts_wait_for_room_in_their_window() {
        let mut p = RestartPolicy::default();
        let t0 = Instant::now();
        for i in 0..MAX_RESTARTS {
            p.worker_ended(true);
            let now = t0 + Duration::from_millis(i as u64);
            assert_eq!(p.next(now), start(ServeMode::Normal, 0));
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(
            p.next(now),
            Step::Throttled(RESTART_WINDOW - Duration::from_secs(1))
        );
        assert_eq!(p.next(t0 + RESTART_WINDOW), start(ServeMode::Normal, 0));
    }
}
