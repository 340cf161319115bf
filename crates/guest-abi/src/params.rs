//! The boot parameter block: written by the VMM at [`crate::layout::PARAMS_GPA`] before the guest
//! starts; a few fields are then used as a mailbox while the guest runs.
//!
//! Mailbox fields are plain integers read and written with volatile/atomic accesses on both
//! sides; their offsets are exported so the VMM can address them in guest memory.

use core::mem::offset_of;

/// `BootParams::magic`: "FERRYBP1".
pub const MAGIC: u64 = u64::from_le_bytes(*b"FERRYBP1");
/// Version of this layout; bump it when a field changes.
pub const VERSION: u32 = 3;

/// Workloads the built-in guest knows.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Print a greeting, enumerate PCI, exit 0.
    Hello = 1,
    /// Dirty a working set at a given rate while keeping a verifiable ledger.
    Dirty = 2,
    /// Run [`crate::bench::spin_loop`] and report its speed.
    Spin = 3,
    /// Touch an address backed by nothing and an unknown port, report what came back, exit 0.
    Probe = 4,
    /// Access a virtual address that is not mapped: the guest dies (tests the VMM survives).
    Crash = 5,
    /// Drive the passthrough NVMe controller with self-verifying random reads and writes.
    NvmeVerify = 6,
    /// Submit malformed NVMe commands and check the error statuses that come back.
    NvmeMalformed = 7,
    /// RDMA agent, passive side: bind a GID on the PVRDMA device, answer REQ/SIDR_REQ, echo UD
    /// messages, answer DREQ ([`RdmaArgs`]).
    RdmaServer = 8,
    /// RDMA agent, active side: REQ → REP → RTU, SIDR, a verified stream of echoed UD
    /// messages, DREQ → DREP ([`RdmaArgs`]).
    RdmaClient = 9,
    /// Writes garbage into the PVRDMA command slot, rings and page directories and checks that
    /// every one is answered with an error.
    RdmaHostile = 10,
    /// Drive the passthrough virtio-net NIC: answer ARP and ping, echo UDP datagrams
    /// ([`NetArgs`]).
    NetEcho = 11,
    /// A sequenced UDP stream both ways on the passthrough virtio-net NIC: the peer's stream
    /// is verified in order and content, and each of its datagrams is answered with the
    /// guest's own next datagram ([`NetArgs`]).
    NetStream = 12,
    /// Garbles the passthrough virtio-net NIC's rings (descriptor loops, oversized chains,
    /// out-of-RAM and wrapping addresses, index jumps, wrong buffer directions, unnegotiated
    /// indirect descriptors, zero-length buffers), checks the device refuses each or reports
    /// DEVICE_NEEDS_RESET, then resets it and checks it still works by resolving and pinging
    /// the peer ([`NetArgs::peer_ip`]).
    NetHostile = 13,
}

impl Workload {
    /// All workloads, for listing.
    pub const ALL: [Workload; 13] = [
        Workload::Hello,
        Workload::Dirty,
        Workload::Spin,
        Workload::Probe,
        Workload::Crash,
        Workload::NvmeVerify,
        Workload::NvmeMalformed,
        Workload::RdmaServer,
        Workload::RdmaClient,
        Workload::RdmaHostile,
        Workload::NetEcho,
        Workload::NetStream,
        Workload::NetHostile,
    ];

    /// Decodes a workload number.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Hello),
            2 => Some(Self::Dirty),
            3 => Some(Self::Spin),
            4 => Some(Self::Probe),
            5 => Some(Self::Crash),
            6 => Some(Self::NvmeVerify),
            7 => Some(Self::NvmeMalformed),
            8 => Some(Self::RdmaServer),
            9 => Some(Self::RdmaClient),
            10 => Some(Self::RdmaHostile),
            11 => Some(Self::NetEcho),
            12 => Some(Self::NetStream),
            13 => Some(Self::NetHostile),
            _ => None,
        }
    }

    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Dirty => "dirty",
            Self::Spin => "spin",
            Self::Probe => "probe",
            Self::Crash => "crash",
            Self::NvmeVerify => "nvme-verify",
            Self::NvmeMalformed => "nvme-malformed",
            Self::RdmaServer => "rdma-server",
            Self::RdmaClient => "rdma-client",
            Self::RdmaHostile => "rdma-hostile",
            Self::NetEcho => "net-echo",
            Self::NetStream => "net-stream",
            Self::NetHostile => "net-hostile",
        }
    }
}

/// Arguments of the selected workload (unused fields are zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadArgs {
    /// `dirty` (and `nvme-verify` with [`NVME_WITH_DIRTY`]): bytes of memory in the working set
    /// (rounded down to pages).
    pub working_set_bytes: u64,
    /// `dirty` (and `nvme-verify` with [`NVME_WITH_DIRTY`]): target page writes per second; 0
    /// means as fast as possible.
    pub rate_pages_per_sec: u64,
    /// `dirty`: how long to run in milliseconds; 0 means until the VMM asks to stop.
    pub duration_ms: u64,
    /// `dirty`, `nvme-verify`: interval between progress lines in milliseconds; 0 disables them.
    pub report_interval_ms: u64,
    /// Seed of the workload's pseudo-random generator.
    pub seed: u64,
    /// `spin`: loop iterations.
    pub iterations: u64,
    /// `nvme-*`: the NVMe workload's parameters.
    pub nvme: NvmeArgs,
    /// RDMA workloads.
    pub rdma: RdmaArgs,
    /// Network workloads.
    pub net: NetArgs,
}

/// Arguments of the network workloads (IPv4 addresses as big-endian `u32`s,
/// `a.b.c.d` = `a << 24 | …`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetArgs {
    /// The guest's IPv4 address.
    pub ip: u32,
    /// The UDP port the workload serves (`net-echo` echoes on it, `net-stream` takes its
    /// peer's stream there).
    pub udp_port: u32,
    /// `net-echo`: datagrams to echo before exiting 0 (0: until stopped or `duration_ms`).
    /// `net-stream`: datagrams of each stream (0: until stopped or `duration_ms`).
    pub count: u64,
    /// `net-hostile`: the IPv4 address of the peer on the wire it resolves (ARP) and pings to
    /// make frames arrive and to check the NIC still works.
    pub peer_ip: u32,
    /// Zero (keeps the block free of padding).
    pub reserved: u32,
}

/// Arguments of the RDMA workloads (IPv4 GIDs as big-endian `u32`s, `a.b.c.d` = `a << 24 | …`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdmaArgs {
    /// The GID the guest binds (CREATE_BIND index 0).
    pub local_gid: u32,
    /// The peer's GID (client: whom to connect to).
    pub peer_gid: u32,
    /// Another VM's GID, for [`rdma_mode::BIND_OTHER`] and [`rdma_mode::SPOOF`].
    pub other_gid: u32,
    /// rdma_cm port of the service.
    pub service_port: u32,
    /// UD message size in bytes.
    pub msg_size: u32,
    /// An [`rdma_mode`] value.
    pub mode: u32,
    /// UD messages to exchange (client); 0 = serve until stopped (server).
    pub messages: u64,
}

/// Variants of the RDMA client.
pub mod rdma_mode {
    /// Connect, exchange, disconnect.
    pub const NORMAL: u32 = 0;
    /// Try to bind `other_gid` (expects a refusal).
    pub const BIND_OTHER: u32 = 1;
    /// Send a REQ claiming `other_gid` as its source (expects a refusal).
    pub const SPOOF: u32 = 2;
    /// rdma-core's `udaddy` pattern, for interop with Linux: SIDR only (no REQ); the client
    /// sends `messages` SEND_WITH_IMM (immediate = its QPN) of `msg_size` bytes, then takes as
    /// many replies; the server takes `messages` such sends and answers each.
    pub const UDADDY: u32 = 3;
    /// rdma-core's `rping` over an RC queue pair (both workloads): the client SENDs its
    /// buffer's address, the server RDMA READs it and verifies rping's pattern, the client
    /// SENDs a second address, the server RDMA WRITEs the data back, the client compares;
    /// `messages` pings of `msg_size` bytes.
    pub const RPING: u32 = 4;
    /// rdma-core's `ucmatose` over RC: the server SENDs 10 messages of `msg_size` bytes, the
    /// client receives them and SENDs as many copies of the last back; both verify.
    pub const UCMATOSE: u32 = 5;
    /// An `ib_write_bw`-like stream over RC: the server advertises a buffer, the client RDMA
    /// WRITEs `messages` messages of `msg_size` bytes into it (the last with immediate data),
    /// the server verifies the last one; the client reports the bandwidth.
    pub const WRITE_BW: u32 = 6;
}

/// Arguments of the NVMe workloads (0 picks the default noted on each field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeArgs {
    /// I/O queue pairs (default 2, at most 16).
    pub queues: u32,
    /// Entries per I/O queue (default 32, at most 256).
    pub depth: u32,
    /// I/Os to complete; 0 runs for `WorkloadArgs::duration_ms` instead.
    pub ios: u64,
    /// First block of the verified region.
    pub lba_start: u64,
    /// Blocks in the verified region (default: 16 MiB worth, bounded by the namespace).
    pub lba_count: u64,
    /// Percentage of reads (0..=100); `READS_DEFAULT` means the default 50.
    pub read_percent: u32,
    /// Flags (`NVME_*` below).
    pub flags: u32,
    /// Smallest I/O in bytes (default 4096, a multiple of the block size).
    pub io_min_bytes: u32,
    /// Largest I/O in bytes (default `io_min_bytes`, at most 128 KiB).
    pub io_max_bytes: u32,
}

/// `NvmeArgs::read_percent` value that selects the default.
pub const READS_DEFAULT: u32 = 0xffff_ffff;
/// `NvmeArgs::flags`: first read the region and adopt the generations found on the device
/// (verifying every header), as when a previous VM run wrote it.
pub const NVME_ADOPT_EXISTING: u32 = 1;
/// `NvmeArgs::flags`: do not verify every written block again at the end.
pub const NVME_NO_FINAL_VERIFY: u32 = 2;
/// `NvmeArgs::flags` (`nvme-verify`): also run `dirty` in the part of the work area the NVMe
/// state and buffers leave free, with `WorkloadArgs::working_set_bytes` and
/// `WorkloadArgs::rate_pages_per_sec`, one batch of ledger writes between NVMe steps. Its
/// ledger is verified on request (the mailbox) and at the end; the exit status is the first
/// failure of either.
pub const NVME_WITH_DIRTY: u32 = 4;
/// `NvmeArgs::flags`: enable MSI-X and create every I/O CQ with interrupts (vector = queue
/// id, LAPIC vector 0x40 + queue id). The guest still polls with interrupts disabled, so the
/// interrupts only stay pending in its local APIC; they exist for the hypervisor to handle.
pub const NVME_INTERRUPTS: u32 = 8;
/// `NvmeArgs::flags`: during the random I/O, also send an admin command (Identify Controller,
/// checked) about every millisecond, as guests that poll health data do.
pub const NVME_ADMIN_POLL: u32 = 16;
/// `NvmeArgs::flags`: do not read the data of completed reads (their completions are still
/// checked: queue, slot, tag, status). For speed measurements against a host-side client that
/// does not look at the data either (`ferry bench nvme`); only with 100% reads.
pub const NVME_NO_DATA_CHECK: u32 = 32;
/// `NvmeArgs::flags`: random I/O starts at multiples of the smallest I/O size within the region
/// (4 KiB reads on 4 KiB boundaries, as a host-side benchmark issues them and as fio does by
/// default). Without it a random I/O may start at any block.
pub const NVME_ALIGNED: u32 = 64;

/// The boot parameter block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// A [`Workload`] number.
    pub workload: u32,
    /// Guest TSC frequency in kHz (the guest's monotonic clock).
    pub tsc_khz: u64,
    /// Bytes of RAM at guest-physical 0.
    pub ram_lo_size: u64,
    /// Bytes of RAM at [`crate::layout::HIGH_RAM_START`].
    pub ram_hi_size: u64,
    /// Workload arguments.
    pub args: WorkloadArgs,
    /// Mailbox, VMM → guest: incremented to ask for a ledger verification.
    pub verify_req: u32,
    /// Mailbox, guest → VMM: set to `verify_req` once that verification finished.
    pub verify_done: u32,
    /// Mailbox, guest → VMM: result of the last verification (0 = the ledger holds).
    pub verify_status: u32,
    /// Mailbox, VMM → guest: non-zero asks the workload to finish (verify, then exit).
    pub stop_req: u32,
    /// Mailbox, guest → VMM: pages checked by the last verification.
    pub verify_pages: u64,
    /// Mailbox, guest → VMM: page writes recorded in the ledger at the last verification.
    pub verify_writes: u64,
    /// Mailbox, guest → VMM: workload progress (page writes so far for `dirty`, I/Os completed
    /// for `nvme-verify`, also with [`NVME_WITH_DIRTY`]).
    pub progress: u64,
    /// Mailbox, guest → VMM: TSC cycles the `spin` loop took.
    pub bench_cycles: u64,
    /// Mailbox, guest → VMM: result value of the `spin` loop.
    pub bench_result: u64,
}

const _: () = assert!(BootParams::SIZE <= 4096, "the block must fit its page");

/// Offset of [`BootParams::verify_req`].
pub const OFF_VERIFY_REQ: usize = offset_of!(BootParams, verify_req);
/// Offset of [`BootParams::verify_done`].
pub const OFF_VERIFY_DONE: usize = offset_of!(BootParams, verify_done);
/// Offset of [`BootParams::verify_status`].
pub const OFF_VERIFY_STATUS: usize = offset_of!(BootParams, verify_status);
/// Offset of [`BootParams::stop_req`].
pub const OFF_STOP_REQ: usize = offset_of!(BootParams, stop_req);
/// Offset of [`BootParams::verify_pages`].
pub const OFF_VERIFY_PAGES: usize = offset_of!(BootParams, verify_pages);
/// Offset of [`BootParams::verify_writes`].
pub const OFF_VERIFY_WRITES: usize = offset_of!(BootParams, verify_writes);
/// Offset of [`BootParams::progress`].
pub const OFF_PROGRESS: usize = offset_of!(BootParams, progress);
/// Offset of [`BootParams::bench_cycles`].
pub const OFF_BENCH_CYCLES: usize = offset_of!(BootParams, bench_cycles);
/// Offset of [`BootParams::bench_result`].
pub const OFF_BENCH_RESULT: usize = offset_of!(BootParams, bench_result);

/// Verification results reported in [`BootParams::verify_status`] and as guest exit status.
pub mod status {
    /// Everything held.
    pub const OK: u32 = 0;
    /// A data page does not carry the generation its ledger entry records.
    pub const LEDGER_PAGE_MISMATCH: u32 = 10;
    /// A data page's stamp does not match its page number and generation.
    pub const LEDGER_STAMP_MISMATCH: u32 = 11;
    /// The ledger's entries do not add up to the recorded number of writes.
    pub const LEDGER_TOTAL_MISMATCH: u32 = 12;
    /// The boot parameters were unusable.
    pub const BAD_PARAMS: u32 = 20;
    /// No NVMe controller was found on the PCI bus.
    pub const NVME_NOT_FOUND: u32 = 30;
    /// The NVMe controller could not be brought up.
    pub const NVME_INIT_FAILED: u32 = 31;
    /// An NVMe command failed.
    pub const NVME_IO_ERROR: u32 = 32;
    /// Data read back does not match what was written last.
    pub const NVME_DATA_MISMATCH: u32 = 33;
    /// A completion for a command that was not outstanding (duplicate or corrupted).
    pub const NVME_UNEXPECTED_COMPLETION: u32 = 34;
    /// A command never completed.
    pub const NVME_LOST_COMPLETION: u32 = 35;
    /// `nvme-malformed`: a malformed command got an unexpected status.
    pub const NVME_WRONG_ERROR_STATUS: u32 = 36;
    /// RDMA: a refusal the workload expected happened (bind-other, spoof modes).
    pub const RDMA_REFUSED: u32 = 40;
    /// RDMA: something the workload needed was refused or failed.
    pub const RDMA_FAILED: u32 = 41;
    /// RDMA: no PVRDMA device.
    pub const RDMA_NO_DEVICE: u32 = 42;
    /// RDMA: a received message did not match what was sent.
    pub const RDMA_VERIFY_FAILED: u32 = 43;
    /// RDMA: a refusal the workload expected did not happen.
    pub const RDMA_NOT_REFUSED: u32 = 44;
    /// Network: no virtio-net device on the PCI bus.
    pub const NET_NO_DEVICE: u32 = 50;
    /// Network: the virtio-net device could not be brought up (features, queues, status).
    pub const NET_INIT_FAILED: u32 = 51;
    /// Network: the device asked for a reset (DEVICE_NEEDS_RESET) or returned a buffer the
    /// driver never offered.
    pub const NET_DEVICE_FAILED: u32 = 52;
    /// `net-stream`: a datagram of the peer's stream came out of order, twice, or corrupted.
    pub const NET_STREAM_MISMATCH: u32 = 53;
    /// `net-hostile`: a garbled ring was neither refused nor reported (DEVICE_NEEDS_RESET) by
    /// the device, or a refusal came back wrong.
    pub const NET_HOSTILE_UNHANDLED: u32 = 54;
    /// The guest panicked.
    pub const PANIC: u32 = 99;
}

impl BootParams {
    /// Size of the block in bytes.
    pub const SIZE: usize = core::mem::size_of::<BootParams>();

    /// The block as bytes, for copying into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootParams is repr(C), Copy, and made only of u32/u64 fields with no padding
        // (checked by the `no_padding` test), so every byte is initialized.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), Self::SIZE) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_padding() {
        // 8 + 4 + 4 + 8*3 + args (6*8 + nvme 48 + rdma 32 + net 24) + 4*4 + 8*5
        assert_eq!(core::mem::size_of::<NvmeArgs>(), 48);
        assert_eq!(core::mem::size_of::<RdmaArgs>(), 32);
        assert_eq!(core::mem::size_of::<NetArgs>(), 24);
        assert_eq!(
            BootParams::SIZE,
            8 + 4 + 4 + 24 + 48 + 48 + 32 + 24 + 16 + 40
        );
        assert_eq!(OFF_VERIFY_REQ % 4, 0);
        assert_eq!(OFF_VERIFY_PAGES % 8, 0);
    }

    #[test]
    fn workloads_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::from_u32(w as u32), Some(w));
        }
        assert_eq!(Workload::from_u32(0), None);
    }
}
