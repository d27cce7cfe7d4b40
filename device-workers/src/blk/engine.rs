//! Where a queue's parsed requests go: a [`RequestEngine`] either runs a request now or
//! submits it to complete later. The queue loop (`queue::process_queue`) drives every engine the
//! same way (the sync backend, the io_uring engine, the fail-mode backend), so there is
//! one queue loop, and what differs between engines is only what they answer here.
//!
//! (Firecracker's block device is the model: its `Request::process` answers
//! `ProcessingResult::{Submitted, Throttled, Executed}`. Here an engine's fullness is
//! asked before a chain is popped ([`RequestEngine::has_room`]), not answered after it:
//! a popped head is already in the inflight log, and un-popping it would leave the log
//! claiming a request the avail ring still offers.)

use std::os::fd::RawFd;

use vm_memory::GuestMemoryMmap;

use super::backend::BlockIo;
use super::execute::{execute, Completion};
use super::request::{BlkContext, Request};
use crate::vhost::device::Reaped;

/// What an engine did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// Handed to an asynchronous engine: it completes later, through
    /// [`RequestEngine::reap`].
    Submitted,
    /// Completed now (status byte written): this goes into the used ring.
    Executed(Completion),
}

/// Runs a queue's requests.
pub trait RequestEngine: std::fmt::Debug {
    /// The engine's name for logs: `sync` or `io_uring`.
    fn name(&self) -> &'static str;

    /// Whether the engine can take another request now. While it cannot, requests stay
    /// in the avail ring until completions make room.
    fn has_room(&self) -> bool {
        true
    }

    /// Runs `req` (from queue `queue_index`) now, or submits it.
    fn process(
        &mut self,
        queue_index: u16,
        req: Request,
        mem: &GuestMemoryMmap,
        ctx: &BlkContext,
    ) -> Processed;

    /// Hands the kernel everything submitted since the last call (one system call for a
    /// drained batch).
    fn submit_pending(&mut self) {}

    /// The same disk through synchronous calls, for requests that must complete at once
    /// (a dead predecessor's, resubmitted).
    fn sync_io(&mut self) -> &mut dyn BlockIo;

    /// Descriptors the engine needs after the sandbox.
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Readable when submitted requests have completed (None: nothing is ever submitted).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Readable when the engine has room again without a completion (a rate limit's
    /// refill); [`RequestEngine::reap`] then clears it.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }

    /// Whether completions are waiting (looked at without a system call).
    fn completions_ready(&mut self) -> bool {
        false
    }

    /// Collects completed submitted requests (status bytes written) into `out`.
    fn reap(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}

    /// Waits for every submitted request and collects it into `out`.
    fn drain(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}
}

/// Any synchronous disk is an engine that executes every request at once: the file
/// backend, the fail-mode backend, the tests' in-memory disk.
impl<B: BlockIo> RequestEngine for B {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn process(
        &mut self,
        _queue_index: u16,
        req: Request,
        mem: &GuestMemoryMmap,
        ctx: &BlkContext,
    ) -> Processed {
        Processed::Executed(execute(&req, mem, self, ctx))
    }

    fn sync_io(&mut self) -> &mut dyn BlockIo {
        self
    }
}
