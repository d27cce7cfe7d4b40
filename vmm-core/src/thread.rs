//! The one place the VMM starts threads. Every thread gets a name (it shows in `top -H`,
//! in /proc/PID/task/*/comm and in crash reports) and either a role, whose seccomp filter
//! it installs before it runs its work (when confinement is on: [`crate::confine`]), or
//! the reason it stays unconfined.

use std::thread::JoinHandle;

use crate::confine::VmmThread;

/// Linux keeps 15 bytes of a thread's name; longer names are cut there.
pub const MAX_NAME: usize = 15;

/// Starts `f` on a new thread named `name` (cut to [`MAX_NAME`] bytes, on a character
/// boundary, so the name the kernel shows is the one given here), confined by `role`'s
/// filter from its first instruction of `f` on.
pub fn spawn<F, T>(name: impl Into<String>, role: VmmThread, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    start(name.into(), move || {
        crate::confine::enter(role);
        f()
    })
}

/// Starts `f` on a new thread named `name` with no filter of its own (it keeps whatever
/// its creator had). `why` says why it cannot be confined; it is for the reader.
pub fn spawn_unconfined<F, T>(
    name: impl Into<String>,
    why: &'static str,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _ = why;
    start(name.into(), f)
}

fn start<F, T>(name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut name = name;
    if name.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    // A thread started for a disk logs inside its disk's span, as its creator did.
    let span = tracing::Span::current();
    std::thread::Builder::new().name(name).spawn(move || {
        let _in_span = span.entered();
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_name() -> String {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .unwrap()
            .trim_end()
            .to_string()
    }

    #[test]
    fn threads_carry_their_name_into_the_kernel() {
        let h = spawn("blk0-frontend", VmmThread::Frontend, kernel_name).unwrap();
        assert_eq!(h.join().unwrap(), "blk0-frontend");
        let h = spawn_unconfined("a-very-long-disk-name-sup", "a test", || {
            (
                std::thread::current().name().map(String::from),
                kernel_name(),
            )
        })
        .unwrap();
        let (rust, kernel) = h.join().unwrap();
        assert_eq!(rust.as_deref(), Some("a-very-long-dis"));
        assert_eq!(kernel, "a-very-long-dis");
    }
}
