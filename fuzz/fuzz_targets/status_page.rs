//! The status page as the VMM reads it: a worker can write any bytes into the shared
//! page. Mapping it, and everything the VMM reads from it (the crash and violation
//! records, the end record, the counters, their descriptions), must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::FileExt;

fuzz_target!(|data: &[u8]| {
    let Ok((file, _worker_side)) = ipc::status::StatusPage::create("fuzz") else {
        return;
    };
    // The magic and layout version (the first 12 bytes) stay valid, or the VMM refuses
    // the page at once; everything after them is the worker's to write.
    let body = &data[..data.len().min(ipc::status::STATUS_PAGE_SIZE - 12)];
    let _ = file.write_all_at(body, 12);
    let Ok(vmm) = ipc::status::StatusMapping::map(&file) else {
        return;
    };
    let _ = vmm.snapshot();
    let _ = vmm.violation();
    let _ = vmm.worker_pid();
    let end = vmm.end();
    let _ = ipc::status::describe_crash(vmm.crash(), end);
    if let Some(v) = vmm.violation() {
        let _ = policies::decode::format_call(v.nr, v.args);
    }
});
