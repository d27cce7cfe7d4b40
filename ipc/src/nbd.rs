//! The NBD protocol (the `doc/proto.md` of the NetworkBlockDevice project), as both sides
//! of a disk served by an NBD server use it: the VMM's side connects and negotiates
//! ([`handshake`]: fixed newstyle, `NBD_OPT_GO` with the block-size info, or
//! `NBD_OPT_EXPORT_NAME` from a server without it) and hands the connected socket to the
//! worker, which speaks the transmission phase ([`request`], [`parse_reply`]).
//!
//! Everything the server sends is checked: magic numbers, the option each reply answers,
//! lengths (at most [`MAX_OPTION_REPLY`] bytes are read for one reply), the export's size
//! and block sizes. A server is the operator's choice, not the guest's, but it is another
//! program on the other end of a socket.
//!
//! Hand-written rather than taken from a crate: the `nbd` crate (0.3.1) moves data through `Read`/`Write` of its own buffers, while the worker reads and
//! writes guest memory directly with `recvmsg`/`sendmsg` (which its seccomp policy already
//! allows for vhost-user), and the negotiation here asks for the server's block sizes.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_DISK_SIZE, SECTOR_SIZE};

/// "NBDMAGIC": the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation (and the prefix of every option the client sends).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second word: not supported.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Every option reply starts with this.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Every request starts with this.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// A simple reply starts with this.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
/// Option reply types.
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
/// Info types.
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// WRITE_ZEROES may leave a hole (the absent NO_HOLE flag says so); no command flag is
/// ever sent.
pub const CMD_FLAGS_NONE: u16 = 0;

/// Longest option reply read (an export's description, a long error message).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most option replies read for one option: a server cannot keep the negotiation going.
pub const MAX_OPTION_REPLIES: u32 = 32;
/// Longest export name (the protocol's own limit is 4096 bytes).
pub const MAX_EXPORT_NAME: usize = 4096;
/// Largest request payload when the server names none (the protocol's recommendation).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Size of a request header and of a simple reply.
pub const REQUEST_LEN: usize = 28;
pub const REPLY_LEN: usize = 16;

/// An export as negotiated: what the worker needs to speak to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// Bytes, a whole number of 512-byte sectors in 512..=[`MAX_DISK_SIZE`].
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Largest payload of one request, 512..=[`DEFAULT_MAX_PAYLOAD`] (the server's
    /// maximum block size, or the default).
    pub max_payload: u32,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }
    pub fn can_trim(&self) -> bool {
        self.flags & TFLAG_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }
}

/// What went wrong with a server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot talk to the NBD server")]
    Io(#[from] std::io::Error),
    #[error("the server is not an NBD server (its greeting is {0:#018x})")]
    NotNbd(u64),
    #[error("the server speaks only the oldstyle NBD handshake; bulkhead needs fixed newstyle")]
    Oldstyle,
    #[error("the server does not offer the fixed newstyle handshake (flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("the server sent {what} {got:#x} where {want:#x} belongs")]
    Protocol {
        what: &'static str,
        got: u64,
        want: u64,
    },
    #[error("the server's option reply is {0} bytes, more than {MAX_OPTION_REPLY}")]
    ReplyTooLong(u32),
    #[error("the server refused export {export:?}: {reason}")]
    Refused { export: String, reason: String },
    #[error("the server ended the negotiation without describing export {0:?}")]
    NoExportInfo(String),
    #[error("export {export:?} is {size} bytes: bulkhead serves whole 512-byte sectors, 512 bytes to 64 TiB")]
    BadSize { export: String, size: u64 },
    #[error("export {export:?} needs requests of whole {min}-byte blocks; bulkhead's guests send 512-byte ones")]
    BlockTooLarge { export: String, min: u32 },
    #[error("export {export:?} takes requests of at most {max} bytes; bulkhead's guests send 512-byte sectors")]
    BlockTooSmall { export: String, max: u32 },
    #[error("the server sent more than {MAX_OPTION_REPLIES} option replies")]
    TooManyReplies,
    #[error("export {export:?} offers no transmission flags (NBD_FLAG_HAS_FLAGS is clear)")]
    NoFlags { export: String },
    #[error("the export name is {0} bytes, more than {MAX_EXPORT_NAME}")]
    NameTooLong(usize),
}

fn read_u16(r: &mut impl Read) -> Result<u16, NbdError> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> Result<u32, NbdError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, NbdError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A server's words (an error message) made safe to log: printable, at most 200 bytes.
fn words(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

/// Negotiates export `export` on a connected `stream` and returns it, checked; the
/// stream is then in the transmission phase.
pub fn handshake<S: Read + Write>(stream: &mut S, export: &str) -> Result<Export, NbdError> {
    if export.len() > MAX_EXPORT_NAME {
        return Err(NbdError::NameTooLong(export.len()));
    }
    let magic = read_u64(stream)?;
    if magic != NBDMAGIC {
        return Err(NbdError::NotNbd(magic));
    }
    match read_u64(stream)? {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(NbdError::Oldstyle),
        other => {
            return Err(NbdError::Protocol {
                what: "greeting",
                got: other,
                want: IHAVEOPT,
            })
        }
    }
    let server_flags = read_u16(stream)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle(server_flags));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(FLAG_NO_ZEROES)
        } else {
            0
        };
    stream.write_all(&client_flags.to_be_bytes())?;
    // NBD_OPT_GO: the export's name and one info request (block sizes).
    let mut go = Vec::with_capacity(16 + 8 + export.len());
    go.extend_from_slice(&IHAVEOPT.to_be_bytes());
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&((4 + export.len() + 2 + 2) as u32).to_be_bytes());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    stream.write_all(&go)?;
    stream.flush()?;
    let mut size_flags: Option<(u64, u16)> = None;
    let mut block: Option<(u32, u32)> = None;
    for replies in 0.. {
        if replies == MAX_OPTION_REPLIES {
            return Err(NbdError::TooManyReplies);
        }
        let magic = read_u64(stream)?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdError::Protocol {
                what: "option reply magic",
                got: magic,
                want: OPTION_REPLY_MAGIC,
            });
        }
        let option = read_u32(stream)?;
        if option != OPT_GO {
            return Err(NbdError::Protocol {
                what: "option reply to option",
                got: u64::from(option),
                want: u64::from(OPT_GO),
            });
        }
        let kind = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION_REPLY {
            return Err(NbdError::ReplyTooLong(len));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                match (info, data.len()) {
                    (INFO_EXPORT, 12) => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        size_flags = Some((size, flags));
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        let min = u32::from_be_bytes(data[2..6].try_into().unwrap_or_default());
                        let max = u32::from_be_bytes(data[10..14].try_into().unwrap_or_default());
                        block = Some((min, max));
                    }
                    // Other information (a name, a description), or a malformed one of
                    // the kinds above: not needed, not trusted.
                    _ => {}
                }
            }
            REP_INFO => {}
            REP_ERR_UNSUP => return export_name(stream, export, no_zeroes),
            k if k & REP_ERR_BIT != 0 => {
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    reason: if data.is_empty() {
                        format!("error {:#x}", k)
                    } else {
                        words(&data)
                    },
                })
            }
            // Reply types this client never asked for are skipped.
            _ => {}
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| NbdError::NoExportInfo(export.to_string()))?;
    checked(export, size, flags, block)
}

/// The old way in, for a server without NBD_OPT_GO: the reply is the export's size and
/// flags (and 124 zero bytes, unless both sides dropped them).
fn export_name<S: Read + Write>(
    stream: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Export, NbdError> {
    let mut opt = Vec::with_capacity(16 + export.len());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    stream.write_all(&opt)?;
    stream.flush()?;
    let size = read_u64(stream)?;
    let flags = read_u16(stream)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        stream.read_exact(&mut zeroes)?;
    }
    checked(export, size, flags, None)
}

fn checked(
    export: &str,
    size: u64,
    flags: u16,
    block: Option<(u32, u32)>,
) -> Result<Export, NbdError> {
    if !(SECTOR_SIZE..=MAX_DISK_SIZE).contains(&size) || size % SECTOR_SIZE != 0 {
        return Err(NbdError::BadSize {
            export: export.to_string(),
            size,
        });
    }
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(NbdError::NoFlags {
            export: export.to_string(),
        });
    }
    let (min, max) = block.unwrap_or((1, DEFAULT_MAX_PAYLOAD));
    if min > 512 || 512 % min.max(1) != 0 {
        return Err(NbdError::BlockTooLarge {
            export: export.to_string(),
            min,
        });
    }
    // Below 512 bytes the guest's requests could not be cut to fit; above, the largest
    // whole number of sectors the server allows, at most the default.
    if max < 512 {
        return Err(NbdError::BlockTooSmall {
            export: export.to_string(),
            max,
        });
    }
    let max_payload = (max.min(DEFAULT_MAX_PAYLOAD) / 512) * 512;
    Ok(Export {
        size,
        flags,
        max_payload,
    })
}

/// A request header: `kind` (`CMD_*`) of `len` bytes at `offset`, answered with `cookie`.
pub fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&CMD_FLAGS_NONE.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A simple reply's error and cookie; an error if it is not a simple reply.
pub fn parse_reply(reply: &[u8; REPLY_LEN]) -> Result<(u32, u64), NbdError> {
    let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol {
            what: "reply magic",
            got: u64::from(magic),
            want: u64::from(SIMPLE_REPLY_MAGIC),
        });
    }
    let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap_or_default());
    Ok((error, cookie))
}

/// The errno an NBD error stands for (the protocol's values are Linux's); anything else
/// is EIO.
pub fn errno(error: u32) -> i32 {
    match error {
        1 | 5 | 12 | 22 | 28 | 75 | 108 => error as i32,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: reads go to `from_server`, writes are kept.
    struct Script {
        from_server: std::io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.from_server.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn option_reply(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut v = INFO_EXPORT.to_be_bytes().to_vec();
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn info_block(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for n in [min, pref, max] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        v
    }

    fn run(server: Vec<u8>, export: &str) -> (Result<Export, NbdError>, Vec<u8>) {
        let mut s = Script {
            from_server: std::io::Cursor::new(server),
            sent: Vec::new(),
        };
        let r = handshake(&mut s, export);
        (r, s.sent)
    }

    #[test]
    fn go_negotiates_size_flags_and_block_sizes() {
        let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM;
        let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        server.extend(option_reply(REP_INFO, &info_export(1 << 30, flags)));
        server.extend(option_reply(REP_INFO, &info_block(1, 4096, 1 << 20)));
        server.extend(option_reply(REP_INFO, &[0, 1, b'x']));
        server.extend(option_reply(REP_ACK, &[]));
        let (r, sent) = run(server, "disk");
        let e = r.unwrap();
        assert_eq!(
            e,
            Export {
                size: 1 << 30,
                flags,
                max_payload: 1 << 20
            }
        );
        assert!(e.can_flush() && e.can_trim() && !e.can_write_zeroes() && !e.read_only());
        // Client flags, then GO with the name and one info request.
        assert_eq!(&sent[..4], &3u32.to_be_bytes());
        assert_eq!(&sent[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&sent[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&sent[16..20], &12u32.to_be_bytes());
        assert_eq!(&sent[24..28], b"disk");
        assert_eq!(&sent[28..32], &[0, 1, 0, 3]);
    }

    #[test]
    fn a_server_without_go_is_asked_the_old_way() {
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        server.extend(option_reply(REP_ERR_UNSUP, &[]));
        server.extend((8u64 << 20).to_be_bytes());
        server.extend(TFLAG_HAS_FLAGS.to_be_bytes());
        server.extend([0u8; 124]);
        let (r, _) = run(server, "");
        assert_eq!(r.unwrap().size, 8 << 20);
    }

    #[test]
    fn what_a_server_gets_wrong_is_refused_with_its_reason() {
        let ok_export = || option_reply(REP_INFO, &info_export(1 << 20, TFLAG_HAS_FLAGS));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"HTTP/1.1 200 OK\r\n".to_vec(), "not an NBD server"),
            (
                {
                    let mut v = NBDMAGIC.to_be_bytes().to_vec();
                    v.extend(CLISERV_MAGIC.to_be_bytes());
                    v
                },
                "oldstyle",
            ),
            (greeting(0), "fixed newstyle"),
            (
                {
                    let mut v = greeting(1);
                    v.extend(option_reply(REP_ERR_BIT | 6, b"no such export\n\x1b[31m"));
                    v
                },
                "refused export \"x\": no such export",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(option_reply(REP_ACK, &[]));
                    v
                },
                "without describing",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(option_reply(REP_INFO, &info_export(1000, TFLAG_HAS_FLAGS)));
                    v.extend(option_reply(REP_ACK, &[]));
                    v
                },
                "1000 bytes",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(ok_export());
                    v.extend(option_reply(REP_INFO, &info_block(4096, 4096, 1 << 20)));
                    v.extend(option_reply(REP_ACK, &[]));
                    v
                },
                "whole 4096-byte blocks",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(ok_export());
                    v.extend(option_reply(REP_INFO, &info_block(1, 256, 256)));
                    v.extend(option_reply(REP_ACK, &[]));
                    v
                },
                "at most 256 bytes",
            ),
            (
                {
                    let mut v = greeting(1);
                    for _ in 0..40 {
                        v.extend(option_reply(REP_INFO, &[0, 9]));
                    }
                    v
                },
                "more than 32 option replies",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(OPTION_REPLY_MAGIC.to_be_bytes());
                    v.extend(OPT_GO.to_be_bytes());
                    v.extend(REP_INFO.to_be_bytes());
                    v.extend(u32::MAX.to_be_bytes());
                    v
                },
                "more than 65536",
            ),
            (
                {
                    let mut v = greeting(1);
                    v.extend(ok_export());
                    // Cut off mid-reply.
                    v.extend(&OPTION_REPLY_MAGIC.to_be_bytes()[..4]);
                    v
                },
                "cannot talk",
            ),
        ];
        for (server, says) in cases {
            let (r, _) = run(server, "x");
            let e = r.unwrap_err().to_string();
            assert!(e.contains(says), "want {says:?}: {e}");
            assert!(!e.contains('\x1b'), "{e:?}");
        }
    }

    #[test]
    fn requests_and_replies_are_laid_out_as_the_protocol_says() {
        let h = request(CMD_WRITE, 7, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 7);
        assert_eq!(u64::from_be_bytes(h[16..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_be_bytes(h[24..28].try_into().unwrap()), 512);
        let mut r = [0u8; REPLY_LEN];
        r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&28u32.to_be_bytes());
        r[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_reply(&r).unwrap(), (28, 7));
        assert_eq!(errno(28), 28);
        assert_eq!(errno(999), 5);
        r[0] = 0;
        assert!(parse_reply(&r).is_err());
    }
}
