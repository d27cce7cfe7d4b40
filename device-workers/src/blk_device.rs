//! virtio-blk as a [`VhostDevice`]: the glue between the vhost-user handler and the
//! device core in [`crate::blk`].

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::blk::backend::BlockIo;
use crate::blk::config::{device_features, BlkConfig, BlkLimits, ConfigError};
use crate::blk::fail_backend::FailBackend;
use crate::blk::queue::{
    process_queue, process_queue_async, process_resubmitted, QueueError, QueueOutcome,
};
use crate::blk::request::BlkContext;
use crate::blk::sync_backend::SyncBackend;
use crate::blk::uring_backend::UringEngine;
use crate::disk::Disk;
use crate::inflight::InflightLog;
use crate::vhost::{QueueResult, Reaped, VhostDevice};
use ipc::messages::{IoEngine, ServeMode};

/// Errors while building the device.
#[derive(Debug, thiserror::Error)]
pub enum BlkDeviceError {
    #[error("cannot describe the disk to the guest")]
    Config(#[from] ConfigError),
    #[error("cannot set up the I/O backend")]
    Backend(#[source] std::io::Error),
    #[error("engine io_uring was asked for")]
    Uring(#[source] crate::blk::uring_backend::UringError),
}

/// A virtio-blk device on one disk.
#[derive(Debug)]
pub struct BlkDevice {
    disk: Engine,
    config: BlkConfig,
    ctx: BlkContext,
    features: u64,
    num_queues: usize,
}

/// Where requests go.
#[derive(Debug)]
enum Engine {
    /// Each drained batch runs to completion before the queue is published.
    Sync(Box<dyn BlockIo + Send>),
    /// Requests complete when the ring says so.
    Uring(Box<UringEngine>),
}

impl BlkDevice {
    /// The device on `disk`. Its I/O backend (`engine`, or none in fail mode) is set up
    /// here, before the sandbox.
    pub fn new(
        disk: Disk,
        num_queues: u16,
        serial: &[u8],
        mode: ServeMode,
        engine: IoEngine,
    ) -> Result<Self, BlkDeviceError> {
        let num_queues = usize::from(num_queues);
        let limits = BlkLimits::default();
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
        let backend = match mode {
            ServeMode::Fail => Engine::Sync(Box::new(FailBackend::new(disk.size))),
            ServeMode::Normal => {
                let sync = SyncBackend::new(disk.file).map_err(BlkDeviceError::Backend)?;
                match engine {
                    IoEngine::Sync => Engine::Sync(Box::new(sync)),
                    IoEngine::IoUring | IoEngine::Auto => match UringEngine::new(sync) {
                        Ok(uring) => Engine::Uring(Box::new(uring)),
                        Err((e, _)) if engine == IoEngine::IoUring => {
                            return Err(BlkDeviceError::Uring(e));
                        }
                        Err((e, sync)) => {
                            tracing::info!(
                                "io_uring unavailable ({}): using the sync engine",
                                std::error::Error::source(&e)
                                    .map_or(e.to_string(), |s| format!("{e}: {s}"))
                            );
                            Engine::Sync(Box::new(sync))
                        }
                    },
                }
            }
        };
        Ok(BlkDevice {
            disk: backend,
            config,
            ctx,
            features,
            num_queues,
        })
    }

    /// Descriptors of the engine that must survive the sandbox (the io_uring and its
    /// completion eventfd).
    pub fn engine_fds(&self) -> Vec<std::os::fd::RawFd> {
        match &self.disk {
            Engine::Uring(u) => u.fds().to_vec(),
            Engine::Sync(_) => Vec::new(),
        }
    }

    /// The engine in use: `io_uring` or `sync`.
    pub fn engine(&self) -> &'static str {
        match &self.disk {
            Engine::Uring(_) => "io_uring",
            Engine::Sync(_) => "sync",
        }
    }
}

impl Engine {
    /// The engine as a synchronous backend (for requests that run to completion at once).
    fn backend(&mut self) -> &mut dyn BlockIo {
        match self {
            Engine::Sync(b) => b.as_mut(),
            Engine::Uring(u) => u.as_mut(),
        }
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
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        log: &mut dyn InflightLog,
    ) -> QueueResult {
        match &mut self.disk {
            Engine::Sync(disk) => queue_result(process_queue(
                queue,
                index as u16,
                mem,
                disk.as_mut(),
                &self.ctx,
                log,
            )),
            Engine::Uring(engine) => queue_result(process_queue_async(
                queue,
                index as u16,
                mem,
                engine,
                &self.ctx,
                log,
            )),
        }
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.disk {
            Engine::Uring(u) => Some(u.completion_fd()),
            Engine::Sync(_) => None,
        }
    }

    fn reap(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        if let Engine::Uring(u) = &mut self.disk {
            u.reap(mem, out);
        }
    }

    fn completions_ready(&mut self) -> bool {
        match &mut self.disk {
            Engine::Uring(u) => u.completions_ready(),
            Engine::Sync(_) => false,
        }
    }

    fn drain(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Reaped>) {
        if let Engine::Uring(u) = &mut self.disk {
            u.drain(mem, out);
        }
    }

    fn resubmit(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        heads: &[u16],
        log: &mut dyn InflightLog,
    ) -> QueueResult {
        queue_result(process_resubmitted(
            queue,
            index as u16,
            mem,
            self.disk.backend(),
            &self.ctx,
            heads,
            log,
        ))
    }
}

fn queue_result(result: Result<QueueOutcome, QueueError>) -> QueueResult {
    match result {
        Ok(outcome) => QueueResult {
            notify: outcome.signal,
            completed: u64::from(outcome.completed),
            failed: u64::from(outcome.failed),
            broken: false,
            throttled: outcome.throttled,
        },
        Err(e) => {
            crate::quiet::guest_warn!("{e}");
            QueueResult {
                broken: true,
                ..QueueResult::default()
            }
        }
    }
}
