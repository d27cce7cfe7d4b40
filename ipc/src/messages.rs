//! The control-channel message set and its validation rules.
//!
//! Two enums, one per direction: [`VmmMessage`] (VMM -> worker) and [`WorkerMessage`]
//! (worker -> VMM). New variants go at the end of an enum (the encoding numbers variants
//! by position) together with a bump of [`PROTOCOL_VERSION`]; both sides check the
//! version in the handshake (the `handshake` module) before anything else is exchanged.
//!
//! Every message type implements [`Validate`]; the channel's `recv` runs it on every
//! decoded message before returning it, and its `send` before sending, so a
//! malformed message is stopped at whichever end is wrong. Validation is purely local to
//! one message; cross-message checks (e.g. the worker reporting the queue count it was
//! configured with) belong to the caller.

use serde::{Deserialize, Serialize};

/// Version of the message set. Bump on any change of the messages or their meaning.
pub const PROTOCOL_VERSION: u32 = 9;

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 32;
/// Largest number of queues a device may have.
pub const MAX_QUEUES: u16 = 64;
/// Longest serial id: the virtio-blk `VIRTIO_BLK_T_GET_ID` response is 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest path the configuration may name (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest error message, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
/// Largest pid Linux can hand out (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PID: u32 = 4 * 1024 * 1024;
pub use crate::limits::{MAX_DISK_SIZE, SECTOR_SIZE};
/// `VIRTIO_F_VERSION_1`: every device we drive is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A message that checks its own fields.
pub trait Validate {
    /// Checks every field (lengths, ranges, character sets).
    fn validate(&self) -> Result<(), ValidationError>;
}

/// A message field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A string or byte field is longer than allowed.
    #[error("field `{field}` is {len} bytes, longer than the limit of {max}")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A field that must not be empty is empty.
    #[error("field `{field}` is empty")]
    Empty {
        /// Field name.
        field: &'static str,
    },
    /// A character outside the allowed set.
    #[error("field `{field}` has character {found:?} at byte {offset}; allowed: {allowed}")]
    BadCharacter {
        /// Field name.
        field: &'static str,
        /// The character.
        found: char,
        /// Byte offset of the character.
        offset: usize,
        /// Description of the allowed set.
        allowed: &'static str,
    },
    /// A number outside its range.
    #[error("field `{field}` is {value}, outside {min}..={max}")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// Value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A bit that must be set is clear.
    #[error("field `{field}` is {value:#x}, missing required bits {required:#x}")]
    MissingBits {
        /// Field name.
        field: &'static str,
        /// Value.
        value: u64,
        /// Required bits.
        required: u64,
    },
}

fn check_len(field: &'static str, s: &str, min: usize, max: usize) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    if s.len() < min {
        return Err(ValidationError::Empty { field });
    }
    Ok(())
}

fn check_chars(
    field: &'static str,
    s: &str,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    match s.char_indices().find(|&(_, c)| !ok(c)) {
        Some((offset, found)) => Err(ValidationError::BadCharacter {
            field,
            found,
            offset,
            allowed,
        }),
        None => Ok(()),
    }
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ValidationError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// What a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerKind {
    /// virtio-blk over vhost-user.
    Blk,
}

/// Configuration the VMM sends to a freshly started worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// What to serve.
    pub kind: WorkerKind,
    /// Device name (`blk0`): 1..=[`MAX_DEVICE_ID_LEN`] bytes of `[A-Za-z0-9_-]`.
    pub device_id: String,
    /// Refuse writes (and advertise `VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// Number of virtqueues, 1..=[`MAX_QUEUES`].
    pub num_queues: u16,
    /// Serial id returned for `VIRTIO_BLK_T_GET_ID`: at most [`MAX_SERIAL_LEN`] bytes of
    /// printable ASCII (may be empty).
    pub serial: String,
    /// Open the disk for direct I/O (`O_DIRECT` semantics, bypassing the host cache).
    pub direct_io: bool,
    /// Whether to enter the sandbox. A worker built without its test feature must refuse
    /// `false`; this crate only carries the field.
    pub sandbox: bool,
    /// Whether the worker serves the disk or fails every request ([`ServeMode::Fail`]).
    pub mode: ServeMode,
    /// How the worker does its disk I/O.
    pub engine: IoEngine,
    /// Microseconds to busy-poll the rings before sleeping (0: never), at most
    /// [`MAX_POLL_US`].
    pub poll_us: u32,
    /// The unprivileged host uid (and gid) the sandboxed worker runs as: one per VM, so
    /// the workers of two VMs cannot signal or ptrace each other. Never 0.
    pub uid: u32,
    /// How the image's bytes are laid out. Never guessed from the content.
    pub format: ImageFormat,
    /// The one backing file a qcow2 image may name, opened by the VMM and passed beside
    /// this message (its only descriptor). None: the image must name no backing file.
    pub backing: Option<BackingImage>,
    /// The disk's I/O limits (changed later by [`VmmMessage::SetRateLimit`]).
    pub rate_limit: RateLimit,
    /// The image file's length when the VM started: a qcow2 image may grow from it by its
    /// virtual size and tables, however often its workers restart.
    pub image_len: u64,
    /// A resize the operator asked for: the worker sets the disk to this many bytes once
    /// confined, before it answers Ready, and offers that size. A multiple of
    /// [`SECTOR_SIZE`] in 512..=[`MAX_DISK_SIZE`]; never for a read-only disk or in fail
    /// mode. Setting a size the image already has changes nothing, so a worker that died
    /// after its resize can be replaced by one with the same request.
    pub resize_to: Option<u64>,
    /// The NBD export the disk's descriptor is connected to (its size and transmission
    /// flags, as the VMM negotiated them); exactly when `format` is [`ImageFormat::Nbd`].
    pub nbd: Option<crate::nbd::Export>,
}

/// Most tokens a bucket may hold or refill: 2^50 (a PiB of bytes), far above any disk's
/// rate, and far below where arithmetic on them could overflow.
pub const MAX_TOKENS: u64 = 1 << 50;
/// Longest refill time: a day.
pub const MAX_REFILL_MS: u64 = 86_400_000;

/// One token bucket, as Firecracker's rate limiter has them: `size` tokens, refilled
/// evenly over `refill_time_ms`, plus a `one_time_burst` spent first and never refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Tokens the bucket holds when full (bytes or requests), 1..=[`MAX_TOKENS`].
    pub size: u64,
    /// Extra tokens at the start, 0..=[`MAX_TOKENS`].
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens, 1..=[`MAX_REFILL_MS`].
    pub refill_time_ms: u64,
}

impl Validate for TokenBucket {
    fn validate(&self) -> Result<(), ValidationError> {
        let TokenBucket {
            size,
            one_time_burst,
            refill_time_ms,
        } = self;
        check_range("size", *size, 1, MAX_TOKENS)?;
        check_range("one_time_burst", *one_time_burst, 0, MAX_TOKENS)?;
        check_range("refill_time_ms", *refill_time_ms, 1, MAX_REFILL_MS)
    }
}

/// A disk's I/O limits across all its queues: bytes moved and requests. None: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Bytes read or written.
    pub bandwidth: Option<TokenBucket>,
    /// Requests of any type.
    pub ops: Option<TokenBucket>,
}

impl Validate for RateLimit {
    fn validate(&self) -> Result<(), ValidationError> {
        let RateLimit { bandwidth, ops } = self;
        for bucket in [bandwidth, ops].into_iter().flatten() {
            bucket.validate()?;
        }
        Ok(())
    }
}

/// The layout of an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// The guest's bytes, as they are.
    #[default]
    Raw,
    /// QEMU's qcow2, parsed by the worker inside its sandbox.
    Qcow2,
    /// Not a file: an NBD server's export, on a socket the VMM connected and negotiated
    /// (the disk's descriptor), described by [`WorkerConfig::nbd`].
    Nbd,
}

impl ImageFormat {
    /// The name used in options and logs.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Nbd => "nbd",
        }
    }
}

/// The backing file the configuration allows a qcow2 image to name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingImage {
    /// Its format, as configured.
    pub format: ImageFormat,
    /// Its path, absolute and without symlinks (as the VMM resolved it when it opened it).
    pub path: String,
    /// The directory of the image that names it, absolute and without symlinks: a relative
    /// name in the image is taken relative to it, as QEMU does.
    pub image_dir: String,
}

impl Validate for BackingImage {
    fn validate(&self) -> Result<(), ValidationError> {
        let BackingImage {
            format,
            path,
            image_dir,
        } = self;
        if *format == ImageFormat::Nbd {
            return Err(ValidationError::OutOfRange {
                field: "backing.format (raw or qcow2)",
                value: 2,
                min: 0,
                max: 1,
            });
        }
        for (field, value) in [("backing.path", path), ("backing.image_dir", image_dir)] {
            check_len(field, value, 1, MAX_PATH_LEN)?;
            check_chars(field, value, "no NUL or control characters", |c| {
                !c.is_control()
            })?;
            if !value.starts_with('/') {
                return Err(ValidationError::BadCharacter {
                    field,
                    found: value.chars().next().unwrap_or('?'),
                    offset: 0,
                    allowed: "an absolute path",
                });
            }
        }
        Ok(())
    }
}

/// How a worker serves its disk.
///
/// Encoded as the `bool` it replaced was (`Normal` as `false`, `Fail` as `true`: one
/// byte, 0 or 1), so the message set and [`PROTOCOL_VERSION`] are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServeMode {
    /// Requests go to the image.
    Normal,
    /// Fail mode: the disk's workers kept crashing, so this one completes every request
    /// (pending or new) with an I/O error and never touches the disk (it closes the
    /// image before its sandbox); it serves until the guest resets the device.
    Fail,
}

/// Longest polling window a worker accepts.
pub const MAX_POLL_US: u32 = 10_000;

/// A worker's I/O engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// io_uring when the kernel allows the restricted ring, else synchronous calls.
    #[default]
    Auto,
    /// preadv/pwritev/fdatasync, one request at a time.
    Sync,
    /// A restricted io_uring, one io_uring_enter per batch; the worker fails to start
    /// without it.
    IoUring,
}

impl IoEngine {
    /// The name used in options and logs.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Auto => "auto",
            IoEngine::Sync => "sync",
            IoEngine::IoUring => "io_uring",
        }
    }

    /// Parses `auto`, `sync` or `io_uring`.
    pub fn parse(s: &str) -> Option<Self> {
        [IoEngine::Auto, IoEngine::Sync, IoEngine::IoUring]
            .into_iter()
            .find(|e| e.name() == s)
    }
}

impl Validate for WorkerConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        let WorkerConfig {
            kind: WorkerKind::Blk,
            device_id,
            readonly,
            num_queues,
            serial,
            direct_io: _,
            sandbox: _,
            mode,
            engine: _,
            poll_us,
            uid,
            format,
            backing,
            rate_limit,
            image_len: _,
            resize_to,
            nbd,
        } = self;
        rate_limit.validate()?;
        let wrong = |field| ValidationError::OutOfRange {
            field,
            value: 1,
            min: 0,
            max: 0,
        };
        match (format, nbd) {
            (ImageFormat::Nbd, Some(export)) => {
                export.validate()?;
                if export.read_only() && !*readonly {
                    return Err(wrong("nbd (a read-only export serves a read-only disk)"));
                }
                if resize_to.is_some() {
                    return Err(wrong("resize_to (an NBD export's size is the server's)"));
                }
            }
            (ImageFormat::Nbd, None) => return Err(wrong("nbd (missing for format Nbd)")),
            (_, Some(_)) => return Err(wrong("nbd (only with format Nbd)")),
            (_, None) => {}
        }
        if let Some(size) = resize_to {
            check_range("resize_to", *size, SECTOR_SIZE, MAX_DISK_SIZE)?;
            if size % SECTOR_SIZE != 0 {
                return Err(ValidationError::OutOfRange {
                    field: "resize_to (whole sectors)",
                    value: size % SECTOR_SIZE,
                    min: 0,
                    max: 0,
                });
            }
            if *readonly || *mode == ServeMode::Fail {
                return Err(ValidationError::OutOfRange {
                    field: "resize_to (a writable disk in normal mode only)",
                    value: *size,
                    min: 0,
                    max: 0,
                });
            }
        }
        if let Some(backing) = backing {
            backing.validate()?;
            if *format != ImageFormat::Qcow2 {
                return Err(ValidationError::OutOfRange {
                    field: "backing (only a qcow2 image has one)",
                    value: 1,
                    min: 0,
                    max: 0,
                });
            }
        }
        check_range("poll_us", u64::from(*poll_us), 0, u64::from(MAX_POLL_US))?;
        check_range("uid", u64::from(*uid), 1, u64::from(u32::MAX - 1))?;
        check_len("device_id", device_id, 1, MAX_DEVICE_ID_LEN)?;
        check_chars("device_id", device_id, "[A-Za-z0-9_-]", |c| {
            c.is_ascii_alphanumeric() || c == '_' || c == '-'
        })?;
        check_range(
            "num_queues",
            u64::from(*num_queues),
            1,
            u64::from(MAX_QUEUES),
        )?;
        check_len("serial", serial, 0, MAX_SERIAL_LEN)?;
        check_chars("serial", serial, "printable ASCII", |c| {
            c.is_ascii_graphic() || c == ' '
        })?;
        Ok(())
    }
}

impl Validate for crate::nbd::Export {
    fn validate(&self) -> Result<(), ValidationError> {
        let crate::nbd::Export {
            size,
            flags,
            max_payload,
        } = self;
        if !(SECTOR_SIZE..=MAX_DISK_SIZE).contains(size) || size % SECTOR_SIZE != 0 {
            return Err(ValidationError::OutOfRange {
                field: "nbd.size (whole 512-byte sectors)",
                value: *size,
                min: SECTOR_SIZE,
                max: MAX_DISK_SIZE,
            });
        }
        if flags & crate::nbd::TFLAG_HAS_FLAGS == 0 {
            return Err(ValidationError::MissingBits {
                field: "nbd.flags",
                value: u64::from(*flags),
                required: u64::from(crate::nbd::TFLAG_HAS_FLAGS),
            });
        }
        if !(512..=crate::nbd::DEFAULT_MAX_PAYLOAD).contains(max_payload) {
            return Err(ValidationError::OutOfRange {
                field: "nbd.max_payload",
                value: u64::from(*max_payload),
                min: 512,
                max: u64::from(crate::nbd::DEFAULT_MAX_PAYLOAD),
            });
        }
        Ok(())
    }
}

/// Messages from the VMM to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmmMessage {
    /// First message: the VMM's protocol version.
    Hello {
        /// [`PROTOCOL_VERSION`] of the VMM.
        version: u32,
    },
    /// The worker's configuration; answered with [`WorkerMessage::Ready`] or
    /// [`WorkerMessage::Error`].
    Configure(WorkerConfig),
    /// Finish in-flight requests and exit.
    Shutdown,
    /// New I/O limits for the running worker.
    SetRateLimit(RateLimit),
}

impl Validate for VmmMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            // Any version is well formed; the handshake compares it.
            VmmMessage::Hello { version: _ } => Ok(()),
            VmmMessage::Configure(config) => config.validate(),
            VmmMessage::Shutdown => Ok(()),
            VmmMessage::SetRateLimit(limit) => limit.validate(),
        }
    }
}

/// Messages from a worker to the VMM (hostile input for the VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// Answer to [`VmmMessage::Hello`].
    Hello {
        /// [`PROTOCOL_VERSION`] of the worker.
        version: u32,
        /// The worker's pid as it sees it, 1..=[`MAX_PID`] (informational: the VMM
        /// trusts only the pid it spawned).
        pid: u32,
    },
    /// Configuration applied, backend ready to serve.
    Ready {
        /// Disk size in bytes, at most `i64::MAX` (an `off_t`).
        disk_size_bytes: u64,
        /// virtio feature bits the device offers; must include `VIRTIO_F_VERSION_1`.
        device_features: u64,
        /// Queues the backend serves, 1..=[`MAX_QUEUES`].
        num_queues: u16,
    },
    /// Counters, on request or periodically.
    Stats(WorkerStats),
    /// The worker failed; `message` is for the log: at most [`MAX_ERROR_MESSAGE_LEN`]
    /// bytes, no control characters (so it cannot forge log lines).
    Error {
        /// What went wrong.
        message: String,
    },
}

/// `text` as a valid [`WorkerMessage::Error`] message: control characters become spaces,
/// and it is cut (at a character boundary) to [`MAX_ERROR_MESSAGE_LEN`] bytes.
pub fn error_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_ERROR_MESSAGE_LEN));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_ERROR_MESSAGE_LEN {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push('?');
    }
    out
}

/// Worker counters. Any value is well formed (they are only printed and compared).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error status.
    pub failed: u64,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
    /// Flush requests completed.
    pub flushes: u64,
}

impl Validate for WorkerStats {
    fn validate(&self) -> Result<(), ValidationError> {
        // Counters have no invalid values; listed so a new field must be considered here.
        let WorkerStats {
            completed: _,
            failed: _,
            bytes_read: _,
            bytes_written: _,
            flushes: _,
        } = self;
        Ok(())
    }
}

impl Validate for WorkerMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            WorkerMessage::Hello { version: _, pid } => {
                check_range("pid", u64::from(*pid), 1, u64::from(MAX_PID))
            }
            WorkerMessage::Ready {
                disk_size_bytes,
                device_features,
                num_queues,
            } => {
                check_range("disk_size_bytes", *disk_size_bytes, 0, i64::MAX as u64)?;
                if device_features & VIRTIO_F_VERSION_1 == 0 {
                    return Err(ValidationError::MissingBits {
                        field: "device_features",
                        value: *device_features,
                        required: VIRTIO_F_VERSION_1,
                    });
                }
                check_range(
                    "num_queues",
                    u64::from(*num_queues),
                    1,
                    u64::from(MAX_QUEUES),
                )
            }
            WorkerMessage::Stats(stats) => stats.validate(),
            WorkerMessage::Error { message } => {
                check_len("message", message, 1, MAX_ERROR_MESSAGE_LEN)?;
                check_chars("message", message, "no control characters", |c| {
                    !c.is_control()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            kind: WorkerKind::Blk,
            device_id: "blk0".into(),
            readonly: false,
            num_queues: 2,
            serial: "SERIAL-0123456789_ab".into(),
            direct_io: true,
            sandbox: true,
            mode: ServeMode::Normal,
            engine: IoEngine::Auto,
            poll_us: 0,
            uid: 65534,
            format: ImageFormat::Raw,
            backing: None,
            rate_limit: RateLimit::default(),
            image_len: 1 << 30,
            resize_to: None,
            nbd: None,
        }
    }

    #[test]
    fn a_resize_is_whole_sectors_of_a_writable_disk_in_normal_mode() {
        let with = |resize_to, readonly, mode| {
            WorkerConfig {
                resize_to,
                readonly,
                mode,
                ..config()
            }
            .validate()
        };
        assert!(with(Some(2 << 30), false, ServeMode::Normal).is_ok());
        assert!(with(Some(MAX_DISK_SIZE), false, ServeMode::Normal).is_ok());
        assert!(with(None, true, ServeMode::Fail).is_ok());
        for bad in [0, 100, (1 << 30) + 1, MAX_DISK_SIZE + 512] {
            let err = with(Some(bad), false, ServeMode::Normal).unwrap_err();
            assert!(err.to_string().contains("resize_to"), "{bad}: {err}");
        }
        assert!(with(Some(1 << 30), true, ServeMode::Normal).is_err());
        assert!(with(Some(1 << 30), false, ServeMode::Fail).is_err());
    }

    #[test]
    fn an_nbd_disk_comes_with_its_export_and_only_then() {
        let export = crate::nbd::Export {
            size: 1 << 30,
            flags: crate::nbd::TFLAG_HAS_FLAGS,
            max_payload: 1 << 20,
        };
        let with = |format, nbd, readonly, resize_to| {
            WorkerConfig {
                format,
                nbd,
                readonly,
                resize_to,
                ..config()
            }
            .validate()
        };
        assert!(with(ImageFormat::Nbd, Some(export), false, None).is_ok());
        assert!(with(ImageFormat::Nbd, None, false, None).is_err());
        assert!(with(ImageFormat::Raw, Some(export), false, None).is_err());
        assert!(with(ImageFormat::Nbd, Some(export), false, Some(1 << 31)).is_err());
        let ro = crate::nbd::Export {
            flags: export.flags | crate::nbd::TFLAG_READ_ONLY,
            ..export
        };
        assert!(with(ImageFormat::Nbd, Some(ro), false, None).is_err());
        assert!(with(ImageFormat::Nbd, Some(ro), true, None).is_ok());
        for bad in [
            crate::nbd::Export {
                size: 1000,
                ..export
            },
            crate::nbd::Export { flags: 0, ..export },
            crate::nbd::Export {
                max_payload: 100,
                ..export
            },
        ] {
            assert!(
                with(ImageFormat::Nbd, Some(bad), false, None).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_worker_never_runs_as_root() {
        let err = WorkerConfig { uid: 0, ..config() }.validate().unwrap_err();
        assert!(err.to_string().contains("uid"), "{err}");
        assert!(WorkerConfig {
            uid: 200_000,
            ..config()
        }
        .validate()
        .is_ok());
    }

    fn ready() -> WorkerMessage {
        WorkerMessage::Ready {
            disk_size_bytes: 1 << 30,
            device_features: VIRTIO_F_VERSION_1 | 0x2,
            num_queues: 2,
        }
    }

    #[track_caller]
    fn assert_field(result: Result<(), ValidationError>, expected: &str) {
        let err = result.expect_err("validation should fail");
        let field = match &err {
            ValidationError::TooLong { field, .. }
            | ValidationError::Empty { field }
            | ValidationError::BadCharacter { field, .. }
            | ValidationError::OutOfRange { field, .. }
            | ValidationError::MissingBits { field, .. } => *field,
        };
        assert_eq!(field, expected, "{err}");
        // Messages name the field.
        assert!(err.to_string().contains(expected));
    }

    #[test]
    fn token_buckets_are_bounded() {
        let ok = TokenBucket {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            TokenBucket { size: 0, ..ok },
            TokenBucket {
                size: MAX_TOKENS + 1,
                ..ok
            },
            TokenBucket {
                refill_time_ms: 0,
                ..ok
            },
            TokenBucket {
                one_time_burst: u64::MAX,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            let msg = VmmMessage::SetRateLimit(RateLimit {
                bandwidth: None,
                ops: Some(bad),
            });
            assert!(msg.validate().is_err(), "{msg:?}");
        }
    }

    #[test]
    fn error_messages_are_made_valid() {
        for text in ["", "line\nforged", &"é".repeat(MAX_ERROR_MESSAGE_LEN)] {
            let message = error_message(text);
            assert_eq!(
                WorkerMessage::Error { message }.validate(),
                Ok(()),
                "{text:?}"
            );
        }
        assert_eq!(error_message("a\nb"), "a b");
    }

    #[test]
    fn a_backing_file_is_a_qcow2_images_and_named_by_absolute_paths() {
        let backing = BackingImage {
            format: ImageFormat::Raw,
            path: "/images/base.raw".into(),
            image_dir: "/images".into(),
        };
        let qcow2 = WorkerConfig {
            format: ImageFormat::Qcow2,
            backing: Some(backing.clone()),
            ..config()
        };
        assert_eq!(qcow2.validate(), Ok(()));
        let raw = WorkerConfig {
            format: ImageFormat::Raw,
            ..qcow2.clone()
        };
        assert!(raw.validate().is_err(), "a raw image has no backing file");
        for (path, image_dir) in [
            ("base.raw", "/images"),
            ("/images/base.raw", "images"),
            ("/images/base\nforged.raw", "/images"),
            ("", "/images"),
        ] {
            let path = path.to_string();
            let bad = WorkerConfig {
                backing: Some(BackingImage {
                    path: path.clone(),
                    image_dir: image_dir.into(),
                    ..backing.clone()
                }),
                ..qcow2.clone()
            };
            assert!(bad.validate().is_err(), "{path:?} in {image_dir:?}");
        }
        let long = WorkerConfig {
            backing: Some(BackingImage {
                path: format!("/{}", "a".repeat(MAX_PATH_LEN)),
                ..backing
            }),
            ..qcow2
        };
        assert!(long.validate().is_err());
    }

    #[test]
    fn valid_messages_pass() {
        let vmm = [
            VmmMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            VmmMessage::Configure(config()),
            VmmMessage::Configure(WorkerConfig {
                device_id: "a".repeat(MAX_DEVICE_ID_LEN),
                num_queues: MAX_QUEUES,
                serial: String::new(),
                ..config()
            }),
            VmmMessage::Shutdown,
        ];
        for m in &vmm {
            m.validate().unwrap();
            let bytes = crate::codec::encode(m).unwrap();
            assert_eq!(&crate::codec::decode::<VmmMessage>(&bytes).unwrap(), m);
        }
        let worker = [
            WorkerMessage::Hello {
                version: PROTOCOL_VERSION,
                pid: 1,
            },
            WorkerMessage::Hello {
                version: 0,
                pid: MAX_PID,
            },
            ready(),
            WorkerMessage::Ready {
                disk_size_bytes: i64::MAX as u64,
                device_features: u64::MAX,
                num_queues: MAX_QUEUES,
            },
            WorkerMessage::Stats(WorkerStats {
                completed: u64::MAX,
                ..WorkerStats::default()
            }),
            WorkerMessage::Error {
                message: "disk read failed: Input/output error (os error 5) ✓".into(),
            },
        ];
        for m in &worker {
            m.validate().unwrap();
            let bytes = crate::codec::encode(m).unwrap();
            assert_eq!(&crate::codec::decode::<WorkerMessage>(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn serve_mode_is_encoded_as_the_bool_it_replaced() {
        // Both sides of an unchanged PROTOCOL_VERSION must read the same bytes.
        for (mode, was) in [(ServeMode::Normal, false), (ServeMode::Fail, true)] {
            assert_eq!(
                crate::codec::encode(&mode).unwrap(),
                crate::codec::encode(&was).unwrap()
            );
            let fail = WorkerConfig { mode, ..config() };
            let bytes = crate::codec::encode(&fail).unwrap();
            assert_eq!(crate::codec::decode::<WorkerConfig>(&bytes).unwrap(), fail);
        }
    }

    #[test]
    fn device_id_rules() {
        let with = |id: &str| {
            VmmMessage::Configure(WorkerConfig {
                device_id: id.into(),
                ..config()
            })
            .validate()
        };
        assert_field(with(""), "device_id");
        assert_field(with(&"a".repeat(MAX_DEVICE_ID_LEN + 1)), "device_id");
        for bad in ["blk 0", "blk/0", "../x", "blk.0", "blké", "a\0b", "a\nb"] {
            assert_field(with(bad), "device_id");
        }
        assert!(matches!(
            with("ok-id_9/x"),
            Err(ValidationError::BadCharacter {
                found: '/',
                offset: 7,
                ..
            })
        ));
    }

    #[test]
    fn num_queues_rules() {
        for n in [0, MAX_QUEUES + 1, u16::MAX] {
            assert_field(
                WorkerConfig {
                    num_queues: n,
                    ..config()
                }
                .validate(),
                "num_queues",
            );
        }
    }

    #[test]
    fn serial_rules() {
        let with = |s: String| {
            WorkerConfig {
                serial: s,
                ..config()
            }
            .validate()
        };
        assert_field(with("x".repeat(MAX_SERIAL_LEN + 1)), "serial");
        // 20 bytes but 10 characters: the limit is in bytes.
        assert_field(with("é".repeat(10)), "serial");
        for bad in ["a\0", "tab\there", "\x7f", "ü"] {
            assert_field(with(bad.into()), "serial");
        }
    }

    #[test]
    fn worker_hello_rules() {
        for pid in [0, MAX_PID + 1, u32::MAX] {
            assert_field(
                WorkerMessage::Hello {
                    version: PROTOCOL_VERSION,
                    pid,
                }
                .validate(),
                "pid",
            );
        }
    }

    #[test]
    fn ready_rules() {
        let with = |disk_size_bytes, device_features, num_queues| {
            WorkerMessage::Ready {
                disk_size_bytes,
                device_features,
                num_queues,
            }
            .validate()
        };
        assert_field(
            with(i64::MAX as u64 + 1, VIRTIO_F_VERSION_1, 1),
            "disk_size_bytes",
        );
        assert_field(with(u64::MAX, VIRTIO_F_VERSION_1, 1), "disk_size_bytes");
        assert_field(with(4096, 0x2, 1), "device_features");
        assert_field(with(4096, VIRTIO_F_VERSION_1, 0), "num_queues");
        assert_field(with(4096, VIRTIO_F_VERSION_1, MAX_QUEUES + 1), "num_queues");
    }

    #[test]
    fn error_message_rules() {
        let with = |m: String| WorkerMessage::Error { message: m }.validate();
        assert_field(with(String::new()), "message");
        assert_field(with("x".repeat(MAX_ERROR_MESSAGE_LEN + 1)), "message");
        for bad in [
            "line\nforged log line",
            "cr\r",
            "esc \x1b[31mred",
            "nul\0",
            "del\x7f",
            "c1 \u{85}",
        ] {
            assert_field(with(bad.into()), "message");
        }
    }
}
