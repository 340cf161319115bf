//! The BAR1 registers (device status region, command and response doorbells, interrupt
//! mask and cause, MAC, activation) and MSI-X (table, pending bits, delivery).
use super::*;

impl Device {
    /// Sends MSI-X messages to `sink`.
    pub fn set_msi_sink(&mut self, sink: Arc<dyn MsiSink>) {
        self.msix.sink = Some(sink);
    }

    /// The MSI-X capability's enable and function-mask bits changed.
    pub fn set_msix_control(&mut self, enabled: bool, function_mask: bool) {
        self.msix.enabled = enabled;
        self.msix.function_mask = function_mask;
        self.deliver_pending();
    }

    /// Reads BAR0 (MSI-X table and pending bits).
    pub fn read_msix(&self, offset: u64) -> u32 {
        if offset >= MSIX_PBA_OFFSET {
            return if offset == MSIX_PBA_OFFSET {
                self.msix.pending
            } else {
                0
            };
        }
        let (i, w) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        self.msix.table.get(i).map_or(0, |e| e[w])
    }

    /// Writes BAR0 (the MSI-X table; the pending bits are read-only).
    pub fn write_msix(&mut self, offset: u64, v: u32) {
        let (i, w) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        if offset < MSIX_PBA_OFFSET {
            if let Some(e) = self.msix.table.get_mut(i) {
                e[w] = v;
                if w == 3 {
                    self.deliver_pending();
                }
            }
        }
    }

    /// Raises interrupt `vector` (its cause bit goes to `PVRDMA_REG_ICR`): sent now if MSI-X
    /// is enabled and the vector unmasked, else remembered as pending.
    pub(super) fn raise(&mut self, vector: u32) {
        self.icr |= 1 << vector;
        self.msix.pending |= 1 << vector;
        self.deliver_pending();
    }

    pub(super) fn deliver_pending(&mut self) {
        if !self.msix.enabled || self.msix.function_mask {
            return;
        }
        let Some(sink) = self.msix.sink.clone() else {
            return;
        };
        for (v, e) in self.msix.table.iter().enumerate() {
            if self.msix.pending & (1 << v) != 0 && e[3] & 1 == 0 {
                self.msix.pending &= !(1 << v);
                sink.signal((e[1] as u64) << 32 | e[0] as u64, e[2]);
            }
        }
    }

    /// A CQ doorbell word the guest wrote: arms the CQ for one completion interrupt.
    pub fn cq_doorbell(&mut self, v: u32) {
        let h = v & abi::PVRDMA_UAR_HANDLE_MASK;
        if v & (abi::PVRDMA_UAR_CQ_ARM | abi::PVRDMA_UAR_CQ_ARM_SOL) != 0
            && self.cqs.contains_key(&h)
        {
            self.msix.armed.insert(h);
        }
    }

    /// Reads a register.
    pub fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            abi::PVRDMA_REG_VERSION => abi::PVRDMA_VERSION,
            abi::PVRDMA_REG_DSRLOW => self.dsr_low,
            abi::PVRDMA_REG_DSRHIGH => self.dsr_high,
            abi::PVRDMA_REG_ERR => self.err,
            abi::PVRDMA_REG_ICR => self.icr,
            abi::PVRDMA_REG_IMR => self.imr,
            abi::PVRDMA_REG_MACL => self.mac[0],
            abi::PVRDMA_REG_MACH => self.mac[1],
            _ => 0,
        }
    }

    /// Writes a register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            abi::PVRDMA_REG_DSRLOW => self.dsr_low = v,
            abi::PVRDMA_REG_DSRHIGH => self.dsr_high = v,
            abi::PVRDMA_REG_CTL => {
                let r = match v {
                    abi::PVRDMA_DEVICE_CTL_ACTIVATE => self.activate(),
                    abi::PVRDMA_DEVICE_CTL_UNQUIESCE => Ok(()),
                    abi::PVRDMA_DEVICE_CTL_RESET => {
                        self.reset();
                        Ok(())
                    }
                    other => Err(invalid("device control", other as u64, "unknown code")),
                };
                self.err = match r {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::debug!(error = &e as &dyn std::error::Error, "pvrdma control {v}");
                        e.errno() as u32
                    }
                };
            }
            abi::PVRDMA_REG_REQUEST => self.request(),
            abi::PVRDMA_REG_IMR => self.imr = v,
            // Write 1 to clear a cause bit.
            abi::PVRDMA_REG_ICR => self.icr &= !v,
            abi::PVRDMA_REG_MACL => self.mac[0] = v,
            abi::PVRDMA_REG_MACH => self.mac[1] = v & 0xffff,
            _ => {}
        }
    }

    pub(super) fn caps() -> abi::DeviceCaps {
        abi::DeviceCaps {
            fw_ver: 1,
            node_guid: 0x0200_00ff_fe00_0000u64.to_be(),
            sys_image_guid: 0x0200_00ff_fe00_0000u64.to_be(),
            max_mr_size: (MAX_MR_PAGES as u64) * abi::PVRDMA_PAGE_SIZE,
            page_size_cap: abi::PVRDMA_PAGE_SIZE,
            vendor_id: abi::PCI_VENDOR_ID_VMWARE as u32,
            vendor_part_id: abi::PCI_DEVICE_ID_VMWARE_PVRDMA as u32,
            hw_ver: 1,
            max_qp: MAX_QP as u32,
            max_qp_wr: MAX_QP_WR,
            max_sge: MAX_SGE,
            max_cq: MAX_CQ as u32,
            max_cqe: MAX_CQE,
            max_mr: MAX_MR as u32,
            max_pd: MAX_PD as u32,
            max_ah: 1024,
            max_uar: 1,
            gid_tbl_len: GID_TBL_LEN as u32,
            max_pkeys: 1,
            phys_port_cnt: 1,
            mode: abi::PVRDMA_DEVICE_MODE_ROCE,
            gid_types: abi::PVRDMA_GID_TYPE_FLAG_ROCE_V2,
            ..Default::default()
        }
    }

    pub(super) fn activate(&mut self) -> Result<(), VrdmaError> {
        let gpa = (self.dsr_high as u64) << 32 | self.dsr_low as u64;
        check_page(&*self.mem, gpa)?;
        let mut dsr: abi::DeviceSharedRegion = read_obj(&*self.mem, gpa)?;
        let cmd = check_page(&*self.mem, dsr.cmd_slot_dma)?;
        let resp = check_page(&*self.mem, dsr.resp_slot_dma)?;
        // The async ring is optional for Ferry's polled guest; if given it must be valid.
        let async_ring = if dsr.async_ring_pages.num_pages != 0 {
            let pages = walk_pdir(
                &*self.mem,
                dsr.async_ring_pages.pdir_dma,
                dsr.async_ring_pages.num_pages,
                MAX_RING_PAGES,
            )?;
            if pages.len() < 2 {
                return Err(invalid(
                    "async ring pages",
                    1,
                    "need a header page and a data page",
                ));
            }
            // Linux sizes the ring as all data pages' worth of elements; the index arithmetic
            // needs a power of two, so the device uses the largest one that fits.
            let fit = ((pages.len() as u64 - 1) * abi::PVRDMA_PAGE_SIZE / 8) as u32;
            Some(DevRing {
                pages,
                elems: 1 << (31 - fit.leading_zeros()),
                elem_size: 8,
            })
        } else {
            None
        };
        dsr.caps = Self::caps();
        write_obj(&*self.mem, gpa, &dsr)?;
        self.dsr_gpa = Some(gpa);
        self.cmd_slot = cmd;
        self.resp_slot = resp;
        self.async_ring = async_ring;
        tracing::info!(dsr = format_args!("{gpa:#x}"), "pvrdma device activated");
        Ok(())
    }
}
