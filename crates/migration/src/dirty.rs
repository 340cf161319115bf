//! Dirty sets as bitmaps, one per RAM slot, as KVM's dirty log hands them out: merging is an
//! OR of words, counting a popcount, and the runs to send come from word scans (no per-page
//! allocation, no sorting).
use std::collections::BTreeSet;

use vmm::memslots::DirtyLog;

use crate::wire::PAGE;

/// Bits per bitmap word.
const WORD_BITS: u64 = 64;

/// One slot's bitmap: bit `i` of word `i / 64` stands for the page at `gpa + i * PAGE`.
#[derive(Clone, Debug)]
struct Slot {
    gpa: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl Slot {
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && (gpa - self.gpa) / PAGE < self.pages
    }
}

/// Dirty pages of guest RAM, one bitmap per RAM slot, slots in address order.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirtyMap {
    slots: Vec<Slot>,
    /// Pages the VMM or a device wrote where no dirty-logged slot maps guest RAM (ring pages
    /// whose vCPU slot the shadow engine moved onto a copy, for one): few, kept one by one.
    extra: BTreeSet<u64>,
}

impl DirtyMap {
    /// Takes over KVM's bitmaps as they are. Bits past a slot's end are cleared (KVM rounds
    /// the bitmap up to whole words).
    pub fn from_logs(logs: Vec<DirtyLog>) -> DirtyMap {
        let mut slots: Vec<Slot> = logs
            .into_iter()
            .map(|log| {
                let pages = log.info.size / PAGE;
                let mut bits = log.bitmap;
                bits.resize(pages.div_ceil(WORD_BITS) as usize, 0);
                if !pages.is_multiple_of(WORD_BITS) {
                    if let Some(last) = bits.last_mut() {
                        *last &= (1u64 << (pages % WORD_BITS)) - 1;
                    }
                }
                Slot {
                    gpa: log.info.gpa,
                    pages,
                    bits,
                }
            })
            .collect();
        slots.sort_by_key(|s| s.gpa);
        DirtyMap {
            slots,
            extra: BTreeSet::new(),
        }
    }

    /// Marks the page holding `gpa` (the caller checked it is guest RAM); true when it was
    /// not marked yet.
    pub fn set(&mut self, gpa: u64) -> bool {
        let Some(s) = self.slots.iter_mut().find(|s| s.contains(gpa)) else {
            return self.extra.insert(gpa & !(PAGE - 1));
        };
        let i = (gpa - s.gpa) / PAGE;
        let (w, bit) = ((i / WORD_BITS) as usize, 1u64 << (i % WORD_BITS));
        let new = s.bits[w] & bit == 0;
        s.bits[w] |= bit;
        new
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyMap) {
        for &p in &other.extra {
            self.set(p);
        }
        for o in &other.slots {
            match self
                .slots
                .iter_mut()
                .find(|s| s.gpa == o.gpa && s.pages == o.pages)
            {
                Some(s) => {
                    for (a, b) in s.bits.iter_mut().zip(&o.bits) {
                        *a |= *b;
                    }
                }
                // Slots that changed between two harvests: page by page.
                None => {
                    for (gpa, n) in runs_of_slot(o) {
                        for k in 0..n {
                            self.set(gpa + k * PAGE);
                        }
                    }
                }
            }
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| &s.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            + self.extra.len() as u64
    }

    /// The dirty pages as runs of contiguous pages, (first page's address, page count), in
    /// address order; a run never crosses a slot.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = self.slots.iter().flat_map(runs_of_slot).collect();
        if !self.extra.is_empty() {
            runs.extend(self.extra.iter().map(|&p| (p, 1)));
            runs.sort_unstable();
        }
        runs
    }
}

/// The runs of one slot, found a word at a time: trailing zeros to the next set bit, trailing
/// ones to the end of its run.
fn runs_of_slot(s: &Slot) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<(u64, u64)> = None; // (first page index, pages)
    for (w, &word) in s.bits.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let start = u64::from(bits.trailing_zeros());
            let ones = u64::from((bits >> start).trailing_ones());
            let first = w as u64 * WORD_BITS + start;
            open = match open {
                Some((f, n)) if f + n == first => Some((f, n + ones)),
                Some((f, n)) => {
                    runs.push((s.gpa + f * PAGE, n));
                    Some((first, ones))
                }
                None => Some((first, ones)),
            };
            bits = if start + ones >= WORD_BITS {
                0
            } else {
                bits & !(((1u64 << ones) - 1) << start)
            };
        }
    }
    if let Some((f, n)) = open {
        runs.push((s.gpa + f * PAGE, n));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::memslots::{SlotInfo, SlotKind};

    fn log(gpa: u64, pages: u64, set: &[u64]) -> DirtyLog {
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        for &p in set {
            bitmap[(p / 64) as usize] |= 1 << (p % 64);
        }
        DirtyLog {
            info: SlotInfo {
                gpa,
                size: pages * PAGE,
                host: 0,
                kind: SlotKind::Ram,
                read_only: false,
            },
            bitmap,
        }
    }

    /// The runs a page-by-page walk finds, for comparison.
    fn naive(gpa: u64, pages: &[u64]) -> Vec<(u64, u64)> {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in sorted {
            let a = gpa + p * PAGE;
            match runs.last_mut() {
                Some((s, n)) if *s + *n * PAGE == a => *n += 1,
                _ => runs.push((a, 1)),
            }
        }
        runs
    }

    #[test]
    fn runs_cross_words_and_match_a_page_walk() {
        let set: Vec<u64> = [0, 1, 2, 63, 64, 65, 127, 128, 300]
            .into_iter()
            .chain(400..600)
            .chain([999])
            .collect();
        let m = DirtyMap::from_logs(vec![log(0x10_0000, 1000, &set)]);
        assert_eq!(m.runs(), naive(0x10_0000, &set));
        assert_eq!(m.count(), set.len() as u64);
        // A full word and a full bitmap.
        let all: Vec<u64> = (0..128).collect();
        let m = DirtyMap::from_logs(vec![log(0, 128, &all)]);
        assert_eq!(m.runs(), vec![(0, 128)]);
    }

    /// A page the VMM or a device wrote where no logged slot maps RAM (the shadow engine moved
    /// the vCPUs' slot over a ring onto a copy) is still sent: dropping it left the destination
    /// with stale ring pages (lost and duplicate completions in the shadow migration tests).
    #[test]
    fn pages_outside_every_logged_slot_are_kept() {
        let mut m = DirtyMap::from_logs(vec![log(0x10_0000, 64, &[1])]);
        assert!(m.set(0x5000 + 12));
        assert!(!m.set(0x5000));
        assert!(m.set(0x6000));
        assert!(!m.set(0x10_1000));
        assert_eq!(m.count(), 3);
        assert_eq!(m.runs(), vec![(0x5000, 1), (0x6000, 1), (0x10_1000, 1)]);
        let mut other = DirtyMap::from_logs(vec![log(0x10_0000, 64, &[])]);
        other.merge(&m);
        assert_eq!(other.runs(), m.runs());
    }

    #[test]
    fn bits_past_the_slot_end_are_ignored_and_merge_ors() {
        let mut l = log(0, 70, &[69]);
        l.bitmap[1] |= 1 << 40; // page 104: past the end
        let mut m = DirtyMap::from_logs(vec![l, log(1 << 32, 64, &[])]);
        assert_eq!(m.runs(), vec![(69 * PAGE, 1)]);
        assert!(m.set((1 << 32) + 5 * PAGE + 7));
        assert!(!m.set(69 * PAGE)); // marked already
        let other = DirtyMap::from_logs(vec![log(0, 70, &[68]), log(1 << 32, 64, &[6])]);
        m.merge(&other);
        assert_eq!(m.runs(), vec![(68 * PAGE, 2), ((1 << 32) + 5 * PAGE, 2)]);
        assert_eq!(m.count(), 4);
    }
}
