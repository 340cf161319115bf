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
use linux_guest::{LinuxGuest, GUEST_IP, HOST_IP};
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
