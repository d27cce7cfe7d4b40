//! virtio-blk as a [`VhostDevice`]: the glue between the vhost-user handler and the
//! device core in [`crate::blk`].

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::blk::config::{device_features, BlkConfig, BlkLimits, ConfigError};
use crate::blk::engine::RequestEngine;
use crate::blk::fail_backend::FailBackend;
use crate::blk::qcow2_backend::{Qcow2Error, Qcow2Files};
use crate::blk::queue::{process_queue, process_resubmitted};
use crate::blk::rate_limit::{Limited, RateLimiter};
use crate::blk::request::BlkContext;
use crate::blk::sync_backend::SyncBackend;
use crate::blk::uring_backend::UringEngine;
use crate::disk::{Disk, Image};
use crate::inflight::InflightLog;
use crate::vhost::device::{QueueError, QueueOutcome, Reaped, VhostDevice};
use ipc::messages::{IoEngine, RateLimit, ServeMode};

/// Errors while building the device.
#[derive(Debug, thiserror::Error)]
pub enum BlkDeviceError {
    #[error("cannot describe the disk to the guest")]
    Config(#[from] ConfigError),
    #[error("cannot set up the I/O backend")]
    Backend(#[source] std::io::Error),
    #[error("engine io_uring was asked for")]
    Uring(#[source] crate::blk::uring_backend::UringError),
    #[error("engine io_uring serves raw images; a qcow2 image is served by the sync engine (engine=auto or engine=sync)")]
    UringQcow2,
    #[error("engine io_uring serves raw images; an NBD export is served by the sync engine (engine=auto or engine=sync)")]
    UringNbd,
}

/// Why the image cannot be served, found once the worker is confined.
#[derive(Debug, thiserror::Error)]
pub enum OpenImageError {
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    #[error("cannot resize the disk from {from} to {to} bytes: {reason}")]
    Resize { from: u64, to: u64, reason: String },
}

/// A virtio-blk device on one disk.
#[derive(Debug)]
pub struct BlkDevice {
    /// Where requests go, through the disk's rate limiter: the sync backend, the io_uring
    /// engine, or (fail mode) the backend that fails everything.
    engine: Limited,
    config: BlkConfig,
    ctx: BlkContext,
    features: u64,
    num_queues: usize,
    /// Counts and latencies of the requests served, for the status page.
    stats: crate::blk::stats::RequestStats,
    /// A qcow2 image still to be parsed, inside the sandbox ([`BlkDevice::open_image`]).
    pending: Option<Qcow2Files>,
    /// A resize still to be done, inside the sandbox ([`BlkDevice::open_image`]).
    resize: Option<crate::disk::Resize>,
    /// Fail mode: every request completes with an error at once, limits or not.
    failing: bool,
}

impl BlkDevice {
    /// The device on `disk`. Its engine (`io_engine`, or the failing backend in fail
    /// mode) is set up here, before the sandbox.
    pub fn new(
        disk: Disk,
        num_queues: u16,
        serial: &[u8],
        mode: ServeMode,
        io_engine: IoEngine,
        rate_limit: RateLimit,
    ) -> Result<Self, BlkDeviceError> {
        let num_queues = usize::from(num_queues);
        let mut limits = BlkLimits::default();
        if matches!(disk.image, Image::Qcow2(_)) {
            // imago discards cluster by cluster: with a hostile image's 512-byte clusters a
            // 2 GiB discard took over a second (past the hang timeout) and its successor
            // retried it. At most 64 MiB each, as write-zeroes are.
            limits.max_discard_sectors = crate::blk::config::MAX_WRITE_ZEROES_SECTORS;
        }
        // O_DIRECT needs I/O aligned to the host's block size: ask the guest for 4 KiB
        // blocks when the image allows it. Fail mode must describe the same device.
        let blk_size = if disk.direct && disk.size % 4096 == 0 {
            4096
        } else {
            512
        };
        let config = BlkConfig::new(disk.size, blk_size, num_queues, &limits)?;
        let ctx = BlkContext::new(&config, limits, disk.readonly, serial);
        let features = device_features(disk.readonly, num_queues);
        // Fail mode never touches the image.
        let resize = disk.resize.filter(|_| mode == ServeMode::Normal);
        let mut pending = None;
        let engine: Box<dyn RequestEngine + Send> = match (mode, disk.image) {
            (ServeMode::Fail, _) => Box::new(FailBackend::new(disk.size)),
            (ServeMode::Normal, Image::Qcow2(files)) => {
                if io_engine == IoEngine::IoUring {
                    return Err(BlkDeviceError::UringQcow2);
                }
                pending = Some(*files);
                // Replaced by the image once it is parsed; nothing is served before.
                Box::new(FailBackend::new(disk.size))
            }
            (ServeMode::Normal, Image::Nbd(socket, export)) => {
                if io_engine == IoEngine::IoUring {
                    return Err(BlkDeviceError::UringNbd);
                }
                Box::new(crate::blk::nbd_backend::NbdBackend::new(socket, export))
            }
            (ServeMode::Normal, Image::Raw(file)) => {
                let sync = SyncBackend::new(file).map_err(BlkDeviceError::Backend)?;
                match io_engine {
                    IoEngine::Sync => Box::new(sync),
                    IoEngine::IoUring | IoEngine::Auto => match UringEngine::new(sync) {
                        Ok(uring) => Box::new(uring),
                        Err((e, _)) if io_engine == IoEngine::IoUring => {
                            return Err(BlkDeviceError::Uring(e));
                        }
                        Err((e, sync)) => {
                            tracing::info!(
                                "io_uring unavailable ({}): using the sync engine",
                                std::error::Error::source(&e)
                                    .map_or(e.to_string(), |s| format!("{e}: {s}"))
                            );
                            Box::new(sync)
                        }
                    },
                }
            }
        };
        // Fail mode answers at once, whatever the limits: they are the disk's, not the
        // errors'.
        let rate_limit = match mode {
            ServeMode::Normal => rate_limit,
            ServeMode::Fail => RateLimit::default(),
        };
        let limiter = RateLimiter::new(rate_limit).map_err(BlkDeviceError::Backend)?;
        Ok(BlkDevice {
            engine: Limited {
                inner: engine,
                limiter,
            },
            config,
            ctx,
            features,
            num_queues,
            stats: Default::default(),
            pending,
            resize,
            failing: mode == ServeMode::Fail,
        })
    }

    /// Parses a qcow2 image and does a planned resize: called once the worker is
    /// confined, before it serves. The size parsed must be the one read before the
    /// sandbox, and after a resize the disk has the size the guest is offered.
    pub fn open_image(&mut self) -> Result<(), OpenImageError> {
        let offered = self.config.capacity() * crate::disk::SECTOR_SIZE;
        if let Some(files) = self.pending.take() {
            let image = crate::blk::qcow2_backend::open(files)?;
            image.check_size(self.resize.map_or(offered, |r| r.from))?;
            self.engine.inner = Box::new(image);
        }
        if let Some(crate::disk::Resize { from, to }) = self.resize.take() {
            let disk = self.engine.inner.sync_io();
            disk.resize(to).map_err(|e| OpenImageError::Resize {
                from,
                to,
                reason: std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()),
            })?;
            tracing::info!("disk resized from {from} to {to} bytes");
        }
        Ok(())
    }

    /// Descriptors of the engine that must survive the sandbox (the io_uring and its
    /// completion eventfd).
    pub fn engine_fds(&self) -> Vec<RawFd> {
        self.engine.fds()
    }

    /// The engine in use: `io_uring` or `sync`.
    pub fn engine(&self) -> &'static str {
        self.engine.name()
    }
}

impl VhostDevice for BlkDevice {
    fn device_features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> &[u8] {
        self.config.as_bytes()
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        log: &mut dyn InflightLog,
    ) -> Result<QueueOutcome, QueueError> {
        process_queue(
            queue,
            index,
            mem,
            &mut self.engine,
            &self.ctx,
            log,
            &mut self.stats,
        )
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.engine.wake_fd()
    }

    fn accepting(&self) -> bool {
        self.engine.has_room()
    }

    fn set_rate_limit(&mut self, limit: RateLimit) {
        // Fail mode's errors are not the disk's I/O: they answer at once.
        if !self.failing {
            self.engine.limiter.set(limit, std::time::Instant::now());
        }
    }

    fn reap(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        let from = out.len();
        self.engine.reap(mem, out);
        for r in &out[from..] {
            self.stats.finish(r.queue, r.head, r.ok);
        }
    }

    fn completions_ready(&mut self) -> bool {
        self.engine.completions_ready()
    }

    fn drain(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        let from = out.len();
        self.engine.drain(mem, out);
        for r in &out[from..] {
            self.stats.finish(r.queue, r.head, r.ok);
        }
    }

    fn request_counters(&self) -> ipc::status::RequestCounters {
        self.stats.counters()
    }

    fn resubmit(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        heads: &[u16],
        log: &mut dyn InflightLog,
    ) -> Result<QueueOutcome, QueueError> {
        process_resubmitted(
            queue,
            index,
            mem,
            &mut self.engine,
            &self.ctx,
            heads,
            log,
            &mut self.stats,
        )
    }
}
