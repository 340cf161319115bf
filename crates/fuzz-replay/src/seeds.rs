//! The seed corpora: the UDP payloads of the real SoftRoCE captures
//! (`crates/rdma-wire/testdata/*.pcap`, one file per packet and one per conversation), and
//! sessions recorded from Ferry's own encoders (a migration stream, a PVRDMA driver session,
//! NVMe queues and device state, a vfio-user client session, a guest's port and mailbox use).
use std::{collections::BTreeMap, io, net::Ipv4Addr, path::Path};

use rdma_wire::{RocePacket, GSI_QP};

/// One RoCEv2 datagram of a capture.
pub struct Datagram {
    /// IP source.
    pub src: Ipv4Addr,
    /// IP destination.
    pub dst: Ipv4Addr,
    /// The UDP payload (BTH … ICRC).
    pub payload: Vec<u8>,
}

/// The RoCEv2 datagrams (UDP port 4791 over IPv4 over Ethernet) of a classic pcap file.
pub fn pcap_datagrams(file: &[u8]) -> Vec<Datagram> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let incl = u32::from_le_bytes([file[at + 8], file[at + 9], file[at + 10], file[at + 11]]);
        at += 16;
        let Some(rec) = file.get(at..at + incl as usize) else {
            break;
        };
        at += incl as usize;
        if rec.len() < 34 || rec[12..14] != [0x08, 0x00] || rec[23] != 17 {
            continue;
        }
        let ip = &rec[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let Some(udp) = ip.get(ihl..total) else {
            continue;
        };
        if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != rdma_wire::ROCEV2_UDP_PORT {
            continue;
        }
        out.push(Datagram {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            payload: udp[8..].to_vec(),
        });
    }
    out
}

fn record(out: &mut Vec<u8>, ctl: u8, bytes: &[u8]) {
    out.push(ctl);
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The index of a capture address in `rdma::fuzzing`'s address table (10.11.0.1, .2, .3).
fn gid_index(a: Ipv4Addr) -> u8 {
    match a.octets()[3] {
        1 => 0,
        2 => 1,
        _ => 2,
    }
}

/// The multiplexer's control byte for a datagram: inbound to VM 1 (10.11.0.1) when it comes
/// from elsewhere, outbound from VM 1 when 10.11.0.1 sent it.
fn mux_ctl(d: &Datagram) -> u8 {
    let addr = gid_index(d.src) | gid_index(d.dst) << 2;
    if d.src.octets()[3] == 1 {
        addr | 0x10
    } else {
        addr
    }
}

/// The RC transport's input header for the packets `d` (those to one QP in one direction):
/// PSNs from the first request and the first packet back, the region the first RETH names.
fn rc_header(reqs: &[&Datagram], back: Option<&Datagram>) -> Vec<u8> {
    let psn = |d: &Datagram| RocePacket::parse(&d.payload).map_or(0, |p| p.bth.psn);
    let mut h = vec![3u8]; // MTU 1024
    h.extend_from_slice(&psn(reqs[0]).to_be_bytes()[1..]);
    h.extend_from_slice(&back.map_or(0, psn).to_be_bytes());
    h.push(3); // remote write and read
    let reth = reqs
        .iter()
        .filter_map(|d| RocePacket::parse(&d.payload).ok()?.reth)
        .next();
    let (key, va, len) = reth.map_or((1, 0x1000, 4096), |r| {
        (r.r_key, r.virtual_address, r.dma_length.clamp(64, 65535))
    });
    h.extend_from_slice(&key.to_le_bytes());
    h.extend_from_slice(&va.to_le_bytes());
    h.extend_from_slice(&(len as u16).to_le_bytes());
    h
}

fn write(dir: &Path, name: &str, data: &[u8], n: &mut usize) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), data)?;
    *n += 1;
    Ok(())
}

/// Seeds from the captures: per packet and per conversation for the multiplexer target,
/// RC packets per connection direction for the RC target, MADs for the PVRDMA target.
fn capture_seeds(corpus: &Path, n: &mut usize) -> io::Result<()> {
    let testdata = crate::fuzz_dir().join("../crates/rdma-wire/testdata");
    for cap in ["rping", "udaddy", "ucmatose"] {
        let file = std::fs::read(testdata.join(format!("{cap}.pcap")))?;
        let dgrams = pcap_datagrams(&file);
        let mut conversation = Vec::new();
        let mut rc: BTreeMap<(Ipv4Addr, u32), Vec<&Datagram>> = BTreeMap::new();
        let mut mads = Vec::new();
        for (i, d) in dgrams.iter().enumerate() {
            let Ok(p) = RocePacket::parse(&d.payload) else {
                continue;
            };
            let mut one = Vec::new();
            record(&mut one, mux_ctl(d), &d.payload);
            write(&corpus.join("roce_mux"), &format!("{cap}-{i:03}"), &one, n)?;
            if p.bth.dest_qp == GSI_QP {
                record(&mut conversation, mux_ctl(d), &d.payload);
                if let Some(m) = p.mad() {
                    record(&mut mads, 4, m);
                    record(&mut mads, 3, &[]);
                }
            } else if rdma_wire::opcode::transport(p.bth.opcode) == rdma_wire::opcode::Transport::Rc
            {
                rc.entry((d.dst, p.bth.dest_qp)).or_default().push(d);
            }
        }
        // Time passes at the end: retries and time-wait run out.
        record(&mut conversation, 0x60, &[]);
        write(
            &corpus.join("roce_mux"),
            &format!("{cap}-conversation"),
            &conversation,
            n,
        )?;
        if !mads.is_empty() {
            let mut s = vrdma::fuzzing::sample_session();
            s.extend_from_slice(&mads);
            write(
                &corpus.join("pvrdma_commands"),
                &format!("{cap}-mads"),
                &s,
                n,
            )?;
        }
        for ((dst, qpn), reqs) in &rc {
            let back = dgrams.iter().find(|d| {
                d.src == *dst
                    && RocePacket::parse(&d.payload).is_ok_and(|p| p.bth.dest_qp != GSI_QP)
            });
            let mut input = rc_header(reqs, back);
            // One receive posted per packet, so SENDs find buffers.
            for d in reqs.iter() {
                record(&mut input, 1, &[0; 64]);
                record(&mut input, 0, &d.payload);
            }
            record(&mut input, 5, &[1]);
            record(&mut input, 0xff, &[]);
            write(
                &corpus.join("rc_responder"),
                &format!("{cap}-{dst}-qp{qpn:x}"),
                &input,
                n,
            )?;
        }
    }
    Ok(())
}

/// NVMe queue seeds: reads and writes of 1, 2 and 5 pages (a PRP list) submitted through the
/// shadowed queue, the device's completion, the guest consuming it.
fn nvme_seeds(corpus: &Path, n: &mut usize) -> io::Result<()> {
    use nvme_spec::{opcode::io, Cqe, Sqe, Status};
    const BASE: u64 = 0x10_0000;
    for (i, (op, pages)) in [
        (io::READ, 1u32),
        (io::WRITE, 2),
        (io::READ, 5),
        (io::FLUSH, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut o = vec![1, 5, 14, 14]; // 4096-byte blocks, 128 KiB, 16-entry queues
        let blocks = pages.max(1);
        let list = BASE + 20 * 4096;
        let prp2 = match pages {
            0 | 1 => 0,
            2 => BASE + 11 * 4096,
            _ => list,
        };
        let mut s = Sqe::new(op, i as u16 + 1);
        s.set_nsid(1).set_prps(BASE + 10 * 4096, prp2);
        if op != io::FLUSH {
            s.set_lba_range(8, blocks);
        }
        let mut entries = Vec::new();
        for p in 1..pages as u64 {
            entries.extend_from_slice(&(BASE + (10 + p) * 4096).to_le_bytes());
        }
        // The PRP list in guest memory (both buffers), then validation.
        let mut w = ((list - BASE) as u16).to_le_bytes().to_vec();
        w.extend_from_slice(&entries);
        record(&mut o, 1, &w);
        record(&mut o, 2, &w);
        let mut with_list = s.to_bytes().to_vec();
        with_list.extend_from_slice(&entries);
        record(&mut o, 7, &with_list);
        record(&mut o, 0, &s.to_bytes());
        // Submitted through the queue: entry 0 of the SQ, doorbell 1.
        let mut sq = 0u16.to_le_bytes().to_vec();
        sq.extend_from_slice(&s.to_bytes());
        record(&mut o, 1, &sq);
        record(&mut o, 3, &1u32.to_le_bytes());
        // The device completes it in its CQ (page 1), phase 1.
        let cqe = Cqe::new(0, 1, 1, i as u16 + 1, Status::SUCCESS, true);
        let mut cq = 4096u16.to_le_bytes().to_vec();
        cq.extend_from_slice(&cqe.to_bytes());
        record(&mut o, 2, &cq);
        record(&mut o, 5, &[]);
        record(&mut o, 4, &1u32.to_le_bytes());
        record(&mut o, 6, &[1]);
        record(&mut o, 0xff, &[]);
        write(&corpus.join("nvme_submission"), &format!("io-{i}"), &o, n)?;
    }
    Ok(())
}

/// Writes every seed into `fuzz/corpus/TARGET/`; returns how many files.
pub fn write_all() -> io::Result<usize> {
    let corpus = crate::fuzz_dir().join("corpus");
    let mut n = 0;
    capture_seeds(&corpus, &mut n)?;
    nvme_seeds(&corpus, &mut n)?;
    let other = |e: String| io::Error::other(e);
    let stream = migration::fuzzing::sample_stream().map_err(|e| other(e.to_string()))?;
    write(
        &corpus.join("migration_destination"),
        "stream",
        &stream,
        &mut n,
    )?;
    // The same stream cut before Go: the destination restores but never runs the VM.
    write(
        &corpus.join("migration_destination"),
        "stream-no-go",
        &stream[..stream.len() - 12],
        &mut n,
    )?;
    write(
        &corpus.join("pvrdma_commands"),
        "session",
        &vrdma::fuzzing::sample_session(),
        &mut n,
    )?;
    write(
        &corpus.join("nvme_registers"),
        "bring-up",
        &nvme_device::fuzzing::sample_registers(),
        &mut n,
    )?;
    write(
        &corpus.join("vfio_user_stream"),
        "session",
        &nvme_device::fuzzing::sample_stream(),
        &mut n,
    )?;
    write(
        &corpus.join("guest_abi"),
        "session",
        &vmm::fuzzing::sample_session(),
        &mut n,
    )?;
    write(
        &corpus.join("device_state"),
        "nvme0",
        &shadow::fuzzing::sample_saved_device(),
        &mut n,
    )?;
    write(
        &corpus.join("virtio_queue"),
        "session",
        &shadow::fuzzing::sample_virtio_session(),
        &mut n,
    )?;
    let vm = vmm::Vm::new(&vmm::VmConfig {
        ram_size: 32 << 20,
        console: vmm::devices::serial::ConsoleSink::Null,
        ..vmm::VmConfig::default()
    })
    .map_err(|e| other(e.to_string()))?;
    let state = vm.save_state().map_err(|e| other(e.to_string()))?;
    let mut s = vec![1u8];
    s.extend(postcard::to_allocvec(&state).map_err(|e| other(e.to_string()))?);
    write(&corpus.join("device_state"), "vm-state", &s, &mut n)?;
    Ok(n)
}
