//! Entry points for the coverage-guided fuzzer (`fuzz/` at the top of the repository) and for
//! the corpus replay test that runs the same bodies on the stable toolchain. Not an API.
use std::sync::{Arc, Mutex};

use pvrdma_abi::{self as abi, cmd_code, qp_state, qp_type, Immutable, IntoBytes};
use rdma_wire::{Gid, MAD_SIZE};

use crate::{
    backend::{MadInbox, RdmaBackend, UdDatagram, UdQueue, GRH_LEN},
    device::Device,
    mem::{GuestMemory, VecMemory},
    BackendError, BackendErrorKind,
};

/// Guest RAM of the fuzzed device: small, so that fuzzed addresses often land inside.
const MEM: usize = 256 << 10;
const DSR: u64 = 0x1000;
const CMD: u64 = 0x2000;
const RESP: u64 = 0x3000;
const ASYNC_DIR: u64 = 0x4000;
const ASYNC_TABLE: u64 = 0x5000;
const ASYNC_PAGES: [u64; 2] = [0x6000, 0x7000];

/// GIDs the fuzzed VM may bind: the first; the second is another VM's.
fn gid(last: u8) -> Gid {
    Gid::from_ipv4(core::net::Ipv4Addr::new(127, 0, 1, last)).canonical()
}

/// A host side that accepts everything but the other VM's GID, and UD queues whose inbound
/// datagrams the input supplies.
#[derive(Default)]
struct Backend {
    inbound: Arc<Mutex<Vec<UdDatagram>>>,
}

struct Ud {
    inbound: Arc<Mutex<Vec<UdDatagram>>>,
}

impl UdQueue for Ud {
    fn qpn(&self) -> u32 {
        0x42
    }
    fn send(&self, _: Gid, _: u32, _: u32, _: Option<u32>, _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn try_recv(&self) -> Option<UdDatagram> {
        self.inbound.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

impl RdmaBackend for Backend {
    fn bind_gid(&self, g: Gid) -> Result<(), BackendError> {
        if g == gid(2) {
            return Err(BackendError::new(
                BackendErrorKind::AddressInUse,
                "another VM's",
            ));
        }
        Ok(())
    }
    fn unbind_gid(&self, _: Gid) -> Result<(), BackendError> {
        Ok(())
    }
    fn send_mad(&self, _: Gid, _: Gid, _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn receive_buffers_posted(&self) {}
    fn create_ud_qp(&self, _: Gid, _: u32) -> Result<Box<dyn UdQueue>, BackendError> {
        Ok(Box::new(Ud {
            inbound: self.inbound.clone(),
        }))
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(w)
}

/// The PVRDMA device's command channel and data path over fuzzed guest memory. The device
/// is activated with a shared region at 0x1000 (command slot 0x2000, response slot 0x3000,
/// a two-page async ring); then each record `[control][len: u16 LE][bytes]` is: 0 a command
/// (the bytes in the command slot, then the REQUEST register), 1 a guest memory write
/// (address: first 4 bytes LE), 2 a register write (offset, value: 4 bytes LE each), 3 the
/// device thread's poll, 4 a MAD from the network (the multiplexer's delivery), 5 a UD
/// datagram from the network, 6 a CQ doorbell word, 7 an MSI-X table write, anything else
/// a device reset and re-activation.
pub fn command_channel(data: &[u8]) {
    let _ = run(data);
}

/// The key secret of fuzzed devices: `(1 * 0x9e37_79b9 ^ secret) & !0xff` is 0, so a PD's
/// first memory region gets key 1 (the low byte is the registration count).
const FUZZ_KEY_SECRET: u32 = 0x9e37_7900;

fn run(data: &[u8]) -> crate::DeviceStats {
    let mem = Arc::new(VecMemory::new(MEM));
    let backend = Arc::new(Backend::default());
    let inbox = Arc::new(MadInbox::default());
    let mut dev = Device::new(mem.clone(), backend.clone(), inbox.clone());
    // Memory keys the same in every run: a PD's first MR gets key 1.
    dev.rc.fixed_secret = Some(FUZZ_KEY_SECRET);
    let dsr = abi::DeviceSharedRegion {
        cmd_slot_dma: CMD,
        resp_slot_dma: RESP,
        async_ring_pages: abi::RingPageInfo {
            num_pages: 2,
            reserved: 0,
            pdir_dma: ASYNC_DIR,
        },
        ..Default::default()
    };
    let setup = mem
        .write(DSR, dsr.as_bytes())
        .and_then(|_| mem.write(ASYNC_DIR, &ASYNC_TABLE.to_le_bytes()))
        .and_then(|_| mem.write(ASYNC_TABLE, &ASYNC_PAGES[0].to_le_bytes()))
        .and_then(|_| mem.write(ASYNC_TABLE + 8, &ASYNC_PAGES[1].to_le_bytes()));
    if setup.is_err() {
        return dev.stats();
    }
    let activate = |dev: &mut Device| {
        dev.write_reg(abi::PVRDMA_REG_DSRLOW, DSR as u32);
        dev.write_reg(abi::PVRDMA_REG_DSRHIGH, 0);
        dev.write_reg(abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_ACTIVATE);
    };
    activate(&mut dev);
    for (ctl, b) in rdma_wire::fuzz_records::Records(data) {
        match ctl {
            0 => {
                let mut slot = [0u8; 256];
                let n = b.len().min(256);
                slot[..n].copy_from_slice(&b[..n]);
                if mem.write(CMD, &slot).is_ok() {
                    dev.write_reg(abi::PVRDMA_REG_REQUEST, 0);
                }
            }
            1 => {
                let _ = mem.write(le32(b, 0) as u64, b.get(4..).unwrap_or(&[]));
            }
            2 => dev.write_reg(le32(b, 0) as u64, le32(b, 4)),
            3 => {
                dev.poll();
            }
            4 => {
                let mut mad = [0u8; MAD_SIZE];
                let n = b.len().min(MAD_SIZE);
                mad[..n].copy_from_slice(&b[..n]);
                let _ = inbox.deliver(&[0u8; GRH_LEN], &mad);
            }
            5 => backend
                .inbound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(UdDatagram {
                    sgid: gid(9),
                    src_qpn: le32(b, 0),
                    grh: [0u8; GRH_LEN],
                    imm: b.first().filter(|&&x| x & 1 != 0).map(|_| le32(b, 4)),
                    data: b.to_vec(),
                }),
            6 => dev.cq_doorbell(le32(b, 0)),
            7 => dev.write_msix(le32(b, 0) as u64, le32(b, 4)),
            _ => {
                dev.write_reg(abi::PVRDMA_REG_CTL, abi::PVRDMA_DEVICE_CTL_RESET);
                activate(&mut dev);
            }
        }
        let _ = dev.read_reg(abi::PVRDMA_REG_ERR);
    }
    let _ = dev.state();
    let stats = dev.stats();
    dev.reset();
    stats
}

/// Appends one record.
fn record(out: &mut Vec<u8>, ctl: u8, bytes: &[u8]) {
    out.push(ctl);
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn cmd<T: IntoBytes + Immutable>(out: &mut Vec<u8>, c: &T) {
    record(out, 0, c.as_bytes());
}

fn write(out: &mut Vec<u8>, gpa: u32, bytes: &[u8]) {
    let mut b = gpa.to_le_bytes().to_vec();
    b.extend_from_slice(bytes);
    record(out, 1, &b);
}

/// A page directory at `dir` (table at `dir + 0x1000`) for `pages` pages after it.
fn pdir(out: &mut Vec<u8>, dir: u32, pages: u32) {
    let table = dir + 0x1000;
    write(out, dir, &(table as u64).to_le_bytes());
    let mut t = Vec::new();
    for i in 0..pages {
        t.extend_from_slice(&((table + 0x1000 * (i + 1)) as u64).to_le_bytes());
    }
    write(out, table, &t);
}

fn hdr(cmd: u32) -> abi::CmdHdr {
    abi::CmdHdr {
        response: 0x77,
        cmd,
        reserved: 0,
    }
}

/// A guest driver's session as records (the corpus seed): query the port, bind a GID, a PD,
/// a DMA region, a CQ, a GSI and a UD queue pair brought to RTS, a receive and a send posted,
/// a MAD and a datagram arriving, polls.
pub fn sample_session() -> Vec<u8> {
    let mut o = Vec::new();
    cmd(
        &mut o,
        &abi::CmdQueryPort {
            hdr: hdr(cmd_code::QUERY_PORT),
            port_num: 1,
            ..Default::default()
        },
    );
    cmd(
        &mut o,
        &abi::CmdCreateBind {
            hdr: hdr(cmd_code::CREATE_BIND),
            index: 0,
            new_gid: gid(1).0,
            gid_type: 1,
            ..Default::default()
        },
    );
    cmd(
        &mut o,
        &abi::CmdCreatePd {
            hdr: hdr(cmd_code::CREATE_PD),
            ..Default::default()
        },
    );
    // Handles are allocated in order: PD 1, MR 2 (key 1), CQ 3; a QP's handle is its QPN (GSI 1, UD
    // 0x42 from the backend).
    cmd(
        &mut o,
        &abi::CmdCreateMr {
            hdr: hdr(cmd_code::CREATE_MR),
            length: u64::MAX,
            pd_handle: 1,
            access_flags: 1,
            flags: abi::PVRDMA_MR_FLAG_DMA,
            ..Default::default()
        },
    );
    pdir(&mut o, 0x10000, 2);
    cmd(
        &mut o,
        &abi::CmdCreateCq {
            hdr: hdr(cmd_code::CREATE_CQ),
            pdir_dma: 0x10000,
            cqe: 64,
            nchunks: 2,
            ..Default::default()
        },
    );
    for (dir, ty) in [(0x20000u32, qp_type::GSI), (0x28000, qp_type::UD)] {
        pdir(&mut o, dir, 3);
        cmd(
            &mut o,
            &abi::CmdCreateQp {
                hdr: hdr(cmd_code::CREATE_QP),
                pdir_dma: dir as u64,
                pd_handle: 1,
                send_cq_handle: 3,
                recv_cq_handle: 3,
                max_send_wr: 16,
                max_recv_wr: 16,
                max_send_sge: 1,
                max_recv_sge: 1,
                total_chunks: 3,
                send_chunks: 1,
                qp_type: ty,
                ..Default::default()
            },
        );
    }
    for qp in [1u32, 0x42] {
        for state in [qp_state::INIT, qp_state::RTR, qp_state::RTS] {
            cmd(
                &mut o,
                &abi::CmdModifyQp {
                    hdr: hdr(cmd_code::MODIFY_QP),
                    qp_handle: qp,
                    attr_mask: abi::qp_attr_mask::STATE,
                    attrs: abi::QpAttr {
                        qp_state: state,
                        ..Default::default()
                    },
                },
            );
        }
    }
    // A receive on the GSI QP (its RQ is the third page: 0x24000), a send from it (SQ 0x23000).
    let rq = 0x24000u32;
    let h = abi::RqWqeHdr {
        wr_id: 100,
        num_sge: 1,
        total_len: 0,
    };
    let s = abi::Sge {
        addr: 0x30000,
        length: 4096,
        lkey: 1,
    };
    let mut wqe = h.as_bytes().to_vec();
    wqe.extend_from_slice(s.as_bytes());
    write(&mut o, rq, &wqe);
    write(&mut o, 0x22000 + 8, &1u32.to_le_bytes());
    let sq = 0x23000u32;
    let h = abi::SqWqeHdr {
        wr_id: 200,
        num_sge: 1,
        opcode: abi::wr_opcode::SEND,
        send_flags: abi::send_flags::SIGNALED,
        ud_remote_qpn: 1,
        ud_remote_qkey: 0x8001_0000,
        ud_av: abi::Av {
            dgid: gid(3).0,
            gid_index: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut wqe = h.as_bytes().to_vec();
    wqe.resize(80, 0);
    wqe.extend_from_slice(
        abi::Sge {
            addr: 0x31000,
            length: 256,
            lkey: 1,
        }
        .as_bytes(),
    );
    write(&mut o, sq, &wqe);
    write(&mut o, 0x22000, &1u32.to_le_bytes());
    record(&mut o, 6, &(3 | abi::PVRDMA_UAR_CQ_ARM).to_le_bytes());
    record(&mut o, 3, &[]);
    let mut mad = [0u8; MAD_SIZE];
    mad[..4].copy_from_slice(&[1, 7, 2, 3]);
    record(&mut o, 4, &mad);
    record(&mut o, 3, &[]);
    record(&mut o, 5, &[1, 0, 0, 0, 9, 9, 9, 9]);
    record(&mut o, 3, &[]);
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sample_session_runs_its_commands() {
        // The seed is only useful if it gets far: every command of it succeeds.
        let stats = super::run(&super::sample_session());
        assert_eq!(stats.commands, 13);
        assert_eq!(stats.command_errors, 0, "{stats:?}");
        assert_eq!(stats.binds, 1);
        assert!(stats.mads_sent + stats.mads_refused >= 1, "{stats:?}");
    }
}
