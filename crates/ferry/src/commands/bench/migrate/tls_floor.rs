//! The TLS floor: the floor's bytes through the migration's own TLS (rustls, same
//! certificates, same number of connections), memfd to fresh memfd, so a TLS row's CPU can be
//! put against what the cipher allows rather than against plain TCP.
use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::fs::FileExt,
    time::Duration,
};

use anyhow::bail;

use super::{cpu_sums, memfd, with_spinner, FloorRun, Mapping};

/// Plaintext handed to rustls per write: a multiple of its 16 KiB records.
const WRITE: usize = 256 << 10;

/// `bytes` of `src` into a fresh memfd over `streams` TLS connections: each sender `pread`s
/// its shard into a buffer and writes it to rustls, each receiver decrypts into the mapping.
/// CPU counts from the end of the handshake on (each side's threads).
pub(super) fn once(
    src: &std::fs::File,
    bytes: u64,
    streams: u32,
    security: &migration::Security,
) -> anyhow::Result<FloorRun> {
    let streams = u64::from(streams.max(1));
    let dst = memfd(bytes)?;
    let map = Mapping::new(&dst, bytes as usize)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let shard = (bytes / streams).next_multiple_of(4096);
    let timeout = Duration::from_secs(30);
    with_spinner(|| {
        std::thread::scope(|s| -> anyhow::Result<(f64, f64)> {
            let mut recv = Vec::new();
            for _ in 0..streams {
                let (listener, base) = (&listener, map.addr);
                recv.push(s.spawn(move || -> anyhow::Result<f64> {
                    let (tcp, _) = listener.accept()?;
                    let mut st = migration::transport::accept(tcp, security, timeout)
                        .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?;
                    let cpu = migration::cpu::ThreadCpu::start();
                    let mut h = [0u8; 16];
                    st.conn.read_exact(&mut h)?;
                    let off = u64::from_le_bytes(h[..8].try_into()?);
                    let len = u64::from_le_bytes(h[8..].try_into()?);
                    if off.checked_add(len).is_none_or(|e| e > bytes) {
                        bail!("TLS floor: shard {off}+{len} outside {bytes}");
                    }
                    // SAFETY: [off, off+len) lies inside the mapping (checked above), which
                    // outlives this scope; each receiver writes only its own shard and nothing
                    // reads it meanwhile.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (base + off as usize) as *mut u8,
                            len as usize,
                        )
                    };
                    st.conn.read_exact(dst)?;
                    Ok(cpu.elapsed().as_secs_f64())
                }));
            }
            let mut send = Vec::new();
            for i in 0..streams {
                send.push(s.spawn(move || -> anyhow::Result<f64> {
                    let off = (i * shard).min(bytes);
                    let len = if i + 1 == streams {
                        bytes - off
                    } else {
                        shard.min(bytes - off)
                    };
                    let mut st =
                        migration::transport::connect(addr, security, "127.0.0.1", timeout)
                            .map_err(|e| anyhow::anyhow!(migration::chain(&e)))?;
                    let cpu = migration::cpu::ThreadCpu::start();
                    let mut h = [0u8; 16];
                    h[..8].copy_from_slice(&off.to_le_bytes());
                    h[8..].copy_from_slice(&len.to_le_bytes());
                    st.conn.write_all(&h)?;
                    let mut buf = vec![0u8; WRITE];
                    let mut pos = 0;
                    while pos < len {
                        let n = (len - pos).min(WRITE as u64) as usize;
                        src.read_exact_at(&mut buf[..n], off + pos)?;
                        st.conn.write_all(&buf[..n])?;
                        pos += n as u64;
                    }
                    st.conn.flush()?;
                    let cpu_s = cpu.elapsed().as_secs_f64();
                    // Read until the receiver closes: what the server sent after the handshake
                    // (session tickets) must not sit unread here at close, or the close is a
                    // reset that can overtake the last records.
                    let _ = st.tcp.shutdown(std::net::Shutdown::Write);
                    let mut sink = [0u8; 512];
                    while matches!(st.conn.read(&mut sink), Ok(n) if n > 0) {}
                    Ok(cpu_s)
                }));
            }
            cpu_sums(send, recv)
        })
    })
}
