//! A real Linux virtio_blk driver (the guest kit's kernel under QEMU TCG) against our
//! standalone `bulkhead-worker blk` through vhost-user, and the worker's sandbox read
//! from outside while it serves.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::qemu::{qemu_with_vhost_user, GUEST_RAM_MEMFD};
use tests::sandbox_facts::SandboxFacts;
use tests::worker::Worker;
use tests::{require_tool, run_with_deadline, scratch_dir, worker_bin, RunResult};

const BLOCK: u64 = 4096;
/// Blocks the guest writes with a seeded pattern (scattered, including the last 4 KiB of
/// the first 16 MiB; none inside the 0xaa-filled range at 8..10 MiB).
const PATTERN_BLOCKS: [u64; 5] = [3, 77, 1000, 3000, 4095];
const DISCARD_OFFSET: u64 = 8 << 20;
const DISCARD_LEN: u64 = 1 << 20;
const DISK_SIZE: u64 = 32 << 20;
const STATUS_MEMFD: &str = "bulkhead-worker-status";

fn pattern(block: u64) -> Vec<u8> {
    // What `yes bulkhead-N | head -c 4096` produces in the guest.
    let line = format!("bulkhead-{block}\n");
    line.bytes().cycle().take(BLOCK as usize).collect()
}

fn md5_hex(data: &[u8]) -> String {
    let md5sum = require_tool("md5sum", "coreutils");
    let mut child = Command::new(md5sum)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn make_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(DISK_SIZE).unwrap();
    // A recognisable fill where the guest will discard, and just after it.
    f.write_all_at(&vec![0xaa; (2 * DISCARD_LEN) as usize], DISCARD_OFFSET)
        .unwrap();
    path
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0; len as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn assert_guest_ok(r: &RunResult, worker_stderr: &str) {
    assert!(
        r.stdout.contains("GUESTKIT done rc=0"),
        "guest command failed: {}\n--- worker ---\n{worker_stderr}",
        r.transcript()
    );
}

/// Runs QEMU to completion while reading the worker's sandbox facts as it serves.
fn run_guest_and_check_sandbox(worker: &mut Worker, qemu: Command, disk: &Path) -> RunResult {
    let qemu_thread = std::thread::spawn(move || run_with_deadline(qemu, Duration::from_secs(120)));
    let pid = worker.sandboxed_pid();
    let facts = SandboxFacts::read(pid);
    facts.assert_confined(disk, &[GUEST_RAM_MEMFD, STATUS_MEMFD]);
    qemu_thread.join().expect("QEMU thread")
}

#[test]
fn linux_writes_reads_discards_through_the_sandboxed_worker_io_uring() {
    linux_writes_reads_discards("io_uring");
}

#[test]
fn linux_writes_reads_discards_through_the_sandboxed_worker_sync() {
    linux_writes_reads_discards("sync");
}

fn linux_writes_reads_discards(engine: &str) {
    let dir = scratch_dir(&format!("worker-rw-{engine}"));
    let disk = make_disk(&dir);
    let socket = dir.join("vhu.sock");
    let mut worker = Worker::start(
        &worker_bin(),
        &socket,
        &disk,
        &[
            "--num-queues",
            "2",
            "--serial",
            "bulkhead-rw",
            "--engine",
            engine,
        ],
    );
    let blocks = PATTERN_BLOCKS.map(|b| b.to_string()).join(" ");
    let guest_cmd = format!(
        "set -e; cat /sys/block/vda/serial 2>/dev/null | sed 's/^/serial /'; echo queues $(ls /sys/block/vda/mq | wc -l); \
         for i in {blocks}; do yes bulkhead-$i | head -c 4096 | dd of=/dev/vda bs=4096 seek=$i conv=notrunc,fsync oflag=direct 2>/dev/null; done; \
         sync; echo 3 > /proc/sys/vm/drop_caches; \
         for i in {blocks}; do echo sum $i $(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | md5sum); done; \
         blkdiscard -o {DISCARD_OFFSET} -l {DISCARD_LEN} /dev/vda; echo discard ok; sync"
    );
    let qemu = qemu_with_vhost_user(&socket, 2, &guest_cmd);
    let r = run_guest_and_check_sandbox(&mut worker, qemu, &disk);
    let (code, worker_err) = worker.finish(Duration::from_secs(20));
    assert_guest_ok(&r, &worker_err);
    let t = r.transcript();
    assert!(
        worker_err.contains(&format!("(sandboxed, engine {engine})")),
        "{worker_err}"
    );
    assert!(
        r.stdout.contains("queues 2"),
        "guest must see 2 queues: {t}"
    );
    for b in PATTERN_BLOCKS {
        let want = format!("sum {b} {}", md5_hex(&pattern(b)));
        assert!(
            r.stdout.contains(&want),
            "guest checksum of block {b}: want {want:?}: {t}"
        );
        assert!(
            read_at(&disk, b * BLOCK, BLOCK) == pattern(b),
            "host image block {b} does not hold the guest's pattern"
        );
    }
    assert!(r.stdout.contains("discard ok"), "{t}");
    assert!(
        read_at(&disk, DISCARD_OFFSET, DISCARD_LEN)
            .iter()
            .all(|&b| b == 0),
        "discarded range must read back as zeroes on the host"
    );
    assert!(
        read_at(&disk, DISCARD_OFFSET + DISCARD_LEN, DISCARD_LEN)
            .iter()
            .all(|&b| b == 0xaa),
        "bytes after the discarded range must be untouched"
    );
    assert!(
        read_at(&disk, 0, 3 * BLOCK).iter().all(|&b| b == 0),
        "untouched blocks stay zero"
    );
    assert_eq!(
        code,
        Some(0),
        "worker exits cleanly when QEMU disconnects:\n{worker_err}"
    );
}

#[test]
fn readonly_worker_refuses_the_guests_writes() {
    let dir = scratch_dir("worker-ro");
    let disk = make_disk(&dir);
    let before = std::fs::read(&disk).unwrap();
    let socket = dir.join("vhu.sock");
    let mut worker = Worker::start(&worker_bin(), &socket, &disk, &["--readonly"]);
    let guest_cmd = "echo ro $(cat /sys/block/vda/ro); \
        if yes x | head -c 4096 | dd of=/dev/vda bs=4096 seek=1 conv=notrunc oflag=direct; then echo write succeeded; else echo write failed; fi; \
        dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | wc -c | sed 's/^/read /'";
    let qemu = qemu_with_vhost_user(&socket, 1, guest_cmd);
    let r = run_guest_and_check_sandbox(&mut worker, qemu, &disk);
    let (code, worker_err) = worker.finish(Duration::from_secs(20));
    assert_guest_ok(&r, &worker_err);
    let t = r.transcript();
    assert!(
        r.stdout.contains("ro 1"),
        "guest must see a read-only disk: {t}"
    );
    assert!(r.stdout.contains("write failed"), "{t}");
    assert!(r.stdout.contains("read 4096"), "reads still work: {t}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a readonly image must not change"
    );
    assert_eq!(code, Some(0), "{worker_err}");
}

/// Seconds between two /proc/uptime stamps the guest printed as `NAME T0 T1`.
fn guest_seconds(stdout: &str, name: &str) -> Option<f64> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))?;
    let mut t = line.split_whitespace().map(|v| v.parse::<f64>().ok());
    let (t0, t1) = (t.next()??, t.next()??);
    Some(t1 - t0)
}

// busybox dd prints no rate: the guest stamps /proc/uptime around each dd.
const DD_CMD: &str = "dd if=/dev/urandom of=/tmp/src bs=1M count=32 2>/dev/null; \
    a=$(cut -d' ' -f1 /proc/uptime); dd if=/tmp/src of=/dev/vda bs=1M count=32 oflag=direct 2>/dev/null; \
    b=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/vda of=/dev/null bs=1M count=32 iflag=direct 2>/dev/null; \
    c=$(cut -d' ' -f1 /proc/uptime); echo write $a $b; echo read $b $c; \
    echo src $(md5sum < /tmp/src); echo dst $(dd if=/dev/vda bs=1M count=32 iflag=direct 2>/dev/null | md5sum)";

fn assert_dd_roundtrip(r: &RunResult, who: &str) -> Vec<String> {
    let t = r.transcript();
    assert!(r.stdout.contains("GUESTKIT done rc=0"), "{who}: {t}");
    let src = r.stdout.lines().find_map(|l| l.strip_prefix("src "));
    let dst = r.stdout.lines().find_map(|l| l.strip_prefix("dst "));
    assert!(
        src.is_some() && src == dst,
        "{who}: written and read data differ: {t}"
    );
    ["write", "read"]
        .map(|what| {
            let secs = guest_seconds(&r.stdout, what)
                .unwrap_or_else(|| panic!("{who}: no {what} timing: {t}"));
            format!("{:.1} MiB/s", 32.0 / secs.max(0.01))
        })
        .to_vec()
}

/// The same dd write/read through our worker and through qemu-storage-daemon, in one
/// run: both must round-trip the data; the rates are printed for comparison (TCG speed,
/// not a performance reference; benchmarks live in `bulkhead-bench`).
#[test]
fn dd_through_our_worker_and_qemu_storage_daemon() {
    let dir = scratch_dir("worker-dd");
    let ours = make_disk(&dir);
    let socket = dir.join("ours.sock");
    let mut worker = Worker::start(&worker_bin(), &socket, &ours, &["--num-queues", "2"]);
    let r =
        run_guest_and_check_sandbox(&mut worker, qemu_with_vhost_user(&socket, 2, DD_CMD), &ours);
    let (_, worker_err) = worker.finish(Duration::from_secs(20));
    let our_rates = assert_dd_roundtrip(&r, &format!("bulkhead-worker\n{worker_err}"));

    let qsd_disk = dir.join("qsd.img");
    std::fs::copy(&ours, &qsd_disk).unwrap();
    let qsd_socket = dir.join("qsd.sock");
    let mut qsd = tests::storage_daemon(&qsd_disk, &qsd_socket, ",num-queues=2");
    std::thread::sleep(Duration::from_millis(200));
    let r = run_with_deadline(
        qemu_with_vhost_user(&qsd_socket, 2, DD_CMD),
        Duration::from_secs(120),
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
    let qsd_rates = assert_dd_roundtrip(&r, "qemu-storage-daemon");
    eprintln!(
        "dd 32 MiB O_DIRECT in a TCG guest: bulkhead-worker write {} read {}; qemu-storage-daemon write {} read {}",
        our_rates[0], our_rates[1], qsd_rates[0], qsd_rates[1]
    );
}
