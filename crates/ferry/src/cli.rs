//! Command-line interface.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use guest_abi::Workload;

use crate::units::{parse_duration, parse_size};

/// Ferry: a KVM hypervisor for live migration with passthrough devices and virtualized RDMA
/// connection management.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest and run it until it exits.
    Run(RunArgs),
    /// The main job: boot the built-in guest, run a short `dirty` workload, verify, report.
    Demo(DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// RDMA connection-management virtualization: host daemon and bare-metal peer.
    #[command(subcommand)]
    Rdma(crate::commands::rdma::RdmaCommand),
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
}

impl From<WorkloadName> for Workload {
    fn from(w: WorkloadName) -> Self {
        match w {
            WorkloadName::Hello => Workload::Hello,
            WorkloadName::Dirty => Workload::Dirty,
            WorkloadName::Spin => Workload::Spin,
            WorkloadName::Probe => Workload::Probe,
            WorkloadName::Crash => Workload::Crash,
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
    /// `dirty`: page writes per second (0 = as fast as the guest can).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// `dirty`: how long to run (0 = until stopped).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub duration: Duration,
    /// `dirty`: interval between progress lines (0 = none).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Seed of the workload's pseudo-random generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `spin`: loop iterations.
    #[arg(long, default_value_t = 200_000_000)]
    pub iterations: u64,
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
    /// Print a JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
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
    /// How long the workload runs.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub duration: Duration,
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
    /// Connection setups and routing through the RDMA CM multiplexer, UD rate vs raw UDP.
    Rdma(crate::commands::bench_rdma::BenchRdmaArgs),
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
