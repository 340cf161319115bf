//! Ferry's bare-metal RC peer (`ferry rdma peer --mode rping|ucmatose`) against Linux's
//! rdma-core tools over rxe in a QEMU guest (docs/linux-interop.md), both directions:
//! `rping -V` (rping_rdma_info SENDs, RDMA READ and WRITE, data verified by both sides) and
//! `ucmatose` (SENDs each way). Ferry runs inside the guest's network namespace on the tap's
//! address; tshark captures the tap, must find nothing malformed, and every RoCE frame's ICRC
//! must verify over its real headers.
//!
//! They need root and the packages `scripts/linux-rdma-guest/setup.sh` installs.

#[path = "common/linux_guest.rs"]
mod linux_guest;

#[path = "common/interop.rs"]
mod interop;

use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use interop::{assert_opcode, check_capture, op, FerryProc};
use linux_guest::{GuestOutput, LinuxGuest, GUEST_IP, HOST_IP};
use rdma_wire::mad::attr;

/// rping's rdma_cm port.
const RPING_PORT: u16 = 7174;
/// ucmatose's rdma_cm port.
const UCMATOSE_PORT: u16 = 7471;
/// rping's buffer size where the data spans several packets (path MTU 1024 over the tap).
const RPING_LONG: &str = "12000";
/// Pings / messages per test.
const COUNT: u64 = 5;
const LIMIT: Duration = Duration::from_secs(150);

fn peer_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "rdma",
        "peer",
        "--addr",
        "10.77.0.1",
        "--json",
        "--timeout",
        "90s",
    ];
    v.extend_from_slice(extra);
    v
}

/// Ferry's JSON report: ok, one RC session of `tool` with `COUNT` verified messages.
fn check_report(lines: &[String], rc: i32, tool: &str) -> serde_json::Value {
    let j = FerryProc::json(lines);
    assert_eq!(rc, 0, "ferry rdma peer failed: {j}");
    assert_eq!(j["ok"], true, "{j}");
    let s = &j["rc"][0];
    assert_eq!(s["tool"], tool, "{j}");
    assert_eq!(s["verified"], COUNT, "{j}");
    assert_eq!(j["port"]["rx_bad_icrc"], 0, "{j}");
    j
}

/// The RoCE frames of a capture: (BTH opcode, source, destination).
type Frames = Vec<(u8, Ipv4Addr, Ipv4Addr)>;

/// The CM messages of a connection from `client` to `server` that `closer` ends.
fn lifecycle(
    client: Ipv4Addr,
    server: Ipv4Addr,
    closer: Ipv4Addr,
) -> Vec<(u16, Ipv4Addr, Ipv4Addr)> {
    let other = if closer == client { server } else { client };
    vec![
        (attr::REQ, client, server),
        (attr::REP, server, client),
        (attr::RTU, client, server),
        (attr::DREQ, closer, other),
        (attr::DREP, other, closer),
    ]
}

/// Ferry's peer listens (`ferry_args` + `--listen`), the guest runs the Linux client
/// `command`; returns the client's output, Ferry's report and the checked capture.
fn linux_client_to_ferry(
    tag: &str,
    ferry_args: &[&str],
    command: &str,
    closer: Ipv4Addr,
) -> (GuestOutput, serde_json::Value, Frames) {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot(tag);
    let mut args = ferry_args.to_vec();
    args.push("--listen");
    let mut f = FerryProc::start(&g, &peer_args(&args));
    f.wait_line("listening", LIMIT);
    let cap = g.capture(tag);
    let out = g.run_timeout(command, LIMIT);
    assert_eq!(out.rc, 0, "{command} failed:\n{}", out.out);
    let (rc, lines) = f.finish(LIMIT);
    let j = check_report(&lines, rc, ferry_args[1]);
    let frames = check_capture(&cap.stop(), &lifecycle(GUEST_IP, HOST_IP, closer));
    report(tag, &g, t0, &j, &frames);
    (out, j, frames)
}

/// The guest runs the Linux server `command` listening on `port`; Ferry's peer connects
/// (`ferry_args` + `--connect`); returns the server's output, Ferry's report and the checked
/// capture.
fn ferry_client_to_linux(
    tag: &str,
    command: &str,
    port: u16,
    ferry_args: &[&str],
    closer: Ipv4Addr,
) -> (GuestOutput, serde_json::Value, Frames) {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot(tag);
    let server = g.spawn(command);
    g.wait_cm_listen(port);
    let cap = g.capture(tag);
    let mut args = ferry_args.to_vec();
    args.extend(["--connect", "10.77.0.2"]);
    let (rc, lines) = FerryProc::start(&g, &peer_args(&args)).finish(LIMIT);
    let j = check_report(&lines, rc, ferry_args[1]);
    let out = g.wait(server, LIMIT);
    assert_eq!(out.rc, 0, "{command} failed:\n{}", out.out);
    let frames = check_capture(&cap.stop(), &lifecycle(HOST_IP, GUEST_IP, closer));
    report(tag, &g, t0, &j, &frames);
    (out, j, frames)
}

fn report(tag: &str, g: &LinuxGuest, t0: Instant, j: &serde_json::Value, frames: &Frames) {
    eprintln!(
        "{tag}: {} frames, boot {:?}, test {:?}; ferry: {}",
        frames.len(),
        g.boot_time(),
        t0.elapsed(),
        j["rc"][0]
    );
}

/// rping's data path in a capture: `client`'s rping_rdma_info SENDs, `server`'s RDMA READ of
/// the client's source buffer and its RDMA WRITE into the client's sink, and go-aheads.
fn assert_rping_frames(frames: &Frames, client: Ipv4Addr, server: Ipv4Addr) {
    assert_opcode(frames, op::SEND, "rping_rdma_info SEND", client, server);
    assert_opcode(frames, op::READ_REQ, "RDMA READ request", server, client);
    assert_opcode(frames, op::READ_RESP, "RDMA READ response", client, server);
    assert_opcode(frames, op::WRITE, "RDMA WRITE", server, client);
    assert_opcode(frames, op::SEND, "go-ahead SEND", server, client);
}

/// Linux `rping -c -V` against Ferry's peer serving rping's protocol: Ferry READs each ping
/// (checking rping's pattern) and WRITEs it back; rping compares.
#[test]
fn linux_rping_client_against_ferry_peer() {
    let n = COUNT.to_string();
    let (out, _, frames) = linux_client_to_ferry(
        "rping-to-ferry",
        &["--mode", "rping", "--messages", &n],
        &format!("rping -c -a {HOST_IP} -C {COUNT} -v -V"),
        GUEST_IP,
    );
    for i in 0..COUNT {
        assert!(
            out.out.contains(&format!("ping data: rdma-ping-{i}: ")),
            "rping did not verify ping {i}:\n{}",
            out.out
        );
    }
    assert_rping_frames(&frames, GUEST_IP, HOST_IP);
}

/// Ferry's peer as rping's client against Linux `rping -s`: Linux READs Ferry's source buffer
/// and WRITEs it into Ferry's sink; Ferry compares. The buffers span several packets, so
/// Ferry's READ responses (MIDDLEs in one run) leave in UDP GSO sends: the capture's ICRC
/// check over the real headers covers the IPv4 identifications the kernel numbers them with.
#[test]
fn ferry_peer_rping_client_against_linux_rping_server() {
    let n = COUNT.to_string();
    let (out, j, frames) = ferry_client_to_linux(
        "ferry-to-rping",
        &format!("rping -s -a {GUEST_IP} -S {RPING_LONG} -v"),
        RPING_PORT,
        &["--mode", "rping", "--messages", &n, "--size", RPING_LONG],
        HOST_IP,
    );
    assert!(
        j["port"]["tx_gso_runs"].as_u64().unwrap_or(0) >= COUNT,
        "READ responses in GSO runs: {j}"
    );
    for i in 0..COUNT {
        assert!(
            out.out
                .contains(&format!("server ping data: rdma-ping-{i}: ")),
            "the rping server did not read ping {i}:\n{}",
            out.out
        );
    }
    assert_rping_frames(&frames, HOST_IP, GUEST_IP);
}

/// Linux `ucmatose -s` (client) against Ferry's peer serving ucmatose's protocol: Ferry sends
/// `COUNT` messages, ucmatose sends its receive buffer back `COUNT` times (Ferry checks it is
/// its last message), Ferry disconnects.
#[test]
fn linux_ucmatose_client_against_ferry_peer() {
    let n = COUNT.to_string();
    let (out, _, frames) = linux_client_to_ferry(
        "ucmatose-to-ferry",
        &ucmatose_args(&n),
        &format!("ucmatose -s {HOST_IP} -C {COUNT}"),
        HOST_IP,
    );
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    assert_opcode(&frames, op::SEND, "SEND", HOST_IP, GUEST_IP);
    assert_opcode(&frames, op::SEND, "SEND", GUEST_IP, HOST_IP);
    assert_opcode(&frames, op::ACK, "ACK", HOST_IP, GUEST_IP);
}

/// Ferry's peer as ucmatose's client against Linux `ucmatose` (server): Linux sends `COUNT`
/// messages, Ferry sends them back, Linux disconnects and Ferry answers.
#[test]
fn ferry_peer_ucmatose_client_against_linux_ucmatose_server() {
    let n = COUNT.to_string();
    let (out, _, frames) = ferry_client_to_linux(
        "ferry-to-ucmatose",
        &format!("ucmatose -b {GUEST_IP} -C {COUNT}"),
        UCMATOSE_PORT,
        &ucmatose_args(&n),
        GUEST_IP,
    );
    assert!(out.out.contains("data transfers complete"), "{}", out.out);
    assert_opcode(&frames, op::SEND, "SEND", GUEST_IP, HOST_IP);
    assert_opcode(&frames, op::SEND, "SEND", HOST_IP, GUEST_IP);
    assert_opcode(&frames, op::ACK, "ACK", GUEST_IP, HOST_IP);
}

/// `ferry rdma peer` options for ucmatose's defaults (port 7471, 100-byte messages).
fn ucmatose_args(n: &str) -> [&str; 8] {
    [
        "--mode",
        "ucmatose",
        "--listen-service",
        "7471",
        "--messages",
        n,
        "--size",
        "100",
    ]
}
