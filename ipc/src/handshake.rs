//! The version handshake, the first exchange on every control channel:
//! the VMM sends [`VmmMessage::Hello`], the worker answers [`WorkerMessage::Hello`] with
//! its own version and pid. The worker always answers (even on a mismatch), so both
//! sides can report the mismatch with both versions in the message.

use std::time::Duration;

use crate::channel::{Channel, ChannelError};
use crate::messages::{VmmMessage, WorkerMessage, PROTOCOL_VERSION};

/// How long the VMM waits for the worker's hello: the VMM must never hang on a worker.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The channel failed.
    #[error("control channel failed during the handshake")]
    Channel(#[source] ChannelError),
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch: {side} speaks {ours}, peer speaks {theirs}")]
    VersionMismatch {
        /// Which side detected it ("VMM" or "worker").
        side: &'static str,
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The worker reported an error instead of a hello.
    #[error("worker reported an error during the handshake: {message}")]
    WorkerError {
        /// The worker's (validated) message.
        message: String,
    },
    /// The peer sent something other than a hello.
    #[error("expected Hello during the handshake, received {received}")]
    UnexpectedMessage {
        /// The variant received.
        received: &'static str,
    },
}

/// What the VMM learns from the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerHello {
    /// The worker's pid as it reported it (informational only).
    pub pid: u32,
}

fn worker_variant(m: &WorkerMessage) -> &'static str {
    match m {
        WorkerMessage::Hello { .. } => "Hello",
        WorkerMessage::Ready { .. } => "Ready",
        WorkerMessage::Stats(_) => "Stats",
        WorkerMessage::Error { .. } => "Error",
    }
}

fn vmm_variant(m: &VmmMessage) -> &'static str {
    match m {
        VmmMessage::Hello { .. } => "Hello",
        VmmMessage::Configure(_) => "Configure",
        VmmMessage::Shutdown => "Shutdown",
        VmmMessage::SetRateLimit(_) => "SetRateLimit",
    }
}

/// VMM side, with [`HANDSHAKE_TIMEOUT`].
pub fn handshake_vmm_side(channel: &Channel) -> Result<WorkerHello, HandshakeError> {
    handshake_vmm_side_timeout(channel, HANDSHAKE_TIMEOUT)
}

/// VMM side: sends our hello, waits up to `timeout` for the worker's, checks the version.
pub fn handshake_vmm_side_timeout(
    channel: &Channel,
    timeout: Duration,
) -> Result<WorkerHello, HandshakeError> {
    channel
        .send(
            &VmmMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )
        .map_err(HandshakeError::Channel)?;
    // Fds sent with the hello are unexpected; they are dropped (closed) here.
    let (reply, _fds) = channel
        .recv_timeout::<WorkerMessage>(timeout)
        .map_err(HandshakeError::Channel)?;
    match reply {
        WorkerMessage::Hello { version, pid } if version == PROTOCOL_VERSION => {
            Ok(WorkerHello { pid })
        }
        WorkerMessage::Hello { version, .. } => Err(HandshakeError::VersionMismatch {
            side: "VMM",
            ours: PROTOCOL_VERSION,
            theirs: version,
        }),
        WorkerMessage::Error { message } => Err(HandshakeError::WorkerError { message }),
        other => Err(HandshakeError::UnexpectedMessage {
            received: worker_variant(&other),
        }),
    }
}

/// Worker side: waits for the VMM's hello and answers with our version and pid. On a
/// version mismatch the answer is still sent (so the VMM can report it), then the
/// mismatch is returned.
pub fn handshake_worker_side(channel: &Channel) -> Result<(), HandshakeError> {
    let (hello, _fds) = channel
        .recv::<VmmMessage>()
        .map_err(HandshakeError::Channel)?;
    let version = match hello {
        VmmMessage::Hello { version } => version,
        other => {
            return Err(HandshakeError::UnexpectedMessage {
                received: vmm_variant(&other),
            })
        }
    };
    channel
        .send(
            &WorkerMessage::Hello {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
            },
            &[],
        )
        .map_err(HandshakeError::Channel)?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            side: "worker",
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn handshake_succeeds() {
        let (vmm, worker) = Channel::pair().unwrap();
        let t = std::thread::spawn(move || handshake_worker_side(&worker));
        let hello = handshake_vmm_side(&vmm).unwrap();
        assert_eq!(hello.pid, std::process::id());
        t.join().unwrap().unwrap();
    }

    #[test]
    fn vmm_side_rejects_worker_version_mismatch() {
        let (vmm, worker) = Channel::pair().unwrap();
        let t = std::thread::spawn(move || {
            let (hello, _) = worker.recv::<VmmMessage>().unwrap();
            assert_eq!(
                hello,
                VmmMessage::Hello {
                    version: PROTOCOL_VERSION
                }
            );
            worker
                .send(
                    &WorkerMessage::Hello {
                        version: PROTOCOL_VERSION + 1,
                        pid: 77,
                    },
                    &[],
                )
                .unwrap();
        });
        let err = handshake_vmm_side(&vmm).unwrap_err();
        t.join().unwrap();
        assert!(matches!(
            err,
            HandshakeError::VersionMismatch { side: "VMM", ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1
        ));
        let text = err.to_string();
        assert!(text.contains(&PROTOCOL_VERSION.to_string()) && text.contains("mismatch"));
    }

    #[test]
    fn worker_side_rejects_vmm_version_mismatch_but_answers() {
        let (vmm, worker) = Channel::pair().unwrap();
        vmm.send(&VmmMessage::Hello { version: 0 }, &[]).unwrap();
        let err = handshake_worker_side(&worker).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::VersionMismatch {
                side: "worker",
                ours: PROTOCOL_VERSION,
                theirs: 0
            }
        ));
        let (reply, _) = vmm.recv::<WorkerMessage>().unwrap();
        assert!(matches!(
            reply,
            WorkerMessage::Hello {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
    }

    #[test]
    fn unexpected_first_messages() {
        let (vmm, worker) = Channel::pair().unwrap();
        vmm.send(&VmmMessage::Shutdown, &[]).unwrap();
        assert!(matches!(
            handshake_worker_side(&worker),
            Err(HandshakeError::UnexpectedMessage {
                received: "Shutdown"
            })
        ));

        worker
            .send(
                &WorkerMessage::Error {
                    message: "cannot start".into(),
                },
                &[],
            )
            .unwrap();
        let err = handshake_vmm_side(&vmm).unwrap_err();
        assert!(
            matches!(&err, HandshakeError::WorkerError { message } if message == "cannot start")
        );

        worker
            .send(&WorkerMessage::Stats(Default::default()), &[])
            .unwrap();
        assert!(matches!(
            handshake_vmm_side(&vmm),
            Err(HandshakeError::UnexpectedMessage { received: "Stats" })
        ));
    }

    #[test]
    fn vmm_side_times_out_on_silent_worker_and_rejects_invalid_hello() {
        let (vmm, worker) = Channel::pair().unwrap();
        let err = handshake_vmm_side_timeout(&vmm, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Channel(ChannelError::Timeout { .. })
        ));

        // A hello with an impossible pid is stopped by validation.
        let bad = codec::encode(&WorkerMessage::Hello {
            version: PROTOCOL_VERSION,
            pid: u32::MAX,
        })
        .unwrap();
        worker.send_bytes(&bad, &[]).unwrap();
        let err = handshake_vmm_side(&vmm).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Channel(ChannelError::Invalid(_))
        ));

        drop(worker);
        assert!(matches!(
            handshake_vmm_side(&vmm),
            Err(HandshakeError::Channel(ChannelError::Eof))
        ));
    }
}
