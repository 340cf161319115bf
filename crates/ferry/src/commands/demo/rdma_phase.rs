//! The RDMA phase of `ferry demo`: two host processes (`ferry vrdma` on two loopback
//! addresses, each with its own software RoCEv2 port and CM multiplexer) with one VM each; the
//! client VM connects to the server VM through both multiplexers (REQ → REP → RTU, SIDR),
//! exchanges verified UD messages and disconnects (DREQ → DREP).
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use serde::Serialize;

/// The phase's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct VrdmaDemo {
    /// Both hosts' VMs ended as expected.
    pub pass: bool,
    /// Each host's report (`ferry vrdma --json`).
    pub hosts: Vec<serde_json::Value>,
}

fn spawn(args: &[String]) -> anyhow::Result<std::process::Child> {
    Command::new(std::env::current_exe().context("locating the ferry binary")?)
        .arg("vrdma")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a ferry vrdma host process")
}

pub fn run() -> anyhow::Result<VrdmaDemo> {
    let b = 232;
    let ip = |c: u8, d: u8| format!("127.{b}.{c}.{d}");
    let server = spawn(&[
        "--addr".into(),
        ip(0, 1),
        "--vm".into(),
        format!("rdma-server,gid={},sessions=1", ip(1, 1)),
        "--serial".into(),
        "off".into(),
        "--timeout".into(),
        "90s".into(),
        "--json".into(),
    ])?;
    std::thread::sleep(Duration::from_millis(700));
    let client = spawn(&[
        "--addr".into(),
        ip(0, 2),
        "--vm".into(),
        format!(
            "rdma-client,gid={},peer={},messages=1000,size=256",
            ip(2, 1),
            ip(1, 1)
        ),
        "--serial".into(),
        "off".into(),
        "--timeout".into(),
        "90s".into(),
        "--json".into(),
    ])?;
    let mut hosts = Vec::new();
    let mut pass = true;
    for child in [client, server] {
        let out = child
            .wait_with_output()
            .context("waiting for a host process")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null);
        pass &= out.status.success() && v["pass"] == true;
        hosts.push(v);
    }
    hosts.reverse();
    Ok(VrdmaDemo { pass, hosts })
}

pub fn print(d: &VrdmaDemo) {
    println!(
        "  rdma          two hosts (RoCEv2 port + CM multiplexer each), a VM on each: {}",
        if d.pass { "ok" } else { "FAILED" }
    );
    for h in &d.hosts {
        let Ok(r) = serde_json::from_value::<VrdmaRunReportView>(h.clone()) else {
            println!("                a host process gave no report");
            continue;
        };
        let m = &r.host.mux;
        println!(
            "                host {}: QP1 MADs in {}, routed to its VM {}, no owner {}; sent from its VM {}, refused {}",
            r.host.addr, m.inbound, m.delivered + m.queued, m.no_owner, m.sent, m.refused_spoofed
        );
        for v in r.vms {
            println!(
                "                  {} {}: {} {:?}; {}",
                v.workload,
                v.gid,
                v.outcome,
                v.status,
                v.result.unwrap_or_default()
            );
        }
    }
}

// A read-only view of `super::vrdma::VrdmaRunReport` for printing what a child process sent.
#[derive(serde::Deserialize)]
struct VrdmaRunReportView {
    vms: Vec<VmView>,
    host: HostView,
}
#[derive(serde::Deserialize)]
struct VmView {
    workload: String,
    gid: String,
    outcome: String,
    status: Option<u32>,
    result: Option<String>,
}
#[derive(serde::Deserialize)]
struct HostView {
    addr: String,
    mux: MuxView,
}
#[derive(serde::Deserialize)]
struct MuxView {
    inbound: u64,
    delivered: u64,
    queued: u64,
    no_owner: u64,
    sent: u64,
    refused_spoofed: u64,
}
