//! I/O ports of a Ferry VM.
//!
//! Every port access from the guest is a VM exit (about 28 µs on the nested KVM Ferry is
//! developed on), so hot paths must not use ports; they are for the console, PCI configuration
//! and the rare control events below.

/// First port of the 16550 serial console (COM1).
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of ports of a 16550.
pub const SERIAL_LEN: u16 = 8;
/// PCI configuration mechanism #1: address register.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration mechanism #1: data window (4 bytes).
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Ferry control device: base port.
pub const FERRY_CTL_BASE: u16 = 0x510;
/// Ferry control device: number of ports.
pub const FERRY_CTL_LEN: u16 = 8;
/// A 32-bit write here ends the VM with that exit status.
pub const FERRY_EXIT: u16 = FERRY_CTL_BASE;
/// A 32-bit write here records an [`Event`] with the VMM's clock.
pub const FERRY_EVENT: u16 = FERRY_CTL_BASE + 4;

/// Events the guest reports through [`FERRY_EVENT`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest's very first instruction ran.
    Booted = 1,
    /// A timed benchmark loop begins.
    BenchStart = 2,
    /// A timed benchmark loop ended.
    BenchEnd = 3,
}

impl Event {
    /// Decodes an event number written by the guest.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Booted),
            2 => Some(Self::BenchStart),
            3 => Some(Self::BenchEnd),
            _ => None,
        }
    }
}
