//! A vhost-user backend connection: the setup a device needs before the guest sees it
//! (features, protocol features, queue count, config space), with a deadline on every
//! conversation.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

/// Size of the virtio-blk config space we fetch (through write_zeroes_may_unmap).
pub const BLK_CONFIG_SIZE: u32 = 60;
/// No backend reply may take longer (a hung backend must not hang its frontend thread).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{id}: vhost-user {what} failed")]
    Vhost {
        id: String,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("{id}: the backend offers {offered} queues, {wanted} were asked for")]
    Queues {
        id: String,
        offered: u64,
        wanted: u16,
    },
    #[error("{id}: the backend does not offer VIRTIO_F_VERSION_1 (features {features:#x})")]
    NotModern { id: String, features: u64 },
    #[error("{id}: queue {queue} address {gpa:#x} is not in guest RAM")]
    RingOutsideRam { id: String, queue: usize, gpa: u64 },
    #[error("{id}: the inflight region: {why}")]
    Inflight { id: String, why: String },
    #[error("{id}: cannot configure the socket")]
    Socket {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// A backend connection after setup, before any ring is up.
pub struct Backend {
    pub frontend: Frontend,
    /// A second handle on the socket, for deadlines (see [`with_deadline`]).
    pub socket: UnixStream,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub config: Vec<u8>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// Runs `f` (a conversation with a backend over `socket`) with a deadline: if it has not
/// returned after `timeout`, the socket is shut down, so whatever read is blocked returns
/// end-of-file and `f` fails instead of hanging. (A read timeout is not enough: the vhost
/// crate retries reads that time out.)
pub fn with_deadline<T>(socket: &UnixStream, timeout: Duration, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = socket.try_clone().ok().and_then(|s| {
        crate::thread::spawn(
            "vhost-deadline",
            crate::confine::VmmThread::Deadline,
            move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout)
                {
                    tracing::warn!(
                        "vhost-user backend did not answer within {timeout:?}: disconnecting it"
                    );
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            },
        )
        .ok()
    });
    let result = f();
    drop(done);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    result
}

/// Takes a backend through SET_OWNER, feature and protocol-feature discovery, the queue
/// count and GET_CONFIG.
pub fn setup(id: &str, stream: UnixStream, num_queues: u16) -> Result<Backend, FrontendError> {
    let guard = stream.try_clone().map_err(|source| FrontendError::Socket {
        id: id.to_string(),
        source,
    })?;
    with_deadline(&guard, REPLY_TIMEOUT, || {
        setup_inner(id, stream, num_queues)
    })
}

fn setup_inner(id: &str, stream: UnixStream, num_queues: u16) -> Result<Backend, FrontendError> {
    let err = |what| {
        let id = id.to_string();
        move |source| FrontendError::Vhost { id, what, source }
    };
    let socket = stream.try_clone().map_err(|source| FrontendError::Socket {
        id: id.to_string(),
        source,
    })?;
    let mut frontend = Frontend::from_stream(stream, u64::from(num_queues));
    frontend.set_owner().map_err(err("SET_OWNER"))?;
    let features = frontend.get_features().map_err(err("GET_FEATURES"))?;
    if features & crate::devices::virtio_mmio::VIRTIO_F_VERSION_1 == 0 {
        return Err(FrontendError::NotModern {
            id: id.to_string(),
            features,
        });
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        frontend
            .set_protocol_features(protocol)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let offered = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
        if offered < u64::from(num_queues) {
            return Err(FrontendError::Queues {
                id: id.to_string(),
                offered,
                wanted: num_queues,
            });
        }
    } else if num_queues > 1 {
        return Err(FrontendError::Queues {
            id: id.to_string(),
            offered: 1,
            wanted: num_queues,
        });
    }
    let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        let buf = vec![0u8; BLK_CONFIG_SIZE as usize];
        let (_, payload) = frontend
            .get_config(0, BLK_CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(err("GET_CONFIG"))?;
        payload
    } else {
        Vec::new()
    };
    Ok(Backend {
        frontend,
        socket,
        features,
        protocol,
        config,
    })
}
