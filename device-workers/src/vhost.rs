//! The vhost-user backend request handler, on rust-vmm's `vhost` crate directly (not the
//! `vhost-user-backend` framework, whose handler cannot do inflight tracking, which the
//! restart issue needs).
//!
//! Every message is frontend input and is checked: order (no ring addresses before a
//! memory table), ranges (ring index, ring size, config offsets), coverage (the rings must
//! lie inside the memory table). A refused message ends the worker with a clear error:
//! the caller logs it and exits; nothing is written to the disk or guest memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::{InflightLog, InflightRegion, NoInflight};

/// Largest ring size we accept (the virtio maximum for split rings is 32768; QEMU and the
/// Linux driver use 128-1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// What the handler needs from a device (virtio-blk today).
pub trait VhostDevice {
    /// Device feature bits (virtio), without the transport/ring bits the handler adds.
    fn device_features(&self) -> u64;
    /// The device's configuration space.
    fn config(&self) -> &[u8];
    /// Number of queues the device offers.
    fn num_queues(&self) -> usize;
    /// Drains `queue`, reporting pops and completions to `log`.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        log: &mut dyn InflightLog,
    ) -> QueueResult;
    /// A descriptor that becomes readable when requests submitted asynchronously have
    /// completed (None: every request completes within `process_queue`).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// Collects asynchronously completed requests (their status bytes written).
    fn reap(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}
    /// Whether asynchronous completions are waiting (looked at without a syscall).
    fn completions_ready(&mut self) -> bool {
        false
    }
    /// Waits for every asynchronous request in flight and collects it (before the memory
    /// table changes or a ring stops).
    fn drain(&mut self, _mem: &GuestMemoryMmap, _out: &mut Vec<Reaped>) {}
    /// Serves again `heads`, which a dead predecessor popped and never completed.
    fn resubmit(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        heads: &[u16],
        log: &mut dyn InflightLog,
    ) -> QueueResult;
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueResult {
    pub notify: bool,
    pub completed: u64,
    pub failed: u64,
    /// The ring itself is corrupt (not a bad request): stop serving this queue.
    pub broken: bool,
    /// The device was full: requests are left in the avail ring (notifications off), to be
    /// taken once completions made room.
    pub throttled: bool,
}

/// A request that completed asynchronously: what goes into queue `queue`'s used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub queue: u16,
    pub head: u16,
    pub used_len: u32,
    pub ok: bool,
}

/// Frontend virtual address range -> guest physical, from SET_MEM_TABLE (rings are given
/// in the frontend's virtual addresses).
#[derive(Clone, Copy, Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

#[derive(Debug)]
struct Vring {
    queue: Queue,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    /// SET_VRING_ENABLE (or implied by SET_FEATURES without PROTOCOL_FEATURES).
    enabled: bool,
    /// Started by SET_VRING_KICK, stopped by GET_VRING_BASE.
    started: bool,
    /// The ring was corrupt; it stays off until the frontend sets it up again.
    broken: bool,
    /// Just started: take the used idx from guest memory and resubmit what a predecessor
    /// left in flight before serving new requests.
    recover: bool,
    /// The device was full: requests wait in the avail ring; drain it again after the
    /// next completions.
    throttled: bool,
}

impl Vring {
    fn new() -> Self {
        Vring {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("MAX_QUEUE_SIZE is a valid ring size"),
            kick: None,
            call: None,
            enabled: false,
            started: false,
            broken: false,
            recover: false,
            throttled: false,
        }
    }

    /// Writes the call eventfd (the guest's interrupt), if there is one.
    fn signal(&self, index: usize) {
        if let Some(call) = self.call.as_ref() {
            if let Err(e) = call.write(1) {
                tracing::warn!("queue {index}: cannot signal the call eventfd: {e}");
            }
        }
    }

    fn live(&self) -> bool {
        self.started && self.enabled && !self.broken && self.queue.ready()
    }
}

/// A change of the kick eventfds the event loop watches.
#[derive(Debug)]
pub struct KickChanges {
    /// Every kick to watch now: `(queue index, fd)`.
    pub watch: Vec<(usize, RawFd)>,
    /// Kicks no ring uses any more: still open, so the loop can take them out of its set
    /// before it drops them.
    pub retired: Vec<EventFd>,
}

/// Totals since the worker started, for the status page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub completed: u64,
    pub failed: u64,
}

/// The backend state machine.
#[derive(Debug)]
pub struct VhostBackend<D> {
    device: D,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    mem: Option<GuestMemoryMmap>,
    mappings: Vec<AddrMapping>,
    vrings: Vec<Vring>,
    /// Rings whose kick registration or state changed since the event loop last looked.
    dirty: bool,
    /// Rings found corrupt since the worker started.
    rings_broken: u64,
    /// Kick eventfds the frontend replaced or a stop dropped, kept open until the event
    /// loop has taken them out of its epoll set: closing our descriptor does not end the
    /// registration while the frontend still holds the same eventfd, and a later
    /// SET_VRING_KICK of that eventfd on the same descriptor number would then fail to
    /// register (EEXIST).
    retired_kicks: Vec<EventFd>,
    totals: Totals,
    /// Inflight tracking: created before the sandbox, or adopted from the frontend.
    inflight: Option<InflightRegion>,
    /// Requests resubmitted for predecessors, since start.
    resubmitted: u64,
    /// Rings started (each ran inflight recovery first), since start.
    rings_started: u64,
    /// Test builds: answer GET_CONFIG with a short payload (a malformed reply).
    #[cfg(feature = "test-hooks")]
    pub bad_config_reply: bool,
    /// Test builds: exit when the first ring starts (one turn of a crash loop).
    #[cfg(feature = "test-hooks")]
    pub exit_at_ring_start: bool,
    /// Test builds: the fault hook to run once GET_CONFIG is answered (the end of the
    /// VMM's setup); moved to `hook_due` then.
    #[cfg(feature = "test-hooks")]
    pub hook_after_config: Option<String>,
    #[cfg(feature = "test-hooks")]
    hook_due: Option<String>,
}

/// The size of a regular file (a memfd is one) the frontend passed, None for any other
/// kind, with the raw fstat system call: the policy
/// allows it, which takes no path (glibc's fstat() is newfstatat with an empty path, std's
/// metadata() is statx).
fn file_size(file: &File) -> io::Result<Option<u64>> {
    // SAFETY: stat is plain data that fstat fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an open descriptor (owned by `file`) into a live, writable buffer.
    if unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(st.st_size as u64))
}

fn refuse(msg: String) -> VhostError {
    VhostError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl<D: VhostDevice> VhostBackend<D> {
    pub fn new(device: D) -> Self {
        let vrings = (0..device.num_queues()).map(|_| Vring::new()).collect();
        VhostBackend {
            device,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mem: None,
            mappings: Vec::new(),
            vrings,
            dirty: true,
            rings_broken: 0,
            retired_kicks: Vec::new(),
            totals: Totals::default(),
            inflight: None,
            resubmitted: 0,
            rings_started: 0,
            #[cfg(feature = "test-hooks")]
            bad_config_reply: false,
            #[cfg(feature = "test-hooks")]
            exit_at_ring_start: false,
            #[cfg(feature = "test-hooks")]
            hook_after_config: None,
            #[cfg(feature = "test-hooks")]
            hook_due: None,
        }
    }

    /// Test builds: the fault hook whose time has come (GET_CONFIG was answered).
    #[cfg(feature = "test-hooks")]
    pub fn take_due_hook(&mut self) -> Option<String> {
        self.hook_due.take()
    }

    /// Offers inflight tracking with `region` (created before the sandbox: mapping a new
    /// memfd afterwards would need calls the policy does not allow).
    pub fn with_inflight(mut self, region: InflightRegion) -> Self {
        self.inflight = Some(region);
        self
    }

    /// Requests resubmitted on behalf of a dead predecessor.
    pub fn resubmitted(&self) -> u64 {
        self.resubmitted
    }

    /// Rings started since this backend began (the frontend's restarts included).
    pub fn rings_started(&self) -> u64 {
        self.rings_started
    }

    /// Everything we offer: the device's bits plus the ring and vhost-user ones.
    pub fn offered_features(&self) -> u64 {
        self.device.device_features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// What the event loop must change in its epoll set, if anything changed since it last
    /// looked. Clears the dirty flag.
    pub fn take_kick_changes(&mut self) -> Option<KickChanges> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(KickChanges {
            watch: self
                .vrings
                .iter()
                .enumerate()
                // A broken ring's kicks are still read (and ignored): one left unread
                // would look to the supervisor like work this worker was told about.
                .filter(|(_, v)| v.live() || (v.started && v.broken))
                .filter_map(|(i, v)| v.kick.as_ref().map(|k| (i, k.as_raw_fd())))
                .collect(),
            retired: std::mem::take(&mut self.retired_kicks),
        })
    }

    /// Handles a kick on ring `index`: clears the eventfd, drains the ring, signals.
    pub fn kick(&mut self, index: usize) {
        if let Some(kick) = self.vrings.get(index).and_then(|v| v.kick.as_ref()) {
            // Reading resets the counter; a spurious wake-up reads EAGAIN, harmless.
            let _ = kick.read();
        }
        self.process(index);
    }

    /// Drains ring `index` if it is live.
    pub fn process(&mut self, index: usize) {
        let Some(mem) = self.mem.as_ref() else { return };
        let Some(vring) = self.vrings.get_mut(index) else {
            return;
        };
        if !vring.live() {
            return;
        }
        let size = vring.queue.size();
        let mut tracker = self.inflight.as_mut().and_then(|r| r.queue(index, size));
        let mut untracked = NoInflight;
        let mut result = QueueResult::default();
        if vring.recover {
            vring.recover = false;
            let used = match vring
                .queue
                .used_idx(mem, std::sync::atomic::Ordering::Acquire)
            {
                Ok(u) => u.0,
                Err(e) => {
                    crate::quiet::guest_warn!("queue {index}: cannot read the used idx: {e}");
                    vring.broken = true;
                    self.rings_broken += 1;
                    self.dirty = true;
                    return;
                }
            };
            vring.queue.set_next_used(used);
            if let Some(t) = tracker.as_mut() {
                let recovery = t.recover(used);
                let n = recovery.resubmit.len() as u16;
                vring.queue.set_next_avail(used.wrapping_add(n));
                if n > 0 || recovery.repaired {
                    tracing::info!(
                        "queue {index}: resuming at used idx {used}: {n} request(s) resubmitted{}",
                        if recovery.repaired {
                            ", last completion repaired"
                        } else {
                            ""
                        }
                    );
                }
                result = self
                    .device
                    .resubmit(index, &mut vring.queue, mem, &recovery.resubmit, t);
                self.resubmitted += u64::from(n);
            }
            self.rings_started += 1;
            // Signal once whatever happened: a predecessor may have died between publishing
            // a used entry and writing the call fd, and a driver without a timeout (Linux)
            // would wait for that interrupt forever. A spurious one costs nothing.
            result.notify = true;
        }
        let log: &mut dyn InflightLog = match tracker.as_mut() {
            Some(t) => t,
            None => &mut untracked,
        };
        if !result.broken {
            let drained = self.device.process_queue(index, &mut vring.queue, mem, log);
            result = QueueResult {
                notify: result.notify || drained.notify,
                completed: result.completed + drained.completed,
                failed: result.failed + drained.failed,
                broken: drained.broken,
                throttled: drained.throttled,
            };
        }
        self.totals.completed += result.completed;
        self.totals.failed += result.failed;
        vring.throttled = result.throttled;
        if result.broken {
            crate::quiet::guest_warn!(
                "queue {index}: the ring is corrupt; not serving it until it is set up again"
            );
            vring.broken = true;
            self.rings_broken += 1;
            self.dirty = true;
        }
        if result.notify {
            vring.signal(index);
        }
    }

    /// Drains every live ring (after setup changes, so nothing queued before a kick was
    /// registered waits forever).
    pub fn process_all(&mut self) {
        for index in 0..self.vrings.len() {
            self.process(index);
        }
    }

    /// Whether there is work without a kick or a completion event: a live ring whose avail
    /// idx moved past what was taken, or completions waiting in the device. Reads memory
    /// only (for polling).
    pub fn has_work(&mut self) -> bool {
        if self.device.completions_ready() {
            return true;
        }
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        self.vrings.iter().any(|v| {
            v.live()
                && v.queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|a| a.0 != v.queue.next_avail())
        })
    }

    /// Rings found corrupt since the worker started (each one the device must answer with
    /// DEVICE_NEEDS_RESET, which only the VMM can set).
    pub fn rings_broken(&self) -> u64 {
        self.rings_broken
    }

    /// The device's completion descriptor, if it completes requests asynchronously.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.device.completion_fd()
    }

    /// Publishes what the device completed since the last look, then serves the rings
    /// that had to wait for room.
    pub fn reap(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut reaped = Vec::new();
        self.device.reap(mem, &mut reaped);
        self.publish(&reaped);
        for index in 0..self.vrings.len() {
            if self.vrings[index].throttled {
                self.process(index);
            }
        }
    }

    /// Waits for every request the device has in flight and publishes it: nothing may
    /// touch guest memory or a ring once the memory table changes or the ring stops.
    fn drain(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut reaped = Vec::new();
        self.device.drain(mem, &mut reaped);
        self.publish(&reaped);
    }

    /// Puts asynchronously completed requests in their used rings (bracketed by the
    /// inflight log, like synchronous ones) and signals each ring once.
    fn publish(&mut self, reaped: &[Reaped]) {
        let Some(mem) = self.mem.as_ref() else { return };
        let mut touched = vec![false; self.vrings.len()];
        for r in reaped {
            let index = usize::from(r.queue);
            let Some(vring) = self.vrings.get_mut(index) else {
                continue;
            };
            if !vring.started || vring.broken {
                // The ring stopped under the request: the frontend no longer expects it.
                continue;
            }
            let size = vring.queue.size();
            let mut tracker = self.inflight.as_mut().and_then(|t| t.queue(index, size));
            if let Some(t) = tracker.as_mut() {
                t.completing(r.head);
            }
            if let Err(e) = vring.queue.add_used(mem, r.head, r.used_len) {
                tracing::warn!("queue {index}: cannot publish a completion: {e}");
                vring.broken = true;
                self.dirty = true;
                continue;
            }
            if let Some(t) = tracker.as_mut() {
                t.completed(r.head, vring.queue.next_used());
            }
            self.totals.completed += u64::from(r.ok);
            self.totals.failed += u64::from(!r.ok);
            touched[index] = true;
        }
        for (index, vring) in self.vrings.iter_mut().enumerate() {
            if !touched[index] {
                continue;
            }
            if !matches!(vring.queue.needs_notification(mem), Ok(false)) {
                vring.signal(index);
            }
        }
    }

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or_else(|| {
            refuse(format!(
                "queue index {index} out of range (the device has {n} queues)"
            ))
        })
    }

    fn va_to_gpa(&self, what: &str, index: u32, va: u64) -> VhostResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa)
            .ok_or_else(|| {
                refuse(format!(
                    "queue {index}: {what} address {va:#x} is outside the memory table"
                ))
            })
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn reset(&mut self) {
        self.drain();
        self.acked_features = 0;
        for v in &mut self.vrings {
            let old = std::mem::replace(v, Vring::new());
            self.retired_kicks.extend(old.kick);
        }
        self.dirty = true;
    }
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(VhostError::InvalidOperation(what))
}

impl<D: VhostDevice> VhostUserBackendReqHandlerMut for VhostBackend<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let unknown = features & !self.offered_features();
        if unknown != 0 {
            return Err(refuse(format!(
                "SET_FEATURES acks bits {unknown:#x} that were not offered"
            )));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
        if !self.protocol_features_acked() {
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        let event_idx = self.event_idx();
        for v in &mut self.vrings {
            v.queue.set_event_idx(event_idx);
        }
        self.dirty = true;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return unsupported("postcopy");
        }
        // In-flight requests point into the current table's mappings.
        self.drain();
        if ctx.is_empty() || ctx.len() != files.len() {
            return Err(refuse(format!(
                "SET_MEM_TABLE with {} regions and {} fds",
                ctx.len(),
                files.len()
            )));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (i, (region, file)) in ctx.iter().zip(files).enumerate() {
            // Copies: the message struct is packed.
            let (gpa, size, va) = (region.guest_phys_addr, region.memory_size, region.user_addr);
            if size == 0 || gpa.checked_add(size).is_none() || va.checked_add(size).is_none() {
                return Err(refuse(format!(
                    "memory region {i}: guest address {gpa:#x} size {size:#x} is empty or overflows"
                )));
            }
            // A file shorter than the region would map fine and raise SIGBUS on first touch.
            // Best effort: an unsealed file can still shrink later (QEMU seals its memfds,
            // bulkhead too); device files such as /dev/dax have no size to check.
            let offset = region.mmap_offset;
            let held = file_size(&file).map_err(|e| {
                refuse(format!(
                    "memory region {i}: cannot read its file's size: {e}"
                ))
            })?;
            if let Some(held) =
                held.filter(|&held| offset.checked_add(size).is_none_or(|end| end > held))
            {
                return Err(refuse(format!(
                    "memory region {i}: its file holds {held:#x} bytes, less than offset \
                     {offset:#x} + size {size:#x}"
                )));
            }
            let mmap = region.mmap_region::<()>(file)?;
            let guest_region = GuestRegionMmap::new(mmap, GuestAddress(gpa))
                .ok_or_else(|| refuse(format!("memory region {i} at {gpa:#x} is invalid")))?;
            regions.push(guest_region);
            mappings.push(AddrMapping {
                vmm_addr: va,
                size,
                gpa,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| refuse(format!("memory regions overlap or are unordered: {e}")))?;
        self.mem = Some(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(refuse(format!(
                "queue {index}: size {num} is not a power of two in 1..={MAX_QUEUE_SIZE}"
            )));
        }
        self.vring(index)?.queue.set_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return unsupported("vring logging");
        }
        if self.mem.is_none() {
            return Err(refuse(format!(
                "queue {index}: SET_VRING_ADDR before SET_MEM_TABLE"
            )));
        }
        let desc = self.va_to_gpa("descriptor table", index, descriptor)?;
        let avail = self.va_to_gpa("available ring", index, available)?;
        let used_gpa = self.va_to_gpa("used ring", index, used)?;
        let mem = self.mem.clone().expect("checked above");
        let vring = self.vring(index)?;
        let q = &mut vring.queue;
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used_gpa as u32), Some((used_gpa >> 32) as u32));
        q.set_ready(true);
        if !q.is_valid(&mem) {
            q.set_ready(false);
            return Err(refuse(format!(
                "queue {index}: rings (desc {desc:#x}, avail {avail:#x}, used {used_gpa:#x}, size {}) are misaligned or not covered by the memory table",
                q.size()
            )));
        }
        // The used index continues where the ring says (e.g. after the frontend restarts
        // the device); SET_VRING_BASE restores the available index.
        let used_idx = q
            .used_idx(&mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| refuse(format!("queue {index}: cannot read the used index: {e}")))?;
        q.set_next_used(used_idx.0);
        vring.broken = false;
        self.dirty = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let base = u16::try_from(base).map_err(|_| {
            refuse(format!(
                "queue {index}: base {base} does not fit a split ring index"
            ))
        })?;
        self.vring(index)?.queue.set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        // What the ring has in flight completes first, so the base we report and the
        // inflight region agree: nothing is in flight once it is stopped.
        self.vring(index)?;
        self.drain();
        let vring = self.vring(index)?;
        // GET_VRING_BASE stops the ring (vhost-user "Ring states").
        vring.started = false;
        vring.recover = false;
        let kick = vring.kick.take();
        vring.call = None;
        let next_avail = vring.queue.next_avail();
        let size = vring.queue.size();
        self.retired_kicks.extend(kick);
        self.dirty = true;
        // Drained above (and synchronous requests complete between messages), so nothing
        // is in flight now: a stopped ring starts afresh.
        if let Some(mut q) = self
            .inflight
            .as_mut()
            .and_then(|r| r.queue(index as usize, size))
        {
            q.clear();
        }
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        #[cfg(feature = "test-hooks")]
        if self.exit_at_ring_start {
            use std::io::Write;
            let _ = std::io::stderr()
                .write_all(b"bulkhead-worker: fault hook: exiting as the first ring starts\n");
            std::process::exit(70);
        }
        let Some(fd) = fd else {
            return Err(refuse(format!(
                "queue {index}: polling mode (no kick fd) is not supported"
            )));
        };
        let vring = self.vring(u32::from(index))?;
        // SAFETY: `fd` is an owned File the message carried; EventFd takes over its
        // ownership and nothing else refers to it.
        let old = vring.kick.replace(unsafe {
            <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                fd,
            ))
        });
        if !vring.started {
            vring.recover = true;
        }
        vring.started = true;
        self.retired_kicks.extend(old);
        self.dirty = true;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let vring = self.vring(u32::from(index))?;
        // SAFETY: as in set_vring_kick: ownership moves from the File to the EventFd.
        vring.call = fd.map(|f| unsafe {
            <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f))
        });
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // We never report ring errors through it; the fd is closed on drop.
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(Self::offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = Self::offered_protocol_features().bits();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "SET_PROTOCOL_FEATURES acks bits {:#x} that were not offered",
                features & !offered
            )));
        }
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        if !self.protocol_features_acked() {
            return Err(refuse("SET_VRING_ENABLE without PROTOCOL_FEATURES".into()));
        }
        self.vring(index)?.enabled = enable;
        self.dirty = true;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        #[cfg(feature = "test-hooks")]
        if self.bad_config_reply {
            return Ok(vec![0xee]);
        }
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = self.hook_after_config.take() {
            self.hook_due = Some(hook);
        }
        let config = self.device.config();
        let end = offset.checked_add(size).map(|e| e as usize);
        match end {
            Some(end) if end <= config.len() => Ok(config[offset as usize..end].to_vec()),
            _ => Err(refuse(format!(
                "GET_CONFIG offset {offset} size {size} is outside the {}-byte config space",
                config.len()
            ))),
        }
    }

    fn set_config(
        &mut self,
        offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        Err(refuse(format!(
            "SET_CONFIG at offset {offset}: the config space is read-only"
        )))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let Some(region) = self.inflight.as_mut() else {
            return unsupported("inflight tracking (no region was prepared)");
        };
        region
            .hand_out(inflight)
            .map_err(|e| refuse(format!("GET_INFLIGHT_FD: {}", ipc::error_chain(&e))))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        if self.vrings.iter().any(|v| v.started) {
            return Err(refuse(
                "SET_INFLIGHT_FD while rings are running (it must come before SET_VRING_KICK)"
                    .into(),
            ));
        }
        let Some(region) = self.inflight.as_mut() else {
            return unsupported("inflight tracking (no region was prepared)");
        };
        region
            .adopt(file, inflight)
            .map_err(|e| refuse(format!("SET_INFLIGHT_FD: {}", ipc::error_chain(&e))))
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        unsupported("memory slots")
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("memory slots")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        unsupported("memory slots")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        unsupported("dirty logging")
    }
}
