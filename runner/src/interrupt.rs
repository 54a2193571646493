//! Ctrl-C and SIGTERM: the first asks the run to stop at the next step boundary (nodes torn
//! down, the report so far written, exit 130 or 143); a second one exits at once.

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Installs the handlers (once, at the start of a run).
pub fn install() -> std::io::Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only does async-signal-safe things: an atomic swap and _exit.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
                    signal_hook::low_level::exit(128 + sig);
                }
            })?;
        }
    }
    Ok(())
}

/// The signal that interrupted the run, if any.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// An error once the run was interrupted: long waits call it on every poll.
pub fn check() -> anyhow::Result<()> {
    match signal() {
        None => Ok(()),
        Some(s) => anyhow::bail!("interrupted by signal {s}"),
    }
}

/// The exit code of a run ended by `sig`: 130 for SIGINT, 143 for SIGTERM.
pub fn exit_code(sig: i32) -> u8 {
    (128 + sig) as u8
}
