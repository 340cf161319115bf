//! `ferry bench migrate`: live migration over loopback of guests of several sizes under
//! several dirtying loads, each figure against raw loopback TCP bandwidth measured in the same
//! run.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use guest_abi::{layout::WORK_BASE, Workload, WorkloadArgs};
use migration::{DestinationOptions, LimitPolicy, NoDevices, SourceOptions};
use serde::Serialize;
use vmm::{devices::serial::ConsoleSink, Vm, VmConfig, VmOutcome};

use crate::cli::BenchMigrateArgs;

#[derive(Serialize)]
struct Row {
    ram_mib: u64,
    load: String,
    /// "plain" or "tls".
    transport: String,
    working_set_mib: u64,
    total_ms: f64,
    downtime_ms: f64,
    rounds: usize,
    hit_round_limit: bool,
    sent_mib: f64,
    bandwidth_mbps: f64,
    bandwidth_vs_raw_tcp: f64,
    /// For TLS rows: this row's bandwidth over the plain row's of the same size and load.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_vs_plain_bandwidth: Option<f64>,
    ledger_ok_on_destination: bool,
}

/// An ephemeral CA and one node certificate (both usages) for loopback TLS migrations.
struct BenchPki {
    dir: std::path::PathBuf,
    files: migration::TlsFiles,
}

impl BenchPki {
    fn new() -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = std::env::temp_dir().join(format!("ferry-bench-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca_key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "ferry bench CA");
        let ca = p.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        let write = |name: &str, pem: String| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let files = migration::TlsFiles {
            cert: write("node.crt", cert.pem())?,
            key: write("node.key", key.serialize_pem())?,
            ca: write("ca.crt", ca.pem())?,
        };
        Ok(BenchPki { dir, files })
    }
}

impl Drop for BenchPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Serialize)]
struct Bench {
    raw_tcp_mbps: f64,
    downtime_target_ms: u64,
    max_rounds: u32,
    rows: Vec<Row>,
}

/// Raw loopback TCP bandwidth: 2 GiB in 1 MiB writes over one connection, MB/s.
fn raw_tcp_mbps() -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    const TOTAL: usize = 2 << 30;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k,
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..TOTAL / chunk.len() {
        s.write_all(&chunk)?;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    if got != TOTAL {
        bail!("raw TCP: sent {TOTAL} bytes, received {got}");
    }
    Ok(TOTAL as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn rate(load: &str) -> anyhow::Result<u64> {
    Ok(match load {
        "idle" => 1,
        "moderate" => 50_000,
        "heavy" => 0,
        other => bail!("unknown load {other:?} (idle, moderate, heavy)"),
    })
}

/// Fills the RAM the workload does not use with non-zero data, as a guest's page cache would,
/// so that round 0 has real work.
fn fill_unused(vm: &Vm, working_set: u64) -> anyhow::Result<()> {
    let used = WORK_BASE + working_set + working_set / 512 + (4 << 20);
    let start = used.next_multiple_of(2 << 20);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    for r in vm.ram().regions() {
        let mut gpa = r.gpa.max(start);
        while gpa + 4096 <= r.gpa + r.size {
            vm.ram().write(gpa, &page)?;
            gpa += 4096;
        }
    }
    vm.ram().track_vmm_writes(false);
    Ok(())
}

fn one(
    ram: u64,
    load: &str,
    security: &migration::Security,
    args: &BenchMigrateArgs,
    raw: f64,
) -> anyhow::Result<Row> {
    let working_set = (ram / 4).min(1 << 30);
    let config = VmConfig {
        ram_size: ram,
        console: ConsoleSink::Null,
        ..Default::default()
    };
    let mut vm = Vm::new(&config)?;
    let wargs = WorkloadArgs {
        working_set_bytes: working_set,
        rate_pages_per_sec: rate(load)?,
        duration_ms: 0,
        seed: 7,
        ..Default::default()
    };
    vm.boot(guest_image::GUEST_ELF, Workload::Dirty, wargs)?;
    fill_unused(&vm, working_set)?;
    vm.start()?;
    std::thread::sleep(Duration::from_millis(500));

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let dest_config = config.clone();
    let dest_opts = DestinationOptions {
        security: security.clone(),
        ..Default::default()
    };
    let dest = std::thread::spawn(move || -> anyhow::Result<Vm> {
        let (stream, _) = listener.accept()?;
        let inc = migration::receive(stream, &dest_config, &dest_opts, &mut NoDevices)
            .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?;
        Ok(inc.vm)
    });
    let opts = SourceOptions {
        security: security.clone(),
        downtime: Duration::from_millis(args.downtime_ms),
        max_rounds: args.max_rounds,
        on_limit: LimitPolicy::Finish,
        ..Default::default()
    };
    let report = migration::migrate(&vm, &mut [], &addr, &opts, &mut |_| {})
        .map_err(|e| anyhow::anyhow!(migration::chain(&e)))
        .with_context(|| format!("migrating {} MiB / {load}", ram >> 20))?;
    let dvm = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))??;
    drop(vm);
    // the guest must be intact on the destination
    let req = dvm.mailbox().request_verify()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        if let Some(r) = dvm.mailbox().verify_result(req)? {
            break r.status == 0;
        }
        if Instant::now() > deadline
            || matches!(dvm.wait(Some(Duration::ZERO)), Some(VmOutcome::Crashed(_)))
        {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    dvm.stop("bench over")?;
    Ok(Row {
        ram_mib: ram >> 20,
        load: load.to_string(),
        transport: if security.is_tls() { "tls" } else { "plain" }.into(),
        tls_vs_plain_bandwidth: None,
        working_set_mib: working_set >> 20,
        total_ms: report.total_ms,
        downtime_ms: report.downtime_ms,
        rounds: report.rounds.len(),
        hit_round_limit: report.hit_round_limit,
        sent_mib: report.bytes as f64 / (1 << 20) as f64,
        bandwidth_mbps: report.bandwidth_mbps,
        bandwidth_vs_raw_tcp: report.bandwidth_mbps / raw,
        ledger_ok_on_destination: ok,
    })
}

pub fn run(args: BenchMigrateArgs) -> anyhow::Result<i32> {
    for &s in &args.sizes {
        vmm::memory::validate_ram_size(s)?;
    }
    for l in &args.loads {
        rate(l)?;
    }
    let mut transports = Vec::new();
    let _pki = if args.transports.iter().any(|t| t == "tls") {
        Some(BenchPki::new().context("making the bench's TLS certificates")?)
    } else {
        None
    };
    for t in &args.transports {
        transports.push(match (t.as_str(), &_pki) {
            ("plain", _) => migration::Security::Plain,
            ("tls", Some(pki)) => migration::Security::from_files(Some(&pki.files))
                .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?,
            (other, _) => bail!("unknown transport {other:?} (plain, tls)"),
        });
    }
    let raw = raw_tcp_mbps()?;
    if !args.json {
        println!("ferry bench migrate: raw loopback TCP {raw:.0} MB/s (one stream, same run)");
        println!(
            "  {:>6} {:>9} {:>5} {:>6} {:>9} {:>9} {:>6} {:>8} {:>7} {:>8} {:>9}  ledger",
            "RAM",
            "load",
            "via",
            "WS",
            "total ms",
            "down ms",
            "rounds",
            "sent MiB",
            "MB/s",
            "vs raw",
            "vs plain"
        );
    }
    let mut rows = Vec::new();
    for &ram in &args.sizes {
        for load in &args.loads {
            let mut plain_mbps = None;
            for security in &transports {
                let mut row = one(ram, load, security, &args, raw)?;
                if security.is_tls() {
                    row.tls_vs_plain_bandwidth = plain_mbps.map(|p: f64| row.bandwidth_mbps / p);
                } else {
                    plain_mbps = Some(row.bandwidth_mbps);
                }
                if !args.json {
                    println!(
                    "  {:>5}M {:>9} {:>5} {:>5}M {:>9.0} {:>9.1} {:>5}{} {:>8.0} {:>7.0} {:>8.3} {:>9}  {}",
                    row.ram_mib,
                    row.load,
                    row.transport,
                    row.working_set_mib,
                    row.total_ms,
                    row.downtime_ms,
                    row.rounds,
                    if row.hit_round_limit { "!" } else { " " },
                    row.sent_mib,
                    row.bandwidth_mbps,
                    row.bandwidth_vs_raw_tcp,
                    row.tls_vs_plain_bandwidth
                        .map_or_else(|| "-".to_string(), |r| format!("{r:.3}")),
                    if row.ledger_ok_on_destination {
                        "ok"
                    } else {
                        "FAILED"
                    }
                );
                }
                rows.push(row);
            }
        }
    }
    let all_ok = rows.iter().all(|r| r.ledger_ok_on_destination);
    if args.json {
        let b = Bench {
            raw_tcp_mbps: raw,
            downtime_target_ms: args.downtime_ms,
            max_rounds: args.max_rounds,
            rows,
        };
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        println!("  (! = round limit reached, switched over anyway; downtime = pause -> destination resumed)");
    }
    Ok(if all_ok { 0 } else { 1 })
}
