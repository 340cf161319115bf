//! What the device did, printed when it exits.
use serde::Serialize;

/// Counters of one device process.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Clients served (that sent at least one region access).
    pub connections: u64,
    /// Controller enables (CC.EN 0 → 1).
    pub enables: u64,
    /// Controller resets (CC.EN 1 → 0, DEVICE_RESET, client gone).
    pub resets: u64,
    /// Normal or abrupt shutdowns.
    pub shutdowns: u64,
    /// Admin commands processed.
    pub admin_commands: u64,
    /// Admin commands that failed.
    pub admin_errors: u64,
    /// Read commands.
    pub reads: u64,
    /// Write commands.
    pub writes: u64,
    /// Flush commands.
    pub flushes: u64,
    /// Bytes read from the namespace.
    pub bytes_read: u64,
    /// Bytes written to the namespace.
    pub bytes_written: u64,
    /// I/O commands that completed with an error status.
    pub io_errors: u64,
    /// Commands that failed on a DMA access outside the mapped regions.
    pub dma_errors: u64,
    /// Commands with invalid PRPs.
    pub prp_errors: u64,
    /// Doorbell writes with out-of-range values (ignored).
    pub bad_doorbells: u64,
    /// Interrupts signalled.
    pub interrupts: u64,
    /// I/O queue pairs created.
    pub io_queues_created: u64,
    /// Times the controller went fatal (CSTS.CFS).
    pub fatal: u64,
    /// Times the idle polling thread went to sleep (adaptive polling).
    pub poll_sleeps: u64,
    /// Sleeps ended early by a kick (a host-side doorbell or register write).
    pub poll_kicked: u64,
    /// Idle rounds ended with a `sched_yield` while the host side kicks (the core handed
    /// over without sleeping).
    pub poll_yields: u64,
}
