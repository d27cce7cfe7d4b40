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
/// `BULKHEAD_LOG`, else `info`. A word that is not a level is refused rather than taken as
/// a target name (which would silently hide every line: `BULKHEAD_LOG=json` once did).
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
    })?;
    Ok(value)
}

fn check_directives(value: &str) -> Result<(), String> {
    for directive in value.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(format!("{directive:?} names no target")),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{level:?} is not a level"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(value)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Sets up this process's log as `cfg` says; returns the level directives it uses (for
/// the processes it starts).
pub fn init(cfg: &LogConfig) -> Result<String, LogError> {
    let directives = directives(cfg)?;
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .expect("checked by directives()");
    let file = match &cfg.file {
        Some(path) => Some(std::sync::Arc::new(open_log_file(path)?)),
        None => None,
    };
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

fn open_log_file(path: &std::path::Path) -> Result<std::fs::File, LogError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LogError::File {
            path: path.to_path_buf(),
            source,
        })
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
        for ok in ["info", "DEBUG", "warn,vmm_core::api=trace", "off"] {
            check_directives(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("json", "\"json\" is not a level"),
            ("info,loud", "\"loud\" is not a level"),
            ("=debug", "names no target"),
            ("x=verbose", "\"verbose\" is not a level"),
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
