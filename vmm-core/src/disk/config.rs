//! A disk's configuration, typed: the same serde types serve `--disk key=value,...` (see
//! [`crate::keyvalue`]), a configuration file and the control API, so the three cannot
//! drift. Unknown and repeated keys are refused by serde;
//! what only means something for an image bulkhead's worker serves cannot be given to a
//! disk an external vhost-user backend serves, since [`DiskSource`] has nowhere to put it.

use std::path::{Path, PathBuf};

use ipc::messages::{ImageFormat, IoEngine, RateLimit, TokenBucket, MAX_POLL_US, MAX_TOKENS};
use serde::{Deserialize, Deserializer, Serialize};

/// The most queues a disk may have.
pub const MAX_QUEUES: u16 = 64;
/// Queues a worker-served disk gets by default: one per vCPU, at most this many.
pub const DEFAULT_QUEUES_CAP: u16 = 8;

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DiskOptions", into = "DiskOptions")]
pub struct DiskConfig {
    /// The device's name in logs and the API; `blkN` for the N-th disk when not given.
    pub id: String,
    pub source: DiskSource,
    /// Queues; None: see [`DiskConfig::with_default_queues`].
    pub num_queues: Option<u16>,
    /// How a QueueNotify write reaches the kick eventfd.
    pub ioeventfd: IoEventFdMatch,
}

/// Who serves the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// An image served by a `bulkhead-worker` this VMM spawns.
    Image(ImageDisk),
    /// An already running vhost-user-blk backend (e.g. qemu-storage-daemon) at this
    /// socket; it owns its image and how it serves it.
    VhostUser(PathBuf),
}

/// An image bulkhead's worker serves, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDisk {
    pub path: PathBuf,
    pub readonly: bool,
    /// The virtio-blk serial (GET_ID), at most 20 printable bytes.
    pub serial: String,
    /// O_DIRECT.
    pub direct: bool,
    /// Keep a started, sandboxed spare worker, so a restart skips exec and sandbox setup.
    pub spare: bool,
    /// The worker's I/O engine.
    pub engine: IoEngine,
    /// Microseconds the worker busy-polls its rings before sleeping.
    pub poll_us: u32,
    /// The image's layout, as configured (never guessed from the content).
    pub format: ImageFormat,
    /// The one backing file a qcow2 image may name.
    pub backing: Option<BackingFile>,
    /// I/O limits at start (the control API can change them while the VM runs).
    pub rate_limit: RateLimit,
    /// The NBD server and export that serve the disk (`format` is then
    /// [`ImageFormat::Nbd`] and `path` only names the server, for logs).
    pub nbd: Option<NbdSource>,
}

/// An NBD server's export, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdSource {
    pub server: NbdServer,
    /// The export's name (empty: the server's default export).
    pub export: String,
}

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdServer {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `HOST:PORT` (an IPv6 address in brackets).
    Tcp { host: String, port: u16 },
}

impl NbdServer {
    /// `unix:PATH` or `HOST:PORT`, as `nbd=` takes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("nbd=unix: needs a socket path".into());
            }
            return Ok(NbdServer::Unix(PathBuf::from(path)));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("nbd={text:?} must be unix:PATH or HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("nbd={text:?}: the port must be 1..=65535"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("nbd={text:?} names no host"));
        }
        Ok(NbdServer::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdServer::Unix(path) => write!(f, "unix:{}", path.display()),
            NbdServer::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdServer::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl NbdSource {
    /// How logs and errors name it: `nbd:SERVER` and the export, if named.
    pub fn describe(&self) -> String {
        if self.export.is_empty() {
            format!("nbd:{}", self.server)
        } else {
            format!("nbd:{} export {:?}", self.server, self.export)
        }
    }
}

/// A backing file the configuration allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingFile {
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// An image format as written in options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FormatOption {
    Raw,
    Qcow2,
}

impl From<FormatOption> for ImageFormat {
    fn from(f: FormatOption) -> Self {
        match f {
            FormatOption::Raw => ImageFormat::Raw,
            FormatOption::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

impl From<ImageFormat> for FormatOption {
    fn from(f: ImageFormat) -> Self {
        match f {
            // An NBD disk is written as nbd=, never as a format.
            ImageFormat::Raw | ImageFormat::Nbd => FormatOption::Raw,
            ImageFormat::Qcow2 => FormatOption::Qcow2,
        }
    }
}

/// How KVM matches a QueueNotify write to a queue's kick eventfd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEventFdMatch {
    /// One ioeventfd per queue, matching the written queue index.
    #[default]
    Datamatch,
    /// A zero-length ioeventfd that any write signals. On VMX hosts KVM takes it without
    /// decoding the guest's instruction (its fast MMIO path); valid for one queue only,
    /// since the written value is not looked at.
    Any,
}

/// A disk bulkhead's worker serves, as the worker is started with: the id, the image
/// options and the queue count, defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerDisk {
    pub id: String,
    pub image: ImageDisk,
    pub num_queues: u16,
    /// The worker's address-space limit (RLIMIT_AS) in bytes; see
    /// [`crate::worker::address_space_limit`].
    pub address_space: u64,
    /// The host uid (and gid) the worker runs as: the VM's lease.
    pub uid: u32,
    /// A resize this worker is to do before it serves (a planned restart's successor).
    pub resize_to: Option<u64>,
}

/// Errors in a disk's options.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--disk {spec:?}: {reason}")]
    Option { spec: String, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Image(#[from] ipc::image::ImageError),
}

/// The worker's engine choice as written in options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EngineOption {
    Auto,
    Sync,
    IoUring,
}

impl From<EngineOption> for IoEngine {
    fn from(e: EngineOption) -> Self {
        match e {
            EngineOption::Auto => IoEngine::Auto,
            EngineOption::Sync => IoEngine::Sync,
            EngineOption::IoUring => IoEngine::IoUring,
        }
    }
}

impl From<IoEngine> for EngineOption {
    fn from(e: IoEngine) -> Self {
        match e {
            IoEngine::Auto => EngineOption::Auto,
            IoEngine::Sync => EngineOption::Sync,
            IoEngine::IoUring => EngineOption::IoUring,
        }
    }
}

/// The flat set of keys as written (`--disk`, a file, the API); [`DiskConfig`] is what is
/// checked and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_user: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    export: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(
        default,
        deserialize_with = "on_off",
        skip_serializing_if = "Option::is_none"
    )]
    readonly: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(
        default,
        deserialize_with = "on_off",
        skip_serializing_if = "Option::is_none"
    )]
    direct: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_queues: Option<u16>,
    #[serde(
        default,
        deserialize_with = "on_off",
        skip_serializing_if = "Option::is_none"
    )]
    spare: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    engine: Option<EngineOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    poll_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ioeventfd: Option<IoEventFdMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<FormatOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing_format: Option<FormatOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bw: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bw_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bw_refill_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iops_refill_ms: Option<u64>,
}

impl DiskOptions {
    fn limits(&self) -> LimitOptions {
        LimitOptions {
            bw: self.bw,
            bw_burst: self.bw_burst,
            bw_refill_ms: self.bw_refill_ms,
            iops: self.iops,
            iops_burst: self.iops_burst,
            iops_refill_ms: self.iops_refill_ms,
        }
    }

    fn set_limits(&mut self, l: LimitOptions) {
        self.bw = l.bw;
        self.bw_burst = l.bw_burst;
        self.bw_refill_ms = l.bw_refill_ms;
        self.iops = l.iops;
        self.iops_burst = l.iops_burst;
        self.iops_refill_ms = l.iops_refill_ms;
    }
}

/// A disk's I/O limits as rates, written as `--disk` keys (`iops=2000,bw=50000000`), in a
/// file's disk object, or to `bulkhead ctl limit`. `iops=N` is N requests a second and
/// `bw=B` B bytes a second; each becomes a token bucket (see [`RateLimit`]) holding what
/// `*_refill_ms` (default 100 ms, QEMU's throttling's default burst window) of the rate
/// brings, plus a one-time `*_burst`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw_refill_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_refill_ms: Option<u64>,
}

/// Default refill window of a rate's bucket.
pub const DEFAULT_REFILL_MS: u64 = 100;

impl LimitOptions {
    /// Whether any key is given.
    pub fn any(&self) -> bool {
        *self != LimitOptions::default()
    }

    /// The buckets these rates make.
    pub fn rate_limit(&self) -> Result<RateLimit, String> {
        let bucket = |name: &str,
                      rate: Option<u64>,
                      burst: Option<u64>,
                      refill: Option<u64>|
         -> Result<Option<TokenBucket>, String> {
            let Some(rate) = rate else {
                if burst.is_some() || refill.is_some() {
                    return Err(format!(
                        "{name}_burst= and {name}_refill_ms= need {name}=RATE"
                    ));
                }
                return Ok(None);
            };
            if rate == 0 || rate > MAX_TOKENS {
                return Err(format!(
                    "{name}={rate} must be 1..={MAX_TOKENS} a second (leave {name}= out for no \
                     limit)"
                ));
            }
            let refill_ms = refill.unwrap_or(DEFAULT_REFILL_MS);
            if !(1..=ipc::messages::MAX_REFILL_MS).contains(&refill_ms) {
                return Err(format!(
                    "{name}_refill_ms={refill_ms} must be 1..={}",
                    ipc::messages::MAX_REFILL_MS
                ));
            }
            let burst = burst.unwrap_or(0);
            if burst > MAX_TOKENS {
                return Err(format!("{name}_burst={burst} must be at most {MAX_TOKENS}"));
            }
            // What the window brings at that rate, the window rounded up to where that is
            // a whole number of tokens (1000 / gcd(rate, 1000) ms divides it): the rate is
            // then exact, and the bucket's keys give the same bucket back.
            let gcd = |mut a: u64, mut b: u64| {
                while b != 0 {
                    (a, b) = (b, a % b);
                }
                a
            };
            let unit = u128::from(1000 / gcd(rate, 1000));
            let refill_time_ms = u128::from(refill_ms).div_ceil(unit) * unit;
            let size = u128::from(rate) * refill_time_ms / 1000;
            let bucket = TokenBucket {
                size: u64::try_from(size).unwrap_or(u64::MAX),
                one_time_burst: burst,
                refill_time_ms: u64::try_from(refill_time_ms).unwrap_or(u64::MAX),
            };
            ipc::messages::Validate::validate(&bucket).map_err(|e| {
                format!("{name}={rate} with {name}_refill_ms={refill_ms}: its bucket's {e}")
            })?;
            Ok(Some(bucket))
        };
        Ok(RateLimit {
            bandwidth: bucket("bw", self.bw, self.bw_burst, self.bw_refill_ms)?,
            ops: bucket("iops", self.iops, self.iops_burst, self.iops_refill_ms)?,
        })
    }
}

/// A switch: `on`/`off` as the command line writes it, `true`/`false` as a file does,
/// or `1`/`0`.
fn on_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct OnOff;
    impl serde::de::Visitor<'_> for OnOff {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("on or off")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
            }
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<bool, E> {
            self.visit_i64(v.min(2) as i64)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
            match v {
                "on" | "true" | "1" => Ok(true),
                "off" | "false" | "0" => Ok(false),
                _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
            }
        }
    }
    d.deserialize_any(OnOff).map(Some)
}

/// Keys that only mean something for an image bulkhead's worker serves.
fn image_keys(o: &DiskOptions) -> Option<&'static str> {
    [
        ("readonly", o.readonly.is_some()),
        ("serial", o.serial.is_some()),
        ("direct", o.direct.is_some()),
        ("spare", o.spare.is_some()),
        ("engine", o.engine.is_some()),
        ("poll_us", o.poll_us.is_some()),
        ("format", o.format.is_some()),
        ("backing", o.backing.is_some()),
        ("backing_format", o.backing_format.is_some()),
        ("bw/iops", o.limits().any()),
        ("export", o.export.is_some()),
    ]
    .into_iter()
    .find_map(|(key, given)| given.then_some(key))
}

impl TryFrom<DiskOptions> for DiskConfig {
    type Error = String;

    fn try_from(o: DiskOptions) -> Result<Self, String> {
        let id = match o.id.clone() {
            None => String::new(),
            Some(id) => {
                let ok = !id.is_empty()
                    && id.len() <= 32
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(format!("id={id:?} must be 1-32 of [A-Za-z0-9_-]"));
                }
                id
            }
        };
        if let Some(n) = o.num_queues {
            if !(1..=MAX_QUEUES).contains(&n) {
                return Err(format!("num_queues={n} must be 1..={MAX_QUEUES}"));
            }
        }
        let ioeventfd = o.ioeventfd.unwrap_or_default();
        if ioeventfd == IoEventFdMatch::Any && o.num_queues.is_some_and(|n| n > 1) {
            return Err(format!(
                "ioeventfd=any serves one queue, not num_queues={}",
                o.num_queues.unwrap_or(1)
            ));
        }
        let nbd = match &o.nbd {
            None if o.export.is_some() => return Err("export= needs nbd=SERVER".into()),
            None => None,
            Some(_) if o.path.is_some() || o.vhost_user.is_some() => {
                return Err("nbd= excludes path= and vhost_user=".into())
            }
            Some(server) => {
                let export = o.export.clone().unwrap_or_default();
                if export.len() > ipc::nbd::MAX_EXPORT_NAME || export.chars().any(char::is_control)
                {
                    return Err(format!(
                        "export={export:?} must be at most {} bytes, no control characters",
                        ipc::nbd::MAX_EXPORT_NAME
                    ));
                }
                for (key, given) in [
                    ("format", o.format.is_some()),
                    ("backing", o.backing.is_some()),
                    ("direct", o.direct.is_some()),
                ] {
                    if given {
                        return Err(format!(
                            "{key}= applies to an image file, not to an NBD export (the \
                             server owns its storage)"
                        ));
                    }
                }
                if o.engine == Some(EngineOption::IoUring) {
                    return Err(
                        "engine=io_uring serves image files; an NBD export is served \
                                by the sync engine (engine=auto or sync)"
                            .into(),
                    );
                }
                Some(NbdSource {
                    server: NbdServer::parse(server)?,
                    export,
                })
            }
        };
        let path = match &nbd {
            Some(n) => Some(PathBuf::from(n.describe())),
            None => o.path.clone(),
        };
        let source = match (&path, &o.vhost_user) {
            (Some(_), Some(_)) => return Err("path= and vhost_user= exclude each other".into()),
            (None, None) => return Err("needs path=IMAGE, nbd=SERVER or vhost_user=SOCKET".into()),
            (None, Some(socket)) => {
                if let Some(key) = image_keys(&o) {
                    return Err(format!(
                        "{key}= applies to an image bulkhead serves (path=), not to a \
                         vhost-user backend, which has its own"
                    ));
                }
                DiskSource::VhostUser(socket.clone())
            }
            (Some(path), None) => {
                let serial = o.serial.clone().unwrap_or_default();
                if serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "serial={serial:?} must be at most 20 printable bytes"
                    ));
                }
                let poll_us = o.poll_us.unwrap_or(0);
                if poll_us > MAX_POLL_US {
                    return Err(format!("poll_us={poll_us} must be 0..={MAX_POLL_US}"));
                }
                let format = match &nbd {
                    Some(_) => ImageFormat::Nbd,
                    None => o.format.map_or(ImageFormat::Raw, ImageFormat::from),
                };
                let engine = o.engine.map_or(IoEngine::Auto, IoEngine::from);
                if format == ImageFormat::Qcow2 && engine == IoEngine::IoUring {
                    return Err(
                        "engine=io_uring serves raw images; a qcow2 image is served \
                                by imago through the sync engine (engine=auto or sync)"
                            .into(),
                    );
                }
                // A spare parses the image's tables when it starts; a qcow2 image's change
                // while it waits (every allocation), so a spare's would be stale.
                let spare = match (o.spare, format) {
                    (Some(true), ImageFormat::Qcow2) => {
                        return Err("spare=on cannot serve a qcow2 image: a spare reads the \
                                    image's tables when it starts, and they change while it \
                                    waits"
                            .into())
                    }
                    (spare, ImageFormat::Qcow2) => spare.unwrap_or(false),
                    (spare, ImageFormat::Raw) => spare.unwrap_or(true),
                    // A spare would hold a connection of its own while it waits, and many
                    // servers (qemu-nbd by default) take one client at a time.
                    (spare, ImageFormat::Nbd) => spare.unwrap_or(false),
                };
                let backing = match (&o.backing, o.backing_format) {
                    (None, Some(_)) => {
                        return Err("backing_format= needs backing=PATH".into());
                    }
                    (None, None) => None,
                    (Some(_), _) if format != ImageFormat::Qcow2 => {
                        return Err(format!(
                            "backing= needs format=qcow2 (a {} image has no backing file)",
                            format.name()
                        ));
                    }
                    (Some(path), f) => Some(BackingFile {
                        path: path.clone(),
                        format: f.map_or(ImageFormat::Raw, ImageFormat::from),
                    }),
                };
                let rate_limit = o.limits().rate_limit()?;
                DiskSource::Image(ImageDisk {
                    path: path.clone(),
                    readonly: o.readonly.unwrap_or(false),
                    serial,
                    direct: o.direct.unwrap_or(false),
                    spare,
                    engine,
                    poll_us,
                    format,
                    backing,
                    rate_limit,
                    nbd,
                })
            }
        };
        // A zero-length ioeventfd cannot tell queues apart: one queue, not a default.
        let num_queues = match ioeventfd {
            IoEventFdMatch::Any => Some(1),
            IoEventFdMatch::Datamatch => o.num_queues,
        };
        Ok(DiskConfig {
            id,
            source,
            num_queues,
            ioeventfd,
        })
    }
}

impl From<DiskConfig> for DiskOptions {
    fn from(c: DiskConfig) -> Self {
        let mut o = DiskOptions {
            id: (!c.id.is_empty()).then_some(c.id),
            num_queues: c.num_queues,
            ioeventfd: Some(c.ioeventfd),
            ..DiskOptions::default()
        };
        match c.source {
            DiskSource::VhostUser(socket) => o.vhost_user = Some(socket),
            DiskSource::Image(i) => {
                match i.nbd {
                    Some(n) => {
                        o.nbd = Some(n.server.to_string());
                        o.export = (!n.export.is_empty()).then_some(n.export);
                    }
                    None => {
                        o.path = Some(i.path);
                        o.format = Some(i.format.into());
                        o.direct = Some(i.direct);
                    }
                }
                o.readonly = Some(i.readonly);
                o.serial = (!i.serial.is_empty()).then_some(i.serial);
                o.spare = Some(i.spare);
                o.engine = Some(i.engine.into());
                o.poll_us = Some(i.poll_us);
                if let Some(b) = i.backing {
                    o.backing = Some(b.path);
                    o.backing_format = Some(b.format.into());
                }
                o.set_limits(limit_options(&i.rate_limit));
            }
        }
        o
    }
}

/// A rate limit in words, for logs and `bulkhead ctl`.
pub fn describe_limit(limit: &RateLimit) -> String {
    let o = limit_options(limit);
    let part = |rate: Option<u64>, unit: &str| match rate {
        None => format!("unlimited {unit}"),
        Some(r) => format!("{r} {unit}/s"),
    };
    format!("{}, {}", part(o.iops, "requests"), part(o.bw, "bytes"))
}

/// The rate keys that give `limit` back (exact for limits the keys made; a bucket set
/// through the API is shown as the rate it amounts to).
pub fn limit_options(limit: &RateLimit) -> LimitOptions {
    // Exact for a bucket the keys made; one set through the API shows its rate rounded.
    let rate = |b: &TokenBucket| {
        let per_s = (u128::from(b.size) * 1000 + u128::from(b.refill_time_ms) / 2)
            / u128::from(b.refill_time_ms);
        u64::try_from(per_s).unwrap_or(u64::MAX)
    };
    let mut o = LimitOptions::default();
    if let Some(b) = &limit.bandwidth {
        o.bw = Some(rate(b));
        o.bw_burst = (b.one_time_burst > 0).then_some(b.one_time_burst);
        o.bw_refill_ms = (b.refill_time_ms != DEFAULT_REFILL_MS).then_some(b.refill_time_ms);
    }
    if let Some(b) = &limit.ops {
        o.iops = Some(rate(b));
        o.iops_burst = (b.one_time_burst > 0).then_some(b.one_time_burst);
        o.iops_refill_ms = (b.refill_time_ms != DEFAULT_REFILL_MS).then_some(b.refill_time_ms);
    }
    o
}

impl DiskConfig {
    /// Parses `--disk`: `path=IMG[,id=NAME][,readonly=on][,serial=ID][,direct=on]
    /// [,num_queues=N][,spare=off][,engine=auto|sync|io_uring][,poll_us=N]
    /// [,ioeventfd=datamatch|any][,format=raw|qcow2][,backing=PATH][,backing_format=raw|qcow2]` or `vhost_user=SOCKET[,id=NAME][,num_queues=N]
    /// [,ioeventfd=..]`; `index` gives the default id `blkN`. Errors quote the option
    /// and name the key.
    pub fn parse(spec: &str, index: usize) -> Result<Self, ConfigError> {
        let mut cfg: DiskConfig =
            crate::keyvalue::from_key_values(spec).map_err(|e| ConfigError::Option {
                spec: spec.to_string(),
                reason: e.to_string(),
            })?;
        if cfg.id.is_empty() {
            cfg.id = format!("blk{index}");
        }
        Ok(cfg)
    }

    /// The disk's queue count to use with `vcpus` vCPUs: as given, else one queue per
    /// vCPU (at most [`DEFAULT_QUEUES_CAP`]) for a disk bulkhead's worker serves; an
    /// external vhost-user backend gets 1 unless told (its queue count is its own).
    pub fn with_default_queues(mut self, vcpus: u32) -> Self {
        if self.num_queues.is_none() {
            self.num_queues = Some(match self.source {
                DiskSource::Image(_) => u16::try_from(vcpus)
                    .unwrap_or(u16::MAX)
                    .clamp(1, DEFAULT_QUEUES_CAP),
                DiskSource::VhostUser(_) => 1,
            });
        }
        self
    }

    /// The queue count (1 until defaults are resolved).
    pub fn queues(&self) -> u16 {
        self.num_queues.unwrap_or(1)
    }

    /// The image, for a disk bulkhead's worker serves.
    pub fn image_path(&self) -> Option<&Path> {
        match &self.source {
            DiskSource::Image(i) => Some(&i.path),
            DiskSource::VhostUser(_) => None,
        }
    }
}

/// Checks a VM's disks together, before anything is opened or started: ids are unique,
/// and no image or vhost-user socket is given twice (an image by device and inode, so a
/// symlink or hard link to one counts), each image is a regular file or a block device.
pub fn check_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    let mut images: Vec<(&DiskConfig, &Path, (u64, u64))> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if let Some(first) = disks[..i].iter().position(|o| o.id == d.id) {
            return Err(ConfigError::Conflict(format!(
                "two disks have the id {:?} (the {} and the {} --disk; the default id of the \
                 N-th --disk, counting from 0, is blkN)",
                d.id,
                ordinal(first),
                ordinal(i),
            )));
        }
        match &d.source {
            DiskSource::Image(ImageDisk { nbd: Some(nbd), .. }) => {
                let same = disks[..i].iter().find(|o| {
                    matches!(&o.source, DiskSource::Image(ImageDisk { nbd: Some(n), .. }) if n == nbd)
                });
                if let Some(other) = same {
                    return Err(ConfigError::Conflict(format!(
                        "disks {} and {} are the same NBD export ({})",
                        other.id,
                        d.id,
                        nbd.describe()
                    )));
                }
            }
            DiskSource::Image(image) => {
                let identity = ipc::image::check_path(&image.path)?;
                if let Some((other, other_path, _)) =
                    images.iter().find(|(_, _, id)| *id == identity)
                {
                    return Err(ConfigError::Conflict(format!(
                        "disks {} and {} are the same image ({} and {})",
                        other.id,
                        d.id,
                        other_path.display(),
                        image.path.display()
                    )));
                }
                images.push((d, &image.path, identity));
            }
            DiskSource::VhostUser(path) => {
                if let Some(other) = disks[..i]
                    .iter()
                    .find(|o| matches!(&o.source, DiskSource::VhostUser(p) if p == path))
                {
                    return Err(ConfigError::Conflict(format!(
                        "disks {} and {} both use the vhost-user socket {}",
                        other.id,
                        d.id,
                        path.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn ordinal(i: usize) -> String {
    let n = i + 1;
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(c: &DiskConfig) -> &ImageDisk {
        match &c.source {
            DiskSource::Image(i) => i,
            DiskSource::VhostUser(_) => panic!("not an image: {c:?}"),
        }
    }

    #[test]
    fn parses_every_option() {
        let c = DiskConfig::parse(
            "path=/x.img,id=root,readonly=on,serial=S1,direct=on,num_queues=2,spare=off,engine=sync",
            0,
        )
        .unwrap();
        assert_eq!(c.id, "root");
        let i = image(&c);
        assert!(!i.spare);
        assert_eq!(i.engine, IoEngine::Sync);
        assert_eq!(i.path, Path::new("/x.img"));
        assert!(i.readonly && i.direct);
        assert_eq!((i.serial.as_str(), c.num_queues), ("S1", Some(2)));
        let c = DiskConfig::parse("path=/x,ioeventfd=any", 0).unwrap();
        assert_eq!(c.ioeventfd, IoEventFdMatch::Any);
        assert_eq!(c.with_default_queues(4).queues(), 1, "any means one queue");
        let c = DiskConfig::parse("path=/x,poll_us=50,engine=io_uring,readonly=1", 0).unwrap();
        assert_eq!(
            (image(&c).poll_us, image(&c).engine),
            (50, IoEngine::IoUring)
        );
        assert!(image(&c).readonly);
        let c = DiskConfig::parse("vhost_user=/s.sock", 3).unwrap();
        assert_eq!(c.id, "blk3");
        assert_eq!(c.source, DiskSource::VhostUser("/s.sock".into()));
    }

    #[test]
    fn rates_become_buckets_of_a_tenth_of_a_second_and_back() {
        let c = DiskConfig::parse("path=/d.img,iops=2000,bw=50000000,bw_burst=1000000", 0).unwrap();
        let DiskSource::Image(i) = &c.source else {
            panic!("{c:?}")
        };
        let ops = i.rate_limit.ops.unwrap();
        assert_eq!(
            (ops.size, ops.refill_time_ms, ops.one_time_burst),
            (200, 100, 0)
        );
        let bw = i.rate_limit.bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.refill_time_ms, bw.one_time_burst),
            (5_000_000, 100, 1_000_000)
        );
        // The file form shows the rates again.
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            (json["iops"].as_u64(), json["bw"].as_u64()),
            (Some(2000), Some(50_000_000))
        );
        assert_eq!(serde_json::from_value::<DiskConfig>(json).unwrap(), c);
        // A rate whose tenth of a second is no whole number of tokens gets the shortest
        // window that is.
        let slow = LimitOptions {
            iops: Some(3),
            ..Default::default()
        }
        .rate_limit()
        .unwrap()
        .ops
        .unwrap();
        assert_eq!((slow.size, slow.refill_time_ms), (3, 1000));
        // Keys give their buckets back, and buckets their keys, at any rate.
        for rate in (1..=2000).chain([9_999, 123_456_789, 1 << 40]) {
            for refill in [None, Some(1), Some(7), Some(100), Some(1000)] {
                let keys = LimitOptions {
                    iops: Some(rate),
                    iops_refill_ms: refill,
                    ..Default::default()
                };
                let limit = keys.rate_limit().unwrap();
                let again = limit_options(&limit).rate_limit().unwrap();
                assert_eq!(again, limit, "iops={rate} refill {refill:?}");
            }
        }
        let err = LimitOptions {
            bw: Some(MAX_TOKENS),
            bw_refill_ms: Some(2000),
            ..Default::default()
        }
        .rate_limit()
        .unwrap_err();
        assert!(err.contains("bw="), "{err}");
        for (spec, says) in [
            ("path=/d.img,iops=0", "iops=0 must be"),
            ("path=/d.img,bw_burst=5", "need bw=RATE"),
            (
                "path=/d.img,iops=5,iops_refill_ms=0",
                "iops_refill_ms=0 must be",
            ),
            ("vhost_user=/s,iops=5", "applies to an image"),
        ] {
            let err = DiskConfig::parse(spec, 0).unwrap_err().to_string();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[test]
    fn qcow2_options_are_checked_together() {
        let c = DiskConfig::parse("path=/top.qcow2,format=qcow2,backing=/base.raw", 0).unwrap();
        let DiskSource::Image(i) = &c.source else {
            panic!("{c:?}")
        };
        assert_eq!(i.format, ImageFormat::Qcow2);
        assert!(!i.spare, "a qcow2 disk has no spare by default");
        assert_eq!(
            i.backing,
            Some(BackingFile {
                path: "/base.raw".into(),
                format: ImageFormat::Raw
            })
        );
        // The file form round-trips.
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<DiskConfig>(&json).unwrap(), c);
        for (spec, says) in [
            ("path=/a.img,backing=/b.raw", "backing= needs format=qcow2"),
            (
                "path=/a.qcow2,format=qcow2,backing_format=raw",
                "needs backing=PATH",
            ),
            (
                "path=/a.qcow2,format=qcow2,engine=io_uring",
                "engine=io_uring serves raw",
            ),
            ("path=/a.img,format=vmdk", "format"),
            (
                "path=/a.qcow2,format=qcow2,spare=on",
                "spare=on cannot serve a qcow2",
            ),
            ("vhost_user=/s,format=qcow2", "format= applies to an image"),
        ] {
            let err = DiskConfig::parse(spec, 0).unwrap_err().to_string();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    /// What a user leaves out is what the types default to (the shape of crosvm's test).
    #[test]
    fn defaults_match_a_parse_of_the_bare_path() {
        let c = DiskConfig::parse("path=/x", 0).unwrap();
        assert_eq!(
            c,
            DiskConfig {
                id: "blk0".into(),
                source: DiskSource::Image(ImageDisk {
                    path: "/x".into(),
                    readonly: false,
                    serial: String::new(),
                    direct: false,
                    spare: true,
                    engine: IoEngine::Auto,
                    poll_us: 0,
                    format: ImageFormat::Raw,
                    backing: None,
                    rate_limit: RateLimit::default(),
                    nbd: None,
                }),
                num_queues: None,
                ioeventfd: IoEventFdMatch::Datamatch,
            }
        );
    }

    /// The file and API form (JSON) is the same type, with the same checks.
    #[test]
    fn an_nbd_disk_names_its_server_and_round_trips() {
        for (spec, server, export) in [
            (
                "nbd=unix:/run/nbd.sock,export=disk1",
                NbdServer::Unix("/run/nbd.sock".into()),
                "disk1",
            ),
            (
                "nbd=example.org:10809",
                NbdServer::Tcp {
                    host: "example.org".into(),
                    port: 10809,
                },
                "",
            ),
            (
                "nbd=[::1]:10809,readonly=on",
                NbdServer::Tcp {
                    host: "::1".into(),
                    port: 10809,
                },
                "",
            ),
        ] {
            let c = DiskConfig::parse(spec, 0).unwrap();
            let DiskSource::Image(i) = &c.source else {
                panic!("{spec}: {c:?}")
            };
            let nbd = i.nbd.as_ref().unwrap();
            assert_eq!((&nbd.server, nbd.export.as_str()), (&server, export));
            assert_eq!(i.format, ImageFormat::Nbd);
            assert!(
                !i.spare,
                "{spec}: no spare by default (a server may take one client)"
            );
            let json = serde_json::to_value(&c).unwrap();
            assert!(
                json.get("path").is_none() && json.get("format").is_none(),
                "{json}"
            );
            let back: DiskConfig = serde_json::from_value(json).unwrap();
            assert_eq!(back, c, "{spec}");
        }
        assert_eq!(
            NbdServer::Tcp {
                host: "::1".into(),
                port: 1
            }
            .to_string(),
            "[::1]:1"
        );
    }

    #[test]
    fn json_round_trips_and_is_checked_the_same() {
        let c = DiskConfig::parse("path=/x,id=root,engine=io_uring,serial=S", 0).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"engine\":\"io_uring\""), "{json}");
        assert_eq!(serde_json::from_str::<DiskConfig>(&json).unwrap(), c);
        let err = serde_json::from_str::<DiskConfig>(r#"{"vhost_user":"/s","spare":false}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spare= applies to an image"), "{err}");
        let err = serde_json::from_str::<DiskConfig>(r#"{"path":"/x","colour":"blue"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn disks_are_checked_together() {
        let dir = std::env::temp_dir().join(format!("bulkhead-check-disks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        std::fs::File::create(&img).unwrap().set_len(4096).unwrap();
        let link = dir.join("a.link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let other = dir.join("b.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let parse = |specs: &[String]| -> Vec<DiskConfig> {
            specs
                .iter()
                .enumerate()
                .map(|(i, s)| DiskConfig::parse(s, i).unwrap())
                .collect()
        };
        let p = |p: &Path| format!("path={}", p.display());
        check_disks(&parse(&[p(&img), p(&other)])).unwrap();
        let err = check_disks(&parse(&[p(&img), p(&link)])).unwrap_err();
        assert!(err.to_string().contains("are the same image"), "{err}");
        let err = check_disks(&parse(&[p(&img), format!("{},id=blk0", p(&other))])).unwrap_err();
        assert!(
            err.to_string()
                .contains("two disks have the id \"blk0\" (the 1st and the 2nd"),
            "{err}"
        );
        let err = check_disks(&parse(&[
            "vhost_user=/s".to_string(),
            "vhost_user=/s".to_string(),
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("both use the vhost-user socket /s"),
            "{err}"
        );
        let err = check_disks(&parse(&[p(&dir)])).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn queues_default_to_the_vcpus_capped() {
        let image = |q: &str| DiskConfig::parse(&format!("path=/x{q}"), 0).unwrap();
        assert_eq!(image("").with_default_queues(1).queues(), 1);
        assert_eq!(image("").with_default_queues(2).queues(), 2);
        assert_eq!(
            image("").with_default_queues(64).queues(),
            DEFAULT_QUEUES_CAP
        );
        assert_eq!(image(",num_queues=1").with_default_queues(4).queues(), 1);
        let external = DiskConfig::parse("vhost_user=/s", 0).unwrap();
        assert_eq!(external.with_default_queues(4).queues(), 1);
    }

    /// Every error quotes the option; those about one key name it.
    #[test]
    fn rejects_bad_options_naming_the_key() {
        for (bad, says) in [
            ("id=x", "needs path=IMAGE, nbd=SERVER or vhost_user=SOCKET"),
            ("path=/x,num_queues=0", "num_queues=0"),
            ("path=/x,num_queues=65", "num_queues=65"),
            ("path=/x,readonly=maybe", ": readonly=maybe: invalid value"),
            ("path=/x,readonly=2", ": readonly=2: invalid value"),
            (
                "path=/x,spare=sometimes",
                ": spare=sometimes: invalid value",
            ),
            ("path=/x,engine=aio", ": engine=aio: unknown variant `aio`"),
            ("path=/x,num_queues=-1", ": num_queues=-1: not a number"),
            ("path=/x,num_queues=0x2", ": num_queues=0x2: not a number"),
            ("path=/x,poll_us=1e9", ": poll_us=1e9: not a number"),
            ("./vm=1.img", "\"./vm=1.img\" is not key=value"),
            ("path=/x,poll_us=10001", "poll_us=10001"),
            (
                "path=/x,ioeventfd=sometimes",
                ": ioeventfd=sometimes: unknown variant",
            ),
            ("path=/x,num_queues=2,ioeventfd=any", "ioeventfd=any"),
            ("path=/x,id=bad id", "id="),
            ("path=/x,serial=123456789012345678901", "serial="),
            ("path=/x,colour=blue", "unknown field `colour`"),
            ("path=/x,nokey", "\"nokey\" is not key=value"),
            ("/x", "\"/x\" is not key=value"),
            ("path=", "path= needs a value"),
            ("path=/x,id=", "id= needs a value"),
            ("path=/x,serial=", "serial= needs a value"),
            ("path=/x,path=/y", "duplicate field `path`"),
            ("path=/x,vhost_user=/s", "exclude each other"),
            (
                "path=/x,readonly=on,readonly=off",
                "duplicate field `readonly`",
            ),
            ("vhost_user=/s,engine=sync", "engine= applies to an image"),
            ("vhost_user=/s,spare=off", "spare= applies to an image"),
            ("vhost_user=/s,readonly=on", "readonly= applies to an image"),
            ("vhost_user=/s,serial=X", "serial= applies to an image"),
            ("vhost_user=/s,poll_us=5", "poll_us= applies to an image"),
        ] {
            let err = DiskConfig::parse(bad, 0).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
