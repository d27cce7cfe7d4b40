//! The control channel's messages as the other side decodes them: the VMM decodes what
//! a (possibly compromised) worker sends, the worker what the VMM sends. Decoding and
//! validation must return, never panic or allocate without bound.
#![no_main]

use ipc::messages::Validate as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ipc::codec::decode::<ipc::messages::WorkerMessage>(data) {
        let _ = m.validate();
    }
    if let Ok(m) = ipc::codec::decode::<ipc::messages::VmmMessage>(data) {
        let _ = m.validate();
    }
});
