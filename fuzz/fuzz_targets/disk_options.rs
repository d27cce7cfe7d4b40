//! `--disk key=value,...` and the JSON form of a VM's configuration: any input gives a
//! configuration or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vmm_core::disk::config::DiskConfig::parse(text, 0);
        let _ = serde_json::from_str::<vmm_core::config::VmConfig>(text);
    }
});
