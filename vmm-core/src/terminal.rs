//! The VMM's controlling terminal: serial input wants raw bytes (no line editing, no
//! echo), and the terminal must come back as it was however the VMM ends.

use std::os::fd::AsFd;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

/// Restores the terminal settings it saved when dropped (or on [`RawStdin::restore`]).
#[derive(Debug)]
pub struct RawStdin {
    saved: Option<Termios>,
}

impl RawStdin {
    /// Puts stdin in raw input mode if it is a terminal. Signals stay on, so Ctrl-C still
    /// ends the VMM (cleanly: see the signal thread in main); output processing stays on.
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let saved = match termios::tcgetattr(stdin.as_fd()) {
            Ok(t) => t,
            Err(_) => return RawStdin { saved: None }, // not a terminal
        };
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::IEXTEN);
        raw.input_flags
            .remove(termios::InputFlags::ICRNL | termios::InputFlags::IXON);
        raw.control_chars[termios::SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[termios::SpecialCharacterIndices::VTIME as usize] = 0;
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawStdin { saved: None };
        }
        RawStdin { saved: Some(saved) }
    }

    /// Puts the saved settings back.
    pub fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &saved);
        }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        self.restore();
    }
}
