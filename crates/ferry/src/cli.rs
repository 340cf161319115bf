//! Command-line interface.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use guest_abi::Workload;

use crate::units::{parse_compression, parse_duration, parse_size};

/// Ferry: a KVM hypervisor for live migration with passthrough devices and virtualized RDMA
/// connection management.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// System-call filters on the VMM's threads and device processes: `on` (default; a
    /// forbidden call stops the process with a message naming it), `log` (the kernel logs
    /// it and lets it through), `off`. Passed on to the processes ferry starts.
    #[arg(long, global = true, value_name = "on|log|off")]
    pub seccomp: Option<sandbox::Mode>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // built once per process; boxing buys nothing
pub enum Command {
    /// Boot a guest and run it until it exits.
    Run(RunArgs),
    /// The main job: boot the built-in guest; run `dirty`, verify, save/restore and live-migrate
    /// it; live-migrate a VM with a passthrough NVMe device running `nvme-verify` and `dirty`;
    /// connect two VMs over virtual RDMA; report.
    Demo(DemoArgs),
    /// Wait for one incoming live migration, then run the VM that arrives.
    Receive(ReceiveArgs),
    /// Live-migrate the VM of a running `ferry run --api-socket` to a `ferry receive`.
    Migrate(MigrateArgs),
    /// Resume a source VM left paused by a migration whose outcome is unknown (after Go).
    Resume(ResumeArgs),
    /// Call the HTTP API of a running VM (`ping`, `info`, `verify`, `send-migration`, ...);
    /// prints JSON.
    Remote(crate::commands::remote::RemoteArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Stand-in devices, each in its own process.
    #[command(subcommand)]
    Device(crate::nvme_args::DeviceCommand),
    /// RDMA connection-management virtualization: host daemon and bare-metal peer.
    #[command(subcommand)]
    Rdma(crate::commands::rdma::RdmaCommand),
    /// Several VMs with virtual RDMA devices on this host's RoCEv2 port and multiplexer.
    Vrdma(crate::commands::vrdma::VrdmaHostArgs),
}

/// Workloads of the built-in guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadName {
    /// Print, enumerate PCI, exit 0.
    Hello,
    /// Dirty a working set at a rate with a verifiable ledger.
    Dirty,
    /// Run the benchmark loop.
    Spin,
    /// Touch unbacked MMIO and unknown ports; report what came back.
    Probe,
    /// Fault on purpose (the VMM must survive and report it).
    Crash,
    /// Self-verifying random I/O on the passthrough NVMe device.
    NvmeVerify,
    /// Malformed NVMe commands; checks the error statuses.
    NvmeMalformed,
    /// RDMA agent, passive side (needs --vrdma): answers REQ/SIDR, echoes UD, answers DREQ.
    RdmaServer,
    /// RDMA agent, active side (needs --vrdma): connect, SIDR, verified UD stream, disconnect.
    RdmaClient,
    /// Garbage into the PVRDMA command slot, rings and page directories (needs --vrdma).
    RdmaHostile,
    /// Answer ARP and ping, echo UDP on the passthrough virtio-net NIC (needs
    /// --passthrough virtio-net=SOCKET; --net-ip, --net-port, --net-count).
    NetEcho,
    /// A sequenced UDP stream both ways on the passthrough virtio-net NIC, verified in order
    /// and content (--net-ip, --net-port, --net-count).
    NetStream,
    /// Garbled virtio-net rings (loops, oversized chains, out-of-RAM addresses, index jumps,
    /// wrong directions, unnegotiated indirect, zero lengths): the device refuses each or
    /// asks for a reset, then still works (--net-ip, --net-peer).
    NetHostile,
}

impl From<WorkloadName> for Workload {
    fn from(w: WorkloadName) -> Self {
        match w {
            WorkloadName::Hello => Workload::Hello,
            WorkloadName::Dirty => Workload::Dirty,
            WorkloadName::Spin => Workload::Spin,
            WorkloadName::Probe => Workload::Probe,
            WorkloadName::Crash => Workload::Crash,
            WorkloadName::NvmeVerify => Workload::NvmeVerify,
            WorkloadName::NvmeMalformed => Workload::NvmeMalformed,
            WorkloadName::RdmaServer => Workload::RdmaServer,
            WorkloadName::RdmaClient => Workload::RdmaClient,
            WorkloadName::RdmaHostile => Workload::RdmaHostile,
            WorkloadName::NetEcho => Workload::NetEcho,
            WorkloadName::NetStream => Workload::NetStream,
            WorkloadName::NetHostile => Workload::NetHostile,
        }
    }
}

/// Options shared by everything that boots a guest.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest RAM (e.g. 256M, 1G); a multiple of 2 MiB, at least 32M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Guest ELF to load instead of the built-in guest (it must follow Ferry's guest ABI).
    #[arg(long, value_name = "PATH")]
    pub guest: Option<PathBuf>,
    /// Workload of the built-in guest.
    #[arg(long, value_enum, default_value = "hello")]
    pub workload: WorkloadName,
    /// `dirty`: size of the working set.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// `dirty` (and `--with-dirty`): page writes per second (0 = as fast as the guest can).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// `nvme-verify`: also run `dirty` with a working set of this size (e.g. 16M) in the memory
    /// the NVMe buffers leave free, its page writes (at --rate) interleaved with the I/O. Its
    /// ledger is verified on request (--verify-after, SIGUSR1, the API's `verify`) and at the
    /// end; the guest exits non-zero if either verification fails.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "working_set")]
    pub with_dirty: Option<u64>,
    /// `dirty`, `nvme-verify`: how long to run (0 = until stopped).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub duration: Duration,
    /// `dirty`, `nvme-verify`: interval between progress lines (0 = none).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Seed of the workload's pseudo-random generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `spin`: loop iterations.
    #[arg(long, default_value_t = 200_000_000)]
    pub iterations: u64,
    #[command(flatten)]
    pub nvme: crate::nvme_args::NvmeCliArgs,
    #[command(flatten)]
    pub rdma: crate::commands::vrdma::RdmaCliArgs,
    #[command(flatten)]
    pub net: crate::virtio_net_args::NetCliArgs,
}

/// `ferry run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Guest console: "stdout", "off", or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Stop the VM after this long (exit code 124).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Ask the guest to verify its ledger after this long (SIGUSR1 does it any time).
    #[arg(long, value_parser = parse_duration)]
    pub verify_after: Option<Duration>,
    /// Debug: after this long, save the complete VM state, build a new VM from it on the same
    /// guest RAM, and continue there.
    #[arg(long, value_parser = parse_duration)]
    pub state_roundtrip_after: Option<Duration>,
    /// Serve the control API (HTTP, docs/api/ferry-api.yaml) on this Unix socket (mode 0600):
    /// `ferry migrate` and `ferry remote` talk to it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Attach a virtual RDMA device (PVRDMA ABI) with this GID; this process hosts the
    /// software RoCEv2 port (UDP 4791 on `host`, default the GID's address, and on the GID,
    /// which must be an address of this host) and its CM multiplexer; IP routing finds
    /// every other GID.
    #[arg(long, value_name = "gid=IPV4[,host=ADDR][,pcap=FILE]")]
    pub vrdma: Option<control::vrdma_host::VrdmaSpec>,
    /// Print a JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// TLS 1.3 with mutual certificate authentication for the migration stream (all three or
/// none). Recipe for test certificates: docs/migration-tls.md.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This side's certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate that signs the other side's certificate (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// UNSAFE: allow plain TCP (no authentication, no encryption) to or on an address that is
    /// not loopback.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

impl TlsArgs {
    /// The files, when TLS was asked for.
    pub fn files(&self) -> Option<migration::TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(migration::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }
}

/// `ferry resume`.
#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// Control API socket of the `ferry run` whose VM is paused after Go.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Required: you checked that the destination does not run this VM (two running copies
    /// of one VM corrupt its disk).
    #[arg(long)]
    pub force: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ferry receive`.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Address to listen on for the migration stream (ADDR:PORT).
    #[arg(long)]
    pub listen: String,
    /// TLS for the migration stream.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Largest guest RAM accepted (default: this machine's physical memory).
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// The exact guest RAM size expected; a VM of any other size is refused.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Bound on a connection's TLS handshake, Hello and VM configuration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Guest console once the VM runs here: "stdout", "off", or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Serve the control API on this Unix socket once the VM runs (to migrate it on).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Give up if no migration arrives within this time.
    #[arg(long, value_parser = parse_duration)]
    pub accept_timeout: Option<Duration>,
    /// Stop the VM this long after it arrived (exit code 124).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Ask the guest to verify its ledger this long after it arrived.
    #[arg(long, value_parser = parse_duration)]
    pub verify_after: Option<Duration>,
    /// Hash all guest RAM before resuming (compare with the source's --debug-hash).
    #[arg(long)]
    pub debug_hash: bool,
    /// Print a JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// The destination's own passthrough device for an incoming VM that has one (same backing
    /// file as the source: shared storage).
    #[command(flatten)]
    pub nvme: crate::nvme_args::NvmeCliArgs,
}

/// `ferry migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Control API socket of the `ferry run` whose VM moves.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Address of the `ferry receive` (ADDR:PORT).
    #[arg(long)]
    pub to: String,
    /// TLS for the migration stream (the files are read by the `ferry run` process).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Name the destination's certificate must carry (default: the host part of --to).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Downtime target: pre-copy goes on until the rest fits this at the measured bandwidth
    /// (0: no early switchover, the rounds run to --max-rounds).
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Most pre-copy rounds after round 0.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// What to do when the round limit is hit before convergence.
    #[arg(long, value_enum, default_value = "finish")]
    pub on_limit: OnLimit,
    /// Cap on the pre-copy sending rate on the wire, all streams together, in bytes per second
    /// with binary suffixes (100M = 100 MiB/s, 1G = 1 GiB/s = 1.07 GB/s; default: no cap). The
    /// paused last round is never capped.
    #[arg(long, value_name = "BYTES_PER_S", value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Compress guest memory on the wire for slow links: `zstd` (level 1) or `zstd:LEVEL`
    /// (-7..19); chunks that do not compress go raw, zero pages stay zero runs.
    #[arg(long, value_name = "zstd[:LEVEL]", value_parser = parse_compression)]
    pub compress: Option<migration::Compression>,
    /// Hash guest RAM at the pause (compare with the destination's --debug-hash).
    #[arg(long)]
    pub debug_hash: bool,
    /// Data channels for guest memory next to the main connection, each authenticated as the
    /// main one (default 4; 0 sends memory over the main connection alone).
    #[arg(long)]
    pub streams: Option<u32>,
    /// UNSAFE negative control: migrate a passthrough device without reporting the pages it
    /// writes (the destination's memory is expected to be corrupt).
    #[arg(long)]
    pub unsafe_no_shadow: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--on-limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnLimit {
    /// Switch over anyway, with a longer downtime.
    Finish,
    /// Give up; the VM keeps running on the source.
    Abort,
}

/// `ferry demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Working set of the `dirty` workload.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// How long the workload runs (at least 3 s; the migration happens at 40 %).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Page writes per second of the `dirty` workload (0 = as fast as it can).
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time from process start to the guest's first instruction and to its exit, and the
    /// guest's loop speed against the same loop run natively.
    Boot(BenchBootArgs),
    /// 4 KiB random reads on the passthrough NVMe device at QD 1 and 32: the guest against a
    /// host-side vfio-user client.
    Nvme(crate::nvme_args::BenchNvmeArgs),
    /// Connection setups and routing through the RDMA CM multiplexer, UD rate vs raw UDP.
    Rdma(crate::commands::bench::rdma_port::BenchRdmaArgs),
    /// VM↔VM through two multiplexers vs bare-metal peer↔peer: connection setup, UD rate.
    Vrdma(crate::commands::bench::rdma_vms::BenchVrdmaArgs),
    /// Live migration of idle, moderately and heavily dirtying guests of several sizes over
    /// loopback, against raw loopback TCP bandwidth measured in the same run.
    Migrate(BenchMigrateArgs),
    /// The shadow engine's cost: guest IOPS in direct mode against continuous shadow mode
    /// (poll and trap) at each queue depth, and migration downtime and total time of a VM with
    /// and without a passthrough device under load.
    Shadow(BenchShadowArgs),
    /// The migration fault matrix: a VM with a passthrough NVMe device running `nvme-verify
    /// --with-dirty` migrated many times through a fault-injecting proxy, each fault at each
    /// protocol phase; VMs running, verifications and I/Os lost per run.
    MigrateFaults(crate::commands::bench::faults::BenchFaultsArgs),
    /// What this host charges for a guest exit (to user space, and to the kernel through an
    /// ioeventfd) and for a hand-off between two processes: the floors under `bench shadow`
    /// and `bench vrdma` (docs/platform-costs.md).
    Platform(crate::commands::bench::platform::BenchPlatformArgs),
}

/// `ferry bench shadow`.
#[derive(Args, Debug)]
pub struct BenchShadowArgs {
    /// Queue depths.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 32])]
    pub qd: Vec<u32>,
    /// Seconds of I/O per run (the first half second is not counted).
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Migrations per configuration (the median counts; 0: no migration runs).
    #[arg(long, default_value_t = 3)]
    pub migrations: usize,
    /// Shadow modes measured against direct (direct always runs): poll, trap,
    /// poll-device-buffer, trap-interrupt.
    #[arg(long, value_delimiter = ',', default_value = "poll,trap,poll-device-buffer,trap-interrupt",
          value_parser = ["poll", "trap", "poll-device-buffer", "trap-interrupt"])]
    pub modes: Vec<String>,
    /// Runs per mode and queue depth, interleaved (direct, modes, direct, modes, ...); each
    /// ratio is the median over the runs of the run's IOPS against its own direct run.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// The stand-in device always spins (`ferry device nvme --poll`) instead of its adaptive
    /// polling.
    #[arg(long)]
    pub device_spin: bool,
    /// Pin the guest's vCPU to CPU 0 and the shadow poller and the stand-in device's polling
    /// thread to CPU 1 in the IOPS runs (every mode, direct too): the poller and the device
    /// then hand their shared core to each other by `sched_yield` instead of futex wake-ups.
    #[arg(long)]
    pub pin: bool,
    /// Measure only the engine's CPU cost per forwarded I/O against an in-process device
    /// that completes at once (no VM), against the floor of copying the entries.
    #[arg(long)]
    pub engine: bool,
    /// Measure only the virtio-net rows (packets per second, direct against shadowed).
    #[arg(long)]
    pub net_only: bool,
    /// Measure only the live migrations with and without the device (downtime).
    #[arg(long)]
    pub migration_only: bool,
    /// Runs of each virtio-net mode, interleaved (the median counts).
    #[arg(long, default_value_t = 3)]
    pub net_runs: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry bench migrate`.
#[derive(Args, Debug)]
pub struct BenchMigrateArgs {
    /// Guest sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G", value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Dirtying loads: idle (1 page/s), moderate (50 000 pages/s), heavy (as fast as the guest can).
    #[arg(long, value_delimiter = ',', default_value = "idle,moderate,heavy")]
    pub loads: Vec<String>,
    /// Transports, each migration run once per transport: plain TCP and TLS 1.3 with mutual
    /// authentication (the TLS rows show their bandwidth as a ratio of the plain row's).
    #[arg(long, value_delimiter = ',', default_value = "plain,tls")]
    pub transports: Vec<String>,
    /// Downtime target.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Most pre-copy rounds (then switch over anyway).
    #[arg(long, default_value_t = 10)]
    pub max_rounds: u32,
    /// Runs per row, interleaved with as many runs of the floor (the median counts; at least 3
    /// for the figures).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Adds, per size and load, two plain rows at this --max-bandwidth (bytes per second on
    /// the wire, 1G = 2^30 B/s): without compression and with --capped-compress ("none":
    /// no capped rows).
    #[arg(long, default_value = "1G")]
    pub capped: String,
    /// Compression of the second capped row.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    pub capped_compress: migration::Compression,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry bench boot`.
#[derive(Args, Debug)]
pub struct BenchBootArgs {
    /// Boots to time (each in a fresh `ferry run` process).
    #[arg(long, default_value_t = 10)]
    pub boots: usize,
    /// Iterations of the loop compared guest vs native.
    #[arg(long, default_value_t = 500_000_000)]
    pub iterations: u64,
    /// Repetitions of the loop comparison (the best of each side counts).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
