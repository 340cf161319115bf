//! What a migration reports (human-readable and `--json`).
use serde::{Deserialize, Serialize};

/// One pre-copy round (round 0 sends all non-zero memory; the last round runs paused).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number.
    pub round: u32,
    /// Pages sent with their contents.
    pub pages: u64,
    /// Dirty pages that were all zero, sent as zero runs.
    pub zero_pages: u64,
    /// Bytes put on the wire in this round.
    pub bytes: u64,
    /// Duration of the round.
    pub ms: f64,
    /// Pages KVM's dirty log reported for this round.
    pub dirty_kvm: u64,
    /// Pages the VMM wrote itself.
    pub dirty_vmm: u64,
    /// Pages devices reported (writes KVM cannot see).
    pub dirty_device: u64,
    /// True for the final round (vCPUs paused).
    pub paused: bool,
    /// Share of time the vCPUs were held off during this round (auto-converge), percent.
    #[serde(default)]
    pub throttle_pct: u32,
}

/// The source's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    /// "completed", or "unknown" when Go was sent but the destination never confirmed (the
    /// source keeps the VM paused).
    #[serde(default)]
    pub outcome: crate::Outcome,
    /// Why the outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_reason: Option<String>,
    /// True when the stream ran over TLS.
    #[serde(default)]
    pub tls: bool,
    /// Destination address.
    pub destination: String,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Connect → the destination confirmed it runs the VM.
    pub total_ms: f64,
    /// vCPUs paused on the source → the destination's "resumed" received (an upper bound of
    /// the guest's downtime: it includes one trip of that message), without the debug hashing
    /// of guest RAM (`debug_hash_ms`), which a migration without `--debug-hash` does not do.
    pub downtime_ms: f64,
    /// Time both sides spent hashing guest RAM while the VM was paused (`--debug-hash` only).
    #[serde(default)]
    pub debug_hash_ms: f64,
    /// Times the vCPUs were resumed at the switchover because a device was not ready.
    #[serde(default)]
    pub switchover_retries: u32,
    /// Target downtime the rounds aimed for.
    pub downtime_target_ms: f64,
    /// Rounds, round 0 first, the paused one last.
    pub rounds: Vec<RoundReport>,
    /// Zero pages never sent in round 0.
    pub zero_pages_skipped: u64,
    /// Bytes put on the wire in total.
    pub bytes: u64,
    /// Average bandwidth over the whole migration, MB/s (10^6 bytes).
    pub bandwidth_mbps: f64,
    /// True when the round limit ended pre-copy before it converged.
    pub hit_round_limit: bool,
    /// Hash of all guest RAM at the pause, when asked for (compare with the destination's).
    pub memory_hash: Option<String>,
    /// Devices whose state was sent.
    pub devices: Vec<String>,
    /// TCP connections that carried guest memory (1: the main connection only).
    #[serde(default)]
    pub streams: u32,
    /// CPU seconds the migration's own threads used on the source (not the guest's).
    #[serde(default)]
    pub cpu_s: f64,
    /// Highest vCPU throttle auto-converge applied, percent (0: never throttled).
    #[serde(default)]
    pub throttle_pct: u32,
}

/// The destination's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReceiveReport {
    /// Source address.
    pub source: String,
    /// True when the source authenticated with TLS.
    #[serde(default)]
    pub tls: bool,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Rounds received.
    pub rounds: u32,
    /// Pages received with contents.
    pub pages: u64,
    /// Pages received as zero runs.
    pub zero_pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// First byte → VM resumed.
    pub total_ms: f64,
    /// Hash of all guest RAM before the VM resumed, when asked for.
    pub memory_hash: Option<String>,
    /// Devices restored.
    pub devices: Vec<String>,
    /// CPU seconds the migration's own threads used on the destination.
    #[serde(default)]
    pub cpu_s: f64,
}

/// Progress of a running migration, for progress bars and API clients.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// "precopy", "switchover", "done".
    pub phase: String,
    /// Current round.
    pub round: u32,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Pages still dirty at the last count.
    pub dirty_pages: u64,
    /// vCPU throttle of auto-converge now, percent.
    #[serde(default)]
    pub throttle_pct: u32,
}
