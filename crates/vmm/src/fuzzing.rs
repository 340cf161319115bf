//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
use std::sync::{Arc, Mutex, OnceLock};

use guest_abi::{layout::MIN_RAM, layout::PARAMS_GPA, ports};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    bus::Bus,
    devices::{
        control::ControlDevice,
        serial::{ConsoleSink, ConsoleTail, ConsoleWriter, SerialDevice},
    },
    lifecycle::Lifecycle,
    memory::GuestRam,
    pci::{HostBridge, PciBus, PciConfigIo},
    vm::Mailbox,
};

/// Guest RAM shared by every run (the smallest guest; only the parameter page is touched).
fn ram() -> Option<&'static GuestRam> {
    static RAM: OnceLock<Option<GuestRam>> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(MIN_RAM).ok()).as_ref()
}

/// The port I/O devices every VM has, as `Vm::with_ram` wires them, without KVM.
fn pio(lifecycle: Arc<Lifecycle>) -> Option<Bus> {
    let pio = Bus::new("pio");
    let writer = ConsoleWriter::new(&ConsoleSink::Null, "", ConsoleTail::default()).ok()?;
    let irq = EventFd::new(EFD_NONBLOCK).ok()?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, writer)));
    pio.insert(ports::SERIAL_COM1 as u64, ports::SERIAL_LEN as u64, serial)
        .ok()?;
    let control = Arc::new(Mutex::new(ControlDevice::new(lifecycle)));
    pio.insert(
        ports::FERRY_CTL_BASE as u64,
        ports::FERRY_CTL_LEN as u64,
        control,
    )
    .ok()?;
    let pci = Arc::new(Mutex::new(PciBus::default()));
    pci.lock()
        .ok()?
        .add(0, Arc::new(Mutex::new(HostBridge::new())))
        .ok()?;
    let config = Arc::new(Mutex::new(PciConfigIo::new(pci)));
    pio.insert(ports::PCI_CONFIG_ADDRESS as u64, 8, config)
        .ok()?;
    Some(pio)
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate().take(n) {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

/// What a guest controls of the guest ABI: the boot-parameter mailbox the host reads while
/// the guest runs, and the ports (serial, Ferry control port, PCI configuration). Records
/// `[control][len: u16 LE][bytes]`: 0 the guest writes its parameter page (offset: 2 bytes
/// LE, data), 1 the host reads the mailbox (progress, verification result, bench, TSC), 2 the
/// host asks for a verification, 3 port write (port: 2 bytes LE, data up to 4 bytes), 4 port
/// read (port, length).
pub fn guest_abi(data: &[u8]) {
    let Some(ram) = ram() else {
        return;
    };
    // Each run starts from a clean parameter page.
    if ram.write(PARAMS_GPA, &[0u8; 4096]).is_err() {
        return;
    }
    let lifecycle = Arc::new(Lifecycle::default());
    let Some(pio) = pio(lifecycle.clone()) else {
        return;
    };
    let mailbox = Mailbox { ram };
    let mut req = 0;
    for (ctl, b) in guest_abi_records(data) {
        match ctl {
            0 => {
                let off = le(b, 0, 2) % 4096;
                let d = b.get(2..).unwrap_or(&[]);
                let n = d.len().min((4096 - off) as usize);
                let _ = ram.write(PARAMS_GPA + off, &d[..n]);
            }
            1 => {
                let _ = mailbox.progress();
                let _ = mailbox.verify_result(req);
                let _ = mailbox.bench();
                let _ = mailbox.tsc_khz();
            }
            2 => {
                if let Ok(r) = mailbox.request_verify() {
                    req = r;
                }
            }
            3 => {
                let d = b.get(2..).unwrap_or(&[]);
                let _ = pio.write(le(b, 0, 2), &d[..d.len().min(4)]);
            }
            _ => {
                let mut buf = [0u8; 4];
                let n = (le(b, 2, 1) as usize % 4) + 1;
                let _ = pio.read(le(b, 0, 2), &mut buf[..n]);
            }
        }
    }
    let _ = lifecycle.outcome();
}

/// Records of a fuzz input (`[control][len: u16 LE][bytes]`).
fn guest_abi_records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&ctl, rest) = data.split_first()?;
        let (len, rest) = match rest.split_first_chunk::<2>() {
            Some((l, r)) => (u16::from_le_bytes(*l) as usize, r),
            None => (rest.len(), rest),
        };
        let (bytes, tail) = rest.split_at(len.min(rest.len()));
        data = tail;
        Some((ctl, bytes))
    })
}

/// A guest's session (the corpus seed): boot parameters published, events and a line on the
/// serial port, a PCI configuration read, a verification answered, an exit.
pub fn sample_session() -> Vec<u8> {
    let mut o = Vec::new();
    let mut rec = |ctl: u8, b: &[u8]| {
        o.push(ctl);
        o.extend_from_slice(&(b.len() as u16).to_le_bytes());
        o.extend_from_slice(b);
    };
    let port = |p: u16, d: &[u8]| {
        let mut b = p.to_le_bytes().to_vec();
        b.extend_from_slice(d);
        b
    };
    let mut params = 0u16.to_le_bytes().to_vec();
    params.extend_from_slice(&guest_abi::params::MAGIC.to_le_bytes());
    params.extend_from_slice(&guest_abi::params::VERSION.to_le_bytes());
    rec(0, &params);
    rec(3, &port(ports::FERRY_EVENT, &1u32.to_le_bytes()));
    for c in b"hi\n" {
        rec(3, &port(ports::SERIAL_COM1, &[*c]));
    }
    rec(4, &port(ports::SERIAL_COM1 + 5, &[0]));
    rec(
        3,
        &port(ports::PCI_CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes()),
    );
    rec(4, &port(ports::PCI_CONFIG_DATA, &[3]));
    rec(2, &[]);
    let mut done = (guest_abi::params::OFF_VERIFY_DONE as u16)
        .to_le_bytes()
        .to_vec();
    done.extend_from_slice(&1u32.to_le_bytes());
    rec(0, &done);
    rec(1, &[]);
    rec(3, &port(ports::FERRY_EXIT, &[0]));
    o
}
