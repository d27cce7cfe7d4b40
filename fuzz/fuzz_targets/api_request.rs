//! The control API's request handling, hyper's HTTP/1.1 parser included: any bytes a
//! client sends get an HTTP response (most of them 400), never a panic. Two disks: `blk0`
//! with a handle and no worker (a restart is answered at once), `ext0` an external
//! vhost-user backend; pause and resume act on nothing, shutdown is recorded.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm_core::api::{ApiContext, ApiDisk, VmControl};
use vmm_core::supervisor::DiskHandle;

#[derive(Debug, Default)]
struct Control;

impl VmControl for Control {
    fn state(&self) -> &'static str {
        "running"
    }
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        Ok(())
    }
    fn shutdown(&self) {}
}

fn context() -> Arc<ApiContext> {
    static CTX: OnceLock<Arc<ApiContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        Arc::new(ApiContext {
            started: std::time::Instant::now(),
            vcpus: 1,
            mem_mib: 64,
            config: serde_json::json!({}),
            disks: vec![
                ApiDisk {
                    id: "blk0".into(),
                    config: serde_json::json!({}),
                    handle: Some(Arc::new(DiskHandle::default())),
                },
                ApiDisk {
                    id: "ext0".into(),
                    config: serde_json::json!({}),
                    handle: None,
                },
            ],
            events: Default::default(),
            control: Arc::new(Control),
            stats: vmm_core::report::VmStats {
                vcpus: vec![Default::default()],
                devices: vec![],
                violations: Default::default(),
            },
        })
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let response = vmm_core::api::server::respond(data, context());
    // hyper answers every request it read a head of (in the request's version, 1.0 or
    // 1.1); bytes that never make a head (or end before one) may get no answer at all.
    assert!(
        response.is_empty()
            || response.starts_with(b"HTTP/1.1 ")
            || response.starts_with(b"HTTP/1.0 "),
        "{}",
        String::from_utf8_lossy(&response)
    );
});
