//! The `ferry` command.
use std::time::Instant;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod api;
mod cli;
mod commands;
mod nvme_args;
mod session;
// The VMM library's modules under the names the commands use.
use control::{passthrough as nvme_session, signals, vrdma_host};
mod units;
mod virtio_net_args;

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let process_start = Instant::now();
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    if let Some(mode) = cli.seccomp {
        sandbox::set_mode(mode);
        // Still one thread: the processes ferry starts (device, destination) follow it.
        std::env::set_var(sandbox::MODE_ENV, mode.as_str());
    }
    if matches!(cli.command, cli::Command::Run(_) | cli::Command::Receive(_)) {
        sandbox::set_single_vm_process();
    }
    let result = match cli.command {
        cli::Command::Run(args) => commands::run::run(args, process_start),
        cli::Command::Demo(args) => commands::demo::run(args, process_start),
        cli::Command::Receive(args) => commands::receive::run(args, process_start),
        cli::Command::Migrate(args) => commands::migrate::run(args),
        cli::Command::Resume(args) => commands::migrate::resume(args),
        cli::Command::Remote(args) => commands::remote::run(args),
        cli::Command::Bench(cli::BenchCommand::Boot(args)) => commands::bench::boot(args),
        cli::Command::Bench(cli::BenchCommand::Migrate(args)) => {
            commands::bench::migrate::run(args)
        }
        cli::Command::Bench(cli::BenchCommand::Nvme(args)) => commands::bench::nvme::run(args),
        cli::Command::Bench(cli::BenchCommand::Shadow(args)) => {
            commands::bench::shadow_cost::run(args)
        }
        cli::Command::Bench(cli::BenchCommand::MigrateFaults(args)) => {
            commands::bench::faults::run(args)
        }
        cli::Command::Device(nvme_args::DeviceCommand::Nvme(args)) => commands::device::nvme(args),
        cli::Command::Device(nvme_args::DeviceCommand::VirtioNet(args)) => {
            commands::device::virtio_net(args)
        }
        cli::Command::Bench(cli::BenchCommand::Rdma(args)) => {
            commands::bench::rdma_port::rdma(args)
        }
        cli::Command::Rdma(cmd) => commands::rdma::run(cmd),
        cli::Command::Vrdma(args) => commands::vrdma::run(args, process_start),
        cli::Command::Bench(cli::BenchCommand::Vrdma(args)) => commands::bench::rdma_vms::run(args),
        cli::Command::Bench(cli::BenchCommand::Platform(args)) => {
            commands::bench::platform::run(args)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: error: {}", vmm::ErrorChain(e.as_ref()));
            std::process::exit(1);
        }
    }
}
