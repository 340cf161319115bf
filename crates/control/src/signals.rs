//! Process signals: SIGINT/SIGTERM stop the VM cleanly, SIGUSR1 asks the guest to verify its
//! ledger, SIGUSR2 asks its workload to finish (it ends its timed phase, verifies, and exits on
//! its own).
use std::sync::{
    atomic::{AtomicBool, AtomicI32, Ordering},
    Arc,
};

use std::os::fd::{AsRawFd, RawFd};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use vmm_sys_util::eventfd::EventFd;

/// Signals received and not yet acted on.
pub struct SignalState {
    stop: AtomicI32,
    verify: AtomicBool,
    finish: AtomicBool,
    /// Written on every signal, for event loops.
    wake: EventFd,
}

impl SignalState {
    /// Installs the handlers (a thread that records what arrives).
    pub fn install() -> crate::Result<Arc<SignalState>> {
        let state = Arc::new(SignalState {
            stop: AtomicI32::new(0),
            verify: AtomicBool::new(false),
            finish: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(crate::Error::io("creating the signal eventfd"))?,
        });
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2])
            .map_err(crate::Error::io("installing the signal handlers"))?;
        let s = state.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    match sig {
                        SIGUSR1 => s.verify.store(true, Ordering::SeqCst),
                        SIGUSR2 => s.finish.store(true, Ordering::SeqCst),
                        other => s.stop.store(other, Ordering::SeqCst),
                    }
                    let _ = s.wake.write(1);
                }
            })
            .map_err(crate::Error::io("starting the signal thread"))?;
        Ok(state)
    }

    /// The stop signal received, if any.
    pub fn stop_signal(&self) -> Option<i32> {
        match self.stop.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// A descriptor that becomes readable when a signal arrived.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// True once per SIGUSR1.
    pub fn take_verify(&self) -> bool {
        self.verify.swap(false, Ordering::SeqCst)
    }

    /// True once per SIGUSR2.
    pub fn take_finish(&self) -> bool {
        self.finish.swap(false, Ordering::SeqCst)
    }
}

/// The conventional name of a signal.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}
