//! The passthrough NVMe phase of `ferry demo`: a VM with a passthrough NVMe device (a
//! `ferry device nvme` process on a temporary backing file, attached over vfio-user) runs
//! `nvme-verify` with four queues of depth 32 (4 KiB random reads and writes) and is
//! live-migrated, I/O in flight, to a second Ferry process on loopback with its own device
//! process on the same backing file (shared storage). The shadow engine reports the pages the
//! device wrote, which KVM's dirty log cannot see; the guest keeps verifying on the
//! destination and reads its whole region back there before it exits.
use std::{path::PathBuf, sync::Arc, time::Duration};

use guest_abi::{params::NvmeArgs, Workload, WorkloadArgs};
use migration::MigrationReport;
use serde::Serialize;
use vmm::devices::serial::ConsoleSink;

use super::demo::{finish_destination, migrate_later, start_destination};
use crate::{
    nvme_args::{DeviceNvmeArgs, PassthroughSource},
    session::{self, BootSpec, SessionReport, SessionSpec},
    signals::SignalState,
};

/// How the NVMe migration went.
#[derive(Serialize)]
pub struct NvmeMigration {
    /// The source session.
    pub source: SessionReport,
    /// The migration report (downtime, rounds, device-dirtied pages).
    pub migration: Option<MigrationReport>,
    /// The destination's JSON summary.
    pub destination: Option<serde_json::Value>,
}

impl NvmeMigration {
    /// Migrated, identical memory, and the guest's verification passed on the destination
    /// with the queues running direct again.
    pub fn pass(&self) -> bool {
        let Some(m) = &self.migration else {
            return false;
        };
        let Some(d) = &self.destination else {
            return false;
        };
        self.source.outcome == "migrated"
            && m.memory_hash.is_some()
            && m.memory_hash.as_deref() == d["incoming"]["memory_hash"].as_str()
            && d["outcome"] == "exit"
            && d["status"] == 0
            && d["shadow"]["shadowed"] == false
    }
}

pub fn run(
    console: &ConsoleSink,
    prefix: &str,
    echo: bool,
    signals: &SignalState,
) -> anyhow::Result<NvmeMigration> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NvmeVerify,
        args: WorkloadArgs {
            duration_ms: 4000,
            report_interval_ms: 1000,
            seed: 0x5eed,
            nvme: NvmeArgs {
                queues: 4,
                depth: 32,
                ios: 0,
                lba_start: 0,
                lba_count: 0,
                read_percent: 70,
                flags: 0,
                io_min_bytes: 4096,
                io_max_bytes: 4096,
            },
            ..Default::default()
        },
    };
    let dest = start_destination(
        echo,
        Duration::ZERO,
        &["--nvme-backing".as_ref(), disk.as_os_str()],
    )?;
    let api_path: PathBuf = dir.join("api.sock");
    let spec = SessionSpec {
        memory: 256 << 20,
        console: console.clone(),
        console_prefix: prefix.to_string(),
        timeout: Some(Duration::from_secs(120)),
        api_socket: Some(api_path.clone()),
        passthrough: Some(PassthroughSource::Spawn(DeviceNvmeArgs {
            socket: Default::default(),
            backing: disk.clone(),
            size: 64 << 20,
            block_size: 512,
            dstrd: 9,
            create: true,
            once: true,
        })),
        ..Default::default()
    };
    let to = dest.addr.clone();
    let migrator =
        std::thread::spawn(move || migrate_later(api_path, to, Duration::from_millis(1500)));
    let source = session::run(&boot, &spec, std::time::Instant::now(), signals);
    let migration = migrator
        .join()
        .map_err(|_| anyhow::anyhow!("migration thread panicked"))?;
    let migration = match migration {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("ferry demo: NVMe migration failed: {e:#}");
            None
        }
    };
    let destination = finish_destination(dest, migration.is_some());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(NvmeMigration {
        source: source?,
        migration,
        destination,
    })
}

pub fn print(r: &NvmeMigration) {
    let ok = |b: bool| if b { "ok" } else { "FAILED" };
    match &r.migration {
        Some(m) => {
            let device: u64 = m.rounds.iter().map(|x| x.dirty_device).sum();
            let kvm: u64 = m.rounds.iter().map(|x| x.dirty_kvm).sum();
            println!(
                "  nvme          VM with a passthrough NVMe (4 queues x QD 32, 4 KiB random I/O) migrated in {:.0} ms, downtime {:.1} ms",
                m.total_ms, m.downtime_ms
            );
            println!(
                "  device dirty  {device} page(s) written by the device, invisible to KVM's dirty log ({kvm} seen by KVM)"
            );
            let dest_hash = r
                .destination
                .as_ref()
                .and_then(|d| d["incoming"]["memory_hash"].as_str().map(str::to_string));
            println!(
                "  nvme memory   hash at pause {} / at resume {} -> {}",
                m.memory_hash.as_deref().unwrap_or("-"),
                dest_hash.as_deref().unwrap_or("-"),
                ok(m.memory_hash.is_some() && m.memory_hash == dest_hash)
            );
        }
        None => println!("  nvme          migration FAILED"),
    }
    match &r.destination {
        Some(d) => println!(
            "  nvme dest     device rebuilt, queues re-aligned and direct again: {}; guest verified every I/O: {} ({})",
            ok(d["shadow"]["shadowed"] == false && d["shadow"]["left"] == 1),
            ok(d["status"] == 0),
            d["detail"].as_str().unwrap_or("?")
        ),
        None => println!("  nvme dest     FAILED (no report)"),
    }
}
