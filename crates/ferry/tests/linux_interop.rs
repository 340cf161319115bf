//! Interoperability harness with Linux RDMA: a Debian kernel with `rdma_rxe` in a QEMU TCG
//! guest on a tap inside a private network namespace (docs/linux-interop.md). These tests prove
//! the harness itself — the guest boots with a RoCEv2 GID, Linux's rdma_cm speaks standard
//! RoCEv2 across the tap as a client and as a server, the captures dissect cleanly and their
//! ICRCs verify — with a minimal RoCEv2 peer written here on a UDP socket in the namespace.
//! Ferry↔Linux tests: linux_interop_vm.rs (udaddy against a Ferry VM) and
//! linux_interop_rc.rs (rping and ucmatose against `ferry rdma peer`).
//!
//! They need root and the packages `scripts/linux-rdma-guest/setup.sh` installs (it runs on the
//! first boot); when that cannot be done they fail with the reason, never pass silently.

#[path = "common/linux_guest.rs"]
mod linux_guest;

#[path = "common/interop.rs"]
mod interop;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::io::AsRawFd,
    time::{Duration, Instant},
};

use interop::check_capture;
use linux_guest::{dissect, roce_frames, LinuxGuest, GUEST_IP, HOST_IP};
use rdma_wire::{
    cm::{
        reason, sidr_status, CmPath, Drep, Dreq, Rej, Rep, Req, Rtu, SidrRep, SidrReq,
        REQ_PRIVATE_DATA_LEN, SIDR_REQ_PRIVATE_DATA_LEN,
    },
    icrc,
    mad::{attr, MadHeader, MAD_SIZE},
    rdma_cm::{parse_service_id, service_id, CmaHeader, PortSpace, RDMA_CM_UD_QKEY},
    Gid, RocePacket, DEFAULT_P_KEY,
};

const ROCE_PORT: u16 = 4791;
/// rdma-core's tools' default rdma_cm port (udaddy, rping).
const TOOL_PORT: u16 = 7174;
/// ucmatose's default port.
const UCMATOSE_PORT: u16 = 7471;
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// A UDP socket on the tap's address, port 4791, inside the guest's namespace, sending with DF
/// from an unconnected socket (IP ID 0), so the ICRC convention of
/// [`icrc::icrc_for_udp_socket`] matches the real headers.
fn roce_socket(g: &LinuxGuest) -> UdpSocket {
    let s = g.in_netns(|| UdpSocket::bind(SocketAddr::new(HOST_IP.into(), ROCE_PORT)));
    let s = s.expect("bind 4791 on the tap's address in the namespace");
    let v: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt on an open socket with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    s
}

/// CM private data starting with rdma_cm's header for a connection from the namespace's
/// `src_port` to the guest.
fn cma_private_data<const N: usize>(src_port: u16) -> [u8; N] {
    let mut pd = [0u8; N];
    CmaHeader::new(HOST_IP.into(), src_port, GUEST_IP.into())
        .and_then(|h| h.write(&mut pd))
        .expect("rdma_cm header");
    pd
}

/// Sends one MAD on QP1 to the guest's port 4791 with a correct ICRC.
fn send_mad(s: &UdpSocket, mad: &[u8; MAD_SIZE], psn: u32) {
    let pkt = RocePacket::ud_mad(mad, DEFAULT_P_KEY, psn);
    let mut buf = [0u8; 512];
    let n = pkt
        .encode_for_udp_socket(
            HOST_IP.into(),
            GUEST_IP.into(),
            ROCE_PORT,
            ROCE_PORT,
            &mut buf,
        )
        .expect("encode a QP1 packet");
    s.send_to(&buf[..n], SocketAddr::new(GUEST_IP.into(), ROCE_PORT))
        .expect("send to the guest");
}

/// Waits for a CM MAD with `attribute` from the guest (other datagrams, e.g. retransmissions,
/// are skipped) and returns it. Fails the test with the guest job's output on timeout.
fn recv_cm(
    g: &LinuxGuest,
    s: &UdpSocket,
    attribute: u16,
    job: linux_guest::GuestJob,
) -> [u8; MAD_SIZE] {
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "no CM message {attribute:#06x} from the guest within {EXCHANGE_TIMEOUT:?}; guest job \
             output:\n{}",
            g.job_output(job)
        );
        assert!(
            !g.finished(job),
            "the guest job ended before sending CM message {attribute:#06x}:\n{}",
            g.job_output(job)
        );
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => panic!("recv on the RoCE socket: {e}"),
        };
        assert_eq!(from.ip(), IpAddr::from(GUEST_IP), "datagram from {from}");
        let pkt = RocePacket::parse(&buf[..n]).expect("the guest sent a well-formed RoCEv2 packet");
        let Some(mad) = pkt.mad() else { continue };
        if MadHeader::parse(mad).expect("MAD header").attribute_id == attribute {
            return *mad;
        }
    }
}

/// One exchange between the guest and the peer in the namespace: the guest, the peer's
/// socket, the guest's tool running in the background and the tap capture.
struct Exchange {
    tag: String,
    t0: Instant,
    g: LinuxGuest,
    s: UdpSocket,
    job: linux_guest::GuestJob,
    cap: linux_guest::Capture,
}

impl Exchange {
    /// Boots a guest and starts `command` in it: a client (captured from its start), or a
    /// server listening on `listen` (captured once it listens).
    fn start(tag: &str, command: &str, listen: Option<u16>) -> Exchange {
        let t0 = Instant::now();
        let mut g = LinuxGuest::boot(tag);
        let s = roce_socket(&g);
        let (job, cap) = match listen {
            Some(port) => {
                let job = g.spawn(command);
                g.wait_cm_listen(port);
                (job, g.capture(tag))
            }
            None => {
                let cap = g.capture(tag);
                (g.spawn(command), cap)
            }
        };
        Exchange {
            tag: tag.to_string(),
            t0,
            g,
            s,
            job,
            cap,
        }
    }

    /// Waits for a CM message with `attribute` from the guest.
    fn recv(&self, attribute: u16) -> [u8; MAD_SIZE] {
        recv_cm(&self.g, &self.s, attribute, self.job)
    }

    /// Waits for the guest's tool to end and returns what it left.
    fn wait_tool(&mut self) -> linux_guest::GuestOutput {
        self.g.wait(self.job, EXCHANGE_TIMEOUT)
    }

    /// Stops the capture and checks it ([`check_capture`]).
    fn finish(self, expect: &[(u16, Ipv4Addr, Ipv4Addr)]) {
        let pcap = self.cap.stop();
        let n = check_capture(&pcap, expect).len();
        eprintln!(
            "linux guest: boot {:?}, {} test {:?}, {n} RoCE frames",
            self.g.boot_time(),
            self.tag,
            self.t0.elapsed()
        );
    }
}

#[test]
fn guest_boots_with_rxe0_and_a_roce_v2_gid() {
    let t0 = Instant::now();
    let mut g = LinuxGuest::boot("boot");
    eprintln!(
        "linux guest: rxe0 up {:?} after starting QEMU",
        g.boot_time()
    );

    let link = g.run("rdma link").ok("rdma link").out;
    assert!(
        link.contains("link rxe0/1 state ACTIVE") && link.contains("netdev eth0"),
        "rdma link: {link}"
    );
    let devices = g.run("ibv_devices").ok("ibv_devices").out;
    assert!(devices.contains("rxe0"), "ibv_devices: {devices}");
    let gid = g
        .run(
            "cd /sys/class/infiniband/rxe0/ports/1 && for i in 0 1 2 3; do \
             echo \"$(cat gids/$i) $(cat gid_attrs/types/$i 2>/dev/null)\"; done",
        )
        .ok("reading the GID table")
        .out;
    assert!(
        gid.lines()
            .any(|l| l.trim() == "0000:0000:0000:0000:0000:ffff:0a4d:0002 RoCE v2"),
        "no RoCEv2 GID ::ffff:{GUEST_IP} on rxe0: {gid}"
    );
    let info = g.run("ibv_devinfo -d rxe0").ok("ibv_devinfo").out;
    assert!(info.contains("PORT_ACTIVE"), "ibv_devinfo: {info}");

    // RC works inside the guest (rxe loopback): rping's RDMA READ/WRITE ping-pong with data
    // verification, and ucmatose's sends, both tools as server and client.
    let server = g.spawn(&format!("rping -s -a {GUEST_IP} -C 3 -v"));
    g.wait_cm_listen(TOOL_PORT);
    let client = g
        .run(&format!("rping -c -a {GUEST_IP} -C 3 -v -V"))
        .ok("rping client in the guest");
    assert!(
        client.out.contains("ping data: rdma-ping-2"),
        "rping: {}",
        client.out
    );
    g.wait(server, EXCHANGE_TIMEOUT)
        .ok("rping server in the guest");
    let server = g.spawn(&format!("ucmatose -b {GUEST_IP}"));
    g.wait_cm_listen(UCMATOSE_PORT);
    g.run(&format!("ucmatose -s {GUEST_IP}"))
        .ok("ucmatose client in the guest");
    g.wait(server, EXCHANGE_TIMEOUT)
        .ok("ucmatose server in the guest");

    // The guest reaches the namespace over the tap, and the other way round.
    g.run(&format!("ping -c 1 -W 30 {HOST_IP}"))
        .ok("ping from the guest to the namespace");
    let second = Ipv4Addr::new(10, 77, 0, 3);
    g.add_host_address(second);
    g.run(&format!("ping -c 1 -W 30 {second}"))
        .ok("ping from the guest to a second namespace address");
    let arp = g
        .netns_command("ip")
        .args(["neigh", "show", &GUEST_IP.to_string()])
        .output()
        .expect("run ip neigh in the namespace");
    let arp = String::from_utf8_lossy(&arp.stdout);
    assert!(
        arp.contains("52:54:00:77:00:02"),
        "the namespace has no neighbour entry for the guest: {arp}"
    );
    let ns = g.netns().to_string();
    drop(g);
    assert!(
        !std::path::Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind"
    );
    eprintln!("linux guest: boot test took {:?}", t0.elapsed());
}

/// Linux as the client: the guest's `udaddy` resolves a UD service at the namespace's address.
/// The peer here answers its SIDR_REQ; udaddy completes (it accepted the SIDR_REP, whose ICRC
/// rxe checked) and the capture shows both messages, dissected cleanly, with valid ICRCs.
#[test]
fn linux_udaddy_client_resolves_a_service_across_the_tap() {
    let mut x = Exchange::start("udaddy-client", &format!("udaddy -s {HOST_IP} -C 0"), None);
    let req = SidrReq::parse(&x.recv(attr::SIDR_REQ)).expect("SIDR_REQ");
    assert_eq!(
        parse_service_id(req.service_id),
        Some((PortSpace::Udp, TOOL_PORT)),
        "service ID {:#x}",
        req.service_id
    );
    let cma = CmaHeader::parse(&req.private_data).expect("rdma_cm header in the SIDR_REQ");
    assert_eq!(cma.src_ip(), IpAddr::from(GUEST_IP));
    assert_eq!(cma.dst_ip(), IpAddr::from(HOST_IP));

    let rep = SidrRep {
        hdr: MadHeader::cm(attr::SIDR_REP, req.hdr.transaction_id),
        request_id: req.request_id,
        status: sidr_status::SUCCESS,
        qpn: 0x4242,
        service_id: req.service_id,
        qkey: RDMA_CM_UD_QKEY,
        ..SidrRep::default()
    };
    send_mad(&x.s, &rep.to_mad(), 1);

    let out = x.wait_tool();
    assert_eq!(out.rc, 0, "udaddy client failed:\n{}", out.out);
    assert!(out.out.contains("return status 0"), "udaddy: {}", out.out);
    x.finish(&[
        (attr::SIDR_REQ, GUEST_IP, HOST_IP),
        (attr::SIDR_REP, HOST_IP, GUEST_IP),
    ]);
}

/// Linux as the server: `udaddy` listens in the guest; a SIDR_REQ sent from the namespace gets
/// a successful SIDR_REP naming its UD QP and rdma_cm's Q_Key, and the server completes.
#[test]
fn linux_udaddy_server_is_reachable_from_the_namespace() {
    let mut x = Exchange::start(
        "udaddy-server",
        &format!("udaddy -b {GUEST_IP} -C 0"),
        Some(TOOL_PORT),
    );
    let private_data = cma_private_data::<{ SIDR_REQ_PRIVATE_DATA_LEN }>(40001);
    let req = SidrReq {
        hdr: MadHeader::cm(attr::SIDR_REQ, 0x0000_0001_0000_0007),
        request_id: 0x5151_0001,
        p_key: DEFAULT_P_KEY,
        service_id: service_id(PortSpace::Udp, TOOL_PORT),
        private_data,
    };
    send_mad(&x.s, &req.to_mad(), 7);

    let rep = SidrRep::parse(&x.recv(attr::SIDR_REP)).expect("SIDR_REP");
    assert_eq!(rep.request_id, req.request_id);
    assert_eq!(rep.status, sidr_status::SUCCESS, "SIDR_REP status");
    assert_eq!(rep.qkey, RDMA_CM_UD_QKEY);
    assert!(rep.qpn > 1, "SIDR_REP names QP {:#x}", rep.qpn);

    let out = x.wait_tool();
    assert_eq!(out.rc, 0, "udaddy server failed:\n{}", out.out);
    x.finish(&[
        (attr::SIDR_REQ, HOST_IP, GUEST_IP),
        (attr::SIDR_REP, GUEST_IP, HOST_IP),
    ]);
}

/// Linux as an RC client: the guest's `rping` connects to the namespace's address; the REQ
/// it sends carries rdma_cm's service ID and header and RoCEv2 GIDs for both ends, and the
/// REJ sent back reaches rping (it reports the rejection).
#[test]
fn linux_rping_client_connect_request_is_answered_from_the_namespace() {
    let mut x = Exchange::start(
        "rping-client",
        &format!("rping -c -a {HOST_IP} -C 1 -v"),
        None,
    );
    let req = Req::parse(&x.recv(attr::REQ)).expect("REQ");
    assert_eq!(
        parse_service_id(req.service_id),
        Some((PortSpace::Tcp, TOOL_PORT)),
        "service ID {:#x}",
        req.service_id
    );
    assert_eq!(req.transport_service_type, 0, "RC");
    assert!(req.local_qpn > 1, "REQ names QP {:#x}", req.local_qpn);
    assert_eq!(req.primary_path.local_gid, Gid::from_ipv4(GUEST_IP));
    assert_eq!(req.primary_path.remote_gid, Gid::from_ipv4(HOST_IP));
    let cma = CmaHeader::parse(&req.private_data).expect("rdma_cm header in the REQ");
    assert_eq!(cma.src_ip(), IpAddr::from(GUEST_IP));
    assert_eq!(cma.dst_ip(), IpAddr::from(HOST_IP));

    let rej = Rej {
        hdr: MadHeader::cm(attr::REJ, req.hdr.transaction_id),
        local_comm_id: 0x7e57_0002,
        remote_comm_id: req.local_comm_id,
        message_rejected: 0,
        reason: reason::CONSUMER_DEFINED,
        ..Rej::default()
    };
    send_mad(&x.s, &rej.to_mad(), 2);

    let out = x.wait_tool();
    assert_ne!(
        out.rc, 0,
        "rping cannot succeed against a REJ:\n{}",
        out.out
    );
    assert!(
        out.out.contains("RDMA_CM_EVENT_REJECTED"),
        "rping did not see the REJ:\n{}",
        out.out
    );

    x.finish(&[
        (attr::REQ, GUEST_IP, HOST_IP),
        (attr::REJ, HOST_IP, GUEST_IP),
    ]);
}

/// Linux as an RC server: `ucmatose` listens in the guest; the namespace's peer connects
/// (REQ), gets the REP, completes with an RTU, and answers the server's DREQ with a DREP —
/// a whole reliable-connection lifecycle with rdma_cm, which ends the server cleanly.
#[test]
fn linux_ucmatose_server_accepts_and_closes_a_connection_from_the_namespace() {
    let mut x = Exchange::start(
        "ucmatose-server",
        &format!("ucmatose -b {GUEST_IP} -C 0"),
        Some(UCMATOSE_PORT),
    );
    let private_data = cma_private_data::<{ REQ_PRIVATE_DATA_LEN }>(40002);
    const OUR_QPN: u32 = 0x99;
    // The fields rdma_cm fills in on Linux (see shared rping.pcap), with our addresses.
    let req = Req {
        hdr: MadHeader::cm(attr::REQ, 0x0000_0001_0000_0011),
        local_comm_id: 0x7e57_0001,
        service_id: service_id(PortSpace::Tcp, UCMATOSE_PORT),
        local_ca_guid: 0x0200_00ff_fe4d_0001,
        local_qpn: OUR_QPN,
        responder_resources: 1,
        initiator_depth: 1,
        remote_cm_response_timeout: 20,
        starting_psn: 0x12_3456,
        local_cm_response_timeout: 20,
        retry_count: 7,
        p_key: DEFAULT_P_KEY,
        path_mtu: 3,
        rnr_retry_count: 7,
        max_cm_retries: 15,
        primary_path: CmPath {
            local_lid: 0xffff,
            remote_lid: 0xffff,
            local_gid: Gid::from_ipv4(HOST_IP),
            remote_gid: Gid::from_ipv4(GUEST_IP),
            packet_rate: 0x1f,
            hop_limit: 0x40,
            local_ack_timeout: 0x13,
            ..CmPath::default()
        },
        private_data,
        ..Req::default()
    };
    send_mad(&x.s, &req.to_mad(), 0x11);

    let rep = Rep::parse(&x.recv(attr::REP)).expect("REP");
    assert_eq!(rep.remote_comm_id, req.local_comm_id, "REP answers our REQ");
    assert!(rep.local_qpn > 1, "REP names QP {:#x}", rep.local_qpn);
    let rtu = Rtu {
        hdr: MadHeader::cm(attr::RTU, 0x0000_0001_0000_0012),
        local_comm_id: req.local_comm_id,
        remote_comm_id: rep.local_comm_id,
        ..Rtu::default()
    };
    send_mad(&x.s, &rtu.to_mad(), 0x12);

    // ucmatose -C 0 disconnects as soon as the connection is established.
    let dreq = Dreq::parse(&x.recv(attr::DREQ)).expect("DREQ");
    assert_eq!(dreq.remote_comm_id, req.local_comm_id);
    assert_eq!(dreq.local_comm_id, rep.local_comm_id);
    assert_eq!(dreq.remote_qpn, OUR_QPN);
    let drep = Drep {
        hdr: MadHeader::cm(attr::DREP, dreq.hdr.transaction_id),
        local_comm_id: req.local_comm_id,
        remote_comm_id: rep.local_comm_id,
        ..Drep::default()
    };
    send_mad(&x.s, &drep.to_mad(), 0x13);

    let out = x.wait_tool();
    assert_eq!(out.rc, 0, "ucmatose server failed:\n{}", out.out);
    assert!(out.out.contains("return status 0"), "ucmatose: {}", out.out);

    x.finish(&[
        (attr::REQ, HOST_IP, GUEST_IP),
        (attr::REP, GUEST_IP, HOST_IP),
        (attr::RTU, HOST_IP, GUEST_IP),
        (attr::DREQ, GUEST_IP, HOST_IP),
        (attr::DREP, HOST_IP, GUEST_IP),
    ]);
}

/// The capture checks themselves fail on what they must catch: tshark's malformed-packet
/// flag (a truncated BTH) and a wrong ICRC.
#[test]
fn capture_checks_catch_malformed_frames_and_bad_icrcs() {
    linux_guest::setup();
    let dir = std::env::temp_dir().join(format!("ferry-capture-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let frame = |payload: &[u8]| -> Vec<u8> {
        let udp_len = 8 + payload.len() as u16;
        let mut f = vec![
            0x52, 0x54, 0, 0x77, 0, 1, 0x52, 0x54, 0, 0x77, 0, 2, 0x08, 0x00,
        ];
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        let total = 20 + udp_len;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&GUEST_IP.octets());
        f.extend_from_slice(&HOST_IP.octets());
        f.extend_from_slice(&49152u16.to_be_bytes());
        f.extend_from_slice(&ROCE_PORT.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    };
    let pcap = |name: &str, frames: &[Vec<u8>]| -> std::path::PathBuf {
        let mut b = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for f in frames {
            for v in [0u32, 0, f.len() as u32, f.len() as u32] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(f);
        }
        let p = dir.join(name);
        std::fs::write(&p, b).expect("write pcap");
        p
    };

    // A truncated BTH: tshark calls it malformed.
    let d = dissect(&pcap("short.pcap", &[frame(&[0x64, 0, 0xff, 0xff, 0, 0])]));
    assert_eq!(d.bad.len(), 1, "tshark did not flag a truncated BTH: {d:?}");

    // A QP1 MAD with its ICRC computed over the real headers verifies; one flipped byte fails.
    let mad = SidrReq::default().to_mad();
    let mut buf = [0u8; 512];
    let n = RocePacket::ud_mad(&mad, DEFAULT_P_KEY, 1)
        .encode_for_udp_socket(GUEST_IP.into(), HOST_IP.into(), 49152, ROCE_PORT, &mut buf)
        .expect("encode");
    let good = frame(&buf[..n]);
    let mut bad = good.clone();
    let last = bad.len() - 8;
    bad[last] ^= 1;
    let frames = roce_frames(&pcap("icrc.pcap", &[good, bad]));
    assert_eq!(frames.len(), 2);
    assert!(icrc::verify(
        &frames[0].ip_header,
        &frames[0].udp_header,
        &frames[0].payload
    )
    .is_ok());
    assert!(icrc::verify(
        &frames[1].ip_header,
        &frames[1].udp_header,
        &frames[1].payload
    )
    .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
