//! The standalone worker's listening socket for one vhost-user frontend.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors while taking the socket path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {path} is in use: something is listening there")]
    InUse { path: PathBuf },
    #[error("socket path {path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot accept a frontend on {path}")]
    Accept {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `path`. A socket file that nobody listens on (a dead worker's) is removed
/// and reused, so a restarted worker can take over its predecessor's path; a live one is
/// refused.
pub fn listen(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Waits for the one frontend this worker serves.
pub fn accept_one(listener: &UnixListener, path: &Path) -> Result<UnixStream, SocketError> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(SocketError::Accept {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_reused_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("bulkhead-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vhu.sock");
        let _ = std::fs::remove_file(&path);
        let live = listen(&path).unwrap();
        assert!(matches!(listen(&path), Err(SocketError::InUse { .. })));
        drop(live); // the file stays behind, nobody listens: stale
        assert!(path.exists());
        let _again = listen(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(listen(&file), Err(SocketError::NotASocket { .. })));
    }
}
