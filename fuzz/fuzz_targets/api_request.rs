//! The control API's request handling: any bytes a client sends get an HTTP response
//! (most of them 400), never a panic. One disk, `blk0`, without a worker (a restart is
//! answered at once).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm_core::supervisor::DiskHandle;

fn disks() -> &'static HashMap<String, Arc<DiskHandle>> {
    static DISKS: OnceLock<HashMap<String, Arc<DiskHandle>>> = OnceLock::new();
    DISKS.get_or_init(|| HashMap::from([("blk0".to_string(), Arc::new(DiskHandle::default()))]))
}

fuzz_target!(|data: &[u8]| {
    let response = vmm_core::api::respond(data, disks());
    assert!(response.starts_with("HTTP/1.1 "), "{response}");
});
