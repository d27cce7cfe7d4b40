//! The vhost-user protocol handler: the `VhostUserBackendReqHandlerMut` implementation,
//! on rust-vmm's `vhost` crate directly (not the `vhost-user-backend` framework, whose
//! handler cannot do inflight tracking, which the restart issue needs).
//!
//! Every message is frontend input and is checked: order (no ring addresses before a
//! memory table), ranges (ring index, ring size, config offsets), coverage (the rings must
//! lie inside the memory table). A refused message ends the worker with a clear error:
//! the caller logs it and exits; nothing is written to the disk or guest memory. What the
//! messages set up, the data plane (`super::data_plane`) serves.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::data_plane::DataPlane;
use super::device::VhostDevice;
use super::ring::{Vring, MAX_QUEUE_SIZE};
use crate::inflight::InflightRegion;

/// Frontend virtual address range -> guest physical, from SET_MEM_TABLE (rings are given
/// in the frontend's virtual addresses).
#[derive(Clone, Copy, Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The backend: the protocol state the frontend's messages build (features, the memory
/// table's address map) around the data plane they set up.
#[derive(Debug)]
pub struct VhostBackend<D> {
    plane: DataPlane<D>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    mappings: Vec<AddrMapping>,
    /// Test builds: answer GET_CONFIG with a short payload (a malformed reply).
    #[cfg(feature = "test-hooks")]
    pub bad_config_reply: bool,
    /// Test builds: exit when the first ring starts (one turn of a crash loop).
    #[cfg(feature = "test-hooks")]
    pub exit_at_ring_start: bool,
    /// Test builds: answer GET_INFLIGHT_FD with the guest-RAM memfd (from 1 MiB on, where
    /// a PVH kernel's code is), as a compromised worker would to have its successors
    /// write into the guest.
    #[cfg(feature = "test-hooks")]
    pub inflight_guest_ram: bool,
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
        VhostBackend {
            plane: DataPlane::new(device),
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mappings: Vec::new(),
            #[cfg(feature = "test-hooks")]
            bad_config_reply: false,
            #[cfg(feature = "test-hooks")]
            exit_at_ring_start: false,
            #[cfg(feature = "test-hooks")]
            inflight_guest_ram: false,
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
        self.plane.set_inflight(region);
        self
    }

    /// The rings and the device: what the event loop drives.
    pub fn data_plane(&mut self) -> &mut DataPlane<D> {
        &mut self.plane
    }

    /// Everything we offer: the device's bits plus the ring and vhost-user ones.
    pub fn offered_features(&self) -> u64 {
        self.plane.device().device_features()
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

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        let n = self.plane.rings_mut().len();
        self.plane
            .ring_mut(index as usize)
            .ok_or_else(|| out_of_range(index, n))
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
        self.acked_features = 0;
        self.plane.reset_rings();
    }
}

fn out_of_range(index: u32, n: usize) -> VhostError {
    refuse(format!(
        "queue index {index} out of range (the device has {n} queues)"
    ))
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
            for v in self.plane.rings_mut() {
                v.enabled = true;
            }
        }
        let event_idx = self.event_idx();
        for v in self.plane.rings_mut() {
            v.queue.set_event_idx(event_idx);
        }
        self.plane.mark_dirty();
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
        self.plane.drain();
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
        self.plane.set_memory(mem);
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
        let Some(mem) = self.plane.memory().cloned() else {
            return Err(refuse(format!(
                "queue {index}: SET_VRING_ADDR before SET_MEM_TABLE"
            )));
        };
        let desc = self.va_to_gpa("descriptor table", index, descriptor)?;
        let avail = self.va_to_gpa("available ring", index, available)?;
        let used_gpa = self.va_to_gpa("used ring", index, used)?;
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
        vring.state = vring.state.readdressed();
        self.plane.mark_dirty();
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
        self.plane.drain();
        // GET_VRING_BASE stops the ring (vhost-user "Ring states").
        let next_avail = self
            .plane
            .stop_ring(index as usize)
            .ok_or_else(|| out_of_range(index, self.plane.rings_mut().len()))?;
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
        self.vring(u32::from(index))?;
        // SAFETY: `fd` is an owned File the message carried; EventFd takes over its
        // ownership and nothing else refers to it.
        let kick = unsafe {
            <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                fd,
            ))
        };
        // Checked above: the ring exists.
        let _ = self.plane.start_ring(usize::from(index), kick);
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
        Ok(self.plane.rings_mut().len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        if !self.protocol_features_acked() {
            return Err(refuse("SET_VRING_ENABLE without PROTOCOL_FEATURES".into()));
        }
        self.vring(index)?.enabled = enable;
        self.plane.mark_dirty();
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
        let config = self.plane.device().config();
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
        #[cfg(feature = "test-hooks")]
        if self.inflight_guest_ram {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let ram = self
                .plane
                .memory()
                .and_then(|m| m.iter().next())
                .and_then(|r| r.file_offset())
                .and_then(|f| f.file().try_clone().ok());
            if let Some(file) = ram {
                let size = usize::from(inflight.num_queues)
                    * crate::inflight::queue_region_size(inflight.queue_size);
                let info = VhostUserInflight::new(
                    size as u64,
                    0x10_0000,
                    inflight.num_queues,
                    inflight.queue_size,
                );
                return Ok((info, file));
            }
        }
        let Some(region) = self.plane.inflight_mut() else {
            return unsupported("inflight tracking (no region was prepared)");
        };
        region
            .hand_out(inflight)
            .map_err(|e| refuse(format!("GET_INFLIGHT_FD: {}", ipc::error_chain(&e))))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        if self.plane.any_started() {
            return Err(refuse(
                "SET_INFLIGHT_FD while rings are running (it must come before SET_VRING_KICK)"
                    .into(),
            ));
        }
        let Some(region) = self.plane.inflight_mut() else {
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
