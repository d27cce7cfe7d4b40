//! Warnings a guest can cause as often as it likes (a corrupt ring each time it sets the
//! device up again): the first [`FIRST`] are logged, then one in [`EVERY`], saying how many
//! were left out. Counted, not timed: reading a clock can be a system call the policy
//! traps (where the vDSO cannot read the host's clocksource).

use std::sync::atomic::{AtomicU64, Ordering};

/// Logged in full.
pub const FIRST: u64 = 10;
/// Then one line in this many.
pub const EVERY: u64 = 1000;

static SEEN: AtomicU64 = AtomicU64::new(0);

/// Whether the next guest-caused warning may be logged; if so, how many were left out
/// since the last one that was.
pub fn admit() -> Option<u64> {
    admit_nth(SEEN.fetch_add(1, Ordering::Relaxed))
}

fn admit_nth(n: u64) -> Option<u64> {
    if n < FIRST {
        Some(0)
    } else if (n - FIRST) % EVERY == EVERY - 1 {
        Some(EVERY - 1)
    } else {
        None
    }
}

/// Logs a guest-caused warning if [`admit`] lets it. Used as `quiet::guest_warn!`.
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if let Some(left_out) = $crate::quiet::admit() {
            if left_out == 0 {
                tracing::warn!($($arg)*);
            } else {
                tracing::warn!("{} ({left_out} similar warnings left out)", format_args!($($arg)*));
            }
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_then_one_in_a_thousand() {
        let admitted: Vec<(u64, u64)> = (0..3 * EVERY + FIRST)
            .filter_map(|n| admit_nth(n).map(|left| (n, left)))
            .collect();
        assert_eq!(admitted.len() as u64, FIRST + 3);
        assert!(admitted[..FIRST as usize]
            .iter()
            .all(|&(_, left)| left == 0));
        assert_eq!(admitted[FIRST as usize], (FIRST + EVERY - 1, EVERY - 1));
    }
}
