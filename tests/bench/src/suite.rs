//! The whole `bulkhead-bench` run: the I/O profiles ([`crate::io`]), then the vCPU jitter
//! experiment ([`crate::jitter`]) under bulkhead and QEMU without and with an IOThread,
//! and the QueueNotify cost ([`crate::notify`]); one report (`report.md`), its plots and
//! `results.json`.

use anyhow::Context;

use crate::formats;
use crate::host::which;
use crate::io::{self, prepare_image, IoBench};
use crate::jitter::{self, JitterRun};
use crate::limits;
use crate::notify;
use crate::svg::{bars, cdf, Panel};

/// The whole bench: the I/O profiles, the jitter experiment and the QueueNotify cost,
/// then the report, the plots and results.json in `b.out`.
pub fn run(b: &IoBench) -> anyhow::Result<()> {
    std::fs::create_dir_all(&b.out)
        .with_context(|| format!("create the output directory {}", b.out.display()))?;
    let fio = which("fio").context(
        "fio is missing: install it (apt-get install fio); it measures the host's limit",
    )?;
    let qemu = which("qemu-system-x86_64").context(
        "qemu-system-x86_64 is missing: install it (apt-get install qemu-system-x86); \
         QEMU is the comparison",
    )?;
    let strace = which("strace").context(
        "strace is missing: install it (apt-get install strace); it counts the vCPU \
         threads' futex calls",
    )?;
    let image = b.out.join("bench.img");
    prepare_image(&image, b.image_mib)?;
    let (results, all) = b.profiles(&image, &qemu, &fio)?;
    let (results, all, image, qemu) = (&results, &all, image.as_path(), qemu.as_path());
    let experiment = jitter::Jitter {
        bulkhead: &b.bulkhead,
        qemu,
        strace,
        kernel: &b.kernel,
        image,
        // Long enough that the window (60%) has room around it, even in a debug build.
        secs: b.secs.max(3),
    };
    let mut runs = Vec::new();
    for repeat in 0..b.repeats {
        for system in jitter::System::ALL {
            for storm in [true, false] {
                eprintln!(
                    "bench: jitter on {} (storm {}, run {} of {})",
                    system.name(),
                    if storm { "on" } else { "off" },
                    repeat + 1,
                    b.repeats
                );
                runs.push(
                    experiment
                        .run(system, storm)
                        .with_context(|| format!("the jitter experiment on {}", system.name()))?,
                );
            }
        }
    }
    let notify = notify::measure(b, image)?;
    let formats = formats::measure(b, image, qemu)?;
    let (limit_runs, limit) = limits::measure(b, image)?;
    let mut report = io::report(results, all, b);
    report.push_str(&formats::report(&formats));
    report.push_str(&limits::report(&limit_runs, limit, b.secs));
    report.push_str(&notify::report(&notify));
    report.push_str(&jitter::report(&runs));
    report.push_str(&plots(b, results, &runs)?);
    print!("{report}");
    let md = b.out.join("report.md");
    std::fs::write(&md, &report).with_context(|| format!("write {}", md.display()))?;
    let json: Vec<serde_json::Value> = results
        .iter()
        .map(|(&(p, s), sample)| {
            serde_json::json!({
                "profile": io::PROFILES[p],
                "system": io::SYSTEMS[s],
                "result": sample,
                "runs": all.get(&(p, s)),
            })
        })
        .collect();
    let notify: Vec<serde_json::Value> = notify::VARIANTS
        .iter()
        .zip(&notify)
        .map(|((name, _), ns)| serde_json::json!({ "ioeventfd": name, "ns_per_write": ns }))
        .collect();
    let formats: Vec<serde_json::Value> = formats::SYSTEMS
        .iter()
        .zip(&formats)
        .map(|(system, runs)| serde_json::json!({ "system": system, "runs": runs }))
        .collect();
    let json = serde_json::json!({
        "profiles": json,
        "formats": formats,
        "rate_limits": { "limit": limit, "runs": limit_runs },
        "notify": notify,
        "jitter": runs,
    });
    let path = b.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("bench: report in {}", md.display());
    Ok(())
}

/// Writes the SVG plots; returns the report's lines linking them.
fn plots(b: &IoBench, results: &io::Results, runs: &[JitterRun]) -> anyhow::Result<String> {
    let iops: Vec<Panel> = io::PROFILES
        .iter()
        .enumerate()
        .map(|(p, profile)| Panel {
            title: format!("{}: IOPS", profile.name),
            bars: io::SYSTEMS
                .iter()
                .enumerate()
                .filter_map(|(s, name)| Some((name.to_string(), results.get(&(p, s))?.iops)))
                .collect(),
        })
        .collect();
    let median = |system, f: &dyn Fn(&JitterRun) -> f64| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.system == system && r.storm)
            .map(f)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let jitter_panel = |title: &str, f: &dyn Fn(&JitterRun) -> f64| Panel {
        title: title.to_string(),
        bars: jitter::System::ALL
            .iter()
            .filter_map(|&s| Some((s.name().to_string(), median(s, f)?)))
            .collect(),
    };
    let jitter = [
        jitter_panel("storm vCPU: futex calls in the window", &|r| {
            r.vcpus[0].futex_calls as f64
        }),
        jitter_panel("storm vCPU: voluntary context switches", &|r| {
            r.vcpus[0].voluntary_switches as f64
        }),
        jitter_panel("loop vCPU: involuntary context switches", &|r| {
            r.vcpus[1].involuntary_switches as f64
        }),
    ];
    let curves: Vec<(String, Vec<(f64, f64)>)> = io::SYSTEMS
        .iter()
        .enumerate()
        .filter_map(|(s, name)| Some((name.to_string(), results.get(&(0, s))?.cdf.clone())))
        .collect();
    let files = [
        ("iops.svg", bars("IOPS per system", &iops)),
        (
            "jitter.svg",
            bars("vCPU threads under the read storm", &jitter),
        ),
        (
            "latency-cdf.svg",
            cdf(
                &format!("{}: latency distribution", io::PROFILES[0].name),
                &curves,
            ),
        ),
    ];
    let mut md = String::from("\n## Plots\n\n");
    for (name, svg) in files {
        let path = b.out.join(name);
        std::fs::write(&path, svg).with_context(|| format!("write {}", path.display()))?;
        md.push_str(&format!("- [{name}]({name})\n"));
    }
    Ok(md)
}
