//! Shared by the trusted VMM and its untrusted device workers: the status page layout,
//! the control-channel codec, framing, fd passing, size limits and the validation of
//! every received message.
//!
//! Everything the VMM receives through this crate is hostile input: a worker may send any
//! bytes, any number of fds, and may write any value into the status page at any time.
//! The types here are built so that such input yields an error (or a meaningless but
//! harmless value), never a panic, an unbounded allocation or a fault in the VMM.
//!
//! - [`status`]: the status page, a sealed memfd with a fixed `#[repr(C)]` layout of
//!   atomics (heartbeat, counters, last seccomp violation).
//! - [`codec`]: the only module that knows the wire encoding (bincode 2, fixed config,
//!   hard size limit).
//! - [`channel`]: SOCK_SEQPACKET control channel with SCM_RIGHTS fd passing.
//! - [`messages`]: the versioned message set and its [`messages::Validate`] rules.
//! - [`handshake`]: the version handshake both sides run first.
//! - [`image`]: opening and locking a disk image as QEMU does, for either side.

pub mod channel;
pub mod codec;
pub mod handshake;
pub mod image;
pub mod limits;
pub mod messages;
pub mod nbd;
pub mod status;

pub use channel::{Channel, ChannelError, MAX_FDS, MAX_MESSAGE_SIZE};
pub use codec::CodecError;
pub use handshake::{handshake_vmm_side, handshake_worker_side, HandshakeError};
pub use messages::{Validate, ValidationError, PROTOCOL_VERSION};
pub use status::{StatusError, StatusMapping, StatusPage, StatusSnapshot};

/// An error and all its sources on one line (`outer: inner: innermost`), for logs. Both
/// sides report errors this way (the worker links no VMM code, so it lives here).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
