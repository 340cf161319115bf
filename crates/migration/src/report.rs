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
    /// CPU seconds the destination's migration threads used up to Ready (as it reported).
    #[serde(default)]
    pub dst_cpu_s: f64,
    /// Compression of guest memory on the wire ("zstd:LEVEL"), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Guest bytes of the data pages sent, before compression (`bytes` is what went on the
    /// wire, headers included).
    #[serde(default)]
    pub page_bytes: u64,
    /// Data pages that went out compressed (the others did not compress and went raw).
    #[serde(default)]
    pub zstd_pages: u64,
    /// The cap on the pre-copy sending rate, bytes per second on the wire, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}

impl MigrationReport {
    /// CPU seconds per GiB on the wire of the source's and the destination's migration
    /// threads.
    pub fn cpu_s_per_gib(&self) -> (f64, f64) {
        let gib = (self.bytes.max(1)) as f64 / (1u64 << 30) as f64;
        (self.cpu_s / gib, self.dst_cpu_s / gib)
    }

    /// The figures `ferry bench migrate` reports, on a few lines of text (for `ferry migrate`
    /// and the demo): rate, downtime, streams, bytes on the wire against guest bytes, CPU per
    /// GiB on each side, vCPU throttle, cap.
    pub fn figures(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let (src, dst) = self.cpu_s_per_gib();
        let mut wire = format!(
            "{:.1} MiB on the wire for {:.1} MiB of guest pages",
            mib(self.bytes),
            mib(self.page_bytes)
        );
        if let Some(c) = &self.compression {
            wire.push_str(&format!(
                " ({c}: x{:.2}, {} of {} pages compressed)",
                self.page_bytes as f64 / self.bytes.max(1) as f64,
                self.zstd_pages,
                self.page_bytes / 4096
            ));
        }
        vec![
            format!(
                "rate {:.0} MB/s, downtime {:.1} ms, {} stream(s), {}",
                self.bandwidth_mbps, self.downtime_ms, self.streams, wire
            ),
            format!(
                "CPU s/GiB: source {src:.3}, destination {dst:.3}; vCPU throttle {}%; cap {}",
                self.throttle_pct,
                match self.max_bandwidth {
                    Some(r) => format!("{:.0} MB/s", r as f64 / 1e6),
                    None => "none".into(),
                }
            ),
        ]
    }
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
    /// True when the source sent memory compressed.
    #[serde(default)]
    pub compressed: bool,
    /// Pages that arrived compressed.
    #[serde(default)]
    pub zstd_pages: u64,
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
