//! Bringing the rings to rest for a switchover or an exit: RAM made to hold the guest's view of
//! every ring, in-flight commands drained, queues re-aligned with fillers the guest never sees.
use std::sync::atomic::Ordering;

use super::*;

impl Engine {
    /// Makes guest RAM hold the guest's view of every ring copy (the copy as the vCPU buffer;
    /// with the copy as the device buffer RAM is the guest's view already). Returns the ring
    /// pages, which the migration must send.
    pub(super) fn rings_to_ram(a: &Active, bufs: &EngineBuffers) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        for c in a.copies.iter() {
            if a.designation == Designation::VcpuBuffer {
                let mut buf = vec![0u8; c.pages.len()];
                c.pages.read(0, &mut buf);
                bufs.ram()
                    .write(c.gpa.start, &buf)
                    .map_err(|source| Error::Vmm {
                        what: format!("writing ring pages {:?} back", c.gpa),
                        source,
                    })?;
            }
            pages.extend((c.gpa.start..c.gpa.end).step_by(PAGE as usize));
        }
        Ok(pages)
    }

    /// Where queue `qid`'s doorbells are: (index in `pages`, SQ tail offset, CQ head offset) in
    /// its page, which is intercepted and added to `pages` if it is not there yet
    /// (`copy_device`: starting from the device's values).
    pub(crate) fn doorbell_place(
        &self,
        slots: &vmm::memslots::MemorySlots,
        pages: &mut Vec<DoorbellPage>,
        qid: u16,
        copy_device: bool,
    ) -> Result<(usize, usize, usize)> {
        let sq_db = regs::sq_tail_doorbell(qid, self.att.dstrd());
        let cq_db = regs::cq_head_doorbell(qid, self.att.dstrd());
        let bar_offset = sq_db & !(PAGE - 1);
        if cq_db & !(PAGE - 1) != bar_offset {
            return Err(Error::Engine(format!(
                "queue {qid}'s doorbells are on two pages"
            )));
        }
        let page = match pages.iter().position(|p| p.bar_offset == bar_offset) {
            Some(i) => i,
            None => {
                pages.push(self.intercept(slots, bar_offset, copy_device)?);
                pages.len() - 1
            }
        };
        Ok((
            page,
            (sq_db - bar_offset) as usize,
            (cq_db - bar_offset) as usize,
        ))
    }

    /// Intercepts the doorbell page at `bar_offset`: a hypervisor page mapped in its place
    /// (poll mode) or the page left unmapped so writes exit (trap mode; always for the admin
    /// page, which DSTRD 0 queues share). `copy_device`: start from the device's values.
    pub(crate) fn intercept(
        &self,
        slots: &vmm::memslots::MemorySlots,
        bar_offset: u64,
        copy_device: bool,
    ) -> Result<DoorbellPage> {
        let device = self
            .att
            .device_page(bar_offset)
            .ok_or_else(|| Error::Engine(format!("BAR0 page {bar_offset:#x} is not mappable")))?;
        let guest = Arc::new(HostPages::new(PAGE)?);
        if copy_device {
            // SAFETY: `device` is a mapped BAR page of PAGE bytes.
            unsafe { guest.fill_from(0, device as *const u8, PAGE as usize) };
        }
        let admin_page = regs::doorbell_page(0, self.att.dstrd()) * PAGE;
        let trapped = self.opts.interception == Interception::Trap || bar_offset == admin_page;
        if bar_offset != admin_page {
            let mode = if trapped {
                DoorbellMode::Trapped
            } else {
                DoorbellMode::Redirected { host: guest.addr() }
            };
            // SAFETY: the page lives in `Running` until the mode changes back.
            unsafe { self.att.set_doorbell_mode(slots, bar_offset, mode) }
                .map_err(hook(format!("intercepting doorbell page {bar_offset:#x}")))?;
        }
        Ok(DoorbellPage {
            bar_offset,
            guest,
            device,
            trapped,
            wake: DeviceWake::of(&self.att),
        })
    }

    /// Gives the doorbell page at `bar_offset` back to the guest (the admin page stays
    /// trapped: the mediation needs it).
    pub(crate) fn release_page(
        &self,
        slots: &vmm::memslots::MemorySlots,
        bar_offset: u64,
    ) -> Result<()> {
        if bar_offset == regs::doorbell_page(0, self.att.dstrd()) * PAGE {
            return Ok(());
        }
        // SAFETY: the device's own page, kept mapped by the attachment.
        unsafe {
            self.att
                .set_doorbell_mode(slots, bar_offset, DoorbellMode::Mapped)
        }
        .map_err(hook(format!("mapping doorbell page {bar_offset:#x} back")))
    }

    /// Routes trapped I/O doorbell writes: the value lands where the poller reads it and the
    /// vCPU thread that took the exit forwards it at once ([`poller::forward_on_vcpu`]).
    pub(crate) fn install_hook(&self, shared: &Arc<Shared>) {
        let routes: Vec<(u16, usize, Arc<HostPages>, usize, usize)> = {
            let run = shared.lock();
            run.queues
                .iter()
                .enumerate()
                .filter(|(_, q)| run.pages[q.page].trapped)
                .map(|(i, q)| {
                    (
                        q.q.geometry().qid,
                        i,
                        run.pages[q.page].guest.clone(),
                        q.sq_off,
                        q.cq_off,
                    )
                })
                .collect()
        };
        if routes.is_empty() {
            return;
        }
        // Weak: the attachment holds the hook and the engine's state holds the attachment.
        let weak = Arc::downgrade(shared);
        self.att
            .set_doorbell_hook(Some(Arc::new(move |qid, is_cq, value| {
                match routes.iter().find(|r| r.0 == qid) {
                    Some((_, index, page, sq_off, cq_off)) => {
                        page.store_u32(if is_cq { *cq_off } else { *sq_off }, value);
                        if let Some(shared) = weak.upgrade() {
                            poller::forward_on_vcpu(&shared, *index, is_cq);
                        }
                        true
                    }
                    None => false,
                }
            })));
    }

    /// Pages the device wrote for completed commands since the last call.
    pub fn take_dirty(&self) -> Vec<u64> {
        match &*self.active() {
            Some(a) => std::mem::take(&mut a.shared.lock().dirty),
            None => Vec::new(),
        }
    }

    /// Queues with work left: a doorbell value the poller has not taken yet, a pending
    /// submission or a command in flight (queue, pending, in flight).
    pub(super) fn busy(run: &Running) -> Vec<(u16, u32, usize)> {
        run.queues
            .iter()
            .filter(|q| {
                let page = &run.pages[q.page].guest;
                page.load_u32(q.sq_off) != Some(q.seen_sq)
                    || q.q.pending() > 0
                    || q.q.in_flight() > 0
            })
            .map(|q| (q.q.geometry().qid, q.q.pending(), q.q.in_flight()))
            .collect()
    }

    /// Waits (bounded) until every queue is idle (see [`Engine::busy`]) and stops the poller
    /// with the queues still idle. The guest must be paused.
    pub(super) fn drain_and_stop(a: &mut Active, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            Self::start_poller(a)?;
            let busy = Self::busy(&a.shared.lock());
            if busy.is_empty() {
                Self::stop_poller(a);
                // The poller may have taken a doorbell between the look and the stop.
                if Self::busy(&a.shared.lock()).is_empty() {
                    return Ok(());
                }
                continue;
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Engine(format!(
                    "the device did not drain within {timeout:?}: (queue, pending, in flight) = {busy:?}"
                )));
            }
            // The guest is paused: this wait is downtime, so look often.
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Stops the poller for [`Engine::drain_held`] (see there), leaving the device's "the
    /// host kicks" word set.
    pub(super) fn stop_for_drain(a: &mut Active) {
        a.shared.keep_host_kicks.store(true, Ordering::SeqCst);
        Self::signal_stop(a);
        if !a.shared.wakeups.vectors.is_empty() {
            if let Some(p) = a.poller.take() {
                let _ = p.join();
            }
        }
    }

    /// The switchover's drain (the guest is paused, the poller stopped by
    /// [`Engine::stop_for_drain`]): forwards on this thread whatever the
    /// guest left and the device completes, until every queue is idle (see [`Engine::busy`]),
    /// then holds every queue; returns the state's guard, taken in the same look that found
    /// the queues idle and held them, and the rounds it took.
    ///
    /// The poller is told to stop but not waited for: its rounds only move work forward, and
    /// once the queues are idle and held they find none (no doorbell value is new: the vCPUs
    /// are paused; no command is in flight). The exception is a poller that interrupts the
    /// guest (completions by interrupt): it may have taken a completion's interrupt out of a
    /// round and not yet sent it, which must reach the vCPUs before their state is saved, so
    /// that poller is waited for. The wait for the device is its completion kick (or, for a
    /// device without the wake protocol, the interrupts taken over or a short timed wait),
    /// never a sleep on a device that announces its completions; and the migration thread
    /// drains itself, so the drain does not wait for the poller to be scheduled.
    pub(super) fn drain_held(
        a: &Active,
        timeout: Duration,
    ) -> Result<(std::sync::MutexGuard<'_, Running>, u64)> {
        let t0 = Instant::now();
        let mut rounds = 0u64;
        let mut step = poller::SLEEP_MIN;
        loop {
            rounds += 1;
            let (moved, _) = poller::round(&a.shared);
            let mut run = a.shared.lock();
            let busy = Self::busy(&run);
            if busy.is_empty() {
                for q in &mut run.queues {
                    q.q.hold(true);
                }
                return Ok((run, rounds));
            }
            drop(run);
            if t0.elapsed() >= timeout {
                return Err(Error::Engine(format!(
                    "the device did not drain within {timeout:?}: (queue, pending, in flight) = {busy:?}"
                )));
            }
            if moved > 0 {
                step = poller::SLEEP_MIN;
                continue;
            }
            match &a.shared.device_wake {
                Some(w) => {
                    // The device kicks the host word after each round that completed
                    // commands; the bound is a safety net.
                    let host = w.words().host;
                    wake::prepare(host);
                    if poller::round(&a.shared).0 > 0 {
                        host.store(wake::AWAKE, Ordering::SeqCst);
                        continue;
                    }
                    wake::wait(host, poller::SLEEP_MAX);
                }
                None => {
                    a.shared.wakeups.wait(step);
                    step = (step * 2).min(poller::SLEEP_MAX);
                }
            }
        }
    }

    /// Brings every held, idle queue's device positions onto the guest's (fillers), bounded.
    /// The queues are aligned together: each step puts every unaligned queue's next fillers
    /// out and reaps what came back, so the queues wait for the device at the same time, not
    /// one after another.
    pub(super) fn align_all(run: &mut Running, timeout: Duration) -> Result<u64> {
        let mut fillers = 0;
        let t0 = Instant::now();
        let Running {
            queues,
            pages,
            bufs,
            ..
        } = run;
        let mut left = Vec::new();
        for (i, q) in queues.iter_mut().enumerate() {
            q.q.hold(true);
            if q.q.in_sync() {
                q.q.hold(false);
                continue;
            }
            fillers += q.q.start_alignment()?;
            left.push(i);
        }
        while !left.is_empty() {
            let mut still = Vec::with_capacity(left.len());
            for &i in &left {
                let q = &mut queues[i];
                let step = q.q.alignment_step(bufs)?;
                if let Some(t) = step.sq_tail {
                    pages[q.page].ring(q.sq_off, t);
                }
                if let Some(h) = step.cq_head {
                    pages[q.page].ring(q.cq_off, h);
                }
                if !step.done {
                    still.push(i);
                }
            }
            left = still;
            if left.is_empty() {
                break;
            }
            if t0.elapsed() >= timeout {
                let qid = queues[left[0]].q.geometry().qid;
                return Err(Error::Realign {
                    qid,
                    reason: format!("fillers did not complete within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(fillers)
    }
}
