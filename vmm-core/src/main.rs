//! `bulkhead`: a KVM VMM whose disks are served by sandboxed worker processes.

use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ctl_cmd;
mod policy_cmd;
mod run_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    disable_help_subcommand = true,
    about = "A KVM VMM whose disks live in sandboxed worker processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest.
    Run(run_cmd::RunArgs),
    /// Print a shell completion script for bulkhead (e.g. `bulkhead completions bash >
    /// /usr/share/bash-completion/completions/bulkhead`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print bulkhead's man page (roff; `bulkhead man | man -l -`), or that of one of its
    /// commands (`bulkhead man run`: bulkhead-run(1)).
    Man {
        /// A command (run, policy, ctl, completions, man). [default: bulkhead itself]
        command: Option<String>,
    },
    /// Audit the seccomp policies of the workers.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Talk to a running bulkhead through its --api-socket.
    Ctl(ctl_cmd::CtlArgs),
    /// (internal) The process `bulkhead run` starts workers through (see
    /// vmm-core/src/spawner.rs); not for people.
    #[command(hide = true)]
    Spawner {
        #[arg(long)]
        socket_fd: i32,
        #[arg(long)]
        worker_bin: PathBuf,
        #[arg(long)]
        learn: bool,
        /// The VMM's cgroup directory for its workers (vmm-core/src/cgroup.rs).
        #[arg(long, requires = "worker_memory_max")]
        cgroup_dir: Option<PathBuf>,
        /// memory.max of each worker's leaf there.
        #[arg(long)]
        worker_memory_max: Option<u64>,
        /// Refuse a worker whose leaf cannot be made.
        #[arg(long)]
        cgroup_required: bool,
        /// The VMM's log format.
        #[arg(long, value_enum, default_value_t = vmm_core::logging::LogFormat::Text)]
        log_format: vmm_core::logging::LogFormat,
        /// The VMM's log file, open at this descriptor.
        #[arg(long)]
        log_fd: Option<i32>,
        /// The disks NBD servers serve (JSON): the only servers the spawner connects to.
        #[arg(long)]
        nbd_disks: Option<String>,
        /// The VMM's API socket, removed once the VMM is gone if still the one bound...
        #[arg(long, requires = "api_socket_id")]
        api_socket: Option<PathBuf>,
        /// ...that is, still of this DEV:INO.
        #[arg(long, value_parser = parse_dev_ino)]
        api_socket_id: Option<(u64, u64)>,
    },
}

/// Opens /dev/null on any of descriptors 0, 1 and 2 that is closed, so that no socket,
/// pipe or image bulkhead opens later lands there (and is read as stdin or written as
/// output by code that means the terminal).
fn ensure_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a descriptor number only reads its flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: opens a path with flags; the lowest free number is `fd` (the ones
            // below it are open), which stays open for the life of the process.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

fn main() -> ExitCode {
    ensure_standard_fds();
    let cli = Cli::parse();
    // `ctl` keeps SIGPIPE ignored: a socket the VMM closed early is an error it reports,
    // and its own closed stdout it notices on the write.
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Spawner { .. } | Command::Ctl(_)
    ) {
        // A command whose output is piped into `head` ends quietly when the reader goes,
        // as other tools do, instead of panicking on the write (Rust ignores SIGPIPE).
        // SAFETY: restores the default action of one signal; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // `bulkhead run` sets its log up from its configuration (flags or file); the spawner
    // from what its VMM passed on; every other command logs to stderr as BULKHEAD_LOG says.
    use vmm_core::logging::{LogConfig, LogTarget};
    match &cli.command {
        Command::Run(_) => {}
        Command::Spawner {
            log_format, log_fd, ..
        } => {
            let target = match log_fd {
                Some(fd) => {
                    // SAFETY: the VMM put its log file at this descriptor for this process
                    // alone; it is taken once, here.
                    let file = unsafe { std::fs::File::from_raw_fd(*fd) };
                    // Not for the workers this process starts.
                    let _ = nix::fcntl::fcntl(
                        &file,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    );
                    LogTarget::Fd(file)
                }
                None => LogTarget::Config,
            };
            let cfg = LogConfig {
                format: *log_format,
                ..LogConfig::default()
            };
            if let Err(e) = vmm_core::logging::init_to(&cfg, target) {
                vmm_core::say!("bulkhead spawner: error: {e}");
                return ExitCode::FAILURE;
            }
        }
        _ => {
            // A command that does not run a VM logs little; a BULKHEAD_LOG it cannot read
            // does not stop it (man, completions, policy), it says so and logs at info.
            if let Err(e) = vmm_core::logging::init(&LogConfig::default()) {
                vmm_core::say!("bulkhead: warning: {e}; logging at info");
                let info = LogConfig {
                    level: Some("info".into()),
                    ..LogConfig::default()
                };
                let _ = vmm_core::logging::init(&info);
            }
        }
    }
    if let Command::Policy(cmd) = cli.command {
        return match policy_cmd::policy_command(cmd) {
            Ok(code) => code,
            Err(e) => {
                vmm_core::say!("bulkhead: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match cli.command {
        Command::Policy(_) => unreachable!("handled above"),
        Command::Ctl(args) => ctl_cmd::ctl(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "bulkhead",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { command } => {
            let root = <Cli as clap::CommandFactory>::command();
            let page = match &command {
                None => root,
                Some(name) => match root.find_subcommand(name).filter(|c| !c.is_hide_set()) {
                    // The page is named bulkhead-NAME(1); the process ends right after.
                    Some(sub) => sub
                        .clone()
                        .name(&*Box::leak(format!("bulkhead-{name}").into_boxed_str()))
                        .bin_name(format!("bulkhead {name}"))
                        .version(env!("CARGO_PKG_VERSION")),
                    None => {
                        vmm_core::say!("bulkhead: error: no command {name:?} to show a page of");
                        return ExitCode::FAILURE;
                    }
                },
            };
            match clap_mangen::Man::new(page).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    vmm_core::say!("bulkhead: error: cannot write the man page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Spawner {
            socket_fd,
            worker_bin,
            learn,
            cgroup_dir,
            worker_memory_max,
            cgroup_required,
            api_socket,
            api_socket_id,
            nbd_disks,
            ..
        } => match vmm_core::spawner::serve(
            socket_fd,
            worker_bin,
            learn,
            cgroup_dir
                .zip(worker_memory_max)
                .map(|(dir, max)| vmm_core::cgroup::VmCgroup::at(dir, max)),
            cgroup_required,
            api_socket.zip(api_socket_id),
            match nbd_disks.as_deref().map(serde_json::from_str).transpose() {
                Ok(list) => list.unwrap_or_default(),
                Err(e) => {
                    vmm_core::say!("bulkhead spawner: error: --nbd-disks: {e}");
                    return ExitCode::FAILURE;
                }
            },
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                vmm_core::say!("bulkhead spawner: error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run_cmd::start(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                vmm_core::say!("bulkhead: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `DEV:INO`, as the VMM passes its API socket's identity to the spawner.
fn parse_dev_ino(text: &str) -> Result<(u64, u64), String> {
    let (dev, ino) = text.split_once(':').ok_or("DEV:INO")?;
    Ok((
        dev.parse().map_err(|e| format!("{e}"))?,
        ino.parse().map_err(|e| format!("{e}"))?,
    ))
}
