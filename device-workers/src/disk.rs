//! Opening a disk image: the only path the worker (in standalone mode) ever opens, before
//! it is sandboxed. In spawned mode the VMM opens the image and passes the fd.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Errors while opening an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
    #[error("disk image {path} is locked by another process (another writer is using it)")]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open, locked image.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    pub size: u64,
    pub readonly: bool,
    pub direct: bool,
}

/// Opens `path` (O_DIRECT with `direct`), takes an exclusive lock unless `readonly` (a
/// shared one otherwise, so a writer elsewhere is refused too), and checks its size.
pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Disk, DiskError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!readonly);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    opts.custom_flags(flags);
    let file = opts.open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::FileTypeExt;
    let size = if meta.file_type().is_block_device() {
        use std::io::Seek;
        (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(DiskError::NotAFile {
            path: path.to_path_buf(),
        });
    };
    if size == 0 {
        return Err(DiskError::Empty {
            path: path.to_path_buf(),
        });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(DiskError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on an fd we own; integer arguments only.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            DiskError::Locked {
                path: path.to_path_buf(),
            }
        } else {
            DiskError::Lock {
                path: path.to_path_buf(),
                source: err,
            }
        });
    }
    Ok(Disk {
        file,
        size,
        readonly,
        direct,
    })
}

/// A disk the VMM opened (and locked) and passed as a descriptor: only its size is
/// checked here.
pub fn from_file(file: File, readonly: bool, direct: bool) -> Result<Disk, DiskError> {
    let path = PathBuf::from(format!("<inherited fd {}>", file.as_raw_fd()));
    let size = {
        use std::io::Seek;
        (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?
    };
    if size == 0 {
        return Err(DiskError::Empty { path });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(DiskError::BadSize { path, size });
    }
    Ok(Disk {
        file,
        size,
        readonly,
        direct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn size_must_be_whole_sectors() {
        let p = tmp("odd.img", 1000);
        assert!(matches!(
            open(&p, false, false),
            Err(DiskError::BadSize { size: 1000, .. })
        ));
        let p = tmp("empty.img", 0);
        assert!(matches!(
            open(&p, false, false),
            Err(DiskError::Empty { .. })
        ));
    }

    #[test]
    fn a_second_writer_is_refused_and_readers_share() {
        let p = tmp("locked.img", 1 << 20);
        let first = open(&p, false, false).unwrap();
        assert_eq!(first.size, 1 << 20);
        assert!(matches!(
            open(&p, false, false),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            open(&p, true, false),
            Err(DiskError::Locked { .. })
        ));
        drop(first);
        let r1 = open(&p, true, false).unwrap();
        let _r2 = open(&p, true, false).unwrap();
        assert!(matches!(
            open(&p, false, false),
            Err(DiskError::Locked { .. })
        ));
        drop(r1);
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = open(Path::new("/nonexistent/x.img"), false, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
    }
}
