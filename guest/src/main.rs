//! Ferry's built-in guest.
//!
//! A freestanding program that runs in 64-bit ring 3 with IOPL 3 under Ferry's VMM. The VMM
//! loads it at `guest_abi::layout::IMAGE_BASE`, builds identity page tables, writes the boot
//! parameter block and jumps to `_start` with the stack at `STACK_TOP`. The workload to run is
//! chosen by the parameter block.
#![no_std]
#![no_main]

mod clock;
mod console;
mod io;
mod mem;
mod net;
mod nvme;
mod params;
mod pci;
mod pvrdma;
mod rt;
mod workloads;

use guest_abi::{params::status, Workload};

/// Called by `_start` (see `rt.rs`).
extern "C" fn guest_main() -> ! {
    let p = params::boot();
    if p.magic != guest_abi::params::MAGIC || p.version != guest_abi::params::VERSION {
        println!(
            "ferry-guest: bad boot parameters (magic {:#x}, version {})",
            p.magic, p.version
        );
        rt::exit(status::BAD_PARAMS);
    }
    clock::init(p.tsc_khz);
    let code = match Workload::from_u32(p.workload) {
        Some(Workload::Hello) => workloads::hello::run(&p),
        Some(Workload::Dirty) => workloads::dirty::run(&p),
        Some(Workload::Spin) => workloads::spin::run(&p),
        Some(Workload::Probe) => workloads::probe::run(),
        Some(Workload::Crash) => workloads::crash::run(),
        Some(Workload::NvmeVerify) => workloads::nvme_verify::run(&p),
        Some(Workload::NvmeMalformed) => workloads::nvme_malformed::run(&p),
        Some(Workload::RdmaServer) => workloads::rdma::server(&p),
        Some(Workload::RdmaClient) => workloads::rdma::client(&p),
        Some(Workload::RdmaHostile) => workloads::rdma_hostile::run(&p),
        Some(Workload::NetEcho) => workloads::net_echo::run(&p),
        Some(Workload::NetStream) => workloads::net_stream::run(&p),
        Some(Workload::NetHostile) => workloads::net_hostile::run(&p),
        None => {
            println!("ferry-guest: unknown workload {}", p.workload);
            status::BAD_PARAMS
        }
    };
    rt::exit(code)
}
