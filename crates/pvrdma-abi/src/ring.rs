//! Ring indexes (`pvrdma_ring.h`): indexes run over `2 × size` so that full and empty differ.
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One ring's indexes (`pvrdma_ring`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Ring {
    /// Producer tail.
    pub prod_tail: u32,
    /// Consumer head.
    pub cons_head: u32,
}

/// A ring pair (`pvrdma_ring_state`): CQs and the device rings use `rx` for what the device
/// produces.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RingState {
    /// Send ring.
    pub tx: Ring,
    /// Receive ring.
    pub rx: Ring,
}

/// Byte offset of `RingState::rx` (CQ rings).
pub const RING_STATE_RX_OFFSET: u64 = 8;
/// Byte offset of a QP's receive ring in its header page (the send ring is at 0).
pub const QP_RQ_RING_OFFSET: u64 = 8;

/// Whether `idx` is a valid index of a ring of `max_elems` (a power of two) elements.
pub const fn idx_valid(idx: u32, max_elems: u32) -> bool {
    match max_elems.checked_mul(2) {
        Some(m) if max_elems.is_power_of_two() => idx & !(m - 1) == 0,
        _ => false,
    }
}

/// The slot `idx` names, or `None` if the index is invalid.
pub const fn idx_slot(idx: u32, max_elems: u32) -> Option<u32> {
    if idx_valid(idx, max_elems) {
        Some(idx & (max_elems - 1))
    } else {
        None
    }
}

/// `idx + 1` modulo `2 × max_elems`.
pub const fn idx_inc(idx: u32, max_elems: u32) -> u32 {
    idx.wrapping_add(1) & ((max_elems << 1).wrapping_sub(1))
}

/// Whether a ring with these indexes has data for the consumer: `Some(slot of head)` when it
/// has, `None` when empty; `Err(())` when an index is invalid.
#[allow(clippy::result_unit_err)]
pub const fn has_data(r: Ring, max_elems: u32) -> Result<Option<u32>, ()> {
    if !idx_valid(r.prod_tail, max_elems) || !idx_valid(r.cons_head, max_elems) {
        return Err(());
    }
    if r.prod_tail == r.cons_head {
        Ok(None)
    } else {
        Ok(Some(r.cons_head & (max_elems - 1)))
    }
}

/// Whether a ring with these indexes has space for the producer: `Some(slot of tail)` when it
/// has, `None` when full; `Err(())` when an index is invalid.
#[allow(clippy::result_unit_err)]
pub const fn has_space(r: Ring, max_elems: u32) -> Result<Option<u32>, ()> {
    if !idx_valid(r.prod_tail, max_elems) || !idx_valid(r.cons_head, max_elems) {
        return Err(());
    }
    if r.prod_tail == (r.cons_head ^ max_elems) {
        Ok(None)
    } else {
        Ok(Some(r.prod_tail & (max_elems - 1)))
    }
}
