//! Opening a disk image: the only path the worker (in standalone mode) ever opens, before
//! it is sandboxed. In spawned mode the VMM opens the image and passes the fd.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = ipc::image::SECTOR_SIZE;

/// Errors while opening an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] ipc::image::ImageError),
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
}

/// An open, locked image.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    pub size: u64,
    pub readonly: bool,
    pub direct: bool,
}

/// Opens `path` (O_DIRECT with `direct`) and locks it as QEMU would (see
/// [`ipc::image`]): a writer refuses every other user, readers share with readers.
pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Disk, DiskError> {
    let access = if readonly {
        ipc::image::Access::ReadOnly
    } else {
        ipc::image::Access::ReadWrite
    };
    let image = ipc::image::open(path, access, direct)?;
    Ok(Disk {
        file: image.file,
        size: image.size,
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
            .map_err(|source| DiskError::Size {
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
    fn an_inherited_descriptor_must_hold_whole_sectors() {
        let p = tmp("odd.img", 1000);
        assert!(matches!(
            from_file(File::open(&p).unwrap(), true, false),
            Err(DiskError::BadSize { size: 1000, .. })
        ));
        let p = tmp("empty.img", 0);
        assert!(matches!(
            from_file(File::open(&p).unwrap(), true, false),
            Err(DiskError::Empty { .. })
        ));
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = open(Path::new("/nonexistent/x.img"), false, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
    }
}
