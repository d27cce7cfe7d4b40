//! What the benches share about the host: processes and threads in /proc, CPU pinning,
//! tools on PATH, image locks, QEMU's own disk, and the test guest's result lines.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A command started on core 1 (by taskset, so its threads inherit it). Every system runs
/// this way, the same layout as the jitter experiment's (DESIGN.md): core 0 for the
/// guest's vCPU thread (moved there by `io::output_pinned`), core 1 for everything serving
/// its I/O; fio, the host's limit, runs on core 1 alone.
pub fn on_io_core() -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]);
    cmd
}

/// Appends QEMU's own virtio-blk-device on `image` (O_DIRECT, io_uring), in an IOThread
/// or not.
pub fn qemu_virtio_blk(cmd: &mut Command, image: &Path, iothread: bool) {
    qemu_virtio_blk_format(cmd, image, "raw", iothread);
}

/// [`qemu_virtio_blk`] of an image in `format` (QEMU's own driver for it).
pub fn qemu_virtio_blk_format(cmd: &mut Command, image: &Path, format: &str, iothread: bool) {
    let drive = format!(
        "id=d0,if=none,file={},format={format},cache=none,aio=io_uring",
        image.display()
    );
    if iothread {
        cmd.args(["-object", "iothread,id=io0", "-drive", &drive])
            .args(["-device", "virtio-blk-device,drive=d0,iothread=io0"]);
    } else {
        cmd.args(["-drive", &drive, "-device", "virtio-blk-device,drive=d0"]);
    }
}

/// The children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The thread of `pid` named `comm`.
pub fn find_thread(pid: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (name.trim_end() == comm)
                .then(|| t.file_name().to_str()?.parse().ok())
                .flatten()
        })
}

/// Pins thread `tid` to `cpu`.
pub fn pin(tid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a set we own.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from a live set.
    let ret = unsafe {
        libc::sched_setaffinity(
            tid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    anyhow::ensure!(
        ret == 0,
        "pin thread {tid} to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Waits until no writer's lock is left on `image` (a QEMU + bulkhead-worker run's worker
/// exits a moment after QEMU, and its io_uring releases the image after that).
pub fn wait_unlocked(image: &Path) -> anyhow::Result<()> {
    let released = vmm_core::disk::image::ImageProbe::open(image)
        .is_none_or(|probe| probe.wait_released(Duration::from_secs(10)));
    anyhow::ensure!(
        released,
        "the image {} is still locked after 10 s",
        image.display()
    );
    Ok(())
}

/// `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The number after `key=` in a test guest's `TG ...` result line.
pub fn tg_field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_a_guest_result_line() {
        let line = "TG bench dev=0 iops=2530 mibps=316.27 p99_us=8233";
        assert_eq!(tg_field(line, "iops"), Some(2530.0));
        assert_eq!(tg_field(line, "mibps"), Some(316.27));
        assert_eq!(tg_field(line, "p99"), None, "a key is matched whole");
        assert_eq!(tg_field(line, "max_us"), None);
    }
}
