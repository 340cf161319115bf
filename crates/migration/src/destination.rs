//! The receiving side: builds the VM from the stream and runs it only once everything arrived
//! and the source committed. Anything invalid ends the migration with an Abort to the source;
//! a half-received VM is never run.
use std::{
    collections::BTreeSet,
    io::{BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use vmm::{memory::GuestRam, state::VmState, Vm, VmConfig};

use crate::{
    channels::{self, Receivers},
    device::DeviceRestorer,
    error::chain,
    hash::memory_hash,
    report::ReceiveReport,
    source::MigrationConfig,
    transport::{self, Conn, Security, Stream},
    wire::{self, Kind, Run, PAGE},
    MigrationError, Result,
};

/// Options of the receiving side: what it accepts, from whom, how long it waits.
#[derive(Clone, Debug)]
pub struct DestinationOptions {
    /// Hash all guest RAM before resuming (for tests comparing with the source's hash).
    pub debug_hash: bool,
    /// Bound on every wait for the source once it is authenticated.
    pub timeout: Duration,
    /// Bound on a connection's TLS handshake, Hello and configuration: a stranger that stalls
    /// is dropped after this.
    pub handshake_timeout: Duration,
    /// Largest guest the destination accepts.
    pub max_ram: u64,
    /// The exact guest RAM size expected, if the operator gave one.
    pub expected_ram: Option<u64>,
    /// Most vCPUs accepted.
    pub max_vcpus: u32,
    /// The devices this destination can rebuild (names); a VM announcing any other is refused.
    pub devices: Vec<String>,
    /// TLS (mutual authentication) or plain TCP.
    pub security: Security,
    /// Connections in their handshake at once; more are closed at once.
    pub max_pending: usize,
    /// Accept a source that asks to send memory compressed (zstd); when false it is refused
    /// in the handshake.
    pub accept_compression: bool,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            debug_hash: false,
            timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_ram: vmm::memory::MAX_RAM_BYTES,
            expected_ram: None,
            max_vcpus: 1,
            devices: Vec::new(),
            security: Security::Plain,
            max_pending: 8,
            accept_compression: true,
        }
    }
}

/// A VM that arrived and runs.
pub struct Incoming {
    /// The running VM.
    pub vm: Vm,
    /// How it arrived.
    pub report: ReceiveReport,
}

/// A source that passed the handshake: authenticated (TLS), speaking this protocol version,
/// announcing a VM within this destination's limits. Nothing is allocated for it yet.
pub struct Accepted {
    tcp: TcpStream,
    tls: bool,
    reader: BufReader<Box<dyn Conn>>,
    config: MigrationConfig,
    source: String,
}

impl Accepted {
    /// The source's address.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the source authenticated with TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

/// Connections that did not become a migration, by reason.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Strangers {
    /// Closed during the handshake, Hello or configuration (each logged with its reason).
    pub refused: u64,
    /// Closed at once because too many handshakes were under way.
    pub overflow: u64,
}

/// Fills `[gpa, gpa + len)` of RAM that no vCPU or device uses yet.
fn fill(ram: &GuestRam, gpa: u64, len: u64, f: impl FnOnce(&mut [u8])) -> Result<()> {
    // SAFETY: the destination VM has not run yet and no device has its memory: nothing else
    // accesses guest RAM while it is filled.
    match unsafe { ram.slice_mut(gpa, len) } {
        Some(dst) => {
            f(dst);
            Ok(())
        }
        None => Err(MigrationError::Protocol(format!(
            "{len} bytes at {gpa:#x} span RAM regions"
        ))),
    }
}

/// Binds the migration listener. A plain (unauthenticated) listener on anything but loopback
/// is refused unless `allow_insecure`.
pub fn listen(addr: &str, security: &Security, allow_insecure: bool) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).map_err(MigrationError::io("listen"))?;
    let local = listener
        .local_addr()
        .map_err(MigrationError::io("listen"))?;
    if !security.is_tls() && !transport::is_loopback(&local) && !allow_insecure {
        return Err(MigrationError::NotMigratable(format!(
            "refusing to listen on {local} without authentication: whoever reaches it could hand \
             this host a VM; configure TLS, listen on loopback, or allow it explicitly (insecure)"
        )));
    }
    Ok(listener)
}

/// Checks a source's announced configuration against this destination's limits.
fn check_config(cfg: &MigrationConfig, opts: &DestinationOptions) -> Result<()> {
    let limit = |m: String| MigrationError::Limit(m);
    vmm::memory::validate_ram_size(cfg.ram_size)?;
    if cfg.ram_size > opts.max_ram {
        return Err(limit(format!(
            "guest of {} bytes exceeds this host's limit of {}",
            cfg.ram_size, opts.max_ram
        )));
    }
    if let Some(want) = opts.expected_ram {
        if cfg.ram_size != want {
            return Err(limit(format!(
                "guest of {} bytes, this destination expects {want}",
                cfg.ram_size
            )));
        }
    }
    if cfg.vcpus == 0 || cfg.vcpus > opts.max_vcpus {
        return Err(limit(format!(
            "{} vCPUs asked; this destination takes 1 to {}",
            cfg.vcpus, opts.max_vcpus
        )));
    }
    if cfg.zstd && !opts.accept_compression {
        return Err(limit(
            "the source asks to send memory compressed (zstd); this destination does not accept \
             compression"
                .into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for name in &cfg.devices {
        if !seen.insert(name) {
            return Err(limit(format!("device {name} announced twice")));
        }
        if !opts.devices.contains(name) {
            return Err(limit(format!(
                "the VM has a device {name} this destination cannot rebuild (it has: {})",
                if opts.devices.is_empty() {
                    "none".to_string()
                } else {
                    opts.devices.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Hello both ways, then the source's configuration, checked against this destination's
/// limits.
pub(crate) fn negotiate(
    reader: &mut BufReader<Box<dyn Conn>>,
    opts: &DestinationOptions,
) -> Result<MigrationConfig> {
    let mut buf = Vec::new();
    match wire::recv(reader, &mut buf)? {
        Kind::Hello => wire::check_hello(&buf)?,
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected Hello first, got {other:?}"
            )))
        }
    }
    wire::send(reader.get_mut(), Kind::Hello, &wire::hello())?;
    reader
        .get_mut()
        .flush()
        .map_err(MigrationError::io("write"))?;
    if wire::recv(reader, &mut buf)? != Kind::Config {
        return Err(MigrationError::Protocol(
            "expected the VM configuration after Hello".into(),
        ));
    }
    let cfg: MigrationConfig = postcard::from_bytes(&buf)
        .map_err(|e| MigrationError::Protocol(format!("configuration does not decode: {e}")))?;
    check_config(&cfg, opts)?;
    Ok(cfg)
}

/// Handshake of one connection: TLS, Hello both ways, configuration within limits.
fn handshake(tcp: TcpStream, opts: &DestinationOptions) -> Result<Accepted> {
    let Stream {
        conn,
        tcp,
        peer,
        tls,
    } = transport::accept(tcp, &opts.security, opts.handshake_timeout)?;
    let source = peer.to_string();
    let mut reader = BufReader::with_capacity(1 << 20, conn);
    let hs = negotiate(&mut reader, opts);
    match hs {
        Ok(config) => {
            tcp.set_read_timeout(Some(opts.timeout))
                .map_err(MigrationError::io("setup"))?;
            tcp.set_write_timeout(Some(opts.timeout))
                .map_err(MigrationError::io("setup"))?;
            Ok(Accepted {
                tcp,
                tls,
                reader,
                config,
                source,
            })
        }
        Err(e) => {
            // Say why to a peer that speaks the protocol (a wrong version, a VM too large).
            let _ = wire::send(reader.get_mut(), Kind::Abort, chain(&e).as_bytes());
            let _ = reader.get_mut().flush();
            Err(e)
        }
    }
}

/// Waits on `listener` for a source that passes the handshake. Every other connection —
/// refused credentials, garbage, another protocol version, a VM over the limits, a peer that
/// stalls past the handshake timeout — is logged and closed, and the wait goes on. Handshakes
/// run concurrently (at most `max_pending`), so a stalled stranger does not hold up the real
/// source. `stop()` is asked about every 50 ms: when it returns a reason, the wait ends with
/// `Err(Cancelled)`; `deadline` bounds the whole wait.
pub fn accept(
    listener: &TcpListener,
    opts: &DestinationOptions,
    strangers: &mut Strangers,
    deadline: Option<Instant>,
    stop: &dyn Fn() -> bool,
) -> Result<Accepted> {
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::io("listen"))?;
    let (tx, rx) = mpsc::channel::<(String, Result<Accepted>)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts.clone());
    loop {
        loop {
            match listener.accept() {
                Ok((tcp, peer)) => {
                    if pending.load(Ordering::SeqCst) >= opts.max_pending {
                        tracing::warn!(%peer, "too many connections in their handshake; closed");
                        strangers.overflow += 1;
                        continue;
                    }
                    let _ = tcp.set_nonblocking(false);
                    pending.fetch_add(1, Ordering::SeqCst);
                    let (tx, pending, opts) = (tx.clone(), pending.clone(), opts.clone());
                    let spawned = std::thread::Builder::new()
                        .name("migration-handshake".into())
                        .spawn(move || {
                            sandbox::enter(sandbox::Kind::Migration);
                            let r = handshake(tcp, &opts);
                            pending.fetch_sub(1, Ordering::SeqCst);
                            let _ = tx.send((peer.to_string(), r));
                        });
                    if spawned.is_err() {
                        strangers.overflow += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A connection reset before accept, out of descriptors: log, go on.
                    tracing::warn!("accepting a migration connection: {e}");
                    break;
                }
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((_, Ok(a))) => {
                tracing::info!(source = %a.source, tls = a.tls, "migration source accepted");
                return Ok(a);
            }
            Ok((peer, Err(e))) => {
                strangers.refused += 1;
                tracing::warn!(%peer, "migration connection refused: {}", chain(&e));
            }
            Err(_) => {}
        }
        if stop() {
            return Err(MigrationError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(MigrationError::Io {
                what: "waiting for a source",
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no source passed the handshake in time",
                ),
            });
        }
    }
}

/// Receives one VM over an accepted connection `stream` (handshake included; a failure there
/// ends this call: use [`accept`] to keep listening past strangers). `config` gives everything
/// but the RAM size (console etc.).
pub fn receive(
    stream: TcpStream,
    config: &VmConfig,
    opts: &DestinationOptions,
    restorer: &mut dyn DeviceRestorer,
) -> Result<Incoming> {
    let accepted = handshake(stream, opts)?;
    receive_accepted(accepted, config, opts, restorer)
}

/// Receives the VM of a source that passed [`accept`].
pub fn receive_accepted(
    accepted: Accepted,
    config: &VmConfig,
    opts: &DestinationOptions,
    restorer: &mut dyn DeviceRestorer,
) -> Result<Incoming> {
    let Accepted {
        tcp,
        tls,
        mut reader,
        config: cfg,
        source,
    } = accepted;
    let result = run(
        &mut reader,
        Some(&tcp),
        &source,
        cfg,
        config,
        opts,
        restorer,
    );
    if let Err(e) = &result {
        tracing::warn!("incoming migration from {source} failed: {}", chain(e));
        // Tell the source why, if it still listens; the VM (if built) is dropped unrun.
        let _ = wire::send(reader.get_mut(), Kind::Abort, chain(e).as_bytes());
        let _ = reader.get_mut().flush();
    }
    drop(tcp);
    result.map(|mut i| {
        i.report.tls = tls;
        i
    })
}

pub(crate) fn run(
    reader: &mut BufReader<Box<dyn Conn>>,
    main: Option<&TcpStream>,
    source: &str,
    cfg: MigrationConfig,
    config: &VmConfig,
    opts: &DestinationOptions,
    restorer: &mut dyn DeviceRestorer,
) -> Result<Incoming> {
    let start = Instant::now();
    let cpu = crate::cpu::ThreadCpu::start();
    let mut buf = Vec::new();
    let mut report = ReceiveReport {
        source: source.to_string(),
        ..Default::default()
    };
    let protocol = |m: String| MigrationError::Protocol(m);
    // Checked again: a caller may have built `cfg` some other way.
    check_config(&cfg, opts)?;
    report.ram_bytes = cfg.ram_size;
    let vm_config = VmConfig {
        ram_size: cfg.ram_size,
        vcpus: 1,
        ..config.clone()
    };
    // The VM is built now, not in the downtime; it stays unstarted (and is dropped unrun on
    // any failure) until the source's Go.
    let mut vm = Vm::with_ram(&vm_config, GuestRam::new(cfg.ram_size)?)?;
    let ram = vm.ram().clone();
    if !cfg.devices.is_empty() {
        let t = Instant::now();
        restorer
            .prepare(&vm, &cfg.devices)
            .map_err(|source| MigrationError::Device {
                name: cfg.devices.join(","),
                source,
            })?;
        tracing::debug!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "devices prepared before the transfer"
        );
    }

    let mut state: Option<VmState> = None;
    let mut devices: Vec<(String, Vec<u8>)> = Vec::new();
    let mut precopied: Vec<String> = Vec::new();
    let mut receivers: Option<Receivers> = None;
    if cfg.streams > 0 {
        // Data channels listen on the main connection's address (an in-memory stream, as
        // the fuzzer's, has none).
        let main = main.ok_or_else(|| {
            MigrationError::Protocol("data channels need a TCP main connection".into())
        })?;
        let ip = main.local_addr().map_err(MigrationError::io("setup"))?.ip();
        let (listener, inv) = channels::invite(ip, cfg.streams.min(channels::MAX_STREAMS))?;
        wire::send(reader.get_mut(), Kind::Channels, &inv.encode())?;
        reader
            .get_mut()
            .flush()
            .map_err(MigrationError::io("write"))?;
        receivers = Some(Receivers::start(
            listener,
            &inv,
            &opts.security,
            &ram,
            main,
            opts.handshake_timeout,
            opts.timeout,
            cfg.zstd,
        )?);
        if let Some(n) = receivers.as_ref().map(|r| r.refused).filter(|&n| n > 0) {
            tracing::warn!(refused = n, "strangers refused on the data channel port");
        }
    }
    report.compressed = cfg.zstd;
    let mut zstd = if cfg.zstd {
        Some(crate::compress::Decompressor::new()?)
    } else {
        None
    };
    let mut unpacked = Vec::new();
    let received = (|| -> Result<()> {
        let mut extents_seen = false;
        loop {
            let kind = wire::recv(reader, &mut buf)?;
            report.bytes += buf.len() as u64 + 12;
            match kind {
                Kind::Memory | Kind::MemoryZstd if receivers.is_some() => {
                    return Err(protocol(
                        "memory on the main connection while data channels are open".into(),
                    ))
                }
                Kind::Extents => {
                    let Some(rx) = receivers.as_mut().filter(|_| !extents_seen) else {
                        return Err(protocol("unexpected Extents".into()));
                    };
                    extents_seen = true;
                    if buf.len() % 16 != 0 {
                        return Err(protocol(format!("Extents of {} bytes", buf.len())));
                    }
                    let mut extents = Vec::with_capacity(buf.len() / 16);
                    for e in buf.chunks_exact(16) {
                        let gpa = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                        let len = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
                        if gpa % PAGE != 0 || len % PAGE != 0 || !ram.contains(gpa, len) {
                            return Err(protocol(format!(
                                "extent of {len} bytes at {gpa:#x} is not guest RAM"
                            )));
                        }
                        extents.push((gpa, len));
                    }
                    rx.populate(&ram, extents);
                }
                Kind::Memory | Kind::MemoryZstd => {
                    let payload = if kind == Kind::MemoryZstd {
                        let d = zstd.as_mut().ok_or_else(|| {
                            protocol("compressed memory, but compression was not negotiated".into())
                        })?;
                        crate::compress::unpack_batch(d, &buf, &mut unpacked)?;
                        &unpacked
                    } else {
                        &buf
                    };
                    let (_, runs) = wire::parse_memory(payload, |gpa, len| ram.contains(gpa, len))?;
                    let mut data_pages = 0;
                    for run in runs {
                        match run {
                            Run::Data { gpa, bytes } => {
                                fill(&ram, gpa, bytes.len() as u64, |dst| {
                                    dst.copy_from_slice(bytes)
                                })?;
                                report.pages += bytes.len() as u64 / PAGE;
                                data_pages += bytes.len() as u64 / PAGE;
                            }
                            Run::Zero { gpa, pages } => {
                                let len = u64::from(pages).checked_mul(PAGE).ok_or_else(|| {
                                    protocol(format!("zero run of {pages} pages"))
                                })?;
                                // A hole, not written zeros: a zero run costs no memory here.
                                if ram.discard(gpa, len).is_err() {
                                    fill(&ram, gpa, len, |dst| dst.fill(0))?;
                                }
                                report.zero_pages += pages as u64;
                            }
                        }
                    }
                    if kind == Kind::MemoryZstd {
                        report.zstd_pages += data_pages;
                    }
                }
                Kind::RoundEnd => {
                    if buf.len() != 20 {
                        return Err(protocol(format!("RoundEnd of {} bytes", buf.len())));
                    }
                    report.rounds += 1;
                }
                Kind::Sync => {
                    let Some(rx) = receivers.as_ref() else {
                        return Err(protocol("Sync without data channels".into()));
                    };
                    if !buf.is_empty() {
                        return Err(protocol(format!("Sync of {} bytes", buf.len())));
                    }
                    let t = Instant::now();
                    rx.wait_rounds(u64::from(report.rounds))?;
                    tracing::debug!(
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        rounds = report.rounds,
                        "data channels caught up"
                    );
                    wire::send(reader.get_mut(), Kind::Synced, &[])?;
                    reader
                        .get_mut()
                        .flush()
                        .map_err(MigrationError::io("write"))?;
                }
                Kind::VmState => {
                    if state.is_some() {
                        return Err(protocol("VM state sent twice".into()));
                    }
                    let s: VmState = postcard::from_bytes(&buf)
                        .map_err(|e| protocol(format!("VM state does not decode: {e}")))?;
                    if s.ram_size != cfg.ram_size {
                        return Err(protocol(format!(
                            "VM state is for {} bytes of RAM, config said {}",
                            s.ram_size, cfg.ram_size
                        )));
                    }
                    state = Some(s);
                }
                Kind::DeviceState => {
                    let (name, blob) = wire::parse_device_payload(&buf)?;
                    if !cfg.devices.iter().any(|d| d == name) {
                        return Err(protocol(format!(
                            "state for device {name} that the configuration did not announce"
                        )));
                    }
                    if devices.iter().any(|(n, _)| n == name) {
                        return Err(protocol(format!("state for device {name} sent twice")));
                    }
                    devices.push((name.to_string(), blob.to_vec()));
                }
                Kind::DevicePrecopy => {
                    let (name, blob) = wire::parse_device_payload(&buf)?;
                    if !cfg.devices.iter().any(|d| d == name) {
                        return Err(protocol(format!(
                            "pre-copy state for device {name} that the configuration did not \
                             announce"
                        )));
                    }
                    if precopied.iter().any(|n| n == name) {
                        return Err(protocol(format!(
                            "pre-copy state for device {name} sent twice"
                        )));
                    }
                    if devices.iter().any(|(n, _)| n == name) {
                        return Err(protocol(format!(
                            "pre-copy state for device {name} after its switchover state"
                        )));
                    }
                    let t = Instant::now();
                    restorer
                        .precopy(&vm, name, blob)
                        .map_err(|source| MigrationError::Device {
                            name: name.to_string(),
                            source,
                        })?;
                    tracing::debug!(
                        device = name,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "device prepared from its pre-copy state"
                    );
                    precopied.push(name.to_string());
                }
                Kind::Complete => {
                    if let Some(rx) = receivers.take() {
                        let t = Instant::now();
                        let st = rx.join()?;
                        tracing::debug!(
                            ms = t.elapsed().as_secs_f64() * 1e3,
                            "switchover: channels joined"
                        );
                        report.pages += st.pages;
                        report.zero_pages += st.zero_pages;
                        report.bytes += st.bytes;
                        report.cpu_s += st.cpu_s;
                        report.zstd_pages += st.zstd_pages;
                    }
                    break;
                }
                Kind::Abort => {
                    return Err(MigrationError::PeerAborted(
                        String::from_utf8_lossy(&buf).into_owned(),
                    ))
                }
                other => {
                    return Err(protocol(format!(
                        "unexpected {other:?} during the transfer"
                    )))
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = received {
        // A data channel that failed stopped the main connection: its reason is the real one.
        return Err(receivers.as_ref().and_then(|r| r.error()).unwrap_or(e));
    }
    let state = state.ok_or_else(|| protocol("Complete without the VM state".into()))?;
    if devices.len() != cfg.devices.len() {
        return Err(protocol(format!(
            "{} of {} device states arrived",
            devices.len(),
            cfg.devices.len()
        )));
    }
    let mut hash_ms = 0.0f64;
    if opts.debug_hash {
        let t = Instant::now();
        report.memory_hash = Some(memory_hash(&ram));
        hash_ms = t.elapsed().as_secs_f64() * 1000.0;
    }
    let t = Instant::now();
    vm.restore_state(&state)?;
    tracing::debug!(
        ms = t.elapsed().as_secs_f64() * 1e3,
        "switchover: VM state restored"
    );
    for (name, blob) in &devices {
        restorer
            .restore(&vm, name, blob)
            .map_err(|source| MigrationError::Device {
                name: name.clone(),
                source,
            })?;
        report.devices.push(name.clone());
    }
    tracing::debug!(
        ms = t.elapsed().as_secs_f64() * 1e3,
        "switchover: devices restored"
    );
    // Ready carries the hashing time and the CPU seconds of this side so far.
    let mut ready = hash_ms.to_le_bytes().to_vec();
    ready.extend_from_slice(&(report.cpu_s + cpu.elapsed().as_secs_f64()).to_le_bytes());
    wire::send(reader.get_mut(), Kind::Ready, &ready)?;
    reader
        .get_mut()
        .flush()
        .map_err(MigrationError::io("write"))?;
    match wire::recv(reader, &mut buf)? {
        Kind::Go => {}
        Kind::Abort => {
            return Err(MigrationError::PeerAborted(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
        other => return Err(protocol(format!("expected Go, got {other:?}"))),
    }
    // A device that died since Ready (its watchdog ended the unstarted VM) would end the VM
    // at once: do not start it, and tell the source, which keeps its paused copy for the
    // operator instead of losing the VM.
    if let Some(outcome) = vm.lifecycle().outcome() {
        return Err(MigrationError::NotMigratable(format!(
            "the VM cannot start here after Go: {outcome}"
        )));
    }
    vm.start()?;
    report.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    let w = reader.get_mut();
    if let Err(e) = wire::send(w, Kind::Resumed, &[])
        .and_then(|_| w.flush().map_err(MigrationError::io("write")))
    {
        // The source committed with Go; it will not run the VM again. Keep running here.
        tracing::warn!("could not confirm the resume to the source: {}", chain(&e));
    }
    report.cpu_s = crate::cpu::side_total(&cpu, report.cpu_s);
    Ok(Incoming { vm, report })
}
