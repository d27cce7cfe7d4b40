//! The API's server: hyper's HTTP/1.1 on a single-threaded tokio runtime, on the confined
//! `api` thread. Every resource a client can make it hold is bounded:
//!
//! - at most [`MAX_CONNECTIONS`] connections (each holds a permit until its socket is
//!   closed, so descriptors stay bounded under a flood of connects); when a new one comes
//!   at the limit, the oldest that has sent no request is closed to make room (once it is
//!   [`MIN_IDLE`] old: its request may be in its socket, unread), so idle clients cannot
//!   crowd out a working one; only when every connection is busy is the newcomer
//!   answered 503 and closed;
//! - one request per connection; its head must arrive within [`HEAD_TIMEOUT`] and fit in
//!   [`MAX_HEAD`]; a body is at most [`MAX_BODY`]; a connection ends [`REQUEST_TIMEOUT`]
//!   after it was accepted, unless it became an event stream;
//! - at most [`MAX_STREAMS`] event streams, each fed from the event log at its own pace; a
//!   stream whose client is gone, or reads nothing for [`STREAM_STALL`], is closed;
//! - at most [`MAX_BLOCKING`] requests whose work blocks (each on a thread of its own)
//!   at once, however many clients ask and then hang up;
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
use std::time::{Duration, Instant};

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
const KEEPALIVE: Duration = Duration::from_secs(5);
/// An event stream whose client reads nothing this long is closed.
pub const STREAM_STALL: Duration = Duration::from_secs(30);
/// Requests whose work blocks (restart, pause), under way at once.
pub const MAX_BLOCKING: usize = 4;
/// A connection younger than this is never closed to make room: its request may be in
/// its socket, not yet read.
pub const MIN_IDLE: Duration = Duration::from_millis(100);
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

/// The limits every connection shares.
#[derive(Clone)]
struct Limits {
    /// One permit per open connection, held until its socket is closed.
    connections: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    blocking: Arc<Semaphore>,
    open: Arc<Connections>,
}

impl Limits {
    fn new() -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            blocking: Arc::new(Semaphore::new(MAX_BLOCKING)),
            open: Arc::new(Connections::default()),
        }
    }
}

/// HTTP/1.1 as the API serves it: one request per connection, its head bounded in size
/// and time.
fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD);
    builder
}

/// An open connection: whether it has sent a request, when it was accepted, and how to
/// close it.
struct Open {
    busy: Arc<AtomicBool>,
    accepted: Instant,
    task: tokio::task::AbortHandle,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    open: Mutex<BTreeMap<u64, Open>>,
}

impl Connections {
    /// Closes the oldest connection that has sent no request for [`MIN_IDLE`]; false if
    /// there is none. Its permit comes back once its task is dropped.
    fn evict_idle(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let idle = open
            .iter()
            .find(|(_, c)| !c.busy.load(Ordering::Relaxed) && c.accepted.elapsed() >= MIN_IDLE)
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some(c) => {
                c.task.abort();
                true
            }
            None => false,
        }
    }

    /// How long the oldest connection that has sent no request has been open.
    fn oldest_idle_age(&self) -> Option<Duration> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values()
            .filter(|c| !c.busy.load(Ordering::Relaxed))
            .map(|c| c.accepted.elapsed())
            .max()
    }

    fn insert(&self, id: u64, open: Open) {
        let mut all = self.open.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(id, open);
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&id);
    }
}

/// A connection's permit for a client just accepted: a free one, or the one an idle
/// connection gives back when it is closed to make room (a connection younger than
/// [`MIN_IDLE`] is waited for, at most that long). None when every connection is busy.
async fn make_room(limits: &Limits) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(permit) = limits.connections.clone().try_acquire_owned() {
            return Some(permit);
        }
        if limits.open.evict_idle() {
            // The evicted connection's socket is closed once its task is dropped, which
            // this wait lets happen.
            return limits.connections.clone().acquire_owned().await.ok();
        }
        let age = limits.open.oldest_idle_age()?;
        let wait = MIN_IDLE.saturating_sub(age).max(Duration::from_millis(1));
        tokio::time::sleep(wait).await;
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, ctx: Arc<ApiContext>) {
    let limits = Limits::new();
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
        let Some(permit) = make_room(&limits).await else {
            refuse(&stream);
            continue;
        };
        let id = next_id;
        next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(connection(
            stream,
            permit,
            ctx.clone(),
            busy.clone(),
            limits.clone(),
            id,
        ));
        // The task has not run yet (this thread is the runtime's only one), so it is
        // known before it can end and remove itself.
        limits.open.insert(
            id,
            Open {
                busy,
                accepted: Instant::now(),
                task: task.abort_handle(),
            },
        );
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

/// Whether a connection became an event stream, and the stream's word that it is over.
#[derive(Default)]
struct StreamState {
    streaming: AtomicBool,
    ended: tokio::sync::Notify,
}

async fn connection(
    stream: tokio::net::UnixStream,
    _permit: OwnedSemaphorePermit,
    ctx: Arc<ApiContext>,
    busy: Arc<AtomicBool>,
    limits: Limits,
    id: u64,
) {
    let state = Arc::new(StreamState::default());
    let service = {
        let state = state.clone();
        let limits = limits.clone();
        hyper::service::service_fn(move |req| {
            busy.store(true, Ordering::Relaxed);
            handle(req, ctx.clone(), limits.clone(), state.clone())
        })
    };
    let conn = http1().serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = &mut conn => {}
        _ = tokio::time::sleep(REQUEST_TIMEOUT) => {
            // An event stream lasts as long as its client reads it.
            if state.streaming.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = conn => {}
                    _ = state.ended.notified() => {}
                }
            }
        }
    }
    limits.open.remove(id);
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
    limits: Limits,
    state: Arc<StreamState>,
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
                serde_json::json!({
                    "events": since.events,
                    "missed": since.missed,
                    "reset": since.reset,
                }),
            )
        }
        Reply::Events {
            after,
            follow: true,
        } => match limits.streams.clone().try_acquire_owned() {
            Ok(permit) => {
                state.streaming.store(true, Ordering::Relaxed);
                event_stream(ctx.events.clone(), after, permit, state)
            }
            Err(_) => json(
                503,
                serde_json::json!({ "error": format!("too many event streams ({MAX_STREAMS}) are open") }),
            ),
        },
        Reply::Blocking(work) => {
            // Held by the thread: a client that hangs up does not free it.
            let Ok(permit) = limits.blocking.clone().try_acquire_owned() else {
                return Ok(json(
                    503,
                    serde_json::json!({ "error": format!("{MAX_BLOCKING} restarts or pauses are under way; try again") }),
                ));
            };
            let (tx, rx) = oneshot::channel();
            let started =
                crate::thread::spawn("api-work", crate::confine::VmmThread::Api, move || {
                    let _ = tx.send(work());
                    drop(permit);
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

/// Sends `chunk` on a stream's channel; false once the client is gone or has read
/// nothing for [`STREAM_STALL`].
async fn send_chunk(tx: &mpsc::Sender<Bytes>, chunk: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STREAM_STALL, tx.send(chunk)).await,
        Ok(Ok(()))
    )
}

/// The events after `after`, then each new one as it comes, for as long as the client
/// reads; `permit` is its place among [`MAX_STREAMS`], given back as soon as the client
/// is gone or stalls (then the connection is closed too).
fn event_stream(
    events: Arc<EventLog>,
    after: u64,
    permit: OwnedSemaphorePermit,
    state: Arc<StreamState>,
) -> Response<ApiBody> {
    // A small channel: a client that does not read holds up only its own feeder.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        feed(&events, after, &tx).await;
        drop(permit);
        state.ended.notify_one();
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(ChannelBody(rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// Feeds a stream until its client is gone or stalls.
async fn feed(events: &EventLog, after: u64, tx: &mpsc::Sender<Bytes>) {
    let mut latest = events.subscribe();
    let mut after = after;
    loop {
        latest.borrow_and_update();
        let since = events.since(after, EVENT_BATCH);
        if since.reset {
            let line = format!(
                "event: reset\ndata: {{\"after\":{after},\"latest\":{}}}\n\n",
                events.latest()
            );
            if !send_chunk(tx, Bytes::from(line)).await {
                return;
            }
            after = 0;
        }
        if since.missed > 0 {
            let line = format!(
                "event: missed\ndata: {{\"missed\":{},\"after\":{after}}}\n\n",
                since.missed
            );
            if !send_chunk(tx, Bytes::from(line)).await {
                return;
            }
        }
        let full = since.events.len() == EVENT_BATCH;
        for event in &since.events {
            if !send_chunk(tx, sse(event)).await {
                return;
            }
            after = event.seq;
        }
        if full {
            continue;
        }
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = tokio::time::sleep(KEEPALIVE) => {
                if !send_chunk(tx, Bytes::from_static(b": keep-alive\n\n")).await {
                    return;
                }
            }
        }
    }
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
        let limits = Limits::new();
        let state = Arc::new(StreamState::default());
        let service = hyper::service::service_fn(move |req| {
            handle(req, ctx.clone(), limits.clone(), state.clone())
        });
        let conn = http1()
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
