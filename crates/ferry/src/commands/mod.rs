//! One module per subcommand; the benchmarks (`bench/`) and the demo (`demo/`) in their own
//! module trees, apart from the commands that run VMs.
pub mod bench;
pub mod demo;
pub mod device;
pub mod migrate;
pub mod rdma;
pub mod receive;
pub mod remote;
pub mod run;
pub mod vrdma;

use std::sync::Arc;

use anyhow::{bail, Context};
use guest_abi::{params::NVME_WITH_DIRTY, WorkloadArgs};

use crate::cli::{GuestArgs, WorkloadName};

/// The guest image and workload arguments from the command line.
pub fn guest_from_args(g: &GuestArgs) -> anyhow::Result<(Arc<Vec<u8>>, WorkloadArgs)> {
    let image = match &g.guest {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading guest image {}", path.display()))?,
        None => guest_image::GUEST_ELF.to_vec(),
    };
    let mut nvme = g.nvme.workload_args();
    let mut working_set = g.working_set;
    if let Some(ws) = g.with_dirty {
        if g.workload != WorkloadName::NvmeVerify {
            bail!(
                "--with-dirty runs `dirty` next to `nvme-verify`: it needs --workload nvme-verify"
            );
        }
        if ws < 4096 {
            bail!("--with-dirty {ws}: the working set needs at least one page (4K)");
        }
        nvme.flags |= NVME_WITH_DIRTY;
        working_set = ws;
    }
    let args = WorkloadArgs {
        working_set_bytes: working_set,
        rate_pages_per_sec: g.rate,
        duration_ms: g.duration.as_millis() as u64,
        report_interval_ms: g.report_interval.as_millis() as u64,
        seed: g.seed,
        iterations: g.iterations,
        nvme,
        rdma: g.rdma.workload_args(g.workload.into()),
        net: g.net.workload_args(),
    };
    Ok((Arc::new(image), args))
}
