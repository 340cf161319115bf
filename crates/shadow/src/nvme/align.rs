//! Re-alignment of a queue pair's device positions with the guest's.
//!
//! Submitting `k` harmless filler commands (Flush) into the device buffer only, and consuming
//! their completions in the hypervisor, advances the device's SQ index by `k mod S`, its CQ
//! index by `k mod C` and toggles its phase once per CQ wrap. A queue rebuilt on the
//! destination starts at 0/0/phase 1 while the guest is wherever it was; a queue that had
//! commands refused by the hypervisor lags the guest by those. This module finds the smallest
//! `k` that closes the gap.

/// A position in a queue pair: SQ index, CQ index and the CQ phase at that index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Next SQ slot.
    pub sq: u32,
    /// Next CQ slot.
    pub cq: u32,
    /// Phase of the entry that will be written at `cq`.
    pub phase: bool,
}

/// CQ position in the 2C-long cycle of (index, phase); phase 1 is the first lap.
fn lap_pos(c: u64, cq: u32, phase: bool) -> u64 {
    cq as u64 + if phase { 0 } else { c }
}

/// Number of fillers (at least `min`) that move `from` to `to` in a queue pair with `s` SQ
/// and `c` CQ entries; `None` if no number does (positions no command stream can produce).
pub fn fillers_needed(s: u32, c: u32, from: Position, to: Position, min: u64) -> Option<u64> {
    if s < 2 || c < 2 || from.sq >= s || to.sq >= s || from.cq >= c || to.cq >= c {
        return None;
    }
    let (s, c) = (s as u64, c as u64);
    let dsq = (to.sq as u64 + s - from.sq as u64) % s;
    let dcq = (lap_pos(c, to.cq, to.phase) + 2 * c - lap_pos(c, from.cq, from.phase)) % (2 * c);
    // k ≡ dcq (mod 2C) and k ≡ dsq (mod S): step through the first congruence. Its values
    // cycle through at most S residues mod S, so S steps decide it; then add whole periods
    // until k reaches `min`.
    let k = (0..s).map(|i| dcq + i * 2 * c).find(|k| k % s == dsq)?;
    let period = lcm(s, 2 * c);
    Some(if k >= min {
        k
    } else {
        k + (min - k).div_ceil(period) * period
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates k fillers from `p`.
    fn advance(s: u32, c: u32, mut p: Position, k: u64) -> Position {
        for _ in 0..k {
            p.sq = (p.sq + 1) % s;
            p.cq += 1;
            if p.cq == c {
                p.cq = 0;
                p.phase = !p.phase;
            }
        }
        p
    }

    const FRESH: Position = Position {
        sq: 0,
        cq: 0,
        phase: true,
    };

    #[test]
    fn fillers_reach_every_position_a_command_stream_can_leave() {
        for (s, c) in [(2, 2), (32, 32), (33, 17), (64, 16), (7, 9)] {
            for n in 0..(4 * s as u64 * c as u64) {
                let to = advance(s, c, FRESH, n);
                let k = fillers_needed(s, c, FRESH, to, 0).expect("reachable");
                assert_eq!(advance(s, c, FRESH, k), to, "S={s} C={c} n={n}");
                assert!(k <= n, "the smallest count is used");
                // from a lagging position (refused commands) as well
                let from = advance(s, c, FRESH, n / 2);
                let k = fillers_needed(s, c, from, to, 3).expect("reachable");
                assert!(k >= 3);
                assert_eq!(advance(s, c, from, k), to);
            }
        }
    }

    #[test]
    fn impossible_positions_are_refused() {
        let p = |sq, cq, phase| Position { sq, cq, phase };
        // S = C = 32: SQ and CQ indexes of a real stream move together.
        assert_eq!(fillers_needed(32, 32, FRESH, p(3, 4, true), 0), None);
        assert_eq!(fillers_needed(32, 32, FRESH, p(40, 4, true), 0), None);
        assert_eq!(fillers_needed(1, 32, FRESH, FRESH, 0), None);
        assert_eq!(fillers_needed(32, 32, FRESH, FRESH, 0), Some(0));
        assert_eq!(fillers_needed(32, 32, FRESH, p(0, 0, false), 0), Some(32));
        assert_eq!(fillers_needed(32, 32, FRESH, FRESH, 5), Some(64));
    }
}
