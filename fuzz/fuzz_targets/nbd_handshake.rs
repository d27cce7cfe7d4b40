//! An NBD server's side of the negotiation, as the VMM reads it: any bytes a server sends
//! must end in an export that passes its checks or in an error, never a panic, and the
//! client never reads more than the bytes it was sent plus what it asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

/// The server's bytes to read; what the client writes is dropped.
struct Server<'a>(&'a [u8]);

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(export) = ipc::nbd::handshake(&mut Server(data), "disk") {
        // What the handshake accepts, the worker's configuration accepts.
        ipc::messages::Validate::validate(&export).expect("a negotiated export is valid");
    }
    if data.len() >= ipc::nbd::REPLY_LEN {
        let mut reply = [0u8; ipc::nbd::REPLY_LEN];
        reply.copy_from_slice(&data[..ipc::nbd::REPLY_LEN]);
        if let Ok((error, _)) = ipc::nbd::parse_reply(&reply) {
            let _ = ipc::nbd::errno(error);
        }
    }
});
