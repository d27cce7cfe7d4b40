//! Result lines on the 16550 at 0x3f8: `TG ...`. One `out` per character (each one is
//! a VM exit, so lines stay short). No UART setup: VMMs accept THR writes as they are.
//! A ring-3 spinlock keeps lines from different CPUs whole.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::boot::{self, MAX_CPUS};
use crate::cpu;

const COM1_THR: u16 = 0x3f8;
const LINE_MAX: usize = 256;

/// 0 when free, else the owning CPU index + 1.
static LOCK: AtomicUsize = AtomicUsize::new(0);
static IN_FATAL: [AtomicBool; MAX_CPUS + 1] = [const { AtomicBool::new(false) }; MAX_CPUS + 1];

/// One formatted line; overlong lines are cut, not split.
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    fn new(args: fmt::Arguments) -> Self {
        let mut line = Line {
            buf: [0; LINE_MAX],
            len: 0,
        };
        let _ = line.write_str("TG ");
        let _ = line.write_fmt(args);
        // Room for the newline is always kept by `write_str`.
        line.buf[line.len] = b'\n';
        line.len += 1;
        line
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len + 1 >= LINE_MAX {
                break;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

fn emit(line: &Line) {
    for &b in &line.buf[..line.len] {
        cpu::outb(COM1_THR, b);
    }
}

/// Prints `TG <args>` as one line (the `tg!` macro).
pub fn print_line(args: fmt::Arguments) {
    // Formatted before taking the lock: the lock is only held for the port writes.
    let line = Line::new(args);
    let me = boot::current_cpu() + 1;
    while LOCK
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    emit(&line);
    LOCK.store(0, Ordering::Release);
}

/// Prints `TG fail <args>` and leaves the VM with `status`.
pub fn fail(status: u32, args: fmt::Arguments) -> ! {
    print_line(format_args!("fail {args}"));
    cpu::exit(status)
}

/// Ring-3 end of the fatal interrupt path (see `isr_common` in boot.s).
pub fn fatal_exception(vector: u64, rip: u64, err: u64, cpu: usize, cr2: u64) -> ! {
    if IN_FATAL[cpu.min(MAX_CPUS)].swap(true, Ordering::Relaxed) {
        // Faulted while reporting a fault: just leave.
        cpu::exit(cpu::EXIT_EXCEPTION);
    }
    let kind = if vector < 32 {
        "exception"
    } else {
        "interrupt"
    };
    let line = if vector == 14 {
        Line::new(format_args!(
            "fail {kind} {vector} rip={rip:#x} err={err:#x} cr2={cr2:#x} cpu={cpu}"
        ))
    } else {
        Line::new(format_args!(
            "fail {kind} {vector} rip={rip:#x} err={err:#x} cpu={cpu}"
        ))
    };
    // The faulting CPU may hold the lock itself, or another CPU may be stuck: take the
    // lock if it comes free within a bounded time, else print regardless.
    let me = cpu + 1;
    let start = cpu::rdtsc();
    while LOCK.load(Ordering::Relaxed) != me
        && LOCK
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        && cpu::rdtsc() - start < 4_000_000_000
    {
        core::hint::spin_loop();
    }
    emit(&line);
    cpu::exit(cpu::EXIT_EXCEPTION)
}

/// `tg!("cpu {} online", n)` prints `TG cpu 0 online`.
#[macro_export]
macro_rules! tg {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}

/// `fail!("...")` prints `TG fail ...` and exits with status 1.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        $crate::serial::fail($crate::cpu::EXIT_FAIL, format_args!($($arg)*))
    };
}
