//! A hostile qcow2 image: the worker's open (bulkhead's table checks, then imago's parse)
//! of any bytes, and for an image it accepts, reads, writes, discards and write-zeroes
//! across the disk and a flush: nothing may panic, and every access stays an Ok or an
//! error. (The worker runs this confined; a panic there would cost a crash restart.)

#![no_main]

use std::io::Write;

use device_workers::blk::backend::BlockIo;
use device_workers::blk::qcow2_backend::{open, Qcow2Files};
use libfuzzer_sys::fuzz_target;
use vm_memory::VolatileSlice;

fuzz_target!(|data: &[u8]| {
    let Ok(fd) = nix::sys::memfd::memfd_create("qcow2", nix::sys::memfd::MFdFlags::empty())
    else {
        return;
    };
    let mut file = std::fs::File::from(fd);
    if file.write_all(data).is_err() {
        return;
    }
    let Ok(files) = Qcow2Files::new(file, true, false, None) else {
        return;
    };
    let Ok(mut disk) = open(files) else {
        return;
    };
    let size = disk.size();
    // At most 64 MiB of it is touched, in 64 KiB steps over the first and last part.
    let mut buf = vec![0u8; 4096];
    let offsets = (0..16u64)
        .map(|i| i * 65536)
        .chain((1..16u64).map(|i| size.saturating_sub(i * 65536)))
        .filter(|&o| o + 4096 <= size);
    for offset in offsets {
        let slice = VolatileSlice::from(&mut buf[..]);
        let _ = disk.read_vectored_at(&[slice], offset);
        let slice = VolatileSlice::from(&mut buf[..]);
        let _ = disk.write_vectored_at(&[slice], offset);
        let _ = disk.write_zeroes(offset, 512, false);
        let _ = disk.discard(offset, 4096);
    }
    let _ = disk.flush();
});
