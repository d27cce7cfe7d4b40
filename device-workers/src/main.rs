//! `bulkhead-worker`: one sandboxed vhost-user device backend per process.

fn main() {
    eprintln!("bulkhead-worker: not built yet");
    std::process::exit(2);
}
