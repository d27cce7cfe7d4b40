//! The worker's virtio-blk request parser over descriptor chains a guest wrote: a table
//! of 16 descriptors and an avail ring, both from the input, over 1 MiB of guest RAM that
//! also comes from the input. Every chain parses to a request or a rejection.
#![no_main]

use device_workers::blk::{BlkConfig, BlkContext, BlkLimits, Request};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return;
    };
    // 16 descriptors of 16 bytes, then avail heads, then guest RAM contents.
    let (descs, rest) = data.split_at(data.len().min(16 * usize::from(QSIZE)));
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (MEM as u64 + 4096);
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
        let next = u16::from_le_bytes(d[14..16].try_into().unwrap());
        let _ = vq.desc_table().store(
            i as u16,
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
        );
    }
    let (heads, ram) = rest.split_at(rest.len().min(2 * usize::from(QSIZE)));
    for h in heads.chunks_exact(2) {
        let idx = vq.avail().idx().load();
        let head = u16::from_le_bytes([h[0], h[1]]);
        let _ = vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .map(|r| r.store(head));
        vq.avail().idx().store(idx.wrapping_add(1));
    }
    // Request headers and data live in guest RAM above the rings.
    let _ = mem.write_slice(&ram[..ram.len().min(MEM / 2)], GuestAddress(MEM as u64 / 2));
    let limits = BlkLimits::default();
    let Ok(cfg) = BlkConfig::new(1 << 20, 512, 1, &limits) else {
        return;
    };
    let ctx = BlkContext::new(&cfg, limits, false, b"fuzz");
    for _ in 0..QSIZE {
        match q.pop_descriptor_chain(&mem) {
            Some(chain) => {
                let _ = Request::parse(chain, &ctx, usize::from(QSIZE));
            }
            None => break,
        }
    }
});
