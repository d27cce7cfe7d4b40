//! Opening a disk image, the same way on both sides (the VMM for the workers it spawns, a
//! standalone worker for itself): never blocking in open(), only regular files and block
//! devices, whole sectors, and locks that QEMU honours.
//!
//! The locks are QEMU file-posix's: open-file-description (OFD) byte-range read locks on
//! its permission bytes. For each permission an image user holds it locks byte
//! [`PERM_BASE`] + bit; for each permission it does not let others have it locks byte
//! [`UNSHARED_BASE`] + bit. A newcomer first takes its own bytes, then checks that nobody
//! holds a byte that conflicts (the "unshared" byte of a permission it wants, the
//! permission byte of one it does not share): taking before checking means two newcomers
//! racing can both fail, never both succeed. QEMU, qemu-storage-daemon, qemu-img and
//! qemu-io therefore see bulkhead's disks as in use, and bulkhead sees theirs. The locks
//! belong to the open file description, so they travel with the descriptor passed to a
//! worker and end when the last process holding it closes it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Sector size of the virtio-blk protocol.
pub use crate::limits::SECTOR_SIZE;

/// QEMU's byte for "holds permission bit N" is `PERM_BASE + N`.
pub const PERM_BASE: i64 = 100;
/// QEMU's byte for "does not share permission bit N" is `UNSHARED_BASE + N`.
pub const UNSHARED_BASE: i64 = 200;

/// QEMU's block permissions (`BLK_PERM_*`), by bit number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// QEMU's name for it, as its own errors say.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }
}

/// What a disk needs of its image: what QEMU's own virtio-blk device asks for. A writer
/// holds consistent read and write and shares consistent read and unchanged writes; a
/// reader holds consistent read and shares the same, so it refuses writers too (a reader
/// whose image changes under it reads garbage) but shares with other readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Access {
    fn held(self) -> u8 {
        match self {
            Access::ReadOnly => Permission::ConsistentRead.bit(),
            Access::ReadWrite => Permission::ConsistentRead.bit() | Permission::Write.bit(),
        }
    }

    fn shared(self) -> u8 {
        Permission::ConsistentRead.bit() | Permission::WriteUnchanged.bit()
    }
}

/// Errors while opening or locking an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("disk image path is empty")]
    EmptyPath,
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is a {kind}, not a regular file or block device")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE} (a raw image \
         holds whole sectors; if it is a qcow2 image, give format=qcow2)"
    )]
    BadSize { path: PathBuf, size: u64 },
    #[error(
        "disk image {path} is in use by another process (bulkhead, QEMU or qemu-storage-daemon) \
         that {conflict}"
    )]
    Locked { path: PathBuf, conflict: String },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open, locked image.
#[derive(Debug)]
pub struct Image {
    pub file: File,
    /// Bytes, a non-zero multiple of [`SECTOR_SIZE`].
    pub size: u64,
    /// Device and inode: the same image under another name (a symlink, a hard link) has
    /// the same identity.
    pub identity: (u64, u64),
}

/// Checks, before anything opens it, that `path` names a regular file or a block device
/// (following symlinks); returns its device and inode: the same image under another name
/// (a symlink, a hard link) has the same identity.
pub fn check_path(path: &Path) -> Result<(u64, u64), ImageError> {
    if path.as_os_str().is_empty() {
        return Err(ImageError::EmptyPath);
    }
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(kind) = unusable_kind(meta.file_type()) {
        return Err(ImageError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok((meta.dev(), meta.ino()))
}

/// What a file of this type is called, if it cannot be an image.
fn unusable_kind(kind: std::fs::FileType) -> Option<&'static str> {
    Some(if kind.is_file() || kind.is_block_device() {
        return None;
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_dir() {
        "directory"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() {
        "character device"
    } else {
        "special file"
    })
}

/// Opens `path` for `access` (O_DIRECT with `direct`), checks what it is and its size,
/// and locks it. O_NONBLOCK keeps open() of a FIFO from waiting for a writer forever;
/// the type check then refuses it. A raw image must hold whole sectors; a qcow2 file's
/// length says nothing about the disk's (its worker reads the header, in its sandbox).
pub fn open(
    path: &Path,
    access: Access,
    direct: bool,
    format: crate::messages::ImageFormat,
) -> Result<Image, ImageError> {
    if path.as_os_str().is_empty() {
        return Err(ImageError::EmptyPath);
    }
    let open_err = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .custom_flags(flags)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if let Some(kind) = unusable_kind(meta.file_type()) {
        return Err(ImageError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let size = if meta.file_type().is_block_device() {
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
    } else {
        meta.len()
    };
    // The descriptor is a regular file or block device: back to blocking I/O.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(if direct {
            nix::fcntl::OFlag::O_DIRECT
        } else {
            nix::fcntl::OFlag::empty()
        }),
    )
    .map_err(|e| open_err(e.into()))?;
    if size == 0 {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    // Nothing of the image is read here: the VMM never reads a disk (only its workers
    // do), so a qcow2 image given as raw is told by its size alone.
    if format == crate::messages::ImageFormat::Raw && size % SECTOR_SIZE != 0 {
        return Err(ImageError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    lock(&file, access).map_err(|e| match e {
        LockError::Conflict(conflict) => ImageError::Locked {
            path: path.to_path_buf(),
            conflict,
        },
        LockError::Io(source) => ImageError::Lock {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Ok(Image {
        file,
        size,
        identity: (meta.dev(), meta.ino()),
    })
}

/// The first four bytes of every qcow2 image: "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How much [`read_head`] reads: one block, so an O_DIRECT descriptor reads it too.
pub const HEAD_LEN: usize = 4096;

/// The first [`HEAD_LEN`] bytes of an image, zeros past the end of a shorter file, read
/// into a block-aligned buffer (an O_DIRECT descriptor needs one).
pub fn read_head(file: &File) -> std::io::Result<Vec<u8>> {
    #[repr(C, align(4096))]
    struct Block([u8; HEAD_LEN]);
    let mut block = Box::new(Block([0; HEAD_LEN]));
    let buf = &mut block.0;
    let mut done = 0;
    while done < buf.len() {
        match std::os::unix::fs::FileExt::read_at(file, &mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf.to_vec())
}

/// Why a lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting byte; says which, as QEMU would.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Takes `access`'s lock bytes on `file`, then checks that no other open file description
/// holds a conflicting one. On a conflict the bytes taken stay taken until `file` closes
/// (callers drop it).
pub fn lock(file: &File, access: Access) -> Result<(), LockError> {
    for p in Permission::ALL {
        if access.held() & p.bit() != 0 {
            set_read_lock(file, PERM_BASE + p as i64)?;
        }
        if access.shared() & p.bit() == 0 {
            set_read_lock(file, UNSHARED_BASE + p as i64)?;
        }
    }
    match conflict(file, access)? {
        Some(c) => Err(LockError::Conflict(c)),
        None => Ok(()),
    }
}

/// What another open file description holds that `access` conflicts with, if anything.
/// Locks `file`'s own description holds never conflict.
pub fn conflict(file: &File, access: Access) -> Result<Option<String>, LockError> {
    for p in Permission::ALL {
        if access.held() & p.bit() != 0 && is_held_elsewhere(file, UNSHARED_BASE + p as i64)? {
            return Ok(Some(format!("does not share \"{}\"", p.name())));
        }
        if access.shared() & p.bit() == 0 && is_held_elsewhere(file, PERM_BASE + p as i64)? {
            return Ok(Some(format!("holds \"{}\"", p.name())));
        }
    }
    Ok(None)
}

fn byte(offset: i64, kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset,
        l_len: 1,
        // OFD locks require 0 here.
        l_pid: 0,
    }
}

fn set_read_lock(file: &File, offset: i64) -> Result<(), LockError> {
    let lock = byte(offset, libc::F_RDLCK);
    // SAFETY: fcntl on a descriptor `file` owns, with a pointer to a flock that lives for
    // the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Someone holds a write lock on the byte: nothing QEMU does, but a conflict all
        // the same.
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Conflict(format!(
            "holds an exclusive lock on byte {offset}"
        ))),
        _ => Err(LockError::Io(err)),
    }
}

fn is_held_elsewhere(file: &File, offset: i64) -> Result<bool, LockError> {
    let mut probe = byte(offset, libc::F_WRLCK);
    // SAFETY: as in `set_read_lock`; the kernel writes the answer into `probe`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) } != 0 {
        return Err(LockError::Io(std::io::Error::last_os_error()));
    }
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ImageFormat;

    fn tmp(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-image-{}", std::process::id()));
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
            open(&p, Access::ReadWrite, false, ImageFormat::Raw),
            Err(ImageError::BadSize { size: 1000, .. })
        ));
        let p = tmp("empty.img", 0);
        assert!(matches!(
            open(&p, Access::ReadWrite, false, ImageFormat::Raw),
            Err(ImageError::Empty { .. })
        ));
    }

    #[test]
    fn a_raw_image_needs_whole_sectors_and_a_qcow2_file_does_not() {
        let p = tmp("given-as-raw.qcow2", 196_616);
        let err = open(&p, Access::ReadOnly, false, ImageFormat::Raw).unwrap_err();
        assert!(
            matches!(err, ImageError::BadSize { size: 196_616, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("give format=qcow2"), "{err}");
        let image = open(&p, Access::ReadOnly, false, ImageFormat::Qcow2).unwrap();
        assert_eq!(image.size, 196_616);
    }

    #[test]
    fn one_writer_and_no_reader_beside_it_readers_share() {
        let p = tmp("locked.img", 1 << 20);
        let w = open(&p, Access::ReadWrite, false, ImageFormat::Raw).unwrap();
        assert_eq!(w.size, 1 << 20);
        for access in [Access::ReadWrite, Access::ReadOnly] {
            let err = open(&p, access, false, ImageFormat::Raw).unwrap_err();
            assert!(matches!(err, ImageError::Locked { .. }), "{err}");
        }
        drop(w);
        let r1 = open(&p, Access::ReadOnly, false, ImageFormat::Raw).unwrap();
        let r2 = open(&p, Access::ReadOnly, false, ImageFormat::Raw).unwrap();
        let err = open(&p, Access::ReadWrite, false, ImageFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("\"write\""), "{err}");
        drop((r1, r2));
        open(&p, Access::ReadWrite, false, ImageFormat::Raw).unwrap();
    }

    #[test]
    fn a_refused_newcomer_leaves_no_lock_behind() {
        let p = tmp("newcomer.img", 1 << 20);
        let r = open(&p, Access::ReadOnly, false, ImageFormat::Raw).unwrap();
        assert!(open(&p, Access::ReadWrite, false, ImageFormat::Raw).is_err());
        drop(r);
        // The refused writer's bytes went with its descriptor.
        open(&p, Access::ReadWrite, false, ImageFormat::Raw).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let p = std::env::temp_dir().join(format!("bulkhead-image-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = open(&p, Access::ReadOnly, false, ImageFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        let err = check_path(&p).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        std::fs::remove_file(&p).unwrap();
        let err = open(Path::new("/tmp"), Access::ReadOnly, false, ImageFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn errors_name_the_path() {
        let err = open(
            Path::new("/nonexistent/x.img"),
            Access::ReadOnly,
            false,
            ImageFormat::Raw,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
        assert!(matches!(
            open(Path::new(""), Access::ReadOnly, false, ImageFormat::Raw),
            Err(ImageError::EmptyPath)
        ));
    }

    #[test]
    fn identity_sees_through_links() {
        let p = tmp("linked.img", 4096);
        let link = p.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let hard = p.with_extension("hard");
        let _ = std::fs::remove_file(&hard);
        std::fs::hard_link(&p, &hard).unwrap();
        let id = check_path(&p).unwrap();
        assert_eq!(check_path(&link).unwrap(), id);
        assert_eq!(check_path(&hard).unwrap(), id);
        assert_eq!(
            open(&link, Access::ReadOnly, false, ImageFormat::Raw)
                .unwrap()
                .identity,
            id
        );
    }
}
