//! Shared support for the integration tests: where the built artefacts are, and helpers
//! that fail loudly (never skip) when something a test needs is missing.

pub mod sandbox_facts;
pub mod worker;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Root of the cargo workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// `target/guest`: the test guest and the Linux guest kit are built here.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"))
}

/// Returns `path` if it exists; panics with `how` (the command that builds it) otherwise.
pub fn require_file(path: PathBuf, how: &str) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: build it with `{how}` (the test command does this)",
        path.display()
    );
    path
}

/// The freestanding test guest.
pub fn testguest() -> PathBuf {
    require_file(
        guest_dir().join("testguest"),
        "tests/guest/build-testguest.sh",
    )
}

/// The `bulkhead` binary: `$BULKHEAD_BIN`, else the workspace's debug build.
pub fn bulkhead_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/bulkhead"));
    require_file(path, "cargo build --bins")
}

/// Absolute path of a host tool, or a panic that names the Debian package to install.
pub fn require_tool(tool: &str, debian_package: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .expect("run sh");
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !found.is_empty(),
        "`{tool}` is not installed: `apt-get install {debian_package}` (the test command does this)"
    );
    PathBuf::from(found)
}

/// Fails unless /dev/kvm can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm, which cannot be opened: {e}");
    }
}

/// A fresh scratch directory under `target/test-tmp` (kept after the test for post-mortems).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = workspace_root()
        .join("target/test-tmp")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// What a finished child process left behind.
#[derive(Debug)]
pub struct RunResult {
    /// Exit code, `None` if a signal ended it (or we killed it at the deadline).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: std::time::Duration,
    /// True when the hard deadline passed and the process was killed.
    pub killed: bool,
}

impl RunResult {
    /// Everything it printed, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit code {:?} after {:.2} s{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed.as_secs_f64(),
            if self.killed {
                " (killed at the deadline)"
            } else {
                ""
            },
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` with stdin closed, kills it after `deadline`, and collects its output.
pub fn run_with_deadline(mut cmd: Command, deadline: std::time::Duration) -> RunResult {
    use std::io::Read;
    use std::process::Stdio;
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().expect("wait for killed child");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    RunResult {
        code: status.code(),
        stdout,
        stderr,
        elapsed,
        killed,
    }
}

/// `bulkhead <args>` with a hard deadline.
pub fn run_bulkhead(args: &[&str], deadline: std::time::Duration) -> RunResult {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(args);
    run_with_deadline(cmd, deadline)
}

/// The test guest's result lines (`TG ...`), serial noise removed.
pub fn tg_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("TG "))
        .map(str::to_string)
        .collect()
}

/// The release-featured worker: `$BULKHEAD_WORKER_BIN`, else the workspace's debug build.
pub fn worker_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/bulkhead-worker"));
    require_file(path, "cargo build --bins")
}

/// The worker built with the test-only fault hooks, in its own target dir so feature
/// unification never puts hooks into the other build: `$BULKHEAD_WORKER_HOOKS_BIN`, else
/// `target/hooks/debug/bulkhead-worker`.
pub fn worker_hooks_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_WORKER_HOOKS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/hooks/debug/bulkhead-worker"));
    require_file(
        path,
        "cargo build -p device-workers --features test-hooks --target-dir target/hooks",
    )
}
