//! Completions by interrupt: while shadowed, the MSI-X vectors of the guest's completion
//! queues are taken over from KVM. The device's eventfd wakes the poller (instead of a timed
//! sleep), the poller forwards the completions into the guest's queue and only then sends the
//! guest its interrupt, so the guest never sees an interrupt for a completion it cannot see
//! yet. Leaving shadow mode gives the vectors back to KVM.
use std::{
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// One vector taken over from KVM.
pub(crate) struct TakenVector {
    pub vector: u16,
    /// The eventfd the device signals.
    pub fd: EventFd,
    pub received: AtomicU64,
    pub injected: AtomicU64,
    /// Forwarded completions whose interrupt the guest had masked (not sent).
    pub masked: AtomicU64,
}

/// A vector's counters, for reports.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VectorStatus {
    /// MSI-X vector.
    pub vector: u16,
    /// Device interrupts the engine received.
    pub received: u64,
    /// Interrupts the engine sent the guest after forwarding completions.
    pub injected: u64,
    /// Interrupts not sent because the guest had the vector masked.
    pub masked: u64,
}

/// What wakes the poller: the taken vectors and, for trapped doorbells, a wake-up eventfd the
/// trap hook signals.
pub(crate) struct Wakeups {
    pub vectors: Vec<TakenVector>,
    pub wake: EventFd,
    /// Every doorbell is trapped and every queue's completions come by interrupt: nothing
    /// needs polling, so the poller may block until an event.
    pub can_block: bool,
}

impl Wakeups {
    /// Nothing taken: the poller sleeps briefly between rounds.
    pub fn new() -> Result<Self> {
        Ok(Wakeups {
            vectors: Vec::new(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Os {
                what: "creating the poller's eventfd".into(),
                source,
            })?,
            can_block: false,
        })
    }

    /// Counters of the taken vectors.
    pub fn status(&self) -> Vec<VectorStatus> {
        self.vectors
            .iter()
            .map(|v| VectorStatus {
                vector: v.vector,
                received: v.received.load(Ordering::Relaxed),
                injected: v.injected.load(Ordering::Relaxed),
                masked: v.masked.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Sleeps `idle`, or less when a device interrupt taken over or a wake-up arrives.
    pub fn wait(&self, idle: Duration) {
        if self.vectors.is_empty() {
            std::thread::sleep(idle);
            return;
        }
        self.poll_events(idle);
    }

    /// Blocks until a device interrupt taken over or a wake-up arrives, or `timeout` passes.
    pub fn block(&self, timeout: Duration) {
        self.poll_events(timeout);
    }

    fn poll_events(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .vectors
            .iter()
            .map(|v| v.fd.as_raw_fd())
            .chain([self.wake.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of pollfd for its length; the descriptors are ours.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n <= 0 {
            return;
        }
        for (i, p) in fds.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            match self.vectors.get(i) {
                Some(v) => {
                    if let Ok(k) = v.fd.read() {
                        v.received.fetch_add(k, Ordering::Relaxed);
                    }
                }
                None => {
                    let _ = self.wake.read();
                }
            }
        }
    }
}
