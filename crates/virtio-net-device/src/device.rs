//! The NIC's register file (common configuration, ISR, device configuration, notifications,
//! MSI-X table) and its data path: TX chains are gathered and put on the wire, frames from the
//! wire are scattered into RX chains. Every error a driver can cause is counted in [`Stats`];
//! a driver that breaks a queue gets DEVICE_NEEDS_RESET, never a dead process.
use std::fs::File;

use vfio_user_device::{dma::DmaSpace, ConfigSpace, Msix};
use virtio_spec::{
    features::{self, bit},
    net::{self, NetHdr, HDR_LEN},
    pci::{common, isr, NO_VECTOR},
    ring::{ChainError, Segment},
    status,
};

use crate::{
    layout::{
        config_space, DEVICE_CFG, DEVICE_CFG_LEN, ISR, MAX_QUEUE_SIZE, MSIX_TABLE, MSIX_VECTORS,
        NOTIFY, NOTIFY_MULTIPLIER, NUM_QUEUES,
    },
    queue::{gather, scatter, Queue, QueueError},
    wire::Wire,
    Stats,
};

/// The features the device offers.
pub const DEVICE_FEATURES: u64 = bit(features::VERSION_1)
    | bit(features::RING_INDIRECT_DESC)
    | bit(net::features::MAC)
    | bit(net::features::STATUS)
    | bit(net::features::MTU);

/// Largest TX chain in bytes (header plus frame; without GSO a frame is at most 1514 bytes).
const MAX_TX_CHAIN: u64 = 64 * 1024;
/// Largest frame taken from the wire (anything longer is truncated by the read and dropped).
const MAX_RX_FRAME: usize = 9216;

/// What one [`NetDevice::process`] round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Chains completed on either queue.
    pub completed: usize,
    /// The RX queue has no buffer: frames waiting on the wire stay there until the driver
    /// adds buffers (and notifies), so the worker must not wait on the wire meanwhile.
    pub rx_starved: bool,
    /// Receiving from the wire failed (a tap that went down): the wire may stay "readable",
    /// so the worker waits a while instead of on it.
    pub wire_error: bool,
}

/// The device state behind the registers.
pub struct NetDevice {
    /// PCI configuration space.
    pub config: ConfigSpace,
    /// The client's memory.
    pub dma: DmaSpace,
    /// Counters.
    pub stats: Stats,
    mac: [u8; 6],
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix: u16,
    queue_select: u16,
    queues: [Queue; NUM_QUEUES as usize],
    isr: u8,
    msix: Msix,
    segs: Vec<Segment>,
    buf: Vec<u8>,
    /// Announce the MAC address on the wire each time the driver starts the device.
    announce: bool,
    /// An announcement is due (the driver just set DRIVER_OK).
    announce_due: bool,
}

impl NetDevice {
    /// A reset device with MAC address `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        NetDevice {
            config: config_space(),
            dma: DmaSpace::default(),
            stats: Stats::default(),
            mac,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix: NO_VECTOR,
            queue_select: 0,
            queues: [Queue::new(MAX_QUEUE_SIZE), Queue::new(MAX_QUEUE_SIZE)],
            isr: 0,
            msix: Msix::new(MSIX_TABLE, MSIX_VECTORS),
            segs: Vec::new(),
            buf: vec![0; HDR_LEN + MAX_RX_FRAME],
            announce: false,
            announce_due: false,
        }
    }

    /// Announces the MAC address (a broadcast RARP, as QEMU's `announce-self` sends) each
    /// time the driver starts the device: switches on the wire learn where the address is now,
    /// e.g. once a migrated VM's NIC was started on its new host.
    pub fn with_announce(mut self, on: bool) -> Self {
        self.announce = on;
        self
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Device reset (status 0 written, vfio-user reset): queues and negotiation forgotten; the
    /// client's memory, interrupts and the PCI state stay.
    pub fn reset(&mut self) {
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix = NO_VECTOR;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.isr = 0;
        self.announce_due = false;
        self.stats.resets += 1;
    }

    /// The client went away: reset, forget its memory and interrupts.
    pub fn disconnect(&mut self) {
        self.reset();
        self.dma.clear();
        self.msix.reset();
        self.config = config_space();
    }

    /// Installs interrupt eventfds for MSI-X vectors `start..start + count` (no fds: clears
    /// them). Out-of-range vectors are refused.
    pub fn set_msix(&mut self, start: u32, count: u32, fds: Vec<File>) -> bool {
        self.msix.set_eventfds(start, count, fds)
    }

    fn signal(&mut self, vector: u16) {
        if self.msix.signal(vector, self.config.msix_enabled()) {
            self.stats.interrupts += 1;
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_value(&self, field: u64) -> u64 {
        let q = self.selected();
        match field {
            common::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            common::DEVICE_FEATURE => u64::from(features::window(
                DEVICE_FEATURES,
                self.device_feature_select,
            )),
            common::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            common::DRIVER_FEATURE => u64::from(features::window(
                self.driver_features,
                self.driver_feature_select,
            )),
            common::CONFIG_MSIX_VECTOR => u64::from(self.config_msix),
            common::NUM_QUEUES => u64::from(NUM_QUEUES),
            common::DEVICE_STATUS => u64::from(self.status),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SELECT => u64::from(self.queue_select),
            common::QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => {
                q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector))
            }
            common::QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled())),
            common::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            common::QUEUE_DESC => q.map_or(0, |q| q.desc),
            common::QUEUE_DRIVER => q.map_or(0, |q| q.driver),
            common::QUEUE_DEVICE => q.map_or(0, |q| q.device),
            _ => 0,
        }
    }

    /// The field `offset` falls in: (its start, its width).
    fn field_of(offset: u64) -> Option<(u64, u64)> {
        (0..8u64).find_map(|back| {
            let start = offset.checked_sub(back)?;
            let w = common::field_width(start)?;
            (back < w).then_some((start, w))
        })
    }

    fn device_cfg_bytes(&self) -> [u8; DEVICE_CFG_LEN as usize] {
        let mut b = [0u8; DEVICE_CFG_LEN as usize];
        b[0..6].copy_from_slice(&self.mac);
        let o = |x: u64| x as usize;
        b[o(net::config::STATUS)..o(net::config::STATUS) + 2]
            .copy_from_slice(&net::config::S_LINK_UP.to_le_bytes());
        b[o(net::config::MAX_VIRTQUEUE_PAIRS)..o(net::config::MAX_VIRTQUEUE_PAIRS) + 2]
            .copy_from_slice(&1u16.to_le_bytes());
        b[o(net::config::MTU)..o(net::config::MTU) + 2].copy_from_slice(&1500u16.to_le_bytes());
        b
    }

    /// A BAR0 read. The ISR register clears on read.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let end = offset.saturating_add(data.len() as u64);
        if end <= common::LEN {
            for (i, d) in data.iter_mut().enumerate() {
                let o = offset + i as u64;
                if let Some((start, _)) = Self::field_of(o) {
                    *d = (self.common_value(start) >> (8 * (o - start))) as u8;
                }
            }
        } else if offset == ISR {
            data[0] = std::mem::take(&mut self.isr);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            let cfg = self.device_cfg_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = cfg
                    .get((offset - DEVICE_CFG) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
        } else {
            self.msix.read(offset, data);
        }
        // Notifications and the PBA read as zero.
    }

    /// A BAR0 write. Returns true when it was a queue notification (the worker has work).
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) -> bool {
        let end = offset.saturating_add(data.len() as u64);
        if end <= common::LEN {
            if let Some((start, width)) = Self::field_of(offset) {
                // Merge the written bytes into the field's current value.
                let mut v = self.common_value(start).to_le_bytes();
                let at = (offset - start) as usize;
                let n = data.len().min(width as usize - at);
                v[at..at + n].copy_from_slice(&data[..n]);
                self.common_write(start, u64::from_le_bytes(v));
            }
            return false;
        }
        if (NOTIFY..NOTIFY + u64::from(NOTIFY_MULTIPLIER) * u64::from(NUM_QUEUES)).contains(&offset)
        {
            self.stats.notifications += 1;
            return true;
        }
        if (NOTIFY..NOTIFY + 0x1000).contains(&offset) {
            self.stats.bad_notifications += 1;
            return false;
        }
        self.msix.write(offset, data);
        false
    }

    fn vector_or_none(v: u64) -> u16 {
        if v < u64::from(MSIX_VECTORS) {
            v as u16
        } else {
            NO_VECTOR
        }
    }

    fn common_write(&mut self, field: u64, v: u64) {
        let sel = usize::from(self.queue_select);
        match field {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            common::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => {
                self.driver_features =
                    features::set_window(self.driver_features, self.driver_feature_select, v as u32)
            }
            common::CONFIG_MSIX_VECTOR => self.config_msix = Self::vector_or_none(v),
            common::DEVICE_STATUS => self.status_write(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            common::QUEUE_MSIX_VECTOR => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.msix_vector = Self::vector_or_none(v);
                }
            }
            common::QUEUE_ENABLE if v == 1 => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                if let Err(e) = q.enable() {
                    tracing::warn!(queue = sel, "queue configuration refused: {e}");
                    self.stats.bad_queue_config += 1;
                    self.status |= status::DEVICE_NEEDS_RESET;
                }
            }
            common::QUEUE_SIZE
            | common::QUEUE_DESC
            | common::QUEUE_DRIVER
            | common::QUEUE_DEVICE => {
                let Some(q) = self.queues.get_mut(sel).filter(|q| !q.enabled()) else {
                    return;
                };
                match field {
                    common::QUEUE_SIZE => q.size = v as u16,
                    common::QUEUE_DESC => q.desc = v,
                    common::QUEUE_DRIVER => q.driver = v,
                    _ => q.device = v,
                }
            }
            _ => {}
        }
    }

    fn status_write(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut new = v;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !DEVICE_FEATURES != 0 || f & bit(features::VERSION_1) == 0 {
                tracing::warn!(features = format_args!("{f:#x}"), "driver features refused");
                self.stats.bad_features += 1;
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            self.stats.driver_ok += 1;
            self.announce_due = self.announce;
            tracing::info!(
                features = format_args!("{:#x}", self.driver_features),
                "driver ready"
            );
        }
        // The device's own DEVICE_NEEDS_RESET stays until reset.
        self.status = new | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn broken(&mut self, q: usize, e: &QueueError) {
        tracing::warn!(queue = q, "queue stopped: {e}");
        self.queues[q].disable();
        self.status |= status::DEVICE_NEEDS_RESET;
        self.isr |= isr::CONFIG;
        let v = self.config_msix;
        self.signal(v);
    }

    fn count(&mut self, e: &QueueError) {
        match e {
            QueueError::Dma(_) => self.stats.dma_errors += 1,
            QueueError::Chain(c) => {
                self.stats.chain_errors += 1;
                let class = match c {
                    ChainError::TooLong(_) => &mut self.stats.chain_loops,
                    ChainError::IndexOutOfRange(_) => &mut self.stats.chain_bad_index,
                    ChainError::BadIndirect | ChainError::BadIndirectLength(_) => {
                        &mut self.stats.chain_bad_indirect
                    }
                    ChainError::ReadAfterWrite => &mut self.stats.chain_read_after_write,
                    ChainError::TooManyBytes => &mut self.stats.chain_oversized,
                    ChainError::AddressOverflow(_) => &mut self.stats.chain_wrapping,
                };
                *class += 1;
            }
            QueueError::AvailJump { .. } => self.stats.bad_avail_idx += 1,
        }
    }

    /// A chain that could not be used: counted, and given back (length 0) when its head is a
    /// real index so the driver does not lose the buffer.
    fn refuse(&mut self, q: usize, head: u16, e: &QueueError) -> bool {
        self.count(e);
        tracing::debug!(queue = q, head, "chain refused: {e}");
        if matches!(e, QueueError::Chain(ChainError::IndexOutOfRange(h)) if *h == head) {
            return false;
        }
        if let Err(e) = self.queues[q].push_used(&self.dma, head, 0) {
            self.count(&e);
            self.broken(q, &e);
        }
        true
    }

    fn interrupt(&mut self, q: usize) {
        if self.queues[q].wants_interrupt(&self.dma) {
            self.isr |= isr::QUEUE;
            let v = self.queues[q].msix_vector;
            self.signal(v);
        }
    }

    /// Moves frames: every available TX chain to the wire, frames from the wire into RX chains
    /// while both exist. Interrupts the driver for each queue that completed chains.
    pub fn process(&mut self, wire: &mut dyn Wire) -> Progress {
        let mut p = Progress::default();
        if !status::is_running(self.status) {
            // Nothing can be delivered: frames wait on the wire.
            p.rx_starved = true;
            return p;
        }
        if std::mem::take(&mut self.announce_due) {
            match wire.send(&rarp_announcement(self.mac)) {
                Ok(()) => self.stats.announcements += 1,
                Err(e) => {
                    tracing::debug!("wire send (announcement): {e}");
                    self.stats.wire_errors += 1;
                }
            }
        }
        let tx = self.process_tx(wire);
        if tx > 0 {
            self.interrupt(usize::from(net::TX_QUEUE));
        }
        let errors = self.stats.wire_errors;
        let (rx, starved) = self.process_rx(wire);
        if rx > 0 {
            self.interrupt(usize::from(net::RX_QUEUE));
        }
        p.completed = tx + rx;
        p.rx_starved = starved;
        p.wire_error = self.stats.wire_errors != errors;
        p
    }

    fn indirect_ok(&self) -> bool {
        self.driver_features & bit(features::RING_INDIRECT_DESC) != 0
    }

    fn process_tx(&mut self, wire: &mut dyn Wire) -> usize {
        let q = usize::from(net::TX_QUEUE);
        let mut done = 0;
        let mut segs = std::mem::take(&mut self.segs);
        let mut buf = std::mem::take(&mut self.buf);
        // At most a queue's worth per round, so RX gets its turn.
        for _ in 0..MAX_QUEUE_SIZE {
            let head = match self.queues[q].pop(&self.dma) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.count(&e);
                    self.broken(q, &e);
                    break;
                }
            };
            let r = self.queues[q]
                .chain(&self.dma, head, self.indirect_ok(), MAX_TX_CHAIN, &mut segs)
                .and_then(|()| Ok(gather(&self.dma, &segs, HDR_LEN, &mut buf)?));
            if let Err(e) = r {
                if self.refuse(q, head, &e) {
                    done += 1;
                }
                continue;
            }
            self.count_zero_length(&segs);
            if segs.iter().any(|s| s.write) {
                // A transmit buffer the device is to write: nothing here is a frame.
                self.stats.tx_writable_chains += 1;
                tracing::debug!(head, "TX chain with a device-writable buffer refused");
                self.refuse_quietly(q, head);
                done += 1;
                continue;
            }
            let readable: u64 = segs
                .iter()
                .filter(|s| !s.write)
                .map(|s| u64::from(s.len))
                .sum();
            if readable < HDR_LEN as u64 || buf.len() < 14 || buf.len() > net::MAX_FRAME {
                self.stats.tx_bad_frames += 1;
            } else if let Err(e) = wire.send(&buf) {
                tracing::debug!("wire send: {e}");
                self.stats.wire_errors += 1;
            } else {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += buf.len() as u64;
            }
            if let Err(e) = self.queues[q].push_used(&self.dma, head, 0) {
                self.count(&e);
                self.broken(q, &e);
                break;
            }
            done += 1;
        }
        self.segs = segs;
        buf.resize(HDR_LEN + MAX_RX_FRAME, 0);
        self.buf = buf;
        done
    }

    fn process_rx(&mut self, wire: &mut dyn Wire) -> (usize, bool) {
        let q = usize::from(net::RX_QUEUE);
        let mut done = 0;
        let mut segs = std::mem::take(&mut self.segs);
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(HDR_LEN + MAX_RX_FRAME, 0);
        let mut starved = false;
        for _ in 0..MAX_QUEUE_SIZE {
            match self.queues[q].has_avail(&self.dma) {
                Ok(true) => {}
                Ok(false) => {
                    starved = true;
                    break;
                }
                Err(e) => {
                    self.count(&e);
                    self.broken(q, &e);
                    break;
                }
            }
            let n = match wire.recv(&mut buf[HDR_LEN..]) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("wire receive: {e}");
                    self.stats.wire_errors += 1;
                    break;
                }
            };
            let head = match self.queues[q].pop(&self.dma) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.count(&e);
                    self.broken(q, &e);
                    break;
                }
            };
            if n >= MAX_RX_FRAME {
                // Truncated by the read: not a frame this device delivers.
                self.stats.rx_dropped += 1;
                self.refuse_quietly(q, head);
                done += 1;
                continue;
            }
            let hdr = NetHdr {
                num_buffers: 1,
                ..NetHdr::default()
            };
            buf[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
            let total = HDR_LEN + n;
            let r = self.queues[q].chain(
                &self.dma,
                head,
                self.indirect_ok(),
                u64::from(u32::MAX),
                &mut segs,
            );
            if let Err(e) = r {
                if self.refuse(q, head, &e) {
                    done += 1;
                }
                continue;
            }
            self.count_zero_length(&segs);
            if segs.iter().any(|s| !s.write) {
                // A receive buffer the device may only read: the frame is dropped with it.
                self.stats.rx_readonly_chains += 1;
                tracing::debug!(head, "RX chain with a device-readable buffer refused");
                self.refuse_quietly(q, head);
                done += 1;
                continue;
            }
            let room: u64 = segs
                .iter()
                .filter(|s| s.write)
                .map(|s| u64::from(s.len))
                .sum();
            let written = if room < total as u64 {
                self.stats.rx_dropped += 1;
                0
            } else {
                match scatter(&self.dma, &segs, &buf[..total]) {
                    Ok(w) => {
                        self.stats.rx_frames += 1;
                        self.stats.rx_bytes += n as u64;
                        w
                    }
                    Err(e) => {
                        self.count(&QueueError::Dma(e));
                        0
                    }
                }
            };
            if let Err(e) = self.queues[q].push_used(&self.dma, head, written as u32) {
                self.count(&e);
                self.broken(q, &e);
                break;
            }
            done += 1;
        }
        self.segs = segs;
        self.buf = buf;
        (done, starved)
    }

    fn count_zero_length(&mut self, segs: &[Segment]) {
        self.stats.zero_length_buffers += segs.iter().filter(|s| s.len == 0).count() as u64;
    }

    fn refuse_quietly(&mut self, q: usize, head: u16) {
        if let Err(e) = self.queues[q].push_used(&self.dma, head, 0) {
            self.count(&e);
            self.broken(q, &e);
        }
    }
}

/// A RARP request broadcast from `mac` (EtherType 0x8035, "request reverse" for `mac`, no
/// addresses), padded to the 60-byte minimum: what QEMU sends to announce a NIC.
pub fn rarp_announcement(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use virtio_spec::{
        features::{self, bit},
        pci::common,
        status,
    };

    use super::{rarp_announcement, NetDevice};
    use crate::{
        layout::COMMON,
        wire::{SocketWire, Wire},
    };

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xfe, 0x15, 1];

    fn start(d: &mut NetDevice) {
        let w = |d: &mut NetDevice, field: u64, v: u64, n: usize| {
            d.bar_write(COMMON + field, &v.to_le_bytes()[..n]);
        };
        w(d, common::DEVICE_STATUS, 0, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER;
        w(d, common::DEVICE_STATUS, u64::from(s), 1);
        w(d, common::DRIVER_FEATURE_SELECT, 1, 4);
        w(d, common::DRIVER_FEATURE, bit(features::VERSION_1) >> 32, 4);
        let s = s | status::FEATURES_OK;
        w(d, common::DEVICE_STATUS, u64::from(s), 1);
        w(
            d,
            common::DEVICE_STATUS,
            u64::from(s | status::DRIVER_OK),
            1,
        );
    }

    /// The announcement is a broadcast RARP from the MAC address, padded to 60 bytes.
    #[test]
    fn the_announcement_is_a_rarp_from_the_mac() {
        let f = rarp_announcement(MAC);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x80, 0x35], "EtherType RARP");
        assert_eq!(&f[20..22], &[0, 3], "request reverse");
        assert_eq!((&f[22..28], &f[32..38]), (&MAC[..], &MAC[..]));
        assert!(f[38..].iter().all(|&b| b == 0));
    }

    /// Each start of the device (DRIVER_OK) sends one announcement, none without it, none when
    /// announcing is off.
    #[test]
    fn each_start_announces_once() {
        for on in [true, false] {
            let (mut wire, mut peer) = SocketWire::pair().unwrap();
            let mut d = NetDevice::new(MAC).with_announce(on);
            for round in 1..=2u64 {
                start(&mut d);
                d.process(&mut wire);
                d.process(&mut wire);
                let mut buf = [0u8; 128];
                let got = peer.recv(&mut buf).unwrap();
                if on {
                    assert_eq!(got, Some(60), "round {round}");
                    assert_eq!(buf[..60], rarp_announcement(MAC));
                }
                assert_eq!(peer.recv(&mut buf).unwrap(), None, "one a start");
                assert_eq!(d.stats.announcements, if on { round } else { 0 });
            }
        }
    }
}
