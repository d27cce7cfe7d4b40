//! virtio-blk as a [`VhostDevice`]: the glue between the vhost-user handler and the
//! device core in [`crate::blk`].

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::blk::backend::DiskBackend;
use crate::blk::config::{device_features, BlkConfig, BlkLimits, ConfigError};
use crate::blk::fail_backend::FailBackend;
use crate::blk::queue::{process_queue, process_resubmitted, QueueError, QueueOutcome};
use crate::blk::request::BlkContext;
use crate::blk::sync_backend::SyncBackend;
use crate::disk::Disk;
use crate::inflight::InflightLog;
use crate::vhost::{QueueResult, VhostDevice};

/// Errors while building the device.
#[derive(Debug, thiserror::Error)]
pub enum BlkDeviceError {
    #[error("cannot describe the disk to the guest")]
    Config(#[from] ConfigError),
    #[error("cannot set up the I/O backend")]
    Backend(#[source] std::io::Error),
}

/// A virtio-blk device on one disk.
#[derive(Debug)]
pub struct BlkDevice {
    disk: Box<dyn DiskBackend + Send>,
    config: BlkConfig,
    ctx: BlkContext,
    features: u64,
    num_queues: usize,
}

/// How a worker serves its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// Requests go to the image.
    Normal,
    /// Every request completes with `IOERR`, and the image's descriptor is closed before
    /// the sandbox (see [`crate::blk::fail_backend`]).
    Fail,
}

impl BlkDevice {
    pub fn new(
        disk: Disk,
        num_queues: u16,
        serial: &[u8],
        mode: ServeMode,
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
        let backend: Box<dyn DiskBackend + Send> = match mode {
            ServeMode::Normal => {
                Box::new(SyncBackend::new(disk.file).map_err(BlkDeviceError::Backend)?)
            }
            ServeMode::Fail => Box::new(FailBackend::new(disk.size)),
        };
        Ok(BlkDevice {
            disk: backend,
            config,
            ctx,
            features,
            num_queues,
        })
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
        queue_result(process_queue(
            queue,
            index as u16,
            mem,
            self.disk.as_mut(),
            &self.ctx,
            log,
        ))
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
            self.disk.as_mut(),
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
        },
        Err(e) => {
            tracing::warn!("{e}");
            QueueResult {
                broken: true,
                ..QueueResult::default()
            }
        }
    }
}
