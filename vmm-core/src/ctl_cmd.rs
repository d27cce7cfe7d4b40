//! `bulkhead ctl`: the control API's client. Output for people by default, the API's
//! JSON with `--json`; exit status 0 when the API said yes, 1 otherwise.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The socket given to `bulkhead run --api-socket` (required).
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the API's JSON (events: one object a line) instead of text for people.
    /// [default: off]
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Every disk: backend, mode, worker pid, requests, errors, restarts.
    List,
    /// The VM (state, vCPUs, memory, uptime), or one disk in full.
    Status {
        /// Disk id, e.g. blk0. [default: the VM]
        disk: Option<String>,
    },
    /// Planned restart of a disk's worker (e.g. after replacing the worker binary); the
    /// guest sees no error. Prints the new worker's pid and the time it took.
    Restart {
        /// Disk id, e.g. blk0.
        disk: String,
    },
    /// Change a disk's I/O limits while the VM runs: `iops=N` (requests a second),
    /// `bw=B` (bytes a second), with `*_burst=` and `*_refill_ms=` as `--disk` takes them;
    /// `iops=off` or `bw=off` lifts one, `none` both. A limit not named stays. The new
    /// limits hold for the disk's later workers too.
    Limit {
        /// Disk id, e.g. blk0.
        disk: String,
        /// e.g. `iops=2000`, `bw=50000000,iops=off`, `none`.
        spec: String,
    },
    /// Grow a disk while the VM runs (or, with --shrink, cut it): its worker is replaced
    /// by one that resizes the image inside its sandbox, then the guest is told (a virtio
    /// config-change interrupt; Linux picks the new size up at once).
    Resize {
        /// Disk id, e.g. blk0.
        disk: String,
        /// The new size: bytes, or with a binary unit (`2G`, `1536M`).
        size: String,
        /// Allow a size below the current one: the guest's data beyond it is lost.
        /// [default: off]
        #[arg(long)]
        shrink: bool,
    },
    /// Stop every vCPU (guest state is kept; disk requests in flight complete).
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// End the VM: bulkhead exits with status 0, as after an ACPI power-off (the guest is
    /// not asked first).
    Shutdown,
    /// Restarts, hangs, violations, fail mode, guest resets, pause and resume, as they
    /// happen (until interrupted), starting with the ones still kept.
    Events {
        /// Only events after this sequence number. [default: 0, all kept]
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print the kept events and exit instead of waiting for more. [default: off]
        #[arg(long)]
        no_follow: bool,
    },
    /// The Prometheus metrics (text format; `--json`: one object per sample).
    Metrics,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    vmm_core::say!("bulkhead: error: {msg}");
    ExitCode::FAILURE
}

/// Writes `text` to stdout; a closed stdout (`| head`) ends quietly.
fn out(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}

pub fn ctl(args: CtlArgs) -> ExitCode {
    let socket = &args.api_socket;
    let (method, target, body) = match &args.command {
        CtlCommand::List => ("GET", "/v1/disks".to_string(), None),
        CtlCommand::Status { disk: None } => ("GET", "/v1/vm".to_string(), None),
        CtlCommand::Status { disk: Some(d) } => ("GET", format!("/v1/disks/{d}"), None),
        CtlCommand::Restart { disk } => ("POST", format!("/v1/disks/{disk}/restart"), None),
        CtlCommand::Limit { disk, spec } => match limit_patch(spec) {
            Ok(body) => ("PATCH", format!("/v1/disks/{disk}"), Some(body)),
            Err(e) => return fail(format_args!("limit {spec:?}: {e}")),
        },
        CtlCommand::Resize { disk, size, shrink } => {
            match vmm_core::config::parse_disk_bytes(size) {
                Ok(bytes) => (
                    "POST",
                    format!("/v1/disks/{disk}/resize"),
                    Some(serde_json::json!({ "size": bytes, "shrink": shrink }).to_string()),
                ),
                Err(e) => return fail(format_args!("resize: {e}")),
            }
        }
        CtlCommand::Pause => (
            "PUT",
            "/v1/vm/state".into(),
            Some(r#"{"state":"paused"}"#.to_string()),
        ),
        CtlCommand::Resume => (
            "PUT",
            "/v1/vm/state".into(),
            Some(r#"{"state":"running"}"#.to_string()),
        ),
        CtlCommand::Shutdown => (
            "PUT",
            "/v1/vm/state".into(),
            Some(r#"{"state":"shutdown"}"#.to_string()),
        ),
        CtlCommand::Events { since, no_follow } => {
            return events(&args, *since, !*no_follow);
        }
        CtlCommand::Metrics => ("GET", "/metrics".into(), None),
    };
    let (code, text) =
        match vmm_core::api::client::request_with_body(socket, method, &target, body.as_deref()) {
            Ok(answer) => answer,
            Err(e) => {
                return fail(format_args!(
                    "cannot reach the API at {}: {e}",
                    socket.display()
                ))
            }
        };
    if matches!(args.command, CtlCommand::Metrics) {
        if !(200..300).contains(&code) {
            return fail(format_args!("the API answered {code}: {}", text.trim_end()));
        }
        let shown = if args.json { metrics_json(&text) } else { text };
        out(&shown);
        return ExitCode::SUCCESS;
    }
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return fail(format_args!(
                "the API answered {code} with no JSON ({e}): {text}"
            ))
        }
    };
    if !(200..300).contains(&code) {
        if args.json {
            out(&format!("{value}\n"));
        }
        let msg = value["error"].as_str().unwrap_or("(no message)");
        return fail(format_args!("the API answered {code}: {msg}"));
    }
    let shown = if args.json {
        format!("{value}\n")
    } else {
        match &args.command {
            CtlCommand::List => disk_table(&value),
            CtlCommand::Status { disk: None } => vm_text(&value),
            CtlCommand::Status { disk: Some(_) } => disk_text(&value),
            CtlCommand::Restart { disk } => format!(
                "{disk}: worker restarted in {} ms (pid {})\n",
                value["restart_ms"], value["worker_pid"]
            ),
            CtlCommand::Limit { disk, .. } => {
                let mut text = format!(
                    "{disk}: rate limit now {}\n",
                    describe_limit_json(&value["rate_limiter"])
                );
                if let Some(note) = value["error"].as_str() {
                    text.push_str(&format!("{disk}: {note}\n"));
                }
                text
            }
            CtlCommand::Resize { disk, .. } => format!(
                "{disk}: {} -> {} bytes in {} ms\n",
                value["previous_size_bytes"], value["size_bytes"], value["resize_ms"]
            ),
            _ => format!("{}\n", value["state"].as_str().unwrap_or("?")),
        }
    };
    out(&shown);
    ExitCode::SUCCESS
}

/// The `PATCH /v1/disks/{id}` body for `bulkhead ctl limit`'s SPEC.
fn limit_patch(spec: &str) -> Result<String, String> {
    use vmm_core::api::routes::limit_json;
    let spec = spec.trim();
    let name_one = "name a limit: iops=N, bw=B, iops=off, bw=off or none";
    if spec.is_empty() {
        return Err(name_one.into());
    }
    if spec == "none" {
        return Ok(r#"{"rate_limiter":{"bandwidth":null,"ops":null}}"#.into());
    }
    let mut off = Vec::new();
    let mut keys = Vec::new();
    for part in spec.split(',') {
        match part {
            "bw=off" => off.push("bandwidth"),
            "iops=off" => off.push("ops"),
            other => keys.push(other),
        }
    }
    let limit = if keys.is_empty() {
        Default::default()
    } else {
        let options: vmm_core::disk::config::LimitOptions =
            vmm_core::keyvalue::from_key_values(&keys.join(",")).map_err(|e| e.to_string())?;
        options.rate_limit()?
    };
    let given = limit_json(&limit);
    let mut patch = serde_json::Map::new();
    for (bucket, key) in [("bandwidth", "bw"), ("ops", "iops")] {
        if off.contains(&bucket) {
            if keys.iter().any(|k| k.starts_with(key)) {
                return Err(format!("{key}=off and {key}= values together"));
            }
            patch.insert(bucket.into(), Value::Null);
        } else if !given[bucket].is_null() {
            patch.insert(bucket.into(), given[bucket].clone());
        }
    }
    if patch.is_empty() {
        return Err(name_one.into());
    }
    Ok(serde_json::json!({ "rate_limiter": patch }).to_string())
}

/// `rate_limiter` JSON in words.
fn describe_limit_json(v: &Value) -> String {
    let bucket = |b: &Value| -> Option<ipc::messages::TokenBucket> {
        serde_json::from_value::<vmm_core::api::routes::BucketJson>(b.clone())
            .ok()
            .map(Into::into)
    };
    vmm_core::disk::config::describe_limit(&ipc::messages::RateLimit {
        bandwidth: bucket(&v["bandwidth"]),
        ops: bucket(&v["ops"]),
    })
}

fn number(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn disk_table(value: &Value) -> String {
    let mut text = format!(
        "{:<12} {:<10} {:<8} {:>8} {:>10} {:>7} {:>8}\n",
        "DISK", "BACKEND", "MODE", "PID", "REQUESTS", "ERRORS", "RESTARTS"
    );
    for d in value["disks"].as_array().into_iter().flatten() {
        let c = &d["counters"];
        let restarts: u64 = c["restarts"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        let restarts = if c.is_null() {
            "-".into()
        } else {
            restarts.to_string()
        };
        text.push_str(&format!(
            "{:<12} {:<10} {:<8} {:>8} {:>10} {:>7} {:>8}\n",
            d["id"].as_str().unwrap_or("?"),
            d["backend"].as_str().unwrap_or("?"),
            d["mode"].as_str().unwrap_or("?"),
            number(&d["worker_pid"]),
            number(&c["requests_completed"]),
            number(&c["requests_failed"]),
            restarts,
        ));
    }
    text
}

fn vm_text(v: &Value) -> String {
    format!(
        "state: {}\nvcpus: {}\nmemory: {} MiB\nuptime: {} s\ndisks: {}\n",
        v["state"].as_str().unwrap_or("?"),
        v["vcpus"],
        v["memory_mib"],
        v["uptime_s"],
        v["disks"]
    )
}

fn disk_text(d: &Value) -> String {
    let c = &d["counters"];
    let mut text = format!(
        "disk: {}\nbackend: {}\nmode: {}\nworker pid: {}\n",
        d["id"].as_str().unwrap_or("?"),
        d["backend"].as_str().unwrap_or("?"),
        d["mode"].as_str().unwrap_or("?"),
        number(&d["worker_pid"]),
    );
    if let Some(bytes) = d["size_bytes"].as_u64() {
        text.push_str(&format!("size: {bytes} bytes\n"));
    }
    if !d["rate_limiter"].is_null() {
        text.push_str(&format!(
            "rate limit: {}\n",
            describe_limit_json(&d["rate_limiter"])
        ));
    }
    if !c.is_null() {
        let restarts: Vec<String> = c["restarts"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(cause, n)| format!("{cause} {n}"))
            .collect();
        text.push_str(&format!(
            "requests: {} ({} failed)\nrestarts: {}\nhangs: {}\nviolations: {}\n\
             worker memory: {} bytes\nworker cpu: {} s\n",
            c["requests_completed"],
            c["requests_failed"],
            if restarts.is_empty() {
                "none".to_string()
            } else {
                restarts.join(", ")
            },
            c["hangs"],
            c["violations"],
            number(&c["worker_rss_bytes"]),
            c["worker_cpu_seconds"],
        ));
    }
    for v in d["violations"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "violation: pid {} {} {}\n",
            v["pid"],
            v["policy"].as_str().unwrap_or("?"),
            v["call"].as_str().unwrap_or("?")
        ));
    }
    text
}

/// Milliseconds since the Unix epoch as UTC, `2026-12-07T15:17:30.017Z`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One event as a line for people: `#SEQ TIME KIND [DISK] detail`.
fn event_line(e: &Value) -> String {
    let ms = e["time_ms"].as_u64().unwrap_or(0);
    let detail: Vec<String> = e["detail"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    format!(
        "#{} {} {}{} {}\n",
        e["seq"],
        utc(ms),
        e["kind"].as_str().unwrap_or("?"),
        e["disk"]
            .as_str()
            .map(|d| format!(" {d}"))
            .unwrap_or_default(),
        detail.join(" ")
    )
}

fn events(args: &CtlArgs, since: u64, follow: bool) -> ExitCode {
    let socket = &args.api_socket;
    if !follow {
        let target = format!("/v1/events?since={since}&follow=false");
        let (code, text) = match vmm_core::api::client::request(socket, "GET", &target) {
            Ok(a) => a,
            Err(e) => {
                return fail(format_args!(
                    "cannot reach the API at {}: {e}",
                    socket.display()
                ))
            }
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_default();
        if code != 200 {
            return fail(format_args!("the API answered {code}: {text}"));
        }
        if value["missed"].as_u64().unwrap_or(0) > 0 {
            vmm_core::say!("bulkhead: {} events are no longer kept", value["missed"]);
        }
        for e in value["events"].as_array().into_iter().flatten() {
            let line = if args.json {
                format!("{e}\n")
            } else {
                event_line(e)
            };
            if !out(&line) {
                break;
            }
        }
        return ExitCode::SUCCESS;
    }
    // The stream: `data:` lines carry each event's JSON; bytes are kept until a whole
    // event is in (a chunk may end inside a character).
    let mut pending: Vec<u8> = Vec::new();
    let target = format!("/v1/events?since={since}");
    let code = vmm_core::api::client::stream(socket, &target, |chunk| {
        pending.extend_from_slice(chunk);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = pending.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            for line in block.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(e) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                let text = if args.json {
                    format!("{e}\n")
                } else if e.get("missed").is_some() {
                    format!("({} events are no longer kept)\n", e["missed"])
                } else if e.get("latest").is_some() {
                    format!(
                        "(event {} is from an earlier bulkhead: the events from the first kept)\n",
                        e["after"]
                    )
                } else {
                    event_line(&e)
                };
                if !out(&text) {
                    return false;
                }
            }
        }
        true
    });
    match code {
        Ok(200) => ExitCode::SUCCESS,
        Ok(code) => fail(format_args!(
            "the API answered {code}: {}",
            String::from_utf8_lossy(&pending)
        )),
        Err(e) => fail(format_args!(
            "cannot reach the API at {}: {e}",
            socket.display()
        )),
    }
}

/// The exposition as JSON: one object per sample, `{"name","labels","value"}`.
fn metrics_json(text: &str) -> String {
    let mut out = String::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = serde_json::Map::new();
        // Label values bulkhead writes hold no comma or quote (ids, causes, kinds).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once('=') {
                map.insert(
                    k.to_string(),
                    Value::String(v.trim_matches('"').to_string()),
                );
            }
        }
        let value: Value = value
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number);
        out.push_str(&format!(
            "{}\n",
            serde_json::json!({ "name": name, "labels": map, "value": value })
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_656_650_017), "2026-12-07T15:17:30.017Z");
    }

    #[test]
    fn metrics_become_one_object_per_sample() {
        let text = "# HELP x y\n# TYPE x counter\nx{disk=\"blk0\",cause=\"hang\"} 3\nup 1.5\n";
        let lines: Vec<Value> = metrics_json(text)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["labels"]["cause"], "hang");
        assert_eq!(lines[0]["value"], 3.0);
        assert_eq!(lines[1]["name"], "up");
    }
}
