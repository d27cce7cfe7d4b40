//! One ring as the backend sees it: the virtqueue, its kick and call eventfds, and its
//! state.
//!
//! The vhost-user specification gives a ring two independent states: started/stopped
//! (SET_VRING_KICK starts it, GET_VRING_BASE stops it) and enabled/disabled
//! (SET_VRING_ENABLE, or implied by SET_FEATURES without PROTOCOL_FEATURES). `enabled`
//! is the second, a plain switch. The first, together with what the data plane learns
//! while serving (recovery due, engine full, ring corrupt), is [`RingState`]:
//!
//! ```text
//!                 SET_VRING_KICK              first pass
//!   Stopped ───────────────────────► Starting ───────────► Running ◄──┐
//!      ▲                                 │                   │  ▲     │ pass that
//!      │  GET_VRING_BASE (from any       │                   │  │     │ throttled /
//!      │  state but Broken)              │        pass that  ▼  │     │ did not
//!      └─────────────────────────────────┘        throttled  Throttled┘
//!
//!   any state ── ring found corrupt ──► Broken { resume }
//!   Broken { resume } ── SET_VRING_ADDR ──► resume (Stopped, Starting or Running)
//!   Broken: SET_VRING_KICK makes resume Starting if it was Stopped;
//!           GET_VRING_BASE makes it Stopped.
//! ```
//!
//! Only a live ring ([`Vring::live`]: Starting, Running or Throttled, enabled, addresses
//! set) is served.

use std::os::fd::AsRawFd;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Largest ring size we accept (the virtio maximum for split rings is 32768; QEMU and the
/// Linux driver use 128-1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Where a ring is in its life (see the module documentation for the transitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingState {
    /// Not started yet, or stopped by GET_VRING_BASE: not served, kicks not watched.
    Stopped,
    /// Just started by SET_VRING_KICK: the next pass takes the used idx from guest memory
    /// and resubmits what a predecessor left in flight before serving new requests.
    Starting,
    /// Serving.
    Running,
    /// Serving, but the engine was full: requests wait in the avail ring (notifications
    /// off); the ring is drained again after the next completions.
    Throttled,
    /// The ring was corrupt; it stays off until the frontend sets its addresses again,
    /// and then goes back to `resume`. Start and stop messages still move `resume`.
    Broken { resume: Resume },
}

/// The state a broken ring goes back to once the frontend sets it up again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    Stopped,
    /// Started since it broke (or broke before its recovery ran): recovery is still due.
    Starting,
    Running,
}

impl RingState {
    /// SET_VRING_KICK: starts a stopped ring (recovery due); a started one stays as it is.
    pub fn kick_set(self) -> RingState {
        match self {
            RingState::Stopped => RingState::Starting,
            RingState::Broken {
                resume: Resume::Stopped,
            } => RingState::Broken {
                resume: Resume::Starting,
            },
            other => other,
        }
    }

    /// GET_VRING_BASE: stops the ring (a broken one stays broken).
    pub fn stopped(self) -> RingState {
        match self {
            RingState::Broken { .. } => RingState::Broken {
                resume: Resume::Stopped,
            },
            _ => RingState::Stopped,
        }
    }

    /// SET_VRING_ADDR accepted new addresses: a broken ring resumes.
    pub fn readdressed(self) -> RingState {
        match self {
            RingState::Broken { resume } => match resume {
                Resume::Stopped => RingState::Stopped,
                Resume::Starting => RingState::Starting,
                Resume::Running => RingState::Running,
            },
            other => other,
        }
    }

    /// The ring was found corrupt.
    pub fn broken(self) -> RingState {
        let resume = match self {
            RingState::Stopped => Resume::Stopped,
            RingState::Starting => Resume::Starting,
            RingState::Running | RingState::Throttled => Resume::Running,
            RingState::Broken { resume } => resume,
        };
        RingState::Broken { resume }
    }

    /// The recovery of a starting ring is taken (it runs now): Starting becomes Running.
    /// Returns whether recovery was due.
    pub fn take_recovery(&mut self) -> bool {
        if *self == RingState::Starting {
            *self = RingState::Running;
            true
        } else {
            false
        }
    }

    /// A pass over a serving ring ended; `throttled`: with requests left for lack of
    /// room. Any other state is kept.
    pub fn passed(self, throttled: bool) -> RingState {
        match self {
            RingState::Running | RingState::Throttled if throttled => RingState::Throttled,
            RingState::Running | RingState::Throttled => RingState::Running,
            other => other,
        }
    }

    /// Started (by SET_VRING_KICK) and not stopped since, broken or not.
    pub fn started(self) -> bool {
        match self {
            RingState::Stopped => false,
            RingState::Starting | RingState::Running | RingState::Throttled => true,
            RingState::Broken { resume } => resume != Resume::Stopped,
        }
    }

    /// Served when kicked (if also enabled and set up).
    pub fn serving(self) -> bool {
        matches!(
            self,
            RingState::Starting | RingState::Running | RingState::Throttled
        )
    }

    pub fn is_broken(self) -> bool {
        matches!(self, RingState::Broken { .. })
    }
}

/// One ring.
#[derive(Debug)]
pub struct Vring {
    pub queue: Queue,
    pub kick: Option<EventFd>,
    pub call: Option<EventFd>,
    /// SET_VRING_ENABLE (or implied by SET_FEATURES without PROTOCOL_FEATURES).
    pub enabled: bool,
    pub state: RingState,
}

impl Vring {
    pub fn new() -> Self {
        Vring {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("MAX_QUEUE_SIZE is a valid ring size"),
            kick: None,
            call: None,
            enabled: false,
            state: RingState::Stopped,
        }
    }

    /// Writes the call eventfd (the guest's interrupt), if there is one.
    pub fn signal(&self, index: usize) {
        if let Some(call) = self.call.as_ref() {
            if let Err(e) = call.write(1) {
                tracing::warn!("queue {index}: cannot signal the call eventfd: {e}");
            }
        }
    }

    /// Served now: started, not broken, enabled, and its addresses set.
    pub fn live(&self) -> bool {
        self.state.serving() && self.enabled && self.queue.ready()
    }

    /// The kick eventfd to watch, if any: a live ring's, and a started broken ring's (its
    /// kicks are read and ignored: one left unread would look to the supervisor like
    /// work this worker was told about).
    pub fn watched_kick(&self) -> Option<std::os::fd::RawFd> {
        let watch = self.live() || (self.state.started() && self.state.is_broken());
        self.kick.as_ref().filter(|_| watch).map(|k| k.as_raw_fd())
    }
}

impl Default for Vring {
    fn default() -> Self {
        Vring::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [RingState; 7] = [
        RingState::Stopped,
        RingState::Starting,
        RingState::Running,
        RingState::Throttled,
        RingState::Broken {
            resume: Resume::Stopped,
        },
        RingState::Broken {
            resume: Resume::Starting,
        },
        RingState::Broken {
            resume: Resume::Running,
        },
    ];

    #[test]
    fn a_ring_starts_recovers_once_and_serves() {
        let mut s = RingState::Stopped.kick_set();
        assert_eq!(s, RingState::Starting);
        assert!(s.serving() && s.started());
        assert!(s.take_recovery());
        assert_eq!(s, RingState::Running);
        assert!(!s.take_recovery(), "recovery runs once per start");
        // A second SET_VRING_KICK (a new eventfd) on a started ring recovers nothing.
        assert_eq!(s.kick_set(), RingState::Running);
        assert_eq!(RingState::Throttled.kick_set(), RingState::Throttled);
    }

    #[test]
    fn a_full_engine_throttles_until_a_pass_takes_everything() {
        let s = RingState::Running.passed(true);
        assert_eq!(s, RingState::Throttled);
        assert!(s.serving());
        assert_eq!(s.passed(true), RingState::Throttled);
        assert_eq!(s.passed(false), RingState::Running);
        // Passes do not move rings that are not serving.
        for s in [
            RingState::Stopped,
            RingState::Broken {
                resume: Resume::Running,
            },
        ] {
            assert_eq!(s.passed(true), s);
        }
    }

    #[test]
    fn get_vring_base_stops_every_state_and_a_broken_ring_stays_broken() {
        for s in ALL {
            let stopped = s.stopped();
            assert!(!stopped.started(), "{s:?}");
            assert!(!stopped.serving(), "{s:?}");
            assert_eq!(stopped.is_broken(), s.is_broken(), "{s:?}");
        }
        // Stopping drops a due recovery and a throttle: the next start begins afresh.
        assert_eq!(RingState::Starting.stopped(), RingState::Stopped);
        assert_eq!(RingState::Throttled.stopped(), RingState::Stopped);
    }

    #[test]
    fn a_broken_ring_is_not_served_until_set_up_again_then_resumes() {
        for (s, back) in [
            (RingState::Stopped, RingState::Stopped),
            (RingState::Starting, RingState::Starting),
            (RingState::Running, RingState::Running),
            // The throttle is not kept: readdressing makes the event loop drain every
            // live ring anyway.
            (RingState::Throttled, RingState::Running),
        ] {
            let broken = s.broken();
            assert!(broken.is_broken() && !broken.serving(), "{s:?}");
            assert_eq!(broken.started(), s.started(), "{s:?}");
            assert_eq!(broken.broken(), broken, "breaking again changes nothing");
            assert_eq!(broken.passed(false), broken);
            assert_eq!(broken.readdressed(), back, "{s:?}");
        }
    }

    #[test]
    fn start_and_stop_move_a_broken_rings_resume_state() {
        let broken_stopped = RingState::Running.broken().stopped();
        assert_eq!(
            broken_stopped,
            RingState::Broken {
                resume: Resume::Stopped
            }
        );
        let broken_started = broken_stopped.kick_set();
        assert!(broken_started.started() && !broken_started.serving());
        // Set up again: its recovery, due since the start, runs on the next pass.
        let mut s = broken_started.readdressed();
        assert_eq!(s, RingState::Starting);
        assert!(s.take_recovery());
    }

    #[test]
    fn readdressing_a_healthy_ring_changes_nothing() {
        for s in ALL.into_iter().filter(|s| !s.is_broken()) {
            assert_eq!(s.readdressed(), s);
        }
    }

    #[test]
    fn only_a_started_enabled_set_up_ring_is_live() {
        let mut v = Vring::new();
        assert!(!v.live());
        v.state = RingState::Starting;
        assert!(!v.live(), "not enabled");
        v.enabled = true;
        assert!(!v.live(), "no addresses");
        v.queue.set_ready(true);
        assert!(v.live());
        v.state = v.state.broken();
        assert!(!v.live());
        // A started broken ring's kick is still watched; a stopped one's is not.
        v.kick = Some(EventFd::new(0).unwrap());
        assert!(v.watched_kick().is_some());
        v.state = v.state.stopped();
        assert!(v.watched_kick().is_none());
    }
}
