//! Command-line options of the passthrough NVMe pieces: `ferry device nvme`, `ferry bench
//! nvme`, and the `--passthrough`/`--nvme-*` options of everything that boots a guest.
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use guest_abi::params::{
    NvmeArgs, NVME_ADMIN_POLL, NVME_ADOPT_EXISTING, NVME_INTERRUPTS, NVME_NO_FINAL_VERIFY,
};

use crate::units::parse_size;

/// `ferry device ...`: stand-in devices run as their own process.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// An NVMe SSD behind a vfio-user socket, backed by a file.
    Nvme(DeviceNvmeArgs),
    /// A virtio-net NIC behind a vfio-user socket, a host tap device as its wire.
    VirtioNet(crate::virtio_net_args::DeviceVirtioNetArgs),
}

/// `ferry device nvme`.
#[derive(Args, Debug, Clone)]
pub struct DeviceNvmeArgs {
    /// vfio-user socket to listen on (must not exist).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Backing file of namespace 1.
    #[arg(long, value_name = "FILE")]
    pub backing: PathBuf,
    /// Namespace size (0 = the file's size).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub size: u64,
    /// Logical block size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Doorbell stride exponent: 9 (one 4 KiB page per queue pair) or 0 (all on one page).
    #[arg(long, default_value_t = 9)]
    pub dstrd: u8,
    /// Create and size the backing file if needed.
    #[arg(long)]
    pub create: bool,
    /// Exit after the first client disconnects (instead of waiting for the next one).
    #[arg(long)]
    pub once: bool,
    /// Always spin on the doorbells, also when idle (default: adaptive polling, which spins
    /// while there is work and sleeps, using no CPU, when there is none).
    #[arg(long)]
    pub poll: bool,
}

/// Passthrough NVMe options of everything that boots a guest.
#[derive(Args, Debug, Clone, Default)]
pub struct NvmeCliArgs {
    /// Attach a passthrough device: `nvme=SOCKET` (a running `ferry device nvme`) or
    /// `virtio-net=SOCKET` (a running `ferry device virtio-net`).
    #[arg(long, value_name = "nvme=SOCKET|virtio-net=SOCKET")]
    pub passthrough: Option<String>,
    /// Start `ferry device nvme` on this backing file (created if needed) and attach it.
    #[arg(long, value_name = "FILE", conflicts_with = "passthrough")]
    pub nvme_backing: Option<PathBuf>,
    /// With --nvme-backing: namespace size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub nvme_size: u64,
    /// With --nvme-backing: block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    pub nvme_block_size: u32,
    /// With --nvme-backing: doorbell stride exponent (9 or 0).
    #[arg(long, default_value_t = 9)]
    pub nvme_dstrd: u8,
    /// Shadow engine: `migration` (shadow the device's rings only while migrating) or
    /// `continuous` (shadow all the time once the guest created its I/O queues; for
    /// measurement and tests).
    #[arg(long, default_value = "migration", value_parser = ["migration", "continuous"])]
    pub shadow: String,
    /// Shadow engine: how guest doorbell writes are intercepted: `poll` (the doorbell page is
    /// replaced by a hypervisor page a thread polls) or `trap` (every write exits). Queues of
    /// a DSTRD 0 device share the admin doorbell page and are always trapped.
    #[arg(long, default_value = "poll", value_parser = ["poll", "trap"])]
    pub shadow_doorbells: String,
    /// Shadow engine: which copy of a shadowed ring the hypervisor's copy is:
    /// `vcpu-buffer` (the guest's memory slots over the ring pages are swapped onto the copy;
    /// the device keeps DMAing guest RAM) or `device-buffer` (the device's DMA mapping of the
    /// ring pages is moved onto the copy; the guest keeps its RAM). On `ferry receive` it is
    /// the designation the destination rebuilds the device with. NVMe only: a virtio-net NIC's
    /// copy is always the vCPU buffer (a receive queue is never idle).
    #[arg(long, default_value = "vcpu-buffer", value_parser = ["vcpu-buffer", "device-buffer"])]
    pub shadow_designation: String,
    /// Shadow engine: how the device's completions are noticed: `poll` (every round) or
    /// `interrupt` (the MSI-X vectors of CQs with interrupts are taken over from KVM; the
    /// device's interrupt wakes the engine, which forwards the completions and then interrupts
    /// the guest).
    #[arg(long, default_value = "poll", value_parser = ["poll", "interrupt"])]
    pub shadow_completions: String,
    /// `nvme-verify`: I/O queue pairs.
    #[arg(long, default_value_t = 2)]
    pub nvme_queues: u32,
    /// `nvme-verify`: commands outstanding per queue.
    #[arg(long, default_value_t = 32)]
    pub nvme_depth: u32,
    /// `nvme-verify`: I/Os to complete (0 = run for --duration; both 0: 10000).
    #[arg(long, default_value_t = 0)]
    pub nvme_ios: u64,
    /// `nvme-verify`: first block of the verified region.
    #[arg(long, default_value_t = 0)]
    pub nvme_lba_start: u64,
    /// `nvme-verify`: blocks in the region (0 = 16 MiB worth).
    #[arg(long, default_value_t = 0)]
    pub nvme_lba_count: u64,
    /// `nvme-verify`: percentage of reads.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub nvme_read_percent: u32,
    /// `nvme-verify`: smallest I/O (a multiple of the block size).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub nvme_io_size: u64,
    /// `nvme-verify`: largest I/O (default: --nvme-io-size; at most 128K).
    #[arg(long, value_parser = parse_size)]
    pub nvme_io_max: Option<u64>,
    /// `nvme-verify`: first read the region and adopt the data a previous run wrote.
    #[arg(long)]
    pub nvme_adopt: bool,
    /// `nvme-verify`: skip the final read-back of the whole region.
    #[arg(long)]
    pub nvme_no_final_verify: bool,
    /// `nvme-verify`: enable MSI-X and create the I/O completion queues with interrupts (the
    /// guest still polls them; the interrupts stay pending in its local APIC).
    #[arg(long)]
    pub nvme_interrupts: bool,
    /// `nvme-verify`: during the random I/O also send an Identify Controller about every
    /// millisecond and check its data (like a guest polling health data).
    #[arg(long)]
    pub nvme_admin_poll: bool,
}

pub use control::passthrough::PassthroughSource;

impl DeviceNvmeArgs {
    /// The device process to start with these arguments: this `ferry` binary's `device nvme`.
    pub fn spec(&self) -> control::passthrough::DeviceSpec {
        control::passthrough::DeviceSpec {
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ferry")),
            backing: self.backing.clone(),
            size: self.size,
            block_size: self.block_size,
            dstrd: self.dstrd,
            create: self.create,
            once: self.once,
            poll: self.poll,
        }
    }
}

impl NvmeCliArgs {
    /// The workload arguments.
    pub fn workload_args(&self) -> NvmeArgs {
        let mut flags = 0;
        if self.nvme_adopt {
            flags |= NVME_ADOPT_EXISTING;
        }
        if self.nvme_no_final_verify {
            flags |= NVME_NO_FINAL_VERIFY;
        }
        if self.nvme_interrupts {
            flags |= NVME_INTERRUPTS;
        }
        if self.nvme_admin_poll {
            flags |= NVME_ADMIN_POLL;
        }
        NvmeArgs {
            queues: self.nvme_queues,
            depth: self.nvme_depth,
            ios: self.nvme_ios,
            lba_start: self.nvme_lba_start,
            lba_count: self.nvme_lba_count,
            read_percent: self.nvme_read_percent,
            flags,
            io_min_bytes: self.nvme_io_size.min(u32::MAX as u64) as u32,
            io_max_bytes: self
                .nvme_io_max
                .unwrap_or(self.nvme_io_size)
                .min(u32::MAX as u64) as u32,
        }
    }

    /// The shadow engine's options.
    pub fn engine_options(&self) -> shadow::EngineOptions {
        shadow::EngineOptions {
            interception: if self.shadow_doorbells == "trap" {
                shadow::engine::Interception::Trap
            } else {
                shadow::engine::Interception::Poll
            },
            completions: if self.shadow_completions == "interrupt" {
                shadow::engine::Completions::Interrupt
            } else {
                shadow::engine::Completions::Poll
            },
            designation: if self.shadow_designation == "device-buffer" {
                shadow::engine::Designation::DeviceBuffer
            } else {
                shadow::engine::Designation::VcpuBuffer
            },
            ..Default::default()
        }
    }

    /// The passthrough device asked for, if any.
    pub fn source(&self) -> anyhow::Result<Option<PassthroughSource>> {
        if let Some(p) = &self.passthrough {
            if crate::virtio_net_args::net_socket(p)?.is_some() {
                return Ok(None);
            }
            let Some(socket) = p.strip_prefix("nvme=") else {
                bail!("--passthrough {p:?}: expected nvme=SOCKET or virtio-net=SOCKET");
            };
            if socket.is_empty() {
                bail!("--passthrough {p:?}: empty socket path");
            }
            return Ok(Some(PassthroughSource::Socket(socket.into())));
        }
        Ok(self.nvme_backing.as_ref().map(|b| {
            PassthroughSource::Spawn(
                DeviceNvmeArgs {
                    socket: PathBuf::new(),
                    backing: b.clone(),
                    size: self.nvme_size,
                    block_size: self.nvme_block_size,
                    dstrd: self.nvme_dstrd,
                    create: true,
                    once: true,
                    poll: false,
                }
                .spec(),
            )
        }))
    }
}

/// `ferry bench nvme`.
#[derive(Args, Debug)]
pub struct BenchNvmeArgs {
    /// Reads per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub ios: u64,
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 32])]
    pub qd: Vec<u16>,
    /// Namespace size (the reads cover all of it).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Polling modes of the device to measure: `adaptive` (the default of `ferry device
    /// nvme`) and/or `spin` (`--poll`).
    #[arg(long, value_delimiter = ',', default_values_t = ["adaptive".to_string(), "spin".to_string()],
          value_parser = ["adaptive", "spin"])]
    pub device: Vec<String>,
    /// Measurements per device mode and queue depth: pairs of runs, host and guest side by
    /// side (the order alternating), reported as medians with the spread of the ratios.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub runs: u32,
    /// Measure one side only (for profiling it): `guest` or `host`.
    #[arg(long, value_parser = ["guest", "host"])]
    pub only: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
