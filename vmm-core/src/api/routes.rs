//! What each request means: the routes, their answers, and the work that has to leave the
//! API's thread. Pure of I/O, so every route is tested (and fuzzed) without a socket.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::context::{ApiContext, ApiDisk};

/// How long a planned restart may take before the API answers with an error.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

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
        method: "POST",
        path: "/v1/disks/{id}/restart",
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
    if !req.body.is_empty() && route.method != "PUT" {
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
        "/v1/disks/{id}" => match disk() {
            Ok(d) => Reply::Json(200, disk_info(ctx, d)),
            Err(reply) => reply,
        },
        "/v1/disks/{id}/restart" => match disk() {
            Ok(d) => restart(d),
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
    })
}

fn restart(disk: &ApiDisk) -> Reply {
    let Some(handle) = disk.handle.clone() else {
        return error(
            409,
            format!(
                "disk {} is served by an external vhost-user backend: bulkhead cannot restart it",
                disk.id
            ),
        );
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
            let body: &[u8] = if r.method == "PUT" {
                br#"{"state":"running"}"#
            } else {
                b""
            };
            let (code, body) = call_with(&ctx, r.method, &path, body);
            // The restart conflicts: blk0's handle has no worker.
            let want = if path.ends_with("/restart") { 409 } else { 200 };
            assert_eq!(code, want, "{} {path}: {body}", r.method);
            let (code, _) = call_with(&ctx, "DELETE", &path, b"");
            assert_eq!(code, 405, "DELETE {path}");
        }
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
