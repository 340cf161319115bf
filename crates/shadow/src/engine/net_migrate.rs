//! Moving a shadowed virtio-net device to another VM (a migration's device part): the
//! source's saved state — each queue's place and [`VirtqState`] (the guest's and the device's
//! indexes, the heads in flight) — and the destination's rebuild of the device from it.
//!
//! The source waits until no chain the device reads (a packet to send) is in flight, resets
//! its device (which then writes no guest memory) and puts the guest's view of the ring pages
//! into RAM, so RAM as sent holds what the guest sees. Receive buffers in flight stay the
//! guest's: the destination gives them to its device again. The destination's device starts
//! at index 0, so its queues stay shadowed, translating positions. A migration that fails
//! after the save has the source's device programmed again the same way
//! ([`NetEngine::reinstate`]). The migration protocol's side is
//! [`net_device`](super::net_device).
use serde::{Deserialize, Serialize};
use virtio_spec::pci::NO_VECTOR;
use vmm::Vm;

use super::{
    net::{net_err, NetEngine, NetRunning, QueuePlace},
    EngineOptions,
};
use crate::{
    virtio::{VirtQueue, VirtqState},
    Buffers, Error, Result, RingAdapter,
};

/// How long the switchover waits for the device to finish the packets it was given to send
/// before it says "not ready" (the vCPUs are paused meanwhile).
const SWITCHOVER_DRAIN: std::time::Duration = std::time::Duration::from_millis(5);

/// Most queues a saved device may list.
const MAX_QUEUES: usize = 16;

/// One saved virtqueue.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedNetQueue {
    /// Where it is and how it is reached.
    pub place: QueuePlace,
    /// Positions, chains in flight, counters.
    pub state: VirtqState,
}

/// The device state of a shadowed virtio-net NIC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetSavedDevice {
    /// Features the driver accepted.
    pub features: u64,
    /// Every shadowed queue.
    pub queues: Vec<SavedNetQueue>,
}

impl NetEngine {
    /// Source, vCPUs paused: stops giving the device new chains and says whether it still
    /// reads chains in flight (packets to send): an error until none are (transmit queues
    /// drain in microseconds; the caller resumes the vCPUs briefly and asks again).
    pub fn ready_for_switchover(&self) -> Result<()> {
        let a = self.active_guard();
        let a = a
            .as_ref()
            .ok_or_else(|| Error::Engine("switchover outside shadow mode".into()))?;
        for q in &mut a.shared.lock().queues {
            q.q.hold(true);
        }
        // The device sends what it was given in microseconds and the poller forwards its
        // completions: wait for that a little (bounded) rather than have the migration give
        // the vCPUs back, which would stretch the pause the guest's peers see.
        let t0 = std::time::Instant::now();
        loop {
            let reads: usize = {
                let run = a.shared.lock();
                run.queues.iter().map(|q| q.q.in_flight_with_reads()).sum()
            };
            if reads == 0 {
                return Ok(());
            }
            if t0.elapsed() >= SWITCHOVER_DRAIN {
                return Err(Error::Engine(format!(
                    "{reads} chain(s) the device reads are still in flight"
                )));
            }
            a.shared
                .kick
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = a.shared.wakeups.wake.write(1);
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Source, vCPUs paused, before [`NetEngine::save`]: lets frames already on their way
    /// to the guest land. The device keeps receiving into the buffers it holds (the pages are
    /// recorded dirty and sent with the last round) until no frame arrived for `quiet`, at
    /// most `max`: a peer answering the guest's last packets (sent just before the pause)
    /// gets its answer into this guest instead of into a device about to be reset, whose wire
    /// nobody reads any more. Returns how long it waited.
    pub fn settle_receive(
        &self,
        quiet: std::time::Duration,
        max: std::time::Duration,
    ) -> std::time::Duration {
        let g = self.active_guard();
        let t0 = std::time::Instant::now();
        let Some(a) = g.as_ref() else {
            return t0.elapsed();
        };
        let completed = || -> u64 {
            a.shared
                .lock()
                .queues
                .iter()
                .map(|q| q.q.stats().completed)
                .sum()
        };
        let mut last = completed();
        let mut since = std::time::Instant::now();
        while since.elapsed() < quiet && t0.elapsed() < max {
            std::thread::sleep(std::time::Duration::from_micros(100));
            let now = completed();
            if now != last {
                last = now;
                since = std::time::Instant::now();
            }
        }
        t0.elapsed()
    }

    /// Source, vCPUs paused, once [`NetEngine::ready_for_switchover`] passed: stops the
    /// poller, forwards what the device finished, resets the device, and makes RAM hold the
    /// guest's view of the ring pages. Returns the state and the guest-physical pages to send
    /// again (ring pages and pages the device wrote since the last take).
    pub fn save(&self, vm: &Vm) -> Result<(NetSavedDevice, Vec<u64>)> {
        let mut g = self.active_guard();
        let a = g
            .as_mut()
            .ok_or_else(|| Error::Engine("saving outside shadow mode".into()))?;
        Self::stop_poller(a);
        let mut run = a.shared.lock();
        let NetRunning {
            queues,
            bufs,
            dirty,
            ..
        } = &mut *run;
        for q in queues.iter_mut() {
            q.q.forward_completions(bufs, dirty)?;
        }
        let reads: usize = queues.iter().map(|q| q.q.in_flight_with_reads()).sum();
        if reads > 0 {
            return Err(Error::Engine(format!(
                "{reads} chain(s) the device reads are in flight at the switchover"
            )));
        }
        self.attachment()
            .reset_device()
            .map_err(net_err("resetting the source's device"))?;
        // What the device finished before the reset.
        for q in queues.iter_mut() {
            q.q.forward_completions(bufs, dirty)?;
        }
        let mut pages = std::mem::take(dirty);
        for c in a.copies().iter() {
            let mut b = vec![0u8; c.pages.len()];
            c.pages.read(0, &mut b);
            vm.ram()
                .write(c.gpa.start, &b)
                .map_err(|source| Error::Vmm {
                    what: "putting the guest's view of the rings into RAM".into(),
                    source,
                })?;
            pages.extend((c.gpa.start..c.gpa.end).step_by(super::memory::PAGE as usize));
        }
        pages.sort_unstable();
        pages.dedup();
        let features = queues.first().map_or(0, |q| q.q.state().features);
        let saved = NetSavedDevice {
            features,
            queues: queues
                .iter()
                .map(|q| SavedNetQueue {
                    place: QueuePlace {
                        geo: q.q.geometry(),
                        notify_off: q.notify_off,
                        msix_vector: q.vector.unwrap_or(NO_VECTOR),
                    },
                    state: q.q.state(),
                })
                .collect(),
        };
        Ok((saved, pages))
    }

    /// Destination, vCPUs not running, guest RAM arrived: an engine shadowing the device of
    /// `att` from `saved` (hostile: checked before use). The guest's view of the rings is the
    /// arrived RAM; the device's rings in RAM start blank at index 0; the device is programmed
    /// with the guest's features and ring addresses and started; the chains the source's
    /// device held (receive buffers) are validated again and given to this device.
    pub fn restore(
        att: std::sync::Arc<passthrough::virtio_net::NetAttachment>,
        opts: EngineOptions,
        vm: &Vm,
        saved: &NetSavedDevice,
    ) -> Result<NetEngine> {
        let engine = NetEngine::new(att, opts)?;
        let active = engine.rebuild(vm, saved)?;
        engine.set_active(active);
        Ok(engine)
    }

    /// Source, after [`NetEngine::save`] (vCPUs still paused), when the migration failed: the
    /// VM keeps running here with its device working. The session that was saved is let go
    /// (RAM already holds the guest's view of the rings), and the device — reset by the save —
    /// is programmed again and shadowed from `saved` exactly as a destination's would be: the
    /// receive buffers it held are given to it again, and the guest's indexes carry on.
    pub fn reinstate(&self, vm: &Vm, saved: &NetSavedDevice) -> Result<()> {
        let mut guard = self.active_guard();
        if let Some(mut a) = guard.take() {
            Self::stop_poller(&mut a);
            self.give_back(vm, &mut a)?;
            self.retire(&a.shared);
            self.release_vectors(&a.shared.wakeups);
        }
        drop(guard);
        let active = self.rebuild(vm, saved)?;
        self.set_active(active);
        tracing::info!("virtio-net device programmed again from its saved state; shadowed");
        Ok(())
    }

    /// Source, vCPUs paused, when the migration failed before [`NetEngine::save`]: the queues
    /// held by [`NetEngine::ready_for_switchover`] take the guest's chains again.
    pub fn release_hold(&self) {
        let g = self.active_guard();
        if let Some(a) = g.as_ref() {
            for q in &mut a.shared.lock().queues {
                q.q.hold(false);
            }
            a.shared
                .kick
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = a.shared.wakeups.wake.write(1);
        }
    }

    /// Checks `saved` (hostile) and builds a shadow session of this engine's device from it;
    /// see [`NetEngine::restore`].
    fn rebuild(&self, vm: &Vm, saved: &NetSavedDevice) -> Result<super::net::NetActive> {
        let att = self.attachment().clone();
        let bad = |reason: String| Error::Engine(format!("saved virtio-net state: {reason}"));
        if saved.queues.is_empty() || saved.queues.len() > MAX_QUEUES {
            return Err(bad(format!("{} queues", saved.queues.len())));
        }
        for (i, q) in saved.queues.iter().enumerate() {
            if q.place.geo != q.state.geometry || q.state.features != saved.features {
                return Err(bad(format!("queue {i} disagrees with itself")));
            }
            if saved.queues[..i]
                .iter()
                .any(|o| o.place.geo.index == q.place.geo.index)
            {
                return Err(bad(format!("queue {} twice", q.place.geo.index)));
            }
        }
        // Where to notify is this device's business, not the state's: its own
        // `queue_notify_off` for each queue (a queue it lacks is refused).
        let here = att
            .net_config()
            .map_err(net_err("reading the destination's device configuration"))?;
        let places = saved
            .queues
            .iter()
            .map(|q| {
                let own = here
                    .queues
                    .iter()
                    .find(|h| h.index == q.place.geo.index)
                    .ok_or_else(|| bad(format!("no queue {} here", q.place.geo.index)))?;
                Ok(QueuePlace {
                    notify_off: own.notify_off,
                    ..q.place
                })
            })
            .collect::<Result<Vec<QueuePlace>>>()?;
        let configs: Vec<passthrough::virtio_net_shadow::NetQueueConfig> = places
            .iter()
            .map(|p| passthrough::virtio_net_shadow::NetQueueConfig {
                index: p.geo.index,
                size: p.geo.size,
                desc: p.geo.desc,
                driver: p.geo.avail,
                device: p.geo.used,
                enabled: true,
                msix_vector: p.msix_vector,
                notify_off: p.notify_off,
            })
            .collect();
        self.install(vm, &places, |bufs| {
            let mut queues = saved
                .queues
                .iter()
                .map(|q| VirtQueue::rebuild(&q.state, 0, bufs))
                .collect::<Result<Vec<_>>>()?;
            // The device's rings (RAM, the device buffer) start blank.
            for p in &places {
                for r in p.geo.ranges() {
                    let zero = vec![0u8; (r.end - r.start) as usize];
                    bufs.ram()
                        .write(r.start, &zero)
                        .map_err(|source| Error::Vmm {
                            what: "blanking the device's rings".into(),
                            source,
                        })?;
                }
            }
            if let Err(e) = att.program(saved.features, &configs) {
                // The guest's rings go back into RAM, where the undo leaves the guest's view.
                for p in &places {
                    for r in p.geo.ranges() {
                        let mut b = vec![0u8; (r.end - r.start) as usize];
                        if bufs.read_vcpu(r.start, &mut b) {
                            let _ = bufs.ram().write(r.start, &b);
                        }
                    }
                }
                return Err(net_err("programming the destination's device")(e));
            }
            for (q, p) in queues.iter_mut().zip(&places) {
                if q.restart(bufs)?.is_some() {
                    att.notify_device(p.notify_off, p.geo.index)
                        .map_err(net_err("notifying the destination's device"))?;
                }
            }
            Ok(queues)
        })
    }
}
