//! The destination against hostile peers: configurations over the operator's limits, duplicate
//! device states, runs outside RAM, strangers before the real source (no credentials, wrong
//! credentials, garbage, a peer that stalls), and TLS with mutual authentication end to end.
mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use migration::{
    source::MigrationConfig,
    wire::{self, Kind, MemoryBatch},
    DestinationOptions, MigrationError, NoDevices, Security, SourceOptions, TlsFiles,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use vmm::{Vm, VmConfig};

fn config() -> VmConfig {
    common::config(64 << 20)
}

/// A destination thread receiving one connection with `opts`; returns its result.
fn destination(
    opts: DestinationOptions,
) -> (
    String,
    std::thread::JoinHandle<migration::Result<migration::ReceiveReport>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        migration::receive(stream, &config(), &opts, &mut NoDevices).map(|i| i.report)
    });
    (addr, h)
}

/// A fake source: connects, says Hello, reads the destination's Hello.
fn fake_source(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    wire::send(&mut s, Kind::Hello, &wire::hello()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(wire::recv(&mut s, &mut buf).unwrap(), Kind::Hello);
    s
}

fn send_config(s: &mut TcpStream, ram_size: u64, vcpus: u32, devices: &[&str]) {
    send_config_zstd(s, ram_size, vcpus, devices, false);
}

fn send_config_zstd(s: &mut TcpStream, ram_size: u64, vcpus: u32, devices: &[&str], zstd: bool) {
    let cfg = MigrationConfig {
        ram_size,
        vcpus,
        devices: devices.iter().map(|d| d.to_string()).collect(),
        streams: 0,
        zstd,
    };
    wire::send(s, Kind::Config, &postcard::to_allocvec(&cfg).unwrap()).unwrap();
}

/// The destination's Abort message (it says why before closing).
fn abort_reason(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        match wire::recv(s, &mut buf) {
            Ok(Kind::Abort) => return String::from_utf8_lossy(&buf).into_owned(),
            Ok(_) => continue,
            Err(e) => panic!("no Abort from the destination: {e}"),
        }
    }
}

fn limits() -> DestinationOptions {
    DestinationOptions {
        max_ram: 256 << 20,
        devices: vec!["nvme0".into()],
        ..Default::default()
    }
}

#[test]
fn configurations_over_the_limits_are_refused_before_anything_is_allocated() {
    let cases: &[(u64, u32, &[&str], &str)] = &[
        (60 << 30, 1, &[], "exceeds this host's limit"),
        (512 << 20, 1, &[], "exceeds this host's limit"),
        ((64 << 20) + 4096, 1, &[], "2 MiB"),
        (64 << 20, 0, &[], "vCPUs"),
        (64 << 20, 64, &[], "vCPUs"),
        (64 << 20, 1, &["gpu0"], "cannot rebuild"),
        (64 << 20, 1, &["nvme0", "nvme0"], "announced twice"),
    ];
    for &(ram, vcpus, devices, why) in cases {
        let (addr, dest) = destination(limits());
        let mut s = fake_source(&addr);
        send_config(&mut s, ram, vcpus, devices);
        let reason = abort_reason(&mut s);
        assert!(reason.contains(why), "{ram} {vcpus} {devices:?}: {reason}");
        let err = dest.join().unwrap().unwrap_err();
        assert!(
            matches!(err, MigrationError::Limit(_) | MigrationError::Vmm(_)),
            "{err:?}"
        );
    }
    // An exact size the operator expects.
    let (addr, dest) = destination(DestinationOptions {
        expected_ram: Some(128 << 20),
        ..limits()
    });
    let mut s = fake_source(&addr);
    send_config(&mut s, 64 << 20, 1, &[]);
    assert!(abort_reason(&mut s).contains("expects"));
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn compression_is_negotiated_and_a_decompression_bomb_is_refused() {
    // A destination that does not accept compression says so in the handshake.
    let (addr, dest) = destination(DestinationOptions {
        accept_compression: false,
        ..limits()
    });
    let mut s = fake_source(&addr);
    send_config_zstd(&mut s, 64 << 20, 1, &[], true);
    let reason = abort_reason(&mut s);
    assert!(reason.contains("does not accept compression"), "{reason}");
    assert!(matches!(
        dest.join().unwrap().unwrap_err(),
        MigrationError::Limit(_)
    ));

    // Compressed memory without compression negotiated is refused.
    let (addr, dest) = destination(limits());
    let mut s = fake_source(&addr);
    send_config(&mut s, 64 << 20, 1, &[]);
    let mut z = 4096u32.to_le_bytes().to_vec();
    z.extend_from_slice(&zstd::bulk::compress(&[1u8; 4096], 1).unwrap());
    let _ = wire::send(&mut s, Kind::MemoryZstd, &z);
    assert!(abort_reason(&mut s).contains("not negotiated"));
    assert!(dest.join().is_ok());

    // A bomb: a frame that inflates to 256 MiB announced as one batch's worth. The
    // destination stops at the announced bound and refuses it, with a reason.
    let (addr, dest) = destination(limits());
    let mut s = fake_source(&addr);
    send_config_zstd(&mut s, 64 << 20, 1, &[], true);
    let mut bomb = (64u32 << 10).to_le_bytes().to_vec();
    bomb.extend_from_slice(&zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap());
    let _ = wire::send(&mut s, Kind::MemoryZstd, &bomb);
    let reason = abort_reason(&mut s);
    assert!(reason.contains("compressed memory refused"), "{reason}");
    let err = dest.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::Compressed(_)), "{err:?}");
    // And a length over the bound is refused before anything is decoded.
    let (addr, dest) = destination(limits());
    let mut s = fake_source(&addr);
    send_config_zstd(&mut s, 64 << 20, 1, &[], true);
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    let _ = wire::send(&mut s, Kind::MemoryZstd, &huge);
    assert!(abort_reason(&mut s).contains("announces"));
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn duplicate_and_unannounced_device_states_are_refused() {
    for (frames, why) in [
        (vec!["nvme0", "nvme0"], "sent twice"),
        (vec!["nvme1"], "did not announce"),
    ] {
        let (addr, dest) = destination(limits());
        let mut s = fake_source(&addr);
        send_config(&mut s, 64 << 20, 1, &["nvme0"]);
        for name in frames {
            let mut payload = (name.len() as u16).to_le_bytes().to_vec();
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&[0xab; 64]);
            // The destination may already have closed after the first bad frame.
            let _ = wire::send(&mut s, Kind::DeviceState, &payload);
        }
        assert!(abort_reason(&mut s).contains(why));
        let err = dest.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn misplaced_device_precopy_states_are_refused() {
    let frame = |kind: Kind, name: &str| (kind, wire::device_payload(name, &[0xcd; 32]).unwrap());
    for (frames, why) in [
        (
            vec![
                frame(Kind::DevicePrecopy, "nvme0"),
                frame(Kind::DevicePrecopy, "nvme0"),
            ],
            "sent twice",
        ),
        (
            vec![frame(Kind::DevicePrecopy, "nvme1")],
            "did not announce",
        ),
        (
            vec![
                frame(Kind::DeviceState, "nvme0"),
                frame(Kind::DevicePrecopy, "nvme0"),
            ],
            "after its switchover state",
        ),
        (
            vec![(Kind::DevicePrecopy, vec![9, 0, b'n'])],
            "malformed name",
        ),
    ] {
        let (addr, dest) = destination(limits());
        let mut s = fake_source(&addr);
        send_config(&mut s, 64 << 20, 1, &["nvme0"]);
        for (kind, payload) in frames {
            // The destination may already have closed after the first bad frame.
            let _ = wire::send(&mut s, kind, &payload);
        }
        assert!(abort_reason(&mut s).contains(why), "{why}");
        let err = dest.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn zero_runs_cost_no_memory_and_runs_outside_ram_are_refused() {
    let (addr, dest) = destination(limits());
    let mut s = fake_source(&addr);
    send_config(&mut s, 64 << 20, 1, &[]);
    // Zero runs over all of RAM: holes, not written zeros.
    let mut batch = MemoryBatch::new(1);
    batch.push_zero(0, (64 << 20) / 4096);
    wire::send(&mut s, Kind::Memory, batch.finish()).unwrap();
    // Then a run past the end of RAM.
    let mut batch = MemoryBatch::new(1);
    batch.push_zero(60 << 20, u32::MAX);
    wire::send(&mut s, Kind::Memory, batch.finish()).unwrap();
    let reason = abort_reason(&mut s);
    assert!(reason.contains("invalid migration stream"), "{reason}");
    let err = dest.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::Protocol(_)), "{err:?}");
}

/// Test certificates in a temporary directory.
struct Pki {
    dir: PathBuf,
}

/// A CA: its certificate (also written as `{name}.crt`) and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    path: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ferry-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Pki { dir }
    }

    fn write(&self, name: &str, pem: String) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    fn ca(&self, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        let path = self.write(&format!("{name}.crt"), cert.pem());
        Ca { cert, key, path }
    }

    /// A node certificate for 127.0.0.1/localhost (server and client use) signed by `ca`,
    /// trusting `trust`.
    fn node(&self, ca: &Ca, name: &str, trust: &Ca) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
        TlsFiles {
            cert: self.write(&format!("{name}.crt"), cert.pem()),
            key: self.write(&format!("{name}.key"), key.serialize_pem()),
            ca: trust.path.clone(),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls(files: &TlsFiles) -> Security {
    Security::from_files(Some(files)).unwrap()
}

fn dirty_vm() -> Vm {
    common::dirty_vm(64 << 20, 8 << 20, 3)
}

#[test]
fn strangers_are_refused_and_the_authenticated_source_migrates() {
    let pki = Pki::new("strangers");
    let ca = pki.ca("ca");
    let rogue_ca = pki.ca("rogue-ca");
    let dest_files = pki.node(&ca, "dest", &ca);
    let src_files = pki.node(&ca, "src", &ca);
    // Signed by a CA the destination does not trust.
    let rogue = pki.node(&rogue_ca, "rogue", &ca);
    // A source that trusts only the rogue CA, so not the destination.
    let distrusting = pki.node(&ca, "distrusting", &rogue_ca);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = DestinationOptions {
        security: tls(&dest_files),
        handshake_timeout: Duration::from_secs(60),
        debug_hash: true,
        ..Default::default()
    };
    let dest = std::thread::spawn(move || {
        let mut strangers = migration::Strangers::default();
        let accepted = migration::accept(
            &listener,
            &opts,
            &mut strangers,
            Some(Instant::now() + Duration::from_secs(120)),
            &|| false,
        )
        .unwrap();
        let incoming =
            migration::receive_accepted(accepted, &config(), &opts, &mut NoDevices).unwrap();
        (incoming, strangers)
    });

    // A peer that connects and stalls: it must not hold up anyone.
    let _stalled = TcpStream::connect(&addr).unwrap();
    // Garbage instead of a TLS handshake.
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0x5a; 4096]).unwrap();
    // A plain-TCP Ferry source (no credentials).
    let mut plain = TcpStream::connect(&addr).unwrap();
    let _ = wire::send(&mut plain, Kind::Hello, &wire::hello());
    // Each is closed by the destination (it reads end-of-stream or a reset).
    for peer in [&mut garbage, &mut plain] {
        peer.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut sink = Vec::new();
        let _ = peer.read_to_end(&mut sink);
    }

    let vm = dirty_vm();
    // Wrong credentials: a certificate from a CA the destination does not trust.
    let opts = |files: &TlsFiles| SourceOptions {
        security: tls(files),
        timeout: Duration::from_secs(60),
        debug_hash: true,
        ..Default::default()
    };
    let err = migration::migrate(&vm, &mut [], &addr, &opts(&rogue), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, MigrationError::Tls { .. } | MigrationError::Io { .. }),
        "{err:?}"
    );
    // A source that does not trust the destination's certificate refuses it.
    let err =
        migration::migrate(&vm, &mut [], &addr, &opts(&distrusting), &mut |_| {}).unwrap_err();
    assert!(matches!(err, MigrationError::Tls { .. }), "{err:?}");
    // Each failure left the VM running here.
    let before = vm.mailbox().progress().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.mailbox().progress().unwrap() == before {
        assert!(Instant::now() < deadline, "the source VM is not running");
        std::thread::yield_now();
    }

    // The real source, with the stalled peer still connected.
    let report = migration::migrate(&vm, &mut [], &addr, &opts(&src_files), &mut |_| {}).unwrap();
    assert_eq!(report.outcome, migration::Outcome::Completed);
    assert!(report.tls);
    let (incoming, strangers) = dest.join().unwrap();
    assert!(incoming.report.tls);
    assert_eq!(incoming.report.memory_hash, report.memory_hash);
    // Garbage, plain, rogue and distrusting (the stalled one may still be waiting).
    assert!(strangers.refused >= 4, "{strangers:?}");
}

#[test]
fn a_plain_listener_off_loopback_needs_an_explicit_choice() {
    let err = migration::listen("0.0.0.0:0", &Security::Plain, false).unwrap_err();
    assert!(err.to_string().contains("without authentication"), "{err}");
    assert!(migration::listen("0.0.0.0:0", &Security::Plain, true).is_ok());
    assert!(migration::listen("127.0.0.1:0", &Security::Plain, false).is_ok());
}

#[test]
fn a_plain_source_refuses_a_destination_off_loopback() {
    let vm = dirty_vm();
    // Nothing needs to listen: the refusal comes before connecting. 192.0.2.1 is TEST-NET-1,
    // never routed, so even a wrong implementation would send nothing anywhere.
    let err = migration::migrate(
        &vm,
        &mut [],
        "192.0.2.1:7000",
        &SourceOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, MigrationError::NotMigratable(_)), "{err:?}");
}

/// A destination that takes everything, says Ready, reads Go and vanishes without Resumed.
fn vanishing_after_go() -> (String, std::thread::JoinHandle<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        assert_eq!(wire::recv(&mut s, &mut buf).unwrap(), Kind::Hello);
        wire::send(&mut s, Kind::Hello, &wire::hello()).unwrap();
        while wire::recv(&mut s, &mut buf).unwrap() != Kind::Complete {}
        wire::send(&mut s, Kind::Ready, &[]).unwrap();
        let got_go = wire::recv(&mut s, &mut buf).unwrap() == Kind::Go;
        let _ = s.shutdown(std::net::Shutdown::Both);
        got_go
    });
    (addr, h)
}

#[test]
fn after_go_without_confirmation_the_source_stays_paused_until_told() {
    let vm = dirty_vm();
    let (addr, dest) = vanishing_after_go();
    let report = migration::migrate(
        &vm,
        &mut [],
        &addr,
        &SourceOptions {
            timeout: Duration::from_secs(60),
            // The fake destination speaks the main connection only.
            streams: 0,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(dest.join().unwrap(), "the destination got Go");
    assert_eq!(report.outcome, migration::Outcome::Unknown);
    assert!(report.unknown_reason.is_some());
    // Paused: the guest's progress counter does not move, however long we look. The vCPU
    // thread is parked (pause() returns once it is), so one read now and one after the
    // destination's thread ended are enough; no timing is assumed.
    let a = vm.mailbox().progress().unwrap();
    std::thread::yield_now();
    assert_eq!(
        vm.mailbox().progress().unwrap(),
        a,
        "the source ran on its own"
    );
    // The operator's forced resume.
    vm.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.mailbox().progress().unwrap() == a {
        assert!(Instant::now() < deadline, "the VM did not resume");
        std::thread::yield_now();
    }
}
