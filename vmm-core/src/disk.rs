//! `--disk` options, and opening an image for a worker: the VMM opens and locks the image
//! and hands the worker the descriptor; the worker never opens a path.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// One `--disk` as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub id: String,
    pub backend: DiskBackend,
    pub readonly: bool,
    pub serial: String,
    pub direct: bool,
    /// Queues; see [`DiskConfig::with_default_queues`] for the default.
    pub num_queues: u16,
    /// Whether `num_queues=` was given.
    pub queues_given: bool,
    /// Keep a started, sandboxed spare worker, so a restart skips exec and sandbox setup.
    pub spare: bool,
    /// The worker's I/O engine.
    pub engine: ipc::messages::IoEngine,
    /// Microseconds the worker busy-polls its rings before sleeping.
    pub poll_us: u32,
    /// How a QueueNotify write reaches the kick eventfd.
    pub ioeventfd: IoEventFdMatch,
}

/// How KVM matches a QueueNotify write to a queue's kick eventfd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEventFdMatch {
    /// One ioeventfd per queue, matching the written queue index.
    #[default]
    Datamatch,
    /// A zero-length ioeventfd that any write signals. On VMX hosts KVM takes it without
    /// decoding the guest's instruction (its fast MMIO path); valid for one queue only,
    /// since the written value is not looked at.
    Any,
}

/// Who serves the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBackend {
    /// An image served by a `bulkhead-worker` this VMM spawns.
    Image(PathBuf),
    /// An already running vhost-user-blk backend (e.g. qemu-storage-daemon) at this socket.
    VhostUser(PathBuf),
}

/// Errors in `--disk` options or while opening an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--disk {spec:?}: {reason}")]
    Option { spec: String, reason: String },
    #[error(transparent)]
    Image(#[from] ipc::image::ImageError),
    #[error("{0}")]
    Conflict(String),
}

const MAX_QUEUES: u16 = 64;

/// `--disk` keys that only mean something for an image bulkhead's worker serves.
const IMAGE_ONLY_KEYS: [&str; 6] = ["readonly", "serial", "direct", "spare", "engine", "poll_us"];

impl DiskConfig {
    /// Parses `path=IMG[,id=NAME][,readonly=on][,serial=ID][,direct=on][,num_queues=N][,spare=off]
    /// [,engine=auto|sync|io_uring][,poll_us=N][,ioeventfd=datamatch|any]` or
    /// `vhost_user=SOCKET[,id=NAME][,num_queues=N][,ioeventfd=..]`; `index` gives the
    /// default id `blkN`. `ioeventfd=any` means one queue.
    pub fn parse(spec: &str, index: usize) -> Result<Self, DiskError> {
        let bad = |reason: String| DiskError::Option {
            spec: spec.to_string(),
            reason,
        };
        let on_off = |key: &str, v: &str| match v {
            "on" | "true" | "1" => Ok(true),
            "off" | "false" | "0" => Ok(false),
            _ => Err(bad(format!("{key}={v} must be on or off"))),
        };
        let mut cfg = DiskConfig {
            id: format!("blk{index}"),
            backend: DiskBackend::Image(PathBuf::new()),
            readonly: false,
            serial: String::new(),
            direct: false,
            num_queues: 1,
            queues_given: false,
            spare: true,
            engine: ipc::messages::IoEngine::Auto,
            poll_us: 0,
            ioeventfd: IoEventFdMatch::Datamatch,
        };
        let mut backend = None;
        let mut seen: Vec<&str> = Vec::new();
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            if value.is_empty() {
                return Err(bad(format!("{key}= needs a value")));
            }
            if seen.contains(&key) {
                return Err(bad(format!("{key}= is given twice")));
            }
            if ["path", "vhost_user"].contains(&key) && backend.is_some() {
                return Err(bad("path= and vhost_user= exclude each other".into()));
            }
            seen.push(key);
            match key {
                "path" => backend = Some(DiskBackend::Image(PathBuf::from(value))),
                "vhost_user" => backend = Some(DiskBackend::VhostUser(PathBuf::from(value))),
                "id" => {
                    let ok = !value.is_empty()
                        && value.len() <= 32
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if !ok {
                        return Err(bad(format!("id={value:?} must be 1-32 of [A-Za-z0-9_-]")));
                    }
                    cfg.id = value.to_string();
                }
                "readonly" => cfg.readonly = on_off(key, value)?,
                "direct" => cfg.direct = on_off(key, value)?,
                "spare" => cfg.spare = on_off(key, value)?,
                "poll_us" => {
                    let max = ipc::messages::MAX_POLL_US;
                    cfg.poll_us = value
                        .parse()
                        .ok()
                        .filter(|n| *n <= max)
                        .ok_or_else(|| bad(format!("poll_us={value} must be 0..={max}")))?;
                }
                "ioeventfd" => {
                    cfg.ioeventfd = match value {
                        "datamatch" => IoEventFdMatch::Datamatch,
                        "any" => IoEventFdMatch::Any,
                        _ => {
                            return Err(bad(format!("ioeventfd={value} must be datamatch or any")))
                        }
                    }
                }
                "engine" => {
                    cfg.engine = ipc::messages::IoEngine::parse(value).ok_or_else(|| {
                        bad(format!("engine={value} must be auto, sync or io_uring"))
                    })?;
                }
                "serial" => {
                    if value.len() > 20 || !value.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad(format!(
                            "serial={value:?} must be at most 20 printable bytes"
                        )));
                    }
                    cfg.serial = value.to_string();
                }
                "num_queues" => {
                    cfg.num_queues = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| {
                            bad(format!("num_queues={value} must be 1..={MAX_QUEUES}"))
                        })?;
                    cfg.queues_given = true;
                }
                other => return Err(bad(format!("unknown option {other:?}"))),
            }
        }
        cfg.backend = backend.ok_or_else(|| bad("needs path=IMAGE or vhost_user=SOCKET".into()))?;
        if matches!(cfg.backend, DiskBackend::VhostUser(_)) {
            // The external backend owns its image and how it serves it: these would be
            // ignored, and a user would believe them applied.
            if let Some(key) = seen.iter().find(|k| IMAGE_ONLY_KEYS.contains(k)) {
                return Err(bad(format!(
                    "{key}= applies to an image bulkhead serves (path=), not to a vhost-user \
                     backend, which has its own"
                )));
            }
        }
        if cfg.ioeventfd == IoEventFdMatch::Any {
            if cfg.num_queues > 1 {
                return Err(bad(format!(
                    "ioeventfd=any serves one queue, not num_queues={}",
                    cfg.num_queues
                )));
            }
            // A zero-length ioeventfd cannot tell queues apart: one queue, not a default.
            cfg.queues_given = true;
        }
        Ok(cfg)
    }
}

/// Checks a VM's disks together, before anything is opened or started: ids are unique,
/// and no image or vhost-user socket is given twice (an image by device and inode, so a
/// symlink or hard link to one counts), each image is a regular file or a block device.
pub fn check_disks(disks: &[DiskConfig]) -> Result<(), DiskError> {
    let mut images: Vec<(&DiskConfig, (u64, u64))> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if let Some(first) = disks[..i].iter().find(|o| o.id == d.id) {
            return Err(DiskError::Conflict(format!(
                "two disks have the id {:?} (the {} and the {} --disk; the default id of the \
                 N-th --disk, counting from 0, is blkN)",
                d.id,
                ordinal(
                    disks
                        .iter()
                        .position(|o| std::ptr::eq(o, first))
                        .unwrap_or(0)
                ),
                ordinal(i),
            )));
        }
        match &d.backend {
            DiskBackend::Image(path) => {
                let identity = ipc::image::check_path(path)?;
                if let Some((other, _)) = images.iter().find(|(_, id)| *id == identity) {
                    let DiskBackend::Image(other_path) = &other.backend else {
                        unreachable!("only images are collected");
                    };
                    return Err(DiskError::Conflict(format!(
                        "disks {} and {} are the same image ({} and {})",
                        other.id,
                        d.id,
                        other_path.display(),
                        path.display()
                    )));
                }
                images.push((d, identity));
            }
            DiskBackend::VhostUser(path) => {
                if let Some(other) = disks[..i]
                    .iter()
                    .find(|o| o.backend == DiskBackend::VhostUser(path.clone()))
                {
                    return Err(DiskError::Conflict(format!(
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

/// Queues a worker-served disk gets by default: one per vCPU, at most this many.
pub const DEFAULT_QUEUES_CAP: u16 = 8;

impl DiskConfig {
    /// The queue count to use with `vcpus` vCPUs: as given, else one queue per vCPU (at
    /// most [`DEFAULT_QUEUES_CAP`]) for a disk bulkhead's worker serves; an external
    /// vhost-user backend keeps 1 unless told (its queue count is its own configuration).
    pub fn with_default_queues(mut self, vcpus: u32) -> Self {
        if !self.queues_given && matches!(self.backend, DiskBackend::Image(_)) {
            self.num_queues = u16::try_from(vcpus)
                .unwrap_or(u16::MAX)
                .clamp(1, DEFAULT_QUEUES_CAP);
        }
        self
    }
}

/// An image opened and locked for a worker (see [`ipc::image`]: the same checks and
/// QEMU-compatible locks a standalone worker uses).
pub type OpenedImage = ipc::image::Image;

/// Opens `path` read-write (or read-only), O_DIRECT on request, and locks it as QEMU
/// would: a writer refuses every other user, readers share with readers.
pub fn open_image(path: &Path, readonly: bool, direct: bool) -> Result<OpenedImage, DiskError> {
    Ok(ipc::image::open(path, access(readonly), direct)?)
}

fn access(readonly: bool) -> ipc::image::Access {
    if readonly {
        ipc::image::Access::ReadOnly
    } else {
        ipc::image::Access::ReadWrite
    }
}

/// Waits up to `timeout` until no process holds any of the image locks on `path` (what a
/// writer would need); true when none does. A worker's io_uring keeps the image open
/// (registered) until the kernel tears the ring down, which it does asynchronously after
/// the worker exited, so the locks (they belong to the open file) can outlive every
/// process that used the image by a moment.
pub fn wait_released(path: &Path, timeout: std::time::Duration) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        // Gone or unreadable: nothing of ours to wait for.
        return true;
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // This descriptor holds no lock, so every lock it sees is someone else's.
        if let Ok(None) = ipc::image::conflict(&file, ipc::image::Access::ReadWrite) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c = DiskConfig::parse(
            "path=/x.img,id=root,readonly=on,serial=S1,direct=on,num_queues=2,spare=off,engine=sync",
            0,
        )
        .unwrap();
        assert_eq!(c.id, "root");
        assert!(!c.spare);
        assert_eq!(c.engine, ipc::messages::IoEngine::Sync);
        assert_eq!(c.backend, DiskBackend::Image("/x.img".into()));
        assert!(c.readonly && c.direct);
        assert_eq!((c.serial.as_str(), c.num_queues), ("S1", 2));
        let c = DiskConfig::parse("path=/x,ioeventfd=any", 0).unwrap();
        assert_eq!(c.ioeventfd, IoEventFdMatch::Any);
        assert_eq!(
            c.with_default_queues(4).num_queues,
            1,
            "any means one queue"
        );
        let c = DiskConfig::parse("path=/x,poll_us=50", 0).unwrap();
        assert_eq!(c.poll_us, 50);
        let c = DiskConfig::parse("vhost_user=/s.sock", 3).unwrap();
        assert_eq!(c.id, "blk3");
        assert!(c.spare, "spares are on by default");
        assert_eq!(c.backend, DiskBackend::VhostUser("/s.sock".into()));
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
        assert_eq!(image("").with_default_queues(1).num_queues, 1);
        assert_eq!(image("").with_default_queues(2).num_queues, 2);
        assert_eq!(
            image("").with_default_queues(64).num_queues,
            DEFAULT_QUEUES_CAP
        );
        assert_eq!(image(",num_queues=1").with_default_queues(4).num_queues, 1);
        let external = DiskConfig::parse("vhost_user=/s", 0).unwrap();
        assert_eq!(external.with_default_queues(4).num_queues, 1);
    }

    #[test]
    fn rejects_bad_options_with_the_spec() {
        for bad in [
            "id=x",
            "path=/x,num_queues=0",
            "path=/x,num_queues=65",
            "path=/x,readonly=maybe",
            "path=/x,spare=sometimes",
            "path=/x,engine=aio",
            "path=/x,poll_us=10001",
            "path=/x,ioeventfd=sometimes",
            "path=/x,num_queues=2,ioeventfd=any",
            "path=/x,id=bad id",
            "path=/x,serial=123456789012345678901",
            "path=/x,colour=blue",
            "path=/x,nokey",
            "path=",
            "path=/x,id=",
            "path=/x,serial=",
            "path=/x,path=/y",
            "path=/x,vhost_user=/s",
            "path=/x,readonly=on,readonly=off",
            "vhost_user=/s,engine=sync",
            "vhost_user=/s,spare=off",
            "vhost_user=/s,readonly=on",
            "vhost_user=/s,serial=X",
        ] {
            let err = DiskConfig::parse(bad, 0).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
