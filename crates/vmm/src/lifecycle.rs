//! How a VM ends, and the timestamps of its life: shared by the vCPU threads, the devices and
//! whoever waits for the VM.
use std::{
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

use guest_abi::ports::Event;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest wrote its exit status to the control port.
    GuestExit(u32),
    /// The VMM stopped the guest (signal or API).
    Stopped(String),
    /// The guest died (triple fault, failed entry, internal KVM error).
    Crashed(String),
    /// A VMM-side failure ended the VM.
    Failed(String),
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::GuestExit(s) => write!(f, "guest exited with status {s}"),
            VmOutcome::Stopped(why) => write!(f, "stopped by the VMM: {why}"),
            VmOutcome::Crashed(why) => write!(f, "guest crashed: {why}"),
            VmOutcome::Failed(why) => write!(f, "VMM failure: {why}"),
        }
    }
}

/// Shared lifecycle state of one VM.
#[derive(Debug)]
pub struct Lifecycle {
    outcome: Mutex<Option<VmOutcome>>,
    ended: Condvar,
    /// Written when the VM ends, for event loops (epoll) that wait on more than the VM.
    ended_fd: Option<vmm_sys_util::eventfd::EventFd>,
    /// When each event was last recorded, by event number: one slot per kind, so a guest
    /// writing the control port in a loop cannot grow it.
    events: Mutex<[Option<Instant>; EVENT_KINDS]>,
}

/// Event numbers are 1..EVENT_KINDS (see [`Event::from_u32`]).
const EVENT_KINDS: usize = 4;

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            outcome: Mutex::new(None),
            ended: Condvar::new(),
            // Without an eventfd (descriptors exhausted) callers still have `wait`.
            ended_fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .ok(),
            events: Mutex::new([None; EVENT_KINDS]),
        }
    }
}

impl Lifecycle {
    /// Records how the VM ended; the first outcome wins.
    pub fn finish(&self, outcome: VmOutcome) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            tracing::debug!(%outcome, "VM finished");
            *o = Some(outcome);
            self.ended.notify_all();
            if let Some(fd) = &self.ended_fd {
                let _ = fd.write(1);
            }
        }
    }

    /// A descriptor that becomes readable when the VM ends (level: it stays readable until
    /// read). `None` if it could not be created; poll [`Lifecycle::is_finished`] then.
    pub fn ended_fd(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.ended_fd.as_ref()
    }

    /// The outcome, if the VM ended.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True once the VM ended.
    pub fn is_finished(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits up to `timeout` (forever if `None`) for the VM to end.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        let guard = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            None => {
                let g = self
                    .ended
                    .wait_while(guard, |o| o.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                g.clone()
            }
            Some(t) => {
                let (g, _) = self
                    .ended
                    .wait_timeout_while(guard, t, |o| o.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                g.clone()
            }
        }
    }

    /// Clears the outcome so the VM can run again (after a stop for a state save).
    pub fn rearm(&self) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(fd) = &self.ended_fd {
            let _ = fd.read();
        }
    }

    /// Records a guest event (only its latest time is kept).
    pub fn record(&self, e: Event) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = events.get_mut(e as usize) {
            *slot = Some(Instant::now());
        }
    }

    /// When event `e` was last recorded.
    pub fn event_time(&self, e: Event) -> Option<Instant> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.get(e as usize).copied().flatten()
    }

    /// Timestamps held (at most one per kind of event, whatever the guest writes).
    pub fn events_held(&self) -> usize {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().flatten().count()
    }
}
