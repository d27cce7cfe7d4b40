//! Shared support for the integration tests: where the built artefacts are, and helpers
//! that fail loudly (never skip) when something a test needs is missing.

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
