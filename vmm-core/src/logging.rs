//! Where bulkhead's log goes and how it looks: text or JSON lines, stderr or a file, the
//! level from `--log-level` (or a file's `log.level`) or `BULKHEAD_LOG`. One log for the
//! VMM, its spawner and its workers: a worker's lines come through the VMM
//! ([`crate::worker_output`]) and so take its format; the spawner is told the same
//! settings; each worker gets the level as its `BULKHEAD_LOG`. Every line logged for a disk
//! (on its threads, and as it is attached) is inside a `disk` span with its `id`: text shows
//! `disk{id=blk0}:`, JSON has `"span": {"id": "blk0", "name": "disk"}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `TIME LEVEL [span:] message`, for people.
    #[default]
    Text,
    /// One JSON object a line: timestamp, level, message, the disk's span.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The log, as a file or the flags give it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// Append here instead of stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or comma-separated
    /// `target=level` directives; none: `BULKHEAD_LOG`, else `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// Errors of setting the log up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "{source_name} {value:?}: {why} (levels: error, warn, info, debug, trace, off; or \
         target=level directives){hint}"
    )]
    Level {
        source_name: &'static str,
        value: String,
        why: String,
        hint: &'static str,
    },
    #[error("cannot open --log-file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// The level directives `cfg` and the environment ask for: `cfg.level`, else
/// `BULKHEAD_LOG`, else `info`. A bare word that is not a level is refused rather than
/// taken as a target name (which would silently hide every line: `BULKHEAD_LOG=json` once
/// did); directives that name no level of their own get `info` for everything else (a
/// filter of only `vmm_core=debug` would hide every other line, errors included).
pub fn directives(cfg: &LogConfig) -> Result<String, LogError> {
    let (source_name, value) = match (&cfg.level, std::env::var("BULKHEAD_LOG")) {
        (Some(level), _) => ("--log-level", level.clone()),
        (None, Ok(env)) if !env.trim().is_empty() => ("BULKHEAD_LOG", env),
        (None, _) => return Ok("info".to_string()),
    };
    check_directives(&value).map_err(|why| LogError::Level {
        source_name,
        hint: if value.trim().eq_ignore_ascii_case("json") {
            "; JSON lines are --log-format json"
        } else {
            ""
        },
        value: value.clone(),
        why,
    })
}

/// Checks `value` and returns it with a default level in front where it has none.
fn check_directives(value: &str) -> Result<String, String> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!("holds the control character {c:?}"));
    }
    let mut has_level = false;
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // Spans and fields (`[disk{id=blk0}]`, `target[span]=level`) are EnvFilter's to
        // judge; a bare word must be a level.
        if directive.contains(['=', '[']) {
            continue;
        }
        if !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?} is not a level"));
        }
        has_level = true;
    }
    let value = if has_level {
        value.to_string()
    } else {
        format!("info,{value}")
    };
    tracing_subscriber::EnvFilter::builder()
        .parse(&value)
        .map_err(|e| e.to_string())?;
    Ok(value)
}

/// The log file, once [`init`] opened one: the spawner is handed this descriptor (it never
/// opens the path again).
static LOG_FILE: std::sync::OnceLock<std::sync::Arc<std::fs::File>> = std::sync::OnceLock::new();

/// The open log file, if the log goes to one.
pub fn log_file() -> Option<&'static std::fs::File> {
    LOG_FILE.get().map(|f| &**f)
}

/// Where [`init`] writes.
#[derive(Debug)]
pub enum LogTarget {
    /// Stderr, or the file `LogConfig::file` names (opened here).
    Config,
    /// A log file already open (the spawner's, handed over by its VMM).
    Fd(std::fs::File),
}

/// Sets up this process's log as `cfg` says; returns the level directives it uses (for
/// the processes it starts).
pub fn init(cfg: &LogConfig) -> Result<String, LogError> {
    init_to(cfg, LogTarget::Config)
}

/// [`init`], writing to `target`.
pub fn init_to(cfg: &LogConfig, target: LogTarget) -> Result<String, LogError> {
    let directives = directives(cfg)?;
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .expect("checked by directives()");
    let file = match (target, &cfg.file) {
        (LogTarget::Fd(f), _) => Some(std::sync::Arc::new(f)),
        (LogTarget::Config, Some(path)) => Some(std::sync::Arc::new(open_log_file(path)?)),
        (LogTarget::Config, None) => None,
    };
    if let Some(f) = &file {
        let _ = LOG_FILE.set(f.clone());
    }
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = move || -> Box<dyn std::io::Write> {
        match &file {
            // Each line is one write(2) on an O_APPEND descriptor: lines of processes that
            // share the file never interleave within a line.
            Some(f) => Box::new(LineWriter(f.clone())),
            None => Box::new(std::io::stderr()),
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // A log line that cannot be written is lost, not a panic (the default reports the
        // failure with eprintln!, which panics when stderr itself is what failed).
        .log_internal_errors(false)
        .with_writer(writer);
    let _ = match cfg.format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(directives)
}

/// Opens the log file to append: never through a symlink, never anything but a regular
/// file (a FIFO would block bulkhead, a device would take the log), created 0640.
fn open_log_file(path: &std::path::Path) -> Result<std::fs::File, LogError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let err = |source| LogError::File {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let kind = file.metadata().map_err(err)?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}"),
        )));
    }
    // Writes to a regular file do not block anyway; leave the descriptor as it would be.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND),
    )
    .map_err(|e| err(e.into()))?;
    Ok(file)
}

/// The log file, for one event: the formatter hands each event over whole, so it reaches
/// the file in one write(2).
struct LineWriter(std::sync::Arc<std::fs::File>);

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_checked_and_a_stray_word_is_refused() {
        for (ok, becomes) in [
            ("info", "info"),
            ("DEBUG", "DEBUG"),
            ("warn,vmm_core::api=trace", "warn,vmm_core::api=trace"),
            ("off", "off"),
            ("info,", "info,"),
            // No level of their own: everything else stays at info.
            ("vmm_core=debug", "info,vmm_core=debug"),
            ("[disk{id=blk0}]=debug", "info,[disk{id=blk0}]=debug"),
        ] {
            let got = check_directives(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(got, becomes, "{ok}");
        }
        for (bad, says) in [
            ("json", "\"json\" is not a level"),
            ("info,loud", "\"loud\" is not a level"),
            ("x=verbose", "error parsing level filter"),
            ("a\u{0}b=info", "control character"),
        ] {
            let e = check_directives(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let cfg = LogConfig {
            level: Some("json".into()),
            ..LogConfig::default()
        };
        let e = directives(&cfg).unwrap_err().to_string();
        assert!(e.starts_with("--log-level \"json\""), "{e}");
        assert!(e.ends_with("; JSON lines are --log-format json"), "{e}");
    }
}
