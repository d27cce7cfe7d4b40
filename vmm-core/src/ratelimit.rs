//! Log lines a guest (or a worker) can cause as often as it likes: at most [`BURST`] a
//! [`WINDOW`] per limiter (one per disk and kind), and with the first line of the next
//! window the count of those left out. A hostile guest looping on an error once produced
//! 839,677 log lines (91 MB) in 60 s.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines a window.
pub const BURST: u32 = 5;

#[derive(Debug)]
pub struct RateLimitedLog {
    state: Mutex<State>,
    /// Lines a window.
    burst: u32,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::with_burst(BURST)
    }
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A limiter that lets `burst` lines through a window.
    pub fn with_burst(burst: u32) -> Self {
        RateLimitedLog {
            state: Mutex::new(State::default()),
            burst,
        }
    }

    /// Whether a line may be logged now; if so, how many were left out before it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            st.window_start = Some(now);
            st.logged = 0;
        }
        if st.logged >= self.burst {
            st.suppressed += 1;
            return None;
        }
        st.logged += 1;
        Some(std::mem::take(&mut st.suppressed))
    }

    /// Logs `line` at WARN if the window allows.
    pub fn log(&self, line: std::fmt::Arguments) {
        if let Some(left_out) = self.admit() {
            tracing::warn!("{line}{}", note(left_out));
        }
    }

    /// Logs `line` at ERROR if the window allows.
    pub fn error(&self, line: std::fmt::Arguments) {
        if let Some(left_out) = self.admit() {
            tracing::error!("{line}{}", note(left_out));
        }
    }
}

fn note(left_out: u64) -> String {
    if left_out == 0 {
        String::new()
    } else {
        format!(
            " ({left_out} similar lines left out in the last {} s)",
            WINDOW.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_a_window_then_the_count_of_the_rest() {
        let log = RateLimitedLog::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(log.admit_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(log.admit_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(log.admit_at(t0 + WINDOW), Some(1000));
        assert_eq!(log.admit_at(t0 + WINDOW), Some(0));
    }
}
