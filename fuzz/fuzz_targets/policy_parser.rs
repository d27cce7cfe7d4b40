//! The policy format's parser, and the compiler behind it: any text gives a policy or an
//! error with a line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(policy) = policies::format::parse("fuzz.policy", text) {
            let _ = policies::compile::compile(&policy);
        }
    }
});
