//! The control API: HTTP/1.1 on a Unix socket (`bulkhead run --api-socket PATH`), JSON
//! answers, served by hyper on one confined thread (`api`) that runs a single-threaded
//! tokio runtime. The routes are in [`routes::ROUTES`] and described for clients in
//! `docs/openapi.json` (a test keeps the two equal); `bulkhead ctl` is the client.
//!
//! Clients are untrusted, even though only the socket's owner may connect: connections,
//! request heads and bodies, the time a request may take and the number of event streams
//! are bounded ([`server`]), and at the descriptor limit the listener waits instead of
//! spinning. Work that blocks (a planned restart, a pause) runs on a thread of its own,
//! so a slow request never holds up another client, and nothing the API does takes a
//! lock a vCPU waits for.

pub mod client;
pub mod routes;
pub mod server;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::events::EventLog;
use crate::supervisor::DiskHandle;

pub use client::request;
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

/// A disk as the API shows it.
#[derive(Debug)]
pub struct ApiDisk {
    pub id: String,
    /// Its configuration, as `--print-config` shows it.
    pub config: serde_json::Value,
    /// Its worker's handle; None for a disk an external vhost-user backend serves.
    pub handle: Option<Arc<DiskHandle>>,
}

/// Pause, resume and shutdown of the running VM, as the API asks for them.
pub trait VmControl: Send + Sync + std::fmt::Debug {
    /// `running` or `paused`.
    fn state(&self) -> &'static str;
    /// Stops every vCPU outside KVM_RUN; returns once they all are (or says why not).
    fn pause(&self) -> Result<(), String>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), String>;
    /// Ends the VM as an ACPI power-off does.
    fn shutdown(&self);
}

/// Everything the API reads or acts on.
#[derive(Debug)]
pub struct ApiContext {
    /// When the VM started running.
    pub started: Instant,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The effective configuration (`bulkhead run --print-config`).
    pub config: serde_json::Value,
    /// Every disk, in `--disk` order.
    pub disks: Vec<ApiDisk>,
    pub events: Arc<EventLog>,
    pub control: Arc<dyn VmControl>,
    /// The exit counters and violations, for `/metrics`.
    pub stats: crate::report::VmStats,
}

/// Serves requests on `socket` on a thread of its own (see [`server`]).
pub fn serve(socket: ApiSocket, ctx: ApiContext) -> Result<(), ApiError> {
    let ApiSocket { listener, path, .. } = socket;
    let listen_err = |source| ApiError::Listen {
        path: path.clone(),
        source,
    };
    // tokio takes the listener as it is: non-blocking, set here before any filter.
    listener.set_nonblocking(true).map_err(listen_err)?;
    let prepared = server::prepare(listener).map_err(listen_err)?;
    let ctx = Arc::new(ctx);
    crate::thread::spawn("api", crate::confine::VmmThread::Api, move || {
        server::run(prepared, ctx)
    })
    .map_err(listen_err)?;
    tracing::info!("api: listening on {}", path.display());
    Ok(())
}
