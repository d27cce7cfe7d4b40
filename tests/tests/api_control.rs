//! The control API against a running VM, with real clients: curl, `bulkhead ctl`, and
//! Prometheus' promtool. A user lists the disks (one served by our worker, one by
//! qemu-storage-daemon), restarts a worker and watches the restart in the event stream
//! and in /metrics, kills a worker and sees the counters carry over, pauses and resumes
//! the guest, and shuts it down. The API's bounds hold against 2000 idle clients and at
//! the descriptor limit. docs/openapi.json lists exactly the routes served.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{bulkhead_bin, require_kvm, require_tool, scratch_dir, testguest};

/// A `bulkhead run` in the background, its output collected as it comes.
struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    api: PathBuf,
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    text
}

impl Running {
    /// Starts blk-chaos on disk 0 for `secs` with the API on `dir/api.sock`.
    fn start(dir: &Path, secs: u64, disks: &[String]) -> Running {
        let api = dir.join("api.sock");
        let mut cmd = Command::new(bulkhead_bin());
        cmd.arg("run")
            .arg("--api-socket")
            .arg(&api)
            .arg("--kernel")
            .arg(testguest())
            .args([
                "--mem",
                "64M",
                "--timeout",
                &(secs + 60).to_string(),
                "--cmdline",
            ])
            .arg(format!(
                "testguest.plan=blk-chaos dev=0 secs={secs} qd=8 completion=irq blocks=64"
            ));
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulkhead");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let run = Running {
            child,
            stdout,
            stderr,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while vmm_core::api::request(&run.api, "GET", "/v1/vm")
            .map(|r| r.0)
            .ok()
            != Some(200)
        {
            assert!(
                Instant::now() < deadline,
                "the API never answered: {}",
                run.transcript()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run
    }

    /// blk-chaos for 120 s on one fresh image, in scratch directory `name`.
    fn one_disk(name: &str) -> Running {
        let dir = scratch_dir(name);
        let disk = image(&dir, "d.img");
        Running::start(&dir, 120, &[format!("path={}", disk.display())])
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn get(&self, target: &str) -> Value {
        let (code, body) = vmm_core::api::request(&self.api, "GET", target).unwrap();
        assert_eq!(code, 200, "GET {target}: {body}\n{}", self.transcript());
        serde_json::from_str(&body).unwrap()
    }

    /// `bulkhead ctl --api-socket API ARGS...`: exit success and stdout.
    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bulkhead_bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .output()
            .expect("run bulkhead ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new(require_tool("curl", "curl"))
            .args(["-sS", "--max-time", "10", "--unix-socket"])
            .arg(&self.api)
            .args(args)
            .output()
            .expect("run curl");
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn metrics(&self) -> String {
        self.curl(&["http://bulkhead/metrics"])
    }

    /// Waits for the VM to end; its exit code.
    fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "bulkhead did not end within {within:?}: {}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name with labels, as written) in an exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Requests of every type disk `blk0` completed.
fn requests(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(r#"bulkhead_disk_requests_total{disk="blk0","#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of every vCPU exit counter: it grows while the guest runs its I/O loop.
fn vcpu_exits(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("bulkhead_vcpu_exits_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

/// An event stream read by curl in the background: every line it printed so far.
fn follow_events(api: &Path) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(require_tool("curl", "curl"))
        .args(["-sSN", "--max-time", "120", "--unix-socket"])
        .arg(api)
        .arg("http://bulkhead/v1/events")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = collect(child.stdout.take().unwrap());
    (child, lines)
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_user_lists_restarts_watches_scrapes_pauses_and_shuts_down() {
    require_kvm();
    let promtool = tests::promtool();
    let dir = scratch_dir("api-control");
    let ours = image(&dir, "ours.img");
    let theirs = image(&dir, "qsd.img");
    let qsd_socket = dir.join("qsd.sock");
    let mut qsd = tests::storage_daemon(&theirs, &qsd_socket, "");
    let mut vm = Running::start(
        &dir,
        300,
        &[
            format!("path={}", ours.display()),
            format!("vhost_user={},id=ext", qsd_socket.display()),
        ],
    );

    // The VM and its disks, as curl sees them.
    let info: Value = serde_json::from_str(&vm.curl(&["http://bulkhead/v1/vm"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_mib"], 64);
    assert_eq!(
        info["config"]["vm"]["disks"].as_array().map(Vec::len),
        Some(2)
    );
    let disks: Value = serde_json::from_str(&vm.curl(&["http://bulkhead/v1/disks"])).unwrap();
    let disks = disks["disks"].as_array().unwrap().clone();
    assert_eq!(disks.len(), 2, "{disks:?}");
    assert_eq!(
        (&disks[0]["id"], &disks[0]["backend"], &disks[0]["mode"]),
        (&"blk0".into(), &"worker".into(), &"normal".into())
    );
    assert!(disks[0]["worker_pid"].as_u64().is_some_and(|p| p > 1));
    assert_eq!(
        (&disks[1]["id"], &disks[1]["backend"], &disks[1]["mode"]),
        (&"ext".into(), &"vhost_user".into(), &"external".into())
    );
    let (ok, list) = vm.ctl(&["list"]);
    assert!(ok, "{list}");
    assert!(list.starts_with("DISK "), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("ext ") && l.contains("vhost_user")),
        "{list}"
    );

    // Every route the OpenAPI file documents answers a running VM with a status it lists
    // (reads only here; the rest are exercised below).
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(tests::workspace_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        let Some(op) = ops.get("get") else { continue };
        let target = path.replace("{id}", "blk0")
            + if path == "/v1/events" {
                "?follow=false"
            } else {
                ""
            };
        let (code, body) = vmm_core::api::request(&vm.api, "GET", &target).unwrap();
        assert!(
            op["responses"].get(code.to_string()).is_some(),
            "GET {target} answered {code}, not in docs/openapi.json: {body}"
        );
    }

    // A planned restart appears in the event stream (curl's and `ctl events`'), in the
    // kept events and in /metrics.
    let (mut stream, streamed) = follow_events(&vm.api);
    let mut ctl_events = Command::new(bulkhead_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(&vm.api)
        .args(["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ctl_streamed = collect(ctl_events.stdout.take().unwrap());
    let before = vm.get("/v1/disks/blk0")["worker_pid"].as_u64().unwrap();
    let (ok, restarted) = vm.ctl(&["--json", "restart", "blk0"]);
    assert!(ok, "{restarted}\n{}", vm.transcript());
    let restarted: Value = serde_json::from_str(&restarted).unwrap();
    assert_ne!(restarted["worker_pid"].as_u64(), Some(before));
    wait_for(
        "the stream shows the restart",
        Duration::from_secs(10),
        || streamed.lock().unwrap().contains("event: restart\n"),
    );
    {
        let text = streamed.lock().unwrap();
        let event: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|e| e["kind"] == "restart")
            .expect("a restart's data");
        assert_eq!(event["disk"], "blk0");
        assert_eq!(event["detail"]["cause"], "planned", "{text}");
        assert!(text.contains(&format!("id: {}\n", event["seq"])), "{text}");
    }
    let (ok, kept) = vm.ctl(&["--json", "events", "--no-follow"]);
    assert!(ok, "{kept}");
    let planned: Vec<Value> = kept
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "restart" && e["detail"]["cause"] == "planned")
        .collect();
    assert_eq!(planned.len(), 1, "{kept}");
    // A client that saw event 1 resumes after it.
    let after_one = vm.curl(&[
        "-H",
        "Last-Event-ID: 1",
        "http://bulkhead/v1/events?follow=false",
    ]);
    let after_one: Value = serde_json::from_str(&after_one).unwrap();
    assert!(
        after_one["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["seq"].as_u64() > Some(1)),
        "{after_one}"
    );
    let metrics = vm.metrics();
    let planned = r#"bulkhead_disk_worker_restarts_total{disk="blk0",cause="planned"}"#;
    assert_eq!(sample(&metrics, planned), Some(1.0), "{metrics}");
    let checked = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(metrics.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    wait_for(
        "`ctl events` prints the restart",
        Duration::from_secs(10),
        || {
            ctl_streamed
                .lock()
                .unwrap()
                .lines()
                .any(|l| l.contains(" restart blk0 cause=planned "))
        },
    );
    let _ = ctl_events.kill();
    let _ = ctl_events.wait();
    let (ok, text) = vm.ctl(&["metrics"]);
    assert!(
        ok && text.contains("# TYPE bulkhead_uptime_seconds gauge"),
        "{text}"
    );
    let (ok, samples) = vm.ctl(&["--json", "metrics"]);
    assert!(ok, "{samples}");
    let planned_sample = samples
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| {
            v["name"] == "bulkhead_disk_worker_restarts_total" && v["labels"]["cause"] == "planned"
        })
        .expect("the planned restarts' sample");
    assert_eq!(planned_sample["value"], 1.0);
    let (ok, vm_text) = vm.ctl(&["status"]);
    assert!(ok && vm_text.starts_with("state: running\n"), "{vm_text}");
    let (ok, disk_text) = vm.ctl(&["status", "blk0"]);
    assert!(ok && disk_text.contains("planned 1"), "{disk_text}");

    // A worker killed from outside: the restart's cause is `killed`, and the request
    // count carries over to its successor.
    let at_kill = vm.metrics();
    let served_before = requests(&at_kill);
    assert!(served_before > 0.0, "the guest's I/O is counted: {at_kill}");
    for series in [
        r#"bulkhead_disk_read_bytes_total{disk="blk0"}"#,
        r#"bulkhead_disk_written_bytes_total{disk="blk0"}"#,
        r#"bulkhead_disk_request_duration_seconds_count{disk="blk0"}"#,
    ] {
        assert!(
            sample(&at_kill, series).is_some_and(|v| v > 0.0),
            "{series}: {at_kill}"
        );
    }
    let pid = vm.get("/v1/disks/blk0")["worker_pid"].as_u64().unwrap();
    // SAFETY: kill(2) with a pid the API named and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = r#"bulkhead_disk_worker_restarts_total{disk="blk0",cause="killed"}"#;
    wait_for(
        "a killed worker's restart in /metrics",
        Duration::from_secs(10),
        || sample(&vm.metrics(), killed) == Some(1.0),
    );
    assert!(
        requests(&vm.metrics()) >= served_before,
        "a restart set the count back"
    );
    wait_for(
        "the stream shows the second restart",
        Duration::from_secs(10),
        || streamed.lock().unwrap().contains("\"cause\":\"killed\""),
    );

    // Pause: the requests in flight complete, then no vCPU exit and no new request while
    // paused; both go on after resume.
    let (ok, paused) = vm.ctl(&["pause"]);
    assert!(ok, "{paused}\n{}", vm.transcript());
    assert_eq!(paused.trim(), "paused");
    assert_eq!(vm.get("/v1/vm")["state"], "paused");
    let in_flight = r#"bulkhead_disk_requests_in_flight{disk="blk0"}"#;
    wait_for(
        "the requests in flight at the pause complete",
        Duration::from_secs(10),
        || sample(&vm.metrics(), in_flight) == Some(0.0),
    );
    let at_pause = vm.metrics();
    std::thread::sleep(Duration::from_millis(700));
    let later = vm.metrics();
    assert_eq!(
        vcpu_exits(&at_pause),
        vcpu_exits(&later),
        "a paused vCPU exits"
    );
    assert_eq!(
        requests(&at_pause),
        requests(&later),
        "requests while paused"
    );
    assert_eq!(sample(&later, "bulkhead_vm_paused"), Some(1.0));
    let (ok, resumed) = vm.ctl(&["resume"]);
    assert!(ok && resumed.trim() == "running", "{resumed}");
    wait_for("the guest runs again", Duration::from_secs(10), || {
        vcpu_exits(&vm.metrics()) > vcpu_exits(&later)
    });
    wait_for(
        "the stream shows pause and resume",
        Duration::from_secs(10),
        || {
            let t = streamed.lock().unwrap();
            t.contains("event: paused\n") && t.contains("event: resumed\n")
        },
    );

    // Shutdown ends the VM as a power-off does: exit 0, the socket gone.
    let (ok, shut) = vm.ctl(&["shutdown"]);
    assert!(ok && shut.trim() == "shutdown", "{shut}");
    assert_eq!(
        vm.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        vm.transcript()
    );
    let t = vm.transcript();
    assert!(t.contains("shut down through the control API"), "{t}");
    assert!(!t.contains("TG fail"), "the guest saw an error: {t}");
    assert!(!t.contains("seccomp:"), "{t}");
    assert!(!vm.api.exists(), "the socket is removed at the end");
    let _ = stream.kill();
    let _ = stream.wait();
    let _ = qsd.kill();
    let _ = qsd.wait();
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Lets this process hold `n` descriptors (the hard limit allows it for root and in CI).
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(n.max(lim.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= n,
        "this test needs {n} descriptors (hard limit {})",
        lim.rlim_max
    );
}

/// Once main's API pinned one thread per connection (2000 idle clients: 2007 threads).
/// Now they cost no thread, the API holds at most its connection limit of them, and a
/// client that asks something is answered while they sit there.
#[test]
fn two_thousand_idle_clients_pin_no_thread_and_block_nobody() {
    require_kvm();
    raise_fd_limit(2300);
    let vm = Running::one_disk("api-idle");
    let threads_before = threads(vm.pid());
    let fds_before = open_fds(vm.pid());
    let mut idle = Vec::new();
    for i in 0..2000 {
        match UnixStream::connect(&vm.api) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connection {i}: {e}\n{}", vm.transcript()),
        }
    }
    // Half a request head is no request: those clients are idle too.
    for s in idle.iter_mut().take(100) {
        use std::io::Write;
        let _ = s.write_all(b"GET /v1/vm HTTP/1.1\r\nHo");
    }
    let (ok, status) = vm.ctl(&["--json", "status"]);
    assert!(
        ok,
        "a client was blocked by idle ones: {status}\n{}",
        vm.transcript()
    );
    assert!(status.contains("\"state\":\"running\""), "{status}");
    let threads_during = threads(vm.pid());
    assert!(
        threads_during <= threads_before + 1,
        "threads: {threads_before} before 2000 idle clients, {threads_during} with them"
    );
    let fds_during = open_fds(vm.pid());
    assert!(
        fds_during <= fds_before + vmm_core::api::server::MAX_CONNECTIONS + 4,
        "descriptors: {fds_before} before, {fds_during} with 2000 idle clients"
    );
    // Idle clients are closed when their head does not come within the limit.
    let mut first = idle.remove(idle.len() - 1);
    first
        .set_read_timeout(Some(
            vmm_core::api::server::HEAD_TIMEOUT + Duration::from_secs(10),
        ))
        .unwrap();
    let mut buf = Vec::new();
    let read = first.read_to_end(&mut buf);
    assert!(read.is_ok(), "an idle client was never closed: {read:?}");
    drop(idle);
    assert!(!vm.transcript().contains("seccomp:"), "{}", vm.transcript());
}

/// CPU time (user + system, in clock ticks) of the process's thread named `name`.
fn thread_cpu(pid: u32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    panic!("no thread {name} in process {pid}");
}

/// Once, at the descriptor limit, main's `accept` failed in a loop: ~87% CPU and 1.36 M
/// log lines in 6 s. Now the listener waits between attempts, says so a few times, and
/// serves again once descriptors are free.
#[test]
fn at_the_descriptor_limit_the_listener_waits_instead_of_spinning() {
    require_kvm();
    let prlimit = require_tool("prlimit", "util-linux");
    let vm = Running::one_disk("api-emfile");
    let pid = vm.pid().to_string();
    // The soft limit only: raising it back needs no privilege.
    let set_limit = |n: usize| {
        let out = Command::new(&prlimit)
            .args(["--pid", &pid, &format!("--nofile={n}:")])
            .output()
            .unwrap();
        assert!(out.status.success(), "prlimit: {out:?}");
    };
    // The guest's driver has brought its disk up (its frontend made the ring's
    // descriptors): the limit is for the API's clients, not for the device's start, which
    // it would fail (seen: the disk went to fail mode and the guest, and the VM, ended).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !vm.stdout.lock().unwrap().contains("TG chaos dev=0 num=") {
        assert!(
            Instant::now() < deadline,
            "the guest never started: {}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    // No descriptor left for a client.
    set_limit(open_fds(vm.pid()));
    let clients: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&vm.api).expect("the backlog takes it"))
        .collect();
    let cpu_before = thread_cpu(vm.pid(), "api");
    std::thread::sleep(Duration::from_secs(3));
    let cpu = thread_cpu(vm.pid(), "api") - cpu_before;
    let hz = vmm_core::supervisor::counters::ticks_per_second();
    assert!(
        cpu * 10 < 3 * hz,
        "the API thread used {cpu} ticks (of {hz}/s) in 3 s at the descriptor limit"
    );
    let complaints = vm
        .stderr
        .lock()
        .unwrap()
        .matches("cannot accept a connection")
        .count();
    assert!(
        (1..=10).contains(&complaints),
        "{complaints} lines about accept in 3 s:\n{}",
        vm.transcript()
    );
    // Descriptors free again: the waiting clients are served, and new ones too.
    set_limit(1024);
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out) = vm.ctl(&["--json", "status"]);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API never recovered: {out}\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!vm.transcript().contains("seccomp:"), "{}", vm.transcript());
}

/// With every connection busy (a request whose body never comes), a new client is
/// answered 503 at once, and the VMM lives on: the answer is one write its policy allows
/// (once it was not, and the VMM died by SIGSYS). A slot is free again once the busy
/// clients go.
#[test]
fn at_the_connection_limit_a_client_is_refused_and_the_vmm_lives() {
    require_kvm();
    let vm = Running::one_disk("api-busy");
    let mut busy = Vec::new();
    for _ in 0..vmm_core::api::server::MAX_CONNECTIONS {
        use std::io::Write;
        let mut s = UnixStream::connect(&vm.api).unwrap();
        s.write_all(
            b"PUT /v1/vm/state HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        busy.push(s);
    }
    // Each is busy once the server reads its body: it says so with a 100 Continue.
    for s in &mut busy {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("a 100 Continue");
            got.push(byte[0]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 100"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    let mut extra = UnixStream::connect(&vm.api).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "{answer:?}\n{}",
        vm.transcript()
    );
    drop(busy);
    wait_for("the API serves again", Duration::from_secs(10), || {
        vm.ctl(&["--json", "status"]).0
    });
    assert!(!vm.transcript().contains("seccomp:"), "{}", vm.transcript());
}

/// Clients that ask for restarts and hang up at once cannot make the API start a
/// thread per request (once: 3283 threads in 8 s): at most MAX_BLOCKING run, the rest
/// are answered 503.
#[test]
fn restarts_asked_and_abandoned_start_a_bounded_number_of_threads() {
    require_kvm();
    let vm = Running::one_disk("api-abandon");
    let before = threads(vm.pid());
    let mut most = before;
    // Past the supervisor's restart budget, each restart waits up to its 10 s timeout.
    for _ in 0..300 {
        use std::io::Write;
        let mut s = UnixStream::connect(&vm.api).unwrap();
        s.write_all(b"POST /v1/disks/blk0/restart HTTP/1.1\r\n\r\n")
            .unwrap();
        drop(s);
        most = most.max(threads(vm.pid()));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Slack for the output readers of a successor and its spare starting while their
    // predecessors' end (they come and go with every restart).
    let bound = before + vmm_core::api::server::MAX_BLOCKING + 6;
    assert!(
        most <= bound,
        "{most} threads (from {before}; at most {bound})\n{}",
        vm.transcript()
    );
    assert!(!vm.transcript().contains("seccomp:"), "{}", vm.transcript());
}

/// An event stream's place is given back soon after its client goes: a client that
/// reconnects gets a stream, not 503 for many seconds.
#[test]
fn a_closed_event_stream_gives_its_place_back() {
    require_kvm();
    let vm = Running::one_disk("api-streams");
    let open_stream = || {
        use std::io::Write;
        let mut s = UnixStream::connect(&vm.api).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        (s, String::from_utf8_lossy(&head).into_owned())
    };
    let streams: Vec<UnixStream> = (0..vmm_core::api::server::MAX_STREAMS)
        .map(|_| {
            let (s, head) = open_stream();
            assert_eq!(head, "HTTP/1.1 200", "{}", vm.transcript());
            s
        })
        .collect();
    let (_, refused) = open_stream();
    assert_eq!(refused, "HTTP/1.1 503", "one more than the limit");
    drop(streams);
    let since = Instant::now();
    wait_for("a stream's place back", Duration::from_secs(8), || {
        open_stream().1 == "HTTP/1.1 200"
    });
    eprintln!("a place was back after {:?}", since.elapsed());
}

/// docs/openapi.json describes exactly the routes the server has.
#[test]
fn the_openapi_file_lists_exactly_the_routes_served() {
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(tests::workspace_root().join("docs/openapi.json")).unwrap(),
    )
    .expect("docs/openapi.json is JSON");
    assert_eq!(spec["openapi"], "3.0.3");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "patch"] {
            if let Some(op) = ops.get(method) {
                assert!(
                    op["responses"].get("200").is_some(),
                    "{method} {path} has no 200"
                );
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    let mut served: Vec<(String, String)> = vmm_core::api::routes::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    // Every reference resolves.
    let text = spec.to_string();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = reference.split('"').next().unwrap();
        assert!(
            spec.pointer(&format!("/{pointer}")).is_some(),
            "unresolved $ref #/{pointer}"
        );
    }
}
