//! The receiving side: builds the VM from the stream and runs it only once everything arrived
//! and the source committed. Anything invalid ends the migration with an Abort to the source;
//! a half-received VM is never run.
use std::{
    io::{BufReader, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use vmm::{memory::GuestRam, state::VmState, Vm, VmConfig};

use crate::{
    device::DeviceRestorer,
    hash::memory_hash,
    report::ReceiveReport,
    source::MigrationConfig,
    wire::{self, Kind, Run, PAGE},
    MigrationError, Result,
};

/// Options of the receiving side.
#[derive(Clone, Debug)]
pub struct DestinationOptions {
    /// Hash all guest RAM before resuming (for tests comparing with the source's hash).
    pub debug_hash: bool,
    /// Bound on every wait for the source.
    pub timeout: Duration,
    /// Largest guest the destination accepts.
    pub max_ram: u64,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            debug_hash: false,
            timeout: Duration::from_secs(60),
            max_ram: vmm::memory::MAX_RAM_BYTES,
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

/// Receives one VM over `stream`. `config` gives everything but the RAM size (console etc.).
pub fn receive(
    stream: TcpStream,
    config: &VmConfig,
    opts: &DestinationOptions,
    restorer: &mut dyn DeviceRestorer,
) -> Result<Incoming> {
    let source = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    stream
        .set_read_timeout(Some(opts.timeout))
        .map_err(MigrationError::io("setup"))?;
    stream
        .set_write_timeout(Some(opts.timeout))
        .map_err(MigrationError::io("setup"))?;
    stream
        .set_nodelay(true)
        .map_err(MigrationError::io("setup"))?;
    let mut writer = stream.try_clone().map_err(MigrationError::io("setup"))?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let result = run(&mut reader, &mut writer, &source, config, opts, restorer);
    if let Err(e) = &result {
        tracing::warn!(
            "incoming migration from {source} failed: {}",
            crate::ErrorChain(e)
        );
        // Tell the source why, if it still listens; the VM (if built) is dropped unrun.
        let _ = wire::send(
            &mut writer,
            Kind::Abort,
            crate::ErrorChain(e).to_string().as_bytes(),
        );
        let _ = writer.flush();
    }
    result
}

fn run(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    source: &str,
    config: &VmConfig,
    opts: &DestinationOptions,
    restorer: &mut dyn DeviceRestorer,
) -> Result<Incoming> {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut report = ReceiveReport {
        source: source.to_string(),
        ..Default::default()
    };
    let protocol = |m: String| MigrationError::Protocol(m);

    match wire::recv(reader, &mut buf)? {
        Kind::Hello => wire::check_hello(&buf)?,
        other => return Err(protocol(format!("expected Hello first, got {other:?}"))),
    }
    wire::send(writer, Kind::Hello, &wire::hello())?;

    if wire::recv(reader, &mut buf)? != Kind::Config {
        return Err(protocol("expected the VM configuration after Hello".into()));
    }
    let cfg: MigrationConfig = postcard::from_bytes(&buf)
        .map_err(|e| protocol(format!("configuration does not decode: {e}")))?;
    vmm::memory::validate_ram_size(cfg.ram_size)?;
    if cfg.ram_size > opts.max_ram {
        return Err(protocol(format!(
            "guest of {} bytes exceeds this host's limit of {}",
            cfg.ram_size, opts.max_ram
        )));
    }
    if cfg.vcpus != 1 {
        return Err(protocol(format!(
            "{} vCPUs asked; Ferry VMs have 1",
            cfg.vcpus
        )));
    }
    report.ram_bytes = cfg.ram_size;
    let ram = GuestRam::new(cfg.ram_size)?;
    let vm_config = VmConfig {
        ram_size: cfg.ram_size,
        vcpus: 1,
        ..config.clone()
    };

    let mut state: Option<VmState> = None;
    let mut devices: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let kind = wire::recv(reader, &mut buf)?;
        report.bytes += buf.len() as u64 + 12;
        match kind {
            Kind::Memory => {
                let (_, runs) = wire::parse_memory(&buf, |gpa, len| ram.contains(gpa, len))?;
                for run in runs {
                    match run {
                        Run::Data { gpa, bytes } => {
                            fill(&ram, gpa, bytes.len() as u64, |dst| {
                                dst.copy_from_slice(bytes)
                            })?;
                            report.pages += bytes.len() as u64 / PAGE;
                        }
                        Run::Zero { gpa, pages } => {
                            fill(&ram, gpa, pages as u64 * PAGE, |dst| dst.fill(0))?;
                            report.zero_pages += pages as u64;
                        }
                    }
                }
            }
            Kind::RoundEnd => {
                if buf.len() != 20 {
                    return Err(protocol(format!("RoundEnd of {} bytes", buf.len())));
                }
                report.rounds += 1;
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
                let n = buf
                    .get(..2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
                let name = n
                    .and_then(|n| buf.get(2..2 + n))
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| protocol("device state with a malformed name".into()))?
                    .to_string();
                if !cfg.devices.contains(&name) {
                    return Err(protocol(format!(
                        "state for device {name} that the configuration did not announce"
                    )));
                }
                let blob = buf[2 + name.len()..].to_vec();
                devices.push((name, blob));
            }
            Kind::Complete => break,
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
    let mut vm = Vm::with_ram(&vm_config, ram)?;
    vm.restore_state(&state)?;
    for (name, blob) in &devices {
        restorer
            .restore(&vm, name, blob)
            .map_err(|source| MigrationError::Device {
                name: name.clone(),
                source,
            })?;
        report.devices.push(name.clone());
    }
    wire::send(writer, Kind::Ready, &hash_ms.to_le_bytes())?;
    match wire::recv(reader, &mut buf)? {
        Kind::Go => {}
        Kind::Abort => {
            return Err(MigrationError::PeerAborted(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
        other => return Err(protocol(format!("expected Go, got {other:?}"))),
    }
    vm.start()?;
    report.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = wire::send(writer, Kind::Resumed, &[])
        .and_then(|_| writer.flush().map_err(MigrationError::io("write")))
    {
        // The source committed with Go; it will not run the VM again. Keep running here.
        tracing::warn!(
            "could not confirm the resume to the source: {}",
            crate::ErrorChain(&e)
        );
    }
    Ok(Incoming { vm, report })
}
