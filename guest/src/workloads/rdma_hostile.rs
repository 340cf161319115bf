//! `rdma-hostile`: a guest that writes garbage into the PVRDMA command slot, page directories,
//! ring indexes and work requests, and checks that every one is answered with an error (a
//! command error, an error completion, or the queue pair in the error state) while the device
//! keeps serving it. Exits 0 when every hostile request was refused.
use guest_abi::{params::status, BootParams};
use pvrdma_abi::{self as abi, cmd_code, errno, qp_state, qp_type, IntoBytes};
use rdma_wire::rdma_cm::RDMA_CM_UD_QKEY;

use crate::{
    clock, println,
    pvrdma::{alloc_pages, write_u32, write_u64, Device},
};

fn hdr(cmd: u32) -> abi::CmdHdr {
    abi::CmdHdr {
        response: 1,
        cmd,
        reserved: 0,
    }
}

pub fn run(p: &BootParams) -> u32 {
    let Some(dev) = Device::open() else {
        println!("rdma-hostile: no PVRDMA device");
        return status::RDMA_NO_DEVICE;
    };
    let mut refused = 0u32;
    let mut accepted = 0u32;
    let mut check = |what: &str, r: Result<(), u8>| match r {
        Err(e) => {
            println!("rdma-hostile: {}: error {}", what, e);
            refused += 1;
        }
        Ok(()) => {
            println!("rdma-hostile: {}: ACCEPTED", what);
            accepted += 1;
        }
    };
    let cmd = |bytes: &[u8]| -> Result<(), u8> {
        match dev.raw_command(bytes) {
            0 => Ok(()),
            e => Err(e as u8),
        }
    };
    // Garbage in the command slot.
    let mut junk = [0u8; 256];
    let mut x = p.args.seed | 1;
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    junk[8..12].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    check("random command", cmd(&junk));
    check(
        "CREATE_UC (unsupported)",
        cmd(abi::CmdCreateUc {
            hdr: hdr(cmd_code::CREATE_UC),
            ..Default::default()
        }
        .as_bytes()),
    );
    // Page directories outside guest RAM, unaligned, and tables pointing into the MMIO hole.
    for pdir_dma in [0xdead_beef_0000u64, 0x1234_5678, 0xE000_0000] {
        check(
            "CREATE_CQ with a hostile page directory",
            cmd(abi::CmdCreateCq {
                hdr: hdr(cmd_code::CREATE_CQ),
                pdir_dma,
                cqe: 64,
                nchunks: 2,
                ..Default::default()
            }
            .as_bytes()),
        );
    }
    let bad_dir = alloc_pages(1);
    write_u64(bad_dir, 0xE000_0000);
    check(
        "CREATE_CQ whose table points at MMIO",
        cmd(abi::CmdCreateCq {
            hdr: hdr(cmd_code::CREATE_CQ),
            pdir_dma: bad_dir,
            cqe: 64,
            nchunks: 2,
            ..Default::default()
        }
        .as_bytes()),
    );
    check(
        "CREATE_CQ with 2^31 entries",
        cmd(abi::CmdCreateCq {
            hdr: hdr(cmd_code::CREATE_CQ),
            pdir_dma: bad_dir,
            cqe: 1 << 31,
            nchunks: u32::MAX,
            ..Default::default()
        }
        .as_bytes()),
    );
    let pd = dev.create_pd().unwrap_or(0);
    check(
        "CREATE_MR with 4 billion pages",
        cmd(abi::CmdCreateMr {
            hdr: hdr(cmd_code::CREATE_MR),
            start: 0x10_0000,
            length: 1 << 44,
            pdir_dma: bad_dir,
            pd_handle: pd,
            nchunks: u32::MAX,
            ..Default::default()
        }
        .as_bytes()),
    );
    check(
        "CREATE_QP with unknown CQ handles",
        cmd(abi::CmdCreateQp {
            hdr: hdr(cmd_code::CREATE_QP),
            pd_handle: pd,
            send_cq_handle: 0xabcdef,
            recv_cq_handle: 7777,
            qp_type: qp_type::GSI,
            ..Default::default()
        }
        .as_bytes()),
    );
    check(
        "DESTROY_QP of a QP that is not there",
        dev.destroy_qp(0x00ff_0000),
    );
    check("CREATE_BIND beyond the GID table", dev.bind(200, [1; 16]));
    check("CREATE_BIND of the zero GID", dev.bind(0, [0; 16]));
    if p.args.rdma.other_gid != 0 {
        // A GID the host did not configure for this VM (free, or another VM's): the host
        // decides which GIDs a VM may own, not the guest.
        check(
            "CREATE_BIND of a GID the host did not give this VM",
            dev.bind(1, gid_bytes(p.args.rdma.other_gid)),
        );
    }
    check(
        "MODIFY_QP of an unknown QP",
        dev.modify_qp(999, qp_state::RTS, 0),
    );

    // A real GSI QP, then hostile work requests and ring indexes.
    let Ok(lkey) = dev.dma_mr(pd) else {
        return status::RDMA_FAILED;
    };
    let (Ok(scq), Ok(rcq)) = (dev.create_cq(), dev.create_cq()) else {
        return status::RDMA_FAILED;
    };
    let Ok(qp) = dev.create_qp(pd, &scq, &rcq, qp_type::GSI) else {
        return status::RDMA_FAILED;
    };
    let buf = alloc_pages(1);
    let sends: [(&str, u64, u32, u32, u8); 4] = [
        ("send with a foreign lkey", buf, 256, 0x00ee_eeee, 0),
        (
            "send from outside guest RAM",
            0x7fff_ffff_0000,
            256,
            lkey,
            0,
        ),
        ("send from an unbound GID index", buf, 256, lkey, 9),
        ("MAD send of 17 bytes", buf, 17, lkey, 0),
    ];
    for (what, addr, len, key, gid_index) in sends {
        qp.post_send(1, addr, len, key, [0xfe; 16], 1, 0x8001_0000, gid_index);
        let t0 = clock::rdtsc();
        let st = loop {
            if let Some(c) = scq.poll() {
                break Some(c.status);
            }
            if clock::ticks_to_ms(clock::rdtsc() - t0) > 2000 {
                break None;
            }
        };
        check(
            what,
            match st {
                Some(0) => Ok(()),
                Some(s) => Err(s as u8),
                None => Err(errno::EINVAL),
            },
        );
    }
    // Ring index beyond 2 x size: the QP must end in the error state.
    write_u32(qp.header_page(), 0xffff_ff00);
    let t0 = clock::rdtsc();
    let state = loop {
        let s = dev.qp_state(qp.qpn).unwrap_or(u32::MAX);
        if s == qp_state::ERR || clock::ticks_to_ms(clock::rdtsc() - t0) > 2000 {
            break s;
        }
    };
    check(
        "send ring index 0xffffff00",
        if state == qp_state::ERR {
            Err(state as u8)
        } else {
            Ok(())
        },
    );
    // A UD QP created on this VM's GID is cut off when the GID is unbound (another VM may own
    // it next): even with the same GID bound again, the QP sends nothing more.
    if p.args.rdma.local_gid != 0 {
        check(
            "UD send after its GID was unbound and bound again",
            ud_after_unbind(&dev, pd, lkey, gid_bytes(p.args.rdma.local_gid)),
        );
    }
    // The device still works for this VM.
    let ok = dev.create_pd().is_ok() && dev.destroy_qp(qp.qpn).is_ok();
    println!(
        "rdma-hostile: {} hostile requests refused, {} accepted; device {}",
        refused,
        accepted,
        if ok {
            "still serves commands"
        } else {
            "BROKEN"
        }
    );
    if accepted == 0 && ok {
        status::OK
    } else {
        status::RDMA_NOT_REFUSED
    }
}

/// The IPv4-mapped GID of `ip`.
fn gid_bytes(ip: u32) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xff;
    g[11] = 0xff;
    g[12..].copy_from_slice(&ip.to_be_bytes());
    g
}

/// Binds `own` at index 0, makes a UD QP on it, unbinds and binds it again, then sends to
/// the QP itself. `Ok` if the send completed successfully (the QP still used the GID it lost).
fn ud_after_unbind(dev: &Device, pd: u32, lkey: u32, own: [u8; 16]) -> Result<(), u8> {
    dev.bind(0, own)?;
    let (scq, rcq) = (dev.create_cq()?, dev.create_cq()?);
    let ud = dev.create_qp(pd, &scq, &rcq, qp_type::UD)?; // in RTS
    dev.unbind(0, own)?;
    dev.bind(0, own)?;
    let buf = alloc_pages(1);
    ud.post_send(7, buf, 16, lkey, own, ud.qpn, RDMA_CM_UD_QKEY, 0);
    let t0 = clock::rdtsc();
    let status = loop {
        if let Some(c) = scq.poll() {
            break Some(c.status);
        }
        if clock::ticks_to_ms(clock::rdtsc() - t0) > 2000 {
            break None;
        }
    };
    // Nothing sent: the QP is in the error state.
    let state = dev.qp_state(ud.qpn).unwrap_or(u32::MAX);
    let _ = dev.destroy_qp(ud.qpn);
    match status {
        Some(0) => Ok(()),
        Some(s) => Err(s as u8),
        None if state == qp_state::ERR => Err(state as u8),
        None => Err(errno::EINVAL),
    }
}
