//! End-to-end tests of the virtual RDMA device under KVM: real `ferry` processes (each one a
//! host with its own software RoCEv2 port and CM multiplexer on a loopback address), real VMs
//! running the built-in guest's PVRDMA driver and RDMA agent, real UDP between hosts. Every
//! test uses its own 127.N.*.* block, is bounded in time, and kills what it started, also on
//! failure. The tests run one at a time: each boots several busy-polling VMs.
mod common;
use common::{Stream, PATIENCE};

use std::{
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

static SERIAL: Mutex<()> = Mutex::new(());

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A child process killed on drop, its output collected as it comes.
struct Proc {
    child: Option<Child>,
    what: String,
    out: Stream,
    err: Stream,
}

struct Done {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Proc {
    fn spawn(what: &str, args: &[String]) -> Proc {
        let mut child = ferry()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let out = Stream::collect(child.stdout.take().unwrap());
        let err = Stream::collect(child.stderr.take().unwrap());
        Proc {
            child: Some(child),
            what: what.into(),
            out,
            err,
        }
    }

    /// Waits until the guest consoles on stdout said `needle` `count` times (the RDMA agent
    /// listens once it printed "listening").
    fn wait_for(&self, needle: &str, count: usize) {
        self.out.wait_for(needle, count, PATIENCE);
    }

    /// Waits at most `limit`; panics (killing the child) when it does not end in time.
    fn wait(mut self, limit: Duration) -> Done {
        let mut child = self.child.take().expect("child");
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not end within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.out.finish(Duration::from_secs(10)),
                    self.err.finish(Duration::from_secs(10))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Done {
            code: status.code().unwrap_or(-1),
            stdout: self.out.finish(PATIENCE),
            stderr: self.err.finish(PATIENCE),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `ferry vrdma --json` with `vms`; the JSON report.
fn vrdma_host(addr: &str, vms: &[&str]) -> Proc {
    let mut a = strings(&["vrdma", "--addr", addr, "--json", "--timeout", "60s"]);
    for v in vms {
        a.extend(strings(&["--vm", v]));
    }
    Proc::spawn(&format!("ferry vrdma on {addr}"), &a)
}

fn report(d: &Done) -> serde_json::Value {
    let line = d
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON report\nstdout:\n{}\nstderr:\n{}",
                d.stdout, d.stderr
            )
        });
    serde_json::from_str(line).expect("JSON report")
}

fn vm<'a>(r: &'a serde_json::Value, gid: &str, workload: &str) -> &'a serde_json::Value {
    r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["gid"] == gid && v["workload"] == workload)
        .unwrap_or_else(|| panic!("no {workload} VM {gid} in {r}"))
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn two_vms_on_two_hosts_connect_and_exchange_verified_ud_messages() {
    let _g = lock();
    let server = Proc::spawn(
        "server",
        &strings(&[
            "run",
            "--workload",
            "rdma-server",
            "--memory",
            "64M",
            "--timeout",
            "90s",
            "--vrdma",
            "gid=127.61.1.1,host=127.61.0.1",
            "--rdma-sessions",
            "1",
        ]),
    );
    server.wait_for("listening on port", 1);
    let client = Proc::spawn(
        "client",
        &strings(&[
            "run",
            "--workload",
            "rdma-client",
            "--memory",
            "64M",
            "--timeout",
            "90s",
            "--vrdma",
            "gid=127.61.2.1,host=127.61.0.2",
            "--rdma-peer",
            "127.61.1.1",
            "--rdma-messages",
            "300",
            "--rdma-size",
            "512",
        ]),
    );
    let c = client.wait(LIMIT);
    let s = server.wait(LIMIT);
    assert_eq!(
        c.code, 0,
        "client\nstdout:\n{}\nstderr:\n{}",
        c.stdout, c.stderr
    );
    assert_eq!(
        s.code, 0,
        "server\nstdout:\n{}\nstderr:\n{}",
        s.stdout, s.stderr
    );
    assert!(
        c.stdout
            .contains("300 UD messages of 512 bytes echoed and verified"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("(REQ/REP/RTU)") && c.stdout.contains("disconnected in"));
    assert!(s.stdout.contains("300 UD messages echoed"), "{}", s.stdout);
    // Both hosts routed the CM traffic to their VM.
    for d in [&c, &s] {
        assert!(
            d.stderr.contains("ferry: vrdma: device MADs sent"),
            "{}",
            d.stderr
        );
        assert!(!d.stderr.contains("MADs routed to VMs 0,"), "{}", d.stderr);
    }
}

#[test]
fn two_vms_on_one_host_receive_exactly_their_own_cm_traffic() {
    let _g = lock();
    let servers = vrdma_host(
        "127.62.0.1",
        &[
            "rdma-server,gid=127.62.1.1,sessions=1",
            "rdma-server,gid=127.62.1.2,sessions=1",
        ],
    );
    servers.wait_for("listening on port", 2);
    let clients = vrdma_host(
        "127.62.0.2",
        &[
            "rdma-client,gid=127.62.2.1,peer=127.62.1.1,messages=100",
            "rdma-client,gid=127.62.2.2,peer=127.62.1.2,messages=100",
        ],
    );
    let c = clients.wait(LIMIT);
    let s = servers.wait(LIMIT);
    let (rc, rs) = (report(&c), report(&s));
    assert_eq!(rc["pass"], true, "clients: {rc}\n{}", c.stderr);
    assert_eq!(rs["pass"], true, "servers: {rs}\n{}", s.stderr);
    // Nothing was dropped for lack of an owner or misrouted: every MAD a client sent reached
    // its own server and only it, and the other way round.
    assert_eq!(rs["host"]["mux"]["no_owner"], 0);
    assert_eq!(rs["host"]["mux"]["unknown_comm_id"], 0);
    for i in 1..=2 {
        let sv = vm(&rs, &format!("127.62.1.{i}"), "rdma-server");
        let cl = vm(&rc, &format!("127.62.2.{i}"), "rdma-client");
        let (sd, cd) = (&sv["vrdma"]["device"], &cl["vrdma"]["device"]);
        assert!(
            sd["mads_received"].as_u64().unwrap() >= 4,
            "REQ, RTU, SIDR_REQ, DREQ: {sv}"
        );
        assert_eq!(
            sd["mads_received"], cd["mads_sent"],
            "server {i} got exactly client {i}'s MADs"
        );
        assert_eq!(
            cd["mads_received"], sd["mads_sent"],
            "client {i} got exactly server {i}'s MADs"
        );
        assert_eq!(
            sv["vrdma"]["mux"]["counters"]["delivered"],
            sd["mads_received"]
        );
        assert_eq!(sd["ud_received"], 100);
    }
}

#[test]
fn binding_another_vms_gid_is_refused_and_vm_shutdown_unregisters() {
    let _g = lock();
    let host = vrdma_host(
        "127.63.0.1",
        &[
            // Owns .1.1 until it is stopped after 5 s.
            "rdma-server,gid=127.63.1.1,timeout=5000,expect=124",
            // Tries to take .1.1 while it is owned: refused.
            "rdma-client,gid=127.63.1.2,mode=bind-other,other=127.63.1.1,delay=1500,expect=40",
            // After the first VM's shutdown, .1.1 is free again: a new VM binds it and serves.
            "rdma-server,gid=127.63.1.1,sessions=1,delay=8000",
            "rdma-client,gid=127.63.1.3,peer=127.63.1.1,messages=20,delay=9000",
        ],
    );
    let d = host.wait(LIMIT);
    let r = report(&d);
    assert_eq!(r["pass"], true, "{r}\n{}", d.stderr);
    assert_eq!(r["host"]["mux"]["registrations_refused"], 1);
    let refused = vm(&r, "127.63.1.2", "rdma-client");
    assert_eq!(refused["vrdma"]["device"]["binds_refused"], 1);
    let first = &r["vms"][0];
    assert_eq!(first["outcome"], "timeout");
    assert_eq!(
        first["vrdma"]["gids_at_exit"], 1,
        "its GID was registered when it stopped"
    );
}

#[test]
fn a_send_with_a_source_gid_the_vm_does_not_own_is_refused() {
    let _g = lock();
    let host = vrdma_host(
        "127.64.0.1",
        &[
            "rdma-server,gid=127.64.1.1,sessions=1",
            "rdma-client,gid=127.64.1.2,peer=127.64.1.1,mode=spoof,other=127.64.1.9,delay=1000,expect=40",
            "rdma-client,gid=127.64.1.3,peer=127.64.1.1,messages=20,delay=2000",
        ],
    );
    let d = host.wait(LIMIT);
    let r = report(&d);
    assert_eq!(r["pass"], true, "{r}\n{}", d.stderr);
    assert_eq!(r["host"]["mux"]["refused_spoofed"], 1);
    let spoofer = vm(&r, "127.64.1.2", "rdma-client");
    assert_eq!(spoofer["vrdma"]["device"]["mads_refused"], 1);
    assert_eq!(spoofer["vrdma"]["device"]["mads_sent"], 0);
    // The server saw only the honest client's traffic.
    let server = vm(&r, "127.64.1.1", "rdma-server");
    let honest = vm(&r, "127.64.1.3", "rdma-client");
    assert_eq!(
        server["vrdma"]["device"]["mads_received"],
        honest["vrdma"]["device"]["mads_sent"]
    );
}

#[test]
fn a_bare_metal_peer_connects_to_a_vm() {
    let _g = lock();
    let server = Proc::spawn(
        "server",
        &strings(&[
            "run",
            "--workload",
            "rdma-server",
            "--memory",
            "64M",
            "--timeout",
            "90s",
            "--vrdma",
            "gid=127.65.1.1,host=127.65.0.1",
            "--rdma-sessions",
            "3",
        ]),
    );
    server.wait_for("listening on port", 1);
    let peer = |mode: &str, messages: &str| {
        Proc::spawn(
            "peer",
            &strings(&[
                "rdma",
                "peer",
                "--addr",
                "127.65.0.2",
                "--connect",
                "127.65.1.1",
                "--mode",
                mode,
                "--messages",
                messages,
                "--timeout",
                "30s",
            ]),
        )
        .wait(LIMIT)
    };
    // udaddy-like: SIDR, then UD messages echoed by the VM and verified by the peer.
    let ud = peer("ud", "50");
    assert_eq!(ud.code, 0, "{}\n{}", ud.stdout, ud.stderr);
    assert!(
        ud.stdout.contains("50/50 messages echoed and verified"),
        "{}",
        ud.stdout
    );
    // rping-like: REQ/REP/RTU, then DREQ/DREP, three times (the server exits after three
    // disconnects).
    let rc = peer("rc-connect", "3");
    assert_eq!(rc.code, 0, "{}\n{}", rc.stdout, rc.stderr);
    assert!(rc.stdout.contains("connected"), "{}", rc.stdout);
    let s = server.wait(LIMIT);
    assert_eq!(s.code, 0, "{}\n{}", s.stdout, s.stderr);
    assert!(
        s.stdout
            .contains("3 disconnects, 1 SIDR answered, 50 UD messages echoed"),
        "{}",
        s.stdout
    );
}

#[test]
fn a_hostile_guest_gets_errors_while_the_vmm_and_the_other_vms_keep_working() {
    let _g = lock();
    let host = vrdma_host(
        "127.66.0.1",
        &[
            // .1.3 is configured for a VM that starts later: the hostile VM may not take it.
            "rdma-hostile,gid=127.66.1.9,other=127.66.1.3",
            "rdma-server,gid=127.66.1.1,sessions=1",
            "rdma-server,gid=127.66.1.3,sessions=1,delay=3000",
            "rdma-client,gid=127.66.1.4,peer=127.66.1.3,messages=10,delay=4000",
            "rdma-client,gid=127.66.1.2,peer=127.66.1.1,messages=100,delay=1000",
        ],
    );
    let d = host.wait(LIMIT);
    let r = report(&d);
    assert_eq!(r["pass"], true, "{r}\n{}", d.stderr);
    let hostile = vm(&r, "127.66.1.9", "rdma-hostile");
    assert_eq!(
        hostile["code"], 0,
        "every hostile request was refused: {hostile}"
    );
    let dev = &hostile["vrdma"]["device"];
    assert!(dev["command_errors"].as_u64().unwrap() >= 10, "{dev}");
    assert!(dev["wr_errors"].as_u64().unwrap() >= 3, "{dev}");
    assert_eq!(dev["qp_ring_errors"], 1, "{dev}");
    assert_eq!(dev["binds_refused"], 1, "{dev}");
    assert_eq!(dev["ud_qps_unbound"], 1, "{dev}");
    assert_eq!(dev["ud_sent"], 0, "{dev}");
    assert_eq!(r["host"]["mux"]["registrations_not_allowed"], 1, "{r}");
    let late = vm(&r, "127.66.1.4", "rdma-client");
    assert_eq!(late["vrdma"]["device"]["ud_received"], 10, "{late}");
    assert!(d
        .stdout
        .contains("hostile requests refused, 0 accepted; device still serves commands"));
    let client = vm(&r, "127.66.1.2", "rdma-client");
    assert_eq!(client["vrdma"]["device"]["ud_received"], 100);
}

/// Runs `mode` between a server VM and a client VM on two hosts in 127.`block`.*.*: the
/// outputs of both (which exited 0).
fn rc_pair(block: u8, mode: &str, messages: &str, size: &str) -> (Done, Done) {
    let server = Proc::spawn(
        "server",
        &strings(&[
            "run",
            "--workload",
            "rdma-server",
            "--memory",
            "64M",
            "--timeout",
            "90s",
            "--vrdma",
            &format!("gid=127.{block}.1.1,host=127.{block}.0.1"),
            "--rdma-sessions",
            "1",
            "--rdma-mode",
            mode,
            "--rdma-size",
            size,
        ]),
    );
    server.wait_for("listening on port", 1);
    let client = Proc::spawn(
        "client",
        &strings(&[
            "run",
            "--workload",
            "rdma-client",
            "--memory",
            "64M",
            "--timeout",
            "90s",
            "--vrdma",
            &format!("gid=127.{block}.2.1,host=127.{block}.0.2"),
            "--rdma-peer",
            &format!("127.{block}.1.1"),
            "--rdma-messages",
            messages,
            "--rdma-size",
            size,
            "--rdma-mode",
            mode,
        ]),
    );
    let c = client.wait(LIMIT);
    let s = server.wait(LIMIT);
    for (what, d) in [("client", &c), ("server", &s)] {
        assert_eq!(
            d.code, 0,
            "{mode} {what}\nstdout:\n{}\nstderr:\n{}",
            d.stdout, d.stderr
        );
    }
    (c, s)
}

#[test]
fn two_vms_on_two_hosts_run_rping_ucmatose_and_write_bw_over_rc() {
    let _g = lock();
    // rping: 3000-byte buffers (3 packets at MTU 1024), READ and WRITE, verified by both.
    let (c, s) = rc_pair(67, "rping", "50", "3000");
    assert!(
        c.stdout.contains("messages=50 size=3000 verified=50"),
        "{}",
        c.stdout
    );
    assert!(
        s.stdout
            .contains("disconnected (50 pings, 0 messages verified)")
            && s.stdout.contains("0 wrong"),
        "{}",
        s.stdout
    );
    // ucmatose: 10 SENDs each way, the client sees the server's pattern in all of them,
    // the server its last message in every reply.
    let (c, s) = rc_pair(67, "ucmatose", "10", "100");
    assert!(
        c.stdout
            .contains("10 messages of 100 bytes, 10 with Ferry's pattern")
            && c.stdout.contains("verified=10"),
        "{}",
        c.stdout
    );
    assert!(
        s.stdout.contains("(0 pings, 10 messages verified)"),
        "{}",
        s.stdout
    );
    // write-bw: 500 WRITEs of 64 KiB (16 packets each at MTU 4096), the last with
    // immediate data; the server verifies the buffer.
    let (c, s) = rc_pair(67, "write-bw", "500", "65536");
    assert!(
        c.stdout.contains("500 WRITEs of 65536 bytes")
            && c.stdout.contains("verified=500 bytes=32768000"),
        "{}",
        c.stdout
    );
    assert!(
        s.stdout.contains("(0 pings, 500 messages verified)"),
        "{}",
        s.stdout
    );
}
