//! The API's server: hyper's HTTP/1.1 on a single-threaded tokio runtime, on the confined
//! `api` thread. Every resource a client can make it hold is bounded:
//!
//! - at most [`MAX_CONNECTIONS`] connections; when a new one comes at the limit, the
//!   oldest that has not sent a request yet is closed to make room (idle clients cannot
//!   crowd out a working one), and only when every connection is busy is the newcomer
//!   answered 503 and closed;
//! - one request per connection; its head must arrive within [`HEAD_TIMEOUT`] and fit in
//!   [`MAX_HEAD`]; a body is at most [`MAX_BODY`]; a connection ends [`REQUEST_TIMEOUT`]
//!   after it was accepted, unless it became an event stream;
//! - at most [`MAX_STREAMS`] event streams, each fed from the event log at its own pace;
//! - at the descriptor limit `accept` fails: the listener waits [`ACCEPT_BACKOFF`] and
//!   tries again, logging at most a few lines per window, instead of spinning.
//!
//! Work that blocks (a planned restart, a pause) runs on a thread of its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::net::UnixListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::context::ApiContext;
use super::routes::{self, Reply};
use super::socket::{ApiError, ApiSocket};
use crate::events::EventLog;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Event streams open at once (each holds a connection).
pub const MAX_STREAMS: usize = 16;
/// The request head (line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// A request body.
pub const MAX_BODY: usize = 4 * 1024;
/// Time for the request head to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time from accept to the end of the answer (a planned restart takes up to 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the listener waits after `accept` failed (out of descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// An event stream with nothing to say sends a comment this often, so a client that is
/// gone is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Events sent per read of the log.
const EVENT_BATCH: usize = 64;

type ApiBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves requests on `socket` on a thread of its own (see [`server`]).
pub fn serve(socket: ApiSocket, ctx: ApiContext) -> Result<(), ApiError> {
    let (listener, path) = socket.into_parts();
    let listen_err = |source| ApiError::Listen {
        path: path.clone(),
        source,
    };
    // tokio takes the listener as it is: non-blocking, set here before any filter.
    listener.set_nonblocking(true).map_err(listen_err)?;
    let prepared = prepare(listener).map_err(listen_err)?;
    let ctx = Arc::new(ctx);
    crate::thread::spawn("api", crate::confine::VmmThread::Api, move || {
        run(prepared, ctx)
    })
    .map_err(listen_err)?;
    tracing::info!("api: listening on {}", path.display());
    Ok(())
}

/// The server's runtime and listener, made on the thread that sets the VM up: the event
/// loop's descriptors (epoll, its waker) exist before the API thread is confined, so its
/// policy need not allow making them.
#[derive(Debug)]
pub struct Prepared {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::UnixListener,
}

/// Makes the runtime and hands it the (non-blocking) listener.
pub fn prepare(listener: UnixListener) -> std::io::Result<Prepared> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listener = {
        let _in_runtime = runtime.enter();
        tokio::net::UnixListener::from_std(listener)?
    };
    Ok(Prepared { runtime, listener })
}

/// Runs the server until the process ends.
pub fn run(prepared: Prepared, ctx: Arc<ApiContext>) {
    let Prepared { runtime, listener } = prepared;
    runtime.block_on(accept_loop(listener, ctx));
}

/// The open connections: whether each has sent a request, and how to close it.
#[derive(Default)]
struct Connections {
    open: Mutex<BTreeMap<u64, (Arc<AtomicBool>, tokio::task::AbortHandle)>>,
}

impl Connections {
    /// Whether a new connection may be served: below the limit, or once the oldest idle
    /// one was closed.
    fn make_room(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() < MAX_CONNECTIONS {
            return true;
        }
        let idle = open
            .iter()
            .find(|(_, (busy, _))| !busy.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }

    fn insert(&self, id: u64, busy: Arc<AtomicBool>, task: tokio::task::AbortHandle) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.insert(id, (busy, task));
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&id);
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, ctx: Arc<ApiContext>) {
    let connections = Arc::new(Connections::default());
    let streams = Arc::new(Semaphore::new(MAX_STREAMS));
    let failures = crate::ratelimit::RateLimitedLog::default();
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                failures.log(format_args!(
                    "api: cannot accept a connection: {e}; trying again in {ACCEPT_BACKOFF:?}"
                ));
                // Out of descriptors, the client waits in the backlog until one is free:
                // retrying at once would spin.
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if !connections.make_room() {
            refuse(&stream);
            continue;
        }
        let id = next_id;
        next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(connection(
            stream,
            ctx.clone(),
            busy.clone(),
            streams.clone(),
            connections.clone(),
            id,
        ));
        // The task has not run yet (this thread is the runtime's only one), so it is
        // known before it can end and remove itself.
        connections.insert(id, busy, task.abort_handle());
    }
}

/// Answers 503 to a connection over the limit, without waiting for it.
fn refuse(stream: &tokio::net::UnixStream) {
    let body =
        format!(r#"{{"error":"too many connections: {MAX_CONNECTIONS} are busy; try again"}}"#);
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

async fn connection(
    stream: tokio::net::UnixStream,
    ctx: Arc<ApiContext>,
    busy: Arc<AtomicBool>,
    streams: Arc<Semaphore>,
    connections: Arc<Connections>,
    id: u64,
) {
    let streaming = Arc::new(AtomicBool::new(false));
    let service = {
        let streaming = streaming.clone();
        hyper::service::service_fn(move |req| {
            busy.store(true, Ordering::Relaxed);
            handle(req, ctx.clone(), streams.clone(), streaming.clone())
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        _ = tokio::time::sleep(REQUEST_TIMEOUT) => {
            // An event stream lasts as long as its client reads it.
            if streaming.load(Ordering::Relaxed) {
                let _ = conn.await;
            }
        }
    }
    connections.remove(id);
}

fn json(code: u16, body: serde_json::Value) -> Response<ApiBody> {
    let mut text = body.to_string();
    text.push('\n');
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ApiContext>,
    streams: Arc<Semaphore>,
    streaming: Arc<AtomicBool>,
) -> Result<Response<ApiBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(json(
                413,
                serde_json::json!({ "error": format!("the body is larger than {MAX_BODY} bytes or ends early: {e}") }),
            ))
        }
    };
    let last_event_id = parts
        .headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("not text"));
    let reply = routes::route(
        &ctx,
        routes::Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            last_event_id,
            body: &body,
        },
    );
    Ok(match reply {
        Reply::Json(code, body) => json(code, body),
        Reply::Metrics(text) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(text)).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
        Reply::Events {
            after,
            follow: false,
        } => {
            let since = ctx.events.since(after, crate::events::KEPT);
            json(
                200,
                serde_json::json!({ "events": since.events, "missed": since.missed }),
            )
        }
        Reply::Events {
            after,
            follow: true,
        } => match streams.try_acquire_owned() {
            Ok(permit) => {
                streaming.store(true, Ordering::Relaxed);
                event_stream(ctx.events.clone(), after, permit)
            }
            Err(_) => json(
                503,
                serde_json::json!({ "error": format!("too many event streams ({MAX_STREAMS}) are open") }),
            ),
        },
        Reply::Blocking(work) => {
            let (tx, rx) = oneshot::channel();
            let started =
                crate::thread::spawn("api-work", crate::confine::VmmThread::Api, move || {
                    let _ = tx.send(work());
                });
            match started {
                Ok(_) => match rx.await {
                    Ok((code, body)) => json(code, body),
                    Err(_) => json(
                        500,
                        serde_json::json!({ "error": "the request's work ended without an answer" }),
                    ),
                },
                Err(e) => json(
                    503,
                    serde_json::json!({ "error": format!("cannot start a thread for the request: {e}") }),
                ),
            }
        }
    })
}

/// A body fed by a channel: the chunks of an event stream.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// A server-sent event (`text/event-stream`): its id is the sequence number, so a client
/// that reconnects with `Last-Event-ID` resumes after it.
fn sse(event: &crate::events::Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.seq, event.kind
    ))
}

/// The events after `after`, then each new one as it comes, for as long as the client
/// reads; `permit` is its place among [`MAX_STREAMS`].
fn event_stream(
    events: Arc<EventLog>,
    after: u64,
    permit: OwnedSemaphorePermit,
) -> Response<ApiBody> {
    // A small channel: a client that does not read holds up only its own feeder.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _permit = permit;
        let mut latest = events.subscribe();
        let mut after = after;
        loop {
            latest.borrow_and_update();
            let since = events.since(after, EVENT_BATCH);
            if since.missed > 0 {
                let line = format!(
                    "event: missed\ndata: {{\"missed\":{},\"after\":{after}}}\n\n",
                    since.missed
                );
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            let full = since.events.len() == EVENT_BATCH;
            for event in &since.events {
                if tx.send(sse(event)).await.is_err() {
                    return;
                }
                after = event.seq;
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(ChannelBody(rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// The whole answer to `request` (a client's bytes, hostile as any) from this server's
/// own stack, hyper included, over an in-memory connection: what the API fuzz target
/// feeds. Event streams are answered by their head and first chunk.
pub fn respond(request: &[u8], ctx: Arc<ApiContext>) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let streams = Arc::new(Semaphore::new(MAX_STREAMS));
        let streaming = Arc::new(AtomicBool::new(false));
        let service = hyper::service::service_fn(move |req| {
            handle(req, ctx.clone(), streams.clone(), streaming.clone())
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .keep_alive(false)
            .max_buf_size(MAX_HEAD)
            // The input ends where the fuzzer's bytes end: answer what came before.
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        let served = tokio::spawn(conn);
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(200), client.read_to_end(&mut out)).await;
        served.abort();
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(request: &str) -> String {
        let ctx = Arc::new(super::super::routes::tests::context());
        String::from_utf8_lossy(&respond(request.as_bytes(), ctx)).into_owned()
    }

    #[test]
    fn requests_get_answers_and_malformed_ones_a_400() {
        let ok = answer("GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\"vcpus\":2"), "{ok}");
        let bad = answer("GARBAGE\r\n\r\n");
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let huge = format!(
            "GET /v1/vm HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD * 2)
        );
        let refused = answer(&huge);
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    }

    #[test]
    fn a_body_over_the_limit_is_refused() {
        let body = "x".repeat(MAX_BODY + 1);
        let req = format!(
            "PUT /v1/vm/state HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let out = answer(&req);
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    }

    #[test]
    fn an_event_stream_starts_with_the_kept_events() {
        let ctx = Arc::new(super::super::routes::tests::context());
        ctx.events.emit(
            "restart",
            Some("blk0"),
            serde_json::json!({ "cause": "crash" }),
        );
        let out = respond(b"GET /v1/events?since=0 HTTP/1.1\r\n\r\n", ctx.clone());
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("content-type: text/event-stream"), "{out}");
        assert!(out.contains("id: 1\nevent: restart\ndata: {"), "{out}");
        assert!(out.contains("\"cause\":\"crash\""), "{out}");
    }
}
