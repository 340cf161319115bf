//! Monotonic clock from the TSC (`rdtsc` works in ring 3 and does not exit).
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);

/// Sets the TSC frequency the VMM reported.
pub fn init(tsc_khz: u64) {
    if tsc_khz != 0 {
        TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter (CR4.TSD is clear, so it is allowed in ring 3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond.
pub fn ticks_per_ms() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Milliseconds represented by `ticks`.
pub fn ticks_to_ms(ticks: u64) -> u64 {
    ticks / ticks_per_ms()
}

/// Microseconds represented by `ticks`.
pub fn ticks_to_us(ticks: u64) -> u64 {
    ((ticks as u128) * 1000 / ticks_per_ms() as u128) as u64
}
