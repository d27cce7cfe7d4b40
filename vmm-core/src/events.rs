//! What happened to the VM and its disks, numbered, for `GET /v1/events`: worker restarts
//! (with their cause), hangs, policy violations, fail mode, guest resets of a failing
//! device, pause, resume and shutdown.
//!
//! Every event gets the next sequence number; the last [`KEPT`] are kept, so a client that
//! lost its connection asks for the ones after the last it saw and misses nothing that is
//! still kept (and is told how many it missed otherwise). Threads that emit are plain
//! threads; the API's readers wait on a `tokio::sync::watch`, which needs no runtime to
//! send on.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many events are kept for clients that resume.
pub const KEPT: usize = 1024;

/// One event. `seq` starts at 1 and has no gaps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `restart`, `hang`, `violation`, `fail_mode`, `guest_reset`, `paused`, `resumed`,
    /// `shutdown`.
    pub kind: &'static str,
    /// The disk it concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// What else there is to say (cause, pid, the call...), a JSON object.
    pub detail: serde_json::Value,
}

/// The events since the VM started (see the module documentation).
#[derive(Debug)]
pub struct EventLog {
    kept: Mutex<VecDeque<Event>>,
    /// The last sequence number given out (0: none yet).
    latest: tokio::sync::watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            kept: Mutex::new(VecDeque::with_capacity(KEPT)),
            latest: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// The events after a given sequence number that are still kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Since {
    pub events: Vec<Event>,
    /// Events after the one asked for that are no longer kept.
    pub missed: u64,
    /// The number asked for is beyond the last one given out: it came from another run
    /// (numbers start at 1 with every bulkhead), so the events are from the first kept.
    pub reset: bool,
}

impl EventLog {
    /// Records an event and wakes the API's readers; returns its sequence number.
    pub fn emit(&self, kind: &'static str, disk: Option<&str>, detail: serde_json::Value) -> u64 {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let seq = kept.back().map_or(*self.latest.borrow(), |e| e.seq) + 1;
        if kept.len() == KEPT {
            kept.pop_front();
        }
        kept.push_back(Event {
            seq,
            time_ms,
            kind,
            disk: disk.map(str::to_string),
            detail,
        });
        // Sent under the lock: readers never see a number before its event.
        self.latest.send_replace(seq);
        seq
    }

    /// The last sequence number given out (0 before the first event).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// A receiver that changes with every new event.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// The kept events with a sequence number above `after`, oldest first, at most `max`.
    pub fn since(&self, after: u64, max: usize) -> Since {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let latest = kept.back().map_or(*self.latest.borrow(), |e| e.seq);
        let reset = after > latest;
        let after = if reset { 0 } else { after };
        let first = kept.front().map_or(u64::MAX, |e| e.seq);
        let missed = first.saturating_sub(after.saturating_add(1));
        let missed = if kept.is_empty() { 0 } else { missed };
        Since {
            events: kept
                .iter()
                .filter(|e| e.seq > after)
                .take(max)
                .cloned()
                .collect(),
            missed,
            reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_no_gaps_and_a_reader_resumes_after_the_last_it_saw() {
        let log = EventLog::default();
        assert_eq!(log.latest(), 0);
        assert_eq!(log.since(0, 10).events, vec![]);
        let a = log.emit(
            "restart",
            Some("blk0"),
            serde_json::json!({"cause": "crash"}),
        );
        let b = log.emit("paused", None, serde_json::json!({}));
        assert_eq!((a, b), (1, 2));
        assert_eq!(log.latest(), 2);
        let all = log.since(0, 10);
        assert_eq!(all.missed, 0);
        assert_eq!(all.events.len(), 2);
        assert_eq!(all.events[0].disk.as_deref(), Some("blk0"));
        let rest = log.since(1, 10);
        assert_eq!(rest.events.len(), 1);
        assert_eq!(rest.events[0].kind, "paused");
        assert!(log.since(2, 10).events.is_empty());
        assert_eq!(log.since(0, 1).events.len(), 1, "at most max");
    }

    #[test]
    fn a_reader_that_fell_behind_is_told_how_many_it_missed() {
        let log = EventLog::default();
        for _ in 0..KEPT + 5 {
            log.emit("hang", Some("blk0"), serde_json::json!({}));
        }
        let s = log.since(0, usize::MAX);
        assert_eq!(s.missed, 5);
        assert_eq!(s.events.len(), KEPT);
        assert_eq!(s.events[0].seq, 6);
        assert_eq!(log.since(5, 1).missed, 0);
        assert!(!log.since(5, 1).reset);
    }

    #[test]
    fn a_number_from_another_run_starts_over() {
        let log = EventLog::default();
        log.emit("paused", None, serde_json::json!({}));
        let s = log.since(500, 10);
        assert!(s.reset);
        assert_eq!(s.events.len(), 1, "from the first kept");
        assert!(!log.since(1, 10).reset);
        assert!(EventLog::default().since(3, 10).reset);
    }

    #[test]
    fn readers_are_woken_by_an_emit_from_a_plain_thread() {
        let log = std::sync::Arc::new(EventLog::default());
        let mut rx = log.subscribe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let emitter = log.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            emitter.emit("resumed", None, serde_json::json!({}))
        });
        rt.block_on(async { rx.changed().await.unwrap() });
        assert_eq!(*rx.borrow(), t.join().unwrap());
    }
}
