//! A polled virtio-net driver (virtio 1.x modern PCI, split queues). Finds the NIC by its IDs,
//! locates the common/notify/device regions through the virtio capabilities, negotiates
//! VERSION_1 (and MAC when offered), and runs one RX and one TX queue of [`QUEUE_SIZE`]
//! entries, each entry a fixed 2 KiB buffer. Register accesses and notifications exit to the
//! VMM; the rings and buffers are plain guest RAM (identity mapped: address == bus address).
//! The device is trusted no further than the ring indices: a used id out of range or a length
//! past its buffer is an error, never an out-of-bounds access.
use virtio_spec::{
    features::{self, bit},
    net::{self, HDR_LEN},
    pci::{self as vpci, cfg_type, common, VirtioPciCap},
    ring::{self, Descriptor, DESC_F_WRITE},
    status,
};

use crate::{nvme::Arena, pci};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 64;
/// Bytes per buffer (header + a 1514-byte frame fit).
pub const BUF_SIZE: u64 = 2048;

/// Why the driver could not start or stopped.
#[derive(Clone, Copy, Debug)]
pub enum NetError {
    /// No 1af4:1041 function on bus 0.
    NotFound,
    /// A required capability or feature is missing, or the device refused a step.
    Init(&'static str),
    /// Out of work-area memory.
    NoMemory,
    /// The device misbehaved (needs reset, a used id it was never given, a bad length).
    Device(&'static str),
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NetError::NotFound => f.write_str("no virtio-net device (1af4:1041) on PCI bus 0"),
            NetError::Init(what) => write!(f, "bring-up failed: {what}"),
            NetError::NoMemory => f.write_str("work area exhausted"),
            NetError::Device(what) => write!(f, "device error: {what}"),
        }
    }
}

fn r8(a: u64) -> u8 {
    // SAFETY: an identity-mapped device register; an access exits to the VMM.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn w8(a: u64, v: u8) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
fn r16(a: u64) -> u16 {
    // SAFETY: as for `r8`; the address is 2-byte aligned (register offsets).
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
fn w16(a: u64, v: u16) {
    // SAFETY: as for `r16`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
fn r32(a: u64) -> u32 {
    crate::io::mmio_read32(a)
}
fn w32(a: u64, v: u32) {
    crate::io::mmio_write32(a, v)
}
fn w64(a: u64, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

/// What the driver tells the device about a queue: its size and where its rings are.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// One split queue in guest RAM. The driver keeps it consistent; `net-hostile` writes it
/// raw (any descriptor, any available entry or index) through the public methods.
pub struct Vq {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    notify: u64,
    /// Next free-running avail index.
    avail_idx: u16,
    /// Next used index to look at.
    last_used: u16,
    queue: u16,
}

impl Vq {
    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Writes descriptor `i` (taken modulo the size: always inside the table).
    pub fn set_desc(&self, i: u16, d: Descriptor) {
        let p = (self.desc + 16 * u64::from(i % self.size)) as *mut [u8; 16];
        // SAFETY: entry `i % size` lies inside the descriptor table this queue allocated.
        unsafe { core::ptr::write_volatile(p, d.to_bytes()) };
    }
    /// Where the rings are.
    pub fn layout(&self) -> RingLayout {
        RingLayout {
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }
    /// Address of the `BUF_SIZE`-byte buffer of entry `i` (modulo the size).
    pub fn buf(&self, i: u16) -> u64 {
        self.bufs + BUF_SIZE * u64::from(i % self.size)
    }
    /// Back to index 0 (the device is reset and not yet enabled): the used ring's index is
    /// cleared too, or elements the device wrote before the reset would read as new.
    fn clear(&mut self) {
        self.avail_idx = 0;
        self.last_used = 0;
        self.set_avail_idx(0);
        // SAFETY: `idx` of the used ring this queue allocated; the device does not write it
        // while the queue is not enabled.
        unsafe { core::ptr::write_volatile((self.used + ring::used::IDX) as *mut u16, 0) };
    }
    /// Puts `id` (any value: a hostile workload may name no descriptor) on the available
    /// ring (does not notify).
    pub fn offer(&mut self, id: u16) {
        let slot = self.avail + ring::avail::entry(self.avail_idx % self.size);
        // SAFETY: the slot lies inside the available ring this queue allocated.
        unsafe { core::ptr::write_volatile(slot as *mut u16, id) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.set_avail_idx(self.avail_idx);
    }
    /// Writes the available ring's `idx` as it is, whatever the entries behind it hold (the
    /// driver's own index is not changed).
    pub fn set_avail_idx(&self, idx: u16) {
        // SAFETY: `idx` of the available ring this queue allocated.
        unsafe { core::ptr::write_volatile((self.avail + ring::avail::IDX) as *mut u16, idx) };
    }
    /// The driver's next available index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    /// Notifies the device.
    pub fn kick(&self) {
        w16(self.notify, self.queue);
    }
    /// The next used element (id, length), if the device returned one.
    pub fn take_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: `idx` of the used ring this queue allocated; the device writes it.
        let idx = unsafe { core::ptr::read_volatile((self.used + ring::used::IDX) as *const u16) };
        if idx == self.last_used {
            return None;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let at = self.used + ring::used::entry(self.last_used % self.size);
        // SAFETY: a slot inside the used ring.
        let e = unsafe { core::ptr::read_volatile(at as *const [u8; 8]) };
        self.last_used = self.last_used.wrapping_add(1);
        let e = ring::UsedElem::from_bytes(&e);
        Some((e.id, e.len))
    }
    fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }
}

/// The running NIC.
pub struct VirtioNet {
    common: u64,
    rx: Vq,
    tx: Vq,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// Frames received (delivered to the caller).
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames the device returned empty or cut (length under the header).
    pub rx_runts: u64,
}

/// How long the driver waits for the device (a reset to complete, the TX queue to drain)
/// before it gives up: generous, since on a loaded host the hypervisor holding a reset (it
/// pauses the vCPUs to take its shadow rings back) or the device process may not run for
/// seconds; a device that works answers long before.
const DEVICE_PATIENCE_MS: u64 = 30_000;

/// Writes 0 to the device status register `st` and waits (bounded, [`DEVICE_PATIENCE_MS`])
/// until it reads back 0: the reset may take a while to complete (virtio 1.1 §4.1.4.3.2; a
/// hypervisor shadowing the rings holds it until it has let go of them).
fn reset(st: u64) -> Result<(), NetError> {
    w8(st, 0);
    let t0 = crate::clock::rdtsc();
    while r8(st) != 0 {
        if crate::clock::ticks_to_ms(crate::clock::rdtsc() - t0) > DEVICE_PATIENCE_MS {
            return Err(NetError::Init(
                "reset did not complete (status never read 0)",
            ));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Finds the function and its BAR0 (memory space and bus mastering turned on).
fn find() -> Option<(u8, u8, u64)> {
    let mut found = None;
    pci::enumerate(|f| {
        if f.vendor == vpci::VENDOR_ID && f.device == vpci::DEVICE_ID_NET && found.is_none() {
            found = Some((f.dev, f.func));
        }
    });
    let (dev, func) = found?;
    let lo = pci::config_read(0, dev, func, 0x10);
    let hi = if lo & 0x6 == 0x4 {
        u64::from(pci::config_read(0, dev, func, 0x14))
    } else {
        0
    };
    let cmd = pci::config_read(0, dev, func, 0x04);
    pci::config_write(0, dev, func, 0x04, (cmd & 0xffff) | 0x6);
    Some((dev, func, (u64::from(lo) & !0xf) | hi << 32))
}

/// The virtio capabilities of the function: (common, notify, device) regions in BAR0.
fn caps(dev: u8, func: u8) -> Result<(VirtioPciCap, VirtioPciCap, VirtioPciCap), NetError> {
    let (mut c, mut n, mut d) = (None, None, None);
    let mut ptr = (pci::config_read(0, dev, func, 0x34) & 0xfc) as u8;
    // A bounded walk: a device could present a looping list.
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let mut b = [0u8; 20];
        for (i, chunk) in b.chunks_mut(4).enumerate() {
            let off = ptr.saturating_add(4 * i as u8);
            chunk.copy_from_slice(&pci::config_read(0, dev, func, off).to_le_bytes());
        }
        if let Some(cap) = VirtioPciCap::from_bytes(&b) {
            let slot = match cap.cfg_type {
                cfg_type::COMMON => &mut c,
                cfg_type::NOTIFY => &mut n,
                cfg_type::DEVICE => &mut d,
                _ => &mut None,
            };
            if slot.is_none() && cap.bar == 0 {
                *slot = Some(cap);
            }
        }
        ptr = b[1] & 0xfc;
    }
    match (c, n, d) {
        (Some(c), Some(n), Some(d)) => Ok((c, n, d)),
        _ => Err(NetError::Init(
            "common, notify or device capability missing in BAR0",
        )),
    }
}

impl VirtioNet {
    /// Finds the NIC and brings it up (virtio 1.1 §3.1.1); all RX buffers are offered.
    pub fn init(arena: &mut Arena) -> Result<VirtioNet, NetError> {
        let mut nic = Self::open(arena)?;
        nic.bring_up(true)?;
        Ok(nic)
    }

    /// Finds the NIC, resets it and allocates its queues (not yet configured).
    fn open(arena: &mut Arena) -> Result<VirtioNet, NetError> {
        let (dev, func, bar0) = find().ok_or(NetError::NotFound)?;
        let (c, n, d) = caps(dev, func)?;
        let common = bar0 + u64::from(c.offset);
        let st = common + common::DEVICE_STATUS;
        reset(st)?;
        if r16(common + common::NUM_QUEUES) < 2 {
            return Err(NetError::Init("fewer than two queues"));
        }
        let mut q = [None, None];
        for (i, slot) in q.iter_mut().enumerate() {
            let i = i as u16;
            w16(common + common::QUEUE_SELECT, i);
            let max = r16(common + common::QUEUE_SIZE);
            let size = QUEUE_SIZE.min(max);
            if !ring::valid_queue_size(size) {
                return Err(NetError::Init("queue size offered is not a power of two"));
            }
            let desc = arena
                .alloc(ring::DESC_SIZE * u64::from(size))
                .ok_or(NetError::NoMemory)?;
            let avail = arena
                .alloc(ring::avail::bytes(size))
                .ok_or(NetError::NoMemory)?;
            let used = arena
                .alloc(ring::used::bytes(size))
                .ok_or(NetError::NoMemory)?;
            let bufs = arena
                .alloc(BUF_SIZE * u64::from(size))
                .ok_or(NetError::NoMemory)?;
            let off = r16(common + common::QUEUE_NOTIFY_OFF);
            *slot = Some(Vq {
                size,
                desc,
                avail,
                used,
                bufs,
                notify: bar0 + vpci::notify_address(n.offset, off, n.notify_off_multiplier),
                avail_idx: 0,
                last_used: 0,
                queue: i,
            });
        }
        let [Some(rx), Some(tx)] = q else {
            return Err(NetError::Init("queues"));
        };
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = r8(bar0 + u64::from(d.offset) + net::config::MAC + i as u64);
        }
        Ok(VirtioNet {
            common,
            rx,
            tx,
            mac,
            rx_frames: 0,
            tx_frames: 0,
            rx_runts: 0,
        })
    }

    /// Resets the device and brings it up on the queues' memory: features (VERSION_1, MAC
    /// when offered; never RING_INDIRECT_DESC), both queues from index 0, every RX buffer
    /// offered when `post_rx` (otherwise the RX ring starts empty), DRIVER_OK.
    pub fn bring_up(&mut self, post_rx: bool) -> Result<(), NetError> {
        self.bring_up_with(post_rx, None)
    }

    /// [`VirtioNet::bring_up`], but the device is told `tx_layout` for the TX queue instead of
    /// where its rings are (a hostile driver's lie; the driver keeps using its own memory).
    pub fn bring_up_with(
        &mut self,
        post_rx: bool,
        tx_layout: Option<RingLayout>,
    ) -> Result<(), NetError> {
        let common = self.common;
        let st = common + common::DEVICE_STATUS;
        reset(st)?;
        w8(st, status::ACKNOWLEDGE);
        w8(st, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            w32(common + common::DEVICE_FEATURE_SELECT, sel);
            offered |= u64::from(r32(common + common::DEVICE_FEATURE)) << (32 * sel);
        }
        if offered & bit(features::VERSION_1) == 0 {
            return Err(NetError::Init("device does not offer VERSION_1"));
        }
        let want = offered & (bit(features::VERSION_1) | bit(net::features::MAC));
        for sel in 0..2u32 {
            w32(common + common::DRIVER_FEATURE_SELECT, sel);
            w32(common + common::DRIVER_FEATURE, (want >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w8(st, s);
        if r8(st) & status::FEATURES_OK == 0 {
            w8(st, s | status::FAILED);
            return Err(NetError::Init("device refused the features"));
        }
        for q in [&mut self.rx, &mut self.tx] {
            let own = RingLayout {
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            };
            let l = match tx_layout {
                Some(l) if q.queue == net::TX_QUEUE => l,
                _ => own,
            };
            w16(common + common::QUEUE_SELECT, q.queue);
            w16(common + common::QUEUE_SIZE, l.size);
            w64(common + common::QUEUE_DESC, l.desc);
            w64(common + common::QUEUE_DRIVER, l.avail);
            w64(common + common::QUEUE_DEVICE, l.used);
            q.clear();
            w16(common + common::QUEUE_ENABLE, 1);
        }
        // Every RX entry is a device-writable buffer, offered once now and again after use.
        for i in 0..self.rx.size {
            self.rx.set_desc(
                i,
                Descriptor {
                    addr: self.rx.buf(i),
                    len: BUF_SIZE as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            if post_rx {
                self.rx.offer(i);
            }
        }
        w8(st, s | status::DRIVER_OK);
        if r8(st) & status::DEVICE_NEEDS_RESET != 0 {
            return Err(NetError::Init("device needs reset after DRIVER_OK"));
        }
        self.rx.kick();
        Ok(())
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        r8(self.common + common::DEVICE_STATUS)
    }

    /// The receive queue, for workloads that write its rings themselves.
    pub fn rx_queue(&mut self) -> &mut Vq {
        &mut self.rx
    }

    /// The transmit queue, for workloads that write its rings themselves.
    pub fn tx_queue(&mut self) -> &mut Vq {
        &mut self.tx
    }

    /// DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        r8(self.common + common::DEVICE_STATUS) & status::DEVICE_NEEDS_RESET != 0
    }

    /// Hands the next received frame (without the virtio header) to `f`, then gives its buffer
    /// back. Returns false when none was waiting.
    pub fn recv(&mut self, f: impl FnOnce(&[u8])) -> Result<bool, NetError> {
        let Some((id, len)) = self.rx.take_used() else {
            return Ok(false);
        };
        let Ok(id) = u16::try_from(id) else {
            return Err(NetError::Device("RX used id out of range"));
        };
        if id >= self.rx.size || u64::from(len) > BUF_SIZE {
            return Err(NetError::Device("RX used element out of range"));
        }
        let len = len as usize;
        if len > HDR_LEN {
            // SAFETY: the buffer of entry `id` (BUF_SIZE bytes, checked `len` within it), which
            // the device has returned and no longer writes.
            let data = unsafe {
                core::slice::from_raw_parts(
                    (self.rx.buf(id) + HDR_LEN as u64) as *const u8,
                    len - HDR_LEN,
                )
            };
            self.rx_frames += 1;
            f(data);
        } else {
            self.rx_runts += 1;
        }
        self.rx.offer(id);
        self.rx.kick();
        Ok(true)
    }

    /// Collects TX completions (buffers become reusable).
    fn reap_tx(&mut self) -> Result<(), NetError> {
        while let Some((id, _)) = self.tx.take_used() {
            if id >= u32::from(self.tx.size) {
                return Err(NetError::Device("TX used id out of range"));
            }
        }
        Ok(())
    }

    /// Waits (bounded, [`DEVICE_PATIENCE_MS`]) until the device has taken every frame sent, so none is lost when
    /// the workload exits right after its last send.
    pub fn drain_tx(&mut self) -> Result<(), NetError> {
        let t0 = crate::clock::rdtsc();
        loop {
            self.reap_tx()?;
            if self.tx.in_flight() == 0 {
                return Ok(());
            }
            if crate::clock::ticks_to_ms(crate::clock::rdtsc() - t0) > DEVICE_PATIENCE_MS {
                return Err(NetError::Device("TX queue never drained"));
            }
            core::hint::spin_loop();
        }
    }

    /// Sends one frame built by `fill` into a buffer of up to `net::MAX_FRAME` bytes (`fill`
    /// returns the frame's length). Waits, bounded, for a free TX entry.
    pub fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> Result<(), NetError> {
        let t0 = crate::clock::rdtsc();
        loop {
            self.reap_tx()?;
            if self.tx.in_flight() < self.tx.size {
                break;
            }
            if crate::clock::ticks_to_ms(crate::clock::rdtsc() - t0) > DEVICE_PATIENCE_MS {
                return Err(NetError::Device("TX queue never drained"));
            }
            core::hint::spin_loop();
        }
        let id = self.tx.avail_idx % self.tx.size;
        let buf = self.tx.buf(id);
        // SAFETY: the buffer of TX entry `id`, not in flight (checked above), BUF_SIZE bytes.
        let b = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, BUF_SIZE as usize) };
        b[..HDR_LEN].fill(0);
        let n = fill(&mut b[HDR_LEN..HDR_LEN + net::MAX_FRAME]).min(net::MAX_FRAME);
        self.tx.set_desc(
            id,
            Descriptor {
                addr: buf,
                len: (HDR_LEN + n) as u32,
                flags: 0,
                next: 0,
            },
        );
        self.tx.offer(id);
        self.tx.kick();
        self.tx_frames += 1;
        Ok(())
    }
}
