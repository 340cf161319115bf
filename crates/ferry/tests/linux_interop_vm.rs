//! A Ferry VM (the built-in guest's RDMA agent on the virtual PVRDMA device, behind the VMM's
//! software RoCEv2 port) against Linux's rdma-core `udaddy` over rxe in a QEMU guest
//! (docs/linux-interop.md), both directions. The agent speaks udaddy's pattern
//! (`--rdma-mode udaddy`): SIDR, SEND_WITH_IMM carrying the sender's QPN, replies to that QPN.
//! Ferry runs inside the guest's network namespace with the tap's address as the VM's GID;
//! tshark captures the tap, must find nothing malformed, and every RoCE frame's ICRC must
//! verify over its real headers.
//!
//! They need root, KVM and the packages `scripts/linux-rdma-guest/setup.sh` installs.

#[path = "common/linux_guest.rs"]
mod linux_guest;

#[path = "common/interop.rs"]
mod interop;

use std::time::{Duration, Instant};

use interop::{assert_opcode, check_capture, op, FerryProc};
use linux_guest::{GuestOutput, LinuxGuest, GUEST_IP, HOST_IP};
use rdma_wire::mad::attr;

/// udaddy's rdma_cm port.
const UDADDY_PORT: u16 = 7174;
/// udaddy's defaults: 10 messages of 100 bytes.
const COUNT: u64 = 10;
const SIZE: u32 = 100;
const LIMIT: Duration = Duration::from_secs(150);

fn vm_args(workload: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        "--workload",
        workload,
        "--memory",
        "64M",
        "--timeout",
        "120s",
        "--vrdma",
        "gid=10.77.0.1",
        "--rdma-mode",
        "udaddy",
        "--rdma-messages",
        &COUNT.to_string(),
        "--rdma-size",
        &SIZE.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn start(g: &LinuxGuest, args: &[String]) -> FerryProc {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    FerryProc::start(g, &a)
}

/// The capture: SIDR both ways and UD SEND_WITH_IMM (opcode 0x65) both ways.
fn check(pcap: &std::path::Path, client: std::net::Ipv4Addr, server: std::net::Ipv4Addr) -> usize {
    let frames = check_capture(
        pcap,
        &[
            (attr::SIDR_REQ, client, server),
            (attr::SIDR_REP, server, client),
        ],
    );
    assert_opcode(
        &frames,
        &op::UD_SEND[1..],
        "UD SEND with immediate",
        client,
        server,
    );
    assert_opcode(
        &frames,
        &op::UD_SEND[1..],
        "UD SEND with immediate",
        server,
        client,
    );
    let ud = |s, d| {
        frames
            .iter()
            .filter(|&&(o, fs, fd)| o == 0x65 && fs == s && fd == d)
            .count() as u64
    };
    assert!(ud(client, server) >= COUNT, "client sends: {frames:?}");
    assert!(ud(server, client) >= COUNT, "server replies: {frames:?}");
    frames.len()
}

/// Linux `udaddy -s` (client) against a Ferry VM running `rdma-server --rdma-mode udaddy`:
/// the VM answers the SIDR_REQ, takes udaddy's 10 messages (size and immediate checked) and
/// replies to each; udaddy completes.
#[test]
fn linux_udaddy_client_against_ferry_vm() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("udaddy-to-vm");
    let mut vm = start(&g, &vm_args("rdma-server", &[]));
    vm.wait_line("listening on port", LIMIT);
    let cap = g.capture("udaddy-to-vm");
    let out = g.run_timeout(&format!("udaddy -s {HOST_IP} -C {COUNT} -S {SIZE}"), LIMIT);
    assert_eq!(out.rc, 0, "udaddy client failed:\n{}", out.out);
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    let (rc, lines) = vm.finish(LIMIT);
    let text = lines.join("\n");
    assert_eq!(rc, 0, "the VM failed:\n{text}");
    assert!(
        text.contains(&format!(
            "{COUNT} UD messages echoed, 0 refused, 0 send errors"
        )),
        "{text}"
    );
    let n = check(&cap.stop(), GUEST_IP, HOST_IP);
    eprintln!(
        "udaddy linux->vm: {n} frames, boot {:?}, test {:?}",
        g.boot_time(),
        t0.elapsed()
    );
}

/// A Ferry VM running `rdma-client --rdma-mode udaddy` against Linux `udaddy` (server): SIDR,
/// 10 messages with the VM's QPN as immediate, 10 replies that carry the VM's message behind
/// the GRH udaddy's server received (verified in the VM); udaddy completes.
#[test]
fn ferry_vm_udaddy_client_against_linux_udaddy_server() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("vm-to-udaddy");
    let server = g.spawn(&format!("udaddy -b {GUEST_IP} -C {COUNT} -S {SIZE}"));
    g.wait_cm_listen(UDADDY_PORT);
    let cap = g.capture("vm-to-udaddy");
    let vm = start(&g, &vm_args("rdma-client", &["--rdma-peer", "10.77.0.2"]));
    let (rc, lines) = vm.finish(LIMIT);
    let text = lines.join("\n");
    assert_eq!(rc, 0, "the VM failed:\n{text}");
    assert!(
        text.contains(&format!("{COUNT} replies verified")),
        "{text}"
    );
    let out = g.wait(server, LIMIT);
    assert_eq!(out.rc, 0, "udaddy server failed:\n{}", out.out);
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    let n = check(&cap.stop(), HOST_IP, GUEST_IP);
    eprintln!(
        "udaddy vm->linux: {n} frames, boot {:?}, test {:?}",
        g.boot_time(),
        t0.elapsed()
    );
}

/// rping's and ucmatose's rdma_cm ports.
const RPING_PORT: &str = "7174";
const UCMATOSE_PORT: &str = "7471";
/// Pings of the rping tests; ucmatose's messages are its default 10 (the VM's server sends
/// 10).
const PINGS: u64 = 5;
const UCMATOSE_COUNT: u64 = 10;

/// A VM running the RC agent in `mode` on `port` (`--rdma-messages`: pings or messages of a
/// client; the server serves one connection).
fn rc_vm_args(workload: &str, mode: &str, port: &str, size: &str, extra: &[&str]) -> Vec<String> {
    let n = if mode == "rping" {
        PINGS
    } else {
        UCMATOSE_COUNT
    }
    .to_string();
    let mut v: Vec<String> = [
        "run",
        "--workload",
        workload,
        "--memory",
        "64M",
        "--timeout",
        "120s",
        "--vrdma",
        "gid=10.77.0.1",
        "--rdma-mode",
        mode,
        "--rdma-port",
        port,
        "--rdma-size",
        size,
        "--rdma-messages",
        &n,
        "--rdma-sessions",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The capture of an RC connection from `client` to `server`: REQ/REP/RTU, the DREQ/DREP of
/// `closer`, and the data opcodes `data` (opcode set, what, from, to); no malformed frame,
/// every ICRC verified (check_capture).
fn check_rc(
    pcap: &std::path::Path,
    client: std::net::Ipv4Addr,
    server: std::net::Ipv4Addr,
    closer: std::net::Ipv4Addr,
    data: &[(&[u8], &str, bool)],
) -> usize {
    let other = if closer == client { server } else { client };
    let frames = check_capture(
        pcap,
        &[
            (attr::REQ, client, server),
            (attr::REP, server, client),
            (attr::RTU, client, server),
            (attr::DREQ, closer, other),
            (attr::DREP, other, closer),
        ],
    );
    for (ops, what, from_client) in data {
        let (s, d) = if *from_client {
            (client, server)
        } else {
            (server, client)
        };
        assert_opcode(&frames, ops, what, s, d);
    }
    frames.len()
}

/// rping's data path: the client's rping_rdma_info SENDs, the server's READ (request and
/// responses), its WRITE and go-aheads.
const RPING_FRAMES: &[(&[u8], &str, bool)] = &[
    (op::SEND, "rping_rdma_info SEND", true),
    (op::READ_REQ, "RDMA READ request", false),
    (op::READ_RESP, "RDMA READ response", true),
    (op::WRITE, "RDMA WRITE", false),
    (op::SEND, "go-ahead SEND", false),
];

/// What an RC direction produced: the Linux tool's output, the VM's console and exit code,
/// the capture (stopped), the guest (for its boot time).
struct RcRun {
    g: LinuxGuest,
    linux: GuestOutput,
    vm_rc: i32,
    vm: String,
    pcap: std::path::PathBuf,
    t0: Instant,
}

impl RcRun {
    /// The VM serves `mode` on `port`; the guest runs the Linux client `cmd`.
    fn linux_client(tag: &str, mode: &str, port: &str, size: &str, cmd: &str) -> RcRun {
        let t0 = Instant::now();
        let mut g = LinuxGuest::boot(tag);
        let mut vm = start(&g, &rc_vm_args("rdma-server", mode, port, size, &[]));
        vm.wait_line("listening on port", LIMIT);
        let cap = g.capture(tag);
        let linux = g.run_timeout(cmd, LIMIT);
        let (vm_rc, lines) = vm.finish(LIMIT);
        RcRun {
            g,
            linux,
            vm_rc,
            vm: lines.join("\n"),
            pcap: cap.stop(),
            t0,
        }
    }

    /// The guest runs the Linux server `cmd` (listening on `cm_port`); the VM connects as
    /// `mode`'s client.
    fn vm_client(tag: &str, cmd: &str, cm_port: u16, mode: &str, port: &str, size: &str) -> RcRun {
        let t0 = Instant::now();
        let mut g = LinuxGuest::boot(tag);
        let server = g.spawn(cmd);
        g.wait_cm_listen(cm_port);
        let cap = g.capture(tag);
        let args = rc_vm_args(
            "rdma-client",
            mode,
            port,
            size,
            &["--rdma-peer", "10.77.0.2"],
        );
        let (vm_rc, lines) = start(&g, &args).finish(LIMIT);
        let linux = g.wait(server, LIMIT);
        RcRun {
            g,
            linux,
            vm_rc,
            vm: lines.join("\n"),
            pcap: cap.stop(),
            t0,
        }
    }

    /// Both sides exited 0, the VM's console says `vm_says`.
    fn assert_ok(&self, vm_says: &str) {
        assert_eq!(
            self.linux.rc, 0,
            "the Linux tool failed:\n{}",
            self.linux.out
        );
        assert_eq!(self.vm_rc, 0, "the VM failed:\n{}", self.vm);
        assert!(self.vm.contains(vm_says), "{}", self.vm);
    }

    fn report(&self, what: &str, frames: usize) {
        eprintln!(
            "{what}: {frames} frames, boot {:?}, test {:?}",
            self.g.boot_time(),
            self.t0.elapsed()
        );
    }
}

/// Linux `rping -c -V` against a Ferry VM running `rdma-server --rdma-mode rping`: the VM
/// READs each ping through its PVRDMA device (checking rping's pattern) and WRITEs it back;
/// rping compares.
#[test]
fn linux_rping_client_against_ferry_vm() {
    let r = RcRun::linux_client(
        "rping-to-vm",
        "rping",
        RPING_PORT,
        "64",
        &format!("rping -c -a {HOST_IP} -C {PINGS} -v -V"),
    );
    r.assert_ok(&format!("({PINGS} pings, 0 messages verified)"));
    assert!(r.vm.contains("0 wrong"), "{}", r.vm);
    for i in 0..PINGS {
        assert!(
            r.linux.out.contains(&format!("ping data: rdma-ping-{i}: ")),
            "rping did not verify ping {i}:\n{}",
            r.linux.out
        );
    }
    let n = check_rc(&r.pcap, GUEST_IP, HOST_IP, GUEST_IP, RPING_FRAMES);
    r.report("rping linux->vm", n);
}

/// A Ferry VM running `rdma-client --rdma-mode rping` against Linux `rping -s`: Linux READs
/// the VM's source buffer and WRITEs it into the VM's sink; the VM compares.
#[test]
fn ferry_vm_rping_client_against_linux_rping_server() {
    let r = RcRun::vm_client(
        "vm-to-rping",
        &format!("rping -s -a {GUEST_IP} -v"),
        7174,
        "rping",
        RPING_PORT,
        "64",
    );
    r.assert_ok(&format!("messages={PINGS} size=64 verified={PINGS}"));
    for i in 0..PINGS {
        assert!(
            r.linux
                .out
                .contains(&format!("server ping data: rdma-ping-{i}: ")),
            "the rping server did not read ping {i}:\n{}",
            r.linux.out
        );
    }
    let n = check_rc(&r.pcap, HOST_IP, GUEST_IP, HOST_IP, RPING_FRAMES);
    r.report("rping vm->linux", n);
}

/// Linux `ucmatose -s` (client) against a Ferry VM running `rdma-server --rdma-mode
/// ucmatose`: the VM SENDs 10 messages, ucmatose sends its receive buffer back 10 times (the
/// VM checks each is its last message) and the VM disconnects.
#[test]
fn linux_ucmatose_client_against_ferry_vm() {
    let r = RcRun::linux_client(
        "ucmatose-to-vm",
        "ucmatose",
        UCMATOSE_PORT,
        "100",
        &format!("ucmatose -s {HOST_IP} -C {UCMATOSE_COUNT}"),
    );
    r.assert_ok(&format!("(0 pings, {UCMATOSE_COUNT} messages verified)"));
    assert!(
        r.linux.out.contains("data transfers complete"),
        "{}",
        r.linux.out
    );
    let data: &[(&[u8], &str, bool)] = &[
        (op::SEND, "SEND", false),
        (op::SEND, "SEND", true),
        (op::ACK, "ACK", true),
    ];
    let n = check_rc(&r.pcap, GUEST_IP, HOST_IP, HOST_IP, data);
    r.report("ucmatose linux->vm", n);
}

/// A Ferry VM running `rdma-client --rdma-mode ucmatose` against Linux `ucmatose` (server):
/// Linux sends 10 messages of 100 bytes, the VM sends them back, Linux disconnects and the
/// VM answers.
#[test]
fn ferry_vm_ucmatose_client_against_linux_ucmatose_server() {
    let r = RcRun::vm_client(
        "vm-to-ucmatose",
        &format!("ucmatose -b {GUEST_IP} -C {UCMATOSE_COUNT}"),
        7471,
        "ucmatose",
        UCMATOSE_PORT,
        "100",
    );
    r.assert_ok(&format!(
        "messages={UCMATOSE_COUNT} size=100 verified={UCMATOSE_COUNT}"
    ));
    assert!(
        r.linux.out.contains("data transfers complete"),
        "{}",
        r.linux.out
    );
    let data: &[(&[u8], &str, bool)] = &[
        (op::SEND, "SEND", false),
        (op::SEND, "SEND", true),
        (op::ACK, "ACK", false),
    ];
    let n = check_rc(&r.pcap, HOST_IP, GUEST_IP, GUEST_IP, data);
    r.report("ucmatose vm->linux", n);
}
