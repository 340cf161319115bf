//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
use std::io::{BufReader, Cursor, Read, Write};

use vmm::{devices::serial::ConsoleSink, Vm, VmConfig};

use crate::{
    destination::{negotiate, run, DestinationOptions},
    device::{DeviceError, DeviceRestorer},
    source::MigrationConfig,
    transport::Conn,
    wire::{self, Kind, MemoryBatch, PAGE},
};

/// Smallest guest the destination builds (the fuzzer keeps guests at this size).
const RAM: u64 = 32 << 20;
/// The one external device the fuzzed destination accepts.
const DEVICE: &str = "fuzz0";

/// A connection whose input is a byte string and whose output is discarded.
struct MemConn {
    input: Cursor<Vec<u8>>,
}

impl Read for MemConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Accepts any device state blob (device states are fuzzed on their own).
struct AnyDevice;

impl DeviceRestorer for AnyDevice {
    fn restore(&mut self, _vm: &Vm, name: &str, _state: &[u8]) -> Result<(), DeviceError> {
        if name == DEVICE {
            Ok(())
        } else {
            Err(DeviceError::NoSlot { name: name.into() })
        }
    }
}

/// The destination's limits while fuzzed: the smallest guest, one vCPU, one device.
fn options() -> DestinationOptions {
    DestinationOptions {
        max_ram: RAM,
        max_vcpus: 1,
        devices: vec![DEVICE.into()],
        ..DestinationOptions::default()
    }
}

/// The migration destination as a whole: `data` is everything a source sends (Hello,
/// configuration, memory, states, Complete, Go), received with the limits of [`options`].
/// A stream that gets through runs the VM briefly (then it is dropped).
pub fn destination_stream(data: &[u8]) {
    let opts = options();
    let conn: Box<dyn Conn> = Box::new(MemConn {
        input: Cursor::new(data.to_vec()),
    });
    let mut reader = BufReader::with_capacity(1 << 16, conn);
    let Ok(cfg) = negotiate(&mut reader, &opts) else {
        return;
    };
    let config = VmConfig {
        console: ConsoleSink::Null,
        ..VmConfig::default()
    };
    // Errors are the expected outcome for most inputs; panics and hangs are the findings.
    let _ = run(
        &mut reader,
        None,
        "fuzz",
        cfg,
        &config,
        &opts,
        &mut AnyDevice,
    );
}

fn frame(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    // Writing into a Vec cannot fail.
    let _ = wire::send(out, kind, payload);
}

/// A complete, valid stream as a source sends it (real encoders, the VM state of a freshly
/// built VM): the seed of the corpus. Needs KVM.
pub fn sample_stream() -> crate::Result<Vec<u8>> {
    let vm = Vm::new(&VmConfig {
        ram_size: RAM,
        console: ConsoleSink::Null,
        ..VmConfig::default()
    })?;
    let state = vm.save_state()?;
    drop(vm);
    let mut out = Vec::new();
    frame(&mut out, Kind::Hello, &wire::hello());
    let cfg = MigrationConfig {
        ram_size: RAM,
        vcpus: 1,
        devices: vec![DEVICE.into()],
        streams: 0,
        zstd: false,
    };
    let encode = |e: postcard::Error| crate::MigrationError::Protocol(e.to_string());
    frame(
        &mut out,
        Kind::Config,
        &postcard::to_allocvec(&cfg).map_err(encode)?,
    );
    let mut batch = MemoryBatch::new(0);
    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    batch.push_page(0x1000, &page);
    batch.push_zero(0x2000, 16);
    frame(&mut out, Kind::Memory, batch.finish());
    frame(&mut out, Kind::RoundEnd, &[0u8; 20]);
    frame(
        &mut out,
        Kind::VmState,
        &postcard::to_allocvec(&state).map_err(encode)?,
    );
    let mut dev = (DEVICE.len() as u16).to_le_bytes().to_vec();
    dev.extend_from_slice(DEVICE.as_bytes());
    dev.extend_from_slice(b"device state");
    frame(&mut out, Kind::DeviceState, &dev);
    frame(&mut out, Kind::Complete, &[]);
    frame(&mut out, Kind::Go, &[]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_stream_is_received_and_a_truncated_one_is_not() {
        let s = sample_stream().unwrap();
        let opts = options();
        let conn: Box<dyn Conn> = Box::new(MemConn {
            input: Cursor::new(s.clone()),
        });
        let mut reader = BufReader::new(conn);
        let cfg = negotiate(&mut reader, &opts).unwrap();
        let config = VmConfig {
            console: ConsoleSink::Null,
            ..VmConfig::default()
        };
        let incoming = run(
            &mut reader,
            None,
            "fuzz",
            cfg,
            &config,
            &opts,
            &mut AnyDevice,
        )
        .unwrap();
        assert_eq!(incoming.report.pages, 1);
        assert_eq!(incoming.report.devices, vec![DEVICE.to_string()]);
        drop(incoming);
        // Everything up to (not including) Go: the destination never runs the VM.
        destination_stream(&s[..s.len() - 12]);
    }
}
