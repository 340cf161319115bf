//! The poller: while shadowed, one thread reads the guest's doorbells from the redirected
//! pages, forwards new submissions (validated by the adapter) and rings the device, forwards
//! the device's completions into the guest's copy and collects the pages the device wrote.
use std::{
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
    time::Duration,
};

use passthrough::DeviceHooks;

use super::{Running, Shared};
use crate::{Error, Result, RingAdapter};

/// Sleep after a round that found nothing to do. The poller shares the machine with the
/// vCPU and the device, which both spin: a poller that spun as well would wait for a whole
/// scheduler time slice whenever the three outnumber the cores; one that sleeps briefly keeps
/// a small virtual runtime and preempts a spinner as soon as it wakes.
const IDLE_SLEEP: Duration = Duration::from_micros(10);

pub(crate) fn spawn(shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shadow-poller".into())
        .spawn(move || {
            sandbox::enter(sandbox::Kind::Device);
            while !shared.stop.load(Ordering::Acquire) {
                let (moved, irqs) = {
                    let mut run = shared.lock();
                    (poll_once(&mut run), std::mem::take(&mut run.pending_irqs))
                };
                // The completions are in the guest's queue: now the guest may be told.
                for vector in irqs {
                    interrupt_guest(&shared, vector);
                }
                if moved == 0 {
                    shared.wakeups.wait(IDLE_SLEEP);
                }
            }
        })
        .map_err(|source| Error::Os {
            what: "spawning the poller".into(),
            source,
        })
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
        let sq = page.guest.load_u32(q.sq_off).unwrap_or(q.seen_sq);
        if sq != q.seen_sq || q.q.pending() > 0 {
            if sq != q.seen_sq {
                moved += 1;
            }
            q.seen_sq = sq;
            match q.q.on_guest_submit(sq, bufs) {
                Ok(Some(tail)) => page.ring(q.sq_off, tail),
                Ok(None) => {}
                Err(e) => q.note_error("submission", &e),
            }
        }
        match q.q.forward_completions(bufs, dirty) {
            Ok(n) => {
                moved += n;
                if let Some(v) = q.vector.filter(|v| n > 0 && !pending_irqs.contains(v)) {
                    pending_irqs.push(v);
                }
            }
            Err(e) => q.note_error("completion", &e),
        }
        let cq = page.guest.load_u32(q.cq_off).unwrap_or(q.seen_cq);
        if cq != q.seen_cq {
            q.seen_cq = cq;
            moved += 1;
            if let Some(head) = q.q.on_guest_consume(cq) {
                page.ring(q.cq_off, head);
            }
        }
    }
    moved
}
