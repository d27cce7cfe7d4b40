//! What each request means: the routes, their answers, and the work that has to leave the
//! API's thread. Pure of I/O, so every route is tested (and fuzzed) without a socket.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::context::{ApiContext, ApiDisk};

/// How long a planned restart may take before the API answers with an error.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new rate limit may take to reach the disk's worker before the API answers
/// that it is kept but not yet in force (the supervisor looks every 100 ms).
pub const LIMIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a resize may take before the API answers that it is still under way (and
/// stays asked for): a restart and the image's own resize, within the server's limit on a
/// request.
pub const RESIZE_TIMEOUT: Duration = Duration::from_secs(10);

/// One route: a method and a path template (`{id}` matches one segment). The OpenAPI
/// description (`docs/openapi.json`) lists exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
}

/// Every route served.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/vm",
    },
    Route {
        method: "PUT",
        path: "/v1/vm/state",
    },
    Route {
        method: "GET",
        path: "/v1/disks",
    },
    Route {
        method: "GET",
        path: "/v1/disks/{id}",
    },
    Route {
        method: "PATCH",
        path: "/v1/disks/{id}",
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/restart",
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/resize",
    },
    Route {
        method: "GET",
        path: "/v1/events",
    },
    Route {
        method: "GET",
        path: "/metrics",
    },
];

/// Work a request needs done on a thread of its own (it blocks); returns the answer.
pub type BlockingWork = Box<dyn FnOnce() -> (u16, Value) + Send>;

/// What the server is to answer.
pub enum Reply {
    /// A JSON body with this status.
    Json(u16, Value),
    /// Prometheus text exposition.
    Metrics(String),
    /// The events after `after`: as a stream (`follow`), or the kept ones as JSON.
    Events { after: u64, follow: bool },
    /// The answer of work that blocks.
    Blocking(BlockingWork),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Json(code, body) => write!(f, "Json({code}, {body})"),
            Reply::Metrics(text) => write!(f, "Metrics({} bytes)", text.len()),
            Reply::Events { after, follow } => write!(f, "Events({after}, {follow})"),
            Reply::Blocking(_) => f.write_str("Blocking"),
        }
    }
}

fn error(code: u16, msg: impl Into<String>) -> Reply {
    Reply::Json(code, json!({ "error": msg.into() }))
}

/// The request as the server read it (the head's parts that matter, and the body).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The SSE `Last-Event-ID` header: where a reconnecting stream resumes.
    pub last_event_id: Option<&'a str>,
    pub body: &'a [u8],
}

/// The route `path` matches, with what `{id}` matched.
fn find(method: &str, path: &str) -> Result<(Route, Option<String>), Reply> {
    let segments: Vec<&str> = path.split('/').collect();
    let mut allowed = Vec::new();
    for route in ROUTES {
        let template: Vec<&str> = route.path.split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut id = None;
        let matched = template.iter().zip(&segments).all(|(t, s)| {
            if *t == "{id}" {
                id = Some(s.to_string());
                !s.is_empty()
            } else {
                t == s
            }
        });
        if !matched {
            continue;
        }
        if route.method == method {
            return Ok((*route, id));
        }
        allowed.push(route.method);
    }
    Err(if allowed.is_empty() {
        error(
            404,
            format!("no endpoint {method} {path} (see docs/openapi.json)"),
        )
    } else {
        error(
            405,
            format!("{method} {path}: use {}", allowed.join(" or ")),
        )
    })
}

/// The answer to `req`. Every client byte has been bounded by the server; here it is
/// parsed strictly, and anything unexpected gets a 4xx that says what.
pub fn route(ctx: &ApiContext, req: Request) -> Reply {
    let (route, id) = match find(req.method, req.path) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let takes_body = matches!(route.method, "PUT" | "PATCH") || route.path.ends_with("/resize");
    if !req.body.is_empty() && !takes_body {
        return error(400, format!("{} {} takes no body", req.method, req.path));
    }
    let query = match parse_query(req.query) {
        Ok(q) => q,
        Err(msg) => return error(400, msg),
    };
    let allowed: &[&str] = if route.path == "/v1/events" {
        &["since", "follow"]
    } else {
        &[]
    };
    if let Some((key, _)) = query.iter().find(|(k, _)| !allowed.contains(k)) {
        return error(
            400,
            format!("{} takes no query parameter {key:?}", req.path),
        );
    }
    let disk = || {
        let id = id.as_deref().unwrap_or_default();
        ctx.disks.iter().find(|d| d.id == id).ok_or_else(|| {
            let known: Vec<&str> = ctx.disks.iter().map(|d| d.id.as_str()).collect();
            error(404, format!("no disk {id:?} (disks: {known:?})"))
        })
    };
    match route.path {
        "/v1/vm" => Reply::Json(200, vm_info(ctx)),
        "/v1/vm/state" => set_state(ctx, req.body),
        "/v1/disks" => Reply::Json(
            200,
            json!({ "disks": ctx.disks.iter().map(|d| disk_info(ctx, d)).collect::<Vec<_>>() }),
        ),
        "/v1/disks/{id}" => match (disk(), route.method) {
            (Ok(d), "PATCH") => set_limit(ctx, d, req.body),
            (Ok(d), _) => Reply::Json(200, disk_info(ctx, d)),
            (Err(reply), _) => reply,
        },
        "/v1/disks/{id}/restart" => match disk() {
            Ok(d) => restart(d),
            Err(reply) => reply,
        },
        "/v1/disks/{id}/resize" => match disk() {
            Ok(d) => resize(d, req.body),
            Err(reply) => reply,
        },
        "/v1/events" => events(&query, req.last_event_id),
        "/metrics" => Reply::Metrics(crate::metrics::render(ctx)),
        other => error(500, format!("route {other} has no handler")),
    }
}

/// `a=1&b=2`, each key at most once, values plain (no percent-encoding is needed by any
/// parameter here, so none is accepted).
fn parse_query(query: Option<&str>) -> Result<Vec<(&str, &str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("query parameter {key:?} given twice"));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn events(query: &[(&str, &str)], last_event_id: Option<&str>) -> Reply {
    let get = |key| query.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let since = match (get("since"), last_event_id) {
        (Some(_), Some(_)) => {
            return error(400, "give either ?since= or Last-Event-ID, not both");
        }
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => "0",
    };
    let Ok(after) = since.trim().parse::<u64>() else {
        return error(400, format!("since {since:?} is not a sequence number"));
    };
    let follow = match get("follow") {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => return error(400, format!("follow {other:?}: use true or false")),
    };
    Reply::Events { after, follow }
}

fn vm_info(ctx: &ApiContext) -> Value {
    json!({
        "state": ctx.control.state(),
        "vcpus": ctx.vcpus,
        "memory_mib": ctx.mem_mib,
        "uptime_s": (ctx.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "disks": ctx.disks.len(),
        "config": ctx.config,
    })
}

/// A disk: configuration, who serves it, its counters and its last violations.
pub fn disk_info(ctx: &ApiContext, disk: &ApiDisk) -> Value {
    let violations: Vec<Value> = ctx
        .stats
        .violations
        .recent()
        .into_iter()
        .filter(|v| v.disk == disk.id)
        .map(|v| {
            json!({
                "pid": v.pid,
                "policy": v.policy,
                "call": v.call,
                "time_ms": v.when.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    let (backend, worker_pid, mode) = match &disk.handle {
        Some(h) => {
            let state = h.state();
            ("worker", json!(state.worker_pid), state.mode)
        }
        None => ("vhost_user", Value::Null, "external"),
    };
    json!({
        "id": disk.id,
        "backend": backend,
        "worker_pid": worker_pid,
        "mode": mode,
        "counters": disk.handle.as_ref().map(|h| h.counters().snapshot().to_json()),
        "violations": violations,
        "config": disk.config,
        "rate_limiter": disk.handle.as_ref().map(|h| limit_json(&h.rate_limit().0)),
        "size_bytes": disk.handle.as_ref().map(|h| h.size()),
    })
}

/// A token bucket as the API writes it (Firecracker's names: `size`, `one_time_burst`,
/// `refill_time` in milliseconds).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketJson {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time: u64,
}

impl From<BucketJson> for ipc::messages::TokenBucket {
    fn from(b: BucketJson) -> Self {
        ipc::messages::TokenBucket {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time_ms: b.refill_time,
        }
    }
}

impl From<ipc::messages::TokenBucket> for BucketJson {
    fn from(b: ipc::messages::TokenBucket) -> Self {
        BucketJson {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time_ms,
        }
    }
}

/// The disk's limits, as `GET` shows them and `PATCH` takes them: `null` is unlimited.
pub fn limit_json(limit: &ipc::messages::RateLimit) -> Value {
    json!({
        "bandwidth": limit.bandwidth.map(BucketJson::from),
        "ops": limit.ops.map(BucketJson::from),
    })
}

/// The body of `PATCH /v1/disks/{id}`: a bucket given replaces the disk's, `null`
/// removes it, and one left out stays as it is.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskPatch {
    rate_limiter: LimiterPatch,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimiterPatch {
    #[serde(default, deserialize_with = "present")]
    bandwidth: Option<Option<BucketJson>>,
    #[serde(default, deserialize_with = "present")]
    ops: Option<Option<BucketJson>>,
}

/// A key that is there, `null` or not (serde's `Option` alone cannot tell `null` from
/// absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<BucketJson>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// The handle of a disk bulkhead's workers serve; a 409 that says `why_not` for one an
/// external vhost-user backend serves.
fn worker_handle(
    disk: &ApiDisk,
    why_not: &str,
) -> Result<Arc<crate::supervisor::DiskHandle>, Reply> {
    disk.handle.clone().ok_or_else(|| {
        error(
            409,
            format!(
                "disk {} is served by an external vhost-user backend: {why_not}",
                disk.id
            ),
        )
    })
}

fn set_limit(ctx: &ApiContext, disk: &ApiDisk, body: &[u8]) -> Reply {
    let handle = match worker_handle(disk, "its limits are its own") {
        Ok(h) => h,
        Err(reply) => return reply,
    };
    let patch: DiskPatch = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                400,
                format!(
                    r#"the body must be {{"rate_limiter": {{"bandwidth": BUCKET|null, "ops": BUCKET|null}}}} with BUCKET {{"size": N, "refill_time": MS, "one_time_burst": N}}: {e}"#
                ),
            )
        }
    };
    let id = disk.id.clone();
    let events = ctx.events.clone();
    Reply::Blocking(Box::new(move || {
        let _in_disk = tracing::info_span!("disk", id = %id).entered();
        // Merged with the limits in force under the handle's lock: two PATCHes at once
        // both count.
        let merge = |mut limit: ipc::messages::RateLimit| {
            if let Some(b) = patch.rate_limiter.bandwidth {
                limit.bandwidth = b.map(Into::into);
            }
            if let Some(b) = patch.rate_limiter.ops {
                limit.ops = b.map(Into::into);
            }
            ipc::messages::Validate::validate(&limit).map_err(|e| format!("rate_limiter: {e}"))?;
            tracing::info!(
                "api: rate limit of disk {id}: {}",
                crate::disk::config::describe_limit(&limit)
            );
            Ok(limit)
        };
        let (limit, applied) = match handle.change_rate_limit(merge, LIMIT_TIMEOUT) {
            Ok(done) => done,
            Err(msg) => return (400, json!({ "error": msg })),
        };
        events.emit(
            "rate_limit",
            Some(&id),
            json!({ "rate_limiter": limit_json(&limit), "applied": applied.is_ok() }),
        );
        match applied {
            Ok(()) => (
                200,
                json!({ "disk": id, "rate_limiter": limit_json(&limit) }),
            ),
            Err(e) => (
                202,
                json!({ "disk": id, "rate_limiter": limit_json(&limit), "error": e.to_string() }),
            ),
        }
    }))
}

fn restart(disk: &ApiDisk) -> Reply {
    let handle = match worker_handle(disk, "bulkhead cannot restart it") {
        Ok(h) => h,
        Err(reply) => return reply,
    };
    let id = disk.id.clone();
    Reply::Blocking(Box::new(move || {
        // This thread's lines about the restart name the disk, as its threads' do.
        let _in_disk = tracing::info_span!("disk", id = %id).entered();
        tracing::info!("api: planned restart of disk {id}");
        match handle.restart(RESTART_TIMEOUT) {
            Ok((pid, took)) => (
                200,
                json!({
                    "disk": id,
                    "worker_pid": pid,
                    "restart_ms": (took.as_secs_f64() * 1e4).round() / 10.0,
                }),
            ),
            Err(e) => (409, json!({ "error": format!("disk {id}: {e}") })),
        }
    }))
}

/// The body of `POST /v1/disks/{id}/resize`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    /// The new size in bytes.
    size: u64,
    /// A smaller size cuts the guest's data beyond it: only when asked for.
    #[serde(default)]
    shrink: bool,
}

fn resize(disk: &ApiDisk, body: &[u8]) -> Reply {
    let handle = match worker_handle(disk, "bulkhead cannot resize it") {
        Ok(h) => h,
        Err(reply) => return reply,
    };
    let asked: ResizeBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                400,
                format!(r#"the body must be {{"size": BYTES, "shrink": false|true}}: {e}"#),
            )
        }
    };
    let id = disk.id.clone();
    Reply::Blocking(Box::new(move || {
        use crate::supervisor::ResizeError;
        let _in_disk = tracing::info_span!("disk", id = %id).entered();
        tracing::info!(
            "api: resize of disk {id} to {} bytes{}",
            asked.size,
            if asked.shrink {
                " (shrink allowed)"
            } else {
                ""
            }
        );
        match handle.resize(asked.size, asked.shrink, RESIZE_TIMEOUT) {
            Ok(done) => (
                200,
                json!({
                    "disk": id,
                    "size_bytes": done.size,
                    "previous_size_bytes": done.previous,
                    "resize_ms": (done.took.as_secs_f64() * 1e4).round() / 10.0,
                }),
            ),
            Err(e) => {
                let code = match e {
                    ResizeError::BadSize(_) => 400,
                    ResizeError::Fixed(_) | ResizeError::Busy | ResizeError::NoWorker => 409,
                    ResizeError::Failed(_) => 500,
                    ResizeError::Timeout(_) => 504,
                };
                (code, json!({ "error": format!("disk {id}: {e}") }))
            }
        }
    }))
}

/// The body of `PUT /v1/vm/state`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateChange {
    state: String,
}

fn set_state(ctx: &ApiContext, body: &[u8]) -> Reply {
    let change: StateChange = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                400,
                format!(r#"the body must be {{"state": "paused"|"running"|"shutdown"}}: {e}"#),
            )
        }
    };
    let control = Arc::clone(&ctx.control);
    let events = ctx.events.clone();
    let wanted = change.state;
    match wanted.as_str() {
        "paused" | "running" => Reply::Blocking(Box::new(move || {
            let done = if wanted == "paused" {
                control.pause()
            } else {
                control.resume()
            };
            match done {
                Ok(()) => (200, json!({ "state": control.state() })),
                Err(e) => (409, json!({ "error": e, "state": control.state() })),
            }
        })),
        "shutdown" => {
            events.emit("shutdown", None, json!({ "by": "api" }));
            control.shutdown();
            Reply::Json(200, json!({ "state": "shutdown" }))
        }
        other => error(
            400,
            format!("state {other:?}: use \"paused\", \"running\" or \"shutdown\""),
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::supervisor::DiskHandle;

    #[derive(Debug, Default)]
    pub(crate) struct FakeControl {
        pub paused: std::sync::atomic::AtomicBool,
        pub shut: std::sync::atomic::AtomicBool,
    }

    impl super::super::context::VmControl for FakeControl {
        fn state(&self) -> &'static str {
            if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
                "paused"
            } else {
                "running"
            }
        }
        fn pause(&self) -> Result<(), String> {
            self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            self.paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn shutdown(&self) {
            self.shut.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Two disks: `blk0` with a handle (no worker), `ext0` an external backend.
    pub(crate) fn context() -> ApiContext {
        ApiContext {
            started: std::time::Instant::now(),
            vcpus: 2,
            mem_mib: 256,
            config: json!({ "vm": { "vcpus": 2 } }),
            disks: vec![
                ApiDisk {
                    id: "blk0".into(),
                    config: json!({ "id": "blk0" }),
                    handle: Some(Arc::new(DiskHandle::default())),
                },
                ApiDisk {
                    id: "ext0".into(),
                    config: json!({ "id": "ext0" }),
                    handle: None,
                },
            ],
            events: Default::default(),
            control: Arc::new(FakeControl::default()),
            stats: crate::report::VmStats {
                vcpus: vec![Default::default(), Default::default()],
                devices: vec![],
                violations: Default::default(),
            },
        }
    }

    fn call_with(ctx: &ApiContext, method: &str, target: &str, body: &[u8]) -> (u16, Value) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let req = Request {
            method,
            path,
            query,
            last_event_id: None,
            body,
        };
        match route(ctx, req) {
            Reply::Json(code, body) => (code, body),
            Reply::Blocking(work) => work(),
            Reply::Metrics(text) => (200, Value::String(text)),
            Reply::Events { after, follow } => (200, json!({ "after": after, "follow": follow })),
        }
    }

    fn call(method: &str, target: &str) -> (u16, Value) {
        call_with(&context(), method, target, b"")
    }

    #[test]
    fn every_route_answers_and_only_with_its_method() {
        let ctx = context();
        for r in ROUTES {
            let path = r.path.replace("{id}", "blk0");
            let body: &[u8] = match r.method {
                "PUT" => br#"{"state":"running"}"#,
                "PATCH" => br#"{"rate_limiter":{"ops":null}}"#,
                _ if path.ends_with("/resize") => br#"{"size":1048576}"#,
                _ => b"",
            };
            let (code, body) = call_with(&ctx, r.method, &path, body);
            // The restart and the resize conflict: blk0's handle has no worker; a new
            // limit is kept for the next one, not yet in force (202).
            let conflicts = path.ends_with("/restart") || path.ends_with("/resize");
            let want = match (r.method, conflicts) {
                (_, true) => 409,
                ("PATCH", _) => 202,
                _ => 200,
            };
            assert_eq!(code, want, "{} {path}: {body}", r.method);
            let (code, _) = call_with(&ctx, "DELETE", &path, b"");
            assert_eq!(code, 405, "DELETE {path}");
        }
    }

    /// PATCHes at once, each naming another bucket: every one counts (the merge with the
    /// limits in force happens under the handle's lock, not before it).
    #[test]
    fn patches_at_once_all_count() {
        let ctx = context();
        let handle = ctx.disks[0].handle.clone().unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let applier = {
            let (handle, done) = (handle.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    handle.rate_limit_applied(handle.rate_limit().1);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        for round in 0..20u64 {
            let bodies = [
                format!(
                    r#"{{"rate_limiter":{{"ops":{{"size":{},"refill_time":100}}}}}}"#,
                    100 + round
                ),
                format!(
                    r#"{{"rate_limiter":{{"bandwidth":{{"size":{},"refill_time":100}}}}}}"#,
                    4096 + round
                ),
            ];
            std::thread::scope(|s| {
                for body in &bodies {
                    let ctx = &ctx;
                    s.spawn(move || {
                        let (code, reply) =
                            call_with(ctx, "PATCH", "/v1/disks/blk0", body.as_bytes());
                        assert_eq!(code, 200, "{reply}");
                    });
                }
            });
            let (limit, _) = handle.rate_limit();
            assert_eq!(
                limit.ops.map(|b| b.size),
                Some(100 + round),
                "round {round}"
            );
            assert_eq!(
                limit.bandwidth.map(|b| b.size),
                Some(4096 + round),
                "round {round}"
            );
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        applier.join().unwrap();
    }

    #[test]
    fn a_resize_is_checked_before_any_worker_is_stopped() {
        use crate::supervisor::SizeRules;
        let ctx = context();
        let handle = ctx.disks[0].handle.clone().unwrap();
        handle.init_size(
            1 << 20,
            SizeRules {
                fixed: None,
                direct: true,
            },
        );
        let resize = |body: &str| call_with(&ctx, "POST", "/v1/disks/blk0/resize", body.as_bytes());
        for (body, code, why) in [
            (r#"{"size":524288}"#, 400, "must be asked for as a shrink"),
            (
                r#"{"size":1000}"#,
                400,
                "not a whole number of 512-byte sectors",
            ),
            (r#"{"size":0}"#, 400, "not a whole number"),
            (r#"{"size":1049088}"#, 400, "give a multiple of 4096"),
            (
                r#"{"size":1099511627776000}"#,
                400,
                "more than the largest disk",
            ),
            (r#"{"size":"1G"}"#, 400, "the body must be"),
            (r#"{"size":2097152,"grow":true}"#, 400, "unknown field"),
            // Allowed, but no worker is there to do it.
            (r#"{"size":524288,"shrink":true}"#, 409, "no worker"),
            (r#"{"size":2097152}"#, 409, "no worker"),
        ] {
            let (got, reply) = resize(body);
            assert_eq!(got, code, "{body}: {reply}");
            let msg = reply["error"].as_str().unwrap_or_default();
            assert!(msg.contains(why), "{body}: {msg}");
        }
        assert!(
            handle.pending_resize().is_none(),
            "a refused resize leaves nothing asked for"
        );
        // The size it has already: done at once.
        let (code, reply) = resize(r#"{"size":1048576}"#);
        assert_eq!(code, 200, "{reply}");
        assert_eq!(reply["size_bytes"], 1 << 20);
        let (_, disk) = call_with(&ctx, "GET", "/v1/disks/blk0", b"");
        assert_eq!(disk["size_bytes"], 1 << 20);
        handle.init_size(
            1 << 20,
            SizeRules {
                fixed: Some("is read-only"),
                direct: false,
            },
        );
        let (code, reply) = resize(r#"{"size":2097152}"#);
        assert_eq!(code, 409, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains("read-only"));
        let (code, _) = call_with(
            &ctx,
            "POST",
            "/v1/disks/ext0/resize",
            br#"{"size":2097152}"#,
        );
        assert_eq!(code, 409);
    }

    #[test]
    fn a_patch_replaces_the_buckets_it_names_and_keeps_the_others() {
        let ctx = context();
        let handle = ctx.disks[0].handle.clone().unwrap();
        // A supervisor whose worker takes every change at once.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let applier = {
            let (handle, done) = (handle.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    handle.rate_limit_applied(handle.rate_limit().1);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let patch = |body: &str| call_with(&ctx, "PATCH", "/v1/disks/blk0", body.as_bytes());
        let (code, body) = patch(r#"{"rate_limiter":{"ops":{"size":100,"refill_time":100}}}"#);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["rate_limiter"]["ops"]["size"], 100);
        assert_eq!(body["rate_limiter"]["ops"]["one_time_burst"], 0);
        assert!(body["rate_limiter"]["bandwidth"].is_null());
        let (code, body) = patch(
            r#"{"rate_limiter":{"bandwidth":{"size":4096,"refill_time":10,"one_time_burst":5}}}"#,
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["rate_limiter"]["ops"]["size"], 100, "kept");
        assert_eq!(body["rate_limiter"]["bandwidth"]["size"], 4096);
        let (code, body) = patch(r#"{"rate_limiter":{"ops":null}}"#);
        assert_eq!(code, 200, "{body}");
        assert!(body["rate_limiter"]["ops"].is_null());
        assert_eq!(body["rate_limiter"]["bandwidth"]["one_time_burst"], 5);
        let (_, disk) = call_with(&ctx, "GET", "/v1/disks/blk0", b"");
        assert_eq!(disk["rate_limiter"], body["rate_limiter"]);
        for bad in [
            r#"{"rate_limiter":{"ops":{"size":0,"refill_time":100}}}"#,
            r#"{"rate_limiter":{"ops":{"size":10,"refill_time":0}}}"#,
            r#"{"rate_limiter":{"iops":1}}"#,
            r#"{"rate_limiter":{"ops":{"size":10,"refill_time":10,"extra":1}}}"#,
            r#"{}"#,
            r#"not json"#,
        ] {
            let (code, body) = patch(bad);
            assert_eq!(code, 400, "{bad}: {body}");
        }
        let (code, _) = call_with(&ctx, "PATCH", "/v1/disks/ext0", br#"{"rate_limiter":{}}"#);
        assert_eq!(code, 409, "an external backend's limits are its own");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        applier.join().unwrap();
    }

    #[test]
    fn vm_and_disks_describe_what_runs() {
        let (code, vm) = call("GET", "/v1/vm");
        assert_eq!(code, 200);
        assert_eq!(vm["state"], "running");
        assert_eq!(vm["vcpus"], 2);
        assert_eq!(vm["memory_mib"], 256);
        assert_eq!(vm["config"]["vm"]["vcpus"], 2);
        let (_, disks) = call("GET", "/v1/disks");
        let disks = disks["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0]["backend"], "worker");
        assert_eq!(disks[0]["mode"], "none");
        assert!(disks[0]["worker_pid"].is_null());
        assert_eq!(disks[1]["backend"], "vhost_user");
        assert_eq!(disks[1]["mode"], "external");
        let (code, body) = call("GET", "/v1/disks/ext0");
        assert_eq!((code, &body["id"]), (200, &json!("ext0")));
    }

    #[test]
    fn unknown_disks_paths_and_parameters_are_refused() {
        let (code, body) = call("GET", "/v1/disks/blk9");
        assert_eq!(code, 404);
        assert!(
            body["error"].as_str().unwrap().contains("\"blk0\""),
            "{body}"
        );
        assert_eq!(call("POST", "/v1/disks/blk9/restart").0, 404);
        assert_eq!(call("GET", "/v1/disks/").0, 404, "an empty id");
        assert_eq!(call("GET", "/v2/anything").0, 404);
        assert_eq!(call("GET", "/").0, 404);
        assert_eq!(call("GET", "/v1/vm?x=1").0, 400);
        assert_eq!(call("GET", "/v1/events?since=1&since=2").0, 400);
        assert_eq!(call("GET", "/v1/events?since=-1").0, 400);
        assert_eq!(call("GET", "/v1/events?follow=maybe").0, 400);
        assert_eq!(call_with(&context(), "GET", "/v1/vm", b"x").0, 400);
        let (code, body) = call("POST", "/v1/disks/ext0/restart");
        assert_eq!(code, 409);
        assert!(
            body["error"].as_str().unwrap().contains("external"),
            "{body}"
        );
    }

    #[test]
    fn events_resume_after_since_or_last_event_id() {
        assert_eq!(
            call("GET", "/v1/events?since=7&follow=false").1,
            json!({ "after": 7, "follow": false })
        );
        assert_eq!(
            call("GET", "/v1/events").1,
            json!({ "after": 0, "follow": true })
        );
        let ctx = context();
        let req = |since: Option<&'static str>, id| Request {
            method: "GET",
            path: "/v1/events",
            query: since,
            last_event_id: id,
            body: b"",
        };
        assert!(matches!(
            route(&ctx, req(None, Some("12"))),
            Reply::Events { after: 12, .. }
        ));
        assert!(matches!(
            route(&ctx, req(Some("since=1"), Some("12"))),
            Reply::Json(400, _)
        ));
    }

    #[test]
    fn state_changes_are_strict_and_shutdown_is_an_event() {
        let ctx = context();
        for bad in [
            &b""[..],
            b"{}",
            br#"{"state":"off"}"#,
            br#"{"state":"paused","x":1}"#,
            b"\xff",
        ] {
            let (code, body) = call_with(&ctx, "PUT", "/v1/vm/state", bad);
            assert_eq!(code, 400, "{bad:?}: {body}");
        }
        let (code, body) = call_with(&ctx, "PUT", "/v1/vm/state", br#"{"state":"paused"}"#);
        assert_eq!((code, &body["state"]), (200, &json!("paused")));
        assert_eq!(call_with(&ctx, "GET", "/v1/vm", b"").1["state"], "paused");
        let (code, _) = call_with(&ctx, "PUT", "/v1/vm/state", br#"{"state":"shutdown"}"#);
        assert_eq!(code, 200);
        let events = ctx.events.since(0, 10).events;
        assert_eq!(events.last().map(|e| e.kind), Some("shutdown"));
    }
}
