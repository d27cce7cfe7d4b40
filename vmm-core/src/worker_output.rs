//! A worker's stdout and stderr: one pipe the VMM reads, never a descriptor of the VMM's
//! own log. Each line the worker writes is re-emitted as a VMM log line that names the
//! disk, with control characters escaped (a worker cannot forge a VMM line or put terminal
//! escape sequences into the operator's terminal), cut at [`MAX_LINE`] bytes, and at most
//! [`BURST`] lines a window per disk (successors share their disk's limit).

use std::io::Read;
use std::sync::Arc;

use crate::ratelimit::RateLimitedLog;

/// The longest line re-emitted; the rest is counted, not kept.
pub const MAX_LINE: usize = 512;
/// Lines a disk's workers may log in one [`crate::ratelimit::WINDOW`].
pub const BURST: u32 = 100;

/// A limiter for one disk's worker output.
pub fn limiter() -> Arc<RateLimitedLog> {
    Arc::new(RateLimitedLog::with_burst(BURST))
}

/// How important a worker says a line is (from the level its logger wrote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// `bytes` as text that holds no control character: printable ASCII and other printable
/// characters stay, everything else (ESC, CR, BEL, NUL, invalid UTF-8, ...) becomes `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The level a worker's own logger gave a line (`TIME LEVEL message`: among its first
/// three words). Lines a worker writes without its logger are Info, but for those that say
/// why it failed (its error lines and a panic's message), which are Error: they must
/// survive `--log-level warn`.
fn level_of(line: &str) -> Level {
    if line.starts_with("bulkhead-worker: error:")
        || (line.starts_with("thread '") && line.contains(" panicked at "))
    {
        return Level::Error;
    }
    line.split_whitespace()
        .take(3)
        .find_map(|w| match w {
            "ERROR" => Some(Level::Error),
            "WARN" => Some(Level::Warn),
            "INFO" => Some(Level::Info),
            "DEBUG" => Some(Level::Debug),
            "TRACE" => Some(Level::Trace),
            _ => None,
        })
        .unwrap_or(Level::Info)
}

/// Reads `input` to its end, calling `emit` with each line (escaped, cut, admitted by
/// `limit`) and how many earlier lines the limit left out.
pub fn forward(mut input: impl Read, limit: &RateLimitedLog, mut emit: impl FnMut(Level, &str)) {
    let mut line: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut cut = 0usize;
    let mut buf = [0u8; 4096];
    let mut finish = |line: &mut Vec<u8>, cut: &mut usize| {
        if let Some(left_out) = limit.admit() {
            let mut text = escape(line);
            if *cut > 0 {
                text.push_str(&format!(" [{cut} more bytes cut]"));
            }
            if left_out > 0 {
                text.push_str(&format!(" [{left_out} earlier lines left out]"));
            }
            emit(level_of(&text), &text);
        }
        line.clear();
        *cut = 0;
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                finish(&mut line, &mut cut);
            } else if line.len() < MAX_LINE {
                line.push(b);
            } else {
                cut += 1;
            }
        }
    }
    if !line.is_empty() || cut > 0 {
        finish(&mut line, &mut cut);
    }
}

/// Re-emits what the worker of disk `id` writes to `pipe`, on a thread of its own, until
/// every writer has closed it (the worker and its reaper have ended).
pub fn spawn_forwarder(
    id: &str,
    pipe: std::fs::File,
    limit: Arc<RateLimitedLog>,
) -> std::io::Result<()> {
    let disk = id.to_string();
    crate::thread::spawn(
        format!("{id}-out"),
        crate::confine::VmmThread::Output,
        move || {
            forward(pipe, &limit, |level, text| match level {
                Level::Error => tracing::error!("worker {disk}: {text}"),
                Level::Warn => tracing::warn!("worker {disk}: {text}"),
                Level::Info => tracing::info!("worker {disk}: {text}"),
                Level::Debug => tracing::debug!("worker {disk}: {text}"),
                Level::Trace => tracing::trace!("worker {disk}: {text}"),
            })
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], burst: u32) -> Vec<(Level, String)> {
        let limit = RateLimitedLog::with_burst(burst);
        let mut out = Vec::new();
        forward(input, &limit, |l, t| out.push((l, t.to_string())));
        out
    }

    #[test]
    fn control_characters_and_bad_utf8_are_escaped() {
        assert_eq!(
            escape(b"\x1b[31mred\x1b[0m\r\x07 ok \xff\xfe \xc3\xa9"),
            "\\x1b[31mred\\x1b[0m\\x0d\\x07 ok \\xff\\xfe \u{e9}"
        );
        // A forged VMM line stays inside the worker's line.
        let out = lines(b"INFO worker blk0 (pid 1) ended with the VM\n\x1b[2J", 10);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1, "INFO worker blk0 (pid 1) ended with the VM");
        assert_eq!(
            out[1].1, "\\x1b[2J",
            "a last line without a newline is kept"
        );
    }

    #[test]
    fn long_lines_are_cut_and_say_so() {
        let mut input = vec![b'a'; MAX_LINE + 1000];
        input.extend_from_slice(b"\nnext\n");
        let out = lines(&input, 10);
        assert_eq!(out.len(), 2);
        assert!(out[0].1.starts_with(&"a".repeat(MAX_LINE)));
        assert!(out[0].1.ends_with(" [1000 more bytes cut]"), "{}", out[0].1);
        assert_eq!(out[1].1, "next");
    }

    #[test]
    fn a_flood_is_cut_to_the_burst() {
        let input: Vec<u8> = (0..1000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let out = lines(&input, 7);
        assert_eq!(out.len(), 7);
        assert_eq!(out[6].1, "line 6");
    }

    #[test]
    fn levels_follow_the_workers_logger() {
        let out = lines(
            b"2026-12-07T02:00:00Z  WARN disk slow\n2026-12-07T02:00:00Z ERROR bad\nbulkhead-worker: serving\n2026-12-07T02:00:00Z DEBUG ring 0\nbulkhead-worker: error: cannot map\nthread 'main' (7) panicked at src/x.rs:1:1:\n",
            10,
        );
        let levels: Vec<Level> = out.iter().map(|(l, _)| *l).collect();
        assert_eq!(
            levels,
            [
                Level::Warn,
                Level::Error,
                Level::Info,
                Level::Debug,
                Level::Error,
                Level::Error
            ]
        );
    }
}
