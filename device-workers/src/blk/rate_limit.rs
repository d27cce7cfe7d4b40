//! A disk's I/O limits: two token buckets (bytes and requests), as Firecracker's rate
//! limiter has them, shared by every queue of the disk (the worker is one thread, so the
//! buckets need no lock).
//!
//! A request is let in while both buckets hold tokens, then charged its full cost: a
//! bucket may go into debt by up to one request, and the next request waits until the
//! debt is paid back. Over any longer stretch the rate is exactly the bucket's, and a
//! request never has to be put back into the ring once taken (which the inflight log
//! could not express; see [`super::engine`]). A throttled ring stays with notifications
//! off and is drained again when a timerfd, made before the sandbox, says the bucket has
//! refilled: no busy waiting, and no kick wakes the worker for nothing.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use ipc::messages::{RateLimit, TokenBucket};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use super::backend::BlockIo;
use super::engine::{Processed, RequestEngine};
use super::request::{BlkContext, Request, RequestKind};
use super::stats::Kind;
use crate::vhost::device::Reaped;

/// One bucket's state.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// As configured.
    params: TokenBucket,
    size: u64,
    refill_ns: u64,
    /// Tokens now (negative: debt). Never above `size`.
    budget: i128,
    /// What is left of the one-time burst, spent before the budget.
    burst: u64,
    /// When `budget` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn new(tb: TokenBucket, now: Instant) -> Bucket {
        Bucket {
            params: tb,
            size: tb.size,
            refill_ns: tb.refill_time_ms.saturating_mul(1_000_000).max(1),
            budget: i128::from(tb.size),
            burst: tb.one_time_burst,
            at: now,
        }
    }

    /// The budget at `now`, and the time it accounts up to (so that fractions of a
    /// token are never lost between refills).
    fn refilled(&self, now: Instant) -> (i128, Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_nanos();
        let tokens = elapsed * u128::from(self.size) / u128::from(self.refill_ns);
        let budget = self
            .budget
            .saturating_add(i128::try_from(tokens).unwrap_or(i128::MAX))
            .min(i128::from(self.size));
        if budget == i128::from(self.size) {
            return (budget, now);
        }
        // Advance by exactly the time those tokens took.
        let used_ns = tokens * u128::from(self.refill_ns) / u128::from(self.size);
        let at = self.at + Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        (budget, at)
    }

    fn admits(&self, now: Instant) -> bool {
        self.burst > 0 || self.refilled(now).0 > 0
    }

    fn charge(&mut self, cost: u64, now: Instant) {
        (self.budget, self.at) = self.refilled(now);
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(cost - from_burst);
    }

    /// How long until the bucket admits again (zero if it does now).
    fn wait(&self, now: Instant) -> Duration {
        if self.admits(now) {
            return Duration::ZERO;
        }
        let (budget, at) = self.refilled(now);
        // Tokens to reach 1, and the time they take, rounded up.
        let missing = (1 - budget) as u128;
        let ns = (missing * u128::from(self.refill_ns)).div_ceil(u128::from(self.size));
        let ready = at + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        ready
            .saturating_duration_since(now)
            .max(Duration::from_micros(1))
    }
}

/// The disk's two buckets and the timer that ends a throttled wait.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    /// The timer is set (only then is it read or reset: an unlimited disk, or one whose
    /// buckets hold tokens, makes no timerfd call per request).
    armed: bool,
}

impl RateLimiter {
    /// Unlimited until [`RateLimiter::set`]. Makes the timerfd (non-blocking): call
    /// before the sandbox.
    pub fn new(limit: RateLimit) -> std::io::Result<RateLimiter> {
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // SAFETY: F_SETFL on a descriptor `timer` owns; only its flags change.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut limiter = RateLimiter {
            bandwidth: None,
            ops: None,
            timer,
            armed: false,
        };
        limiter.set(limit, Instant::now());
        Ok(limiter)
    }

    /// New limits. A bucket whose parameters did not change keeps its state (its debt,
    /// what is left of its burst); a new one starts full, as at a fresh start.
    pub fn set(&mut self, limit: RateLimit, now: Instant) {
        let keep = |old: Option<Bucket>, new: Option<TokenBucket>| match (old, new) {
            (Some(b), Some(tb)) if b.params == tb => Some(b),
            (_, new) => new.map(|tb| Bucket::new(tb, now)),
        };
        self.bandwidth = keep(self.bandwidth, limit.bandwidth);
        self.ops = keep(self.ops, limit.ops);
        self.rearm(now);
    }

    fn buckets(&self) -> impl Iterator<Item = &Bucket> {
        self.bandwidth.iter().chain(self.ops.iter())
    }

    /// Whether a request may start now.
    pub fn admits(&self, now: Instant) -> bool {
        self.buckets().all(|b| b.admits(now))
    }

    /// No bucket at all: nothing to look at, not even the clock.
    pub fn unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Charges one request moving `bytes`, and arms the timer if the buckets are now dry.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        if self.unlimited() {
            return;
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.charge(bytes, now);
        }
        if let Some(b) = self.ops.as_mut() {
            b.charge(1, now);
        }
        if !self.armed && !self.admits(now) {
            self.arm(self.wait(now));
        }
    }

    /// How long until a request may start.
    pub fn wait(&self, now: Instant) -> Duration {
        self.buckets()
            .map(|b| b.wait(now))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Sets the timer to fire after `wait` (zero: disarms it).
    fn arm(&mut self, wait: Duration) {
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::warn!("cannot arm the rate limit's timer: {e}");
        }
        self.armed = !wait.is_zero();
    }

    /// After a change of the limits: the timer fires when the new buckets admit again,
    /// or is off if they admit now.
    fn rearm(&mut self, now: Instant) {
        let wait = self.wait(now);
        if self.armed || !wait.is_zero() {
            self.arm(wait);
        }
    }

    /// Called when the timer fired (or might have): clears it, and arms it again if the
    /// buckets are still dry. Nothing to do while it is not set; one set that has not
    /// fired yet stays set (so the timer is readable only while `armed`, and an unread
    /// expiry can never keep the event loop awake).
    pub fn woke(&mut self) {
        if !self.armed {
            return;
        }
        let mut expirations = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor `timer` owns; the
        // timerfd is non-blocking, so a timer that has not fired reads EAGAIN.
        let read = unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                (&mut expirations as *mut u64).cast(),
                8,
            )
        };
        if read != 8 {
            return;
        }
        self.armed = false;
        let now = Instant::now();
        if !self.admits(now) {
            self.arm(self.wait(now));
        }
    }

    /// The timer's descriptor: readable when the buckets have refilled.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// The bytes a request costs the bandwidth bucket: the data it moves, and for
/// write-zeroes the range it zeroes (as QEMU's throttling counts it: where the file
/// system cannot zero a range, the worker writes the zeros). A discard moves nothing.
fn cost(kind: &RequestKind) -> u64 {
    match kind {
        RequestKind::WriteZeroes(segments) => segments.iter().map(|s| s.len()).sum(),
        other => u64::from(Kind::of(other).1),
    }
}

/// An engine whose requests pass the disk's rate limiter first.
#[derive(Debug)]
pub struct Limited {
    pub inner: Box<dyn RequestEngine + Send>,
    pub limiter: RateLimiter,
}

impl RequestEngine for Limited {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    // The clock is read only for a disk with limits: where there is no vDSO (a nested
    // L1), each read is a system call, twice per request.
    fn has_room(&self) -> bool {
        self.inner.has_room() && (self.limiter.unlimited() || self.limiter.admits(Instant::now()))
    }

    fn process(
        &mut self,
        queue_index: u16,
        req: Request,
        mem: &GuestMemoryMmap,
        ctx: &BlkContext,
    ) -> Processed {
        if !self.limiter.unlimited() {
            self.limiter.charge(cost(&req.kind), Instant::now());
        }
        self.inner.process(queue_index, req, mem, ctx)
    }

    fn submit_pending(&mut self) {
        self.inner.submit_pending();
    }

    fn sync_io(&mut self) -> &mut dyn BlockIo {
        self.inner.sync_io()
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut fds = self.inner.fds();
        fds.push(self.limiter.fd());
        fds
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.limiter.fd())
    }

    fn completions_ready(&mut self) -> bool {
        self.inner.completions_ready()
    }

    fn reap(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        self.limiter.woke();
        self.inner.reap(mem, out);
    }

    fn drain(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        self.inner.drain(mem, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> Bucket {
        Bucket::new(
            TokenBucket {
                size,
                one_time_burst: burst,
                refill_time_ms: refill_ms,
            },
            now,
        )
    }

    #[test]
    fn a_bucket_admits_its_size_then_its_refill_rate() {
        let t0 = Instant::now();
        // 100 requests a second.
        let mut b = bucket(100, 0, 1000, t0);
        for _ in 0..100 {
            assert!(b.admits(t0));
            b.charge(1, t0);
        }
        assert!(!b.admits(t0));
        assert_eq!(b.wait(t0), Duration::from_millis(10));
        // 10 s later it is full again, never more.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.refilled(later).0, 100);
        // Over one second past empty: exactly 100 more.
        let mut admitted = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            now += Duration::from_micros(100);
            while b.admits(now) {
                b.charge(1, now);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 100);
    }

    #[test]
    fn fractions_of_a_token_are_not_lost_between_looks() {
        let t0 = Instant::now();
        // 3 tokens a second, looked at every 100 ms: a token every 333.3 ms all the same.
        let mut b = bucket(3, 0, 1000, t0);
        b.charge(3, t0);
        let mut admitted = 0;
        for step in 1..=30 {
            let now = t0 + Duration::from_millis(100 * step);
            if b.admits(now) {
                b.charge(1, now);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 9, "3 tokens a second over 3 s");
    }

    #[test]
    fn debt_is_paid_back_before_the_next_request() {
        let t0 = Instant::now();
        // 1 MiB a second; one 4 MiB request goes into 3 MiB of debt.
        let mut b = bucket(1 << 20, 0, 1000, t0);
        b.charge(4 << 20, t0);
        assert!(!b.admits(t0));
        assert!(!b.admits(t0 + Duration::from_millis(2999)));
        assert!(b.admits(t0 + Duration::from_millis(3001)));
        let wait = b.wait(t0);
        assert!(
            wait > Duration::from_millis(2999) && wait <= Duration::from_millis(3001),
            "{wait:?}"
        );
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = bucket(10, 50, 1000, t0);
        for _ in 0..60 {
            assert!(b.admits(t0));
            b.charge(1, t0);
        }
        assert!(!b.admits(t0));
        let later = t0 + Duration::from_secs(100);
        b.charge(0, later);
        assert_eq!((b.burst, b.budget), (0, 10));
    }

    #[test]
    fn an_unlimited_or_unexhausted_limiter_never_touches_its_timer() {
        let mut l = RateLimiter::new(RateLimit::default()).unwrap();
        let now = Instant::now();
        for _ in 0..1000 {
            l.charge(1 << 20, now);
        }
        assert!(!l.armed);
        let ops = TokenBucket {
            size: 100,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        l.set(
            RateLimit {
                bandwidth: None,
                ops: Some(ops),
            },
            now,
        );
        for _ in 0..99 {
            l.charge(0, now);
            assert!(!l.armed, "tokens left: no timer");
        }
        l.charge(0, now);
        assert!(l.armed, "dry: the timer is set");
        // The same limit again keeps the debt; another one starts full.
        l.set(
            RateLimit {
                bandwidth: None,
                ops: Some(ops),
            },
            now,
        );
        assert!(!l.admits(now) && l.armed);
        l.set(
            RateLimit {
                bandwidth: None,
                ops: Some(TokenBucket { size: 50, ..ops }),
            },
            now,
        );
        assert!(
            l.admits(now) && !l.armed,
            "a new bucket starts full, its timer off"
        );
    }

    #[test]
    fn the_limiter_needs_both_buckets_and_its_timer_fires_when_they_refill() {
        let mut l = RateLimiter::new(RateLimit {
            bandwidth: Some(TokenBucket {
                size: 8192,
                one_time_burst: 0,
                refill_time_ms: 200,
            }),
            ops: Some(TokenBucket {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        })
        .unwrap();
        let t0 = Instant::now();
        assert!(l.admits(t0));
        // 8 KiB of debt: dry for about 200 ms.
        l.charge(16384, t0);
        assert!(!l.admits(Instant::now()), "bytes are dry, requests are not");
        // The timer wakes the worker once the debt is paid and a byte is back.
        let mut pfd = libc::pollfd {
            fd: l.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1);
        l.woke();
        assert!(l.admits(Instant::now()));
        // Lifted: no limit at all.
        l.set(RateLimit::default(), Instant::now());
        for _ in 0..10_000 {
            l.charge(1 << 20, Instant::now());
        }
        assert!(l.admits(Instant::now()));
    }
}
