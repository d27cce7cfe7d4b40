//! `GET /metrics`: the VM's counters in Prometheus' text exposition format (0.0.4).
//!
//! Per VM: uptime and whether it is paused; per vCPU: userspace exits by kind; per disk:
//! requests completed and failed (over all its workers: they survive restarts), restarts
//! by cause, hangs, policy violations, and its worker's memory and CPU time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::api::context::ApiContext;
use crate::supervisor::counters::ticks_per_second;

/// A label value as the format wants it: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The exposition for `ctx`'s VM.
pub fn render(ctx: &ApiContext) -> String {
    let mut out = String::new();
    let m = "bulkhead_uptime_seconds";
    Family::new(&mut out, m, "gauge", "Seconds since the VM started.").sample(
        m,
        &[],
        format!("{:.3}", ctx.started.elapsed().as_secs_f64()),
    );
    let m = "bulkhead_vm_paused";
    Family::new(&mut out, m, "gauge", "1 while the VM's vCPUs are paused.").sample(
        m,
        &[],
        u8::from(ctx.control.state() == "paused"),
    );

    let m = "bulkhead_vcpu_exits_total";
    let mut f = Family::new(
        &mut out,
        m,
        "counter",
        "Exits of a vCPU to the VMM, by kind (io_in, io_out, mmio_read, mmio_write, other).",
    );
    for (i, v) in ctx.stats.vcpus.iter().enumerate() {
        let vcpu = i.to_string();
        for (kind, n) in [
            ("io_in", &v.io_in),
            ("io_out", &v.io_out),
            ("mmio_read", &v.mmio_read),
            ("mmio_write", &v.mmio_write),
            ("other", &v.other),
        ] {
            f.sample(m, &[("vcpu", &vcpu), ("kind", kind)], n.load(Relaxed));
        }
    }

    let served: Vec<_> = ctx
        .disks
        .iter()
        .filter_map(|d| Some((d.id.as_str(), d.handle.as_ref()?.counters().snapshot())))
        .collect();
    let per_disk =
        |out: &mut String,
         name: &str,
         kind: &str,
         help: &str,
         value: &dyn Fn(&crate::supervisor::counters::CounterSnapshot) -> Option<String>| {
            let mut f = Family::new(out, name, kind, help);
            for (id, c) in &served {
                if let Some(v) = value(c) {
                    f.sample(name, &[("disk", id)], v);
                }
            }
        };
    let m = "bulkhead_disk_requests_total";
    let mut f = Family::new(
        &mut out,
        m,
        "counter",
        "Requests a disk's workers completed, errors included, by type (read, write, flush, \
         discard, other); the workers' own count.",
    );
    for (id, c) in &served {
        for (kind, n) in ipc::status::REQUEST_TYPES.iter().zip(c.requests.by_type) {
            f.sample(m, &[("disk", id), ("type", kind)], n);
        }
    }
    per_disk(
        &mut out,
        "bulkhead_disk_read_bytes_total",
        "counter",
        "Bytes the disk's completed reads returned to the guest.",
        &|c| Some(c.requests.bytes_read.to_string()),
    );
    per_disk(
        &mut out,
        "bulkhead_disk_written_bytes_total",
        "counter",
        "Bytes the disk's completed writes took from the guest.",
        &|c| Some(c.requests.bytes_written.to_string()),
    );
    per_disk(
        &mut out,
        "bulkhead_disk_requests_in_flight",
        "gauge",
        "Requests the serving worker took from a ring and has not completed.",
        &|c| Some(c.requests.in_flight.to_string()),
    );
    let m = "bulkhead_disk_request_duration_seconds";
    let mut f = Family::new(
        &mut out,
        m,
        "histogram",
        "Time from a request's pop to its completion, measured in the worker.",
    );
    for (id, c) in &served {
        let mut cumulative = 0u64;
        for (i, n) in c.requests.latency.iter().enumerate() {
            cumulative = cumulative.saturating_add(*n);
            let le = match ipc::status::LATENCY_BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            f.sample(
                &format!("{m}_bucket"),
                &[("disk", id), ("le", &le)],
                cumulative,
            );
        }
        f.sample(
            &format!("{m}_sum"),
            &[("disk", id)],
            format!("{:.6}", c.requests.latency_sum_us as f64 / 1e6),
        );
        f.sample(&format!("{m}_count"), &[("disk", id)], cumulative);
    }
    per_disk(
        &mut out,
        "bulkhead_disk_request_errors_total",
        "counter",
        "Requests a disk's workers completed with an error status.",
        &|c| Some(c.failed.to_string()),
    );
    let m = "bulkhead_disk_worker_restarts_total";
    let mut f = Family::new(
        &mut out,
        m,
        "counter",
        "Workers replaced, by cause (crash, violation, hang, exited, killed, planned, guest_reset).",
    );
    for (id, c) in &served {
        for (cause, n) in &c.restarts {
            f.sample(m, &[("disk", id), ("cause", cause)], n);
        }
    }
    per_disk(
        &mut out,
        "bulkhead_disk_worker_hangs_total",
        "counter",
        "Workers killed for making no progress with requests pending.",
        &|c| Some(c.hangs.to_string()),
    );
    per_disk(
        &mut out,
        "bulkhead_disk_policy_violations_total",
        "counter",
        "Workers killed by their seccomp policy (confirmed by the kernel).",
        &|c| Some(c.violations.to_string()),
    );
    per_disk(
        &mut out,
        "bulkhead_disk_worker_resident_bytes",
        "gauge",
        "Resident memory of the disk's serving worker.",
        &|c| c.rss_bytes.map(|b| b.to_string()),
    );
    let hz = ticks_per_second() as f64;
    per_disk(
        &mut out,
        "bulkhead_disk_worker_cpu_seconds_total",
        "counter",
        "CPU time (user and system) of all the disk's workers.",
        &|c| Some(format!("{:.2}", c.cpu_ticks as f64 / hz)),
    );
    let m = "bulkhead_disk_info";
    let mut f = Family::new(
        &mut out,
        m,
        "gauge",
        "One per disk: who serves it (backend) and how (mode).",
    );
    for d in &ctx.disks {
        let (backend, mode) = match &d.handle {
            Some(h) => ("worker", h.state().mode),
            None => ("vhost_user", "external"),
        };
        f.sample(
            m,
            &[("disk", &d.id), ("backend", backend), ("mode", mode)],
            1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_and_samples_parse() {
        let ctx = crate::api::routes::tests::context();
        ctx.stats.vcpus[1].io_out.store(7, Relaxed);
        if let Some(h) = &ctx.disks[0].handle {
            h.counters().restarted("hang");
        }
        let text = render(&ctx);
        assert!(text.contains(
            "bulkhead_disk_request_duration_seconds_bucket{disk=\"blk0\",le=\"+Inf\"} 0\n"
        ));
        assert!(
            text.contains(
                "bulkhead_disk_request_duration_seconds_bucket{disk=\"blk0\",le=\"0.00005\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("bulkhead_vcpu_exits_total{vcpu=\"1\",kind=\"io_out\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("bulkhead_disk_worker_restarts_total{disk=\"blk0\",cause=\"hang\"} 1\n")
        );
        assert!(text.contains(
            "bulkhead_disk_info{disk=\"ext0\",backend=\"vhost_user\",mode=\"external\"} 1\n"
        ));
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no TYPE line");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
