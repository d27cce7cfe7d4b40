//! The control API: HTTP/1.1 on a Unix socket (`bulkhead run --api-socket PATH`), one
//! request per connection, JSON answers. Shaped as the REST API it will grow into:
//!
//! - `POST /v1/disks/{id}/restart`: planned restart of a disk's worker (e.g. after the
//!   worker binary was replaced on disk); answers once the successor serves:
//!   `{"disk":"blk0","worker_pid":1234,"restart_ms":9.1}`.
//! - `GET /v1/disks/{id}`: the serving worker's pid and mode (`normal`, `fail` past the
//!   crash-loop budget, `none`): `{"disk":"blk0","worker_pid":1234,"mode":"normal"}`.
//!
//! Requests are untrusted: size-limited, parsed strictly, answered with 4xx on anything
//! else. `bulkhead ctl` is the client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::supervisor::DiskHandle;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 8 * 1024;
/// How long a planned restart may take before the API answers with an error.
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Serves requests on `socket` on a thread of its own.
pub fn serve(socket: ApiSocket, disks: Vec<(String, Arc<DiskHandle>)>) -> Result<(), ApiError> {
    let ApiSocket { listener, path, .. } = socket;
    let listen_err = |source| ApiError::Listen {
        path: path.clone(),
        source,
    };
    let disks: HashMap<String, Arc<DiskHandle>> = disks.into_iter().collect();
    crate::thread::spawn("api", crate::confine::VmmThread::Api, move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let disks = disks.clone();
                    // One thread per request: a restart waits for its successor.
                    let _ = crate::thread::spawn(
                        "api-req",
                        crate::confine::VmmThread::Api,
                        move || handle(stream, &disks),
                    );
                }
                Err(e) => tracing::warn!("api: accept failed: {e}"),
            }
        }
    })
    .map_err(listen_err)?;
    tracing::info!("api: listening on {}", path.display());
    Ok(())
}

/// A response: status code, reason and JSON body.
struct Response(u16, &'static str, serde_json::Value);

fn error(code: u16, reason: &'static str, msg: String) -> Response {
    Response(code, reason, serde_json::json!({ "error": msg }))
}

fn handle(stream: UnixStream, disks: &HashMap<String, Arc<DiskHandle>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let response = respond(&stream, disks);
    let mut out = &stream;
    let _ = out.write_all(response.as_bytes());
}

/// The HTTP/1.1 response to the request read from `request` (a client's bytes, hostile as
/// any: this is what the API fuzz target feeds).
pub fn respond(request: impl Read, disks: &HashMap<String, Arc<DiskHandle>>) -> String {
    let response = match read_head(request) {
        Ok((method, target)) => route(&method, &target, disks),
        Err(msg) => error(400, "Bad Request", msg),
    };
    let Response(code, reason, body) = response;
    let body = body.to_string();
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The request line's method and target; headers are read and ignored, a body refused.
fn read_head(stream: impl Read) -> Result<(String, String), String> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD as u64));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {:?}", line.trim_end()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}"));
    }
    loop {
        let mut header = String::new();
        let n = reader
            .read_line(&mut header)
            .map_err(|e| format!("cannot read the headers: {e}"))?;
        if n == 0 {
            return Err("the request head is too long or ends early".into());
        }
        if header == "\r\n" || header == "\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") && value.trim() != "0" {
                return Err("requests take no body".into());
            }
        }
    }
    Ok((method.to_string(), target.to_string()))
}

fn route(method: &str, target: &str, disks: &HashMap<String, Arc<DiskHandle>>) -> Response {
    let segments: Vec<&str> = target.trim_start_matches('/').split('/').collect();
    let find = |id: &str| {
        disks.get(id).ok_or_else(|| {
            let mut known: Vec<&String> = disks.keys().collect();
            known.sort();
            error(
                404,
                "Not Found",
                format!("no disk {id:?} with a worker (disks: {known:?})"),
            )
        })
    };
    match segments.as_slice() {
        ["v1", "disks", id] => {
            if method != "GET" {
                return error(
                    405,
                    "Method Not Allowed",
                    format!("{method} {target}: use GET"),
                );
            }
            let handle = match find(id) {
                Ok(c) => c,
                Err(response) => return response,
            };
            let state = handle.state();
            Response(
                200,
                "OK",
                serde_json::json!({
                    "disk": id,
                    "worker_pid": state.worker_pid,
                    "mode": state.mode,
                }),
            )
        }
        ["v1", "disks", id, "restart"] => {
            if method != "POST" {
                return error(
                    405,
                    "Method Not Allowed",
                    format!("{method} {target}: use POST"),
                );
            }
            let handle = match find(id) {
                Ok(c) => c,
                Err(response) => return response,
            };
            // This thread's lines about the restart name the disk, as its threads' do.
            let _in_disk = tracing::info_span!("disk", id = %id).entered();
            tracing::info!("api: planned restart of disk {id}");
            match handle.restart(RESTART_TIMEOUT) {
                Ok((pid, took)) => Response(
                    200,
                    "OK",
                    serde_json::json!({
                        "disk": id,
                        "worker_pid": pid,
                        "restart_ms": (took.as_secs_f64() * 1e4).round() / 10.0,
                    }),
                ),
                Err(e) => error(409, "Conflict", format!("disk {id}: {e}")),
            }
        }
        _ => error(404, "Not Found", format!("no endpoint {method} {target}")),
    }
}

/// `bulkhead ctl`: sends `method target` to the API at `socket`; returns the status code
/// and the body.
pub fn request(socket: &Path, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: bulkhead\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {head:?}")))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks() -> HashMap<String, Arc<DiskHandle>> {
        HashMap::from([("blk0".to_string(), Arc::new(DiskHandle::default()))])
    }

    fn call(method: &str, target: &str) -> (u16, serde_json::Value) {
        let Response(code, _, body) = route(method, target, &disks());
        (code, body)
    }

    #[test]
    fn disk_state_without_a_worker() {
        let (code, body) = call("GET", "/v1/disks/blk0");
        assert_eq!(code, 200);
        assert_eq!(body["mode"], "none");
        assert!(body["worker_pid"].is_null());
    }

    #[test]
    fn wrong_methods_and_unknown_disks_are_refused() {
        assert_eq!(call("POST", "/v1/disks/blk0").0, 405);
        assert_eq!(call("GET", "/v1/disks/blk0/restart").0, 405);
        let (code, body) = call("GET", "/v1/disks/blk9");
        assert_eq!(code, 404);
        assert!(
            body["error"].as_str().unwrap().contains("\"blk0\""),
            "{body}"
        );
        assert_eq!(call("POST", "/v1/disks/blk9/restart").0, 404);
        assert_eq!(call("GET", "/v2/anything").0, 404);
    }

    #[test]
    fn restarting_a_disk_without_a_worker_conflicts() {
        let (code, body) = call("POST", "/v1/disks/blk0/restart");
        assert_eq!(code, 409, "{body}");
    }
}
