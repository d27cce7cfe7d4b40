//! `bulkhead-bench`: bulkhead's benchmarks, outside the trusted `bulkhead` binary. They
//! drive `bulkhead` as a user would, next to QEMU and host fio, through the test guest
//! (its driver runs in ring 3, so an emulated guest kernel mode does not distort them).
//! Results are printed as a markdown report, with ratios to a baseline measured in the
//! same invocation.
//!
//! `bulkhead-bench`: the I/O profiles ([`io`]), raw against qcow2 ([`formats`]), rate
//! limits ([`limits`]), the vCPU jitter experiment ([`jitter`]) and the QueueNotify cost ([`notify`]), put together by
//! [`suite`].
//!
//! `bulkhead-bench restart`: the time from a worker's SIGKILL to the guest's next
//! completed request ([`restart`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

mod formats;
mod host;
mod io;
mod jitter;
mod limits;
mod notify;
mod restart;
mod suite;
mod svg;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-bench",
    about = "bulkhead's benchmarks (results are ratios to a baseline run in the same invocation)"
)]
struct Cli {
    /// A benchmark other than the I/O profiles.
    #[command(subcommand)]
    what: Option<BenchCommand>,
    /// Seconds per system and profile instead of the full runs (keeps the bench working
    /// in CI; the numbers mean little).
    #[arg(long)]
    quick: bool,
    /// Seconds per system and profile (default 10, 1 with --quick).
    #[arg(long)]
    secs: Option<u32>,
    /// Directory for the image, the report (`report.md`) and the results (`results.json`).
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The test guest (built by tests/guest/build-testguest.sh; default: target/guest/testguest
    /// beside the build).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The `bulkhead` binary to measure (default: $BULKHEAD_BIN, else bulkhead beside
    /// bulkhead-bench).
    #[arg(long)]
    bulkhead_bin: Option<PathBuf>,
    /// The worker executable (default: bulkhead-worker beside bulkhead).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time from a worker's SIGKILL to the guest's next completed request.
    Restart(RestartArgs),
    /// Only the image formats section (raw against qcow2): `formats.md` in --out.
    Formats,
    /// Only the rate limits section (a limited disk beside an unlimited one): `limits.md`
    /// in --out.
    Limits,
}

#[derive(Debug, Args)]
struct RestartArgs {
    /// Kills to measure.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    kills: u32,
    /// The test guest (built by tests/guest/build-testguest.sh; default: target/guest/testguest
    /// beside the build).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The worker executable (default: bulkhead-worker beside bulkhead-bench).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Directory for the disk image and the report (`restart.md`, `restart.json`).
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> ExitCode {
    // The restart bench runs a VM in this process: its log (worker deaths and restarts)
    // goes to stderr as `bulkhead run`'s does.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match bench(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(cli: Cli) -> anyhow::Result<()> {
    if let Some(BenchCommand::Restart(a)) = cli.what {
        return restart::restart(restart::Restart {
            kills: a.kills,
            kernel: testguest(a.kernel)?,
            worker_bin: a.worker_bin,
            out: a.out,
        });
    }
    let bulkhead = bulkhead_bin(cli.bulkhead_bin)?;
    let worker_bin = match cli.worker_bin {
        Some(w) => w,
        None => beside(&bulkhead, "bulkhead-worker").with_context(|| {
            format!(
                "no bulkhead-worker beside {} (pass --worker-bin)",
                bulkhead.display()
            )
        })?,
    };
    let b = io::IoBench {
        bulkhead,
        worker_bin,
        kernel: testguest(cli.kernel)?,
        out: cli.out,
        secs: cli.secs.unwrap_or(if cli.quick { 1 } else { 10 }),
        image_mib: if cli.quick { 256 } else { 1024 },
        repeats: if cli.quick { 1 } else { 3 },
        huge_pages: io::huge_pages_for_bench(),
    };
    match cli.what {
        Some(BenchCommand::Formats) => section(&b, "formats.md", |b, image| {
            let qemu = host::which("qemu-system-x86_64").context(
                "qemu-system-x86_64 is missing: install it (apt-get install qemu-system-x86)",
            )?;
            Ok(formats::report(&formats::measure(b, image, &qemu)?))
        }),
        Some(BenchCommand::Limits) => section(&b, "limits.md", |b, image| {
            let (runs, limit) = limits::measure(b, image)?;
            Ok(limits::report(&runs, limit, b.secs))
        }),
        _ => suite::run(&b),
    }
}

/// One section of the bench on its own: its report printed and written to `name`.
fn section(
    b: &io::IoBench,
    name: &str,
    run: impl FnOnce(&io::IoBench, &Path) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&b.out)
        .with_context(|| format!("create the output directory {}", b.out.display()))?;
    let image = b.out.join("bench.img");
    io::prepare_image(&image, b.image_mib)?;
    let report = run(b, &image)?;
    print!("{report}");
    let path = b.out.join(name);
    std::fs::write(&path, &report).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The file `name` in the directory of `exe`, if there is one.
fn beside(exe: &Path, name: &str) -> Option<PathBuf> {
    let path = exe.parent()?.join(name);
    path.is_file().then_some(path)
}

/// `--bulkhead-bin`, else `$BULKHEAD_BIN`, else `bulkhead` beside this executable.
fn bulkhead_bin(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match flag.or_else(|| std::env::var_os("BULKHEAD_BIN").map(PathBuf::from)) {
        Some(p) => p,
        None => {
            let me = std::env::current_exe().context("find bulkhead-bench's own executable")?;
            beside(&me, "bulkhead").with_context(|| {
                format!(
                    "no bulkhead beside {} (build it with `cargo build --bins`, or pass \
                     --bulkhead-bin or set BULKHEAD_BIN)",
                    me.display()
                )
            })?
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "the bulkhead binary {} does not exist",
        path.display()
    );
    Ok(path)
}

/// `--kernel`, or else the test guest beside the build:
/// target/{debug,release}/bulkhead-bench -> target/guest/testguest.
fn testguest(kernel: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(k) = kernel {
        return Ok(k);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("guest/testguest")))
        .filter(|g| g.is_file())
        .context(
            "no test guest beside bulkhead-bench (build it with tests/guest/build-testguest.sh, \
             or pass --kernel)",
        )
}
