//! Optional compression of guest memory on the wire (`zstd`), and the bandwidth cap shared by
//! every stream of a migration.
//!
//! Compression is per chunk: a chunk that does not come out smaller than it went in is sent
//! raw (its header says which), and zero pages never reach the codec (they travel as zero
//! runs). The receiving side treats every compressed chunk as hostile: it decompresses into a
//! buffer of exactly the size the chunk header announced (at most a data chunk or a memory
//! batch, both bounded), so a "decompression bomb" stops at that bound and is refused; a frame
//! that decodes to fewer bytes is refused too.
use std::{
    fmt,
    str::FromStr,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{MigrationError, Result};

/// The zstd level used when `--compress zstd` names none (fast; for links slower than the
/// CPUs).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// How guest memory is compressed on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compression {
    /// Pages travel as they are.
    #[default]
    None,
    /// zstd at this level (1-19; negative levels are zstd's faster modes, down to -7).
    Zstd {
        /// The compression level.
        level: i32,
    },
}

impl Compression {
    /// True when chunks may be compressed.
    pub fn is_on(&self) -> bool {
        !matches!(self, Compression::None)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `none`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (s, None),
        };
        match (name.to_ascii_lowercase().as_str(), level) {
            ("none" | "off", None) => Ok(Compression::None),
            ("zstd", None) => Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            }),
            ("zstd", Some(l)) => {
                let level: i32 = l
                    .trim()
                    .parse()
                    .map_err(|_| format!("zstd level {l:?} is not a number"))?;
                if !(-7..=19).contains(&level) || level == 0 {
                    return Err(format!("zstd level {level} is outside -7..=-1, 1..=19"));
                }
                Ok(Compression::Zstd { level })
            }
            _ => Err(format!(
                "unknown compression {s:?} (none, zstd or zstd:LEVEL)"
            )),
        }
    }
}

impl TryFrom<String> for Compression {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Compression> for String {
    fn from(c: Compression) -> String {
        c.to_string()
    }
}

/// Compresses chunks (one per sending thread).
pub(crate) struct Compressor {
    inner: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Compressor {
    /// A compressor for `c`; `None` when `c` is no compression.
    pub fn new(c: Compression) -> Result<Option<Compressor>> {
        match c {
            Compression::None => Ok(None),
            Compression::Zstd { level } => {
                let mut inner = zstd::bulk::Compressor::new(level)
                    .map_err(MigrationError::io("setting up zstd"))?;
                // The chunk header carries the length: no size or checksum in the frame.
                let _ = inner.include_contentsize(false);
                let _ = inner.include_checksum(false);
                Ok(Some(Compressor {
                    inner,
                    out: Vec::new(),
                }))
            }
        }
    }

    /// `src` compressed, when that is smaller than `src` (else `None`: send it raw).
    pub fn compress(&mut self, src: &[u8]) -> Option<&[u8]> {
        // Only a result shorter than the input is worth it: zstd gives up ("destination too
        // small") as soon as it cannot be.
        let room = src.len().saturating_sub(1);
        if self.out.len() < room {
            self.out.resize(room, 0);
        }
        match self.inner.compress_to_buffer(src, &mut self.out[..room]) {
            Ok(n) if n < src.len() => Some(&self.out[..n]),
            _ => None,
        }
    }
}

/// Decompresses chunks from a hostile peer (one per receiving thread).
pub(crate) struct Decompressor {
    inner: zstd::bulk::Decompressor<'static>,
}

impl Decompressor {
    /// A decompressor.
    pub fn new() -> Result<Decompressor> {
        Ok(Decompressor {
            inner: zstd::bulk::Decompressor::new()
                .map_err(MigrationError::io("setting up zstd"))?,
        })
    }

    /// Decompresses `src` into `dst`, which it must fill exactly: more output than `dst`
    /// holds (a decompression bomb) or less is refused, and nothing past `dst` is ever
    /// written or allocated.
    pub fn decompress_exact(&mut self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let want = dst.len();
        match self.inner.decompress_to_buffer(src, dst) {
            Ok(n) if n == want => Ok(()),
            Ok(n) => Err(MigrationError::Compressed(format!(
                "{} bytes of zstd decode to {n} bytes, {want} were announced",
                src.len()
            ))),
            Err(e) => Err(MigrationError::Compressed(format!(
                "{} bytes of zstd do not decode into the {want} bytes announced ({e})",
                src.len()
            ))),
        }
    }
}

/// The payload of a [`crate::wire::Kind::MemoryZstd`] message for the memory message `plain`,
/// or `None` when compressing does not make it smaller (send `plain` as it is).
pub(crate) fn pack_batch(c: &mut Compressor, plain: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(plain.len())
        .ok()
        .filter(|&l| l <= crate::wire::MAX_BATCH)?;
    let z = c.compress(plain)?;
    if z.len() + 4 >= plain.len() {
        return None;
    }
    let mut v = Vec::with_capacity(z.len() + 4);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(z);
    Some(v)
}

/// Decompresses a [`crate::wire::Kind::MemoryZstd`] payload into `out` (reused), refusing a
/// length over [`crate::wire::MAX_BATCH`] before allocating anything.
pub(crate) fn unpack_batch(d: &mut Decompressor, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let (len, frame) = payload
        .split_first_chunk::<4>()
        .ok_or_else(|| MigrationError::Compressed("memory message without its length".into()))?;
    let len = u32::from_le_bytes(*len);
    if len > crate::wire::MAX_BATCH || len == 0 {
        return Err(MigrationError::Compressed(format!(
            "memory message announces {len} bytes (at most {})",
            crate::wire::MAX_BATCH
        )));
    }
    out.clear();
    out.resize(len as usize, 0);
    d.decompress_exact(frame, out)
}

/// A token bucket shared by every stream of a migration: it caps the bytes put on the wire
/// (compressed bytes when compression is on) at `rate` per second. It starts empty and holds
/// at most a millisecond's worth (64 KiB at least) after an idle spell, so no window of the
/// migration goes measurably faster than the cap. Senders reserve what they are about to send
/// and wait for their turn; the bucket goes into debt for a chunk larger than what it holds,
/// so concurrent senders queue up instead of racing.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    /// (tokens, when they were counted).
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// An empty bucket of `rate` bytes per second.
    pub fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        TokenBucket {
            rate,
            burst: (rate / 1000.0).max(64.0 * 1024.0),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Takes `n` bytes from the bucket; returns how long the caller must wait before sending
    /// them (zero when the bucket had them).
    pub fn reserve(&self, n: u64) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst) - n as f64;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }

    /// Takes `n` bytes and waits until they may go.
    pub fn take(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_like(n: usize) -> Vec<u8> {
        // Text-like content: compresses well.
        (0..n).map(|i| b"guest memory "[i % 13]).collect()
    }

    fn random(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn names_parse_and_print() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!(
            "zstd".parse(),
            Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL
            })
        );
        assert_eq!("zstd:3".parse(), Ok(Compression::Zstd { level: 3 }));
        assert_eq!("ZSTD:-2".parse(), Ok(Compression::Zstd { level: -2 }));
        for bad in ["zstd:0", "zstd:20", "zstd:x", "lz4", "none:1", ""] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        let c = Compression::Zstd { level: 5 };
        assert_eq!(c.to_string(), "zstd:5");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "\"zstd:5\"");
        assert_eq!(serde_json::from_str::<Compression>(&json).unwrap(), c);
        assert!(serde_json::from_str::<Compression>("\"zstd:99\"").is_err());
    }

    #[test]
    fn chunks_round_trip() {
        let mut c = Compressor::new(Compression::Zstd { level: 1 })
            .unwrap()
            .unwrap();
        let mut d = Decompressor::new().unwrap();
        for len in [4096usize, 64 << 10, 2 << 20] {
            let src = page_like(len);
            let z = c.compress(&src).expect("compressible").to_vec();
            assert!(z.len() < src.len() / 10, "{} of {len}", z.len());
            let mut back = vec![0u8; len];
            d.decompress_exact(&z, &mut back).unwrap();
            assert_eq!(back, src);
        }
        assert!(Compressor::new(Compression::None).unwrap().is_none());
    }

    #[test]
    fn incompressible_chunks_go_raw() {
        let mut c = Compressor::new(Compression::Zstd { level: 3 })
            .unwrap()
            .unwrap();
        assert!(c.compress(&random(2 << 20, 7)).is_none());
        assert!(c.compress(&random(4096, 9)).is_none());
        // and the compressor is still good for the next chunk
        assert!(c.compress(&page_like(8192)).is_some());
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        // 64 MiB of zeros compress to a few KiB; the chunk announces one page.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < 64 << 10);
        let mut d = Decompressor::new().unwrap();
        let mut dst = vec![0u8; 4096];
        let e = d.decompress_exact(&bomb, &mut dst).unwrap_err();
        assert!(e.to_string().contains("do not decode"), "{e}");
        // Short output, garbage and an empty frame are refused too.
        let short = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
        let e = d.decompress_exact(&short, &mut dst).unwrap_err();
        assert!(e.to_string().contains("decode to 100 bytes"), "{e}");
        assert!(d.decompress_exact(&random(300, 3), &mut dst).is_err());
        assert!(d.decompress_exact(&[], &mut dst).is_err());
        // The decompressor stays usable.
        let ok = zstd::bulk::compress(&[5u8; 4096], 1).unwrap();
        d.decompress_exact(&ok, &mut dst).unwrap();
        assert_eq!(dst, vec![5u8; 4096]);
    }

    #[test]
    fn memory_messages_pack_and_unpack() {
        let mut c = Compressor::new(Compression::Zstd { level: 1 })
            .unwrap()
            .unwrap();
        let mut d = Decompressor::new().unwrap();
        let plain = page_like(300_000);
        let packed = pack_batch(&mut c, &plain).unwrap();
        let mut out = Vec::new();
        unpack_batch(&mut d, &packed, &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(pack_batch(&mut c, &random(300_000, 5)).is_none());
        // A length over the bound is refused before anything is allocated or decoded.
        let mut huge = packed.clone();
        huge[..4].copy_from_slice(&(crate::wire::MAX_BATCH + 1).to_le_bytes());
        let mut out = Vec::new();
        assert!(unpack_batch(&mut d, &huge, &mut out).is_err());
        assert_eq!(out.capacity(), 0);
        // A frame that inflates past its announced length is a bomb.
        let bomb = zstd::bulk::compress(&vec![0u8; 32 << 20], 19).unwrap();
        let mut v = 4096u32.to_le_bytes().to_vec();
        v.extend_from_slice(&bomb);
        assert!(unpack_batch(&mut d, &v, &mut out).is_err());
        assert!(unpack_batch(&mut d, &[1, 0], &mut out).is_err());
    }

    #[test]
    fn the_bucket_paces_every_byte() {
        let b = TokenBucket::new(100 << 20);
        // It starts empty: a second's worth waits about a second (less what elapsed since).
        let wait = b.reserve(100 << 20);
        assert!(wait >= Duration::from_millis(900), "{wait:?}");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        // The next sender queues behind that debt.
        assert!(b.reserve(1 << 20) > wait);
        // After an idle spell it holds no more than its small burst.
        let b = TokenBucket::new(1 << 30);
        b.state.lock().unwrap().1 -= Duration::from_secs(10);
        let wait = b.reserve(b.burst as u64 + (1 << 30));
        assert!(wait >= Duration::from_millis(990), "{wait:?}");
    }
}
