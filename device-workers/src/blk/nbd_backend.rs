//! A disk an NBD server serves: the transmission phase on a socket the VMM connected and
//! negotiated ([`ipc::nbd::handshake`]); the worker never gets `socket` or `connect`.
//!
//! One request at a time (the sync engine's model), each split at the export's largest
//! payload. Guest memory moves straight between the socket and the guest's buffers
//! (`sendmsg`/`recvmsg` with iovecs, which the policy already allows for vhost-user).
//!
//! A connection that breaks (the server closed it, a reply that is not an NBD reply, or a
//! reply to another request) cannot be trusted with the next request: the worker says so
//! on stderr and exits without completing the request it was serving. The request stays
//! in the inflight region; the VMM starts a successor with a new connection, which
//! resubmits it. A server that stays away makes every successor fail to start, and the
//! disk ends in fail mode: the guest gets I/O errors, never a hang.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use ipc::nbd::{self, Export};
use vm_memory::VolatileSlice;

use super::backend::{check_range, total_len, BackendError, BlockIo};

/// Exit status of a worker whose NBD connection broke (the VMM's log names it).
pub const EXIT_NBD_CONNECTION_LOST: i32 = 4;

/// Most iovecs one call takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Bytes a zero-filling write sends per request when the server cannot write zeroes
/// itself.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// See the module documentation.
#[derive(Debug)]
pub struct NbdBackend {
    socket: OwnedFd,
    export: Export,
    next_cookie: u64,
}

/// Why the connection cannot go on.
#[derive(Debug)]
struct Broken(String);

impl NbdBackend {
    pub fn new(socket: OwnedFd, export: Export) -> Self {
        NbdBackend {
            socket,
            export,
            next_cookie: 1,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Ends the worker on a broken connection (see the module documentation).
    fn lost(&self, why: Broken) -> ! {
        eprintln!(
            "bulkhead-worker: the NBD connection is lost ({}): exiting, so that a successor \
             connects again and resubmits the request in flight",
            why.0
        );
        std::process::exit(EXIT_NBD_CONNECTION_LOST)
    }

    /// Sends `header` and then `data` (guest buffers, `skip` bytes in, `len` long).
    fn send(
        &self,
        header: &[u8],
        data: &[VolatileSlice<'_>],
        skip: u64,
        len: u64,
    ) -> Result<(), Broken> {
        let mut iov = vec![libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        }];
        iov.extend(window(data, skip, len));
        send_all(self.socket.as_raw_fd(), &mut iov)
    }

    /// Receives exactly the guest-buffer window (`skip` bytes in, `len` long).
    fn recv_into(&self, data: &[VolatileSlice<'_>], skip: u64, len: u64) -> Result<(), Broken> {
        let mut iov = window(data, skip, len);
        recv_all(self.socket.as_raw_fd(), &mut iov)
    }

    /// Sends a request, waits for its reply, and returns the server's error (0: done). A
    /// read's data is received into `read_into` when the reply is a success.
    fn command(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        write: Option<(&[VolatileSlice<'_>], u64)>,
        read_into: Option<(&[VolatileSlice<'_>], u64)>,
    ) -> u32 {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = nbd::request(kind, cookie, offset, len);
        let sent = match write {
            Some((bufs, skip)) => self.send(&header, bufs, skip, u64::from(len)),
            None => self.send(&header, &[], 0, 0),
        };
        if let Err(why) = sent {
            self.lost(why);
        }
        let mut reply = [0u8; nbd::REPLY_LEN];
        let mut iov = vec![libc::iovec {
            iov_base: reply.as_mut_ptr().cast(),
            iov_len: reply.len(),
        }];
        if let Err(why) = recv_all(self.socket.as_raw_fd(), &mut iov) {
            self.lost(why);
        }
        let (error, got) = match nbd::parse_reply(&reply) {
            Ok(r) => r,
            Err(e) => self.lost(Broken(e.to_string())),
        };
        if got != cookie {
            self.lost(Broken(format!(
                "a reply to request {got:#x} came where {cookie:#x} was awaited"
            )));
        }
        if error == 0 {
            if let Some((bufs, skip)) = read_into {
                if let Err(why) = self.recv_into(bufs, skip, u64::from(len)) {
                    self.lost(why);
                }
            }
        }
        error
    }

    /// Runs `kind` over `[offset, offset + total)` in pieces of at most `max` bytes,
    /// moving guest data for reads and writes.
    fn pieces(
        &mut self,
        kind: u16,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        total: u64,
        max: u64,
    ) -> Result<(), (u64, u64, u32)> {
        let mut done = 0;
        while done < total {
            let len = (total - done).min(max) as u32;
            let data = Some((bufs, done));
            let (write, read) = match kind {
                nbd::CMD_WRITE => (data, None),
                nbd::CMD_READ => (None, data),
                _ => (None, None),
            };
            let error = self.command(kind, offset + done, len, write, read);
            if error != 0 {
                return Err((offset + done, total - done, error));
            }
            done += u64::from(len);
        }
        Ok(())
    }
}

fn os_error(error: u32) -> std::io::Error {
    std::io::Error::from_raw_os_error(nbd::errno(error))
}

/// iovecs for `len` bytes of `bufs`, from `skip` bytes in.
fn window(bufs: &[VolatileSlice<'_>], mut skip: u64, mut len: u64) -> Vec<libc::iovec> {
    let mut iov = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = b.len() as u64;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(len);
        // The guard of a plain mmap'd slice only carries the pointer (vm-memory's `xen`
        // feature, which would unmap on drop, is off), so the pointer stays valid as long
        // as the slice's borrow of guest memory, which outlives the system call.
        let base = b.ptr_guard_mut().as_ptr();
        iov.push(libc::iovec {
            // `skip < blen <= usize::MAX`: lossless, and inside the slice.
            iov_base: base.wrapping_add(skip as usize).cast(),
            iov_len: take as usize,
        });
        len -= take;
        skip = 0;
    }
    iov
}

/// Drops `n` bytes from the front of `iov` (a partial transfer).
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut first = 0;
    while n > 0 && first < iov.len() {
        if n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        } else {
            let v = &mut iov[first];
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iov.drain(..first);
}

fn send_all(fd: RawFd, iov: &mut Vec<libc::iovec>) -> Result<(), Broken> {
    iov.retain(|v| v.iov_len > 0);
    while !iov.is_empty() {
        let n = iov.len().min(IOV_MAX);
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n;
        // SAFETY: every iovec points at memory that lives through the call (guest memory
        // the caller borrows, or the caller's header); the kernel only reads it. No
        // SIGPIPE: a closed connection is an error here.
        let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        match sent {
            n if n > 0 => advance(iov, n as usize),
            0 => return Err(Broken("the server accepts no more data".into())),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Broken(format!("send: {e}")));
                }
            }
        }
    }
    Ok(())
}

fn recv_all(fd: RawFd, iov: &mut Vec<libc::iovec>) -> Result<(), Broken> {
    iov.retain(|v| v.iov_len > 0);
    while !iov.is_empty() {
        let n = iov.len().min(IOV_MAX);
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n;
        // SAFETY: every iovec points at writable memory that lives through the call (guest
        // memory the caller borrows mutably for the transfer, or the caller's reply
        // buffer), each within its buffer's bounds.
        let got = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL) };
        match got {
            n if n > 0 => advance(iov, n as usize),
            0 => return Err(Broken("the server closed the connection".into())),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Broken(format!("receive: {e}")));
                }
            }
        }
    }
    Ok(())
}

impl BlockIo for NbdBackend {
    fn size(&self) -> u64 {
        self.export.size
    }

    fn read_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let total = total_len(bufs);
        check_range(offset, total, self.export.size)?;
        let max = u64::from(self.export.max_payload);
        self.pieces(nbd::CMD_READ, bufs, offset, total, max)
            .map_err(|(offset, len, error)| BackendError::Read {
                offset,
                len,
                source: os_error(error),
            })
    }

    fn write_vectored_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BackendError> {
        let total = total_len(bufs);
        check_range(offset, total, self.export.size)?;
        let max = u64::from(self.export.max_payload);
        self.pieces(nbd::CMD_WRITE, bufs, offset, total, max)
            .map_err(|(offset, len, error)| BackendError::Write {
                offset,
                len,
                source: os_error(error),
            })
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        if !self.export.can_flush() {
            // The server has no cache to flush: what it acknowledged is stable.
            return Ok(());
        }
        match self.command(nbd::CMD_FLUSH, 0, 0, None, None) {
            0 => Ok(()),
            e => Err(BackendError::Flush(os_error(e))),
        }
    }

    /// As a raw image's hole punch and a qcow2 image's discard do, a discarded range reads
    /// as zeros afterwards: it is sent as WRITE_ZEROES where the server offers it (without
    /// NO_HOLE, so the server may deallocate it as TRIM would; qemu-nbd, for one, ignores
    /// TRIM unless started with --discard=unmap). Else TRIM, a hint whose range may keep
    /// its bytes; else nothing.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.export.size)?;
        if len == 0 {
            return Ok(());
        }
        let kind = if self.export.can_write_zeroes() {
            nbd::CMD_WRITE_ZEROES
        } else if self.export.can_trim() {
            nbd::CMD_TRIM
        } else {
            // A hint the server cannot take: nothing to do.
            return Ok(());
        };
        self.pieces(kind, &[], offset, len, 1 << 30)
            .map_err(|(offset, len, error)| BackendError::Discard {
                offset,
                len,
                source: os_error(error),
            })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        check_range(offset, len, self.export.size)?;
        let failed = |(offset, len, error)| BackendError::WriteZeroes {
            offset,
            len,
            source: os_error(error),
        };
        if self.export.can_write_zeroes() {
            // Without NBD_CMD_FLAG_NO_HOLE the server may unmap the range.
            return self
                .pieces(nbd::CMD_WRITE_ZEROES, &[], offset, len, 1 << 30)
                .map_err(failed);
        }
        let mut done = 0;
        let chunk = (ZERO_CHUNK as u64).min(u64::from(self.export.max_payload));
        while done < len {
            let n = (len - done).min(chunk);
            // SAFETY: ZEROES is a static the kernel only reads from (sendmsg); the slice's
            // length is within it.
            let zeroes = unsafe { VolatileSlice::new(ZEROES.as_ptr() as *mut u8, n as usize) };
            self.pieces(nbd::CMD_WRITE, &[zeroes], offset + done, n, n)
                .map_err(failed)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_takes_exactly_its_bytes_across_buffers() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        // SAFETY: the arrays outlive the slices and nothing else touches them.
        let bufs = unsafe {
            [
                VolatileSlice::new(a.as_mut_ptr(), a.len()),
                VolatileSlice::new(b.as_mut_ptr(), b.len()),
            ]
        };
        let w = window(&bufs, 90, 30);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].iov_len, w[1].iov_len), (10, 20));
        assert_eq!(w[0].iov_base as usize, a.as_ptr() as usize + 90);
        assert_eq!(w[1].iov_base as usize, b.as_ptr() as usize);
        let mut w = window(&bufs, 0, 150);
        advance(&mut w, 120);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].iov_len, 30);
        assert_eq!(w[0].iov_base as usize, b.as_ptr() as usize + 20);
    }
}
