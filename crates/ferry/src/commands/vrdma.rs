//! `ferry vrdma`: one host (a software RoCEv2 port and its CM multiplexer on `--addr`) with
//! several VMs, each with a virtual RDMA device; and the RDMA agent's workload arguments of
//! `ferry run`.
use std::{
    net::Ipv4Addr,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, ValueEnum};
use guest_abi::{rdma_mode, RdmaArgs, Workload, WorkloadArgs};
use serde::Serialize;

use crate::{
    session::{self, BootSpec, SessionSpec},
    signals::SignalState,
    units::parse_duration,
    vrdma_host::{HostReport, VmVrdmaReport, VrdmaHost},
};

/// Default rdma_cm port of the agent's services.
pub const DEFAULT_PORT: u16 = rdma::host::DEFAULT_SERVICE_PORT;

/// Variants of `rdma-client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum RdmaMode {
    /// Connect, exchange verified UD messages, disconnect.
    #[default]
    Normal,
    /// Try to bind another VM's GID (expects a refusal, exit status 40).
    BindOther,
    /// Send a REQ claiming another GID as its source (expects a refusal, exit status 40).
    Spoof,
    /// rdma-core udaddy's pattern (both workloads): SIDR only, `--rdma-messages` UD sends
    /// with immediate data (the sender's QPN) of `--rdma-size` bytes, answered.
    Udaddy,
    /// rdma-core rping's protocol over RC (both workloads): `--rdma-messages` pings of
    /// `--rdma-size` bytes, RDMA READ and WRITE, verified on both sides.
    Rping,
    /// rdma-core ucmatose's protocol over RC (both workloads): 10 SENDs of `--rdma-size`
    /// bytes each way, verified.
    Ucmatose,
    /// ib_write_bw-like (both workloads): `--rdma-messages` RDMA WRITEs of `--rdma-size`
    /// bytes; the client reports the bandwidth.
    WriteBw,
}

impl RdmaMode {
    fn value(self) -> u32 {
        match self {
            RdmaMode::Normal => rdma_mode::NORMAL,
            RdmaMode::BindOther => rdma_mode::BIND_OTHER,
            RdmaMode::Spoof => rdma_mode::SPOOF,
            RdmaMode::Udaddy => rdma_mode::UDADDY,
            RdmaMode::Rping => rdma_mode::RPING,
            RdmaMode::Ucmatose => rdma_mode::UCMATOSE,
            RdmaMode::WriteBw => rdma_mode::WRITE_BW,
        }
    }
}

/// Arguments of the RDMA workloads (`ferry run --workload rdma-*`).
#[derive(Args, Debug, Clone)]
pub struct RdmaCliArgs {
    /// `rdma-client`: the server's GID.
    #[arg(long, value_name = "IPV4")]
    pub rdma_peer: Option<Ipv4Addr>,
    /// `rdma-client --rdma-mode bind-other|spoof`: the other VM's GID.
    #[arg(long, value_name = "IPV4")]
    pub rdma_other: Option<Ipv4Addr>,
    /// rdma_cm port of the agent's services.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub rdma_port: u16,
    /// `rdma-client`: UD messages to exchange.
    #[arg(long, default_value_t = 100)]
    pub rdma_messages: u64,
    /// `rdma-client`: UD message size in bytes (8 to 2048).
    #[arg(long, default_value_t = 64)]
    pub rdma_size: u32,
    /// `rdma-server`: exit after this many disconnects (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub rdma_sessions: u64,
    /// Workload variant (`udaddy` applies to both workloads, the others to `rdma-client`).
    #[arg(long, value_enum, default_value = "normal")]
    pub rdma_mode: RdmaMode,
}

impl RdmaCliArgs {
    /// The guest's arguments (the local GID comes from `--vrdma`).
    pub fn workload_args(&self, w: Workload) -> RdmaArgs {
        RdmaArgs {
            local_gid: 0,
            peer_gid: self.rdma_peer.map(u32::from).unwrap_or(0),
            other_gid: self.rdma_other.map(u32::from).unwrap_or(0),
            service_port: self.rdma_port as u32,
            msg_size: self.rdma_size,
            mode: self.rdma_mode.value(),
            messages: if w == Workload::RdmaServer && self.rdma_mode != RdmaMode::Udaddy {
                self.rdma_sessions
            } else {
                self.rdma_messages
            },
        }
    }
}

/// One VM of `ferry vrdma`: `WORKLOAD,gid=IPV4[,peer=IPV4][,other=IPV4][,port=N]
/// [,messages=N][,size=N][,sessions=N][,mode=normal|bind-other|spoof][,delay=MS]
/// [,timeout=MS][,expect=CODE]`.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Workload.
    pub workload: Workload,
    /// Guest arguments.
    pub rdma: RdmaArgs,
    /// Start this long after the host is up.
    pub delay: Duration,
    /// Exit code that counts as success (the guest's status; 124 for a timeout).
    pub expect: u32,
    /// Stop this VM after this long (default: the host's `--timeout`).
    pub timeout: Option<Duration>,
}

impl FromStr for VmSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<VmSpec, String> {
        let mut parts = s.split(',');
        let workload = match parts.next().unwrap_or("") {
            "rdma-server" | "server" => Workload::RdmaServer,
            "rdma-client" | "client" => Workload::RdmaClient,
            "rdma-hostile" | "hostile" => Workload::RdmaHostile,
            w => {
                return Err(format!(
                    "unknown VM workload '{w}' (rdma-server, rdma-client, rdma-hostile)"
                ))
            }
        };
        let mut v = VmSpec {
            workload,
            rdma: RdmaArgs {
                service_port: DEFAULT_PORT as u32,
                msg_size: 64,
                messages: if workload == Workload::RdmaClient {
                    100
                } else {
                    0
                },
                ..Default::default()
            },
            delay: Duration::ZERO,
            expect: 0,
            timeout: None,
        };
        for part in parts.filter(|p| !p.is_empty()) {
            let (k, val) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected KEY=VALUE"))?;
            let ip = || {
                val.parse::<Ipv4Addr>()
                    .map(u32::from)
                    .map_err(|e| format!("{k}='{val}': {e}"))
            };
            let num = || val.parse::<u64>().map_err(|e| format!("{k}='{val}': {e}"));
            match k {
                "gid" => v.rdma.local_gid = ip()?,
                "peer" => v.rdma.peer_gid = ip()?,
                "other" => v.rdma.other_gid = ip()?,
                "port" => v.rdma.service_port = num()? as u32,
                "messages" | "sessions" => v.rdma.messages = num()?,
                "size" => v.rdma.msg_size = num()? as u32,
                "delay" => v.delay = Duration::from_millis(num()?),
                "expect" => v.expect = num()? as u32,
                "timeout" => v.timeout = Some(Duration::from_millis(num()?)),
                "mode" => {
                    v.rdma.mode = RdmaMode::from_str(val, true)
                        .map_err(|e| format!("mode='{val}': {e}"))?
                        .value()
                }
                other => return Err(format!("unknown VM key '{other}'")),
            }
        }
        if v.rdma.local_gid == 0 {
            return Err("a VM needs gid=A.B.C.D".into());
        }
        Ok(v)
    }
}

/// `ferry vrdma`.
#[derive(Args, Debug)]
pub struct VrdmaHostArgs {
    /// Host address: the RoCEv2 port binds UDP 4791 here (and on each VM's GID, which must
    /// be an address of this host).
    #[arg(long)]
    pub addr: Ipv4Addr,
    /// A VM (repeatable): `WORKLOAD,gid=IPV4[,peer=IPV4][,other=IPV4][,port=N][,messages=N]
    /// [,size=N][,sessions=N][,mode=normal|bind-other|spoof][,delay=MS][,timeout=MS]
    /// [,expect=CODE]`; VMs start in order after their delay.
    #[arg(long = "vm", required = true)]
    pub vms: Vec<VmSpec>,
    /// RAM of each VM.
    #[arg(long, default_value = "64M", value_parser = crate::units::parse_size)]
    pub memory: u64,
    /// Stop every VM after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Guest consoles: "stdout" (prefixed per VM), "off", or a file path prefix.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One VM's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcomeReport {
    /// Workload name.
    pub workload: String,
    /// GID.
    pub gid: Ipv4Addr,
    /// "exit", "timeout", …
    pub outcome: String,
    /// Exit status.
    pub status: Option<u32>,
    /// Exit code (`ferry run`'s: the status, 124 for a timeout, …).
    pub code: i32,
    /// Expected exit code.
    pub expect: u32,
    /// The device's and the multiplexer's counters.
    pub vrdma: Option<VmVrdmaReport>,
    /// The agent's result line, if it printed one.
    pub result: Option<String>,
    /// Last console lines.
    pub console_tail: Vec<String>,
}

/// `ferry vrdma`'s report.
#[derive(Debug, Clone, Serialize)]
pub struct VrdmaRunReport {
    /// Every VM ended with its expected status.
    pub pass: bool,
    /// The VMs.
    pub vms: Vec<VmOutcomeReport>,
    /// The host.
    pub host: HostReport,
}

/// Runs `vms` on `host` (one thread per VM) until they end.
pub fn run_vms(
    host: &Arc<VrdmaHost>,
    vms: &[VmSpec],
    memory: u64,
    timeout: Duration,
    serial: &str,
    signals: &Arc<SignalState>,
) -> anyhow::Result<Vec<VmOutcomeReport>> {
    let mut threads = Vec::new();
    for (i, v) in vms.iter().enumerate() {
        let gid = Ipv4Addr::from(v.rdma.local_gid);
        let boot = BootSpec {
            image: Arc::new(guest_image::GUEST_ELF.to_vec()),
            workload: v.workload,
            args: WorkloadArgs {
                seed: 0x5eed + i as u64,
                rdma: v.rdma,
                ..Default::default()
            },
        };
        let console = match serial {
            "stdout" | "-" => vmm::devices::serial::ConsoleSink::Stdout,
            "off" | "none" => vmm::devices::serial::ConsoleSink::Null,
            path => vmm::devices::serial::ConsoleSink::File(format!("{path}.vm{i}").into()),
        };
        let spec = SessionSpec {
            memory,
            console,
            console_prefix: format!("[vm{i} {gid}] "),
            timeout: Some(v.timeout.unwrap_or(timeout)),
            vrdma: Some(host.clone()),
            ..Default::default()
        };
        let (signals, delay, expect) = (signals.clone(), v.delay, v.expect);
        let workload = v.workload.name().to_string();
        threads.push(
            std::thread::Builder::new()
                .name(format!("vm{i}"))
                .spawn(move || -> anyhow::Result<VmOutcomeReport> {
                    std::thread::sleep(delay);
                    let r = session::run(&boot, &spec, Instant::now(), &signals)?;
                    let code = r.exit_code();
                    let result = r
                        .console_tail
                        .iter()
                        .find(|l| l.contains("rdma-client: result") || l.contains(": done:"))
                        .cloned();
                    Ok(VmOutcomeReport {
                        workload,
                        gid,
                        outcome: r.outcome,
                        status: r.status,
                        code,
                        expect,
                        vrdma: r.vrdma,
                        result,
                        console_tail: r.console_tail,
                    })
                })
                .context("spawning a VM thread")?,
        );
    }
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|_| anyhow::anyhow!("a VM thread panicked"))?
        })
        .collect()
}

pub fn run(args: VrdmaHostArgs, _process_start: Instant) -> anyhow::Result<i32> {
    let signals = SignalState::install()?;
    let host = VrdmaHost::start(args.addr, None)?;
    let vms = run_vms(
        &host,
        &args.vms,
        args.memory,
        args.timeout,
        &args.serial,
        &signals,
    )?;
    let pass = vms.iter().all(|v| v.code == v.expect as i32);
    let report = VrdmaRunReport {
        pass,
        vms,
        host: host.report(),
    };
    host.shutdown();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_host_report(&report);
    }
    Ok(if pass { 0 } else { 1 })
}

/// Prints a host report for people.
pub fn print_host_report(r: &VrdmaRunReport) {
    let m = &r.host.mux;
    eprintln!(
        "ferry vrdma: host {}: QP1 MADs in {}, routed to VMs {} (queued {}), dropped: no owner {}, queue full {}, malformed {}; sent {}, refused: spoofed {}, class {}, malformed {}; registrations refused {}",
        r.host.addr, m.inbound, m.delivered, m.queued, m.no_owner, m.queue_full, m.malformed, m.sent,
        m.refused_spoofed, m.refused_class, m.refused_malformed, m.registrations_refused
    );
    for v in &r.vms {
        let d = v
            .vrdma
            .as_ref()
            .map(|x| x.device.clone())
            .unwrap_or_default();
        eprintln!(
            "ferry vrdma: {} {}: {} (exit code {}, expected {}); MADs sent {} received {} refused {}; UD sent {} received {}; binds refused {}; command errors {}",
            v.workload, v.gid, v.outcome, v.code, v.expect, d.mads_sent, d.mads_received,
            d.mads_refused, d.ud_sent, d.ud_received, d.binds_refused, d.command_errors
        );
    }
    eprintln!("ferry vrdma: {}", if r.pass { "PASS" } else { "FAIL" });
}
