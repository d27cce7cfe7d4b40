//! The API's socket: bound before anything of the VM exists, private to its owner, and
//! never put where something else is.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on the API socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API socket {0} exists and something answers on it")]
    InUse(PathBuf),
    #[error("--api-socket {0} exists and is not a socket (bulkhead never removes it)")]
    NotASocket(PathBuf),
}

/// The API's socket, bound before anything of the VM exists: a path in use, or one that
/// cannot become a socket, refuses the run before a worker or a vCPU starts.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file bound: what may be removed at the end.
    identity: (u64, u64),
}

impl ApiSocket {
    /// The listener and its path, for the server.
    pub(crate) fn into_parts(self) -> (UnixListener, PathBuf) {
        (self.listener, self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the socket file, to remove it at the end only if it is still
    /// this one.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }
}

/// Binds `path`, mode 0600 (only its owner may connect): a stale socket (nobody answers)
/// is replaced; a live one, or a path that exists and is not a socket (a file, a
/// directory, a symlink), is refused and left alone.
pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let listen_err = |source| ApiError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            // Stale only when nobody listens: a socket bulkhead may not connect to (another
            // user's, EACCES) is not known to be stale, and is left alone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(listen_err)?;
            }
            Err(e) => return Err(listen_err(e)),
        },
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    // The socket file is created 0600 (bind honours the umask); the process has one
    // thread here, so no other file is created meanwhile.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(listen_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
    Ok(ApiSocket {
        listener,
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    })
}
