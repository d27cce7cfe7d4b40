//! The VMM's side of a disk an NBD server serves: it resolves the server's address and
//! negotiates the export ([`ipc::nbd::handshake`]) when the VM starts, and the first
//! worker gets that connection. Each later worker's connection is made by the spawner
//! (crate::spawner), which was told the disks' servers when it started: a confined VMM
//! thread can neither open a socket nor connect, and the spawner connects to those
//! servers and nowhere else. A successor's connection must find the export the first one
//! found (the same size and flags), or the successor is not started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipc::nbd::{Export, NbdError};

use crate::disk::config::{NbdServer, NbdSource};

/// How long a connection and the negotiation may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A server's address, resolved.
#[derive(Debug, Clone)]
pub enum Address {
    Unix(std::path::PathBuf),
    Tcp(Vec<SocketAddr>),
}

/// A disk's NBD export, as found when the VM started.
#[derive(Debug)]
pub struct NbdDisk {
    pub source: NbdSource,
    pub address: Address,
    pub export: Export,
}

/// Why a server's export cannot serve the disk.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{server}: cannot resolve the host name")]
    Resolve {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server}: the host name resolves to no address")]
    NoAddress { server: String },
    #[error("{server}: cannot connect")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server}")]
    Negotiate {
        server: String,
        #[source]
        source: NbdError,
    },
    #[error("{server}: the export is read-only; give readonly=on to serve it as a read-only disk")]
    ReadOnly { server: String },
    #[error(
        "{server}: readonly=on needs an export the server itself serves read-only (qemu-nbd \
         --read-only, nbdkit --readonly): the worker's connection could write to this one"
    )]
    WritableExport { server: String },
    #[error(
        "{server}: the export changed since the VM started (now {now_size} bytes, flags \
         {now_flags:#x}; it was {size} bytes, flags {flags:#x}): a worker is not started on it"
    )]
    Changed {
        server: String,
        size: u64,
        flags: u16,
        now_size: u64,
        now_flags: u16,
    },
}

/// The server's address, resolved now.
pub fn resolve(source: &NbdSource) -> Result<Address, ConnectError> {
    let server = source.describe();
    Ok(match &source.server {
        NbdServer::Unix(path) => Address::Unix(path.clone()),
        NbdServer::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|source| ConnectError::Resolve {
                    server: server.clone(),
                    source,
                })?
                .collect();
            if addrs.is_empty() {
                return Err(ConnectError::NoAddress { server });
            }
            Address::Tcp(addrs)
        }
    })
}

/// A new connection to `address`, negotiated, whose export must be `expected` (the one
/// the VM started with). The spawner makes successors' connections with this.
pub fn connect_to(
    source: &NbdSource,
    address: &Address,
    expected: &Export,
) -> Result<OwnedFd, ConnectError> {
    let server = source.describe();
    let (socket, now) = negotiate(address, &source.export, &server)?;
    if now != *expected {
        return Err(ConnectError::Changed {
            server,
            size: expected.size,
            flags: expected.flags,
            now_size: now.size,
            now_flags: now.flags,
        });
    }
    Ok(socket)
}

/// Resolves the server, connects and negotiates: the disk's export, checked for a disk
/// `readonly` or not. Called once, when the VM starts.
pub fn open(source: &NbdSource, readonly: bool) -> Result<(NbdDisk, OwnedFd), ConnectError> {
    let server = source.describe();
    let address = resolve(source)?;
    let (socket, export) = negotiate(&address, &source.export, &server)?;
    if export.read_only() && !readonly {
        return Err(ConnectError::ReadOnly { server });
    }
    // The worker's requests go straight to the server: only the server can refuse a
    // write a compromised worker sends.
    if readonly && !export.read_only() {
        return Err(ConnectError::WritableExport { server });
    }
    Ok((
        NbdDisk {
            source: source.clone(),
            address,
            export,
        },
        socket,
    ))
}

impl NbdDisk {
    /// A new connection for a worker, to the export the VM started with (made here when
    /// no spawner runs; see [`crate::spawner`]).
    pub fn connect(&self) -> Result<OwnedFd, ConnectError> {
        connect_to(&self.source, &self.address, &self.export)
    }
}

/// Most addresses of a host name tried, each with [`CONNECT_TIMEOUT`].
const MAX_ADDRESSES: usize = 4;

/// A stream whose every read and write must end by one deadline: a server that drips its
/// negotiation cannot hold a supervisor longer than [`CONNECT_TIMEOUT`].
struct Bounded<S> {
    stream: S,
    deadline: std::time::Instant,
}

trait Timeouts {
    /// Read and write timeouts of `left` (None: none).
    fn set_timeouts(&self, left: Option<Duration>) -> std::io::Result<()>;
}

impl Timeouts for UnixStream {
    fn set_timeouts(&self, left: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(left)?;
        self.set_write_timeout(left)
    }
}

impl Timeouts for TcpStream {
    fn set_timeouts(&self, left: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(left)?;
        self.set_write_timeout(left)
    }
}

impl<S: Timeouts> Bounded<S> {
    /// Sets the socket's timeouts to the time left; an error once it is up.
    fn left(&self) -> std::io::Result<()> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the negotiation took longer than {CONNECT_TIMEOUT:?}"),
            ));
        }
        self.stream.set_timeouts(Some(left))
    }
}

impl<S: Timeouts + Read> Read for Bounded<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.left()?;
        self.stream.read(buf)
    }
}

impl<S: Timeouts + Write> Write for Bounded<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.left()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Connects to `address` and negotiates `export` within [`CONNECT_TIMEOUT`] (a connect
/// to a Unix socket whose listener stopped accepting is the exception: it waits for room
/// in the backlog); the socket is returned blocking, without timeouts (the worker's
/// supervisor watches for a server that stops answering).
fn negotiate(
    address: &Address,
    export: &str,
    server: &str,
) -> Result<(OwnedFd, Export), ConnectError> {
    let connect_err = |source| ConnectError::Connect {
        server: server.to_string(),
        source,
    };
    match address {
        Address::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(connect_err)?;
            negotiate_on(stream, export, server)
        }
        Address::Tcp(addrs) => {
            let mut last = None;
            for addr in addrs.iter().take(MAX_ADDRESSES) {
                let stream = match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
                // Requests are small and answered one at a time: no Nagle delay.
                stream.set_nodelay(true).map_err(connect_err)?;
                return negotiate_on(stream, export, server);
            }
            Err(connect_err(last.unwrap_or_else(|| {
                std::io::Error::from(std::io::ErrorKind::AddrNotAvailable)
            })))
        }
    }
}

/// Negotiates `export` on a connected `stream` within [`CONNECT_TIMEOUT`], then lifts the
/// timeouts (the worker reads and writes it blocking).
fn negotiate_on<S>(stream: S, export: &str, server: &str) -> Result<(OwnedFd, Export), ConnectError>
where
    S: Timeouts + Read + Write + Into<OwnedFd>,
{
    let mut bounded = Bounded {
        stream,
        deadline: std::time::Instant::now() + CONNECT_TIMEOUT,
    };
    let export =
        ipc::nbd::handshake(&mut bounded, export).map_err(|source| ConnectError::Negotiate {
            server: server.to_string(),
            source,
        })?;
    let stream = bounded.stream;
    stream
        .set_timeouts(None)
        .map_err(|source| ConnectError::Connect {
            server: server.to_string(),
            source,
        })?;
    Ok((stream.into(), export))
}
