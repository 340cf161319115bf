//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
use std::{
    fs::File,
    io::{Read, Write},
    os::unix::{fs::FileExt, net::UnixStream},
    path::PathBuf,
    sync::OnceLock,
};

use nvme_spec::fuzz_records::Records;

use crate::{
    controller::{Controller, Doorbells},
    layout::{DOORBELL_AREA, DOORBELL_AREA_SIZE},
    namespace::Namespace,
    server::{DeviceConfig, NvmeDevice},
};

/// Guest memory the fuzzed controller may DMA: 256 KiB at IOVA 0.
const DMA_BYTES: u64 = 256 << 10;
/// Namespace size.
const NS_BYTES: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ferry-fuzz-{}-{name}", std::process::id()))
}

fn memfd(name: &std::ffi::CStr, size: u64) -> Option<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    Some(f)
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate().take(n) {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

/// The controller's register file, doorbells, queues and commands over fuzzed guest memory.
/// The first byte picks the block size (even: 512, odd: 4096); then records
/// `[control][len: u16 LE][bytes]`: 0 BAR0 read (offset: 3 bytes LE, length: 1), 1 BAR0 write
/// (offset: 3 bytes LE, data), 2 config space read, 3 config space write (offset: 1 byte,
/// data), 4 guest memory write (offset: 3 bytes LE, data), 5 the polling thread's round, 6 a
/// DMA map of guest memory (IOVA, size, offset: 4 bytes LE each, in pages), 7 a DMA unmap, 8
/// a reset, 9 a client disconnect, anything else MSI-X vectors (start, count).
pub fn register_file(data: &[u8]) {
    let Some((&bs, rest)) = data.split_first() else {
        return;
    };
    let block_size = if bs & 1 == 0 { 512 } else { 4096 };
    let path = scratch("ns.img");
    let ns = Namespace::open(&path, NS_BYTES, block_size, true);
    // The namespace keeps its descriptor; nothing is left behind.
    let _ = std::fs::remove_file(&path);
    let Ok(ns) = ns else {
        return;
    };
    let (Some(bar), Some(ram)) = (
        memfd(c"fuzz-bar", DOORBELL_AREA_SIZE),
        memfd(c"fuzz-ram", DMA_BYTES),
    ) else {
        return;
    };
    let Ok(db) = Doorbells::map(&bar, 0, DOORBELL_AREA_SIZE as usize) else {
        return;
    };
    let mut c = Controller::new(ns, db, if bs & 2 == 0 { 0 } else { 9 });
    let _ = c.dma.map(0, DMA_BYTES, 0, &ram);
    for (ctl, b) in Records(rest) {
        match ctl {
            0 => {
                let mut buf = vec![0u8; b.get(3).copied().unwrap_or(4) as usize];
                c.bar_read(le(b, 0, 3), &mut buf);
            }
            1 => c.bar_write(le(b, 0, 3), b.get(3..).unwrap_or(&[])),
            2 => {
                let mut buf = vec![0u8; b.get(1).copied().unwrap_or(4) as usize];
                c.config.read(le(b, 0, 1), &mut buf);
            }
            3 => c.config.write(le(b, 0, 1), b.get(1..).unwrap_or(&[])),
            4 => {
                let off = le(b, 0, 3) % DMA_BYTES;
                let _ = ram.write_at(b.get(3..).unwrap_or(&[]), off);
            }
            5 => {
                c.poll();
            }
            6 => {
                let pages = |at| le(b, at, 4) << 12;
                let _ = c.dma.map(pages(0), pages(4), pages(8) % DMA_BYTES, &ram);
            }
            7 => {
                c.dma.unmap(le(b, 0, 4) << 12, le(b, 4, 4) << 12);
            }
            8 => c.reset(),
            9 => c.disconnect(),
            _ => {
                let fds = (0..b.len().min(4))
                    .filter_map(|_| memfd(c"fuzz-irq", 0))
                    .collect();
                c.set_msix(le(b, 0, 1) as u32, b.len().min(4) as u32, fds);
            }
        }
    }
    let _ = c.state();
}

/// A device listening on a scratch socket for the whole process (the fuzzer calls
/// [`vfio_user_stream`] many times).
fn device() -> Option<&'static NvmeDevice> {
    static DEVICE: OnceLock<Option<NvmeDevice>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let socket = scratch("vfio-user.sock");
            let _ = std::fs::remove_file(&socket);
            let backing = scratch("stream.img");
            let dev = NvmeDevice::new(&DeviceConfig {
                socket,
                backing: backing.clone(),
                size: NS_BYTES,
                block_size: 512,
                dstrd: 0,
                create: true,
            });
            let _ = std::fs::remove_file(&backing);
            dev.ok()
        })
        .as_ref()
}

/// The device process's vfio-user message handling: `data` is everything a client sends on
/// one connection (then it closes); the device answers until the connection ends.
pub fn vfio_user_stream(data: &[u8]) {
    tolerate_vfio_user_library_panics();
    let Some(dev) = device() else {
        return;
    };
    let Ok(mut client) = UnixStream::connect(scratch("vfio-user.sock")) else {
        return;
    };
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = client.write_all(&input);
        let _ = client.shutdown(std::net::Shutdown::Write);
        // Take every reply so the device never blocks on a full socket.
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink);
    });
    // `serve_one` contains the vfio_user library's panics on malformed messages (see there);
    // the fuzzer's panic hook would abort on them first, so they are let through to it here.
    // Every other panic still reaches the fuzzer.
    let _ = dev.serve_one();
    let _ = writer.join();
}

/// Installs (once) a panic hook that stays silent for panics inside the vfio_user library,
/// which `NvmeDevice::serve_one` catches, and hands every other panic to the previous hook
/// (the fuzzer's, which aborts).
pub fn tolerate_vfio_user_library_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_library = info
                .location()
                .is_some_and(|l| l.file().contains("vfio_user-"));
            if !in_library {
                previous(info);
            }
        }));
    });
}

/// One vfio-user message (header: id, command, size, flags, error).
fn message(out: &mut Vec<u8>, id: u16, cmd: u16, payload: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&cmd.to_le_bytes());
    out.extend_from_slice(&(16 + payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A client session as the hypervisor's client starts it (the corpus seed): version,
/// device info, region and IRQ info, config space and register accesses.
pub fn sample_stream() -> Vec<u8> {
    let mut o = Vec::new();
    let caps = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;
    let mut v = vec![0, 0, 0, 0];
    v[..2].copy_from_slice(&0u16.to_le_bytes());
    v[2..].copy_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&[0, 0, 0, 0]);
    v.truncate(4);
    v.extend_from_slice(caps);
    v.push(0);
    message(&mut o, 0, 1, &v); // VERSION
    message(
        &mut o,
        1,
        4,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ); // DEVICE_GET_INFO
    let mut ri = vec![0u8; 32];
    ri[0..4].copy_from_slice(&32u32.to_le_bytes());
    message(&mut o, 2, 5, &ri); // DEVICE_GET_REGION_INFO, region 0
    ri[8..12].copy_from_slice(&7u32.to_le_bytes());
    message(&mut o, 3, 5, &ri); // region 7 (config)
    let mut ii = vec![0u8; 16];
    ii[0..4].copy_from_slice(&16u32.to_le_bytes());
    ii[8..12].copy_from_slice(&4u32.to_le_bytes());
    message(&mut o, 4, 6, &ii); // DEVICE_GET_IRQ_INFO, MSI-X
    let access = |region: u32, offset: u64, data: &[u8], count: u32| {
        let mut a = offset.to_le_bytes().to_vec();
        a.extend_from_slice(&region.to_le_bytes());
        a.extend_from_slice(&count.to_le_bytes());
        a.extend_from_slice(data);
        a
    };
    message(&mut o, 5, 9, &access(7, 0, &[], 4)); // REGION_READ config
    message(&mut o, 6, 9, &access(0, 0, &[], 8)); // REGION_READ CAP
    message(
        &mut o,
        7,
        10,
        &access(0, 0x24, &0x001f_001fu32.to_le_bytes(), 4),
    ); // AQA
    message(
        &mut o,
        8,
        10,
        &access(0, 0x14, &0x0046_0001u32.to_le_bytes(), 4),
    ); // CC.EN
    message(&mut o, 9, 9, &access(0, 0x1c, &[], 4)); // CSTS
    message(&mut o, 10, 13, &[]); // DEVICE_RESET
    o
}

/// A driver's bring-up as [`register_file`] records (the corpus seed): admin queues in guest
/// memory, CC.EN, an Identify command, the doorbell, polls.
pub fn sample_registers() -> Vec<u8> {
    let mut o = vec![1u8];
    let mut rec = |ctl: u8, b: &[u8]| {
        o.push(ctl);
        o.extend_from_slice(&(b.len() as u16).to_le_bytes());
        o.extend_from_slice(b);
    };
    let w32 = |off: u32, v: u32| {
        let mut b = off.to_le_bytes()[..3].to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b
    };
    let w64 = |off: u32, v: u64| {
        let mut b = off.to_le_bytes()[..3].to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b
    };
    rec(1, &w32(0x24, 0x000f_000f)); // AQA: 16 entries each
    rec(1, &w64(0x28, 0x1000)); // ASQ
    rec(1, &w64(0x30, 0x2000)); // ACQ
    rec(1, &w32(0x14, 0x0046_0001)); // CC.EN
    rec(0, &[0x1c, 0, 0, 4]); // CSTS
                              // Identify Controller (opcode 6, CNS 1) into page 3.
    let mut sqe = [0u8; 64];
    sqe[0] = 6;
    sqe[2] = 1;
    sqe[24..32].copy_from_slice(&0x3000u64.to_le_bytes());
    sqe[40] = 1;
    let mut b = 0x1000u32.to_le_bytes()[..3].to_vec();
    b.extend_from_slice(&sqe);
    rec(4, &b);
    rec(1, &w32(DOORBELL_AREA as u32, 1)); // SQ 0 tail
    rec(5, &[]);
    rec(1, &w32(DOORBELL_AREA as u32 + 4, 1)); // CQ 0 head
    rec(5, &[]);
    rec(2, &[0, 64]);
    rec(3, &[4, 6, 0]); // command register: memory + bus master
    rec(8, &[]);
    o
}
