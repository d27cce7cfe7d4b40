//! A disk's counters over the lives of all its workers, for `/metrics` and the API: the
//! VMM adds an ended worker's totals to what its predecessors did, so a restart never
//! sets a counter back.
//!
//! Request counts come from each worker's status page: the worker's word. A compromised
//! worker can misreport its own work, not poison the disk's totals: they grow by what a
//! worker's page gained since the last look (every [`super::HANG_CHECK`] and every
//! scrape), at most what the fastest device could do in that time, so they never go
//! back and never saturate. Restarts, hangs and violations are
//! the supervisor's own findings; a worker's memory and CPU time are read from the
//! /proc/PID/stat the spawner opened on the confined process, never from the worker.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipc::status::{RequestCounters, StatusMapping};

/// Why a worker was replaced, as `/metrics` and the events name it.
pub const CAUSES: [&str; 7] = [
    "crash",
    "violation",
    "hang",
    "exited",
    "killed",
    "planned",
    "guest_reset",
];

/// The most a page's counters may gain per second of wall time: far above any device
/// (a compromised worker's claims beyond them are not counted).
const MAX_REQUESTS_PER_SEC: f64 = 50e6;
const MAX_BYTES_PER_SEC: f64 = 100.0 * (1u64 << 30) as f64;
/// Latency microseconds a second: a million requests in flight, each a whole second.
const MAX_LATENCY_US_PER_SEC: f64 = 1e12;
/// Slack added to every look's elapsed time (the page is read at the look's start).
const LOOK_SLACK_SECS: f64 = 0.1;
/// More requests in flight than any queue set can hold.
const MAX_IN_FLIGHT: u64 = 1 << 20;

/// A page's counters as last read.
#[derive(Debug, Clone, Copy, Default)]
struct Raw {
    completed: u64,
    failed: u64,
    requests: RequestCounters,
}

impl Raw {
    fn read(status: &StatusMapping) -> Raw {
        Raw {
            completed: status.completed(),
            failed: status.failed(),
            requests: status.request_counters(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    restarts: BTreeMap<&'static str, u64>,
    hangs: u64,
    violations: u64,
    /// Every worker's work as looked at so far, the serving one's included.
    completed: u64,
    failed: u64,
    requests: RequestCounters,
    /// Ended workers' CPU time.
    cpu_ticks: u64,
    /// The serving worker: its page, its stat file and the CPU ticks last read there.
    live: Option<Live>,
}

#[derive(Debug)]
struct Live {
    status: Arc<StatusMapping>,
    stat: Option<Arc<File>>,
    cpu_ticks: u64,
    /// The page at the last look, and when that was.
    last: Raw,
    last_at: Instant,
    in_flight: u64,
}

impl Inner {
    /// Adds what the serving worker's page gained since the last look, each counter at
    /// most what the time since allows (a page that went back gains nothing until it
    /// passes its old value).
    fn look(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let now = Instant::now();
        let secs = now.duration_since(live.last_at).as_secs_f64() + LOOK_SLACK_SECS;
        live.last_at = now;
        let raw = Raw::read(&live.status);
        let gain = |now: u64, before: u64, per_sec: f64| {
            now.saturating_sub(before).min((per_sec * secs) as u64)
        };
        let count = |now, before| gain(now, before, MAX_REQUESTS_PER_SEC);
        self.completed = self
            .completed
            .saturating_add(count(raw.completed, live.last.completed));
        self.failed = self
            .failed
            .saturating_add(count(raw.failed, live.last.failed));
        let (r, was, total) = (&raw.requests, &live.last.requests, &mut self.requests);
        for ((t, n), b) in total.by_type.iter_mut().zip(r.by_type).zip(was.by_type) {
            *t = t.saturating_add(count(n, b));
        }
        for ((t, n), b) in total.latency.iter_mut().zip(r.latency).zip(was.latency) {
            *t = t.saturating_add(count(n, b));
        }
        total.bytes_read =
            total
                .bytes_read
                .saturating_add(gain(r.bytes_read, was.bytes_read, MAX_BYTES_PER_SEC));
        total.bytes_written = total.bytes_written.saturating_add(gain(
            r.bytes_written,
            was.bytes_written,
            MAX_BYTES_PER_SEC,
        ));
        total.latency_sum_us = total.latency_sum_us.saturating_add(gain(
            r.latency_sum_us,
            was.latency_sum_us,
            MAX_LATENCY_US_PER_SEC,
        ));
        live.in_flight = r.in_flight.min(MAX_IN_FLIGHT);
        live.last = raw;
    }

    /// Reads the serving worker's CPU time; its resident bytes.
    fn look_at_stat(&mut self) -> Option<u64> {
        let live = self.live.as_mut()?;
        let (cpu, rss) = live.stat.as_deref().and_then(read_stat)?;
        live.cpu_ticks = live.cpu_ticks.max(cpu);
        Some(rss.saturating_mul(page_size()))
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct DiskCounters {
    inner: Mutex<Inner>,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Restarts by cause, every cause of [`CAUSES`] present.
    pub restarts: Vec<(&'static str, u64)>,
    pub hangs: u64,
    pub violations: u64,
    /// Requests completed (errors included) and failed, over all workers.
    pub completed: u64,
    pub failed: u64,
    /// By type, bytes, in flight and latencies, over all workers (the in-flight gauge is
    /// the serving worker's).
    pub requests: RequestCounters,
    /// The serving worker's resident memory (None: no worker, or unreadable).
    pub rss_bytes: Option<u64>,
    /// CPU time of all the disk's workers, in clock ticks.
    pub cpu_ticks: u64,
}

/// Clock ticks a second for /proc's CPU times (`sysconf(_SC_CLK_TCK)`, a constant of
/// the C library: no system call).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: as above (glibc answers from the auxiliary vector).
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// utime + stime and the resident pages of a /proc/PID/stat (None once the process is
/// gone or the text is not what the kernel writes).
fn read_stat(stat: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = stat.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    // The command name may hold anything, ')' included: fields follow the last one.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) and 24 (rss), counted from 1 with the pid; `rest`
    // starts at field 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?.saturating_add(field(15)?), field(24)?))
}

impl DiskCounters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new worker serves the disk (its page was reset: its counters start at zero).
    pub fn worker_started(&self, status: Arc<StatusMapping>, stat: Option<Arc<File>>) {
        let mut inner = self.lock();
        inner.live = Some(Live {
            status,
            stat,
            cpu_ticks: 0,
            last: Raw::default(),
            last_at: Instant::now(),
            in_flight: 0,
        });
    }

    /// The serving worker ended: its last counts join the totals.
    pub fn worker_ended(&self) {
        let mut inner = self.lock();
        inner.look();
        inner.look_at_stat();
        if let Some(live) = inner.live.take() {
            inner.cpu_ticks = inner.cpu_ticks.saturating_add(live.cpu_ticks);
        }
    }

    /// Looks at the serving worker's page and CPU time: the supervisor does so while it
    /// watches, so a worker's work counts up to its last look, not only to the last
    /// scrape (once it is reaped, its stat can no longer be read).
    pub fn sample(&self) {
        let mut inner = self.lock();
        inner.look();
        inner.look_at_stat();
    }

    /// A worker was replaced, for `cause` (one of [`CAUSES`]).
    pub fn restarted(&self, cause: &'static str) {
        *self.lock().restarts.entry(cause).or_default() += 1;
    }

    pub fn hung(&self) {
        self.lock().hangs += 1;
    }

    pub fn violated(&self) {
        self.lock().violations += 1;
    }

    /// The counters now (looks at the serving worker's page and stat).
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut inner = self.lock();
        inner.look();
        let rss_bytes = inner.look_at_stat();
        let live_cpu = inner.live.as_ref().map_or(0, |l| l.cpu_ticks);
        let cpu_ticks = inner.cpu_ticks.saturating_add(live_cpu);
        let (completed, failed) = (inner.completed, inner.failed);
        let requests = RequestCounters {
            in_flight: inner.live.as_ref().map_or(0, |l| l.in_flight),
            ..inner.requests
        };
        CounterSnapshot {
            restarts: CAUSES
                .iter()
                .map(|c| (*c, inner.restarts.get(c).copied().unwrap_or(0)))
                .collect(),
            hangs: inner.hangs,
            violations: inner.violations,
            completed,
            failed,
            requests,
            rss_bytes,
            cpu_ticks,
        }
    }
}

impl CounterSnapshot {
    /// As `GET /v1/disks/{id}` shows them.
    pub fn to_json(&self) -> serde_json::Value {
        let restarts: serde_json::Map<String, serde_json::Value> = self
            .restarts
            .iter()
            .map(|(c, n)| (c.to_string(), (*n).into()))
            .collect();
        let r = &self.requests;
        let by_type: serde_json::Map<String, serde_json::Value> = ipc::status::REQUEST_TYPES
            .iter()
            .zip(r.by_type)
            .map(|(t, n)| (t.to_string(), n.into()))
            .collect();
        serde_json::json!({
            "requests_completed": self.completed,
            "requests_failed": self.failed,
            "requests_by_type": by_type,
            "bytes_read": r.bytes_read,
            "bytes_written": r.bytes_written,
            "in_flight": r.in_flight,
            "latency": {
                "bounds_us": ipc::status::LATENCY_BOUNDS_US,
                "counts": r.latency,
                "sum_us": r.latency_sum_us,
            },
            "restarts": restarts,
            "hangs": self.hangs,
            "violations": self.violations,
            "worker_rss_bytes": self.rss_bytes,
            "worker_cpu_seconds": self.cpu_ticks as f64 / ticks_per_second() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Arc<StatusMapping> {
        let (_fd, mapping) = ipc::status::StatusPage::create("test-counters").unwrap();
        Arc::new(mapping)
    }

    #[test]
    fn totals_survive_a_worker_and_its_successor_adds_to_them() {
        let counters = DiskCounters::default();
        let first = page();
        let stat = Arc::new(File::open("/proc/self/stat").unwrap());
        counters.worker_started(first.clone(), Some(stat));
        first.set_completed(10, 2);
        first.set_request_counters(&RequestCounters {
            by_type: [8, 4, 0, 0, 0],
            bytes_read: 4096,
            in_flight: 3,
            ..Default::default()
        });
        let s = counters.snapshot();
        assert_eq!(s.requests.in_flight, 3);
        assert_eq!((s.completed, s.failed), (10, 2));
        assert!(s.rss_bytes.is_some_and(|r| r > 0));
        counters.worker_ended();
        counters.restarted("crash");
        let second = page();
        counters.worker_started(second.clone(), None);
        second.set_completed(5, 1);
        second.set_request_counters(&RequestCounters {
            by_type: [1, 0, 0, 0, 0],
            bytes_read: 512,
            in_flight: 1,
            ..Default::default()
        });
        let s = counters.snapshot();
        assert_eq!((s.completed, s.failed), (15, 3));
        assert_eq!(s.requests.by_type, [9, 4, 0, 0, 0]);
        assert_eq!(s.requests.bytes_read, 4608);
        assert_eq!(s.requests.in_flight, 1, "the live worker's only");
        assert_eq!(s.rss_bytes, None);
        assert!(s.restarts.contains(&("crash", 1)));
        assert!(s.restarts.contains(&("hang", 0)));
        assert_eq!(s.restarts.len(), CAUSES.len());
    }

    #[test]
    fn a_lying_page_cannot_poison_the_totals_or_set_them_back() {
        let counters = DiskCounters::default();
        let hostile = page();
        counters.worker_started(hostile.clone(), None);
        hostile.set_completed(u64::MAX, u64::MAX);
        hostile.set_request_counters(&RequestCounters {
            bytes_read: u64::MAX,
            in_flight: u64::MAX,
            ..Default::default()
        });
        let s = counters.snapshot();
        assert!(s.completed < 1 << 40, "{}", s.completed);
        assert!(s.requests.bytes_read < 1 << 50);
        assert_eq!(s.requests.in_flight, MAX_IN_FLIGHT);
        hostile.set_completed(0, 0);
        assert_eq!(counters.snapshot().completed, s.completed, "never back");
        counters.worker_ended();
        let honest = page();
        counters.worker_started(honest.clone(), None);
        honest.set_completed(7, 0);
        assert_eq!(counters.snapshot().completed, s.completed + 7);
    }

    #[test]
    fn stat_fields_are_read_after_the_last_parenthesis() {
        let dir = std::env::temp_dir().join(format!("bh-stat-{}", std::process::id()));
        let line = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 1 0 100 123456 77 18446744073709551615";
        std::fs::write(&dir, line).unwrap();
        let f = File::open(&dir).unwrap();
        assert_eq!(read_stat(&f), Some((100, 77)));
        std::fs::write(&dir, "garbage").unwrap();
        assert_eq!(read_stat(&File::open(&dir).unwrap()), None);
        std::fs::remove_file(&dir).unwrap();
    }
}
