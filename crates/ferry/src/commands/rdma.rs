//! `ferry rdma host` and `ferry rdma peer`.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use rdma::addr::parse_gid;
use rdma::cm::CmConfig;
use rdma::host::{Host, HostConfig, DEFAULT_SERVICE_PORT};
use rdma::peer::Peer;
use rdma::port::PortConfig;
use serde::Serialize;

use crate::units::parse_duration;
use control::signals::SignalState;

/// `ferry rdma ...`.
#[derive(Subcommand, Debug)]
pub enum RdmaCommand {
    /// Host daemon: a software RoCEv2 port, the CM multiplexer, N simulated VMs with CM agents.
    Host(HostArgs),
    /// Bare-metal peer: connect to a VM's GID like rping (rc) or udaddy (ud).
    Peer(PeerArgs),
}

/// Options shared by host and peer.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Host address to bind (UDP port 4791). VM GIDs are further addresses of this host
    /// (each bound on UDP 4791 too); IP routing says where every other GID lives.
    #[arg(long)]
    pub addr: Ipv4Addr,
    /// Write every packet to this pcap file (Ethernet/IPv4/UDP/RoCEv2).
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// CM response timeout exponent (4.096 µs × 2^N; Linux: 20).
    #[arg(long, default_value_t = rdma::cm::timers::LINUX_RESPONSE_TIMEOUT)]
    pub cm_timeout: u8,
    /// CM retries (≤ 15).
    #[arg(long, default_value_t = rdma::cm::timers::LINUX_MAX_RETRIES)]
    pub cm_retries: u8,
    /// rdma_cm port (RC service in the TCP port space, UD service in the UDP port space).
    #[arg(long, default_value_t = DEFAULT_SERVICE_PORT)]
    pub listen_service: u16,
    /// Print a JSON report as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    fn port(&self) -> PortConfig {
        let mut p = PortConfig::new(self.addr);
        p.pcap = self.pcap.clone();
        p
    }

    fn cm(&self) -> CmConfig {
        CmConfig {
            response_timeout: self.cm_timeout.min(31),
            max_retries: self.cm_retries.min(15),
            timewait: rdma::cm::cm_timeout(self.cm_timeout.min(31)),
            ..CmConfig::default()
        }
    }
}

/// `ferry rdma host`.
#[derive(Args, Debug)]
pub struct HostArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Simulated VMs.
    #[arg(long, default_value_t = 3)]
    pub vms: usize,
    /// GID of the first VM (default: the host address with the third byte + 1, last byte 1).
    #[arg(long)]
    pub gid_base: Option<Ipv4Addr>,
    /// Stop after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Once up, every VM connects to this GID (RC handshake, then disconnect); repeatable.
    /// A VM skips its own GID.
    #[arg(long = "connect", value_name = "GID")]
    pub connect: Vec<String>,
}

#[derive(Serialize)]
struct HostOutput {
    #[serde(flatten)]
    report: rdma::host::HostReport,
    connects_ok: usize,
    connects_failed: Vec<String>,
}

/// Peer mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// REQ/REP/RTU, then rdma-core's rping protocol as its client: per ping the VM RDMA
    /// READs our start buffer and RDMA WRITEs it into our second buffer; we compare; DREQ/DREP.
    Rc,
    /// REQ/REP/RTU, then RC SENDs echoed by the VM and verified (ucmatose-like); DREQ/DREP.
    RcSend,
    /// REQ/REP/RTU then DREQ/DREP only (`--messages` rounds).
    RcConnect,
    /// SIDR_REQ/SIDR_REP then UD messages, each echoed and verified (udaddy-like).
    Ud,
    /// Linux rping's protocol (rping_rdma_info SENDs, RDMA READ/WRITE ping-pong, verified):
    /// the client to `rping -s`, or with `--listen` the server for `rping -c`.
    Rping,
    /// Linux ucmatose's protocol (SENDs one way, then back, verified; use
    /// `--listen-service 7471 --size 100` for ucmatose's defaults): the client to `ucmatose`,
    /// or with `--listen` the server for `ucmatose -s`.
    Ucmatose,
}

/// `ferry rdma peer`.
#[derive(Args, Debug)]
pub struct PeerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// GID (IPv4 or IPv6 text) of the VM to connect to.
    #[arg(long, required_unless_present = "listen")]
    pub connect: Option<String>,
    /// Serve one connection to `--listen-service` instead (modes rping and ucmatose); prints
    /// a line starting with "listening" once it does.
    #[arg(long, conflicts_with = "connect")]
    pub listen: bool,
    /// rc, rc-send, rc-connect or ud.
    #[arg(long, value_enum, default_value = "rc")]
    pub mode: PeerMode,
    /// Messages (rc, rc-send, ud); connect/disconnect rounds (rc-connect).
    #[arg(long, default_value_t = 10)]
    pub messages: u64,
    /// Message size in bytes (UD: ≤ 4096; RC: ≤ 1 MiB).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Give up on an operation after this long.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Runs a `ferry rdma` subcommand.
pub fn run(cmd: RdmaCommand) -> anyhow::Result<i32> {
    match cmd {
        RdmaCommand::Host(a) => host(a),
        RdmaCommand::Peer(a) => peer(a),
    }
}

fn host(a: HostArgs) -> anyhow::Result<i32> {
    let o = a.common.addr.octets();
    let base = a
        .gid_base
        .unwrap_or_else(|| Ipv4Addr::new(o[0], o[1], o[2].wrapping_add(1), 1));
    let mut cfg = HostConfig::new(a.common.addr, a.vms, base);
    cfg.port = a.common.port();
    cfg.service_port = a.common.listen_service;
    cfg.cm = a.common.cm();
    let signals = SignalState::install()?;
    let host =
        Host::start(cfg).with_context(|| format!("starting the host at {}", a.common.addr))?;
    let gids: Vec<String> = host
        .vms()
        .iter()
        .map(|v| format!("vm{}={}", v.id(), v.gid()))
        .collect();
    println!(
        "ferry rdma host: ready on {}:{} with {} VMs: {}",
        host.port().addr(),
        host.port().udp_port(),
        gids.len(),
        gids.join(" ")
    );
    let targets = a
        .connect
        .iter()
        .map(|g| parse_gid(g))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut connects_ok, mut connects_failed) = (0, Vec::new());
    let wait = Duration::from_secs(20);
    for vm in host.vms() {
        for &t in targets.iter().filter(|t| t.canonical() != vm.gid()) {
            let p = rdma::cm::ConnectParams {
                service_id: rdma::host::rc_service(a.common.listen_service),
                qpn: vm.ud_qp().qpn_value(),
                private_data: Vec::new(),
            };
            let r = vm
                .endpoint()
                .connect(t, p, wait)
                .and_then(|info| vm.endpoint().disconnect(info.local_comm_id, wait));
            match r {
                Ok(()) => {
                    connects_ok += 1;
                    println!("connect vm{} {} -> {t}: ok", vm.id(), vm.gid());
                }
                Err(e) => {
                    let e = vmm::ErrorChain(&e);
                    println!("connect vm{} {} -> {t}: {e}", vm.id(), vm.gid());
                    connects_failed.push(format!("{} -> {t}: {e}", vm.gid()));
                }
            }
        }
    }
    if !targets.is_empty() {
        println!(
            "ferry rdma host: connects done: {connects_ok} ok, {} failed",
            connects_failed.len()
        );
    }
    let start = Instant::now();
    loop {
        if signals.stop_signal().is_some() || a.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = host.report();
    host.shutdown();
    if a.common.json {
        let out = HostOutput {
            report,
            connects_ok,
            connects_failed,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let p = &report.port;
        let m = &report.mux;
        println!(
            "port: rx {} (gsi {}, ud {}), tx {}; dropped: bad ICRC {}, not IPv4 {}, malformed {}, P_Key {}, Q_Key {}, no QP {}",
            p.rx_datagrams, p.rx_gsi, p.rx_ud, p.tx_datagrams, p.rx_bad_icrc, p.rx_not_ipv4,
            p.rx_malformed, p.rx_bad_pkey, p.rx_bad_qkey, p.rx_no_qp
        );
        println!(
            "mux: delivered {}, queued {}, sent {}; dropped: no owner {}, queue full {}, truncated {}, malformed {}, class {}, spoofed source {}; unknown comm ID {}; refused: spoofed {}, class {}, malformed {}",
            m.delivered, m.queued, m.sent, m.no_owner, m.queue_full, m.truncated, m.malformed,
            m.class_not_allowed, m.spoofed_source, m.unknown_comm_id, m.refused_spoofed, m.refused_class,
            m.refused_malformed
        );
        for v in &report.vms {
            println!(
                "vm{} {}: MADs in {} out {}, established {}, disconnected {}, SIDR answered {}, UD echoed {}",
                v.vm, v.gid, v.mux.delivered, v.mux.sent, v.cm.established, v.cm.disconnected,
                v.cm.sidr_answered, v.ud.tx_messages
            );
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct PeerReport {
    mode: PeerMode,
    gid: String,
    remote: String,
    ok: bool,
    rc: Vec<rdma::peer::RcReport>,
    ud: Option<rdma::peer::UdReport>,
    error: Option<String>,
    port: rdma::port::PortStats,
    cm: rdma::cm::CmStats,
}

fn peer(a: PeerArgs) -> anyhow::Result<i32> {
    let tool = match a.mode {
        PeerMode::Rping => Some(rdma::rc_session::tools::Tool::Rping),
        PeerMode::Ucmatose => Some(rdma::rc_session::tools::Tool::Ucmatose),
        _ => None,
    };
    if a.listen && tool.is_none() {
        anyhow::bail!("--listen serves the rping and ucmatose modes only");
    }
    let dgid = match &a.connect {
        Some(g) => Some(parse_gid(g)?),
        None => None,
    };
    let p = Peer::start(a.common.port(), a.common.cm())
        .with_context(|| format!("starting the peer at {}", a.common.addr))?;
    let svc = a.common.listen_service;
    let mut rc = Vec::new();
    let mut ud = None;
    let result: Result<(), rdma::RdmaError> = match (a.mode, dgid) {
        (PeerMode::Rping | PeerMode::Ucmatose, _) if a.listen => {
            let tool = tool.unwrap_or(rdma::rc_session::tools::Tool::Rping);
            let gid = p.gid();
            p.tool_server(svc, tool, a.messages, a.size, a.timeout, || {
                println!("listening on {gid} port {svc} ({tool:?})");
            })
            .map(|r| rc.push(r))
        }
        (PeerMode::Rping | PeerMode::Ucmatose, Some(dgid)) => {
            let tool = tool.unwrap_or(rdma::rc_session::tools::Tool::Rping);
            p.tool_client(dgid, svc, tool, a.messages, a.size, a.timeout)
                .map(|r| rc.push(r))
        }
        (_, None) => Err(rdma::RdmaError::Cm("no GID to connect to".into())),
        (mode, Some(dgid)) => match mode {
            PeerMode::RcConnect => (0..a.messages.max(1)).try_for_each(|_| {
                rc.push(p.rc_session(dgid, svc, a.timeout)?);
                Ok(())
            }),
            PeerMode::Rc | PeerMode::RcSend => {
                let mode = if a.mode == PeerMode::Rc {
                    rdma::rc_session::RcMode::Rping
                } else {
                    rdma::rc_session::RcMode::Send
                };
                p.rc_data_session(dgid, svc, mode, a.messages, a.size, a.timeout)
                    .map(|r| rc.push(r))
            }
            PeerMode::Ud => p
                .ud_session(dgid, svc, a.messages, a.size, a.timeout)
                .map(|r| ud = Some(r)),
            PeerMode::Rping | PeerMode::Ucmatose => Ok(()),
        },
    };
    let (port, cm) = p.stats();
    p.shutdown();
    let report = PeerReport {
        mode: a.mode,
        gid: p.gid().to_string(),
        remote: dgid.map(|g| g.to_string()).unwrap_or_default(),
        ok: result.is_ok(),
        rc,
        ud,
        error: result
            .as_ref()
            .err()
            .map(|e| vmm::ErrorChain(e).to_string()),
        port,
        cm,
    };
    if a.common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for r in &report.rc {
            println!(
                "rc {} -> {}: connected (comm IDs {:#x}/{:#x}, QPN {:#x}) in {} µs, disconnected in {} µs",
                report.gid, report.remote, r.local_comm_id, r.remote_comm_id, r.remote_qpn,
                r.connect_us, r.disconnect_us
            );
            if let Some(t) = r.tool {
                println!(
                    "rc {t:?}: {} messages verified, {} bytes in {} µs",
                    r.verified, r.bytes, r.data_us
                );
            }
            if let Some(m) = r.mode {
                println!(
                    "rc {m:?}: {} messages verified, {} bytes in {} µs",
                    r.verified, r.bytes, r.data_us
                );
            }
        }
        if let Some(u) = &report.ud {
            println!(
                "ud {} -> {}: SIDR QPN {:#x} Q_Key {:#x} in {} µs; {}/{} messages echoed and verified in {} µs",
                report.gid, report.remote, u.qpn, u.qkey, u.sidr_us, u.verified, u.sent, u.messages_us
            );
        }
    }
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("ferry rdma peer: {}", vmm::ErrorChain(&e));
            Ok(1)
        }
    }
}
