//! The control channel: one `SOCK_SEQPACKET` unix socket per worker, one encoded message
//! per datagram, up to [`MAX_FDS`] fds per message passed with `SCM_RIGHTS`.
//!
//! SOCK_SEQPACKET keeps message boundaries (no framing layer to get wrong) and is
//! connection-oriented (a dead peer is seen as end of file). Everything received is
//! treated as hostile: the datagram must fit [`MAX_MESSAGE_SIZE`] (a truncated one is an
//! error, never a partial decode), at most [`MAX_FDS`] fds may arrive (a truncated control
//! buffer is an error), every received fd is owned from the moment it arrives (closed on
//! any error) and close-on-exec, and every decoded message is validated before
//! [`Channel::recv`] returns it.

use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, CodecError};
use crate::messages::{Validate, ValidationError};

/// Largest message, in encoded bytes.
pub const MAX_MESSAGE_SIZE: usize = codec::MAX_ENCODED_SIZE;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 8;

/// Control buffer length for exactly [`MAX_FDS`] fds.
// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const CMSG_BUFFER_LEN: usize = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// [`Channel::try_send`]: the peer's queue is full.
    #[error("the peer is not reading (its queue is full)")]
    WouldBlock,
    /// Creating the socket pair failed.
    #[error("failed to create a SOCK_SEQPACKET socket pair")]
    SocketPair(#[source] io::Error),
    /// `getsockopt` on a supplied fd failed (e.g. it is not a socket).
    #[error("failed to query socket option {option} of fd {fd}")]
    GetSockOpt {
        /// The fd.
        fd: RawFd,
        /// Option name.
        option: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A supplied fd is a socket of the wrong type or family.
    #[error("fd {fd} is a socket of domain {domain} type {socket_type}, expected AF_UNIX SOCK_SEQPACKET")]
    WrongSocket {
        /// The fd.
        fd: RawFd,
        /// `SO_DOMAIN`.
        domain: i32,
        /// `SO_TYPE`.
        socket_type: i32,
    },
    /// The peer closed the channel (end of file on receive, `EPIPE` on send).
    #[error("the peer closed the control channel")]
    Eof,
    /// No message arrived in time.
    #[error("no message within {timeout:?}")]
    Timeout {
        /// The timeout.
        timeout: Duration,
    },
    /// An outgoing message is larger than [`MAX_MESSAGE_SIZE`].
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An outgoing message encoded to nothing (indistinguishable from end of file).
    #[error("refusing to send an empty message")]
    EmptyMessage,
    /// Too many fds for one outgoing message.
    #[error("{count} fds exceed the limit of {limit} per message")]
    TooManyFds {
        /// Fds supplied.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The outgoing message failed validation.
    #[error("refusing to send a message that fails validation")]
    InvalidOutgoing(#[source] ValidationError),
    /// Encoding the outgoing message failed.
    #[error("failed to encode message")]
    Encode(#[source] CodecError),
    /// `sendmsg` failed.
    #[error("failed to send {size}-byte message with {fds} fds")]
    Send {
        /// Message size.
        size: usize,
        /// Number of fds.
        fds: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `sendmsg` sent part of a datagram (never expected of SOCK_SEQPACKET).
    #[error("sent {sent} of {size} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Message size.
        size: usize,
    },
    /// `recvmsg` or `poll` failed.
    #[error("failed to receive a message")]
    Recv(#[source] io::Error),
    /// A received datagram was larger than [`MAX_MESSAGE_SIZE`] and was cut.
    #[error("received message exceeds the limit of {limit} bytes (truncated)")]
    Truncated {
        /// The limit.
        limit: usize,
    },
    /// A received message carried more fds than [`MAX_FDS`]; all were closed.
    #[error("received message carried more than {limit} fds (control data truncated, {received} fds closed)")]
    TooManyFdsReceived {
        /// The limit.
        limit: usize,
        /// Fds that arrived before the truncation (now closed).
        received: usize,
    },
    /// A received message carried a control message other than `SCM_RIGHTS`.
    #[error("received unexpected control message level {level} type {kind}")]
    UnexpectedControlMessage {
        /// `cmsg_level`.
        level: i32,
        /// `cmsg_type`.
        kind: i32,
    },
    /// The received bytes do not decode as the expected message type.
    #[error("failed to decode received message")]
    Decode(#[source] CodecError),
    /// The received message decoded but failed validation.
    #[error("received message fails validation")]
    Invalid(#[source] ValidationError),
}

/// One received datagram, not yet decoded.
struct Datagram {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// One end of a control channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn sockopt_int(
    fd: BorrowedFd<'_>,
    option: libc::c_int,
    name: &'static str,
) -> Result<i32, ChannelError> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the size of `value`;
    // the fd is borrowed and therefore open for the duration of the call.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(ChannelError::GetSockOpt {
            fd: fd.as_raw_fd(),
            option: name,
            source: io::Error::last_os_error(),
        });
    }
    Ok(value)
}

impl Channel {
    /// A connected pair of channel ends (close-on-exec; clear the flag on the end a child
    /// inherits, or pass it over another channel).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ChannelError::SocketPair(e.into()))?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an inherited fd after checking it is an `AF_UNIX` `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, ChannelError> {
        let socket_type = sockopt_int(fd.as_fd(), libc::SO_TYPE, "SO_TYPE")?;
        let domain = sockopt_int(fd.as_fd(), libc::SO_DOMAIN, "SO_DOMAIN")?;
        if socket_type != libc::SOCK_SEQPACKET || domain != libc::AF_UNIX {
            return Err(ChannelError::WrongSocket {
                fd: fd.as_raw_fd(),
                domain,
                socket_type,
            });
        }
        Ok(Channel { fd })
    }

    /// Validates, encodes and sends `msg` with `fds` (duplicated into the peer by the
    /// kernel; the caller keeps its own).
    pub fn send<T: Serialize + Validate>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        msg.validate().map_err(ChannelError::InvalidOutgoing)?;
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds {
                count: fds.len(),
                limit: MAX_FDS,
            });
        }
        // An encoding over MAX_MESSAGE_SIZE fails here as CodecError::OutputTooLarge.
        let bytes = codec::encode(msg).map_err(ChannelError::Encode)?;
        self.send_bytes(&bytes, fds)
    }

    /// [`Channel::send`] without waiting: a peer that does not read, and whose receive
    /// queue is full, gets [`ChannelError::WouldBlock`] instead of a blocked sender.
    pub fn try_send<T: Serialize + Validate>(&self, msg: &T) -> Result<(), ChannelError> {
        msg.validate().map_err(ChannelError::InvalidOutgoing)?;
        let bytes = codec::encode(msg).map_err(ChannelError::Encode)?;
        self.send_flags(&bytes, &[], MsgFlags::MSG_DONTWAIT)
    }

    /// Sends one datagram. Kept separate so tests can send arbitrary bytes.
    pub(crate) fn send_bytes(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        self.send_flags(bytes, fds, MsgFlags::empty())
    }

    fn send_flags(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<(), ChannelError> {
        if bytes.len() > MAX_MESSAGE_SIZE {
            return Err(ChannelError::MessageTooLarge {
                size: bytes.len(),
                limit: MAX_MESSAGE_SIZE,
            });
        }
        if bytes.is_empty() {
            return Err(ChannelError::EmptyMessage);
        }
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds {
                count: fds.len(),
                limit: MAX_FDS,
            });
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
        let iov = [io::IoSlice::new(bytes)];
        let sent = loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL | flags,
                None,
            ) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(ChannelError::WouldBlock),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(ChannelError::Eof),
                Err(e) => {
                    return Err(ChannelError::Send {
                        size: bytes.len(),
                        fds: fds.len(),
                        source: e.into(),
                    })
                }
            }
        };
        if sent != bytes.len() {
            return Err(ChannelError::ShortSend {
                sent,
                size: bytes.len(),
            });
        }
        Ok(())
    }

    /// Blocks for the next message; decodes and validates it. Fds that came with it are
    /// returned owned and close-on-exec; on any error they are already closed.
    pub fn recv<T: DeserializeOwned + Validate>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        match self.recv_datagram(false)? {
            Some(datagram) => Self::finish(datagram),
            // Only a socket someone switched to O_NONBLOCK gets here.
            None => Err(ChannelError::Recv(io::ErrorKind::WouldBlock.into())),
        }
    }

    /// Like [`Channel::recv`] but gives up with [`ChannelError::Timeout`] after `timeout`.
    pub fn recv_timeout<T: DeserializeOwned + Validate>(
        &self,
        timeout: Duration,
    ) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ChannelError::Timeout { timeout });
            }
            // Round up so a sub-millisecond remainder does not spin with a zero timeout.
            let millis = remaining.as_micros().div_ceil(1000);
            let poll_timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, poll_timeout) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(ChannelError::Recv(e.into())),
            }
            // Readable (or hung up); another thread may have taken the message, so do not
            // block: EAGAIN goes round again.
            if let Some(datagram) = self.recv_datagram(true)? {
                return Self::finish(datagram);
            }
        }
    }

    fn finish<T: DeserializeOwned + Validate>(
        datagram: Datagram,
    ) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let msg: T = codec::decode(&datagram.bytes).map_err(ChannelError::Decode)?;
        msg.validate().map_err(ChannelError::Invalid)?;
        Ok((msg, datagram.fds))
    }

    /// Receives one datagram: its bytes and fds. `Ok(None)` only if `nonblocking` and no
    /// datagram is queued.
    fn recv_datagram(&self, nonblocking: bool) -> Result<Option<Datagram>, ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        // u64 words give the control buffer the alignment of `cmsghdr`.
        let mut cmsg_buf = [0u64; CMSG_BUFFER_LEN.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut flags = libc::MSG_CMSG_CLOEXEC;
        if nonblocking {
            flags |= libc::MSG_DONTWAIT;
        }
        let (len, mhdr) = loop {
            // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
            let mut mhdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            mhdr.msg_iov = &raw mut iov;
            mhdr.msg_iovlen = 1;
            mhdr.msg_control = cmsg_buf.as_mut_ptr().cast();
            mhdr.msg_controllen = CMSG_BUFFER_LEN as _;
            // SAFETY: the msghdr points at `iov` (describing `buf`) and at `cmsg_buf`, both
            // live and writable for the stated lengths for the whole call; the fd is ours.
            let ret = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut mhdr, flags) };
            if ret >= 0 {
                break (ret as usize, mhdr);
            }
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN if nonblocking => return Ok(None),
                Errno::ECONNRESET => return Err(ChannelError::Eof),
                e => return Err(ChannelError::Recv(e.into())),
            }
        };

        // Take ownership of every fd the kernel installed before judging anything else, so
        // that every error path below closes them.
        let mut fds = Vec::new();
        let mut unexpected = None;
        // SAFETY: `mhdr` is the header recvmsg filled in; its control pointer and the
        // (kernel-updated) length describe `cmsg_buf`, which is still live.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&mhdr) };
        while !cmsg.is_null() {
            // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a header
            // that lies within the control buffer the kernel filled in.
            let hdr = unsafe { cmsg.read_unaligned() };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: as above; CMSG_LEN is pure arithmetic.
                let (data, header_len) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0)) };
                let count = (hdr.cmsg_len as usize).saturating_sub(header_len as usize)
                    / mem::size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: the kernel wrote `count` ints after the header (cmsg_len
                    // covers them, and it never exceeds the control buffer).
                    let raw = unsafe { data.cast::<RawFd>().add(i).read_unaligned() };
                    if raw >= 0 {
                        // SAFETY: SCM_RIGHTS installed `raw` as a new fd in this process
                        // that nothing else refers to; we take sole ownership of it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            } else if unexpected.is_none() {
                unexpected = Some((hdr.cmsg_level, hdr.cmsg_type));
            }
            // SAFETY: `cmsg` is a valid header within the buffer described by `mhdr`.
            cmsg = unsafe { libc::CMSG_NXTHDR(&mhdr, cmsg) };
        }

        if mhdr.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(ChannelError::TooManyFdsReceived {
                limit: MAX_FDS,
                received: fds.len(),
            });
        }
        if let Some((level, kind)) = unexpected {
            return Err(ChannelError::UnexpectedControlMessage { level, kind });
        }
        if mhdr.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(ChannelError::Truncated {
                limit: MAX_MESSAGE_SIZE,
            });
        }
        if len == 0 {
            // SOCK_SEQPACKET reports end of file as a zero-length read; we never send
            // empty datagrams, so a zero-length one means the same.
            return Err(ChannelError::Eof);
        }
        buf.truncate(len);
        Ok(Some(Datagram { bytes: buf, fds }))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(channel: Channel) -> OwnedFd {
        channel.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{WorkerMessage, PROTOCOL_VERSION};
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    use nix::unistd::{pipe, read, write};
    use serde::Deserialize;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum TestMsg {
        Small(u32),
        Big(Vec<u8>),
    }

    impl Validate for TestMsg {
        fn validate(&self) -> Result<(), ValidationError> {
            match self {
                TestMsg::Small(13) => Err(ValidationError::OutOfRange {
                    field: "small",
                    value: 13,
                    min: 0,
                    max: 12,
                }),
                _ => Ok(()),
            }
        }
    }

    /// A pipe whose read end is non-blocking: `read` returns 0 only once every write end
    /// (including any received copies) is closed.
    fn probe_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = pipe().unwrap();
        fcntl(&r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        (r, w)
    }

    fn all_write_ends_closed(r: &OwnedFd) -> bool {
        let mut b = [0u8; 1];
        match read(r, &mut b) {
            Ok(0) => true,
            Err(Errno::EAGAIN) => false,
            other => panic!("unexpected read result {other:?}"),
        }
    }

    fn raw_send(ch: &Channel, bytes: &[u8], fds: &[RawFd]) {
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
        let n = sendmsg::<()>(
            ch.as_raw_fd(),
            &[io::IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    /// A peer that reads nothing fills its receive queue: try_send then says so at once
    /// (the supervisor's push of a rate limit must never stall on a worker), where send
    /// would block; what was queued is still delivered.
    #[test]
    fn try_send_never_blocks_on_a_peer_that_reads_nothing() {
        let (a, b) = Channel::pair().unwrap();
        let started = std::time::Instant::now();
        let mut sent = 0u32;
        let full = loop {
            match a.try_send(&TestMsg::Small(7)) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the queue never filled");
        };
        assert!(matches!(full, ChannelError::WouldBlock), "{full:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(sent > 0);
        assert_eq!(b.recv::<TestMsg>().unwrap().0, TestMsg::Small(7));
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = pipe().unwrap();
        let efd = EventFd::new(libc::EFD_CLOEXEC).unwrap();
        // SAFETY: `efd` owns this fd and outlives the borrow.
        let efd_fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        a.send(&TestMsg::Small(7), &[w.as_fd(), efd_fd]).unwrap();
        drop(w);
        let (msg, mut fds) = b.recv::<TestMsg>().unwrap();
        assert_eq!(msg, TestMsg::Small(7));
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
        // The received eventfd is the same object: a write here is read there.
        let efd_rx = fds.pop().unwrap();
        write(&efd_rx, &5u64.to_ne_bytes()).unwrap();
        assert_eq!(efd.read().unwrap(), 5);
        // The received pipe end writes into our read end.
        let w_rx = fds.pop().unwrap();
        write(&w_rx, b"hi").unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(read(&r, &mut buf).unwrap(), 2);
        assert_eq!(&buf, b"hi");

        // Messages without fds, both directions, and the largest allowed message.
        b.send(&TestMsg::Small(1), &[]).unwrap();
        let (msg, fds) = a.recv::<TestMsg>().unwrap();
        assert_eq!(msg, TestMsg::Small(1));
        assert!(fds.is_empty());
        let big = TestMsg::Big(vec![0xa5; MAX_MESSAGE_SIZE - 8]);
        a.send(&big, &[]).unwrap();
        assert_eq!(b.recv::<TestMsg>().unwrap().0, big);
    }

    #[test]
    fn too_large_message_refused_on_send() {
        let (a, _b) = Channel::pair().unwrap();
        let err = a
            .send(&TestMsg::Big(vec![0; MAX_MESSAGE_SIZE]), &[])
            .unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::Encode(CodecError::OutputTooLarge {
                    limit: MAX_MESSAGE_SIZE
                })
            ),
            "{err:?}"
        );
        let err = a
            .send_bytes(&vec![1; MAX_MESSAGE_SIZE + 1], &[])
            .unwrap_err();
        assert!(matches!(
            err,
            ChannelError::MessageTooLarge { size, .. } if size == MAX_MESSAGE_SIZE + 1
        ));
        assert!(matches!(
            a.send_bytes(&[], &[]),
            Err(ChannelError::EmptyMessage)
        ));
    }

    #[test]
    fn oversized_datagram_rejected_as_truncated_and_fds_closed() {
        let (a, b) = Channel::pair().unwrap();
        let bytes = vec![0u8; MAX_MESSAGE_SIZE + 100];
        // SAFETY: `bytes` is live and readable for its length; the fd is ours.
        let n = unsafe {
            libc::send(
                a.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        assert_eq!(n as usize, bytes.len());
        let err = b.recv::<TestMsg>().unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::Truncated {
                    limit: MAX_MESSAGE_SIZE
                }
            ),
            "{err:?}"
        );

        // Same with an fd attached: it must not leak.
        let (r, w) = probe_pipe();
        raw_send(&a, &bytes, &[w.as_raw_fd()]);
        drop(w);
        assert!(matches!(
            b.recv::<TestMsg>(),
            Err(ChannelError::Truncated { .. })
        ));
        assert!(all_write_ends_closed(&r));
        // The channel still works afterwards.
        a.send(&TestMsg::Small(2), &[]).unwrap();
        assert_eq!(b.recv::<TestMsg>().unwrap().0, TestMsg::Small(2));
    }

    #[test]
    fn too_many_fds_refused_on_send_and_closed_on_recv() {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = probe_pipe();
        let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| w.as_fd()).collect();
        let err = a.send(&TestMsg::Small(0), &many).unwrap_err();
        assert!(
            matches!(err, ChannelError::TooManyFds { count, limit: MAX_FDS } if count == MAX_FDS + 1),
            "{err:?}"
        );

        // A hostile peer sends more than MAX_FDS anyway.
        let bytes = codec::encode(&TestMsg::Small(0)).unwrap();
        let raw: Vec<RawFd> = vec![w.as_raw_fd(); MAX_FDS + 3];
        raw_send(&a, &bytes, &raw);
        drop(w);
        let err = b.recv::<TestMsg>().unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::TooManyFdsReceived {
                    limit: MAX_FDS,
                    received: MAX_FDS
                }
            ),
            "{err:?}"
        );
        // Every fd that did arrive was closed again.
        assert!(all_write_ends_closed(&r));
    }

    #[test]
    fn garbage_is_a_decode_error_and_fds_are_closed() {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = probe_pipe();
        raw_send(&a, &[0xff, 0xff, 0xff, 0xff], &[w.as_raw_fd()]);
        drop(w);
        let err = b.recv::<TestMsg>().unwrap_err();
        assert!(matches!(err, ChannelError::Decode(_)), "{err:?}");
        assert!(all_write_ends_closed(&r));
        // Trailing bytes after a valid message are a decode error too.
        let mut bytes = codec::encode(&TestMsg::Small(1)).unwrap();
        bytes.push(0);
        raw_send(&a, &bytes, &[]);
        assert!(matches!(
            b.recv::<TestMsg>(),
            Err(ChannelError::Decode(CodecError::TrailingBytes { .. }))
        ));
    }

    #[test]
    fn invalid_message_rejected_on_both_ends() {
        let (a, b) = Channel::pair().unwrap();
        assert!(matches!(
            a.send(&TestMsg::Small(13), &[]),
            Err(ChannelError::InvalidOutgoing(_))
        ));
        // A peer that skips validation: the receiver still rejects it.
        a.send_bytes(&codec::encode(&TestMsg::Small(13)).unwrap(), &[])
            .unwrap();
        assert!(matches!(
            b.recv::<TestMsg>(),
            Err(ChannelError::Invalid(ValidationError::OutOfRange {
                value: 13,
                ..
            }))
        ));
        // With a real message type.
        let bad = WorkerMessage::Hello {
            version: PROTOCOL_VERSION,
            pid: 0,
        };
        a.send_bytes(&codec::encode(&bad).unwrap(), &[]).unwrap();
        let err = b.recv::<WorkerMessage>().unwrap_err();
        assert!(matches!(err, ChannelError::Invalid(_)), "{err:?}");
    }

    #[test]
    fn eof_after_peer_closes() {
        let (a, b) = Channel::pair().unwrap();
        a.send(&TestMsg::Small(3), &[]).unwrap();
        drop(a);
        // Queued messages are still delivered, then end of file, repeatedly.
        assert_eq!(b.recv::<TestMsg>().unwrap().0, TestMsg::Small(3));
        assert!(matches!(b.recv::<TestMsg>(), Err(ChannelError::Eof)));
        assert!(matches!(
            b.recv_timeout::<TestMsg>(Duration::from_secs(5)),
            Err(ChannelError::Eof)
        ));
        assert!(matches!(
            b.send(&TestMsg::Small(1), &[]),
            Err(ChannelError::Eof)
        ));
    }

    #[test]
    fn recv_timeout_times_out_then_receives() {
        let (a, b) = Channel::pair().unwrap();
        let start = Instant::now();
        let err = b
            .recv_timeout::<TestMsg>(Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, ChannelError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(50));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.send(&TestMsg::Small(9), &[]).unwrap();
            a
        });
        let (msg, _) = b.recv_timeout::<TestMsg>(Duration::from_secs(10)).unwrap();
        assert_eq!(msg, TestMsg::Small(9));
        drop(sender.join().unwrap());
    }

    #[test]
    fn from_fd_checks_socket_type() {
        let (a, b) = Channel::pair().unwrap();
        let a = Channel::from_fd(OwnedFd::from(a)).unwrap();
        a.send(&TestMsg::Small(4), &[]).unwrap();
        assert_eq!(b.recv::<TestMsg>().unwrap().0, TestMsg::Small(4));

        let (stream, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = Channel::from_fd(OwnedFd::from(stream)).unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::WrongSocket {
                    socket_type: libc::SOCK_STREAM,
                    ..
                }
            ),
            "{err:?}"
        );
        let (dgram, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(
            Channel::from_fd(OwnedFd::from(dgram)),
            Err(ChannelError::WrongSocket {
                socket_type: libc::SOCK_DGRAM,
                ..
            })
        ));
        let (r, _w) = pipe().unwrap();
        let err = Channel::from_fd(r).unwrap_err();
        assert!(
            matches!(&err, ChannelError::GetSockOpt { source, .. } if source.raw_os_error() == Some(libc::ENOTSOCK)),
            "{err:?}"
        );
    }

    #[test]
    fn zero_length_datagram_reads_as_eof() {
        let (a, b) = Channel::pair().unwrap();
        // SAFETY: a zero-length send; the pointer is never read.
        let n = unsafe { libc::send(a.as_raw_fd(), [0u8; 1].as_ptr().cast(), 0, 0) };
        assert_eq!(n, 0);
        assert!(matches!(b.recv::<TestMsg>(), Err(ChannelError::Eof)));
    }
}
