//! The poller: while shadowed, one thread reads the guest's doorbells from the redirected
//! pages, forwards new submissions (validated by the adapter) and rings the device, forwards
//! the device's completions into the guest's copy and collects the pages the device wrote.
//!
//! With trapped doorbells the vCPU thread that took the exit forwards the submission itself
//! ([`forward_on_vcpu`]): no hand-off to the poller, whose job is then only the completions.
//!
//! The poller spins only while there is work: rounds follow each other at once while they move
//! entries; when nothing moves it spins briefly and then hands the CPU over. With commands in
//! flight it spins [`SPIN_BUSY_KICKED`] and then sleeps on the host word of the device's wake
//! protocol ([`nvme_device::wake`]), which the device kicks after each round that completed
//! commands (and a vCPU that left a trapped doorbell kicks too), so a completion ends the
//! sleep at once; the sleep's bound (steps growing to [`SLEEP_MAX`]) is only for doorbells a
//! guest stores into a polled page, which nothing announces. A device without the protocol
//! is waited for with [`SPIN_BUSY`] of spinning and timed sleeps. With nothing in flight it
//! spins [`SPIN_IDLE`]; when nothing needs polling (completions by interrupt and trapped
//! doorbells) it blocks on an event instead (a trapped doorbell may also be stored by a hook
//! that does not forward, as while leaving shadow mode on a destination, hence the bounds).
//! On two cores shared with the vCPU and the device, a poller that spun would take the CPU
//! the device needs to complete what it waits for.
use std::{
    sync::{atomic::Ordering, Arc, TryLockError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvme_device::wake;
use passthrough::DeviceHooks;

use super::{DoorbellPage, QueueRt, Running, Shared};
use crate::{engine::memory::EngineBuffers, Error, Result, RingAdapter};

/// Spinning with commands in flight and nothing moving, before sleeping on a timer (a device
/// without the wake protocol).
pub(crate) const SPIN_BUSY: Duration = Duration::from_micros(20);
/// Spinning with commands in flight and nothing moving, before sleeping on the device's
/// completion kick.
const SPIN_BUSY_KICKED: Duration = Duration::from_micros(2);
/// Spinning with nothing in flight, before sleeping or blocking.
pub(crate) const SPIN_IDLE: Duration = Duration::from_micros(5);
/// Spinning with nothing in flight when the device kicks on completions: after forwarding a
/// completion, the guest's next doorbell (QD 1) comes within a few µs of the vCPU's time; a
/// sleep would cost a wake-up (tens of µs on a nested host) per I/O.
const SPIN_IDLE_KICKED: Duration = Duration::from_micros(30);
/// With the device's wake protocol and a poller pinned to one core (see
/// [`nvme_device::wake::Pinned`]): after spinning, rounds separated by `sched_yield` (the core
/// goes to the device pinned beside it, without a futex sleep and its wake-up) for this long
/// with commands in flight since the last entry moved ...
const YIELD_BUSY: Duration = Duration::from_micros(200);
/// ... and for this long with nothing in flight (the guest's next doorbell).
const YIELD_IDLE: Duration = Duration::from_micros(50);
/// Shortest sleep on the device's completion kick with commands in flight: a shorter timed
/// sleep ends before the switch to another process is done (a few tens of µs on a nested
/// host), so the poller kept its core from the device it was waiting for, sleep after sleep
/// (2, 4, 8, ... µs: ~60 µs per round of 32 reads at QD 32).
const SLEEP_BUSY_KICKED: Duration = Duration::from_micros(50);
/// First sleep after spinning; each further one doubles, up to [`SLEEP_MAX`].
pub(crate) const SLEEP_MIN: Duration = Duration::from_micros(2);
pub(crate) const SLEEP_MAX: Duration = Duration::from_micros(64);
/// Bound on blocking when nothing needs polling (a safety net; events end it sooner).
const BLOCK_MAX: Duration = Duration::from_millis(20);
/// Timer slack of the poller thread: its short sleeps end when asked, not 50 µs later.
const TIMER_SLACK_NS: libc::c_ulong = 1_000;

pub(crate) fn spawn(shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    spawn_thread("shadow-poller", "spawning the poller", move || run(&shared))
}

/// A poller thread started before its state exists (a destination prepared from the pre-copy
/// state, outside the downtime): it waits for the state and then runs as [`spawn`]'s does.
/// Dropped unused, it ends.
pub(crate) struct Parked {
    tx: std::sync::mpsc::SyncSender<Arc<Shared>>,
    handle: JoinHandle<()>,
}

pub(crate) fn spawn_parked() -> Result<Parked> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
    let handle = spawn_thread("shadow-poller", "spawning the poller", move || {
        if let Ok(shared) = rx.recv() {
            run(&shared);
        }
    })?;
    Ok(Parked { tx, handle })
}

impl Parked {
    /// Hands the thread its state (a fresh poller if the parked one is gone).
    pub(crate) fn start(self, shared: Arc<Shared>) -> Result<JoinHandle<()>> {
        match self.tx.send(shared) {
            Ok(()) => Ok(self.handle),
            Err(e) => spawn(e.0),
        }
    }
}

/// Starts a poller thread `name` running `body`: short timer slack, the device sandbox.
pub(crate) fn spawn_thread(
    name: &str,
    what: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: prctl with an integer argument changes only this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) };
            sandbox::enter(sandbox::Kind::Device);
            body();
        })
        .map_err(|source| Error::Os {
            what: what.into(),
            source,
        })
}

/// One round under the state lock, then the guest's interrupts for what it forwarded.
/// Returns (entries moved, commands in flight or submissions pending).
pub(crate) fn round(shared: &Shared) -> (usize, bool) {
    let (moved, work, irqs) = {
        let mut run = shared.lock();
        let moved = poll_once(&mut run);
        let irqs = std::mem::take(&mut run.pending_irqs);
        (moved, has_work(&run), irqs)
    };
    // The completions are in the guest's queue: now the guest may be told.
    for vector in irqs {
        interrupt_guest(shared, vector);
    }
    (moved, work)
}

fn run(shared: &Shared) {
    // Only polled completions and no vector taken: the device's completion kick is all the
    // poller needs to sleep on (vectors taken need the eventfd wait).
    let wake = shared
        .device_wake
        .filter(|_| shared.wakeups.vectors.is_empty() && !shared.wakeups.can_block);
    if let Some(w) = &shared.device_wake {
        // Every I/O doorbell now reaches the device through `DoorbellPage::ring`, which kicks.
        w.words().host_kicks.store(1, Ordering::SeqCst);
    }
    // Every doorbell trapped: a vCPU forwards each one and kicks the poller if needed, so
    // nothing the poller must notice comes unannounced and its sleeps need no short bound.
    let all_trapped = shared.lock().pages.iter().all(|p| p.trapped);
    let mut quiet_since: Option<Instant> = None;
    let mut sleep = SLEEP_MIN;
    let mut pinned = wake::Pinned::new();
    while !shared.stop.load(Ordering::Acquire) {
        shared.kick.store(false, Ordering::Relaxed);
        let (moved, work) = round(shared);
        if moved > 0 || shared.kick.load(Ordering::Acquire) {
            quiet_since = None;
            sleep = SLEEP_MIN;
            continue;
        }
        let can_block = shared.wakeups.can_block;
        // With completions by interrupt the device says when a command is done: no spinning
        // for it. Nor with the device's completion kick, which ends the sleep at once.
        let spin = match (work && !can_block, wake.is_some()) {
            (true, false) => SPIN_BUSY,
            (true, true) => SPIN_BUSY_KICKED,
            (false, true) => SPIN_IDLE_KICKED,
            (false, false) => SPIN_IDLE,
        };
        let since = *quiet_since.get_or_insert_with(Instant::now);
        let quiet = since.elapsed();
        if quiet < spin {
            std::hint::spin_loop();
            continue;
        }
        // With the device's wake protocol and pinned (beside the device's polling thread):
        // hand the core over to the device without sleeping, and look again when it yields
        // the core back (it does so between its own looks at the doorbells).
        if wake.is_some() && quiet < if work { YIELD_BUSY } else { YIELD_IDLE } && pinned.get() {
            shared.yields.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
            continue;
        }
        if can_block {
            park(shared, can_block);
            quiet_since = None;
            sleep = SLEEP_MIN;
        } else if let Some(w) = &wake {
            // Sleep on the host word: the device kicks it when it completes commands, a vCPU
            // that left a trapped doorbell (`kick`) too; the bound is for doorbells the guest
            // stores into a polled page, which nothing announces.
            let host = w.words().host;
            wake::prepare(host);
            let (moved, _) = round(shared);
            if moved > 0 || shared.kick.load(Ordering::SeqCst) {
                host.store(wake::AWAKE, Ordering::SeqCst);
                quiet_since = None;
                sleep = SLEEP_MIN;
                continue;
            }
            shared.sleeps.fetch_add(1, Ordering::Relaxed);
            if work {
                sleep = sleep.max(SLEEP_BUSY_KICKED);
            }
            if wake::wait(host, if all_trapped { BLOCK_MAX } else { sleep }) {
                shared.woken.fetch_add(1, Ordering::Relaxed);
                quiet_since = None;
                sleep = SLEEP_MIN;
            } else {
                sleep = (sleep * 2).min(SLEEP_MAX);
            }
        } else {
            shared.wakeups.wait(sleep);
            sleep = (sleep * 2).min(SLEEP_MAX);
        }
    }
    if let Some(w) = shared
        .device_wake
        .filter(|_| !shared.keep_host_kicks.load(Ordering::SeqCst))
    {
        w.words().host_kicks.store(0, Ordering::SeqCst);
    }
}

/// Blocks until an event (a device interrupt taken over, or the trap hook's wake-up), unless
/// work arrived while the poller was deciding to block. `interrupts`: every completion comes
/// with a device interrupt, so commands in flight do not keep the poller awake.
fn park(shared: &Shared, interrupts: bool) {
    shared.parked.store(true, Ordering::SeqCst);
    // A vCPU that forwarded before this look is seen here; one that forwards after it sees
    // `parked` (both go through the state lock) and wakes the poller. A vCPU that found the
    // lock taken (by this look) leaves `kick`, read after the guard is gone.
    let work = !interrupts && has_work(&shared.lock());
    if !work && !shared.kick.load(Ordering::SeqCst) {
        shared.wakeups.block(BLOCK_MAX);
    }
    shared.parked.store(false, Ordering::SeqCst);
}

/// Commands in flight or guest submissions waiting in some queue.
fn has_work(run: &Running) -> bool {
    run.queues
        .iter()
        .any(|q| q.q.in_flight() > 0 || q.q.pending() > 0)
}

fn interrupt_guest(shared: &Shared, vector: u16) {
    let Some(v) = shared.wakeups.vectors.iter().find(|v| v.vector == vector) else {
        return;
    };
    match shared.att.interrupt_guest(vector) {
        Ok(true) => {
            v.injected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => {
            v.masked.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(vector, "interrupting the guest: {}", vmm::ErrorChain(&e)),
    }
}

/// A trapped doorbell of queue `index` (of [`Running::queues`]) was written: forward on the
/// calling vCPU thread. If the poller holds the state it is in a round and looks again before
/// it idles (`kick`); if it is parked it is woken for the completions to come.
pub(crate) fn forward_on_vcpu(shared: &Shared, index: usize, is_cq: bool) {
    if shared.stop.load(Ordering::Acquire) {
        return; // held or draining: the value waits in the page
    }
    let mut run = match shared.state.try_lock() {
        Ok(run) => run,
        Err(TryLockError::WouldBlock) => {
            // The poller reads `kick` after its round, or after setting `parked` (then this
            // sees `parked` and wakes it).
            shared.kick.store(true, Ordering::SeqCst);
            if shared.parked.load(Ordering::SeqCst) {
                let _ = shared.wakeups.wake.write(1);
            }
            if let Some(w) = &shared.device_wake {
                wake::kick_word(w.words().host);
            }
            return;
        }
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    let Running {
        queues,
        pages,
        bufs,
        ..
    } = &mut *run;
    let Some(q) = queues.get_mut(index) else {
        return;
    };
    let Some(page) = pages.get(q.page) else {
        return;
    };
    if is_cq {
        consume(q, page);
    } else {
        submit(q, page, bufs, false);
    }
    drop(run);
    if shared.parked.load(Ordering::SeqCst) {
        let _ = shared.wakeups.wake.write(1);
    }
}

/// Takes the guest's SQ tail doorbell of `q`; returns true if it changed.
fn submit(q: &mut QueueRt, page: &DoorbellPage, bufs: &EngineBuffers, retry: bool) -> bool {
    let sq = page.guest.load_u32(q.sq_off).unwrap_or(q.seen_sq);
    let changed = sq != q.seen_sq;
    if changed || (retry && q.q.pending() > 0) {
        q.seen_sq = sq;
        match q.q.on_guest_submit(sq, bufs) {
            Ok(Some(tail)) => page.ring(q.sq_off, tail),
            Ok(None) => {}
            Err(e) => q.note_error("submission", &e),
        }
    }
    changed
}

/// Takes the guest's CQ head doorbell of `q`; returns true if it changed.
fn consume(q: &mut QueueRt, page: &DoorbellPage) -> bool {
    let cq = page.guest.load_u32(q.cq_off).unwrap_or(q.seen_cq);
    if cq == q.seen_cq {
        return false;
    }
    q.seen_cq = cq;
    if let Some(head) = q.q.on_guest_consume(cq) {
        page.ring(q.cq_off, head);
    }
    true
}

/// One round over every queue; returns how many doorbells and completions moved.
pub(crate) fn poll_once(run: &mut Running) -> usize {
    let Running {
        queues,
        pages,
        bufs,
        dirty,
        pending_irqs,
    } = run;
    let mut moved = 0;
    for q in queues.iter_mut() {
        let page = &pages[q.page];
        moved += usize::from(submit(q, page, bufs, true));
        match q.q.forward_completions(bufs, dirty) {
            Ok(n) => {
                moved += n;
                if let Some(v) = q.vector.filter(|v| n > 0 && !pending_irqs.contains(v)) {
                    pending_irqs.push(v);
                }
            }
            Err(e) => q.note_error("completion", &e),
        }
        moved += usize::from(consume(q, page));
    }
    moved
}
