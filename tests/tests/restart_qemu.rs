//! A real Linux driver under QEMU TCG keeps writing and verifying while the test kills
//! our standalone worker again and again (SIGKILL or SIGTERM, to the confined worker or to
//! the pid it was started as) and starts a new one on the same socket. QEMU
//! reconnects (`reconnect=1`) and hands every new worker the inflight region; the new
//! worker resubmits what its predecessor left in flight. The guest must see no I/O error
//! and every block must verify.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::qemu::qemu_with_vhost_user_opts;
use tests::worker::Worker;
use tests::{run_with_deadline, scratch_dir, worker_bin};

/// How long the guest writes and verifies.
const GUEST_SECONDS: u32 = 75;
/// Kills the test asks for at least (the bar).
const MIN_KILLS: u32 = 20;
const BLOCKS: [u32; 6] = [1, 50, 300, 2000, 4000, 7000];

/// A new worker on the socket; returns once QEMU has reconnected and it is confined.
fn start_worker(socket: &Path, disk: &Path) -> (Worker, u32) {
    let mut w = Worker::start(&worker_bin(), socket, disk, &["--num-queues", "2"]);
    let pid = w.sandboxed_pid();
    (w, pid)
}

#[test]
fn linux_survives_kills_of_the_worker_and_of_its_started_pid() {
    let dir = scratch_dir("restart-qemu");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let socket = dir.join("vhu.sock");
    let blocks = BLOCKS.map(|b| b.to_string()).join(" ");
    // Rounds of: write a round-specific pattern to scattered blocks (O_DIRECT, fsync), then
    // read each back (O_DIRECT) and compare checksums. Any dd failure ends the script
    // (set -e) with a non-zero status.
    let guest_cmd = format!(
        "set -e; now() {{ cut -d. -f1 /proc/uptime; }}; end=$(( $(now) + {GUEST_SECONDS} )); r=0; bad=0; \
         while [ $(now) -lt $end ]; do r=$((r+1)); \
         for i in {blocks}; do yes r$r-$i | head -c 4096 | dd of=/dev/vda bs=4096 seek=$i oflag=direct conv=notrunc,fsync 2>/dev/null; done; \
         for i in {blocks}; do a=$(dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32); \
         b=$(yes r$r-$i | head -c 4096 | md5sum | cut -c1-32); \
         if [ \"$a\" != \"$b\" ]; then echo BAD round $r block $i; bad=$((bad+1)); fi; done; done; \
         echo CHAOS rounds=$r bad=$bad"
    );
    let mut first = Worker::start(&worker_bin(), &socket, &disk, &["--num-queues", "2"]);
    let qemu = qemu_with_vhost_user_opts(&socket, 2, &guest_cmd, true);
    let qemu_thread = std::thread::spawn(move || run_with_deadline(qemu, Duration::from_secs(240)));
    let mut pid = first.sandboxed_pid();
    // The serving worker; None once the run ended with its worker gone.
    let mut worker = Some(first);

    let (mut rng, seed) = tests::XorShift::from_clock();
    let mut kills = 0u32;
    let mut log = String::new();
    // Give the guest time to boot and start its loop, then kill at random moments; QEMU
    // retries the socket once a second, so one kill per 1.2-2.2 s keeps it busy.
    std::thread::sleep(Duration::from_secs(8));
    let started = Instant::now();
    while !qemu_thread.is_finished() && started.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_millis(1200 + rng.next_u64() % 1000));
        if qemu_thread.is_finished() {
            break;
        }
        let Some(serving) = worker.take() else { break };
        // In turn: SIGKILL the confined worker, SIGKILL the pid that was started (a
        // supervisor's view of the worker), SIGTERM the confined worker, SIGTERM the
        // started pid. Each must end the confined worker and free the image, or the next
        // worker on the socket is refused ("in use by another process").
        let started_pid = serving.child.id();
        let (target, sig, code) = match kills % 4 {
            0 => (pid, libc::SIGKILL, Some(128 + libc::SIGKILL)),
            1 => (started_pid, libc::SIGKILL, None),
            2 => (pid, libc::SIGTERM, Some(128 + libc::SIGTERM)),
            _ => (started_pid, libc::SIGTERM, None),
        };
        // SAFETY: kill(2) with a pid we started or read from the worker's own report.
        let rc = unsafe { libc::kill(target as i32, sig) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // The guest's loop may have ended between the check above and the kill: QEMU
            // powering off disconnects the worker, which then exits by itself. Anything
            // else is a worker that died on its own, which the test must not hide.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !qemu_thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let (code, text) = serving.finish(Duration::from_secs(10));
            assert!(
                qemu_thread.is_finished(),
                "kill worker {pid}: {err}, and QEMU still runs: the worker ended on its own \
                 ({code:?}):\n{text}"
            );
            log.push_str(&text);
            break;
        }
        let (ended, text) = serving.finish(Duration::from_secs(10));
        if ended == Some(0) && ended != code {
            // The kill found a process already on its way out: QEMU powered off between
            // the check above and the kill (the guest's loop had ended), and the worker,
            // disconnected, exited by itself. Only that may explain a clean exit.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !qemu_thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                qemu_thread.is_finished(),
                "signal {sig} to pid {target}: it exited 0, and QEMU still runs:\n{text}"
            );
            log.push_str(&text);
            break;
        }
        kills += 1;
        assert_eq!(ended, code, "signal {sig} to pid {target}:\n{text}");
        log.push_str(&text);
        let (next, next_pid) = start_worker(&socket, &disk);
        worker = Some(next);
        pid = next_pid;
    }
    let r = qemu_thread.join().expect("QEMU thread");
    if let Some(w) = worker {
        let (_, text) = w.finish(Duration::from_secs(20));
        log.push_str(&text);
    }
    let t = format!(
        "seed {seed:#x}, {kills} kills\n{}\n--- workers ---\n{log}",
        r.transcript()
    );
    assert!(r.stdout.contains("GUESTKIT done rc=0"), "guest: {t}");
    let summary = r
        .stdout
        .lines()
        .find(|l| l.starts_with("CHAOS "))
        .unwrap_or_else(|| panic!("no summary: {t}"));
    assert!(summary.ends_with(" bad=0"), "{summary}: {t}");
    for sign in [
        "I/O error",
        "blk_update_request",
        "critical medium error",
        "timeout",
    ] {
        assert!(
            !r.stdout.contains(sign),
            "guest kernel reported {sign:?}: {t}"
        );
    }
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills happened during the guest's I/O: {t}"
    );
    let rounds: u32 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rounds="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(rounds >= 3, "the guest kept doing I/O: {summary}");
    let resubmits = log.matches("request(s) resubmitted").count();
    eprintln!(
        "{summary}; {kills} kills, {resubmits} restarts resubmitted requests (seed {seed:#x})"
    );
}
