//! The `ferry` command.
use std::time::Instant;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod api;
mod cli;
mod commands;
mod nvme_args;
mod nvme_session;
mod session;
mod signals;
mod units;
mod vrdma_host;

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
    let result = match cli.command {
        cli::Command::Run(args) => commands::run::run(args, process_start),
        cli::Command::Demo(args) => commands::demo::run(args, process_start),
        cli::Command::Receive(args) => commands::receive::run(args, process_start),
        cli::Command::Migrate(args) => commands::migrate::run(args),
        cli::Command::Bench(cli::BenchCommand::Boot(args)) => commands::bench::boot(args),
        cli::Command::Bench(cli::BenchCommand::Migrate(args)) => commands::bench_migrate::run(args),
        cli::Command::Bench(cli::BenchCommand::Nvme(args)) => commands::bench_nvme::run(args),
        cli::Command::Bench(cli::BenchCommand::Shadow(args)) => commands::bench_shadow::run(args),
        cli::Command::Bench(cli::BenchCommand::MigrateFaults(args)) => {
            commands::bench_faults::run(args)
        }
        cli::Command::Device(nvme_args::DeviceCommand::Nvme(args)) => commands::device::nvme(args),
        cli::Command::Bench(cli::BenchCommand::Rdma(args)) => commands::bench_rdma::rdma(args),
        cli::Command::Rdma(cmd) => commands::rdma::run(cmd),
        cli::Command::Vrdma(args) => commands::vrdma::run(args, process_start),
        cli::Command::Bench(cli::BenchCommand::Vrdma(args)) => commands::bench_vrdma::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(1);
        }
    }
}
