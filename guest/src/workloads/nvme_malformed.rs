//! `nvme-malformed`: submits malformed commands (bad PRPs, addresses outside guest RAM, bad
//! queue ids, bad opcodes and namespaces, SGLs, a bogus doorbell value) and checks that each
//! gets the error status the NVMe specification prescribes, then proves the controller still
//! works with a good write and read.
use guest_abi::{params::status, BootParams};
use nvme_spec::{
    opcode::{admin, io},
    Sqe, Status,
};

use crate::{
    clock,
    nvme::{Arena, Nvme},
    println,
};

/// Far outside any RAM Ferry gives a guest (and outside the PCI window).
const OUTSIDE: u64 = 0x40_0000_0000;

/// Where the hypervisor maps its PRP-list bounce areas while it shadows the queues (its first
/// address above guest RAM, plus 1 GiB; see the shadow engine): a hostile guest aims there.
/// Unshadowed nothing is mapped there; shadowed the hypervisor must refuse it.
fn hypervisor_bounce(p: &BootParams) -> u64 {
    let ram_end = if p.ram_hi_size > 0 {
        (1 << 32) + p.ram_hi_size
    } else {
        p.ram_lo_size
    };
    ram_end.next_multiple_of(1 << 30).max(1 << 32) + (2 << 30)
}

fn io_cmd(n: &mut Nvme, sqe: &Sqe) -> Option<Status> {
    let q = n.queues[0].as_mut()?;
    q.submit(sqe).ok()?;
    let t0 = clock::rdtsc();
    let limit = 5000 * clock::ticks_per_ms();
    loop {
        if let Some(c) = q.poll() {
            q.ack();
            return (c.cid() == sqe.cid()).then_some(c.status());
        }
        if clock::rdtsc() - t0 > limit {
            return None;
        }
        core::hint::spin_loop();
    }
}

pub fn run(p: &BootParams) -> u32 {
    let mut arena = Arena::new(p.ram_lo_size);
    let mut n = match Nvme::init(&mut arena, 1, 16, false) {
        Ok(n) => n,
        Err(e) => {
            println!("nvme-malformed: controller bring-up failed: {}", e);
            return status::NVME_INIT_FAILED;
        }
    };
    // Allow queue ids up to 4 so that the checks below hit the condition they name.
    if let Err(e) = n.ctrl.set_queue_count(4) {
        println!(
            "nvme-malformed: Set Features (Number of Queues) failed: {}",
            e
        );
        return status::NVME_INIT_FAILED;
    }
    // Optional settle time (`--duration`): lets a hypervisor start shadowing the I/O queue
    // before the malformed commands arrive.
    let settle = p.args.duration_ms.saturating_mul(clock::ticks_per_ms());
    let t0 = clock::rdtsc();
    while clock::rdtsc().wrapping_sub(t0) < settle {
        core::hint::spin_loop();
    }
    let (Some(buf), Some(list)) = (arena.alloc(4 * 4096), arena.alloc(4096)) else {
        return status::BAD_PARAMS;
    };
    let bs = n.block_size;
    let blocks_3pages = (3 * 4096 / bs).max(1);
    let rd = |cid: u16, lba: u64, nblocks: u32, p1: u64, p2: u64| {
        let mut s = Sqe::new(io::READ, cid);
        s.set_nsid(1).set_prps(p1, p2).set_lba_range(lba, nblocks);
        s
    };
    // A PRP list whose second entry has an offset.
    // SAFETY: `list` is our page.
    unsafe {
        (list as *mut u64).write_volatile(buf + 4096);
        (list as *mut u64).add(1).write_volatile(buf + 2 * 4096 + 8);
    }
    let mut sgl = rd(8, 0, 1, buf, 0);
    sgl.dw[0] |= 1 << 14;
    let mut other_ns = rd(9, 0, 1, buf, 0);
    other_ns.set_nsid(5);
    let io_cases: [(&str, Sqe, Status); 9] = [
        (
            "read with an unaligned PRP1",
            rd(1, 0, 1, buf + 2, 0),
            Status::INVALID_PRP_OFFSET,
        ),
        (
            "read into an address outside guest RAM",
            rd(2, 0, 1, OUTSIDE, 0),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "read with a PRP list outside guest RAM",
            rd(3, 0, blocks_3pages, buf, OUTSIDE),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "read with a PRP list entry with an offset",
            rd(4, 0, blocks_3pages, buf, list),
            Status::INVALID_PRP_OFFSET,
        ),
        (
            "read past the end of the namespace",
            rd(5, n.blocks, 1, buf, 0),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "read with a wrapping LBA range",
            rd(6, u64::MAX, 2, buf, 0),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "unknown I/O opcode",
            Sqe::new(0x7f, 7),
            Status::INVALID_OPCODE,
        ),
        ("read with an SGL", sgl, Status::INVALID_FIELD),
        ("read from namespace 5", other_ns, Status::INVALID_NAMESPACE),
    ];
    let mut failures = 0;
    let mut checked = 0;
    for (what, sqe, want) in io_cases.iter() {
        checked += 1;
        match io_cmd(&mut n, sqe) {
            Some(st) if st.same(*want) => {
                println!("nvme-malformed: {}: rejected ({}) as expected", what, st)
            }
            Some(st) => {
                println!("nvme-malformed: {}: got {}, expected {}", what, st, want);
                failures += 1;
            }
            None => {
                println!("nvme-malformed: {}: no completion", what);
                failures += 1;
            }
        }
    }
    let mk = |op: u8, cdw10: u32, cdw11: u32, prp1: u64| {
        let mut s = Sqe::new(op, 0);
        s.set_prps(prp1, 0).set_cdw(10, cdw10).set_cdw(11, cdw11);
        s
    };
    let qbuf = arena.alloc(4096).unwrap_or(buf);
    let admin_cases: [(&str, Sqe, Status); 7] = [
        (
            "create SQ 0",
            mk(admin::CREATE_SQ, 15 << 16, 1 | 1 << 16, qbuf),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create SQ 2 on missing CQ 9",
            mk(admin::CREATE_SQ, 15 << 16 | 2, 1 | 9 << 16, qbuf),
            Status::CQ_INVALID,
        ),
        (
            "create CQ 1000",
            mk(admin::CREATE_CQ, 15 << 16 | 1000, 1, qbuf),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "create CQ 2 outside guest RAM",
            mk(admin::CREATE_CQ, 15 << 16 | 2, 1, OUTSIDE),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "delete SQ 7",
            mk(admin::DELETE_SQ, 7, 0, 0),
            Status::INVALID_QUEUE_ID,
        ),
        (
            "unknown admin opcode",
            mk(0x7e, 0, 0, 0),
            Status::INVALID_OPCODE,
        ),
        (
            "identify into the hypervisor's bounce area",
            mk(admin::IDENTIFY, 1, 0, hypervisor_bounce(p)),
            Status::DATA_TRANSFER_ERROR,
        ),
    ];
    for (what, sqe, want) in admin_cases.iter() {
        checked += 1;
        // While shadowed the hypervisor refuses every Create I/O SQ (Invalid Field): a queue
        // created then would run unchecked. Either refusal is the right one.
        let refused_while_shadowed = |c: &nvme_spec::Cqe| {
            sqe.opcode() == admin::CREATE_SQ && c.status().same(Status::INVALID_FIELD)
        };
        match n.ctrl.admin_raw(*sqe) {
            Ok(c) if c.status().same(*want) || refused_while_shadowed(&c) => println!(
                "nvme-malformed: {}: rejected ({}) as expected",
                what,
                c.status()
            ),
            Ok(c) => {
                println!(
                    "nvme-malformed: {}: got {}, expected {}",
                    what,
                    c.status(),
                    want
                );
                failures += 1;
            }
            Err(e) => {
                println!("nvme-malformed: {}: {}", what, e);
                failures += 1;
            }
        }
    }
    // A doorbell value beyond the queue: the device ignores it.
    let db = n.bar0 + nvme_spec::regs::sq_tail_doorbell(1, n.ctrl.dstrd());
    crate::io::mmio_write32(db, 9999);
    let tail = n.queues[0].as_ref().map(|q| q.sq_tail()).unwrap_or(0);
    crate::io::mmio_write32(db, tail as u32);

    // The device still works: write a pattern, read it back.
    // SAFETY: `buf` is ours.
    let data = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, bs as usize) };
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u8) ^ 0x5a;
    }
    let mut w = Sqe::new(io::WRITE, 20);
    w.set_nsid(1).set_prps(buf, 0).set_lba_range(0, 1);
    let ws = io_cmd(&mut n, &w);
    data.fill(0);
    let rs = io_cmd(&mut n, &rd(21, 0, 1, buf, 0));
    let good = ws.is_some_and(|s| s.is_success())
        && rs.is_some_and(|s| s.is_success())
        && data.iter().enumerate().all(|(i, &b)| b == (i as u8) ^ 0x5a);
    if !good {
        println!("nvme-malformed: the device no longer works after the malformed commands (write {:?}, read {:?})", ws.map(|s| s.0), rs.map(|s| s.0));
        return status::NVME_IO_ERROR;
    }
    if let Err(e) = n.shutdown() {
        println!("nvme-malformed: shutdown failed: {}", e);
        return status::NVME_IO_ERROR;
    }
    if failures != 0 {
        println!(
            "nvme-malformed: {} of {} malformed commands got the wrong status",
            failures, checked
        );
        return status::NVME_WRONG_ERROR_STATUS;
    }
    println!("nvme-malformed: all {} malformed commands rejected with the right status; the device still works", checked);
    status::OK
}
