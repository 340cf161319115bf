//! The passthrough NVMe phase of `ferry demo`: a VM with a passthrough NVMe device (a
//! `ferry device nvme` process on a temporary backing file, attached over vfio-user) runs
//! `nvme-verify` with four queues of depth 32 (4 KiB random reads and writes) and, in the same
//! loop, `dirty` over a 16 MiB working set, and is live-migrated, I/O in flight, to a second
//! Ferry process on loopback with its own device process on the same backing file (shared
//! storage). The vCPU's ledger writes reach the destination through KVM's dirty log; the pages
//! the device wrote, which that log cannot see, through the shadow engine. The ledger is
//! verified on request before the migration and on the destination; the guest keeps verifying
//! its I/O there, reads its whole region back and verifies its ledger once more before it exits.
use std::{path::PathBuf, sync::Arc, time::Duration};

use guest_abi::{
    params::{NvmeArgs, NVME_WITH_DIRTY},
    Workload, WorkloadArgs,
};
use migration::MigrationReport;
use serde::Serialize;
use vmm::devices::serial::ConsoleSink;

use super::{
    finish_destination, join_migration, migrate_later, ok, print_memory_check, start_destination,
    Before, Finish, WORKLOAD_BOUND,
};
use crate::{
    nvme_args::{DeviceNvmeArgs, PassthroughSource},
    session::{self, BootSpec, SessionReport, SessionSpec, Verification},
    signals::SignalState,
};

/// How long the workload runs (its migration comes after 1.5 s) before the demo tells it to
/// finish, once it verified its ledger on the destination.
const NVME_RUN: Duration = Duration::from_secs(4);

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

/// The ledger verifications in a destination's JSON summary.
fn verifications(summary: &serde_json::Value) -> Vec<Verification> {
    serde_json::from_value(summary["verifications"].clone()).unwrap_or_default()
}

/// Working set of the `dirty` part.
const DIRTY_WORKING_SET: u64 = 16 << 20;
/// Page writes per second of the `dirty` part.
const DIRTY_RATE: u64 = 50_000;

impl NvmeMigration {
    /// Migrated, identical memory, the ledger verified on request before the migration and
    /// on the destination, and the guest's final verifications (every I/O, the ledger) passed
    /// there with the queues running direct again.
    pub fn pass(&self) -> bool {
        let Some(m) = &self.migration else {
            return false;
        };
        let Some(d) = &self.destination else {
            return false;
        };
        let dest = verifications(d);
        self.source.outcome == "migrated"
            && self.source.verifications.iter().all(|v| v.status == 0)
            && m.memory_hash.is_some()
            && m.memory_hash.as_deref() == d["incoming"]["memory_hash"].as_str()
            && d["outcome"] == "exit"
            && d["status"] == 0
            && !dest.is_empty()
            && dest.iter().all(|v| v.status == 0)
            && d["shadow"]["shadowed"] == false
    }
}

pub fn run(
    console: &ConsoleSink,
    prefix: &str,
    echo: bool,
    signals: &SignalState,
) -> anyhow::Result<NvmeMigration> {
    let dir = control::scratch::fresh_dir("ferry-demo-nvme")?;
    let disk = dir.join("disk.img");
    let boot = BootSpec {
        image: Arc::new(guest_image::GUEST_ELF.to_vec()),
        workload: Workload::NvmeVerify,
        args: WorkloadArgs {
            working_set_bytes: DIRTY_WORKING_SET,
            rate_pages_per_sec: DIRTY_RATE,
            duration_ms: (NVME_RUN + WORKLOAD_BOUND).as_millis() as u64,
            report_interval_ms: 1000,
            seed: 0x5eed,
            nvme: NvmeArgs {
                queues: 4,
                depth: 32,
                ios: 0,
                lba_start: 0,
                lba_count: 0,
                read_percent: 70,
                flags: NVME_WITH_DIRTY,
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
        verify_after: Some(Duration::from_millis(1000)),
        api_socket: Some(api_path.clone()),
        passthrough: Some(PassthroughSource::Spawn(
            DeviceNvmeArgs {
                socket: Default::default(),
                backing: disk.clone(),
                size: 64 << 20,
                block_size: 512,
                dstrd: 9,
                create: true,
                once: true,
                poll: false,
            }
            .spec(),
        )),
        ..Default::default()
    };
    let to = dest.addr.clone();
    let migrator = std::thread::spawn(move || {
        let before = Before {
            verifications: 1,
            roundtrip: false,
        };
        migrate_later(api_path, to, Duration::from_millis(1500), before)
    });
    let started = std::time::Instant::now();
    let source = session::run(&boot, &spec, started, signals);
    let migration = join_migration(migrator, "NVMe migration")?;
    let finish = Finish {
        at: started + NVME_RUN,
        verifications: 1,
    };
    let destination = finish_destination(dest, migration.is_some(), Some(finish));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(NvmeMigration {
        source: source?,
        migration,
        destination,
    })
}

pub fn print(r: &NvmeMigration) {
    match &r.migration {
        Some(m) => {
            let device: u64 = m.rounds.iter().map(|x| x.dirty_device).sum();
            let kvm: u64 = m.rounds.iter().map(|x| x.dirty_kvm).sum();
            println!(
                "  nvme          VM with a passthrough NVMe (4 queues x QD 32, 4 KiB random I/O) and `dirty` ({} MiB, {} pages/s) migrated in {:.0} ms, downtime {:.1} ms (+{:.0} ms hashing RAM for the check)",
                DIRTY_WORKING_SET >> 20,
                DIRTY_RATE,
                m.total_ms,
                m.downtime_ms,
                m.debug_hash_ms
            );
            // Each round's figure is the set of pages the device wrote since the previous
            // round (docs/shadow-engine.md: read buffers, the ring pages at the switchover).
            let per_round: Vec<String> = m
                .rounds
                .iter()
                .map(|x| x.dirty_device.to_string())
                .collect();
            println!(
                "  device dirty  {device} page(s) written by the device, invisible to KVM's dirty log (reported by the shadow engine; distinct pages per round: {})",
                per_round.join(" + ")
            );
            println!(
                "  kvm dirty     {kvm} page(s) written by the vCPU (ledger, queues, buffers), from KVM's dirty log"
            );
            print_memory_check("nvme memory  ", m, r.destination.as_ref());
        }
        None => println!("  nvme          migration FAILED"),
    }
    let ledger = |v: &[Verification]| match v {
        [] => "FAILED (no answer)".to_string(),
        v => format!(
            "{} ({} time(s), last {} pages, {} writes)",
            ok(v.iter().all(|x| x.status == 0)),
            v.len(),
            v[v.len() - 1].pages,
            v[v.len() - 1].writes
        ),
    };
    println!(
        "  nvme ledger   verified on request on the source: {}",
        ledger(&r.source.verifications)
    );
    match &r.destination {
        Some(d) => {
            let v = verifications(d);
            println!(
                "  nvme dest     device rebuilt, queues re-aligned and direct again: {}; ledger verified on request there: {}",
                ok(d["shadow"]["shadowed"] == false && d["shadow"]["left"] == 1),
                ledger(&v)
            );
            println!(
                "  nvme final    guest verified every I/O and its ledger on the destination: {} ({})",
                ok(d["status"] == 0),
                d["detail"].as_str().unwrap_or("?")
            );
        }
        None => println!("  nvme dest     FAILED (no report)"),
    }
}
