//! The virtio-net engine's poller: each round, per virtqueue, takes what the guest made
//! available (poll mode: read from the vCPU buffer every round; trap mode: also forwarded on
//! the notifying vCPU by [`forward_on_vcpu`], and read every round as well), validates and forwards it, notifies the device
//! when its event index asks for it, forwards the device's used entries and records the pages
//! it wrote, and interrupts the guest when its event index asks for it.
//!
//! Pacing follows the NVMe poller's: rounds back to back while entries move; with chains in
//! flight (a receive queue always has some) it spins [`SPIN_BUSY`], then sleeps in steps
//! growing to [`SLEEP_MAX`], woken early by a taken-over device interrupt or a vCPU.
use std::{
    sync::{atomic::Ordering, Arc, TryLockError},
    thread::JoinHandle,
    time::Instant,
};

use super::net::{NetQueueRt, NetRunning, NetShared};
use super::poller::{SLEEP_MAX, SLEEP_MIN, SPIN_BUSY, SPIN_IDLE};
use crate::{engine::memory::EngineBuffers, Result, RingAdapter};

pub(crate) fn spawn(shared: Arc<NetShared>) -> Result<JoinHandle<()>> {
    super::poller::spawn_thread(
        "net-shadow-poller",
        "spawning the virtio-net poller",
        move || run(&shared),
    )
}

fn run(shared: &NetShared) {
    let mut quiet_since: Option<Instant> = None;
    let mut sleep = SLEEP_MIN;
    while !shared.stop.load(Ordering::Acquire) {
        shared.kick.store(false, Ordering::Relaxed);
        let (moved, work, irqs) = {
            let mut run = shared.lock();
            let moved = poll_once(shared, &mut run);
            let work = run
                .queues
                .iter()
                .any(|q| q.q.in_flight() > 0 || q.q.pending() > 0);
            (moved, work, std::mem::take(&mut run.pending_irqs))
        };
        for v in irqs {
            interrupt_guest(shared, v);
        }
        if moved > 0 || shared.kick.load(Ordering::Acquire) {
            quiet_since = None;
            sleep = SLEEP_MIN;
            continue;
        }
        let spin = if work { SPIN_BUSY } else { SPIN_IDLE };
        let since = *quiet_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        shared.wakeups.wait(sleep);
        sleep = (sleep * 2).min(SLEEP_MAX);
    }
}

fn interrupt_guest(shared: &NetShared, vector: u16) {
    let taken = shared.wakeups.vectors.iter().find(|v| v.vector == vector);
    match shared.att.interrupt_guest(vector) {
        Ok(true) => {
            if let Some(v) = taken {
                v.injected.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(false) => {
            if let Some(v) = taken {
                v.masked.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => tracing::warn!(vector, "interrupting the guest: {}", vmm::ErrorChain(&e)),
    }
}

/// A trapped notification for `queue`: forward on the calling vCPU thread. When the poller
/// holds the state it is inside a round and looks again before idling (`kick`).
pub(crate) fn forward_on_vcpu(shared: &NetShared, queue: u16) {
    shared.trapped.fetch_add(1, Ordering::Relaxed);
    if shared.stop.load(Ordering::Acquire) {
        return; // leaving: the index waits in the ring
    }
    let mut run = match shared.state.try_lock() {
        Ok(run) => run,
        Err(TryLockError::WouldBlock) => {
            shared.kick.store(true, Ordering::SeqCst);
            return;
        }
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    let NetRunning {
        queues,
        bufs,
        pending_irqs,
        ..
    } = &mut *run;
    if let Some(q) = queues.iter_mut().find(|q| q.q.geometry().index == queue) {
        submit(shared, q, bufs);
        guest_interrupt(q, bufs, pending_irqs);
    }
    let irqs = std::mem::take(&mut run.pending_irqs);
    drop(run);
    for v in irqs {
        interrupt_guest(shared, v);
    }
    let _ = shared.wakeups.wake.write(1);
}

/// Takes the guest's available index of `q`, forwards, and notifies the device if it wants.
/// Returns true when something was forwarded.
fn submit(shared: &NetShared, q: &mut NetQueueRt, bufs: &EngineBuffers) -> bool {
    let avail = match q.q.guest_avail_idx(bufs) {
        Ok(a) => a,
        Err(e) => {
            q.note_error("reading the available index", &e);
            return false;
        }
    };
    match q.q.on_guest_submit(avail, bufs) {
        Ok(Some(_)) => {
            match q.q.take_device_notify(bufs) {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    shared.device_notifies.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = shared.att.notify_device(q.notify_off, q.q.geometry().index) {
                        q.note_error("notifying the device", &e);
                    }
                }
            }
            true
        }
        Ok(None) => {
            if q.q.broken() {
                report_needs_reset(shared);
            }
            false
        }
        Err(e) => {
            q.note_error("submission", &e);
            false
        }
    }
}

/// A queue broke (the guest's available index jumped): the guest is told the way the device
/// tells it about its own queues — DEVICE_NEEDS_RESET in the status it reads and a
/// configuration-change interrupt — once per shadow session.
fn report_needs_reset(shared: &NetShared) {
    if shared.needs_reset.swap(true, Ordering::SeqCst) {
        return;
    }
    shared.needs_reset_reports.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("a shadowed virtqueue broke; the guest is told DEVICE_NEEDS_RESET");
    if let Err(e) = shared.att.report_needs_reset() {
        tracing::warn!("reporting DEVICE_NEEDS_RESET: {}", vmm::ErrorChain(&e));
    }
}

/// Queues the guest's interrupt for `q` if its used ring moved and it wants one.
fn guest_interrupt(q: &mut NetQueueRt, bufs: &EngineBuffers, pending: &mut Vec<u16>) {
    let Some(v) = q.vector else {
        return;
    };
    match q.q.guest_needs_interrupt(bufs) {
        Ok(true) if !pending.contains(&v) => pending.push(v),
        Ok(_) => {}
        Err(e) => q.note_error("reading the guest's interrupt suppression", &e),
    }
}

/// One round over every queue; returns how many entries moved.
fn poll_once(shared: &NetShared, run: &mut NetRunning) -> usize {
    let NetRunning {
        queues,
        bufs,
        dirty,
        pending_irqs,
    } = run;
    let mut moved = 0;
    for q in queues.iter_mut() {
        // Every round, in trap mode too: a notification that found the poller inside a
        // round left only `kick`, and held entries wait here.
        moved += usize::from(submit(shared, q, bufs));
        match q.q.forward_completions(bufs, dirty) {
            Ok(n) => moved += n,
            Err(e) => q.note_error("used entries", &e),
        }
        guest_interrupt(q, bufs, pending_irqs);
    }
    moved
}
