//! Validation of a saved device state from a migration stream (hostile until checked): every
//! size, address and position in it is checked against limits, this VM's RAM and this host's
//! device, with checked arithmetic, before the destination allocates or maps anything from it.
use std::collections::BTreeSet;

use passthrough::config_log::{counter_too_large, RestoreBounds, MAX_COUNTER, MAX_IO_QUEUES};

use super::{device::SavedDevice, limits_from, memory::page_regions, PAGE};
use crate::{
    nvme::{bounce, validate::Limits, QueueGeometry},
    StateError,
};

const SQE: u64 = 64;
const CQE: u64 = 16;

/// Pages of one PRP-list bounce slot: enough for the longest list `limits` let through.
pub(crate) fn bounce_pages_per_slot(limits: Limits) -> usize {
    bounce::pages_for((limits.max_transfer / PAGE).saturating_add(1) as usize)
}

/// Bytes of the bounce area of a queue of `sq_entries` (None on overflow).
pub(crate) fn bounce_bytes(sq_entries: u32, per_slot: usize) -> Option<u64> {
    (sq_entries as u64)
        .checked_mul(per_slot as u64)?
        .checked_mul(PAGE)
}

/// Checks `saved` against `b`; see the module documentation.
pub fn validate_saved(saved: &SavedDevice, b: &RestoreBounds) -> Result<(), StateError> {
    saved
        .config
        .validate(saved.admin, b)
        .map_err(StateError::Config)?;
    passthrough::msix::check_state(&saved.msix, b.msix_vectors).map_err(StateError::Config)?;
    if saved.dstrd != b.dstrd {
        return Err(StateError::Dstrd {
            saved: saved.dstrd,
            device: b.dstrd,
        });
    }
    if saved.queues.len() != saved.doorbells.len() {
        return Err(StateError::Doorbells {
            queues: saved.queues.len(),
            doorbells: saved.doorbells.len(),
        });
    }
    // No queues is a state too (the guest deleted them all before the switchover).
    let max = MAX_IO_QUEUES as usize;
    if saved.queues.len() > max {
        return Err(StateError::QueueCount {
            count: saved.queues.len(),
            max,
        });
    }
    let derived = limits_from(&saved.config).map_err(|e| StateError::NoLimits(Box::new(e)))?;
    if derived != saved.limits {
        return Err(StateError::Limits {
            saved: saved.limits,
            derived,
        });
    }
    let mut seen = BTreeSet::new();
    let mut rings = Vec::with_capacity(saved.queues.len() * 2);
    for (q, &(db_sq, db_cq)) in saved.queues.iter().zip(&saved.doorbells) {
        let g = q.geometry;
        let qid = g.qid;
        if !(1..=MAX_IO_QUEUES).contains(&qid) {
            return Err(StateError::QueueId {
                qid,
                max: MAX_IO_QUEUES,
            });
        }
        if !seen.insert(qid) {
            return Err(StateError::DuplicateQueue { qid });
        }
        check_rings(&g, b)?;
        rings.push((g.sq_base, g.sq_base + g.sq_entries as u64 * SQE, qid, "SQ"));
        rings.push((g.cq_base, g.cq_base + g.cq_entries as u64 * CQE, qid, "CQ"));
        // The device replays the log's queues: the engine must shadow those very rings.
        let matches_log = saved
            .config
            .io_sqs
            .get(&qid)
            .is_some_and(|s| s.cqid == qid && s.base == g.sq_base && s.entries == g.sq_entries)
            && saved
                .config
                .io_cqs
                .get(&qid)
                .is_some_and(|c| c.base == g.cq_base && c.entries == g.cq_entries);
        if !matches_log {
            return Err(StateError::NotInLog { qid });
        }
        let (s, c) = (g.sq_entries, g.cq_entries);
        for (what, value, entries) in [
            ("guest SQ tail", q.guest.sq_tail, s),
            ("guest SQ taken", q.guest.sq_taken, s),
            ("guest CQ tail", q.guest.cq_tail, c),
            ("guest CQ head", q.guest.cq_head, c),
            ("device SQ tail", q.device.sq_tail, s),
            ("device SQ head", q.device.sq_head, s),
            ("device CQ tail", q.device.cq_tail, c),
            ("device CQ head", q.device.cq_head, c),
            ("SQ tail doorbell", db_sq, s),
            ("CQ head doorbell", db_cq, c),
        ] {
            if value >= entries {
                return Err(StateError::Index {
                    qid,
                    what,
                    value,
                    entries,
                });
            }
        }
        let st = q.stats;
        if let Some((what, value)) = counter_too_large([
            ("forwarded", st.forwarded),
            ("completed", st.completed),
            ("refused", st.refused),
            ("dirty_pages", st.dirty_pages),
            ("fillers", st.fillers),
            ("anomalies", st.anomalies),
            ("bounced", st.bounced),
        ]) {
            return Err(StateError::Counter {
                qid,
                what,
                value,
                max: MAX_COUNTER,
            });
        }
        let offset = nvme_spec::regs::cq_head_doorbell(qid, b.dstrd)
            .max(nvme_spec::regs::sq_tail_doorbell(qid, b.dstrd));
        if offset.checked_add(4).is_none_or(|end| end > b.bar0_size) {
            return Err(StateError::DoorbellOutsideBar {
                qid,
                offset,
                bar0_size: b.bar0_size,
            });
        }
    }
    if let Some(&qid) = saved.config.io_sqs.keys().find(|q| !seen.contains(q)) {
        return Err(StateError::MissingQueue { qid });
    }
    rings.sort_unstable();
    if let Some(w) = rings.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(StateError::RingsOverlap {
            qid: w[1].2,
            ring: w[1].3,
        });
    }
    let geos: Vec<QueueGeometry> = saved.queues.iter().map(|q| q.geometry).collect();
    let copy_bytes: u64 = page_regions(rings.iter().map(|r| r.0..r.1))
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    if copy_bytes > super::device::MAX_RING_COPY_BYTES {
        return Err(StateError::Memory {
            what: "the ring copies",
            bytes: copy_bytes,
            max: super::device::MAX_RING_COPY_BYTES,
        });
    }
    let per_slot = bounce_pages_per_slot(saved.limits);
    let bounce = geos.iter().try_fold(0u64, |sum, g| {
        bounce_bytes(g.sq_entries, per_slot)?
            .checked_next_multiple_of(1 << 21)?
            .checked_add(sum)
    });
    match bounce {
        Some(bytes) if bytes <= super::device::MAX_BOUNCE_BYTES => Ok(()),
        other => Err(StateError::Memory {
            what: "the PRP-list bounce areas",
            bytes: other.unwrap_or(u64::MAX),
            max: super::device::MAX_BOUNCE_BYTES,
        }),
    }
}

/// Sizes within NVMe's and the device's maximums; rings page aligned inside guest RAM.
fn check_rings(g: &QueueGeometry, b: &RestoreBounds) -> Result<(), StateError> {
    for (ring, base, entries, size) in [
        ("SQ", g.sq_base, g.sq_entries, SQE),
        ("CQ", g.cq_base, g.cq_entries, CQE),
    ] {
        if !(2..=b.max_queue_entries.min(65536)).contains(&entries) {
            return Err(StateError::QueueSize {
                qid: g.qid,
                ring,
                entries,
                max: b.max_queue_entries.min(65536),
            });
        }
        let len = entries as u64 * size;
        if !b.ring_in_ram(base, len) {
            return Err(StateError::Ring {
                qid: g.qid,
                ring,
                base,
                len,
            });
        }
    }
    Ok(())
}
