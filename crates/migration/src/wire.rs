//! The migration stream: a hello with magic and version, then typed, length-prefixed,
//! checksummed messages. Every field read from the wire is checked before use.
//!
//! Frame: `type u8 | 0u8 | 0u16 | payload length u32 LE | CRC-32 of payload u32 LE | payload`.
use std::io::{Read, Write};

use crate::{MigrationError, Result};

/// First bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version spoken here.
pub const VERSION: u32 = 4;
/// Largest payload accepted (a memory batch is at most about 1 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Largest memory message once decompressed (a full batch is about 1.1 MiB).
pub const MAX_BATCH: u32 = 2 << 20;
/// Pages per memory message.
pub const PAGES_PER_BATCH: usize = 256;
/// Page size on the wire.
pub const PAGE: u64 = 4096;
const HEADER: usize = 12;

/// Message types.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Magic and version (both directions, first).
    Hello = 1,
    /// VM configuration (source → destination).
    Config = 2,
    /// Runs of pages.
    Memory = 3,
    /// End of a pre-copy round.
    RoundEnd = 4,
    /// vCPU and VM state.
    VmState = 5,
    /// One device's state.
    DeviceState = 6,
    /// Everything was sent; the destination restores and says Ready.
    Complete = 7,
    /// Destination restored everything and waits for Go.
    Ready = 8,
    /// Source commits: the destination may resume.
    Go = 9,
    /// Destination resumed the VM.
    Resumed = 10,
    /// Either side gives up, with a reason.
    Abort = 11,
    /// Destination invites the source to open data channels (port, count, token).
    Channels = 12,
    /// First frame of a data channel: the token and the channel's index.
    Join = 13,
    /// The ranges round 0 will fill (source → destination), so it can populate them ahead.
    Extents = 14,
    /// The source asks to hear when the data channels have taken in every round so far.
    Sync = 15,
    /// The data channels have taken in every round so far (destination → source).
    Synced = 16,
    /// A [`Kind::Memory`] payload compressed with zstd (only when the configuration asked for
    /// compression): its length once decompressed (u32 LE, at most [`MAX_BATCH`]), then the
    /// zstd frame.
    MemoryZstd = 17,
    /// One device's pre-copy state (source → destination, during pre-copy, at most once per
    /// device, before its [`Kind::DeviceState`]): the same layout as `DeviceState` (name
    /// length u16 LE, name, the device's blob).
    DevicePrecopy = 18,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Config,
            Memory,
            RoundEnd,
            VmState,
            DeviceState,
            Complete,
            Ready,
            Go,
            Resumed,
            Abort,
            Channels,
            Join,
            Extents,
            Sync,
            Synced,
            MemoryZstd,
            DevicePrecopy,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// Writes one frame.
pub fn send(w: &mut (impl Write + ?Sized), kind: Kind, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            MigrationError::Protocol(format!("payload of {} bytes is too large", payload.len()))
        })?;
    let mut header = [0u8; HEADER];
    header[0] = kind as u8;
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..12].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    w.write_all(&header).map_err(MigrationError::io("write"))?;
    w.write_all(payload).map_err(MigrationError::io("write"))?;
    Ok(())
}

/// A device message's payload (`DeviceState`, `DevicePrecopy`): the name's length (u16 LE),
/// the name, the device's blob.
pub fn device_payload(name: &str, blob: &[u8]) -> Result<Vec<u8>> {
    // The name's length travels as a u16: a longer name would be cut, not refused.
    let len = u16::try_from(name.len()).map_err(|_| {
        MigrationError::Encoding(format!(
            "device name of {} bytes (at most 65535)",
            name.len()
        ))
    })?;
    let mut payload = Vec::with_capacity(2 + name.len() + blob.len());
    payload.extend_from_slice(&len.to_le_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(blob);
    Ok(payload)
}

/// Splits a device message's payload ([`device_payload`]) into the name (UTF-8) and blob.
pub fn parse_device_payload(payload: &[u8]) -> Result<(&str, &[u8])> {
    let bad = || MigrationError::Protocol("device message with a malformed name".into());
    let (len, rest) = payload.split_first_chunk::<2>().ok_or_else(bad)?;
    let n = u16::from_le_bytes(*len) as usize;
    let name = rest.get(..n).ok_or_else(bad)?;
    let name = std::str::from_utf8(name).map_err(|_| bad())?;
    Ok((name, &rest[n..]))
}

/// Reads one frame into `buf` (reused between calls); returns its kind.
pub fn recv(r: &mut (impl Read + ?Sized), buf: &mut Vec<u8>) -> Result<Kind> {
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header)
        .map_err(MigrationError::io("read"))?;
    let kind = Kind::from_u8(header[0])
        .ok_or_else(|| MigrationError::Protocol(format!("unknown message type {}", header[0])))?;
    if header[1..4] != [0, 0, 0] {
        return Err(MigrationError::Protocol(format!(
            "reserved header bytes {:02x?} are not zero",
            &header[1..4]
        )));
    }
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(MigrationError::Protocol(format!(
            "{kind:?} message of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(MigrationError::io("read"))?;
    let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let actual = crc32fast::hash(buf);
    if crc != actual {
        return Err(MigrationError::Protocol(format!(
            "{kind:?} message of {len} bytes fails its checksum (sent {crc:#010x}, computed {actual:#010x})"
        )));
    }
    Ok(kind)
}

/// The hello payload.
pub fn hello() -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&VERSION.to_le_bytes());
    v
}

/// Checks a peer's hello.
pub fn check_hello(payload: &[u8]) -> Result<()> {
    if payload.len() != 12 {
        let mut magic = [0u8; 8];
        let n = payload.len().min(8);
        magic[..n].copy_from_slice(&payload[..n]);
        return Err(MigrationError::BadMagic(magic));
    }
    let magic: [u8; 8] = payload[..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(MigrationError::BadMagic(magic));
    }
    let theirs = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes"));
    if theirs != VERSION {
        return Err(MigrationError::Version {
            theirs,
            ours: VERSION,
        });
    }
    Ok(())
}

/// A run of pages in a memory message.
#[derive(Debug, PartialEq, Eq)]
pub enum Run<'a> {
    /// Pages with their contents.
    Data {
        /// First page's guest-physical address.
        gpa: u64,
        /// Contents, a whole number of pages.
        bytes: &'a [u8],
    },
    /// Pages that are all zero.
    Zero {
        /// First page's guest-physical address.
        gpa: u64,
        /// Number of pages.
        pages: u32,
    },
}

const RUN_HEADER: usize = 16;

/// Builds memory messages.
#[derive(Default)]
pub struct MemoryBatch {
    buf: Vec<u8>,
    runs: u32,
    data_pages: usize,
}

impl MemoryBatch {
    /// Starts an empty batch for `round`.
    pub fn new(round: u32) -> Self {
        let mut buf = Vec::with_capacity(8 + PAGES_PER_BATCH * (PAGE as usize + RUN_HEADER));
        buf.extend_from_slice(&round.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        MemoryBatch {
            buf,
            runs: 0,
            data_pages: 0,
        }
    }

    fn push_header(&mut self, gpa: u64, pages: u32, zero: bool) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&pages.to_le_bytes());
        self.buf.extend_from_slice(&[zero as u8, 0, 0, 0]);
        self.runs += 1;
    }

    /// Adds one page with contents.
    pub fn push_page(&mut self, gpa: u64, page: &[u8]) {
        self.push_header(gpa, 1, false);
        self.buf.extend_from_slice(page);
        self.data_pages += 1;
    }

    /// Adds a run of zero pages.
    pub fn push_zero(&mut self, gpa: u64, pages: u32) {
        self.push_header(gpa, pages, true);
    }

    /// True when the batch should be sent.
    pub fn is_full(&self) -> bool {
        self.data_pages >= PAGES_PER_BATCH || self.runs as usize >= 4 * PAGES_PER_BATCH
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.runs == 0
    }

    /// The payload, ready to send.
    pub fn finish(&mut self) -> &[u8] {
        let runs = self.runs.to_le_bytes();
        self.buf[4..8].copy_from_slice(&runs);
        &self.buf
    }
}

/// Parses a memory message; every run is checked against `ram_contains(gpa, len)`.
pub fn parse_memory<'a>(
    payload: &'a [u8],
    ram_contains: impl Fn(u64, u64) -> bool,
) -> Result<(u32, Vec<Run<'a>>)> {
    let bad = |m: String| MigrationError::Protocol(m);
    if payload.len() < 8 {
        return Err(bad(format!(
            "memory message of {} bytes has no header",
            payload.len()
        )));
    }
    let round = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
    let count = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
    if count as usize > (payload.len() - 8) / RUN_HEADER {
        return Err(bad(format!(
            "memory message claims {count} runs in {} bytes",
            payload.len()
        )));
    }
    let mut runs = Vec::with_capacity(count as usize);
    let mut at = 8usize;
    for i in 0..count {
        let h = payload
            .get(at..at + RUN_HEADER)
            .ok_or_else(|| bad(format!("run {i} header past the end of the message")))?;
        let gpa = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
        let pages = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let zero = match h[12] {
            0 => false,
            1 => true,
            k => return Err(bad(format!("run {i} has unknown kind {k}"))),
        };
        at += RUN_HEADER;
        let len = (pages as u64) * PAGE;
        if pages == 0 || gpa % PAGE != 0 || !ram_contains(gpa, len) {
            return Err(bad(format!(
                "run {i}: {pages} pages at {gpa:#x} are not whole pages inside guest RAM"
            )));
        }
        if zero {
            runs.push(Run::Zero { gpa, pages });
        } else {
            let bytes = payload.get(at..at + len as usize).ok_or_else(|| {
                bad(format!(
                    "run {i}: {pages} pages at {gpa:#x} run past the end of the message"
                ))
            })?;
            at += len as usize;
            runs.push(Run::Data { gpa, bytes });
        }
    }
    if at != payload.len() {
        return Err(bad(format!(
            "{} trailing bytes after {count} runs",
            payload.len() - at
        )));
    }
    Ok((round, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut wire = Vec::new();
        send(&mut wire, Kind::Abort, b"because").unwrap();
        let mut buf = Vec::new();
        assert_eq!(recv(&mut wire.as_slice(), &mut buf).unwrap(), Kind::Abort);
        assert_eq!(buf, b"because");
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x40;
            assert!(
                recv(&mut bad.as_slice(), &mut buf).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        for cut in 0..wire.len() {
            assert!(recv(&mut &wire[..cut], &mut buf).is_err());
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut header = vec![Kind::Memory as u8, 0, 0, 0];
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut buf = Vec::new();
        let e = recv(&mut header.as_slice(), &mut buf).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn device_payloads_round_trip_and_malformed_names_are_refused() {
        let p = device_payload("nvme0", b"blob").unwrap();
        assert_eq!(parse_device_payload(&p).unwrap(), ("nvme0", &b"blob"[..]));
        assert_eq!(
            parse_device_payload(&device_payload("", b"").unwrap()).unwrap(),
            ("", &b""[..])
        );
        assert!(device_payload(&"x".repeat(65536), b"").is_err());
        for bad in [
            &[][..],
            &[1][..],
            &[5, 0, b'n'][..],
            &[2, 0, 0xff, 0xfe][..],
        ] {
            assert!(parse_device_payload(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hello_checks_magic_and_version() {
        assert!(check_hello(&hello()).is_ok());
        let mut v = hello();
        v[8] = 1;
        assert!(matches!(
            check_hello(&v),
            Err(MigrationError::Version { theirs: 1, ours: 4 })
        ));
        assert!(matches!(
            check_hello(b"GET / HTTP/1"),
            Err(MigrationError::BadMagic(_))
        ));
        assert!(check_hello(b"").is_err());
    }

    #[test]
    fn memory_batches_round_trip_and_hostile_runs_are_refused() {
        let ram = |gpa: u64, len: u64| gpa.checked_add(len).is_some_and(|e| e <= 1 << 20);
        let mut b = MemoryBatch::new(3);
        let page = vec![7u8; PAGE as usize];
        b.push_page(0x1000, &page);
        b.push_zero(0x2000, 5);
        let payload = b.finish().to_vec();
        let (round, runs) = parse_memory(&payload, ram).unwrap();
        assert_eq!(round, 3);
        assert_eq!(
            runs,
            vec![
                Run::Data {
                    gpa: 0x1000,
                    bytes: &page
                },
                Run::Zero {
                    gpa: 0x2000,
                    pages: 5
                }
            ]
        );

        let mut out_of_ram = MemoryBatch::new(0);
        out_of_ram.push_zero(1 << 20, 1);
        assert!(parse_memory(out_of_ram.finish(), ram).is_err());
        let mut wraps = MemoryBatch::new(0);
        wraps.push_zero(u64::MAX - 4095, 2);
        assert!(parse_memory(wraps.finish(), ram).is_err());
        let mut unaligned = MemoryBatch::new(0);
        unaligned.push_zero(0x1001, 1);
        assert!(parse_memory(unaligned.finish(), ram).is_err());
        // a count that lies, truncation, trailing bytes
        let mut lie = payload.clone();
        lie[4] = 200;
        assert!(parse_memory(&lie, ram).is_err());
        assert!(parse_memory(&payload[..payload.len() - 1], ram).is_err());
        let mut trailing = payload.clone();
        trailing.push(0);
        assert!(parse_memory(&trailing, ram).is_err());
    }
}
