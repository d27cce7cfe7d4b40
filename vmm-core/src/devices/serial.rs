//! COM1: vm-superio's 16550 model, its interrupt an irqfd on GSI 4, its output the VMM's
//! stdout (or any writer), its input fed from a thread that reads the VMM's stdin.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt trigger: an eventfd that KVM turns into an edge on the serial GSI.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Inner = Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The serial port, shared by every vCPU thread and the stdin reader.
#[derive(Clone)]
pub struct SerialPort {
    inner: Arc<Mutex<Inner>>,
    irq: Arc<EventFd>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let trigger = EventFdTrigger(irq.try_clone()?);
        Ok(SerialPort {
            inner: Arc::new(Mutex::new(Serial::new(trigger, out))),
            irq: Arc::new(irq),
        })
    }

    /// The eventfd to register as irqfd on the serial GSI.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent 16550 state: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = self.lock().write(offset, value) {
            tracing::debug!("serial output failed: {e}");
        }
    }

    pub fn read(&self, offset: u8) -> u8 {
        self.lock().read(offset)
    }

    /// Feeds `input` into the receive FIFO until it is all taken or `stop` says so; the
    /// FIFO is small, so wait for the guest to drain it rather than drop bytes.
    fn enqueue(&self, mut input: &[u8]) {
        while !input.is_empty() {
            let taken = {
                let mut serial = self.lock();
                let room = serial.fifo_capacity();
                if room == 0 {
                    0
                } else {
                    serial
                        .enqueue_raw_bytes(&input[..room.min(input.len())])
                        .unwrap_or(0)
                }
            };
            input = &input[taken..];
            if taken == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Starts a thread that copies `input` into the receive FIFO until end of file.
    pub fn spawn_input<R: Read + Send + 'static>(&self, mut input: R) -> io::Result<()> {
        let port = self.clone();
        crate::thread::spawn("serial-in", crate::confine::VmmThread::Serial, move || {
            let mut buf = [0u8; 64];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => port.enqueue(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("serial input ended: {e}");
                        break;
                    }
                }
            }
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_the_writer_and_receive_reaches_the_guest() {
        let out = Capture::default();
        let port = SerialPort::new(Box::new(out.clone())).unwrap();
        for b in b"hi" {
            port.write(0, *b);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        port.spawn_input(&b"x"[..]).unwrap();
        // Line status register bit 0: data ready.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while port.read(5) & 1 == 0 {
            assert!(std::time::Instant::now() < deadline, "input never arrived");
            std::thread::yield_now();
        }
        assert_eq!(port.read(0), b'x');
    }
}
