//! A standalone `bulkhead-worker` under test, with its stderr collected line by line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running standalone worker and what it printed.
#[derive(Debug)]
pub struct Worker {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    rx: Receiver<String>,
}

impl Worker {
    /// Starts `bin blk --socket SOCKET --disk DISK EXTRA..` and waits until it listens.
    pub fn start(bin: &Path, socket: &Path, disk: &Path, extra: &[&str]) -> Worker {
        let mut cmd = Command::new(bin);
        cmd.args(["blk", "--socket"])
            .arg(socket)
            .arg("--disk")
            .arg(disk)
            .args(extra);
        Worker::start_command(cmd)
    }

    /// Starts `cmd`, which runs a standalone worker (e.g. under `bulkhead policy learn
    /// --worker`), and waits until the worker listens.
    pub fn start_command(mut cmd: Command) -> Worker {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        // A worker prints nothing on stdout; a tool running one may (both are collected).
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sink = lines.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut w = Worker { child, lines, rx };
        w.wait_for("listening on", Duration::from_secs(20));
        w
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "worker never printed {needle:?}; stderr so far:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// The host pid of the confined worker (the reaper prints it), once the worker says
    /// its sandbox is complete (the two lines come from two processes, in either order).
    pub fn sandboxed_pid(&mut self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.stderr();
            let pid = text
                .lines()
                .find_map(|l| l.split(" as pid ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok());
            // Learn mode says so instead, just before its (learning) filter goes on.
            let confined = text.contains("bulkhead-worker: confined")
                || text.contains("bulkhead-worker: LEARN MODE");
            if let (Some(pid), true) = (pid, confined) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "worker never reported a confined pid; stderr so far:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything it printed so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for the worker to exit; returns its exit code and stderr.
    pub fn finish(mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return (status.code(), self.stderr());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("worker did not exit within {limit:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
