//! The worker's measure of its own requests, for the VMM's metrics: how many of each type
//! completed, the bytes they moved, how many are in flight, and how long each took from
//! its chain's pop to its used entry (a histogram, [`ipc::status::LATENCY_BOUNDS_US`]).
//! Published on the status page with the other totals.

use std::time::Instant;

use ipc::status::RequestCounters;

use super::request::RequestKind;

/// A request's type, as the page counts them (index into `REQUEST_TYPES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    /// GET_ID, and chains refused before they became a request.
    Other = 4,
}

impl Kind {
    /// The type of `kind` and the bytes it moves if it succeeds.
    pub fn of(kind: &RequestKind) -> (Kind, u32) {
        match kind {
            RequestKind::In { len, .. } => (Kind::Read, *len),
            RequestKind::Out { len, .. } => (Kind::Write, *len),
            RequestKind::Flush => (Kind::Flush, 0),
            RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => (Kind::Discard, 0),
            RequestKind::GetId { .. } => (Kind::Other, 0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Started {
    kind: Kind,
    bytes: u32,
    at: Instant,
}

/// See the module documentation. Requests are keyed by queue and head index (a head is
/// in flight at most once per queue).
#[derive(Debug, Default)]
pub struct RequestStats {
    started: Vec<Vec<Option<Started>>>,
    counters: RequestCounters,
}

impl RequestStats {
    /// A request taken from `queue` at `head`.
    pub fn start(&mut self, queue: u16, head: u16, kind: Kind, bytes: u32) {
        let (q, h) = (usize::from(queue), usize::from(head));
        if self.started.len() <= q {
            self.started.resize_with(q + 1, Vec::new);
        }
        let slots = &mut self.started[q];
        if slots.len() <= h {
            slots.resize(h + 1, None);
        }
        if slots[h].is_none() {
            self.counters.in_flight += 1;
        }
        slots[h] = Some(Started {
            kind,
            bytes,
            at: Instant::now(),
        });
    }

    /// The request at `head` of `queue` completed (`ok`: with status OK). A head not
    /// started here (a predecessor's, resubmitted) counts without a latency.
    pub fn finish(&mut self, queue: u16, head: u16, ok: bool) {
        let slot = self
            .started
            .get_mut(usize::from(queue))
            .and_then(|s| s.get_mut(usize::from(head)))
            .and_then(Option::take);
        let Some(started) = slot else {
            self.counters.by_type[Kind::Other as usize] += 1;
            return;
        };
        self.counters.in_flight = self.counters.in_flight.saturating_sub(1);
        let c = &mut self.counters;
        c.by_type[started.kind as usize] += 1;
        if ok {
            match started.kind {
                Kind::Read => c.bytes_read += u64::from(started.bytes),
                Kind::Write => c.bytes_written += u64::from(started.bytes),
                _ => {}
            }
        }
        let us = started.at.elapsed().as_micros() as u64;
        c.latency_sum_us = c.latency_sum_us.saturating_add(us);
        c.latency[RequestCounters::bucket(us)] += 1;
    }

    pub fn counters(&self) -> RequestCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_bytes_in_flight_and_latency_are_counted() {
        let mut s = RequestStats::default();
        s.start(0, 3, Kind::Read, 4096);
        s.start(1, 3, Kind::Write, 512);
        s.start(0, 7, Kind::Flush, 0);
        assert_eq!(s.counters().in_flight, 3);
        s.finish(0, 3, true);
        s.finish(1, 3, false);
        let c = s.counters();
        assert_eq!(c.in_flight, 1);
        assert_eq!(c.by_type, [1, 1, 0, 0, 0]);
        assert_eq!(
            (c.bytes_read, c.bytes_written),
            (4096, 0),
            "a failed write moves nothing"
        );
        assert_eq!(c.latency.iter().sum::<u64>(), 2);
        s.finish(0, 7, true);
        // A head this worker never started still counts, once.
        s.finish(2, 9, true);
        assert_eq!(s.counters().by_type, [1, 1, 1, 0, 1]);
        assert_eq!(s.counters().in_flight, 0);
    }

    #[test]
    fn the_same_head_taken_twice_is_in_flight_once() {
        let mut s = RequestStats::default();
        s.start(0, 1, Kind::Read, 512);
        s.start(0, 1, Kind::Read, 512);
        assert_eq!(s.counters().in_flight, 1);
    }
}
