//! Shared support for the integration tests: where the built artefacts are, and helpers
//! that fail loudly (never skip) when something a test needs is missing.

pub mod modgraph;
pub mod nested;
pub mod qemu;
pub mod sandbox_facts;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The `bulkhead-bench` binary: `$BULKHEAD_BENCH_BIN`, else the workspace's debug build.
pub fn bench_bin() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/bulkhead-bench"));
    require_file(path, "cargo build --bins")
}

/// Prometheus' `promtool`: `$BULKHEAD_PROMTOOL`, else `target/tools/promtool` (both put
/// there by scripts/test.sh, from Debian's prometheus package).
pub fn promtool() -> PathBuf {
    let path = std::env::var_os("BULKHEAD_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/tools/promtool"));
    require_file(
        path,
        "bash -c 'source scripts/lib.sh && ensure_promtool' (scripts/test.sh does this)",
    )
}

/// qemu-storage-daemon exporting `image` read-write as vhost-user-blk on `socket`
/// (`options` are added to the export's, e.g. `,num-queues=2`), once it accepts a
/// connection there. The caller kills it.
pub fn storage_daemon(image: &Path, socket: &Path, options: &str) -> std::process::Child {
    let child = Command::new(require_tool("qemu-storage-daemon", "qemu-system-x86"))
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on{options}",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
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

/// The size of a qcow2 image [`make_qcow2`] makes: its own, or its backing file's.
#[derive(Clone, Copy, Debug)]
pub enum Qcow2Of<'a> {
    /// `qemu-img create` size syntax (`8M`), no backing file.
    Size(&'a str),
    /// Over a backing file, named in the header as given (relative names are taken from the
    /// image's directory), in this format.
    Backing(&'a str, &'a str),
}

/// `qemu-img create -q -f qcow2` of `image`; panics with qemu-img's words if it fails.
pub fn make_qcow2(image: &Path, of: Qcow2Of<'_>) {
    let mut cmd = Command::new(require_tool("qemu-img", "qemu-utils"));
    cmd.args(["create", "-q", "-f", "qcow2"]);
    match of {
        Qcow2Of::Size(size) => cmd.arg(image).arg(size),
        Qcow2Of::Backing(name, format) => cmd.args(["-b", name, "-F", format]).arg(image),
    };
    let out = cmd.output().expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
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
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
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
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
        stdout,
        stderr,
        elapsed,
        killed,
    }
}

impl RunResult {
    /// Asserts a refusal: the program ended by itself with a non-zero status and said why
    /// in exactly one stderr line that starts with `prefix` and mentions `expected`.
    pub fn assert_one_error_line(&self, prefix: &str, expected: &str) {
        let t = self.transcript();
        assert!(!self.killed, "hung instead of refusing: {t}");
        assert!(self.code.is_some(), "died of a signal: {t}");
        assert_ne!(self.code, Some(0), "must fail: {t}");
        let errors: Vec<_> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(errors.len(), 1, "want exactly one error line: {t}");
        assert!(errors[0].starts_with(prefix), "{t}");
        assert!(
            errors[0].contains(expected),
            "error should mention {expected:?}: {t}"
        );
    }
}

/// `bulkhead <args>` with a hard deadline.
pub fn run_bulkhead(args: &[&str], deadline: std::time::Duration) -> RunResult {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(args);
    run_with_deadline(cmd, deadline)
}

/// `bulkhead <args>` is refused: one `bulkhead: error:` line mentioning `expected`, a
/// non-zero exit, and nothing on stdout (no guest ran).
pub fn assert_bulkhead_refused(args: &[&str], expected: &str) {
    let r = run_bulkhead(args, std::time::Duration::from_secs(30));
    assert!(
        r.stdout.is_empty(),
        "no guest may have run: {}",
        r.transcript()
    );
    r.assert_one_error_line("bulkhead: error: ", expected);
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

/// The test guest's `blk-verify` pattern for 4 KiB block `block` (see
/// tests/guest/testguest/src/blk_verify.rs): 512 little-endian u64s, `block`, `seed`, then
/// xorshift64 from `(seed ^ block * 0x9e3779b97f4a7c15) | 1`.
pub fn blk_pattern(seed: u64, block: u64) -> Vec<u8> {
    let mut x = (seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = Vec::with_capacity(4096);
    for i in 0..512 {
        let v = match i {
            0 => block,
            1 => seed,
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
        };
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Checks a disk image after `blk-verify` on device `dev`: every covered block holds the
/// pattern, except the write-zeroes range (zeros) and the discard range (undefined), both
/// read from the guest's `TG blk dev=N wz=F+C discard=F+C` line. Returns a description of
/// the first mismatch.
pub fn check_blk_verify_image(
    image: &Path,
    stdout: &str,
    dev: usize,
    seed: u64,
    blocks: u64,
) -> Result<(), String> {
    let prefix = format!("TG blk dev={dev} wz=");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .ok_or_else(|| format!("no {prefix:?} line"))?;
    let range = |key: &str| -> Option<(u64, u64)> {
        let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        let (f, c) = v.split_once('+')?;
        Some((f.parse().ok()?, c.parse().ok()?))
    };
    let wz = range("wz=");
    let discard = range("discard=");
    let inside = |r: Option<(u64, u64)>, b: u64| r.is_some_and(|(f, c)| b >= f && b < f + c);
    let data = std::fs::read(image).map_err(|e| format!("read {}: {e}", image.display()))?;
    for b in 0..blocks {
        if inside(discard, b) {
            continue;
        }
        let got = data
            .get((b * 4096) as usize..((b + 1) * 4096) as usize)
            .ok_or_else(|| format!("image shorter than block {b}"))?;
        if inside(wz, b) {
            if got.iter().any(|&x| x != 0) {
                return Err(format!("block {b} should be zeroed (write-zeroes range)"));
            }
        } else if got != blk_pattern(seed, b).as_slice() {
            return Err(format!("block {b} does not hold the pattern"));
        }
    }
    Ok(())
}

/// A small xorshift generator for randomised test timing, seeded from the clock; the seed
/// goes into failure messages so a run can be replayed with [`XorShift::new`].
#[derive(Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    /// A generator seeded from the clock, and its seed.
    pub fn from_clock() -> (Self, u64) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        (XorShift(seed), seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `cmd` (bulkhead with a guest given `hold_ms`), calls `at_hold` with bulkhead's pid
/// and its log so far when the guest says it holds, and returns the exit status and the
/// whole log. bulkhead's stdin is a pipe held open until it exits (its serial input
/// thread lives as long).
pub fn run_until_hold(
    mut cmd: Command,
    mut at_hold: impl FnMut(u32, &str),
) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    // bulkhead is killed if it has not ended 90 s from now, or as soon as this thread
    // panics (an assertion in `at_hold` included): a failing test never leaves it running.
    let pid = child.id();
    let (finished, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(Duration::from_secs(90)).is_err() {
            // SAFETY: kill with a pid and a signal; the pid is our unreaped child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    let started = Instant::now();
    let mut held = false;
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with("TG hold") && !held {
            held = true;
            let text = log.lock().unwrap().clone();
            at_hold(pid, &text);
        }
    }
    let status = child.wait().unwrap();
    let _ = finished.send(());
    let killed = watchdog.join().unwrap_or(true);
    assert!(
        !killed,
        "bulkhead did not end within 90 s ({:?}): {}",
        started.elapsed(),
        log.lock().unwrap()
    );
    drop(child.stdin.take());
    reader.join().unwrap();
    let text = log.lock().unwrap().clone();
    assert!(held, "the guest never held: {text}");
    (status, text)
}

/// An NBD server a test started (qemu-nbd or nbdkit), killed when dropped; `spec` is the
/// `--disk` option that reaches it.
#[derive(Debug)]
pub struct NbdServer {
    child: std::process::Child,
    pub spec: String,
}

impl NbdServer {
    /// Kills the server now (a server that goes away under a running guest).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-nbd` serving the raw file `image` at the Unix socket `socket`, persistent (it
/// outlives a client: each worker connects anew) and for 8 clients at once, with `extra`
/// options (e.g. `--read-only`); returns once it listens.
pub fn qemu_nbd(image: &Path, socket: &Path, extra: &[&str]) -> NbdServer {
    let child = Command::new(require_tool("qemu-nbd", "qemu-utils"))
        .args(["--format=raw", "--persistent", "--shared=8", "--socket"])
        .arg(socket)
        .args(extra)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let server = NbdServer {
        child,
        spec: format!("nbd=unix:{}", socket.display()),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not listen at {}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server
}

/// `nbdkit`'s memory plugin (a RAM disk of `size`, e.g. `64M`) on a TCP port of
/// 127.0.0.1; returns once it listens.
pub fn nbdkit_memory(size: &str) -> NbdServer {
    nbdkit(&["memory", size])
}

/// `nbdkit` with `args` (filters, the plugin and its parameters) on a TCP port of
/// 127.0.0.1; returns once it listens.
pub fn nbdkit(args: &[&str]) -> NbdServer {
    let nbdkit = require_tool("nbdkit", "nbdkit");
    // A free port: one the kernel just handed out (nbdkit takes it a moment later).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let child = Command::new(nbdkit)
        .args(["--foreground", "--ipaddr", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let server = NbdServer {
        child,
        spec: format!("nbd=127.0.0.1:{port}"),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdkit did not listen on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server
}

/// `qemu-img ARGS`, which must succeed; its stdout and stderr.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new(require_tool("qemu-img", "qemu-utils"))
        .args(args)
        .output()
        .expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

/// `bulkhead ctl --api-socket API ARGS`: whether it succeeded, and its stdout and stderr.
pub fn ctl(api: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bulkhead_bin())
        .args(["ctl", "--api-socket"])
        .arg(api)
        .args(args)
        .output()
        .expect("run bulkhead ctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
