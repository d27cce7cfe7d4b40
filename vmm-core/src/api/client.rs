//! The API's client (`bulkhead ctl`, and tests): hyper's HTTP/1.1 over the Unix socket.

use std::io;
use std::path::Path;
use std::time::Duration;

/// How long a request may take to be answered (a planned restart takes up to 10 s).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no {what} within {ANSWER_TIMEOUT:?}"),
    )
}

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn send(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> io::Result<hyper::Response<Incoming>> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "bulkhead");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))
        .map_err(io::Error::other)?;
    sender.send_request(req).await.map_err(io::Error::other)
}

/// Sends `method target` (no body) to the API at `socket`; returns the status code and
/// the body.
pub fn request(socket: &Path, method: &str, target: &str) -> io::Result<(u16, String)> {
    request_with_body(socket, method, target, None)
}

/// Sends `method target` with a JSON `body`; returns the status code and the body.
pub fn request_with_body(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    runtime()?.block_on(async {
        let answer = async {
            let response = send(socket, method, target, body).await?;
            let code = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(io::Error::other)?
                .to_bytes();
            Ok((code, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| timed_out("answer"))?
    })
}

/// Sends `GET target` and hands each chunk of the answer to `chunk` as it arrives, until
/// the answer ends or `chunk` returns false. Returns the status code (a body that is not
/// a stream is handed over whole).
pub fn stream(
    socket: &Path,
    target: &str,
    mut chunk: impl FnMut(&[u8]) -> bool,
) -> io::Result<u16> {
    runtime()?.block_on(async {
        let response = tokio::time::timeout(ANSWER_TIMEOUT, send(socket, "GET", target, None))
            .await
            .map_err(|_| timed_out("answer's head"))??;
        let code = response.status().as_u16();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                if !chunk(data) {
                    break;
                }
            }
        }
        Ok(code)
    })
}
